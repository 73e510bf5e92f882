"""The stage-2 sources (mE5 Table 2) on small fixtures in each dataset's real raw layout.

Fixtures: ``tests/fixtures/raw/stage2/<source>/`` (Tevatron/mr-tydi/dureader ``*.jsonl.gz`` stored decompressed;
sentence-transformers, SQuAD and E5-R as the parquet they ship as). Each converts to the expected examples,
skips are counted by reason, and malformed input names file:line and the raw field.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from me5.data import Source
from me5.data.sources import STAGE2_SOURCES
from me5.data.sources.stage2 import (
    FEVER,
    MIRACL,
    NLI,
    DuReader,
    HotpotQA,
    MrTyDi,
    MSMarcoPassage,
    NLLBSupervised,
    QuoraDuplicates,
)
from me5.errors import ConfigError, DataError
from me5.prompts import TASKS
from tests.helpers import JUSTICE_Q, format_item, stage2_cases
from tests.helpers import RAW_STAGE2 as FIX


def load(cls, rel, **kwargs):
    src = cls(str(FIX / rel), **kwargs)
    examples, counts = src.load_examples()
    got = [(e.query, e.positive, e.negatives, e.teacher_scores, e.lang) for e in examples]
    return counts, examples, got


# (class, path under FIX, constructor kwargs, expected examples, expected counts)
CASES = stage2_cases()


@pytest.mark.parametrize(("cls", "rel", "kwargs", "expected", "counts"), CASES)
def test_fixture_converts_to_expected_examples(cls, rel, kwargs, expected, counts):
    got_counts, examples, got = load(cls, rel, **kwargs)
    assert got == expected
    assert dict(got_counts) == counts
    assert {e.source for e in examples} == {cls.source_name}


@pytest.mark.parametrize(
    ("cls", "rel", "line", "field"),
    [
        pytest.param(MSMarcoPassage, "msmarco_passage/train.jsonl", 4, "positive_passages[0].text", id="msmarco_passage"),
        pytest.param(MIRACL, "miracl/train.jsonl", 3, "negative_passages[0]", id="miracl"),
    ],
)
def test_malformed_record_names_file_line_and_field(cls, rel, line, field):
    with pytest.raises(DataError) as info:
        cls(str(FIX / rel)).load_examples()
    err = info.value
    assert (err.line, err.field) == (line, field)
    assert f"{rel.split('/')[-1]}:{line}" in str(err) and f"field '{field}'" in str(err)


def write(tmp_path, record) -> str:
    path = tmp_path / "train.jsonl"
    path.write_text(json.dumps(record, ensure_ascii=False) + "\n", encoding="utf-8")
    return str(path)


@pytest.mark.parametrize(
    ("record", "field"),
    [
        pytest.param({"query": "q", "pos": ["p"], "neg": ["n1", "n2"], "pos_scores": [1.0], "neg_scores": [0.5]},
                     "neg_scores", id="flag_scores_do_not_match_negatives"),
        pytest.param({"query": "q", "pos": ["p"], "neg": ["n"], "neg_scores": [0.5]}, "pos_scores", id="flag_half_scored"),
        pytest.param({"query": "q", "positive_passages": [{"docid": "1", "text": "p", "score": 2.0}],
                      "negative_passages": [{"docid": "2", "text": "n"}]},
                     "negative_passages[0].score", id="tevatron_half_scored"),
        pytest.param({"query": "q", "positive_passages": [{"docid": "1", "text": "p", "title": 7}]},
                     "positive_passages[0].title", id="tevatron_bad_title"),
        pytest.param({"query_id": "1", "positive_passages": [{"docid": "1", "text": "p"}]}, "query", id="no_query"),
        pytest.param({"question": "q", "passage": "p"}, "positive", id="unknown_layout"),
        pytest.param({"anchor": "a", "positive": 3}, "positive", id="triplet_not_a_string"),
    ],
)
def test_malformed_layouts_name_the_raw_field(tmp_path, record, field):
    with pytest.raises(DataError) as info:
        MSMarcoPassage(write(tmp_path, record)).load_examples()
    assert info.value.field == field and info.value.line == 1


def test_queries_without_negatives_are_counted_when_negatives_are_required():
    src = MrTyDi(str(FIX / "mrtydi/train.jsonl"), lang="ja")
    examples, counts = src.load_examples(src.classifier(n_negatives=1))
    assert len(examples) == 1
    assert counts["skipped/too_few_negatives"] == 1


def first(cls, rel, **kwargs):
    src = cls(str(FIX / rel), **kwargs)
    return src, src.load_examples()[0]


@pytest.mark.parametrize(
    ("cls", "rel", "kwargs"),
    [
        pytest.param(NLI, "nli/train.parquet", {}, id="nli"),
        pytest.param(QuoraDuplicates, "quora/train.parquet", {}, id="quora"),
        pytest.param(NLLBSupervised, "nllb/eng_Latn-fra_Latn.jsonl", {}, id="nllb"),
    ],
)
def test_symmetric_sources_prefix_both_sides_with_the_query_prefix(cls, rel, kwargs):
    src, examples = first(cls, rel, **kwargs)
    e = examples[0]
    n = len(e.negatives)
    item = format_item(src, e, n_negatives=n, rng=np.random.default_rng(0))
    assert item["query"] == "query: " + e.query
    assert item["passages"] == ["query: " + p for p in (e.positive, *e.negatives)]
    item = format_item(src, e, n_negatives=n, rng=np.random.default_rng(0), prompt_style="instruct")
    template = f"Instruct: {src.instruction}\nQuery: "
    assert item["query"] == template + e.query
    assert item["passages"] == [template + p for p in (e.positive, *e.negatives)]


def test_asymmetric_sources_use_passage_prefix_and_carry_teacher_scores():
    src, examples = first(MSMarcoPassage, "msmarco_passage/train.jsonl", strict=False)
    e = examples[1]
    item = format_item(src, e, n_negatives=2, rng=np.random.default_rng(0))
    assert item["query"] == "query: " + JUSTICE_Q
    assert all(p.startswith("passage: ") for p in item["passages"])
    assert item["teacher_scores"] == [9.5, 3.25, 1.0]
    item = format_item(src, e, n_negatives=1, rng=np.random.default_rng(0))
    assert item["teacher_scores"][0] == 9.5 and item["teacher_scores"][1] in (3.25, 1.0)
    item = format_item(src, e, n_negatives=1, rng=np.random.default_rng(0), prompt_style="instruct")
    assert item["query"] == (
        "Instruct: Given a web search query, retrieve relevant passages that answer the query\nQuery: " + JUSTICE_Q
    )
    assert not item["passages"][0].startswith(("passage: ", "Instruct:"))


TABLE2 = {"msmarco_passage", "msmarco_document", "nq", "triviaqa", "squad", "nli", "eli5", "nllb", "dureader",
          "fever", "hotpotqa", "quora", "mrtydi", "miracl"}  # fmt: skip


def test_registry_covers_table2_with_documented_classes():
    assert set(STAGE2_SOURCES) == TABLE2
    # every source names its own task (me5.prompts.TASKS), whose instruction is not the generic one
    base_instruction = TASKS[Source.task]
    assert Source.task == "generic"
    for name, cls in STAGE2_SOURCES.items():
        assert cls.source_name == name
        assert cls.__doc__ and "Raw:" in cls.__doc__, name
        assert cls.default_path and cls.task != Source.task and cls.task in TASKS, name
        assert cls().instruction == TASKS[cls.task] != base_instruction, name
    assert {n for n, c in STAGE2_SOURCES.items() if c.symmetric} == {"nli", "quora", "nllb"}


def test_hub_defaults_and_languages_from_config():
    assert (NLI().path, NLI().hub_config) == ("sentence-transformers/nli-for-simcse", "triplet")
    assert NLI(str(FIX / "nli")).hub_config is None  # the default config goes with the default hub id only
    assert (FEVER().path, FEVER().hub_config, HotpotQA().hub_config) == ("BeastyZ/E5-R", "fever", "hotpot_qa")
    assert (MrTyDi().hub_config, MrTyDi().lang) == ("combined", "mul")
    assert MrTyDi(hub_config="japanese").lang == "ja"
    assert MIRACL(hub_config="sw").lang == "sw"
    assert MIRACL(hub_config="sw", lang="en").lang == "en"
    assert DuReader().lang == "zh" and MSMarcoPassage().lang == "en"
    with pytest.raises(ConfigError, match="hub_config"):
        MrTyDi(hub_config="klingon")
