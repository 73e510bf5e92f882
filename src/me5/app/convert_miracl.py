"""``python -m me5.app.convert_miracl``: MIRACL as published -> the per-language BEIR layout ``eval=miracl`` reads.

    python -m me5.app.convert_miracl --corpus RAW/miracl-corpus --topics RAW/miracl --out data/miracl

``--corpus``: the ``miracl/miracl-corpus`` download (``miracl-corpus-v1.0-<lang>/docs-*.jsonl.gz``); ``--topics``:
the ``miracl/miracl`` download (``miracl-v1.0-<lang>/{topics,qrels}/*-dev.tsv``). Streams every corpus (English
is 32.9M passages), resumes per language, and writes ``<out>/stats.json`` with the counts by reason.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

from me5.errors import Me5Error


def main(argv: list[str] | None = None) -> int:
    from me5.eval.miracl import convert_miracl

    p = argparse.ArgumentParser(prog="python -m me5.app.convert_miracl", description=__doc__.split("\n\n")[0])
    p.add_argument("--corpus", required=True, help="the miracl/miracl-corpus folder")
    p.add_argument("--topics", required=True, help="the miracl/miracl folder (topics and qrels)")
    p.add_argument("--out", required=True, help="output folder: <out>/<lang>/{corpus.jsonl.gz,queries.jsonl,qrels/}")
    p.add_argument("--languages", nargs="+", default=None, help="default: the 16 languages of mE5 Table 4")
    p.add_argument("--split", default="dev")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        stats = convert_miracl(args.corpus, args.topics, args.out, languages=args.languages, split=args.split,
                               progress=not args.no_progress)
    except Me5Error as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(json.dumps(stats, indent=1, ensure_ascii=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
