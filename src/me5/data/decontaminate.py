"""Checks that keep a record out of the training data for what it says, not how it is written.

Both are extra checks of the record classifier (:class:`~me5.data.records.RecordClassifier` ``checks=``): a
callable ``PairExample -> reason or None``. ``me5.prepare`` runs them (``--eval-sets``, ``--langs``).

* :class:`EvalOverlap` (``eval_overlap``): the query or positive passage appears in an evaluation set (BEIR
  layout: ``corpus.jsonl``/``queries.jsonl``, or per-language subfolders as MIRACL); exact match after
  whitespace normalisation, as the English E5 recipe (arXiv 2212.03533) decontaminates its training data.
* :class:`LanguageCheck` (``wrong_language``): the record's language is not asked for, or its text is not
  written in a script of that language (a cheap stand-in for language identification).
"""

from __future__ import annotations

import bisect
import hashlib
import os
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

from me5.data.readers import iter_jsonl
from me5.data.schema import PairExample
from me5.errors import DataError


# ============================================================================================== eval sets
def normalise_text(text: str) -> str:
    """Whitespace-normalised text (the key of the eval-set exact match)."""
    return " ".join(text.split())


def text_digest(text: str) -> bytes:
    """The 8-byte digest of the whitespace-normalised ``text`` (what :func:`load_eval_texts` collects)."""
    return hashlib.blake2b(normalise_text(text).encode("utf-8"), digest_size=8).digest()


def _beir_dirs(root: Path) -> list[Path]:
    def is_beir(d: Path) -> bool:
        return (d / "corpus.jsonl").exists() or (d / "queries.jsonl").exists()

    if is_beir(root):
        return [root]
    return sorted(p for p in root.iterdir() if p.is_dir() and is_beir(p)) if root.is_dir() else []


def load_eval_texts(folders: Iterable[str | os.PathLike]) -> set[bytes]:
    """Digests of every query and passage text (``text``, and ``title + " " + text``) of BEIR-layout folders."""
    out: set[bytes] = set()
    for folder in folders:
        root = Path(folder)
        dirs = _beir_dirs(root)
        if not dirs:
            raise DataError("not a BEIR folder: no corpus.jsonl/queries.jsonl in it nor in any subfolder", file=str(root))
        for d in dirs:
            for name in ("corpus.jsonl", "queries.jsonl"):
                if not (d / name).is_file():
                    continue
                for _, rec in iter_jsonl(d / name):
                    text = rec.get("text")
                    if isinstance(text, str) and text.strip():
                        out.add(text_digest(text))
                        title = rec.get("title")
                        if isinstance(title, str) and title.strip():
                            out.add(text_digest(title + " " + text))
    return out


class EvalOverlap:
    """``eval_overlap``: the example's query or positive is (whitespace-normalised) a text of an eval set.

    Args:
        digests: the :func:`text_digest` of every eval text (:meth:`from_folders` reads them).
    """

    reason = "eval_overlap"

    def __init__(self, digests: set[bytes]):
        self.digests = digests

    @classmethod
    def from_folders(cls, folders: Iterable[str | os.PathLike]) -> EvalOverlap:
        """The check of the eval sets in BEIR-layout ``folders`` (:func:`load_eval_texts`)."""
        return cls(load_eval_texts(folders))

    def __call__(self, ex: PairExample) -> str | None:
        if text_digest(ex.query) in self.digests or text_digest(ex.positive) in self.digests:
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
