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
    from lightning.pytorch.loggers import WandbLogger

    mode = resolve_wandb_mode(mode)
    Path(save_dir).mkdir(parents=True, exist_ok=True)
    logger = WandbLogger(
        project=project,
        entity=entity,
        name=f"{run_name}-{stage}",
        group=group or run_name,
        job_type=stage,
        tags=list(tags),
        save_dir=str(save_dir),
        mode=mode,
    )
    if hparams:
        logger.log_hyperparams(dict(hparams))
    log.info("W&B %s run for stage %s (save_dir=%s)", mode, stage, save_dir)
    if local_csv:
        return [logger, csv_logger(save_dir=save_dir, run_name=run_name, stage=stage, hparams=hparams)]
    return logger


def csv_logger(*, save_dir: str | Path, run_name: str, stage: str, hparams: Mapping | None = None, **_):
    """Metrics as ``<save_dir>/csv/<stage>/metrics.csv``, the config as ``hparams.yaml`` beside it."""
    from lightning.pytorch.loggers import CSVLogger

    logger = CSVLogger(save_dir=str(save_dir), name="csv", version=stage)
    if hparams:
        logger.log_hyperparams(dict(hparams))
    return logger


def no_logger(**_):
    """No metric logger."""
    return False
