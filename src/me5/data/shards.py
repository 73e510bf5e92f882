"""Raw sources -> sharded parquet files of the normalised schema, with statistics (the library of ``me5.prepare``).

For each source, :func:`prepare` writes

* ``OUT/<source>/part-<input>-<shard>.parquet``: columns ``query, positive, negatives, teacher_scores, lang,
  source, instruction, symmetric``; each shard's rows shuffled (seeded), in row groups of ``row_group_rows`` rows
  (the units the streaming readers share out); with ``split_langs`` every row group holds one language;
* ``OUT/<source>/shards.json``: the shard manifest the streaming readers plan from (no footer reads);
* ``OUT/<source>/stats.json`` and ``OUT/stats.json``: read / kept / skipped-by-reason counts per source and per
  language (:func:`format_stats` prints them as a table).

Every record is classified by the one record classifier (:class:`~me5.data.records.RecordClassifier`, the
training loader's), with the extra checks of :mod:`me5.data.decontaminate` (``langs``: ``wrong_language``;
``eval_sets``: ``eval_overlap``); ``kept`` is counted when a shard is written, after the consistency filter
(:class:`~me5.data.consistency.ConsistencyFilter`, ``skipped/inconsistent``), whose scorer the caller gives: this
room loads no model (``source_embedders`` of the mining room builds them from ``consistency_model``).

Interrupted runs resume: each input file has a progress marker (``_progress/<input>.json``) holding the input
position after the last written shard and the counts so far; shards are written atomically, so a rerun skips
finished inputs and continues the others where their last shard ended.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from me5.data.consistency import ConsistencyFilter, Embedder
from me5.data.decontaminate import EvalOverlap, LanguageCheck
from me5.data.readers import (
    SHARDS_FORMAT,
    SHARDS_MANIFEST,
    iter_jsonl_at,
    load_hub_stream,
    resolve_files,
)
from me5.data.schema import PairExample
from me5.errors import ConfigError
from me5.jsonio import write_json
from me5.prompts import STYLES

if TYPE_CHECKING:
    from me5.data.records import Check
    from me5.data.source import Source

log = logging.getLogger(__name__)

PROGRESS_VERSION = 1


# ============================================================================================== options
@dataclass
class PrepareOptions:
    """What :func:`prepare` does (the ``me5.prepare`` flags of the same names)."""

    shard_rows: int = 100_000
    row_group_rows: int = 10_000
    max_chars: int | None = None
    langs: Sequence[str] | None = None
    eval_sets: Sequence[str] = ()
    # the consistency model (a saved model's path): its embedders are the caller's, given to prepare()
    # (mining.consistency.source_embedders); the path is recorded with the cached pool
    consistency_model: str | None = None
    consistency_top_k: int = 2
    consistency_pool: int = 100_000
    consistency_batch_size: int = 256
    consistency_max_length: int = 128
    # the consistency model's prompt style (me5.prompts.STYLES): None reads the model's own saved policy (its
    # me5.json or sentence-transformers prompts), a style overrides it
    prompt_style: str | None = None
    device: str | None = None
    strict: bool = False
    seed: int = 0
    force: bool = False
    progress: bool = True
    split_langs: bool = False  # single-language row groups (needed for language temperature when streaming)
    max_shards: int | None = None  # write at most this many shards in this run, then stop (resume later)

    def check(self) -> None:
        for name in ("shard_rows", "row_group_rows", "consistency_top_k", "consistency_pool", "consistency_batch_size"):
            if int(getattr(self, name)) < 1:
                raise ConfigError(f"prepare.{name}", f"must be >= 1, got {getattr(self, name)}")
        if self.max_chars is not None and self.max_chars < 1:
            raise ConfigError("prepare.max_chars", f"must be >= 1, got {self.max_chars}")
        if self.prompt_style is not None and self.prompt_style not in STYLES:
            raise ConfigError("prepare.prompt_style", f"unknown prompt style '{self.prompt_style}'; choose one of "
                                                      f"{list(STYLES)}")


# ============================================================================================== reading
@dataclass
class _Input:
    """One input of a source: a local file or the hub stream, and where to resume in it."""

    index: int
    file: str | None  # None: the hub stream
    hub: dict | None = None


def _iter_input(inp: _Input, position: Mapping | None) -> Iterator[tuple[str, int, object, dict]]:
    """``(file, line, record or BadLine, position after it)`` from ``position`` on."""
    position = dict(position or {})
    if inp.file is None:
        h = inp.hub
        ds = load_hub_stream(h["path"], name=h.get("name"), split=h.get("split", "train"), data_files=h.get("data_files"))
        if position.get("hf"):
            ds.load_state_dict(position["hf"])
        n = int(position.get("row", 0))
        where = f"hub:{h['path']}/{h.get('split', 'train')}"
        for row in ds.iter(batch_size=1):
            n += 1
            yield where, n, {k: v[0] for k, v in row.items()}, {"row": n, "hf": ds.state_dict()}
        return
    path = Path(inp.file)
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        start = int(position.get("row", 0))
        pf = pq.ParquetFile(path)
        first = 0
        for g in range(pf.metadata.num_row_groups):
            n = pf.metadata.row_group(g).num_rows
            if first + n <= start:
                first += n
                continue
            recs = pf.read_row_group(g).to_pylist()
            for j in range(max(0, start - first), n):
                yield str(path), first + j + 1, recs[j], {"row": first + j + 1}
            first += n
        return
    for line, end, rec in iter_jsonl_at(path, allow_arrays=True, start_byte=int(position.get("byte", 0)),
                                        start_line=int(position.get("line", 0)), errors="yield"):
        yield str(path), line, rec, {"byte": end, "line": line}


def _inputs(source: Source) -> list[_Input]:
    files = resolve_files(source.path, source.data_files)
    if files is None:
        hub = {"path": str(source.path), "name": source.hub_config, "split": source.split, "data_files": source.data_files}
        return [_Input(0, None, hub)]
    return [_Input(i, str(f)) for i, f in enumerate(files)]


def _count_rows(inp: _Input) -> int | None:
    if inp.file is not None and inp.file.endswith(".parquet"):
        import pyarrow.parquet as pq

        return pq.ParquetFile(inp.file).metadata.num_rows
    return None


# ============================================================================================== writing
SCHEMA_FIELDS = ("query", "positive", "negatives", "teacher_scores", "lang", "source", "instruction", "symmetric")


def _schema():
    import pyarrow as pa

    return pa.schema([
        ("query", pa.string()), ("positive", pa.string()), ("negatives", pa.list_(pa.string())),
        ("teacher_scores", pa.list_(pa.float32())), ("lang", pa.string()), ("source", pa.string()),
        ("instruction", pa.string()), ("symmetric", pa.bool_()),
    ])


def write_shard(path: Path, examples: Sequence[PairExample], row_group_rows: int, *, seed: Sequence[int],
                split_langs: bool) -> dict:
    """Write ``examples`` shuffled (seeded) in row groups of ``row_group_rows``; with ``split_langs`` each row group
    holds one language (stable-sorted by language after the shuffle). Atomic: a tmp file renamed at the end."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    order = np.random.default_rng(list(seed)).permutation(len(examples)).tolist()
    if split_langs:
        order.sort(key=lambda i: examples[i].lang)
    schema = _schema()
    groups = []
    tmp = path.with_suffix(".parquet.tmp")
    with pq.ParquetWriter(tmp, schema, compression="zstd") as w:
        i = 0
        while i < len(order):
            lang = examples[order[i]].lang
            j = i
            while j < len(order) and j - i < row_group_rows and (not split_langs or examples[order[j]].lang == lang):
                j += 1
            rows = [examples[k] for k in order[i:j]]
            table = pa.Table.from_pydict({
                "query": [e.query for e in rows],
                "positive": [e.positive for e in rows],
                "negatives": [list(e.negatives) for e in rows],
                "teacher_scores": [list(e.teacher_scores) if e.teacher_scores is not None else None for e in rows],
                "lang": [e.lang for e in rows],
                "source": [e.source for e in rows],
                "instruction": [e.instruction for e in rows],
                "symmetric": [e.symmetric for e in rows],
            }, schema=schema)
            w.write_table(table, row_group_size=len(rows))
            one = {e.lang for e in rows}
            groups.append({"rows": len(rows), "lang": one.pop() if len(one) == 1 else None})
            i = j
    os.replace(tmp, path)
    return {"file": path.name, "rows": len(examples), "row_groups": groups}


# ============================================================================================== one source
class _Stop(Exception):
    """``max_shards`` reached: stop this run (the progress markers hold where to resume)."""


class _SourceJob:
    def __init__(self, name: str, source: Source, out: Path, opts: PrepareOptions, *, checks: Sequence[Check],
                 embedder: Embedder | None, budget: list[int]):
        self.name, self.source, self.out, self.opts = name, source, out, opts
        self.embedder, self.budget = embedder, budget
        # the loader's classifier; prepare's own strictness and length limit, and its extra checks
        self.classify = source.classifier(name=name, max_chars=opts.max_chars, strict=opts.strict, checks=checks)
        self.progress_dir = out / "_progress"
        self.consistency: ConsistencyFilter | None = None

    # -------------------------------------------------------------- consistency pool
    def build_consistency(self) -> None:
        if self.embedder is None:
            return
        cache = self.out / "_consistency"
        cache.mkdir(parents=True, exist_ok=True)
        meta = {"pool": self.opts.consistency_pool, "seed": self.opts.seed, "model": self.opts.consistency_model,
                "prompt_style": self.opts.prompt_style}
        texts = None
        if (cache / "pool.json").is_file() and (cache / "pool.npy").is_file():
            saved = json.loads((cache / "pool.json").read_text(encoding="utf-8"))
            if saved.get("meta") == meta:
                texts, emb = saved["texts"], np.load(cache / "pool.npy")
        if texts is None:  # a reservoir sample of the source's positives (one pass over the input)
            rng = np.random.default_rng([self.opts.seed, 0x706F6F6C])
            texts, seen = [], 0
            pool_classify = self.source.classifier(name=self.name, strict=False)  # any usable positive
            scratch: Counter = Counter()  # the pool's own pass; the counts that matter are the shards'
            for inp in _inputs(self.source):
                for file, line, rec, _ in _iter_input(inp, None):
                    ex = pool_classify(rec, file, line, scratch)
                    if ex is None:
                        continue
                    p = ex.positive
                    seen += 1
                    if len(texts) < self.opts.consistency_pool:
                        texts.append(p)
                    else:
                        k = int(rng.integers(seen))
                        if k < self.opts.consistency_pool:
                            texts[k] = p
            self.consistency = ConsistencyFilter(self.embedder, texts, top_k=self.opts.consistency_top_k,
                                                 batch_size=self.opts.consistency_batch_size)
            np.save(cache / "pool.npy", self.consistency.pool)
            write_json(cache / "pool.json", {"meta": meta, "texts": texts})
            return
        self.consistency = ConsistencyFilter(self.embedder, texts, top_k=self.opts.consistency_top_k,
                                             batch_size=self.opts.consistency_batch_size, pool_embeddings=emb)

    # -------------------------------------------------------------- one input file
    def run_input(self, inp: _Input, bar) -> dict:
        marker = self.progress_dir / f"{inp.index:05d}.json"
        state = json.loads(marker.read_text(encoding="utf-8")) if marker.is_file() else None
        if state is not None and state.get("input") != (inp.file or inp.hub):
            state = None  # the inputs changed: start this one again
        if state is not None and state.get("done"):
            if bar is not None:
                bar.update(state["counts"].get("read", 0))
            return state
        state = state or {"version": PROGRESS_VERSION, "input": inp.file or inp.hub, "done": False, "position": None,
                          "counts": {}, "langs": {}, "shards": []}
        counts = Counter(state["counts"])
        langs = {lang: Counter(c) for lang, c in state["langs"].items()}
        if bar is not None:
            bar.update(counts.get("read", 0))
        buffer: list[PairExample] = []
        position = state["position"]

        def flush(done: bool) -> None:
            kept = list(buffer)
            if self.consistency is not None and buffer:
                mask = self.consistency.keep([e.query for e in buffer], [e.positive for e in buffer])
                kept = [e for e, k in zip(buffer, mask) if k]
                for e, k in zip(buffer, mask):
                    if not k:
                        counts["skipped/inconsistent"] += 1
                        langs.setdefault(e.lang, Counter())["skipped/inconsistent"] += 1
            for e in kept:
                counts["kept"] += 1
                langs.setdefault(e.lang, Counter())["kept"] += 1
            if kept:
                k = len(state["shards"])
                shard = self.out / f"part-{inp.index:05d}-{k:05d}.parquet"
                state["shards"].append(write_shard(shard, kept, self.opts.row_group_rows,
                                                   seed=(self.opts.seed, inp.index, k), split_langs=self.opts.split_langs))
            state.update(position=position, counts=dict(counts), langs={k: dict(v) for k, v in langs.items()}, done=done)
            write_json(marker, state)
            buffer.clear()
            if kept:
                self.budget[0] -= 1
                if self.budget[0] <= 0:
                    raise _Stop

        for file, line, rec, pos in _iter_input(inp, position):
            ex = self.classify(rec, file, line, counts, langs)
            position = pos
            if bar is not None:
                bar.update(1)
            if ex is not None:
                buffer.append(ex)
                if len(buffer) >= self.opts.shard_rows:
                    flush(done=False)
        flush(done=True)
        return state

    # -------------------------------------------------------------- the source
    def run(self) -> dict:
        from tqdm.auto import tqdm

        self.out.mkdir(parents=True, exist_ok=True)
        self.progress_dir.mkdir(exist_ok=True)
        self.build_consistency()
        inputs = _inputs(self.source)
        rows = [_count_rows(i) for i in inputs]
        total = sum(rows) if all(r is not None for r in rows) else None
        bar = tqdm(total=total, desc=f"prepare {self.name}", unit=" rec", disable=not self.opts.progress, leave=True)
        try:
            states = [self.run_input(inp, bar) for inp in inputs]
        finally:
            bar.close()
        counts: Counter = Counter()
        langs: dict[str, Counter] = {}
        shards = []
        for st in states:
            counts.update(st["counts"])
            for lang, c in st["langs"].items():
                langs.setdefault(lang, Counter()).update(c)
            shards += st["shards"]
        for sh in shards:
            sh["bytes"] = (self.out / sh["file"]).stat().st_size
        stats = {"counts": dict(sorted(counts.items())), "langs": {k: dict(sorted(v.items())) for k, v in sorted(langs.items())},
                 "shards": len(shards), "rows": sum(s["rows"] for s in shards)}
        write_json(self.out / SHARDS_MANIFEST, {"format": SHARDS_FORMAT, "source": self.name, "shards": shards})
        write_json(self.out / "stats.json", stats)
        return stats


# ============================================================================================== entry points
def prepare(
    sources: Mapping[str, Source],
    out_dir: str | os.PathLike,
    options: PrepareOptions | None = None,
    *,
    embedder: Embedder | None = None,
    embedder_for: Callable[[Source], Embedder] | None = None,
) -> dict[str, dict]:
    """Prepare every source into ``out_dir/<name>/``; returns ``{name: stats}`` (also ``out_dir/stats.json``).

    ``sources``: output name -> :class:`~me5.data.source.Source`. The consistency filter runs with a scorer:
    ``embedder`` (one for every source) or ``embedder_for`` (``source -> embedder``: the source's instruction and
    symmetry). This room loads no model: for ``options.consistency_model`` the caller builds them
    (``mining.consistency.source_embedders``, which also reads the model's own prompt style).
    Returns early (``{"_stopped": True}`` among the stats) when ``options.max_shards`` shards were written.
    """
    opts = options or PrepareOptions()
    opts.check()
    if embedder is not None and embedder_for is not None:
        raise ConfigError("prepare.embedder", "give embedder (one for every source) or embedder_for, not both")
    if opts.consistency_model is not None and embedder is None and embedder_for is None:
        raise ConfigError("prepare.consistency_model", "needs the model's embedders: pass embedder_for= from "
                          "mining.consistency.source_embedders(options): the data room loads no model")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    checks: list[Check] = []  # the classifier's extra checks, in the order prepare always ran them
    if opts.langs:
        checks.append(LanguageCheck(opts.langs))
    if opts.eval_sets:
        checks.append(EvalOverlap.from_folders(opts.eval_sets))
    budget = [opts.max_shards if opts.max_shards is not None else sys.maxsize]
    stats: dict[str, dict] = {}
    for name, source in sources.items():
        src_out = out_dir / name
        if opts.force and src_out.exists():
            import shutil

            shutil.rmtree(src_out)
        emb = embedder_for(source) if embedder_for is not None else embedder
        job = _SourceJob(name, source, src_out, opts, checks=checks, embedder=emb, budget=budget)
        try:
            stats[name] = job.run()
        except _Stop:
            stats["_stopped"] = True
            log.info("stopped after %s shards; run again to continue", opts.max_shards)
            return stats
    # the overall stats: every prepared source in out_dir (other runs may have prepared others)
    overall = {}
    for p in sorted(out_dir.glob("*/stats.json")):
        overall[p.parent.name] = json.loads(p.read_text(encoding="utf-8"))
    write_json(out_dir / "stats.json", overall)
    return stats


def format_stats(stats: Mapping[str, Mapping]) -> str:
    """A plain-text table: per source, then per language, with read/kept/skipped and the skip reasons."""
    rows = [("source", "lang", "read", "kept", "skipped", "reasons")]
    for name, st in sorted(stats.items()):
        if not isinstance(st, Mapping) or "counts" not in st:
            continue
        c = st["counts"]
        skipped = {k.split("/", 1)[1]: v for k, v in c.items() if k.startswith("skipped/")}
        reasons = ", ".join(f"{k} {v}" for k, v in sorted(skipped.items(), key=lambda kv: -kv[1]))
        if c.get("truncated/too_long"):  # kept, cut to max_chars
            reasons = ", ".join(filter(None, (reasons, f"(kept, truncated {c['truncated/too_long']})")))
        rows.append((name, "*", str(c.get("read", 0)), str(c.get("kept", 0)), str(sum(skipped.values())), reasons))
        for lang, lc in st["langs"].items():
            ls = {k.split("/", 1)[1]: v for k, v in lc.items() if k.startswith("skipped/")}
            rows.append(("", lang, "", str(lc.get("kept", 0)), str(sum(ls.values())),
                         ", ".join(f"{k} {v}" for k, v in sorted(ls.items(), key=lambda kv: -kv[1]))))
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    lines = []
    for i, r in enumerate(rows):
        lines.append("  ".join([r[0].ljust(widths[0]), r[1].ljust(widths[1])] + [r[k].rjust(widths[k]) for k in (2, 3, 4)]
                               + [r[5]]).rstrip())
        if i == 0:
            lines.append("-" * len(lines[0]))
    return "\n".join(lines)
