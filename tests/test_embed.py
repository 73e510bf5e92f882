"""The embed-and-search core (me5.embed): token-budget batching, sharded and resumable corpus encoding, exact
and FAISS top-k with trec_eval's tie order, and the evaluator on top of them against pytrec_eval."""

from __future__ import annotations

import json
import os
import random

import numpy as np
import pytest
import torch
import torch.distributed as dist
from torch import nn

from me5.distributed import shutdown_process_group
from me5.embed.encode import (
    EmbeddingShards,
    encode_corpus,
    encode_texts,
    plan_batches,
    shard_rows_of,
    tokenize,
)
from me5.embed.search import exact_search, faiss_search, search, tie_preference, to_run
from me5.errors import ConfigError, DataError
from me5.prompts import PromptPolicy

# Kept light at module level (no me5.data / Lightning): the spawned encoding workers import this module.
E5 = PromptPolicy("e5")
PREFIX = E5.document()
N_DOCS = 24


def _corpus(n: int = N_DOCS, seed: int = 3) -> tuple[list[str], list[str]]:
    from tests import tiny

    return tiny.corpus(n, seed=seed)


def _encoder(seed: int = 0):
    from tests import tiny

    return tiny.encoder(dropout=0.0, seed=seed).eval()


def _tokenizer():
    from tests import tiny

    return tiny.tokenizer()


# ---------------------------------------------------------------------------------------------- batching
def test_plan_batches_sorts_by_length_and_keeps_the_budget():
    rng = random.Random(0)
    lengths = [rng.randint(1, 60) for _ in range(200)]
    batches = plan_batches(lengths, max_tokens=256, max_batch=16)
    flat = [i for b in batches for i in b]
    assert sorted(flat) == list(range(200))
    assert [lengths[i] for i in flat] == sorted(lengths, reverse=True)
    for b in batches:
        width = -(-max(lengths[i] for i in b) // 8) * 8
        assert len(b) <= 16 and (len(b) * width <= 256 or len(b) == 1)
    assert plan_batches([500, 3], max_tokens=64, max_batch=8) == [[0], [1]]  # an over-long text is alone


def test_token_budget_batches_equal_one_by_one_encoding():
    enc, tok = _encoder(), _tokenizer()
    _, texts = _corpus(30)
    got = encode_texts(enc, tok, texts, prefix=PREFIX, max_length=32, max_tokens=96, max_batch=5, precision="fp32")
    want = torch.cat([enc(torch.tensor([ids]), torch.ones(1, len(ids), dtype=torch.long))
                      for ids in tokenize(tok, texts, prefix=PREFIX, max_length=32)]).detach()
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    assert enc.training is False
    chunked = encode_texts(enc, tok, texts, prefix=PREFIX, max_length=32, max_batch=7, chunk_rows=4)
    torch.testing.assert_close(chunked, want, atol=1e-5, rtol=0)


# ---------------------------------------------------------------------------------------------- sharded encoding
def _encode_worker(rank: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    problem = torch.load(f"{out_dir}/problem.pt", weights_only=False)  # the parent's encoder, tokenizer, corpus
    enc, tok, ids, texts = problem["encoder"], problem["tokenizer"], problem["ids"], problem["texts"]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        for split in ("contiguous", "strided"):
            res = encode_corpus(enc, tok, ids, texts, f"{out_dir}/{split}", prefix=PREFIX, max_length=48,
                                max_batch=3, shard_rows=4, split=split)
            assert (res.rank, res.world, res.written, res.skipped, res.complete) == (rank, 2, 3, 0, True)
    finally:
        shutdown_process_group()
    import sys

    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # as tests/test_distributed.py's workers: no interpreter teardown after the results are on disk


def test_two_processes_shard_the_corpus_and_equal_one_process(tmp_path):
    from tests.helpers import free_port, spawn_and_join

    ids, texts = _corpus()
    enc, tok = _encoder(), _tokenizer()
    torch.save({"encoder": enc, "tokenizer": tok, "ids": ids, "texts": texts}, tmp_path / "problem.pt")
    spawn_and_join(_encode_worker, (free_port(), str(tmp_path)), 120, "encoding workers")
    one = encode_corpus(enc, tok, ids, texts, tmp_path / "one", prefix=PREFIX, max_length=48, max_batch=3,
                        shard_rows=4)
    assert (one.world, one.written) == (1, 6)
    single = one.open().matrix(order="input")
    contiguous = EmbeddingShards(tmp_path / "contiguous")
    assert contiguous.ids == ids  # rank 0's rows, then rank 1's
    assert sorted(p.name for p in (tmp_path / "contiguous").glob("emb-*.npy"))[:4] == [
        "emb-r0-00000.npy", "emb-r0-00001.npy", "emb-r0-00002.npy", "emb-r1-00000.npy"]
    # the same shards (4 rows, aligned) in the same batches: bit for bit
    assert np.array_equal(contiguous.matrix(order="input"), single)
    strided = EmbeddingShards(tmp_path / "strided")
    assert strided.ids[:3] == ["doc0", "doc2", "doc4"] and sorted(strided.ids) == sorted(ids)
    in_memory = encode_texts(enc, tok, texts, prefix=PREFIX, max_length=48, precision="fp32").numpy()
    np.testing.assert_allclose(strided.matrix(order="input"), in_memory, atol=2e-3, rtol=0)  # fp16 shards
    np.testing.assert_allclose(single, in_memory, atol=2e-3, rtol=0)
    assert strided.matrix().dtype == np.float32 and next(strided.blocks(dtype=np.float16))[1].dtype == np.float16


class _Killed(RuntimeError):
    pass


def _kill_after(enc, n_forwards: int) -> list[int]:
    """Make ``enc`` raise on its ``n_forwards + 1``-th forward; returns the live call counter."""
    calls, forward = [0], enc.forward

    def wrapped(*args, **kwargs):
        calls[0] += 1
        if calls[0] > n_forwards:
            raise _Killed("killed")
        return forward(*args, **kwargs)

    enc.forward = wrapped
    return calls


def test_killed_run_resumes_without_recomputing_finished_shards(tmp_path):
    ids, texts = _corpus(20)
    tok = _tokenizer()
    kw = {"prefix": PREFIX, "max_length": 48, "max_batch": 4, "shard_rows": 4}  # 5 shards, 1 forward each
    whole = encode_corpus(_encoder(), tok, ids, texts, tmp_path / "whole", **kw).open()

    enc = _encoder()
    _kill_after(enc, 2)
    with pytest.raises(_Killed):
        encode_corpus(enc, tok, ids, texts, tmp_path / "run", **kw)  # dies while embedding shard 2
    done = sorted((tmp_path / "run").glob("emb-*"))
    assert [p.name for p in done] == [f"emb-r0-0000{k}.{x}" for k in (0, 1) for x in ("json", "npy")]
    assert not list((tmp_path / "run").glob(".*tmp"))
    with pytest.raises(DataError, match="unfinished.*shards \\[2, 3, 4\\]"):
        EmbeddingShards(tmp_path / "run")
    stamps = {p.name: p.stat().st_mtime_ns for p in done}

    enc = _encoder()
    calls = _kill_after(enc, 10**6)
    part = encode_corpus(enc, tok, ids, texts, tmp_path / "run", max_new_shards=1, **kw)  # a time-boxed job
    assert (part.written, part.skipped, part.pending, part.complete) == (1, 2, 2, False)
    res = encode_corpus(enc, tok, ids, texts, tmp_path / "run", **kw)
    assert (res.written, res.skipped, res.pending, res.complete) == (2, 3, 0, True)
    assert calls[0] == 3  # shards 2, 3, 4 only
    assert {p.name: p.stat().st_mtime_ns for p in done} == stamps
    resumed = res.open()
    assert resumed.ids == whole.ids and np.array_equal(resumed.matrix(), whole.matrix())
    again = encode_corpus(enc, tok, ids, texts, tmp_path / "run", **kw)
    assert (again.written, again.skipped, calls[0]) == (0, 5, 3)


KILL_KW = {"prefix": PREFIX, "max_length": 48, "max_batch": 4, "shard_rows": 4}  # 20 docs: 5 shards, 1 forward each
_KILLED_CHILD = """
import json, sys, time
from me5.embed.encode import encode_corpus
from tests import tiny

enc = tiny.encoder(dropout=0.0, seed=0).eval()  # _encoder()
forward, calls = enc.forward, [0]

def slow(*args, **kwargs):  # shard 0 at full speed, then slowly: the parent's SIGKILL lands inside the run
    calls[0] += 1
    if calls[0] > 1:
        time.sleep(0.5)
    return forward(*args, **kwargs)

enc.forward = slow
encode_corpus(enc, tiny.tokenizer(), *tiny.corpus(20), sys.argv[1], **json.loads(sys.argv[2]))  # KILL_KW
print("finished", flush=True)
"""


def test_sigkilled_encoding_resumes_to_the_same_shards(tmp_path):
    """A real kill (SIGKILL, no exception, no cleanup) of a process encoding a corpus, as soon as its first shard
    is on disk; the next run keeps that shard and writes the others, byte for byte those of a run never killed."""
    import signal
    import subprocess
    import sys
    import time

    from tests.helpers import ROOT

    ids, texts = _corpus(20)
    tok = _tokenizer()
    whole = encode_corpus(_encoder(), tok, ids, texts, tmp_path / "whole", **KILL_KW)
    assert whole.written == 5
    run = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    child = subprocess.Popen([sys.executable, "-c", _KILLED_CHILD, str(run), json.dumps(KILL_KW)], cwd=ROOT, env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    first = run / "emb-r0-00000.json"
    deadline = time.monotonic() + 120
    while not first.is_file() and child.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    child.send_signal(signal.SIGKILL)
    out, err = child.communicate(timeout=30)
    assert first.is_file(), f"the child wrote no shard (rc {child.returncode}): {err[-2000:]}"
    assert child.returncode == -signal.SIGKILL and "finished" not in out  # killed inside the run
    with pytest.raises(DataError, match="unfinished"):
        EmbeddingShards(run)
    stamp = (run / "emb-r0-00000.npy").stat().st_mtime_ns

    res = encode_corpus(_encoder(), tok, ids, texts, run, **KILL_KW)
    assert res.complete and res.skipped >= 1 and res.written == 5 - res.skipped
    assert (run / "emb-r0-00000.npy").stat().st_mtime_ns == stamp  # the shard written before the kill is kept
    names = sorted(p.name for p in (tmp_path / "whole").glob("emb-*"))
    assert sorted(p.name for p in run.glob("emb-*")) == names and len(names) == 10
    for name in names:
        if name.endswith(".npy"):
            assert (run / name).read_bytes() == (tmp_path / "whole" / name).read_bytes(), name
        else:
            assert json.loads((run / name).read_text()) == json.loads((tmp_path / "whole" / name).read_text())
    assert res.open().ids == ids


def test_another_run_in_the_folder_is_an_error_or_starts_over(tmp_path):
    ids, texts = _corpus(12)
    tok = _tokenizer()
    kw = {"max_length": 48, "shard_rows": 4}
    encode_corpus(_encoder(), tok, ids, texts, tmp_path, prefix=PREFIX, **kw)
    query_prefix = PromptPolicy("e5").query()
    with pytest.raises(DataError, match=r"manifest\.json.*differs: prefix\b.*overwrite=True"):
        encode_corpus(_encoder(), tok, ids, texts, tmp_path, prefix=query_prefix, **kw)
    with pytest.raises(DataError, match=r"differs: model\b"):
        encode_corpus(_encoder(seed=1), tok, ids, texts, tmp_path, prefix=PREFIX, **kw)
    with pytest.raises(DataError, match=r"differs: corpus\b"):
        encode_corpus(_encoder(), tok, ids, texts[::-1], tmp_path, prefix=PREFIX, **kw)
    with pytest.raises(DataError, match=r"differs: layout\.shard_rows"):
        encode_corpus(_encoder(), tok, ids, texts, tmp_path, prefix=PREFIX, max_length=48, shard_rows=6)
    res = encode_corpus(_encoder(), tok, ids, texts, tmp_path, prefix=query_prefix, overwrite=True, **kw)
    assert (res.written, res.skipped, res.complete) == (3, 0, True)
    assert res.open().fingerprint["prefix"] == query_prefix
    with pytest.raises(ConfigError, match="embed.precision"):
        encode_corpus(_encoder(), tok, ids, texts, tmp_path / "x", precision="fp8")


def test_shard_layout():
    assert shard_rows_of(10, 1, 2, "contiguous", 3) == [range(5, 8), range(8, 10)]
    assert shard_rows_of(10, 1, 2, "strided", 3) == [range(1, 7, 2), range(7, 10, 2)]
    assert shard_rows_of(3, 3, 4, "contiguous", 3) == [range(2, 3)]
    with pytest.raises(ConfigError, match="embed.split"):
        shard_rows_of(10, 0, 2, "random", 3)


# ---------------------------------------------------------------------------------------------- search
def _tied_problem(n_docs=60, n_q=9, seed=0):
    """Vectors with entries in {-2..2}/4 (dot products exact in fp32) drawn from 6 distinct rows: many exact
    ties; doc ids whose string order is not the index order (d10 < d9)."""
    rng = np.random.default_rng(seed)
    base = rng.integers(-2, 3, size=(6, 8)).astype(np.float32) / 4
    docs = base[rng.integers(0, 6, size=n_docs)]
    queries = rng.integers(-2, 3, size=(n_q, 8)).astype(np.float32) / 4
    ids = [f"d{i}" for i in rng.permutation(n_docs)]
    return queries, docs, ids


def _brute_force(queries, docs, ids, k):
    """trec_eval's order: score descending, then doc id descending (me5.eval.metrics, pytrec_eval)."""
    scores = queries.astype(np.float64) @ docs.T.astype(np.float64)
    return np.array([sorted(range(len(ids)), key=lambda j: (row[j], ids[j]), reverse=True)[:k] for row in scores])


def test_trec_eval_breaks_ties_by_doc_id_descending():
    """What the tie rule is made to match: pytrec_eval ranks equal scores by doc id, larger first (strcmp)."""
    pytrec_eval = pytest.importorskip("pytrec_eval")
    for docs, relevant, rr in ((["a", "b"], "b", 1.0), (["a", "b"], "a", 0.5), (["d10", "d9"], "d9", 1.0),
                               (["m", "a", "z"], "z", 1.0), (["m", "a", "z"], "a", 1 / 3)):
        ev = pytrec_eval.RelevanceEvaluator({"q": {relevant: 1}}, {"recip_rank"})
        assert ev.evaluate({"q": dict.fromkeys(docs, 1.0)})["q"]["recip_rank"] == pytest.approx(rr)
    assert tie_preference(["d9", "d10", "a"]).tolist() == [2, 1, 0]


@pytest.mark.parametrize("k", [1, 3, 7, 20, 60, 100])
def test_exact_and_faiss_equal_brute_force_with_ties(k, tmp_path):
    queries, docs, ids = _tied_problem()
    want = _brute_force(queries, docs, ids, k)
    want_s = np.take_along_axis(queries @ docs.T, want, axis=1)
    q, d = torch.from_numpy(queries), torch.from_numpy(docs)
    results = {
        "exact": exact_search(q, d, k, doc_ids=ids),
        "exact_blocks": exact_search(q, d, k, doc_ids=ids, query_block=4, doc_block=7),
        "faiss": faiss_search(queries, docs, k, doc_ids=ids, doc_block=7),
        "faiss_one_block": search(queries, d, k, method="faiss", doc_ids=ids),
    }
    for name, (s, i) in results.items():
        assert i.numpy().tolist() == want.tolist(), name
        assert np.array_equal(s.numpy(), want_s), name
    # over streamed shards: the same ranking (the shards' ids order is the corpus order here)
    shards = _FakeShards(docs, ids, rows=13)
    for method in ("exact", "faiss"):
        s, i = search(queries, shards, k, method=method)
        assert i.numpy().tolist() == want.tolist(), method


class _FakeShards:
    """The block-source side of EmbeddingShards: ``ids`` and ``blocks()`` of fp16 rows."""

    def __init__(self, docs, ids, rows):
        self.docs, self.ids, self.rows, self.dim = docs.astype(np.float16), ids, rows, docs.shape[1]

    def __len__(self):
        return len(self.ids)

    def blocks(self, dtype=np.float32):
        for o in range(0, len(self.ids), self.rows):
            yield o, self.docs[o : o + self.rows].astype(dtype)


def test_ties_without_ids_go_to_the_lower_index_and_k_is_capped():
    docs = torch.ones(5, 2)
    s, i = exact_search(torch.ones(1, 2), docs, 3, doc_block=2)
    assert i.tolist() == [[0, 1, 2]] and s.tolist() == [[2.0, 2.0, 2.0]]
    assert faiss_search(np.ones((1, 2), np.float32), docs, 3, doc_block=2)[1].tolist() == [[0, 1, 2]]
    assert exact_search(torch.ones(2, 2), docs, 100)[1].shape == (2, 5)
    assert to_run(["q"], list("abcde"), s, i) == {"q": {"a": 2.0, "b": 2.0, "c": 2.0}}
    with pytest.raises(ConfigError, match="eval.search"):
        search(torch.ones(1, 2), docs, 1, method="annoy")


def test_random_scores_faiss_equals_exact_and_ivf_with_all_probes():
    g = torch.Generator().manual_seed(0)
    q, d = torch.randn(20, 16, generator=g), torch.randn(300, 16, generator=g)
    ids = [f"p{i}" for i in range(300)]
    s_ex, i_ex = exact_search(q, d, 10, doc_ids=ids, doc_block=64)
    s_fa, i_fa = faiss_search(q, d, 10, doc_ids=ids, doc_block=64)
    assert torch.equal(i_ex, i_fa)
    torch.testing.assert_close(s_fa, s_ex, atol=1e-5, rtol=0)
    s_ivf, i_ivf = faiss_search(q, d, 10, doc_ids=ids, index="IVF4,Flat", params="nprobe=4", train_rows=300)
    assert torch.equal(i_ivf, i_ex)
    _, i_hnsw = faiss_search(q, d, 10, doc_ids=ids, index="HNSW16", params="efSearch=64")
    assert i_hnsw.shape == (20, 10) and bool(((i_hnsw >= 0) & (i_hnsw < 300)).all())


# ---------------------------------------------------------------------------------------------- evaluator
class _QuantEncoder(nn.Module):
    """``encoder(input_ids, attention_mask)``: a text's vector is a row (entries in {-1, 0, 1}/2) chosen by its
    first word: few distinct vectors, so scores tie exactly, in fp32 and in fp16 shards alike."""

    def __init__(self, dim=4, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.register_buffer("table", torch.randint(-1, 2, (len(_tokenizer()), dim), generator=g).float() / 2)

    def forward(self, input_ids, attention_mask):
        return self.table[input_ids[:, 1]]


def _tied_data(n_docs=300, n_q=25, seed=0):
    from me5.eval.retrieval import RetrievalData

    rng = random.Random(seed)
    words = [f"w{i}" for i in range(12)]  # 12 first words -> at most 12 distinct vectors
    ids = [f"d{i}" for i in rng.sample(range(10 * n_docs), n_docs)]
    corpus = {d: {"title": "", "text": f"{rng.choice(words)} body"} for d in ids}
    queries = {f"q{j}": {"text": f"{rng.choice(words)} query"} for j in range(n_q)}
    qrels = {q: {d: rng.choice([1, 1, 2]) for d in rng.sample(ids, rng.randint(1, 40))} for q in queries}
    return RetrievalData(corpus, queries, qrels)


def _pytrec_means(data, run):
    import pytrec_eval

    per_q = pytrec_eval.RelevanceEvaluator(data.qrels, {"ndcg_cut.10", "recall.100"}).evaluate(run)
    return (float(np.mean([v["ndcg_cut_10"] for v in per_q.values()])),
            float(np.mean([v["recall_100"] for v in per_q.values()])))


def test_evaluator_metrics_with_ties_equal_pytrec_eval_on_the_full_run(tmp_path):
    pytest.importorskip("pytrec_eval")
    from me5.eval.metrics import ndcg_at_k, recall_at_k
    from me5.eval.retrieval import RetrievalEvaluator
    data, enc, tok = _tied_data(), _QuantEncoder(), _tokenizer()
    ev = RetrievalEvaluator(data, name="t", query_max_length=16, passage_max_length=16, prompts=PromptPolicy("none"))
    # the full run: every document scored, as pytrec_eval would rank it
    q_ids = list(data.queries)
    docs = encode_texts(enc, tok, [data.corpus[d]["text"] for d in data.corpus], max_length=16)
    qs = encode_texts(enc, tok, [data.queries[q]["text"] for q in q_ids], max_length=16)
    full = {q: dict(zip(data.corpus, (qs[j] @ docs.T).tolist(), strict=True)) for j, q in enumerate(q_ids)}
    want_ndcg, want_recall = _pytrec_means(data, full)

    # the ties matter: cutting the run at 100 with the opposite tie order changes pytrec_eval's numbers
    def cut(order_desc: bool):
        return {q: dict(sorted(r.items(), key=lambda x: (x[1], x[0] if order_desc else _neg(x[0])), reverse=True)[:100])
                for q, r in full.items()}

    assert _pytrec_means(data, cut(True)) == pytest.approx((want_ndcg, want_recall), abs=1e-12)
    assert _pytrec_means(data, cut(False)) != pytest.approx((want_ndcg, want_recall), abs=1e-6)

    for kwargs in ({}, {"search": "faiss"}, {"work_dir": tmp_path / "w", "shard_rows": 64},
                   {"work_dir": tmp_path / "w", "shard_rows": 64, "search": "faiss"}):
        ev = RetrievalEvaluator(data, name="t", query_max_length=16, passage_max_length=16,
                                prompts=PromptPolicy("none"), batch_size=7, **kwargs)
        got = ev.evaluate(enc, tok)
        assert got["t/ndcg@10"] == pytest.approx(want_ndcg, abs=1e-9), kwargs
        assert got["t/recall@100"] == pytest.approx(want_recall, abs=1e-9), kwargs
    # and per query, our metric code on the evaluator's top-100 run equals pytrec_eval on the full run
    scores, idx = exact_search(qs, docs, 100, doc_ids=list(data.corpus))
    run = to_run(q_ids, list(data.corpus), scores, idx)
    import pytrec_eval

    ref = pytrec_eval.RelevanceEvaluator(data.qrels, {"ndcg_cut.10", "recall.100"}).evaluate(full)
    ndcg, recall = ndcg_at_k(run, data.qrels, 10), recall_at_k(run, data.qrels, 100)
    for q in q_ids:
        assert ndcg[q] == pytest.approx(ref[q]["ndcg_cut_10"], abs=1e-12)
        assert recall[q] == pytest.approx(ref[q]["recall_100"], abs=1e-12)


def _neg(s: str) -> tuple:
    return tuple(-ord(c) for c in s) + (1,)  # reverses the string order (a prefix sorts after its extensions)


def test_evaluator_work_dir_and_in_memory_agree_with_a_real_encoder(tmp_path):
    from me5.eval.retrieval import RetrievalEvaluator, load_beir
    from tests.helpers import write_beir

    data = load_beir(write_beir(tmp_path / "data"))
    enc, tok = _encoder(), _tokenizer()
    kw = {"name": "s", "query_max_length": 32, "passage_max_length": 48, "batch_size": 2, "prompts": E5}
    mem = RetrievalEvaluator(data, **kw).evaluate(enc, tok)
    shard = RetrievalEvaluator(data, work_dir=tmp_path / "w", shard_rows=2, **kw).evaluate(enc, tok)
    assert shard.keys() == mem.keys() and all(shard[k] == pytest.approx(mem[k], abs=1e-6) for k in mem)
    assert EmbeddingShards(tmp_path / "w" / "s" / "all").fingerprint["prefix"] == PromptPolicy("e5").document()
    # a later model replaces the folder (overwrite): the evaluator's work dir is a cache
    RetrievalEvaluator(data, work_dir=tmp_path / "w", shard_rows=2, **kw).evaluate(_encoder(seed=5), tok)
    ev = RetrievalEvaluator(data, prompts=E5)
    assert (ev.query_max_length, ev.passage_max_length, ev.precision, ev.search) == (512, 512, "fp16", "exact")
    with pytest.raises(ConfigError, match="eval.search"):
        RetrievalEvaluator(data, search="bm25", prompts=E5)
    with pytest.raises(ConfigError, match="eval.precision"):
        RetrievalEvaluator(data, precision="int8", prompts=E5)


# ---------------------------------------------------------------------------------------------- distributed search
def _tied_shards(tmp_path, shard_rows=37):
    """A sharded corpus of few distinct vectors (exact ties, fp16-exact) and its queries' vectors."""
    data, enc, tok = _tied_data(), _QuantEncoder(), _tokenizer()
    ids = list(data.corpus)
    texts = [data.corpus[d]["text"] for d in ids]
    encode_corpus(enc, tok, ids, texts, tmp_path / "shards", max_length=16, shard_rows=shard_rows)
    queries = encode_texts(enc, tok, [q["text"] for q in data.queries.values()], max_length=16, precision="fp32")
    return EmbeddingShards(tmp_path / "shards"), queries


@pytest.mark.parametrize("method,index,params", [("exact", "Flat", None), ("faiss", "Flat", None),
                                                 ("faiss", "IVF4,Flat", "nprobe=4")])
def test_parts_of_a_sharded_corpus_merge_into_the_whole_search(tmp_path, method, index, params):
    from me5.embed.search import merge_topk

    shards, queries = _tied_shards(tmp_path)
    assert len(shards._files) == 9  # 300 docs in shards of 37
    for k in (1, 10, 100):
        kw = {"method": method, "index": index, "params": params}
        whole = search(queries, shards, k, **kw)
        for world in (2, 3, 5):
            parts = [search(queries, shards.part(r, world), k, **kw) for r in range(world)]
            files = sorted(f for r in range(world) for f in shards.part(r, world).files)
            assert files == list(range(9))  # every shard searched once
            merged = merge_topk(parts, min(k, len(shards)), doc_ids=shards.ids)
            assert torch.equal(merged[0], whole[0]), (k, world)
            # each index names the corpus row whose score it reports (a part's faiss labels mapped back)
            rescored = (queries @ torch.from_numpy(shards.matrix()).T).gather(1, merged[1])
            assert torch.equal(rescored, merged[0]), (k, world)
            if index == "Flat":  # exact: the same docs in the same (trec_eval) tie order; IVF orders within ties
                assert torch.equal(merged[1], whole[1]), (k, world)
    with pytest.raises(ValueError, match="rank 2"):
        shards.part(2, 2)


def _eval_worker(rank: int, port: int, out_dir: str) -> None:
    import json

    torch.set_num_threads(1)
    problem = torch.load(f"{out_dir}/problem.pt", weights_only=False)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        from me5.eval.retrieval import RetrievalEvaluator

        ev = RetrievalEvaluator(problem["data"], name="t", query_max_length=16, passage_max_length=16,
                                prompts=PromptPolicy("none"), work_dir=f"{out_dir}/work", shard_rows=29)
        metrics = ev.evaluate(problem["encoder"], problem["tokenizer"])
        with open(f"{out_dir}/metrics{rank}.json", "w") as fh:
            json.dump(metrics, fh)
    finally:
        shutdown_process_group()
    import sys

    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def test_two_ranks_share_the_encoding_and_the_search_and_equal_one_process(tmp_path):
    """eval_after=shared: each rank encodes and searches its part of the corpus; the merged result is the single
    process's, on every rank (ties included: few distinct vectors)."""
    import json

    from me5.eval.retrieval import RetrievalEvaluator
    from tests.helpers import free_port, spawn_and_join

    data, enc, tok = _tied_data(), _QuantEncoder(), _tokenizer()
    torch.save({"data": data, "encoder": enc, "tokenizer": tok}, tmp_path / "problem.pt")
    spawn_and_join(_eval_worker, (free_port(), str(tmp_path)), 120, "evaluation workers")
    one = RetrievalEvaluator(data, name="t", query_max_length=16, passage_max_length=16,
                             prompts=PromptPolicy("none")).evaluate(enc, tok)
    ranks = [json.loads((tmp_path / f"metrics{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0] == ranks[1]
    assert ranks[0].keys() == one.keys() and all(ranks[0][k] == pytest.approx(one[k], abs=1e-9) for k in one)
    written = sorted(p.name for p in (tmp_path / "work" / "t" / "all").glob("emb-*.npy"))
    assert {n.split("-")[1] for n in written} == {"r0", "r1"}  # both ranks encoded
