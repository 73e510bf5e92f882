"""Reading raw records from local jsonl/parquet files or a Hugging Face hub dataset.

Every record comes with where it came from (file and 1-based line or row), so a bad record is reported
as ``file:line``. A missing file or a malformed jsonl line is always an error.
"""

from __future__ import annotations

import glob
import json
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

from me5.errors import DataError

LOCAL_SUFFIXES = (".jsonl", ".json", ".parquet")


def resolve_files(path: str | os.PathLike, data_files: str | Sequence[str] | None = None) -> list[Path] | None:
    """Local files for ``path`` (a file, a folder, or a folder + glob patterns); ``None`` for a hub id.

    A path that looks local (exists, has a data suffix, or starts with ``.``/``/``) but matches nothing is an error,
    so a typo never silently turns into a hub lookup.
    """
    p = Path(path)
    looks_local = p.exists() or str(path).endswith(LOCAL_SUFFIXES) or str(path).startswith((".", "/", "~"))
    if not looks_local:
        return None
    if data_files is not None:
        patterns = [data_files] if isinstance(data_files, str) else list(data_files)
        files = sorted({Path(f) for pat in patterns for f in glob.glob(str(p / pat))})
        if not files:
            raise DataError(f"no data files match {patterns} in {p}", file=str(p))
        return files
    if p.is_file():
        return [p]
    if p.is_dir():
        files = sorted(f for f in p.iterdir() if f.suffix in LOCAL_SUFFIXES)
        if not files:
            raise DataError(f"folder has no {'/'.join(LOCAL_SUFFIXES)} files", file=str(p))
        return files
    raise DataError("no such file or folder", file=str(p))


def iter_jsonl(path: str | os.PathLike, *, allow_arrays: bool = False) -> Iterator[tuple[int, dict | list]]:
    """Yield ``(line_number, record)``; blank lines are skipped; malformed JSON names file:line.

    ``allow_arrays``: also yield lines that are JSON arrays (e.g. sentence-transformers' ``["a", "b"]`` pair
    files); the source's ``convert`` decides what they mean. Other non-object lines are always an error.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError("no such file", file=str(path))
    with path.open("r", encoding="utf-8-sig", errors="strict") as fh:
        line_no = 0
        while True:
            line_no += 1
            try:
                line = fh.readline()
            except UnicodeDecodeError as err:
                raise DataError(f"not valid UTF-8 ({err.reason})", file=str(path), line=line_no) from err
            if not line:
                return
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(f"malformed JSON ({err.msg} at column {err.colno})", file=str(path), line=line_no) from err
            if not isinstance(record, dict) and not (allow_arrays and isinstance(record, list)):
                raise DataError(f"expected a JSON object, got {type(record).__name__}", file=str(path), line=line_no)
            yield line_no, record


def iter_parquet(path: str | os.PathLike, *, batch_rows: int = 4096) -> Iterator[tuple[int, dict]]:
    """Yield ``(row_number, record)`` (1-based) from a parquet file, reading it in row batches."""
    import pyarrow.parquet as pq

    path = Path(path)
    if not path.is_file():
        raise DataError("no such file", file=str(path))
    try:
        pf = pq.ParquetFile(path)
    except Exception as err:  # pyarrow raises several types for corrupt files
        raise DataError(f"not a readable parquet file ({err})", file=str(path)) from err
    row = 0
    for batch in pf.iter_batches(batch_size=batch_rows):
        for record in batch.to_pylist():
            row += 1
            yield row, record


def iter_records(
    path: str | os.PathLike,
    *,
    data_files: str | Sequence[str] | None = None,
    name: str | None = None,
    split: str = "train",
) -> Iterator[tuple[str, int, dict]]:
    """Yield ``(file, line, record)`` from local jsonl/parquet files, or stream a hub dataset by id.

    Hub datasets are streamed (``datasets.load_dataset(..., streaming=True)``), so nothing is held in memory;
    their "file" is ``hub:<id>/<split>`` and the line is the example index.
    """
    files = resolve_files(path, data_files)
    if files is None:
        import datasets

        try:
            ds = datasets.load_dataset(str(path), name, split=split, streaming=True)
        except Exception as err:
            raise DataError(f"cannot load hub dataset ({err.__class__.__name__}: {err})", file=f"hub:{path}") from err
        for i, record in enumerate(ds, start=1):
            yield f"hub:{path}/{split}", i, record
        return
    for f in files:
        # arrays reach the source's convert(); to_example rejects them unless convert maps them to an object
        reader = iter_parquet(f) if f.suffix == ".parquet" else iter_jsonl(f, allow_arrays=True)
        for line, record in reader:
            yield str(f), line, record
