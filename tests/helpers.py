"""Test helpers: compose the real conf/ through Hydra's compose API."""

from __future__ import annotations

from pathlib import Path

from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, OmegaConf, open_dict

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"


def compose_cfg(overrides: list[str] | None = None, *, tmp_path: Path | None = None) -> DictConfig:
    """The app's config with ``overrides``; run folder and data under ``tmp_path`` when given."""
    overrides = list(overrides or [])
    if tmp_path is not None:
        overrides += [f"paths.output_dir={tmp_path / 'run'}", f"paths.log_dir={tmp_path / 'logs'}"]
    with initialize_config_dir(version_base="1.3", config_dir=str(CONF)):
        cfg = compose("config", overrides=overrides)
    return cfg


def group_options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


def to_plain(cfg: DictConfig) -> dict:
    with open_dict(cfg):
        return OmegaConf.to_container(cfg, resolve=True)


# ---------------------------------------------------------------------------------------------- data
SOURCE_KWARGS = {"name", "data_files", "hub_config", "split", "lang", "max_examples", "max_chars", "symmetric", "task",
                 "instruction", "strict", "size"}


def one_source(path_or_source, **kwargs):
    """A :class:`~me5.data.PairDataModule` of one source: a :class:`~me5.data.Source` given, or one built from a
    path with the Source keyword arguments among ``kwargs`` (the rest go to the DataModule)."""
    from me5.data import PairDataModule, Source

    src_kw = {k: kwargs.pop(k) for k in list(kwargs) if k in SOURCE_KWARGS}
    src = path_or_source if isinstance(path_or_source, Source) else Source(str(path_or_source), **src_kw)
    return PairDataModule({src.name: src}, **kwargs)


def connect(dm, tokenizer, *, global_batch_size: int = 8, world_size: int = 1, prompt_style: str = "e5", **kwargs):
    """``dm.connect`` with a batch plan of ``global_batch_size`` over ``world_size`` devices; returns ``dm``."""
    from me5.batching import BatchPlan
    from me5.prompts import PromptPolicy

    dm.connect(tokenizer, batch_plan=BatchPlan.build(global_batch_size=global_batch_size, world_size=world_size),
               prompts=PromptPolicy(prompt_style), **kwargs)
    return dm


def format_item(source, ex, *, n_negatives: int = 0, rng=None, prompt_style: str = "e5"):
    """One training item of ``source`` under a prompt style (what the DataModule's streams produce)."""
    import numpy as np

    from me5.data import ItemFormatter
    from me5.prompts import PromptPolicy

    fmt = ItemFormatter.for_source(source, prompts=PromptPolicy(prompt_style), n_negatives=n_negatives)
    return fmt(ex, rng=rng if rng is not None else np.random.default_rng(0))


# ---------------------------------------------------------------------------------------------- evaluation
class SlowEvaluator:
    """An evaluator (built from the ``eval`` group like the real ones) that takes ``seconds`` on its first call
    in a run folder, on every rank: a stand-in for an hours-long MIRACL pass. Returns the rank and world size
    it saw, so a test can tell that every rank evaluated."""

    def __init__(self, seconds: float, marker: str, prompts=None):
        self.seconds, self.marker = float(seconds), Path(marker)

    def evaluate(self, encoder, tokenizer, *, device=None, show_progress: bool = False) -> dict[str, float]:
        import time

        import torch.distributed as dist

        rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
        first = not self.marker.with_suffix(f".{rank}").exists()
        if first:
            time.sleep(self.seconds)
            self.marker.with_suffix(f".{rank}").touch()
        world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        return {"slow/ranks": float(world), f"slow/rank{rank}_slept": float(first)}


# ---------------------------------------------------------------------------------------------- preemption
class SignalAtStep:
    """A callback that sends this process ``signal`` when step ``step`` starts (once per ``marker`` file): a
    preemption (SIGTERM), or a node dying (SIGKILL), at a step the test chooses."""

    def __new__(cls, *args, **kwargs):
        from lightning.pytorch.callbacks import Callback

        class _SignalAtStep(Callback):
            def __init__(self, step: int, signal: str, marker: str):
                self.step, self.signal, self.marker = int(step), signal, Path(marker)

            def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
                import os
                import signal as _signal

                if trainer.global_step == self.step and not self.marker.exists():
                    self.marker.touch()
                    os.kill(os.getpid(), getattr(_signal, self.signal))

        return _SignalAtStep(*args, **kwargs)


class NaNGradsAt:
    """A callback that makes the gradients NaN at the given steps (after the backward, before the guard)."""

    def __new__(cls, *args, **kwargs):
        from lightning.pytorch.callbacks import Callback

        class _NaNGradsAt(Callback):
            def __init__(self, steps):
                self.steps = {int(s) for s in steps}

            def on_after_backward(self, trainer, pl_module) -> None:
                if trainer.global_step in self.steps:
                    p = next(q for q in pl_module.parameters() if q.grad is not None)
                    p.grad.fill_(float("nan"))

        return _NaNGradsAt(*args, **kwargs)
