"""End to end on CPU: the Hydra app on the generated sample data with the tiny model.

- a short seeded run reproduces stored golden losses (a refactor that changes the maths shows up here);
- training clearly beats the untrained baseline on the held-out split;
- a run stopped at a checkpoint and resumed ends with exactly the weights of an uninterrupted run;
- bad input exits non-zero with a message that names the file / field;
- two gloo processes (our all-reduce DDP strategy with cross-rank negatives) run the pipeline.

Regenerate the golden file after an intended change with ``ME5_UPDATE_GOLDEN=1 pytest tests/test_e2e.py``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

from me5.errors import DataError
from me5.train import run
from tests.helpers import ROOT, compose_cfg

GOLDEN = Path(__file__).parent / "assets" / "golden_losses.json"
SHORT = [
    "logger=csv",
    "trainer.enable_progress_bar=false",
    "trainer.log_every_n_steps=1",
    "model.pretrain.max_steps=6",
    "model.pretrain.global_batch_size=16",
    "model.finetune.max_steps=4",
    "model.finetune.global_batch_size=8",
]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """The sample data and tokenizer, generated once for this module (seeded, so identical everywhere)."""
    from me5.data.synthetic import generate_sample_data
    from me5.models.tokenizer import ensure_sample_tokenizer

    root = tmp_path_factory.mktemp("data")
    generate_sample_data(root / "sample", seed=0)
    ensure_sample_tokenizer(root / "sample")
    return root


def cfg_for(tmp_path, data_dir, extra=()):
    return compose_cfg([f"paths.data_dir={data_dir}", *SHORT, *extra], tmp_path=tmp_path)


def losses(run_dir: Path, stage: str) -> list[float]:
    df = pd.read_csv(run_dir / "csv" / stage / "metrics.csv")
    return [round(float(v), 5) for v in df["train/loss"].dropna()]


def test_golden_losses_and_outputs(tmp_path, data_dir):
    torch.set_num_threads(2)
    results = run(cfg_for(tmp_path, data_dir))
    run_dir = tmp_path / "run"
    got = {stage: losses(run_dir, stage) for stage in ("pretrain", "finetune")}
    assert [len(v) for v in got.values()] == [6, 4]
    if os.environ.get("ME5_UPDATE_GOLDEN"):
        GOLDEN.write_text(json.dumps(got, indent=2) + "\n")
    golden = json.loads(GOLDEN.read_text())
    for stage in got:
        assert got[stage] == pytest.approx(golden[stage], rel=2e-3, abs=2e-3), stage
    # the outputs a user reads
    payload = json.loads((run_dir / "metrics.json").read_text())
    assert set(payload["results"]) == {"untrained", "pretrain", "finetune"} == set(results)
    assert "sample/ndcg@10" in payload["results"]["finetune"] and "sample/zh/recall@100" in payload["results"]["finetune"]
    assert payload["data_counts"]["pretrain"]["sample/kept"] == 20000
    assert payload["meta"]["parameters"]["total"] > 0 and "sha" in payload["meta"]["git"]
    assert "untrained" in (run_dir / "results.md").read_text()
    ckpt = torch.load(run_dir / "checkpoints" / "finetune" / "last.ckpt", map_location="cpu", weights_only=False)
    assert ckpt["me5_config"]["loss"]["temperature"] == 0.01 and ckpt["global_step"] == 4
    from transformers import AutoModel

    AutoModel.from_pretrained(run_dir / "export" / "finetune")
    # the run report the notebook shows: loss curves + table, from the logged metrics
    from me5 import report

    report.plot_run(run_dir, tmp_path / "report.png")
    assert (tmp_path / "report.png").stat().st_size > 10_000
    assert list(report.results_frame(payload["results"]).index) == ["untrained", "pretrain", "finetune"]


def test_training_beats_the_untrained_baseline(tmp_path, data_dir):
    torch.set_num_threads(2)
    results = run(cfg_for(tmp_path, data_dir, ["stage=[pretrain]", "model.pretrain.max_steps=150",
                                               "model.pretrain.global_batch_size=64", "trainer.log_every_n_steps=50"]))
    before, after = results["untrained"]["sample/ndcg@10"], results["pretrain"]["sample/ndcg@10"]
    assert after > before + 0.15, (before, after)  # measured: 0.33 -> 0.53


def test_resume_continues_exactly(tmp_path, data_dir):
    torch.set_num_threads(2)
    extra = ["stage=[pretrain]", "checkpoint_every=3", "eval=none", "eval_baseline=false"]
    full = tmp_path / "full"
    run(cfg_for(full, data_dir, extra))
    ckpts = full / "run" / "checkpoints" / "pretrain"
    # an interrupted run: its folder holds only the step-3 checkpoint as last.ckpt
    resumed = tmp_path / "resumed"
    (resumed / "run" / "checkpoints" / "pretrain").mkdir(parents=True)
    shutil.copy(ckpts / "step000003.ckpt", resumed / "run" / "checkpoints" / "pretrain" / "last.ckpt")
    run(cfg_for(resumed, data_dir, extra))
    a = torch.load(ckpts / "last.ckpt", map_location="cpu", weights_only=False)
    b = torch.load(resumed / "run" / "checkpoints" / "pretrain" / "last.ckpt", map_location="cpu", weights_only=False)
    assert a["global_step"] == b["global_step"] == 6
    for k in a["state_dict"]:
        torch.testing.assert_close(a["state_dict"][k], b["state_dict"][k], rtol=0, atol=0, msg=k)
    assert losses(full / "run", "pretrain")[3:] == losses(resumed / "run", "pretrain")


def test_missing_data_file_is_named(tmp_path, data_dir):
    cfg = cfg_for(tmp_path, data_dir, ["data.pretrain.sources.sample.file=nope.jsonl", "eval_baseline=false"])
    with pytest.raises(DataError, match="nope.jsonl"):
        run(cfg)


def _cli(args, env_extra=None, timeout=300):
    env = {**os.environ, "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1", **(env_extra or {})}
    return subprocess.run([sys.executable, "-m", "me5.train", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


def test_cli_bad_input_exits_non_zero_with_the_name(tmp_path, data_dir):
    common = [f"paths.data_dir={data_dir}", f"paths.log_dir={tmp_path}", "hydra.run.dir=" + str(tmp_path / "r"), *SHORT]
    r = _cli([*common, "model=huge"])
    assert r.returncode != 0 and "huge" in r.stderr
    r = _cli([*common, "stages.pretrain.per_device_batch_size=64"])
    assert r.returncode == 2 and "stages.pretrain.per_device_batch_size" in r.stderr
    r = _cli([*common, "eval_baseline=false", "data.pretrain.sources.sample.file=nope.jsonl"])
    assert r.returncode == 2 and "nope.jsonl" in r.stderr and "Traceback" not in r.stderr


def test_two_process_ddp_pipeline(tmp_path, data_dir):
    r = _cli([f"paths.data_dir={data_dir}", "hydra.run.dir=" + str(tmp_path / "r"), *SHORT, "trainer=ddp",
              "trainer.accelerator=cpu", "trainer.devices=2", "trainer.precision=32-true", "eval_baseline=false"])
    assert r.returncode == 0, r.stderr[-3000:]
    payload = json.loads((tmp_path / "r" / "metrics.json").read_text())
    assert set(payload["results"]) == {"pretrain", "finetune"}
    df = pd.read_csv(tmp_path / "r" / "csv" / "pretrain" / "metrics.csv")
    assert df["data/pairs_seen"].dropna().iloc[-1] == 6 * 16  # global batch over both ranks


def test_sweep_is_one_multirun_with_the_parameter_logged(tmp_path, data_dir):
    r = _cli(["-m", f"paths.data_dir={data_dir}", "hydra.sweep.dir=" + str(tmp_path / "sweep"), *SHORT,
              "stage=[pretrain]", "eval=none", "eval_baseline=false", "logger=wandb",
              "loss.temperature=0.02,0.05"], env_extra={"WANDB_MODE": "offline"})
    assert r.returncode == 0, r.stderr[-3000:]
    import yaml

    for job, temp in (("0", 0.02), ("1", 0.05)):
        hparams = yaml.safe_load((tmp_path / "sweep" / job / "csv" / "pretrain" / "hparams.yaml").read_text())
        assert hparams["loss.temperature"] == temp and hparams["stage"] == "pretrain"
        assert list((tmp_path / "sweep" / job / "wandb").glob("offline-run-*"))


def test_notebook_is_stripped_and_holds_no_logic():
    nb = json.loads((ROOT / "notebooks" / "run_report.ipynb").read_text())
    code = [c for c in nb["cells"] if c["cell_type"] == "code"]
    assert all(not c.get("outputs") and c.get("execution_count") is None for c in code)
    assert all("def " not in "".join(c["source"]) for c in code)
