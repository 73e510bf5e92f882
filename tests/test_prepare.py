"""``me5.prepare`` (``me5.data.shards``, ``me5.data.decontaminate``, ``me5.data.consistency`` with its model half
``me5.mining.consistency``; the pipeline of
``me5.prep`` in ``tests/test_prep.py``): shards + stats,
eval-set exact-match removal, the consistency filter, resume after an interruption, bad records counted per
reason (the training loader's reasons) or named by file:line in strict mode."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest

from me5.app.prepare import main
from me5.data.consistency import ConsistencyFilter
from me5.data.decontaminate import LanguageCheck, dominant_script
from me5.data.schema import PairExample
from me5.data.shards import PrepareOptions, format_stats, prepare
from me5.data.source import Source
from me5.errors import DataError
from me5.export import export_encoder
from me5.prompts import PromptPolicy
from tests.helpers import bad_records_file, pairs, saved_model_folder, write_jsonl
from tests.tiny import wordlevel_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return wordlevel_tokenizer()


OPTS = dict(progress=False, shard_rows=40, row_group_rows=16)


def rows_of(folder):
    out = []
    for f in sorted(folder.glob("part-*.parquet")):
        out += pq.read_table(f).to_pylist()
    return out


def multilingual(n):
    return pairs(n, lang="en") + pairs(n, prefix="w", lang="de")


@pytest.mark.parametrize("split_langs", [False, True])
def test_shards_stats_and_manifest_are_written_and_stream(tmp_path, tokenizer, split_langs):
    raw = write_jsonl(tmp_path / "raw.jsonl", multilingual(50))
    stats = prepare({"src": Source(str(raw))}, tmp_path / "out",
                    PrepareOptions(split_langs=split_langs, **OPTS))
    assert stats["src"]["counts"] == {"read": 100, "kept": 100}
    assert stats["src"]["langs"] == {"de": {"kept": 50}, "en": {"kept": 50}}
    out = tmp_path / "out" / "src"
    assert len(list(out.glob("part-*.parquet"))) == 3  # 40 + 40 + 20
    manifest = json.loads((out / "shards.json").read_text())
    for shard in manifest["shards"]:
        meta = pq.ParquetFile(out / shard["file"]).metadata
        assert [rg["rows"] for rg in shard["row_groups"]] == [meta.row_group(i).num_rows for i in range(meta.num_row_groups)]
        assert all(rg["rows"] <= 16 for rg in shard["row_groups"])
        if split_langs:
            assert all(rg["lang"] in ("en", "de") for rg in shard["row_groups"])
    rows = rows_of(out)
    assert set(rows[0]) == {"query", "positive", "negatives", "teacher_scores", "lang", "source", "instruction",
                           "symmetric"}
    assert sorted((r["query"], r["lang"]) for r in rows) == sorted((f"w{i % 200}", lang) for lang in ("en", "de") for i in range(50))
    assert json.loads((tmp_path / "out" / "stats.json").read_text())["src"]["counts"]["kept"] == 100
    table = format_stats(stats)
    assert "src" in table and "de" in table and "kept" in table
    # the training side streams the prepared folder automatically; single-language row groups allow
    # language temperature (each language its own stream)
    from me5.data import PairDataModule
    from tests.helpers import connect

    dm = PairDataModule({"src": Source(str(out))}, lang_temperature_alpha=0.5 if split_langs else None)
    connect(dm, tokenizer, global_batch_size=10)
    dm.setup("fit")
    leaves = sorted(lf.key for lf in dm.leaves["src"])
    assert dm.is_streaming() and leaves == (["src/de", "src/en"] if split_langs else ["src"])
    it = iter(dm.train_dataloader())
    assert [lang for _ in range(10) for lang in next(it)["lang"]].count("de") > 20


def test_eval_sets_exact_match_removal(tmp_path):
    recs = [{"query": "w1 w2", "positive": "w3 w4"}, {"query": "w5", "positive": "w6  w7"},
            {"query": "w8", "positive": "w9"}, {"query": "w10", "positive": "w11"}]
    raw = write_jsonl(tmp_path / "raw.jsonl", recs)
    beir = tmp_path / "beir" / "xx"  # MIRACL-style: per-language subfolders
    beir.mkdir(parents=True)
    write_jsonl(beir / "queries.jsonl", [{"_id": "q1", "text": "w1 w2"}])
    write_jsonl(beir / "corpus.jsonl", [{"_id": "d1", "title": "w6", "text": "w7"}, {"_id": "d2", "title": "", "text": "w11"}])
    stats = prepare({"s": Source(str(raw))}, tmp_path / "out",
                    PrepareOptions(eval_sets=[str(tmp_path / "beir")], **OPTS))
    # query "w1 w2" (a query), positive "w6  w7" (title + text, whitespace-normalised), positive "w11"
    assert stats["s"]["counts"] == {"read": 4, "kept": 1, "skipped/eval_overlap": 3}
    assert [r["query"] for r in rows_of(tmp_path / "out" / "s")] == ["w8"]


def topic_embed(texts, kind):
    """A deterministic fake encoder: the topic of a text is its first word (``tK``), embedded one-hot."""
    out = np.zeros((len(texts), 16), dtype=np.float32)
    for i, t in enumerate(texts):
        out[i, int(t.split()[0][1:]) % 16] = 1.0
    return out


def test_consistency_filter_keeps_top_k_and_drops_the_rest(tmp_path):
    f = ConsistencyFilter(topic_embed, ["t1 a", "t1 b", "t2 c", "t3 d"], top_k=2)
    # rank = 1 + pool passages scoring strictly higher than the positive
    assert f.ranks(["t1 q", "t1 q", "t2 q"], ["t1 p", "t5 p", "t3 p"]).tolist() == [1, 3, 2]
    assert f.keep(["t1 q", "t1 q", "t2 q"], ["t1 p", "t5 p", "t3 p"]).tolist() == [True, False, True]
    consistent = [{"query": f"t{k} question {i}", "positive": f"t{k} answer {i}"} for k in range(4) for i in range(5)]
    noisy = [{"query": f"t{k} question x", "positive": f"t{(k + 1) % 4} unrelated"} for k in range(4)]
    raw = write_jsonl(tmp_path / "raw.jsonl", consistent + noisy)
    stats = prepare({"s": Source(str(raw))}, tmp_path / "out",
                    PrepareOptions(consistency_pool=100, **OPTS), embedder=topic_embed)
    assert stats["s"]["counts"] == {"read": 24, "kept": 20, "skipped/inconsistent": 4}
    assert all("unrelated" not in r["positive"] for r in rows_of(tmp_path / "out" / "s"))
    pool = json.loads((tmp_path / "out" / "s" / "_consistency" / "pool.json").read_text())
    assert len(pool["texts"]) == 24  # the pool is cached for a resumed run


@pytest.mark.parametrize("gz", [False, True], ids=["jsonl", "jsonl.gz"])
def test_resume_after_interruption_gives_the_same_output(tmp_path, gz):
    (tmp_path / "raw").mkdir()
    write_jsonl(tmp_path / "raw" / "a.jsonl", multilingual(60))
    write_jsonl(tmp_path / "raw" / "b.jsonl", pairs(30, lang="fr"))
    if gz:  # resuming inside a gzip stream: the byte offset counts decompressed bytes
        import gzip

        for f in list((tmp_path / "raw").iterdir()):
            f.with_name(f.name + ".gz").write_bytes(gzip.compress(f.read_bytes()))
            f.unlink()
    src = lambda: {"s": Source(str(tmp_path / "raw"))}  # noqa: E731
    full = prepare(src(), tmp_path / "full", PrepareOptions(**OPTS))
    first = prepare(src(), tmp_path / "part", PrepareOptions(max_shards=2, **OPTS))
    assert first.get("_stopped") and len(list((tmp_path / "part" / "s").glob("part-*.parquet"))) == 2
    assert not (tmp_path / "part" / "s" / "shards.json").exists()
    second = prepare(src(), tmp_path / "part", PrepareOptions(**OPTS))
    assert second["s"] == full["s"]
    assert rows_of(tmp_path / "part" / "s") == rows_of(tmp_path / "full" / "s")
    names = lambda d: sorted(p.name for p in d.glob("part-*.parquet"))  # noqa: E731
    assert names(tmp_path / "part" / "s") == names(tmp_path / "full" / "s")
    # a finished run is not redone
    mtimes = {p: p.stat().st_mtime_ns for p in (tmp_path / "part" / "s").glob("part-*.parquet")}
    prepare(src(), tmp_path / "part", PrepareOptions(**OPTS))
    assert mtimes == {p: p.stat().st_mtime_ns for p in (tmp_path / "part" / "s").glob("part-*.parquet")}


def test_bad_records_are_counted_per_reason(tmp_path):
    p = bad_records_file(tmp_path)
    stats = prepare({"s": Source(str(p), long_texts="drop")}, tmp_path / "out",
                    PrepareOptions(max_chars=60, langs=["en", "de"], **OPTS))
    assert stats["s"]["counts"] == {
        "read": 13, "kept": 4, "skipped/malformed_json": 1, "skipped/missing_field": 1, "skipped/empty_text": 1,
        "skipped/bad_type": 1, "skipped/too_long": 1, "skipped/wrong_language": 2, "skipped/bad_teacher_scores": 1,
        "skipped/undecodable": 1,
    }


def test_loader_and_prepare_skip_the_same_records_for_the_same_reasons(tmp_path):
    """One record classifier: a lenient source's loader and prepare count the same skips on the same file."""
    lines = [json.dumps(r) for r in pairs(5, lang="en")]
    lines += [
        '{"query": "w1", "positive": ',  # malformed JSON
        json.dumps({"query": "w1"}),  # missing field
        json.dumps({"query": "w1", "positive": "  "}),  # empty text
        json.dumps({"query": "w1", "positive": "w2", "negatives": ["w3 " * 30]}),  # too long (a negative)
        json.dumps({"query": "w1", "positive": "w2 " * 30}),  # too long (the positive)
    ]
    p = tmp_path / "bad.jsonl"
    p.write_text("\n".join(lines) + "\n", encoding="utf-8")
    examples, counts = Source(str(p), strict=False, max_chars=40, long_texts="drop").load_examples()
    loader = {k: v for k, v in counts.items() if k.startswith("skipped/")}
    assert loader == {"skipped/malformed_json": 1, "skipped/missing_field": 1, "skipped/empty_text": 1,
                      "skipped/too_long": 2}
    stats = prepare({"s": Source(str(p), strict=False, max_chars=40, long_texts="drop")}, tmp_path / "out",
                    PrepareOptions(**OPTS))
    prepared = {k: v for k, v in stats["s"]["counts"].items() if k.startswith("skipped/")}
    assert prepared == loader
    assert stats["s"]["counts"]["read"] == counts["read"] == 10
    assert stats["s"]["counts"]["kept"] == counts["kept"] == len(examples) == 5


def test_consistency_embedder_takes_its_prompts_from_the_policy(tmp_path, monkeypatch):
    """``model_embedder`` prompts by the policy and the source's task; ``source_embedders`` passes the source's.
    ``prepare`` loads no model: a consistency model without its embedders is a config error, before any work."""
    import me5.mining.consistency as consistency
    from me5.errors import ConfigError
    from me5.prompts import PromptPolicy

    calls = []
    monkeypatch.setattr(consistency, "model_embedder", lambda path, **kw: calls.append(kw) or topic_embed)
    raw = write_jsonl(tmp_path / "raw.jsonl", [{"query": f"t{i} q", "positive": f"t{i} p"} for i in range(4)])
    src = Source(str(raw), symmetric=True, instruction="Retrieve parallel sentences.")
    opts, embedder_for = consistency.source_embedders(PrepareOptions(consistency_model="m", prompt_style="instruct",
                                                                     **OPTS))
    prepare({"s": src}, tmp_path / "out", opts, embedder_for=embedder_for)
    assert calls[0]["prompts"] == PromptPolicy("instruct") and calls[0]["symmetric"] is True
    assert calls[0]["instruction"] == "Retrieve parallel sentences."
    pool = json.loads((tmp_path / "out" / "s" / "_consistency" / "pool.json").read_text())
    assert pool["meta"]["prompt_style"] == "instruct"
    with pytest.raises(ConfigError, match="prompt_style"):
        prepare({"s": src}, tmp_path / "o2", PrepareOptions(prompt_style="e6", **OPTS))
    with pytest.raises(ConfigError, match="consistency_model"):
        prepare({"s": src}, tmp_path / "o3", PrepareOptions(consistency_model="m", **OPTS))
    assert not (tmp_path / "o3").exists()


def test_the_consistency_model_prompts_by_its_own_saved_policy(tmp_path, monkeypatch):
    """Without ``prompt_style``, the consistency model embeds with the policy it was saved with (its me5.json)."""
    import me5.mining.consistency as consistency

    model = saved_model_folder(tmp_path / "model", "instruct")
    calls = []
    monkeypatch.setattr(consistency, "model_embedder", lambda path, **kw: calls.append((path, kw)) or topic_embed)
    raw = write_jsonl(tmp_path / "raw.jsonl", [{"query": f"t{i} q", "positive": f"t{i} p"} for i in range(4)])
    src = Source(str(raw), instruction="Retrieve parallel sentences.")
    opts, embedder_for = consistency.source_embedders(PrepareOptions(consistency_model=str(model), **OPTS))
    assert opts.prompt_style == "instruct"
    prepare({"s": src}, tmp_path / "out", opts, embedder_for=embedder_for)
    assert calls[0][0] == str(model) and calls[0][1]["prompts"] == PromptPolicy("instruct")
    pool = json.loads((tmp_path / "out" / "s" / "_consistency" / "pool.json").read_text())
    assert pool["meta"]["prompt_style"] == "instruct"


@pytest.mark.parametrize(("line", "match"), [(5, "malformed JSON"), (6, "field 'positive'"), (13, "UTF-8")])
def test_strict_mode_names_file_and_line(tmp_path, line, match):
    p = bad_records_file(tmp_path)
    lines = p.read_bytes().split(b"\n")
    keep = lines[:4] + [lines[line - 1]]
    p.write_bytes(b"\n".join(keep) + b"\n")
    with pytest.raises(DataError, match=rf"bad\.jsonl:5.*{match}"):
        prepare({"s": Source(str(p))}, tmp_path / "out", PrepareOptions(strict=True, **OPTS))


def test_language_check_by_script():
    assert dominant_script("Привет, мир") == "Cyrillic" and dominant_script("猫が好き") == "Han"
    assert dominant_script("12345 !!") is None
    check = LanguageCheck(["ru", "en"])
    ex = lambda q, p, lang: PairExample(q, p, lang=lang)  # noqa: E731
    assert check.ok(ex("кошка", "a cat", "ru"))  # a translation pair: the positive in another asked-for language
    assert not check.ok(ex("cat", "кошка", "ru"))  # the query is not in Russian's script
    assert not check.ok(ex("cat", "кошка", "de"))  # German was not asked for
    assert not check.ok(ex("кошка", "猫", "ru"))  # the positive's script is none of the asked languages'


def test_cli_single_source_and_config(tmp_path, capsys):
    raw = write_jsonl(tmp_path / "raw.jsonl", multilingual(10))
    rc = main(["--source", "me5.data.sources.columns.ColumnPairs", "--raw", str(raw), "--name", "wiki",
               "--source-arg", "lang=de", "--out", str(tmp_path / "o1"), "--no-progress", "--shard-rows", "8"])
    out = capsys.readouterr().out
    assert rc == 0 and "wiki" in out and (tmp_path / "o1" / "wiki" / "shards.json").is_file()
    cfg = tmp_path / "prep.yaml"
    cfg.write_text(f"shard_rows: 5\nsources:\n  a:\n    _target_: me5.data.source.Source\n    path: {raw}\n"
                   f"  b:\n    _target_: me5.data.source.Source\n    path: {bad_records_file(tmp_path)}\n")
    assert main(["--config", str(cfg), "--out", str(tmp_path / "o2"), "--no-progress", "--only", "a",
                 "--engine", "inline"]) == 0
    assert json.loads((tmp_path / "o2" / "stats.json").read_text())["a"]["counts"]["kept"] == 20
    assert len(list((tmp_path / "o2" / "a").glob("part-*.parquet"))) == 4
    # the pipeline (the default): the German rows repeat the English texts, so they are exact duplicates
    assert main(["--config", str(cfg), "--out", str(tmp_path / "o4"), "--no-progress", "--only", "a",
                 "--buckets", "2"]) == 0
    counts = json.loads((tmp_path / "o4" / "stats.json").read_text())["a"]["counts"]
    assert counts == {"read": 20, "kept": 10, "skipped/duplicate": 10}
    assert sorted(len(pq.read_table(f)) for f in (tmp_path / "o4" / "a").glob("part-*.parquet"))[-1] <= 5
    assert main(["--config", str(cfg), "--out", str(tmp_path / "o5"), "--only", "a", "--max-shards", "1"]) == 2
    assert "--engine inline" in capsys.readouterr().err
    rc = main(["--config", str(cfg), "--out", str(tmp_path / "o3"), "--no-progress", "--strict"])
    err = capsys.readouterr().err
    assert rc == 2 and "bad.jsonl:5" in err and "Traceback" not in err


def test_consistency_filter_with_a_tiny_exported_model(tmp_path, tokenizer):
    """The CLI path: ``--consistency-model`` loads an exported me5 folder (here: a random 1-layer encoder)."""
    from me5.models.encoder import Encoder

    enc = Encoder.from_scratch(tokenizer=tokenizer, num_hidden_layers=1, hidden_size=32, num_attention_heads=2,
                               intermediate_size=64, max_position_embeddings=80)
    export_encoder(enc, tokenizer, tmp_path / "model", prompts=PromptPolicy("e5"), max_seq_length=64)
    raw = write_jsonl(tmp_path / "raw.jsonl", pairs(30))
    rc = main(["--source", "me5.data.source.Source", "--raw", str(raw), "--name", "s", "--out", str(tmp_path / "o"),
               "--consistency-model", str(tmp_path / "model"), "--consistency-pool", "10", "--consistency-top-k", "3",
               "--no-progress"])
    stats = json.loads((tmp_path / "o" / "stats.json").read_text())["s"]["counts"]
    assert rc == 0 and stats["read"] == 30 and stats["kept"] + stats.get("skipped/inconsistent", 0) == 30
    assert len(np.load(tmp_path / "o" / "_prep" / "pool" / "s" / "keys.npy")) == 10
    assert (tmp_path / "o" / "_prep" / "pool" / "s" / "emb" / "manifest.json").is_file()  # the embed core's shards
    # the inline engine: the app builds the model's embedders (me5.data loads no model) and hands them over
    assert main(["--source", "me5.data.source.Source", "--raw", str(raw), "--name", "s", "--out", str(tmp_path / "i"),
                 "--consistency-model", str(tmp_path / "model"), "--consistency-pool", "10", "--consistency-top-k",
                 "3", "--engine", "inline", "--no-progress"]) == 0
    inline = json.loads((tmp_path / "i" / "stats.json").read_text())["s"]["counts"]
    assert inline["read"] == 30 and inline["kept"] + inline.get("skipped/inconsistent", 0) == 30
    assert json.loads((tmp_path / "i" / "s" / "_consistency" / "pool.json").read_text())["meta"]["prompt_style"] == "e5"


def test_a_source_class_reads_its_prepared_shards_in_the_normalised_schema(tmp_path):
    """A raw source class pointed at its prepared (mined, scored) shards reads them as they are: the negatives and
    teacher scores its raw layout would not carry are kept, and so are its task and symmetry (NLI, symmetric)."""
    from me5.data.sources.stage2 import NLI, MSMarcoPassage

    rows = [{"query": f"q{i}", "positive": f"p{i}", "negatives": [f"n{i}", f"m{i}"], "teacher_scores": [3.0, 1.0, 0.5],
             "lang": "en"} for i in range(6)]
    write_jsonl(tmp_path / "scored.jsonl", rows)
    prepare({"nli": Source(str(tmp_path / "scored.jsonl"))}, tmp_path / "out", PrepareOptions(progress=False))
    for cls in (MSMarcoPassage, NLI):
        src = cls(str(tmp_path / "out" / "nli"))
        assert src.reads_prepared() and not cls(str(tmp_path / "scored.jsonl")).reads_prepared()
        kept, counts = src.load_examples(src.classifier(n_negatives=2, require_teacher=True))
        assert counts["kept"] == 6
        assert sorted((e.query, e.negatives, e.teacher_scores) for e in kept) == sorted(
            (r["query"], tuple(r["negatives"]), tuple(r["teacher_scores"])) for r in rows)
    assert NLI(str(tmp_path / "out" / "nli")).symmetric and NLI.task == "nli"
