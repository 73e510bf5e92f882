"""Top-k search by inner product over a corpus of embeddings: exact in blocks (torch) or with FAISS.

Evaluation, mining and the consistency filter share it. Both paths take the corpus as one matrix (a tensor or
array, ``(N, D)``) or as a block source such as :class:`~me5.embed.encode.EmbeddingShards` (``.blocks()``
yielding ``(offset, block)`` and ``.ids``), and return CPU ``(scores, indices)`` of shape ``(Q, k)``: scores
float32 descending, indices into the corpus order (``-1`` where an approximate index found fewer than ``k``).

Ties. Equal scores are ordered as trec_eval orders them (``form_res_rels.c``: score descending, then doc id
descending by ``strcmp``; checked against pytrec_eval in tests/test_embed.py), when doc ids are given; without
ids the lower corpus index comes first. The top-k is therefore the head of the ranking that pytrec_eval builds
from *all* scores: a tie across the ``k``-th place keeps the docs trec_eval would keep, and metrics computed from
the top-k (``me5.eval.metrics``) equal pytrec_eval's on the full run. The order is exact: each block's top-k
is cut by ``torch.topk`` on the scores, and only the queries whose ``k``-th and ``k+1``-th scores tie are re-cut
by a composite key (the score's order-preserving integer bits, then the tie preference) over the whole block.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator, Sequence

import numpy as np
import torch
from torch import Tensor

from me5.errors import ConfigError

log = logging.getLogger(__name__)

METHODS = ("exact", "faiss")
_NO_DOC = torch.iinfo(torch.int64).min
_PREF_MAX = 2**32 - 1
_FAISS_GPU_MAX_K = 2048  # faiss' GPU k-selection limit


# ---------------------------------------------------------------------------------------------- tie order
def tie_preference(doc_ids: Sequence[str]) -> Tensor:
    """(N,) int64: each doc id's rank in ascending string order; among equal scores the larger rank comes first
    (the larger doc id, as trec_eval). Equal ids (not expected) prefer the later corpus row."""
    order = sorted(range(len(doc_ids)), key=lambda i: str(doc_ids[i]))
    pref = torch.empty(len(doc_ids), dtype=torch.long)
    pref[torch.tensor(order, dtype=torch.long)] = torch.arange(len(doc_ids), dtype=torch.long)
    return pref


def _sortable(scores: Tensor) -> Tensor:
    """int64 keys that order like the float32 scores (-0.0 counts as 0.0)."""
    bits = (scores.to(torch.float32) + 0.0).contiguous().view(torch.int32)
    return (bits ^ ((bits >> 31) & 0x7FFFFFFF)).to(torch.int64)


def _codes(scores: Tensor, idx: Tensor, pref: Tensor | None) -> Tensor:
    """One int64 per candidate ordering (score desc, tie preference desc); ``idx < 0`` (no doc) sorts last."""
    safe = idx.clamp(min=0)
    p = pref[safe] if pref is not None else _PREF_MAX - safe
    return ((_sortable(scores) << 32) | p).masked_fill(idx < 0, _NO_DOC)


class _TopK:
    """The running top-k of ``n_q`` queries, merged block by block under the tie order."""

    def __init__(self, n_q: int, k: int, device, pref: Tensor | None):
        self.k, self.pref = k, pref
        self.codes = torch.full((n_q, k), _NO_DOC, dtype=torch.long, device=device)
        self.idx = torch.full((n_q, k), -1, dtype=torch.long, device=device)
        self.scores = torch.full((n_q, k), -math.inf, dtype=torch.float32, device=device)

    def add(self, q0: int, scores: Tensor, idx: Tensor) -> None:
        q1 = q0 + scores.size(0)
        codes = torch.cat([self.codes[q0:q1], _codes(scores, idx, self.pref)], dim=1)
        all_i = torch.cat([self.idx[q0:q1], idx], dim=1)
        all_s = torch.cat([self.scores[q0:q1], scores.to(torch.float32) + 0.0], dim=1)
        top, pos = codes.topk(self.k, dim=1)
        self.codes[q0:q1] = top
        self.idx[q0:q1] = all_i.gather(1, pos)
        self.scores[q0:q1] = all_s.gather(1, pos)

    def result(self) -> tuple[Tensor, Tensor]:
        return self.scores.cpu(), self.idx.cpu()


def _block_candidates(s: Tensor, k: int, offset: int, pref: Tensor | None) -> tuple[Tensor, Tensor]:
    """The exact top-``min(k, n)`` of one block's scores ``s`` (b, n) under the tie order; global indices."""
    b, n = s.shape
    s = s + 0.0
    if n <= k:
        return s, torch.arange(offset, offset + n, device=s.device).expand(b, n)
    top_s, top_i = s.topk(k + 1, dim=1)
    cand_s, cand_i = top_s[:, :k].clone(), top_i[:, :k] + offset
    tied = top_s[:, k] == top_s[:, k - 1]  # the k-th place is shared: topk's pick among the tied is arbitrary
    if bool(tied.any()):
        rows = tied.nonzero().squeeze(1)
        sub = s[rows]
        glob = torch.arange(offset, offset + n, device=s.device).expand_as(sub)
        _, pos = _codes(sub, glob, pref).topk(k, dim=1)
        cand_s[rows] = sub.gather(1, pos)
        cand_i[rows] = pos + offset
    return cand_s, cand_i


# ---------------------------------------------------------------------------------------------- corpus access
def _is_source(docs) -> bool:
    return hasattr(docs, "blocks") and hasattr(docs, "ids")


def _n_docs(docs) -> int:
    return len(docs) if _is_source(docs) else int(docs.shape[0])


def _dim(docs) -> int:
    return int(docs.dim) if _is_source(docs) else int(docs.shape[1])


def _doc_ids(docs, doc_ids):
    if doc_ids is not None:
        if len(doc_ids) != _n_docs(docs):
            raise ValueError(f"{len(doc_ids)} doc ids for {_n_docs(docs)} docs")
        return doc_ids
    return docs.ids if _is_source(docs) else None


def _iter_blocks(docs, doc_block: int) -> Iterator[tuple[int, Tensor | np.ndarray]]:
    if _is_source(docs):
        for offset, block in docs.blocks():
            for j in range(0, len(block), doc_block):
                yield offset + j, block[j : j + doc_block]
        return
    for d0 in range(0, _n_docs(docs), doc_block):
        yield d0, docs[d0 : d0 + doc_block]


def _as_tensor(x) -> Tensor:
    return x if isinstance(x, Tensor) else torch.from_numpy(np.asarray(x))


def _as_numpy(x) -> np.ndarray:
    if isinstance(x, Tensor):
        x = x.detach().to("cpu", torch.float32).numpy()
    return np.ascontiguousarray(x, dtype=np.float32)


def _empty(n_q: int) -> tuple[Tensor, Tensor]:
    return torch.zeros(n_q, 0), torch.zeros(n_q, 0, dtype=torch.long)


# ---------------------------------------------------------------------------------------------- exact
@torch.no_grad()
def exact_search(
    queries_QD,
    docs_ND,
    k: int,
    *,
    doc_ids: Sequence[str] | None = None,
    device: torch.device | str | None = None,
    query_block: int = 1024,
    doc_block: int = 65536,
) -> tuple[Tensor, Tensor]:
    """Top-``k`` docs per query by dot product, scanning the corpus in blocks; CPU ``(scores, indices)`` (Q, k).

    ``docs_ND``: a matrix or a block source (see the module docstring); ``k`` is capped at the corpus size.
    Memory on ``device`` (default: the queries') is bounded by ``query_block * doc_block`` scores plus the running
    top-k. Ties: trec_eval's order by ``doc_ids`` (default: the source's ids), else the lower index first.
    """
    q_all = _as_tensor(queries_QD)
    device = torch.device(device) if device is not None else q_all.device
    q_all = q_all.to(device, torch.float32)
    n_q, k = q_all.size(0), min(int(k), _n_docs(docs_ND))
    if k <= 0:
        return _empty(n_q)
    ids = _doc_ids(docs_ND, doc_ids)
    pref = tie_preference(ids).to(device) if ids is not None else None
    top = _TopK(n_q, k, device, pref)
    for d0, block in _iter_blocks(docs_ND, doc_block):
        d_blk = _as_tensor(block).to(device, torch.float32)
        for q0 in range(0, n_q, query_block):
            scores = q_all[q0 : q0 + query_block] @ d_blk.T
            top.add(q0, *_block_candidates(scores, k, d0, pref))
    return top.result()


# ---------------------------------------------------------------------------------------------- faiss
def import_faiss():
    """The ``faiss`` module; its absence is a :class:`ConfigError` saying what to install."""
    try:
        import faiss
    except ImportError as err:
        raise ConfigError("eval.search", "search 'faiss' needs the faiss package (pip install faiss-cpu, or "
                          "faiss-gpu for GPU indexes)") from err
    return faiss


def faiss_gpu_available(faiss=None) -> bool:
    """Whether faiss was built with GPU support and sees a GPU, and torch sees a CUDA device."""
    faiss = faiss or import_faiss()
    return bool(hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0 and torch.cuda.is_available())


def _gpu_resources(faiss, use_gpu: bool | None):
    available = faiss_gpu_available(faiss)
    if use_gpu and not available:
        raise ConfigError("eval.faiss_gpu", "no faiss GPU here (faiss without GPU support, or no CUDA device)")
    return faiss.StandardGpuResources() if (available if use_gpu is None else use_gpu) else None


def _to_gpu(faiss, index, res):
    if res is None:
        return index
    try:
        return faiss.index_cpu_to_gpu(res, torch.cuda.current_device(), index)
    except Exception as err:  # noqa: BLE001 -- e.g. HNSW has no GPU version: search on the CPU
        log.warning("faiss: %s stays on the CPU (%s)", type(index).__name__, err)
        return index


def faiss_search(
    queries_QD,
    docs_ND,
    k: int,
    *,
    doc_ids: Sequence[str] | None = None,
    index: str = "Flat",
    params: str | None = None,
    use_gpu: bool | None = None,
    doc_block: int = 65536,
    train_rows: int = 262144,
) -> tuple[Tensor, Tensor]:
    """Top-``k`` by inner product with FAISS; the same arguments and result as :func:`exact_search`.

    ``index``: a faiss index-factory string. ``Flat`` (the default) is exact: an ``IndexFlatIP`` holds one block
    at a time (memory bounded by a block), each block's top-(k+1) is searched, the queries whose k-th place is
    tied are re-cut exactly, and the blocks are merged under the tie order -- the result equals
    :func:`exact_search`. Any other string (``IVF4096,Flat``, ``HNSW32``, ``IVF16384,PQ64``) builds one
    approximate inner-product index over the whole corpus, trained on its first ``train_rows`` rows when the
    index needs training; ``params`` sets search-time parameters (``nprobe=64``, ``efSearch=128``); ties are
    ordered within what it returns. ``use_gpu``: ``None`` puts the index on the GPU when faiss has GPU support
    and a CUDA device is present (``True`` requires it, ``False`` never).
    """
    faiss = import_faiss()
    q = _as_numpy(queries_QD)
    n_q, n, dim = q.shape[0], _n_docs(docs_ND), _dim(docs_ND)
    k = min(int(k), n)
    if k <= 0:
        return _empty(n_q)
    ids = _doc_ids(docs_ND, doc_ids)
    pref = tie_preference(ids) if ids is not None else None
    top = _TopK(n_q, k, "cpu", pref)
    res = _gpu_resources(faiss, use_gpu)
    if index.replace(" ", "") == "Flat":
        if res is not None and k + 1 > _FAISS_GPU_MAX_K:
            log.warning("faiss: k=%d is above the GPU limit of %d; searching on the CPU", k, _FAISS_GPU_MAX_K)
            res = None
        flat = _to_gpu(faiss, faiss.IndexFlatIP(dim), res)
        for d0, block in _iter_blocks(docs_ND, doc_block):
            blk = _as_numpy(block)
            flat.reset()
            flat.add(blk)
            nb = blk.shape[0]
            kk = min(k, nb)
            dist_, lab = flat.search(q, min(kk + 1, nb))
            s, i = torch.from_numpy(dist_), torch.from_numpy(lab)
            cand_s, cand_i = s[:, :kk].clone(), i[:, :kk] + d0
            if nb > kk:
                tied = (s[:, kk] == s[:, kk - 1]).nonzero().squeeze(1)
                if tied.numel():
                    sub = torch.from_numpy(q[tied.numpy()]) @ torch.from_numpy(blk).T
                    cand_s[tied], cand_i[tied] = _block_candidates(sub, kk, d0, pref)
            top.add(0, cand_s, cand_i)
        return top.result()

    built = faiss.index_factory(dim, index, faiss.METRIC_INNER_PRODUCT)
    if not built.is_trained:
        sample, have = [], 0
        for _, block in _iter_blocks(docs_ND, doc_block):
            sample.append(_as_numpy(block)[: train_rows - have])
            have += len(sample[-1])
            if have >= train_rows:
                break
        built.train(np.concatenate(sample))
    built = _to_gpu(faiss, built, res)
    labels = []  # faiss numbers vectors in the order added; map back to corpus rows (a part skips some)
    for d0, block in _iter_blocks(docs_ND, doc_block):
        blk = _as_numpy(block)
        built.add(blk)
        labels.append(np.arange(d0, d0 + blk.shape[0], dtype=np.int64))
    glob = torch.from_numpy(np.concatenate(labels)) if labels else torch.zeros(0, dtype=torch.long)
    if params:
        space = faiss.GpuParameterSpace() if res is not None and hasattr(faiss, "GpuParameterSpace") else \
            faiss.ParameterSpace()
        space.set_index_parameters(built, params)
    dist_, lab = built.search(q, k)
    lab = torch.from_numpy(lab)
    lab = torch.where(lab >= 0, glob[lab.clamp(min=0)], lab)
    top.add(0, torch.from_numpy(dist_), lab)
    return top.result()


# ---------------------------------------------------------------------------------------------- one entry
def search(
    queries_QD,
    docs_ND,
    k: int,
    *,
    method: str = "exact",
    doc_ids: Sequence[str] | None = None,
    device: torch.device | str | None = None,
    index: str = "Flat",
    params: str | None = None,
    use_gpu: bool | None = None,
    query_block: int = 1024,
    doc_block: int = 65536,
) -> tuple[Tensor, Tensor]:
    """:func:`exact_search` (``method="exact"``, on ``device``) or :func:`faiss_search` (``"faiss"``: ``index``,
    ``params``, ``use_gpu``); the same result either way for the exact ``Flat`` index."""
    if method == "exact":
        return exact_search(queries_QD, docs_ND, k, doc_ids=doc_ids, device=device, query_block=query_block,
                            doc_block=doc_block)
    if method == "faiss":
        return faiss_search(queries_QD, docs_ND, k, doc_ids=doc_ids, index=index, params=params, use_gpu=use_gpu,
                            doc_block=doc_block)
    raise ConfigError("eval.search", f"unknown search '{method}'; choose one of {list(METHODS)}")


def merge_topk(parts: Sequence[tuple[Tensor, Tensor]], k: int, *, doc_ids: Sequence[str] | None = None
               ) -> tuple[Tensor, Tensor]:
    """The top-``k`` of several searches of disjoint parts of one corpus (indices into the whole corpus), under
    the same tie order as one search of the whole: exact searches of the parts merge into exactly the exact
    search of the corpus."""
    n_q = parts[0][0].size(0) if parts else 0
    if k <= 0 or not parts:
        return _empty(n_q)
    pref = tie_preference(doc_ids) if doc_ids is not None else None
    top = _TopK(n_q, k, "cpu", pref)
    for scores, idx in parts:
        if scores.numel():
            top.add(0, scores.cpu(), idx.cpu())
    return top.result()


def distributed_search(queries_QD, shards, k: int, *, method: str = "exact", **kwargs) -> tuple[Tensor, Tensor]:
    """:func:`search` of an :class:`~me5.embed.encode.EmbeddingShards` corpus shared out over the processes of
    torch.distributed: each searches its part (every world-th shard) for every query and the top-k lists are
    gathered and merged (:func:`merge_topk`), so every rank works and every rank gets the same result as one
    process searching the whole corpus (for the exact index; an approximate index is built per part). Without a
    process group of more than one rank it is :func:`search`."""
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return search(queries_QD, shards, k, method=method, **kwargs)
    rank, world = dist.get_rank(), dist.get_world_size()
    k = min(int(k), len(shards))
    local = search(queries_QD, shards.part(rank, world), k, method=method, **kwargs)
    gathered: list = [None] * world
    dist.all_gather_object(gathered, (local[0].cpu(), local[1].cpu()))
    return merge_topk(gathered, k, doc_ids=kwargs.get("doc_ids") or shards.ids)


def to_run(query_ids: Sequence[str], doc_ids: Sequence[str], scores: Tensor, indices: Tensor) -> dict[str, dict[str, float]]:
    """``{query id: {doc id: score}}`` (a trec run) from a search result; ``-1`` indices are left out."""
    return {
        qid: {doc_ids[i]: s for s, i in zip(row_s.tolist(), row_i.tolist(), strict=True) if i >= 0}
        for qid, row_s, row_i in zip(query_ids, scores, indices, strict=True)
    }
