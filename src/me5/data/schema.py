"""The one normalised record every source is converted to, and its validation.

A source's ``convert`` maps a raw record (a jsonl line, a parquet row, a hub example) to the fields of
:class:`PairExample`; :func:`to_example` then checks them and names the file, line and field of any problem.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from me5.errors import DataError

REQUIRED = ("query", "positive")


@dataclass(frozen=True)
class PairExample:
    """A training example: a query, its positive, optional hard negatives and teacher scores.

    ``teacher_scores`` (when present) has one score per candidate, positive first: ``1 + len(negatives)``.
    ``instruction`` (when present) is the record's own task definition (instruction data: E5-mistral's synthetic
    examples carry one each); it wins over its source's under the instruct prompt style. ``symmetric`` (when
    present) says whether both sides are the same kind of text (STS, bitext), again over the source's.
    """

    query: str
    positive: str
    negatives: tuple[str, ...] = ()
    teacher_scores: tuple[float, ...] | None = None
    lang: str = "und"
    source: str = ""
    instruction: str | None = None
    symmetric: bool | None = None


def _text(value, *, field: str, file, line) -> str:
    if not isinstance(value, str):
        raise DataError(f"expected a string, got {type(value).__name__}", file=file, line=line, field=field)
    value = value.strip()
    if not value:
        raise DataError("empty text", file=file, line=line, field=field)
    _unicode(value, field=field, file=file, line=line)
    return value


def _unicode(value: str, *, field: str, file, line) -> None:
    """A lone surrogate (JSON's escaped ``"\\ud800"`` reads as one) is no text: the tokenizer and the shard writer
    would fail on it far from here."""
    if not value.isascii():  # O(1)
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as err:
            raise DataError(f"not valid Unicode ({err.reason} at character {err.start})", file=file, line=line,
                            field=field) from None


def to_example(
    fields: Mapping,
    *,
    source: str,
    default_lang: str = "und",
    file: str | None = None,
    line: int | None = None,
) -> PairExample:
    """Validate converted fields into a :class:`PairExample`; raise :class:`DataError` naming file:line and field."""
    if not isinstance(fields, Mapping):
        raise DataError(f"a record must be an object, got {type(fields).__name__}", file=file, line=line)
    for name in REQUIRED:
        if fields.get(name) is None:
            raise DataError(f"missing required field (the record has: {sorted(fields)})", file=file, line=line, field=name)
    query = _text(fields["query"], field="query", file=file, line=line)
    positive = _text(fields["positive"], field="positive", file=file, line=line)
    raw_negs = fields.get("negatives") or ()
    if isinstance(raw_negs, str) or not isinstance(raw_negs, Sequence):
        raise DataError("expected a list of strings", file=file, line=line, field="negatives")
    negatives = tuple(_text(n, field=f"negatives[{i}]", file=file, line=line) for i, n in enumerate(raw_negs))
    scores = fields.get("teacher_scores")
    if scores is not None:
        if isinstance(scores, str) or not isinstance(scores, Sequence):
            raise DataError("expected a list of numbers", file=file, line=line, field="teacher_scores")
        if len(scores) != 1 + len(negatives):
            raise DataError(
                f"has {len(scores)} scores but the record has 1 positive + {len(negatives)} negatives",
                file=file,
                line=line,
                field="teacher_scores",
            )
        try:
            scores = tuple(float(s) for s in scores)
        except (TypeError, ValueError, OverflowError) as err:  # OverflowError: an integer beyond float range
            raise DataError(f"not a number ({err})", file=file, line=line, field="teacher_scores") from err
        if not all(math.isfinite(s) for s in scores):
            raise DataError("scores must be finite", file=file, line=line, field="teacher_scores")
    lang, name = str(fields.get("lang") or default_lang), str(fields.get("source") or source)
    _unicode(lang, field="lang", file=file, line=line)
    _unicode(name, field="source", file=file, line=line)
    instruction = fields.get("instruction")
    if instruction is not None:
        instruction = _text(instruction, field="instruction", file=file, line=line)
    symmetric = fields.get("symmetric")
    if symmetric is not None and not isinstance(symmetric, bool):
        raise DataError(f"expected true or false, got {type(symmetric).__name__}", file=file, line=line,
                        field="symmetric")
    return PairExample(query, positive, negatives, scores, lang, name, instruction, symmetric)
