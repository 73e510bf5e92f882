"""A console people can read (``me5.app.console``, the training bar of ``me5.app.callbacks``, the W&B logger):
each line once, the targeted library lines and warnings dropped and nothing else, a bar that reads
``<stage>: step/total`` after a resume too, and W&B without its banner or history dump."""

from __future__ import annotations

import io
import logging
import os
import re
import subprocess
import sys
import warnings

import pytest
import torch

from me5.app import console
from me5.app.console import tidy_console
from tests.helpers import ROOT

RANK_ZERO = "lightning.pytorch.utilities.rank_zero"


@pytest.fixture
def logs():
    """The root logger writing bare messages to a buffer, as Hydra's handler does (console + train.log), and a
    handler of Lightning's own on ``lightning.pytorch``; every logger touched is restored afterwards."""
    names = ("", "lightning", "lightning.pytorch", "lightning.fabric", RANK_ZERO)
    saved = {n: (logging.getLogger(n).level, list(logging.getLogger(n).handlers), list(logging.getLogger(n).filters),
                 logging.getLogger(n).propagate) for n in names}
    root_buf, own_buf = io.StringIO(), io.StringIO()
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    handler = logging.StreamHandler(root_buf)
    handler.setFormatter(logging.Formatter("%(message)s"))
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    lightning = logging.getLogger("lightning.pytorch")
    lightning.addHandler(logging.StreamHandler(own_buf))  # Lightning's: it adds one when it is imported first
    lightning.propagate = False
    lightning.setLevel(logging.INFO)
    yield root_buf, own_buf
    for n, (level, handlers, filters, propagate) in saved.items():
        lg = logging.getLogger(n)
        lg.setLevel(level)
        lg.handlers[:], lg.filters[:], lg.propagate = handlers, filters, propagate


def test_each_lightning_line_once_and_the_advertisement_dropped(logs):
    root_buf, own_buf = logs
    tidy_console()
    tidy_console()  # a second run in the same process (a sweep) adds no second filter or handler
    rz = logging.getLogger(RANK_ZERO)
    rz.info("💡 Tip: For seamless cloud logging and experiment tracking, try installing [litlogger](https://x)")
    rz.info("Restoring states from the checkpoint path at /run/checkpoints/pretrain/last.ckpt")  # me5 said it
    rz.info("Restored all states from the checkpoint at /run/checkpoints/pretrain/last.ckpt")
    rz.info("`Trainer.fit` stopped: `max_steps=300` reached.")  # the bar's last line says 300/300
    rz.info("`Trainer.fit` stopped: `max_epochs=1` reached.")  # news
    rz.warning("a litlog, not the advertisement")
    logging.getLogger("lightning.fabric.utilities.seed").info("Seed set to 0")
    logging.getLogger("me5.train").info("resuming stage pretrain")
    assert root_buf.getvalue().splitlines() == [
        "Restored all states from the checkpoint at /run/checkpoints/pretrain/last.ckpt",
        "`Trainer.fit` stopped: `max_epochs=1` reached.",
        "a litlog, not the advertisement",
        "Seed set to 0",
        "resuming stage pretrain",
    ]
    assert own_buf.getvalue() == ""  # not a second time through Lightning's own handler
    assert sum(isinstance(f, console._Drop) for f in rz.filters) == len(console._DROPPED)


def test_the_hardware_lines_once_per_run(logs):
    root_buf, _ = logs
    rz = logging.getLogger(RANK_ZERO)
    for _run in range(2):
        tidy_console()
        for _stage in ("pretrain", "finetune"):  # each stage's Trainer says it again
            rz.info("GPU available: False, used: False")
            rz.info("TPU available: False, using: 0 TPU cores")
            rz.info("Restored all states from the checkpoint")
        rz.info("GPU available: True (cuda), used: True")  # different hardware: a new line
    assert root_buf.getvalue().splitlines() == [
        "GPU available: False, used: False",
        "TPU available: False, using: 0 TPU cores",
        "Restored all states from the checkpoint",
        "Restored all states from the checkpoint",
        "GPU available: True (cuda), used: True",
    ] * 2
    assert sum(isinstance(f, console._Once) for f in rz.filters) == 1


TARGETED = [
    (FutureWarning, "`isinstance(treespec, LeafSpec)` is deprecated, use `isinstance(treespec, TreeSpec) and "
     "treespec.is_leaf()` instead.", "lightning.pytorch.utilities._pytree"),
    (UserWarning, "You defined a `validation_step` but have no `val_dataloader`. Skipping val loop.",
     "lightning.pytorch.trainer.configuration_validator"),
    (UserWarning, "Using ModelCheckpoint with manual optimization and every_n_train_steps, but no pre-optimization "
     "state was saved. The checkpoint will contain the model state AFTER optimization.",
     "lightning.pytorch.callbacks.model_checkpoint"),
    (UserWarning, "Checkpoint directory /r/checkpoints/pretrain exists and is not empty.",
     "lightning.pytorch.callbacks.model_checkpoint"),
]


def _warn(category, message, module):
    warnings.warn_explicit(message, category, module.replace(".", "/") + ".py", 1, module=module)


def test_warnings_are_dropped_by_message_and_module_only():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tidy_console()
        for category, message, module in TARGETED:
            _warn(category, message, module)
        kept = [
            (FutureWarning, TARGETED[0][1], "me5.training.module"),  # the same words from our own code
            (UserWarning, TARGETED[2][1], "tests.test_console"),
            (UserWarning, "The dirpath has changed from '/a' to '/b'", "lightning.pytorch.callbacks.model_checkpoint"),
            (DeprecationWarning, "`torch.jit.script_method` is deprecated.", "torch.jit._script"),  # not wholesale
            (FutureWarning, "another deprecation", "lightning.pytorch.utilities._pytree"),
        ]
        for category, message, module in kept:
            _warn(category, message, module)
    assert [(w.category, str(w.message)) for w in caught] == [(c, m) for c, m, _ in kept]


def test_make_train_does_not_hide_warnings_wholesale():
    makefile = (ROOT / "Makefile").read_text()
    assert "PYTHONWARNINGS" not in makefile
    import tomllib

    pytest_cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["pytest"]["ini_options"]
    assert all(not re.fullmatch(r"ignore::\w*Warning", f) for f in pytest_cfg.get("filterwarnings", []))


# ---------------------------------------------------------------------------------------------- the bar
class _Tiny:
    """A LightningModule with me5's shape of training: manual optimisation (GradCache), a validation_step, a
    ``stage_name``; 4 batches an epoch, so a resume at step 6 lands in the middle of the second epoch."""

    def __new__(cls):
        import lightning as L

        class Tiny(L.LightningModule):
            stage_name = "pretrain"

            def __init__(self):
                super().__init__()
                self.automatic_optimization = False
                self.layer = torch.nn.Linear(4, 1)

            def training_step(self, batch, batch_idx):
                opt = self.optimizers()
                loss = self.layer(batch[0]).pow(2).mean()
                opt.zero_grad()
                self.manual_backward(loss)
                opt.step()
                self.log("loss", loss)
                self.log("train/pairs_per_s", 1000.0)
                return loss

            def validation_step(self, batch, batch_idx):
                pass

            def configure_optimizers(self):
                return torch.optim.SGD(self.parameters(), lr=0.01)

            def train_dataloader(self):
                g = torch.Generator().manual_seed(0)
                ds = torch.utils.data.TensorDataset(torch.randn(16, 4, generator=g))
                return torch.utils.data.DataLoader(ds, batch_size=4)

        return Tiny()


class _SaysDone:
    """A callback before the bar that logs a line when training ends (as the app's next lines come)."""

    def __new__(cls):
        from lightning.pytorch.callbacks import Callback

        class SaysDone(Callback):
            def on_train_end(self, trainer, pl_module) -> None:
                logging.getLogger(RANK_ZERO).info("stage done")

        return SaysDone()


def _fit(tmp_path, max_steps, ckpt_path=None):
    import lightning as L
    from lightning.pytorch.callbacks import ModelCheckpoint

    from me5.app.callbacks import StepProgressBar

    ckpt = ModelCheckpoint(dirpath=str(tmp_path / "ckpt"), filename="step{step:06d}", every_n_train_steps=3,
                           save_top_k=-1, save_last=True, enable_version_counter=False)
    trainer = L.Trainer(max_steps=max_steps, accelerator="cpu", devices=1, logger=False, enable_model_summary=False,
                        limit_val_batches=0, log_every_n_steps=1, callbacks=[_SaysDone(), ckpt, StepProgressBar()],
                        default_root_dir=str(tmp_path))
    trainer.fit(_Tiny(), ckpt_path=ckpt_path)
    return trainer


def _states(text: str) -> list[tuple[str, int, int | None]]:
    """Every rendering of the bar: (description, step, total or None)."""
    out = []
    for m in re.finditer(r"(?:^|[\r\n])([^\r\n:|]+):[^\r\n|]*\|[^\r\n|]*\|\s*(\d+)/(\d+|\?)", text):
        out.append((m.group(1).strip(), int(m.group(2)), None if m.group(3) == "?" else int(m.group(3))))
    return out


def test_the_bar_reads_step_over_total_after_a_resume_mid_epoch(tmp_path, capsys, logs):
    rz = logging.getLogger(RANK_ZERO)  # Lightning's lines into the bar's stream, to see the order
    to_stdout = logging.StreamHandler(sys.stdout)
    to_stdout.setFormatter(logging.Formatter("%(message)s"))
    rz.addHandler(to_stdout)
    rz.setLevel(logging.INFO)
    torch.manual_seed(0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tidy_console()
        _fit(tmp_path, 6)
        first = capsys.readouterr().out
        trainer = _fit(tmp_path, 10, ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"))  # resumes at step 6, epoch 1
        resumed = capsys.readouterr().out
    assert trainer.global_step == 10

    a, b = _states(first), _states(resumed)
    assert a and b, (first, resumed)
    assert {d for d, _, _ in a + b} == {"pretrain"}  # not "Training", no "Epoch 0/-2"
    assert {t for _, _, t in a} == {6} and {t for _, _, t in b} == {10}
    assert a[-1][1] == 6 and b[0][1] == 6 and b[-1][1] == 10  # starts at the resumed step, ends at the total
    assert [n for _, n, _ in b] == sorted(n for _, n, _ in b)
    assert "loss=" in resumed and "pairs/s=1,000" in resumed and "v_num" not in first + resumed
    # the bar's line ends with the last step: what comes next starts a line of its own, and the bar is not drawn
    # again after it; Lightning's "stopped: max_steps" line, which says the same as the bar, is not printed
    for out, steps in ((first, 6), (resumed, 10)):
        assert f"{steps}/{steps}" in out.split("stage done")[0] and "\nstage done\n" in out, out[-400:]
        assert f"{steps}/{steps}" not in out.split("stage done")[1] and "Trainer.fit` stopped" not in out
    # the real lines of the installed Lightning: its advertisement and its resume announcement dropped
    assert "litlogger" not in first + resumed and "GPU available" in first and "GPU available" not in resumed
    assert "Restoring states" not in resumed and "Restored all states from the checkpoint at" in resumed

    # the warnings this setup raises in the installed Lightning are the ones tidy_console drops (but one about
    # the plain DataLoader here: me5's loaders are resumable)
    left = [str(w.message)[:80] for w in caught if "lightning" in (w.filename or "")
            and "resuming from a checkpoint that ended before the epoch ended" not in str(w.message)]
    assert not left
    with warnings.catch_warnings(record=True) as control:
        warnings.simplefilter("always")
        _fit(tmp_path / "control", 3)
        _fit(tmp_path / "control", 4, ckpt_path=str(tmp_path / "control" / "ckpt" / "last.ckpt"))
    raised = " | ".join(str(w.message) for w in control)
    for needle in ("manual optimization and every_n_train_steps", "exists and is not empty",
                   "`validation_step` but have no `val_dataloader`"):
        assert needle in raised, raised[:2000]


# ---------------------------------------------------------------------------------------------- W&B
WANDB_SCRIPT = """
import sys
from me5.app.loggers import wandb_logger
lg = wandb_logger(save_dir=sys.argv[1], run_name="r", stage="pretrain", local_csv=False, mode="offline",
                  hparams={"loss.temperature": 0.01})
for step in range(3):
    lg.log_metrics({"train/loss": 1.0 / (step + 1)}, step=step)
lg.finalize("success")
import wandb
wandb.finish()
"""


def test_wandb_prints_where_the_run_is_and_not_its_banner_or_history(tmp_path):
    # quiet by the logger's own settings, not by the environment
    env = {k: v for k, v in os.environ.items() if k not in ("WANDB_MODE", "WANDB_SILENT", "WANDB_QUIET", "WANDB_CONSOLE")}
    r = subprocess.run([sys.executable, "-c", WANDB_SCRIPT, str(tmp_path)], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    out = r.stdout + r.stderr
    assert "Run data is saved locally in" in out and str(tmp_path / "wandb" / "offline-run-") in out
    for noise in ("Tracking run with wandb version", "Run history:", "Run summary:", "train/loss █", "Find logs at"):
        assert noise not in out, out
    assert len([line for line in out.splitlines() if line.startswith("wandb:")]) <= 4, out


def test_the_preemption_line_ends_the_bar_first():
    """Preemption closes a drawing bar before its exit line, so the line is not glued to the bar's."""
    import io
    from types import SimpleNamespace

    from tqdm import tqdm

    from me5.app.callbacks import _close_bar

    out = io.StringIO()
    bar = tqdm(total=10, file=out, leave=True)
    bar.update(3)
    _close_bar(SimpleNamespace(progress_bar_callback=SimpleNamespace(_train_progress_bar=bar)))
    print("me5: SIGTERM at step 3", file=out)
    assert out.getvalue().splitlines()[-1] == "me5: SIGTERM at step 3"
    _close_bar(SimpleNamespace(progress_bar_callback=None))  # no bar: nothing to do
