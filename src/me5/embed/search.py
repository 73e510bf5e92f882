"""Search over embeddings: exact top-k by inner product, in blocks (the search that evaluation and mining share)."""

from __future__ import annotations

import math

import torch
from torch import Tensor


@torch.no_grad()
def exact_search(
    queries_QD: Tensor,
    docs_ND: Tensor,
    k: int,
    *,
    device: torch.device | str | None = None,
    query_block: int = 1024,
    doc_block: int = 65536,
) -> tuple[Tensor, Tensor]:
    """Top-``k`` docs per query by dot product, scanning the corpus in blocks; returns CPU (scores, indices) (Q, k).

    Memory on ``device`` is bounded by ``query_block * doc_block`` scores plus the running top-k.
    """
    device = torch.device(device) if device is not None else queries_QD.device
    k = min(k, docs_ND.size(0))
    n_q = queries_QD.size(0)
    best_s = torch.full((n_q, k), -math.inf, device=device)
    best_i = torch.zeros((n_q, k), dtype=torch.long, device=device)
    q_all = queries_QD.to(device, torch.float32)
    for d0 in range(0, docs_ND.size(0), doc_block):
        d_blk = docs_ND[d0 : d0 + doc_block].to(device, torch.float32)
        for q0 in range(0, n_q, query_block):
            scores = q_all[q0 : q0 + query_block] @ d_blk.T
            s, i = scores.topk(min(k, d_blk.size(0)), dim=1)
            cat_s = torch.cat([best_s[q0 : q0 + query_block], s], dim=1)
            cat_i = torch.cat([best_i[q0 : q0 + query_block], i + d0], dim=1)
            top_s, pos = cat_s.topk(k, dim=1)
            best_s[q0 : q0 + query_block] = top_s
            best_i[q0 : q0 + query_block] = cat_i.gather(1, pos)
    return best_s.cpu(), best_i.cpu()
