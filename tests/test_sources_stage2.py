"""The stage-2 sources (mE5 Table 2) on small fixtures in each dataset's real raw layout.

Fixtures: ``tests/fixtures/raw/stage2/<source>/`` (Tevatron/mr-tydi/dureader ``*.jsonl.gz`` stored decompressed;
sentence-transformers, SQuAD and E5-R as the parquet they ship as). Each converts to the expected examples,
skips are counted by reason, and malformed input names file:line and the raw field.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from me5.data import Source
from me5.data.sources import STAGE2_SOURCES
from me5.data.sources.stage2 import (
    ELI5,
    FEVER,
    MIRACL,
    NLI,
    DuReader,
    HotpotQA,
    MrTyDi,
    MSMarcoDocument,
    MSMarcoPassage,
    NaturalQuestions,
    NLLBSupervised,
    QuoraDuplicates,
    SQuAD,
    TriviaQA,
)
from me5.errors import ConfigError, DataError
from me5.prompts import TASKS
from tests.helpers import format_item

FIX = Path(__file__).parent / "fixtures" / "raw" / "stage2"

MANHATTAN = "The presence of communication amid scientific minds was equally important to the success of the Manhattan Project as scientific intellect was."
SPUTNIK = "The Launch of Sputnik, 1957. The Soviets responded with yet another launch, and the space race continued."
BOMB = "The Manhattan Project and its atomic bomb helped bring an end to World War II."
JUSTICE_Q = "_________ justice is designed to repair the harm to victim, the community and the offender caused by the offender criminal act."
HOLIDAY_POS = "根据国务院规定，全体公民放假的节日共有11天。"
HOLIDAY_NEG = ["春节是中国最重要的传统节日。", "周末双休日不属于法定节假日。"]
PASSPORT_POS = "办理护照需要携带身份证到出入境管理部门申请。"


def ex(query, positive, negatives=(), scores=None, lang="en"):
    return (query, positive, tuple(negatives), None if scores is None else tuple(scores), lang)


def load(cls, rel, **kwargs):
    src = cls(str(FIX / rel), **kwargs)
    examples, counts = src.load_examples()
    got = [(e.query, e.positive, e.negatives, e.teacher_scores, e.lang) for e in examples]
    return counts, examples, got


CASES = [
    pytest.param(
        MSMarcoPassage, "msmarco_passage/train.jsonl", {"strict": False},
        [
            ex(")what was the immediate impact of the success of the manhattan project?", MANHATTAN, [SPUTNIK, BOMB]),
            ex(
                JUSTICE_Q,
                "Restorative justice is an approach to justice that focuses on repairing the harm caused by crime.",
                [
                    "Distributive justice deals with the fairness of the distribution of benefits or burdens.",
                    "The criminal justice system consists of three main parts: legislative, adjudication and corrections.",
                ],
                scores=[9.5, 3.25, 1.0],
            ),
        ],
        # a positive without its raw "text": missing_field (the one taxonomy of me5.data.records)
        {"read": 4, "kept": 2, "skipped/no_positive": 1, "skipped/missing_field": 1},
        id="msmarco_passage",
    ),
    pytest.param(
        MSMarcoDocument, "msmarco_document/msmarco_document.jsonl", {},
        [
            ex("how long is a cat pregnant", "Cat Pregnancy Cats are pregnant for about 63 to 65 days, roughly nine weeks.",
               ["Dog Pregnancy Dogs are pregnant for about 63 days from conception."]),
            ex("what is the capital of peru", "Lima - Wikipedia Lima is the capital and the largest city of Peru.",
               ["Cusco - Wikipedia Cusco was the capital of the Inca Empire."]),
        ],
        {"read": 2, "kept": 2},
        id="msmarco_document",
    ),
    pytest.param(
        NaturalQuestions, "nq/train.jsonl", {},
        [
            ex("big little lies season 2 how many episodes",
               "Big Little Lies (TV series) The second season of Big Little Lies consists of seven episodes.",
               ["Little Big Man (film) Little Big Man is a 1970 American western film.",
                "Big Little Lies (novel) Big Little Lies is a 2014 novel by Liane Moriarty."]),
        ],
        {"read": 2, "kept": 1, "skipped/empty_negative": 1},
        id="nq",
    ),
    pytest.param(
        TriviaQA, "triviaqa/train.jsonl", {},
        [
            ex("Which Lloyd Webber musical premiered in the US on 10th December 1993?",
               "Sunset Boulevard (musical) Sunset Boulevard is a musical with music by Andrew Lloyd Webber that opened on "
               "Broadway in 1994 after its 1993 US premiere in Los Angeles.",
               ["Cats (musical) Cats is a sung-through musical composed by Andrew Lloyd Webber."]),
        ],
        {"read": 1, "kept": 1},
        id="triviaqa",
    ),
    pytest.param(
        SQuAD, "squad/train.parquet", {},
        [
            ex("What sits on top of the Main Building at Notre Dame?",
               "University of Notre Dame Architecturally, the school has a Catholic character. Atop the Main Building's "
               "gold dome is a golden statue of the Virgin Mary."),
            ex("When did Beyonce start becoming popular?",
               "Beyoncé Beyoncé Giselle Knowles-Carter is an American singer, songwriter, record producer and actress."),
        ],
        {"read": 2, "kept": 2},
        id="squad",
    ),
    pytest.param(
        NLI, "nli", {},  # a folder of parquet shards, as a hub snapshot is
        [
            ex("A person on a horse jumps over a broken down airplane.", "A person is outdoors, on a horse.",
               ["A person is at a diner, ordering an omelette."]),
            ex("Children smiling and waving at camera", "There are children present", ["The kids are frowning"]),
        ],
        {"read": 2, "kept": 2},
        id="nli",
    ),
    pytest.param(
        ELI5, "eli5/train.parquet", {},
        [ex("Why do we get goosebumps?",
            "Tiny muscles at the base of each hair contract, a leftover reflex from furrier ancestors.")],
        {"read": 2, "kept": 1, "skipped/empty_answer": 1},
        id="eli5",
    ),
    pytest.param(
        NLLBSupervised, "nllb/eng_Latn-fra_Latn.jsonl", {"min_laser_score": 1.1},
        [
            ex("The cat sleeps on the sofa.", "Le chat dort sur le canapé.", lang="eng_Latn-fra_Latn"),
            ex("Where is the train station?", "Où est la gare ?", lang="eng_Latn-fra_Latn"),
        ],
        {"read": 3, "kept": 2, "skipped/low_laser_score": 1},
        id="nllb",
    ),
    pytest.param(
        DuReader, "dureader/train.jsonl", {},
        [ex("国家法定节假日共多少天", HOLIDAY_POS, HOLIDAY_NEG, lang="zh"), ex("如何办理护照", PASSPORT_POS, lang="zh")],
        {"read": 2, "kept": 2},
        id="dureader",
    ),
    pytest.param(
        DuReader, "dureader/bge-m3/dureader_len-0-500.jsonl", {},  # FlagEmbedding layout, teacher scores
        [
            ex("国家法定节假日共多少天", HOLIDAY_POS, HOLIDAY_NEG, scores=[0.97, 0.12, 0.34], lang="zh"),
            ex("如何办理护照", PASSPORT_POS, ["身份证补办流程。"], scores=[0.91, 0.05], lang="zh"),
        ],
        {"read": 2, "kept": 2},
        id="dureader_bge",
    ),
    pytest.param(
        FEVER, "fever/train.parquet", {},
        [
            ex("Nikolaj Coster-Waldau worked with the Fox Broadcasting Company.",
               "Nikolaj Coster-Waldau Nikolaj William Coster-Waldau is a Danish actor who starred in the Fox television film Virtuality.",
               ["Fox Broadcasting Company The Fox Broadcasting Company is an American television network.",
                "Game of Thrones Game of Thrones is an American fantasy drama television series."]),
            ex("Roman Atwood is a content creator.",
               "Roman Atwood Roman Bernard Atwood is an American YouTube personality and prankster.",
               ["YouTube YouTube is an American video-sharing website."]),
        ],
        {"read": 2, "kept": 2},
        id="fever",
    ),
    pytest.param(
        HotpotQA, "hotpotqa/train.parquet", {},
        [
            ex("Which magazine was started first Arthur's Magazine or First for Women?",
               "Arthur's Magazine Arthur's Magazine (1844-1846) was an American literary periodical.",
               ["Women's Health Women's Health is a magazine on health published by Hearst."]),
        ],
        {"read": 2, "kept": 1, "skipped/no_positive": 1},
        id="hotpotqa",
    ),
    pytest.param(
        QuoraDuplicates, "quora/train.parquet", {},
        [
            ex("Astrology: I am a Capricorn Sun Cap moon and cap rising...what does that say about me?",
               "I'm a triple Capricorn (Sun, Moon and ascendant in Capricorn) What does this say about me?",
               ["What is the best way to learn astrology?"]),
            ex("How can I be a good geologist?", "What should I do to be a great geologist?",
               ["How can I become a good software engineer?"]),
        ],
        {"read": 2, "kept": 2},
        id="quora",
    ),
    pytest.param(
        MrTyDi, "mrtydi/train.jsonl", {"lang": "ja"},
        [
            ex("日本の首都はどこですか？", "東京都 東京都は日本の首都であり、関東地方に位置する。",
               ["京都市 京都市は794年から1869年まで日本の首都であった。"], lang="ja"),
            ex("富士山の高さは？", "富士山 富士山は標高3776メートルの日本最高峰である。", lang="ja"),
        ],
        {"read": 2, "kept": 2},
        id="mrtydi",
    ),
    pytest.param(
        MIRACL, "miracl/train.jsonl", {"lang": "sw", "strict": False},
        [
            ex("Je, Mlima Kilimanjaro una urefu gani?",
               "Kilimanjaro Kilimanjaro ni mlima mrefu kuliko yote barani Afrika, wenye urefu wa mita 5,895.",
               ["Mlima Kenya Mlima Kenya ni mlima mrefu wa pili barani Afrika."], lang="sw"),
            ex("Mji mkuu wa Tanzania ni upi?", "Dodoma Dodoma ni mji mkuu wa Tanzania.",  # the first positive only
               ["Dar es Salaam Dar es Salaam ni jiji kubwa zaidi nchini Tanzania."], lang="sw"),
        ],
        # a negative that is an int: the layout's "expected a passage object or a string" is a bad_type
        {"read": 3, "kept": 2, "skipped/bad_type": 1},
        id="miracl",
    ),
]


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
