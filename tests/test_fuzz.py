"""Fuzzed readers (issue 11, item 5): property-based tests over every reader and every source's ``convert``.

For every registered source (the 9 stage-1 and 14 stage-2 classes, each in its raw layout(s)), the plain schema
reader (:class:`~me5.data.source.Source`) and :class:`~me5.data.sources.columns.ColumnPairs`, hypothesis generates
valid records in the source's real field names, corrupts some of them and writes them in a real file format
(``jsonl``, ``jsonl.gz``, ``parquet``; the hub reader through ``datasets`` too) to a temporary folder.

Corruptions: a record's field (at any depth) dropped, nulled, of a wrong type, empty or whitespace, odd or huge
unicode, a lone surrogate, wrapped in or unwrapped from a list/object, NaN/inf, a huge integer, nested 20,000 deep,
a list grown or shrunk (teacher scores no longer matching their texts), an extra key; a jsonl line truncated, with
non-UTF-8 bytes or a NUL, not an object, Latin-1 encoded, with a stray BOM or trailing garbage, CRLF-terminated;
a whole file truncated or with flipped bytes.

The records are read through the public paths: ``Source.load_examples`` with the source's ``RecordClassifier``
(strict and lenient, with and without the stage's needs) and the streaming ``LeafReader`` over
``Source.stream_leaves``. The property:

* every record written ends as a kept example or as a skip counted by a reason of the taxonomy (the reasons of
  ``me5.data.records`` and the source's own ``SkipRecord`` reasons): ``read == written``, ``kept + skipped ==
  read``; every record generated valid is kept, once; every kept example honours the schema;
* or the call raises :class:`~me5.errors.DataError` naming the file and the line of a corrupted record (and the
  field, where a field was corrupted), or naming the file of a corrupted file; never another exception;
* the streaming reader reads and classifies the same records the same way.

Sizes: ``ME5_FUZZ_EXAMPLES`` cases per (source, format) (default 8; the ``slow`` test runs 25 times more). The
cases run per reader and per source are printed in the terminal summary ("fuzz cases").
"""

from __future__ import annotations

import ast
import copy
import gzip
import json
import math
import os
import string
import struct
import tempfile
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from me5.data.schema import PairExample
from me5.data.source import Source
from me5.data.sources import STAGE1_SOURCES, STAGE2_SOURCES
from me5.data.sources.columns import ColumnPairs
from me5.data.sources.instructions import SyntheticInstructions
from me5.data.sources.s2orc import MODES as S2ORC_MODES
from me5.data.stream import LeafReader
from me5.errors import DataError
from me5.prompts import TASKS

FUZZ_EXAMPLES = int(os.environ.get("ME5_FUZZ_EXAMPLES", "8"))
FUZZ = dict(deadline=None, derandomize=True, database=None, print_blob=True,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much])

# the skip reasons of me5.data.records: malformed input, what the stage needs, length
MALFORMED_REASONS = {"undecodable", "malformed_json", "missing_field", "empty_text", "bad_type", "bad_teacher_scores",
                     "malformed"}
STAGE_REASONS = {"too_few_negatives", "no_teacher_scores", "too_long"}
LAYOUT_REASONS = {"no_positive", "empty_query", "empty_positive", "empty_negative", "empty_anchor"}  # layouts.py
NLLB_REASONS = {"empty_translation", "low_laser_score", "identical"}

# ------------------------------------------------------------------------------------------------ texts
# strategies are built once (building one per draw costs more than running the case)
WORD = st.text(string.ascii_letters, min_size=1, max_size=8)
# anything but line breaks (mc4 and Wikipedia split on them), C0/C1 controls and lone surrogates
ODD = st.text(st.characters(blacklist_categories=("Cs", "Cc", "Zl", "Zp")), max_size=6)
TEXT = st.builds(lambda a, w, b: f"{a}{w}{b}", ODD, WORD, ODD)  # a valid text: never empty after strip
TEXTS = {(lo, hi): st.lists(TEXT, min_size=lo, max_size=hi) for lo in range(3) for hi in range(1, 4) if lo <= hi}
SCORE = st.floats(-20, 20, allow_nan=False)
BOOL, DIGITS = st.booleans(), st.text(string.digits, min_size=1, max_size=4)
TITLE = st.one_of(st.none(), st.sampled_from(["", "-"]), TEXT)  # Tevatron: none, "no title" or a title


def text(draw, marker: str = "") -> str:
    """A valid text (odd unicode around a word) ending in ``marker``."""
    return draw(TEXT) + marker


def texts(draw, lo=0, hi=3) -> list[str]:
    return draw(TEXTS[lo, hi])


def maybe(draw, d: dict, key: str, value) -> dict:
    """``d`` with ``key`` or without it (an optional field), drawn."""
    if draw(BOOL):
        d[key] = value
    return d


def passage(draw) -> dict:
    p = {"docid": draw(DIGITS), "text": text(draw)}
    title = draw(TITLE)
    return p if title is None else {**p, "title": title}


# ------------------------------------------------------------------------------------------------ layouts
# each layout: (draw, marker, options) -> one valid raw record; the marker ends up in the query or the positive
def wikipedia(draw, m, opts):
    if draw(BOOL):  # wikimedia/wikipedia article
        lead = draw(st.sampled_from(["", "\n", "\n\n"]))
        return {"id": "12", "url": "https://de.wikipedia.org/wiki/X", "title": text(draw, m),
                "text": lead + "\n".join(texts(draw, 1, 3))}
    key = draw(st.sampled_from(["section_titles", "section_title", "section", "sections", "headings"]))
    heads = text(draw) if draw(BOOL) else texts(draw, 0, 3)
    return {"title": text(draw, m), key: heads, "text": text(draw)}


def mc4(draw, m, opts):  # valid both with title_from="first_line" and with title_from="url"
    slug = "-".join(draw(st.lists(WORD, min_size=1, max_size=3)))
    ext = draw(st.sampled_from(["", ".html", ".php", "/"]))
    return {"text": text(draw, m) + "\n" + "\n".join(texts(draw, 1, 3)), "timestamp": "2020-01-01T00:00:00Z",
            "url": f"https://www.example.de/{draw(WORD)}/{slug}{ext}"}


def cc_news(draw, m, opts):
    return {"title": text(draw, m), "maintext": text(draw), "url": "https://news.example/a",
            "date_publish": "2019-05-01 10:00:00"}


NLLB_PAIRS = [("eng_Latn", "fra_Latn"), ("arb_Arab", "eng_Latn"), ("deu_Latn", "spa_Latn")]


def nllb(draw, m, opts):
    src, tgt = (opts["src_lang"], opts["tgt_lang"]) if "src_lang" in opts else draw(st.sampled_from(NLLB_PAIRS))
    return {"translation": {src: text(draw, m), tgt: text(draw)}, "laser_score": draw(st.floats(1.2, 2.0)),
            "source_sentence_lid": 0.99, "target_sentence_lid": 0.98, "source_sentence_source": "cc",
            "target_sentence_source": "cc"}


def reddit(draw, m, opts):
    def side(marker):
        body = text(draw, marker)
        if draw(BOOL):  # a flat export
            return body
        return maybe(draw, {"body": body, "id": draw(WORD)}, "score", draw(st.integers(1, 999)))
    return {"comment": side(m), "response": side("")}


def s2orc(draw, m, opts):
    _, q, p, _, _ = S2ORC_MODES[opts.get("mode", "title-abstract")]
    value = text(draw) if draw(BOOL) else [" "] * draw(st.integers(0, 2)) + [text(draw)] + texts(draw, 0, 2)
    return {q: text(draw, m), p: value}


def stackexchange(draw, m, opts):
    rec = {draw(st.sampled_from(["title_body", "title"])): text(draw, m), "upvoted_answer": text(draw)}
    return maybe(draw, rec, "downvoted_answer", "" if draw(BOOL) else text(draw))


def xp3(draw, m, opts):
    return maybe(draw, {"inputs": text(draw, m), "targets": text(draw)}, "language",
                 draw(st.sampled_from(["fra_Latn", "hin_Deva"])))


def sbert_dicts(draw, m, opts):
    shape = draw(st.sampled_from(["set", "query", "anchor"]))
    if shape == "set":
        return {"set": [text(draw, m), *texts(draw, 1, 3)]}
    if shape == "query":
        return maybe(draw, {"query": text(draw, m), "pos": texts(draw, 1, 2)}, "neg", texts(draw, 0, 2))
    return maybe(draw, {"anchor": text(draw, m), "positive": text(draw)}, "negative", text(draw))


def sbert_arrays(draw, m, opts):  # pair and triplet lines are JSON arrays (jsonl only: a parquet row is an object)
    return [text(draw, m), *texts(draw, 1, 2)]


def tevatron(draw, m, opts):
    pos = [passage(draw) for _ in range(draw(st.integers(1, 2)))]
    neg = [passage(draw) for _ in range(draw(st.integers(0, 3)))]
    if draw(BOOL):  # Tevatron's distillation files: a teacher score on every passage
        for p in pos + neg:
            p["score"] = draw(SCORE)
    rec = {"query_id": draw(DIGITS), "query": text(draw, m), "positive_passages": pos}
    return maybe(draw, rec, "negative_passages", neg) if not neg else {**rec, "negative_passages": neg}


def flag_embedding(draw, m, opts):
    pos, neg = texts(draw, 1, 2), texts(draw, 0, 3)
    rec = {"query": text(draw, m), "pos": pos, "neg": neg}
    if draw(BOOL):
        rec["pos_scores"], rec["neg_scores"] = [draw(SCORE) for _ in pos], [draw(SCORE) for _ in neg]
    if draw(BOOL):
        rec["prompt"], rec["type"] = "Represent this sentence for searching relevant passages: ", "normal"
    return rec


def st_triplet(draw, m, opts):
    return maybe(draw, {"anchor": text(draw, m), "positive": text(draw)}, "negative", text(draw))


def query_positive(draw, m, opts):
    rec = {"query": text(draw, m), "positive": text(draw) if draw(BOOL) else texts(draw, 1, 2)}
    return maybe(draw, rec, "negative", text(draw) if draw(BOOL) else texts(draw, 0, 2))


def squad(draw, m, opts):
    return {"id": draw(WORD), "title": "_".join(draw(st.lists(WORD, min_size=1, max_size=3))), "context": text(draw),
            "question": text(draw, m), "answers": {"text": [draw(WORD)], "answer_start": [0]}}


def eli5(draw, m, opts):
    return {"question": text(draw, m), "answer": text(draw)}


def schema_pairs(draw, m, opts):  # the normalised schema itself (user files, me5.prepare shards)
    negs = texts(draw, 0, 3)
    rec = maybe(draw, {"query": text(draw, m), "positive": text(draw)}, "negatives", negs)
    if draw(BOOL):
        rec["teacher_scores"] = [draw(SCORE) for _ in range(1 + len(rec.get("negatives", [])))]
    rec = maybe(draw, rec, "instruction", text(draw))  # instruction data: a task definition per record
    rec = maybe(draw, rec, "symmetric", draw(BOOL))
    return maybe(draw, rec, "lang", draw(st.sampled_from(["de", "zh", "", "sw"])))


def column_pairs(draw, m, opts):
    return maybe(draw, {"title": text(draw, m), "body": text(draw)}, "negatives", texts(draw, 0, 2))


SYNTHETIC_KINDS = {"retrieval": ("user_query", "positive_document", "hard_negative_document"),
                   "classification": ("input_text", "label", "misleading_label"),
                   "matching": ("input", "positive_document", None), "sts": ("S1", "S2", "S3"),
                   "bitext": ("S1", "S2", "S3")}


def synthetic_instructions(draw, m, opts):  # E5-mistral's generated JSON: flat, or the model's text under "response"
    kind = draw(st.sampled_from(sorted(SYNTHETIC_KINDS)))
    q, p, n = SYNTHETIC_KINDS[kind]
    example = {q: text(draw, m), p: text(draw)}
    if n is not None:
        example = maybe(draw, example, n, text(draw))
    if kind in ("sts", "bitext"):
        rec = {"task_type": kind} if draw(BOOL) else {"task": TASKS[kind]}
    else:
        rec = maybe(draw, {draw(st.sampled_from(["task", "instruction", "task_definition"])): text(draw)},
                    "task_type", kind)
    rec = maybe(draw, rec, "language", draw(st.sampled_from(["German", "Swahili"])))
    if draw(BOOL):
        return {**rec, **example}
    raw = json.dumps(example, ensure_ascii=False)
    return {**rec, "response": f"```json\n{raw}\n```" if draw(BOOL) else raw}


# ------------------------------------------------------------------------------------------------ targets
@dataclass(frozen=True)
class Target:
    """A source under test: how to build it, its options, its raw layouts and its own skip reasons."""

    name: str
    make: Callable[..., Source]
    layouts: tuple
    reasons: frozenset = frozenset()
    options: st.SearchStrategy = st.just({})
    stems: tuple = ("train",)  # file names in the published layout (a language in the name where it has one)


SUPERVISED = (tevatron, flag_embedding, st_triplet, query_positive)
STAGE1 = {
    "wikipedia": dict(layouts=(wikipedia,), reasons={"empty_title", "empty_text"},
                      options=st.sampled_from([{}, {"passage": "text"}]),
                      stems=("20231101.de/train-00000-of-00002", "20231101.ja/train-00001-of-00002")),
    "mc4": dict(layouts=(mc4,), reasons={"empty_text", "single_line", "title_too_long", "no_url_title"},
                options=st.sampled_from([{}, {"title_from": "url"}]),
                stems=("c4-de.tfrecord-00000-of-01024", "c4-bg-Latn.tfrecord-00001-of-00002")),
    "cc_news": dict(layouts=(cc_news,), reasons={"empty_title", "empty_maintext"}, stems=("2019/de", "2021/zh")),
    "nllb": dict(layouts=(nllb,), reasons=NLLB_REASONS, stems=("eng_Latn-fra_Latn", "data"),
                 options=st.sampled_from([{}, {"src_lang": "eng_Latn", "tgt_lang": "fra_Latn"},
                                          {"min_laser_score": 1.1}])),
    "reddit": dict(layouts=(reddit,), stems=("RC_2019-05.pairs",),
                   reasons={"empty_comment", "empty_response", "low_score", "deleted", "comment_too_long"}),
    "s2orc": dict(layouts=(s2orc,), reasons={"empty_title", "empty_abstract", "empty_citation"},
                  options=st.sampled_from([{"mode": m} for m in S2ORC_MODES])),
    "stackexchange": dict(layouts=(stackexchange,), stems=("apple", "ru.stackoverflow.com"),
                          reasons={"empty_title_body", "empty_title", "empty_upvoted_answer"}),
    "xp3": dict(layouts=(xp3,), reasons={"empty_inputs", "empty_targets"}, stems=("fr/merged_fr", "hi/merged_hi")),
    "sbert": dict(layouts=(sbert_dicts, sbert_arrays), stems=("pairs", "query_pairs"),
                  reasons={"too_few_texts", "empty_anchor", "empty_positive", "empty_set", "empty_query", "empty_pos"}),
}
STAGE2 = {
    "squad": dict(layouts=(squad, *SUPERVISED), reasons=LAYOUT_REASONS | {"empty_question"}),
    "eli5": dict(layouts=(eli5, *SUPERVISED), reasons=LAYOUT_REASONS | {"empty_question", "empty_answer"}),
    "nllb": dict(layouts=(nllb,), reasons=NLLB_REASONS, stems=("eng_Latn-fra_Latn", "data")),
}


def _source_target(name: str, cls, spec: dict) -> Target:
    return Target(name, lambda path, **kw: cls(path, **kw), **{**spec, "reasons": frozenset(spec["reasons"])})


TARGETS = [_source_target(name, cls, STAGE1[name]) for name, cls in STAGE1_SOURCES.items()]
TARGETS += [_source_target(f"stage2/{name}", cls, STAGE2.get(name, dict(layouts=SUPERVISED, reasons=LAYOUT_REASONS)))
            for name, cls in STAGE2_SOURCES.items()]  # "stage2/": nllb is in both tables
TARGETS += [
    Target("schema", lambda path, **kw: Source(path, **kw), (schema_pairs,)),
    Target("columns", lambda path, **kw: ColumnPairs(path, columns={"query": "title", "positive": "body"}, **kw),
           (column_pairs,)),
    Target("synthetic_instructions", lambda path, **kw: SyntheticInstructions(path, **kw), (synthetic_instructions,),
           frozenset(f"empty_{k}" for keys in SYNTHETIC_KINDS.values() for k in keys if k)
           | {"empty_task", "empty_instruction", "empty_task_definition"}),
]
FORMATS = ("jsonl", "jsonl.gz", "parquet")

# what a stage may ask of every record (RecordClassifier kwargs); mostly nothing
STAGES = st.sampled_from([{}, {}, {}, {"n_negatives": 1}, {"require_teacher": True}, {"max_chars": 24}])


# ------------------------------------------------------------------------------------------------ corruptions
# placeholders, spelled out when written: an integer beyond float range, one of more digits than Python parses
# (4300), a list nested deeper than Python's recursion limit
HUGE_INT, HUGE_DIGITS, DEEP = "\x00me5-fuzz:huge-int\x00", "\x00me5-fuzz:huge-digits\x00", "\x00me5-fuzz:deep\x00"
WHITESPACE = ["", " ", "\t \t", "\u3000", "\u00a0\u2003", "\u200a"]
ODD_TEXTS = ["\x00", "\u202e\u202d", "\ufeff", "a\u0301\u0302\u0303", "\U0001f469\u200d\U0001f469\u200d\U0001f467",
             "\U0010ffff", "\x7f\x1b[31m", "\u0085x\u2028y", "\u00ad", "\ud7ff\ue000", "http://[::1/a-b",
             "https://ex\uff03ample.com/a-b"]
BAD_BYTES = [b"\xff", b"\xfe\xff", b"\xc0\xaf", b"\xed\xa0\x80", b"\x80", b"\xc3", b"\xf4\x90\x80\x80"]
VALUE_MUTATIONS = ("drop", "null", "wrong_type", "empty", "odd_unicode", "surrogate", "huge_text", "wrap", "unwrap",
                   "nan", "huge_int", "huge_digits", "deep", "resize", "extra_key")
LINE_MUTATIONS = ("truncate", "bad_utf8", "not_object", "bom", "nul", "latin1", "trailing", "crlf", "leading_space")
# pyarrow's JSON reader (26.0.1), which datasets' json builder uses, segfaults on a line nested 20,000 deep and on
# a file whose first line is ``null``: the hub cases corrupt no root and nest nothing deep
HUB_MUTATIONS = tuple(k for k in VALUE_MUTATIONS if k != "deep")
HUB_LINE_MUTATIONS = tuple(k for k in LINE_MUTATIONS if k != "not_object")
BENIGN_LINE = {"crlf", "leading_space"}  # the record stays valid
WRONG_TYPES = st.one_of(st.integers(-5, 5), st.floats(allow_nan=True), st.booleans(), st.lists(st.integers(0, 3),
                        max_size=2), st.dictionaries(WORD, st.integers(0, 3), max_size=2), st.just([[]]), st.just({}))
EXTRA_KEYS = ["extra", "", "ünï", "\x00", "id", "score", "title", "text", "lang", "language", "source", "negatives"]


@dataclass
class Rec:
    """One record of a case: its raw value, the corruptions applied, and where it was written."""

    raw: object
    marker: str
    value_muts: list = field(default_factory=list)
    field_level: bool = False  # a corruption below the root of an object (its error must name a field)
    line_muts: list = field(default_factory=list)
    parses: bool = True  # the written jsonl line parses as JSON (else its error is about the line, not a field)

    @property
    def valid(self) -> bool:
        return not self.value_muts and set(self.line_muts) <= BENIGN_LINE


def _nodes(node, path=()):
    yield path
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _nodes(v, (*path, k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _nodes(v, (*path, i))


def _get(node, path):
    for p in path:
        node = node[p]
    return node


def mutate_value(draw, rec: Rec, fmt: str, *, hub: bool = False) -> None:
    """Apply one value corruption at a node of ``rec.raw`` drawn at random (the root included, but for the hub)."""
    paths = list(_nodes(rec.raw))[1 if hub else 0:] or [()]
    kinds = HUB_MUTATIONS if hub else VALUE_MUTATIONS
    path = draw(st.sampled_from(paths))
    kind = draw(st.sampled_from(kinds))
    value = _get(rec.raw, path)
    if not path and (fmt == "parquet" and kind != "extra_key" or kind == "drop"):
        kind = "extra_key" if isinstance(value, dict) else "resize"  # a parquet row is an object; keep the root
    if kind == "drop":
        parent = _get(rec.raw, path[:-1])
        del parent[path[-1]]
    else:
        if kind == "null":
            new = None
        elif kind == "wrong_type":
            new = draw(WRONG_TYPES)
        elif kind == "empty":
            new = draw(st.sampled_from(WHITESPACE))
        elif kind == "odd_unicode":
            odd = draw(st.sampled_from(ODD_TEXTS))
            new = (value + odd if draw(st.booleans()) else odd + value) if isinstance(value, str) else odd
        elif kind == "surrogate":
            new = (value if isinstance(value, str) else "x") + draw(st.sampled_from(["\ud800", "\udfff", "\udc80y"]))
        elif kind == "huge_text":
            new = draw(st.sampled_from(["x", "\u00e9", "\u4e2d", "\U0001f600", " "])) * 100_000 + "end"
        elif kind == "wrap":
            new = draw(st.sampled_from([[value], {"text": value}, {"value": value}, [[value]]]))
        elif kind == "unwrap":
            new = (value[0] if value else None) if isinstance(value, list) else (
                next(iter(value.values()), None) if isinstance(value, dict) else draw(WRONG_TYPES))
        elif kind == "nan":
            new = draw(st.sampled_from([math.nan, math.inf, -math.inf]))
            if isinstance(value, list) and value:
                new = [*value[:-1], new]
        elif kind in ("huge_int", "huge_digits"):
            new = HUGE_INT if kind == "huge_int" else HUGE_DIGITS
            if isinstance(value, list) and value:  # e.g. one of the teacher scores
                new = [*value[:-1], new]
        elif kind == "deep":
            new = DEEP
        elif kind == "resize":
            if isinstance(value, list):
                grown = [*value, copy.deepcopy(value[-1]) if value else "extra"]
                new = value[:-1] if value and draw(st.booleans()) else grown
            elif isinstance(value, str):
                new = value + " " + value
            else:
                new = draw(WRONG_TYPES)
        else:  # extra_key
            if isinstance(value, dict):
                new = {**value, draw(st.sampled_from(EXTRA_KEYS)): draw(st.one_of(WRONG_TYPES, TEXT))}
            else:
                new = draw(WRONG_TYPES)
        new = copy.deepcopy(new)  # no node is shared (st.just draws one object; a later corruption would change both)
        if path:
            _get(rec.raw, path[:-1])[path[-1]] = new
        else:
            rec.raw = new
    rec.value_muts.append(kind)
    rec.field_level = rec.field_level or bool(path) or (kind == "extra_key" and isinstance(value, dict))


@dataclass
class Case:
    target: Target
    fmt: str
    options: dict
    stage: dict
    strict: bool
    files: list  # per file: its records
    line_muts: dict  # (file index, record index) -> line corruptions
    line_choices: dict  # (file index, record index) -> drawn details of the line corruptions
    file_corruption: str | None
    layout: dict  # blank lines, line endings, ensure_ascii


@st.composite
def cases(draw, target: Target, fmt: str, *, hub: bool = False):
    options = draw(target.options)
    layouts = [lay for lay in target.layouts if not (fmt == "parquet" and lay is sbert_arrays)]
    n_files = 2 if hub else draw(st.integers(1, min(2, len(target.stems) + 1)))
    files, line_muts, line_choices = [], {}, {}
    for fi in range(n_files):
        recs = []
        for i in range(draw(st.integers(1, 5))):
            marker = f"\u27e8{fi}.{i}\u27e9"
            rec = Rec(draw(st.sampled_from(layouts))(draw, marker, options), marker)
            clean = hub and fi == 0  # the hub reader infers its features from the first file
            if not clean and draw(st.integers(0, 2)) == 0:
                for _ in range(draw(st.integers(1, 2))):
                    mutate_value(draw, rec, fmt, hub=hub)
            if not clean and fmt != "parquet" and draw(st.integers(0, 3)) == 0:
                muts = draw(st.lists(st.sampled_from(HUB_LINE_MUTATIONS if hub else LINE_MUTATIONS), min_size=1,
                                     max_size=2, unique=True))
                line_muts[fi, i] = muts
                line_choices[fi, i] = (draw(st.floats(0, 1)), draw(st.sampled_from(BAD_BYTES)),
                                       draw(st.sampled_from(["42", '"text"', "null", "true", "[]", "keys", "values"])))
                rec.line_muts = list(muts)
            recs.append(rec)
        files.append(recs)
    corruption = None if hub else draw(st.sampled_from([None] * 10 + ["truncate", "flip"]))
    layout = {"blank": draw(st.integers(0, 5)) == 0, "no_final_newline": draw(st.booleans()),
              "ensure_ascii": draw(st.booleans()), "flip_seed": draw(st.integers(0, 2**16))}
    return Case(target, fmt, options, draw(STAGES), draw(st.booleans()), files, line_muts, line_choices,
                corruption, layout)


# ------------------------------------------------------------------------------------------------ writing
def _json_line(raw, ensure_ascii: bool) -> bytes:
    s = json.dumps(raw, ensure_ascii=ensure_ascii)
    s = s.replace(json.dumps(HUGE_INT), "1" + "0" * 400).replace(json.dumps(HUGE_DIGITS), "9" * 5000)
    s = s.replace(json.dumps(DEEP), "[" * 20_000 + "]" * 20_000)
    return s.encode("utf-8", "surrogatepass")  # a lone surrogate unescaped is CESU bytes: not UTF-8


def _corrupt_line(line: bytes, raw, muts, choices) -> bytes:
    frac, bad, not_obj = choices
    for mut in sorted(muts, key=lambda m: m in {"bom", "leading_space"}):  # prefixes last: a line never turns blank
        if mut == "truncate":
            line = line[: max(1, int(len(line) * frac))] if len(line) > 1 else line
        elif mut == "bad_utf8":
            at = int(len(line) * frac)
            line = line[:at] + bad + line[at:]
        elif mut == "not_object":
            keys = list(raw) if isinstance(raw, (dict, list)) else []
            values = list(raw.values()) if isinstance(raw, dict) else keys
            line = {"keys": json.dumps(keys), "values": _json_line(values, True).decode()}.get(not_obj, not_obj).encode()
        elif mut == "bom":
            line = "\ufeff".encode() + line
        elif mut == "nul":
            at = int(len(line) * frac)
            line = line[:at] + b"\x00" + line[at:]
        elif mut == "latin1":
            line = line.decode("utf-8", "surrogateescape").encode("latin-1", "replace")
        elif mut == "trailing":
            line = line + b"},"
        elif mut == "leading_space":
            line = b" \t" + line
    return line


def _spell_for_parquet(node):
    if node in (HUGE_INT, HUGE_DIGITS):
        return 2**62  # parquet holds int64 at most
    if node == DEEP:
        return [[[["deep"]]]]
    if isinstance(node, dict):
        return {k: _spell_for_parquet(v) for k, v in node.items()}
    if isinstance(node, list):
        return [_spell_for_parquet(v) for v in node]
    return node


def _parquet_table(rows: list[dict]) -> pa.Table:
    keys = list(dict.fromkeys(k for r in rows for k in r))
    return pa.table({k: pa.array([r.get(k) for r in rows]) for k in keys})


def _write_parquet(path: Path, rows: list[dict]) -> bool:
    try:
        table = _parquet_table(rows)
        if table.num_rows != len(rows) or not table.num_columns:
            return False
        pq.write_table(table, path)
        return True
    except (pa.ArrowException, ValueError, TypeError, OverflowError, UnicodeEncodeError):
        path.unlink(missing_ok=True)
        return False


def write_case(case: Case, root: Path) -> tuple[list[str], dict, list[str]]:
    """Write the case's files; returns (data_files relative to root, {(file, line): Rec}, corrupted files)."""
    suffix = {"jsonl": ".jsonl", "jsonl.gz": ".jsonl.gz", "parquet": ".parquet"}[case.fmt]
    if case.target.name == "mc4" and case.fmt != "parquet":
        suffix = suffix.replace("jsonl", "json")  # mC4 ships c4-<lang>.tfrecord-*.json.gz
    rels, where = [], {}
    for fi, recs in enumerate(case.files):
        stem = case.target.stems[fi % len(case.target.stems)]
        rel = f"part{fi}/{stem}{suffix}"
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        if case.fmt == "parquet":
            rows = [_spell_for_parquet(r.raw) for r in recs]
            if _write_parquet(path, rows):
                where.update({(str(path), i + 1): r for i, r in enumerate(recs)})
            else:  # rows of clashing types: one file per record, as far as parquet can hold each
                for i, (row, r) in enumerate(zip(rows, recs)):
                    one = path.with_name(f"{path.stem}-{i:02d}.parquet")
                    if _write_parquet(one, [row]):
                        rels.append(str(one.relative_to(root)))
                        where[str(one), 1] = r
                continue
            rels.append(rel)
            continue
        out, line_no = [], 0
        for i, r in enumerate(recs):
            if case.layout["blank"] and i % 2:
                out.append(b"  \n")
                line_no += 1
            line = _json_line(r.raw, case.layout["ensure_ascii"])
            if (fi, i) in case.line_muts:
                line = _corrupt_line(line, r.raw, case.line_muts[fi, i], case.line_choices[fi, i])
            try:
                r.parses = isinstance(json.loads(line.decode("utf-8-sig" if not out else "utf-8")), (dict, list))
            except (ValueError, RecursionError):
                r.parses = False
            line_no += 1
            where[str(path), line_no] = r
            out.append(line + (b"\r\n" if "crlf" in r.line_muts else b"\n"))
        data = b"".join(out)
        if case.layout["no_final_newline"]:
            data = data.rstrip(b"\n")
        path.write_bytes(gzip.compress(data) if case.fmt == "jsonl.gz" else data)
        rels.append(rel)
    corrupted = []
    if case.file_corruption and rels and case.fmt != "jsonl":  # a plain text file has no structure of its own
        path = root / rels[0]
        data = bytearray(path.read_bytes())
        seed = case.layout["flip_seed"]
        if case.file_corruption == "truncate":
            data = data[: max(1, len(data) * (seed % 90 + 5) // 100)]
        else:  # flip bytes inside the data: gzip after its header, parquet before its footer (where pages are)
            start, end = (4, len(data) - 8 - struct.unpack("<I", data[-8:-4])[0]) if case.fmt == "parquet" else (10, len(data))
            for k in range(1 + seed % 4):
                data[start + (seed * (k + 7) * 2654435761) % max(1, end - start)] ^= 1 + (seed >> k) % 255
        path.write_bytes(bytes(data))
        corrupted.append(str(path))
    return rels, where, corrupted


# ------------------------------------------------------------------------------------------------ checking
CASES_RUN: Counter = Counter()  # (reader, target) -> cases run
RECORDS_RUN: Counter = Counter()  # (reader, target) -> records written
OUTCOMES: Counter = Counter()  # (reader, outcome) -> cases


def check_example(ex: PairExample, stage: dict) -> None:
    """A kept example honours the schema (and what the stage asked of it)."""
    for t in (ex.query, ex.positive, *ex.negatives):
        assert isinstance(t, str) and t and t == t.strip(), repr(t)[:200]
        t.encode("utf-8")  # no lone surrogate reaches the tokenizer or the shard writer
    assert isinstance(ex.negatives, tuple)
    if ex.teacher_scores is not None:
        assert len(ex.teacher_scores) == 1 + len(ex.negatives)
        assert all(isinstance(s, float) and math.isfinite(s) for s in ex.teacher_scores), ex.teacher_scores
    assert isinstance(ex.lang, str) and ex.lang and isinstance(ex.source, str)
    ex.lang.encode("utf-8")
    assert len(ex.negatives) >= stage.get("n_negatives", 0)
    assert ex.teacher_scores is not None or not stage.get("require_teacher")
    if stage.get("max_chars"):
        assert max(map(len, (ex.query, ex.positive, *ex.negatives))) <= stage["max_chars"]


def check_counts(case: Case, counts: Counter, kept: list, where: dict, *, valid_kept: bool = True) -> None:
    """Every record written is kept or counted by a reason of the taxonomy; valid records are kept, once."""
    skipped = {k: v for k, v in counts.items() if k.startswith("skipped/")}
    # a text over max_chars is cut, its record kept and counted (me5.data.records: truncated/too_long)
    truncated = {k: v for k, v in counts.items() if k.startswith("truncated/")}
    assert set(counts) <= {"read", "kept", *skipped, *truncated}, dict(counts)
    assert set(truncated) <= {"truncated/too_long"} and (not truncated or case.stage.get("max_chars"))
    assert sum(truncated.values()) <= counts["kept"], dict(counts)
    assert counts["read"] == len(where), (dict(counts), len(where))
    assert counts["kept"] == len(kept) and len(kept) + sum(skipped.values()) == counts["read"], dict(counts)
    reasons = {k.removeprefix("skipped/") for k in skipped}
    assert reasons <= MALFORMED_REASONS | STAGE_REASONS | case.target.reasons, reasons
    if case.strict:  # (a source's own skip may share a name: Wikipedia's and mC4's empty "text" is empty_text)
        assert not reasons & MALFORMED_REASONS - case.target.reasons, f"strict, yet malformed records were counted: {dict(counts)}"
    for ex in kept:
        check_example(ex, case.stage)
    hits = Counter(r.marker for r in where.values() for ex in kept if r.marker in ex.query or r.marker in ex.positive)
    assert all(n == 1 for n in hits.values()), hits
    valid = [r for r in where.values() if r.valid]
    if not valid_kept:
        return
    if not case.stage:
        missing = [r.raw for r in valid if not hits[r.marker]]
        assert not missing, f"valid records not kept: {str(missing)[:1000]} (counts {dict(counts)})"
    else:
        assert len(kept) + sum(counts[f"skipped/{r}"] for r in STAGE_REASONS) >= len(valid), dict(counts)


def no_usable_counts(err: DataError) -> Counter | None:
    """The counts a "has no usable examples" error carries in its message."""
    if "has no usable examples (counts: " not in err.message:
        return None
    return Counter(ast.literal_eval(err.message.split("(counts: ", 1)[1].rsplit(")", 1)[0]))


def check_error(case: Case, err: DataError, where: dict, corrupted: list, root: Path, *, exact: bool = True) -> str:
    """A raised error names the file and line of a corrupted record (and its field), or the corrupted file.

    ``exact=False`` (the hub reader, whose ``datasets`` may rewrite a record): any record of the file may be named.
    """
    assert type(err).__module__.startswith("me5."), type(err)
    assert err.file is not None, f"an error naming no file: {err}"
    assert err.file in str(err)
    if err.line is not None:
        assert f"{err.file}:{err.line}" in str(err), str(err)
        if err.file in corrupted:  # a corrupted file may read as anything
            return "file_error"
        rec = where.get((err.file, err.line))
        assert rec is not None, f"the error names no written record: {err}"
        assert case.strict, f"lenient reading raised for a record instead of counting it: {err}"
        assert not rec.valid or not exact, f"a valid record raised: {err} ({str(rec.raw)[:300]})"
        if exact and rec.field_level and isinstance(rec.raw, dict) and rec.parses and not rec.line_muts:
            assert err.field is not None and f"field '{err.field}'" in str(err), f"no field named: {err}"
        return "record_error"
    if err.file in corrupted:
        return "file_error"
    counts = no_usable_counts(err)
    assert counts is not None, f"an unexpected file-level error: {err}"
    assert Path(err.file) == root
    check_counts(case, counts, [], where, valid_kept=exact)
    return "no_usable"


class _Stop(Exception):
    """Ends a streaming reader after one pass over the written records."""


def stream_once(src: Source, case: Case, where: dict) -> tuple[Counter, list]:
    """One pass of a streaming reader (``LeafReader``) over the source: its counts and kept examples."""
    classify = src.classifier(**case.stage)
    counts, kept, seen = Counter(), [], set()

    def once(record, file, line, counts_, langs=None):
        if (file, line) in seen:  # the reader started its next epoch
            raise _Stop
        seen.add((file, line))
        ex = classify(record, file, line, counts_)
        if ex is not None:
            kept.append(ex)
        if len(seen) == len(where):
            raise _Stop
        return ex

    for leaf in src.stream_leaves():
        reader = LeafReader(leaf, once, reader=0, n_readers=1, seed=0, counts=counts, shuffle_rows=False)
        try:
            while True:
                reader.next()
        except _Stop:
            pass
    counts["kept"] = len(kept)
    return counts, kept, seen


def run_case(case: Case) -> None:
    reader = case.fmt
    CASES_RUN[reader, case.target.name] += 1
    with tempfile.TemporaryDirectory(prefix="me5-fuzz-") as tmp:
        root = Path(tmp)
        rels, where, corrupted = write_case(case, root)
        if not rels:  # nothing parquet could hold
            OUTCOMES[reader, "unwritable"] += 1
            return
        RECORDS_RUN[reader, case.target.name] += len(where)
        src = case.target.make(str(root), data_files=rels, strict=case.strict, **case.options)
        err = None
        try:
            kept, counts = src.load_examples(src.classifier(**case.stage))
        except DataError as e:
            err, outcome = e, check_error(case, e, where, corrupted, root)
        else:
            outcome = "read"
            if corrupted:  # a flip may miss whatever is checked (gzip: the CRC is; parquet: not every byte is)
                assert case.fmt == "parquet" or gzip.decompress(Path(corrupted[0]).read_bytes()), "unnoticed"
            else:
                check_counts(case, counts, kept, where)
        OUTCOMES[reader, outcome] += 1
        # the streaming reader: the same records, classified the same way
        try:
            s_counts, s_kept, s_seen = stream_once(src, case, where)
        except DataError as err:
            s_outcome = check_error(case, err, where, corrupted, root)
            assert s_outcome != "no_usable"
            assert corrupted or outcome == "record_error", f"only the streaming reader raised: {err}"
            return
        if corrupted:  # (a flipped gzip stream may decode to other lines before its CRC fails)
            return
        assert s_seen == set(where), f"the streaming reader read {len(s_seen)} of {len(where)} records"
        assert outcome != "record_error", "only the in-memory reader raised"
        if outcome == "no_usable":
            kept, counts = [], no_usable_counts(err)
        assert s_counts == counts, (dict(s_counts), dict(counts))
        assert Counter(s_kept) == Counter(kept)


# ------------------------------------------------------------------------------------------------ the tests
TARGET_IDS = [t.name for t in TARGETS]


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("target", TARGETS, ids=TARGET_IDS)
def test_fuzzed_records_are_kept_counted_or_named(target, fmt):
    @settings(max_examples=FUZZ_EXAMPLES, **FUZZ)
    @given(cases(target, fmt))
    def check(case):
        run_case(case)

    check()


@pytest.mark.slow
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("target", TARGETS, ids=TARGET_IDS)
def test_fuzzed_records_are_kept_counted_or_named_at_length(target, fmt):
    @settings(max_examples=25 * FUZZ_EXAMPLES, **{**FUZZ, "derandomize": False})
    @given(cases(target, fmt))
    def check(case):
        run_case(case)

    check()


HUB_TARGET = next(t for t in TARGETS if t.name == "schema")


def run_hub_case(case: Case) -> None:
    """The hub reader (``datasets`` streaming its ``json``/``parquet`` builder over the files): the same property;
    a shard ``datasets`` cannot read or cast is a :class:`DataError` naming the hub stream."""
    reader = f"hub-{case.fmt}"
    CASES_RUN[reader, case.target.name] += 1
    with tempfile.TemporaryDirectory(prefix="me5-fuzz-") as tmp:
        root = Path(tmp)
        rels, where, _ = write_case(case, root)
        builder = "json" if case.fmt == "jsonl" else "parquet"
        name = f"hub:{builder}/train"
        hub_where = {(name, i): r for i, r in enumerate(where.values(), start=1)}  # datasets reads the files in order
        RECORDS_RUN[reader, case.target.name] += len(hub_where)
        src = Source(builder, data_files=[str(root / r) for r in rels], strict=case.strict)
        try:
            kept, counts = src.load_examples(src.classifier(**case.stage))
        except DataError as err:
            if err.message.startswith(("cannot load hub dataset", "cannot read the hub dataset")):
                assert err.file.startswith(f"hub:{builder}") and err.file in str(err), str(err)
                outcome = "read_error"
            else:
                outcome = check_error(case, err, hub_where, [], Path(builder), exact=False)
        else:
            # datasets rewrites a column of mixed types as JSON text ("q" -> '"q"', -Infinity -> null), so a valid
            # record next to corrupted ones may change: only the accounting holds
            check_counts(case, counts, kept, hub_where, valid_kept=False)
            outcome = "read"
        OUTCOMES[reader, outcome] += 1


@pytest.mark.parametrize("fmt", ["jsonl", "parquet"])
def test_fuzzed_records_through_the_hub_reader(fmt):
    @settings(max_examples=max(2, FUZZ_EXAMPLES // 2), **FUZZ)
    @given(cases(HUB_TARGET, fmt, hub=True))
    def check(case):
        run_hub_case(case)

    check()


# ------------------------------------------------------------------------------------------------ what the fuzzing found
def _jsonl(tmp_path, *lines: str | bytes) -> str:
    f = tmp_path / "train.jsonl"
    f.write_bytes(b"".join((x.encode() if isinstance(x, str) else x) + b"\n" for x in lines))
    return str(f)


GOOD = '{"query": "q", "positive": "p"}'


@pytest.mark.parametrize(
    ("line", "reason", "field"),
    [
        pytest.param('{"query": "q", "positive": %s}' % ("9" * 5000), "malformed_json", None, id="int_over_4300_digits"),
        pytest.param('{"query": "q", "positive": %s}' % ("[" * 20_000 + "]" * 20_000), "malformed_json", None,
                     id="nested_too_deep"),
        pytest.param('{"query": "q\\ud800", "positive": "p"}', "undecodable", "query", id="escaped_lone_surrogate"),
        pytest.param('{"query": "q", "positive": "p", "lang": "de\\udfff"}', "undecodable", "lang",
                     id="lone_surrogate_lang"),
        pytest.param('{"query": "q", "positive": "p", "teacher_scores": [%s]}' % ("1" + "0" * 400),
                     "bad_teacher_scores", "teacher_scores", id="score_beyond_float_range"),
    ],
)
def test_json_python_reads_but_cannot_use_is_a_counted_malformed_record(tmp_path, line, reason, field):
    path = _jsonl(tmp_path, GOOD, line)
    _, counts = Source(path, strict=False).load_examples()
    assert dict(counts) == {"read": 2, "kept": 1, f"skipped/{reason}": 1}
    with pytest.raises(DataError) as info:
        Source(path).load_examples()
    assert (info.value.file, info.value.line, info.value.field) == (path, 2, field)


def test_a_json_array_line_is_a_bad_type_for_column_pairs(tmp_path):
    path = _jsonl(tmp_path, '{"title": "q", "body": "p"}', '["title", "body"]')
    _, counts = ColumnPairs(path, columns={"query": "title", "positive": "body"}, strict=False).load_examples()
    assert dict(counts) == {"read": 2, "kept": 1, "skipped/bad_type": 1}


def test_an_unparsable_mc4_url_has_no_title(tmp_path):
    path = _jsonl(tmp_path, *(json.dumps({"text": "T\nbody", "url": url, "timestamp": "t"})
                             for url in ["http://[::1/a-b", "https://ex\uff03ample.com/a-b", "https://x.de/new-park"]))
    examples, counts = STAGE1_SOURCES["mc4"](path, title_from="url").load_examples()
    assert [e.query for e in examples] == ["new park"] and counts["skipped/no_url_title"] == 2


def _corrupt_parquet(tmp_path, table: pa.Table, flips: dict[int, int]) -> Path:
    f = tmp_path / "train.parquet"
    pq.write_table(table, f)
    data = bytearray(f.read_bytes())
    end = len(data) - 8 - struct.unpack("<I", data[-8:-4])[0]  # the pages, not the footer
    for at, mask in flips.items():
        data[at if at > 0 else end + at] ^= mask
    f.write_bytes(bytes(data))
    return f


@pytest.mark.parametrize(
    ("table", "flips"),
    [
        pytest.param(pa.table({"query": [f"q{i} \u00e9" for i in range(50)], "positive": ["p" * 30] * 50}),
                     {at: 0x5A for at in range(40, 400, 7)}, id="pages_that_raise"),
        # the fuzzer's find (pyarrow 26.0.1): iter_batches decodes this one-row file to no rows, without an error
        pytest.param(pa.table({"inputs": ["\u3000"], "targets": ["\u00f8\u0112\u00f8\u00cf\u00a4nPgP \U000788c2}\u0134\u0137\u0115"]}),
                     {158: 237, 93: 246, 28: 123, 166: 62}, id="pages_that_decode_to_fewer_rows"),
    ],
)
def test_corrupt_parquet_pages_are_an_error_naming_the_file(tmp_path, table, flips):
    f = _corrupt_parquet(tmp_path, table, flips)
    src = Source(str(f), strict=False)
    with pytest.raises(DataError, match="could be read|cannot read") as info:
        src.load_examples()
    assert info.value.file == str(f)
    leaf = src.stream_leaves()[0]
    with pytest.raises(DataError, match="could be read|cannot read") as info:
        LeafReader(leaf, src.classifier(), reader=0, n_readers=1, seed=0, counts=Counter()).next()
    assert info.value.file == str(f)


def _hub_files(tmp_path) -> list[str]:
    good, bad = tmp_path / "a.jsonl", tmp_path / "b.jsonl"  # datasets infers the features from the first file
    good.write_text("".join(json.dumps({"query": f"q{i}", "positive": "p"}) + "\n" for i in range(3)))
    bad.write_text(json.dumps({"query": {"nested": 1}, "positive": "p", "other": 2}) + "\n")
    return [str(good), str(bad)]


def test_a_hub_shard_that_cannot_be_read_is_an_error_naming_the_hub_stream(tmp_path):
    from me5.data.stream import HubLeafReader, Leaf

    files = _hub_files(tmp_path)
    with pytest.raises(DataError) as info:
        Source("json", data_files=files, strict=False).load_examples()
    assert (info.value.file, info.value.line) == ("hub:json/train", 4)
    leaf = Leaf(key="pairs", source="pairs", hub={"path": "json", "data_files": files, "split": "train"})
    src = Source("json", data_files=files, strict=False)
    reader = HubLeafReader(leaf, src.classifier(), reader=0, n_readers=1, seed=0, counts=Counter())
    with pytest.raises(DataError) as info:
        for _ in range(4):
            reader.next()
    assert (info.value.file, info.value.line) == ("hub:json/train", 4)


def _mixed_parquet(tmp_path, rows: list[dict]) -> str:
    f = tmp_path / "mixed.parquet"
    pq.write_table(_parquet_table(rows), f)  # every row has every column: null where it has none
    return str(f)


@pytest.mark.parametrize(
    ("cls", "rows"),
    [
        pytest.param(STAGE1_SOURCES["sbert"], [{"set": ["a", "b"]}, {"query": "q", "pos": ["p"]},
                                               {"anchor": "a", "positive": "p"}], id="sbert"),
        pytest.param(STAGE2_SOURCES["msmarco_passage"], [
            {"query": "q", "positive_passages": [{"docid": "1", "text": "p"}]}, {"query": "q", "pos": ["p"], "neg": []},
            {"anchor": "a", "positive": "p"}, {"query": "q", "positive": "p", "negative": ["n"]}], id="layouts"),
        pytest.param(STAGE2_SOURCES["squad"], [{"title": "T", "context": "c", "question": "q"},
                                               {"query": "q", "positive": "p"}], id="squad"),
        pytest.param(STAGE2_SOURCES["eli5"], [{"question": "q", "answer": "a"}, {"query": "q", "positive": "p"}],
                     id="eli5"),
        pytest.param(STAGE1_SOURCES["nllb"], [{"translation": {"eng_Latn": "a", "fra_Latn": "b"}},
                                              {"translation": {"deu_Latn": "c", "spa_Latn": "d"}}], id="nllb"),
    ],
)
def test_a_parquet_file_of_mixed_layouts_reads_every_row(tmp_path, cls, rows):
    examples, counts = cls(_mixed_parquet(tmp_path, rows)).load_examples()
    assert len(examples) == len(rows) == counts["kept"] == counts["read"], dict(counts)


def test_every_registered_source_is_fuzzed():
    fuzzed = {t.name.removeprefix("stage2/") for t in TARGETS if t.name.startswith("stage2/")}
    assert fuzzed == set(STAGE2_SOURCES)
    assert {t.name for t in TARGETS} >= set(STAGE1_SOURCES)
    assert len(STAGE1_SOURCES) + len(STAGE2_SOURCES) == 23


# ------------------------------------------------------------------------------------------------ summary
class _Summary:
    """Prints the fuzz cases run per reader and per source at the end of the session."""

    def pytest_terminal_summary(self, terminalreporter):
        if not CASES_RUN:
            return
        tr = terminalreporter
        tr.section("fuzz cases")
        readers = sorted({r for r, _ in CASES_RUN})
        for r in readers:
            n = sum(v for (rr, _), v in CASES_RUN.items() if rr == r)
            recs = sum(v for (rr, _), v in RECORDS_RUN.items() if rr == r)
            outs = ", ".join(f"{o} {v}" for (rr, o), v in sorted(OUTCOMES.items()) if rr == r)
            tr.write_line(f"{r}: {n} cases, {recs} records ({outs})")
        targets = list(dict.fromkeys(t for _, t in CASES_RUN))
        for t in targets:
            per = ", ".join(f"{r} {CASES_RUN[r, t]}" for r in readers if CASES_RUN[r, t])
            tr.write_line(f"  {t}: {sum(CASES_RUN[r, t] for r in readers)} cases ({per})")


@pytest.fixture(scope="module", autouse=True)
def _fuzz_summary(request):
    pm = request.config.pluginmanager
    if not pm.has_plugin("me5-fuzz-summary"):
        pm.register(_Summary(), "me5-fuzz-summary")
    yield
