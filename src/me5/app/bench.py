"""Throughput of one stage-1 optimiser step: ``python -m me5.app.bench`` (``make bench``).

One row per (model, global batch, length mode, method), where a step is: embed B queries and B passages,
InfoNCE over in-batch negatives (τ = 0.01, duplicate masking on), backward, gradient clipping, AdamW step.
Methods:

- ``ours``: :meth:`me5.training.EmbeddingModule.compute_loss_and_backward` with GradCache, chunks cut by a
  token budget of ``mini_batch × passage_max_length`` padded tokens, rows bucketed by length;
- ``ours-rows``: the same with chunks of ``mini_batch`` rows in batch order (optional; ST's chunking);
- ``naive``: the same module without caching (one forward/backward over the whole batch; OOM is caught);
- ``st``: sentence-transformers' ``CachedMultipleNegativesRankingLoss`` (``scale = 1/τ``,
  ``mini_batch_size = mini_batch``) on a ``SentenceTransformer(Transformer -> Pooling(mean) -> Normalize)``
  loaded from a folder holding our randomly initialised backbone (same weights, same batch, same precision).

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
padding count as overhead, not work; ``mem`` = peak allocated GPU memory of the step; ``pad`` = share of the
executed transformer FLOPs spent on padding (from each method's actual chunk shapes); ``vs ours`` = pairs/s
relative to ``ours`` at the same grid point.
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
METHODS = ("ours", "ours-rows", "naive", "st")


def build_encoder(model: str, *, attn_implementation: str = "sdpa", seed: int = 0):
    from me5.models.encoder import Encoder

    torch.manual_seed(seed)
    return Encoder.from_config(dict(MODEL_SHAPES[model]), attn_implementation=attn_implementation).train()


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
    """(rows, computed width) of every encoder call of one side, as each method cuts it."""
    from me5.gradcache import plan_chunks, split_by_rows

    lengths = mask.sum(1)
    if method == "naive":
        return [(mask.size(0), mask.size(1))]  # one call over the padded batch
    if method == "ours":
        order, chunks = plan_chunks(mask, chunk_tokens=chunk_tokens, sort_by_length=True)
        lengths = lengths[order]
    else:  # ours-rows and st: rows in batch order, each chunk trimmed to its longest row
        chunks = split_by_rows(mask.size(0), mini_batch)
    return [(sl.stop - sl.start, int(lengths[sl].max())) for sl in chunks]


# ---------------------------------------------------------------------------------------------- timing helpers
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


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
    _sync(device)
    best, t_end = 0.0, time.perf_counter() + seconds
    while True:
        t0 = time.perf_counter()
        for _ in range(10 if device.type == "cuda" else 1):
            a @ b
        _sync(device)
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
    """A step of our module (GradCache when a chunk size is given), with clipping and AdamW."""
    from me5.losses import InfoNCE, WeightedLoss
    from me5.training import ContrastivePretraining

    module = ContrastivePretraining(
        encoder, WeightedLoss({"infonce": InfoNCE(temperature=0.01)}, {"infonce": 1.0}),
        optimizer=functools.partial(torch.optim.AdamW, lr=1e-5, weight_decay=0.01),
        chunk_tokens=chunk_tokens, chunk_rows=chunk_rows, sort_by_length=sort, grad_clip=1.0,
    ).to(device)
    opt = _optimizer([p for p in module.parameters() if p.requires_grad], device)

    def step(batch: dict) -> float:
        out = module.compute_loss_and_backward(batch)
        torch.nn.utils.clip_grad_norm_(module.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(out.loss)

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
    from sentence_transformers.losses import CachedMultipleNegativesRankingLoss

    st_model.train()
    loss_fn = CachedMultipleNegativesRankingLoss(st_model, scale=scale, mini_batch_size=mini_batch)
    opt = _optimizer([p for p in st_model.parameters() if p.requires_grad], device)

    def step(batch: dict) -> float:
        features = [
            {"input_ids": batch[f"{s}_input_ids"], "attention_mask": batch[f"{s}_attention_mask"]}
            for s in ("query", "passage")
        ]
        loss = loss_fn(features, None)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(st_model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss.detach())

    step.cleanup = lambda: opt.state.clear()  # type: ignore[attr-defined]
    return step


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


# ---------------------------------------------------------------------------------------------- the benchmark
@dataclass
class BenchConfig:
    device: str = "auto"
    models: tuple[str, ...] = ()
    batches: tuple[int, ...] = ()
    lengths: tuple[str, ...] = ("fixed", "variable")
    methods: tuple[str, ...] = ("ours", "naive", "st")
    mini_batch: dict[str, int] = field(default_factory=dict)
    precision: str = "auto"  # bf16 on CUDA, fp32 on CPU
    attn_implementation: str = "sdpa"
    compile: bool = False
    min_time: float = 0.5  # repeat the timed step until this many seconds (at most max_repeats)
    max_repeats: int = 3
    warmup_pairs: int = 2048  # warm-up step size (capped at the batch)
    seed: int = 0
    spec: LengthSpec = field(default_factory=LengthSpec)

    def resolved(self) -> BenchConfig:
        dev = self.device
        if dev == "auto":
            dev = "cuda" if torch.cuda.is_available() else "cpu"
        gpu = dev.startswith("cuda")
        return BenchConfig(
            device=dev,
            models=self.models or (("small", "base", "large") if gpu else ("tiny",)),
            batches=self.batches or ((1024, 4096, 32768) if gpu else (64, 256)),
            lengths=self.lengths, methods=self.methods,
            mini_batch={**DEFAULT_MINI_BATCH, **self.mini_batch},
            precision=("bf16" if gpu else "fp32") if self.precision == "auto" else self.precision,
            attn_implementation=self.attn_implementation, compile=self.compile, min_time=self.min_time,
            max_repeats=self.max_repeats, warmup_pairs=self.warmup_pairs, seed=self.seed, spec=self.spec,
        )


def _autocast(device: torch.device, precision: str):
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    return torch.autocast(device_type=device.type, dtype=dtype)


def _time_step(step: Callable, batch: dict, device: torch.device, cfg: BenchConfig) -> tuple[float, float, float | None]:
    """Median step seconds over ≥1 repeats, last loss, peak allocated GiB (CUDA)."""
    times, loss = [], float("nan")
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    while True:
        _sync(device)
        t0 = time.perf_counter()
        with _autocast(device, cfg.precision):
            loss = step(batch)
        _sync(device)
        times.append(time.perf_counter() - t0)
        if sum(times) >= cfg.min_time or len(times) >= cfg.max_repeats:
            break
    mem = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    return statistics.median(times), loss, mem


def run_bench(cfg: BenchConfig, *, log: Callable[[str], None] = print, on_row: Callable[[dict], None] | None = None):
    """Run the grid; returns ``(rows, meta)``. ``on_row`` sees each row as soon as it is measured."""
    from me5.models.encoder import resolve_attn_implementation

    cfg = cfg.resolved()
    device = torch.device(cfg.device)
    attn = resolve_attn_implementation(cfg.attn_implementation)
    peak, peak_desc = measure_peak_flops(device)
    meta = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)",
        "torch": torch.__version__, "precision": cfg.precision, "attn_implementation": attn,
        "peak_flops": peak, "peak_desc": peak_desc, "length_spec": asdict(cfg.spec), "compile": cfg.compile,
    }
    log(f"# device {meta['device']}; measured peak {peak / 1e12:.2f} TFLOP/s ({peak_desc}); precision {cfg.precision}")
    rows: list[dict] = []
    tmp = tempfile.TemporaryDirectory(prefix="me5-bench-")
    try:
        for model in cfg.models:
            encoder = build_encoder(model, attn_implementation=attn, seed=cfg.seed)
            if cfg.compile:
                encoder.backbone.compile(dynamic=True)
            dims = model_dims(encoder)
            shape = MODEL_SHAPES[model]
            mini = int(cfg.mini_batch[model])
            chunk_tokens = mini * cfg.spec.passage_max
            st_model, st_diff = None, None
            if "st" in cfg.methods:
                folder = save_st_folder(encoder, Path(tmp.name) / model)
                st_model = load_st_model(folder, dims["hidden"], torch.device("cpu"), attn)
                probe = make_batch(4, "variable", vocab=shape["vocab_size"], pad_id=shape["pad_token_id"], seed=99)
                st_diff = st_matches_ours(encoder, st_model, probe)  # before any step changes either model
            for mode in cfg.lengths:
                for n_pairs in cfg.batches:
                    batch_cpu = make_batch(n_pairs, mode, vocab=shape["vocab_size"], pad_id=shape["pad_token_id"],
                                           spec=cfg.spec, seed=cfg.seed)
                    warm_cpu = make_batch(min(n_pairs, cfg.warmup_pairs), mode, vocab=shape["vocab_size"],
                                          pad_id=shape["pad_token_id"], spec=cfg.spec, seed=cfg.seed + 1)
                    useful = useful_flops(batch_cpu, dims)
                    real_tokens = int(batch_cpu["query_attention_mask"].sum() + batch_cpu["passage_attention_mask"].sum())
                    grid_rows = []
                    for method in cfg.methods:
                        row = {"model": model, "batch": n_pairs, "lengths": mode, "method": method,
                               "mini_batch": mini, "nonemb_params": dims["nonemb"], "real_tokens": real_tokens}
                        if method == "ours":
                            row["chunking"] = f"tokens≤{chunk_tokens}, sorted"
                        elif method == "naive":
                            row["chunking"] = "none"
                        else:
                            row["chunking"] = f"rows={mini}"
                        shapes = [
                            s
                            for side in ("query", "passage")
                            for s in chunk_shapes(batch_cpu[f"{side}_attention_mask"], method, mini_batch=mini,
                                                  chunk_tokens=chunk_tokens)
                        ]
                        executed = transformer_flops(shapes, dims)
                        row["pad_share"] = 1.0 - useful / executed
                        row["encoder_calls"] = len(shapes) * (1 if method == "naive" else 2)
                        step = None
                        try:
                            if method == "st":
                                row["st_max_abs_diff"] = st_diff
                                st_model.to(device)
                                encoder.to("cpu")
                                step = st_step_fn(st_model, device, mini_batch=mini)
                            else:
                                encoder.to(device)
                                step = ours_step_fn(
                                    encoder, device,
                                    chunk_tokens=chunk_tokens if method == "ours" else None,
                                    chunk_rows=mini if method == "ours-rows" else None,
                                    sort=method == "ours",
                                )
                            batch = _to(batch_cpu, device)
                            with _autocast(device, cfg.precision):
                                step(_to(warm_cpu, device))  # warm-up: allocator, kernels, optimizer state
                            seconds, loss, mem = _time_step(step, batch, device, cfg)
                            row.update(status="ok", step_s=seconds, loss=loss, peak_mem_gib=mem,
                                       pairs_per_s=n_pairs / seconds, tokens_per_s=real_tokens / seconds,
                                       mfu=useful / seconds / peak)
                        except Exception as err:  # noqa: BLE001 - an OOM (or a failure) is a row, not a crash
                            if not _is_oom(err):
                                row.update(status=f"error: {type(err).__name__}: {str(err).splitlines()[0][:120]}")
                            else:
                                row.update(status="OOM")
                        finally:
                            if step is not None:
                                step.cleanup()
                            del step
                            if st_model is not None:
                                st_model.to("cpu")
                            encoder.zero_grad(set_to_none=True)
                            _free(device)
                        grid_rows.append(row)
                    ours = next((r for r in grid_rows if r["method"] == "ours" and r["status"] == "ok"), None)
                    for r in grid_rows:
                        r["vs_ours"] = (r["pairs_per_s"] / ours["pairs_per_s"]) if ours and r["status"] == "ok" else None
                        rows.append(r)
                        if on_row is not None:
                            on_row(r)
                        log(format_row(r))
            del encoder, st_model
            _free(device)
    finally:
        tmp.cleanup()
    return rows, meta


# ---------------------------------------------------------------------------------------------- output
COLUMNS = ("model", "batch", "lengths", "method", "chunking", "status", "step s", "pairs/s", "tok/s", "MFU",
           "mem GiB", "pad", "vs ours")


def _cells(r: dict) -> list[str]:
    ok = r.get("status") == "ok"

    def num(key, fmt):
        v = r.get(key)
        return fmt.format(v) if ok and v is not None else "-"

    return [r["model"], str(r["batch"]), r["lengths"], r["method"], r.get("chunking", ""), r.get("status", ""),
            num("step_s", "{:.3f}"), num("pairs_per_s", "{:,.0f}"), num("tokens_per_s", "{:,.0f}"),
            num("mfu", "{:.1%}"), num("peak_mem_gib", "{:.1f}"), f"{r['pad_share']:.0%}",
            num("vs_ours", "{:.2f}×")]


def format_row(r: dict) -> str:
    return "| " + " | ".join(_cells(r)) + " |"


def format_table(rows: Sequence[dict], meta: dict | None = None) -> str:
    lines = []
    if meta:
        lines.append(f"device: {meta['device']}; torch {meta['torch']}; precision {meta['precision']}; "
                     f"attention {meta['attn_implementation']}; compile {meta['compile']}; measured peak "
                     f"{meta['peak_flops'] / 1e12:.2f} TFLOP/s ({meta['peak_desc']})")
        lines.append("")
    lines.append("| " + " | ".join(COLUMNS) + " |")
    lines.append("|" + "|".join("---" if i < 6 else "---:" for i in range(len(COLUMNS))) + "|")
    lines.extend(format_row(r) for r in rows)
    return "\n".join(lines)


def profile_step(cfg: BenchConfig, *, n_pairs: int | None = None, mode: str = "variable", top: int = 15) -> str:
    """torch.profiler table of one ``ours`` step (first model of the grid)."""
    from torch.profiler import ProfilerActivity, profile

    cfg = cfg.resolved()
    device = torch.device(cfg.device)
    model = cfg.models[0]
    encoder = build_encoder(model, attn_implementation=cfg.attn_implementation, seed=cfg.seed).to(device)
    shape, mini = MODEL_SHAPES[model], cfg.mini_batch[model]
    batch = _to(make_batch(n_pairs or min(cfg.batches[-1], 4096), mode, vocab=shape["vocab_size"], pad_id=shape["pad_token_id"],
                           spec=cfg.spec, seed=cfg.seed), device)
    step = ours_step_fn(encoder, device, chunk_tokens=mini * cfg.spec.passage_max, chunk_rows=None, sort=True)
    with _autocast(device, cfg.precision):
        step(batch)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof, _autocast(device, cfg.precision):
        step(batch)
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    return prof.key_averages().table(sort_by=key, row_limit=top)


def _csv(text: str, cast=str) -> tuple:
    return tuple(cast(x) for x in text.split(",") if x.strip())


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m me5.app.bench", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto", help="auto (cuda when available), cpu or cuda[:i]")
    p.add_argument("--models", default="", help=f"comma list of {sorted(MODEL_SHAPES)} (default: tiny on CPU; small,base,large on GPU)")
    p.add_argument("--batches", default="", help="global batch sizes in pairs (default: 64,256 on CPU; 1024,4096,32768 on GPU)")
    p.add_argument("--lengths", default="fixed,variable", help="fixed and/or variable")
    p.add_argument("--methods", default="ours,naive,st", help=f"comma list of {list(METHODS)}")
    p.add_argument("--mini-batch", default="", help="model=rows,... per GradCache chunk / ST mini_batch_size "
                                                   f"(default {DEFAULT_MINI_BATCH})")
    p.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp16", "fp32"])
    p.add_argument("--attn", default="sdpa", help="attn_implementation: sdpa, eager, flash_attention_2 or auto")
    p.add_argument("--compile", action="store_true", help="torch.compile our backbone (ours/naive rows)")
    p.add_argument("--min-time", type=float, default=0.5, help="seconds of timed steps per row (≥1 step)")
    p.add_argument("--max-repeats", type=int, default=3)
    p.add_argument("--warmup-pairs", type=int, default=2048)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--out", default=None, help="folder for bench.md and bench.jsonl")
    p.add_argument("--profile", action="store_true", help="also print a torch.profiler table of one `ours` step")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    methods = _csv(args.methods)
    bad = [m for m in methods if m not in METHODS]
    if bad:
        p.error(f"unknown method(s) {bad}; choose from {list(METHODS)}")
    mini = {k: int(v) for k, v in (kv.split("=") for kv in _csv(args.mini_batch))}
    cfg = BenchConfig(device=args.device, models=_csv(args.models), batches=_csv(args.batches, int),
                      lengths=_csv(args.lengths), methods=methods, mini_batch=mini, precision=args.precision,
                      attn_implementation=args.attn, compile=args.compile, min_time=args.min_time,
                      max_repeats=args.max_repeats, warmup_pairs=args.warmup_pairs)
    out = Path(args.out) if args.out else None
    jsonl = None
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        jsonl = (out / "bench.jsonl").open("w")
    done: list[dict] = []

    def on_row(r: dict) -> None:  # written as they come: a run cut short keeps its rows
        done.append(r)
        if jsonl is not None:
            jsonl.write(json.dumps(r) + "\n")
            jsonl.flush()
            (out / "bench.md").write_text(format_table(done) + "\n")

    print("| " + " | ".join(COLUMNS) + " |", flush=True)
    t0 = time.perf_counter()
    rows, meta = run_bench(cfg, log=lambda s: print(s, flush=True), on_row=on_row)
    table = format_table(rows, meta)
    print(f"\n{table}\n\n(total {time.perf_counter() - t0:.1f} s)")
    if out is not None:
        (out / "bench.md").write_text(table + "\n")
        jsonl.close()
        (out / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    if args.profile:
        print("\n" + profile_step(cfg))
    return 0


if __name__ == "__main__":
    sys.exit(main())
