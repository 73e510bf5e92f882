"""Throughput of one stage-1 optimiser step: ``python -m benchmarks.train_step`` (``make bench``).

One row per (model, global batch, length mode, method), where a step is: embed B queries and B passages,
InfoNCE over in-batch negatives (τ = 0.01, duplicate masking on), backward, gradient clipping, AdamW step.
Methods:

- ``ours``: :meth:`me5.training.EmbeddingModule.compute_loss_and_backward` with GradCache, chunks cut by a
  token budget of ``mini_batch × passage_max_length`` padded tokens, rows bucketed by length;
- ``packed``: the same module on an encoder built with ``packed=True``: each chunk is a flat stream of whole rows
  (varlen attention, no padding computed) holding at most the SAME number of tokens, now real ones. Activation
  memory is per token (the fused attention kernels store no L×L term), so a packed chunk of N real tokens needs
  what a padded chunk of N padded tokens needs: the same budget gives the same peak activation memory, and the
  packed chunk carries more useful rows. Rows are not sorted (nothing is padded, so sorting gains nothing);
  the attention-probability dropout follows ``--packed-attention-dropout`` (the library's default: keep);
- ``ours-rows``: the same as ``ours`` with chunks of ``mini_batch`` rows in batch order (optional; ST's chunking);
- ``naive``: the same module without caching (one forward/backward over the whole batch; OOM is caught);
- ``st``: sentence-transformers' ``CachedMultipleNegativesRankingLoss`` (``scale = 1/τ``,
  ``mini_batch_size = mini_batch``) on a ``SentenceTransformer(Transformer -> Pooling(mean) -> Normalize)``
  loaded from a folder holding our randomly initialised backbone (same weights, same batch, same precision).

Steady state: every row first runs ``--warmup-steps`` steps AT THE TIMED SHAPE (same batch: the allocator
grows to the step's peak and every chunk shape has been seen), then ``--steps`` timed steps; the row reports
their median, min and max, the first warm-up step's time (the cold cost) and the peak memory of the timed
steps. With ``--deadline`` (a Unix time) a row is skipped when the previous rows' speed says it cannot finish,
and runs fewer timed steps (at least one) when the deadline comes near; the ``steps`` column says how many ran.

Models are built from config with random weights (no download): ``tiny`` is ``conf/model/tiny.yaml``'s shape;
``small`` (Multilingual-MiniLM-L12-H384, BERT body), ``base`` and ``large`` (XLM-R) have the real dimensions
and vocabularies (250,037 / 250,002 tokens).

Lengths (token counts with the special tokens, queries ≤ 32, passages ≤ 128; stage 1 of E5 truncates at 128):
``fixed`` = every query 32 and every passage 128 tokens (the padded worst case); ``variable`` = log-normal
lengths, query median 12 (σ = 0.5), passage median 80 (σ = 0.6), clipped to [4, max] -- an assumption shaped
like web title/body pairs (titles of a few words, bodies of a paragraph, ~20 % of bodies truncated at 128),
not a fit to mE5's data, whose tokenised lengths are not published. Batches are padded to the batch's longest
row rounded up to 8, as the collator does.

Columns: ``pairs/s``; ``tok/s`` = real (non-pad) tokens per second; ``MFU`` = model FLOPs per second over a
MEASURED peak (a large bf16 matmul on GPU, fp32 on CPU); model FLOPs = 6 × non-embedding parameters × real
tokens + attention (12 × layers × hidden × Σ length² for forward + backward), so GradCache's re-forward and the
padding count as overhead, not work; ``mem`` = peak allocated GPU memory of the timed steps; ``pad`` = share of
the executed transformer FLOPs spent on padding (measured from the inputs each encoder call received; 0 for
``packed``, whose attention runs per row over each row's own length); ``vs ours`` / ``vs st`` = pairs/s relative
to ``ours`` / ``st`` at the same grid point.

Two more modes explain the numbers (:mod:`benchmarks.step_profile`):

- ``--profile``: at one grid point (``--profile-at``, default ``base/32768/variable`` on a GPU), one
  steady-state step (after the warm-up) of ``ours``, ``packed`` and ``st`` runs under ``torch.profiler``:
  ``profile.md`` (wall vs device busy time, host time waiting in syncs, syncs per step, allocator deltas, top
  15 kernels, chunks and time per chunk) and one chrome trace per method (``trace_<method>.json.gz``);
- ``--host-cost``: the aten ops and the sync-forcing ops a GradCache step dispatches, per chunk and per step,
  at two chunk counts (needs no GPU; the real ``base`` shape by default).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import gc
import json
import math
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from benchmarks.timing import sync

# ---------------------------------------------------------------------------------------------- models
_DROPOUT = {"hidden_dropout_prob": 0.1, "attention_probs_dropout_prob": 0.1}
MODEL_SHAPES: dict[str, dict] = {
    # conf/model/tiny.yaml (vocabulary: the 8k sample tokenizer)
    "tiny": dict(model_type="xlm-roberta", vocab_size=8000, hidden_size=128, num_hidden_layers=2,
                 num_attention_heads=4, intermediate_size=256, max_position_embeddings=130, pad_token_id=1,
                 **_DROPOUT),
    # microsoft/Multilingual-MiniLM-L12-H384 (mE5-small's backbone; BERT body, XLM-R vocabulary + 35)
    "small": dict(model_type="bert", vocab_size=250037, hidden_size=384, num_hidden_layers=12,
                  num_attention_heads=12, intermediate_size=1536, max_position_embeddings=512,
                  type_vocab_size=2, pad_token_id=0, **_DROPOUT),
    # FacebookAI/xlm-roberta-base / -large
    "base": dict(model_type="xlm-roberta", vocab_size=250002, hidden_size=768, num_hidden_layers=12,
                 num_attention_heads=12, intermediate_size=3072, max_position_embeddings=514, pad_token_id=1,
                 **_DROPOUT),
    "large": dict(model_type="xlm-roberta", vocab_size=250002, hidden_size=1024, num_hidden_layers=24,
                  num_attention_heads=16, intermediate_size=4096, max_position_embeddings=514, pad_token_id=1,
                  **_DROPOUT),
}
# rows per GradCache chunk (and ST mini_batch_size); sized for ~40-60 GB of bf16 activations at 128 tokens
DEFAULT_MINI_BATCH = {"tiny": 32, "small": 2048, "base": 1024, "large": 512}
METHODS = ("ours", "packed", "ours-rows", "naive", "st")
GRADCACHE_METHODS = ("ours", "packed", "ours-rows", "st")  # the ones --profile and --host-cost look at


def build_encoder(model: str, *, attn_implementation: str = "sdpa", seed: int = 0, packed: bool = False,
                  packed_attention_dropout: str | None = None):
    """A randomly initialised encoder of a :data:`MODEL_SHAPES` shape, in train mode (``packed``: padding-free)."""
    from me5.models.encoder import Encoder

    torch.manual_seed(seed)
    kwargs = {}
    if packed:  # only passed when asked for, so the padded methods run on any version of the encoder
        kwargs["packed"] = True
        if packed_attention_dropout is not None:
            kwargs["packed_attention_dropout"] = packed_attention_dropout
    return Encoder.from_config(dict(MODEL_SHAPES[model]), attn_implementation=attn_implementation, **kwargs).train()


def model_dims(encoder) -> dict[str, int]:
    """Layers, hidden size and non-embedding parameters (everything but the embedding tables)."""
    cfg = encoder.backbone.config
    emb = sum(p.numel() for n, p in encoder.backbone.named_parameters() if n.startswith("embeddings.") and p.ndim == 2)
    total = sum(p.numel() for p in encoder.parameters())
    return {"layers": int(cfg.num_hidden_layers), "hidden": int(cfg.hidden_size), "nonemb": total - emb,
            "params": total}


# ---------------------------------------------------------------------------------------------- data
@dataclass(frozen=True)
class LengthSpec:
    """Token-length distribution of the benchmark batches (module docstring)."""

    query_max: int = 32
    passage_max: int = 128
    query_median: float = 12.0
    query_sigma: float = 0.5
    passage_median: float = 80.0
    passage_sigma: float = 0.6
    min_len: int = 4


def sample_lengths(n: int, median: float, sigma: float, lo: int, hi: int, g: torch.Generator) -> Tensor:
    z = torch.randn(n, generator=g, dtype=torch.float64)
    return torch.exp(math.log(median) + sigma * z).round().clamp(lo, hi).long()


def _padded(lengths: Tensor, vocab: int, pad_id: int, g: torch.Generator, multiple: int = 8):
    width = int(lengths.max())
    width = -(-width // multiple) * multiple
    mask = (torch.arange(width) < lengths[:, None]).long()
    ids = torch.randint(5, vocab, (len(lengths), width), generator=g)
    ids[:, 0] = 0  # <s>
    ids[torch.arange(len(lengths)), lengths - 1] = 2  # </s>
    ids = torch.where(mask.bool(), ids, torch.full_like(ids, pad_id))
    return ids, mask


def make_batch(n_pairs: int, mode: str, *, vocab: int, pad_id: int, spec: LengthSpec = LengthSpec(), seed: int = 0):
    """A stage-1 batch in the collator's layout (G = 1), random token ids, distinct passage hashes."""
    g = torch.Generator().manual_seed(seed)
    if mode == "fixed":
        q_len = torch.full((n_pairs,), spec.query_max)
        p_len = torch.full((n_pairs,), spec.passage_max)
    elif mode == "variable":
        q_len = sample_lengths(n_pairs, spec.query_median, spec.query_sigma, spec.min_len, spec.query_max, g)
        p_len = sample_lengths(n_pairs, spec.passage_median, spec.passage_sigma, spec.min_len, spec.passage_max, g)
    else:
        raise ValueError(f"unknown length mode {mode!r}; choose fixed or variable")
    q_ids, q_mask = _padded(q_len, vocab, pad_id, g)
    p_ids, p_mask = _padded(p_len, vocab, pad_id, g)
    return {
        "query_input_ids": q_ids, "query_attention_mask": q_mask,
        "passage_input_ids": p_ids, "passage_attention_mask": p_mask,
        "group_size": 1, "passage_hash": torch.randperm(n_pairs, generator=g) * 7919 + 13,
        "n_truncated_queries": 0, "n_truncated_passages": 0,
    }


# ---------------------------------------------------------------------------------------------- FLOPs
def transformer_flops(rows_and_widths: Sequence[tuple[int, int | Tensor]], dims: dict, *, fwd_bwd: bool = True) -> float:
    """FLOPs of the transformer body over sequences: ``rows`` sequences of ``width`` tokens each.

    6·N per token (2·N forward + 4·N backward) plus attention 12·layers·hidden·width² per sequence (4·… forward:
    QKᵀ and AV); forward only: a third of each.
    """
    total = 0.0
    for rows, width in rows_and_widths:
        w = float(width)
        total += rows * (6.0 * dims["nonemb"] * w + 12.0 * dims["layers"] * dims["hidden"] * w * w)
    return total if fwd_bwd else total / 3.0


def useful_flops(batch: dict, dims: dict) -> float:
    lengths = [batch[f"{s}_attention_mask"].sum(1) for s in ("query", "passage")]
    return transformer_flops([(1, int(x)) for ls in lengths for x in ls], dims)


def chunk_shapes(mask: Tensor, method: str, *, mini_batch: int, chunk_tokens: int) -> list[tuple[int, int]]:
    """(rows, computed width) of the encoder work of one side, as each method cuts it.

    ``packed``: one ``(1, length)`` per row whatever the chunking: a packed chunk computes every row's tokens
    once, with attention inside the row (so its executed FLOPs are the useful FLOPs).
    """
    from me5.gradcache import plan_chunks, split_by_rows

    lengths = mask.sum(1)
    if method == "packed":
        return [(1, int(x)) for x in lengths]
    if method == "naive":
        return [(mask.size(0), mask.size(1))]  # one call over the padded batch
    if method == "ours":
        order, chunks = plan_chunks(mask, chunk_tokens=chunk_tokens, sort_by_length=True)
        if order is not None:
            lengths = lengths[order.to(lengths.device)]
    else:  # ours-rows and st: rows in batch order, each chunk trimmed to its longest row
        chunks = split_by_rows(mask.size(0), mini_batch)
    return [(sl.stop - sl.start, int(lengths[sl].max())) for sl in chunks]


def executed_shapes(call_shapes: Sequence[tuple[int, int] | None], method: str) -> list[tuple[int, int]] | None:
    """The (rows, width) of each encoder chunk from the inputs of one step's encoder calls, or None when they
    are not padded matrices (``packed``). GradCache methods call the encoder twice per chunk (the no-grad pass,
    then the re-forward in the same order), so the first half of the calls are the chunks."""
    if not call_shapes or any(s is None for s in call_shapes):
        return None
    if method == "naive":
        return list(call_shapes)
    return list(call_shapes[: len(call_shapes) // 2])


# ---------------------------------------------------------------------------------------------- timing helpers
def measure_peak_flops(device: torch.device, *, seconds: float = 0.5) -> tuple[float, str]:
    """The best matmul FLOP/s measured here: bf16 n=8192 on CUDA, fp32 n=1024 on CPU."""
    if device.type == "cuda":
        n, dtype = 8192, torch.bfloat16
    else:
        n, dtype = 1024, torch.float32
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    sync(device)
    best, t_end = 0.0, time.perf_counter() + seconds
    while True:
        t0 = time.perf_counter()
        for _ in range(10 if device.type == "cuda" else 1):
            a @ b
        sync(device)
        dt = time.perf_counter() - t0
        best = max(best, (10 if device.type == "cuda" else 1) * 2.0 * n**3 / dt)
        if time.perf_counter() > t_end:
            break
    return best, f"{str(dtype).replace('torch.', '')} matmul {n}x{n}x{n}"


def _is_oom(err: BaseException) -> bool:
    return isinstance(err, torch.cuda.OutOfMemoryError) or "out of memory" in str(err).lower()


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# ---------------------------------------------------------------------------------------------- the methods
def _to(batch: dict, device: torch.device) -> dict:
    return {k: (v.to(device, non_blocking=True) if torch.is_tensor(v) else v) for k, v in batch.items()}


def _optimizer(params, device: torch.device):
    fused = {"fused": True} if device.type == "cuda" else {}
    return torch.optim.AdamW(params, lr=1e-5, weight_decay=0.01, **fused)


def ours_step_fn(encoder, device, *, chunk_tokens: int | None, chunk_rows: int | None, sort: bool) -> Callable:
    """A step of our module (GradCache when a chunk size is given), with clipping and AdamW.

    The returned ``step(batch)`` has ``step.grad_step(batch)`` (the loss and its backward only, what
    ``--host-cost`` counts), ``step.counted`` (the module whose calls are the encoder calls) and ``step.cleanup()``.
    """
    from me5.batching import BatchPlan
    from me5.losses import InfoNCE, WeightedLoss
    from me5.training import ContrastivePretraining

    module = ContrastivePretraining(
        encoder, WeightedLoss({"infonce": InfoNCE(temperature=0.01)}, {"infonce": 1.0}),
        optimizer=functools.partial(torch.optim.AdamW, lr=1e-5, weight_decay=0.01),
        # the benchmark feeds batches of several sizes: the module reads only the plan's chunking fields
        batch_plan=None if chunk_tokens is None and chunk_rows is None else BatchPlan(
            global_batch_size=0, chunk_rows=chunk_rows, chunk_tokens=chunk_tokens, where="bench"),
        sort_by_length=sort, grad_clip=1.0,
    ).to(device)
    opt = _optimizer([p for p in module.parameters() if p.requires_grad], device)

    def grad_step(batch: dict) -> Tensor:
        return module.compute_loss_and_backward(batch).loss

    return _optimizer_step(grad_step, module.parameters, opt, counted=encoder)


def _optimizer_step(grad_step: Callable[[dict], Tensor], parameters: Callable, opt, *, counted) -> Callable:
    """One training step around ``grad_step`` (loss and backward): clip at 1.0, step, zero the gradients. It carries
    ``grad_step``, ``counted`` (the module whose calls are the encoder calls) and ``cleanup()``."""

    def step(batch: dict) -> Tensor:
        loss = grad_step(batch)
        torch.nn.utils.clip_grad_norm_(parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    step.grad_step = grad_step  # type: ignore[attr-defined]
    step.counted = counted  # type: ignore[attr-defined]
    step.cleanup = lambda: opt.state.clear()  # type: ignore[attr-defined]
    return step


def save_st_folder(encoder, folder: Path) -> Path:
    """Our backbone's weights and config plus a stand-in tokenizer (the batches are already token ids)."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    encoder.backbone.save_pretrained(folder)
    vocab = {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3}
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="<unk>")),
                                  bos_token="<s>", pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
                                  model_max_length=int(encoder.backbone.config.max_position_embeddings) - 2)
    tok.save_pretrained(folder)
    return folder


def load_st_model(folder: Path, dim: int, device: torch.device, attn_implementation: str):
    from sentence_transformers import SentenceTransformer
    try:  # sentence-transformers >= 6 (the old path still works there, with a deprecation warning)
        from sentence_transformers.sentence_transformer.modules import Normalize, Pooling, Transformer
    except ImportError:  # older releases
        from sentence_transformers.models import Normalize, Pooling, Transformer

    transformer = Transformer(str(folder), model_kwargs={"attn_implementation": attn_implementation})
    return SentenceTransformer(modules=[transformer, Pooling(dim, "mean"), Normalize()], device=str(device))


def st_step_fn(st_model, device, *, mini_batch: int, scale: float = 100.0) -> Callable:
    """A step of sentence-transformers' cached loss; its mini-batches are labelled for the profiler
    (:func:`benchmarks.step_profile.label_st_chunks`). Same attributes as :func:`ours_step_fn`'s step."""
    try:
        from sentence_transformers.sentence_transformer.losses import CachedMultipleNegativesRankingLoss
    except ImportError:  # older releases
        from sentence_transformers.losses import CachedMultipleNegativesRankingLoss

    from benchmarks.step_profile import label_st_chunks

    st_model.train()
    loss_fn = CachedMultipleNegativesRankingLoss(st_model, scale=scale, mini_batch_size=mini_batch)
    label_st_chunks(loss_fn)
    opt = _optimizer([p for p in st_model.parameters() if p.requires_grad], device)

    def grad_step(batch: dict) -> Tensor:
        features = [
            {"input_ids": batch[f"{s}_input_ids"], "attention_mask": batch[f"{s}_attention_mask"]}
            for s in ("query", "passage")
        ]
        loss = loss_fn(features, None)
        loss.backward()
        return loss.detach()

    return _optimizer_step(grad_step, st_model.parameters, opt, counted=st_model)


@torch.no_grad()
def st_matches_ours(encoder, st_model, batch: dict) -> float:
    """Max |difference| of the two models' eval-mode embeddings of a few passages (same weights check)."""
    enc_mode, st_mode = encoder.training, st_model.training
    encoder.eval()
    st_model.eval()
    ids, mask = batch["passage_input_ids"][:4], batch["passage_attention_mask"][:4]
    ours = encoder(ids, mask)
    theirs = st_model({"input_ids": ids, "attention_mask": mask})["sentence_embedding"]
    encoder.train(enc_mode)
    st_model.train(st_mode)
    return float((ours.float() - theirs.float()).abs().max())


def chunking_label(method: str, *, mini_batch: int, chunk_tokens: int, packed_attention_dropout: str | None) -> str:
    if method == "ours":
        return f"tokens≤{chunk_tokens}, sorted"
    if method == "packed":
        return f"real tokens≤{chunk_tokens}, attn dropout {packed_attention_dropout or 'default'}"
    if method == "naive":
        return "none"
    return f"rows={mini_batch}"


# ---------------------------------------------------------------------------------------------- the grid
@dataclass(frozen=True)
class Point:
    """One grid point: a model, a global batch, a length mode, the methods to run there and (optionally) the
    number of timed steps of its rows."""

    model: str
    batch: int
    lengths: str
    methods: tuple[str, ...]
    steps: int | None = None

    @classmethod
    def parse(cls, text: str, *, methods: Sequence[str]) -> Point:
        """``model/batch/lengths[:method,method...][@steps]``, e.g. ``large/32768/variable:packed,st@1``."""
        spec, _, steps = text.strip().partition("@")
        where, _, listed = spec.partition(":")
        try:
            model, batch, lengths = where.split("/")
            point = cls(model, int(batch), lengths, tuple(m for m in listed.split(",") if m) or tuple(methods),
                        int(steps) if steps else None)
        except ValueError as err:
            raise ValueError(f"bad grid point {text!r}: expected model/batch/lengths[:methods][@steps]") from err
        point.check()
        return point

    def check(self) -> None:
        if self.model not in MODEL_SHAPES:
            raise ValueError(f"unknown model {self.model!r}; choose from {sorted(MODEL_SHAPES)}")
        if self.lengths not in ("fixed", "variable"):
            raise ValueError(f"unknown length mode {self.lengths!r}; choose fixed or variable")
        bad = [m for m in self.methods if m not in METHODS]
        if bad:
            raise ValueError(f"unknown method(s) {bad}; choose from {list(METHODS)}")
        if self.steps is not None and self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")


@dataclass
class BenchConfig:
    device: str = "auto"
    models: tuple[str, ...] = ()
    batches: tuple[int, ...] = ()
    lengths: tuple[str, ...] = ("fixed", "variable")
    methods: tuple[str, ...] = ("ours", "packed", "naive", "st")
    points: tuple[Point, ...] = ()  # explicit grid points, in order (default: models × lengths × batches)
    mini_batch: dict[str, int] = field(default_factory=dict)
    precision: str = "auto"  # bf16 on CUDA, fp32 on CPU
    attn_implementation: str = "sdpa"
    compile: bool = False
    steps: int | None = None  # timed steps per row (default: 3 on CUDA, 2 on CPU)
    warmup_steps: int = 1  # untimed steps at the timed shape before them
    deadline: float | None = None  # Unix time: skip or shorten rows that would end after it
    packed_attention_dropout: str | None = None  # None: the encoder's default
    profile: bool = False  # profile one steady-state step at profile_at (module docstring)
    profile_at: str | None = None  # model/batch/lengths (default: base/32768/variable on CUDA, tiny/64/variable on CPU)
    profile_methods: tuple[str, ...] = ("ours", "packed", "st")
    out: Path | None = None  # profile.md and the traces go here
    seed: int = 0
    spec: LengthSpec = field(default_factory=LengthSpec)

    def resolved(self) -> BenchConfig:
        dev = self.device
        if dev == "auto":
            dev = "cuda" if torch.cuda.is_available() else "cpu"
        gpu = dev.startswith("cuda")
        models = self.models or (("small", "base", "large") if gpu else ("tiny",))
        batches = self.batches or ((1024, 4096, 32768) if gpu else (64, 256))
        points = list(self.points) or [Point(m, b, mode, tuple(self.methods))
                                       for m in models for mode in self.lengths for b in batches]
        profile_at = self.profile_at or ("base/32768/variable" if gpu else "tiny/64/variable")
        if self.profile:  # the profiled point goes first, with the profiled methods among its own
            at = Point.parse(profile_at, methods=self.profile_methods)
            i = next((k for k, p in enumerate(points) if (p.model, p.batch, p.lengths) == (at.model, at.batch, at.lengths)), None)
            if i is None:
                points.insert(0, at)
            else:
                p = points.pop(i)
                extra = tuple(m for m in self.profile_methods if m not in p.methods)
                points.insert(0, Point(p.model, p.batch, p.lengths, p.methods + extra, p.steps))
        for p in points:
            p.check()
        return BenchConfig(
            device=dev, models=models, batches=batches, lengths=self.lengths, methods=self.methods,
            points=tuple(points), mini_batch={**DEFAULT_MINI_BATCH, **self.mini_batch},
            precision=("bf16" if gpu else "fp32") if self.precision == "auto" else self.precision,
            attn_implementation=self.attn_implementation, compile=self.compile,
            steps=self.steps or (3 if gpu else 2), warmup_steps=self.warmup_steps, deadline=self.deadline,
            packed_attention_dropout=self.packed_attention_dropout, profile=self.profile, profile_at=profile_at,
            profile_methods=self.profile_methods, out=self.out, seed=self.seed, spec=self.spec,
        )


def _autocast(device: torch.device, precision: str):
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    return torch.autocast(device_type=device.type, dtype=dtype)


def _run(step: Callable, batch: dict, device: torch.device, precision: str):
    """One step under the precision's autocast, without waiting for the device (what ``--profile`` records)."""
    with _autocast(device, precision):
        return step(batch)


def _timed(step: Callable, batch: dict, device: torch.device, precision: str) -> tuple[float, float]:
    """One step, synchronised before and after: (seconds, loss)."""
    sync(device)
    t0 = time.perf_counter()
    with _autocast(device, precision):
        loss = step(batch)
    sync(device)
    return time.perf_counter() - t0, float(loss)


class _Models:
    """The grid's models, built once each (on the CPU between rows): the encoder, its packed twin with the same
    weights, and sentence-transformers' model loaded from the same weights."""

    def __init__(self, cfg: BenchConfig, attn: str, tmp: Path):
        self.cfg, self.attn, self.tmp = cfg, attn, tmp
        self.cache: dict[str, dict] = {}
        self.meta_dims: dict[str, dict[str, int]] = {}

    def get(self, model: str, methods: Sequence[str]) -> dict:
        entry = self.cache.get(model)
        if entry is None:
            encoder = build_encoder(model, attn_implementation=self.attn, seed=self.cfg.seed)
            if self.cfg.compile:
                encoder.backbone.compile(dynamic=True)
            entry = self.cache[model] = {"encoder": encoder, "dims": model_dims(encoder)}
        if "st" in methods and "st" not in entry:
            shape = MODEL_SHAPES[model]
            folder = save_st_folder(entry["encoder"], self.tmp / model)
            st_model = load_st_model(folder, entry["dims"]["hidden"], torch.device("cpu"), self.attn)
            probe = make_batch(4, "variable", vocab=shape["vocab_size"], pad_id=shape["pad_token_id"], seed=99)
            entry["st"] = (st_model, st_matches_ours(entry["encoder"], st_model, probe))
        if "packed" in methods and "packed" not in entry:
            try:
                packed = build_encoder(model, attn_implementation=self.attn, seed=self.cfg.seed, packed=True,
                                       packed_attention_dropout=self.cfg.packed_attention_dropout)
                packed.load_state_dict(entry["encoder"].state_dict())
                if self.cfg.compile:
                    packed.backbone.compile(dynamic=True)
                entry["packed"] = packed
            except Exception as err:  # noqa: BLE001 - a packed encoder this version cannot build is a row status
                entry["packed"] = err
        return entry

    def dims(self, model: str) -> dict[str, int]:
        """:func:`model_dims` without building the weights (a meta-device model) unless they exist already."""
        if model in self.cache:
            return self.cache[model]["dims"]
        if model not in self.meta_dims:
            with torch.device("meta"):
                self.meta_dims[model] = model_dims(build_encoder(model, attn_implementation=self.attn))
        return self.meta_dims[model]

    def drop(self, model: str) -> None:
        self.cache.pop(model, None)


def _estimate(history: list[tuple[str, float, float]], method: str, executed: float) -> float | None:
    """Seconds a step of ``executed`` FLOPs should take, from earlier rows' (method, FLOPs, seconds):
    the same method's slowest rate, else the slowest of any."""
    same = [s / f for m, f, s in history if m == method]
    rates = same or [s / f for _, f, s in history]
    return max(rates) * executed if rates else None


def _fill_vs_ours(point_rows: Sequence[dict]) -> None:
    """``vs_ours`` and ``vs_st``: pairs/s over those of the point's ``ours`` and ``st`` rows (None until they ran)."""
    for ref in ("ours", "st"):
        base = next((r for r in point_rows if r["method"] == ref and r["status"] == "ok"), None)
        for r in point_rows:
            r[f"vs_{ref}"] = (r["pairs_per_s"] / base["pairs_per_s"]) if base and r["status"] == "ok" else None


def run_bench(cfg: BenchConfig, *, log: Callable[[str], None] = print,
              on_update: Callable[[list[dict]], None] | None = None, on_profile: Callable[[list], None] | None = None):
    """Run the grid; returns ``(rows, meta)``. ``on_update`` sees all rows so far each time a row is measured
    (so a run cut short keeps them; ``vs ours`` fills in once the point's ``ours`` row is done); ``on_profile``
    sees the profile results so far."""
    from benchmarks.step_profile import CHUNK_RANGES, count_calls, profile_step
    from me5.models.encoder import resolve_attn_implementation

    cfg = cfg.resolved()
    device = torch.device(cfg.device)
    attn = resolve_attn_implementation(cfg.attn_implementation)
    peak, peak_desc = measure_peak_flops(device)
    meta = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)",
        "torch": torch.__version__, "precision": cfg.precision, "attn_implementation": attn,
        "peak_flops": peak, "peak_desc": peak_desc, "length_spec": asdict(cfg.spec), "compile": cfg.compile,
        "steps": cfg.steps, "warmup_steps": cfg.warmup_steps,
    }
    log(f"# device {meta['device']}; measured peak {peak / 1e12:.2f} TFLOP/s ({peak_desc}); precision {cfg.precision}; "
        f"{cfg.warmup_steps} warm-up + {cfg.steps} timed steps per row")
    rows: list[dict] = []
    profiles: list = []
    history: list[tuple[str, float, float]] = []  # (method, executed FLOPs, seconds per step) of finished rows
    last_use = {p.model: i for i, p in enumerate(cfg.points)}
    tmp = tempfile.TemporaryDirectory(prefix="me5-bench-")
    models = _Models(cfg, attn, Path(tmp.name))
    try:
        for index, point in enumerate(cfg.points):
            model, n_pairs, mode = point.model, point.batch, point.lengths
            steps = point.steps or cfg.steps
            dims, shape = models.dims(model), MODEL_SHAPES[model]
            mini = int(cfg.mini_batch[model])
            chunk_tokens = mini * cfg.spec.passage_max
            batch_cpu = make_batch(n_pairs, mode, vocab=shape["vocab_size"], pad_id=shape["pad_token_id"],
                                   spec=cfg.spec, seed=cfg.seed)
            useful = useful_flops(batch_cpu, dims)
            real_tokens = int(batch_cpu["query_attention_mask"].sum() + batch_cpu["passage_attention_mask"].sum())
            profiled_here = cfg.profile and index == 0
            grid_rows = []

            def emit(row: dict, grid_rows=grid_rows) -> None:  # a finished (or skipped) row: table, log, callback
                grid_rows.append(row)
                rows.append(row)
                _fill_vs_ours(grid_rows)
                log(format_row(row))
                if on_update is not None:
                    on_update(rows)

            for method in point.methods:
                row = {"model": model, "batch": n_pairs, "lengths": mode, "method": method, "mini_batch": mini,
                       "nonemb_params": dims["nonemb"], "real_tokens": real_tokens,
                       "chunking": chunking_label(method, mini_batch=mini, chunk_tokens=chunk_tokens,
                                                  packed_attention_dropout=cfg.packed_attention_dropout)}
                shapes = [s for side in ("query", "passage")
                          for s in chunk_shapes(batch_cpu[f"{side}_attention_mask"], method, mini_batch=mini,
                                                chunk_tokens=chunk_tokens)]
                executed = transformer_flops(shapes, dims)
                row["pad_share"], row["pad_from"] = 1.0 - useful / executed, "planned"
                estimate = _estimate(history, method, executed)
                if cfg.deadline is not None and estimate is not None and \
                        time.time() + (cfg.warmup_steps + 1) * estimate > cfg.deadline:
                    row["status"] = f"skipped: deadline (~{estimate:.0f} s/step)"
                    emit(row)
                    continue
                step, target = None, None
                try:
                    entry = models.get(model, [method])  # built when first needed: a skipped row builds nothing
                    target = entry["encoder"]
                    if method == "st":
                        st_model, row["st_max_abs_diff"] = entry["st"]
                        target = st_model
                        st_model.to(device)
                        step = st_step_fn(st_model, device, mini_batch=mini)
                    else:
                        if method == "packed":
                            if isinstance(entry["packed"], Exception):
                                raise entry["packed"]
                            target = entry["packed"]
                            row["chunking"] = chunking_label(  # the dropout setting the encoder actually has
                                method, mini_batch=mini, chunk_tokens=chunk_tokens,
                                packed_attention_dropout=getattr(target, "packed_attention_dropout", None))
                        target.to(device)
                        step = ours_step_fn(
                            target, device,
                            chunk_tokens=chunk_tokens if method in ("ours", "packed") else None,
                            chunk_rows=mini if method == "ours-rows" else None,
                            sort=method == "ours",
                        )
                    batch = _to(batch_cpu, device)
                    warm = [_timed(step, batch, device, cfg.precision)[0] for _ in range(cfg.warmup_steps)]
                    row["warmup_s"] = warm[0] if warm else None
                    if profiled_here and method in cfg.profile_methods:
                        log(f"# profiling one {method} step at {model}/{n_pairs}/{mode}")
                        trace = cfg.out / f"trace_{method}.json.gz" if cfg.out is not None else None
                        try:
                            result = profile_step(
                                method, functools.partial(_run, step, batch, device, cfg.precision), device=device,
                                chunk_ranges=CHUNK_RANGES["st" if method == "st" else "me5"], trace_path=trace)
                        except Exception as err:  # noqa: BLE001 - the row's timing still counts without it
                            if _is_oom(err):
                                raise
                            log(f"# profile of {method} failed: {type(err).__name__}: {err}")
                            row["profile_error"] = f"{type(err).__name__}: {str(err)[:200]}"
                        else:
                            result.notes.append(f"\n({model}, {n_pairs} pairs, {mode} lengths, {row['chunking']}; "
                                                f"profiler post-processing {result.figures['profiler_post_s']:.1f} s)")
                            profiles.append(result)
                            if on_profile is not None:
                                on_profile(profiles)
                    n_timed = steps
                    if cfg.deadline is not None and warm:
                        n_timed = max(1, min(steps, int((cfg.deadline - time.time()) // max(warm[-1], 1e-9))))
                    if device.type == "cuda":
                        torch.cuda.reset_peak_memory_stats(device)
                    times, loss = [], float("nan")
                    with count_calls(target) as calls:
                        for _ in range(n_timed):
                            seconds, loss = _timed(step, batch, device, cfg.precision)
                            times.append(seconds)
                    measured = executed_shapes(calls.shapes[: calls.n // len(times)], method)
                    if measured is not None:  # what the method computed, e.g. ST's version may not trim
                        row["pad_share"] = 1.0 - useful / transformer_flops(measured, dims)
                        row["pad_from"] = "measured"
                    mem = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
                    med = statistics.median(times)
                    row.update(status="ok", steps=len(times), step_s=med, step_min_s=min(times),
                               step_max_s=max(times), loss=loss, peak_mem_gib=mem, pairs_per_s=n_pairs / med,
                               tokens_per_s=real_tokens / med, mfu=useful / med / peak,
                               encoder_calls=calls.n / len(times))
                    history.append((method, executed, med))
                except Exception as err:  # noqa: BLE001 - an OOM (or a failure) is a row, not a crash
                    if not _is_oom(err):
                        row["status"] = f"error: {type(err).__name__}: {(str(err).splitlines() or [''])[0][:120]}"
                    else:
                        row["status"] = "OOM"
                finally:
                    if step is not None:
                        step.cleanup()
                    del step
                    if target is not None:
                        target.to("cpu")
                        target.zero_grad(set_to_none=True)
                    _free(device)
                emit(row)
            if last_use[model] == index:
                models.drop(model)
                _free(device)
    finally:
        tmp.cleanup()
    meta["profiles"] = [p.method for p in profiles]
    return rows, meta


# ---------------------------------------------------------------------------------------------- host cost
#: the --host-cost batch's lengths: the op and sync counts do not depend on the lengths, so short rows keep a
#: CPU run at the real base shape to seconds per step
HOST_COST_LENGTHS = LengthSpec(query_max=16, passage_max=32, query_median=8.0, passage_median=20.0)


def host_cost_for(method: str, model: str = "base", *, n_pairs: int = 4, chunks: tuple[int, int] = (1, 2),
                  lengths: str = "variable", spec: LengthSpec = HOST_COST_LENGTHS, device: str = "cpu",
                  precision: str = "fp32", attn: str = "sdpa", seed: int = 0, work: Path | None = None,
                  packed_attention_dropout: str | None = None) -> dict:
    """Ops and sync-forcing ops of one GradCache step (loss and backward; no clipping or optimiser) of
    ``method`` at about ``chunks[0]`` and ``chunks[1]`` chunks per side, split into per chunk and per step
    (:func:`benchmarks.step_profile.per_chunk`). Each side's budget is ``ceil(n_pairs / k)`` rows (``ours-rows``,
    ``st``) or that many rows of the longest length (``ours``, ``packed``), so short queries take fewer chunks;
    the split uses the encoder calls actually made. The counts are the same from the first step on (no
    warm-up is needed), and the gradients are reset before each run (accumulating into them adds ops)."""
    from benchmarks.step_profile import host_cost, per_chunk

    if method not in GRADCACHE_METHODS:
        raise ValueError(f"host cost is measured for the GradCache methods {list(GRADCACHE_METHODS)}, not {method!r}")
    dev = torch.device(device)
    shape = MODEL_SHAPES[model]
    batch = _to(make_batch(n_pairs, lengths, vocab=shape["vocab_size"], pad_id=shape["pad_token_id"], spec=spec,
                           seed=seed), dev)
    encoder = build_encoder(model, attn_implementation=attn, seed=seed, packed=method == "packed",
                            packed_attention_dropout=packed_attention_dropout)
    rows = [-(-n_pairs // k) for k in chunks]
    tmp = None
    if method == "st":
        tmp = tempfile.TemporaryDirectory(prefix="me5-hostcost-") if work is None else None
        folder = save_st_folder(encoder, Path(work or tmp.name) / model)
        st_model = load_st_model(folder, model_dims(encoder)["hidden"], dev, attn)
        steps = [st_step_fn(st_model, dev, mini_batch=r) for r in rows]
        label = f"rows={rows[0]} → {rows[1]}"
    else:
        encoder.to(dev)
        width = spec.passage_max
        steps = [ours_step_fn(encoder, dev, chunk_tokens=None if method == "ours-rows" else r * width,
                              chunk_rows=r if method == "ours-rows" else None, sort=method == "ours") for r in rows]
        label = (f"rows={rows[0]} → {rows[1]}" if method == "ours-rows"
                 else f"{'real ' if method == 'packed' else ''}tokens≤{rows[0] * width} → {rows[1] * width}")
    try:
        params = [p for p in steps[0].counted.parameters()]
        costs = []
        for step in steps:
            for p in params:
                p.grad = None
            with _autocast(dev, precision):
                costs.append(host_cost(step.grad_step, batch, step.counted))
        out = per_chunk(*costs)
        out.update(method=method, model=model, chunking=label, pairs=n_pairs, lengths=lengths,
                   length_spec=asdict(spec), sync_ops=costs[1].syncs, sync_sites=costs[1].sites)
        return out
    finally:
        if tmp is not None:
            tmp.cleanup()


def host_cost_rows(model: str = "base", *, methods: Sequence[str] = ("ours", "packed", "st"),
                   log: Callable[[str], None] = print, **kwargs) -> list[dict]:
    """:func:`host_cost_for` of each method; a method that cannot run here is a row with its error."""
    rows = []
    for method in methods:
        t0 = time.perf_counter()
        try:
            rows.append(host_cost_for(method, model, **kwargs))
        except Exception as err:  # noqa: BLE001 - e.g. no packed encoder in this version: a row, not a crash
            rows.append({"method": method, "model": model, "error": f"{type(err).__name__}: {str(err)[:100]}"})
        log(f"# host cost {model} {method}: {time.perf_counter() - t0:.1f} s")
    return rows


# ---------------------------------------------------------------------------------------------- output
COLUMNS = ("model", "batch", "lengths", "method", "chunking", "status", "steps", "step s", "min–max s",
           "warm-up s", "pairs/s", "tok/s", "MFU", "mem GiB", "pad", "vs ours", "vs st")


def _cells(r: dict) -> list[str]:
    ok = r.get("status") == "ok"

    def num(key, fmt):
        v = r.get(key)
        return fmt.format(v) if ok and v is not None else "-"

    spread = f"{r['step_min_s']:.3f}–{r['step_max_s']:.3f}" if ok else "-"
    warm = f"{r['warmup_s']:.3f}" if r.get("warmup_s") is not None else "-"
    return [r["model"], str(r["batch"]), r["lengths"], r["method"], r.get("chunking", ""), r.get("status", ""),
            num("steps", "{}"), num("step_s", "{:.3f}"), spread, warm, num("pairs_per_s", "{:,.0f}"),
            num("tokens_per_s", "{:,.0f}"), num("mfu", "{:.1%}"), num("peak_mem_gib", "{:.1f}"),
            f"{r['pad_share']:.0%}", num("vs_ours", "{:.2f}×"), num("vs_st", "{:.2f}×")]


def format_row(r: dict) -> str:
    return "| " + " | ".join(_cells(r)) + " |"


def format_table(rows: Sequence[dict], meta: dict | None = None) -> str:
    lines = []
    if meta:
        lines.append(f"device: {meta['device']}; torch {meta['torch']}; precision {meta['precision']}; "
                     f"attention {meta['attn_implementation']}; compile {meta['compile']}; measured peak "
                     f"{meta['peak_flops'] / 1e12:.2f} TFLOP/s ({meta['peak_desc']}); {meta['warmup_steps']} "
                     f"warm-up step(s) at the timed shape, then {meta['steps']} timed (median; min–max)")
        lines.append("")
    lines.append("| " + " | ".join(COLUMNS) + " |")
    lines.append("|" + "|".join("---" if i < 6 else "---:" for i in range(len(COLUMNS))) + "|")
    lines.extend(format_row(r) for r in rows)
    return "\n".join(lines)


def _write_profiles(out: Path, results: Sequence, header: str) -> None:
    from benchmarks.step_profile import format_profile, format_profile_summary, profile_json

    parts = [f"# One profiled steady-state step per method\n\n{header}\n", format_profile_summary(results)]
    parts += [format_profile(r, header=f"## {r.method}") for r in results]
    (out / "profile.md").write_text("\n\n".join(parts) + "\n")
    (out / "profile.jsonl").write_text("".join(profile_json(r) + "\n" for r in results))


def _csv(text: str, cast=str) -> tuple:
    return tuple(cast(x) for x in text.split(",") if x.strip())


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.train_step", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto", help="auto (cuda when available), cpu or cuda[:i]")
    p.add_argument("--models", default="", help=f"comma list of {sorted(MODEL_SHAPES)} (default: tiny on CPU; small,base,large on GPU)")
    p.add_argument("--batches", default="", help="global batch sizes in pairs (default: 64,256 on CPU; 1024,4096,32768 on GPU)")
    p.add_argument("--lengths", default="fixed,variable", help="fixed and/or variable")
    p.add_argument("--methods", default=None, help=f"comma list of {list(METHODS)} (default: ours,packed,naive,st; "
                                                   "with --host-cost: ours,packed,st)")
    p.add_argument("--points", default="", help="explicit grid points in order, ';'-separated "
                                                "model/batch/lengths[:methods][@steps] (replaces models x lengths x batches)")
    p.add_argument("--mini-batch", default="", help="model=rows,... per GradCache chunk / ST mini_batch_size "
                                                   f"(default {DEFAULT_MINI_BATCH})")
    p.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp16", "fp32"])
    p.add_argument("--attn", default="sdpa", help="attn_implementation: sdpa, eager, flash_attention_2 or auto")
    p.add_argument("--packed-attention-dropout", default=None, choices=["keep", "off"],
                   help="the packed method's attention-probability dropout (default: the encoder's own default)")
    p.add_argument("--compile", action="store_true", help="torch.compile our backbone (ours/packed/naive rows)")
    p.add_argument("--steps", type=int, default=None, help="timed steps per row (default: 3 on GPU, 2 on CPU)")
    p.add_argument("--warmup-steps", type=int, default=1, help="untimed steps at the timed shape before them")
    p.add_argument("--deadline", type=float, default=None,
                   help="Unix time: rows that would end later are skipped or get fewer timed steps")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--out", default=None, help="folder for bench.md, bench.jsonl, meta.json (and profile.md, traces)")
    p.add_argument("--append", action="store_true", help="keep the rows already in --out's bench.jsonl (a second run)")
    p.add_argument("--profile", action="store_true",
                   help="profile one steady-state step of ours, packed and st at --profile-at (run first)")
    p.add_argument("--profile-at", default=None,
                   help="model/batch/lengths (default: base/32768/variable on GPU, tiny/64/variable on CPU)")
    p.add_argument("--host-cost", action="store_true",
                   help="instead of the grid: aten ops and sync-forcing ops per GradCache chunk and per step")
    p.add_argument("--host-cost-pairs", type=int, default=4, help="pairs of the --host-cost batch")
    p.add_argument("--host-cost-chunks", default="1,2", help="the two chunk counts per side of --host-cost")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # the ST folder's load report and progress bars would bury the table
    hf_logging.disable_progress_bar()
    out = Path(args.out) if args.out else None
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
    if (args.steps is not None and args.steps < 1) or args.warmup_steps < 0:
        p.error("--steps must be >= 1 and --warmup-steps >= 0")
    default_methods = "ours,packed,st" if args.host_cost else "ours,packed,naive,st"
    methods = _csv(args.methods or default_methods)
    bad = [m for m in methods if m not in METHODS]
    if bad:
        p.error(f"unknown method(s) {bad}; choose from {list(METHODS)}")

    if args.host_cost:
        from benchmarks.step_profile import format_host_cost

        device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
        model = (_csv(args.models) or ("base",))[0]
        precision = ("bf16" if device.startswith("cuda") else "fp32") if args.precision == "auto" else args.precision
        chunks = _csv(args.host_cost_chunks, int)
        if len(chunks) != 2 or chunks[0] == chunks[1]:
            p.error("--host-cost-chunks takes two different chunk counts, e.g. 1,2")
        rows = host_cost_rows(model, methods=methods, n_pairs=args.host_cost_pairs, chunks=chunks, device=device,
                              precision=precision, attn=args.attn, packed_attention_dropout=args.packed_attention_dropout,
                              log=lambda s: print(s, flush=True))
        spec = HOST_COST_LENGTHS
        title = (f"Host cost of one GradCache step (loss + backward), {model} shape, {args.host_cost_pairs} pairs, "
                 f"variable lengths (queries ≤ {spec.query_max}, passages ≤ {spec.passage_max} tokens), {device}, "
                 f"{precision}, torch {torch.__version__}")
        table = format_host_cost(rows, title=title)
        print("\n" + table)
        if out is not None:
            (out / "host_cost.md").write_text(table + "\n")
            (out / "host_cost.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        return 0

    mini = {k: int(v) for k, v in (kv.split("=") for kv in _csv(args.mini_batch))}
    try:
        points = tuple(Point.parse(t, methods=methods) for t in args.points.split(";") if t.strip())
        cfg = BenchConfig(device=args.device, models=_csv(args.models), batches=_csv(args.batches, int),
                          lengths=_csv(args.lengths), methods=methods, points=points, mini_batch=mini,
                          precision=args.precision, attn_implementation=args.attn, compile=args.compile,
                          steps=args.steps, warmup_steps=args.warmup_steps, deadline=args.deadline,
                          packed_attention_dropout=args.packed_attention_dropout, profile=args.profile,
                          profile_at=args.profile_at, out=out)
        cfg.resolved()
    except ValueError as err:
        p.error(str(err))

    before: list[dict] = []
    if args.append and out is not None and (out / "bench.jsonl").is_file():
        before = [json.loads(line) for line in (out / "bench.jsonl").read_text().splitlines() if line.strip()]

    def on_update(rows: list[dict]) -> None:  # the whole table each time: a run cut short keeps its rows
        if out is not None:
            (out / "bench.jsonl").write_text("".join(json.dumps(r) + "\n" for r in [*before, *rows]))
            (out / "bench.md").write_text(format_table([*before, *rows]) + "\n")

    def on_profile(results: list) -> None:
        if out is not None:
            _write_profiles(out, results, header=f"device: {torch.cuda.get_device_name() if torch.cuda.is_available() and cfg.device != 'cpu' else 'CPU'}; torch {torch.__version__}")

    print("| " + " | ".join(COLUMNS) + " |", flush=True)
    t0 = time.perf_counter()
    rows, meta = run_bench(cfg, log=lambda s: print(s, flush=True), on_update=on_update, on_profile=on_profile)
    table = format_table([*before, *rows], meta)
    print(f"\n{table}\n\n(total {time.perf_counter() - t0:.1f} s)")
    if out is not None:
        (out / "bench.md").write_text(table + "\n")
        (out / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
        if (out / "profile.md").exists():
            print(f"\nprofile: {out / 'profile.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
