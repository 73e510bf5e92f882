"""The raw layouts that public supervised embedding data ships in, and the base class of the stage-2 sources.

A stage-2 source is a :class:`SupervisedPairs` subclass that names its dataset, language, prefix policy and
instruction; the record layouts are shared. :meth:`SupervisedPairs.pair` recognises a record's layout by a column
only that layout has, so a source reads its dataset in any of these forms:

======================  ======================================================  =====================================
layout (marker column)  record                                                  shipped by
======================  ======================================================  =====================================
Tevatron                ``{query_id, query, positive_passages: [{docid,          Tevatron/*, castorini/mr-tydi,
(positive_passages)     title?, text, score?}], negative_passages: [...]}``     miracl/miracl, zyznull/dureader-*
FlagEmbedding (pos)     ``{query, pos: [str], neg: [str], pos_scores?,           FlagEmbedding fine-tune data,
                        neg_scores?, prompt?, type?}``                          Shitao/bge-m3-data
sentence-transformers   ``{anchor, positive, negative?}``                       sentence-transformers/* pair and
(anchor)                                                                        triplet configs
query/positive/negative ``{query, positive: str | [str], negative: str |         BeastyZ/E5-R (lists), llm2vec's
(positive)              [str]}``                                                echo-data (strings)
======================  ======================================================  =====================================

Conventions (all stage-2 sources):

* A passage with a title is ``title + " " + text`` (unilm's convention, also used by ``me5.eval.retrieval``);
  an empty title or RocketQA's ``"-"`` placeholder (MS MARCO passages have no titles) is dropped.
* One example per record: the first positive is the positive (deterministic; further positives are not used,
  and never become negatives). The given negatives are the hard negatives, in their order.
* Teacher scores are read only where the raw data carries them: FlagEmbedding's ``pos_scores``/``neg_scores``
  (the first positive's score, then each negative's) or Tevatron's distillation format (a ``score`` on every
  passage). Otherwise there are none; a later mining/scoring step adds them.
* FlagEmbedding's per-record ``prompt``/``type`` are not used: the source's ``instruction`` is.
* Skipped and counted: a record without a positive (``skipped/no_positive``); an empty query, positive or
  negative (``skipped/empty_query`` ...; the error policy of :mod:`me5.data.sources.raw`). Malformed input (a
  missing column, a wrong type, scores that do not match the texts) is a :class:`~me5.errors.DataError` naming
  the raw field, e.g. ``positive_passages[0].text``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from me5.data.sources.raw import RawPairSource, get_field, get_text, has, nonempty
from me5.errors import DataError, SkipRecord

#: titles that mean "no title" (RocketQA/Tevatron MS MARCO passages carry "-")
NO_TITLE = frozenset({"", "-"})


def passage_text(passage, *, field: str, role: str) -> str:
    """A passage given as a string or as ``{title?, text}`` -> ``title + " " + text`` (no title: ``text``).

    ``role`` names the counted skip of an empty text (``skipped/empty_<role>``); ``field`` the malformed field.
    """
    if isinstance(passage, str):
        return nonempty(passage, role)
    if not isinstance(passage, Mapping):
        raise DataError(f"expected a passage object or a string, got {type(passage).__name__}", field=field)
    text = nonempty(get_field(passage, "text", label=f"{field}.text"), role)
    title = passage.get("title")
    if title is not None and not isinstance(title, str):
        raise DataError(f"expected a string title, got {type(title).__name__}", field=f"{field}.title")
    title = (title or "").strip()
    return text if title in NO_TITLE else f"{title} {text}"


def as_list(value, *, field: str) -> list:
    """A column that holds one item or a list of items (``None``: none)."""
    if value is None:
        return []
    if isinstance(value, (str, Mapping)):
        return [value]
    if isinstance(value, Sequence):
        return list(value)
    raise DataError(f"expected a string or a list, got {type(value).__name__}", field=field)


def passages(value, *, field: str, role: str) -> list[str]:
    return [passage_text(p, field=f"{field}[{i}]", role=role) for i, p in enumerate(as_list(value, field=field))]


def tevatron_fields(record: Mapping, *, score_key: str = "score") -> dict:
    """Tevatron: ``query`` + ``positive_passages``/``negative_passages`` of ``{docid, title?, text, score?}``."""
    positives = as_list(get_field(record, "positive_passages", kind=(list, tuple)), field="positive_passages")
    if not positives:
        raise SkipRecord("no_positive")
    negatives = as_list(record.get("negative_passages"), field="negative_passages")
    out = {
        "query": get_text(record, "query"),
        "positive": passage_text(positives[0], field="positive_passages[0]", role="positive"),
        "negatives": passages(negatives, field="negative_passages", role="negative"),
    }
    group = [("positive_passages[0]", positives[0])] + [(f"negative_passages[{i}]", p) for i, p in enumerate(negatives)]
    scored = [isinstance(p, Mapping) and p.get(score_key) is not None for _, p in group]
    if all(scored):
        out["teacher_scores"] = [p[score_key] for _, p in group]
    elif any(scored):
        missing = group[scored.index(False)][0]
        raise DataError(f"some passages carry a teacher '{score_key}' and this one does not", field=f"{missing}.{score_key}")
    return out


def listed_fields(
    record: Mapping, *, pos: str, neg: str, pos_scores: str | None = None, neg_scores: str | None = None
) -> dict:
    """``{query, <pos>: str | [str], <neg>: str | [str]}``, with optional per-text score lists (FlagEmbedding)."""
    positives = passages(record.get(pos), field=pos, role="positive")
    if not positives:
        raise SkipRecord("no_positive")
    negatives = passages(record.get(neg), field=neg, role="negative")
    out = {"query": get_text(record, "query"), "positive": positives[0], "negatives": negatives}
    if any(key is not None and record.get(key) is not None for key in (pos_scores, neg_scores)):
        ps, ns = (_scores(record, key, n) for key, n in ((pos_scores, len(positives)), (neg_scores, len(negatives))))
        out["teacher_scores"] = [ps[0], *ns]
    return out


def _scores(record: Mapping, key: str, n_texts: int) -> list:
    scores = list(get_field(record, key, kind=(list, tuple)))
    if len(scores) != n_texts:
        raise DataError(f"has {len(scores)} scores for {n_texts} texts", field=key)
    return scores


def triplet_fields(record: Mapping) -> dict:
    """sentence-transformers ``pair``/``triplet`` configs: ``{anchor, positive, negative?}``."""
    return {
        "query": get_text(record, "anchor"),
        "positive": get_text(record, "positive"),
        "negatives": passages(record.get("negative"), field="negative", role="negative"),
    }


class SupervisedPairs(RawPairSource):
    """Base of the stage-2 sources: a record in any layout of this module's table (see the module docstring).

    Subclasses set the :class:`~me5.data.source.Source` attributes and, as for every raw source
    (:class:`~me5.data.sources.raw.RawPairSource`), ``default_hub_config`` (used with the default hub id only) and
    the language policy (a record's ``lang``, then ``lang``, then the hub config's language, then ``default_lang``).
    A source whose dataset has a layout of its own overrides :meth:`pair` and defers to this one for the rest.
    Most are one language (``default_lang``), so ``one_language_per_file``; the multilingual ones turn it off.
    """

    one_language_per_file = True

    def pair(self, record: Mapping) -> Mapping:
        if has(record, "positive_passages"):
            return tevatron_fields(record)
        if has(record, "pos"):
            return listed_fields(record, pos="pos", neg="neg", pos_scores="pos_scores", neg_scores="neg_scores")
        if has(record, "anchor"):
            return triplet_fields(record)
        if has(record, "positive"):
            return listed_fields(record, pos="positive", neg="negative")
        raise DataError(
            "unknown record layout: expected Tevatron 'positive_passages', FlagEmbedding 'pos', sentence-transformers "
            f"'anchor' or 'query'/'positive' columns (the record has: {sorted(record)})",
            field="positive",
        )
