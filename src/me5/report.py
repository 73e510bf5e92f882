"""Reports of finished runs and sweeps: loss curves per stage, the results table, and one table across a sweep.

A **run folder** is what ``python -m me5.train`` writes: ``metrics.json`` and ``results.md`` (the app's
``write_results``, at the end of the run) and ``csv/<stage>/metrics.csv`` (the CSV history; with ``logger=wandb``
too). A **sweep folder** is Hydra's multirun folder: ``multirun.yaml`` and one run folder per job
(``<sweep>/<job num>/``, each with ``.hydra/overrides.yaml``). :func:`write_report` writes ``report.md`` and a
loss-curve PNG for either; :func:`find_target` picks the folder when none is given.

Used by ``python -m me5.app.report`` (``make report``) and ``notebooks/run_report.ipynb``, which hold no logic
of their own. pandas, matplotlib and PyYAML are imported where they are used.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

METRICS = ("ndcg@10", "recall@100")  # the scores the tables show (x100)
STAGE_ORDER = {"pretrain": 0, "finetune": 1}
LOSS_PNG = "report.png"


# ---------------------------------------------------------------------------------------------- finding folders
def is_run(path: str | Path) -> bool:
    """True for a run folder: it has ``metrics.json`` or a CSV history ``csv/<stage>/metrics.csv``."""
    p = Path(path)
    return (p / "metrics.json").is_file() or any(p.glob("csv/*/metrics.csv"))


def is_sweep(path: str | Path) -> bool:
    """True for a Hydra multirun folder (``multirun.yaml``; a folder of single runs, each with its own
    ``.hydra/``, is not one)."""
    p = Path(path)
    return not is_run(p) and (p / "multirun.yaml").is_file()


def sweep_jobs(sweep_dir: str | Path) -> list[Path]:
    """The job folders of a sweep (those with ``.hydra/overrides.yaml``), in job-number order."""
    jobs = [f.parent.parent for f in Path(sweep_dir).glob("*/.hydra/overrides.yaml")]
    return sorted(jobs, key=lambda j: (0, int(j.name), "") if j.name.isdigit() else (1, 0, j.name))


def _last_change(folder: Path) -> float:
    files = [folder / "metrics.json", folder / "multirun.yaml", *folder.glob("csv/*/metrics.csv")]
    if (folder / "multirun.yaml").is_file():
        for job in sweep_jobs(folder):
            files += [job / "metrics.json", *job.glob("csv/*/metrics.csv")]
    return max((f.stat().st_mtime for f in files if f.is_file()), default=0.0)


def candidates(log_dir: str | Path) -> list[Path]:
    """Every run and sweep under ``log_dir``, oldest change first; a sweep's jobs count as the sweep."""
    root = Path(log_dir)
    sweeps = {f.parent for f in root.rglob("multirun.yaml")}
    runs = {f.parent for f in root.rglob("metrics.json")} | {f.parent.parent.parent for f in root.rglob("csv/*/metrics.csv")}
    runs = {r for r in runs if not any(s in r.parents for s in sweeps) and r not in sweeps}
    return sorted(sweeps | runs, key=lambda f: (_last_change(f), str(f)))


def find_target(path: str | Path | None = None, *, environ: Mapping[str, str] | None = None) -> tuple[Path, str]:
    """The run or sweep folder to report on, and why it was chosen.

    ``path`` given: that run or sweep, or the newest one under it. Otherwise the newest run or sweep under
    ``$ME5_LOG_DIR`` (the app's ``paths.log_dir``), else under ``outputs/`` of the working directory or of its
    parent (a notebook's kernel runs in ``notebooks/``). "Newest" is the last change of a metrics file.
    """
    env = os.environ if environ is None else environ
    if path is not None:
        root, source = Path(path), f"given: {path}"
    elif env.get("ME5_LOG_DIR"):
        root, source = Path(env["ME5_LOG_DIR"]), f"$ME5_LOG_DIR={env['ME5_LOG_DIR']}"
    else:
        root = next((p for p in (Path("outputs"), Path("..") / "outputs") if p.is_dir()), Path("outputs"))
        source = f"default log folder {root} ($ME5_LOG_DIR is not set)"
    if not root.is_dir():
        raise FileNotFoundError(f"{root} is not a folder ({source}); give a run or sweep folder or set ME5_LOG_DIR")
    if is_run(root):
        return root, f"a run folder ({source})"
    if is_sweep(root):
        return root, f"a sweep folder ({source})"
    found = candidates(root)
    if not found:
        raise FileNotFoundError(f"no run (metrics.json, csv/<stage>/metrics.csv) or sweep (multirun.yaml) under "
                                f"{root} ({source})")
    kind = "sweep" if is_sweep(found[-1]) else "run"
    return found[-1], f"the newest {kind} of {len(found)} under {root} ({source})"


# ---------------------------------------------------------------------------------------------- one run
def load_history(run_dir: str | Path):
    """``{stage: DataFrame}`` of the per-step metrics the CSV logger wrote (``csv/<stage>/metrics.csv``)."""
    import pandas as pd

    out = {f.parent.name: pd.read_csv(f) for f in Path(run_dir).glob("csv/*/metrics.csv")}
    return dict(sorted(out.items(), key=lambda kv: (STAGE_ORDER.get(kv[0], 9), kv[0])))


def load_results(run_dir: str | Path) -> dict:
    """The ``metrics.json`` payload (results per row, timings, data counts, run metadata); ``{}`` for a run that
    has not finished (the app writes it last)."""
    path = Path(run_dir) / "metrics.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def results_frame(results: Mapping, *, metrics: Sequence[str] = METRICS, macro_only: bool = False):
    """Rows = untrained / stages, columns = ``<eval>/<metric>`` (macro) and ``<eval>/<lang>/<metric>``, x100."""
    import pandas as pd

    rows = {}
    for row, scores in results.items():
        rows[row] = {k: 100 * v for k, v in scores.items() if k.split("/")[-1] in metrics
                     and (k.count("/") == 1 or not macro_only)}
    frame = pd.DataFrame.from_dict(rows, orient="index").round(1)
    frame.index.name = "row"
    return frame


def final_losses(history: Mapping) -> dict[str, dict[str, float]]:
    """Per stage: the last value of every ``train/loss*`` column and the step it was logged at (``step``);
    stages that logged no loss yet are left out."""
    out = {}
    for stage, df in history.items():
        if "train/loss" not in df or "step" not in df or df["train/loss"].notna().sum() == 0:
            continue
        last = df[df["train/loss"].notna()].iloc[-1]
        row: dict[str, float] = {"step": int(last["step"])}
        for c in (c for c in df.columns if c.startswith("train/loss")):
            d = df[c].dropna()
            if len(d):
                row[c.removeprefix("train/")] = float(d.iloc[-1])
        out[stage] = row
    return out


def _figure(n_panels: int):
    # the object API, no pyplot: no backend is chosen (files are drawn by Agg), and a notebook shows the figure
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5 * n_panels, 3.6))
    return fig, fig.subplots(1, n_panels, squeeze=False)[0]


def _plot_losses(ax, df, *, stage: str, label: str = "", terms: bool = True) -> None:
    cols = [c for c in df.columns if c.startswith("train/loss")] if terms else ["train/loss"]
    for c in cols:
        if c in df:
            d = df[["step", c]].dropna()
            ax.plot(d["step"], d[c], label=label if label and not terms else c.removeprefix("train/"))
    ax.set(title=f"{stage}: training loss", xlabel="step", ylabel="loss")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)


def plot_run(run_dir: str | Path, out: str | Path | None = None):
    """Loss terms per stage (a panel each) and macro scores per row (last panel); saved to ``out`` when given."""
    history = load_history(run_dir)
    results = load_results(run_dir).get("results") or {}
    frame = results_frame(results, macro_only=True)
    if not history and frame.empty:
        raise FileNotFoundError(f"{run_dir}: neither a CSV history (csv/<stage>/metrics.csv) nor results (metrics.json)")
    fig, axes = _figure(len(history) + (not frame.empty))
    for ax, (stage, df) in zip(axes, history.items()):
        _plot_losses(ax, df, stage=stage)
    if not frame.empty:
        ax = axes[-1]
        frame.plot.bar(ax=ax, rot=0)
        ax.set(title="held-out retrieval (macro, x100)", ylim=(0, 100), xlabel="")
    fig.tight_layout()
    if out is not None:
        fig.savefig(out, dpi=110)
    return fig


def markdown_table(frame, *, index: str | None = None) -> str:
    """A DataFrame as a GitHub markdown table (numbers right-aligned, NaN blank)."""
    def cell(v) -> str:
        if v is None or (isinstance(v, float) and math.isnan(v)):
            return ""
        if isinstance(v, float):
            return f"{v:.4g}" if abs(v) < 1e4 else f"{v:.0f}"
        return str(v).replace("|", "\\|")

    names = [index or frame.index.name or "", *map(str, frame.columns)]
    rows = [[cell(i), *(cell(v) for v in r)] for i, r in zip(frame.index, frame.itertuples(index=False))]
    numeric = [False] + [frame[c].dtype.kind in "iuf" for c in frame.columns]
    lines = ["| " + " | ".join(names) + " |", "|" + "|".join("---:" if n else "---" for n in numeric) + "|"]
    return "\n".join([*lines, *("| " + " | ".join(r) + " |" for r in rows)])


def run_markdown(run_dir: str | Path, *, png: str | None = LOSS_PNG) -> str:
    """``report.md`` of a run: what ran, the loss curves, the final losses, the evaluation tables, timings."""
    import pandas as pd

    run_dir = Path(run_dir)
    payload = load_results(run_dir)
    meta = payload.get("meta") or {}
    git = meta.get("git") or {}
    lines = [f"# Run report: {run_dir}", ""]
    if meta.get("command"):
        lines.append(f"- command: `{meta['command']}`")
    if git.get("sha"):
        lines.append(f"- git: `{git['sha']}`" + (" (dirty)" if git.get("dirty") else ""))
    if (meta.get("parameters") or {}).get("total"):
        lines.append(f"- parameters: {meta['parameters']['total']:,}")
    if not payload:
        lines.append("- not finished: no metrics.json yet (the loss history is shown as far as it goes)")
    losses = final_losses(load_history(run_dir))
    lines += ["", "## Training loss", ""]
    if losses:
        if png:
            lines += [f"![loss curves]({png})", ""]
        lines.append(markdown_table(pd.DataFrame.from_dict(losses, orient="index"), index="stage"))
    else:
        lines.append("(no CSV history: the run used logger=none)")
    results = payload.get("results") or {}
    lines += ["", "## Held-out evaluation (x100)", ""]
    if results:
        lines += [markdown_table(results_frame(results, macro_only=True)), ""]
        per_lang = run_dir / "results.md"
        if per_lang.is_file():
            lines += ["Per language:", "", per_lang.read_text().strip()]
    else:
        lines.append("(no evaluation results)")
    for key, title in (("timings_s", "Timings (s)"), ("data_counts", "Data")):
        if payload.get(key):
            lines += ["", f"## {title}", "", "```json", json.dumps(payload[key], indent=1), "```"]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------- a sweep
def parse_overrides(lines: Sequence[str]) -> dict[str, object]:
    """Hydra override strings (``key=value``, ``+key=value``, ``~key``) as ``{key: value}``; values are
    YAML-parsed (``0.01`` -> 0.01, ``false`` -> False), a deletion is ``"(deleted)"``."""
    import yaml

    out: dict[str, object] = {}
    for line in lines:
        key, sep, value = str(line).partition("=")
        if not sep:
            out[key.lstrip("~")] = "(deleted)"
            continue
        try:
            parsed = yaml.safe_load(value)
        except yaml.YAMLError:
            parsed = value
        out[key.lstrip("+~")] = parsed if isinstance(parsed, (int, float, str, bool)) else value
    return out


def job_overrides(job_dir: str | Path) -> dict[str, object]:
    """The overrides of one sweep job (``.hydra/overrides.yaml``)."""
    import yaml

    return parse_overrides(yaml.safe_load((Path(job_dir) / ".hydra" / "overrides.yaml").read_text()) or [])


def swept_parameters(per_job: Sequence[Mapping[str, object]], task: Mapping[str, object] | None = None) -> list[str]:
    """The keys a sweep varied: values that differ between jobs, or (one job) that differ from the sweep's own
    command line ``task`` (``loss.temperature=0.01,0.05`` there, ``=0.01`` in the job)."""
    keys = list(dict.fromkeys(k for job in per_job for k in job))
    varied = [k for k in keys if len({repr(job.get(k)) for job in per_job}) > 1]
    if task is not None:
        varied += [k for k in keys if k not in varied and any(k in job and job[k] != task.get(k) for job in per_job)]
    return [k for k in keys if k in varied]


def sweep_frame(sweep_dir: str | Path, *, metrics: Sequence[str] = METRICS):
    """One row per job: the swept parameters, whether it finished, the last evaluated row's macro scores (x100)
    and the final training loss of each stage."""
    import pandas as pd
    import yaml

    sweep_dir = Path(sweep_dir)
    jobs = sweep_jobs(sweep_dir)
    if not jobs:
        raise FileNotFoundError(f"{sweep_dir}: no job folders with .hydra/overrides.yaml")
    per_job = [job_overrides(j) for j in jobs]
    task = None
    if (sweep_dir / "multirun.yaml").is_file():
        hydra = (yaml.safe_load((sweep_dir / "multirun.yaml").read_text()) or {}).get("hydra") or {}
        task = parse_overrides(((hydra.get("overrides") or {}).get("task")) or [])
    params = swept_parameters(per_job, task)
    rows = []
    for job, overrides in zip(jobs, per_job):
        payload = load_results(job)
        results = payload.get("results") or {}
        row: dict[str, object] = {k: overrides.get(k) for k in params}
        row["status"] = "done" if payload else "incomplete"
        if results:
            last = list(results)[-1]
            row["evaluated"] = last
            row.update({k: round(100 * v, 1) for k, v in results[last].items()
                        if k.count("/") == 1 and k.split("/")[-1] in metrics})
        for stage, losses in final_losses(load_history(job)).items():
            if "loss" in losses:
                row[f"loss/{stage}"] = losses["loss"]
        rows.append(row)
    frame = pd.DataFrame(rows, index=pd.Index([j.name for j in jobs], name="job"))
    frame.attrs["swept"] = params
    return frame


def plot_sweep(sweep_dir: str | Path, out: str | Path | None = None):
    """The total training loss of every job, one panel per stage, labelled by its swept parameters."""
    jobs = sweep_jobs(sweep_dir)
    params = swept_parameters([job_overrides(j) for j in jobs])
    histories = {j: load_history(j) for j in jobs}
    stages = sorted({s for h in histories.values() for s in h}, key=lambda s: (STAGE_ORDER.get(s, 9), s))
    if not stages:
        raise FileNotFoundError(f"{sweep_dir}: no job has a CSV history (csv/<stage>/metrics.csv)")
    fig, axes = _figure(len(stages))
    for job, history in histories.items():
        overrides = job_overrides(job)
        label = ", ".join(f"{k}={overrides.get(k)}" for k in params) or f"job {job.name}"
        for ax, stage in zip(axes, stages):
            if stage in history:
                _plot_losses(ax, history[stage], stage=stage, label=label, terms=False)
    fig.tight_layout()
    if out is not None:
        fig.savefig(out, dpi=110)
    return fig


def sweep_markdown(sweep_dir: str | Path, *, png: str | None = LOSS_PNG) -> str:
    """``report.md`` of a sweep: one table across its jobs, the swept parameters as columns."""
    frame = sweep_frame(sweep_dir)
    swept = ", ".join(f"`{k}`" for k in frame.attrs["swept"]) or "(none found)"
    lines = [f"# Sweep report: {sweep_dir}", "", f"{len(frame)} jobs; swept: {swept}. Scores x100 of each job's "
             "last evaluated row; loss: the last logged training loss of each stage.", "",
             markdown_table(frame)]
    if png:
        lines += ["", f"![loss curves]({png})"]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------- both
def summary(target: str | Path):
    """The table of a run (results rows x metrics) or of a sweep (jobs x swept parameters and scores)."""
    return sweep_frame(target) if is_sweep(target) else results_frame(load_results(target).get("results") or {})


def plot(target: str | Path, out: str | Path | None = None):
    """The figure of a run (:func:`plot_run`) or of a sweep (:func:`plot_sweep`)."""
    return plot_sweep(target, out) if is_sweep(target) else plot_run(target, out)


def write_report(target: str | Path, out_dir: str | Path | None = None) -> Path:
    """Write ``report.md`` and the loss-curve PNG of a run or a sweep into ``out_dir`` (default: the folder
    itself); returns the path of ``report.md``."""
    target = Path(target)
    out_dir = Path(out_dir) if out_dir is not None else target
    out_dir.mkdir(parents=True, exist_ok=True)
    sweep = is_sweep(target)
    try:
        plot(target, out_dir / LOSS_PNG)
        png = LOSS_PNG
    except FileNotFoundError:  # nothing to draw (no history): the tables alone
        (out_dir / LOSS_PNG).unlink(missing_ok=True)
        png = None
    text = sweep_markdown(target, png=png) if sweep else run_markdown(target, png=png)
    path = out_dir / "report.md"
    path.write_text(text)
    return path
