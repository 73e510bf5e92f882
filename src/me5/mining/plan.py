"""The records and corpus of one mining job, checked before any model is loaded: :func:`plan_mining` builds the
:class:`MinePlan` (the corpus, each record's positive row and excluded rows); :func:`read_corpus_file` reads a
BEIR-style corpus file, :func:`source_corpus` the default corpus, :func:`read_source` a source's records.
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from me5.data.readers import iter_records
from me5.data.schema import PairExample
from me5.data.sources.layouts import NO_TITLE
from me5.errors import ConfigError, DataError
from me5.mining.options import MineOptions

log = logging.getLogger(__name__)

ID_FIELDS = ("_id", "id", "docid")


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



def read_source(source, *, strict: bool | None = None) -> tuple[list[PairExample], Counter]:
    """Every kept record of a :class:`~me5.data.source.Source` and the read/skip counts (its classifier's)."""
    source.check()
    classify = source.classifier(strict=strict)
    records, counts = source.load_examples(classify)
    return records, Counter({k: v for k, v in counts.items() if k != "kept"})

