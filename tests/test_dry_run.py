"""``python -m me5.train ... dry_run=true``: every pre-flight check and the plan, nothing started or written; a
malformed record among a source's first records is reported there, and a real run reports a bad record before
any logger or W&B run starts."""

from __future__ import annotations

import json
import re

import pytest

from me5.app import dry_run
from me5.app.train import run
from me5.errors import DataError
from tests.helpers import compose_cfg


def _files(tmp_path, *, bad_line: int | None = None, n: int = 400):
    rows = [{"query": f"q {i}", "positive": f"p {i}", "negatives": [f"n {i} {k}" for k in range(3)],
             "teacher_scores": [5.0, 1.0, 0.5, 0.0], "lang": "en"} for i in range(n)]
    lines = [json.dumps(r) for r in rows]
    if bad_line is not None:
        lines[bad_line - 1] = json.dumps({"query": "q", "positive": 7})
    p = tmp_path / "pairs.jsonl"
    p.write_text("\n".join(lines) + "\n")
    return p


def test_requested_only_by_a_true_dry_run_override():
    assert dry_run.requested(["model=tiny", "dry_run=true"]) and dry_run.requested(["+dry_run=True"])
    assert not dry_run.requested(["dry_run=false"]) and not dry_run.requested(["model=tiny"])


def test_the_dry_run_prints_the_plan_and_writes_nothing(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    status = dry_run.main(["experiment=me5_base", "stage=[pretrain]", "eval=none", "trainer.devices=8",
                           "trainer.num_nodes=4", f"paths.data_dir={tmp_path / 'data'}", "data=files",
                           f"data.pretrain.path={_files(tmp_path)}", "dry_run=true"])
    out = capsys.readouterr().out
    assert status == 0, out
    assert "every check passed" in out and "(not created)" in out
    assert "devices      32  (no GPU here: planned for trainer.devices=8 x trainer.num_nodes=4)" in out
    assert "global 32,768 = 32 x 1,024 per device; gradient cache: chunks of 262,144 padded tokens" in out
    assert "stage pretrain: 30,000 steps, warm-up 1,000, peak LR 0.0002" in out
    assert "FacebookAI/xlm-roberta-base, 85.1M non-embedding parameters" in out
    # 6 x 85.05M x 30k x 32,768 x 256 tokens x 4/3 (gradient caching) = 1.7e20
    assert "1.7e+20 FLOPs" in out and "evaluation   none" in out
    assert re.search(r"files\s+Source\s+size\s+1\.000\s+0\s+1 file, [\d.]+ KB", out)  # name, class, weight, p, ...
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pairs.jsonl"]  # no outputs/, no data/sample


def test_a_bad_record_among_the_first_records_fails_the_dry_run_naming_its_line(tmp_path, capsys):
    bad = _files(tmp_path, bad_line=138)
    status = dry_run.main([f"paths.log_dir={tmp_path / 'logs'}", f"paths.data_dir={tmp_path / 'data'}", "data=files",
                           f"data.pretrain.path={bad}", "stage=[pretrain]", "dry_run=true"])
    err = capsys.readouterr().err
    assert status == 2 and "pairs.jsonl:138, field 'positive'" in err
    assert not (tmp_path / "logs").exists() and not (tmp_path / "data").exists()


def test_a_sweep_is_planned_job_by_job_and_a_bad_job_exits_2(tmp_path, capsys):
    common = [f"paths.log_dir={tmp_path / 'logs'}", f"paths.data_dir={tmp_path / 'data'}", "dry_run=true"]
    assert dry_run.main(["-m", "stages.pretrain.lr=1e-3,0", *common]) == 2
    out, err = capsys.readouterr()
    assert "=== job 0 of 2: stages.pretrain.lr=0.001" in out and "every check passed" in out
    assert "stages.pretrain.lr" in err and "must be > 0" in err
    assert not (tmp_path / "logs").exists()


@pytest.mark.parametrize("bad_line", [138, 300], ids=["first_records", "in_memory_setup"])
def test_a_bad_record_stops_the_run_before_any_logger(tmp_path, bad_line, monkeypatch):
    """data=files with a bad record: at line 138 the pre-flight read of the first 256 records finds it (no run
    folder yet); at line 300 reading the in-memory data before the logger does (the run folder holds no wandb/ and
    no csv/: no W&B run started)."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    bad = _files(tmp_path, bad_line=bad_line)
    tiny_tokenizer = ["model.tokenizer._target_=tests.tiny.tokenizer", "~model.tokenizer.data_dir",
                      "~model.tokenizer.vocab_size"]  # no sample data to train one on
    cfg = compose_cfg([f"paths.data_dir={tmp_path / 'data'}", "data=files", f"data.pretrain.path={bad}",
                       "stage=[pretrain]", "logger=wandb", "eval=none", "eval_baseline=false", *tiny_tokenizer],
                      tmp_path=tmp_path)
    with pytest.raises(DataError, match=rf"pairs\.jsonl:{bad_line}, field 'positive'"):
        run(cfg)
    left = sorted(p.name for p in (tmp_path / "run").iterdir()) if (tmp_path / "run").exists() else []
    assert "wandb" not in left and "csv" not in left and "checkpoints" not in left
    assert (bad_line == 138) == (left == [] and not (tmp_path / "run").exists())
