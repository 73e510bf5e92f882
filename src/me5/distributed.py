"""Small collective helpers; each is the identity (or a no-op) in a single process.

Gradient bookkeeping with a cross-rank gather (the usual mE5 / E5 set-up): rank ``r`` scores its own B queries
against all ``world * B * G`` passages, ``L_r`` = mean over its queries. The gather's backward sums the
gradients that every rank's loss sends to rank ``r``'s passages, so rank ``r`` holds ``∂(Σ_r' L_r')/∂θ`` through
its own inputs; averaging over ranks (DDP, or :func:`all_reduce_gradients` with ``op="mean"``) then gives
``∂/∂θ`` of ``(1/world) Σ_r L_r``, the loss of the union batch. A plain ``dist.all_gather`` with the local tensor
put back keeps only the ``∂L_r/∂x_r`` term and loses the cross-rank part.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.distributed as dist
from torch import Tensor, nn

try:  # torch >= 2.x; the differentiable gather of choice (torch.distributed.nn's is deprecated)
    from torch.distributed import _functional_collectives as _fc
except ImportError:  # pragma: no cover
    _fc = None

_BUCKET_BYTES = 25 * 1024 * 1024


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def world_info() -> tuple[int, int]:
    """``(rank, world_size)``; ``(0, 1)`` when no process group is initialised."""
    if not is_distributed():
        return 0, 1
    return dist.get_rank(), dist.get_world_size()


def gather_with_grad(x: Tensor) -> Tensor:
    """Concatenate ``x`` (N, ...) of every rank along dim 0 -> (world * N, ...), differentiably.

    Backward sums the incoming gradients over ranks and returns each rank its own slice (reduce-scatter).
    Every rank must pass the same shape.
    """
    _, world = world_info()
    if world == 1:
        return x
    if _fc is not None and hasattr(_fc, "all_gather_single_autograd"):
        out = _fc.all_gather_single_autograd(x.contiguous(), gather_dim=0, group=dist.group.WORLD)
        # not out.wait(): that returns the inner tensor without its autograd history
        return _fc.wait_tensor(out)
    from torch.distributed.nn.functional import all_gather  # pragma: no cover - older torch

    return torch.cat(all_gather(x), dim=0)  # pragma: no cover


@torch.no_grad()
def gather_no_grad(x: Tensor) -> Tensor:
    """Concatenate ``x`` of every rank along dim 0, detached (for metrics, duplicate masks, hashes)."""
    _, world = world_info()
    if world == 1:
        return x.detach()
    parts = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(parts, x.detach().contiguous())
    return torch.cat(parts, dim=0)


@torch.no_grad()
def all_reduce_gradients(
    params: Iterable[nn.Parameter], *, op: str = "mean", bucket_bytes: int = _BUCKET_BYTES
) -> None:
    """All-reduce ``p.grad`` of ``params`` in place, in flat buckets of about ``bucket_bytes`` per dtype/device.

    For data parallelism without the DDP reducer (e.g. around :func:`me5.gradcache.gradcache_step`).
    ``op="mean"`` matches DDP; ``"sum"`` keeps the sum. Parameters whose grad is None are skipped, so every rank
    must have grads for the same parameters (as DDP without ``find_unused_parameters``).
    """
    if op not in ("mean", "sum"):
        raise ValueError(f"op must be 'mean' or 'sum', got {op!r}")
    _, world = world_info()
    if world == 1:
        return
    by_kind: dict[tuple, list[Tensor]] = {}
    for p in params:
        if p.grad is not None:
            by_kind.setdefault((p.grad.dtype, p.grad.device), []).append(p.grad)
    for grads in by_kind.values():
        bucket, size = [], 0
        for g in grads:
            bucket.append(g)
            size += g.numel() * g.element_size()
            if size >= bucket_bytes:
                _all_reduce_bucket(bucket, world, op)
                bucket, size = [], 0
        if bucket:
            _all_reduce_bucket(bucket, world, op)


def _all_reduce_bucket(bucket: list[Tensor], world: int, op: str) -> None:
    flat = torch._utils._flatten_dense_tensors(bucket)
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    if op == "mean":
        flat.div_(world)
    for g, reduced in zip(bucket, torch._utils._unflatten_dense_tensors(flat, bucket), strict=True):
        g.copy_(reduced)


@torch.no_grad()
def broadcast_parameters(module: nn.Module, src: int = 0) -> None:
    """Copy ``src``'s parameters and buffers to every rank (same start point without DDP's constructor)."""
    if not is_distributed():
        return
    for t in [*module.parameters(), *module.buffers()]:
        dist.broadcast(t.data, src=src)
