"""Misc. SBERT data: assorted pairs, mE5 Table 1 (10M sampled)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from me5.data.sources.raw import RawPairSource, get_field, has, nonempty
from me5.errors import DataError, SkipRecord


def _texts(values: Sequence, field: str) -> list[str]:
    if not all(isinstance(v, str) for v in values):
        raise DataError("expected a list of strings", field=field)
    return list(values)


class SbertPairs(RawPairSource):
    """Misc. sentence-transformers training pairs (NLI, QA, duplicate questions, captions, ...).

    Raw origin: ``sentence-transformers/embedding-training-data`` (``*.jsonl.gz``, one example per line;
    point ``path``/``data_files`` at the files; ``.jsonl.gz`` is read as it is). Verified line shapes (its card):
        - pair ``["text1", "text2"]`` and triplet ``["anchor", "positive", "negative"]`` (JSON arrays);
        - set ``{"set": ["text1", "text2", ...]}`` (paraphrases: any two form a pair);
        - query-pairs ``{"query": q, "pos": [...]}`` and query-triplets ``{"query": q, "pos": [...], "neg": [...]}``.
    Also accepted: the column layout of the newer per-dataset ``sentence-transformers/*`` repos
    (``anchor``, ``positive``, optional ``negative``).

    Field mapping: pair/triplet -> (``[0]``, ``[1]``, negatives ``[2:]``); set -> (``set[0]``, ``set[1]``);
    query-pairs -> (``query``, ``pos[0]``, negatives ``neg``); columns -> (``anchor``, ``positive``, ``[negative]``).
    Taking the *first* positive is deterministic; the card suggests a random one.
    Language: English (``en``).
    Prefixes: ``query: `` / ``passage: `` (the files mix symmetric and asymmetric tasks; set ``symmetric`` per
    file where it matters); instruction: :attr:`instruction`.
    Filters: a set or ``pos`` list with fewer than 2 / 1 texts -> ``skipped/too_few_texts``; an empty query or
    positive -> ``skipped/empty_<field>`` (an empty negative is dropped). Any other line shape is malformed
    (``DataError``).
    """

    source_name = "sbert"
    default_path = "sentence-transformers/embedding-training-data"
    default_lang = "en"
    one_language_per_file = True
    task = "sbert"

    def convert(self, record) -> Mapping:
        if isinstance(record, list):  # pair / triplet lines are JSON arrays (their skips are named anchor/positive)
            texts = _texts(record, "record")
            if len(texts) < 2:
                raise DataError(f"a pair line needs at least 2 texts, got {len(texts)}", field="record")
            return self._out(texts[0], texts[1], texts[2:], ("anchor", "positive"))
        return super().convert(record)

    def pair(self, record: Mapping) -> Mapping:
        if has(record, "set"):  # a null column is absent (a parquet file of mixed shapes has every column)
            texts = _texts(get_field(record, "set", kind=list), "set")
            if len(texts) < 2:
                raise SkipRecord("too_few_texts")
            return self._out(texts[0], texts[1], (), ("set", "set"))
        if has(record, "query"):
            pos = _texts(get_field(record, "pos", kind=list), "pos")
            if not pos:
                raise SkipRecord("too_few_texts")
            neg = _texts(get_field(record, "neg", kind=list), "neg") if record.get("neg") is not None else []
            return self._out(get_field(record, "query"), pos[0], neg, ("query", "pos"))
        if has(record, "anchor"):
            neg = [get_field(record, "negative")] if record.get("negative") is not None else []
            return self._out(get_field(record, "anchor"), get_field(record, "positive"), neg, ("anchor", "positive"))
        raise DataError(
            f"unknown line shape (keys {sorted(record)}); expected a [a, b] list, set, query/pos(/neg) or anchor/positive",
            field="record",
        )

    @staticmethod
    def _out(query: str, positive: str, negatives: Sequence[str], names: tuple[str, str]) -> dict:
        return {
            "query": nonempty(query, names[0]),
            "positive": nonempty(positive, names[1]),
            "negatives": [n.strip() for n in negatives if n.strip()],  # an empty negative is dropped, not the pair
        }
