"""Checkpoints that survive a kill: atomic writes, a readable-checkpoint check, and the choice of what to resume.

* :class:`AtomicCheckpointIO` (the Trainer's ``plugins``): a checkpoint is written to ``<name>.tmp`` in the same
  folder, flushed and fsynced, then renamed over ``<name>`` (``os.replace`` is atomic on POSIX), so a kill
  mid-write leaves the previous ``last.ckpt`` whole, never a truncated one.
* :func:`checkpoint_is_readable`: torch's zip container is complete and every member's CRC matches -- a file
  cut short or corrupted by a dying node fails it without unpickling anything.
* :func:`resume_checkpoint`: ``last.ckpt`` when it is readable, else the newest readable ``step*.ckpt``; every
  unreadable one is named in the returned list (and the app logs it), none is silently skipped.
"""

from __future__ import annotations

import logging
import os
import re
import zipfile
from pathlib import Path

from lightning.pytorch.plugins.io import TorchCheckpointIO

log = logging.getLogger(__name__)

_STEP = re.compile(r"step(\d+)\.ckpt$")


class AtomicCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` whose saves are atomic: write ``<path>.tmp``, fsync, ``os.replace``."""

    def save_checkpoint(self, checkpoint, path, storage_options=None) -> None:
        import torch

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "wb") as fh:
            torch.save(checkpoint, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # some filesystems do not open folders
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def checkpoint_is_readable(path: str | os.PathLike) -> tuple[bool, str]:
    """``(ok, why)``: whether ``path`` is a complete torch checkpoint (zip container, CRCs match)."""
    path = Path(path)
    try:
        with zipfile.ZipFile(path) as zf:
            bad = zf.testzip()
            if bad is not None:
                return False, f"member {bad} is corrupt"
            if not any(n.endswith("data.pkl") for n in zf.namelist()):
                return False, "not a torch checkpoint (no data.pkl)"
    except (zipfile.BadZipFile, EOFError, OSError) as err:
        return False, f"truncated or not a checkpoint ({type(err).__name__}: {err})"
    return True, ""


def step_of(path: Path) -> int:
    m = _STEP.search(path.name)
    return int(m.group(1)) if m else -1


def resume_checkpoint(folder: str | os.PathLike) -> tuple[Path | None, list[tuple[Path, str]]]:
    """The checkpoint to resume from in ``folder`` and the unreadable ones passed over (path, why).

    ``last.ckpt`` first; when it is unreadable, the newest readable ``step<N>.ckpt``; ``None`` when there is none.
    """
    folder = Path(folder)
    bad: list[tuple[Path, str]] = []
    candidates = [folder / "last.ckpt"] + sorted(folder.glob("step*.ckpt"), key=step_of, reverse=True)
    for path in candidates:
        if not path.is_file():
            continue
        ok, why = checkpoint_is_readable(path)
        if ok:
            return path, bad
        bad.append((path, why))
    return None, bad


def prune_step_checkpoints(folder: str | os.PathLike, keep_last: int) -> list[Path]:
    """Delete all but the ``keep_last`` newest ``step<N>.ckpt`` files (``last.ckpt`` is never touched)."""
    if keep_last is None or keep_last < 0:
        return []
    steps = sorted(Path(folder).glob("step*.ckpt"), key=step_of, reverse=True)
    removed = []
    for path in steps[keep_last:]:
        path.unlink(missing_ok=True)
        removed.append(path)
    return removed
