"""CPU smoke test of the throughput benchmark (``python -m me5.app.bench``): tiny model, 2 batches, both length modes."""

from __future__ import annotations

import math

import pytest
import torch

from me5.app import bench


def test_length_distribution_and_flops():
    spec = bench.LengthSpec()
    b = bench.make_batch(4000, "variable", vocab=100, pad_id=1, spec=spec, seed=0)
    q, p = b["query_attention_mask"].sum(1).float(), b["passage_attention_mask"].sum(1).float()
    assert abs(q.median() - spec.query_median) <= 1 and abs(p.median() - spec.passage_median) <= 3
    assert q.max() <= spec.query_max and p.max() <= spec.passage_max and p.min() >= spec.min_len
    assert 0.1 < (p == spec.passage_max).float().mean() < 0.3  # bodies truncated at 128
    assert b["passage_input_ids"].size(1) % 8 == 0 and b["passage_hash"].unique().numel() == 4000
    fixed = bench.make_batch(8, "fixed", vocab=100, pad_id=1)
    assert fixed["passage_attention_mask"].all() and fixed["passage_input_ids"].shape == (8, 128)
    # 6·N·tokens + 12·layers·hidden·L² for one sequence
    dims = {"layers": 2, "hidden": 4, "nonemb": 10}
    assert bench.transformer_flops([(1, 3)], dims) == 6 * 10 * 3 + 12 * 2 * 4 * 9
    assert bench.transformer_flops([(2, 3)], dims, fwd_bwd=False) == 2 * (6 * 10 * 3 + 12 * 2 * 4 * 9) / 3
    # real model shapes: XLM-R-large has ~303M non-embedding parameters
    assert bench.MODEL_SHAPES["large"]["vocab_size"] == 250_002


def test_padding_share_is_lower_for_bucketed_chunks():
    b = bench.make_batch(256, "variable", vocab=100, pad_id=1, seed=1)
    dims = {"layers": 2, "hidden": 8, "nonemb": 1000}
    useful = bench.useful_flops(b, dims)
    shares = {}
    for method in ("naive", "ours-rows", "ours"):
        shapes = [s for side in ("query", "passage")
                  for s in bench.chunk_shapes(b[f"{side}_attention_mask"], method, mini_batch=32, chunk_tokens=32 * 128)]
        shares[method] = 1 - useful / bench.transformer_flops(shapes, dims)
    assert 0 < shares["ours"] < shares["ours-rows"] < shares["naive"] < 1


def test_cpu_smoke_grid():
    torch.set_num_threads(2)
    cfg = bench.BenchConfig(device="cpu", models=("tiny",), batches=(16, 48), lengths=("fixed", "variable"),
                            methods=("ours", "naive", "st"), mini_batch={"tiny": 8}, min_time=0.0, max_repeats=1,
                            warmup_pairs=8)
    rows, meta = bench.run_bench(cfg, log=lambda s: None)
    assert meta["peak_flops"] > 1e9
    assert len(rows) == 2 * 2 * 3
    for r in rows:
        assert r["status"] == "ok", r
        for key in ("step_s", "pairs_per_s", "tokens_per_s", "mfu"):
            assert math.isfinite(r[key]) and r[key] > 0, (key, r)
        assert r["mfu"] < 1.0 and 0 <= r["pad_share"] < 1 and math.isfinite(r["loss"])
        assert r["vs_ours"] > 0
    st = [r for r in rows if r["method"] == "st"]
    assert len(st) == 4 and all(r["st_max_abs_diff"] < 1e-4 for r in st)  # same weights, same embeddings
    assert all(r["pad_share"] == 0 for r in rows if r["lengths"] == "fixed")
    assert all(r["vs_ours"] == 1.0 for r in rows if r["method"] == "ours")
    table = bench.format_table(rows, meta)
    assert table.count("\n| tiny |") == 12 and "| st |" in table and "measured peak" in table


def test_cli_writes_the_table(tmp_path, capsys):
    assert bench.main(["--device", "cpu", "--batches", "8", "--lengths", "variable", "--methods", "ours,naive",
                       "--mini-batch", "tiny=4", "--min-time", "0", "--max-repeats", "1", "--warmup-pairs", "4",
                       "--out", str(tmp_path)]) == 0
    assert "| tiny | 8 | variable | naive |" in (tmp_path / "bench.md").read_text()
    assert len((tmp_path / "bench.jsonl").read_text().splitlines()) == 2
    with pytest.raises(SystemExit):
        bench.main(["--methods", "nope"])


def test_bench_encode_smoke_rows_agree_with_sentence_transformers(tmp_path, capsys):
    """``make bench-encode`` at toy size: both methods on the same model and passages, equal embeddings."""
    import json

    from me5.app.bench_encode import main

    assert main(["--models", "minilm", "--passages", "24", "--batch-size", "8", "--max-length", "64",
                 "--repeats", "1", "--device", "cpu", "--out", str(tmp_path)]) == 0
    rows = [json.loads(line) for line in (tmp_path / "bench_encode.jsonl").read_text().splitlines()]
    assert [r["method"] for r in rows] == ["me5", "st"]
    assert all(r["passages_per_s"] > 0 and r["tokens_per_s"] > r["passages_per_s"] for r in rows)
    assert rows[0]["min_cos"] > 0.9999  # the fast path equals sentence-transformers
    assert rows[1]["vs_st"] == 1.0
    assert rows[0]["vs_st"] == pytest.approx(rows[1]["seconds"] / rows[0]["seconds"], rel=1e-3)  # seconds rounded
    assert "| minilm | me5 |" in capsys.readouterr().out
