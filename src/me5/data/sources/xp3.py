"""xP3: (prompt, response) pairs, mE5 Table 1 (80M sampled)."""

from __future__ import annotations

from collections.abc import Mapping

from me5.data.sources.raw import RawPairSource, get_text


class XP3Pairs(RawPairSource):
    """xP3 (prompt, response).

    Raw origin: ``bigscience/xP3``, jsonl files per language folder (``fr/merged_fr.jsonl``, ``code/...``; 46
    languages + code). Verified fields (its card): ``inputs`` (the prompted input) and ``targets`` (the
    output to generate) - the records carry **no** language field; the ``xP3x`` variant adds ``language``
    (``fra_Latn``...), which is used when present.

    Field mapping: (``inputs``, ``targets``).
    Language: the record's ``language``/``lang``, else ``lang``, else the language folder of a local file in the
    published layout (``fr/merged_fr.jsonl`` -> ``fr``: folder and file must agree), else the config name (configs
    are language folders).
    Prefixes: ``query: `` / ``passage: ``; instruction: :attr:`instruction`.
    Filters: empty prompt or response is skipped (``skipped/empty_inputs``, ``skipped/empty_targets``).
    """

    source_name = "xp3"
    default_path = "bigscience/xP3"
    configs_are_langs = True
    default_lang = "und"
    file_lang_pattern = r"(?:^|/)(?P<lang>[A-Za-z][A-Za-z0-9_-]*)/merged_(?P=lang)\.jsonl(?:\.gz)?$"
    task = "xp3"

    def pair(self, record: Mapping) -> Mapping:
        return {"query": get_text(record, "inputs"), "positive": get_text(record, "targets")}
