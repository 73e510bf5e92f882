"""Multilingual CC News: (title, news content) pairs, mE5 Table 1 (160M sampled)."""

from __future__ import annotations

from collections.abc import Mapping

from me5.data.sources.raw import RawPairSource, get_text


class CCNewsPairs(RawPairSource):
    """Multilingual CC News (title, news content).

    Raw origin: ``intfloat/multilingual_cc_news`` (linked from the mE5 model card). Its card lists the fields
    ``title``, ``maintext``, ``url``, ``date_publish``; it is a loading script (``languages=[...]`` builder
    argument) over the files ``<year>/<lang>.jsonl.gz`` of ``CloverSearch/cc-news-mutlilingual``, one file per
    year and language. ``datasets>=4`` no longer runs loading scripts: download those files and point ``path``
    at the folder with ``data_files`` picking years/languages (``"*/*.jsonl.gz"``: all of them; the ``.gz`` files
    are read as they are).

    Field mapping: (``title``, ``maintext``).
    Language: the record's ``lang``/``language`` if it has one, else ``lang``, else the file name in the
    published layout (``2019/de.jsonl.gz`` -> ``de``; the records the card lists carry no language).
    Prefixes: ``query: `` / ``passage: ``; instruction: :attr:`instruction`.
    Filters: empty title or body is skipped (``skipped/empty_title``, ``skipped/empty_maintext``); articles
    without a body are common in CC-News.
    """

    source_name = "cc_news"
    default_path = "intfloat/multilingual_cc_news"
    default_lang = "und"
    file_lang_pattern = r"(?:^|/)(?:19|20)\d\d/(?P<lang>[a-z]{2,3})\.jsonl(?:\.gz)?$"
    task = "cc_news"

    def pair(self, record: Mapping) -> Mapping:
        return {"query": get_text(record, "title"), "positive": get_text(record, "maintext")}
