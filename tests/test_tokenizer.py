"""The download-free XLM-R-style Unigram tokenizer and the checked loader."""

from __future__ import annotations

import json
import unicodedata
from pathlib import Path

import pytest

from me5.data.synthetic import generate_sample_data
from me5.errors import ConfigError, DataError
from me5.models.tokenizer import (
    SCRIPT_SAMPLES,
    check_no_unk,
    ensure_sample_tokenizer,
    load_tokenizer,
    train_unigram_tokenizer,
)

SCRIPT_RANGES = {
    "Latin": ("A", "z"),
    "Cyrillic": ("\u0400", "\u04ff"),
    "CJK": ("\u4e00", "\u9fff"),
    "Kana": ("\u3040", "\u30ff"),
    "Arabic": ("\u0600", "\u06ff"),
    "Devanagari": ("\u0900", "\u097f"),
}


@pytest.fixture(scope="module")
def sample(tmp_path_factory) -> tuple[Path, object]:
    d = tmp_path_factory.mktemp("tok")
    generate_sample_data(d, seed=0, n_pretrain=1500, n_finetune=300, n_eval_queries_per_lang=10)
    return d, ensure_sample_tokenizer(d)  # also runs check_no_unk on the scripts and the eval files


def _eval_texts(d: Path) -> list[str]:
    out = []
    for name, field in (("queries.jsonl", "text"), ("corpus.jsonl", "text")):
        for line in (d / "eval" / name).read_text(encoding="utf-8").splitlines():
            out.append(json.loads(line)[field])
    return out


def test_xlmr_special_tokens(sample):
    _, tok = sample
    assert [tok.convert_tokens_to_ids(t) for t in ("<s>", "<pad>", "</s>", "<unk>", "<mask>")] == [
        0,
        1,
        2,
        3,
        4,
    ]
    assert (tok.bos_token_id, tok.pad_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2, 3)
    assert (tok.cls_token_id, tok.sep_token_id, tok.mask_token_id) == (0, 2, 4)
    single = tok("The dog").input_ids
    assert single[0] == 0 and single[-1] == 2 and 1 not in single
    a = tok("The dog", add_special_tokens=False).input_ids
    b = tok("Hund", add_special_tokens=False).input_ids
    assert tok("The dog", "Hund").input_ids == [0, *a, 2, 2, *b, 2]


def test_model_max_length_is_set_and_truncates(sample):
    _, tok = sample
    assert tok.model_max_length == 512
    long = " ".join(["teacher"] * 2000)
    assert len(tok(long, truncation=True).input_ids) == 512
    assert len(tok(long, truncation=True, max_length=16).input_ids) == 16


def test_prefixes_and_words_are_whole_pieces(sample):
    _, tok = sample
    assert tok.tokenize("query: ") == ["▁query", ":"]
    assert tok.tokenize("passage: ") == ["▁passage", ":"]
    pieces = tok.tokenize("query: Does the teacher want to buy apple in Paris?")
    assert pieces[:4] == ["▁query", ":", "▁Does", "▁the"] and "▁teacher" in pieces and "▁Paris" in pieces
    assert "▁Учитель" in tok.tokenize(SCRIPT_SAMPLES["Cyrillic"])


def test_no_unk_on_every_script(sample):
    d, tok = sample
    for name, text in SCRIPT_SAMPLES.items():
        lo, hi = SCRIPT_RANGES[name]
        assert any(lo <= ch <= hi for ch in text), name
        assert tok.unk_token_id not in tok(text).input_ids, name
    check_no_unk(tok, _eval_texts(d))
    with pytest.raises(DataError, match="<unk>"):
        check_no_unk(tok, ["ok", "\u0e01\u0e02"])  # Thai is not in the sample data


def test_save_reload_identical(sample, tmp_path):
    d, tok = sample
    from transformers import AutoTokenizer

    reloaded = AutoTokenizer.from_pretrained(str(d / "tokenizer"))
    texts = list(SCRIPT_SAMPLES.values()) + _eval_texts(d)[:50]
    assert reloaded(texts).input_ids == tok(texts).input_ids
    assert reloaded.model_max_length == 512 and len(reloaded) == len(tok)
    assert load_tokenizer(d / "tokenizer")(texts).input_ids == tok(texts).input_ids
    assert load_tokenizer(str(d / "tokenizer"), model_max_length=64).model_max_length == 64
    # decoding gives back the (NFKC-normalised) text
    for text in texts:
        ids = tok(text, add_special_tokens=False).input_ids
        assert tok.decode(ids) == unicodedata.normalize("NFKC", text)


def test_ensure_is_idempotent(sample):
    d, tok = sample
    before = (d / "tokenizer" / "tokenizer.json").stat().st_mtime_ns
    again = ensure_sample_tokenizer(d)
    assert (d / "tokenizer" / "tokenizer.json").stat().st_mtime_ns == before
    assert again.get_vocab() == tok.get_vocab()


def test_ensure_needs_the_data(tmp_path):
    with pytest.raises(DataError, match="pretrain.jsonl"):
        ensure_sample_tokenizer(tmp_path)


def test_train_from_texts(tmp_path):
    texts = [
        "query: the red dog",
        "passage: a red dog runs",
        "passage: 红色的狗",
        "passage: красная собака",
    ] * 20
    tok = train_unigram_tokenizer(texts, tmp_path, vocab_size=200, model_max_length=128)
    assert tok.model_max_length == 128 and len(tok) <= 200
    assert (tmp_path / "tokenizer.json").is_file()
    assert tok.unk_token_id not in tok("the red dog 狗 собака").input_ids
    with pytest.raises(DataError, match="empty"):
        train_unigram_tokenizer([], tmp_path / "empty")
    with pytest.raises(ConfigError, match="vocab_size"):
        train_unigram_tokenizer(texts, tmp_path / "small", vocab_size=10)


def test_load_tokenizer_errors_name_the_path(tmp_path):
    missing = tmp_path / "no_tokenizer_here"
    with pytest.raises(ConfigError, match="no_tokenizer_here") as err:
        load_tokenizer(missing)
    assert err.value.field == "model.tokenizer"
    with pytest.raises(ConfigError, match="without tokenizer.json"):
        load_tokenizer(tmp_path)
    with pytest.raises(ConfigError, match="no-such-org/no-such-tokenizer"):  # offline (conftest)
        load_tokenizer("no-such-org/no-such-tokenizer")


def test_ensure_retrains_when_the_data_changes(tmp_path):
    sizes = dict(n_pretrain=300, n_finetune=60, n_eval_queries_per_lang=2)
    generate_sample_data(tmp_path, seed=0, **sizes)
    first = ensure_sample_tokenizer(tmp_path, vocab_size=1500, check=False)
    generate_sample_data(tmp_path, seed=1, **sizes)
    second = ensure_sample_tokenizer(tmp_path, vocab_size=1500, check=False)
    assert first.get_vocab() != second.get_vocab()
    assert ensure_sample_tokenizer(tmp_path, vocab_size=1500, check=False).get_vocab() == second.get_vocab()
