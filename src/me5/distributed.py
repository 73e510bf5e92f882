"""Small collective helpers; each is the identity (or a no-op) in a single process.

Gradient bookkeeping with a cross-rank gather (the usual mE5 / E5 set-up): rank ``r`` scores its own B queries
against all ``world * B * G`` passages, ``L_r`` = mean over its queries. The gather's backward sums the
gradients that every rank's loss sends to rank ``r``'s passages, so rank ``r`` holds ``∂(Σ_r' L_r')/∂θ`` through
its own inputs; averaging over ranks (DDP, or :func:`all_reduce_gradients` with ``op="mean"``) then gives
``∂/∂θ`` of ``(1/world) Σ_r L_r``, the loss of the union batch. A plain ``dist.all_gather`` with the local tensor
put back keeps only the ``∂L_r/∂x_r`` term and loses the cross-rank part.
"""

from __future__ import annotations

import time
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


def shutdown_process_group(drain_s: float = 0.05) -> bool:
    """Destroy the default process group, if any, and let its worker threads drop their last references.

    Gloo runs each collective on a worker thread (``ProcessGroupGloo::runLoop``) that releases the finished
    work, and the Python tensors it held, *after* the caller's ``wait()`` has returned; the release takes the
    GIL. ``destroy_process_group`` does not join those threads, so when the interpreter exits right after the
    last collective, a thread can block on the GIL during finalisation, is unwound by ``pthread_exit`` inside a
    ``noexcept`` destructor, and the process dies with ``terminate called without an active exception``
    (SIGABRT, exit -6) after all of its work is done: seen in about 1 in 20 two-rank runs on 2 CPU cores.
    Sleeping ``drain_s`` with the GIL released lets the threads finish first. Returns whether a group existed.
    """
    if not is_distributed():
        return False
    dist.destroy_process_group()
    time.sleep(drain_s)
    return True


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


def max_over_ranks(values: list[int]) -> list[int]:
    """Element-wise maximum of a short list of ints over all ranks (identity in one process)."""
    _, world = world_info()
    if world == 1:
        return list(values)
    backend = dist.get_backend()
    device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
    t = torch.tensor(values, dtype=torch.long, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return [int(v) for v in t.tolist()]


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


# ---------------------------------------------------------------------------------------------- FSDP2 (DTensor) helpers
def is_dtensor(x) -> bool:
    """True for a ``torch.distributed.tensor.DTensor`` (FSDP2's sharded parameters and gradients)."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover
        return False
    return isinstance(x, DTensor)


@torch.no_grad()
def clip_grad_norm_(params: Iterable[nn.Parameter], max_norm: float, *, eps: float = 1e-6) -> Tensor:
    """Scale ``p.grad`` so that the global L2 norm is at most ``max_norm``; returns the norm before clipping.

    Works for a mix of FSDP2-sharded (DTensor, ``Shard`` placement) and replicated plain gradients, which
    ``torch.nn.utils.clip_grad_norm_`` cannot stack: each rank sums the squares of its local shards, one
    all-reduce adds the shards up, and the replicated gradients (identical on every rank after their
    all-reduce) are counted once. With no DTensor it equals ``torch.nn.utils.clip_grad_norm_``.
    """
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.zeros(())
    sharded = [g.to_local() for g in grads if is_dtensor(g)]
    plain = [g for g in grads if not is_dtensor(g)]
    device = (sharded or plain)[0].device
    total_sq = torch.zeros((), device=device, dtype=torch.float32)
    if sharded:
        groups = {id(g.device_mesh): g.device_mesh for g in grads if is_dtensor(g)}
        if len(groups) > 1:
            raise ValueError("gradients on several device meshes are not supported")
        mesh = next(iter(groups.values()))
        local_sq = sum(t.float().pow(2).sum() for t in sharded if t.numel())
        local_sq = torch.as_tensor(local_sq, device=device, dtype=torch.float32)
        dist.all_reduce(local_sq, group=mesh.get_group() if mesh.ndim == 1 else None)
        total_sq = total_sq + local_sq
    for g in plain:
        total_sq = total_sq + g.float().pow(2).sum().to(device)
    norm = total_sq.sqrt()
    coef = torch.clamp(max_norm / (norm + eps), max=1.0)
    for t in [*sharded, *plain]:
        t.mul_(coef.to(t.device, t.dtype))
    return norm
