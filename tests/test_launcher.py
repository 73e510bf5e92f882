"""Cluster launch: ``hydra/launcher=slurm`` takes nodes and tasks per node from the trainer group, and a sweep
through submitit (``hydra/launcher=submitit_local``) runs a tiny training job to its end.

The SLURM side is checked without a cluster: the composed launcher config, and the sbatch script the real
submitit launcher writes (its submission is intercepted); the local side really runs ``python -m me5.train -m``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import OmegaConf, open_dict

import me5.app.resolvers  # noqa: F401 -- registers me5.slurm_count / me5.slurm_gpus (as the app does)
from tests.helpers import CONF, ROOT

SLURM_4x8 = ["hydra/launcher=slurm", "trainer=ddp", "trainer.num_nodes=4", "trainer.devices=8"]


def compose_hydra(overrides: list[str]):
    """The app's config with its ``hydra`` node, as ``python -m me5.train -m <overrides>`` composes it."""
    with initialize_config_dir(version_base="1.3", config_dir=str(CONF)):
        return compose("config", overrides=overrides, return_hydra_config=True)


def test_slurm_nodes_and_tasks_come_from_the_trainer():
    launcher = compose_hydra(SLURM_4x8).hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher")
    assert (launcher.nodes, launcher.tasks_per_node, launcher.gpus_per_node) == (4, 8, 8)
    # one node of a single GPU, and the CPU trainer (no GPU request)
    one = compose_hydra(["hydra/launcher=slurm", "trainer=gpu"]).hydra.launcher
    assert (one.nodes, one.tasks_per_node, one.gpus_per_node) == (1, 1, 1)
    cpu = compose_hydra(["hydra/launcher=slurm", "trainer=cpu", "trainer.devices=2"]).hydra.launcher
    assert (cpu.nodes, cpu.tasks_per_node, cpu.gpus_per_node) == (1, 2, None)


def test_the_app_registers_the_launcher_resolvers():
    """``python -m me5.train`` itself resolves the slurm launcher (me5.app.train imports me5.app.resolvers)."""
    r = subprocess.run([sys.executable, "-m", "me5.train", "hydra/launcher=slurm", "trainer=ddp", "trainer.num_nodes=2",
                        "trainer.devices=4", "--cfg", "all", "--resolve", "-p", "hydra.launcher"],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    launcher = OmegaConf.create(r.stdout)
    assert (launcher.nodes, launcher.tasks_per_node, launcher.gpus_per_node) == (2, 4, 4)


@pytest.mark.parametrize(("override", "field"), [
    ("trainer.devices=auto", "trainer.devices"),  # ddp's default: SLURM cannot allocate "auto"
    ("trainer.devices=-1", "trainer.devices"),
    ("trainer.devices=[0,1]", "trainer.devices"),
    ("trainer.num_nodes=0", "trainer.num_nodes"),
])
def test_slurm_rejects_a_device_count_it_cannot_allocate(override, field):
    launcher = compose_hydra(["hydra/launcher=slurm", "trainer=ddp", "trainer.devices=8", override]).hydra.launcher
    with pytest.raises(Exception, match=rf"config field '{field}'.*positive integer"):
        OmegaConf.to_container(launcher, resolve=True)


def test_slurm_sbatch_script_requeues_on_the_checkpointing_signal(tmp_path, monkeypatch):
    """The sbatch script the plugin writes: 4 nodes x 8 tasks/GPUs, USR1 ahead of the time limit (the signal the
    Preemption callback saves and requeues on, not submitit's USR2), a requeueable job, and submitit's own
    time-out requeue budget."""
    import submitit

    fake_bin = tmp_path / "bin"  # submitit refuses to build a SLURM executor where srun is missing
    fake_bin.mkdir()
    (fake_bin / "srun").write_text("#!/bin/sh\nexit 1\n")
    (fake_bin / "srun").chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake_bin}{os.pathsep}{os.environ['PATH']}")
    cfg = compose_hydra([*SLURM_4x8, f"hydra.sweep.dir={tmp_path / 'sweep'}"])
    assert "Preemption" in cfg.callbacks.preemption._target_ and "SIGUSR1" in cfg.callbacks.preemption.signals
    with open_dict(cfg):
        cfg.hydra.job.name = "me5-test"
    launcher = instantiate(cfg.hydra.launcher)
    launcher.setup(hydra_context=None, task_function=None, config=cfg)
    seen = {}

    class Intercepted(Exception):
        pass

    def map_array(self, fn, *args):
        seen["executor"] = self
        raise Intercepted

    monkeypatch.setattr(submitit.AutoExecutor, "map_array", map_array)
    with pytest.raises(Intercepted):
        launcher.launch([["loss.temperature=0.02"]], initial_job_idx=0)
    slurm = seen["executor"]._executor
    assert slurm.max_num_timeout == 20
    script = slurm._make_submission_file_text("python -m submitit.core._submit", "uid").splitlines()
    for flag in ("--nodes=4", "--ntasks-per-node=8", "--gpus-per-node=8", "--signal=USR1@300", "--requeue",
                 "--time=4320", "--cpus-per-task=12"):
        assert f"#SBATCH {flag}" in script, (flag, script)
    assert not any("USR2" in line for line in script)


TINY = [
    "logger=csv",
    "trainer.enable_progress_bar=false",
    "trainer.log_every_n_steps=1",
    "stage=[pretrain]",
    "eval_baseline=false",
    "stages.pretrain.max_steps=2",
    "stages.pretrain.global_batch_size=8",
    "stages.pretrain.warmup_steps=2",
]


SWEEP = "test_submitit_local_sweep_runs_a_tiny_job"


def start_early(early, selected) -> None:
    """The submitit sweep below, started with the session (tests/conftest.py's ``early``) on its sample data (a
    run on an empty data folder: test_layout's non-editable install); its test waits for it."""
    if SWEEP in selected:
        tmp_path = early.info["launcher/sweep"] = early.tmp_path_factory.mktemp("submitit")
        env = {**os.environ, "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
               "TOKENIZERS_PARALLELISM": "false"}
        cmd = [sys.executable, "-m", "me5.train", "-m", "hydra/launcher=submitit_local", "hydra.launcher.timeout_min=10",
               f"hydra.sweep.dir={tmp_path / 'sweep'}", f"paths.data_dir={early.data_dir()}",
               f"paths.log_dir={tmp_path / 'logs'}", *TINY]
        early.submit("launcher/sweep", cmd, cwd=ROOT, env=env)


def test_submitit_local_sweep_runs_a_tiny_job(early, data_dir):
    sweep = early.info["launcher/sweep"] / "sweep"
    r = early.result("launcher/sweep")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "Submitit 'local' sweep output dir" in r.stderr + r.stdout
    job = sweep / "0"
    # the job ran under submitit: its own log and result, and Hydra's job folder
    results = list((sweep / ".submitit").glob("*/*_0_result.pkl"))
    assert len(results) == 1, sorted(p.name for p in (sweep / ".submitit").rglob("*"))
    assert "loss.temperature" not in (job / ".hydra" / "overrides.yaml").read_text()
    assert "stages.pretrain.max_steps=2" in (job / ".hydra" / "overrides.yaml").read_text()
    # and it finished: metrics, the training history, the stage's checkpoint and export
    payload = json.loads((job / "metrics.json").read_text())
    assert set(payload["results"]) == {"pretrain"} and "sample/ndcg@10" in payload["results"]["pretrain"]
    history = pd.read_csv(job / "csv" / "pretrain" / "metrics.csv")
    assert history["train/loss"].dropna().size == 2
    assert (job / "checkpoints" / "pretrain" / "last.ckpt").is_file()
    assert (job / "export" / "pretrain" / "config.json").is_file()
    assert Path(payload["meta"]["run_dir"]) == job
    # the report of the sweep (one row: nothing was swept) and of its job, from the folders the app wrote
    from me5 import report

    assert report.find_target(sweep)[0] == sweep and report.find_target(job)[0] == job
    frame = report.sweep_frame(sweep)
    assert list(frame.index) == ["0"] and frame.attrs["swept"] == []
    assert frame.loc["0", "status"] == "done" and frame.loc["0", "evaluated"] == "pretrain"
    assert frame.loc["0", "sample/ndcg@10"] == pytest.approx(100 * payload["results"]["pretrain"]["sample/ndcg@10"], abs=0.05)
    assert frame.loc["0", "loss/pretrain"] == pytest.approx(history["train/loss"].dropna().iloc[-1])
    text = report.write_report(job).read_text()
    assert "| pretrain | 1 |" in text and "| pretrain | " in text.split("## Held-out evaluation")[1]
    assert (job / "report.png").stat().st_size > 10_000


@pytest.mark.slow
def test_submitit_local_requeues_a_preempted_job_which_resumes_to_the_same_weights(tmp_path, data_dir):
    """``hydra/launcher=submitit_local``, two jobs of one sweep: job 0 gets SIGTERM when step 2 starts, job 1 is never
    signalled (step 99 > max_steps). Job 0 saves the step-3 checkpoint and exits with submitit's requeue code; the
    controller restarts it in the same folder; it resumes and ends with job 1's weights, bit for bit, and one
    metrics row per step. Submitit's own requeue (its USR2 handler) is not involved: the Preemption callback asks."""
    import torch

    sweep = tmp_path / "sweep"
    env = {**os.environ, "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, "-m", "me5.train", "-m", "hydra/launcher=submitit_local", "hydra.launcher.timeout_min=10",
           f"hydra.sweep.dir={sweep}", f"paths.data_dir={data_dir}", f"paths.log_dir={tmp_path / 'logs'}",
           "logger=csv", "trainer.enable_progress_bar=false", "trainer.log_every_n_steps=1", "stage=[pretrain]",
           "eval=none", "eval_baseline=false", "stages.pretrain.max_steps=6", "stages.pretrain.global_batch_size=16",
           "stages.pretrain.warmup_steps=6", "checkpoint_every=2",
           "+callbacks.kill._target_=tests.helpers.SignalAtStep", "+callbacks.kill.signal=SIGTERM",
           "+callbacks.kill.marker=${paths.output_dir}/signalled", "+callbacks.kill.step=2,99"]
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    killed, ref = sweep / "0", sweep / "1"
    assert (killed / "signalled").exists() and not (ref / "signalled").exists()
    # job 0's submitit log: the preemption line, then a second attempt that resumed from the saved step
    job_id = OmegaConf.load(killed / ".hydra" / "hydra.yaml").hydra.job.id  # submitit's job id (its folder)
    logs = {p.name: p.read_text() for p in (sweep / ".submitit" / str(job_id)).glob("*_log.*")}
    out = "".join(logs.values())
    ckpt = (killed / "checkpoints" / "pretrain" / "last.ckpt").resolve()
    assert f"me5: SIGTERM at step 3: saved {ckpt}; exiting 144 (submitit's local controller restarts job" in out, logs
    assert out.count("Starting with JobEnvironment") == 2, logs  # two attempts of the same task
    assert f"resuming stage pretrain from {ckpt}" in (killed / "train.log").read_text()
    a, b = (torch.load(d / "checkpoints" / "pretrain" / "last.ckpt", map_location="cpu", weights_only=False)
            for d in (ref, killed))
    assert a["global_step"] == b["global_step"] == 6
    for k in a["state_dict"]:
        torch.testing.assert_close(b["state_dict"][k], a["state_dict"][k], rtol=0, atol=0, msg=k)
    hist = {d: pd.read_csv(d / "csv" / "pretrain" / "metrics.csv").dropna(subset=["train/loss"]) for d in (ref, killed)}
    assert hist[killed]["step"].tolist() == hist[ref]["step"].tolist() == list(range(6))
    assert hist[killed]["train/loss"].tolist() == hist[ref]["train/loss"].tolist()


@pytest.mark.parametrize(("env", "rc", "note", "call"), [
    ({"SLURM_JOB_ID": "77"}, 0, " (SLURM job 77 requeued)", "requeue 77"),
    ({"SLURM_JOB_ID": "78", "SLURM_ARRAY_JOB_ID": "70", "SLURM_ARRAY_TASK_ID": "3"}, 0, " (SLURM job 70_3 requeued)",
     "requeue 70_3"),
    ({"SLURM_JOB_ID": "77"}, 1, " (scontrol requeue 77 failed: 1)", "requeue 77"),
    # submitit's local executor wins over an enclosing SLURM allocation: requeueing that would requeue the allocation
    ({"SUBMITIT_LOCAL_JOB_ID": "555", "SLURM_JOB_ID": "77"}, 0, " (submitit's local controller restarts job 555: it "
     "resumes)", None),
    ({}, 0, " (rerun the same command with hydra.run.dir=/runs/x to resume)", None),
    # `python -m me5.train` typed inside salloc: requeueing would requeue the interactive allocation
    ({"SLURM_JOB_ID": "77", "SLURM_JOB_NAME": "bash"}, 0, " (interactive SLURM job 77: not requeued; rerun with "
     "hydra.run.dir=/runs/x to resume)", None),
], ids=["slurm", "array", "scontrol_fails", "submitit_local", "no_scheduler", "interactive"])
def test_preemption_requeues_through_the_scheduler_that_runs_the_job(tmp_path, monkeypatch, env, rc, note, call):
    from me5.app.callbacks import Preemption

    calls = tmp_path / "calls"
    (tmp_path / "scontrol").write_text(f'#!/bin/sh\necho "$@" >> "{calls}"\nexit {rc}\n')
    (tmp_path / "scontrol").chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    for name in ("SLURM_JOB_ID", "SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID", "SUBMITIT_LOCAL_JOB_ID", "SLURM_JOB_NAME"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert Preemption._requeue(Path("/runs/x")) == note
    assert (calls.read_text().splitlines() if calls.exists() else None) == ([call] if call else None)


def test_preemption_names_a_missing_scontrol(tmp_path, monkeypatch):
    from me5.app.callbacks import Preemption

    monkeypatch.setenv("PATH", str(tmp_path))  # no scontrol anywhere
    monkeypatch.setenv("SLURM_JOB_ID", "77")
    for name in ("SLURM_ARRAY_JOB_ID", "SUBMITIT_LOCAL_JOB_ID", "SLURM_JOB_NAME"):
        monkeypatch.delenv(name, raising=False)
    assert Preemption._requeue(Path("/runs/x")) == " (no scontrol here: requeue SLURM job 77 by hand)"
