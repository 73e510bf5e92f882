"""The one record classifier: a raw record becomes a kept :class:`~me5.data.schema.PairExample` or a counted skip.

The training loader (in memory and streaming) and ``me5.prepare`` both classify every record with
:class:`RecordClassifier`, so a record is kept or skipped for the same reason everywhere. Counts are keys of
a :class:`~collections.Counter`: ``read`` for every record, ``skipped/<reason>`` for every skip (the caller
counts ``kept``, since it may drop more later, e.g. the consistency filter). The reasons, in the order they
are checked:

============================  ==========================================================================
malformed input               ``undecodable`` (a jsonl line that is not UTF-8, a text that is not valid
(an error with ``strict``)    Unicode), ``malformed_json`` (a jsonl line that is not a JSON object),
                              ``missing_field``, ``empty_text``, ``bad_type``, ``bad_teacher_scores``,
                              ``malformed`` (any other :class:`~me5.errors.DataError` of a record)
the source's own skips        what its ``convert`` raises as :class:`~me5.errors.SkipRecord`
                              (``empty_<field>``, ``no_positive``, ...)
what the stage needs          ``too_few_negatives`` (fewer hard negatives than the stage samples),
                              ``no_teacher_scores`` (the loss distils and the record has none)
length                        a text longer than ``max_chars`` (the query, positive or any negative) is cut
                              to ``max_chars`` characters at a word boundary and the record kept, counted as
                              ``truncated/too_long`` (``long_texts="truncate"``, the default: no data lost);
                              with ``long_texts="drop"`` the record is skipped as ``too_long``
extra checks                  the names the caller's checks return (``wrong_language``, ``eval_overlap``:
                              ``me5.data.decontaminate``)
============================  ==========================================================================

A source's own filters stay its own: E5 drops Reddit comments over 4096 characters (CCPairs heuristics), which
``RedditPairs`` does as ``skipped/comment_too_long`` whatever ``max_chars`` says.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Callable, Sequence

from me5.data.readers import BadLine
from me5.data.schema import PairExample, to_example
from me5.errors import DataError, SkipRecord

#: an extra check: a kept example -> the name of its skip reason, or ``None`` to keep it
Check = Callable[[PairExample], "str | None"]

#: what ``max_chars`` does to a longer text: cut it (counted ``truncated/too_long``) or skip the record
LONG_TEXTS = ("truncate", "drop")


def check_long_texts(value, field: str = "data.long_texts") -> str:
    """``value`` when it is one of :data:`LONG_TEXTS`, else a :class:`~me5.errors.ConfigError` naming ``field``."""
    from me5.errors import ConfigError

    if value not in LONG_TEXTS:
        raise ConfigError(field, f"unknown '{value}'; choose one of {list(LONG_TEXTS)}")
    return value


def truncate_text(text: str, max_chars: int) -> str:
    """``text`` cut to at most ``max_chars`` characters: at the last whitespace of the second half when there is
    one (no half word at the end), else at ``max_chars``; unchanged when it is not longer."""
    if len(text) <= max_chars:
        return text
    cut = text[:max_chars]
    if not text[max_chars].isspace():
        j = max(cut.rfind(" "), cut.rfind("\n"), cut.rfind("\t"))
        if j >= max_chars // 2:
            cut = cut[:j]
    return cut.rstrip()


def malformed_reason(err: DataError) -> str:
    """The skip reason of a malformed record, from its :class:`DataError`."""
    if isinstance(err, BadLine):
        return err.reason
    msg = err.message
    if msg.startswith("not valid Unicode"):
        return "undecodable"
    if msg.startswith(("missing required field", "missing raw field", "none of the raw fields")):
        return "missing_field"
    if msg == "empty text":
        return "empty_text"
    if (err.field and err.field.startswith("teacher_scores")) or "scores" in msg:
        return "bad_teacher_scores"
    if msg.startswith(("expected", "a record must be", "a raw record must be")) or (
            msg.startswith("raw field '") and "': expected" in msg):
        return "bad_type"
    return "malformed"


def _as_is(record):
    return record


class RecordClassifier:
    """Classifies the raw records of one source (see the module docstring).

    Args:
        source: the :class:`~me5.data.source.Source` whose ``convert`` and languages are used.
        name: the source name the examples carry (default: the source's).
        n_negatives / require_teacher: what the stage needs of every record.
        max_chars: the longest text kept as it is (``None``: the source's ``max_chars``).
        long_texts: ``"truncate"`` a longer text (counted ``truncated/too_long``) or ``"drop"`` the record
            (``skipped/too_long``); ``None``: the source's ``long_texts``.
        strict: a malformed record is a :class:`DataError` naming file:line (``None``: the source's ``strict``);
            otherwise it is skipped and counted.
        checks: extra checks run last, in order.
    """

    def __init__(self, source, *, name: str | None = None, n_negatives: int = 0, require_teacher: bool = False,
                 max_chars: int | None = None, long_texts: str | None = None, strict: bool | None = None,
                 checks: Sequence[Check] = ()):
        self.source = source
        self.name = name or source.name
        self.n_negatives = int(n_negatives)
        self.require_teacher = bool(require_teacher)
        self.max_chars = max_chars if max_chars is not None else source.max_chars
        self.long_texts = check_long_texts(long_texts if long_texts is not None else
                                           getattr(source, "long_texts", "truncate"))
        self.strict = source.strict if strict is None else strict
        self.checks = tuple(checks)
        # prepared shards hold the normalised schema: read as they are (Source.reads_prepared)
        self.convert = _as_is if source.reads_prepared() else source.convert

    def too_long(self, ex: PairExample) -> bool:
        """Whether a text of ``ex`` is longer than ``max_chars``."""
        return self.max_chars is not None and max(len(ex.query), len(ex.positive),
                                                  *map(len, ex.negatives)) > self.max_chars

    def truncate(self, ex: PairExample) -> PairExample:
        """``ex`` with every text cut to ``max_chars`` (:func:`truncate_text`)."""
        m = self.max_chars
        return dataclasses.replace(ex, query=truncate_text(ex.query, m), positive=truncate_text(ex.positive, m),
                                   negatives=tuple(truncate_text(n, m) for n in ex.negatives))

    def skip_reason(self, ex: PairExample) -> str | None:
        """Why a converted example is not kept (what the stage needs, length with ``long_texts="drop"``, extra
        checks), or ``None``."""
        if len(ex.negatives) < self.n_negatives:
            return "too_few_negatives"
        if self.require_teacher and ex.teacher_scores is None:
            return "no_teacher_scores"
        if self.long_texts == "drop" and self.too_long(ex):
            return "too_long"
        for check in self.checks:
            reason = check(ex)
            if reason:
                return reason
        return None

    def __call__(self, record, file: str, line: int, counts: Counter,
                 langs: dict[str, Counter] | None = None) -> PairExample | None:
        """One raw record (or the :class:`DataError` of an unreadable line) -> a kept example or ``None``.

        ``counts`` gets ``read`` and any ``skipped/<reason>``; ``langs`` (optional) the skips of converted
        examples per language.
        """
        counts["read"] += 1
        try:
            if isinstance(record, DataError):
                raise record
            ex = to_example(self.convert(record), source=self.name,
                            default_lang=self.source.default_lang_for(file), file=file, line=line)
        except SkipRecord as skip:
            counts[f"skipped/{skip.reason}"] += 1
            return None
        except DataError as err:
            if self.strict:  # convert() does not know where the record came from: name it here
                raise DataError(err.message, file=err.file or file, line=err.line or line, field=err.field) from None
            counts[f"skipped/{malformed_reason(err)}"] += 1
            return None
        truncated = self.long_texts == "truncate" and self.too_long(ex)
        if truncated:  # cut before the checks, so that they see the text that is trained on
            ex = self.truncate(ex)
        reason = self.skip_reason(ex)
        if reason is not None:
            counts[f"skipped/{reason}"] += 1
            if langs is not None:
                langs.setdefault(ex.lang, Counter())[f"skipped/{reason}"] += 1
            return None
        if truncated:
            counts["truncated/too_long"] += 1
        return ex
