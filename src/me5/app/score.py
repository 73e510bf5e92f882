"""``python -m me5.score``: cross-encoder teacher scores for a stage-2 source, written as prepared shards.

    python -m me5.score --data data/mined/msmarco --out data/scored/msmarco
    python -m me5.score --data data/mined/miracl --model BAAI/bge-reranker-v2-m3 --out data/scored/miracl \\
        --rank 0 --world 8

Each record's query is scored against its positive and each of its negatives (``teacher_scores``: positive first,
then the negatives in their order) by any Hugging Face cross-encoder with one output logit
(``AutoModelForSequenceClassification``; ``--model``, default ``BAAI/bge-reranker-v2-m3``, a multilingual
reranker: the paper does not name its teacher). bf16 autocast on GPU, length-sorted token-budget batches,
resumable (run the same command again), shardable (``--rank``/``--world``, default torchrun's). The input is a
stage-2 source or normalised files (``--data``), as for ``me5.mine``; the library is :mod:`me5.mining.teacher`.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from me5.app.mine import add_source_args, build_source, default_device, report
from me5.errors import Me5Error

log = logging.getLogger("me5.score")


def build_parser() -> argparse.ArgumentParser:
    from me5.mining.teacher import DEFAULT_TEACHER

    p = argparse.ArgumentParser(prog="python -m me5.score", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_source_args(p)
    p.add_argument("--model", default=DEFAULT_TEACHER,
                   help=f"cross-encoder (hub id or folder) with one output logit (default: {DEFAULT_TEACHER})")
    p.add_argument("--max-length", type=int, default=512, help="tokens per (query, passage) pair")
    p.add_argument("--batch-size", type=int, default=128, help="pairs per forward")
    p.add_argument("--max-tokens", type=int, default=None, help="padded tokens per forward (default: batch-size "
                                                                "x max-length)")
    p.add_argument("--precision", choices=("bf16", "fp16", "fp32"), default="bf16", help="CUDA autocast dtype")
    return p


def run(args: argparse.Namespace):
    """Check the teacher's config and read the records, then load the teacher and score."""
    from me5.mining.plan import read_source
    from me5.mining.teacher import CrossEncoderScorer, ScoreOptions, check_cross_encoder, score_records

    opts = ScoreOptions(shard_rows=args.shard_rows, row_group_rows=args.row_group_rows, seed=args.seed,
                        split_langs=args.split_langs, max_shards=args.max_shards)
    opts.check()
    check_cross_encoder(args.model, field="--model")
    source = build_source(args)
    records, counts = read_source(source, strict=False if args.lenient else None)
    scorer = CrossEncoderScorer.from_pretrained(args.model, device=default_device(args.device), field="--model",
                                                max_length=args.max_length, max_batch=args.batch_size,
                                                max_tokens=args.max_tokens, precision=args.precision)
    return score_records(records, scorer, args.out, options=opts, name=source.name, counts=counts, rank=args.rank,
                         world=args.world, overwrite=args.overwrite,
                         show_progress=not args.no_progress and sys.stderr.isatty())


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; 2 with the message on bad input or config (no traceback), as the other me5 commands."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        result = run(args)
    except Me5Error as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    report(result)
    return 0

if __name__ == "__main__":
    sys.exit(main())
