"""Stackexchange: (question, answer) pairs, mE5 Table 1 (50M sampled)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from me5.data.readers import data_suffix
from me5.data.sources.raw import RawPairSource, first_key, get_field, get_text

# Stack Exchange sites whose content is in another language than English (site name -> language)
SITE_LANGS = {"ja": "ja", "ru": "ru", "pt": "pt", "es": "es"}


class StackExchangePairs(RawPairSource):
    """Stack Exchange (question, most-upvoted answer).

    Raw origin: the ``flax-sentence-embeddings`` Stack Exchange exports, one split/file per site
    (``apple``, ``askubuntu``, ..., ``ru``, ``ja``, ``pt``). Verified from the card of the ``titlebody``
    variants: ``title_body`` (title + body of the question), ``upvoted_answer`` and, in
    ``..._best_and_down_voted_answer_jsonl``, ``downvoted_answer``. The ``stackexchange_title_best_voted_answer_jsonl``
    variant (default path) reuses that card; its question column is assumed to be ``title_body`` or ``title``
    (not verifiable), so the question is read from the first present of ``question_fields``.

    Field mapping: (``title_body`` | ``title``, ``upvoted_answer``); ``downvoted_answer``, when present, is kept
    as a hard negative (unused in stage 1, which takes in-batch negatives only).
    Language: ``en``, except the non-English sites (``ru``, ``ja``, ``pt``, ``es``: Stack Overflow in those
    languages) when named as the hub config or as a local file (``ru.jsonl.gz``, ``ru.stackoverflow.com.jsonl``);
    ``lang`` overrides.
    Prefixes: ``query: `` / ``passage: ``; instruction: :attr:`instruction`.
    Filters: an empty question or answer is skipped (``skipped/empty_<field>``; an empty ``downvoted_answer`` is
    dropped). The export itself already dropped questions whose title or body is under 20 characters or whose
    body is over 4096 (its card).
    """

    source_name = "stackexchange"
    default_path = "flax-sentence-embeddings/stackexchange_title_best_voted_answer_jsonl"
    default_lang = "en"
    one_language_per_file = True
    task = "stackexchange"
    question_fields = ("title_body", "title")
    answer_field = "upvoted_answer"
    negative_field = "downvoted_answer"

    def lang_of_config(self, hub_config: str) -> str | None:
        return SITE_LANGS.get(hub_config)

    def lang_of_file(self, file: str) -> str | None:
        if file.startswith("hub:"):
            return None
        name = Path(file).name
        site = name[: len(name) - len(data_suffix(name))]
        return SITE_LANGS.get(site.removesuffix(".stackoverflow.com"))

    def pair(self, record: Mapping) -> Mapping:
        question = get_text(record, first_key(record, self.question_fields))
        out = {"query": question, "positive": get_text(record, self.answer_field)}
        if record.get(self.negative_field) is not None:  # an empty negative is dropped, not the pair
            negative = get_field(record, self.negative_field).strip()
            out["negatives"] = [negative] if negative else []
        return out
