"""mC4: (title, page content) pairs, mE5 Table 1 (160M sampled)."""

from __future__ import annotations

import re
from collections.abc import Mapping
from urllib.parse import unquote, urlsplit

from me5.data.sources.raw import RawPairSource, get_field, get_text
from me5.errors import ConfigError, SkipRecord

URL_WORD_SEP = re.compile(r"[-_+.\s]+")
URL_EXTENSION = re.compile(r"\.(s?html?|php\d?|aspx?|jsp|cgi)$", re.IGNORECASE)


class MC4Pairs(RawPairSource):
    """mC4 (title, page content).

    Raw origin: ``allenai/c4``, one config per language (``af`` ... ``zu``, ``bg-Latn``...; the mC4 3.1.0
    files ``multilingual/c4-<lang>.tfrecord-*.json.gz``). Verified fields (the legacy ``mc4.py`` script and
    the ``allenai/c4`` card): ``text``, ``timestamp``, ``url``.

    mC4 has **no title field**, so the "title" is derived, chosen by ``title_from`` (an assumption: mE5 does
    not say how it built these pairs):
        - ``"first_line"`` (default): the first non-empty line of ``text`` is the title and the remaining lines
          are the page content. A page of a single line is skipped (``skipped/single_line``); a first line
          longer than ``max_title_chars`` is not title-like and is skipped (``skipped/title_too_long``).
        - ``"url"``: the last path segment of ``url`` with separators turned into spaces
          (``.../news/new-bridge-opens.html`` -> ``new bridge opens``) is the title and the whole ``text`` the
          content; a URL without a wordy slug is skipped (``skipped/no_url_title``).

    Language: the record's ``lang``/``language``, else ``lang``, else the file name (``c4-de.tfrecord-00000-of-02048
    .json.gz`` -> ``de``, so a local copy of the whole ``multilingual/`` folder is one source), else the config name
    (configs are languages). The ``.json.gz`` files are read as they are.
    Prefixes: ``query: `` / ``passage: ``; instruction: :attr:`instruction`.
    """

    source_name = "mc4"
    default_path = "allenai/c4"
    default_hub_config = "en"
    configs_are_langs = True
    default_lang = "en"
    file_lang_pattern = r"(?:^|/)c4-(?P<lang>[A-Za-z]{2,3}(?:-Latn)?)(?:-validation)?\.tfrecord-[^/]*$"
    task = "mc4"
    max_title_chars = 200

    def __init__(self, path: str | None = None, *, title_from: str = "first_line", max_title_chars: int | None = None, **kwargs):
        if title_from not in {"first_line", "url"}:
            raise ConfigError("data.title_from", f"unknown '{title_from}'; choose first_line or url")
        self.title_from = title_from
        if max_title_chars is not None:
            self.max_title_chars = max_title_chars
        super().__init__(path, **kwargs)

    def pair(self, record: Mapping) -> Mapping:
        text = get_text(record, "text")
        if self.title_from == "url":
            return {"query": url_title(get_field(record, "url")), "positive": text}
        first, _, rest = text.partition("\n")
        rest = rest.strip()
        if not rest:
            raise SkipRecord("single_line")
        title = first.strip()
        if len(title) > self.max_title_chars:
            raise SkipRecord("title_too_long")
        return {"query": title, "positive": rest}


def url_title(url: str) -> str:
    """A title from a URL's last path segment; :class:`SkipRecord` (``no_url_title``) when it has no words."""
    try:
        path = urlsplit(url.strip()).path
    except ValueError:  # an unparsable URL (an unclosed IPv6 bracket, a host that is invalid under NFKC)
        raise SkipRecord("no_url_title") from None
    segments = [s for s in path.split("/") if s]
    slug = URL_EXTENSION.sub("", unquote(segments[-1])) if segments else ""
    words = [w for w in URL_WORD_SEP.split(slug) if w]
    if not any(any(c.isalpha() for c in w) for w in words):
        raise SkipRecord("no_url_title")
    return " ".join(words)
