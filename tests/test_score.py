"""``me5.score`` and :mod:`me5.mining.teacher`: cross-encoder teacher scores on a tiny cross-encoder built from a config.

The scores equal a direct forward of the same model (any batching, any order) and sentence-transformers'
``CrossEncoder.predict`` (activation off); the CLI writes them into resumable, shardable stage-2 shards; a
cross-encoder with more than one output is a clear error before any record is read.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from me5.errors import ConfigError
from me5.mining.output import ShardedOutput
from me5.mining.teacher import CrossEncoderScorer, ScoreOptions, check_cross_encoder, score_records
from tests import tiny
from tests.helpers import write_jsonl


@pytest.fixture(scope="module")
def cross_encoder(tmp_path_factory) -> Path:
    return tiny.build_cross_encoder(tmp_path_factory.mktemp("ce") / "tiny-ce")


def scored_records(n: int = 30, seed: int = 0) -> list[dict]:
    """Records of variable lengths, some without negatives."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        negs = tiny.texts(rng.randint(0, 4), 3, 40, seed=seed + 100 + i)
        out.append({"query": tiny.texts(1, 2, 9, seed=seed + i)[0], "positive": tiny.texts(1, 4, 50, seed=seed + 50 + i)[0],
                    "negatives": negs, "lang": "en"})
    return out


def direct_scores(folder: Path, pairs, max_length: int) -> np.ndarray:
    """One unpadded forward per pair: the reference."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForSequenceClassification.from_pretrained(folder).eval()
    out = []
    with torch.no_grad():
        for q, p in pairs:
            enc = tok(q, p, truncation="longest_first", max_length=max_length, return_tensors="pt")
            out.append(model(**enc).logits[0, 0].item())
    return np.asarray(out, dtype=np.float32)


def test_scores_equal_a_direct_forward_whatever_the_batching_and_order(cross_encoder):
    recs = scored_records()
    pairs = [(r["query"], p) for r in recs for p in (r["positive"], *r["negatives"])]
    want = direct_scores(cross_encoder, pairs, max_length=40)  # some pairs are truncated (longest_first)
    perm = np.random.default_rng(0).permutation(len(pairs))
    for kwargs in ({"max_batch": 3, "max_tokens": 48}, {"max_batch": 64}, {"max_batch": 7, "max_tokens": 10_000}):
        scorer = CrossEncoderScorer.from_pretrained(str(cross_encoder), device="cpu", max_length=40, **kwargs)
        got = scorer.score([pairs[i][0] for i in perm], [pairs[i][1] for i in perm])
        np.testing.assert_allclose(got, want[perm], rtol=0, atol=2e-5)
    assert np.ptp(want) > 1e-2  # the pairs do not all score the same


def test_scores_equal_sentence_transformers_cross_encoder_predict(cross_encoder):
    st = pytest.importorskip("sentence_transformers")
    recs = scored_records(seed=1)
    pairs = [(r["query"], p) for r in recs for p in (r["positive"], *r["negatives"])]
    ce = st.CrossEncoder(str(cross_encoder), device="cpu")
    theirs = ce.predict(pairs, batch_size=5, activation_fn=torch.nn.Identity(), show_progress_bar=False)
    ours = CrossEncoderScorer.from_pretrained(str(cross_encoder), device="cpu", max_length=128).score(
        [q for q, _ in pairs], [p for _, p in pairs])
    np.testing.assert_allclose(ours, np.asarray(theirs, dtype=np.float32), rtol=0, atol=2e-5)


def _shard_bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.glob("*.parquet"))} | \
        {n: (folder / n).read_bytes() for n in ("shards.json", "score_stats.json")}


def test_score_cli_writes_teacher_scores_in_shards_the_readers_load(cross_encoder, tmp_path, capsys):
    from me5.app.score import main
    from me5.data.readers import list_units, resolve_files
    from me5.data.source import Source

    recs = scored_records(n=20)
    data = write_jsonl(tmp_path / "in" / "train.jsonl", recs)
    out = tmp_path / "scored"
    rc = main(["--data", str(data), "--model", str(cross_encoder), "--out", str(out), "--shard-rows", "6",
               "--row-group-rows", "4", "--max-length", "128", "--device", "cpu", "--no-progress"])
    assert rc == 0, capsys.readouterr().err
    assert "records/rescored" in capsys.readouterr().out
    examples, _ = Source(str(out)).load_examples()
    assert len(examples) == len(recs)
    by_query = {r["query"]: r for r in recs}
    pairs = [(e.query, p) for e in examples for p in (e.positive, *e.negatives)]
    want = direct_scores(cross_encoder, pairs, max_length=128)
    got = np.asarray([s for e in examples for s in e.teacher_scores], dtype=np.float32)
    np.testing.assert_allclose(got, want, rtol=0, atol=2e-5)
    for e in examples:  # positive first, then the negatives in their order
        assert len(e.teacher_scores) == 1 + len(e.negatives)
        assert list(e.negatives) == by_query[e.query]["negatives"]
    units = list_units(resolve_files(str(out)))
    assert sum(u.rows for u in units) == len(recs) and len(units) == 7  # shards of 6, 6, 6, 2 rows: groups 4+2, 4+2, 4+2, 2
    stats = json.loads((out / "score_stats.json").read_text())
    assert stats["counts"]["pairs"] == len(pairs) and stats["counts"]["records"] == len(recs)


def test_score_resumes_after_a_kill_and_shards_over_processes(cross_encoder, tmp_path, monkeypatch):
    from me5.data.schema import PairExample

    recs = [PairExample(r["query"], r["positive"], tuple(r["negatives"]), lang="en") for r in scored_records(n=26)]
    scorer = CrossEncoderScorer.from_pretrained(str(cross_encoder), device="cpu", max_length=64, max_batch=16)
    opts = ScoreOptions(shard_rows=5, row_group_rows=3)
    whole = score_records(recs, scorer, tmp_path / "whole", options=opts, name="fx", rank=0, world=1)
    assert whole.complete and whole.written == 6

    real_write, calls = ShardedOutput.write, []

    def dies_after_two(self, *args, **kwargs):
        if len(calls) == 2:
            raise RuntimeError("killed")
        calls.append(1)
        return real_write(self, *args, **kwargs)

    monkeypatch.setattr(ShardedOutput, "write", dies_after_two)
    with pytest.raises(RuntimeError, match="killed"):
        score_records(recs, scorer, tmp_path / "killed", options=opts, name="fx", rank=0, world=1)
    monkeypatch.setattr(ShardedOutput, "write", real_write)
    assert len(list((tmp_path / "killed").glob("*.parquet"))) == 2 and not (tmp_path / "killed" / "shards.json").exists()
    again = score_records(recs, scorer, tmp_path / "killed", options=opts, name="fx", rank=0, world=1)
    assert (again.skipped, again.written, again.complete) == (2, 4, True)
    assert _shard_bytes(tmp_path / "killed") == _shard_bytes(tmp_path / "whole")

    r1 = score_records(recs, scorer, tmp_path / "two", options=opts, name="fx", rank=1, world=2)
    assert (r1.written, r1.complete) == (3, False)  # shards 1, 3, 5
    r0 = score_records(recs, scorer, tmp_path / "two", options=opts, name="fx", rank=0, world=2)
    assert (r0.written, r0.complete) == (3, True)
    assert _shard_bytes(tmp_path / "two") == _shard_bytes(tmp_path / "whole")


def test_a_cross_encoder_with_more_than_one_logit_is_a_clear_error(tmp_path, capsys):
    from me5.app.score import main

    two = tiny.build_cross_encoder(tmp_path / "two-labels", num_labels=2)
    with pytest.raises(ConfigError, match="num_labels=2") as err:
        check_cross_encoder(str(two))
    assert str(two) in str(err.value)
    # the CLI checks the model before it reads any record: the missing data folder is not what it reports
    rc = main(["--data", str(tmp_path / "no-such-data"), "--model", str(two), "--out", str(tmp_path / "o")])
    msg = capsys.readouterr().err
    assert rc == 2 and "'--model'" in msg and str(two) in msg and "one relevance logit" in msg
    assert "no-such-data" not in msg and "Traceback" not in msg
    rc = main(["--data", str(tmp_path / "no-such-data"), "--model", str(tmp_path / "missing-model"),
               "--out", str(tmp_path / "o")])
    msg = capsys.readouterr().err
    assert rc == 2 and "missing-model" in msg and "'--model'" in msg
