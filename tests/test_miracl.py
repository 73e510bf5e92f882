"""MIRACL as published -> per-language BEIR folders: loads and evaluates, counts what it drops, bad inputs, resume."""

from __future__ import annotations

import gzip
import json
import re
import shutil

import pytest
import torch

from me5.errors import ConfigError, DataError
from me5.eval.miracl import LANGUAGES, MARKER, convert_miracl
from me5.eval.retrieval import RetrievalEvaluator, load_beir
from me5.prompts import PromptPolicy
from tests.helpers import ROOT

E5 = PromptPolicy("e5")
FIXTURE = ROOT / "tests" / "fixtures" / "miracl"


@pytest.fixture
def raw(tmp_path):
    """A writable copy of the fixture: (corpus dir, topics dir)."""
    shutil.copytree(FIXTURE, tmp_path / "raw")
    return tmp_path / "raw" / "miracl-corpus", tmp_path / "raw" / "miracl"


def convert(raw, out, **kwargs):
    kwargs.setdefault("languages", ["sw", "te"])
    return convert_miracl(raw[0], raw[1], out, progress=False, **kwargs)


class TopicEncoder:
    """Fake encoder: a text's embedding is the one-hot of its ``tN`` token."""

    def encode(self, texts, tokenizer, *, prefix="", **kwargs):
        out = torch.zeros(len(texts), 16)
        for i, text in enumerate(texts):
            out[i, int(re.search(r"\bt(\d+)\b", text).group(1))] = 1.0
        return out


def read_jsonl_gz(path):
    with gzip.open(path, "rt", encoding="utf-8") as fh:
        return [json.loads(line) for line in fh]


# ---------------------------------------------------------------------------------------------- the layout
def test_the_16_languages_of_table_4():
    assert len(LANGUAGES) == 16 and "de" not in LANGUAGES and "yo" not in LANGUAGES


def test_converted_fixture_loads_and_evaluates(raw, tmp_path):
    out = tmp_path / "out"
    stats = convert(raw, out)
    sw = out / "sw"
    assert sorted(p.name for p in sw.iterdir()) == sorted(["corpus.jsonl.gz", "queries.jsonl", "qrels", MARKER])
    docs = read_jsonl_gz(sw / "corpus.jsonl.gz")  # both input files, in order, BEIR fields only
    assert [d["_id"] for d in docs] == ["1#0", "1#1", "2#0", "3#0", "3#1"]
    assert docs[4] == {"_id": "3#1", "title": "", "text": "t5 Simba huwinda kwa makundi."}
    queries = [json.loads(line) for line in (sw / "queries.jsonl").read_text(encoding="utf-8").splitlines()]
    assert queries == [{"_id": "0", "text": "t1 Paka ni nini?"}, {"_id": "1", "text": "t2 Paka hulala lini?"},
                       {"_id": "2", "text": "t3 Mbwa hufanya nini usiku?"}]
    assert (sw / "qrels" / "dev.tsv").read_text(encoding="utf-8").splitlines() == [
        "query-id\tcorpus-id\tscore", "0\t1#0\t1", "0\t1#1\t0", "1\t1#1\t1", "2\t2#0\t1"]
    assert read_jsonl_gz(out / "te" / "corpus.jsonl.gz")[0]["title"] == "పిల్లి"

    data = load_beir(out, split="dev")
    assert sorted(data) == ["sw", "te"]
    assert set(data["sw"].queries) == {"0", "1", "2"} and len(data["sw"].corpus) == 5
    assert data["te"].qrels == {"100": {"10#0": 1}, "101": {"11#0": 2, "10#0": 0}}
    metrics = RetrievalEvaluator(data, name="miracl", k_values=(10, 100), prompts=E5).evaluate(TopicEncoder(), None)
    assert metrics["miracl/sw/ndcg@10"] == pytest.approx(1.0)
    assert metrics["miracl/te/recall@100"] == pytest.approx(1.0)
    assert metrics["miracl/ndcg@10"] == pytest.approx(1.0)
    assert stats["languages"]["te"]["queries_written"] == 2


def test_counts_by_reason_and_stats_file(raw, tmp_path, caplog):
    out = tmp_path / "out"
    with caplog.at_level("INFO", logger="me5.eval.miracl"):
        stats = convert(raw, out)
    sw = stats["languages"]["sw"]
    assert sw["dropped"] == {
        "qrels_docid_not_in_corpus": 2,  # 404#0 (qid 2) and 9#9 (qid 4)
        "qrels_unknown_query": 1,  # qid 7
        "queries_without_judgments": 1,  # qid 3
        "queries_all_judgments_dropped": 1,  # qid 4
        "duplicate_docid": 0,
    }
    assert sw["missing_docids"] == ["404#0", "9#9"]
    assert (sw["corpus_files"], sw["docs"], sw["topics"], sw["judgments"]) == (2, 5, 5, 7)
    assert (sw["queries_written"], sw["judgments_written"], sw["relevant_written"]) == (3, 4, 3)
    assert sw["resumed"] is False
    assert stats["totals"]["docs"] == 7 and stats["totals"]["dropped"]["qrels_docid_not_in_corpus"] == 2
    assert json.loads((out / "stats.json").read_text(encoding="utf-8")) == stats
    assert "404#0" in caplog.text and "qrels_docid_not_in_corpus 2" in caplog.text


def test_duplicated_docid_keeps_the_first(raw, tmp_path):
    extra = raw[0] / "miracl-corpus-v1.0-te" / "docs-1.jsonl.gz"
    with gzip.open(extra, "wt", encoding="utf-8") as fh:
        fh.write(json.dumps({"docid": "10#0", "title": "x", "text": "t9 a later copy"}) + "\n")
    stats = convert(raw, tmp_path / "out", languages=["te"])
    assert stats["languages"]["te"]["dropped"]["duplicate_docid"] == 1
    assert stats["languages"]["te"]["docs"] == 2
    docs = read_jsonl_gz(tmp_path / "out" / "te" / "corpus.jsonl.gz")
    assert [d["_id"] for d in docs] == ["10#0", "11#0"] and docs[0]["text"].startswith("t6")
    load_beir(tmp_path / "out", split="dev")


# ---------------------------------------------------------------------------------------------- bad input
def test_missing_qrels_file_names_it_before_any_language_is_converted(raw, tmp_path):
    missing = raw[1] / "miracl-v1.0-te" / "qrels" / "qrels.miracl-v1.0-te-dev.tsv"
    missing.unlink()
    with pytest.raises(DataError, match=re.escape(str(missing))) as err:
        convert(raw, tmp_path / "out")
    assert err.value.file == str(missing)
    assert not (tmp_path / "out" / "sw").exists()  # sw comes first but nothing was converted


def test_missing_topics_file_and_corpus_folder(raw, tmp_path):
    with pytest.raises(DataError, match="topics.miracl-v1.0-sw-test.tsv"):
        convert(raw, tmp_path / "out", split="test")
    shutil.rmtree(raw[0] / "miracl-corpus-v1.0-sw")
    with pytest.raises(DataError, match="miracl-corpus-v1.0-sw") as err:
        convert(raw, tmp_path / "out")
    assert err.value.file == str(raw[0] / "miracl-corpus-v1.0-sw")
    with pytest.raises(DataError, match="topics.miracl-v1.0-xx-dev.tsv"):  # a language MIRACL lacks
        convert(raw, tmp_path / "out", languages=["xx"])


@pytest.mark.parametrize(
    ("which", "line", "message"),
    [
        ("qrels", "1\tQ0\t1#1", "expected 4 columns"),
        ("qrels", "1\tQ0\t1#1\tyes", "relevance 'yes' is not an integer"),
        ("topics", "5 no tab here", "expected 2 tab-separated columns"),
        ("topics", "0\tt1 again", "duplicate qid '0'"),
    ],
)
def test_malformed_tsv_line_names_file_and_line(raw, tmp_path, which, line, message):
    path = raw[1] / "miracl-v1.0-sw" / which / f"{which}.miracl-v1.0-sw-dev.tsv"
    lines = path.read_text(encoding="utf-8").splitlines()
    lines.insert(2, line)  # the third line
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    with pytest.raises(DataError, match=re.escape(message)) as err:
        convert(raw, tmp_path / "out")
    assert (err.value.file, err.value.line) == (str(path), 3)
    assert f"{path}:3" in str(err.value)


def test_malformed_corpus_record_names_file_and_line(raw, tmp_path):
    path = raw[0] / "miracl-corpus-v1.0-te" / "docs-0.jsonl.gz"
    with gzip.open(path, "at", encoding="utf-8") as fh:
        fh.write(json.dumps({"title": "no id", "text": "t8"}) + "\n")
    with pytest.raises(DataError, match="field 'docid'") as err:
        convert(raw, tmp_path / "out", languages=["te"])
    assert (err.value.file, err.value.line) == (str(path), 3)
    assert not (tmp_path / "out" / "te" / "corpus.jsonl.gz").exists()  # the loader sees no half language


def test_no_judgment_left_is_an_error(raw, tmp_path):
    (raw[1] / "miracl-v1.0-te" / "qrels" / "qrels.miracl-v1.0-te-dev.tsv").write_text("100\tQ0\tnope\t1\n")
    with pytest.raises(DataError, match="no judgment names both a topic and a document"):
        convert(raw, tmp_path / "out", languages=["te"])


def test_bad_arguments(raw, tmp_path):
    with pytest.raises(ConfigError, match="languages"):
        convert(raw, tmp_path / "out", languages=[])


# ---------------------------------------------------------------------------------------------- resume
def test_a_language_already_done_is_skipped(raw, tmp_path, monkeypatch):
    out = tmp_path / "out"
    first = convert(raw, out, languages=["sw"])
    corpus = out / "sw" / "corpus.jsonl.gz"
    before = corpus.stat().st_mtime_ns

    import me5.eval.miracl as miracl

    converted = []
    real = miracl._Language.convert
    monkeypatch.setattr(miracl._Language, "convert", lambda self, progress: converted.append(self.lang)
                        or real(self, progress))
    again = convert(raw, out)
    assert converted == ["te"]
    assert corpus.stat().st_mtime_ns == before
    assert again["languages"]["sw"]["resumed"] is True and again["languages"]["te"]["resumed"] is False
    assert {k: v for k, v in again["languages"]["sw"].items() if k != "resumed"} == \
        {k: v for k, v in first["languages"]["sw"].items() if k != "resumed"}
    assert sorted(load_beir(out, split="dev")) == ["sw", "te"]

    converted.clear()
    (out / "te" / MARKER).unlink()  # no marker (an interrupted language): converted again from the start
    convert(raw, out)
    assert converted == ["te"]

    converted.clear()  # the inputs changed: converted again
    with gzip.open(raw[0] / "miracl-corpus-v1.0-sw" / "docs-1.jsonl.gz", "at", encoding="utf-8") as fh:
        fh.write(json.dumps({"docid": "4#0", "title": "", "text": "t8 new"}) + "\n")
    assert convert(raw, out)["languages"]["sw"]["docs"] == 6
    assert converted == ["sw"]


def test_an_interrupted_language_leaves_nothing_for_the_loader(raw, tmp_path, monkeypatch):
    import me5.eval.miracl as miracl

    def boom(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(miracl, "_repeated", boom)  # after the corpus is streamed, before the renames
    with pytest.raises(KeyboardInterrupt):
        convert(raw, tmp_path / "out", languages=["te"])
    te = tmp_path / "out" / "te"
    assert not (te / "corpus.jsonl.gz").exists() and not (te / MARKER).exists()
    monkeypatch.undo()
    assert convert(raw, tmp_path / "out", languages=["te"])["languages"]["te"]["resumed"] is False
    assert sorted(load_beir(tmp_path / "out", split="dev")) == ["te"]


def test_one_output_folder_holds_one_split(raw, tmp_path):
    out = tmp_path / "out"
    convert(raw, out, languages=["te"])
    for name in ("topics", "qrels"):
        src = raw[1] / "miracl-v1.0-te" / name / f"{name}.miracl-v1.0-te-dev.tsv"
        shutil.copy(src, src.with_name(f"{name}.miracl-v1.0-te-train.tsv"))
    with pytest.raises(DataError, match="holds the MIRACL 'dev' split") as err:
        convert(raw, out, languages=["te"], split="train")
    assert err.value.file == str(out / "te" / MARKER)
