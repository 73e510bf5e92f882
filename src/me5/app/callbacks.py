"""The callbacks of a training run (the ``callbacks`` config group): checkpoints carry the config, the realised
mixture is logged (a W&B table and bar chart, or scalars)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from lightning.pytorch.callbacks import Callback

from me5.data.mixture import mixture_scalars, mixture_table


class ConfigInCheckpoint(Callback):
    """Stores the resolved config and run metadata in every checkpoint (``me5_config``, ``me5_meta``).

    The app binds both at run time (``run_config``, ``meta``): they exist only once the run has started.
    """

    def __init__(self, run_config: Mapping, meta: Mapping):
        from omegaconf import OmegaConf

        # plain containers in the checkpoint (instantiate hands mappings over as config nodes)
        self.config = OmegaConf.to_container(run_config) if OmegaConf.is_config(run_config) else dict(run_config)
        self.meta = OmegaConf.to_container(meta) if OmegaConf.is_config(meta) else dict(meta)

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        checkpoint["me5_config"] = self.config
        checkpoint["me5_meta"] = self.meta


def log_realised_mixture(counts: Mapping[str, Mapping[str, int]], loggers, *, step: int | None = None,
                         prefix: str = "data/mix") -> dict[str, float]:
    """Log a realised mixture (``{source: {lang: pairs}}``) to Lightning loggers; returns the scalars.

    A W&B logger gets a table (source, lang, pairs, share) and a bar chart of pairs per source, plus the
    scalars; any other logger gets the scalars ``data/mix/<source>`` (share of pairs) and ``data/mix/lang/<lang>``.
    """
    scalars = mixture_scalars(counts, prefix=prefix)
    if not scalars:
        return scalars
    for lg in loggers if isinstance(loggers, (list, tuple)) else [loggers]:
        if type(lg).__name__ == "WandbLogger":
            try:
                import wandb
            except ImportError:  # pragma: no cover - wandb is a dependency, but stay usable without it
                wandb = None
            if wandb is not None:
                rows = [list(r) for r in mixture_table(counts)]
                per_source = [[s, sum(langs.values())] for s, langs in sorted(counts.items())]
                src_table = wandb.Table(columns=["source", "pairs"], data=per_source)
                payload = {
                    f"{prefix}/table": wandb.Table(columns=["source", "lang", "pairs", "share"], data=rows),
                    f"{prefix}/pairs_per_source": wandb.plot.bar(src_table, "source", "pairs",
                                                                 title="realised mixture: pairs per source"),
                }
                if step is not None:
                    payload["trainer/global_step"] = step
                lg.experiment.log(payload)
        lg.log_metrics(scalars, step=step)
    return scalars


class RealisedMixtureLogger(Callback):
    """Logs the realised mixture of the training data every ``every_n_steps`` steps and at the end of fit
    (summed over ranks; a W&B table + bar chart, or ``data/mix/<source>`` scalars). Add it to the Trainer's
    callbacks; it needs a DataModule with ``realised_mixture``."""

    def __init__(self, every_n_steps: int = 500):
        self.every_n_steps = every_n_steps

    def _log(self, trainer) -> None:
        dm = trainer.datamodule
        if dm is None or not hasattr(dm, "realised_mixture"):
            return
        counts = dm.realised_mixture(gather=True)  # collective: every rank gets here
        if trainer.is_global_zero and trainer.loggers:
            log_realised_mixture(counts, trainer.loggers, step=trainer.global_step)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.every_n_steps and trainer.global_step % self.every_n_steps == 0:
            self._log(trainer)

    def on_train_end(self, trainer, pl_module) -> None:
        self._log(trainer)


# ---------------------------------------------------------------------------------------------- preemption
class Preempted(SystemExit):
    """Raised on every rank after a preemption signal once the step's checkpoint is saved: the job exits with
    ``128 + signal`` (143 for SIGTERM), not 0, so a scheduler and a user see that the run did not finish."""


class Preemption(Callback):
    """Saves a checkpoint of the exact current step on a preemption signal, then exits non-zero; saves
    ``last.ckpt`` every ``every_minutes`` as well; keeps only the newest ``keep_last`` step checkpoints.

    A signal only sets a flag (nothing unsafe runs in the handler); after the optimiser step in progress, the
    ranks agree on the flag (one boolean all-reduce per step, so a signal to any rank stops all of them at the
    same step) and ``last.ckpt`` is written (atomically, see :mod:`me5.training.checkpointing`); when the next
    step would start (that step's metrics are logged by then) the metric history is flushed, rank 0 prints one
    line naming the checkpoint and, on SLURM (``SLURM_JOB_ID`` set, ``requeue``), asks ``scontrol requeue`` for
    the job, which reruns the same command and resumes from it. Replaces Lightning's SIGTERM handling, which
    saves nothing and exits 0. The history is also flushed after every checkpoint, so a SIGKILL loses at most
    the steps since the last checkpoint, which the rerun trains and logs again.

    Args:
        signals: signal names to handle (SLURM sends SIGTERM before a preemption or the time limit, and a signal
            of the user's choice ``--signal=USR1@90`` ahead of it).
        every_minutes: also save ``last.ckpt`` when this many minutes have passed since the last save (0: off).
        keep_last: keep the newest N ``step*.ckpt`` files of the checkpoint callback (-1: all).
        requeue: on SLURM, requeue the job after saving.
    """

    def __init__(self, signals=("SIGTERM", "SIGUSR1"), every_minutes: float = 0.0, keep_last: int = -1,
                 requeue: bool = True):
        import signal as _signal

        self.signals = []
        for name in signals:
            if not hasattr(_signal, str(name)):
                from me5.errors import ConfigError

                raise ConfigError("callbacks.preemption.signals", f"unknown signal '{name}'")
            self.signals.append(getattr(_signal, str(name)))
        self.every_s = float(every_minutes) * 60.0
        self.keep_last, self.requeue = int(keep_last), bool(requeue)
        self.received: int | None = None
        self._stop: tuple | None = None
        self._flush = False
        self._previous: dict = {}
        self._last_save = 0.0

    # the handlers go in after Lightning's own (registered just before the training loop starts)
    def on_train_start(self, trainer, pl_module) -> None:
        import signal as _signal
        import threading
        import time

        self._last_save = time.monotonic()
        if threading.current_thread() is not threading.main_thread():
            return
        for sig in self.signals:
            self._previous[sig] = _signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        self.received = signum

    def _restore(self) -> None:
        import signal as _signal

        for sig, handler in self._previous.items():
            if handler is not None:
                _signal.signal(sig, handler)
        self._previous = {}

    def on_train_end(self, trainer, pl_module) -> None:
        self._restore()

    def on_exception(self, trainer, pl_module, exception) -> None:
        self._restore()

    def on_save_checkpoint(self, trainer, pl_module, checkpoint) -> None:
        self._flush = True

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        # Lightning hands a step's metrics to the loggers after on_train_batch_end, so the step that was just
        # checkpointed is logged by now: flush the history (a SIGKILL then loses only rows that the resumed run
        # logs again, from the checkpoint's step on), and stop here when a signal asked for it
        if self._flush or self._stop is not None:
            for lg in trainer.loggers:
                lg.save()
            self._flush = False
        if self._stop is not None:
            path, signum = self._stop
            import signal as _signal

            # <run>/checkpoints/<stage>/last.ckpt: the run folder a rerun must name to resume
            run_dir = Path(path).resolve().parents[2]
            note = self._requeue(run_dir) if (self.requeue and trainer.is_global_zero) else ""
            if trainer.is_global_zero:
                print(f"me5: {_signal.Signals(signum).name} at step {trainer.global_step}: saved {path}; exiting "
                      f"{128 + signum}{note}", flush=True)
            for lg in trainer.loggers:
                lg.finalize("interrupted")
            raise Preempted(128 + signum)

    def _checkpoint_dir(self, trainer):
        cb = trainer.checkpoint_callback
        return Path(cb.dirpath) if cb is not None and cb.dirpath else Path(trainer.default_root_dir) / "checkpoints"

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        import time

        from me5.training.checkpointing import prune_step_checkpoints

        folder = self._checkpoint_dir(trainer)
        if self.keep_last >= 0 and trainer.is_global_zero:
            prune_step_checkpoints(folder, self.keep_last)
        stop = trainer.strategy.reduce_boolean_decision(self.received is not None, all=False)
        due = bool(self.every_s) and time.monotonic() - self._last_save >= self.every_s
        due = trainer.strategy.reduce_boolean_decision(due, all=False) if self.every_s else False
        if not (stop or due):
            return
        path = folder / "last.ckpt"
        trainer.save_checkpoint(str(path))  # collective; rank 0 writes
        self._last_save = time.monotonic()
        if stop:  # exit when the next step starts, once this step's metrics are logged (the last step just ends)
            import signal as _signal

            self._stop = (path, self.received or _signal.SIGTERM)

    @staticmethod
    def _requeue(run_dir) -> str:
        import os
        import subprocess

        job = os.environ.get("SLURM_JOB_ID")
        if not job:
            return f" (rerun the same command with hydra.run.dir={run_dir} to resume)"
        if os.environ.get("SLURM_ARRAY_JOB_ID"):
            job = f"{os.environ['SLURM_ARRAY_JOB_ID']}_{os.environ['SLURM_ARRAY_TASK_ID']}"
        try:
            rc = subprocess.call(["scontrol", "requeue", job])
        except FileNotFoundError:
            return f" (no scontrol here: requeue SLURM job {job} by hand)"
        return f" (SLURM job {job} requeued)" if rc == 0 else f" (scontrol requeue {job} failed: {rc})"


# ---------------------------------------------------------------------------------------------- NaN guard
class NonFiniteGuard(Callback):
    """Skips the optimiser step when the loss or a gradient is NaN/inf, counts it (``train/skipped_steps``), and
    after ``max_consecutive`` such steps in a row stops the run with a report naming the steps and the last
    batch's sources.

    The check runs just before the optimiser step (after the gradient all-reduce and clipping); a skipped step
    leaves the weights and the optimiser state untouched (every gradient is dropped, so AdamW updates nothing;
    the LR schedule still advances). The ranks agree (one boolean all-reduce), so they skip the same steps.
    """

    def __init__(self, max_consecutive: int = 3):
        self.max_consecutive = int(max_consecutive)
        self.skipped = 0
        self.run: list[int] = []
        self._bad = False

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        import torch

        finite = True
        for group in optimizer.param_groups:
            for p in group["params"]:
                if p.grad is not None and not bool(torch.isfinite(p.grad).all()):
                    finite = False
                    break
            if not finite:
                break
        bad = trainer.strategy.reduce_boolean_decision(not finite, all=False)
        self._bad = bad
        if bad:
            for group in optimizer.param_groups:
                for p in group["params"]:
                    p.grad = None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        import torch

        loss = outputs["loss"] if isinstance(outputs, Mapping) else outputs
        bad_loss = loss is not None and not bool(torch.isfinite(torch.as_tensor(loss)).all())
        if self._bad or bad_loss:
            self.skipped += 1
            self.run.append(int(trainer.global_step) - 1)  # the step just taken, numbered as metrics.csv does
        else:
            self.run = []
        self._bad = False
        pl_module.log("train/skipped_steps", float(self.skipped), on_step=True, batch_size=1)
        if self.max_consecutive and len(self.run) >= self.max_consecutive:
            from collections import Counter

            from me5.errors import Me5Error

            sources = Counter(batch.get("source") or []) if isinstance(batch, Mapping) else Counter()
            what = ", ".join(f"{s} x{n}" for s, n in sources.most_common()) or "unknown"
            raise Me5Error(f"the loss or a gradient was not finite for {len(self.run)} steps in a row (steps "
                           f"{self.run[0]}-{self.run[-1]}, {self.skipped} skipped in all); the last batch's sources: "
                           f"{what}. Lower the learning rate or check those sources' data.")


# ---------------------------------------------------------------------------------------------- progress
def _step_progress_bar_class():
    from lightning.pytorch.callbacks import TQDMProgressBar
    from lightning.pytorch.callbacks.progress.tqdm_progress import _update_n

    class _StepProgressBar(TQDMProgressBar):
        def on_train_epoch_start(self, trainer, pl_module, *_) -> None:
            bar = self.train_progress_bar
            total = trainer.max_steps if trainer.max_steps and trainer.max_steps > 0 else None
            bar.reset(total=total)
            bar.initial = bar.n = int(trainer.global_step)  # a resumed run starts at its step; ETA from here on
            bar.set_description(getattr(pl_module, "stage_name", None) or "train")
            bar.refresh()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            bar = self.train_progress_bar
            n = int(trainer.global_step)
            if bar is not None and self._should_update(n, bar.total):
                _update_n(bar, n)
                bar.set_postfix(self.get_metrics(trainer, pl_module))

        def get_metrics(self, trainer, pl_module):
            m = trainer.callback_metrics
            out = {}
            if "loss" in m:
                out["loss"] = f"{float(m['loss']):.4f}"
            if "train/pairs_per_s" in m:
                out["pairs/s"] = f"{float(m['train/pairs_per_s']):,.0f}"
            return out

    return _StepProgressBar


def StepProgressBar(refresh_rate: int = 1):  # noqa: N802 -- a class, built when Lightning is imported
    """The training bar as ``<stage>: step/total [elapsed<ETA, rate] loss, pairs/s``: counted in optimiser steps
    of the stage (right after a resume too: it starts at the resumed step), without Lightning's ``v_num``."""
    return _step_progress_bar_class()(refresh_rate=refresh_rate)
