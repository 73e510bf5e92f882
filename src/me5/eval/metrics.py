"""Ranking metrics with ``trec_eval`` semantics (what BEIR, MTEB and the mE5 paper report via pytrec_eval).

``run`` maps query id -> {doc id: score}; ``qrels`` maps query id -> {doc id: graded relevance}. As in
trec_eval:

* documents are ranked by score, descending; ties go to the larger doc id (``strcmp`` order, descending);
* a document is relevant when its grade is > 0, and its gain in DCG is the grade (negative grades count 0);
* DCG uses the ``1 / log2(rank + 1)`` discount; the ideal DCG is built from the qrels' grades, cut at ``k``;
* a query is scored when it is in ``run`` and has at least one judgment in ``qrels``; a query whose judgments
  are all non-relevant scores 0.0 (it is not skipped), a query without judgments is skipped.

The functions return one value per scored query; averaging is the caller's choice.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

Run = Mapping[str, Mapping[str, float]]
Qrels = Mapping[str, Mapping[str, int]]


def _ranked(docs: Mapping[str, float], k: int) -> list[str]:
    """Top-``k`` doc ids in trec_eval order: score descending, then doc id descending."""
    return [d for d, _ in sorted(docs.items(), key=lambda x: (x[1], x[0]), reverse=True)[:k]]


def _scored(run: Run, qrels: Qrels):
    for qid, docs in run.items():
        rels = qrels.get(qid)
        if rels:
            yield qid, docs, rels


def ndcg_at_k(run: Run, qrels: Qrels, k: int = 10) -> dict[str, float]:
    """nDCG@k per query (trec_eval ``ndcg_cut.k``), with graded gains."""
    discount = [1.0 / math.log2(r + 2) for r in range(k)]
    out = {}
    for qid, docs, rels in _scored(run, qrels):
        dcg = sum(max(rels.get(d, 0), 0) * discount[r] for r, d in enumerate(_ranked(docs, k)))
        ideal = sorted((g for g in rels.values() if g > 0), reverse=True)[:k]
        idcg = sum(g * discount[r] for r, g in enumerate(ideal))
        out[qid] = dcg / idcg if idcg > 0 else 0.0
    return out


def recall_at_k(run: Run, qrels: Qrels, k: int = 100) -> dict[str, float]:
    """Recall@k per query (trec_eval ``recall.k``): relevant docs in the top k / all relevant docs."""
    out = {}
    for qid, docs, rels in _scored(run, qrels):
        n_rel = sum(1 for g in rels.values() if g > 0)
        hits = sum(1 for d in _ranked(docs, k) if rels.get(d, 0) > 0)
        out[qid] = hits / n_rel if n_rel else 0.0
    return out


def mrr_at_k(run: Run, qrels: Qrels, k: int = 10) -> dict[str, float]:
    """Reciprocal rank of the first relevant doc within the top k, else 0 (trec_eval ``recip_rank`` cut at k)."""
    out = {}
    for qid, docs, rels in _scored(run, qrels):
        out[qid] = next((1.0 / (r + 1) for r, d in enumerate(_ranked(docs, k)) if rels.get(d, 0) > 0), 0.0)
    return out
