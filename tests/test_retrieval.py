"""BEIR/MIRACL loading with file:line errors, exact search, the retrieval evaluator and its table."""

from __future__ import annotations

import logging
import re

import pytest
import torch

from me5.embed.search import exact_search
from me5.errors import ConfigError, DataError
from me5.eval.retrieval import RetrievalData, RetrievalEvaluator, format_table, load_beir
from me5.prompts import PromptPolicy
from tests.helpers import CORPUS, QRELS, QUERIES, write_beir

E5 = PromptPolicy("e5")


class TopicEncoder:
    """Fake encoder: a text's embedding is the one-hot of its ``tN`` token; ``wrong`` maps queries elsewhere."""

    def __init__(self, dim=8, wrong=()):
        self.dim, self.wrong, self.calls = dim, set(wrong), []

    def encode(self, texts, tokenizer, *, prefix="", max_length=512, batch_size=64, **kwargs):
        self.calls.append((prefix, max_length, list(texts)))
        out = torch.zeros(len(texts), self.dim)
        for i, text in enumerate(texts):
            topic = int(re.search(r"\bt(\d+)\b", text).group(1))
            if prefix.startswith("query") and topic in self.wrong:
                topic = (topic + 1) % self.dim
            out[i, topic] = 1.0
        return out


# ---------------------------------------------------------------------------------------------- loader
def test_load_beir(tmp_path):
    data = load_beir(write_beir(tmp_path))
    assert isinstance(data, RetrievalData)
    assert set(data.corpus) == {"d1", "d2", "d3", "d4", "d5"}
    assert data.corpus["d4"] == {"title": "", "text": "t4 Hunde bellen", "lang": "de"}
    assert data.corpus["d5"]["title"] == ""
    assert set(data.queries) == {"q1", "q2", "q3", "q4"}  # q5 has no judgments in this split
    assert data.qrels == {"q1": {"d1": 1}, "q2": {"d2": 2}, "q3": {"d3": 1}, "q4": {"d4": 1, "d2": 0}}
    assert data.languages == ["de", "en"]


def test_load_miracl_layout(tmp_path):
    write_beir(tmp_path / "en", corpus=CORPUS[:2], queries=QUERIES[:2], qrels=QRELS[:2], split="dev")
    de_corpus = [{k: v for k, v in d.items() if k != "lang"} for d in CORPUS[2:4]]
    de_queries = [{k: v for k, v in q.items() if k != "lang"} for q in QUERIES[2:4]]
    write_beir(tmp_path / "de", corpus=de_corpus, queries=de_queries, qrels=QRELS[2:4], split="dev")
    data = load_beir(tmp_path, split="dev")
    assert sorted(data) == ["de", "en"]
    assert data["de"].languages == ["de"] and data["de"].corpus["d3"]["lang"] == "de"  # from the folder name
    assert set(data["en"].corpus) == {"d1", "d2"}


def test_gzip_compressed_corpus_and_queries_read_like_plain_ones(tmp_path):
    import gzip

    plain = load_beir(write_beir(tmp_path / "plain"))
    gz = write_beir(tmp_path / "gz" / "de")  # MIRACL layout, compressed
    for name in ("corpus.jsonl", "queries.jsonl"):
        (gz / f"{name}.gz").write_bytes(gzip.compress((gz / name).read_bytes()))
        (gz / name).unlink()
    data = load_beir(tmp_path / "gz")["de"]
    assert (data.corpus, data.queries, data.qrels) == (plain.corpus, plain.queries, plain.qrels)


@pytest.mark.parametrize("missing", ["corpus.jsonl", "queries.jsonl", "qrels/test.tsv"])
def test_missing_file_names_path(tmp_path, missing):
    write_beir(tmp_path)
    (tmp_path / missing).unlink()
    with pytest.raises(DataError) as err:
        load_beir(tmp_path)
    assert missing.split("/")[-1] in str(err.value)


def test_missing_folder_and_wrong_split(tmp_path):
    with pytest.raises(DataError, match=re.escape(str(tmp_path / "nope"))):
        load_beir(tmp_path / "nope")
    write_beir(tmp_path)
    with pytest.raises(DataError, match=r"dev\.tsv.*splits here: test"):
        load_beir(tmp_path, split="dev")


def test_malformed_json_names_file_and_line(tmp_path):
    write_beir(tmp_path)
    path = tmp_path / "corpus.jsonl"
    lines = path.read_text().splitlines()
    lines[2] = '{"_id": "d3", "text": '
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=re.escape(f"{path}:3")):
        load_beir(tmp_path)


@pytest.mark.parametrize(
    ("file", "record", "field"),
    [("queries.jsonl", {"_id": "q9"}, "text"), ("corpus.jsonl", {"title": "x", "text": "y"}, "_id")],
)
def test_missing_field(tmp_path, file, record, field):
    corpus, queries = list(CORPUS), list(QUERIES)
    (queries if file == "queries.jsonl" else corpus).append(record)
    write_beir(tmp_path, corpus=corpus, queries=queries)
    with pytest.raises(DataError) as err:
        load_beir(tmp_path)
    assert f"{file}:6" in str(err.value) and f"field '{field}'" in str(err.value)


@pytest.mark.parametrize(
    ("line", "match"), [("q1\td1", "3 tab-separated columns"), ("q1\td1\thigh", "not an integer")]
)
def test_bad_qrels_line(tmp_path, line, match):
    write_beir(tmp_path, qrels=[*QRELS[:2], line])
    with pytest.raises(DataError, match=re.escape("test.tsv:4") + ".*" + match):
        load_beir(tmp_path)


def test_unknown_ids_are_dropped_with_a_warning(tmp_path, caplog):
    write_beir(tmp_path, qrels=[*QRELS, ("q99", "d1", 1), ("q1", "d99", 1), ("q2", "d404", 1)])
    with caplog.at_level(logging.WARNING, logger="me5.eval.retrieval"):
        data = load_beir(tmp_path)
    assert data.qrels["q1"] == {"d1": 1} and "q99" not in data.qrels
    assert "1 judgments of unknown queries and 2 of unknown documents" in caplog.text


# ---------------------------------------------------------------------------------------------- search
def test_exact_search_in_blocks_equals_full_topk():
    g = torch.Generator().manual_seed(0)
    q, d = torch.randn(10, 6, generator=g), torch.randn(37, 6, generator=g)
    scores, idx = exact_search(q, d, 5, query_block=3, doc_block=4)
    full_s, full_i = (q @ d.T).topk(5, dim=1)
    torch.testing.assert_close(scores, full_s)
    assert torch.equal(idx, full_i)
    assert exact_search(q, d[:3], 100)[1].shape == (10, 3)  # k capped at the corpus size


# ---------------------------------------------------------------------------------------------- evaluator
def test_perfect_encoder_scores_one_per_language(tmp_path):
    enc = TopicEncoder()
    ev = RetrievalEvaluator(
        load_beir(write_beir(tmp_path)), name="sample", query_max_length=32, passage_max_length=48, prompts=E5)
    metrics = ev.evaluate(enc, tokenizer=None)
    expected = {
        f"sample/{lang}{m}"
        for lang in ("", "en/", "de/")
        for m in ("ndcg@10", "recall@10", "ndcg@100", "recall@100")
    }
    assert set(metrics) == expected
    assert all(v == pytest.approx(1.0) for v in metrics.values())
    (p_prefix, p_len, p_texts), (q_prefix, q_len, _) = enc.calls
    assert (p_prefix, p_len, q_prefix, q_len) == ("passage: ", 48, "query: ", 32)
    assert p_texts[:2] == ["Cats t1 cats purr", "t2 dogs bark"]  # title + " " + text, stripped


def test_macro_is_mean_of_languages(tmp_path):
    data = load_beir(write_beir(tmp_path))
    metrics = RetrievalEvaluator(data, name="s", k_values=(10,), prompts=E5).evaluate(TopicEncoder(wrong={3}), None)
    assert metrics["s/en/ndcg@10"] == pytest.approx(1.0)
    assert 0.0 < metrics["s/de/ndcg@10"] < 1.0
    assert metrics["s/ndcg@10"] == pytest.approx((metrics["s/en/ndcg@10"] + metrics["s/de/ndcg@10"]) / 2)
    only_de = RetrievalEvaluator(data, name="s", k_values=(10,), languages=["de"], prompts=E5).evaluate(
        TopicEncoder(wrong={3}), None
    )
    assert set(only_de) == {"s/ndcg@10", "s/recall@10", "s/de/ndcg@10", "s/de/recall@10"}
    with pytest.raises(ConfigError, match="fr"):
        RetrievalEvaluator(data, languages=["fr"], prompts=E5)


def test_no_languages_gives_aggregate_only(tmp_path):
    corpus = [{k: v for k, v in d.items() if k != "lang"} for d in CORPUS]
    queries = [{k: v for k, v in q.items() if k != "lang"} for q in QUERIES]
    metrics = RetrievalEvaluator(load_beir(write_beir(tmp_path, corpus, queries)), prompts=E5).evaluate(
        TopicEncoder(), None
    )
    assert set(metrics) == {"sample/ndcg@10", "sample/recall@10", "sample/ndcg@100", "sample/recall@100"}


def test_per_language_folders_search_their_own_corpus(tmp_path):
    # the en corpus holds a t3 doc that is not relevant for the de query: per-language search never sees it
    write_beir(
        tmp_path / "en",
        corpus=[*CORPUS[:2], {"_id": "x3", "text": "t3 decoy"}],
        queries=QUERIES[:2],
        qrels=QRELS[:2],
    )
    write_beir(tmp_path / "de", corpus=CORPUS[2:4], queries=QUERIES[2:4], qrels=QRELS[2:4])
    enc = TopicEncoder()
    metrics = RetrievalEvaluator(load_beir(tmp_path), name="m", k_values=(1,), prompts=E5).evaluate(enc, None)
    assert metrics == {
        f"m/{lang}{x}@1": pytest.approx(1.0) for lang in ("", "de/", "en/") for x in ("ndcg", "recall")
    }
    # de corpus, de queries, en corpus, en queries
    assert [len(texts) for _, _, texts in enc.calls] == [2, 2, 3, 2]


def test_format_table():
    rows = {
        "untrained": {"s/ndcg@10": 0.1234, "s/en/ndcg@10": 0.2, "s/de/ndcg@10": 0.0468, "s/recall@100": 0.5},
        "finetune": {"s/ndcg@10": 1.0, "s/en/ndcg@10": 1.0, "s/de/ndcg@10": 1.0, "s/recall@100": 0.987},
    }
    text = format_table(rows)
    lines = text.splitlines()
    assert re.split(r"\s*\|\s*", lines[0].strip("| ")) == ["s ndcg@10", "avg", "de", "en"]
    assert re.split(r"\s*\|\s*", lines[2].strip("| ")) == ["untrained", "12.3", "4.7", "20.0"]
    assert re.split(r"\s*\|\s*", lines[3].strip("| ")) == ["finetune", "100.0", "100.0", "100.0"]
    assert "s recall@100" in text and "98.7" in text
    assert len({len(line) for line in lines[:4]}) == 1  # fixed width
    assert format_table({"x": {"s/ndcg@10": 0.5}}, metrics=("ndcg@10",)).count("\n") == 2


def test_lazy_languages_read_one_corpus_at_a_time_and_score_the_same(tmp_path, monkeypatch):
    import me5.eval.retrieval as retrieval
    from me5.eval.retrieval import LazyLanguages, RetrievalEvaluator, load_beir

    for lang in ("de", "fr", "sw"):
        write_beir(tmp_path / "m" / lang, split="dev")
    eager = load_beir(tmp_path / "m", split="dev")
    lazy = load_beir(tmp_path / "m", split="dev", lazy=True)
    assert isinstance(lazy, LazyLanguages) and sorted(lazy) == ["de", "fr", "sw"]
    reads, load_one = [], retrieval._load_one
    monkeypatch.setattr(retrieval, "_load_one", lambda root, split, lang=None: reads.append(lang) or load_one(root, split, lang))
    ev = RetrievalEvaluator(lazy, name="m", languages=["sw", "de"], prompts=E5)
    assert reads == []  # nothing read until evaluated
    got = ev.evaluate(TopicEncoder(), None)
    assert reads == ["sw", "de"]  # each language read once, when its turn comes
    assert got == RetrievalEvaluator(eager, name="m", languages=["sw", "de"], prompts=E5).evaluate(TopicEncoder(), None)
    (tmp_path / "m" / "fr" / "qrels" / "dev.tsv").unlink()
    with pytest.raises(DataError, match=r"fr.*dev.tsv|dev.tsv.*fr"):
        load_beir(tmp_path / "m", split="dev", lazy=True)
