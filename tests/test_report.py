"""Reports: one run's loss curves and evaluation table, one table across a sweep (swept parameters as columns),
the folder found by an argument or ``$ME5_LOG_DIR``, a W&B table, and the notebook on the same functions.

The run folders are written by the app's own writers (``me5.training.record.RunRecord`` for ``metrics.json`` /
``results.md``, the CSV logger of ``me5.app.loggers`` for ``csv/<stage>/metrics.csv``) and Hydra's layout for a
multirun (``multirun.yaml``, ``<job>/.hydra/overrides.yaml``); ``tests/test_launcher.py`` reports on a folder
that a real sweep wrote.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from omegaconf import OmegaConf

from me5 import report
from tests.helpers import ROOT

LANGS = ("en", "de", "zh")
STEPS = {"pretrain": 6, "finetune": 4}


def scores(base: float) -> dict[str, float]:
    """An evaluator's result dict (``RetrievalEvaluator`` keys: macro and per language)."""
    out = {}
    for m, offset in (("ndcg@10", 0.0), ("ndcg@100", 0.05), ("recall@10", 0.1), ("recall@100", 0.2)):
        out[f"sample/{m}"] = base + offset
        out.update({f"sample/{lang}/{m}": base + offset + 0.01 * i for i, lang in enumerate(LANGS)})
    return out


def loss_at(stage: str, step: int, scale: float) -> float:
    return scale * (3.0 if stage == "pretrain" else 1.6) / (1 + step)


def write_run(run_dir: Path, *, score: float = 0.4, scale: float = 1.0, finished: bool = True) -> Path:
    """A run folder as the app leaves it: per-stage CSV histories, then (finished) metrics.json + results.md."""
    from me5.app.loggers import csv_logger
    from me5.training.record import RunRecord

    for stage, steps in STEPS.items():
        lg = csv_logger(save_dir=str(run_dir), run_name="tiny-sample", stage=stage, hparams={"stage": stage})
        for step in range(steps):
            loss = loss_at(stage, step, scale)
            terms = {"train/loss/infonce": loss} if stage == "pretrain" else \
                {"train/loss/infonce": 0.7 * loss, "train/loss/kd": 0.3 * loss}
            lg.log_metrics({"train/loss": loss, **terms, "train/lr": 1e-3}, step=step)
        lg.log_metrics({"data/sample/kept": 100.0}, step=steps)
        lg.save()
        lg.finalize("success")
    if finished:
        results = {"untrained": scores(0.2), "pretrain": scores(score - 0.1), "finetune": scores(score)}
        meta = {"git": {"sha": "abc123", "dirty": False}, "run_dir": str(run_dir), "command": "me5.train",
                "parameters": {"total": 1234}}
        RunRecord(run_dir, results, timings={"pretrain/train_s": 1.0}, data_counts={"pretrain": {"sample/kept": 100}},
                  meta=meta).write()
    return run_dir


TEMPERATURES = (0.01, 0.02, 0.05)
COMMON = ["paths.data_dir=/data", "logger=csv", "trainer.enable_progress_bar=False"]


def write_sweep(sweep_dir: Path) -> Path:
    """A 3-job multirun of ``loss.temperature=0.01,0.02,0.05`` in Hydra's layout."""
    sweep_dir.mkdir(parents=True)
    task = [*COMMON, "loss.temperature=" + ",".join(map(str, TEMPERATURES))]
    (sweep_dir / "multirun.yaml").write_text(OmegaConf.to_yaml({"hydra": {"overrides": {"task": task}}}))
    for num, t in enumerate(TEMPERATURES):
        job = write_run(sweep_dir / str(num), score=0.3 + 0.1 * num, scale=1.0 + num)
        (job / ".hydra").mkdir()
        (job / ".hydra" / "overrides.yaml").write_text(OmegaConf.to_yaml([*COMMON, f"loss.temperature={t}"]))
        (job / ".hydra" / "config.yaml").write_text(OmegaConf.to_yaml(
            {"run_name": "tiny-sample", "logger": {"project": "me5-test", "group": None}}))
    return sweep_dir


def cli(args, *, env_extra=None, cwd=ROOT):
    env = {k: v for k, v in os.environ.items() if k != "ME5_LOG_DIR"}  # only what a test sets
    env.update(env_extra or {})
    return subprocess.run([sys.executable, "-m", "me5.app.report", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)


def test_run_report_has_the_loss_curves_and_the_eval_table(tmp_path):
    run = write_run(tmp_path / "run", score=0.4)
    r = cli([str(run)])
    assert r.returncode == 0, r.stderr
    assert f"report of {run}: a run folder (given" in r.stdout
    text = (run / "report.md").read_text()
    assert (run / "report.png").stat().st_size > 10_000 and "![loss curves](report.png)" in text
    # the final losses: the last logged step of each stage and its terms
    assert "| pretrain | 5 | 0.5 | 0.5 |  |" in text
    assert f"| finetune | 3 | {0.4:.4g} | {0.7 * 0.4:.4g} | {0.3 * 0.4:.4g} |" in text
    # the eval table: macro rows x100, then the app's per-language tables
    assert "| row | sample/ndcg@10 | sample/recall@100 |" in text
    assert "| untrained | 20 | 40 |" in text and "| finetune | 40 | 60 |" in text
    assert "| sample ndcg@10 |" in text and "zh" in text
    frame = report.results_frame(report.load_results(run)["results"])
    assert list(frame.index) == ["untrained", "pretrain", "finetune"]
    assert frame.loc["finetune", "sample/zh/recall@100"] == pytest.approx(62.0)


def test_unfinished_run_reports_its_losses(tmp_path):
    run = write_run(tmp_path / "run", finished=False)
    path = report.write_report(run)
    text = path.read_text()
    assert "not finished" in text and "(no evaluation results)" in text and "| pretrain | 5 |" in text
    assert (run / "report.png").is_file()


def test_sweep_gets_one_table_with_the_swept_parameter_as_a_column(tmp_path):
    sweep = write_sweep(tmp_path / "multirun" / "2026-01-02" / "03-04-05")
    frame = report.sweep_frame(sweep)
    assert frame.attrs["swept"] == ["loss.temperature"]  # the common overrides are not columns
    assert list(frame.index) == ["0", "1", "2"]
    assert list(frame.columns[:3]) == ["loss.temperature", "status", "evaluated"]
    assert list(frame["loss.temperature"]) == list(TEMPERATURES)
    assert list(frame["sample/ndcg@10"]) == pytest.approx([30.0, 40.0, 50.0])
    assert list(frame["sample/recall@100"]) == pytest.approx([50.0, 60.0, 70.0])
    assert list(frame["evaluated"]) == ["finetune"] * 3 and list(frame["status"]) == ["done"] * 3
    assert list(frame["loss/pretrain"]) == pytest.approx([loss_at("pretrain", 5, s) for s in (1, 2, 3)])
    assert list(frame["loss/finetune"]) == pytest.approx([loss_at("finetune", 3, s) for s in (1, 2, 3)])
    assert not any(c.startswith("paths.") or c == "logger" for c in frame.columns)

    r = cli([str(sweep)])
    assert r.returncode == 0, r.stderr
    text = (sweep / "report.md").read_text()
    assert "a sweep folder" in r.stdout and "3 jobs; swept: `loss.temperature`" in text
    assert "| job | loss.temperature | status | evaluated | sample/ndcg@10 | sample/recall@100 | loss/pretrain |" in text
    assert "| 2 | 0.05 | done | finetune | 50 | 70 |" in text
    assert (sweep / "report.png").stat().st_size > 10_000

    # a job that has not finished yet: its row stays, without scores
    (sweep / "1" / "metrics.json").unlink()
    frame = report.sweep_frame(sweep)
    assert list(frame["status"]) == ["done", "incomplete", "done"] and pd.isna(frame.loc["1", "sample/ndcg@10"])


def test_swept_parameters_of_a_single_job_come_from_the_sweep_command():
    job = report.parse_overrides(["logger=csv", "trainer.enable_progress_bar=False", "loss.temperature=0.01"])
    task = report.parse_overrides(["logger=csv", "trainer.enable_progress_bar=false", "loss.temperature=0.01,0.05"])
    assert report.swept_parameters([job], task) == ["loss.temperature"]
    assert report.swept_parameters([job]) == []
    assert report.parse_overrides(["+x.y=2", "~callbacks.progress", "stage=[pretrain]"]) == {
        "x.y": 2, "callbacks.progress": "(deleted)", "stage": "[pretrain]"}


def test_default_is_the_newest_under_ME5_LOG_DIR_and_says_why(tmp_path, monkeypatch):
    logs = tmp_path / "logs"
    old = write_run(logs / "runs" / "tiny-sample" / "2026-01-01_00-00-00")
    sweep = write_sweep(logs / "multiruns" / "tiny-sample" / "2026-01-02_00-00-00")
    for f in old.rglob("*"):
        os.utime(f, (1e9, 1e9))
    target, why = report.find_target(environ={"ME5_LOG_DIR": str(logs)})
    assert target == sweep and "newest sweep of 2" in why and "ME5_LOG_DIR" in why
    for f in sweep.rglob("*"):
        os.utime(f, (1e9 - 10, 1e9 - 10))
    assert report.find_target(environ={"ME5_LOG_DIR": str(logs)})[0] == old
    assert [p.name for p in report.candidates(logs)] == [sweep.name, old.name]
    # a folder of single runs (each with its own .hydra/) is not a sweep: its newest run is reported
    (old / ".hydra").mkdir()
    (old / ".hydra" / "overrides.yaml").write_text(OmegaConf.to_yaml(COMMON))
    assert report.find_target(old.parent)[0] == old
    # the CLI without an argument: $ME5_LOG_DIR
    r = cli([], env_extra={"ME5_LOG_DIR": str(logs)})
    assert r.returncode == 0, r.stderr
    assert f"report of {old}: the newest run of 2 under {logs} ($ME5_LOG_DIR={logs})" in r.stdout
    assert (old / "report.md").is_file() and not (sweep / "report.md").exists()
    # neither: outputs/ of the working directory, or of its parent (a notebook's kernel runs in notebooks/)
    r = cli([], cwd=tmp_path)
    assert r.returncode == 2 and "outputs" in r.stderr and "ME5_LOG_DIR" in r.stderr
    (tmp_path / "outputs").symlink_to(logs)
    (tmp_path / "notebooks").mkdir()
    monkeypatch.chdir(tmp_path / "notebooks")
    target, why = report.find_target(environ={})
    assert target.resolve() == old.resolve() and "../outputs" in why and "not set" in why


def test_sweep_table_goes_to_wandb(tmp_path):
    sweep = write_sweep(tmp_path / "sweep")
    r = cli([str(sweep), "--wandb"], env_extra={"WANDB_MODE": "offline", "WANDB_SILENT": "true"})
    assert r.returncode == 0, r.stderr[-3000:]
    runs = list((sweep / "wandb").glob("offline-run-*"))
    assert len(runs) == 1, r.stdout
    tables = list(runs[0].glob("files/media/table/sweep_*.table.json"))
    assert len(tables) == 1, sorted(str(p.relative_to(runs[0])) for p in runs[0].rglob("*"))
    table = json.loads(tables[0].read_text())
    assert table["columns"][:2] == ["job", "loss.temperature"] and len(table["data"]) == 3
    assert [row[1] for row in table["data"]] == list(TEMPERATURES)
    assert [row[table["columns"].index("sample/ndcg@10")] for row in table["data"]] == pytest.approx([30, 40, 50])


def test_notebook_runs_on_the_library_and_honours_ME5_LOG_DIR(tmp_path, monkeypatch):
    import nbformat

    run = write_run(tmp_path / "logs" / "runs" / "x" / "2026-01-01_00-00-00")
    monkeypatch.setenv("ME5_LOG_DIR", str(tmp_path / "logs"))
    monkeypatch.delenv("ME5_REPORT_DIR", raising=False)  # what `make notebook ARGS=<folder>` sets
    monkeypatch.chdir(tmp_path)
    nb = nbformat.read(ROOT / "notebooks" / "run_report.ipynb", as_version=4)
    assert all(not c.get("outputs") for c in nb.cells if c.cell_type == "code"), "outputs are not committed"
    ns: dict = {}
    for cell in (c for c in nb.cells if c.cell_type == "code"):
        code = "\n".join(line for line in cell.source.splitlines() if not line.startswith("%"))  # IPython magics
        exec(compile(code, "run_report.ipynb", "exec"), ns)  # noqa: S102 -- the notebook's own cells
    assert ns["target"] == run and "ME5_LOG_DIR" in ns["why"]
    assert list(ns["table"].index) == ["untrained", "pretrain", "finetune"]


def test_make_notebook_runs_on_a_given_folder_and_on_a_relative_ME5_LOG_DIR(tmp_path):
    """`make notebook` executes the notebook with the project's venv (nbconvert and a kernel from the `notebook`
    extra); a folder given in ARGS, or ME5_LOG_DIR, relative to the repository is found although the kernel runs
    in notebooks/."""
    import shutil

    nbformat = pytest.importorskip("nbformat")
    pytest.importorskip("nbconvert", reason="the `notebook` extra is not installed (make notebook installs it)")
    pytest.importorskip("ipykernel", reason="the `notebook` extra is not installed (make notebook installs it)")
    if shutil.which("make") is None:
        pytest.skip("no make")
    logs = tmp_path / "logs"
    older = write_run(logs / "runs" / "x" / "2026-01-01_00-00-00", score=0.3)
    newer = write_run(logs / "runs" / "x" / "2026-01-02_00-00-00", score=0.5)
    for f in older.rglob("*"):
        os.utime(f, (1e9, 1e9))
    venv = Path(sys.executable).parent.parent
    # a `make test ARGS=...` around this test exports ARGS (and MAKEFLAGS) to it: the inner make must not see them
    env = {k: v for k, v in os.environ.items()
           if k not in ("ME5_LOG_DIR", "ME5_REPORT_DIR", "MAKEFLAGS", "MFLAGS", "MAKEOVERRIDES", "ARGS")}
    make = ["make", "-s", f"VENV={venv}", "-o", f"{venv}/.installed", "-o", f"{venv}/.notebook", "notebook"]

    def executed(args, extra_env, out):
        out.mkdir()
        r = subprocess.run([*make, *args], cwd=ROOT, env={**env, **extra_env, "TMPDIR": str(out)},
                           capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr[-3000:]
        nb = nbformat.read(out / "run_report.ipynb", as_version=4)
        cells = [c for c in nb.cells if c.cell_type == "code"]
        assert not [o for c in cells for o in c.outputs if o.output_type == "error"]
        printed = "".join(o.get("text", "") for o in cells[0].outputs if o.output_type == "stream")
        table = "".join(o["data"]["text/plain"] for o in cells[-1].outputs if o.output_type == "execute_result")
        return printed, table

    printed, table = executed([f"ARGS={os.path.relpath(older, ROOT)}"], {}, tmp_path / "given")
    assert printed.startswith(f"{older}: a run folder (given: {older}")
    assert "untrained" in table and "finetune" in table
    printed, _ = executed([], {"ME5_LOG_DIR": os.path.relpath(logs, ROOT)}, tmp_path / "env")
    assert printed.startswith(f"{newer}: the newest run of 2 under {logs} ($ME5_LOG_DIR={logs})")
