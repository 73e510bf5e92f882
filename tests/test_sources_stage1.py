"""The stage-1 sources (mE5 Table 1) on tiny fixtures in each source's raw layout.

Each fixture (``tests/fixtures/raw/stage1/<source>/``) holds a few records as the source publishes them,
including filtered ones; ``malformed/`` holds a record that must stop the run with a ``DataError`` naming the
file, the line (row) and the field.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from me5.data.schema import PairExample
from me5.data.sources import (
    STAGE1_SOURCES,
    CCNewsPairs,
    MC4Pairs,
    NLLBPairs,
    RedditPairs,
    S2ORCPairs,
    SbertPairs,
    StackExchangePairs,
    WikipediaPairs,
    XP3Pairs,
)
from me5.errors import ConfigError, DataError
from tests.helpers import RAW_STAGE1 as RAW
from tests.helpers import format_item, stage1_cases
from tests.helpers import make_source as make

# (id, class, constructor kwargs, expected examples, expected counts): every source on its raw fixture
CASES = stage1_cases()


@pytest.mark.parametrize("cls, kwargs, expected, counts", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_fixture_converts_to_expected_examples(cls, kwargs, expected, counts):
    examples, got_counts = make(cls, kwargs).load_examples()
    assert examples == expected
    assert dict(got_counts) == counts


# (class, constructor kwargs, file:line the error must name, field it must name)
MALFORMED = [
    (WikipediaPairs, dict(path=RAW / "wikipedia" / "malformed"), "wikipedia/malformed/train-00000-of-00001.parquet:1", "text"),
    (MC4Pairs, dict(path=RAW / "mc4" / "malformed"), "mc4/malformed/c4-en.tfrecord-00000-of-11264.json:2", "text"),
    (CCNewsPairs, dict(path=RAW / "cc_news" / "malformed" / "2021"), "cc_news/malformed/2021/en.jsonl:2", "maintext"),
    (NLLBPairs, dict(path=RAW / "nllb" / "malformed", hub_config="eng_Latn-fra_Latn"),
     "nllb/malformed/eng_Latn-fra_Latn.jsonl:2", "translation.fra_Latn"),
    (RedditPairs, dict(path=RAW / "reddit" / "malformed"), "reddit/malformed/RC_2019-05.pairs.jsonl:1", "response.body"),
    (S2ORCPairs, dict(path=RAW / "s2orc" / "malformed"), "s2orc/malformed/title-abstract-pair.jsonl:1", "abstract"),
    (StackExchangePairs, dict(path=RAW / "stackexchange" / "malformed"), "stackexchange/malformed/apple.jsonl:2", "title_body"),
    (XP3Pairs, dict(path=RAW / "xp3" / "malformed"), "xp3/malformed/merged_en.jsonl:1", "inputs"),
    (SbertPairs, dict(path=RAW / "sbert" / "malformed"), "sbert/malformed/mixed.jsonl:2", "record"),
]


@pytest.mark.parametrize("cls, kwargs, where, field", MALFORMED, ids=[m[0].source_name for m in MALFORMED])
def test_malformed_record_names_file_line_and_field(cls, kwargs, where, field):
    src = make(cls, kwargs)
    with pytest.raises(DataError) as info:
        src.load_examples()
    err = info.value
    assert f"{err.file}:{err.line}".endswith(where)
    assert err.field == field
    assert where in str(err) and f"field '{field}'" in str(err)


# the skip reason of each fixture's malformed record (the one taxonomy of me5.data.records): a raw field that
# is absent is missing_field, one of the wrong type bad_type, a record of no known shape malformed
MALFORMED_REASON = {"wikipedia": "missing_field", "mc4": "bad_type", "cc_news": "missing_field",
                    "nllb": "missing_field", "reddit": "bad_type", "s2orc": "missing_field",
                    "stackexchange": "missing_field", "xp3": "missing_field", "sbert": "malformed"}


@pytest.mark.parametrize("cls, kwargs, where, field", MALFORMED, ids=[m[0].source_name for m in MALFORMED])
def test_malformed_record_is_counted_when_not_strict(cls, kwargs, where, field):
    reason = f"skipped/{MALFORMED_REASON[cls.source_name]}"
    try:
        _, counts = make(cls, kwargs, strict=False).load_examples()
    except DataError as err:  # every record of the file was malformed: the counts are in the message
        assert "no usable examples" in str(err)
        assert f"'{reason}': 1" in str(err) and "'kept': 0" in str(err), str(err)
    else:
        assert counts[reason] == 1 and counts["kept"] >= 1, dict(counts)
        assert sum(v for k, v in counts.items() if k.startswith("skipped/")) == 1, dict(counts)


def test_registry_matches_the_paper_mixture():
    assert set(STAGE1_SOURCES) == {"wikipedia", "mc4", "cc_news", "nllb", "reddit", "s2orc", "stackexchange", "xp3", "sbert"}
    for name, cls in STAGE1_SOURCES.items():
        assert cls.source_name == name
        assert cls.__doc__ and "Raw origin" in cls.__doc__, f"{cls.__name__} must document its raw origin"


def test_language_comes_from_the_hub_config_unless_given():
    assert WikipediaPairs(hub_config="20231101.de").lang == "de"
    assert WikipediaPairs().hub_config == "20231101.en"
    assert MC4Pairs(hub_config="ru").lang == "ru"
    assert XP3Pairs(hub_config="zh").lang == "zh"
    assert XP3Pairs(hub_config="zh", lang="zh-Hans").lang == "zh-Hans"
    assert StackExchangePairs(hub_config="ja").lang == "ja"
    assert StackExchangePairs(hub_config="apple").lang == "en"
    assert NLLBPairs(hub_config="ace_Latn-ban_Latn").lang == "ace_Latn-ban_Latn"
    # a local path does not inherit the default hub config (nor its language)
    assert MC4Pairs(path=str(RAW / "mc4")).hub_config is None


def test_record_level_language_wins(tmp_path):
    f = tmp_path / "merged.jsonl"
    f.write_text('{"inputs": "Bonjour ?", "targets": "Salut", "language": "fra_Latn"}\n', encoding="utf-8")
    examples, _ = XP3Pairs(path=str(f), lang="und").load_examples()
    assert examples[0].lang == "fra_Latn"


def test_sectioned_wikipedia_records_use_the_heading_path(tmp_path):
    # the assumed intfloat/wikipedia shape: article title + hierarchical section headings + section passage
    f = tmp_path / "sections.jsonl"
    f.write_text(
        '{"title": "Albert Einstein", "section_titles": ["Life", "Early life"], "text": "Einstein was born in Ulm."}\n'
        '{"title": "Paris", "section": "History", "text": "Paris was founded in the 3rd century BC."}\n',
        encoding="utf-8",
    )
    got = [(e.query, e.positive) for e in WikipediaPairs(path=str(f)).load_examples()[0]]
    assert got == [
        ("Albert Einstein > Life > Early life", "Einstein was born in Ulm."),
        ("Paris > History", "Paris was founded in the 3rd century BC."),
    ]


def test_prefix_and_instruction_policies():
    rng = np.random.default_rng(0)
    pair = PairExample("The cat sleeps.", "Le chat dort.", lang="eng_Latn-fra_Latn", source="nllb")
    nllb = NLLBPairs(hub_config="eng_Latn-fra_Latn")
    item = format_item(nllb, pair, n_negatives=0, rng=rng)
    assert item["query"] == "query: The cat sleeps." and item["passages"] == ["query: Le chat dort."]
    item = format_item(nllb, pair, n_negatives=0, rng=rng, prompt_style="instruct")
    assert item["query"] == "Instruct: Retrieve parallel sentences.\nQuery: The cat sleeps."
    assert item["passages"] == ["Instruct: Retrieve parallel sentences.\nQuery: Le chat dort."]
    wiki = WikipediaPairs()
    item = format_item(wiki, PairExample("Albedo", "Albedo is ...", source="wikipedia"), n_negatives=0, rng=rng)
    assert item["query"] == "query: Albedo" and item["passages"] == ["passage: Albedo is ..."]
    assert S2ORCPairs(mode="title-citation").symmetric and not S2ORCPairs().symmetric


@pytest.mark.parametrize(
    "make, field",
    [
        (lambda: WikipediaPairs(passage="first"), "data.passage"),
        (lambda: MC4Pairs(title_from="html"), "data.title_from"),
        (lambda: S2ORCPairs(mode="title-body"), "data.mode"),
        (lambda: NLLBPairs(src_lang="eng_Latn"), "data.src_lang"),
        (lambda: NLLBPairs(hub_config="eng_Latn"), "data.hub_config"),
        (lambda: RedditPairs(), "data.path"),
    ],
)
def test_bad_options_name_the_config_field(make, field):
    with pytest.raises(ConfigError) as info:
        make()
    assert info.value.field == field


def _langs(src) -> Counter:
    examples, _ = src.load_examples()
    return Counter(e.lang for e in examples)


def test_language_comes_from_the_published_file_layout_of_a_multilingual_folder(tmp_path):
    # one source over a folder of per-language files, as the corpora publish them, labels each file's records
    assert _langs(MC4Pairs(path=str(RAW / "mc4"), data_files="c4-*.json", title_from="url")) == {"es": 1, "ru": 1}
    assert _langs(CCNewsPairs(path=str(RAW / "cc_news"), data_files="20*/*.jsonl")) == {"fr": 1, "zh": 1}
    assert _langs(XP3Pairs(path=str(RAW / "xp3"), data_files=["fr/*", "hi/*"])) == {"fr": 1, "hi": 1}
    assert _langs(StackExchangePairs(path=str(RAW / "stackexchange"))) == {"en": 2, "ru": 1}
    assert _langs(WikipediaPairs(path=str(RAW / "wikipedia"), data_files="2023*/*")) == {"en": 2, "ja": 1}
    # an explicit lang wins over the file names; a file outside the published layout gets the default
    assert _langs(MC4Pairs(path=str(RAW / "mc4"), data_files="c4-*.json", title_from="url", lang="xx")) == {"xx": 2}
    other = tmp_path / "pages.jsonl"
    other.write_text((RAW / "mc4" / "c4-ru.tfrecord-00000-of-01024.json").read_text(encoding="utf-8"), encoding="utf-8")
    assert _langs(MC4Pairs(path=str(other))) == {"en": 1}
    # xP3: folder and file name must agree (a three-letter parent folder is not taken for a language)
    stray = tmp_path / "abc" / "merged_fr.jsonl"
    stray.parent.mkdir()
    stray.write_text((RAW / "xp3" / "fr" / "merged_fr.jsonl").read_text(encoding="utf-8"), encoding="utf-8")
    assert _langs(XP3Pairs(path=str(stray))) == {"und": 1}


def test_gzip_files_read_as_published(tmp_path):
    import gzip

    folder = tmp_path / "multilingual"
    folder.mkdir()
    for f in sorted((RAW / "mc4").glob("c4-*.json")):
        (folder / f"{f.name}.gz").write_bytes(gzip.compress(f.read_bytes()))
    plain = MC4Pairs(path=str(RAW / "mc4"), data_files="c4-*.json", title_from="url")
    gz = MC4Pairs(path=str(folder), title_from="url")  # the folder lists the .json.gz files
    got, gz_counts = gz.load_examples()
    want, plain_counts = plain.load_examples()
    assert [(e.query, e.positive, e.lang) for e in got] == [(e.query, e.positive, e.lang) for e in want]
    assert gz_counts == plain_counts
    assert gz.num_pairs() == plain.num_pairs() == 4  # physical lines, counted through the decompression


def test_truncated_gzip_is_an_error_naming_the_file(tmp_path):
    import gzip

    f = tmp_path / "c4-de.tfrecord-00000-of-00001.json.gz"
    lines = "".join(f'{{"text": "Titel {i}\\nInhalt {i}", "url": "https://x.de/a", "timestamp": "t"}}\n' for i in range(2000))
    f.write_bytes(gzip.compress(lines.encode())[:-200])
    with pytest.raises(DataError, match="corrupt or truncated gzip") as info:
        MC4Pairs(path=str(f)).load_examples()
    assert info.value.file == str(f)


def test_file_language_for_language_temperature():
    # what streaming by language may assume of a whole local file (each record is still checked when read)
    f = lambda src, name: src.file_lang(str(RAW / name))  # noqa: E731
    assert f(MC4Pairs(path=str(RAW / "mc4")), "mc4/c4-ru.tfrecord-00000-of-01024.json") == "ru"
    assert f(MC4Pairs(path=str(RAW / "mc4")), "mc4/pages.json") is None  # could be any language
    assert f(MC4Pairs(path=str(RAW / "mc4"), lang="ru"), "mc4/pages.json") == "ru"  # given
    assert f(NLLBPairs(path=str(RAW / "nllb")), "nllb/arb_Arab-eng_Latn.jsonl") == "arb_Arab-eng_Latn"
    assert f(RedditPairs(path=str(RAW / "reddit")), "reddit/RC_2019-05.pairs.jsonl") == "en"  # English-only source
    assert f(StackExchangePairs(path=str(RAW / "stackexchange")), "stackexchange/ru.jsonl") == "ru"
    assert f(StackExchangePairs(path=str(RAW / "stackexchange")), "stackexchange/apple.jsonl") == "en"
    assert f(XP3Pairs(path=str(RAW / "xp3")), "xp3/fr/merged_fr.jsonl") == "fr"
