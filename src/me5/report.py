"""Read a finished run's metrics and draw them: loss curves per stage and the results table.

Used by ``notebooks/run_report.ipynb`` (which holds no logic of its own) and usable from a shell:
``python -m me5.report <run dir>`` writes ``<run dir>/report.png``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def latest_run(log_dir: str | Path = "outputs") -> Path:
    """The most recent run folder under ``log_dir`` that has a ``metrics.json``."""
    runs = sorted(Path(log_dir).glob("**/metrics.json"), key=lambda p: p.stat().st_mtime)
    if not runs:
        raise FileNotFoundError(f"no run with metrics.json under {log_dir}")
    return runs[-1].parent


def load_history(run_dir: str | Path):
    """``{stage: DataFrame}`` of the per-step metrics the CSV logger wrote (``csv/<stage>/metrics.csv``)."""
    import pandas as pd

    out = {}
    for f in sorted(Path(run_dir).glob("csv/*/metrics.csv")):
        df = pd.read_csv(f)
        out[f.parent.name] = df
    order = {"pretrain": 0, "finetune": 1}
    return dict(sorted(out.items(), key=lambda kv: order.get(kv[0], 9)))


def load_results(run_dir: str | Path) -> dict:
    """The ``metrics.json`` payload: results per row, timings, data counts and run metadata."""
    return json.loads((Path(run_dir) / "metrics.json").read_text())


def results_frame(results: dict, *, metrics=("ndcg@10", "recall@100")):
    """Rows = untrained / stages, columns = ``metric`` (macro) and ``lang/metric``, values x100."""
    import pandas as pd

    rows = {}
    for row, scores in results.items():
        rows[row] = {k.split("/", 1)[1]: 100 * v for k, v in scores.items() if k.split("/")[-1] in metrics}
    return pd.DataFrame(rows).T.round(1)


def plot_run(run_dir: str | Path, out: str | Path | None = None):
    """Loss terms per stage (left panels) and macro scores per row (right panel); returns the figure."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    history = load_history(run_dir)
    results = load_results(run_dir)["results"]
    fig, axes = plt.subplots(1, len(history) + 1, figsize=(5 * (len(history) + 1), 3.6))
    for ax, (stage, df) in zip(axes, history.items()):
        cols = [c for c in df.columns if c.startswith("train/loss")]
        for c in cols:
            d = df[["step", c]].dropna()
            ax.plot(d["step"], d[c], label=c.removeprefix("train/"))
        ax.set(title=f"{stage}: training loss", xlabel="step", ylabel="loss")
        ax.legend(fontsize=8)
    frame = results_frame(results)
    macro = [c for c in frame.columns if "/" not in c]
    frame[macro].plot.bar(ax=axes[-1], rot=0)
    axes[-1].set(title="held-out retrieval (macro, x100)", ylim=(0, 100))
    fig.tight_layout()
    if out is not None:
        fig.savefig(out, dpi=110)
    return fig


def main(argv=None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    run_dir = Path(args[0]) if args else latest_run()
    plot_run(run_dir, run_dir / "report.png")
    print(results_frame(load_results(run_dir)["results"]).to_string())
    print(f"wrote {run_dir / 'report.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
