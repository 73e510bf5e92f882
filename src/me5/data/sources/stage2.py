"""The stage-2 (supervised fine-tuning) sources of mE5 Table 2, one small class each.

Every class reads its dataset as shipped (see :mod:`me5.data.sources.layouts` for the layouts and the shared
conventions: ``title + " " + text`` passages, first positive, given hard negatives, teacher scores only where the
raw data has them). Only training splits are used (mE5 model card). The mined hard negatives and teacher scores
of mE5 were not published; where a dataset ships none, a later mining/scoring step adds them.

Prefix policy: asymmetric retrieval sources give the query ``query: `` and passages ``passage: ``; symmetric
ones (NLI, Quora duplicates, NLLB bitext) give both sides ``query: `` (mE5 model-card FAQ; NLI symmetric per
unilm#1383). With the ``instruct`` prompt style (mE5-large-instruct) queries get
``Instruct: {instruction}\\nQuery: `` and passages nothing, symmetric sources the template on both sides; the
instructions are E5-mistral's (arXiv 2401.00368, Table 13), also used by unilm ``e5/utils.py``.

Hub ids and columns were checked against stored copies of the dataset cards and loading scripts; several repos
ship ``*.jsonl.gz`` behind a loading script, which recent ``datasets`` versions no longer run: download the files
and point ``path`` at the folder (the layout is the same; ``.jsonl.gz`` is read as it is).
"""

from __future__ import annotations

from collections.abc import Mapping

from me5.data.sources.layouts import SupervisedPairs, passage_text
from me5.data.sources.nllb import NLLBPairs
from me5.data.sources.raw import RawPairSource, get_text, has
from me5.errors import ConfigError


class MSMarcoPassage(SupervisedPairs):
    """MS MARCO passage ranking: (web search query, relevant passage), with the given hard negatives.

    Raw: ``Tevatron/msmarco-passage`` (train, ~401k queries; Tevatron layout, BM25 negatives). MS MARCO passages
    have no titles (RocketQA's ``"-"`` placeholder is dropped). ``Tevatron/msmarco-passage-aug`` and Tevatron's
    distillation files (a teacher ``score`` per passage) have the same layout. English.
    """

    source_name = "msmarco_passage"
    default_path = "Tevatron/msmarco-passage"
    default_lang = "en"
    task = "msmarco_passage"


class MSMarcoDocument(SupervisedPairs):
    """MS MARCO document ranking: (web search query, relevant document ``title + " " + body``).

    Raw: no public hub dataset with this pair was found. The best-supported layout is the public E5 training
    portion compiled by echo-embeddings and read by llm2vec (``cache/echo-data/msmarco_document.jsonl``:
    ``{query, positive, negative}`` strings, one hard negative); Tevatron-layout files built from the official
    TREC ``msmarco-docs.tsv`` + ``msmarco-doctrain-qrels.tsv`` work too. ``default_path`` is that local file.
    English.
    """

    source_name = "msmarco_document"
    default_path = "./data/echo-data/msmarco_document.jsonl"
    default_lang = "en"
    task = "msmarco_document"


class NaturalQuestions(SupervisedPairs):
    """Natural Questions (DPR version, as E5 used: unilm#1005): (question, Wikipedia passage).

    Raw: ``Tevatron/wikipedia-nq`` (train, ~58.6k; Tevatron layout from DPR's ``biencoder-nq-train``, passages
    with titles, DPR hard negatives; the extra ``answers`` column is not used). English.
    """

    source_name = "nq"
    default_path = "Tevatron/wikipedia-nq"
    default_lang = "en"
    task = "nq"


class TriviaQA(SupervisedPairs):
    """TriviaQA (DPR version): (question, Wikipedia passage).

    Raw: ``Tevatron/wikipedia-trivia`` (train, ~60.3k; same layout as ``Tevatron/wikipedia-nq``). English.
    """

    source_name = "triviaqa"
    default_path = "Tevatron/wikipedia-trivia"
    default_lang = "en"
    task = "triviaqa"


class SQuAD(SupervisedPairs):
    """SQuAD v1.1: (question, its Wikipedia paragraph ``title + " " + context``); no hard negatives.

    Raw: ``rajpurkar/squad`` (train, 87.6k questions over ~19k paragraphs): ``{id, title, context, question,
    answers}``; the article title's underscores become spaces. Layouts with hard negatives (e.g. ``BeastyZ/E5-R``
    config ``squad``: ``{query, positive: [..], negative: [..]}``) are read too. English.
    """

    source_name = "squad"
    default_path = "rajpurkar/squad"
    default_lang = "en"
    task = "squad"

    def pair(self, record: Mapping) -> Mapping:
        if not has(record, "context"):
            return super().pair(record)
        title = record.get("title")
        passage = {"title": title.replace("_", " ") if isinstance(title, str) else title, "text": record["context"]}
        return {"query": get_text(record, "question"), "positive": passage_text(passage, field="context", role="positive")}


class NLI(SupervisedPairs):
    """NLI (SNLI + MultiNLI as prepared for SimCSE): (premise, entailed hypothesis), contradiction = hard negative.

    Raw: ``sentence-transformers/nli-for-simcse`` config ``triplet`` (``{anchor, positive, negative}``, 274,951
    rows: Table 2's 275k). ``sentence-transformers/all-nli`` config ``triplet`` has the same columns. Symmetric
    (unilm#1383): ``query: `` on both sides. English.
    """

    source_name = "nli"
    default_path = "sentence-transformers/nli-for-simcse"
    default_hub_config = "triplet"
    default_lang = "en"
    symmetric = True
    task = "nli"


class ELI5(SupervisedPairs):
    """ELI5: (Reddit "explain like I'm five" question, an answer); no hard negatives.

    Raw: ``sentence-transformers/eli5`` (single ``pair`` subset). Its columns are assumed to be ``question`` and
    ``answer`` (sentence-transformers' naming for QA pairs; not confirmed from the card). Also reads
    ``BeastyZ/E5-R`` config ``eli5`` (``{query, positive: [..], negative: [..]}``). English.
    """

    source_name = "eli5"
    default_path = "sentence-transformers/eli5"
    default_lang = "en"
    task = "eli5"

    def pair(self, record: Mapping) -> Mapping:
        if not has(record, "answer"):
            return super().pair(record)
        return {"query": get_text(record, "question"), "positive": get_text(record, "answer")}


class DuReader(SupervisedPairs):
    """DuReader-retrieval: (Baidu search query, relevant web passage), Chinese.

    Raw: ``zyznull/dureader-retrieval-ranking`` (train, ~86k queries: Table 2's 86k; Tevatron layout, passages
    without titles). FlagEmbedding's copy in ``Shitao/bge-m3-data`` (``{query, pos, neg, pos_scores,
    neg_scores}``, with teacher scores) is read too. Language ``zh``.
    """

    source_name = "dureader"
    default_path = "zyznull/dureader-retrieval-ranking"
    default_lang = "zh"
    task = "dureader"


class FEVER(SupervisedPairs):
    """FEVER: (claim, Wikipedia article that supports or refutes it), with hard negatives.

    Raw: ``BeastyZ/E5-R`` config ``fever`` (``{query, positive: [..], negative: [..]}``, 71,257 rows; Table 2:
    70k). BEIR's FEVER has no record-per-query training file (corpus + qrels), so a BEIR copy must be joined first
    (Tevatron layout). English.
    """

    source_name = "fever"
    default_path = "BeastyZ/E5-R"
    default_hub_config = "fever"
    default_lang = "en"
    task = "fever"


class HotpotQA(SupervisedPairs):
    """HotpotQA: (multi-hop question, a supporting Wikipedia paragraph), with hard negatives.

    Raw: ``BeastyZ/E5-R`` config ``hotpot_qa`` (``{query, positive: [..], negative: [..]}``, 68,657 rows; Table 2:
    70k); FlagEmbedding's ``Shitao/bge-m3-data`` copy (``{query, pos, neg}``) is read too. English.
    """

    source_name = "hotpotqa"
    default_path = "BeastyZ/E5-R"
    default_hub_config = "hotpot_qa"
    default_lang = "en"
    task = "hotpotqa"


class QuoraDuplicates(SupervisedPairs):
    """Quora duplicate questions: (question, a duplicate question), a non-duplicate as hard negative.

    Raw: ``sentence-transformers/quora-duplicates`` config ``triplet`` (``{anchor, positive, negative}``, 101,762
    rows; Table 2 samples 15k; config ``pair`` has no negative). Symmetric: ``query: `` on both sides (as the unilm
    Quora evaluation does). English.
    """

    source_name = "quora"
    default_path = "sentence-transformers/quora-duplicates"
    default_hub_config = "triplet"
    default_lang = "en"
    symmetric = True
    task = "quora"


#: castorini/mr-tydi config name -> ISO 639-1 ("combined": all eleven languages, records carry no language)
MRTYDI_LANGS = {
    "arabic": "ar", "bengali": "bn", "english": "en", "finnish": "fi", "indonesian": "id", "japanese": "ja",
    "korean": "ko", "russian": "ru", "swahili": "sw", "telugu": "te", "thai": "th", "combined": "mul",
}  # fmt: skip


class MrTyDi(SupervisedPairs):
    """Mr. TyDi: (question, Wikipedia passage) in eleven languages, BM25 top-30 negatives.

    Raw: ``castorini/mr-tydi``, one config per language (``arabic`` ... ``thai``) and ``combined`` (all train
    sets, ~50k queries: Table 2's 50k; the default). Tevatron layout; some train queries have no negatives
    (kept; they are skipped as ``too_few_negatives`` when hard negatives are required). The language comes from
    the config (``combined`` -> ``mul``: its records do not say) or ``lang``.
    """

    source_name = "mrtydi"
    default_path = "castorini/mr-tydi"
    default_hub_config = "combined"
    default_lang = "mul"
    one_language_per_file = False
    task = "mrtydi"

    def lang_of_config(self, hub_config: str) -> str | None:
        if hub_config not in MRTYDI_LANGS:
            raise ConfigError("data.hub_config", f"unknown Mr. TyDi config '{hub_config}'; one of {sorted(MRTYDI_LANGS)}")
        return MRTYDI_LANGS[hub_config]


class MIRACL(SupervisedPairs):
    """MIRACL: (question, Wikipedia passage) in 16 languages, judged non-relevant passages as negatives.

    Raw: ``miracl/miracl``, one config per ISO language code (``ar bn en es fa fi fr hi id ja ko ru sw te th zh``
    have train sets, 40,203 queries in all: Table 2's 40k); Tevatron layout with titles. No default config: pass
    ``hub_config`` (its code is the language) or, for local files, ``lang``. FlagEmbedding's copy in
    ``Shitao/bge-m3-data`` (with teacher scores) is read too.
    """

    source_name = "miracl"
    default_path = "miracl/miracl"
    default_lang = "und"
    configs_are_langs = True
    one_language_per_file = False
    task = "miracl"


class NLLBSupervised(NLLBPairs):
    """NLLB bitext for fine-tuning (Table 2: 100k pairs): the stage-1 source's pair, read the same way.

    Raw: ``allenai/nllb`` (see :class:`~me5.data.sources.nllb.NLLBPairs` for the layout, field mapping, the
    ``"<src>-<tgt>"`` language and the ``min_laser_score`` filter). Symmetric: ``query: `` on both sides; mE5 does
    not state its prefixes for NLLB nor how its 100k pairs were chosen [U].
    """


STAGE2_SOURCES: dict[str, type[RawPairSource]] = {
    cls.source_name: cls
    for cls in (
        MSMarcoPassage, MSMarcoDocument, NaturalQuestions, TriviaQA, SQuAD, NLI, ELI5, NLLBSupervised, DuReader,
        FEVER, HotpotQA, QuoraDuplicates, MrTyDi, MIRACL,
    )
}  # fmt: skip
