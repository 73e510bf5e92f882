"""End to end on CPU: the Hydra app on the generated sample data with the tiny model.

- a short seeded run reproduces stored golden losses (a refactor that changes the maths shows up here);
- training clearly beats the untrained baseline on the held-out split;
- a run stopped at a checkpoint and resumed ends with exactly the weights of an uninterrupted run;
- bad input exits non-zero with a message that names the file / field;
- two gloo processes (our all-reduce DDP strategy with cross-rank negatives) run the pipeline.

The tests that read `python -m me5.train` processes are at the end; their processes start with the module.

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

from me5.app.train import run
from me5.errors import DataError
from tests.helpers import ROOT, compose_cfg

GOLDEN = Path(__file__).parent / "assets" / "golden_losses.json"
# one intra-op thread, in-process and in each `python -m me5.train`, as everywhere in the suite (tests/conftest.py):
# this module's CLI runs go on beside its in-process tests (the `cli` fixture). The golden losses were recorded on
# 2 threads; on 1 they differ by ~1e-5 relative, well inside their tolerance
THREADS = 1
SHORT = [
    "logger=csv",
    "trainer.enable_progress_bar=false",
    "trainer.log_every_n_steps=1",
    "stages.pretrain.max_steps=6",
    "stages.pretrain.global_batch_size=16",
    "stages.finetune.max_steps=4",
    "stages.finetune.global_batch_size=8",
    # warm-up may not outlast a stage: the golden run's LRs (2e-3 * (step+1)/30 and 2e-3 * (step+1)/10, warm-up
    # never ending inside the 6 / 4 steps) written as a warm-up as long as the stage at a peak LR scaled to match
    "stages.pretrain.warmup_steps=6",
    "stages.pretrain.lr=4e-4",
    "stages.finetune.warmup_steps=4",
    "stages.finetune.lr=8e-4",
]


def cfg_for(tmp_path, data_dir, extra=()):
    """The short run; with ``stage=[...]`` in ``extra`` only the selected stages' fields are overridden (a stage
    that does not run has no ``stages.<stage>`` node to override)."""
    chosen = next((e.split("=", 1)[1].strip("[]").split(",") for e in extra if e.startswith("stage=")), None)
    return compose_cfg([f"paths.data_dir={data_dir}", *short(*(chosen or ())), *extra], tmp_path=tmp_path)


def short(*stages: str) -> list[str]:
    """:data:`SHORT` for the given stages only (all when none is given)."""
    return [o for o in SHORT if not stages or not o.startswith("stages.") or o.split(".")[1] in stages]


def losses(run_dir: Path, stage: str) -> list[float]:
    df = pd.read_csv(run_dir / "csv" / stage / "metrics.csv")
    return [round(float(v), 5) for v in df["train/loss"].dropna()]


def test_golden_losses_and_outputs(tmp_path, data_dir):
    torch.set_num_threads(THREADS)
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


def test_resume_continues_exactly(tmp_path, data_dir):
    torch.set_num_threads(THREADS)
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


def test_notebook_is_stripped_and_holds_no_logic():
    nb = json.loads((ROOT / "notebooks" / "run_report.ipynb").read_text())
    code = [c for c in nb["cells"] if c["cell_type"] == "code"]
    assert all(not c.get("outputs") and c.get("execution_count") is None for c in code)
    assert all("def " not in "".join(c["source"]) for c in code)


# ---------------------------------------------------------------------------------------------- checks first
@pytest.mark.parametrize(
    ("overrides", "named"),
    [
        # the stage-2 data is missing: found before stage 1 runs, not after it
        (["data.finetune.sources.sample.file=nope.jsonl"], "nope.jsonl"),
        # 3 devices do not divide the global batch of 16: found before any data or model exists
        (["trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=3", "trainer.precision=32-true"],
         "stages.pretrain.global_batch_size"),
        (["stages.pretrain.warmup_steps=7"], "stages.pretrain.warmup_steps"),
        (["eval=miracl"], "miracl"),
        (["eval=bitext"], "eval.bucc.data"),
        (["stages.finetune.init_from=/no/such/run/export/pretrain"], "stages.finetune.init_from"),
        (["data=files", "data.pretrain.path=/no/such/pairs.jsonl"], "data.finetune.path"),
    ],
    ids=["stage2_data", "world_size", "warmup", "eval_data", "bitext_data", "init_from", "own_data"],
)
def test_every_check_comes_before_any_heavy_work(tmp_path, overrides, named):
    """A failed check names the field or file before anything is made: no sample data generated, no tokenizer
    trained, no evaluation, no run folder (hence no checkpoint, no W&B run)."""
    from me5.errors import Me5Error

    fresh = tmp_path / "data"  # no sample data yet: generating it would be the first heavy step
    cfg = compose_cfg([f"paths.data_dir={fresh}", *SHORT, *overrides], tmp_path=tmp_path)
    with pytest.raises(Me5Error, match=named.replace(".", r"\.")):
        run(cfg)
    assert not fresh.exists() and not (tmp_path / "run").exists()


# ---------------------------------------------------------------------------------------------- the schedule
def test_the_schedule_follows_the_stage_steps(tmp_path, data_dir):
    """Overriding stages.pretrain.max_steps moves the schedule: the LR decays to 0 at the stage's last step
    (it used to span stages.pretrain.max_steps = 300 whatever the stage ran)."""
    from me5.training.schedules import warmup_decay

    run(cfg_for(tmp_path, data_dir, ["stage=[pretrain]", "eval=none", "eval_baseline=false",
                                     "stages.pretrain.max_steps=8", "stages.pretrain.warmup_steps=2",
                                     "stages.pretrain.lr=1e-3"]))
    df = pd.read_csv(tmp_path / "run" / "csv" / "pretrain" / "metrics.csv")
    lrs = df["train/lr"].dropna().tolist()  # logged after each step's scheduler step: the next step's LR
    ref = warmup_decay(torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1e-3), total_steps=8, warmup_steps=2)
    expected = []
    for _ in range(8):
        ref.optimizer.step()
        ref.step()
        expected.append(ref.get_last_lr()[0])
    assert lrs == pytest.approx(expected, rel=1e-6, abs=1e-12) and lrs[-1] == 0.0  # logged as float32


# ---------------------------------------------------------------------------------------------- instruct
def test_instruct_experiment_trains_evaluates_and_exports_with_the_instruct_policy(tmp_path, data_dir, monkeypatch):
    """``experiment=me5_large_instruct`` on the tiny model: training items, the evaluation and the export all
    carry ``Instruct: {task}\\nQuery: `` on queries and nothing on documents."""
    from sentence_transformers import SentenceTransformer

    from me5.data.collate import PairCollator
    from me5.eval.retrieval import RetrievalEvaluator, load_beir
    from me5.models.encoder import Encoder
    from me5.prompts import TASKS, PromptPolicy

    seen = []
    original = PairCollator.__call__

    def spy(self, items):
        seen.extend(items)
        return original(self, items)

    monkeypatch.setattr(PairCollator, "__call__", spy)
    cfg = cfg_for(tmp_path, data_dir, ["experiment=me5_large_instruct", "model=tiny", "data=sample", "eval=sample",
                                       "trainer=cpu", "logger=csv", "eval_baseline=false", "checkpoint_every=500",
                                       "start_from=null",  # explicitly: the tiny model's own initialisation
                                       # the sample data's negatives and the tiny model's lengths, not the paper's
                                       "stages.finetune.n_negatives=3", "stages.finetune.query_max_length=64",
                                       "stages.finetune.passage_max_length=64"])
    from me5.app.pipeline import selected_stages

    assert cfg.prompts.style == "instruct" and selected_stages(cfg) == ["finetune"]
    results = run(cfg)
    template = f"Instruct: {TASKS['generic']}\nQuery: "  # the sample source's task
    assert seen and all(it["query"].startswith(template) for it in seen)
    assert not any(p.startswith(("passage: ", "query: ", "Instruct:")) for it in seen for p in it["passages"])
    export = tmp_path / "run" / "export" / "finetune"
    st_cfg = json.loads((export / "config_sentence_transformers.json").read_text())
    assert st_cfg["prompts"]["query"].startswith("Instruct: ") and st_cfg["prompts"]["document"] == ""
    assert json.loads((export / "me5.json").read_text())["prompts"] == {"style": "instruct"}
    assert json.loads((export / "sentence_bert_config.json").read_text())["max_seq_length"] == 128  # the model's own
    # the run's evaluation is the instruct one: recomputed from the export, it matches; the E5 one does not
    from me5.models.tokenizer import load_tokenizer

    tok = load_tokenizer(str(export))
    enc = Encoder.from_pretrained(str(export), tokenizer=tok)
    data = load_beir(data_dir / "sample" / "eval", split="test")
    common = {"name": "sample", "task": "generic", "query_max_length": 64, "passage_max_length": 128}
    inst = RetrievalEvaluator(data, prompts=PromptPolicy("instruct"), **common).evaluate(enc, tok)
    e5 = RetrievalEvaluator(data, prompts=PromptPolicy("e5"), **common).evaluate(enc, tok)
    assert inst["sample/ndcg@10"] == pytest.approx(results["finetune"]["sample/ndcg@10"], abs=1e-6)
    assert e5["sample/ndcg@10"] != pytest.approx(results["finetune"]["sample/ndcg@10"], abs=1e-6)
    SentenceTransformer(str(export), device="cpu")  # loads with its prompts


# ---------------------------------------------------------------------------------------------- own data
def _own_files(folder: Path, sample: Path, n_pre: int, n_fin: int) -> tuple[Path, Path]:
    """A user's folder: jsonl weak pairs and parquet labelled examples in the normalised schema."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder.mkdir(parents=True)
    pre = (sample / "pretrain.jsonl").read_text(encoding="utf-8").splitlines()[:n_pre]
    (folder / "pairs.jsonl").write_text("\n".join(pre) + "\n", encoding="utf-8")
    fin = [json.loads(x) for x in (sample / "finetune.jsonl").read_text(encoding="utf-8").splitlines()[:n_fin]]
    keep = ("query", "positive", "negatives", "teacher_scores", "lang")
    pq.write_table(pa.Table.from_pylist([{k: r[k] for k in keep} for r in fin]), folder / "labelled.parquet")
    return folder / "pairs.jsonl", folder / "labelled.parquet"


def _snapshot(folder: Path) -> dict:
    return {p.name: (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.iterdir()}


def test_own_data_in_one_line_and_nothing_written_there(tmp_path, data_dir):
    pre, fin = _own_files(tmp_path / "mine", data_dir / "sample", 300, 64)
    before = _snapshot(tmp_path / "mine")
    results = run(cfg_for(tmp_path, data_dir, ["data=files", f"data.pretrain.path={pre}", f"data.finetune.path={fin}"]))
    assert set(results) == {"untrained", "pretrain", "finetune"}
    counts = json.loads((tmp_path / "run" / "metrics.json").read_text())["data_counts"]
    assert counts["pretrain"]["files/kept"] == 300 and counts["finetune"]["files/kept"] == 64
    assert _snapshot(tmp_path / "mine") == before


def test_own_data_smaller_than_a_batch_is_an_error(tmp_path, data_dir):
    pre, _ = _own_files(tmp_path / "mine", data_dir / "sample", 10, 1)
    cfg = cfg_for(tmp_path, data_dir, ["data=files", f"data.pretrain.path={pre}", "stage=[pretrain]",
                                       "eval_baseline=false"])
    with pytest.raises(DataError, match="10 usable pairs.*one global batch of 16"):
        run(cfg)


def test_the_sample_source_never_writes_into_a_data_folder(tmp_path, data_dir):
    pre, _ = _own_files(tmp_path / "mine", data_dir / "sample", 20, 1)
    before = _snapshot(tmp_path / "mine")
    cfg = cfg_for(tmp_path, data_dir, [f"data.pretrain.sources.sample.root={tmp_path / 'mine'}"])
    with pytest.raises(DataError, match="not a folder of generated sample data"):
        run(cfg)
    assert _snapshot(tmp_path / "mine") == before


# ---------------------------------------------------------------------------------------------- non-finite steps
def _assert_same_state(a, b, what: str) -> None:
    if isinstance(a, dict):
        assert set(a) == set(b), what
        for k in a:
            _assert_same_state(a[k], b[k], f"{what}/{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), what
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _assert_same_state(x, y, f"{what}/{i}")
    elif isinstance(a, torch.Tensor):
        torch.testing.assert_close(b, a, rtol=0, atol=0, equal_nan=True, msg=what)
    else:
        assert a == b, what


@pytest.mark.parametrize("what", ["loss", "grads"])
def test_nan_guard_skips_the_step_and_stops_after_k_in_a_row(tmp_path, data_dir, what):
    """A NaN loss (its gradients finite) or NaN gradients at step 2: the optimiser step is skipped (weights and
    AdamW state bit-identical before and after it; 5 updates in 6 steps), counted and logged in
    train/skipped_steps; three such steps in a row stop the run with an error naming the steps and the batch's
    sources."""
    from me5.errors import Me5Error

    inject = "tests.faults.NaNLossAt" if what == "loss" else "tests.helpers.NaNGradsAt"
    extra = ["stage=[pretrain]", "eval=none", "eval_baseline=false", f"+callbacks.nan._target_={inject}"]
    snap = tmp_path / "step2.pt"
    run(cfg_for(tmp_path / "one", data_dir, [*extra, "+callbacks.nan.steps=[2]", "+callbacks.snap._target_="
                                             "tests.faults.StepSnapshot", "+callbacks.snap.step=2",
                                             f"+callbacks.snap.path={snap}"]))
    step2 = torch.load(snap, weights_only=False)
    before, after = step2["before"], step2["after"]
    _assert_same_state(before["weights"], after["weights"], "weights")
    # AdamW's moments and step counts (the LR schedule advances: a skipped step still counts as a step)
    _assert_same_state(before["optimizer"]["state"], after["optimizer"]["state"], "optimizer")
    assert before["optimizer"]["state"]  # there was state to keep: steps 0-1 updated
    ck = torch.load(tmp_path / "one" / "run" / "checkpoints" / "pretrain" / "last.ckpt", map_location="cpu",
                    weights_only=False)
    assert ck["global_step"] == 6
    assert {int(s["step"]) for s in ck["optimizer_states"][0]["state"].values()} == {5}  # one update skipped
    assert all(bool(torch.isfinite(v).all()) for v in ck["state_dict"].values())
    assert ck["callbacks"]["NonFiniteGuard"] == {"skipped": 1, "run": []}  # a resume keeps counting
    df = pd.read_csv(tmp_path / "one" / "run" / "csv" / "pretrain" / "metrics.csv")
    assert df["train/skipped_steps"].dropna().tolist() == [0, 0, 1, 1, 1, 1]
    logged = df.dropna(subset=["train/lr"]).set_index("step")["train/loss"]  # a row per step, its loss maybe NaN
    assert logged.index.tolist() == list(range(6)) and logged.drop(2).notna().all()
    assert logged.isna()[2] == (what == "loss")  # the NaN loss is logged as it was
    with pytest.raises(Me5Error, match=r"not finite for 3 steps in a row \(steps 1-3.*sources: sample/\w+"):
        run(cfg_for(tmp_path / "three", data_dir, [*extra, "+callbacks.nan.steps=[1,2,3]"]))


@pytest.mark.parametrize(("strip", "named"), [("negatives", "hard negatives (stages.finetune.n_negatives)"),
                                              ("teacher_scores", "teacher scores")])
def test_stage_two_needs_are_checked_before_stage_one(tmp_path, data_dir, strip, named):
    """Stage-2 data without the negatives / teacher scores the loss needs stops the run before stage 1 trains,
    naming the source, what it lacks and the command that makes it."""
    import pyarrow.parquet as pq

    from me5.errors import DataError

    pre, fin = _own_files(tmp_path / "mine", data_dir / "sample", 300, 64)
    table = pq.read_table(fin)
    table = table.drop([strip, "teacher_scores"] if strip == "negatives" else [strip])
    pq.write_table(table, fin)
    cfg = cfg_for(tmp_path, data_dir, ["data=files", f"data.pretrain.path={pre}", f"data.finetune.path={fin}"])
    with pytest.raises(DataError, match="source 'files' of stage finetune") as err:
        run(cfg)
    assert named in str(err.value) and str(fin) in str(err.value)
    assert ("me5.mine" in str(err.value)) == (strip == "negatives") and "me5.score" in str(err.value)
    assert not (tmp_path / "run").exists()  # before any run folder, checkpoint or training


def test_stage_two_from_mined_and_scored_data_beats_stage_one(tmp_path, data_dir):
    """prepare -> pretrain -> mine -> score -> finetune on the sample: the stage-1 export mines 3 negatives per
    labelled pair (stripped of the shipped ones), a tiny cross-encoder scores them, and stage 2 trained on that
    beats stage 1 on the held-out sample set."""
    from me5.app.mine import main as mine
    from me5.app.score import main as score
    from tests.tiny import build_cross_encoder

    s1 = run(cfg_for(tmp_path / "s1", data_dir, ["stage=[pretrain]", "eval_baseline=false"]))["pretrain"]
    export = tmp_path / "s1" / "run" / "export" / "pretrain"
    rows = [json.loads(x) for x in (data_dir / "sample" / "finetune.jsonl").read_text().splitlines()[:600]]
    raw = tmp_path / "labelled.jsonl"
    raw.write_text("".join(json.dumps({k: r[k] for k in ("query", "positive", "lang")}) + "\n" for r in rows))
    assert mine(["--data", str(raw), "--model", str(export), "--out", str(tmp_path / "mined"), "--n", "3",
                 "--range-max", "30", "--perc-pos", "none"]) == 0  # the 6-step model scores all close
    ce = build_cross_encoder(tmp_path / "ce")
    assert score(["--data", str(tmp_path / "mined"), "--model", str(ce), "--out", str(tmp_path / "scored")]) == 0
    s2 = run(cfg_for(tmp_path / "s2", data_dir, [
        "stage=[finetune]", "eval_baseline=false", "data=files", f"data.finetune.path={tmp_path / 'scored'}",
        f"stages.finetune.init_from={export}", "stages.finetune.max_steps=12"]))["finetune"]
    assert s2["sample/ndcg@10"] > s1["sample/ndcg@10"] + 0.02, (s1["sample/ndcg@10"], s2["sample/ndcg@10"])


def test_a_crash_in_stage_two_keeps_the_earlier_results(tmp_path, data_dir, monkeypatch):
    """metrics.json is written as each stage completes: a run that dies in stage 2 keeps the baseline and stage-1
    rows, and the rerun adds stage 2 without re-evaluating (or relabelling) them."""
    import me5.app.pipeline as pipeline

    torch.set_num_threads(THREADS)
    real = pipeline.build_callbacks

    def dies_in_finetune(group, *, dirpath, **kwargs):
        if Path(dirpath).name == "finetune":
            raise RuntimeError("node lost")
        return real(group, dirpath=dirpath, **kwargs)

    monkeypatch.setattr(pipeline, "build_callbacks", dies_in_finetune)
    cfg = cfg_for(tmp_path, data_dir, ["logger=csv"])
    with pytest.raises(RuntimeError, match="node lost"):
        run(cfg)
    first = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert set(first["results"]) == {"untrained", "pretrain"} and "pretrain" in first["data_counts"]
    monkeypatch.setattr(pipeline, "build_callbacks", real)
    results = run(cfg)
    final = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert set(final["results"]) == {"untrained", "pretrain", "finetune"} == set(results)
    assert {k: final["results"][k] for k in first["results"]} == first["results"]
    assert final["data_counts"]["pretrain"] == first["data_counts"]["pretrain"]


def test_the_baseline_is_written_when_stage_one_starts_and_not_evaluated_again(tmp_path, data_dir, monkeypatch):
    """The untrained row is evaluated inside stage 1's fit (where a job's ranks can share it) and written at
    once: a run that dies in stage 1 keeps it, and the rerun does not evaluate the untrained weights again."""
    import lightning as L

    import me5.app.pipeline as pipeline
    import me5.training.run as run_loop

    torch.set_num_threads(THREADS)
    real_build, real_eval = pipeline.build_callbacks, run_loop.evaluate_all
    calls = []

    class NodeLost(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            raise RuntimeError("node lost")

    def dies_in_pretrain(group, *, dirpath, **kwargs):
        return real_build(group, dirpath=dirpath, **kwargs) + ([NodeLost()] if Path(dirpath).name == "pretrain" else [])

    def counted(evaluators, encoder, tokenizer, **kw):
        calls.append(encoder.training)
        return real_eval(evaluators, encoder, tokenizer, **kw)

    monkeypatch.setattr(run_loop, "evaluate_all", counted)
    monkeypatch.setattr(pipeline, "build_callbacks", dies_in_pretrain)
    cfg = cfg_for(tmp_path, data_dir, ["logger=csv"])
    with pytest.raises(RuntimeError, match="node lost"):
        run(cfg)
    first = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert set(first["results"]) == {"untrained"} and len(calls) == 1
    monkeypatch.setattr(pipeline, "build_callbacks", real_build)
    results = run(cfg)
    assert len(calls) == 3  # + pretrain, finetune: the untrained weights were not evaluated again
    assert set(results) == {"untrained", "pretrain", "finetune"} and results["untrained"] == first["results"]["untrained"]


# ---------------------------------------------------------------------------------------------- the command line
# Each of these tests reads `python -m me5.train` processes. They are started when the module starts (the `cli`
# fixture: two at a time, in the order of CLI_RUNS, only those of the selected tests), so they run beside the
# in-process tests above instead of after them; a test waits for its own. The two-process run spends most of
# its time in an evaluation that sleeps on both ranks.
def _cli_command(args, env_extra=None) -> tuple[list[str], dict]:
    env = {**os.environ, "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": str(THREADS),
           **(env_extra or {})}
    return [sys.executable, "-m", "me5.train", *args], env


def _cli(args, env_extra=None, timeout=300):
    cmd, env = _cli_command(args, env_extra)
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


# the ranks' collective timeout, and an evaluation after stage 1 that takes longer than it on every rank: were
# only rank 0 to evaluate, rank 1 would wait that long in stage 2's first collective and time out
PG_TIMEOUT_S, SLOW_EVAL_S = 30, 40
KILL_EVERY = 2  # the killed runs' checkpoint_every


def _kill_steps() -> tuple[int, int]:
    """``(term_at, kill_at)`` of the killed runs, from ``ME5_KILL_SEED``."""
    import random

    rng = random.Random(int(os.environ.get("ME5_KILL_SEED", "0")))
    term_at = rng.randint(1, 3)  # SIGTERM when step term_at starts: last.ckpt of step term_at + 1
    # SIGKILL when a step starts that no checkpoint ends, after the SIGTERM's checkpoint: work is lost
    kill_at = rng.choice([s for s in range(term_at + 2, 6) if s % KILL_EVERY])
    return term_at, kill_at


def _killed_common(data_dir) -> list[str]:
    return [f"paths.data_dir={data_dir}", *short("pretrain"), "stage=[pretrain]", "eval=none", "eval_baseline=false",
            f"checkpoint_every={KILL_EVERY}"]


def _killer(tmp_path, sig, step) -> list[str]:
    return ["+callbacks.kill._target_=tests.helpers.SignalAtStep", f"+callbacks.kill.step={step}",
            f"+callbacks.kill.signal={sig}", f"+callbacks.kill.marker={tmp_path / sig}"]


def _fake_scontrol(folder: Path, rc: int = 0) -> Path:
    """A ``scontrol`` that appends its arguments (one call per line) to ``<folder>/scontrol.calls``."""
    folder.mkdir(parents=True, exist_ok=True)
    exe, calls = folder / "scontrol", folder / "scontrol.calls"
    exe.write_text(f'#!/bin/sh\necho "$@" >> "{calls}"\nexit {rc}\n')
    exe.chmod(0o755)
    return calls


SLURM_ENV = {"SLURM_JOB_ID": "4242", "SLURM_JOB_NAME": "me5-train", "SLURM_NTASKS": "1", "SLURM_NTASKS_PER_NODE": "1",
             "SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_NODEID": "0", "SLURM_NODELIST": "localhost"}


def _runs_ddp(tmp_path, data_dir):
    yield "ddp", [f"paths.data_dir={data_dir}", "hydra.run.dir=" + str(tmp_path / "r"), *SHORT, "trainer=ddp",
                  "trainer.accelerator=cpu", "trainer.devices=2", "trainer.precision=32-true", "eval_baseline=true",
                  "+trainer.strategy.timeout._target_=datetime.timedelta",
                  f"+trainer.strategy.timeout.seconds={PG_TIMEOUT_S}",
                  "+eval.slow._target_=tests.helpers.SlowEvaluator", f"+eval.slow.seconds={SLOW_EVAL_S}",
                  f"+eval.slow.marker={tmp_path / 'slow'}"], None


def _runs_beats(tmp_path, data_dir):
    yield "beats", [f"paths.data_dir={data_dir}", f"hydra.run.dir={tmp_path / 'r'}", *short("pretrain"),
                    "stage=[pretrain]", "stages.pretrain.max_steps=150", "stages.pretrain.warmup_steps=30",
                    "stages.pretrain.lr=2e-3", "stages.pretrain.global_batch_size=64", "trainer.log_every_n_steps=50"], None


def _runs_killed(tmp_path, data_dir):
    term_at, _ = _kill_steps()
    common = _killed_common(data_dir)
    yield "killed/ref", [*common, f"hydra.run.dir={tmp_path / 'ref'}"], None
    base = [*common, f"hydra.run.dir={tmp_path / 'killed'}"]
    yield "killed/term", [*base, *_killer(tmp_path, "SIGTERM", term_at)], None


def _runs_bad_input(tmp_path, data_dir):
    for name, overrides in (("huge", ["model=huge"]), ("batch", ["stages.pretrain.per_device_batch_size=64"]),
                            ("file", ["eval_baseline=false", "data.pretrain.sources.sample.file=nope.jsonl"])):
        yield f"bad/{name}", [f"paths.data_dir={data_dir}", f"paths.log_dir={tmp_path / name}",
                              "hydra.run.dir=" + str(tmp_path / name / "r"), *SHORT, *overrides], None


def _runs_failed_check(tmp_path, data_dir):
    yield "failed_check", [f"paths.data_dir={tmp_path / 'data'}", "hydra.run.dir=" + str(tmp_path / "r"), *SHORT,
                           "logger=wandb", "data.finetune.sources.sample.file=nope.jsonl"], {"WANDB_MODE": "offline"}


def _runs_sweep(tmp_path, data_dir):
    yield "sweep", ["-m", f"paths.data_dir={data_dir}", "hydra.sweep.dir=" + str(tmp_path / "sweep"),
                    *short("pretrain"), "stage=[pretrain]", "eval=none", "eval_baseline=false", "logger=wandb",
                    "loss.temperature=0.02,0.05"], {"WANDB_MODE": "offline"}


def _runs_sigusr1(tmp_path, data_dir):
    _fake_scontrol(tmp_path / "bin")
    yield "sigusr1", [f"paths.data_dir={data_dir}", *short("pretrain"), "stage=[pretrain]", "eval=none",
                      "eval_baseline=false", "checkpoint_every=100", f"hydra.run.dir={tmp_path / 'r'}",
                      "+callbacks.kill._target_=tests.helpers.SignalAtStep", "+callbacks.kill.step=2",
                      "+callbacks.kill.signal=SIGUSR1", f"+callbacks.kill.marker={tmp_path / 'sig'}"], {
        **SLURM_ENV, "PATH": f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}"}


def _runs_eval_after(tmp_path, data_dir):
    yield "eval_after", [f"paths.data_dir={data_dir}", f"hydra.run.dir={tmp_path / 'r'}", *short("pretrain"),
                         "stage=[pretrain]", "eval_after=job"], None


# test -> its CLI runs, each (name, arguments, environment), in the order they start (the longest, mostly asleep,
# first)
CLI_RUNS = {
    "test_two_process_ddp_pipeline": _runs_ddp,
    "test_killed_runs_resume_to_the_uninterrupted_weights_and_history": _runs_killed,  # its test goes on with more
    "test_cli_bad_input_exits_non_zero_with_the_name": _runs_bad_input,
    "test_a_failed_check_leaves_only_hydras_files": _runs_failed_check,
    "test_training_beats_the_untrained_baseline": _runs_beats,
    "test_sweep_is_one_multirun_with_the_parameter_logged": _runs_sweep,
    "test_sigusr1_on_slurm_saves_the_step_requeues_the_job_and_exits_non_zero": _runs_sigusr1,
    "test_eval_after_job_leaves_the_evaluation_to_its_own_job": _runs_eval_after,
}


@pytest.fixture(scope="module", autouse=True)
def cli(request, tmp_path_factory):
    """Starts the CLI runs of the selected tests of :data:`CLI_RUNS` (two at a time), each test's in a folder of
    its own (``cli.folders[test]``); ``cli.result(name)`` waits for one. Kills what is left of them when the
    module ends."""
    from tests.helpers import Background

    selected = {item.originalname for item in request.session.items if item.module is request.module}
    background = Background(slots=2)
    background.folders = {}
    for test in (t for t in CLI_RUNS if t in selected):
        folder = background.folders[test] = tmp_path_factory.mktemp(test[5:35])
        for name, args, env_extra in CLI_RUNS[test](folder, request.getfixturevalue("data_dir")):
            cmd, env = _cli_command(args, env_extra)
            background.submit(name, cmd, timeout=300, cwd=ROOT, env=env)
    yield background
    background.close()


@pytest.fixture
def cli_tmp_path(cli, request) -> Path:
    """The test's folder, where its CLI runs wrote (its tmp_path)."""
    return cli.folders[request.node.originalname]


def _final_state(run_dir: Path) -> dict:
    return torch.load(run_dir / "checkpoints" / "pretrain" / "last.ckpt", map_location="cpu", weights_only=False)


def test_killed_runs_resume_to_the_uninterrupted_weights_and_history(cli, cli_tmp_path, data_dir):
    """SIGTERM at a random step: that step's checkpoint is saved and the job exits 143; the rerun is then
    SIGKILLed at a later step that is no checkpoint's (the steps since the last checkpoint are lost) and its
    last.ckpt is truncated on disk; the third attempt skips the truncated file, resumes from the newest step
    checkpoint, redoes the lost steps, and ends bit-identical to an uninterrupted run, with a metrics.csv holding
    every step once. A fourth rerun changes nothing. ``ME5_KILL_SEED`` picks other steps."""
    tmp_path = cli_tmp_path
    every, (term_at, kill_at) = KILL_EVERY, _kill_steps()
    ref = tmp_path / "ref"
    assert cli.result("killed/ref").returncode == 0
    run_dir = tmp_path / "killed"
    base = [*_killed_common(data_dir), f"hydra.run.dir={run_dir}"]

    r = cli.result("killed/term")  # base + SIGTERM at term_at
    assert r.returncode == 143, r.stderr[-2000:]
    ckpts = run_dir / "checkpoints" / "pretrain"
    line = f"me5: SIGTERM at step {term_at + 1}: saved {ckpts / 'last.ckpt'}; exiting 143"
    assert line in r.stdout, r.stdout[-2000:]
    assert torch.load(ckpts / "last.ckpt", map_location="cpu", weights_only=False)["global_step"] == term_at + 1

    r = _cli([*base, *_killer(tmp_path, "SIGKILL", kill_at)])
    assert r.returncode == -9, r.stderr[-2000:]
    newest = max(ckpts.glob("step*.ckpt"), key=lambda p: p.stat().st_mtime)
    saved = torch.load(ckpts / "last.ckpt", map_location="cpu", weights_only=False)["global_step"]
    assert saved == kill_at - kill_at % every == int(newest.stem[4:]), (saved, kill_at, newest)  # kill_at % every lost
    (ckpts / "last.ckpt").write_bytes((ckpts / "last.ckpt").read_bytes()[:1000])  # a node died mid-write
    r = _cli(base)
    assert r.returncode == 0, r.stderr[-2000:]
    assert f"checkpoint {ckpts / 'last.ckpt'} is unreadable" in r.stdout + r.stderr
    assert f"resuming stage pretrain from {newest}" in (run_dir / "train.log").read_text()
    a, b = _final_state(ref), _final_state(run_dir)
    assert a["global_step"] == b["global_step"] == 6 and newest.exists()
    for k in a["state_dict"]:
        torch.testing.assert_close(b["state_dict"][k], a["state_dict"][k], rtol=0, atol=0, msg=k)
    df = pd.read_csv(run_dir / "csv" / "pretrain" / "metrics.csv")
    steps = df.dropna(subset=["train/loss"])["step"].tolist()
    assert steps == list(range(len(steps))) and len(steps) == 6, steps
    assert losses(run_dir, "pretrain") == losses(ref, "pretrain")

    before = {p: p.stat().st_mtime_ns for p in run_dir.rglob("*") if p.is_file() and ".hydra" not in p.parts}
    r = _cli(base)
    assert r.returncode == 0 and "finished earlier" in r.stdout and "nothing to do" in r.stdout
    after = {p: p.stat().st_mtime_ns for p in run_dir.rglob("*") if p.is_file() and ".hydra" not in p.parts}
    assert {p: t for p, t in after.items() if p.name != "train.log"} == {
        p: t for p, t in before.items() if p.name != "train.log"}


def test_cli_bad_input_exits_non_zero_with_the_name(cli):
    r = cli.result("bad/huge")  # model=huge
    assert r.returncode != 0 and "huge" in r.stderr
    r = cli.result("bad/batch")  # stages.pretrain.per_device_batch_size=64
    assert r.returncode == 2 and "stages.pretrain.per_device_batch_size" in r.stderr
    r = cli.result("bad/file")  # eval_baseline=false data.pretrain.sources.sample.file=nope.jsonl
    assert r.returncode == 2 and "nope.jsonl" in r.stderr and "Traceback" not in r.stderr


def test_a_failed_check_leaves_only_hydras_files(cli, cli_tmp_path):
    """Through the CLI: exit status 2, the field named, and the run folder holds Hydra's config and log only."""
    tmp_path = cli_tmp_path
    fresh, run_dir = tmp_path / "data", tmp_path / "r"
    r = cli.result("failed_check")  # data.finetune.sources.sample.file=nope.jsonl, fresh data dir, logger=wandb
    assert r.returncode == 2 and "nope.jsonl" in r.stderr and "Traceback" not in r.stderr
    assert not fresh.exists()
    left = {p.relative_to(run_dir).as_posix() for p in run_dir.rglob("*") if p.is_file()}
    assert left == {".hydra/config.yaml", ".hydra/hydra.yaml", ".hydra/overrides.yaml", "train.log"}


def test_training_beats_the_untrained_baseline(cli, cli_tmp_path):
    tmp_path = cli_tmp_path
    r = cli.result("beats")  # stage 1 alone: 150 steps of 64 pairs
    assert r.returncode == 0, r.stderr[-3000:]
    results = json.loads((tmp_path / "r" / "metrics.json").read_text())["results"]
    before, after = results["untrained"]["sample/ndcg@10"], results["pretrain"]["sample/ndcg@10"]
    assert after > before + 0.15, (before, after)  # measured: 0.33 -> 0.53


def test_sweep_is_one_multirun_with_the_parameter_logged(cli, cli_tmp_path):
    tmp_path = cli_tmp_path
    r = cli.result("sweep")  # -m ... logger=wandb loss.temperature=0.02,0.05
    assert r.returncode == 0, r.stderr[-3000:]
    import yaml

    for job, temp in (("0", 0.02), ("1", 0.05)):
        hparams = yaml.safe_load((tmp_path / "sweep" / job / "csv" / "pretrain" / "hparams.yaml").read_text())
        assert hparams["loss.temperature"] == temp and hparams["stage"] == "pretrain"
        assert list((tmp_path / "sweep" / job / "wandb").glob("offline-run-*"))


def test_sigusr1_on_slurm_saves_the_step_requeues_the_job_and_exits_non_zero(cli, cli_tmp_path):
    """A batch job of SLURM (its environment, and a fake ``scontrol`` on PATH that records its calls) gets SIGUSR1
    (``--signal=USR1@300``) when step 2 starts: the step finishes, last.ckpt of step 3 is saved, ``scontrol requeue
    <job>`` is called once (ours: Lightning's own SLURM requeue would save an hpc_ckpt and call it again) and the job
    exits 138 (128 + SIGUSR1), with the metrics of steps 0-2 on disk for the requeued job to continue."""
    tmp_path = cli_tmp_path
    calls, run_dir = tmp_path / "bin" / "scontrol.calls", tmp_path / "r"
    r = cli.result("sigusr1")  # SLURM_ENV, SIGUSR1 when step 2 starts
    assert r.returncode == 138, r.stdout[-2000:] + r.stderr[-2000:]
    ckpts = run_dir / "checkpoints" / "pretrain"
    assert f"me5: SIGUSR1 at step 3: saved {ckpts / 'last.ckpt'}; exiting 138 (SLURM job 4242 requeued)" in r.stdout
    assert calls.read_text().splitlines() == ["requeue 4242"]
    assert torch.load(ckpts / "last.ckpt", map_location="cpu", weights_only=False)["global_step"] == 3
    assert sorted(p.name for p in ckpts.iterdir()) == ["last.ckpt"]  # no step checkpoint, no hpc_ckpt of Lightning's
    assert not list(run_dir.rglob("hpc_ckpt*"))
    df = pd.read_csv(run_dir / "csv" / "pretrain" / "metrics.csv")
    assert df.dropna(subset=["train/loss"])["step"].tolist() == [0, 1, 2]


def test_eval_after_job_leaves_the_evaluation_to_its_own_job(cli, cli_tmp_path, data_dir):
    """eval_after=job: the training job only exports; the written job (``me5.evaluate --run``) evaluates the
    export on the run's eval group, into the run's metrics.json, with the numbers a direct evaluation gives."""
    from me5.app.evaluate import main as evaluate_main

    tmp_path = cli_tmp_path
    run_dir = tmp_path / "r"
    r = cli.result("eval_after")  # stage=[pretrain] eval_after=job
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads((run_dir / "metrics.json").read_text())["results"] == {}  # nothing evaluated in training
    script = (run_dir / "evaluate_pretrain.sh").read_text()
    assert f"-m me5.evaluate --run {run_dir.resolve()} --stage pretrain" in script
    assert evaluate_main(["--run", str(run_dir), "--stage", "pretrain", "--device", "cpu"]) == 0
    job = json.loads((run_dir / "metrics.json").read_text())["results"]["pretrain"]
    assert json.loads((run_dir / "eval" / "pretrain.json").read_text())["metrics"] == job
    direct = tmp_path / "direct.json"
    assert evaluate_main(["--model", str(run_dir / "export" / "pretrain"), "--data", str(data_dir / "sample" / "eval"),
                          "--name", "sample", "--query-max-length", "64", "--passage-max-length", "128",
                          "--device", "cpu", "--output", str(direct)]) == 0
    assert job == json.loads(direct.read_text())["metrics"]
    assert "sample ndcg@10" in (run_dir / "results.md").read_text()
    assert evaluate_main(["--run", str(run_dir), "--stage", "finetune"]) == 2  # no such export: named, exit 2


def test_two_process_ddp_pipeline(cli, cli_tmp_path):
    tmp_path = cli_tmp_path
    r = cli.result("ddp")  # SHORT, trainer=ddp on 2 CPU processes, PG_TIMEOUT_S, the SlowEvaluator
    assert r.returncode == 0, r.stderr[-3000:]
    payload = json.loads((tmp_path / "r" / "metrics.json").read_text())
    assert set(payload["results"]) == {"untrained", "pretrain", "finetune"}
    # the baseline ran inside stage 1's fit, with the process group up (2 ranks, not each rank alone before fit);
    # both ranks evaluated, rank 0 reports; the slow pass (longer than the group's timeout) was the baseline's,
    # and both stages still ran and evaluated
    res = payload["results"]
    assert res["untrained"]["slow/ranks"] == 2 and res["untrained"]["slow/rank0_slept"] == 1
    assert (tmp_path / "slow.1").exists()
    assert res["pretrain"]["slow/ranks"] == 2 and res["pretrain"]["slow/rank0_slept"] == 0
    assert res["finetune"]["slow/rank0_slept"] == 0
    df = pd.read_csv(tmp_path / "r" / "csv" / "pretrain" / "metrics.csv")
    assert df["data/pairs_seen"].dropna().iloc[-1] == 6 * 16  # global batch over both ranks
