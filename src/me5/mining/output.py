"""The stage-2 output shards of a job (mining, teacher scoring), shared out over processes and resumable: the run
keys (:func:`run_digest`, :func:`records_digest`), :class:`ShardedOutput` (shards, completion markers, the manifest
and stats), :class:`JobResult`, :func:`resolve_world` and :func:`format_counts`.

The folder::

    part-{k:05d}.parquet      output shard k: records [k*shard_rows, (k+1)*shard_rows), rows shuffled (seeded)
    shards.json               the shard manifest (written when every shard is done)
    <kind>_stats.json         counts per reason, and the job's own fields (idem)
    _progress/job.json        the run key (inputs, options, model) and its fields
    _progress/part-k.json     shard k's manifest entry, counts and run key (its completion mark)

Shard k belongs to process ``k % world`` (``rank`` of ``world``); the shards do not depend on ``world``. Every
file is written under a temporary name and renamed, and a shard counts as done only when its marker carries
this run's key, so a killed run resumes at the first unfinished shard.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from me5.data.readers import SHARDS_FORMAT, SHARDS_MANIFEST
from me5.data.schema import PairExample
from me5.data.shards import write_shard
from me5.errors import ConfigError, DataError
from me5.jsonio import read_json, write_json

log = logging.getLogger(__name__)

PROGRESS = "_progress"
JOB = "job.json"
FORMAT = 1


def run_digest(obj) -> str:
    """A short hash of a JSON-able object (the run keys)."""
    return hashlib.blake2b(json.dumps(obj, sort_keys=True, default=str).encode(), digest_size=16).hexdigest()


def records_digest(records: Sequence[PairExample]) -> str:
    """A hash of the records (every field, in order)."""
    h = hashlib.blake2b(digest_size=16)
    for ex in records:
        h.update(json.dumps([ex.query, ex.positive, list(ex.negatives), ex.teacher_scores, ex.lang, ex.source],
                            ensure_ascii=False).encode("utf-8", "surrogatepass"))
        h.update(b"\x00")
    return h.hexdigest()


@dataclass
class JobResult:
    """What one process's :func:`~me5.mining.mine.mine` / :func:`~me5.mining.teacher.score_records` did: output
    shards ``written`` now, ``skipped`` (done before), ``pending`` (left: ``max_shards``, or not this rank's and
    unfinished), and the job's ``stats`` once every shard of every rank is done (``complete``)."""

    path: Path
    rank: int
    world: int
    written: int
    skipped: int
    pending: int
    complete: bool
    stats: dict | None = None


class ShardedOutput:
    """The stage-2 output shards of one job (module docstring: the folder), shared out over processes.

    ``key`` identifies the run (inputs, options, model); ``fields`` are what went into it, so that a folder
    holding another run names what differs. ``overwrite=True`` starts such a folder over.
    """

    def __init__(self, out_dir: str | os.PathLike, *, kind: str, key: str, fields: Mapping, n_records: int,
                 shard_rows: int, rank: int, world: int, overwrite: bool = False):
        if world < 1 or not 0 <= rank < world:
            raise ConfigError(f"{kind}.rank", f"rank {rank} is not in [0, {world})")
        self.path, self.kind, self.key, self.rank, self.world = Path(out_dir), kind, key, rank, world
        self.ranges = [range(s, min(s + shard_rows, n_records)) for s in range(0, n_records, shard_rows)]
        self.own = [k for k in range(len(self.ranges)) if k % world == rank]
        self.progress = self.path / PROGRESS
        self.progress.mkdir(parents=True, exist_ok=True)
        job = {"format": FORMAT, "kind": kind, "key": key, "fields": {k: run_digest(v) for k, v in fields.items()},
               "shards": len(self.ranges)}
        old = read_json(self.progress / JOB)
        if old is not None and old.get("key") != key:
            if not overwrite:
                differ = sorted(k for k in job["fields"] if (old.get("fields") or {}).get(k) != job["fields"][k])
                raise DataError(f"the folder holds another {old.get('kind', 'job')} run (differs: "
                                f"{', '.join(differ) or 'format'}); pass overwrite to start over, or use another "
                                "folder", file=str(self.progress / JOB))
            log.warning("%s: output of another run; starting over", self.path)
            for k in range(max(len(self.ranges), int(old.get("shards", 0)))):
                if k % world == rank or (rank == 0 and k >= len(self.ranges)):
                    (self.path / self.file(k)).unlink(missing_ok=True)
                    (self.progress / f"{self.stem(k)}.json").unlink(missing_ok=True)
            if rank == 0:
                for f in (SHARDS_MANIFEST, f"{kind}_stats.json"):
                    (self.path / f).unlink(missing_ok=True)
        if old is None or old.get("key") != key:
            write_json(self.progress / JOB, job)

    @staticmethod
    def stem(k: int) -> str:
        return f"part-{k:05d}"

    def file(self, k: int) -> str:
        return f"{self.stem(k)}.parquet"

    def marker(self, k: int) -> dict | None:
        """Shard ``k``'s completion marker when it is done by this run, else ``None``."""
        m = read_json(self.progress / f"{self.stem(k)}.json")
        if not m or m.get("key") != self.key:
            return None
        try:
            size = (self.path / self.file(k)).stat().st_size
        except OSError:
            return None
        return m if size == m["shard"].get("bytes") else None

    def pending(self) -> list[int]:
        """This process's shards that are not done."""
        return [k for k in self.own if self.marker(k) is None]

    def all_done(self) -> bool:
        """Whether every shard of every process is done."""
        return all(self.marker(k) is not None for k in range(len(self.ranges)))

    def write(self, k: int, examples: Sequence[PairExample], counts: Mapping[str, int], *, row_group_rows: int,
              seed: int, split_langs: bool) -> dict:
        """Write shard ``k`` (atomic, rows shuffled with ``(seed, k)``), then its marker."""
        entry = write_shard(self.path / self.file(k), examples, row_group_rows, seed=(seed, k),
                            split_langs=split_langs)
        entry["bytes"] = (self.path / self.file(k)).stat().st_size
        write_json(self.progress / f"{self.stem(k)}.json", {"key": self.key, "shard": entry, "counts": dict(counts)})
        return entry

    def finish(self, *, name: str, counts: Mapping[str, int], extra: Mapping | None = None) -> dict | None:
        """When every shard is done: ``shards.json`` and ``<kind>_stats.json`` (counts summed over the shards
        plus the job's ``counts``); returns the stats, else ``None``."""
        markers = [self.marker(k) for k in range(len(self.ranges))]
        if any(m is None for m in markers):
            return None
        total: Counter = Counter(counts)
        for m in markers:
            total.update(m["counts"])
        shards = [m["shard"] for m in markers]
        stats = {"source": name, "counts": dict(sorted(total.items())), "shards": len(shards),
                 "rows": sum(s["rows"] for s in shards), **dict(extra or {})}
        write_json(self.path / SHARDS_MANIFEST, {"format": SHARDS_FORMAT, "source": name, "shards": shards})
        write_json(self.path / f"{self.kind}_stats.json", stats)
        return stats


def resolve_world(rank: int | None, world: int | None) -> tuple[int, int]:
    """``rank, world``: as given, else torch.distributed's, else the ``RANK`` / ``WORLD_SIZE`` environment
    (torchrun), else ``0, 1``."""
    dist = torch.distributed
    initialised = dist.is_available() and dist.is_initialized()
    if rank is None:
        rank = dist.get_rank() if initialised else int(os.environ.get("RANK", "0"))
    if world is None:
        world = dist.get_world_size() if initialised else int(os.environ.get("WORLD_SIZE", "1"))
    return int(rank), int(world)


def format_counts(counts: Mapping[str, int]) -> str:
    """The counts as an aligned two-column table."""
    if not counts:
        return ""
    width = max(len(k) for k in counts)
    return "\n".join(f"{k.ljust(width)}  {v:>12,}" for k, v in sorted(counts.items()))
