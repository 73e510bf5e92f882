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
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import get_device_states, set_device_states

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
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
    lengths = attention_mask_BT.sum(dim=1).tolist()
    chunks, start, longest = [], 0, 0
    for i, length in enumerate(lengths):
        rows, new_longest = i - start + 1, max(longest, int(length))
        too_many = max_rows is not None and rows > max_rows
        if i > start and (rows * new_longest > max_tokens or too_many):
            chunks.append(slice(start, i))
            start, new_longest = i, int(length)
        longest = new_longest
    if lengths:
        chunks.append(slice(start, len(lengths)))
    return chunks


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


def plan_chunks(
    attention_mask_BT: Tensor,
    *,
    chunk_rows: int | None = None,
    chunk_tokens: int | None = None,
    sort_by_length: bool = False,
) -> tuple[Tensor | None, list[slice]]:
    """How :func:`gradcache_step` cuts one side: ``(order, chunks)``.

    ``order`` is None (batch order) or the (N,) permutation that sorts the rows by real length, longest first
    (stable); ``chunks`` are row slices of the (permuted) batch: by ``chunk_tokens`` (:func:`split_by_tokens`,
    capped at ``chunk_rows`` rows), else ``chunk_rows`` rows, else one chunk.
    """
    order = None
    if sort_by_length:
        lengths = attention_mask_BT.sum(dim=1)
        order = torch.sort(lengths, descending=True, stable=True).indices
        attention_mask_BT = attention_mask_BT[order]
    n = attention_mask_BT.size(0)
    if chunk_tokens is not None:
        chunks = split_by_tokens(attention_mask_BT, chunk_tokens, max_rows=chunk_rows)
    else:
        chunks = split_by_rows(n, chunk_rows or max(n, 1))
    return order, chunks


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


def _trim(tensors: Sequence[Tensor]) -> tuple[Tensor, ...]:
    """Drop the columns that are padding in every row (trailing for right, leading for left padding) from the
    (N, T) ids and mask; a per-row tensor after them is unchanged."""
    input_ids_BT, attention_mask_BT, *rest = tensors
    cols = attention_mask_BT.bool().any(dim=0).nonzero().flatten()
    cols = slice(0, 1) if cols.numel() == 0 else slice(int(cols[0]), int(cols[-1]) + 1)
    return (input_ids_BT[:, cols], attention_mask_BT[:, cols], *rest)


# ---------------------------------------------------------------------------------------------- the two passes
def embed_no_grad(
    encoder: nn.Module, inputs: Sequence[Tensor], chunks: Sequence[slice]
) -> tuple[Tensor, list[RandContext]]:
    """Embed ``chunks`` of the inputs (``(input_ids, attention_mask[, prompt_length])``, N rows) without a graph
    -> ((N, D) embeddings, one RandContext per chunk)."""
    embs, states = [], []
    with torch.no_grad():
        for sl in chunks:
            chunk = _trim(_rows(inputs, sl))
            states.append(RandContext(chunk[0]))
            embs.append(encoder(*chunk))
    return torch.cat(embs), states


def backward_from_cache(
    encoder: nn.Module,
    inputs: Sequence[Tensor],
    chunks: Sequence[slice],
    rand_states: Sequence[RandContext],
    grad_emb: Tensor,
    *,
    backward_fn: Callable[[Tensor], None] | None = None,
) -> None:
    """Re-embed each chunk with a graph (replaying its RNG) and back-propagate the cached ``grad_emb`` (N, D).

    ``backward_fn(surrogate)`` defaults to ``Tensor.backward``; a Lightning module passes ``self.manual_backward``.
    Under DDP every call would all-reduce: wrap all but the last chunk in ``no_sync()``, or reduce once
    afterwards with :func:`me5.distributed.all_reduce_gradients`.
    """
    backward_fn = backward_fn or Tensor.backward
    for sl, state in zip(chunks, rand_states, strict=True):
        chunk = _trim(_rows(inputs, sl))
        with state:
            emb_CD = encoder(*chunk)
        backward_fn((emb_CD * grad_emb[sl].to(emb_CD.dtype)).sum())


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
) -> tuple[Tensor, dict[str, Tensor]]:
    """One GradCache forward/backward; leaves the parameter gradients as a full-batch backward would.

    Args:
        encoder: ``encoder(input_ids_BT, attention_mask_BT[, prompt_length_B]) -> emb_BD``.
        query_inputs, passage_inputs: ``{"input_ids", "attention_mask"[, "prompt_length"]}`` or
            ``(input_ids, attention_mask[, prompt_length])``, (B, Tq) and (B*G, Tp) (prompt lengths (B,), (B*G,)).
        loss_fn: ``loss_fn(q_BD, p_ND) -> (loss, parts)``; may gather across ranks
            (:func:`me5.distributed.gather_with_grad`) and own learnable parameters (a temperature), whose
            gradients come from its backward.
        chunk_rows: rows per encoder chunk; ``chunk_tokens``: padded-token budget per chunk
            (:func:`split_by_tokens`); both may be set; neither: one chunk per side.
        sort_by_length: bucket rows of similar length into the same chunk (:func:`plan_chunks`); the loss
            still sees the batch order.
        backward_fn: backward of the per-chunk surrogates (default ``Tensor.backward``).
        grad_sync: called right before each chunk's backward with ``True`` for the last one of the step and
            ``False`` otherwise (e.g. FSDP2 ``set_requires_gradient_sync``: reduce-scatter once per step).
        equalize_chunks: maps this rank's chunk counts ``[queries, passages]`` to the counts to use (e.g. the
            maximum over ranks, :func:`me5.distributed.max_over_ranks`); chunks are split further to reach them
            (:func:`split_to_count`). Needed when the encoder runs collectives in its forward (FSDP2) and a
            token budget cuts each rank's batch differently.

    Returns:
        the detached loss and parts.

    Note for the caller: the loss is back-propagated with plain ``loss.backward()``, not ``backward_fn``: its graph
    starts at detached leaves and holds no encoder parameter, so no DDP reducer may see it. Loss-side parameters
    (a learnable temperature) therefore get unscaled gradients: right for fp32/bf16, wrong under an fp16
    GradScaler (which would unscale them once more).
    """
    unpacked = [_unpack(inputs) for inputs in (query_inputs, passage_inputs)]
    plans = [
        plan_chunks(tensors[1], chunk_rows=chunk_rows, chunk_tokens=chunk_tokens, sort_by_length=sort_by_length)
        for tensors in unpacked
    ]
    if equalize_chunks is not None:
        counts = equalize_chunks([len(chunks) for _, chunks in plans])
        plans = [(order, split_to_count(chunks, n)) for (order, chunks), n in zip(plans, counts, strict=True)]
    sides = []
    for tensors, (order, chunks) in zip(unpacked, plans, strict=True):
        if order is not None:
            tensors = _rows(tensors, order)
        emb, states = embed_no_grad(encoder, tensors, chunks)
        if order is not None:  # back to batch order: emb_batch[order[i]] = emb_sorted[i]
            emb = torch.empty_like(emb).index_copy_(0, order, emb)
        sides.append((tensors, order, chunks, states, emb.detach().requires_grad_()))

    q_BD, p_ND = sides[0][-1], sides[1][-1]
    loss, parts = loss_fn(q_BD, p_ND)
    loss.backward()

    todo = [side for side in sides if side[-1].grad is not None]
    n_backward, done = sum(len(side[2]) for side in todo), 0
    for tensors, order, chunks, states, leaf in todo:
        grad = leaf.grad if order is None else leaf.grad[order]
        for sl, state in zip(chunks, states, strict=True):
            done += 1
            if grad_sync is not None:
                grad_sync(done == n_backward)
            backward_from_cache(encoder, tensors, [sl], [state], grad, backward_fn=backward_fn)
    return loss.detach(), {name: value.detach() for name, value in parts.items()}
