"""Hard-negative mining for stage 2: :func:`mine`, the sharded, resumable driver of ``me5.mine``.

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
   ``[range_min, range_max)`` (:func:`~me5.mining.select.candidate_window`).
3. **Guards** (positive-aware mining, NV-Retriever arXiv 2407.15831; :func:`~me5.mining.select.guard_masks`):
   with ``perc_pos`` a candidate scoring above ``pos - |pos| * (1 - perc_pos)`` (``perc_pos × pos`` for a
   positive score, the "TopK-PercPos" rule; sentence-transformers' ``relative_margin = 1 - perc_pos``) is dropped
   (``dropped/perc_pos``); with ``absolute_margin`` one scoring above ``pos - absolute_margin``
   (``dropped/absolute_margin``). The positive's score is the record's own positive, from the same stored
   corpus embeddings as the candidates.
4. **Sampling** (:func:`~me5.mining.select.pick_order`, :func:`~me5.mining.select.take`): ``top`` takes the
   best-ranked ``n_negatives`` survivors (TopK); ``random`` takes a uniform sample of them, drawn from a hash of
   ``(seed, record index, passage)``, so it does not depend on the sharding, the batch or a resume.
5. **Teacher re-check** (optional, a :class:`~me5.mining.teacher.CrossEncoderScorer`): the picked candidates are
   scored by the cross-encoder; one scoring above the record's positive is dropped (``dropped/teacher``) and the
   next survivor in pick order is tried, until ``n_negatives`` pass or none is left. The records then carry
   these teacher scores (positive first), the ones :mod:`me5.mining.teacher` would write.

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

The output folder (:class:`~me5.mining.output.ShardedOutput`)::

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

import logging
import os
import time
from collections import Counter
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from me5.data.schema import PairExample
from me5.embed.encode import (
    EmbeddingShards,
    corpus_digest,
    encode_corpus,
    encode_texts,
    model_digest,
    shard_rows_of,
    tokenizer_digest,
)
from me5.embed.search import search
from me5.errors import DataError
from me5.mining.options import MineOptions, approximate, check_index
from me5.mining.output import (
    FORMAT,
    JobResult,
    ShardedOutput,
    format_counts,
    records_digest,
    resolve_world,
    run_digest,
)
from me5.mining.plan import MinePlan
from me5.mining.select import select_negatives
from me5.prompts import PromptPolicy

log = logging.getLogger(__name__)


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
        scorer: a :class:`~me5.mining.teacher.CrossEncoderScorer` for the teacher re-check (optional).
        rank, world: this process and the number of processes (:func:`~me5.mining.output.resolve_world`).
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

