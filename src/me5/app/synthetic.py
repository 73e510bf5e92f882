"""``python -m me5.app.synthetic OUT_DIR``: generate the multilingual sample data (``me5.data.synthetic``)."""

from __future__ import annotations

import argparse
import json
import sys

from me5.data.synthetic import generate_sample_data


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m me5.app.synthetic", description="Generate the multilingual sample data."
    )
    p.add_argument("out_dir")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--n-pretrain", type=int, default=20000)
    p.add_argument("--n-finetune", type=int, default=5000)
    p.add_argument("--n-eval-queries-per-lang", type=int, default=60)
    p.add_argument("--n-hard-negatives", type=int, default=3)
    p.add_argument("--force", action="store_true", help="regenerate even if a matching manifest exists")
    a = p.parse_args(argv)
    stats = generate_sample_data(
        a.out_dir,
        seed=a.seed,
        n_pretrain=a.n_pretrain,
        n_finetune=a.n_finetune,
        n_eval_queries_per_lang=a.n_eval_queries_per_lang,
        n_hard_negatives=a.n_hard_negatives,
        force=a.force,
    )
    json.dump(stats, sys.stdout, ensure_ascii=False, indent=2)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
