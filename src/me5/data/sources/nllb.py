"""NLLB: translation pairs, mE5 Table 1 (160M sampled)."""

from __future__ import annotations

from collections.abc import Mapping

from me5.data.sources.raw import RawPairSource, get_field, nonempty
from me5.errors import ConfigError, DataError, SkipRecord


class NLLBPairs(RawPairSource):
    """NLLB bitext (sentence, its translation).

    Raw origin: ``allenai/nllb`` (linked from the mE5 model card), one config per language pair named
    ``<src>-<tgt>`` in FLORES-200 codes (``eng_Latn-fra_Latn``, ``ace_Latn-ban_Latn``). Verified fields (its
    card): ``translation`` (``{<src>: text, <tgt>: text}``), ``laser_score``, ``source_sentence_lid``,
    ``target_sentence_lid``, ``source_sentence_source``, ``source_sentence_url``, ``target_sentence_source``,
    ``target_sentence_url``. The repo ships gzipped TSV read by a loading script (not run by ``datasets>=4``):
    export the records in this shape to jsonl/parquet and point ``path`` at them.

    Field mapping: (``translation[src_lang]``, ``translation[tgt_lang]``). The pair comes from ``src_lang``/
    ``tgt_lang``, else the config name, else the record's two ``translation`` keys in order.
    Language: ``"<src>-<tgt>"`` (e.g. ``eng_Latn-fra_Latn``).
    Prefixes: symmetric, ``query: `` on both sides (mE5 model-card FAQ: bitext is a symmetric task);
    instruction on both sides: "Retrieve parallel sentences." (unilm ``utils.py``, bitext mining).
    Filters: ``laser_score`` below ``min_laser_score`` (default: none) -> ``skipped/low_laser_score``; a
    "translation" identical to its source -> ``skipped/identical``.
    """

    source_name = "nllb"
    default_path = "allenai/nllb"
    default_lang = "und"
    # one file per pair named by its config (eng_Latn-fra_Latn.jsonl): its records' "<src>-<tgt>" language
    file_lang_pattern = r"(?:^|/)(?P<lang>[a-z]{3}_[A-Z][a-z]{3}-[a-z]{3}_[A-Z][a-z]{3})\.jsonl(?:\.gz)?$"
    symmetric = True
    task = "nllb"

    def __init__(
        self,
        path: str | None = None,
        *,
        src_lang: str | None = None,
        tgt_lang: str | None = None,
        min_laser_score: float | None = None,
        hub_config: str | None = None,
        **kwargs,
    ):
        if (src_lang is None) != (tgt_lang is None):
            raise ConfigError("data.src_lang", "give both src_lang and tgt_lang, or neither")
        if src_lang is None and hub_config is not None:
            src_lang, sep, tgt_lang = hub_config.partition("-")
            if not sep or not src_lang or not tgt_lang:
                raise ConfigError("data.hub_config", f"'{hub_config}' is not a '<src>-<tgt>' NLLB config")
        self.src_lang, self.tgt_lang = src_lang, tgt_lang
        self.min_laser_score = min_laser_score
        lang = kwargs.pop("lang", None) or (f"{src_lang}-{tgt_lang}" if src_lang else None)
        super().__init__(path, hub_config=hub_config, lang=lang, **kwargs)

    def pair(self, record: Mapping) -> Mapping:
        translation = get_field(record, "translation", kind=Mapping)
        src, tgt = self.src_lang, self.tgt_lang
        if src is None:  # a parquet struct column holds every language of the file: null where a pair has none
            langs = [lang for lang, text in translation.items() if text is not None]
            if len(langs) != 2:
                raise DataError(f"expected 2 languages, got {sorted(langs)}", field="translation")
            src, tgt = langs
        query = nonempty(get_field(translation, src, label=f"translation.{src}"), "translation")
        positive = nonempty(get_field(translation, tgt, label=f"translation.{tgt}"), "translation")
        if self.min_laser_score is not None:
            score = get_field(record, "laser_score", kind=(int, float))
            if score < self.min_laser_score:
                raise SkipRecord("low_laser_score")
        if query == positive:
            raise SkipRecord("identical")
        return {"query": query, "positive": positive, "lang": f"{src}-{tgt}"}
