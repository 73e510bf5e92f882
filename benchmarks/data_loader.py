"""``python -m benchmarks.data_loader``: data-loader throughput and resume overhead (a benchmark, not a test).

Measures pairs per second per CPU core, tokenised and collated (query budget 32 + passage budget 128 tokens,
per-device batch 1024), with an XLM-R-style SentencePiece-Unigram tokenizer trained here
(``me5.models.tokenizer.train_unigram_tokenizer``, vocabulary 32k) on generated multilingual text:

* the sample data (``me5.data.synthetic.generate_sample_data``; 20k pairs, in memory);
* a generated 1M-pair sharded parquet set (``--work``, default ``/tmp/me5_bench_data``; 10 shards of 100k rows,
  row groups of 10k, written like ``me5.prepare`` writes them) of pseudo-text in 10 scripts (queries of
  4-15 words, passages of 20-139 words), streamed, with 0 and ``--workers`` DataLoader workers;
* web-page-like passages (up to ~4k characters, mostly far over the budget) with and without the collator's
  exact pre-cut;
* where the time goes: reading + converting + formatting only, and tokenising + collating only;
* resume overhead: the time to the first batch after ``load_state_dict`` at a position ~1M pairs into the
  stream, against a fresh start.

Tokenizers run single-threaded (``TOKENIZERS_PARALLELISM=false``), so one process = one core: the rows without
workers are the per-core figures. With W workers the main process only receives batches and the per-core column
is the total over W; the note says how many cores' worth W busy processes really get on the machine (shared or
hyper-threaded vCPUs give fewer than W).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import time
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from me5.prompts import E5_DOCUMENT, E5_QUERY, PromptPolicy  # noqa: E402 (after the environment it reads)

QUERY_MAX, PASSAGE_MAX = 32, 128


def _log(msg: str) -> None:
    print(f"[bench_data] {msg}", flush=True)


# ---------------------------------------------------------------------------------------------- inputs
def sample_data(work: Path) -> Path:
    from me5.data.synthetic import generate_sample_data

    generate_sample_data(work / "sample", seed=0)
    return work / "sample"


# ---------------------------------------------------------------------------------------------- pseudo-text
# Generated multilingual text: per language a Zipf-distributed vocabulary of 4k pseudo-words built from the
# language's script (Latin with diacritics, Cyrillic, Greek, Arabic, Devanagari, Thai, Hangul, Han without
# spaces), so that a 32k Unigram vocabulary fills up and texts come to ~1.3 tokens per word (XLM-R on real text:
# ~1.2-1.5).
_SCRIPTS = {
    "en": ("bcdfghklmnprstvwz", "aeiou"), "de": ("bcdfghklmnprstwz", "aeiouäöü"), "es": ("bcdfglmnprstvñ", "aeiouáé"),
    "ru": ("бвгдзклмнпрстфхцчшщ", "аеиоуыэюя"), "el": ("βγδζκλμνξπρστφχψ", "αεηιουω"),
    "ar": ("بتثجحخدذرزسشصضطظعغفقكلمنه", "اوي"), "hi": ("कखगघचछजझटठडढतथदधनपफबभमयरलवसह", "ािीुूेैोौ"),
    "th": ("กขคงจฉชซญดตถทนบปผพฟมยรลวสหอ", "ะาิีึืุูเแโ"), "ko": None, "zh": None,
}


class PseudoText:
    """Deterministic generated multilingual text (see the comment above)."""

    def __init__(self, seed: int = 0, words_per_lang: int = 4000):
        import numpy as np

        self.rng = np.random.default_rng(12345)  # the vocabularies are the same for every seed
        self.langs = list(_SCRIPTS)
        self.vocab = {lang: self._words(lang, words_per_lang) for lang in self.langs}
        self.rng = np.random.default_rng(seed)

    def _words(self, lang: str, n: int) -> list[str]:
        rng = self.rng
        if lang in ("zh", "ko"):
            lo, hi = (0x4E00, 0x9FA5) if lang == "zh" else (0xAC00, 0xD7A3)
            pool = [chr(c) for c in rng.integers(lo, hi, size=4000 if lang == "zh" else 2500)]
            lens = rng.integers(1, 4, size=n)
            idx = rng.integers(0, len(pool), size=int(lens.sum()))
        else:
            cons, vow = _SCRIPTS[lang]
            pool = [c + v for c in cons for v in vow] + list(vow)
            lens = rng.integers(1, 5, size=n)
            idx = rng.integers(0, len(pool), size=int(lens.sum()))
        out, k = [], 0
        for n_syl in lens.tolist():
            out.append("".join(pool[i] for i in idx[k: k + n_syl]))
            k += n_syl
        return out

    def text(self, lang: str, n_words: int) -> str:
        import numpy as np

        v = self.vocab[lang]
        z = np.minimum(self.rng.zipf(1.1, size=n_words) - 1, len(v) - 1)
        words = [v[i] for i in z.tolist()]
        sep = "" if lang == "zh" else " "
        # a full stop every ~12 words
        for i in range(11, len(words), 12):
            words[i] += "。" if lang == "zh" else "."
        return sep.join(words)

    def pair(self) -> tuple[str, str, str]:
        lang = self.langs[int(self.rng.integers(len(self.langs)))]
        return lang, self.text(lang, int(self.rng.integers(4, 16))), self.text(lang, int(self.rng.integers(20, 140)))


def _texts(sample: Path) -> tuple[list[dict], list[str], list[str]]:
    from me5.data.readers import iter_jsonl

    recs = [r for _, r in iter_jsonl(sample / "pretrain.jsonl")]
    return recs, [r["query"] for r in recs], [r["positive"] for r in recs]


def tokenizer(work: Path, sample: Path, vocab_size: int):
    """The 32k Unigram tokenizer (trained once, then loaded from ``work``)."""
    from me5.models.tokenizer import load_tokenizer, train_unigram_tokenizer

    out = work / f"tokenizer-{vocab_size}"
    if (out / "tokenizer.json").is_file():
        return load_tokenizer(out, model_max_length=512)
    _, qs, ps = _texts(sample)
    texts = [E5_QUERY + q for q in qs] + [E5_DOCUMENT + p for p in ps]
    gen = PseudoText(seed=1)
    texts += [(E5_QUERY if i % 2 else E5_DOCUMENT) + gen.pair()[2] for i in range(60000)]
    t = time.perf_counter()
    tok = train_unigram_tokenizer(texts, out, vocab_size=vocab_size, model_max_length=512)
    _log(f"trained a Unigram tokenizer: {len(tok)} pieces (asked {vocab_size}) in {time.perf_counter() - t:.0f} s")
    return tok


def pairs_1m(work: Path, sample: Path, n_pairs: int, *, shard_rows: int = 100_000, row_group_rows: int = 10_000) -> Path:
    """``n_pairs`` generated pairs as sharded parquet + ``shards.json`` (built once in ``work``)."""
    from me5.data.readers import SHARDS_FORMAT, SHARDS_MANIFEST
    from me5.data.schema import PairExample
    from me5.data.shards import write_shard
    from me5.jsonio import write_json

    out = work / f"pairs-{n_pairs}"
    if (out / SHARDS_MANIFEST).is_file():
        return out
    out.mkdir(parents=True, exist_ok=True)
    gen = PseudoText(seed=2)
    t = time.perf_counter()
    shards = []
    for k, start in enumerate(range(0, n_pairs, shard_rows)):
        exs = []
        for _ in range(start, min(n_pairs, start + shard_rows)):
            # queries 4-15 words, passages 20-139 words (pseudo-text, 10 scripts)
            lang, q, p = gen.pair()
            exs.append(PairExample(q, p, lang=lang, source="bench"))
        shards.append(write_shard(out / f"part-{k:05d}.parquet", exs, row_group_rows, seed=(0, k), split_langs=False))
        shards[-1]["bytes"] = (out / shards[-1]["file"]).stat().st_size
    write_json(out / SHARDS_MANIFEST, {"format": SHARDS_FORMAT, "source": "bench", "shards": shards})
    size = sum(s["bytes"] for s in shards) / 2**20
    _log(f"wrote {n_pairs} pairs in {len(shards)} shards ({size:.0f} MiB) in {time.perf_counter() - t:.0f} s")
    return out


# ---------------------------------------------------------------------------------------------- measuring
def _dm(path, tok, *, num_workers: int, batch: int, streaming: bool):
    from me5.batching import BatchPlan
    from me5.data import PairDataModule

    dm = PairDataModule.from_path(str(path), name="pairs", num_workers=num_workers, streaming=streaming)
    dm.connect(tok, batch_plan=BatchPlan.build(global_batch_size=batch), query_max_length=QUERY_MAX,
               passage_max_length=PASSAGE_MAX, prompts=PromptPolicy("e5"))
    dm.setup("fit")
    return dm


class _NoCollate:
    """Stands in for the collator: the stream still reads, converts and formats every example."""

    def __call__(self, items):
        return {"n": len(items)}


class _SwitchCollator:
    """No collation for the first ``after`` batches, then the real collator (to get the uninterrupted batch)."""

    def __init__(self, real, after: int):
        self.real, self.after, self.calls = real, after, 0

    def __call__(self, items):
        self.calls += 1
        return {"n": len(items)} if self.calls <= self.after else self.real(items)


def _loader(dm, collator=None):
    from torch.utils.data import DataLoader

    if collator is None:
        return dm.train_dataloader()
    return DataLoader(dm.build_stream(collator), batch_size=None, num_workers=dm.num_workers)


def throughput(dm, n_batches: int, *, collator=None, warmup: int = 1) -> tuple[float, float]:
    """(pairs/s over ``n_batches`` after ``warmup`` batches, seconds to the first batch)."""
    t0 = time.perf_counter()
    it = iter(_loader(dm, collator))
    pairs = 0
    for i in range(warmup + n_batches):
        b = dm.on_before_batch_transfer(next(it), 0)
        if i == 0:
            t_first = time.perf_counter() - t0
        if i == warmup - 1:
            t1 = time.perf_counter()
        if i >= warmup:
            pairs += b["n"] if "n" in b else b["query_input_ids"].shape[0]
    return pairs / (time.perf_counter() - t1), t_first


def collate_only(dm, n_batches: int, *, word_cache: int = 262_144) -> tuple[float, str]:
    """Tokenise + collate pre-formatted items (no reading): (pairs/s, word-cache note)."""
    import numpy as np

    from me5.data.collate import PairCollator

    coll = PairCollator(dm._connected.tokenizer, query_max_length=QUERY_MAX, passage_max_length=PASSAGE_MAX,
                        word_cache=word_cache)
    name = next(iter(dm.sources()))
    fmt = dm._connected.formatters[name]
    if name not in dm.examples:
        from me5.data.readers import read_row_group

        unit = dm.leaves[name][0].units[0]
        rows = read_row_group(unit.file, unit.row_group).to_pylist()
        from me5.data.schema import to_example

        exs = [to_example(r, source="bench") for r in rows]
    else:
        exs = dm.examples[name]
    rng = np.random.default_rng(0)
    B = dm.batch_plan.global_batch_size
    # distinct items in every batch (a row group holds 10k: at most ~9 batches of 1024 before repeating)
    batches = [[fmt(exs[(i * B + j) % len(exs)], rng=rng) for j in range(B)] for i in range(n_batches)]
    t = time.perf_counter()
    for items in batches:
        coll(items)
    return n_batches * B / (time.perf_counter() - t), cache_note(coll)


def cache_note(coll) -> str:
    stats = coll.word_cache_stats()
    if stats is None:
        return "word cache off"
    return f"word cache: {stats['hit_rate']:.1%} hits, {stats['entries']:,} entries"


def precut_effect(tok, n_pairs: int, batch: int) -> list[tuple[str, float]]:
    """Pairs/s on web-page-like passages (mostly far over the budget) with the word cache, and without it
    with and without the pre-cut; the last entry is the fraction of passages truncated."""
    from me5.data.collate import PairCollator

    gen = PseudoText(seed=3)
    items = []
    for _ in range(n_pairs):
        lang, q, _ = gen.pair()
        p = gen.text(lang, int(gen.rng.integers(100, 700)))
        items.append({"query": E5_QUERY + q, "passages": [E5_DOCUMENT + p], "teacher_scores": None, "lang": lang,
                      "source": "web"})
    out = []
    for name, pre, cache in (("word cache", True, 262_144), ("pre-cut on", True, 0), ("pre-cut off", False, 0)):
        coll = PairCollator(tok, query_max_length=QUERY_MAX, passage_max_length=PASSAGE_MAX, pre_truncate=pre,
                            word_cache=cache)
        t, trunc = time.perf_counter(), 0
        for i in range(0, n_pairs, batch):
            trunc += coll(items[i: i + batch])["n_truncated_passages"]
        out.append((name, n_pairs / (time.perf_counter() - t)))
    out.append(("truncated", trunc / n_pairs))
    return out


def resume_overhead(path, tok, *, num_workers: int, batch: int, position_pairs: int) -> dict:
    """Fast-forward a stream to ~``position_pairs`` (reading only), checkpoint, and time the first batch after
    ``load_state_dict`` against a fresh start; without workers also checks that the resumed batch equals the
    uninterrupted stream's next batch."""
    import torch

    from me5.data.collate import PairCollator

    n_batches = max(1, position_pairs // batch)
    dm = _dm(path, tok, num_workers=num_workers, batch=batch, streaming=True)
    coll = _SwitchCollator(PairCollator(tok, query_max_length=QUERY_MAX, passage_max_length=PASSAGE_MAX), n_batches)
    t = time.perf_counter()
    it = iter(_loader(dm, coll if num_workers == 0 else _NoCollate()))
    for _ in range(n_batches):
        dm.on_before_batch_transfer(next(it), 0)
    ff = time.perf_counter() - t
    state = dm.state_dict()
    uninterrupted = next(it) if num_workers == 0 else None
    del it
    size = len(json.dumps(state))
    fresh = _dm(path, tok, num_workers=num_workers, batch=batch, streaming=True)
    t = time.perf_counter()
    next(iter(fresh.train_dataloader()))
    t_fresh = time.perf_counter() - t
    resumed = _dm(path, tok, num_workers=num_workers, batch=batch, streaming=True)
    t = time.perf_counter()
    resumed.load_state_dict(json.loads(json.dumps(state)))
    first = next(iter(resumed.train_dataloader()))
    t_resume = time.perf_counter() - t
    same = None
    if uninterrupted is not None:  # the uninterrupted stream's next batch
        same = all(torch.equal(uninterrupted[k], first[k]) for k in ("query_input_ids", "passage_input_ids"))
    return {"position_pairs": n_batches * batch, "fast_forward_s": ff, "state_bytes": size,
            "first_batch_fresh_s": t_fresh, "first_batch_resumed_s": t_resume, "batch_index": first["batch_index"],
            "same_as_uninterrupted": same}


def _burn(_=None) -> float:
    t, s = time.perf_counter(), 0
    for i in range(10**7):
        s += i
    return time.perf_counter() - t


def parallel_scaling(n: int) -> float:
    """How many cores' worth of pure-Python work ``n`` processes get here (n on dedicated cores; less on shared
    or hyper-threaded vCPUs), to read the multi-worker row against."""
    import multiprocessing as mp

    one = _burn()
    with mp.get_context("fork").Pool(n) as pool:
        t = time.perf_counter()
        pool.map(_burn, range(n))
        wall = time.perf_counter() - t
    return n * one / wall


# ---------------------------------------------------------------------------------------------- main
def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.data_loader", description=__doc__.split("\n\n")[0])
    p.add_argument("--work", default="/tmp/me5_bench_data", help="where the generated data and tokenizer go")
    p.add_argument("--pairs", type=int, default=1_000_000)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--batch", type=int, default=1024, help="per-device batch")
    p.add_argument("--batches", type=int, default=20, help="batches timed per configuration")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--warm-pairs", type=int, default=200_000,
                   help="pairs streamed before the warm word-cache row is timed")
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args(argv)
    import torch

    torch.set_num_threads(1)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    sample = sample_data(work)
    tok = tokenizer(work, sample, args.vocab)
    big = pairs_1m(work, sample, args.pairs)
    cores = os.cpu_count()
    rows = []

    def add(name, workers, pps, extra=""):
        per_core = pps / max(1, workers)
        rows.append((name, workers, pps, per_core, extra))
        _log(f"{name:<44} workers={workers}  {pps:>9,.0f} pairs/s  {per_core:>9,.0f} pairs/s/core  {extra}")

    sample_file = sample / "pretrain.jsonl"
    dm = _dm(sample_file, tok, num_workers=0, batch=args.batch, streaming=False)
    pps, _ = throughput(dm, args.batches)
    add("sample 20k, in memory, tokenised+collated", 0, pps)
    for cache in (262_144, 0):
        pps, note = collate_only(dm, args.batches, word_cache=cache)
        add("sample 20k, in memory, tokenise+collate only", 0, pps, note)
    dm = _dm(sample_file, tok, num_workers=0, batch=args.batch, streaming=True)
    pps, _ = throughput(dm, args.batches)
    add("sample 20k, streamed jsonl, tokenised+collated", 0, pps)
    gz_file = work / "pretrain.jsonl.gz"  # as mC4/CC News ship: read without a decompression step
    if not gz_file.is_file():
        import gzip

        gz_file.write_bytes(gzip.compress(sample_file.read_bytes(), compresslevel=6))
    pps, _ = throughput(_dm(gz_file, tok, num_workers=0, batch=args.batch, streaming=True), args.batches)
    add("sample 20k, streamed jsonl.gz, tokenised+collated", 0, pps)

    from me5.data.collate import PairCollator

    # a fresh stream and collator each; "cold": the first batches; "warm": batches after --warm-pairs more pairs
    warm = max(1, args.warm_pairs // args.batch)
    # "+ gc frozen": gc.freeze() first, as a DataLoader worker does (me5.data.stream.freeze_gc_in_worker)
    for cache, warmup, label, frozen in ((262_144, 1, "cold", False), (262_144, warm, "warm", False),
                                         (262_144, warm, "warm", True), (0, 1, "", False)):
        dm = _dm(big, tok, num_workers=0, batch=args.batch, streaming=True)
        coll = PairCollator(tok, query_max_length=QUERY_MAX, passage_max_length=PASSAGE_MAX, word_cache=cache)
        if frozen:
            gc.freeze()
        pps, t_first = throughput(dm, args.batches, collator=coll, warmup=warmup)
        if frozen:
            gc.unfreeze()
        where = f"batches {warmup + 1}-{warmup + args.batches}"
        add(f"{args.pairs:,} parquet, streamed, tokenised+collated", 0, pps,
            f"{where}; {label + ' ' if label else ''}{cache_note(coll)}{'; gc frozen' if frozen else ''}")
    pps, _ = throughput(_dm(big, tok, num_workers=0, batch=args.batch, streaming=True), args.batches * 3,
                        collator=_NoCollate())
    add(f"{args.pairs:,} parquet, read+convert+format only", 0, pps)
    for cache in (262_144, 0):
        pps, note = collate_only(dm, args.batches, word_cache=cache)
        add(f"{args.pairs:,} parquet, tokenise+collate only", 0, pps, note)
    if args.workers:
        eff = parallel_scaling(args.workers)
        dmw = _dm(big, tok, num_workers=args.workers, batch=args.batch, streaming=True)
        pps, t_first = throughput(dmw, args.batches * args.workers, warmup=args.workers)
        add(f"{args.pairs:,} parquet, streamed, tokenised+collated", args.workers, pps,
            f"first batch {t_first:.2f} s; {args.workers} processes get {eff:.1f} cores' worth here")

    *web, (_, frac) = precut_effect(tok, args.batch * max(2, args.batches // 4), args.batch)
    for name, pps in web:
        add(f"web-like passages (~4k chars), collate, {name}", 0, pps,
            f"{frac:.0%} of passages truncated" if name == "word cache" else "same output, same counts")

    res = [resume_overhead(big, tok, num_workers=w, batch=args.batch, position_pairs=args.pairs)
           for w in sorted({0, args.workers})]

    print()
    print(f"data loader throughput (per-device batch {args.batch}, query {QUERY_MAX} + passage {PASSAGE_MAX} tokens, "
          f"tokenizer: Unigram {len(tok)} pieces, {cores} cores)")
    hdr = f"{'configuration':<46} {'workers':>7} {'pairs/s':>10} {'pairs/s/core':>13}  notes"
    print(hdr)
    print("-" * len(hdr))
    for name, w, pps, pc, extra in rows:
        print(f"{name:<46} {w:>7} {pps:>10,.0f} {pc:>13,.0f}  {extra}")
    print()
    print("resume overhead (streamed parquet)")
    hdr = f"{'workers':>7} {'position (pairs)':>17} {'fresh 1st batch':>16} {'resumed 1st batch':>18} {'state':>8} {'same batch':>10}"
    print(hdr)
    print("-" * len(hdr))
    for w, r in zip(sorted({0, args.workers}), res):
        print(f"{w:>7} {r['position_pairs']:>17,} {r['first_batch_fresh_s']:>15.2f}s {r['first_batch_resumed_s']:>17.2f}s "
              f"{r['state_bytes']:>7}B {'-' if r['same_as_uninterrupted'] is None else str(r['same_as_uninterrupted']):>10}")
    if args.json:
        Path(args.json).write_text(json.dumps({"throughput": rows, "resume": res}, indent=1, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
