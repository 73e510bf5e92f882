"""The data layer on fixtures: reading, validation errors that name file/line/field, counted skips,
weighted mixing, rank/worker sharding, exact resume, collation."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, pre_tokenizers

from me5.batching import BatchPlan
from me5.data import PairBatchStream, PairCollator, PairDataModule, Source
from me5.data.sources.columns import ColumnPairs
from me5.errors import ConfigError, DataError
from tests.helpers import connect, format_item, one_source, pairs, write_jsonl
from tests.tiny import wordlevel_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return wordlevel_tokenizer()


def connected(dm, tokenizer, **kw):
    connect(dm, tokenizer, **{"global_batch_size": 4, **kw})
    dm.setup("fit")
    return dm


def test_reads_jsonl_and_parquet(tmp_path, tokenizer):
    import pyarrow as pa
    import pyarrow.parquet as pq

    write_jsonl(tmp_path / "a.jsonl", pairs(10))
    pq.write_table(pa.Table.from_pylist(pairs(7, lang="ru")), tmp_path / "b.parquet")
    dm = connected(one_source(tmp_path, name="mix"), tokenizer)
    assert len(dm.examples["mix"]) == 17 and dm.counts["mix"]["read"] == 17
    assert Counter(e.lang for e in dm.examples["mix"]) == {"en": 10, "ru": 7}


def test_missing_file_names_the_path(tmp_path, tokenizer):
    dm = one_source(tmp_path / "nope.jsonl")
    with pytest.raises(DataError, match="nope.jsonl"):
        dm.check()  # the cheap check the app runs before any heavy work
    with pytest.raises(DataError, match="nope.jsonl"):
        connected(dm, tokenizer)


def test_malformed_line_names_file_and_line(tmp_path, tokenizer):
    p = tmp_path / "bad.jsonl"
    p.write_text(json.dumps(pairs(1)[0]) + "\n" + '{"query": "w1", "positive": \n')
    with pytest.raises(DataError, match=r"bad\.jsonl:2.*malformed JSON"):
        connected(one_source(p), tokenizer)


@pytest.mark.parametrize(
    ("record", "field"),
    [
        ({"query": "w1"}, "positive"),
        ({"query": "w1", "positive": "   "}, "positive"),
        ({"query": "", "positive": "w2"}, "query"),
        ({"query": "w1", "positive": "w2", "negatives": ["w3", ""]}, r"negatives\[1\]"),
        ({"query": "w1", "positive": "w2", "negatives": ["w3"], "teacher_scores": [1.0]}, "teacher_scores"),
        ({"query": "w1", "positive": 3}, "positive"),
    ],
)
def test_bad_record_names_file_line_field(tmp_path, tokenizer, record, field):
    p = write_jsonl(tmp_path / "r.jsonl", [*pairs(2), record])
    with pytest.raises(DataError, match=rf"r\.jsonl:3, field '{field}'"):
        connected(one_source(p), tokenizer)


def test_lenient_mode_counts_malformed_and_skips_are_counted(tmp_path, tokenizer):
    recs = pairs(6, negs=2) + [{"query": "w1"}, {"query": "w1", "positive": "w2 " * 100, "negatives": ["w3", "w4"]}] + pairs(3, negs=1)
    p = write_jsonl(tmp_path / "r.jsonl", recs)
    dm = connected(one_source(Source(str(p), strict=False, max_chars=50, long_texts="drop")), tokenizer, n_negatives=2)
    # the one skip taxonomy of me5.data.records (prepare counts the same reasons)
    assert dm.counts["pairs"] == Counter({"read": 11, "kept": 6, "skipped/missing_field": 1, "skipped/too_long": 1,
                                          "skipped/too_few_negatives": 3})
    assert dm.data_counts()["pairs/skipped/too_long"] == 1


def test_max_chars_truncates_long_texts_and_counts_them(tmp_path, tokenizer):
    """No data lost: a text over ``max_chars`` is cut at a word boundary and its record kept (counted
    ``truncated/too_long``); ``long_texts="drop"`` skips the record instead."""
    from me5.data.records import truncate_text

    long = " ".join(f"w{i % 200}" for i in range(40))  # 159 characters
    recs = pairs(4, negs=2) + [{"query": long, "positive": "w1 w2", "negatives": ["w3", long], "teacher_scores": [1, 0, 0]},
                               {"query": "w5", "positive": "x" * 80}]  # no space to cut at: cut at 50
    p = write_jsonl(tmp_path / "r.jsonl", recs)
    dm = connected(one_source(Source(str(p), max_chars=50)), tokenizer)
    assert dm.counts["pairs"] == Counter({"read": 6, "kept": 6, "truncated/too_long": 2})
    assert dm.data_counts()["pairs/truncated/too_long"] == 2
    ex = {e.query: e for e in dm.examples["pairs"]}
    cut = long[: long.rindex(" ", 0, 51)]
    assert ex[cut].negatives == ("w3", cut) and len(cut) <= 50 and long.startswith(cut + " ")
    assert ex[cut].teacher_scores == (1.0, 0.0, 0.0) and ex["w5"].positive == "x" * 50
    assert [e for e in dm.examples["pairs"] if e.query.startswith("w0")][0].positive == "w1 w2"  # short: as it was
    assert truncate_text("ab cd", 5) == "ab cd" and truncate_text("ab cd ef", 5) == "ab cd"  # ends at a word: kept
    assert truncate_text("ab cdef", 5) == "ab"  # no half word at the end
    assert truncate_text("abcdef gh", 8) == "abcdef" and truncate_text("a bcdefgh", 4) == "a bc"  # word, else hard cut
    drop = connected(one_source(Source(str(p), max_chars=50, long_texts="drop")), tokenizer)
    assert drop.counts["pairs"] == Counter({"read": 6, "kept": 4, "skipped/too_long": 2})
    with pytest.raises(ConfigError, match=r"long_texts"):
        Source(str(p), max_chars=50, long_texts="cut")


def test_every_paper_stage1_source_truncates_at_4096(tmp_path):
    """data=paper: the ten stage-1 sources cut texts at 4096 characters and drop none for length (Reddit keeps E5's
    own comment filter, its class's)."""
    from hydra.utils import instantiate

    from me5.data.sources.reddit import RedditPairs
    from tests.helpers import compose_cfg

    cfg = compose_cfg(["data=paper"], tmp_path=tmp_path)
    sources = instantiate(cfg.data.pretrain).sources()
    assert len(sources) == 10
    for name, src in sources.items():
        assert (src.max_chars, src.long_texts) == (4096, "truncate"), name
        assert src.classifier().long_texts == "truncate"
    assert RedditPairs.max_comment_chars == 4096


def test_a_source_sets_its_own_number_of_negatives(tmp_path, tokenizer):
    """E5's NLI recipe: the contradiction as the one hard negative (``n_negatives: 1`` on that source) beside
    sources with the stage's 2. A batch holds one group size: mixed batches are refused, homogeneous ones (one source
    per global batch) have each source's group size; records with fewer than their source's count are counted."""
    nli = write_jsonl(tmp_path / "nli.jsonl", pairs(8, prefix="w", negs=1))
    web = write_jsonl(tmp_path / "web.jsonl", pairs(8, prefix="w", negs=2) + pairs(2, negs=1))
    sources = lambda: {"nli": Source(str(nli), n_negatives=1), "web": Source(str(web))}  # noqa: E731
    with pytest.raises(ConfigError, match=r"data\.homogeneous.*1: nli; 2: web"):
        connected(PairDataModule(sources(), homogeneous=False), tokenizer, n_negatives=2, require_teacher=True)
    dm = connected(PairDataModule(sources(), homogeneous=True, seed=3), tokenizer, n_negatives=2, require_teacher=True)
    assert dm.negatives_per_source(2) == {"nli": 1, "web": 2}
    assert dm.counts["nli"]["kept"] == 8 and dm.counts["web"] == Counter({"read": 10, "kept": 8,
                                                                         "skipped/too_few_negatives": 2})
    groups = {}
    for _, batch in zip(range(12), dm.train_dataloader(), strict=False):
        (src,) = set(batch["source"])
        groups.setdefault(src, set()).add(int(batch["group_size"]))
        assert batch["teacher_scores"].shape == (4, int(batch["group_size"]))
    assert groups == {"nli": {2}, "web": {3}}
    with pytest.raises(ConfigError, match=r"n_negatives"):
        Source(str(nli), n_negatives=-1)


def test_no_usable_examples_is_an_error(tmp_path, tokenizer):
    p = write_jsonl(tmp_path / "r.jsonl", pairs(3))
    with pytest.raises(DataError, match="no usable examples"):
        connected(one_source(p), tokenizer, n_negatives=1)


def test_column_source_maps_raw_columns(tmp_path, tokenizer):
    p = write_jsonl(tmp_path / "wiki.jsonl", [{"section": "w1", "text": "w2 w3"}, {"section": "w4", "text": "w5"}])
    dm = connected(one_source(ColumnPairs(str(p), name="wikipedia", columns={"query": "section", "positive": "text"},
                                          lang="de")), tokenizer, global_batch_size=2)
    ex = dm.examples["wikipedia"][0]
    assert ex.query == "w1" and ex.lang == "de" and ex.source == "wikipedia"
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"title": "w1", "text": "w2"}])
    with pytest.raises(DataError, match="field 'query'.*section"):
        connected(one_source(ColumnPairs(str(bad), columns={"query": "section", "positive": "text"})), tokenizer)


def test_collator_shapes_prefixes_truncation(tmp_path, tokenizer):
    p = write_jsonl(tmp_path / "r.jsonl", pairs(8, negs=3))
    dm = connected(one_source(p), tokenizer, n_negatives=2, require_teacher=True, passage_max_length=4)
    batch = next(iter(dm.train_dataloader()))
    assert batch["query_input_ids"].shape[0] == 4 and batch["passage_input_ids"].shape[0] == 12
    assert batch["group_size"] == 3 and batch["teacher_scores"].shape == (4, 3)
    assert torch.all(batch["teacher_scores"][:, 0] == 5.0)  # the positive's score stays first
    assert batch["passage_input_ids"].shape[1] == 4 and batch["n_truncated_passages"] > 0
    assert torch.all(batch["passage_input_ids"][:, 3][batch["passage_attention_mask"][:, 3] == 1] == 2)  # </s> kept
    ids = batch["query_input_ids"][0][batch["query_attention_mask"][0] == 1].tolist()
    assert tokenizer.convert_ids_to_tokens(ids)[1] == "query:"


def test_symmetric_and_instruct_prefixes(tmp_path):
    p = write_jsonl(tmp_path / "r.jsonl", pairs(2))
    src = Source(str(p), symmetric=True, task="bitext")
    ex = src.load_examples()[0][0]
    item = format_item(src, ex)
    assert item["query"].startswith("query: ") and item["passages"][0].startswith("query: ")
    item = format_item(src, ex, prompt_style="instruct")
    assert item["query"] == "Instruct: Retrieve parallel sentences.\nQuery: w0"
    assert item["passages"][0].startswith("Instruct: ")  # symmetric: instruction on both sides
    asym = Source(str(p), instruction="Find it")
    assert format_item(asym, ex, prompt_style="instruct")["passages"][0] == "w1 w2"  # no prefix on documents
    assert format_item(asym, ex, prompt_style="instruct")["query"] == "Instruct: Find it\nQuery: w0"
    assert format_item(asym, ex)["passages"][0] == "passage: w1 w2"
    assert format_item(asym, ex, prompt_style="none") == {**item, "query": "w0", "passages": ["w1 w2"],
                                                          "query_prompt": "", "passage_prompt": ""}


def _mixture(tmp_path, weights, n=(300, 100), homogeneous=False):
    srcs = {}
    for name, count in zip(weights, n):
        p = write_jsonl(tmp_path / f"{name}.jsonl", pairs(count, lang=name))
        srcs[name] = Source(str(p))
    return PairDataModule(srcs, weights=weights, homogeneous=homogeneous, seed=3)


def test_mixture_matches_weights(tmp_path, tokenizer):
    dm = connected(_mixture(tmp_path, {"a": 3.0, "b": 1.0}), tokenizer, global_batch_size=64)
    it = iter(dm.train_dataloader())
    langs = Counter(lang for _ in range(50) for lang in next(it)["lang"])
    share = langs["a"] / (langs["a"] + langs["b"])
    # 3200 draws, p=0.75: sd = 0.0077; 4 sd tolerance
    assert abs(share - 0.75) < 0.031


def test_mixture_weight_errors(tmp_path):
    with pytest.raises(ConfigError, match=r"data\.weights\.c"):
        PairDataModule({"a": Source("x.jsonl")}, weights={"a": 1.0, "c": 2.0})
    with pytest.raises(ConfigError, match=r"data\.weights\.b"):
        PairDataModule({"a": Source("x.jsonl"), "b": Source("y.jsonl")}, weights={"a": 1.0})
    with pytest.raises(ConfigError, match=r"data\.sources\.a"):
        PairDataModule({"a": "x.jsonl"})


def test_homogeneous_global_batches_across_two_ranks(tmp_path, tokenizer):
    dm = connected(_mixture(tmp_path, {"a": 1.0, "b": 1.0}, homogeneous=True), tokenizer, global_batch_size=8)
    coll = PairCollator(tokenizer)
    plan = BatchPlan.build(global_batch_size=8, world_size=2)
    streams = [PairBatchStream(dm.examples, dm.weights(), collator=coll, formatters=dm._connected.formatters,
                               batch_plan=plan, rank=r, seed=3, homogeneous=True) for r in range(2)]
    its = [iter(s) for s in streams]
    seen = set()
    for _ in range(20):
        b0, b1 = next(its[0]), next(its[1])
        langs = set(b0["lang"]) | set(b1["lang"])
        assert len(langs) == 1
        seen |= langs
    assert seen == {"a", "b"}


def test_ranks_and_workers_read_disjoint_data_covering_everything(tmp_path, tokenizer):
    p = write_jsonl(tmp_path / "r.jsonl", [{"query": f"w{i}", "positive": f"w{i}"} for i in range(64)])
    dm = connected(one_source(p), tokenizer, global_batch_size=16, world_size=2)
    coll = PairCollator(tokenizer)
    got = []
    for rank in range(2):
        stream = dm.build_stream(coll, rank=rank)
        loader = torch.utils.data.DataLoader(stream, batch_size=None, num_workers=2)
        it = iter(loader)
        for _ in range(4):  # 4 global batches x 16 = one pass over the 64 examples
            b = next(it)
            got += [tokenizer.decode(r[m == 1][2:-1]) for r, m in zip(b["query_input_ids"], b["query_attention_mask"])]
    assert sorted(got) == sorted(f"w{i}" for i in range(64))


def test_resume_gives_the_uninterrupted_batch_sequence(tmp_path, tokenizer):
    dm = connected(_mixture(tmp_path, {"a": 2.0, "b": 1.0}), tokenizer, global_batch_size=8, n_negatives=0)
    full = [b for _, b in zip(range(12), dm.train_dataloader())]
    dm.load_state_dict({"consumed_batches": 7, "seed": 3})
    resumed = [b for _, b in zip(range(5), dm.train_dataloader())]
    for a, b in zip(full[7:], resumed):
        assert a["batch_index"] == b["batch_index"]
        assert torch.equal(a["query_input_ids"], b["query_input_ids"])
        assert torch.equal(a["passage_input_ids"], b["passage_input_ids"])


# ---------------------------------------------------------------------------------------------- fast collator
def reference_encode(tokenizer, texts, max_length, m=8):
    """The collator's previous implementation (tokenise in full, truncate and pad in Python): the reference."""
    ids = tokenizer(list(texts), add_special_tokens=True, truncation=False)["input_ids"]
    n_truncated = 0
    eos = tokenizer.sep_token_id if tokenizer.sep_token_id is not None else tokenizer.eos_token_id
    out = []
    for row in ids:
        if len(row) > max_length:
            n_truncated += 1
            row = row[: max_length - 1] + [eos] if eos is not None and row[-1] == eos else row[:max_length]
        out.append(row)
    width = max(len(r) for r in out)
    width = min(max_length, -(-width // m) * m) if m else width
    input_ids = torch.full((len(out), width), tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(out), width), dtype=torch.long)
    for i, row in enumerate(out):
        input_ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
        mask[i, : len(row)] = 1
    return input_ids, mask, n_truncated


@pytest.fixture(scope="module")
def unigram(tmp_path_factory):
    """A small XLM-R-style Unigram tokenizer (Metaspace, NFKC, CJK split), trained here."""
    from me5.models.tokenizer import train_unigram_tokenizer

    rng = np.random.default_rng(0)
    words = ["cat", "dog", "house", "кошка", "собака", "猫", "犬", "قطة", "बिल्ली", "perro", "Haus", "ねこ", "query:", "passage:"]
    texts = [" ".join(rng.choice(words, size=rng.integers(3, 30)).tolist()) for _ in range(400)]
    return train_unigram_tokenizer(texts, tmp_path_factory.mktemp("tok"), vocab_size=200)


def _texts(n, seed=0):
    rng = np.random.default_rng(seed)
    words = ["cat", "dogs", "houses", "кошка", "собаки", "猫", "犬犬", "قطة", "बिल्ली", "perros", "Häuser", "ねこ", "x"]
    return [("query: " if i % 2 else "passage: ") + " ".join(rng.choice(words, size=rng.integers(0, 60)).tolist())
            for i in range(n)]


@pytest.mark.parametrize("which", ["wordlevel", "unigram"])
@pytest.mark.parametrize("max_length", [2, 3, 4, 13, 32, 128])
def test_fast_collator_equals_the_reference_and_counts_truncation_exactly(tokenizer, unigram, which, max_length):
    tok = tokenizer if which == "wordlevel" else unigram
    texts = _texts(300) if which == "unigram" else [" ".join(f"w{j}" for j in range(i % 40)) for i in range(300)]
    # word_cache 0: the pre-cut path (chars_per_token 1: the cut often falls short and the text is redone in full);
    # 7: the word cache, full after a few words (the rest are encoded per batch); 10**6: the word cache
    for chars_per_token, word_cache in ((1, 0), (8, 0), (8, 7), (8, 10**6)):
        coll = PairCollator(tok, query_max_length=max_length, passage_max_length=max_length,
                            chars_per_token=chars_per_token, word_cache=word_cache)
        assert coll.pre_truncate  # both pre-tokenizers split on whitespace
        assert (coll.word_cache_stats() is not None) == (word_cache > 0)
        coll._verified.add(max_length)  # no fallback to the Rust path: the cache's own output is compared below
        for i in range(0, 300, 50):
            ids, mask, n = coll._encode(texts[i: i + 50], max_length)
            r_ids, r_mask, r_n = reference_encode(tok, texts[i: i + 50], max_length)
            assert torch.equal(ids, r_ids) and torch.equal(mask, r_mask) and n == r_n
        if word_cache and max_length > 2:  # 2: no room beside <s> </s>, the Rust path encodes
            stats = coll.word_cache_stats()
            assert stats["entries"] == min(word_cache, stats["misses"]) and stats["hit_rate"] > 0.5
    full = [len(x) for x in tok(texts, add_special_tokens=True)["input_ids"]]
    _, _, n = PairCollator(tok)._encode(texts, max_length)
    assert n == sum(length > max_length for length in full)  # exact count


def test_word_cache_is_off_where_chunks_do_not_encode_independently(unigram):

    from me5.data.collate import _WordCache

    backend = unigram.backend_tokenizer
    cache, why = _WordCache.create(backend.to_str(), 100)
    assert cache is not None and why == ""
    first_only = Tokenizer.from_str(backend.to_str())  # "▁" only before the first word: chunks are not independent
    first_only.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    cache, why = _WordCache.create(first_only.to_str(), 100)
    assert cache is None and "differs from the full encoding" in why
    first_only.pre_tokenizer = None  # no word splitting at all
    assert _WordCache.create(first_only.to_str(), 100) == (None, "the pre-tokenizer does not split on whitespace")


def test_word_cache_first_batch_check_falls_back_to_the_tokenizer(unigram, caplog):
    texts = _texts(40)
    coll = PairCollator(unigram, query_max_length=32, passage_max_length=32)
    coll._word_cache.table["cat"] = [4, 4, 4]  # a wrong entry, as a broken chunk property would give
    with caplog.at_level("WARNING", logger="me5.data.collate"):
        ids, mask, n = coll._encode(texts, 32)
    r_ids, r_mask, r_n = reference_encode(unigram, texts, 32)
    assert torch.equal(ids, r_ids) and n == r_n
    assert coll.word_cache_stats() is None and "word cache off" in caplog.text


def test_collator_without_pre_cut_and_slow_path_agree(tokenizer):
    texts = [" ".join(f"w{j}" for j in range(i % 30)) for i in range(64)]
    fast = PairCollator(tokenizer, pre_truncate=False)
    slow = PairCollator(tokenizer)
    slow._backends = {}  # what a tokenizer without a Rust backend gets
    for a, b in zip(fast._encode(texts, 16), slow._encode(texts, 16)):
        assert torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b


@pytest.mark.parametrize("bad", [-1, 1.5, True, "big"])
def test_word_cache_setting_is_checked(tmp_path, bad):
    with pytest.raises(ConfigError, match="data.word_cache"):
        one_source(tmp_path / "pairs.jsonl", word_cache=bad)
