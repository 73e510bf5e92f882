"""Metric loggers, one per stage: each stage is its own W&B run (``job_type`` = stage) in the run's group.

W&B is imported lazily, so the library imports without it.
"""

from __future__ import annotations

import logging
import netrc
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

log = logging.getLogger(__name__)


def wandb_has_credentials() -> bool:
    """True when an API key is in the environment or in ~/.netrc (what ``wandb login`` writes)."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        rc = netrc.netrc(os.path.expanduser("~/.netrc"))
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False
    host = os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai").split("://")[-1].split("/")[0]
    return rc.authenticators(host) is not None


def resolve_wandb_mode(mode: str = "auto") -> str:
    """``WANDB_MODE`` wins; ``auto`` is online with credentials and offline without (no account needed)."""
    env = os.environ.get("WANDB_MODE")
    if env:
        return env
    if mode == "auto":
        return "online" if wandb_has_credentials() else "offline"
    return mode


def wandb_logger(
    *,
    save_dir: str | Path,
    run_name: str,
    stage: str,
    hparams: Mapping | None = None,
    project: str = "me5",
    entity: str | None = None,
    group: str | None = None,
    tags: Sequence[str] = (),
    mode: str = "auto",
    local_csv: bool = True,
):
    """A Lightning ``WandbLogger`` for one stage; the flat resolved config goes to the run's config table.

    With ``local_csv`` a CSV copy of the metrics goes to ``<save_dir>/csv/<stage>/metrics.csv`` as well, so the
    run report (``me5.report``, the notebook) reads them without W&B.
    """
    import wandb
    from lightning.pytorch.loggers import WandbLogger

    mode = resolve_wandb_mode(mode)
    Path(save_dir).mkdir(parents=True, exist_ok=True)
    run_id = wandb_run_id(save_dir, stage)
    logger = WandbLogger(
        project=project,
        entity=entity,
        name=f"{run_name}-{stage}",
        group=group or run_name,
        job_type=stage,
        tags=list(tags),
        save_dir=str(save_dir),
        mode=mode,
        id=run_id,
        resume="allow",  # a restarted job continues the stage's W&B run instead of opening a second one
        # W&B's own output: its warnings and errors and the run's address, not the banner or the history dump
        settings=wandb.Settings(quiet=True),
    )
    if hparams:
        logger.log_hyperparams(dict(hparams))
    log.info("W&B %s run for stage %s (save_dir=%s)", mode, stage, save_dir)
    if local_csv:
        return [logger, csv_logger(save_dir=save_dir, run_name=run_name, stage=stage, hparams=hparams)]
    return logger


def wandb_run_id(save_dir: str | Path, stage: str) -> str:
    """The stage's W&B run id, made once and kept in ``<save_dir>/wandb_ids.json`` so a rerun resumes it.

    Every rank builds its logger at the same moment (srun and torchrun start them together), so the id is made
    under an exclusive lock (``fcntl.flock`` on ``wandb_ids.json.lock``, released by the kernel if the holder
    dies): the first caller makes it, every other reads it back, and all get the same id. The file is replaced
    atomically (written beside it, then renamed), so a reader never sees it half-written.
    """
    import fcntl
    import json

    folder = Path(save_dir)
    path = folder / "wandb_ids.json"
    with open(folder / "wandb_ids.json.lock", "a") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX)
        except OSError as err:  # a filesystem without locks (rare on clusters): the ranks may disagree
            log.warning("cannot lock %s (%s): ranks starting together may each make a W&B id for stage %s",
                        lock.name, err, stage)
        ids = _read_ids(path)
        if stage not in ids:
            import secrets

            ids[stage] = secrets.token_hex(8)
            tmp = folder / f".wandb_ids.json.{os.getpid()}.{secrets.token_hex(4)}.tmp"
            tmp.write_text(json.dumps(ids, indent=1) + "\n")
            os.replace(tmp, path)
        return ids[stage]


def _read_ids(path: Path) -> dict[str, str]:
    import json

    from me5.errors import Me5Error

    if not path.is_file():
        return {}
    try:
        ids = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise Me5Error(f"{path} is not the JSON map of stage -> W&B run id this run wrote ({err}); "
                         "fix or delete it (a new file starts new W&B runs)") from err
    if not isinstance(ids, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in ids.items()):
        raise Me5Error(f"{path} is not a JSON map of stage -> W&B run id; fix or delete it "
                         "(a new file starts new W&B runs)")
    return ids


def csv_logger(*, save_dir: str | Path, run_name: str, stage: str, hparams: Mapping | None = None, **_):
    """Metrics as ``<save_dir>/csv/<stage>/metrics.csv`` (kept across restarts: :class:`ResumableCSVLogger`),
    the config as ``hparams.yaml`` beside it."""
    logger = ResumableCSVLogger(save_dir=str(save_dir), name="csv", version=stage)
    if hparams:
        logger.log_hyperparams(dict(hparams))
    return logger


def _resumable_csv_classes():
    from lightning.fabric.loggers.logger import rank_zero_experiment
    from lightning.pytorch.loggers import CSVLogger
    from lightning.pytorch.loggers.csv_logs import ExperimentWriter

    class _Writer(ExperimentWriter):
        """Lightning's writer deletes an existing ``metrics.csv``; this one keeps its rows from before the step
        the new attempt starts logging at (a resumed run re-logs from its checkpoint's step on), so the file
        holds one row per step, contiguous from 0, across any number of restarts. The old file stays in place
        until the first save replaces it atomically (a kill before then loses nothing)."""

        def _check_log_dir_exists(self) -> None:
            import csv

            self._earlier: list[dict] | None = None
            if self._fs.isfile(self.metrics_file_path):
                with self._fs.open(self.metrics_file_path, "r", newline="") as fh:
                    self._earlier = list(csv.DictReader(fh))
            self._cut: int | None = None

        def log_metrics(self, metrics_dict, step=None) -> None:
            super().log_metrics(metrics_dict, step)
            if self._cut is None:
                self._cut = int(self.metrics[-1]["step"])

        def save(self) -> None:
            if self._earlier is None or not self.metrics:
                return super().save()
            import os

            kept = [{k: v for k, v in r.items() if v != ""} for r in self._earlier
                    if r.get("step", "") != "" and int(float(r["step"])) < self._cut]
            self.metrics = kept + self.metrics
            self._earlier = None
            final, self.metrics_file_path = self.metrics_file_path, self.metrics_file_path + ".tmp"
            try:
                if self._fs.isfile(self.metrics_file_path):
                    self._fs.rm_file(self.metrics_file_path)
                super().save()  # the whole history into the temporary file, then one rename
                os.replace(self.metrics_file_path, final)
            finally:
                self.metrics_file_path = final

    class _Logger(CSVLogger):
        @property
        @rank_zero_experiment
        def experiment(self):
            if self._experiment is None:
                self._fs.makedirs(self.root_dir, exist_ok=True)
                self._experiment = _Writer(log_dir=self.log_dir)
            return self._experiment

    return _Logger


def ResumableCSVLogger(**kwargs):  # noqa: N802 -- a class, built lazily so the module imports without Lightning
    """Lightning's ``CSVLogger`` whose ``metrics.csv`` survives a restart (see ``_Writer``)."""
    return _resumable_csv_classes()(**kwargs)


def no_logger(**_):
    """No metric logger."""
    return False
