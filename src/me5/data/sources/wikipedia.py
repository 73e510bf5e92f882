"""Wikipedia: (section title, passage) pairs, mE5 Table 1 (150M sampled)."""

from __future__ import annotations

from collections.abc import Mapping

from me5.data.sources.raw import RawPairSource, get_field, get_text, nonempty
from me5.errors import ConfigError, DataError, SkipRecord


class WikipediaPairs(RawPairSource):
    """Wikipedia (hierarchical section title, passage).

    Pair: query = the article title, extended by the section headings when the record has them
    (``"Title > Section > Subsection"``); positive = the passage.

    Raw origin: the mE5 model card links ``intfloat/wikipedia``, a *loading-script* dataset
    (``wikipedia.py``, derived from ``olm/wikipedia``; loaded with ``language=``/``date=`` builder arguments). Its
    card describes the pairs as "(hierarchical section title, passage)", but its exact output fields could not be
    verified from the stored sources, and ``datasets>=4`` no longer runs loading scripts. The default path is
    therefore ``wikimedia/wikipedia`` (parquet; configs ``<date>.<lang>``, e.g. ``20231101.en``), whose fields are
    verified from its card and its many re-uploads: ``id``, ``url``, ``title``, ``text``.

    Field mapping, by record shape:
        - sectioned record (the ``intfloat/wikipedia`` style, assumed): ``title`` plus a section heading path in
          the first present field of ``section_fields`` (a string or a list of headings, outermost first) and the
          passage in ``text`` -> (``title > headings``, ``text``);
        - article record (``wikimedia/wikipedia``): (``title``, the lead passage), where ``passage="lead"`` takes
          the first non-empty paragraph (line) of ``text`` and ``passage="text"`` the whole article.

    Language: the record's ``lang``/``language``, else ``lang``, else the config folder of a local file
    (``20231101.de/train-00000-of-00021.parquet`` -> ``de``), else the config's suffix (``20231101.de`` -> ``de``).
    Prefixes: ``query: `` / ``passage: `` (asymmetric); instruction: :attr:`instruction`.
    Filters: an empty title or passage is skipped (``skipped/empty_title``, ``skipped/empty_text``).
    """

    source_name = "wikipedia"
    default_path = "wikimedia/wikipedia"
    default_hub_config = "20231101.en"
    default_lang = "en"
    file_lang_pattern = r"(?:^|/)\d{8}\.(?P<lang>[A-Za-z][A-Za-z0-9_-]*)/[^/]+$"
    task = "wikipedia"
    section_fields = ("section_titles", "section_title", "section", "sections", "headings")
    section_sep = " > "

    def __init__(self, path: str | None = None, *, passage: str = "lead", **kwargs):
        if passage not in {"lead", "text"}:
            raise ConfigError("data.passage", f"unknown '{passage}'; choose lead or text")
        self.passage = passage
        super().__init__(path, **kwargs)

    def lang_of_config(self, hub_config: str) -> str | None:
        return hub_config.rpartition(".")[2] or None

    def pair(self, record: Mapping) -> Mapping:
        title = get_text(record, "title")
        text = get_field(record, "text")
        section_key = next((k for k in self.section_fields if record.get(k) is not None), None)
        if section_key is None:
            return {"query": title, "positive": self._article_passage(text)}
        headings = record[section_key]
        if isinstance(headings, str):
            headings = [headings]
        if not isinstance(headings, list) or not all(isinstance(h, str) for h in headings):
            raise DataError(f"raw field '{section_key}': expected a string or a list of strings", field=section_key)
        path = [title, *(h.strip() for h in headings if h.strip())]
        return {"query": self.section_sep.join(path), "positive": nonempty(text, "text")}

    def _article_passage(self, text: str) -> str:
        if self.passage == "text":
            return nonempty(text, "text")
        for paragraph in text.splitlines():  # paragraphs are lines in the dump text
            if paragraph.strip():
                return paragraph.strip()
        raise SkipRecord("empty_text")
