"""The callbacks of a training run (the ``callbacks`` config group): checkpoints carry the config, the realised
mixture is logged (a W&B table and bar chart, or scalars)."""

from __future__ import annotations

import os
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
    ``128 + signal`` (143 for SIGTERM), not 0, so a scheduler and a user see that the run did not finish (under
    submitit's local executor: its requeue code, 144, on which its controller restarts the job)."""


class Preemption(Callback):
    """Saves a checkpoint of the exact current step on a preemption signal, then exits non-zero; saves
    ``last.ckpt`` every ``every_minutes`` as well; keeps only the newest ``keep_last`` step checkpoints.

    A signal only sets a flag (nothing unsafe runs in the handler); after the optimiser step in progress, the
    ranks agree on the flag (one boolean all-reduce per step, so a signal to any rank stops all of them at the
    same step) and ``last.ckpt`` is written (atomically, see :mod:`me5.training.checkpointing`); when the next
    step would start (that step's metrics are logged by then) the metric history is flushed, rank 0 prints one
    line naming the checkpoint and, on SLURM (``SLURM_JOB_ID`` set, ``requeue``), asks ``scontrol requeue`` for
    the job, which reruns the same command and resumes from it; under submitit's local executor
    (``hydra/launcher=submitit_local``) the job exits with submitit's requeue code instead, and submitit's
    controller restarts it in the same folder, where it resumes. Replaces Lightning's SIGTERM handling, which
    saves nothing and exits 0. The history is also flushed after every checkpoint, so a SIGKILL loses at most
    the steps since the last checkpoint, which the rerun trains and logs again.

    Args:
        signals: signal names to handle (SLURM sends SIGTERM before a preemption or the time limit, and a signal
            of the user's choice ``--signal=USR1@90`` ahead of it).
        every_minutes: also save ``last.ckpt`` when this many minutes have passed since the last save (0: off).
        keep_last: keep the newest N ``step*.ckpt`` files of the checkpoint callback (-1: all).
        requeue: on SLURM or under submitit's local executor, requeue the job after saving.
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
            code = 128 + signum
            if self.requeue and os.environ.get("SUBMITIT_LOCAL_JOB_ID"):
                # submitit's local executor: its controller restarts the job's tasks when one exits with this code
                from submitit.local.local import LOCAL_REQUEUE_RETURN_CODE as code
            note = self._requeue(run_dir) if (self.requeue and trainer.is_global_zero) else ""
            if trainer.is_global_zero:
                _close_bar(trainer)  # the exit line on a line of its own, not glued to the bar's
                print(f"me5: {_signal.Signals(signum).name} at step {trainer.global_step}: saved {path}; exiting "
                      f"{code}{note}", flush=True)
            for lg in trainer.loggers:
                lg.finalize("interrupted")
            raise Preempted(code)

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
        """Requeue the job where a scheduler runs it; returns the note for the exit line."""
        import subprocess

        if os.environ.get("SUBMITIT_LOCAL_JOB_ID"):  # before SLURM: a local job may run inside an allocation
            return f" (submitit's local controller restarts job {os.environ['SUBMITIT_LOCAL_JOB_ID']}: it resumes)"
        job = os.environ.get("SLURM_JOB_ID")
        if not job:
            return f" (rerun the same command with hydra.run.dir={run_dir} to resume)"
        if os.environ.get("SLURM_JOB_NAME") in ("bash", "interactive"):  # salloc/srun --pty: as Lightning's check
            return f" (interactive SLURM job {job}: not requeued; rerun with hydra.run.dir={run_dir} to resume)"
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

    The loss is watched where it is made: a forward hook on the module's loss (``pl_module.loss``, an
    ``nn.Module`` returning the total or ``(total, parts)``) flags a non-finite total of the step, also one whose
    gradients are finite. The check runs just before the optimiser step (after the gradient all-reduce and
    clipping); a skipped step leaves the weights and the optimiser state untouched (every gradient is dropped,
    so AdamW updates nothing; the LR schedule still advances). The ranks agree (one boolean all-reduce), so they
    skip the same steps.
    """

    def __init__(self, max_consecutive: int = 3):
        self.max_consecutive = int(max_consecutive)
        self.skipped = 0
        self.run: list[int] = []
        self._loss_ok = None  # the step's loss is finite: a 0-dim bool tensor set by the hook (read with the grads)
        self._bad: bool | None = None  # the step's verdict, None until the optimiser step is reached
        self._hook = None

    def state_dict(self) -> dict:  # the count carries over a resume (train/skipped_steps stays cumulative)
        return {"skipped": self.skipped, "run": list(self.run)}

    def load_state_dict(self, state_dict: dict) -> None:
        self.skipped, self.run = int(state_dict["skipped"]), [int(s) for s in state_dict["run"]]

    def setup(self, trainer, pl_module, stage: str) -> None:
        import torch

        loss = getattr(pl_module, "loss", None)
        if not isinstance(loss, torch.nn.Module):
            from me5.errors import ConfigError

            raise ConfigError("callbacks.nan_guard", f"{type(pl_module).__name__} has no loss module (`.loss`, an "
                              "nn.Module) whose output the NaN guard can check before the optimiser step")
        if self._hook is None:
            self._hook = loss.register_forward_hook(self._watch_loss)

    def teardown(self, trainer, pl_module, stage: str) -> None:
        if self._hook is not None:
            self._hook.remove()
            self._hook = None

    def _watch_loss(self, module, args, output) -> None:
        import torch

        total = output[0] if isinstance(output, tuple) else output
        if isinstance(total, torch.Tensor):  # kept on the device: no sync in the loss's forward
            ok = torch.isfinite(total.detach()).all()
            self._loss_ok = ok if self._loss_ok is None else self._loss_ok & ok

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._loss_ok, self._bad = None, None

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        import torch

        checks = [torch.isfinite(p.grad).all() for group in optimizer.param_groups for p in group["params"]
                  if p.grad is not None]
        if self._loss_ok is not None:
            checks.append(self._loss_ok.to(checks[0].device) if checks else self._loss_ok)
        # one host-device sync for the loss and every gradient, not one each
        finite = bool(torch.stack(checks).all()) if checks else True
        bad = trainer.strategy.reduce_boolean_decision(not finite, all=False)
        self._bad = bool(self._bad) or bad
        if bad:
            for group in optimizer.param_groups:
                for p in group["params"]:
                    p.grad = None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        import torch

        loss = outputs["loss"] if isinstance(outputs, Mapping) else outputs
        if self._bad is None and loss is not None and not bool(torch.isfinite(torch.as_tensor(loss)).all()):
            # no optimiser step was checked (a module that steps without Lightning's optimizer wrapper)
            raise RuntimeError("NonFiniteGuard: the step's loss is not finite and no optimiser step went through "
                               "the guard's check; the step's update cannot be undone")
        if self._bad:
            self.skipped += 1
            self.run.append(int(trainer.global_step) - 1)  # the step just taken, numbered as metrics.csv does
        else:
            self.run = []
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
def _close_bar(trainer) -> None:
    """Close the training bar of a tqdm progress-bar callback, if one is drawing (its line then ends)."""
    bar = getattr(trainer.progress_bar_callback, "_train_progress_bar", None)
    if bar is not None and hasattr(bar, "close"):
        bar.close()


def _step_progress_bar_class():
    from lightning.pytorch.callbacks import TQDMProgressBar
    from lightning.pytorch.callbacks.progress.tqdm_progress import Tqdm, _update_n

    class _StepProgressBar(TQDMProgressBar):
        def init_train_tqdm(self) -> Tqdm:
            # made when training starts, after a resume has restored global_step: its first rendering already
            # reads <stage>: <resumed step>/<max_steps>, and the rate and ETA count from the resumed step on
            import sys

            trainer = self.trainer
            total = trainer.max_steps if trainer.max_steps and trainer.max_steps > 0 else None
            return Tqdm(desc=getattr(trainer.lightning_module, "stage_name", None) or "train", total=total,
                        initial=int(trainer.global_step), position=2 * self.process_position, disable=self.is_disabled,
                        leave=True, dynamic_ncols=True, file=sys.stdout, smoothing=0, bar_format=self.BAR_FORMAT)

        def on_train_epoch_start(self, trainer, pl_module, *_) -> None:
            pass  # counted in steps of the stage, across epochs: nothing to reset (Lightning's restarts per epoch)

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            bar = self.train_progress_bar
            n = int(trainer.global_step)
            if bar is not None and self._should_update(n, bar.total):
                _update_n(bar, n)
                bar.set_postfix(self.get_metrics(trainer, pl_module))
            if bar is not None and bar.total and n >= bar.total:
                bar.close()  # its line ends with the last step, before what the stage's end logs (then a no-op)

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
