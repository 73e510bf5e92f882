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


def _claim_id(args):
    """One rank making the stage's W&B id at the same moment as the others (a process of the pool)."""
    save_dir, stage, barrier = args
    from me5.app.loggers import wandb_run_id

    barrier.wait(timeout=120)
    return wandb_run_id(save_dir, stage)


def test_ranks_creating_the_wandb_id_at_once_agree_on_it(tmp_path):
    """Every rank builds the stage's logger at the same moment (srun/torchrun start them together): they must all
    get one id, the one kept in wandb_ids.json, whether the file is new (first stage) or gains a stage (second),
    from processes and from threads alike; the file is whole JSON throughout."""
    import json
    import multiprocessing as mp
    from concurrent.futures import ThreadPoolExecutor

    from me5.app.loggers import wandb_run_id

    ctx = mp.get_context("spawn")
    n = 8
    for attempt in range(3):  # a fresh folder each time: the race is at the first creation
        save_dir = tmp_path / f"p{attempt}"
        save_dir.mkdir()
        with ctx.Manager() as manager, ctx.Pool(n) as pool:
            for stage in ("pretrain", "finetune"):
                barrier = manager.Barrier(n)
                ids = pool.map(_claim_id, [(str(save_dir), stage, barrier)] * n)
                assert len(set(ids)) == 1, (stage, ids)
                assert json.loads((save_dir / "wandb_ids.json").read_text())[stage] == ids[0]
        kept = json.loads((save_dir / "wandb_ids.json").read_text())
        assert set(kept) == {"pretrain", "finetune"} and kept["pretrain"] != kept["finetune"]
        assert wandb_run_id(save_dir, "pretrain") == kept["pretrain"]  # a rerun resumes it
    import threading

    save_dir = tmp_path / "threads"
    save_dir.mkdir()
    barrier = threading.Barrier(n)
    with ThreadPoolExecutor(n) as pool:
        ids = list(pool.map(lambda _: (barrier.wait(timeout=120), wandb_run_id(save_dir, "pretrain"))[1], range(n)))
    assert len(set(ids)) == 1 and json.loads((save_dir / "wandb_ids.json").read_text()) == {"pretrain": ids[0]}
    assert sorted(p.name for p in save_dir.iterdir()) == ["wandb_ids.json", "wandb_ids.json.lock"]


def test_a_damaged_wandb_ids_file_is_named(tmp_path):
    import pytest

    from me5.app.loggers import wandb_run_id
    from me5.errors import Me5Error

    (tmp_path / "wandb_ids.json").write_text('{"pretrain": "abc"')  # cut short
    with pytest.raises(Me5Error, match=r"wandb_ids\.json is not the JSON map"):
        wandb_run_id(tmp_path, "pretrain")
    (tmp_path / "wandb_ids.json").write_text('["abc"]')
    with pytest.raises(Me5Error, match=r"wandb_ids\.json is not a JSON map of stage -> W&B run id"):
        wandb_run_id(tmp_path, "finetune")
