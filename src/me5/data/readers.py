"""Reading raw records from local jsonl/parquet files or a Hugging Face hub dataset.

jsonl files may be gzip-compressed (``.jsonl.gz``/``.json.gz``, as mC4, CC News and the sentence-transformers
exports ship): they are read as they are, without a decompression step. Their byte offsets count decompressed
bytes, and resuming inside one decompresses up to the offset again (a gzip stream cannot be entered midway);
counting its lines (source sizes for mixture weights, stride reading) decompresses it whole. For repeated
runs over a large corpus, ``me5.prepare`` converts it once to parquet shards.

Every record comes with where it came from (file and 1-based line or row), so a bad record is reported
as ``file:line``. A missing file is an error; so is a malformed jsonl line, unless a caller asks for bad lines
as values (``errors="yield"``: lenient sources and ``me5.prepare`` count and skip them).

For streaming (``me5.data.stream``) a source is cut into *units*, the pieces that ranks and DataLoader
workers share out: one parquet row group, or one whole jsonl file. :func:`list_units` lists them from the
files' metadata (parquet footers; for jsonl the file size) or, when present, from the ``shards.json``
manifest that ``me5.prepare`` writes, so no data is read to plan the split. Reading resumes inside a
unit: at a row of a row group, or at a byte offset (and line number) of a jsonl file.
"""

from __future__ import annotations

import glob
import gzip
import json
import os
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from me5.errors import DataError

LOCAL_SUFFIXES = (".jsonl", ".json", ".parquet", ".jsonl.gz", ".json.gz")
SHARDS_MANIFEST = "shards.json"
SHARDS_FORMAT = "me5-shards/1"


class BadLine(DataError):
    """A jsonl line that cannot be read as a record; ``reason``: ``undecodable`` or ``malformed_json``."""

    def __init__(self, message: str, *, reason: str, file: str, line: int):
        super().__init__(message, file=file, line=line)
        self.reason = reason


def data_suffix(path: str | os.PathLike) -> str:
    """The data suffix of a file name (``.jsonl.gz`` for ``a.jsonl.gz``), else its last suffix (``.gz``, ``.tsv``)."""
    name = Path(path).name.lower()
    return next((s for s in LOCAL_SUFFIXES if name.endswith(s)), Path(path).suffix)  # no two overlap


def is_gzip(path: str | os.PathLike) -> bool:
    return str(path).lower().endswith(".gz")


def open_binary(path: str | os.PathLike):
    """``path`` opened for binary reading; a ``.gz`` file is decompressed on the fly."""
    return gzip.open(path, "rb") if is_gzip(path) else open(path, "rb")


# what a truncated or corrupt gzip stream raises while it is read
GZIP_ERRORS = (EOFError, zlib.error, gzip.BadGzipFile)


def resolve_files(path: str | os.PathLike, data_files: str | Sequence[str] | None = None) -> list[Path] | None:
    """Local files for ``path`` (a file, a folder, or a folder + glob patterns); ``None`` for a hub id.

    A path that looks local (exists, has a data suffix, starts with ``.``/``/``, or has more than one ``/``: a hub
    id is ``namespace/name``) but matches nothing is an error, so a typo or data not fetched yet never silently
    turns into a hub lookup.
    """
    p = Path(path)
    looks_local = (p.exists() or str(path).endswith(LOCAL_SUFFIXES) or str(path).startswith((".", "/", "~"))
                   or str(path).count("/") > 1)
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
        if (p / SHARDS_MANIFEST).is_file():  # a me5.prepare folder: its parquet shards (not its json stats)
            files = sorted(p.glob("*.parquet"))
        else:
            files = sorted(f for f in p.iterdir() if f.is_file() and data_suffix(f) in LOCAL_SUFFIXES)
        if not files:
            raise DataError(f"folder has no {'/'.join(LOCAL_SUFFIXES)} files", file=str(p))
        return files
    raise DataError("no such file or folder", file=str(p))


# ---------------------------------------------------------------------------------------------- jsonl
def iter_jsonl_at(
    path: str | os.PathLike,
    *,
    start_byte: int = 0,
    start_line: int = 0,
    errors: str = "raise",
    select: tuple[int, int] | None = None,
    allow_arrays: bool = False,
) -> Iterator[tuple[int, int, dict | list | BadLine]]:
    """Yield ``(line_number, end_byte, record)`` from byte ``start_byte`` (after line ``start_line``).

    ``end_byte`` is the offset just after the line, so ``(end_byte, line_number)`` resumes after it. Blank
    lines are skipped. A line that is not UTF-8, not JSON or not an object raises :class:`BadLine` (a
    :class:`DataError` naming file:line), or with ``errors="yield"`` is yielded in place of the record.
    ``select=(stride, first)``: only lines whose index ``line - 1`` is ``first`` mod ``stride`` are read.
    ``allow_arrays``: also yield lines that are JSON arrays (sentence-transformers' ``["a", "b"]`` pair files;
    the source's ``convert`` then decides what a list means).
    """
    path = Path(path)
    if not path.is_file():
        raise DataError("no such file", file=str(path))
    pos, line_no = start_byte, start_line
    with open_binary(path) as fh:
        if start_byte:
            _seek(fh, start_byte, path)
        try:
            for raw in fh:
                line_no += 1
                first = pos == 0
                pos += len(raw)
                if select is not None and (line_no - 1) % select[0] != select[1]:
                    continue
                if not raw.strip():
                    continue
                err = None
                try:
                    text = raw.decode("utf-8-sig" if first else "utf-8")
                except UnicodeDecodeError as exc:
                    err = BadLine(f"not valid UTF-8 ({exc.reason})", reason="undecodable", file=str(path), line=line_no)
                else:
                    try:
                        record = json.loads(text)
                    except json.JSONDecodeError as exc:
                        err = BadLine(f"malformed JSON ({exc.msg} at column {exc.colno})", reason="malformed_json",
                                      file=str(path), line=line_no)
                    except (ValueError, RecursionError) as exc:  # an integer over 4300 digits, nesting too deep
                        err = BadLine(f"malformed JSON ({type(exc).__name__}: {str(exc)[:120]})",
                                      reason="malformed_json", file=str(path), line=line_no)
                    else:
                        if not isinstance(record, dict) and not (allow_arrays and isinstance(record, list)):
                            err = BadLine(f"expected a JSON object, got {type(record).__name__}", reason="malformed_json",
                                          file=str(path), line=line_no)
                if err is not None:
                    if errors == "raise":
                        raise err
                    yield line_no, pos, err
                    continue
                yield line_no, pos, record
        except GZIP_ERRORS as err:  # only a .gz stream raises these
            raise DataError(f"corrupt or truncated gzip stream after line {line_no} ({err})", file=str(path)) from err


def _seek(fh, offset: int, path: Path) -> None:
    try:
        fh.seek(offset)
    except GZIP_ERRORS as err:
        raise DataError(f"corrupt or truncated gzip stream before byte {offset} ({err})", file=str(path)) from err


def iter_jsonl(path: str | os.PathLike) -> Iterator[tuple[int, dict]]:
    """Yield ``(line_number, record)``; blank lines are skipped; malformed JSON names file:line."""
    for line_no, _, record in iter_jsonl_at(path):
        yield line_no, record


def count_lines(path: str | os.PathLike) -> int:
    """Physical lines of a text file, gzip-compressed or not (a last line without newline counts), counted in C."""
    n, last = 0, b"\n"
    with open_binary(path) as fh:
        try:
            while chunk := fh.read(1 << 22):
                n += chunk.count(b"\n")
                last = chunk[-1:]
        except GZIP_ERRORS as err:
            raise DataError(f"corrupt or truncated gzip stream after line {n} ({err})", file=str(path)) from err
    return n + (last != b"\n")


# ---------------------------------------------------------------------------------------------- parquet
def _open_parquet(path: Path):
    import pyarrow.parquet as pq

    if not path.is_file():
        raise DataError("no such file", file=str(path))
    try:
        return pq.ParquetFile(path)
    except Exception as err:  # pyarrow raises several types for corrupt files
        raise DataError(f"not a readable parquet file ({err})", file=str(path)) from err


def iter_parquet(path: str | os.PathLike, *, batch_rows: int = 4096) -> Iterator[tuple[int, dict]]:
    """Yield ``(row_number, record)`` (1-based) from a parquet file, reading it in row batches."""
    pf = _open_parquet(Path(path))
    row = 0
    batches = pf.iter_batches(batch_size=batch_rows)
    while True:
        try:  # a corrupt page raises when its batch is decoded (OSError, ArrowInvalid, UnicodeDecodeError, ...)
            batch = next(batches, None)
            records = batch.to_pylist() if batch is not None else None
        except Exception as err:
            raise DataError(f"cannot read the rows after row {row} ({type(err).__name__}: {err})",
                            file=str(path)) from err
        if records is None:
            break
        for record in records:
            row += 1
            yield row, record
    if row != pf.metadata.num_rows:  # a corrupt page can decode to fewer rows without an error
        raise DataError(f"the file has {pf.metadata.num_rows} rows but {row} could be read", file=str(path))


def read_row_group(path: str | os.PathLike, index: int):
    """One row group of a parquet file as a ``pyarrow.Table``."""
    pf = _open_parquet(Path(path))
    try:
        return pf.read_row_group(index)
    except Exception as err:
        raise DataError(f"cannot read row group {index} ({err})", file=str(path)) from err


# ---------------------------------------------------------------------------------------------- hub
def iter_records(
    path: str | os.PathLike,
    *,
    data_files: str | Sequence[str] | None = None,
    name: str | None = None,
    split: str = "train",
    errors: str = "raise",
) -> Iterator[tuple[str, int, dict | BadLine]]:
    """Yield ``(file, line, record)`` from local jsonl/parquet files, or stream a hub dataset by id.

    Hub datasets are streamed (``datasets.load_dataset(..., streaming=True)``), so nothing is held in memory;
    their "file" is ``hub:<id>/<split>`` and the line is the example index. ``data_files`` is passed on to
    ``load_dataset`` for hub ids (so ``path="parquet", data_files=[...]`` reads local files through ``datasets``).
    ``errors="yield"``: an unreadable jsonl line comes as a :class:`BadLine` in place of its record.
    """
    files = resolve_files(path, data_files)
    if files is None:
        where = f"hub:{path}/{split}"
        stream = load_hub_stream(path, name=name, split=split, data_files=data_files)
        for i, record in enumerate(hub_rows(stream, where=where), start=1):
            yield where, i, record
        return
    for f in files:
        if f.suffix == ".parquet":
            for line, record in iter_parquet(f):
                yield str(f), line, record
        else:
            for line, _, record in iter_jsonl_at(f, errors=errors, allow_arrays=True):
                yield str(f), line, record


def load_hub_stream(path, *, name=None, split="train", data_files=None):
    """``datasets.load_dataset(path, name, split=split, streaming=True)``; failures name the hub id."""
    import datasets

    kwargs = {"data_files": data_files} if data_files is not None else {}
    try:
        return datasets.load_dataset(str(path), name, split=split, streaming=True, **kwargs)
    except Exception as err:
        raise DataError(f"cannot load hub dataset ({err.__class__.__name__}: {err})", file=f"hub:{path}") from err


def hub_rows(rows, *, where: str, read: int = 0) -> Iterator:
    """The items of a ``datasets`` stream; what reading raises (a cast or parse error of a shard, a lost
    connection) becomes a :class:`DataError` naming ``where`` and the example that could not be read."""
    it = iter(rows)
    while True:
        try:
            row = next(it)
        except StopIteration:
            return
        except Exception as err:
            raise DataError(f"cannot read the hub dataset after example {read} ({type(err).__name__}: {err})",
                            file=where, line=read + 1) from err
        read += 1
        yield row


# ---------------------------------------------------------------------------------------------- units
@dataclass(frozen=True)
class Unit:
    """A piece of a source that one reader reads whole: a parquet row group or a jsonl file.

    ``rows``: records (parquet) or physical lines (jsonl; ``None`` until counted); ``weight``: for balancing
    units over readers (rows, or bytes for jsonl); ``first_row``: the 1-based file row of the unit's first row;
    ``lang``: the unit's one language when known (parquet column statistics or the manifest), else ``None``.
    """

    file: str
    kind: str  # "parquet" | "jsonl"
    row_group: int = -1
    rows: int | None = None
    weight: int = 1
    first_row: int = 1
    lang: str | None = None


def _manifest_units(folder: Path, files: Sequence[Path]) -> list[Unit] | None:
    mf = folder / SHARDS_MANIFEST
    if not mf.is_file():
        return None
    try:
        spec = json.loads(mf.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
    if spec.get("format") != SHARDS_FORMAT:
        return None
    by_name = {s["file"]: s for s in spec.get("shards", [])}
    units: list[Unit] = []
    for f in files:
        s = by_name.get(f.name)
        if s is None or s.get("bytes") != f.stat().st_size:
            return None  # the folder changed since the manifest was written: read the footers instead
        first = 1
        for i, rg in enumerate(s["row_groups"]):
            units.append(Unit(str(f), "parquet", i, int(rg["rows"]), max(1, int(rg["rows"])), first, rg.get("lang")))
            first += int(rg["rows"])
    return units


def _parquet_units(f: Path, lang_column: str = "lang") -> list[Unit]:
    pf = _open_parquet(f)
    md = pf.metadata
    col = next((i for i in range(md.num_columns) if md.schema.column(i).path == lang_column), None)
    units, first = [], 1
    for i in range(md.num_row_groups):
        rg = md.row_group(i)
        lang = None
        if col is not None:
            st = rg.column(col).statistics
            if st is not None and st.has_min_max and st.min == st.max and st.null_count == 0:
                lang = st.min.decode() if isinstance(st.min, bytes) else str(st.min)
        units.append(Unit(str(f), "parquet", i, rg.num_rows, max(1, rg.num_rows), first, lang))
        first += rg.num_rows
    return units


def list_units(files: Sequence[Path]) -> list[Unit]:
    """The units of local ``files``: one per parquet row group, one per jsonl file (empty ones dropped)."""
    files = [Path(f) for f in files]
    folders = {f.parent for f in files}
    if len(folders) == 1 and all(f.suffix == ".parquet" for f in files):
        units = _manifest_units(next(iter(folders)), files)
        if units is not None:
            return [u for u in units if u.rows]
    units = []
    for f in files:
        if f.suffix == ".parquet":
            units += [u for u in _parquet_units(f) if u.rows]
        else:
            if not f.is_file():
                raise DataError("no such file", file=str(f))
            size = f.stat().st_size
            if size:
                units.append(Unit(str(f), "jsonl", -1, None, size, 1, None))
    return units
