"""Attention that reads ``cu_seqlens``: the kernel of packed rows (:mod:`me5.models.packing`).

:func:`register` adds two implementations to transformers' ``AttentionInterface`` (and the SDPA mask builder to
its ``AttentionMaskInterface``), so a Hugging Face BERT / XLM-R backbone runs packed rows unchanged: the
encoder passes ``cu_seq_lens_q/k`` and ``max_length_q/k`` as keyword arguments, which transformers 5 forwards
from the model's ``forward`` down to every attention call.

* ``me5_varlen``: attention-probability dropout as the backbone's config says (``attention_probs_dropout_prob``);
* ``me5_varlen_nodrop``: no attention-probability dropout in packed calls (hidden dropout unchanged), the
  explicit choice ``packed_attention_dropout: off`` of :class:`~me5.models.encoder.Encoder`.

A packed call (``cu_seq_lens_q`` given; the stream is one "row" of T tokens) runs, by device and dtype:

==========================  =========================================================================
CUDA, fp16/bf16, no dropout  ``torch.nn.attention.varlen.varlen_attn`` (PyTorch's FlashAttention varlen)
CUDA, fp16/bf16, dropout     ``flash_attn.flash_attn_varlen_func`` where flash-attn is installed, else
                             PyTorch's own FlashAttention varlen kernel with ``dropout_p`` (the aten op
                             ``varlen_attn`` wraps with dropout fixed at 0), via :class:`_FlashVarlen`
anything else (CPU, fp32)    exact: the rows are put back in a padded (N, H, L, d) layout and PyTorch's
                             SDPA runs with a key-padding mask (and ``dropout_p``), then re-packed
==========================  =========================================================================

Every dropout above draws from the torch generator of the device (Philox on CUDA), so GradCache's RNG replay
(:class:`me5.gradcache.RandContext`) reproduces it. A call WITHOUT ``cu_seq_lens_q`` is a padded batch: it runs
transformers' own SDPA attention with the padding mask built for it, so the same backbone serves both layouts.

Attending across rows is made impossible twice: :class:`~me5.models.encoder.Encoder` packs only on a backbone
whose implementation is one of :data:`PACKED_IMPLEMENTATIONS` (an implementation that ignores ``cu_seqlens``
would silently let a flat stream attend across rows), and a packed call here checks its layout (batch 1, no
mask, ``cu_seqlens`` covering the stream).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import Tensor, nn

VARLEN = "me5_varlen"
VARLEN_NODROP = "me5_varlen_nodrop"
PACKED_IMPLEMENTATIONS = (VARLEN, VARLEN_NODROP)
_FLASH_DTYPES = (torch.float16, torch.bfloat16)


@functools.cache
def register() -> None:
    """Register the two implementations with transformers (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(VARLEN, functools.partial(varlen_attention_forward, keep_dropout=True))
    AttentionInterface.register(VARLEN_NODROP, functools.partial(varlen_attention_forward, keep_dropout=False))
    for name in PACKED_IMPLEMENTATIONS:  # padded calls get the SDPA padding mask
        AttentionMaskInterface.register(name, sdpa_mask)


def kernel_name(device: torch.device, dtype: torch.dtype, dropout: float) -> str:
    """Which kernel a packed call runs here (module docstring), for logs and benchmarks."""
    if device.type != "cuda" or dtype not in _FLASH_DTYPES:
        return "sdpa-padded-exact"
    if dropout == 0.0:
        return "torch-varlen_attn"
    return "flash_attn-varlen" if _flash_attn_varlen() is not None else "torch-flash-varlen-dropout"


@functools.cache
def _torch_varlen():
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return varlen_attn


@functools.cache
def _flash_attn_varlen():
    try:
        from flash_attn import flash_attn_varlen_func
    except Exception:  # noqa: BLE001 -- not installed, or built for another torch
        return None
    return flash_attn_varlen_func


def varlen_attention_forward(
    module: nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    *,
    keep_dropout: bool = True,
    **kwargs,
) -> tuple[Tensor, None]:
    """transformers' attention-function signature: ``query/key/value`` (B, H, T, d) -> ((B, T, H, d), None)."""
    cu_seqlens = kwargs.pop("cu_seq_lens_q", None)
    if cu_seqlens is None:  # a padded batch: transformers' SDPA with the padding mask
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        for k in ("cu_seq_lens_k", "max_length_q", "max_length_k"):
            kwargs.pop(k, None)
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout,
                                      **kwargs)
    cu_k = kwargs.get("cu_seq_lens_k")
    max_length = kwargs.get("max_length_q")
    if query.size(0) != 1 or attention_mask is not None or max_length is None:
        raise ValueError(
            "packed attention takes one flat stream (batch 1, no attention mask) with cu_seq_lens_q and max_length_q; "
            f"got batch {query.size(0)}, mask {None if attention_mask is None else tuple(attention_mask.shape)}"
        )
    if cu_k is not None and cu_k is not cu_seqlens:  # identity, not a value comparison (that would sync)
        raise ValueError("packed self-attention needs cu_seq_lens_k to be the cu_seq_lens_q tensor")
    p = float(dropout) if keep_dropout else 0.0
    # (1, H, T, d) -> (T, H, d): the Linear output's own layout (a view, no copy)
    q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))
    out_THd = packed_attention(q, k, v, cu_seqlens, int(max_length), dropout=p, scale=scaling)
    return out_THd.unsqueeze(0), None


def packed_attention(q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Tensor, max_length: int, *, dropout: float = 0.0,
                     scale: float | None = None) -> Tensor:
    """Self-attention within each row of a packed stream: (T, H, d) each -> (T, H, d)."""
    kernel = kernel_name(q.device, q.dtype, dropout)
    if kernel == "torch-varlen_attn":
        varlen_attn = _torch_varlen()
        if varlen_attn is None:  # a torch before torch.nn.attention.varlen: the same aten kernel, directly
            return _FlashVarlen.apply(q, k, v, cu_seqlens, max_length, 0.0, scale)
        return varlen_attn(q, k, v, cu_seqlens, cu_seqlens, max_length, max_length, scale=scale)
    if kernel == "flash_attn-varlen":
        return _flash_attn_varlen()(q, k, v, cu_seqlens, cu_seqlens, max_length, max_length, dropout_p=dropout,
                                    softmax_scale=scale)
    if kernel == "torch-flash-varlen-dropout":
        return _FlashVarlen.apply(q, k, v, cu_seqlens, max_length, dropout, scale)
    return _padded_exact(q, k, v, cu_seqlens, max_length, dropout=dropout, scale=scale)


def _padded_exact(q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Tensor, max_length: int, *, dropout: float,
                  scale: float | None) -> Tensor:
    """The reference: each row in its own padded slot, SDPA with a key-padding mask, real positions back out."""
    n = cu_seqlens.numel() - 1
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    starts = cu_seqlens[:-1].long()
    cols = torch.arange(max_length, device=q.device)
    real_NL = cols.unsqueeze(0) < lengths.unsqueeze(1)
    # token index of every (row, column); padded slots point at the row's first token (masked as keys below)
    src_NL = torch.where(real_NL, starts.unsqueeze(1) + cols.unsqueeze(0), starts.unsqueeze(1))

    def padded(t: Tensor) -> Tensor:  # (T, H, d) -> (N, H, L, d)
        return t[src_NL.reshape(-1)].view(n, max_length, t.size(1), t.size(2)).transpose(1, 2)

    out = F.scaled_dot_product_attention(padded(q), padded(k), padded(v), attn_mask=real_NL[:, None, None, :],
                                         dropout_p=dropout, scale=scale)
    # back to the stream: token t sits at (row(t), t - start(row(t))); integer indices only (no host sync)
    tokens = torch.arange(q.size(0), device=q.device)
    row_T = torch.bucketize(tokens, cu_seqlens[1:].long(), right=True)
    slot_T = row_T * max_length + tokens - starts[row_T]
    return out.transpose(1, 2).reshape(n * max_length, q.size(1), q.size(2))[slot_T]


class _FlashVarlen(torch.autograd.Function):
    """PyTorch's FlashAttention-2 varlen kernel with attention dropout (``aten::_flash_attention_forward`` /
    ``_backward`` with ``cum_seq_q/k``; ``torch.nn.attention.varlen`` calls the same ops with ``dropout_p = 0``).

    The forward returns the Philox state it used; the backward regenerates the same dropout mask from it.
    """

    @staticmethod
    def forward(ctx, q, k, v, cu_seqlens, max_length, dropout, scale):
        out, lse, rng_state, unused, _ = torch.ops.aten._flash_attention_forward(
            q, k, v, cu_seqlens, cu_seqlens, max_length, max_length, dropout, False, False, scale=scale
        )
        ctx.save_for_backward(q, k, v, out, lse, cu_seqlens, rng_state, unused)
        ctx.max_length, ctx.dropout, ctx.scale = max_length, dropout, scale
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, out, lse, cu_seqlens, rng_state, unused = ctx.saved_tensors
        dq, dk, dv = torch.ops.aten._flash_attention_backward(
            grad_out.contiguous(), q, k, v, out, lse, cu_seqlens, cu_seqlens, ctx.max_length, ctx.max_length,
            ctx.dropout, False, rng_state, unused, scale=ctx.scale,
        )
        return dq, dk, dv, None, None, None, None
