"""GradCache: contrastive batches larger than the activation memory (Gao et al. 2021, arXiv 2101.06983).

The in-batch-negative loss couples every query with every passage, so it cannot be split into independent
micro-batches. GradCache splits only the *encoder*:

1. embed all queries and passages chunk by chunk without a graph (memory: one chunk's activations);
2. make the embeddings leaves, compute the full-batch loss and back-propagate it to them: ``g = ∂L/∂e``;
3. re-embed each chunk with a graph and back-propagate ``Σ e · g`` (a surrogate whose gradient w.r.t. the
   encoder is exactly ``∂L/∂θ`` restricted to that chunk), accumulating parameter gradients.

Step 3 must reproduce step 1 exactly, so each chunk's RNG state is captured before step 1 and replayed in
step 3 (:class:`RandContext`): dropout then draws the same masks. Chunks are cut to their own longest row, so
padding beyond it is never computed (exact for right or left padding with masked attention).

Length bucketing (``sort_by_length=True``): rows are sorted by real length (longest first, stable) before they
are cut into chunks, so each chunk holds rows of similar length and carries little padding; the embeddings are
put back into batch order before the loss, and the loss gradients are permuted the same way for step 3. The
result is the gradient of the same loss (only the dropout draws differ, as they are drawn per chunk).

Each side's inputs are ``(input_ids, attention_mask)``, optionally with a third, per-row tensor (each row's
``prompt_length``, for pooling without the prompt): every tensor is cut by rows the same way, the 2-D ones by
columns too, and the encoder is called with all of them.

Packed rows (an encoder built with ``packed=True``, :mod:`me5.models.packing`): each chunk is instead a flat
stream of whole rows holding at most ``chunk_tokens`` REAL tokens, so no padding is computed at all and the
chunks of a side hold about the same number of tokens whatever the lengths; the RNG replay is the same.

Host syncs. The rows' real lengths are read from the device once per side and step; every chunk is then
planned, trimmed or packed from those host numbers (a chunk's indices reach the device in one non-blocking
copy), so the host never waits for the device inside the chunk loops and queues the next chunk's kernels
while the current one runs. Each chunk pass is labelled for the profiler (``me5.gradcache.forward_chunk``,
``me5.gradcache.backward_chunk``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor, nn
from torch.profiler import record_function
from torch.utils.checkpoint import get_device_states, set_device_states

from me5.models.packing import PackedBatch, pack_rows, row_spans, split_by_real_tokens

Inputs = Mapping[str, Tensor] | tuple[Tensor, ...]
LossFn = Callable[[Tensor, Tensor], tuple[Tensor, dict[str, Tensor]]]


class RandContext:
    """Snapshot of the CPU RNG and of the CUDA RNGs of ``tensors``' devices, taken at construction.

    ``with ctx:`` forks the RNG (the outside state is untouched afterwards) and restores the snapshot, so code
    run inside draws the same random numbers as code run right after construction (GradCache's
    ``RandContext``; sentence-transformers ``base/losses/gradcache.py``).
    """

    def __init__(self, *tensors: Tensor):
        self.cpu_state = torch.get_rng_state()
        self.devices, self.device_states = get_device_states(*tensors)

    def __enter__(self) -> None:
        self._fork = torch.random.fork_rng(devices=self.devices, enabled=True)
        self._fork.__enter__()
        torch.set_rng_state(self.cpu_state)
        set_device_states(self.devices, self.device_states)

    def __exit__(self, *exc) -> None:
        self._fork.__exit__(*exc)
        self._fork = None


# ---------------------------------------------------------------------------------------------- chunking
def split_by_rows(n: int, chunk_size: int) -> list[slice]:
    """``[0, n)`` in contiguous slices of ``chunk_size`` rows (the last may be shorter)."""
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    return [slice(s, min(s + chunk_size, n)) for s in range(0, n, chunk_size)]


def split_by_tokens(
    attention_mask_BT: Tensor, max_tokens: int, *, max_rows: int | None = None
) -> list[slice]:
    """Contiguous row slices whose padded size ``rows × (longest real length in the slice)`` ≤ ``max_tokens``.

    Greedy from the first row; a row longer than the budget gets a slice of its own (at least one row per
    slice). ``max_rows`` additionally caps the rows per slice. Sorting rows by length beforehand packs tighter,
    but reorders the batch; this function keeps the order.
    """
    return _split_padded(attention_mask_BT.sum(dim=1).tolist(), max_tokens, max_rows=max_rows)


def split_to_count(chunks: Sequence[slice], count: int) -> list[slice]:
    """Split the chunks with the most rows in halves until there are ``count`` of them (order kept).

    Used where every rank must run the same number of encoder passes (FSDP2 gathers parameters in each one)
    but a token budget cut the batches into different numbers of chunks.
    """
    chunks = list(chunks)
    while len(chunks) < count:
        i = max(range(len(chunks)), key=lambda k: chunks[k].stop - chunks[k].start)
        sl = chunks[i]
        if sl.stop - sl.start < 2:
            raise ValueError(f"cannot split {len(chunks)} chunks of single rows into {count}")
        mid = sl.start + (sl.stop - sl.start + 1) // 2
        chunks[i : i + 1] = [slice(sl.start, mid), slice(mid, sl.stop)]
    return chunks


def _plan(lengths: np.ndarray, *, chunk_rows: int | None, chunk_tokens: int | None, sort_by_length: bool,
          packed: bool) -> tuple[np.ndarray | None, list[slice]]:
    """Host-side :func:`plan_chunks` on the rows' real lengths."""
    order = np.argsort(-lengths, kind="stable") if sort_by_length else None  # longest first, ties by index
    ls = lengths if order is None else lengths[order]
    if chunk_tokens is not None:
        if packed:
            return order, split_by_real_tokens(ls, chunk_tokens, max_rows=chunk_rows)
        return order, _split_padded(ls, chunk_tokens, max_rows=chunk_rows)
    return order, split_by_rows(len(ls), chunk_rows or max(len(ls), 1))


def _split_padded(lengths: Sequence[int], max_tokens: int, *, max_rows: int | None) -> list[slice]:
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
    chunks, start, longest = [], 0, 0
    for i, length in enumerate(lengths):
        rows, new_longest = i - start + 1, max(longest, int(length))
        too_many = max_rows is not None and rows > max_rows
        if i > start and (rows * new_longest > max_tokens or too_many):
            chunks.append(slice(start, i))
            start, new_longest = i, int(length)
        longest = new_longest
    if len(lengths):
        chunks.append(slice(start, len(lengths)))
    return chunks


def plan_chunks(
    attention_mask_BT: Tensor,
    *,
    chunk_rows: int | None = None,
    chunk_tokens: int | None = None,
    sort_by_length: bool = False,
    packed: bool = False,
) -> tuple[Tensor | None, list[slice]]:
    """How :func:`gradcache_step` cuts one side: ``(order, chunks)``.

    ``order`` is None (batch order) or the (N,) permutation that sorts the rows by real length, longest first
    (stable); ``chunks`` are row slices of the (permuted) batch: by ``chunk_tokens`` (padded tokens,
    :func:`split_by_tokens`; with ``packed``, REAL tokens, :func:`~me5.models.packing.split_by_real_tokens`),
    capped at ``chunk_rows`` rows, else ``chunk_rows`` rows, else one chunk.
    """
    lengths, _ = row_spans(attention_mask_BT) if attention_mask_BT.numel() else (np.zeros(0, np.int64), None)
    order, chunks = _plan(lengths, chunk_rows=chunk_rows, chunk_tokens=chunk_tokens, sort_by_length=sort_by_length,
                          packed=packed)
    return (None if order is None else torch.from_numpy(order).to(attention_mask_BT.device)), chunks


def _unpack(inputs: Inputs) -> tuple[Tensor, ...]:
    """``(input_ids, attention_mask[, prompt_length])``."""
    if isinstance(inputs, Mapping):
        extra = (inputs["prompt_length"],) if inputs.get("prompt_length") is not None else ()
        return (inputs["input_ids"], inputs["attention_mask"], *extra)
    if len(inputs) not in (2, 3):
        raise ValueError(f"expected (input_ids, attention_mask[, prompt_length]), got {len(inputs)} tensors")
    return tuple(inputs)


def _rows(tensors: Sequence[Tensor], index) -> tuple[Tensor, ...]:
    return tuple(t[index] for t in tensors)


def _trim(tensors: Sequence[Tensor], lengths: np.ndarray | None = None, starts: np.ndarray | None = None
          ) -> tuple[Tensor, ...]:
    """Drop the columns that are padding in every row (trailing for right, leading for left padding) from the
    (N, T) ids and mask; a per-row tensor after them is unchanged. With the rows' host ``lengths``/``starts``
    (:func:`~me5.models.packing.row_spans`) the columns are found without reading the device."""
    input_ids_BT, attention_mask_BT, *rest = tensors
    if lengths is not None:
        cols = slice(int(starts.min()), int((starts + lengths).max())) if len(lengths) else slice(0, 1)
    else:
        found = attention_mask_BT.bool().any(dim=0).nonzero().flatten()
        cols = slice(0, 1) if found.numel() == 0 else slice(int(found[0]), int(found[-1]) + 1)
    return (input_ids_BT[:, cols], attention_mask_BT[:, cols], *rest)


@dataclass
class _Side:
    """One side (queries or passages) of a GradCache step, planned: the encoder arguments of every chunk."""

    order: Tensor | None  # device permutation (sorted by length) or None
    chunks: list[slice]
    args: list[tuple]
    states: list[RandContext] = field(default_factory=list)
    emb: Tensor | None = None


def _prepare(encoder: nn.Module, tensors: Sequence[Tensor], order: np.ndarray | None, chunks: Sequence[slice], *,
             packed: bool, lengths: np.ndarray, starts: np.ndarray) -> _Side:
    """Build each planned chunk's encoder inputs from host row lengths only (no sync)."""
    host_rows = np.arange(len(lengths)) if order is None else order
    device = tensors[0].device
    order_t = None if order is None else torch.from_numpy(order).to(device, non_blocking=True)
    args = []
    for sl in chunks:
        rows = host_rows[sl]
        if packed:
            prompt = tensors[2] if len(tensors) > 2 else None
            args.append((pack_rows(tensors[0], rows, lengths, starts, offset=encoder.first_position,
                                   prompt_length=prompt),))
        else:
            index = sl if order_t is None else order_t[sl]
            args.append(_trim(_rows(tensors, index), lengths[rows], starts[rows]))
    return _Side(order_t, list(chunks), args)


def _first_tensor(args: tuple) -> Tensor:
    return args[0].input_ids if isinstance(args[0], PackedBatch) else args[0]


# ---------------------------------------------------------------------------------------------- the two passes
def embed_no_grad(encoder: nn.Module, chunk_args: Sequence[tuple]) -> tuple[Tensor, list[RandContext]]:
    """Embed every chunk (the encoder's arguments per chunk) without a graph -> (rows, D) embeddings in chunk
    order, and one RandContext per chunk (its RNG state before its forward)."""
    embs, states = [], []
    with torch.no_grad():
        for args in chunk_args:
            with record_function("me5.gradcache.forward_chunk"):
                states.append(RandContext(_first_tensor(args)))
                embs.append(encoder(*args))
    return torch.cat(embs), states


def backward_from_cache(
    encoder: nn.Module,
    args: tuple,
    rand_state: RandContext,
    grad_CD: Tensor,
    *,
    backward_fn: Callable[[Tensor], None] | None = None,
) -> None:
    """Re-embed one chunk with a graph (replaying its RNG) and back-propagate its cached gradient ``grad_CD``.

    ``backward_fn(surrogate)`` defaults to ``Tensor.backward``; a Lightning module passes ``self.manual_backward``.
    Under DDP every call would all-reduce: wrap all but the last chunk in ``no_sync()``, or reduce once
    afterwards with :func:`me5.distributed.all_reduce_gradients`.
    """
    backward_fn = backward_fn or Tensor.backward
    with record_function("me5.gradcache.backward_chunk"):
        with rand_state:
            emb_CD = encoder(*args)
        backward_fn((emb_CD * grad_CD.to(emb_CD.dtype)).sum())


@torch.enable_grad()
def gradcache_step(
    encoder: nn.Module,
    query_inputs: Inputs,
    passage_inputs: Inputs,
    loss_fn: LossFn,
    *,
    chunk_rows: int | None = None,
    chunk_tokens: int | None = None,
    sort_by_length: bool = False,
    backward_fn: Callable[[Tensor], None] | None = None,
    grad_sync: Callable[[bool], None] | None = None,
    equalize_chunks: Callable[[list[int]], list[int]] | None = None,
    packed: bool | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """One GradCache forward/backward; leaves the parameter gradients as a full-batch backward would.

    Args:
        encoder: ``encoder(input_ids_BT, attention_mask_BT[, prompt_length_B]) -> emb_BD``.
        query_inputs, passage_inputs: ``{"input_ids", "attention_mask"[, "prompt_length"]}`` or
            ``(input_ids, attention_mask[, prompt_length])``, (B, Tq) and (B*G, Tp) (prompt lengths (B,), (B*G,)).
        loss_fn: ``loss_fn(q_BD, p_ND) -> (loss, parts)``; may gather across ranks
            (:func:`me5.distributed.gather_with_grad`) and own learnable parameters (a temperature), whose
            gradients come from its backward.
        chunk_rows: rows per encoder chunk; ``chunk_tokens``: token budget per chunk, padded tokens
            (:func:`split_by_tokens`) or, packed, real tokens; both may be set; neither: one chunk per side.
        sort_by_length: bucket rows of similar length into the same chunk (:func:`plan_chunks`); the loss
            still sees the batch order.
        backward_fn: backward of the per-chunk surrogates (default ``Tensor.backward``).
        grad_sync: called right before each chunk's backward with ``True`` for the last one of the step and
            ``False`` otherwise (e.g. FSDP2 ``set_requires_gradient_sync``: reduce-scatter once per step).
        equalize_chunks: maps this rank's chunk counts ``[queries, passages]`` to the counts to use (e.g. the
            maximum over ranks, :func:`me5.distributed.max_over_ranks`); chunks are split further to reach them
            (:func:`split_to_count`). Needed when the encoder runs collectives in its forward (FSDP2) and a
            token budget cuts each rank's batch differently.
        packed: feed the encoder packed rows (:class:`~me5.models.packing.PackedBatch`): ``chunk_tokens`` then
            counts REAL tokens and no padding is computed. Default: the encoder's own ``packed`` flag.

    Returns:
        the detached loss and parts.

    Note for the caller: the loss is back-propagated with plain ``loss.backward()``, not ``backward_fn``: its graph
    starts at detached leaves and holds no encoder parameter, so no DDP reducer may see it. Loss-side parameters
    (a learnable temperature) therefore get unscaled gradients: right for fp32/bf16, wrong under an fp16
    GradScaler (which would unscale them once more).
    """
    unpacked = [_unpack(inputs) for inputs in (query_inputs, passage_inputs)]
    if packed is None:
        packed = bool(getattr(encoder, "packed", False))
    if packed and not getattr(encoder, "packed", False):
        raise ValueError("packed GradCache needs an encoder built with packed=True (its attention reads cu_seqlens)")
    # the rows' real lengths, read from the device once per side (every chunk below is planned on the host)
    spans = [row_spans(tensors[1]) for tensors in unpacked]
    plans = [_plan(lengths, chunk_rows=chunk_rows, chunk_tokens=chunk_tokens, sort_by_length=sort_by_length,
                   packed=packed) for lengths, _ in spans]
    if equalize_chunks is not None:
        counts = equalize_chunks([len(chunks) for _, chunks in plans])
        plans = [(order, split_to_count(chunks, n)) for (order, chunks), n in zip(plans, counts, strict=True)]
    sides = []
    for tensors, (order, chunks), (lengths, starts) in zip(unpacked, plans, spans, strict=True):
        side = _prepare(encoder, tensors, order, chunks, packed=packed, lengths=lengths, starts=starts)
        emb, side.states = embed_no_grad(encoder, side.args)
        if side.order is not None:  # back to batch order: emb_batch[order[i]] = emb_sorted[i]
            emb = torch.empty_like(emb).index_copy_(0, side.order, emb)
        side.emb = emb.detach().requires_grad_()
        sides.append(side)

    loss, parts = loss_fn(sides[0].emb, sides[1].emb)
    loss.backward()

    todo = [side for side in sides if side.emb.grad is not None]
    n_backward, done = sum(len(side.chunks) for side in todo), 0
    for side in todo:
        grad = side.emb.grad if side.order is None else side.emb.grad[side.order]
        for sl, args, state in zip(side.chunks, side.args, side.states, strict=True):
            done += 1
            if grad_sync is not None:
                grad_sync(done == n_backward)
            backward_from_cache(encoder, args, state, grad[sl], backward_fn=backward_fn)
    return loss.detach(), {name: value.detach() for name, value in parts.items()}
