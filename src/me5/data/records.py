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
length                        ``too_long`` (``max_chars``: the query, positive or any negative)
extra checks                  the names the caller's checks return (``wrong_language``, ``eval_overlap``:
                              ``me5.data.decontaminate``)
============================  ==========================================================================
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence

from me5.data.readers import BadLine
from me5.data.schema import PairExample, to_example
from me5.errors import DataError, SkipRecord

#: an extra check: a kept example -> the name of its skip reason, or ``None`` to keep it
Check = Callable[[PairExample], "str | None"]


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
        max_chars: skip records with a longer text (``None``: the source's ``max_chars``).
        strict: a malformed record is a :class:`DataError` naming file:line (``None``: the source's ``strict``);
            otherwise it is skipped and counted.
        checks: extra checks run last, in order.
    """

    def __init__(self, source, *, name: str | None = None, n_negatives: int = 0, require_teacher: bool = False,
                 max_chars: int | None = None, strict: bool | None = None, checks: Sequence[Check] = ()):
        self.source = source
        self.name = name or source.name
        self.n_negatives = int(n_negatives)
        self.require_teacher = bool(require_teacher)
        self.max_chars = max_chars if max_chars is not None else source.max_chars
        self.strict = source.strict if strict is None else strict
        self.checks = tuple(checks)
        # prepared shards hold the normalised schema: read as they are (Source.reads_prepared)
        self.convert = _as_is if source.reads_prepared() else source.convert

    def skip_reason(self, ex: PairExample) -> str | None:
        """Why a converted example is not kept (what the stage needs, length, extra checks), or ``None``."""
        if len(ex.negatives) < self.n_negatives:
            return "too_few_negatives"
        if self.require_teacher and ex.teacher_scores is None:
            return "no_teacher_scores"
        if self.max_chars is not None and max(len(ex.query), len(ex.positive), *map(len, ex.negatives)) > self.max_chars:
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
        reason = self.skip_reason(ex)
        if reason is not None:
            counts[f"skipped/{reason}"] += 1
            if langs is not None:
                langs.setdefault(ex.lang, Counter())[f"skipped/{reason}"] += 1
            return None
        return ex
