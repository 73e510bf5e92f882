"""nDCG@k / Recall@k / MRR@k agree with trec_eval (via pytrec_eval) query by query."""

from __future__ import annotations

import random

import pytest

from me5.eval.metrics import mrr_at_k, ndcg_at_k, recall_at_k

pytrec_eval = pytest.importorskip("pytrec_eval")


def _random_case(seed: int, *, ties: bool = False):
    rng = random.Random(seed)
    docs = [f"d{i}" for i in range(150)]
    qrels, run = {}, {}
    for q in range(40):
        qid = f"q{q}"
        judged = rng.sample(docs, rng.randint(1, 20))
        if q % 7 == 0:  # judged, but nothing relevant
            qrels[qid] = {d: 0 for d in judged}
        elif q % 11 == 0:  # no judgments at all: trec_eval skips the query
            qrels[qid] = {}
        else:
            qrels[qid] = {d: rng.choice([0, 1, 1, 2, 3]) for d in judged}
        retrieved = rng.sample(docs, rng.randint(0, 120))
        if ties:
            run[qid] = {d: float(rng.randint(0, 5)) for d in retrieved}
        else:
            scores = rng.sample(range(10_000), len(retrieved))  # distinct
            run[qid] = {d: s / 100 for d, s in zip(retrieved, scores, strict=True)}
    qrels["only_in_qrels"] = {"d1": 1}
    run["only_in_run"] = {"d1": 1.0}
    return run, qrels


def _trec(run, qrels, measure: str) -> dict[str, float]:
    name = measure.replace(".", "_")
    results = pytrec_eval.RelevanceEvaluator(qrels, {measure}).evaluate(run)
    return {qid: r[name] for qid, r in results.items()}


@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_ndcg_and_recall_match_trec_eval(seed, ties):
    run, qrels = _random_case(seed, ties=ties)
    for k in (1, 5, 10, 100):
        expected = _trec(run, qrels, f"ndcg_cut.{k}")
        got = ndcg_at_k(run, qrels, k)
        assert got.keys() == expected.keys()
        assert got == pytest.approx(expected, abs=1e-9)
        expected = _trec(run, qrels, f"recall.{k}")
        got = recall_at_k(run, qrels, k)
        assert got.keys() == expected.keys()
        assert got == pytest.approx(expected, abs=1e-9)


def test_mrr_uncut_matches_recip_rank():
    run, qrels = _random_case(3)
    assert mrr_at_k(run, qrels, k=1000) == pytest.approx(_trec(run, qrels, "recip_rank"), abs=1e-9)


def test_query_sets_and_edge_cases():
    run, qrels = _random_case(4)
    scored = ndcg_at_k(run, qrels, 10)
    assert "only_in_run" not in scored and "only_in_qrels" not in scored
    assert "q11" not in scored  # no judgments: skipped
    assert scored["q7"] == 0.0 and recall_at_k(run, qrels, 100)["q7"] == 0.0  # judged, none relevant: 0


def test_hand_computed_values():
    qrels = {"q": {"a": 2, "b": 1, "c": 0}}
    run = {"q": {"x": 0.9, "a": 0.8, "c": 0.7, "b": 0.1}}
    dcg = 2 / 1.5849625007211562 + 1 / 2.321928094887362  # ranks 2 and 4
    idcg = 2 + 1 / 1.5849625007211562
    assert ndcg_at_k(run, qrels, 10)["q"] == pytest.approx(dcg / idcg)
    assert recall_at_k(run, qrels, 3)["q"] == pytest.approx(0.5)
    assert mrr_at_k(run, qrels, 1)["q"] == 0.0
    assert mrr_at_k(run, qrels, 10)["q"] == pytest.approx(0.5)
