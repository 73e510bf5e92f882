"""The stages of the ``prepare`` pipeline (:mod:`me5.prep`): datatrove ``PipelineStep`` classes over plain
functions (``read_unit``, ``sample_pool``, ``write_bucket``, ``merge``), which tests call directly too.

Folders (``OUT/_prep``)::

    plan.json                         the inputs and options (a rerun with others is refused)
    eval_digests.npy                  sorted uint64 digests of the eval texts (eval stage)
    read/<unit>/b<bucket>.parquet     the unit's kept rows of one bucket (+ key, pkey, order columns)
    read/<unit>/done.json             the unit's counts (read, skipped/<reason>, truncated/...): its done-marker
    pool/<source>/{texts.json,keys.npy,pool.npy,done.json}, emb/    the consistency pool (pool stage)
    filter/b<bucket>/<source>/c<chunk>/{query,passage}/            the filter's embedding shards (write stage)
    write/b<bucket>.json              the bucket's counts and shards: its done-marker
    logs/<stage>/                     datatrove's logs, stats and completions (finished tasks)
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from pathlib import Path

import numpy as np

from me5.data.readers import SHARDS_FORMAT, SHARDS_MANIFEST, iter_records
from me5.data.schema import PairExample
from me5.errors import DataError
from me5.jsonio import read_json, write_json
from me5.prep.pipeline import WORK, Plan, Unit, pair_key, text_key

log = logging.getLogger(__name__)

try:  # the stages are datatrove steps when datatrove is there; the functions below work without it
    from datatrove.pipeline.base import PipelineStep as _Step
except ImportError:  # pragma: no cover
    _Step = object


def _arrow_schema():
    import pyarrow as pa

    return pa.schema([
        ("query", pa.string()), ("positive", pa.string()), ("negatives", pa.list_(pa.string())),
        ("teacher_scores", pa.list_(pa.float32())), ("lang", pa.string()), ("source", pa.string()),
        ("instruction", pa.string()), ("symmetric", pa.bool_()),
        ("key", pa.uint64()), ("pkey", pa.uint64()), ("order", pa.int64()),
    ])


# ============================================================================================== checks
def make_checks(plan: Plan) -> list:
    """The classifier's extra checks, in ``me5.data.shards.prepare``'s order (language, then eval overlap)."""
    from me5.data.decontaminate import EvalOverlap, LanguageCheck

    checks: list = []
    if plan.opts.langs:
        checks.append(LanguageCheck(plan.opts.langs))
    if plan.opts.eval_sets:
        path = plan.eval_digests()
        if not path.is_file():
            raise DataError("the eval digests are missing (the eval stage has not finished)", file=str(path))
        checks.append(EvalOverlap.from_file(path))
    return checks


def build_eval_digests(plan: Plan) -> None:
    from me5.data.decontaminate import load_eval_digests, save_digests

    if not plan.eval_digests().is_file():
        save_digests(plan.eval_digests(), load_eval_digests(plan.opts.eval_sets))


# ============================================================================================== read
def _records(plan: Plan, unit: Unit):
    src = plan.sources[unit.source]
    if unit.file is None:
        return iter_records(src.path, data_files=src.data_files, name=src.hub_config, split=src.split, errors="yield")
    return iter_records(unit.file, errors="yield")


def read_unit(plan: Plan, unit: Unit, checks) -> dict:
    """Classify every record of ``unit`` and write its kept rows to one file per bucket; returns (and writes as the
    unit's done-marker) its counts. A unit with a done-marker is not read again."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder = plan.read_dir(unit.index)
    marker = folder / "done.json"
    state = read_json(marker)
    if state is not None and state.get("file") == unit.file:
        return state
    folder.mkdir(parents=True, exist_ok=True)
    opts = plan.opts
    src = plan.sources[unit.source]
    classify = src.classifier(name=unit.source, max_chars=opts.max_chars, strict=opts.strict, checks=checks)
    counts: Counter = Counter()
    langs: dict[str, Counter] = {}
    schema = _arrow_schema()
    n_b = opts.buckets
    buffers: dict[int, list[tuple]] = {}
    writers: dict[int, pq.ParquetWriter] = {}
    buffered = 0
    base = unit.index << 32

    def flush() -> None:
        for b, rows in buffers.items():
            if not rows:
                continue
            if b not in writers:
                writers[b] = pq.ParquetWriter(_tmp(plan.bucket_file(unit.index, b)), schema, compression="zstd")
            cols = list(zip(*rows))
            writers[b].write_table(pa.Table.from_arrays([pa.array(c, type=schema.field(i).type)
                                                         for i, c in enumerate(cols)], schema=schema))
            rows.clear()

    for file, line, rec in _records(plan, unit):
        ex = classify(rec, file, line, counts, langs)
        if ex is None:
            continue
        key = pair_key(ex.query, ex.positive)
        pkey = text_key(ex.positive, opts.seed)
        buffers.setdefault(key % n_b, []).append((
            ex.query, ex.positive, list(ex.negatives),
            list(ex.teacher_scores) if ex.teacher_scores is not None else None, ex.lang, ex.source, ex.instruction,
            ex.symmetric, key, pkey, base + line))
        buffered += 1
        if buffered >= opts.flush_rows:
            flush()
            buffered = 0
    flush()
    for b, w in writers.items():
        w.close()
        os.replace(_tmp(plan.bucket_file(unit.index, b)), plan.bucket_file(unit.index, b))
    state = {"file": unit.file, "source": unit.source, "counts": dict(counts),
             "langs": {k: dict(v) for k, v in langs.items()}, "buckets": sorted(writers)}
    write_json(marker, state)
    return state


def _tmp(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp")


# ============================================================================================== pool
def sample_pool(plan: Plan, source: str) -> None:
    """The consistency pool of ``source``: its ``pool`` distinct positives with the smallest seeded hashes
    (uniform, and the same whatever the task count), embedded as passages; skipped when done."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from me5.prompts import PromptPolicy

    folder = plan.pool_dir(source)
    if read_json(folder / "done.json") is not None:
        return
    c = plan.opts.consistency
    keys = np.zeros(0, dtype=np.uint64)
    texts: list[str] = []
    for unit in plan.units:
        if unit.source != source:
            continue
        for b in range(plan.opts.buckets):
            f = plan.bucket_file(unit.index, b)
            if not f.is_file():
                continue
            t = pq.read_table(f, columns=["pkey", "positive"])
            if len(keys) >= c.pool:
                limit = keys[-1]
                t = t.filter(pc.less_equal(t["pkey"], pa.scalar(int(limit), pa.uint64())))
            if not len(t):
                continue
            keys = np.concatenate([keys, t["pkey"].to_numpy()])
            texts += t["positive"].to_pylist()
            keys, first = np.unique(keys, return_index=True)  # sorted; one text per key
            texts = [texts[i] for i in first]
            if len(keys) > c.pool:
                keys, texts = keys[: c.pool], texts[: c.pool]
    src = plan.sources[source]
    policy = PromptPolicy(c.prompt_style)
    emb = scorer_of(plan).embed(texts, "passage", folder / "emb",
                                policy.document(src.instruction, symmetric=bool(src.symmetric)))
    folder.mkdir(parents=True, exist_ok=True)
    np.save(folder / "pool.npy", emb)
    np.save(folder / "keys.npy", keys)
    write_json(folder / "done.json", {"source": source, "passages": len(texts)})


def scorer_of(plan: Plan):
    """The plan's scorer: the one given to :func:`~me5.prep.pipeline.run_prep`, else a
    :class:`~me5.mining.consistency.ModelScorer` of ``opts.consistency.model``."""
    from me5.mining.consistency import CallableScorer, ModelScorer

    s = plan.scorer
    if s is None:
        c = plan.opts.consistency
        s = plan.scorer = ModelScorer(c.model, max_length=c.max_length, max_batch=c.max_batch,
                                      max_tokens=c.max_tokens, precision=c.precision, packed=c.packed,
                                      shard_rows=c.shard_rows, device=c.device)
    elif not hasattr(s, "embed"):
        s = plan.scorer = CallableScorer(s)
    return s


# ============================================================================================== write
def _dedup_order(table, dedup: bool) -> tuple[np.ndarray, np.ndarray]:
    """``(kept row indices in (key, order) order, duplicate row indices)`` of one bucket's rows."""
    key = table["key"].to_numpy()
    order = table["order"].to_numpy()
    idx = np.lexsort((order, key))
    if not dedup or len(idx) == 0:
        return idx, np.zeros(0, dtype=np.int64)
    k = key[idx]
    run_start = np.r_[True, k[1:] != k[:-1]]
    if run_start.all():
        return idx, np.zeros(0, dtype=np.int64)
    keep = run_start.copy()
    # runs of an equal key: a row is a duplicate when an earlier row of its run has the same texts (a 64-bit
    # key collision of two different pairs keeps both)
    starts = np.flatnonzero(run_start)
    ends = np.r_[starts[1:], len(idx)]
    q_col, p_col = table["query"], table["positive"]
    for s, e in zip(starts, ends):
        if e - s == 1:
            continue
        seen = set()
        for j in range(s, e):
            i = int(idx[j])
            texts = (q_col[i].as_py(), p_col[i].as_py())
            if texts not in seen:
                seen.add(texts)
                keep[j] = True
    return idx[keep], idx[~keep]


def _examples(table) -> list[PairExample]:
    d = table.select(["query", "positive", "negatives", "teacher_scores", "lang", "source", "instruction",
                      "symmetric"]).to_pydict()
    return [PairExample(q, p, tuple(n or ()), tuple(s) if s is not None else None, lang, src, ins, sym)
            for q, p, n, s, lang, src, ins, sym in zip(d["query"], d["positive"], d["negatives"],
                                                       d["teacher_scores"], d["lang"], d["source"],
                                                       d["instruction"], d["symmetric"])]


def write_bucket(plan: Plan, bucket: int) -> dict:
    """Dedup, filter and write one bucket (see the module docstring); returns (and writes as the bucket's
    done-marker) its counts and shards per source."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from me5.data.shards import write_shard

    marker = plan.bucket_stats(bucket)
    state = read_json(marker)
    if state is not None:
        return state
    opts = plan.opts
    missing = [u.index for u in plan.units if read_json(plan.read_dir(u.index) / "done.json") is None]
    if missing:
        raise DataError(f"the read stage has not finished: inputs {missing[:8]} have no done-marker",
                        file=str(plan.work / "read"))
    parts = [pq.read_table(f) for u in plan.units if (f := plan.bucket_file(u.index, bucket)).is_file()]
    table = pa.concat_tables(parts) if parts else _arrow_schema().empty_table()
    kept, dups = _dedup_order(table, opts.dedup)
    out: dict[str, dict] = {}

    def count(source: str, lang: str, what: str, n: int = 1) -> None:
        if source not in out:
            out[source] = {"counts": Counter(), "langs": {}, "shards": []}
        st = out[source]
        st["counts"][what] += n
        if lang not in st["langs"]:
            st["langs"][lang] = Counter()
        st["langs"][lang][what] += n

    unit_src = {u.index: u.source for u in plan.units}
    order_col = table["order"].to_numpy()
    out_name = np.array([unit_src[int(o) >> 32] for o in order_col], dtype=object)  # the output name of each row
    lang_col = table["lang"].to_numpy(zero_copy_only=False) if len(table) else np.zeros(0, dtype=object)
    for i in dups:
        count(out_name[i], lang_col[i], "skipped/duplicate")
    for name in plan.sources:
        rows = kept[out_name[kept] == name] if len(kept) else kept
        if not len(rows):
            continue
        if opts.consistency is not None:
            rows = _consistent(plan, bucket, name, table, rows, lambda i, n=name: count(n, lang_col[i],
                                                                                         "skipped/inconsistent"))
        folder = Path(plan.out) / name
        folder.mkdir(parents=True, exist_ok=True)
        for k, s in enumerate(range(0, len(rows), opts.shard_rows)):
            chunk = rows[s: s + opts.shard_rows]
            examples = _examples(table.take(pa.array(chunk)))
            meta = write_shard(folder / f"part-{bucket:05d}-{k:05d}.parquet", examples, opts.row_group_rows,
                               seed=(opts.seed, bucket, k), split_langs=opts.split_langs)
            for lang, n in Counter(e.lang for e in examples).items():
                count(name, lang, "kept", n)
            out[name]["shards"].append(meta)
    state = {"bucket": bucket, "sources": {n: {"counts": dict(st["counts"]),
                                               "langs": {k: dict(v) for k, v in st["langs"].items()},
                                               "shards": st["shards"]} for n, st in out.items()}}
    write_json(marker, state)
    return state


def _consistent(plan: Plan, bucket: int, name: str, table, rows: np.ndarray, dropped) -> np.ndarray:
    """The rows of ``rows`` (one source's, in a bucket) whose positive ranks in the top ``top_k`` of the pool."""
    from me5.mining.consistency import pool_ranks
    from me5.prompts import PromptPolicy

    c = plan.opts.consistency
    pool_dir = plan.pool_dir(name)
    if read_json(pool_dir / "done.json") is None:
        raise DataError("the consistency pool is missing (the pool stage has not finished)", file=str(pool_dir))
    pool = np.load(pool_dir / "pool.npy")  # searched block by block, many times: held in memory
    pool_keys = np.load(pool_dir / "keys.npy")
    src = plan.sources[name]
    policy = PromptPolicy(c.prompt_style)
    qp, pp = policy.query(src.instruction), policy.document(src.instruction, symmetric=bool(src.symmetric))
    scorer = scorer_of(plan)
    keep = []
    for ci, s in enumerate(range(0, len(rows), c.chunk_rows)):
        chunk = rows[s: s + c.chunk_rows]
        sub = table.take(chunk)
        folder = plan.work / "filter" / f"b{bucket:05d}" / name / f"c{ci:05d}"
        q = scorer.embed(sub["query"].to_pylist(), "query", folder / "query", qp)
        p = scorer.embed(sub["positive"].to_pylist(), "passage", folder / "passage", pp)
        ranks = pool_ranks(q, p, pool, top_k=c.top_k, pos_keys=sub["pkey"].to_numpy(), pool_keys=pool_keys,
                           method=c.search)
        ok = ranks <= c.top_k
        for i in chunk[~ok]:
            dropped(int(i))
        keep.append(chunk[ok])
    return np.concatenate(keep) if keep else rows[:0]


# ============================================================================================== merge
def merge(plan: Plan) -> dict[str, dict]:
    """Every source's ``stats.json`` and ``shards.json`` from the units' and buckets' done-markers, and the
    overall ``OUT/stats.json`` (every prepared source in the folder, as ``me5.data.shards.prepare``)."""
    out = Path(plan.out)
    per: dict[str, dict] = {n: {"counts": Counter(), "langs": {}, "shards": []} for n in plan.sources}

    def add(name: str, st: dict) -> None:
        per[name]["counts"].update(st.get("counts", {}))
        for lang, c in st.get("langs", {}).items():
            per[name]["langs"].setdefault(lang, Counter()).update(c)

    for u in plan.units:
        st = read_json(plan.read_dir(u.index) / "done.json")
        if st is None:
            raise DataError("the read stage has not finished", file=str(plan.read_dir(u.index)))
        add(u.source, st)
    for b in range(plan.opts.buckets):
        st = read_json(plan.bucket_stats(b))
        if st is None:
            raise DataError("the write stage has not finished", file=str(plan.bucket_stats(b)))
        for name, s in st["sources"].items():
            add(name, s)
            per[name]["shards"] += s["shards"]
    result = {}
    for name, st in per.items():
        folder = out / name
        folder.mkdir(parents=True, exist_ok=True)
        shards = sorted(st["shards"], key=lambda s: s["file"])
        for sh in shards:
            sh["bytes"] = (folder / sh["file"]).stat().st_size
        counts = {k: v for k, v in sorted(st["counts"].items()) if v}
        langs = {lang: {k: v for k, v in sorted(c.items()) if v} for lang, c in sorted(st["langs"].items())}
        stats = {"counts": counts, "langs": {k: v for k, v in langs.items() if v}, "shards": len(shards),
                 "rows": sum(s["rows"] for s in shards)}
        write_json(folder / SHARDS_MANIFEST, {"format": SHARDS_FORMAT, "source": name, "shards": shards})
        write_json(folder / "stats.json", stats)
        result[name] = stats
    overall = {}
    for p in sorted(out.glob("*/stats.json")):
        if p.parent.name != WORK:
            overall[p.parent.name] = read_json(p)
    write_json(out / "stats.json", overall)
    return result


# ============================================================================================== datatrove steps
class _PlanStep(_Step):
    type = "me5"

    def __init__(self, plan: Plan):
        super().__init__()
        self.plan = plan


class EvalDigestsStep(_PlanStep):
    """Stage ``eval`` (1 task): the eval sets' digests, written once for every read task to memory-map."""

    name = "eval digests"

    def run(self, data=None, rank: int = 0, world_size: int = 1):
        with self.track_time("task"):
            build_eval_digests(self.plan)
        return iter(())


class ReadStep(_PlanStep):
    """Stage ``read``: the units ``rank::world_size`` (round-robin), each skipped when done."""

    name = "read + classify + partition"

    def run(self, data=None, rank: int = 0, world_size: int = 1):
        checks = make_checks(self.plan)
        for unit in self.plan.units[rank::world_size]:
            with self.track_time("unit"):
                st = read_unit(self.plan, unit, checks)
            self.stat_update("records", value=int(st["counts"].get("read", 0)))
        return iter(())


class PoolStep(_PlanStep):
    """Stage ``pool`` (one task per source): the consistency pool of source ``rank``."""

    name = "consistency pool"

    def run(self, data=None, rank: int = 0, world_size: int = 1):
        for name in self.plan.source_names()[rank::world_size]:
            with self.track_time("source"):
                sample_pool(self.plan, name)
        return iter(())


class WriteStep(_PlanStep):
    """Stage ``write`` (one task per bucket): dedup, the consistency filter, the shards."""

    name = "dedup + filter + write"

    def run(self, data=None, rank: int = 0, world_size: int = 1):
        for bucket in range(rank, self.plan.opts.buckets, world_size):
            with self.track_time("bucket"):
                st = write_bucket(self.plan, bucket)
            self.stat_update("kept", value=sum(s["counts"].get("kept", 0) for s in st["sources"].values()))
        return iter(())


class MergeStep(_PlanStep):
    """Stage ``merge`` (1 task): statistics and shard manifests."""

    name = "merge stats"

    def run(self, data=None, rank: int = 0, world_size: int = 1):
        merge(self.plan)
        return iter(())
