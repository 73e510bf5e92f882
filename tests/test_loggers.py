"""Metric history that survives a restart: the CSV log keeps its earlier rows, the W&B run resumes by id."""

from __future__ import annotations

import pandas as pd


def _log(save_dir, steps, value):
    from me5.app.loggers import csv_logger

    lg = csv_logger(save_dir=save_dir, run_name="r", stage="pretrain")
    for s in steps:
        lg.log_metrics({"train/loss": value + s}, step=s)
    return lg


def test_csv_history_is_appended_from_the_resumed_step(tmp_path):
    _log(tmp_path, range(0, 5), 0.0).save()  # attempt 1 logged steps 0-4 ...
    # ... its checkpoint was at step 3: attempt 2 re-logs from 3 on, with a new column
    lg = _log(tmp_path, range(3, 7), 100.0)
    lg.log_metrics({"data/pairs_seen": 7.0}, step=7)
    path = tmp_path / "csv" / "pretrain" / "metrics.csv"
    assert pd.read_csv(path)["step"].tolist() == [0, 1, 2, 3, 4]  # nothing lost before the first save
    lg.save()
    df = pd.read_csv(path)
    assert df["step"].tolist() == [0, 1, 2, 3, 4, 5, 6, 7]
    assert df["train/loss"].tolist()[:7] == [0.0, 1.0, 2.0, 103.0, 104.0, 105.0, 106.0]
    assert df["data/pairs_seen"].dropna().tolist() == [7.0]
    assert not (path.parent / "metrics.csv.tmp").exists()


def test_a_restarted_stage_resumes_its_wandb_run(tmp_path, monkeypatch):
    from me5.app.loggers import wandb_logger, wandb_run_id

    monkeypatch.setenv("WANDB_MODE", "offline")
    a = wandb_logger(save_dir=tmp_path, run_name="r", stage="pretrain", local_csv=False)
    b = wandb_logger(save_dir=tmp_path, run_name="r", stage="pretrain", local_csv=False)
    assert a._wandb_init["id"] == b._wandb_init["id"] == wandb_run_id(tmp_path, "pretrain")
    assert a._wandb_init["resume"] == "allow"
    assert wandb_run_id(tmp_path, "finetune") != wandb_run_id(tmp_path, "pretrain")
