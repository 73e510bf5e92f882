"""Small files written atomically (a per-process temporary file renamed) and JSON read leniently: the one place
for it (prepare, mining, the embed core's shards, the MIRACL converter, the export, a run's records).

Every writer creates the folders, writes ``.<name>.<pid>.tmp`` beside the file and renames it, so a reader never
sees half a file and ranks writing the same file do not clobber each other's temporary.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any


def write_atomic(path: Path, write: Callable[[IO[bytes]], Any]) -> None:
    """Write ``path`` atomically through ``write(fh)`` on a binary file (``np.save``, encoded text)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as fh:
        write(fh)
    os.replace(tmp, path)


def write_json(path: Path, obj, *, indent: int | None = 1, end: str = "\n", default=None) -> None:
    """Write ``obj`` as UTF-8 JSON (``ensure_ascii=False``) to ``path`` atomically. The defaults (one-space
    indent, a final newline) are the small state files'; ``indent=None, end=""``: one compact line (the embed
    core's shard markers and manifest); ``default``: ``json.dumps``' fallback for other objects (the export's
    ``str``)."""
    write_text(path, json.dumps(obj, indent=indent, ensure_ascii=False, default=default) + end)


def write_text(path: Path, text: str) -> None:
    """Write ``text`` as UTF-8 to ``path`` atomically."""
    data = text.encode("utf-8")
    write_atomic(path, lambda fh: fh.write(data))


def read_json(path: Path):
    """The parsed file, or None when it is missing or not (yet) valid JSON."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
