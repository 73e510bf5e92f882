"""Checks that keep a record out of the training data for what it says, not how it is written.

Both are extra checks of the record classifier (:class:`~me5.data.records.RecordClassifier` ``checks=``): a
callable ``PairExample -> reason or None``. ``me5.prepare`` runs them (``--eval-sets``, ``--langs``).

* :class:`EvalOverlap` (``eval_overlap``): the query or positive passage appears in an evaluation set, read in
  its published layout (:func:`eval_files`: BEIR ``corpus.jsonl``/``queries.jsonl``, gzip or not, or
  per-language subfolders of them; MIRACL's ``miracl-corpus`` docs and ``miracl`` topics as downloaded; the MTEB
  v2 hub layout's ``corpus``/``queries`` parquet splits); exact match after whitespace normalisation, as the
  English E5 recipe (arXiv 2212.03533) decontaminates its training data. The digests are 8 bytes a text in a
  sorted array that the workers of ``me5.prep`` memory-map.
* :class:`LanguageCheck` (``wrong_language``): the record's language is not asked for, or its text is not
  written in a script of that language (a cheap stand-in for language identification).
"""

from __future__ import annotations

import bisect
import hashlib
import os
import re
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from me5.data.readers import iter_jsonl
from me5.data.schema import PairExample
from me5.errors import DataError
from me5.jsonio import write_atomic


# ============================================================================================== eval sets
def normalise_text(text: str) -> str:
    """Whitespace-normalised text (the key of the eval-set exact match)."""
    return " ".join(text.split())


def text_digest(text: str) -> bytes:
    """The 8-byte digest of the whitespace-normalised ``text`` (what :func:`load_eval_texts` collects)."""
    return hashlib.blake2b(normalise_text(text).encode("utf-8"), digest_size=8).digest()


#: file names (any folder level or the file's own stem) that hold eval passages or queries, per published layout:
#: BEIR (``corpus.jsonl``, ``queries.jsonl``, gzip or not), MIRACL (``miracl-corpus-v1.0-<lang>/docs-*.jsonl.gz``,
#: ``miracl-v1.0-<lang>/topics/topics.miracl-v1.0-<lang>-<split>.tsv``), the MTEB v2 hub layout (parquet splits
#: under ``corpus/``, ``queries/``, ``<lang>-corpus/``, ``<lang>-queries/``; qrels under ``default``/``qrels``)
_TEXT_PARTS = re.compile(r"(^|[-_.])(corpus|docs|queries|query|topics)($|[-_.])")
_SKIP_PARTS = re.compile(r"(^|[-_.])(qrels|default|top_ranked|instruction)($|[-_.])")
_EVAL_SUFFIXES = (".jsonl", ".jsonl.gz", ".json.gz", ".parquet", ".tsv")


def eval_files(root: str | os.PathLike) -> list[Path]:
    """The files of an eval set that hold its passages and queries, in any of the published layouts named in
    :data:`_TEXT_PARTS` (a BEIR folder, a folder of per-language BEIR folders as MIRACL converted by
    ``me5.app.convert_miracl``, MIRACL's own ``miracl-corpus``/``miracl`` downloads, an MTEB v2 hub folder);
    qrels and READMEs are left out. Sorted, so that every worker reads them in one order."""
    root = Path(root)
    files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
    out = []
    for f in files:
        name = f.name
        if not name.endswith(_EVAL_SUFFIXES):
            continue
        stem = name.split(".")[0]
        parts = [*(p.name for p in f.relative_to(root).parents if p.name), stem] if f != root else [stem]
        if any(_SKIP_PARTS.search(p) for p in parts):
            continue
        if any(_TEXT_PARTS.search(p) for p in parts):
            out.append(f)
    return out


def _iter_eval_texts(path: Path):
    """Each text of one eval file: ``text`` (and ``title + " " + text``) of a jsonl/parquet record, the query
    column of a MIRACL topics tsv (``qid<TAB>query``)."""
    name = path.name
    if name.endswith(".tsv"):
        with open(path, encoding="utf-8") as fh:
            for line in fh:
                cols = line.rstrip("\n").split("\t")
                if len(cols) >= 2 and cols[1].strip():
                    yield cols[1]
        return
    if name.endswith(".parquet"):
        import pyarrow.parquet as pq

        pf = pq.ParquetFile(path)
        cols = [c for c in ("title", "text") if c in pf.schema_arrow.names]
        if "text" not in cols:
            raise DataError("an eval parquet file needs a 'text' column", file=str(path))
        for batch in pf.iter_batches(columns=cols, batch_size=65536):
            d = batch.to_pydict()
            titles = d.get("title") or [None] * len(d["text"])
            for title, text in zip(titles, d["text"]):
                yield from _record_texts(title, text)
        return
    for _, rec in iter_jsonl(path):
        yield from _record_texts(rec.get("title"), rec.get("text"))


def _record_texts(title, text):
    if isinstance(text, str) and text.strip():
        yield text
        if isinstance(title, str) and title.strip():
            yield title + " " + text


def load_eval_texts(folders: Iterable[str | os.PathLike]) -> set[bytes]:
    """Digests of every query and passage text (``text``, and ``title + " " + text``) of the eval sets in
    ``folders`` (any layout :func:`eval_files` knows)."""
    return {d.tobytes() for d in load_eval_digests(folders)}


def load_eval_digests(folders: Iterable[str | os.PathLike]) -> np.ndarray:
    """The sorted, unique :func:`text_digest` of every eval text of ``folders`` as a ``uint64`` array (8 bytes a
    text: 100M MIRACL passages take 0.8 GB, and :func:`save_digests` lets every worker memory-map one copy)."""
    parts: list[np.ndarray] = []
    for folder in folders:
        root = Path(folder)
        files = eval_files(root) if root.exists() else []
        if not files:
            raise DataError("no eval set here: no corpus/queries/topics file (BEIR, MIRACL or MTEB layout) in it "
                            "nor in any subfolder", file=str(root))
        for f in files:
            buf = bytearray()
            for text in _iter_eval_texts(f):
                buf += text_digest(text)
            if buf:
                parts.append(np.frombuffer(bytes(buf), dtype=np.uint64))
    return np.unique(np.concatenate(parts)) if parts else np.zeros(0, dtype=np.uint64)


def save_digests(path: str | os.PathLike, digests: np.ndarray) -> None:
    """Write a digest array for :meth:`EvalOverlap.from_file` (atomic: a temporary file renamed)."""
    write_atomic(Path(path), lambda fh: np.save(fh, np.asarray(digests, dtype=np.uint64)))


class EvalOverlap:
    """``eval_overlap``: the example's query or positive is (whitespace-normalised) a text of an eval set.

    Args:
        digests: the :func:`text_digest` of every eval text: a set of 8-byte digests, or a sorted ``uint64``
            array (:func:`load_eval_digests`; looked up by binary search, and memory-mapped by
            :meth:`from_file`, so that the workers of a pipeline share one copy).
    """

    reason = "eval_overlap"

    def __init__(self, digests: set[bytes] | np.ndarray):
        if isinstance(digests, np.ndarray):
            self.digests = None
            self.sorted = digests
        else:
            self.digests = digests
            self.sorted = None

    @classmethod
    def from_folders(cls, folders: Iterable[str | os.PathLike]) -> EvalOverlap:
        """The check of the eval sets in ``folders`` (:func:`load_eval_digests`)."""
        return cls(load_eval_digests(folders))

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> EvalOverlap:
        """The check of a digest file written by :func:`save_digests` (memory-mapped)."""
        return cls(np.load(path, mmap_mode="r"))

    def contains(self, text: str) -> bool:
        """Whether ``text`` (whitespace-normalised) is an eval text."""
        d = text_digest(text)
        if self.digests is not None:
            return d in self.digests
        key = np.frombuffer(d, dtype=np.uint64)[0]
        i = int(np.searchsorted(self.sorted, key))
        return i < len(self.sorted) and self.sorted[i] == key

    def __call__(self, ex: PairExample) -> str | None:
        if self.contains(ex.query) or self.contains(ex.positive):
            return self.reason
        return None


# ============================================================================================== languages
# script of each character range (start, end inclusive); a cheap stand-in for language identification
_SCRIPT_RANGES = sorted([
    (0x0041, 0x005A, "Latin"), (0x0061, 0x007A, "Latin"), (0x00C0, 0x024F, "Latin"), (0x1E00, 0x1EFF, "Latin"),
    (0x0370, 0x03FF, "Greek"), (0x0400, 0x052F, "Cyrillic"), (0x0530, 0x058F, "Armenian"),
    (0x0590, 0x05FF, "Hebrew"), (0x0600, 0x06FF, "Arabic"), (0x0750, 0x077F, "Arabic"), (0x08A0, 0x08FF, "Arabic"),
    (0xFB50, 0xFDFF, "Arabic"), (0xFE70, 0xFEFF, "Arabic"), (0x0900, 0x097F, "Devanagari"),
    (0x0980, 0x09FF, "Bengali"), (0x0A00, 0x0A7F, "Gurmukhi"), (0x0A80, 0x0AFF, "Gujarati"),
    (0x0B00, 0x0B7F, "Oriya"), (0x0B80, 0x0BFF, "Tamil"), (0x0C00, 0x0C7F, "Telugu"), (0x0C80, 0x0CFF, "Kannada"),
    (0x0D00, 0x0D7F, "Malayalam"), (0x0D80, 0x0DFF, "Sinhala"), (0x0E00, 0x0E7F, "Thai"), (0x0E80, 0x0EFF, "Lao"),
    (0x0F00, 0x0FFF, "Tibetan"), (0x1000, 0x109F, "Myanmar"), (0x10A0, 0x10FF, "Georgian"),
    (0x1100, 0x11FF, "Hangul"), (0x3130, 0x318F, "Hangul"), (0xAC00, 0xD7AF, "Hangul"), (0x1200, 0x137F, "Ethiopic"),
    (0x1780, 0x17FF, "Khmer"), (0x3040, 0x309F, "Hiragana"), (0x30A0, 0x30FF, "Katakana"),
    (0x3400, 0x4DBF, "Han"), (0x4E00, 0x9FFF, "Han"), (0xF900, 0xFAFF, "Han"), (0x20000, 0x2FA1F, "Han"),
])
_STARTS = [r[0] for r in _SCRIPT_RANGES]
# the scripts a language is written in (languages not listed here are not script-checked)
LANG_SCRIPTS: dict[str, set[str]] = {
    **{lang: {"Latin"} for lang in (
        "af az ca cs cy da de en eo es et eu fi fil fr ga gl ha hr hu id is it jv la lt lv mg ms mt nl no pl pt ro "
        "sk sl so sq sv sw tl tr uz vi xh yo zu").split()},
    **{lang: {"Cyrillic"} for lang in "be bg kk ky mk mn ru sr tg uk".split()},
    **{lang: {"Arabic"} for lang in "ar fa ps sd ug ur".split()},
    **{lang: {"Devanagari"} for lang in "hi mr ne sa".split()},
    "bn": {"Bengali"}, "as": {"Bengali"}, "pa": {"Gurmukhi"}, "gu": {"Gujarati"}, "or": {"Oriya"}, "ta": {"Tamil"},
    "te": {"Telugu"}, "kn": {"Kannada"}, "ml": {"Malayalam"}, "si": {"Sinhala"}, "th": {"Thai"}, "lo": {"Lao"},
    "my": {"Myanmar"}, "ka": {"Georgian"}, "hy": {"Armenian"}, "he": {"Hebrew"}, "yi": {"Hebrew"}, "el": {"Greek"},
    "am": {"Ethiopic"}, "km": {"Khmer"}, "ko": {"Hangul", "Han"}, "zh": {"Han"},
    "ja": {"Han", "Hiragana", "Katakana"},
}


def dominant_script(text: str, *, sample: int = 200) -> str | None:
    """The most frequent script among the letters of the first ``sample`` characters (``None``: no letters)."""
    counts: Counter = Counter()
    for ch in text[:sample]:
        cp = ord(ch)
        i = bisect.bisect_right(_STARTS, cp) - 1
        if i >= 0 and cp <= _SCRIPT_RANGES[i][1]:
            counts[_SCRIPT_RANGES[i][2]] += 1
    return counts.most_common(1)[0][0] if counts else None


class LanguageCheck:
    """``wrong_language``: the record's language is not in ``langs``, its query is not written in a script of
    that language, or its positive in none of the scripts of ``langs`` (translation pairs cross languages)."""

    reason = "wrong_language"

    def __init__(self, langs: Iterable[str]):
        self.langs = set(langs)
        scripts = [LANG_SCRIPTS.get(lang) for lang in self.langs]
        self.any_script = None if any(s is None for s in scripts) else set().union(*scripts)

    def ok(self, ex: PairExample) -> bool:
        if ex.lang not in self.langs:
            return False
        expected = LANG_SCRIPTS.get(ex.lang)
        if expected is not None:
            s = dominant_script(ex.query)
            if s is not None and s not in expected:
                return False
        if self.any_script is not None:
            s = dominant_script(ex.positive)
            if s is not None and s not in self.any_script:
                return False
        return True

    def __call__(self, ex: PairExample) -> str | None:
        return None if self.ok(ex) else self.reason
