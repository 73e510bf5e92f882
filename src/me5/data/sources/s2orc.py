"""S2ORC: (title, abstract) and citation pairs, mE5 Table 1 (50M sampled)."""

from __future__ import annotations

from collections.abc import Mapping

from me5.data.sources.raw import RawPairSource, get_field, get_text, nonempty
from me5.errors import ConfigError, DataError, SkipRecord

# mode -> (hub config, query field, positive field, task (me5.prompts.TASKS), symmetric)
MODES = {
    "title-abstract": (
        "title-abstract-pair", "title", "abstract",
        "s2orc", False,
    ),
    "title-citation": (
        "title-citation-pair", "title", "citation",
        "s2orc_title_citation", True,
    ),
    "abstract-citation": (
        "abstract-citation-pair", "abstract", "citation",
        "s2orc_abstract_citation", True,
    ),
}


class S2ORCPairs(RawPairSource):
    """S2ORC (title, abstract) and citation pairs, by ``mode``.

    Raw origin: ``sentence-transformers/s2orc`` (parquet). Verified subsets and columns (its card):
        - ``title-abstract-pair``: ``title``, ``abstract`` (strings);
        - ``title-citation-pair``: ``title``, ``citation`` (the cited paper's title);
        - ``abstract-citation-pair``: ``abstract``, ``citation`` (the cited paper's abstract; a list of strings
          in one revision of the card, a string in others: both are accepted, a list gives its first text).
    ``mode`` (``title-abstract``, ``title-citation``, ``abstract-citation``) picks the subset (the default
    ``hub_config``) and the two columns.

    Language: English (``en``).
    Prefixes: ``title-abstract`` is asymmetric (``query: `` / ``passage: ``); the citation modes pair texts of
    the same kind (paper <-> cited paper), so they are symmetric (``query: `` on both sides) - a choice, mE5 does
    not say. Instructions per mode (E5-mistral style), see ``MODES``.
    Filters: empty texts are skipped (``skipped/empty_<column>``); an empty citation list -> ``skipped/empty_citation``.
    """

    source_name = "s2orc"
    default_path = "sentence-transformers/s2orc"
    default_lang = "en"
    one_language_per_file = True

    def __init__(self, path: str | None = None, *, mode: str = "title-abstract", **kwargs):
        if mode not in MODES:
            raise ConfigError("data.mode", f"unknown '{mode}'; choose one of {sorted(MODES)}")
        self.mode = mode
        self.default_hub_config, self.query_field, self.positive_field, self.task, self.symmetric = MODES[mode]
        super().__init__(path, **kwargs)

    def pair(self, record: Mapping) -> Mapping:
        query = get_text(record, self.query_field)
        value = get_field(record, self.positive_field, kind=(str, list))
        if isinstance(value, list):
            if not all(isinstance(v, str) for v in value):
                raise DataError(f"raw field '{self.positive_field}': expected a list of strings", field=self.positive_field)
            value = next((v for v in value if v.strip()), None)
            if value is None:
                raise SkipRecord(f"empty_{self.positive_field}")
        return {"query": query, "positive": nonempty(value, self.positive_field)}
