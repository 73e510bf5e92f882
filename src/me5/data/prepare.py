"""``python -m me5.data.prepare``: raw sources -> sharded parquet files of the normalised schema.

For each source (a source class and its raw path, or a config of several) it writes

* ``OUT/<source>/part-<input>-<shard>.parquet``: columns ``query, positive, negatives, teacher_scores, lang,
  source``; each shard's rows shuffled (seeded), in row groups of ``--row-group-rows`` rows (the units the
  streaming readers share out); with ``--split-langs`` every row group holds **one language**, which language
  temperature needs when streaming (each language is then its own stream, and a worker holds one row group
  per language and source: lower ``--row-group-rows`` when there are hundreds);
* ``OUT/<source>/shards.json``: the shard manifest the streaming readers plan from (no footer reads);
* ``OUT/<source>/stats.json`` and ``OUT/stats.json``: read / kept / skipped-by-reason counts per source and per
  language, also printed as a table.

Optional steps from the English E5 recipe (arXiv 2212.03533):

* ``--eval-sets DIR ...``: drop pairs whose query or positive passage appears in an evaluation set (BEIR
  layout: ``corpus.jsonl``/``queries.jsonl``, or per-language subfolders as MIRACL); exact match after
  whitespace normalisation (``skipped/eval_overlap``);
* ``--consistency-model PATH``: keep a pair only when its positive ranks in the top ``--consistency-top-k``
  (default 2) among itself and a random pool of ``--consistency-pool`` passages of the same source, scored by an
  existing model (an exported me5 folder or any ``Encoder.from_pretrained`` path; E5 used a 1M pool)
  (``skipped/inconsistent``).

Bad data is skipped and counted per reason (``undecodable``, ``malformed_json``, ``missing_field``,
``empty_text``, ``bad_type``, ``bad_teacher_scores``, ``too_long``, ``wrong_language`` with ``--langs``, and the
reasons a source's ``convert`` gives), or with ``--strict`` stops with an error naming file:line.

Interrupted runs resume: each input file has a progress marker (``_progress/<input>.json``) holding the input
position after the last written shard and the counts so far; shards are written atomically, so a rerun skips
finished inputs and continues the others where their last shard ended.
"""

from __future__ import annotations

import argparse
import bisect
import hashlib
import importlib
import json
import logging
import os
import sys
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from me5.data.readers import (
    SHARDS_FORMAT,
    SHARDS_MANIFEST,
    BadLine,
    iter_jsonl_at,
    load_hub_stream,
    resolve_files,
)
from me5.data.schema import PairExample, to_example
from me5.errors import ConfigError, DataError, Me5Error, SkipRecord

log = logging.getLogger(__name__)

PROGRESS_VERSION = 1


# ============================================================================================== options
@dataclass
class PrepareOptions:
    """What :func:`prepare` does (the CLI flags of the same names)."""

    shard_rows: int = 100_000
    row_group_rows: int = 10_000
    max_chars: int | None = None
    langs: Sequence[str] | None = None
    eval_sets: Sequence[str] = ()
    consistency_model: str | None = None
    consistency_top_k: int = 2
    consistency_pool: int = 100_000
    consistency_batch_size: int = 256
    consistency_max_length: int = 128
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


# ============================================================================================== checks
def normalise_text(text: str) -> str:
    """Whitespace-normalised text (the key of the eval-set exact match)."""
    return " ".join(text.split())


def _digest(text: str) -> bytes:
    return hashlib.blake2b(normalise_text(text).encode("utf-8"), digest_size=8).digest()


def load_eval_texts(folders: Iterable[str | os.PathLike]) -> set[bytes]:
    """Digests of every query and passage text (``text``, and ``title + " " + text``) of BEIR-layout folders."""
    from me5.data.readers import iter_jsonl

    out: set[bytes] = set()
    for folder in folders:
        root = Path(folder)
        dirs = [root] if (root / "corpus.jsonl").exists() or (root / "queries.jsonl").exists() else sorted(
            p for p in root.iterdir() if p.is_dir() and ((p / "corpus.jsonl").exists() or (p / "queries.jsonl").exists())
        ) if root.is_dir() else []
        if not dirs:
            raise DataError("not a BEIR folder: no corpus.jsonl/queries.jsonl in it nor in any subfolder", file=str(root))
        for d in dirs:
            for name in ("corpus.jsonl", "queries.jsonl"):
                if not (d / name).is_file():
                    continue
                for _, rec in iter_jsonl(d / name):
                    text = rec.get("text")
                    if isinstance(text, str) and text.strip():
                        out.add(_digest(text))
                        title = rec.get("title")
                        if isinstance(title, str) and title.strip():
                            out.add(_digest(title + " " + text))
    return out


# script of each character range (start, end inclusive); a cheap stand-in for language identification
_SCRIPT_RANGES = sorted([
    (0x0041, 0x005A, "Latin"), (0x0061, 0x007A, "Latin"), (0x00C0, 0x024F, "Latin"), (0x1E00, 0x1EFF, "Latin"),
    (0x0370, 0x03FF, "Greek"), (0x0400, 0x052F, "Cyrillic"), (0x0530, 0x058F, "Armenian"),
    (0x0590, 0x05FF, "Hebrew"), (0x0600, 0x06FF, "Arabic"), (0x0750, 0x077F, "Arabic"), (0x08A0, 0x08FF, "Arabic"),
    (0xFB50, 0xFDFF, "Arabic"), (0xFE70, 0xFEFF, "Arabic"), (0x0900, 0x097F, "Devanagari"),
    (0x0980, 0x09FF, "Bengali"), (0x0A00, 0x0A7F, "Gurmukhi"), (0x0A80, 0x0AFF, "Gujarati"),
    (0x0B00, 0x0B7F, "Oriya"), (0x0B80, 0x0BFF, "Tamil"), (0x0C00, 0x0C7F, "Telugu"), (0x0C80, 0x0CFF, "Kannada"),
    (0x0D00, 0x0D7F, "Malayalam"), (0x0D80, 0x0DFF, "Sinhala"), (0x0E00, 0x0E7F, "Thai"), (0x0E80, 0x0EFF, "Lao"),
    (0x0F00, 0x0FFF, "Tibetan"), (0x1000, 0x109F, "Myanmar"), (0x10A0, 0x10FF, "Georgian"),
    (0x1100, 0x11FF, "Hangul"), (0x3130, 0x318F, "Hangul"), (0xAC00, 0xD7AF, "Hangul"), (0x1200, 0x137F, "Ethiopic"),
    (0x1780, 0x17FF, "Khmer"), (0x3040, 0x309F, "Hiragana"), (0x30A0, 0x30FF, "Katakana"),
    (0x3400, 0x4DBF, "Han"), (0x4E00, 0x9FFF, "Han"), (0xF900, 0xFAFF, "Han"), (0x20000, 0x2FA1F, "Han"),
])
_STARTS = [r[0] for r in _SCRIPT_RANGES]
# the scripts a language is written in (languages not listed here are not script-checked)
LANG_SCRIPTS: dict[str, set[str]] = {
    **{lang: {"Latin"} for lang in (
        "af az ca cs cy da de en eo es et eu fi fil fr ga gl ha hr hu id is it jv la lt lv mg ms mt nl no pl pt ro "
        "sk sl so sq sv sw tl tr uz vi xh yo zu").split()},
    **{lang: {"Cyrillic"} for lang in "be bg kk ky mk mn ru sr tg uk".split()},
    **{lang: {"Arabic"} for lang in "ar fa ps sd ug ur".split()},
    **{lang: {"Devanagari"} for lang in "hi mr ne sa".split()},
    "bn": {"Bengali"}, "as": {"Bengali"}, "pa": {"Gurmukhi"}, "gu": {"Gujarati"}, "or": {"Oriya"}, "ta": {"Tamil"},
    "te": {"Telugu"}, "kn": {"Kannada"}, "ml": {"Malayalam"}, "si": {"Sinhala"}, "th": {"Thai"}, "lo": {"Lao"},
    "my": {"Myanmar"}, "ka": {"Georgian"}, "hy": {"Armenian"}, "he": {"Hebrew"}, "yi": {"Hebrew"}, "el": {"Greek"},
    "am": {"Ethiopic"}, "km": {"Khmer"}, "ko": {"Hangul", "Han"}, "zh": {"Han"},
    "ja": {"Han", "Hiragana", "Katakana"},
}


def dominant_script(text: str, *, sample: int = 200) -> str | None:
    """The most frequent script among the letters of the first ``sample`` characters (``None``: no letters)."""
    counts: Counter = Counter()
    for ch in text[:sample]:
        cp = ord(ch)
        i = bisect.bisect_right(_STARTS, cp) - 1
        if i >= 0 and cp <= _SCRIPT_RANGES[i][1]:
            counts[_SCRIPT_RANGES[i][2]] += 1
    return counts.most_common(1)[0][0] if counts else None


class LanguageCheck:
    """``wrong_language``: the record's language is not in ``langs``, its query is not written in a script of
    that language, or its positive in none of the scripts of ``langs`` (translation pairs cross languages)."""

    def __init__(self, langs: Iterable[str]):
        self.langs = set(langs)
        scripts = [LANG_SCRIPTS.get(lang) for lang in self.langs]
        self.any_script = None if any(s is None for s in scripts) else set().union(*scripts)

    def ok(self, ex: PairExample) -> bool:
        if ex.lang not in self.langs:
            return False
        expected = LANG_SCRIPTS.get(ex.lang)
        if expected is not None:
            s = dominant_script(ex.query)
            if s is not None and s not in expected:
                return False
        if self.any_script is not None:
            s = dominant_script(ex.positive)
            if s is not None and s not in self.any_script:
                return False
        return True


# ============================================================================================== consistency
Embedder = Callable[[Sequence[str], str], np.ndarray]  # (texts, "query" | "passage") -> (N, D) scores by dot


def model_embedder(path: str, *, device: str | None = None, max_length: int = 128, batch_size: int = 256,
                   query_prefix: str = "query: ", passage_prefix: str = "passage: ") -> Embedder:
    """An :data:`Embedder` from an exported me5 folder or any ``Encoder.from_pretrained`` path."""
    import torch
    from transformers import AutoTokenizer

    from me5.models.encoder import Encoder

    tokenizer = AutoTokenizer.from_pretrained(path)
    encoder = Encoder.from_pretrained(path, tokenizer=tokenizer)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    encoder.to(device)

    def embed(texts: Sequence[str], kind: str) -> np.ndarray:
        prefix = query_prefix if kind == "query" else passage_prefix
        return encoder.encode(list(texts), tokenizer, prefix=prefix, max_length=max_length, batch_size=batch_size,
                              device=device).numpy()

    return embed


class ConsistencyFilter:
    """Keeps a pair when its positive ranks in the top ``top_k`` among itself and a pool of passages.

    Rank = 1 + the number of pool passages that score strictly higher than the positive for the query.
    """

    def __init__(self, embed: Embedder, pool_texts: Sequence[str], *, top_k: int = 2, batch_size: int = 256,
                 pool_embeddings: np.ndarray | None = None):
        self.embed, self.top_k, self.batch_size = embed, top_k, batch_size
        self.pool_texts = list(pool_texts)
        if pool_embeddings is None:
            pool_embeddings = np.concatenate([
                np.asarray(embed(self.pool_texts[i: i + batch_size], "passage"), dtype=np.float32)
                for i in range(0, len(self.pool_texts), batch_size)]) if self.pool_texts else np.zeros((0, 1), np.float32)
        self.pool = np.asarray(pool_embeddings, dtype=np.float32)

    def ranks(self, queries: Sequence[str], positives: Sequence[str]) -> np.ndarray:
        out = []
        for i in range(0, len(queries), self.batch_size):
            q = np.asarray(self.embed(queries[i: i + self.batch_size], "query"), dtype=np.float32)
            p = np.asarray(self.embed(positives[i: i + self.batch_size], "passage"), dtype=np.float32)
            s_pos = (q * p).sum(axis=1)
            higher = np.zeros(len(q), dtype=np.int64)
            for j in range(0, len(self.pool), 65536):
                higher += (q @ self.pool[j: j + 65536].T > s_pos[:, None]).sum(axis=1)
            out.append(1 + higher)
        return np.concatenate(out) if out else np.zeros(0, dtype=np.int64)

    def keep(self, queries: Sequence[str], positives: Sequence[str]) -> np.ndarray:
        return self.ranks(queries, positives) <= self.top_k


# ============================================================================================== reading
def _reason(err: DataError) -> str:
    """The skip reason of a malformed record, from its :class:`DataError`."""
    if isinstance(err, BadLine):
        return err.reason
    msg = err.message
    if msg.startswith("missing required field"):
        return "missing_field"
    if msg == "empty text":
        return "empty_text"
    if err.field and err.field.startswith("teacher_scores") or "scores" in msg:
        return "bad_teacher_scores"
    if msg.startswith("expected") or msg.startswith("a record must be"):
        return "bad_type"
    return "malformed"


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


def _inputs(source) -> list[_Input]:
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
SCHEMA_FIELDS = ("query", "positive", "negatives", "teacher_scores", "lang", "source")


def _schema():
    import pyarrow as pa

    return pa.schema([
        ("query", pa.string()), ("positive", pa.string()), ("negatives", pa.list_(pa.string())),
        ("teacher_scores", pa.list_(pa.float32())), ("lang", pa.string()), ("source", pa.string()),
    ])


def _write_shard(path: Path, examples: Sequence[PairExample], row_group_rows: int, *, seed: Sequence[int],
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
            }, schema=schema)
            w.write_table(table, row_group_size=len(rows))
            one = {e.lang for e in rows}
            groups.append({"rows": len(rows), "lang": one.pop() if len(one) == 1 else None})
            i = j
    os.replace(tmp, path)
    return {"file": path.name, "rows": len(examples), "row_groups": groups}


def _write_json(path: Path, obj) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1, ensure_ascii=False, sort_keys=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)


# ============================================================================================== one source
class _Stop(Exception):
    """``max_shards`` reached: stop this run (the progress markers hold where to resume)."""


class _SourceJob:
    def __init__(self, name: str, source, out: Path, opts: PrepareOptions, *, eval_texts: set[bytes] | None,
                 lang_check: LanguageCheck | None, embedder: Embedder | None, budget: list[int]):
        self.name, self.source, self.out, self.opts = name, source, out, opts
        self.eval_texts, self.lang_check, self.embedder, self.budget = eval_texts, lang_check, embedder, budget
        self.max_chars = opts.max_chars if opts.max_chars is not None else getattr(source, "max_chars", None)
        self.progress_dir = out / "_progress"
        self.consistency: ConsistencyFilter | None = None

    # -------------------------------------------------------------- one record
    def classify(self, rec, file: str, line: int, counts: Counter, langs: dict) -> PairExample | None:
        counts["read"] += 1
        try:
            if isinstance(rec, DataError):
                raise rec
            ex = to_example(self.source.convert(rec), source=self.name,
                            default_lang=self.source.default_lang_for(file), file=file, line=line)
        except SkipRecord as skip:
            counts[f"skipped/{skip.reason}"] += 1
            return None
        except DataError as err:
            if self.opts.strict:
                raise DataError(err.message, file=err.file or file, line=err.line or line, field=err.field) from None
            counts[f"skipped/{_reason(err)}"] += 1
            return None
        reason = None
        if self.max_chars is not None and max(len(ex.query), len(ex.positive), *map(len, ex.negatives)) > self.max_chars:
            reason = "too_long"
        elif self.lang_check is not None and not self.lang_check.ok(ex):
            reason = "wrong_language"
        elif self.eval_texts is not None and (_digest(ex.query) in self.eval_texts or _digest(ex.positive) in self.eval_texts):
            reason = "eval_overlap"
        if reason is not None:
            counts[f"skipped/{reason}"] += 1
            langs.setdefault(ex.lang, Counter())[f"skipped/{reason}"] += 1
            return None
        return ex

    # -------------------------------------------------------------- consistency pool
    def build_consistency(self) -> None:
        if self.embedder is None:
            return
        cache = self.out / "_consistency"
        cache.mkdir(parents=True, exist_ok=True)
        meta = {"pool": self.opts.consistency_pool, "seed": self.opts.seed, "model": self.opts.consistency_model}
        texts = None
        if (cache / "pool.json").is_file() and (cache / "pool.npy").is_file():
            saved = json.loads((cache / "pool.json").read_text(encoding="utf-8"))
            if saved.get("meta") == meta:
                texts, emb = saved["texts"], np.load(cache / "pool.npy")
        if texts is None:  # a reservoir sample of the source's positives (one pass over the input)
            rng = np.random.default_rng([self.opts.seed, 0x706F6F6C])
            texts, seen = [], 0
            for inp in _inputs(self.source):
                for _, _, rec, _ in _iter_input(inp, None):
                    if isinstance(rec, DataError):
                        continue
                    try:
                        p = to_example(self.source.convert(rec), source=self.name).positive
                    except (DataError, SkipRecord):
                        continue
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
            _write_json(cache / "pool.json", {"meta": meta, "texts": texts})
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
                state["shards"].append(_write_shard(shard, kept, self.opts.row_group_rows,
                                                    seed=(self.opts.seed, inp.index, k), split_langs=self.opts.split_langs))
            state.update(position=position, counts=dict(counts), langs={k: dict(v) for k, v in langs.items()}, done=done)
            _write_json(marker, state)
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
        _write_json(self.out / SHARDS_MANIFEST, {"format": SHARDS_FORMAT, "source": self.name, "shards": shards})
        _write_json(self.out / "stats.json", stats)
        return stats


# ============================================================================================== entry points
def prepare(
    sources: Mapping[str, object],
    out_dir: str | os.PathLike,
    options: PrepareOptions | None = None,
    *,
    embedder: Embedder | None = None,
) -> dict[str, dict]:
    """Prepare every source into ``out_dir/<name>/``; returns ``{name: stats}`` (also ``out_dir/stats.json``).

    ``embedder`` (optional): the consistency filter's scorer; by default built from ``options.consistency_model``.
    Returns early (``{"_stopped": True}`` among the stats) when ``options.max_shards`` shards were written.
    """
    opts = options or PrepareOptions()
    opts.check()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    eval_texts = load_eval_texts(opts.eval_sets) if opts.eval_sets else None
    lang_check = LanguageCheck(opts.langs) if opts.langs else None
    budget = [opts.max_shards if opts.max_shards is not None else sys.maxsize]
    stats: dict[str, dict] = {}
    for name, source in sources.items():
        src_out = out_dir / name
        if opts.force and src_out.exists():
            import shutil

            shutil.rmtree(src_out)
        emb = embedder
        if emb is None and opts.consistency_model is not None:
            pp = source.query_prefix if getattr(source, "symmetric", False) else source.passage_prefix
            emb = model_embedder(opts.consistency_model, device=opts.device, max_length=opts.consistency_max_length,
                                 batch_size=opts.consistency_batch_size, query_prefix=source.query_prefix,
                                 passage_prefix=pp)
        job = _SourceJob(name, source, src_out, opts, eval_texts=eval_texts, lang_check=lang_check, embedder=emb,
                         budget=budget)
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
    _write_json(out_dir / "stats.json", overall)
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


def _import(dotted: str):
    mod, _, attr = dotted.rpartition(".")
    if not mod:
        raise ConfigError("prepare.source", f"'{dotted}' is not a dotted class path (e.g. me5.data.TextPairDataModule)")
    try:
        return getattr(importlib.import_module(mod), attr)
    except (ImportError, AttributeError) as err:
        raise ConfigError("prepare.source", f"cannot import '{dotted}' ({err})") from err


def _parse_value(text: str):
    import yaml

    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def build_sources(args) -> tuple[dict[str, object], dict]:
    """The sources (and config-file options) named on the command line."""
    if args.config:
        from hydra.utils import instantiate
        from omegaconf import OmegaConf

        cfg = OmegaConf.load(args.config)
        if "sources" not in cfg:
            raise ConfigError("prepare.sources", f"{args.config} has no 'sources' mapping")
        names = list(cfg.sources)
        if args.only:
            unknown = set(args.only) - set(names)
            if unknown:
                raise ConfigError("prepare.only", f"no source {sorted(unknown)} in {args.config}; sources: {names}")
            names = [n for n in names if n in args.only]
        sources = {}
        for n in names:
            node = cfg.sources[n]
            if "_target_" not in node:
                raise ConfigError(f"prepare.sources.{n}", "needs a _target_ (the source class)")
            sources[n] = instantiate(node, name=n) if "name" not in node else instantiate(node)
        opts = {k: v for k, v in OmegaConf.to_container(cfg, resolve=True).items() if k != "sources"}
        return sources, opts
    if not args.source or not args.raw:
        raise ConfigError("prepare", "give --source CLASS --raw PATH, or --config FILE")
    cls = _import(args.source)
    kwargs = {}
    for kv in args.source_arg or []:
        k, sep, v = kv.partition("=")
        if not sep:
            raise ConfigError("prepare.source_arg", f"expected key=value, got '{kv}'")
        kwargs[k] = _parse_value(v)
    src = cls(args.raw, **kwargs)
    return {args.name or src.name: src}, {}


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m me5.data.prepare", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="output folder (one subfolder per source)")
    p.add_argument("--source", help="source class, e.g. me5.data.sources.columns.ColumnPairs")
    p.add_argument("--raw", help="the source's raw path (file, folder or hub id)")
    p.add_argument("--name", help="output name of the source (default: its source_name)")
    p.add_argument("--source-arg", action="append", metavar="KEY=VALUE", help="constructor argument (YAML value)")
    p.add_argument("--config", help="YAML with 'sources: {name: {_target_: CLASS, path: ..., ...}}' and options")
    p.add_argument("--only", nargs="+", help="with --config: prepare only these sources")
    p.add_argument("--shard-rows", type=int)
    p.add_argument("--row-group-rows", type=int)
    p.add_argument("--max-chars", type=int)
    p.add_argument("--langs", help="comma-separated language codes to keep (script-checked)")
    p.add_argument("--eval-sets", nargs="+", help="BEIR folders whose queries/passages are removed by exact match")
    p.add_argument("--consistency-model", help="exported me5 folder or Encoder.from_pretrained path")
    p.add_argument("--consistency-top-k", type=int)
    p.add_argument("--consistency-pool", type=int)
    p.add_argument("--consistency-batch-size", type=int)
    p.add_argument("--consistency-max-length", type=int)
    p.add_argument("--device")
    p.add_argument("--seed", type=int)
    p.add_argument("--max-shards", type=int, help="stop after writing this many shards (rerun to continue)")
    p.add_argument("--split-langs", action="store_true", help="single-language row groups (language temperature)")
    p.add_argument("--strict", action="store_true", help="a bad record is an error naming file:line")
    p.add_argument("--force", action="store_true", help="start over (delete the sources' output folders)")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        sources, cfg_opts = build_sources(args)
        fields = {f.name for f in PrepareOptions.__dataclass_fields__.values()}
        unknown = set(cfg_opts) - fields
        if unknown:
            raise ConfigError(f"prepare.{sorted(unknown)[0]}", f"unknown option; options: {sorted(fields)}")
        opts = PrepareOptions(**cfg_opts)
        for name in fields:
            v = getattr(args, name, None)
            if v is not None and v is not False:
                setattr(opts, name, v)
        if isinstance(opts.langs, str):
            opts.langs = [x.strip() for x in opts.langs.split(",") if x.strip()]
        opts.progress = not args.no_progress and opts.progress
        stats = prepare(sources, args.out, opts)
    except Me5Error as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(format_stats(stats))
    if stats.get("_stopped"):
        print(f"\nstopped after {opts.max_shards} shard(s); run the same command again to continue")
    else:
        print(f"\nstats: {Path(args.out) / 'stats.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
