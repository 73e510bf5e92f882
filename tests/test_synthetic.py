"""The generated sample data: determinism, idempotence, schema, scripts, qrels, and the held-out split."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from me5.app.synthetic import main
from me5.data.synthetic import (
    LANGS,
    LEXICON_PATH,
    OUTPUT_FILES,
    find_keys,
    generate_sample_data,
    is_eval_key,
    load_lexicon,
)
from me5.errors import ConfigError

SMALL = dict(n_pretrain=1500, n_finetune=400, n_eval_queries_per_lang=12, n_hard_negatives=3)

SCRIPTS = {
    "Latin": re.compile(r"[A-Za-z]"),
    "Cyrillic": re.compile(r"[\u0400-\u04ff]"),
    "CJK": re.compile(r"[\u4e00-\u9fff]"),
    "Kana": re.compile(r"[\u3040-\u30ff]"),
    "Arabic": re.compile(r"[\u0600-\u06ff]"),
    "Devanagari": re.compile(r"[\u0900-\u097f]"),
}


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _qrels(path: Path) -> tuple[str, list[tuple[str, str, int]]]:
    lines = path.read_text(encoding="utf-8").splitlines()
    rows = [line.split("\t") for line in lines[1:]]
    return lines[0], [(q, d, int(s)) for q, d, s in rows]


def _train_texts(d: Path) -> list[str]:
    out = []
    for rec in _jsonl(d / "pretrain.jsonl") + _jsonl(d / "finetune.jsonl"):
        out += [rec["query"], rec["positive"], *rec.get("negatives", [])]
    return out


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> tuple[Path, dict]:
    d = tmp_path_factory.mktemp("sample")
    return d, generate_sample_data(d, seed=0, **SMALL)


def test_lexicon_is_small_complete_and_multiscript():
    lex = load_lexicon()
    assert 150 <= len(lex.words) <= 250
    assert LEXICON_PATH.stat().st_size < 100_000
    for role in ("subj", "verb", "obj", "adj", "place", "num", "time"):
        assert len(lex.roles[role]) >= 5, role
    for concept, words in lex.words.items():
        assert set(words) == set(LANGS), concept
        assert all(w.strip() == w and w for w in words.values()), concept
    # one surface form per concept within a language (otherwise two concepts could not be told apart)
    for lang in LANGS:
        forms = [words[lang] for words in lex.words.values()]
        assert len(forms) == len(set(forms)), lang


def test_files_and_stats(data):
    d, stats = data
    for name in OUTPUT_FILES:
        assert (d / name).is_file(), name
    assert stats["pretrain"]["examples"] == SMALL["n_pretrain"]
    assert stats["finetune"]["examples"] == SMALL["n_finetune"]
    assert stats["eval"]["queries"] == SMALL["n_eval_queries_per_lang"] * len(LANGS)
    assert set(stats["eval"]["queries_by_lang"]) == set(LANGS)
    assert stats["eval"]["cross_lingual_queries"] > 0
    assert not stats["skipped"]
    manifest = json.loads((d / "manifest.json").read_text(encoding="utf-8"))
    assert manifest["params"]["seed"] == 0 and manifest["stats"]["pretrain"] == stats["pretrain"]


def test_deterministic_and_seed_dependent(data, tmp_path):
    d, _ = data
    again = tmp_path / "again"
    generate_sample_data(again, seed=0, **SMALL)
    for name in OUTPUT_FILES + ("manifest.json",):
        assert (d / name).read_bytes() == (again / name).read_bytes(), name
    other = tmp_path / "other"
    generate_sample_data(other, seed=1, **SMALL)
    assert (d / "pretrain.jsonl").read_bytes() != (other / "pretrain.jsonl").read_bytes()
    assert (d / "eval/queries.jsonl").read_bytes() != (other / "eval/queries.jsonl").read_bytes()


def test_eval_split_does_not_depend_on_training_sizes(data, tmp_path):
    d, _ = data
    generate_sample_data(tmp_path, seed=0, **dict(SMALL, n_pretrain=200, n_finetune=50))
    for name in ("eval/corpus.jsonl", "eval/queries.jsonl", "eval/qrels/test.tsv"):
        assert (d / name).read_bytes() == (tmp_path / name).read_bytes(), name


def test_idempotent_unless_forced_or_changed(tmp_path):
    stats = generate_sample_data(tmp_path, seed=3, **SMALL)
    mtime = (tmp_path / "pretrain.jsonl").stat().st_mtime_ns
    again = generate_sample_data(tmp_path, seed=3, **SMALL)
    assert again["skipped"] and again["pretrain"] == stats["pretrain"]
    assert (tmp_path / "pretrain.jsonl").stat().st_mtime_ns == mtime
    assert not generate_sample_data(tmp_path, seed=3, force=True, **SMALL)["skipped"]
    changed = generate_sample_data(tmp_path, seed=3, **dict(SMALL, n_pretrain=100))
    assert not changed["skipped"] and changed["pretrain"]["examples"] == 100
    (tmp_path / "eval/qrels/test.tsv").unlink()  # a missing file means regenerate
    assert not generate_sample_data(tmp_path, seed=3, **dict(SMALL, n_pretrain=100))["skipped"]


def test_bad_sizes_are_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="n_pretrain"):
        generate_sample_data(tmp_path, n_pretrain=0)
    with pytest.raises(ConfigError, match="n_eval_queries_per_lang"):
        generate_sample_data(tmp_path, n_eval_queries_per_lang=10_000)


def test_pretrain_schema(data):
    d, _ = data
    recs = _jsonl(d / "pretrain.jsonl")
    sources = set()
    for rec in recs:
        assert set(rec) == {"query", "positive", "lang", "source"}
        assert rec["query"].strip() and rec["positive"].strip()
        assert rec["lang"] in LANGS
        sources.add(rec["source"])
    assert sources == {"sample/title-body", "sample/translation", "sample/question"}
    translations = [r for r in recs if r["source"] == "sample/translation"]
    assert all(r["query"] != r["positive"] for r in translations)
    # the two sides of a translation pair state the same fact
    assert all(find_keys(r["query"]) == find_keys(r["positive"]) for r in translations)


def test_finetune_schema_and_teacher(data):
    d, _ = data
    recs = _jsonl(d / "finetune.jsonl")
    pos_scores, neg_scores, pos_best = [], [], 0
    for rec in recs:
        assert set(rec) == {"query", "positive", "negatives", "teacher_scores", "lang", "source"}
        assert rec["query"].strip() and rec["positive"].strip()
        assert len(rec["negatives"]) == SMALL["n_hard_negatives"]
        assert all(isinstance(n, str) and n.strip() and n != rec["positive"] for n in rec["negatives"])
        assert len(rec["teacher_scores"]) == 1 + len(rec["negatives"])
        assert all(isinstance(s, float) for s in rec["teacher_scores"])
        pos_scores.append(rec["teacher_scores"][0])
        neg_scores += rec["teacher_scores"][1:]
        pos_best += rec["teacher_scores"][0] == max(rec["teacher_scores"])
        # hard negatives share two of the three key concepts with the positive
        (pkey,) = find_keys(rec["positive"])
        for neg in rec["negatives"]:
            (nkey,) = find_keys(neg)
            assert sum(a == b for a, b in zip(pkey, nkey, strict=True)) == 2
    assert sum(pos_scores) / len(pos_scores) > sum(neg_scores) / len(neg_scores) + 2
    assert pos_best / len(recs) > 0.9


def test_eval_schema_and_qrels(data):
    d, _ = data
    corpus = _jsonl(d / "eval/corpus.jsonl")
    queries = _jsonl(d / "eval/queries.jsonl")
    header, qrels = _qrels(d / "eval/qrels/test.tsv")
    assert header == "query-id\tcorpus-id\tscore"
    for doc in corpus:
        assert set(doc) == {"_id", "title", "text", "lang"} and doc["title"].strip() and doc["text"].strip()
    for q in queries:
        assert set(q) == {"_id", "text", "lang"} and q["text"].strip()
    cids, qids = {c["_id"] for c in corpus}, {q["_id"] for q in queries}
    assert len(cids) == len(corpus) and len(qids) == len(queries)
    assert all(q in qids and c in cids and s > 0 for q, c, s in qrels)
    assert {q for q, _, _ in qrels} == qids  # every query has a relevant passage
    assert {"en", "es", "ru", "zh", "ar", "hi"} <= {q["lang"] for q in queries}
    # some queries are purely cross-lingual, in several languages; others are answered in their own language
    clang = {c["_id"]: c["lang"] for c in corpus}
    qlang = {q["_id"]: q["lang"] for q in queries}
    rel_langs: dict[str, set] = {}
    for q, c, _ in qrels:
        rel_langs.setdefault(q, set()).add(clang[c])
    cross = {qlang[q] for q, langs in rel_langs.items() if qlang[q] not in langs}
    mono = {qlang[q] for q, langs in rel_langs.items() if qlang[q] in langs}
    assert len(cross) >= 5 and mono == set(LANGS)
    # relevant passages state the query's fact; distractors share only part of it
    key_of = {c["_id"]: find_keys(c["text"]) for c in corpus}
    qkey = {q["_id"]: find_keys(q["text"]) for q in queries}
    assert all(len(k) == 1 for k in list(key_of.values()) + list(qkey.values()))
    rel = {(q, c) for q, c, _ in qrels}
    for q in qids:
        (k,) = qkey[q]
        for c, keys in key_of.items():
            assert (keys == {k}) == ((q, c) in rel)
    near = sum(
        1
        for q in qids
        for keys in key_of.values()
        if sum(a == b for a, b in zip(next(iter(keys)), next(iter(qkey[q])), strict=True)) == 2
    )
    assert near >= 2 * len(qids)  # hard distractors exist


def test_held_out_keys_never_in_training_text(data):
    d, _ = data
    train_texts = _train_texts(d)
    corpus = _jsonl(d / "eval/corpus.jsonl")
    queries = _jsonl(d / "eval/queries.jsonl")
    eval_texts = [c["text"] for c in corpus] + [q["text"] for q in queries]

    train_keys = set().union(*(find_keys(t) for t in train_texts))
    eval_keys = set().union(*(find_keys(t) for t in eval_texts))
    assert train_keys and eval_keys
    assert not train_keys & eval_keys
    assert all(is_eval_key(k, 0) for k in eval_keys)
    assert not any(is_eval_key(k, 0) for k in train_keys)
    # and no eval sentence appears verbatim in a training file
    train_blob = "\n".join(train_texts)
    for t in [q["text"] for q in queries] + [c["text"] for c in corpus]:
        main_sentence = re.split(r"(?<=[.。।?？])\s*", t)
        assert all(s not in train_blob for s in main_sentence if find_keys(s)), t
    # every training passage is parseable, so the check above saw all of them
    for rec in _jsonl(d / "pretrain.jsonl"):
        assert len(find_keys(rec["positive"])) == 1


def test_all_scripts_present(data):
    d, _ = data
    train_blob = "\n".join(_train_texts(d))
    eval_blob = (d / "eval/corpus.jsonl").read_text(encoding="utf-8") + (d / "eval/queries.jsonl").read_text(
        encoding="utf-8"
    )
    for name, rx in SCRIPTS.items():
        assert rx.search(train_blob), f"no {name} text in the training files"
        assert rx.search(eval_blob), f"no {name} text in the eval files"
    raw = (d / "pretrain.jsonl").read_text(encoding="utf-8")
    assert "\\u" not in raw  # written with ensure_ascii=False


def test_cli_prints_stats(tmp_path, capsys):
    rc = main(
        [
            str(tmp_path),
            "--seed",
            "2",
            "--n-pretrain",
            "50",
            "--n-finetune",
            "20",
            "--n-eval-queries-per-lang",
            "2",
        ]
    )
    assert rc == 0
    stats = json.loads(capsys.readouterr().out)
    assert stats["pretrain"]["examples"] == 50 and stats["eval"]["queries"] == 2 * len(LANGS)
    main(
        [
            str(tmp_path),
            "--seed",
            "2",
            "--n-pretrain",
            "50",
            "--n-finetune",
            "20",
            "--n-eval-queries-per-lang",
            "2",
        ]
    )
    assert json.loads(capsys.readouterr().out)["skipped"] is True
