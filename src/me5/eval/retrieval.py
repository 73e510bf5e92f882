"""Retrieval evaluation on BEIR-layout data: dense search, nDCG@k / Recall@k per language and macro-averaged.

Layouts read by :func:`load_beir`:

* one dataset: ``DIR/corpus.jsonl`` (``_id``, ``title``, ``text``, optional ``lang``), ``DIR/queries.jsonl``
  (``_id``, ``text``, optional ``lang``) and ``DIR/qrels/{split}.tsv`` (``query-id  corpus-id  score``). The
  whole corpus is searched for every query (cross-lingual retrieval allowed); languages come from the queries'
  ``lang`` field.
* MIRACL style: ``DIR/<lang>/`` folders of the above; each language is searched in its own corpus only.

``corpus.jsonl.gz`` / ``queries.jsonl.gz`` are read in place of the plain files (gzip-compressed BEIR exports).

The evaluator follows unilm's ``mteb_beir_eval.py`` for mE5: passages are ``(title + " " + text).strip()``,
queries and passages get the prompts of the model's :class:`~me5.prompts.PromptPolicy` (E5: ``query: `` /
``passage: ``; instruct: the task's instruction on queries, nothing on passages), and scores are dot products
of the (unit) embeddings, i.e. cosines. The protocol's defaults: 512 tokens on both sides, fp16 autocast on CUDA.

Embedding and search are :mod:`me5.embed`'s (the core that mining and the consistency filter share):
length-sorted token-budget batches (:func:`~me5.embed.encode.encode_texts`), or with ``work_dir`` the corpus
encoded into fp16 shards (:func:`~me5.embed.encode.encode_corpus`: split over the ranks of a distributed job,
resumable) and searched block by block; exact search (torch) or FAISS, ties in trec_eval's order.

With ``work_dir`` and a lazily read per-language folder (``load_beir(..., lazy=True)``, as MIRACL is configured),
each rank reads every line of a language's corpus file but keeps only the text of its own rows (every
``world``-th: :class:`CorpusPart`, :func:`read_corpus_part`), keyed by a digest of the file that hashes no text.
"""

from __future__ import annotations

import hashlib
import logging
import math
from array import array
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from me5.data.readers import iter_jsonl
from me5.distributed import world_info
from me5.embed.encode import (
    PRECISIONS,
    EmbeddingShards,
    RankRows,
    encode_corpus,
    encode_texts,
    is_fsdp_sharded,
)
from me5.embed.search import METHODS, distributed_search, to_run
from me5.embed.search import search as search_topk
from me5.errors import ConfigError, DataError
from me5.eval.metrics import ndcg_at_k, recall_at_k
from me5.prompts import PromptPolicy, task_instruction

log = logging.getLogger(__name__)

UNKNOWN_LANG = "und"  # a query without ``lang`` in a dataset where other queries have one


@dataclass
class CorpusPart:
    """One process's part of a corpus file of ``n`` rows: the rows ``rank, rank + world, ...`` (the ``strided``
    split of :func:`me5.embed.encode.rank_rows`), their ids and passage texts (``(title + " " + text).strip()``),
    and ``digest``, a key of the file that every rank computes alike without hashing any text (its name, size and
    modification time, the row count and every id, in order). Read by :func:`read_corpus_part`."""

    path: Path
    n: int
    rank: int
    world: int
    ids: list[str]
    texts: list[str]
    digest: str

    @property
    def rows(self) -> range:
        return range(self.rank, self.n, self.world)

    def __len__(self) -> int:
        return self.n


@dataclass
class RetrievalData:
    """One retrieval dataset: ``corpus`` {id: {"title", "text", "lang"?}} (or one rank's :class:`CorpusPart` of
    it), ``queries`` {id: {"text", "lang"?}}, ``qrels`` {query id: {doc id: grade}}. ``path`` is where it was read
    from, for messages."""

    corpus: dict[str, dict[str, str]] | CorpusPart
    queries: dict[str, dict[str, str]]
    qrels: dict[str, dict[str, int]]
    path: Path | None = field(default=None, compare=False)

    @property
    def languages(self) -> list[str]:
        """Sorted languages of the queries; empty when no query has a ``lang``."""
        return sorted({q["lang"] for q in self.queries.values() if q.get("lang")})


# ---------------------------------------------------------------------------------------------- loading
def load_beir(data_dir: str | Path, *, split: str = "test", lazy: bool = False
              ) -> RetrievalData | Mapping[str, RetrievalData]:
    """Read a BEIR-layout folder, or a folder of per-language BEIR folders (MIRACL) as {lang: data}.

    Queries without judgments in ``qrels/{split}.tsv`` are dropped (as BEIR does). Judgments that name an
    unknown query or document are dropped with a warning. Malformed input raises :class:`DataError` naming
    the file and line.

    ``lazy`` (per-language folders only): return a :class:`LazyLanguages` mapping that checks every language's
    files now and reads a language only when it is evaluated, so memory holds one corpus at a time (MIRACL's
    16 corpora are 77M passages; English alone 32.9M).
    """
    root = Path(data_dir)
    if not root.is_dir():
        raise DataError("no such data folder", file=str(root))
    if _beir_file(root, "corpus") is not None:
        return _load_one(root, split)
    lang_dirs = sorted(p for p in root.iterdir() if p.is_dir() and _beir_file(p, "corpus") is not None)
    if not lang_dirs:
        raise DataError(
            "not a BEIR folder: no corpus.jsonl in it nor in any per-language subfolder",
            file=str(root / "corpus.jsonl"),
        )
    if lazy:
        return LazyLanguages({p.name: p for p in lang_dirs}, split)
    return {p.name: _load_one(p, split, lang=p.name) for p in lang_dirs}


class LazyLanguages(Mapping):
    """``{lang: RetrievalData}`` of a per-language folder, read on access (not kept): iterating over ``items()``
    holds one language's corpus at a time. Each language's files are checked to exist when it is built."""

    def __init__(self, dirs: Mapping[str, Path], split: str):
        self.dirs, self.split = dict(dirs), split
        for lang, d in self.dirs.items():
            for f in (_beir_file(d, "queries") or d / "queries.jsonl", d / "qrels" / f"{split}.tsv"):
                if not f.is_file():
                    raise DataError(f"no such file (language {lang})", file=str(f))

    def __getitem__(self, lang: str) -> RetrievalData:
        if lang not in self.dirs:
            raise KeyError(lang)
        return _load_one(self.dirs[lang], self.split, lang=lang)

    def load(self, lang: str, *, part: tuple[int, int] | None = None) -> RetrievalData:
        """``self[lang]``, or with ``part=(rank, world)`` its corpus as that rank's :class:`CorpusPart` (the
        queries and judgments whole): what a rank that encodes only its rows needs to hold."""
        if lang not in self.dirs:
            raise KeyError(lang)
        return _load_one(self.dirs[lang], self.split, lang=lang, part=part)

    def __iter__(self):
        return iter(self.dirs)

    def __len__(self) -> int:
        return len(self.dirs)

    def subset(self, langs: Sequence[str]) -> LazyLanguages:
        return LazyLanguages({lang: self.dirs[lang] for lang in langs}, self.split)


def _beir_file(root: Path, stem: str) -> Path | None:
    """``root/<stem>.jsonl``, else ``root/<stem>.jsonl.gz``, else ``None``."""
    return next((f for f in (root / f"{stem}.jsonl", root / f"{stem}.jsonl.gz") if f.is_file()), None)


def _load_one(root: Path, split: str, lang: str | None = None, part: tuple[int, int] | None = None
              ) -> RetrievalData:
    corpus_file = _beir_file(root, "corpus") or root / "corpus.jsonl"
    queries = _read_records(_beir_file(root, "queries") or root / "queries.jsonl", ("text",), lang)
    qrels = _read_qrels(root, split)
    if part is None:
        corpus = present = _read_records(corpus_file, ("title", "text"), lang)
    else:  # the judged documents that exist: all the qrels filter below needs of the rows other ranks hold
        judged = {did for rels in qrels.values() for did in rels}
        corpus, present = read_corpus_part(corpus_file, rank=part[0], world=part[1], judged=judged)

    unknown_q = unknown_d = 0
    kept: dict[str, dict[str, int]] = {}
    for qid, rels in qrels.items():
        if qid not in queries:
            unknown_q += len(rels)
            continue
        known = {did: g for did, g in rels.items() if did in present}
        unknown_d += len(rels) - len(known)
        if known:
            kept[qid] = known
    qrels_file = root / "qrels" / f"{split}.tsv"
    if unknown_q or unknown_d:
        log.warning(
            "%s: dropped %d judgments of unknown queries and %d of unknown documents",
            qrels_file,
            unknown_q,
            unknown_d,
        )
    if not kept:
        raise DataError("no judgment names a known query and document", file=str(qrels_file))
    no_rel = sum(1 for rels in kept.values() if not any(g > 0 for g in rels.values()))
    if no_rel:
        log.warning(
            "%s: %d queries have no relevant document; they score 0 (as in trec_eval)", qrels_file, no_rel
        )
    queries = {qid: queries[qid] for qid in kept}
    return RetrievalData(corpus=corpus, queries=queries, qrels=kept, path=root)


def _read_records(path: Path, fields: Sequence[str], lang: str | None) -> dict[str, dict[str, str]]:
    """{_id: {field: str, "lang"?}} from a jsonl file; ``title`` may be absent or null, ``text`` may not."""
    out: dict[str, dict[str, str]] = {}
    for line_no, rec in iter_jsonl(path):
        rid, row = _record(rec, fields, path, line_no)
        rec_lang = rec.get("lang") or lang
        if rec_lang:
            row["lang"] = str(rec_lang)
        if rid in out:
            raise DataError(f"duplicate _id '{rid}'", file=str(path), line=line_no, field="_id")
        out[rid] = row
    return out


def _record(rec: dict, fields: Sequence[str], path: Path, line_no: int) -> tuple[str, dict[str, str]]:
    """``(_id, {field: str})`` of one jsonl record, checked (file:line:field named)."""
    if "_id" not in rec:
        raise DataError("missing '_id'", file=str(path), line=line_no, field="_id")
    row = {}
    for name in fields:
        value = rec.get(name)
        if value is None and name == "title":
            value = ""
        if not isinstance(value, str):
            what = "missing" if value is None else f"expected a string, got {type(value).__name__}"
            raise DataError(what, file=str(path), line=line_no, field=name)
        row[name] = value
    return str(rec["_id"]), row


def read_corpus_part(path: str | Path, *, rank: int, world: int, judged: Iterable[str] = ()
                     ) -> tuple[CorpusPart, set[str]]:
    """Rank ``rank`` of ``world``'s :class:`CorpusPart` of a BEIR ``corpus.jsonl(.gz)``, and which of the
    ``judged`` doc ids the whole file holds.

    Every rank reads (and checks) every line, as :func:`load_beir` does, but keeps the text of its own rows only:
    memory is this rank's ids and texts, plus 8 bytes a row (a hash of each id, for the duplicate check) and
    the judged ids found. The ``digest`` hashes the file's name, size and modification time and the ids, not the
    texts: the same on every rank of a shared file system, and it changes when the file is rewritten.
    """
    path = Path(path)
    if not 0 <= rank < world:
        raise ConfigError("eval.rank", f"rank {rank} is not in [0, {world})")
    judged = set(judged)
    stat = path.stat()
    digest = hashlib.blake2b(digest_size=16)
    digest.update(f"{path.name};{stat.st_size};{stat.st_mtime_ns};".encode())
    ids: list[str] = []
    texts: list[str] = []
    found: set[str] = set()
    id_hashes = array("q")
    pending: list[str] = []
    n = 0
    for line_no, rec in iter_jsonl(path):
        rid, row = _record(rec, ("title", "text"), path, line_no)
        id_hashes.append(hash(rid))
        pending.append(rid)
        if len(pending) >= 65536:
            digest.update("\x00".join(pending).encode("utf-8", "surrogatepass") + b"\x01")
            pending = []
        if rid in judged:
            found.add(rid)
        if n % world == rank:
            ids.append(rid)
            texts.append((row["title"] + " " + row["text"]).strip())
        n += 1
    digest.update("\x00".join(pending).encode("utf-8", "surrogatepass") + b"\x01" + f"{n}".encode())
    _check_unique_ids(path, id_hashes)
    return CorpusPart(path, n, rank, world, ids, texts, digest.hexdigest()), found


def _check_unique_ids(path: Path, id_hashes: array) -> None:
    """A :class:`DataError` at the second line of a repeated ``_id``; ids whose hashes collide are compared by a
    second read of those lines only."""
    hashes = np.frombuffer(id_hashes, dtype=np.int64) if len(id_hashes) else np.zeros(0, dtype=np.int64)
    values, counts = np.unique(hashes, return_counts=True)
    clashing = set(values[counts > 1].tolist())
    if not clashing:
        return
    seen: set[str] = set()
    for line_no, rec in iter_jsonl(path):
        rid = str(rec["_id"])
        if hash(rid) in clashing:
            if rid in seen:
                raise DataError(f"duplicate _id '{rid}'", file=str(path), line=line_no, field="_id")
            seen.add(rid)


def _read_qrels(root: Path, split: str) -> dict[str, dict[str, int]]:
    path = root / "qrels" / f"{split}.tsv"
    if not path.is_file():
        have = sorted(p.stem for p in (root / "qrels").glob("*.tsv"))
        hint = f" (splits here: {', '.join(have)})" if have else ""
        raise DataError(f"no such qrels file{hint}", file=str(path))
    qrels: dict[str, dict[str, int]] = defaultdict(dict)
    with path.open("rb") as fh:
        for line_no, raw in enumerate(fh, start=1):
            try:
                line = raw.decode("utf-8-sig").rstrip("\r\n")
            except UnicodeDecodeError as err:
                raise DataError(f"not valid UTF-8 ({err.reason})", file=str(path), line=line_no) from None
            if not line.strip():
                continue
            cols = line.split("\t")
            if line_no == 1 and cols[0].strip().lower() in {"query-id", "query_id", "qid"}:
                continue  # header
            if len(cols) != 3:
                raise DataError(
                    f"expected 3 tab-separated columns (query-id, corpus-id, score), got {len(cols)}",
                    file=str(path),
                    line=line_no,
                )
            qid, did, score = (c.strip() for c in cols)
            try:
                qrels[qid][did] = int(score)
            except ValueError:
                raise DataError(f"score '{score}' is not an integer", file=str(path), line=line_no) from None
    return dict(qrels)


# ---------------------------------------------------------------------------------------------- evaluator
class RetrievalEvaluator:
    """Embeds a corpus and its queries with an :class:`~me5.models.encoder.Encoder` and scores dense search.

    Args:
        data: one dataset (searched as a whole; per-language metrics from the queries' ``lang``) or
            {lang: dataset} (each searched in its own corpus).
        name: prefix of the metric keys (``{name}/ndcg@10``, ``{name}/{lang}/ndcg@10``).
        prompts: the model's :class:`~me5.prompts.PromptPolicy` (required; E5's: ``query: `` / ``passage: ``).
        task: the task's name in :data:`me5.prompts.TASKS` (its instruction, for the instruct policy).
        symmetric: documents are the same kind of text as queries (both get the query prompt; e.g. Quora).
        query_max_length, passage_max_length: truncation in tokens (512: the recipe's protocol; configs may
            lower them, e.g. the sample set's 64 / 128).
        batch_size: the most texts in one encoding batch.
        max_tokens: the most padded tokens in one batch (``None``: ``batch_size`` rows of the side's max length).
        precision: ``fp16`` (the protocol's), ``bf16`` or ``fp32``: the autocast dtype on CUDA (CPU runs fp32).
        search: ``exact`` (blockwise torch, on the encoder's device) or ``faiss``.
        faiss_index, faiss_params: the faiss index-factory string (``Flat``: exact) and its search parameters
            (``nprobe=64``), for ``search="faiss"``.
        work_dir: encode each corpus into fp16 shards under ``work_dir/<name>/<lang or all>`` (split over the
            ranks of a torch.distributed job, resumable, memory bounded by a shard) instead of in memory; a
            folder of an earlier model is replaced. A lazily read per-language folder is then read in parts: a
            rank holds its rows' text only (see the module docstring). Every rank calls :meth:`evaluate`
            (``shares_ranks``); without ``work_dir`` one rank can evaluate alone.
        shard_rows: rows per shard with ``work_dir``.
        k_values: cut-offs; nDCG@k and Recall@k are reported for each, and ``max(k_values)`` docs are retrieved.
        languages: evaluate only these languages (``None``: all).

    The encoder is an ``nn.Module`` called as ``encoder(input_ids, attention_mask)`` (with a tokenizer); any other
    object (or a module without ``forward``) is used through its ``encode(texts, tokenizer, prefix=, max_length=,
    batch_size=, device=, show_progress=, desc=)`` method, in memory.
    """

    def __init__(
        self,
        data: RetrievalData | Mapping[str, RetrievalData],
        *,
        name: str = "sample",
        prompts: PromptPolicy,
        task: str = "generic",
        symmetric: bool = False,
        query_max_length: int = 512,
        passage_max_length: int = 512,
        batch_size: int = 128,
        max_tokens: int | None = None,
        precision: str = "fp16",
        search: str = "exact",
        faiss_index: str = "Flat",
        faiss_params: str | None = None,
        work_dir: str | Path | None = None,
        shard_rows: int = 65536,
        k_values: Sequence[int] = (10, 100),
        languages: Sequence[str] | None = None,
    ):
        if not k_values or any(int(k) < 1 for k in k_values):
            raise ConfigError("eval.k_values", f"need positive cut-offs, got {list(k_values)}")
        if search not in METHODS:
            raise ConfigError("eval.search", f"unknown search '{search}'; choose one of {list(METHODS)}")
        if precision not in PRECISIONS:
            raise ConfigError("eval.precision", f"unknown '{precision}'; choose one of {sorted(PRECISIONS)}")
        if batch_size < 1 or (max_tokens is not None and max_tokens < 1):
            raise ConfigError("eval.batch_size", f"need positive sizes, got {batch_size} rows, {max_tokens} tokens")
        self.name = name
        self.prompts = prompts
        self.task = task
        self.query_prefix, self.passage_prefix = self.prompts.pair(task_instruction(task), symmetric=symmetric)
        self.query_max_length, self.passage_max_length = query_max_length, passage_max_length
        self.batch_size, self.max_tokens, self.precision = batch_size, max_tokens, precision
        self.search, self.faiss_index, self.faiss_params = search, faiss_index, faiss_params
        self.work_dir = Path(work_dir) if work_dir is not None else None
        self.shard_rows = shard_rows
        self.k_values = tuple(sorted({int(k) for k in k_values}))
        self.languages = list(languages) if languages is not None else None
        self.data = self._select(data)

    @classmethod
    def from_path(cls, data_dir: str | Path, *, split: str = "test", **kwargs) -> RetrievalEvaluator:
        """Build from a BEIR / MIRACL folder (see :func:`load_beir`)."""
        return cls(load_beir(data_dir, split=split), **kwargs)

    def _select(self, data):
        if isinstance(data, RetrievalData):
            if self.languages is None:
                return data
            missing = set(self.languages) - set(data.languages)
            if missing:
                raise ConfigError(
                    "eval.languages", f"no queries in {sorted(missing)}; the data has {data.languages}"
                )
            keep = set(self.languages)
            queries = {q: v for q, v in data.queries.items() if v.get("lang") in keep}
            return RetrievalData(
                data.corpus, queries, {q: data.qrels[q] for q in queries if q in data.qrels}, data.path
            )
        if self.languages is None:
            return data
        missing = set(self.languages) - set(data)
        if missing:
            raise ConfigError("eval.languages", f"no data for {sorted(missing)}; have {sorted(data)}")
        if isinstance(data, LazyLanguages):
            return data.subset(self.languages)
        return {lang: data[lang] for lang in self.languages}

    @torch.no_grad()
    def evaluate(self, encoder, tokenizer, *, device=None, show_progress: bool = False) -> dict[str, float]:
        """Flat metrics: ``{name}/ndcg@k``, ``{name}/recall@k`` (macro over languages) and per-language keys.

        Without languages in the data the aggregate is the mean over queries and no per-language key is added.
        """
        if device is None:  # search where the encoder lives (encode returns CPU tensors)
            param = next(iter(encoder.parameters()), None) if hasattr(encoder, "parameters") else None
            device = param.device if param is not None else torch.device("cpu")
        per_query: dict[str, dict[str, float]] = defaultdict(dict)  # metric -> {qid: value}
        lang_of: dict[str, str | None] = {}
        for part_lang, data in self._parts(encoder, tokenizer):
            run = self._run(data, encoder, tokenizer, device, show_progress, desc=part_lang or self.name,
                            part=part_lang)
            for k in self.k_values:
                for metric, fn in (("ndcg", ndcg_at_k), ("recall", recall_at_k)):
                    values = fn(run, data.qrels, k)
                    per_query[f"{metric}@{k}"].update({_uid(part_lang, q): v for q, v in values.items()})
            has_lang = part_lang is not None or bool(data.languages)
            for qid, q in data.queries.items():
                lang_of[_uid(part_lang, qid)] = (
                    (part_lang or q.get("lang") or UNKNOWN_LANG) if has_lang else None
                )
        return self._aggregate(per_query, lang_of)

    @property
    def shares_ranks(self) -> bool:
        """Whether every rank of a distributed job takes part in :meth:`evaluate` (each encodes and searches its
        part of the corpus: ``work_dir``), rather than one rank evaluating alone."""
        return self.work_dir is not None

    def _on_disk(self, encoder, tokenizer) -> bool:
        return self.work_dir is not None and _forward_encoder(encoder, tokenizer) and not is_fsdp_sharded(encoder)

    def _parts(self, encoder, tokenizer) -> Iterable[tuple[str | None, RetrievalData]]:
        """``(language or None, data)`` to evaluate in turn; a lazily read per-language folder encoded under
        ``work_dir`` is read as this rank's :class:`CorpusPart` of each corpus (a rank holds its rows' text only)."""
        if not isinstance(self.data, Mapping):
            return [(None, self.data)]
        if isinstance(self.data, LazyLanguages) and self._on_disk(encoder, tokenizer):
            rank, world = world_info()
            return ((lang, self.data.load(lang, part=(rank, world))) for lang in self.data)
        return self.data.items()

    def _run(
        self, data: RetrievalData, encoder, tokenizer, device, show_progress, desc, part: str | None = None
    ) -> dict[str, dict[str, float]]:
        q_ids = [q for q in data.queries if data.qrels.get(q)]
        q_texts = [data.queries[q]["text"] for q in q_ids]
        if isinstance(data.corpus, CorpusPart):  # read so only for an encoder that runs here (see _parts)
            docs, doc_ids = self._encode_part(encoder, tokenizer, data.corpus, device, show_progress, desc, part)
        else:
            doc_ids = list(data.corpus)
            doc_texts = [(d["title"] + " " + d["text"]).strip() for d in data.corpus.values()]
            if not _forward_encoder(encoder, tokenizer):  # an embedder with its own encode (test doubles, others)
                common = {"batch_size": self.batch_size, "device": device, "show_progress": show_progress}
                docs = encoder.encode(
                    doc_texts, tokenizer, prefix=self.passage_prefix, max_length=self.passage_max_length,
                    desc=f"{desc} corpus", **common,
                )  # fmt: skip
                queries = encoder.encode(
                    q_texts, tokenizer, prefix=self.query_prefix, max_length=self.query_max_length,
                    desc=f"{desc} queries", **common,
                )  # fmt: skip
                return self._search(queries, docs, doc_ids, q_ids, device)
            docs, doc_ids = self._encode_corpus(encoder, tokenizer, doc_ids, doc_texts, device, show_progress, desc,
                                                part)
        queries = encode_texts(
            encoder, tokenizer, q_texts, prefix=self.query_prefix, max_length=self.query_max_length,
            desc=f"{desc} queries", **self._batching(device, show_progress),
        )  # fmt: skip
        return self._search(queries, docs, doc_ids, q_ids, device)

    def _search(self, queries, docs, doc_ids, q_ids, device) -> dict[str, dict[str, float]]:
        # a sharded corpus is searched by every rank, each its part, and merged: no rank waits for another
        find = distributed_search if isinstance(docs, EmbeddingShards) else search_topk
        scores, idx = find(
            queries, docs, max(self.k_values), method=self.search, doc_ids=doc_ids, device=device,
            index=self.faiss_index, params=self.faiss_params,
        )  # fmt: skip
        return to_run(q_ids, doc_ids, scores, idx)

    def _batching(self, device, show_progress) -> dict:
        return {"max_tokens": self.max_tokens, "max_batch": self.batch_size, "precision": self.precision,
                "device": device, "show_progress": show_progress}

    def _folder(self, part: str | None) -> Path:
        return self.work_dir / self.name.replace("/", "_") / (part or "all")

    def _encode_part(self, encoder, tokenizer, corpus: CorpusPart, device, show_progress, desc, part):
        """This rank's rows of ``corpus`` into the shards (``strided``: the rows it read), then every rank's."""
        folder = self._folder(part)
        encode_corpus(encoder, tokenizer, RankRows(corpus.n, corpus.rows, corpus.ids),
                      RankRows(corpus.n, corpus.rows, corpus.texts), folder, corpus_key=corpus.digest,
                      rank=corpus.rank, world=corpus.world, split="strided", shard_rows=self.shard_rows,
                      overwrite=True, prefix=self.passage_prefix, max_length=self.passage_max_length,
                      desc=f"{desc} corpus", **self._batching(device, show_progress))
        shards = EmbeddingShards(folder)
        return shards, shards.ids

    def _encode_corpus(self, encoder, tokenizer, doc_ids, doc_texts, device, show_progress, desc, part):
        """(embeddings or shards, their doc ids): in memory, or sharded under ``work_dir`` (not for an
        FSDP-sharded encoder, whose forwards must be the same on every rank)."""
        common = {"prefix": self.passage_prefix, "max_length": self.passage_max_length, "desc": f"{desc} corpus",
                  **self._batching(device, show_progress)}
        if self.work_dir is not None and is_fsdp_sharded(encoder):
            log.warning("%s: FSDP-sharded encoder; encoding the corpus in memory, not under %s", self.name,
                        self.work_dir)
        elif self.work_dir is not None:
            folder = self._folder(part)
            encode_corpus(encoder, tokenizer, doc_ids, doc_texts, folder, shard_rows=self.shard_rows,
                          overwrite=True, **common)
            shards = EmbeddingShards(folder)
            return shards, shards.ids
        return encode_texts(encoder, tokenizer, doc_texts, **common), doc_ids

    def _aggregate(self, per_query, lang_of) -> dict[str, float]:
        out: dict[str, float] = {}
        for metric, values in per_query.items():
            by_lang: dict[str | None, list[float]] = defaultdict(list)
            for uid, v in values.items():
                by_lang[lang_of[uid]].append(v)
            if set(by_lang) <= {None}:
                out[f"{self.name}/{metric}"] = _mean(by_lang[None])
                continue
            lang_means = {lang: _mean(vs) for lang, vs in sorted(by_lang.items())}
            out[f"{self.name}/{metric}"] = _mean(lang_means.values())
            for lang, m in lang_means.items():
                out[f"{self.name}/{lang}/{metric}"] = m
        return out


def _forward_encoder(encoder, tokenizer) -> bool:
    """Whether to embed through :mod:`me5.embed` (a module with its own ``forward`` and a tokenizer), else
    through the object's ``encode`` method."""
    has_forward = isinstance(encoder, torch.nn.Module) and type(encoder).forward is not torch.nn.Module.forward
    return has_forward and (tokenizer is not None or not hasattr(encoder, "encode"))


def _uid(part: str | None, qid: str) -> str:
    return qid if part is None else f"{part}\x00{qid}"


def _mean(values: Iterable[float]) -> float:
    values = list(values)
    return float(sum(values) / len(values)) if values else float("nan")


# ---------------------------------------------------------------------------------------------- table
def format_table(
    rows: Mapping[str, Mapping[str, float]], *, metrics: Sequence[str] = ("ndcg@10", "recall@100")
) -> str:
    """Markdown tables (one per dataset and metric) of metric dicts as returned by :meth:`RetrievalEvaluator.evaluate`.

    ``rows`` maps a row label (``untrained``, ``pretrain``, ``finetune``) to its metrics; columns are the macro
    average (``avg``) then each language; values are x100 with one decimal, ``-`` where a row lacks one.
    """
    # (dataset, metric) -> {column: {row: value}}
    tables: dict[tuple[str, str], dict[str, dict[str, float]]] = defaultdict(lambda: defaultdict(dict))
    for row, values in rows.items():
        for key, value in values.items():
            parts = key.split("/")
            if parts[-1] not in metrics:
                continue
            if len(parts) >= 3:
                dataset, column = "/".join(parts[:-2]), parts[-2]
            else:
                dataset, column = "/".join(parts[:-1]), "avg"
            tables[(dataset, parts[-1])][column][row] = value
    blocks = []
    order = {m: i for i, m in enumerate(metrics)}
    for (dataset, metric), cols in sorted(tables.items(), key=lambda t: (t[0][0], order[t[0][1]])):
        columns = (["avg"] if "avg" in cols else []) + sorted(c for c in cols if c != "avg")
        title = f"{dataset} {metric}".strip()
        header = [title, *columns]
        body = [[row, *(_cell(cols[c].get(row)) for c in columns)] for row in rows]
        widths = [max(len(r[i]) for r in [header, *body]) for i in range(len(header))]
        lines = [
            "| "
            + " | ".join(h.ljust(widths[0]) if i == 0 else h.rjust(widths[i]) for i, h in enumerate(header))
            + " |",
            "|"
            + "|".join("-" * (widths[0] + 2) if i == 0 else "-" * (w + 1) + ":" for i, w in enumerate(widths))
            + "|",
        ]
        for r in body:
            lines.append(
                "| "
                + " | ".join(c.ljust(widths[0]) if i == 0 else c.rjust(widths[i]) for i, c in enumerate(r))
                + " |"
            )
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)


def _cell(value: float | None) -> str:
    return "-" if value is None or math.isnan(value) else f"{100 * value:.1f}"
