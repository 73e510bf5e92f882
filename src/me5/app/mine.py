"""``python -m me5.mine``: mine hard negatives for a stage-2 source and write them as prepared shards.

    python -m me5.mine --data data/prepared/msmarco_passage --model outputs/finetune/model --out data/mined/msmarco
    python -m me5.mine --source me5.data.sources.stage2.NaturalQuestions --raw data/raw/nq \\
        --model intfloat/multilingual-e5-base --corpus data/nq/corpus.jsonl --index IVF4096,Flat \\
        --index-params nprobe=64 --out data/mined/nq --rank 0 --world 4

Input: a stage-2 source (``--source CLASS --raw PATH``, as ``me5.prepare``) or files in the normalised schema
(``--data``: jsonl or a ``me5.prepare`` folder). Corpus: the source's own passages by default, or ``--corpus``
(BEIR ``corpus.jsonl``). Model: an exported me5 folder (its pooling, normalisation and prompt policy from
``me5.json``, as ``me5.evaluate`` reads them; ``--prompts`` overrides) or a hub id. Window, guards and sampling:
``--n``, ``--range-min``/``--range-max``, ``--perc-pos`` (TopK-PercPos, default 0.95; ``--perc-pos none`` turns
it off), ``--absolute-margin``, ``--sampling top|random``, ``--teacher MODEL`` (re-check with a cross-encoder; the
records then carry its scores). The library is :mod:`me5.mining` (:mod:`me5.mining.mine`'s docstring has the
full story).

Several processes: ``--rank R --world W`` (default: torchrun's ``RANK``/``WORLD_SIZE``); each embeds its share of
the corpus and mines its shards. A killed run resumes: run the same command again.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from me5.errors import ConfigError, Me5Error
from me5.prompts import STYLES

log = logging.getLogger("me5.mine")


def _optional_float(text: str) -> float | None:
    return None if text.lower() in ("none", "off", "") else float(text)


def add_source_args(p: argparse.ArgumentParser) -> None:
    """The input flags that ``me5.mine`` and ``me5.score`` share."""
    p.add_argument("--data", help="files in the normalised schema (jsonl, parquet, a me5.prepare folder)")
    p.add_argument("--source", help="source class, e.g. me5.data.sources.stage2.MSMarcoPassage (with --raw)")
    p.add_argument("--raw", help="the source's raw path (file, folder or hub id)")
    p.add_argument("--source-arg", action="append", metavar="KEY=VALUE",
                   help="source constructor argument (YAML value), e.g. task=nq, symmetric=true, lang=de")
    p.add_argument("--name", help="the source's name in the output (default: the source's)")
    p.add_argument("--lenient", action="store_true", help="skip and count malformed records instead of stopping")
    p.add_argument("--out", required=True, help="output folder (part-*.parquet + shards.json)")
    p.add_argument("--rank", type=int, default=None, help="this process (default: $RANK, else 0)")
    p.add_argument("--world", type=int, default=None, help="number of processes (default: $WORLD_SIZE, else 1)")
    p.add_argument("--shard-rows", type=int, default=100_000, help="records per output shard")
    p.add_argument("--row-group-rows", type=int, default=10_000)
    p.add_argument("--split-langs", action="store_true", help="single-language row groups (language temperature)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-shards", type=int, default=None, help="stop after this many shards (rerun to continue)")
    p.add_argument("--overwrite", action="store_true", help="start over when the folder holds another run")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda when available; under "
                                                  "torchrun cuda:$LOCAL_RANK)")
    p.add_argument("--no-progress", action="store_true")


def build_source(args):
    """The :class:`~me5.data.source.Source` named by ``--data`` or ``--source``/``--raw``."""
    from me5.app.cli import import_object, parse_key_values
    from me5.data.source import Source

    kwargs = parse_key_values(args.source_arg, field="--source-arg")
    if args.name:
        kwargs["name"] = args.name
    if args.data and (args.source or args.raw):
        raise ConfigError("--data", "give --data (normalised files) or --source CLASS --raw PATH, not both")
    if args.data:
        return Source(args.data, **kwargs)
    if not args.source or not args.raw:
        raise ConfigError("--source", "give --data PATH, or --source CLASS --raw PATH")
    return import_object(args.source, field="prepare.source")(args.raw, **kwargs)


def default_device(device: str | None) -> str:
    import torch

    if device is not None:
        return device
    if torch.cuda.is_available():
        return f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    return "cpu"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m me5.mine", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_source_args(p)
    p.add_argument("--model", required=True, help="exported me5 folder or hub id (Encoder.from_pretrained)")
    p.add_argument("--prompts", choices=STYLES, default=None, help="override the model's saved prompt policy")
    p.add_argument("--corpus", default=None, help="a corpus file (BEIR corpus.jsonl[.gz] / parquet); default: the "
                                                  "source's own positives and negatives, deduplicated")
    p.add_argument("--missing-positive", choices=("report", "skip", "error"), default="report",
                   help="a positive not in --corpus: count and mine anyway (default), leave the record out, or stop")
    p.add_argument("--n", type=int, default=7, dest="n_negatives", help="negatives per record (default 7, E5's)")
    p.add_argument("--range-min", type=int, default=0, help="first rank of the window (0-based, positives not "
                                                            "counted)")
    p.add_argument("--range-max", type=int, default=100, help="one past the last rank of the window")
    p.add_argument("--perc-pos", type=_optional_float, default=0.95,
                   help="drop candidates scoring above perc x the positive's score (TopK-PercPos; 'none': off)")
    p.add_argument("--absolute-margin", type=_optional_float, default=None,
                   help="drop candidates scoring above the positive's score minus this")
    p.add_argument("--sampling", choices=("top", "random"), default="top")
    p.add_argument("--own-negatives", choices=("keep", "replace"), default="keep",
                   help="a record's own negatives: keep them first and mine the rest up to --n (default; NLI keeps its "
                        "contradiction), or replace them by --n mined ones (sentence-transformers' mine_hard_negatives)")
    p.add_argument("--teacher", default=None, help="re-check with this cross-encoder (drop candidates it scores "
                                                   "above the positive) and write its scores")
    p.add_argument("--teacher-max-length", type=int, default=512)
    p.add_argument("--search", choices=("exact", "faiss"), default=None,
                   help="exact (torch; default) or faiss (implied by an approximate --index)")
    p.add_argument("--index", default="Flat", help="faiss index-factory string: Flat (exact), IVF4096,Flat, HNSW32")
    p.add_argument("--index-params", default=None, help="faiss search parameters, e.g. nprobe=64 or efSearch=128")
    p.add_argument("--query-max-length", type=int, default=512)
    p.add_argument("--passage-max-length", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=256, help="rows per forward")
    p.add_argument("--max-tokens", type=int, default=None, help="padded tokens per forward")
    p.add_argument("--precision", choices=("fp16", "bf16", "fp32"), default="fp16", help="CUDA autocast dtype")
    p.add_argument("--embed-shard-rows", type=int, default=65536, help="corpus rows per embedding shard")
    p.add_argument("--work-dir", default=None, help="corpus embeddings (default: OUT/_work)")
    p.add_argument("--wait", type=float, default=86400.0, help="seconds to wait for the other ranks' corpus shares")
    return p


def run(args: argparse.Namespace):
    """Check everything cheap, then load the model(s) and mine (returns the :class:`JobResult`)."""
    from me5.app.evaluate import load_model, read_saved_settings
    from me5.mining.mine import mine
    from me5.mining.options import MineOptions, approximate
    from me5.mining.plan import check_corpus_file, plan_mining, read_source

    search = args.search or ("faiss" if approximate(args.index) else "exact")
    opts = MineOptions(
        n_negatives=args.n_negatives, range_min=args.range_min, range_max=args.range_max, perc_pos=args.perc_pos,
        absolute_margin=args.absolute_margin, sampling=args.sampling, seed=args.seed,
        missing_positive=args.missing_positive, search=search, index=args.index, index_params=args.index_params,
        query_max_length=args.query_max_length, passage_max_length=args.passage_max_length,
        max_batch=args.batch_size, max_tokens=args.max_tokens, precision=args.precision,
        embed_shard_rows=args.embed_shard_rows, shard_rows=args.shard_rows, row_group_rows=args.row_group_rows,
        split_langs=args.split_langs, max_shards=args.max_shards, own_negatives=args.own_negatives)
    opts.check()
    if args.corpus is not None:
        check_corpus_file(args.corpus)
    if args.teacher is not None:
        from me5.mining.teacher import check_cross_encoder

        check_cross_encoder(args.teacher, field="--teacher")
    source = build_source(args)
    records, counts = read_source(source, strict=False if args.lenient else None)
    plan = plan_mining(records, opts, corpus=args.corpus, name=source.name, instruction=source.instruction,
                       symmetric=bool(source.symmetric), counts=counts)
    settings = read_saved_settings(args.model).with_prompts(args.prompts)
    device = default_device(args.device)
    encoder, tokenizer, dev = load_model(args.model, settings, device)
    scorer = None
    if args.teacher is not None:
        from me5.mining.teacher import CrossEncoderScorer

        scorer = CrossEncoderScorer.from_pretrained(args.teacher, device=dev, max_length=args.teacher_max_length,
                                                    field="--teacher")
    return mine(plan, encoder, tokenizer, args.out, options=opts, prompts=settings.prompts,
                scorer=scorer, rank=args.rank, world=args.world, work_dir=args.work_dir, overwrite=args.overwrite,
                model_id=str(args.model), device=dev, show_progress=not args.no_progress and sys.stderr.isatty(),
                wait_s=args.wait)


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


def report(result) -> None:
    """Print a finished job's counts, or how far this process got (``me5.mine`` and ``me5.score``)."""
    from me5.mining.output import format_counts

    if result.complete:
        print(format_counts(result.stats["counts"]))
        print(f"\n{result.stats['rows']} records in {result.stats['shards']} shards: {Path(result.path)}")
    else:
        print(f"rank {result.rank}/{result.world}: wrote {result.written} shard(s), {result.pending} left; "
              "run the same command again (or the other ranks) to finish")

if __name__ == "__main__":
    sys.exit(main())
