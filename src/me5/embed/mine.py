"""Hard-negative mining for stage 2: the candidate window and false-negative guards, and the sharded driver.

mE5 fine-tunes with mined hard negatives (arXiv 2402.05672 §2) but says nothing of how they were mined [U]; E5
mined MS MARCO and NQ negatives with a trained dense retriever and used 7 per query [S]. This module mines them
with any me5 encoder, through the embed-and-search code that evaluation uses (:mod:`me5.embed.encode`,
:mod:`me5.embed.search`: one implementation), and writes stage-2 shards in the prepared layout of
:mod:`me5.data.shards` (``part-*.parquet`` + ``shards.json``), which :class:`~me5.data.source.Source` and the
streaming readers load as they are.

For every record, in order:

1. **Search.** Its query (with the model's query prompt, :class:`~me5.prompts.PromptPolicy`) is searched against
   the corpus (the document prompt of the source's task; a symmetric source gets the query prompt on both
   sides) by inner product: exact by default (:func:`~me5.embed.search.search`, ``method="exact"``), or a FAISS
   index (``index="IVF4096,Flat"``, ``"HNSW32"``, ... with ``index_params="nprobe=64"``) for tens of millions
   of passages. The top ``range_max + P`` are kept (P: the most excluded rows of any query, usually 1).
2. **Window.** Positives are never candidates: every positive of every record with the same query text, and a
   corpus passage equal to the query text itself (``excluded/positive``, ``excluded/query_text``). The
   remaining candidates are ranked 0, 1, 2, ... in search order; the window is ranks
   ``[range_min, range_max)`` (:func:`candidate_window`).
3. **Guards** (positive-aware mining, NV-Retriever arXiv 2407.15831; :func:`guard_masks`): with ``perc_pos``
   a candidate scoring above ``pos - |pos| * (1 - perc_pos)`` (``perc_pos × pos`` for a positive score, the
   "TopK-PercPos" rule; sentence-transformers' ``relative_margin = 1 - perc_pos``) is dropped
   (``dropped/perc_pos``); with ``absolute_margin`` one scoring above ``pos - absolute_margin``
   (``dropped/absolute_margin``). The positive's score is the record's own positive, from the same stored
   corpus embeddings as the candidates.
4. **Sampling** (:func:`pick_order`, :func:`take`): ``top`` takes the best-ranked ``n_negatives`` survivors
   (TopK); ``random`` takes a uniform sample of them, drawn from a hash of ``(seed, record index, passage)``, so
   it does not depend on the sharding, the batch or a resume.
5. **Teacher re-check** (optional, a :class:`~me5.embed.teacher.CrossEncoderScorer`): the picked candidates are
   scored by the cross-encoder; one scoring above the record's positive is dropped (``dropped/teacher``) and the
   next survivor in pick order is tried, until ``n_negatives`` pass or none is left. The records then carry
   these teacher scores (positive first), the ones :mod:`me5.embed.teacher` would write.

A record keeps its own negatives first (NLI's contradiction, a dataset's BM25 negatives: ``negatives/own``) and
mining fills up to ``n_negatives`` after them (``negatives``: the mined ones, in pick order); a record with
``n_negatives`` or more of its own is not mined. Its own negatives are never mined again (they are excluded like
its positives, ``excluded/own_negative``) and the teacher re-check does not drop them (they are the data's
labels). Teacher scores: with the re-check, the positive, the own negatives (scored too) and the mined ones;
without it, a record's own scores are kept when nothing was added, else dropped (``me5.score`` writes them). A
record with fewer than ``n_negatives`` in all (``records/short``: the corpus window had too few survivors) keeps
what it got; the training loader skips it as ``too_few_negatives`` if the stage needs more, or the source sets
its own count (``n_negatives`` of a :class:`~me5.data.source.Source`). ``own_negatives="replace"`` mines
``n_negatives`` for every record and drops its own (sentence-transformers' ``mine_hard_negatives``).

Corpus: by default the source's own passages (positives and negatives of every record, deduplicated, in order
of first appearance); else a file: BEIR ``corpus.jsonl`` (``_id``, ``title``, ``text``; ``.jsonl.gz`` or a
parquet of those columns), a passage being ``title + " " + text`` (no title, or ``-``: ``text``), deduplicated by
text. A record whose positive is not in a corpus file is counted and mined all the same (``missing_positive=
"report"``: its positive is embedded on its own), left out (``"skip"``), or an error before any embedding
(``"error"``).

The output folder::

    part-{k:05d}.parquet      output shard k: records [k*shard_rows, (k+1)*shard_rows), rows shuffled (seeded)
    shards.json               the shard manifest (written when every shard is done)
    mine_stats.json           counts per drop reason, corpus and read counts, options (idem)
    _progress/job.json        the run key (inputs, options, model) and its fields
    _progress/part-k.json     shard k's manifest entry, counts and run key (its completion mark)
    _work/corpus/             the corpus embeddings (:func:`~me5.embed.encode.encode_corpus`, fp16, resumable)

Shard k belongs to process ``k % world`` (``rank`` of ``world``); the shards do not depend on ``world``. Every
file is written under a temporary name and renamed, and a shard counts as done only when its marker carries
this run's key, so a killed run resumes at the first unfinished shard and writes the same bytes (exact search;
an approximate index's answers can depend on the queries searched together). With several processes each
embeds its share of the corpus, then waits (``wait_s``) until the others have embedded theirs.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from me5.data.readers import SHARDS_FORMAT, SHARDS_MANIFEST, iter_records
from me5.data.schema import PairExample
from me5.data.shards import _write_shard
from me5.embed.encode import (
    DEFAULT_MAX_LENGTH,
    EmbeddingShards,
    corpus_digest,
    encode_corpus,
    encode_texts,
    model_digest,
    shard_rows_of,
    tokenizer_digest,
)
from me5.embed.search import search
from me5.errors import ConfigError, DataError
from me5.jsonio import read_json, write_json
from me5.prompts import PromptPolicy

log = logging.getLogger(__name__)

SAMPLING = ("top", "random")
MISSING_POSITIVE = ("report", "skip", "error")
OWN_NEGATIVES = ("keep", "replace")
PROGRESS = "_progress"
JOB = "job.json"
FORMAT = 1
NO_TITLE = ("", "-")  # me5.data.sources.layouts: "-" is RocketQA's no-title placeholder
ID_FIELDS = ("_id", "id", "docid")


# ============================================================================================== options
@dataclass
class MineOptions:
    """What :func:`mine` does (the ``me5.mine`` flags of the same names)."""

    n_negatives: int = 7  # E5: 7 hard negatives per query [S]; mE5 does not say [U]
    range_min: int = 0  # first candidate rank of the window (0-based, positives not counted)
    range_max: int = 100  # one past the last rank of the window
    perc_pos: float | None = 0.95  # TopK-PercPos: drop candidates above perc_pos x the positive's score
    absolute_margin: float | None = None  # drop candidates above the positive's score minus this
    sampling: str = "top"  # top | random
    seed: int = 0  # random sampling and the row shuffle of each shard
    missing_positive: str = "report"  # a positive absent from a corpus file: report | skip | error
    search: str = "exact"  # exact (torch, blockwise) | faiss
    index: str = "Flat"  # faiss index-factory string: Flat (exact), IVF4096,Flat, HNSW32, ...
    index_params: str | None = None  # faiss search-time parameters: nprobe=64, efSearch=128
    query_max_length: int = DEFAULT_MAX_LENGTH
    passage_max_length: int = DEFAULT_MAX_LENGTH
    max_batch: int = 256  # rows per forward (encode_texts / encode_corpus)
    max_tokens: int | None = None  # padded tokens per forward (default: max_batch rows of max_length)
    precision: str = "fp16"  # CUDA autocast dtype of the encoder (fp32 elsewhere)
    embed_shard_rows: int = 65536  # corpus rows per embedding shard
    shard_rows: int = 100_000  # records per output shard (me5.prepare's default)
    row_group_rows: int = 10_000
    split_langs: bool = False  # single-language row groups (language temperature when streaming)
    max_shards: int | None = None  # write at most this many output shards, then stop (resume later)
    # a record's own negatives: "keep" them first and mine the rest up to n_negatives (the recipe: NLI keeps its
    # contradiction); "replace" them by n_negatives mined ones (sentence-transformers' mine_hard_negatives)
    own_negatives: str = "keep"

    def check(self) -> None:
        """Reject bad values before any data is read; errors name the ``mine.<field>``."""
        if self.own_negatives not in OWN_NEGATIVES:
            raise ConfigError("mine.own_negatives", f"unknown '{self.own_negatives}'; choose one of {list(OWN_NEGATIVES)}")
        if self.n_negatives < 1:
            raise ConfigError("mine.n_negatives", f"must be >= 1, got {self.n_negatives}")
        if self.range_min < 0:
            raise ConfigError("mine.range_min", f"must be >= 0, got {self.range_min}")
        if self.range_max <= self.range_min:
            raise ConfigError("mine.range_max", f"must be larger than range_min={self.range_min}, got {self.range_max}")
        if self.n_negatives > self.range_max - self.range_min:
            raise ConfigError("mine.n_negatives", f"{self.n_negatives} negatives do not fit in the window "
                              f"[{self.range_min}, {self.range_max}) of {self.range_max - self.range_min} ranks")
        if self.perc_pos is not None and not (0.0 < self.perc_pos <= 1.0):
            raise ConfigError("mine.perc_pos", f"must be in (0, 1] (0.95: TopK-PercPos), got {self.perc_pos}")
        if self.absolute_margin is not None and not np.isfinite(self.absolute_margin):
            raise ConfigError("mine.absolute_margin", f"must be finite, got {self.absolute_margin}")
        if self.sampling not in SAMPLING:
            raise ConfigError("mine.sampling", f"unknown '{self.sampling}'; choose one of {list(SAMPLING)}")
        if self.missing_positive not in MISSING_POSITIVE:
            raise ConfigError("mine.missing_positive", f"unknown '{self.missing_positive}'; choose one of "
                              f"{list(MISSING_POSITIVE)}")
        if self.search not in ("exact", "faiss"):
            raise ConfigError("mine.search", f"unknown '{self.search}'; choose one of ['exact', 'faiss']")
        if not approximate(self.index) and self.index.replace(" ", "") != "Flat":
            raise ConfigError("mine.index", f"'{self.index}' is not a faiss index-factory string")
        if approximate(self.index) and self.search != "faiss":
            raise ConfigError("mine.index", f"the approximate index '{self.index}' needs search='faiss'")
        for name in ("query_max_length", "passage_max_length", "max_batch", "embed_shard_rows", "shard_rows",
                     "row_group_rows"):
            if int(getattr(self, name)) < 1:
                raise ConfigError(f"mine.{name}", f"must be >= 1, got {getattr(self, name)}")

    def fingerprint(self) -> dict:
        """The fields that change what is written (not the stop point)."""
        d = asdict(self)
        d.pop("max_shards")
        return d


def approximate(index: str) -> bool:
    """Whether a faiss index-factory string is an approximate index (anything but ``Flat``)."""
    s = index.replace(" ", "")
    return s != "Flat" and bool(re.match(r"^[A-Za-z]", s))


def check_index(options: MineOptions, *, dim: int, n_passages: int) -> None:
    """An index string that faiss cannot build, or an IVF with more lists than passages, is a
    :class:`ConfigError` naming ``mine.index`` (checked before the corpus is embedded)."""
    if not approximate(options.index):
        return
    from me5.embed.search import _import_faiss

    faiss = _import_faiss()
    try:
        faiss.index_factory(int(dim), options.index, faiss.METRIC_INNER_PRODUCT)
    except Exception as err:  # noqa: BLE001 -- faiss raises RuntimeError with its own message
        raise ConfigError("mine.index", f"faiss cannot build '{options.index}' for dimension {dim} ({err})") from None
    m = re.search(r"IVF(\d+)", options.index)
    if m and int(m.group(1)) > n_passages:
        raise ConfigError("mine.index", f"'{options.index}' has {m.group(1)} inverted lists for a corpus of "
                          f"{n_passages} passages; use fewer lists (about sqrt(N) to 16 sqrt(N))")


# ============================================================================================== pure functions
def candidate_window(cand_rows_QK: np.ndarray, exclude_QP: np.ndarray, *, range_min: int, range_max: int
                     ) -> tuple[np.ndarray, np.ndarray]:
    """``(window_QK, excluded_QK)`` boolean masks over search results in rank order.

    ``cand_rows_QK``: corpus rows (``-1``: no result); ``exclude_QP``: rows that are never negatives (a query's
    positives, ``-1`` padded). The excluded and empty columns get no rank; the others are ranked 0, 1, ... and
    the window holds ranks ``range_min <= r < range_max``.
    """
    excluded = (cand_rows_QK[:, :, None] == exclude_QP[:, None, :]).any(axis=2) & (cand_rows_QK >= 0)
    eligible = (cand_rows_QK >= 0) & ~excluded
    rank = np.cumsum(eligible, axis=1) - 1
    return eligible & (rank >= range_min) & (rank < range_max), excluded


def guard_masks(cand_scores_QK: np.ndarray, pos_scores_Q: np.ndarray, window_QK: np.ndarray, *,
                perc_pos: float | None, absolute_margin: float | None) -> dict[str, np.ndarray]:
    """``{reason: dropped_QK}`` for the window's candidates, each candidate under the first reason that drops it.

    ``perc_pos``: drop ``score > pos - |pos| * (1 - perc_pos)``; ``absolute_margin``: drop ``score > pos - m``.
    """
    pos = pos_scores_Q.astype(np.float32)[:, None]
    left = window_QK.copy()
    out: dict[str, np.ndarray] = {}
    if perc_pos is not None:
        thr = pos - np.abs(pos) * np.float32(1.0 - perc_pos)
        out["perc_pos"] = left & (cand_scores_QK > thr)
        left &= ~out["perc_pos"]
    if absolute_margin is not None:
        out["absolute_margin"] = left & (cand_scores_QK > pos - np.float32(absolute_margin))
        left &= ~out["absolute_margin"]
    return out


_M1, _M2, _M3 = np.uint64(0x9E3779B97F4A7C15), np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)


def _mix(z: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser on a uint64 array (wrapping arithmetic)."""
    z = (z ^ (z >> np.uint64(30))) * _M2
    z = (z ^ (z >> np.uint64(27))) * _M3
    return z ^ (z >> np.uint64(31))


def sample_priority(seed: int, record_ids_Q: np.ndarray, cand_rows_QK: np.ndarray) -> np.ndarray:
    """(Q, K) uint64: a pseudo-random priority of each (record, passage), independent of anything else."""
    with np.errstate(over="ignore"):
        s = _mix(np.full(1, seed, dtype=np.uint64) * _M1 + _M1)
        r = _mix(record_ids_Q.astype(np.uint64)[:, None] ^ s)
        return _mix(r ^ (cand_rows_QK.astype(np.int64).view(np.uint64) * _M1))


def pick_order(cand_rows_QK: np.ndarray, *, sampling: str, seed: int = 0,
               record_ids_Q: np.ndarray | None = None) -> np.ndarray:
    """(Q, K) column indices in the order candidates are picked: rank order (``top``) or by
    :func:`sample_priority` (``random``)."""
    q, k = cand_rows_QK.shape
    if sampling == "top":
        return np.broadcast_to(np.arange(k), (q, k)).copy()
    if sampling == "random":
        ids = record_ids_Q if record_ids_Q is not None else np.arange(q)
        return np.argsort(sample_priority(seed, ids, cand_rows_QK), axis=1, kind="stable")
    raise ConfigError("mine.sampling", f"unknown '{sampling}'; choose one of {list(SAMPLING)}")


def take(order_QK: np.ndarray, allowed_QK: np.ndarray, n: int | np.ndarray) -> np.ndarray:
    """(Q, K) bool: the first ``n`` allowed columns of each row in ``order_QK`` (``n``: one count, or (Q, 1))."""
    rows = np.arange(order_QK.shape[0])[:, None]
    allowed_sorted = allowed_QK[rows, order_QK]
    picked_sorted = allowed_sorted & (np.cumsum(allowed_sorted, axis=1) <= n)
    out = np.zeros_like(allowed_QK)
    out[rows, order_QK] = picked_sorted
    return out


@dataclass
class Selection:
    """What :func:`select_negatives` decided for a block of records (masks over the search results)."""

    window: np.ndarray  # (Q, K) in the rank window
    excluded: np.ndarray  # (Q, K) a positive or the query's own text
    dropped: dict[str, np.ndarray]  # reason -> (Q, K)
    chosen: np.ndarray  # (Q, K) the negatives
    teacher_QK: np.ndarray | None = None  # teacher scores of the candidates it scored (nan elsewhere)
    teacher_pos_Q: np.ndarray | None = None

    def counts(self, n_negatives: int | np.ndarray) -> Counter:
        """Counts of the block; ``n_negatives``: the negatives each record is mined for (a number, or (Q,))."""
        c: Counter = Counter()
        c["candidates/window"] += int(self.window.sum())
        c["excluded/positive"] += int(self.excluded.sum())
        for reason, mask in self.dropped.items():
            c[f"dropped/{reason}"] += int(mask.sum())
        got = self.chosen.sum(axis=1)
        c["negatives"] += int(got.sum())
        c["records/short"] += int((got < n_negatives).sum())
        return c


def select_negatives(cand_rows_QK: np.ndarray, cand_scores_QK: np.ndarray, pos_scores_Q: np.ndarray,
                     exclude_QP: np.ndarray, options: MineOptions, *, record_ids_Q: np.ndarray | None = None,
                     teacher: Callable[[np.ndarray, np.ndarray], np.ndarray] | None = None,
                     teacher_pos_Q: np.ndarray | None = None, need_Q: np.ndarray | None = None) -> Selection:
    """Window, guards, sampling and the optional teacher re-check (module docstring, steps 2-5).

    ``teacher(q_idx, cols)`` scores the candidates at ``(q_idx[i], cols[i])``; ``teacher_pos_Q`` are the
    teacher's scores of the positives. Only the candidates that are picked get scored, round by round.
    ``need_Q``: how many negatives each record is mined for (default ``options.n_negatives``; fewer for a
    record with negatives of its own).
    """
    n = options.n_negatives if need_Q is None else np.asarray(need_Q, dtype=np.int64)[:, None]
    window, excluded = candidate_window(cand_rows_QK, exclude_QP, range_min=options.range_min,
                                        range_max=options.range_max)
    dropped = guard_masks(cand_scores_QK, pos_scores_Q, window, perc_pos=options.perc_pos,
                          absolute_margin=options.absolute_margin)
    survivors = window.copy()
    for mask in dropped.values():
        survivors &= ~mask
    order = pick_order(cand_rows_QK, sampling=options.sampling, seed=options.seed, record_ids_Q=record_ids_Q)
    if teacher is None:
        return Selection(window, excluded, dropped, take(order, survivors, n))
    if teacher_pos_Q is None:
        raise ValueError("the teacher re-check needs the teacher's scores of the positives")
    t = np.full(cand_rows_QK.shape, np.nan, dtype=np.float32)
    rejected = np.zeros_like(survivors)
    while True:  # each round scores at most n new candidates per record; stops when the picks are all scored
        chosen = take(order, survivors & ~rejected, n)
        need = chosen & np.isnan(t)
        if not need.any():
            break
        qi, kj = np.nonzero(need)
        t[qi, kj] = teacher(qi, kj)
        rejected |= need & (t > teacher_pos_Q[:, None])
    dropped["teacher"] = rejected
    return Selection(window, excluded, dropped, chosen, t, teacher_pos_Q)


# ============================================================================================== the plan
@dataclass
class MinePlan:
    """The records and corpus of one mining job, checked before any model is loaded (:func:`plan_mining`)."""

    name: str
    records: list[PairExample]
    corpus_ids: list[str]
    corpus_texts: list[str]
    positive_rows: np.ndarray  # (R,) corpus row of each record's positive, -1 when absent from a corpus file
    exclude: np.ndarray  # (R, P) rows that are never a record's negatives (-1 padded): positives, own negatives
    search_k: int  # results per query: the window's end plus room for the most excluded rows of a query
    instruction: str | None = None
    symmetric: bool = False
    corpus_file: str | None = None
    counts: Counter = field(default_factory=Counter)  # read/skip counts of the source, corpus and plan counts
    row_of: dict[str, int] = field(default_factory=dict, repr=False)  # passage text -> corpus row


def check_corpus_file(path: str | os.PathLike) -> Path:
    """A corpus file that does not exist is a :class:`DataError` naming it."""
    p = Path(path)
    if not p.is_file():
        raise DataError("no such corpus file (BEIR corpus.jsonl[.gz] or parquet with _id, title, text)",
                        file=str(p))
    return p


def read_corpus_file(path: str | os.PathLike) -> tuple[list[str], list[str], Counter]:
    """``(ids, texts, counts)`` of a BEIR-style corpus file, deduplicated by text (the first id is kept)."""
    p = check_corpus_file(path)
    ids: list[str] = []
    texts: list[str] = []
    seen: dict[str, int] = {}
    counts: Counter = Counter()
    for file, line, rec in iter_records(p):
        if not isinstance(rec, Mapping):
            raise DataError(f"a corpus record must be an object, got {type(rec).__name__}", file=file, line=line)
        key = next((k for k in ID_FIELDS if rec.get(k) is not None), None)
        if key is None:
            raise DataError(f"missing passage id (one of {list(ID_FIELDS)})", file=file, line=line, field="_id")
        text, title = rec.get("text"), rec.get("title")
        if not isinstance(text, str):
            raise DataError("missing" if text is None else f"expected a string, got {type(text).__name__}",
                            file=file, line=line, field="text")
        if title is not None and not isinstance(title, str):
            raise DataError(f"expected a string, got {type(title).__name__}", file=file, line=line, field="title")
        title = (title or "").strip()
        passage = text.strip() if title in NO_TITLE else f"{title} {text.strip()}".strip()
        counts["corpus/read"] += 1
        if not passage:
            counts["corpus/empty"] += 1
            continue
        if passage in seen:
            counts["corpus/duplicate_text"] += 1
            continue
        seen[passage] = len(texts)
        ids.append(str(rec[key]))
        texts.append(passage)
    if not texts:
        raise DataError("the corpus file has no passages", file=str(p))
    return ids, texts, counts


def source_corpus(records: Sequence[PairExample]) -> tuple[list[str], list[str], Counter]:
    """The default corpus: every positive and negative of ``records``, deduplicated, in order of first
    appearance; ids are the zero-padded rows."""
    seen: dict[str, None] = {}
    n = 0
    for ex in records:
        for t in (ex.positive, *ex.negatives):
            n += 1
            seen.setdefault(t, None)
    texts = list(seen)
    counts = Counter({"corpus/read": n, "corpus/duplicate_text": n - len(texts)})
    return [f"{i:012d}" for i in range(len(texts))], texts, counts


def plan_mining(records: Sequence[PairExample], options: MineOptions, *, corpus: str | os.PathLike | None = None,
                name: str = "pairs", instruction: str | None = None, symmetric: bool = False,
                counts: Mapping[str, int] | None = None) -> MinePlan:
    """Check the job and build its plan: the corpus, each record's positive row and excluded rows (every positive
    of a record with the same query text, the query text itself, and the record's own negatives: it keeps them
    and is mined for the rest).

    Errors (before any embedding): bad options (:meth:`MineOptions.check`), a corpus file that does not exist,
    a positive absent from the corpus file with ``missing_positive="error"``, a window larger than the corpus.
    """
    options.check()
    if corpus is not None:
        check_corpus_file(corpus)
    if not records:
        raise DataError(f"source '{name}' has no records to mine")
    plan_counts: Counter = Counter(counts or {})
    if corpus is None:
        ids, texts, c = source_corpus(records)
    else:
        ids, texts, c = read_corpus_file(corpus)
    plan_counts.update(c)
    plan_counts["corpus/passages"] = len(texts)
    row_of = {t: i for i, t in enumerate(texts)}
    pos_rows = np.array([row_of.get(ex.positive, -1) for ex in records], dtype=np.int64)
    missing = np.flatnonzero(pos_rows < 0)
    if len(missing):
        first = records[int(missing[0])]
        what = (f"{len(missing)} of {len(records)} records have a positive that is not in the corpus "
                f"{corpus} (first: record {int(missing[0]) + 1}, query {first.query[:80]!r})")
        if options.missing_positive == "error":
            raise DataError(what + "; pass missing_positive='report' or 'skip' to go on", file=str(corpus),
                            field="positive")
        log.warning("%s: %s; %s", name, what, "mined all the same" if options.missing_positive == "report"
                    else "left out")
        if options.missing_positive == "skip":
            plan_counts["skipped/missing_positive"] += len(missing)
            keep = pos_rows >= 0
            records = [ex for ex, k in zip(records, keep, strict=True) if k]
            pos_rows = pos_rows[keep]
            if not records:
                raise DataError(f"no record of source '{name}' has its positive in the corpus", file=str(corpus))
        else:
            plan_counts["records/missing_positive"] += len(missing)
    # every positive of the records sharing a query text, and the query text itself when it is a passage
    by_query: dict[str, set[int]] = {}
    for ex, r in zip(records, pos_rows.tolist(), strict=True):
        s = by_query.setdefault(ex.query, set())
        if r >= 0:
            s.add(r)
    for q, s in by_query.items():
        if q in row_of:
            s.add(row_of[q])
    keep_own = options.own_negatives == "keep"
    per_record = [sorted(by_query[ex.query] | ({row_of[t] for t in ex.negatives if t in row_of} if keep_own else set()))
                  for ex in records]
    most = max(len(rows) for rows in per_record)
    n = len(texts)
    if options.range_max > n - most:
        raise ConfigError("mine.range_max", f"the window ends at rank {options.range_max} but the corpus has only "
                          f"{n} passages ({n - most} besides a query's {most} excluded); lower range_max or give "
                          "a larger corpus")
    exclude = np.full((len(records), max(1, most)), -1, dtype=np.int64)
    for i, rows in enumerate(per_record):
        exclude[i, : len(rows)] = rows
    return MinePlan(name, list(records), ids, texts, pos_rows, exclude, options.range_max + most, instruction,
                    bool(symmetric), None if corpus is None else str(corpus), plan_counts, row_of)


# ============================================================================================== output shards
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
    """What one process's :func:`mine` / :func:`~me5.embed.teacher.score_records` did: output shards ``written``
    now, ``skipped`` (done before), ``pending`` (left: ``max_shards``, or not this rank's and unfinished), and the
    job's ``stats`` once every shard of every rank is done (``complete``)."""

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
        entry = _write_shard(self.path / self.file(k), examples, row_group_rows, seed=(seed, k),
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


# ============================================================================================== the driver
def _wait_for_corpus(folder: Path, *, wait_s: float, poll_s: float) -> EmbeddingShards:
    t0 = time.monotonic()
    while True:
        try:
            return EmbeddingShards(folder)
        except DataError as err:
            if time.monotonic() - t0 >= wait_s:
                raise DataError(f"the corpus embeddings are unfinished after {wait_s:.0f} s ({err.message}); every "
                                "rank of the job embeds its share: start them all (rank 0 .. world-1)",
                                file=str(folder)) from None
        time.sleep(poll_s)


def _gather(shards: EmbeddingShards, rows: np.ndarray) -> np.ndarray:
    """(len(rows), D) float32: the stored embeddings of corpus ``rows``, reading only the files that hold them."""
    layout, n = shards.manifest["layout"], int(shards.fingerprint["rows"])
    lengths = [len(s) for r in range(layout["world"])
               for s in shard_rows_of(n, r, layout["world"], layout["split"], layout["shard_rows"])]
    starts = np.cumsum([0, *lengths])
    storage = np.empty(n, dtype=np.int64)
    storage[shards.rows] = np.arange(n)
    pos = storage[rows]
    files = sorted(set((np.searchsorted(starts, pos, side="right") - 1).tolist()))
    out = np.empty((len(rows), shards.dim), dtype=np.float32)
    for offset, block in shards.blocks(files=files):
        sel = (pos >= offset) & (pos < offset + len(block))
        out[sel] = block[pos[sel] - offset]
    return out


def mine(
    plan: MinePlan,
    encoder,
    tokenizer,
    out_dir: str | os.PathLike,
    *,
    options: MineOptions,
    prompts: PromptPolicy,
    scorer=None,
    rank: int | None = None,
    world: int | None = None,
    work_dir: str | os.PathLike | None = None,
    overwrite: bool = False,
    model_id: str | None = None,
    device: torch.device | str | None = None,
    show_progress: bool = False,
    wait_s: float = 86400.0,
    poll_s: float = 10.0,
) -> JobResult:
    """Mine hard negatives for this process's output shards of ``plan`` (module docstring).

    Args:
        encoder, tokenizer: the retriever (an :class:`~me5.models.encoder.Encoder` and its tokenizer).
        prompts: the model's prompt policy; the query and document prompts of the plan's task.
        scorer: a :class:`~me5.embed.teacher.CrossEncoderScorer` for the teacher re-check (optional).
        rank, world: this process and the number of processes (:func:`resolve_world`).
        work_dir: where the corpus embeddings go (default ``out_dir/_work``).
        model_id: a name for the run key besides the weights' hash (a path, a hub id).
        wait_s, poll_s: how long a process waits for the others' corpus embeddings, and how often it looks.
    """
    from tqdm.auto import tqdm

    options.check()
    check_index(options, dim=int(encoder.dim), n_passages=len(plan.corpus_texts))
    rank, world = resolve_world(rank, world)
    out = Path(out_dir)
    work = Path(work_dir) if work_dir is not None else out / "_work"
    q_prefix = prompts.query(plan.instruction)
    d_prefix = prompts.document(plan.instruction, symmetric=plan.symmetric)
    fields = {
        "options": options.fingerprint(), "model": model_digest(encoder), "model_id": model_id,
        "tokenizer": tokenizer_digest(tokenizer), "prompts": [q_prefix, d_prefix],
        "records": records_digest(plan.records), "corpus": corpus_digest(plan.corpus_ids, plan.corpus_texts),
        "teacher": scorer.fingerprint() if scorer is not None else None,
    }
    key = run_digest({"kind": "mine", "format": FORMAT, **fields})
    output = ShardedOutput(out, kind="mine", key=key, fields=fields, n_records=len(plan.records),
                           shard_rows=options.shard_rows, rank=rank, world=world, overwrite=overwrite)
    todo = output.pending()
    skipped = len(output.own) - len(todo)
    if options.max_shards is not None:
        todo = todo[: max(0, int(options.max_shards))]
    batching = {"max_tokens": options.max_tokens, "max_batch": options.max_batch, "precision": options.precision,
                "device": device}
    if todo or not output.all_done():  # the other processes may wait for this one's share of the corpus
        encode_corpus(encoder, tokenizer, plan.corpus_ids, plan.corpus_texts, work / "corpus", prefix=d_prefix,
                      max_length=options.passage_max_length, shard_rows=options.embed_shard_rows, rank=rank,
                      world=world, overwrite=True, model_id=model_id, show_progress=show_progress,
                      desc=f"{plan.name} corpus", **batching)
    written = 0
    if todo:
        shards = _wait_for_corpus(work / "corpus", wait_s=wait_s, poll_s=poll_s)
        where = torch.device(device) if device is not None else next(iter(encoder.parameters())).device
        method = "faiss" if options.search == "faiss" else "exact"
        # an approximate index is built once for all this process's shards; exact search goes shard by shard,
        # so a shard's results never depend on which other shards are searched with it (resume = same bytes)
        groups = [todo] if approximate(options.index) else [[k] for k in todo]
        bar = tqdm(total=len(todo), desc=f"mine {plan.name}", unit=" shard", disable=not (show_progress and rank == 0))
        with bar:
            for group in groups:
                q_emb = torch.cat([
                    _query_embeddings(encoder, tokenizer, plan, output.ranges[k], prompts,
                                      max_length=options.query_max_length, batching=batching)
                    for k in group])  # fmt: skip
                scores, idx = search(q_emb, shards, plan.search_k, method=method, device=where, index=options.index,
                                     params=options.index_params)
                idx_np = idx.numpy()
                cand = np.where(idx_np >= 0, shards.rows[idx_np.clip(min=0)], -1)
                q_np, s_np = q_emb.numpy(), scores.numpy()
                a = 0
                for k in group:
                    sl = slice(a, a + len(output.ranges[k]))
                    a = sl.stop
                    exs, counts = _mine_shard(plan, output.ranges[k], q_np[sl], cand[sl], s_np[sl], shards, options,
                                              encoder, tokenizer, d_prefix, batching, scorer)
                    output.write(k, exs, counts, row_group_rows=options.row_group_rows, seed=options.seed,
                                 split_langs=options.split_langs)
                    written += 1
                    bar.update(1)
    stats = output.finish(name=plan.name, counts=plan.counts, extra={
        "corpus": {"file": plan.corpus_file, "passages": len(plan.corpus_texts)},
        "options": options.fingerprint(), "model_id": model_id, "prompts": {"query": q_prefix, "document": d_prefix}})
    if stats is not None:
        log.info("%s: mining done (%d records, %d shards)\n%s", out, stats["rows"], stats["shards"],
                 format_counts(stats["counts"]))
    pending = len(output.pending()) if stats is None else 0
    return JobResult(out, rank, world, written, skipped, pending, stats is not None, stats)


def _query_embeddings(encoder, tokenizer, plan: MinePlan, rows: range, prompts: PromptPolicy, *, max_length: int,
                      batching: dict) -> torch.Tensor:
    """The queries of ``rows``, each embedded with its own task's query prompt: a record's ``instruction``
    (synthetic instruction data carries one per record) wins over the plan's, as in training
    (``ItemFormatter``)."""
    groups: dict[str, list[int]] = {}
    for j, i in enumerate(rows):
        groups.setdefault(prompts.query(plan.records[i].instruction or plan.instruction), []).append(j)
    parts = {prefix: encode_texts(encoder, tokenizer, [plan.records[rows[j]].query for j in js], prefix=prefix,
                                  max_length=max_length, **batching) for prefix, js in groups.items()}
    if len(parts) == 1:
        return next(iter(parts.values()))
    out = torch.empty(len(rows), next(iter(parts.values())).size(1))
    for prefix, js in groups.items():
        out[torch.tensor(js)] = parts[prefix]
    return out


def _mine_shard(plan: MinePlan, rows: range, q_QD: np.ndarray, cand_QK: np.ndarray, cand_scores_QK: np.ndarray,
                shards: EmbeddingShards, options: MineOptions, encoder, tokenizer, d_prefix: str, batching: dict,
                scorer) -> tuple[list[PairExample], Counter]:
    """The output records of one shard and their counts."""
    records = [plan.records[i] for i in rows]
    pos_rows = plan.positive_rows[rows.start : rows.stop]
    pos_emb = np.empty_like(q_QD)
    have = pos_rows >= 0
    if have.any():
        pos_emb[have] = _gather(shards, pos_rows[have])
    if (~have).any():  # missing_positive="report": the positive is embedded on its own
        texts = [records[i].positive for i in np.flatnonzero(~have)]
        pos_emb[~have] = encode_texts(encoder, tokenizer, texts, prefix=d_prefix,
                                      max_length=options.passage_max_length, **batching).numpy()
    pos_scores = np.einsum("qd,qd->q", q_QD, pos_emb).astype(np.float32)
    exclude = plan.exclude[rows.start : rows.stop]
    teacher = teacher_pos = None
    if scorer is not None:
        teacher_pos = scorer.score([e.query for e in records], [e.positive for e in records])

        def teacher(qi: np.ndarray, kj: np.ndarray) -> np.ndarray:
            return scorer.score([records[i].query for i in qi.tolist()],
                                [plan.corpus_texts[r] for r in cand_QK[qi, kj].tolist()])

    keep = options.own_negatives == "keep"
    own_n = np.array([len(e.negatives) if keep else 0 for e in records], dtype=np.int64)
    need = np.maximum(options.n_negatives - own_n, 0)
    sel = select_negatives(cand_QK, cand_scores_QK, pos_scores, exclude, options,
                           record_ids_Q=np.arange(rows.start, rows.stop), teacher=teacher, teacher_pos_Q=teacher_pos,
                           need_Q=need)
    counts = sel.counts(need)
    counts["records"] += len(records)
    if keep:
        counts["negatives/own"] += int(own_n.sum())
        counts["records/not_mined"] += int((need == 0).sum())  # n_negatives of their own already
    # the excluded rows that are the query's own text or the record's own negatives (not a positive): apart
    query_rows = np.array([plan.row_of.get(e.query, -1) for e in records], dtype=np.int64)
    own_text = sel.excluded & (cand_QK == query_rows[:, None]) & (query_rows[:, None] >= 0)
    if own_text.any():
        counts["excluded/query_text"] += int(own_text.sum())
        counts["excluded/positive"] -= int(own_text.sum())
    if own_n.any():
        own_QM = np.full((len(records), int(own_n.max())), -1, dtype=np.int64)
        for i, e in enumerate(records):
            r = [plan.row_of.get(t, -1) for t in e.negatives]
            own_QM[i, : len(r)] = r
        own_neg = sel.excluded & ~own_text & (cand_QK[:, :, None] == own_QM[:, None, :]).any(axis=2) & (cand_QK >= 0)
        if own_neg.any():
            counts["excluded/own_negative"] += int(own_neg.sum())
            counts["excluded/positive"] -= int(own_neg.sum())
    own_scores = None
    if sel.teacher_QK is not None and own_n.any():  # the re-check's scores cover the record's own negatives too
        qi = np.repeat(np.arange(len(records)), own_n)
        flat = scorer.score([records[i].query for i in qi.tolist()], [t for e in records for t in e.negatives])
        own_scores = np.split(np.asarray(flat, dtype=np.float64), np.cumsum(own_n)[:-1])
    out = []
    for i, ex in enumerate(records):
        cols = np.flatnonzero(sel.chosen[i])
        mined = tuple(plan.corpus_texts[r] for r in cand_QK[i, cols].tolist())
        own_negs = ex.negatives if keep else ()
        scores = ex.teacher_scores if keep and not mined else None  # an unchanged record's own scores still hold
        if sel.teacher_QK is not None:
            own = own_scores[i].tolist() if own_scores is not None else []
            scores = (float(sel.teacher_pos_Q[i]), *own, *(float(s) for s in sel.teacher_QK[i, cols]))
        out.append(replace(ex, negatives=own_negs + mined, teacher_scores=scores))
    return out, counts


def read_source(source, *, strict: bool | None = None) -> tuple[list[PairExample], Counter]:
    """Every kept record of a :class:`~me5.data.source.Source` and the read/skip counts (its classifier's)."""
    source.check()
    classify = source.classifier(strict=strict)
    records, counts = source.load_examples(classify)
    return records, Counter({k: v for k, v in counts.items() if k != "kept"})

