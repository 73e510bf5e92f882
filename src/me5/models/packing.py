"""Packed rows: a chunk of texts as one flat stream of tokens, so that no padding is ever computed.

A padded chunk of N rows is an (N, T) matrix in which every row pays for the longest one. A *packed* chunk is
the concatenation of the N rows' real tokens, ``Σ L_i`` tokens in all, with

* ``cu_seqlens`` (N + 1,) int32: row ``i`` is tokens ``cu_seqlens[i]:cu_seqlens[i+1]`` (whole rows, never split);
* ``position_ids``: restart at every row, from the backbone's first position -- XLM-R / RoBERTa count from
  ``padding_idx + 1`` (fairseq's ``make_positions``: 2 for ``<pad>`` = 1), BERT from 0 -- exactly the ids the
  padded forward derives for the same row (:func:`position_offset`);
* ``slot``: each token's index in the right-padded (N, max_length) layout, used to pool per row with the padded
  poolers (:mod:`me5.models.pooling`), so ``mean`` (with or without the prompt), ``cls`` and ``last`` are the
  same functions as in the padded path.

Attention must then stay inside each row: :mod:`me5.models.attention` reads ``cu_seqlens`` (varlen kernels on
CUDA, an exact padded computation elsewhere). Every index is built on the host from host-side row lengths, and
a chunk's index arrays travel to the device in one (pinned, non-blocking) copy: packing a chunk never makes the
host wait for the device. The row lengths of a padded device batch are read once per batch side
(:func:`row_spans`, one transfer), not once per chunk.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from me5.errors import ConfigError

# model types whose embeddings take absolute ``position_ids``, with the first position of a row
_OFFSET_AFTER_PADDING_IDX = frozenset({"xlm-roberta", "roberta", "camembert"})
_OFFSET_ZERO = frozenset({"bert"})
PACKABLE_MODEL_TYPES = _OFFSET_AFTER_PADDING_IDX | _OFFSET_ZERO


def position_offset(config) -> int:
    """The position id of a row's first token for this backbone config (a ConfigError for an unknown scheme)."""
    model_type = getattr(config, "model_type", None)
    scheme = getattr(config, "position_embedding_type", "absolute") or "absolute"
    if model_type not in PACKABLE_MODEL_TYPES or scheme != "absolute":
        raise ConfigError(
            "model.encoder.packed",
            f"packed rows need a backbone whose absolute position ids are known per row ({sorted(PACKABLE_MODEL_TYPES)}"
            f" with position_embedding_type=absolute); got model_type={model_type!r}, position_embedding_type="
            f"{scheme!r}: set packed=false",
        )
    if model_type in _OFFSET_AFTER_PADDING_IDX:
        return int(config.pad_token_id) + 1
    return 0


@dataclass
class PackedBatch:
    """N rows as one flat token stream (module docstring). Tensors live on one device.

    Attributes:
        input_ids: (T,) token ids, rows one after another, ``T = Σ lengths``.
        position_ids: (T,) position of each token, restarting per row at the backbone's offset.
        cu_seqlens: (N + 1,) int32 row boundaries (``cu_seqlens[0] = 0``, ``cu_seqlens[-1] = T``).
        max_length: the longest row (a host int: varlen kernels take it as an argument).
        slot: (T,) int64 index of each token in the right-padded ``(N, max_length)`` layout.
        lengths: (N,) int64 real tokens per row.
        prompt_length: leading prompt tokens per row ((N,) tensor or an int), for pooling without the prompt.
    """

    input_ids: Tensor
    position_ids: Tensor
    cu_seqlens: Tensor
    max_length: int
    slot: Tensor
    lengths: Tensor
    prompt_length: Tensor | int | None = None

    @property
    def n_rows(self) -> int:
        return int(self.lengths.numel())

    @property
    def n_tokens(self) -> int:
        return int(self.input_ids.numel())

    @property
    def device(self) -> torch.device:
        return self.input_ids.device

    def padded_mask(self) -> Tensor:
        """(N, max_length) int64 mask of the right-padded layout (1 on real tokens)."""
        cols = torch.arange(self.max_length, device=self.lengths.device)
        return (cols.unsqueeze(0) < self.lengths.unsqueeze(1)).long()

    def repad(self, flat_TD: Tensor) -> Tensor:
        """(T, D) per-token states -> (N, max_length, D), right-padded with zeros (differentiable)."""
        out = flat_TD.new_zeros(self.n_rows * self.max_length, flat_TD.size(-1))
        return out.index_copy(0, self.slot, flat_TD).view(self.n_rows, self.max_length, flat_TD.size(-1))


def row_spans(attention_mask_BT: Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Host ``(lengths, starts)`` of a padded mask's rows: real tokens per row and the column of each row's first
    real token (0 for right padding). One device-to-host transfer for the whole batch.

    Real tokens must be contiguous in each row (right or left padding); an empty row is an error.
    """
    mask = attention_mask_BT.bool()
    lengths = mask.sum(dim=1)
    starts = mask.to(torch.uint8).argmax(dim=1)  # first 1 of each row
    both = torch.stack([lengths, starts]).cpu().numpy().astype(np.int64)
    if both.shape[1] and int(both[0].min()) < 1:
        raise ValueError("a row with no real token cannot be packed (every text keeps at least its special tokens)")
    return both[0], both[1]


def split_by_real_tokens(lengths: Sequence[int], max_tokens: int, *, max_rows: int | None = None) -> list[slice]:
    """Contiguous row slices holding at most ``max_tokens`` REAL tokens (``Σ lengths``), whole rows only.

    Greedy from the first row; a row longer than the budget gets a slice of its own. ``max_rows`` also caps the
    rows per slice. The packed counterpart of :func:`me5.gradcache.split_by_tokens` (which budgets padded tokens).
    """
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
    chunks, start, used = [], 0, 0
    for i, length in enumerate(lengths):
        length = int(length)
        full = used + length > max_tokens or (max_rows is not None and i - start >= max_rows)
        if i > start and full:
            chunks.append(slice(start, i))
            start, used = i, 0
        used += length
    if len(lengths):
        chunks.append(slice(start, len(lengths)))
    return chunks


def _layout(lengths: np.ndarray, offset: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, int]:
    """Host arrays of a packed chunk: (row of each token, position in its row, cu_seqlens, slot, max_length)."""
    n = len(lengths)
    cu = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(lengths, out=cu[1:])
    row = np.repeat(np.arange(n, dtype=np.int64), lengths)
    pos = np.arange(int(cu[-1]), dtype=np.int64) - np.repeat(cu[:-1], lengths)
    max_length = int(lengths.max()) if n else 0
    return row, pos, cu, row * max_length + pos, max_length


def _to_device(parts: Sequence[np.ndarray], device: torch.device) -> list[Tensor]:
    """Several int64 host arrays -> device tensors in ONE copy (pinned and non-blocking on CUDA)."""
    flat = torch.from_numpy(np.concatenate(parts)) if parts else torch.zeros(0, dtype=torch.long)
    if device.type == "cuda":
        flat = flat.pin_memory().to(device, non_blocking=True)
    elif flat.device != device:
        flat = flat.to(device)
    return list(torch.split(flat, [len(p) for p in parts]))


def pack_rows(
    input_ids_BT: Tensor,
    rows: np.ndarray | Sequence[int],
    lengths: np.ndarray,
    starts: np.ndarray,
    *,
    offset: int,
    prompt_length: Tensor | int | None = None,
) -> PackedBatch:
    """Pack rows ``rows`` (indices into the batch, in the order given) of a padded (B, T) ``input_ids_BT``.

    ``lengths``/``starts``: host arrays for the WHOLE batch (:func:`row_spans`). The tokens are gathered on
    ``input_ids_BT``'s device with indices built on the host; ``prompt_length`` ((B,) tensor or an int) is
    subset to the chunk's rows.
    """
    rows = np.asarray(rows, dtype=np.int64)
    if rows.size == 0:
        raise ValueError("cannot pack zero rows")
    width = input_ids_BT.size(1)
    lens = lengths[rows]
    row, pos, cu, slot, max_length = _layout(lens, offset)
    gather = rows[row] * width + starts[rows][row] + pos
    gather_t, pos_t, slot_t, cu_t, lens_t, rows_t = _to_device(
        [gather, pos + offset, slot, cu, lens, rows], input_ids_BT.device
    )
    if torch.is_tensor(prompt_length) and prompt_length.dim() > 0:
        prompt_length = prompt_length.index_select(0, rows_t.to(prompt_length.device))
    return PackedBatch(
        input_ids=input_ids_BT.reshape(-1).index_select(0, gather_t),
        position_ids=pos_t,
        cu_seqlens=cu_t.to(torch.int32),
        max_length=max_length,
        slot=slot_t,
        lengths=lens_t,
        prompt_length=prompt_length,
    )


def pack_padded(input_ids_BT: Tensor, attention_mask_BT: Tensor, *, offset: int,
                prompt_length: Tensor | int | None = None) -> PackedBatch:
    """Every row of a padded batch, packed in batch order (one host read of the row lengths)."""
    lengths, starts = row_spans(attention_mask_BT)
    return pack_rows(input_ids_BT, np.arange(len(lengths)), lengths, starts, offset=offset,
                     prompt_length=prompt_length)


def pack_token_lists(token_rows: Sequence[Sequence[int]], *, offset: int, device: torch.device | str = "cpu",
                     prompt_length: int | None = None) -> PackedBatch:
    """Pack already tokenised rows (lists of ids) straight from the host: no padded matrix is ever built."""
    device = torch.device(device)
    lens = np.fromiter((len(r) for r in token_rows), dtype=np.int64, count=len(token_rows))
    if lens.size == 0 or int(lens.min()) < 1:
        raise ValueError("cannot pack zero rows or an empty row")
    row, pos, cu, slot, max_length = _layout(lens, offset)
    ids = np.fromiter((t for r in token_rows for t in r), dtype=np.int64, count=int(cu[-1]))
    ids_t, pos_t, slot_t, cu_t, lens_t = _to_device([ids, pos + offset, slot, cu, lens], device)
    return PackedBatch(input_ids=ids_t, position_ids=pos_t, cu_seqlens=cu_t.to(torch.int32), max_length=max_length,
                       slot=slot_t, lengths=lens_t, prompt_length=prompt_length)
