"""``python -m benchmarks.prepare``: pairs/s of the ``prepare`` pipeline on generated raw pairs, per worker count, and
of the consistency filter with a saved model (``--model``).

The raw data: ``--pairs`` pairs of pseudo-text (queries of 4-12 words, positives of 20-60, Zipf-distributed
over a 50k-word vocabulary, each made distinct by its number) in 9 languages, in ``--files`` parquet files;
``--dup`` of them repeat an earlier pair (exact duplicates the pipeline removes) and 1% have an empty positive
(``skipped/empty_text``). Each worker count runs
the whole pipeline (read -> dedup -> write -> merge) into a fresh folder with the same tasks, so the outputs are
identical and only the parallelism changes. Results: a table on stdout and ``--json``.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

LANGS = ("en", "de", "fr", "es", "ru", "zh", "ja", "sw", "hi")


def generate(folder: Path, pairs: int, *, files: int = 8, dup: float = 0.05, seed: int = 0) -> None:
    """Write the raw pairs (see the module docstring) as ``folder/raw-<i>.parquet``."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(seed)
    vocab = np.array([f"w{i:x}" for i in range(50_000)], dtype=object)

    def texts(n: int, lo: int, hi: int) -> list[str]:
        lens = rng.integers(lo, hi + 1, n)
        words = vocab[rng.zipf(1.3, int(lens.sum())) % len(vocab)]
        cut = np.r_[0, np.cumsum(lens)]
        return [" ".join(words[cut[i]:cut[i + 1]]) for i in range(n)]

    # 20k queries and 20k passages, each pair made distinct by its number (fast: one join a pair)
    q_base, p_base = texts(20_000, 3, 11), texts(20_000, 19, 59)
    folder.mkdir(parents=True, exist_ok=True)
    per = -(-pairs // files)
    for f in range(files):
        n = min(per, pairs - f * per)
        if n <= 0:
            break
        ids = np.arange(f * per, f * per + n)
        # a duplicate repeats the pair of an earlier number (the same query and positive)
        src = np.where(rng.random(n) < dup, rng.integers(0, np.maximum(ids, 1)), ids)
        qi, pi = (src * 7919) % 20_000, (src * 104729) % 20_000
        queries = [f"{q_base[a]} n{s:x}" for a, s in zip(qi.tolist(), src.tolist())]
        positives = [f"{p_base[b]} n{s:x}" if r >= 0.01 else "   "
                     for b, s, r in zip(pi.tolist(), src.tolist(), rng.random(n).tolist())]
        langs = np.array(LANGS)[src % len(LANGS)]
        pq.write_table(pa.table({"query": queries, "positive": positives, "lang": langs.tolist()}),
                       folder / f"raw-{f:03d}.parquet", row_group_size=65536)


def bench_prepare(raw: Path, work: Path, workers: list[int], *, read_tasks: int, buckets: int) -> list[dict]:
    """One full pipeline run per worker count; ``pairs/s`` counts the raw records read."""
    import shutil

    from me5.data.source import Source
    from me5.prep import PrepOptions, run_prep

    rows = []
    for w in workers:
        out = work / f"out-w{w}"
        shutil.rmtree(out, ignore_errors=True)
        t0 = time.perf_counter()
        stats = run_prep({"bench": Source(str(raw))}, out, PrepOptions(workers=w, read_tasks=read_tasks,
                                                                      buckets=buckets, split_langs=True))
        dt = time.perf_counter() - t0
        c = stats["bench"]["counts"]
        rows.append({"workers": w, "read": c["read"], "kept": c.get("kept", 0),
                     "duplicates": c.get("skipped/duplicate", 0), "empty": c.get("skipped/empty_text", 0),
                     "seconds": round(dt, 2), "pairs_per_s": round(c["read"] / dt),
                     "pairs_per_s_per_worker": round(c["read"] / dt / w)})
    return rows


def bench_filter(model: str, work: Path, *, pairs: int, pool: int, max_length: int, device: str | None) -> dict:
    """The consistency filter alone (embed queries + positives, search the pool): pairs/s, pool embedding apart."""
    from me5.mining.consistency import ModelScorer, pool_ranks
    from me5.prompts import PromptPolicy

    prompts = PromptPolicy("e5")

    rng = np.random.default_rng(1)
    vocab = [f"word{i}" for i in range(5000)]
    text = lambda n: " ".join(rng.choice(vocab, n))  # noqa: E731
    queries = [text(int(rng.integers(4, 12))) for _ in range(pairs)]
    positives = [text(int(rng.integers(20, 60))) for _ in range(pairs)]
    pool_texts = [text(int(rng.integers(20, 60))) for _ in range(pool)]
    scorer = ModelScorer(model, max_length=max_length, device=device)
    scorer.model()
    t0 = time.perf_counter()
    pool_emb = scorer.embed(pool_texts, "passage", work / "pool", prompts.document())
    t1 = time.perf_counter()
    q = scorer.embed(queries, "query", work / "q", prompts.query())
    p = scorer.embed(positives, "passage", work / "p", prompts.document())
    t2 = time.perf_counter()
    ranks = pool_ranks(q, p, pool_emb, top_k=2)
    t3 = time.perf_counter()
    return {"model": model, "pairs": pairs, "pool": pool, "max_length": max_length,
            "pool_embed_s": round(t1 - t0, 2), "pairs_embed_s": round(t2 - t1, 2), "search_s": round(t3 - t2, 3),
            "pairs_per_s": round(pairs / (t3 - t1), 1), "passages_per_s": round(pool / (t1 - t0), 1),
            "kept": int((ranks <= 2).sum())}


def main(argv=None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="python -m benchmarks.prepare", description=__doc__.split("\n\n")[0])
    p.add_argument("--work", default="/tmp/me5-bench-prep")
    p.add_argument("--pairs", type=int, default=2_000_000)
    p.add_argument("--files", type=int, default=8)
    p.add_argument("--dup", type=float, default=0.05)
    p.add_argument("--workers", default="1,2")
    p.add_argument("--read-tasks", type=int, default=8)
    p.add_argument("--buckets", type=int, default=8)
    p.add_argument("--model", help="a saved model: also time the consistency filter")
    p.add_argument("--filter-pairs", type=int, default=2000)
    p.add_argument("--filter-pool", type=int, default=4000)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--device")
    p.add_argument("--skip-prepare", action="store_true")
    p.add_argument("--json", help="write the results here")
    args = p.parse_args(argv)
    work = Path(args.work)
    result: dict = {}
    if not args.skip_prepare:
        raw = work / f"raw-{args.pairs}"
        t0 = time.perf_counter()
        if not raw.is_dir():
            generate(raw, args.pairs, files=args.files, dup=args.dup)
        print(f"raw data: {args.pairs} pairs in {time.perf_counter() - t0:.1f} s")
        rows = bench_prepare(raw, work, [int(w) for w in args.workers.split(",")], read_tasks=args.read_tasks,
                             buckets=args.buckets)
        result["prepare"] = rows
        print("workers  read       kept       dups     s       pairs/s  pairs/s/worker")
        for r in rows:
            print(f"{r['workers']:>7}  {r['read']:<9}  {r['kept']:<9}  {r['duplicates']:<7}  {r['seconds']:<6}  "
                  f"{r['pairs_per_s']:>7}  {r['pairs_per_s_per_worker']:>7}")
    if args.model:
        result["filter"] = bench_filter(args.model, work / "filter", pairs=args.filter_pairs, pool=args.filter_pool,
                                        max_length=args.max_length, device=args.device)
        print(json.dumps(result["filter"]))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
