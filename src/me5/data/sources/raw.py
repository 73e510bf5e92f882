"""The shared base of the stage-1 sources that read a corpus in its *raw* published layout.

Each stage-1 source (mE5 Table 1) is a small subclass that picks the two texts of its pair out of one raw
record. This module holds what they share: reading a text field with a precise error, counted skips for
empty texts, the language policy, and a default hub config.

Error policy (all sources):
    - a missing field or a field of the wrong type is *malformed* input: :class:`~me5.errors.DataError` naming
      the field (the base class adds the file and line);
    - an empty, whitespace-only or null text is a known quirk of web-scale corpora, so it is skipped on purpose
      and counted as ``skipped/empty_<field>`` instead of stopping the run.

Language policy (all sources), first match wins:
    1. a language carried by the record (``lang`` or ``language``; see :meth:`RawPairSource.record_lang`);
    2. the ``lang`` constructor argument;
    3. the language named by a local file's path in the source's published layout, for corpora that ship one
       file or folder per language (:meth:`RawPairSource.lang_of_file`: mC4 ``c4-de.tfrecord-*.json.gz``, CC News
       ``2019/de.jsonl.gz``, Wikipedia ``20231101.de/*.parquet``, xP3 ``de/merged_de.jsonl``), so one source can
       read a whole multilingual folder;
    4. the language named by the hub config (:meth:`RawPairSource.lang_of_config`, e.g. ``20231101.de`` -> ``de``);
    5. the class's ``default_lang``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

from me5.data.source import Source
from me5.errors import DataError, SkipRecord

RECORD_LANG_FIELDS = ("lang", "language")


def get_field(record: Mapping, key: str, *, kind: type | tuple[type, ...] = str, label: str | None = None) -> Any:
    """``record[key]``, checked to be a ``kind``; a :class:`DataError` naming ``label or key`` otherwise."""
    label = label or key
    if key not in record or record[key] is None:
        raise DataError(f"missing raw field '{key}' (the record has: {sorted(record)})", field=label)
    value = record[key]
    if not isinstance(value, kind):
        want = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise DataError(f"raw field '{key}': expected {want}, got {type(value).__name__}", field=label)
    return value


def has(record: Mapping, column: str) -> bool:
    """The record has ``column``, not null: how a layout (a record shape) is known by its marker column. A null
    column counts as absent, as in :func:`get_field`: a parquet file (or a ``datasets`` stream) that mixes layouts
    has every layout's columns, null where a row has none."""
    return record.get(column) is not None


def nonempty(text: str, name: str) -> str:
    """``text`` stripped; an empty one is skipped and counted as ``skipped/empty_<name>``."""
    text = text.strip()
    if not text:
        raise SkipRecord(f"empty_{name}")
    return text


def get_text(record: Mapping, key: str, *, label: str | None = None) -> str:
    """A required, non-empty text field (stripped); see the module's error policy.

    A field that is present but null (a parquet null, JSON ``null``: e.g. CC-News articles whose body the
    extractor missed) counts as empty; a field that is absent altogether is malformed.
    """
    if key in record and record[key] is None:
        raise SkipRecord(f"empty_{label or key}")
    return nonempty(get_field(record, key, label=label), label or key)


def first_key(record: Mapping, keys: Sequence[str]) -> str:
    """The first of ``keys`` the record has (not null); a :class:`DataError` naming ``keys[0]`` if none."""
    for key in keys:
        if record.get(key) is not None:
            return key
    raise DataError(f"none of the raw fields {list(keys)} is present (the record has: {sorted(record)})", field=keys[0])


def require_mapping(record: Any) -> Mapping:
    if not isinstance(record, Mapping):
        raise DataError(f"a raw record must be an object, got {type(record).__name__}")
    return record


class RawPairSource(Source):
    """A :class:`~me5.data.source.Source` whose records are in a source's raw layout (see the module docstring).

    Subclasses set the usual class attributes (``source_name``, ``default_path``, ``default_lang``, prefixes,
    ``symmetric``, ``task``), optionally ``default_hub_config``, and implement :meth:`pair`.
    """

    default_hub_config: str | None = None
    configs_are_langs: bool = False  # the hub's config names are language codes (mC4, xP3)
    # a regex with a ``lang`` group, searched in a local file's "/"-separated path (see lang_of_file)
    file_lang_pattern: str | None = None
    # the source is one language (English-only corpora) unless a file's name says otherwise: language
    # temperature may stream each of its files as that language (every record is still checked)
    one_language_per_file: bool = False

    def __init__(self, path: str | None = None, *, hub_config: str | None = None, lang: str | None = None, **kwargs):
        self.lang_given = lang is not None  # an explicit lang wins over the file names
        if path is None and hub_config is None:  # the default config goes with the default hub id only
            hub_config = self.default_hub_config
        if lang is None and hub_config is not None:
            lang = self.lang_of_config(hub_config)
        super().__init__(path, hub_config=hub_config, lang=lang, **kwargs)
        self._file_langs: dict[str, str | None] = {}

    # ------------------------------------------------------------------ what a raw source overrides
    def pair(self, record: Mapping) -> Mapping:
        """The converted fields (``query``, ``positive``, optional ``negatives``) of one raw record.

        Abstract: every concrete source defines it (this base has no pair format of its own).
        """
        raise TypeError(f"{type(self).__name__} must define pair(record) to convert its raw records")

    def lang_of_config(self, hub_config: str) -> str | None:
        """The language a hub config names: the config itself where ``configs_are_langs``, else ``None``."""
        return hub_config if self.configs_are_langs else None

    def lang_of_file(self, file: str) -> str | None:
        """The language a local file's path names in the source's published layout (``file_lang_pattern``), or
        ``None`` (no pattern, no match, or a hub stream)."""
        if self.file_lang_pattern is None or file.startswith("hub:"):
            return None
        m = re.search(self.file_lang_pattern, file.replace("\\", "/"))
        return m["lang"] if m else None

    def file_lang(self, file: str) -> str | None:
        """The lang given to the source, else the language the file's published name gives, else the source's
        language for a one-language source, else ``None`` (memoised per file: it is asked once per record)."""
        if self.lang_given:
            return self.lang
        if file not in self._file_langs:
            lang = self.lang_of_file(file)
            self._file_langs[file] = self.lang if lang is None and self.one_language_per_file else lang
        return self._file_langs[file]

    def record_lang(self, record: Mapping) -> str | None:
        for key in RECORD_LANG_FIELDS:
            value = record.get(key)
            if isinstance(value, str) and value.strip():
                return value.strip()
        return None

    # ------------------------------------------------------------------ shared
    def convert(self, record: Mapping) -> Mapping:
        record = require_mapping(record)
        out = dict(self.pair(record))
        lang = self.record_lang(record)
        if lang and "lang" not in out:
            out["lang"] = lang
        return out
