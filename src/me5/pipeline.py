"""The pieces the Hydra app composes: config validation, encoder/loss building, evaluation, results.

Kept apart from ``train.py`` so that the app stays a thin sequence of calls; these take plain values or
OmegaConf nodes and never read the global config.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from pathlib import Path

import torch
from lightning.pytorch.callbacks import Callback

from me5.errors import ConfigError

log = logging.getLogger(__name__)

STAGES = ("pretrain", "finetune")


def stage_order(stages) -> list[str]:
    """The configured stages in pipeline order."""
    return [s for s in STAGES if s in stages]


def validate_config(cfg, *, world_size: int | None = None) -> list[str]:
    """Reject unknown or contradictory settings before any data is read; each error names its field.

    With ``world_size`` (known once the Trainer exists) the batch sizes are also checked against it.
    """
    stages = list(cfg.get("stages") or {})
    unknown = [s for s in stages if s not in STAGES]
    if unknown:
        raise ConfigError(f"stages.{unknown[0]}", f"unknown stage; stages are {list(STAGES)}")
    if not stages:
        raise ConfigError("stage", "no stage selected (e.g. stage=[pretrain,finetune])")
    terms = cfg.loss.get("terms") or {}
    for tname, tcfg in terms.items():
        for sname, w in (tcfg.get("weight") or {}).items():
            if sname not in STAGES:
                raise ConfigError(f"loss.terms.{tname}.weight.{sname}", f"unknown stage; stages are {list(STAGES)}")
            if not (float(w) >= 0):
                raise ConfigError(f"loss.terms.{tname}.weight.{sname}", f"must be >= 0, got {w}")
    if float(cfg.loss.temperature) <= 0:
        raise ConfigError("loss.temperature", f"must be > 0, got {cfg.loss.temperature}")
    for s in stages:
        scfg = cfg.stages[s]
        if s not in (cfg.data or {}):
            raise ConfigError(f"data.{s}", f"the data config '{cfg.data.get('name')}' has no mixture for stage {s}")
        if not any(float((t.get("weight") or {}).get(s, 0)) > 0 for t in terms.values()):
            raise ConfigError(f"loss.terms.*.weight.{s}", f"no loss term has a positive weight in stage {s}")
        gbs = int(scfg.global_batch_size)
        if gbs < 1:
            raise ConfigError(f"stages.{s}.global_batch_size", f"must be >= 1, got {gbs}")
        if int(scfg.max_steps) < 1:
            raise ConfigError(f"stages.{s}.max_steps", f"must be >= 1, got {scfg.max_steps}")
        if int(scfg.n_negatives) < 0:
            raise ConfigError(f"stages.{s}.n_negatives", "must be >= 0")
        per_device = scfg.get("per_device_batch_size")
        if per_device is not None:
            if int(per_device) > gbs:
                raise ConfigError(
                    f"stages.{s}.per_device_batch_size",
                    f"{per_device} is larger than the global batch stages.{s}.global_batch_size={gbs}",
                )
            if gbs % int(per_device):
                raise ConfigError(f"stages.{s}.per_device_batch_size", f"{per_device} does not divide the global batch {gbs}")
            if world_size is not None and gbs // int(per_device) != world_size:
                raise ConfigError(
                    f"stages.{s}.per_device_batch_size",
                    f"global {gbs} / per-device {per_device} = {gbs // int(per_device)} devices, but the trainer has {world_size}",
                )
        if world_size is not None and gbs % world_size:
            raise ConfigError(f"stages.{s}.global_batch_size", f"{gbs} is not divisible by the {world_size} devices")
        m = scfg.module
        if m.get("chunk_rows") is not None and m.get("chunk_tokens") is not None:
            raise ConfigError(f"stages.{s}.module.chunk_tokens", "set chunk_rows or chunk_tokens, not both")
        for k in ("chunk_rows", "chunk_tokens"):
            if m.get(k) is not None and int(m[k]) < 1:
                raise ConfigError(f"stages.{s}.module.{k}", f"must be >= 1, got {m[k]}")
        if m.get("chunk_rows") is not None and world_size is not None and int(m.chunk_rows) > gbs // world_size:
            raise ConfigError(
                f"stages.{s}.module.chunk_rows",
                f"{m.chunk_rows} is larger than the per-device batch {gbs // world_size}",
            )
    if cfg.model.get("prompt_style", "e5") not in ("e5", "instruct"):
        raise ConfigError("model.prompt_style", f"unknown '{cfg.model.prompt_style}'; choose e5 or instruct")
    return stages


def build_encoder(encoder_factory, tokenizer, *, init_from: str | None = None, previous=None):
    """The stage's encoder: the previous stage's (same job), ``init_from`` (HF folder or .ckpt), or the config's."""
    from hydra.utils import instantiate

    from me5.models.encoder import Encoder

    if init_from is None and previous is not None:
        return previous
    kwargs = {k: v for k, v in encoder_factory.items() if k in ("pooling", "normalize", "attn_implementation", "gradient_checkpointing")}
    if init_from is not None:
        path = Path(str(init_from))
        if path.is_dir():
            return Encoder.from_pretrained(str(path), tokenizer=tokenizer, **kwargs)
        if path.suffix == ".ckpt":
            if not path.is_file():
                raise ConfigError("stages.*.init_from", f"no such checkpoint: {path}")
            encoder = instantiate(encoder_factory)(tokenizer=tokenizer)
            state = torch.load(path, map_location="cpu", weights_only=False)["state_dict"]
            enc_state = {k[len("encoder."):]: v for k, v in state.items() if k.startswith("encoder.")}
            encoder.load_state_dict(enc_state)
            return encoder
        raise ConfigError("stages.*.init_from", f"'{path}' is neither an exported model folder nor a .ckpt file")
    return instantiate(encoder_factory)(tokenizer=tokenizer)


def build_loss(terms_cfg: Mapping, stage: str):
    """The stage's :class:`~me5.losses.WeightedLoss`: every term with a positive weight for ``stage``."""
    from hydra.utils import instantiate

    from me5.losses import WeightedLoss

    terms, weights = {}, {}
    for name, tcfg in terms_cfg.items():
        w = float((tcfg.get("weight") or {}).get(stage, 0.0))
        if w > 0:
            terms[name] = instantiate(tcfg.term)
            weights[name] = w
    return WeightedLoss(terms, weights)


def evaluate_all(evaluators: Mapping, encoder, tokenizer) -> dict[str, float]:
    """Run every evaluator on the encoder's device; merged flat metrics."""
    device = next(encoder.parameters()).device
    out: dict[str, float] = {}
    for ev in evaluators.values():
        out.update(ev.evaluate(encoder, tokenizer, device=device, show_progress=True))
    return out


def finish_loggers(loggers) -> None:
    """Flush every logger; close W&B runs so the next stage starts its own run."""
    for lg in loggers:
        lg.finalize("success")
        if type(lg).__name__ == "WandbLogger":
            import wandb

            if wandb.run is not None:
                wandb.finish()


class ConfigInCheckpoint(Callback):
    """Stores the resolved config and run metadata in every checkpoint (``me5_config``, ``me5_meta``)."""

    def __init__(self, config: Mapping, meta: Mapping):
        self.config, self.meta = dict(config), dict(meta)

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        checkpoint["me5_config"] = self.config
        checkpoint["me5_meta"] = self.meta


def write_results(out_dir: Path, results: Mapping, *, meta: Mapping, timings: Mapping, data_counts: Mapping) -> Path:
    """Write ``metrics.json`` and ``results.md`` and print the results table."""
    from me5.eval.retrieval import format_table

    table = format_table(dict(results)) if results else "(no evaluation configured)"
    payload = {"results": results, "timings_s": timings, "data_counts": data_counts, "meta": meta}
    path = Path(out_dir) / "metrics.json"
    path.write_text(json.dumps(payload, indent=2, ensure_ascii=False, default=str))
    (Path(out_dir) / "results.md").write_text(table + "\n")
    print("\n" + table + f"\n\nmetrics: {path}\n")
    return path
