"""The mE5 paper's numbers (Wang et al. 2024, arXiv 2402.05672, Tables 3-7) and the released checkpoints' published
scores, beside ours.

:data:`PAPER` is the one table that says which of our metric keys maps to which published number: one row per key
with the four model columns (mE5-small / base / large / large-instruct), the paper's table and a tag: **[P]**
published in that table, **[D]** derived by us from a published table (the MTEB category means are means over the
Table 7 datasets of each task type). The numbers are copied from ``shared/reference/me5-recipe.md`` ("Paper
results"); ``tests/test_paper.py`` checks them against it.

Our keys are the flat metrics of a run (values in [0, 1]; the paper's are x100). Each paper number is the mean of
per-item keys (its *items*, :attr:`PaperNumber.items`):

* ``mteb/avg``: the plain mean over the 56 English MTEB datasets (Table 3) of ``mteb/<Task>/score``;
  ``mteb/avg/<type>``: the mean over one task type, ``<type>`` being MTEB's type name in lower case
  (``classification``, ``clustering``, ``pairclassification``, ``reranking``, ``retrieval``, ``sts``,
  ``summarization``). ``mteb/<Task>/score`` is the paper's metric of the task (see below).
* ``miracl/ndcg@10``, ``miracl/recall@100``: the macro average over the 16 dev languages (Table 4) of
  ``miracl/<lang>/ndcg@10`` / ``miracl/<lang>/recall@100`` (Table 6), as
  :class:`~me5.eval.retrieval.RetrievalEvaluator` names them.
* ``bucc/f1``: BUCC 2018, the mean F1 over ``bucc/{de,fr,ru,zh}-en/f1`` (Table 5); ``tatoeba/f1``: Tatoeba, the
  mean F1 over the 112 ``tatoeba/<xxx>-eng/f1`` (Table 5).

**Which metric is the paper's: the evidence.** The released checkpoints' model cards (their ``model-index``:
mteb 1.x results published by the authors) give every MTEB English task, every BUCC pair and every Tatoeba pair
with accuracy and F1. Copied from github.com/embeddings-benchmark/results, ``results/intfloat__multilingual-e5-
<model>/external/*.json`` at commit ``aa79a85c3a07fea223f64a45588ccddf5b046625`` (mteb's ``load_external.py``
conversion of the cards, added in ``29546d77``, metric names fixed in ``6dc609ba``, removed as duplicates in
``090916e6``; a copy of the large-instruct card itself, github.com/rdion044/e5-small ``README.md`` at commit
``274baa43b0e13e37fafa6428dbc7938e62e5c439``, gives the same means). Means over the paper's pairs, x100:

================  ======================  ======================  ==================
model             Tatoeba (112 pairs)     BUCC (4 pairs)          Table 5
                  accuracy    F1          accuracy    F1          Tatoeba / BUCC
================  ==========  ==========  ==========  ==========  ==================
mE5-small         68.64       **64.21**   93.68       **93.20**   64.2 / 93.2
mE5-base          71.32       **68.05**   98.27       **98.05**   68.1 / 98.1
mE5-large         78.65       **75.74**   98.70       **98.55**   75.7 / 98.6
mE5-large-instr.  86.06       **83.76**   99.10       **99.00**   83.8 / 99.0
================  ==========  ==========  ==========  ==========  ==================

F1 (mteb's main score: scikit-learn's weighted F1 of the top-1 neighbours) reproduces all eight numbers to 0.05;
accuracy is 2.3 to 4.4 points above Table 5 on Tatoeba and 0.1 to 0.5 above it on BUCC. Both rows use F1 (the
Tatoeba key was ``tatoeba/accuracy`` before this evidence; it is ``tatoeba/f1``). The cards' datasets are those of
:mod:`me5.eval.bitext`: BUCC at ``mteb/bucc-bitext-mining`` revision ``d51519689f`` (the *lists* layout, mteb 2's
task ``BUCC``), Tatoeba at ``mteb/tatoeba-bitext-mining`` revision ``9080400076`` (mteb 2.26 pins ``69e8f12da6``).

MTEB English: the cards' per-task scores, with MTEB v1's main score of each task type (accuracy, V-measure,
cosine AP, MAP, nDCG@10, cosine Spearman), give Table 3 (56-dataset means 57.87 / 59.45 / 61.50 / 64.41 against
57.9 / 59.5 / 61.5 / 64.4; Table 7 prints mE5-base's as 59.4) and every category mean of Table 7 to within 0.07
(the [D] means are means of Table 7's rounded numbers). One metric differs in mteb 2, which this project runs:
pair classification's main score became ``max_ap`` (the best AP over cosine, dot, Euclidean and
Manhattan scores); the cards' ``cos_sim_ap`` gives Table 7's means (82.59 / 84.75 for small / large, Table 7
82.6 / 84.7) where ``max_ap`` does not (82.65 / 84.85). :func:`me5.eval.mteb.evaluate_mteb` therefore reports
``mteb/<Task>/score`` = mteb's ``cosine_ap`` for pair classification and mteb's main score for every other type
(``mteb/<Task>/main_score`` stays mteb 2's own), and the averages are over ``score``. MIRACL (Tables 4 and 6) is
nDCG@10 and R@100 as named; mteb's own runs of the released small and base checkpoints (mteb 1.18.0, task
``MIRACLRetrieval``, dev; embeddings-benchmark/results ``results/intfloat__multilingual-e5-{small,base}/<revision>/
MIRACLRetrieval.json`` at commit ``bbfb3059169b857d26baf5a1ca803377abcca060``) reproduce Table 4 (60.84 / 62.31
nDCG@10, 92.36 / 93.09 R@100, against 60.8 / 62.3 and 92.4 / 93.1).

**The released column.** :data:`RELEASED_FILE` (``assets/released_scores.json``) holds the released checkpoints'
published per-task scores under our keys, with their sources: every MTEB English task, BUCC and Tatoeba pair
(F1 and accuracy) from the model cards as above, and MIRACL per language (dev) from mteb's runs of the
checkpoints where those reproduce the paper (small, base; large has only fa; large-instruct's run, 55.4 mean
nDCG@10 against Table 4's 65.7, is left out). :func:`released_scores` reads it. Beside the paper's number,
:func:`side_by_side` shows the released checkpoint's mean **over the same items as ours**, so a run of
``intfloat/multilingual-e5-base`` shows whether the evaluation setup reproduces the released model, and a partial
run still has a fair comparison.

**Coverage.** A paper number is a mean over all its items; a run that has only some of them (10 of Tatoeba's 112
pairs) gets a row labelled with its coverage (``Tatoeba F1 (10 of 112 pairs)``) and no delta against the paper. A
mean whose items the run does not hold is labelled ``(? of 112 pairs)``, and has no paper delta either.

:func:`side_by_side` turns a metrics dict into rows (ours x100, the released checkpoint's, the paper's, and the
deltas); a metric the run lacks shows as ``-`` (``None`` in JSON and W&B rows). :meth:`SideBySide.markdown` renders
``results.md`` sections (and a task-by-task section: each MTEB task and bitext pair of the run beside the released
checkpoint's), :meth:`SideBySide.records` the ``metrics.json`` entries and :meth:`SideBySide.table` the columns and
rows of a W&B table (``wandb.Table(columns=..., data=...)``; this module imports no W&B).
"""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from importlib import resources

MODELS = ("small", "base", "large", "large-instruct")
MODEL_TITLES = {m: f"mE5-{m}" for m in MODELS}

MTEB = "MTEB English"
MIRACL = "MIRACL dev"
BITEXT = "Bitext mining"
BENCHMARKS = (MTEB, MIRACL, BITEXT)  # the order of the sections

#: the released checkpoints' published scores (see the module docstring), inside the package
RELEASED_FILE = "assets/released_scores.json"

#: the 56 English datasets of mE5 Table 7 (MTEB English v1), by task type; names as mteb 2.26's registry spells
#: them (no renames were needed: mteb 2 keeps the v1 names and adds new versions beside them, e.g.
#: ``SummEvalSummarization.v2``, ``STS22.v2``, ``Touche2020Retrieval.v3``, ``*Clustering.v2``, which the paper
#: did not use). ``CQADupstackRetrieval`` is mteb's aggregate of the 12 CQADupStack forums (the mean of their
#: nDCG@10), counted once as in the paper.
PAPER_MTEB_EN_BY_TYPE: dict[str, tuple[str, ...]] = {
    "Classification": (
        "AmazonCounterfactualClassification", "AmazonPolarityClassification", "AmazonReviewsClassification",
        "Banking77Classification", "EmotionClassification", "ImdbClassification", "MassiveIntentClassification",
        "MassiveScenarioClassification", "MTOPDomainClassification", "MTOPIntentClassification",
        "ToxicConversationsClassification", "TweetSentimentExtractionClassification",
    ),
    "Clustering": (
        "ArxivClusteringP2P", "ArxivClusteringS2S", "BiorxivClusteringP2P", "BiorxivClusteringS2S",
        "MedrxivClusteringP2P", "MedrxivClusteringS2S", "RedditClustering", "RedditClusteringP2P",
        "StackExchangeClustering", "StackExchangeClusteringP2P", "TwentyNewsgroupsClustering",
    ),
    "PairClassification": ("SprintDuplicateQuestions", "TwitterSemEval2015", "TwitterURLCorpus"),
    "Reranking": ("AskUbuntuDupQuestions", "MindSmallReranking", "SciDocsRR", "StackOverflowDupQuestions"),
    "Retrieval": (
        "ArguAna", "ClimateFEVER", "CQADupstackRetrieval", "DBPedia", "FEVER", "FiQA2018", "HotpotQA", "MSMARCO",
        "NFCorpus", "NQ", "QuoraRetrieval", "SCIDOCS", "SciFact", "Touche2020", "TRECCOVID",
    ),
    "STS": (
        "BIOSSES", "SICK-R", "STS12", "STS13", "STS14", "STS15", "STS16", "STS17", "STS22", "STSBenchmark",
    ),
    "Summarization": ("SummEval",),
}
PAPER_MTEB_EN: list[str] = [name for names in PAPER_MTEB_EN_BY_TYPE.values() for name in names]


def mteb_task_key(task: str) -> str:
    """Our key of an MTEB task's score in the paper's metric (``mteb/<Task>/score``)."""
    return f"mteb/{task}/score"


@dataclass(frozen=True)
class PaperNumber:
    """One published number per model: ``values`` in :data:`MODELS` order, x100 as printed.

    ``name`` and ``unit`` make the row label: ``f"{name} ({N} {unit})"`` where ``N`` is the number of items the
    paper averages (``Tatoeba (112 pairs)``), ``f"{name} ({n} of {N} {unit})"`` for a run with ``n`` of them; a
    number of one item is labelled ``name``.
    """

    key: str  # our metric key
    benchmark: str  # the section (results.md) it goes under
    name: str  # the row label, without coverage
    unit: str  # what its items are (datasets, languages, pairs)
    values: tuple[float, float, float, float]  # small, base, large, large-instruct
    source: str  # the paper's table
    tag: str  # "P" published, "D" derived by us

    def value(self, model: str) -> float:
        return self.values[MODELS.index(model)]

    @property
    def items(self) -> tuple[str, ...]:
        """The per-item keys this number is the mean of (``(key,)`` for a number of its own)."""
        return _items(self.key)

    def label(self, covered: int | None = None) -> str:
        """The row label: all items (``covered`` None or complete), ``n of N`` or ``? of N`` (``covered`` -1)."""
        n_items = len(self.items)
        if self.items == (self.key,):
            return self.name
        unit = self.unit.removesuffix("s") if n_items == 1 else self.unit
        if covered is None or covered == n_items:
            return f"{self.name} ({n_items} {unit})"
        return f"{self.name} ({'?' if covered < 0 else covered} of {n_items} {unit})"


def _n(key, benchmark, name, unit, values, source, tag="P") -> PaperNumber:
    return PaperNumber(key, benchmark, name, unit, tuple(values), source, tag)


# fmt: off
# ------------------------------------------------------------------------------------------------------------
# our key                        bench.  row label             unit         small  base  large  l-instr   table
PAPER: tuple[PaperNumber, ...] = (
    # Table 3 [P]: MTEB English, the 56-dataset average (mE5-base is 59.4 in Table 7, exact mean 59.45)
    _n("mteb/avg",                    MTEB,   "average",            "datasets",  (57.9, 59.5, 61.5, 64.4), "Table 3"),
    # [D]: the category means of Table 7 (recipe: "computed by us from Table 7")
    _n("mteb/avg/classification",     MTEB,   "Classification",     "datasets",  (70.7, 73.0, 74.8, 77.6), "Table 7 mean", "D"),
    _n("mteb/avg/clustering",         MTEB,   "Clustering",         "datasets",  (37.1, 37.9, 41.0, 47.1), "Table 7 mean", "D"),
    _n("mteb/avg/pairclassification", MTEB,   "PairClassification", "datasets",  (82.6, 83.6, 84.7, 86.2), "Table 7 mean", "D"),
    _n("mteb/avg/reranking",          MTEB,   "Reranking",          "datasets",  (53.9, 54.8, 55.8, 58.6), "Table 7 mean", "D"),
    _n("mteb/avg/retrieval",          MTEB,   "Retrieval",          "datasets",  (46.7, 48.9, 51.4, 52.5), "Table 7 mean", "D"),
    _n("mteb/avg/sts",                MTEB,   "STS",                "datasets",  (79.1, 80.3, 81.5, 84.8), "Table 7 mean", "D"),
    _n("mteb/avg/summarization",      MTEB,   "Summarization",      "datasets",  (30.0, 30.1, 29.7, 30.4), "Table 7 mean", "D"),
    # Table 4 [P]: MIRACL dev, the mean over the 16 languages
    _n("miracl/ndcg@10",              MIRACL, "nDCG@10 mean",       "languages", (60.8, 62.3, 66.5, 65.7), "Table 4"),
    _n("miracl/recall@100",           MIRACL, "R@100 mean",         "languages", (92.4, 93.1, 94.3, 94.6), "Table 4"),
    # Table 6 [P]: MIRACL dev per language, nDCG@10
    _n("miracl/ar/ndcg@10",           MIRACL, "ar nDCG@10",         "",          (71.4, 71.6, 76.0, 76.8), "Table 6"),
    _n("miracl/bn/ndcg@10",           MIRACL, "bn nDCG@10",         "",          (68.2, 70.2, 75.9, 73.9), "Table 6"),
    _n("miracl/en/ndcg@10",           MIRACL, "en nDCG@10",         "",          (48.0, 51.2, 52.9, 51.5), "Table 6"),
    _n("miracl/es/ndcg@10",           MIRACL, "es nDCG@10",         "",          (51.2, 51.5, 52.9, 53.7), "Table 6"),
    _n("miracl/fa/ndcg@10",           MIRACL, "fa nDCG@10",         "",          (53.3, 57.4, 59.0, 59.4), "Table 6"),
    _n("miracl/fi/ndcg@10",           MIRACL, "fi nDCG@10",         "",          (73.3, 74.4, 77.8, 77.3), "Table 6"),
    _n("miracl/fr/ndcg@10",           MIRACL, "fr nDCG@10",         "",          (47.6, 49.7, 54.5, 53.7), "Table 6"),
    _n("miracl/hi/ndcg@10",           MIRACL, "hi nDCG@10",         "",          (55.2, 58.4, 62.0, 60.3), "Table 6"),
    _n("miracl/id/ndcg@10",           MIRACL, "id nDCG@10",         "",          (50.7, 51.1, 52.9, 52.1), "Table 6"),
    _n("miracl/ja/ndcg@10",           MIRACL, "ja nDCG@10",         "",          (63.6, 64.7, 70.6, 69.0), "Table 6"),
    _n("miracl/ko/ndcg@10",           MIRACL, "ko nDCG@10",         "",          (61.2, 62.2, 66.5, 65.3), "Table 6"),
    _n("miracl/ru/ndcg@10",           MIRACL, "ru nDCG@10",         "",          (59.1, 61.5, 67.4, 67.9), "Table 6"),
    _n("miracl/sw/ndcg@10",           MIRACL, "sw nDCG@10",         "",          (68.4, 71.1, 74.9, 72.5), "Table 6"),
    _n("miracl/te/ndcg@10",           MIRACL, "te nDCG@10",         "",          (81.3, 75.2, 84.6, 83.4), "Table 6"),
    _n("miracl/th/ndcg@10",           MIRACL, "th nDCG@10",         "",          (75.0, 75.2, 80.2, 78.6), "Table 6"),
    _n("miracl/zh/ndcg@10",           MIRACL, "zh nDCG@10",         "",          (45.9, 51.5, 56.0, 56.2), "Table 6"),
    # Table 6 [P]: MIRACL dev per language, R@100
    _n("miracl/ar/recall@100",        MIRACL, "ar R@100",           "",          (96.2, 95.9, 97.3, 97.5), "Table 6"),
    _n("miracl/bn/recall@100",        MIRACL, "bn R@100",           "",          (97.4, 96.6, 98.2, 98.2), "Table 6"),
    _n("miracl/en/recall@100",        MIRACL, "en R@100",           "",          (85.3, 86.4, 87.6, 88.2), "Table 6"),
    _n("miracl/es/recall@100",        MIRACL, "es R@100",           "",          (87.6, 88.6, 89.1, 89.3), "Table 6"),
    _n("miracl/fa/recall@100",        MIRACL, "fa R@100",           "",          (90.4, 91.2, 92.9, 92.9), "Table 6"),
    _n("miracl/fi/recall@100",        MIRACL, "fi R@100",           "",          (96.3, 96.9, 98.1, 97.9), "Table 6"),
    _n("miracl/fr/recall@100",        MIRACL, "fr R@100",           "",          (89.5, 90.0, 90.6, 91.7), "Table 6"),
    _n("miracl/hi/recall@100",        MIRACL, "hi R@100",           "",          (91.0, 92.6, 93.9, 94.1), "Table 6"),
    _n("miracl/id/recall@100",        MIRACL, "id R@100",           "",          (86.2, 87.4, 87.9, 88.4), "Table 6"),
    _n("miracl/ja/recall@100",        MIRACL, "ja R@100",           "",          (95.2, 96.0, 97.1, 96.9), "Table 6"),
    _n("miracl/ko/recall@100",        MIRACL, "ko R@100",           "",          (92.0, 91.6, 93.4, 93.0), "Table 6"),
    _n("miracl/ru/recall@100",        MIRACL, "ru R@100",           "",          (92.2, 92.7, 95.5, 95.4), "Table 6"),
    _n("miracl/sw/recall@100",        MIRACL, "sw R@100",           "",          (94.7, 95.6, 96.7, 97.2), "Table 6"),
    _n("miracl/te/recall@100",        MIRACL, "te R@100",           "",          (97.6, 98.0, 99.2, 99.0), "Table 6"),
    _n("miracl/th/recall@100",        MIRACL, "th R@100",           "",          (98.2, 98.0, 98.9, 98.7), "Table 6"),
    _n("miracl/zh/recall@100",        MIRACL, "zh R@100",           "",          (87.9, 92.1, 93.3, 94.9), "Table 6"),
    # Table 5 [P]: bitext mining, F1 (the evidence is in the module docstring)
    _n("bucc/f1",                     BITEXT, "BUCC F1",            "pairs",     (93.2, 98.1, 98.6, 99.0), "Table 5"),
    _n("tatoeba/f1",                  BITEXT, "Tatoeba F1",         "pairs",     (64.2, 68.1, 75.7, 83.8), "Table 5"),
)
# fmt: on
BY_KEY: dict[str, PaperNumber] = {n.key: n for n in PAPER}
assert len(BY_KEY) == len(PAPER), "a metric key maps to two paper numbers"


@functools.cache
def _items(key: str) -> tuple[str, ...]:
    """The per-item keys of a paper number (see the module docstring)."""
    if key == "mteb/avg":
        return tuple(mteb_task_key(t) for t in PAPER_MTEB_EN)
    if key.startswith("mteb/avg/"):
        (names,) = [v for t, v in PAPER_MTEB_EN_BY_TYPE.items() if t.lower() == key.rsplit("/", 1)[1]]
        return tuple(mteb_task_key(t) for t in names)
    if key in ("miracl/ndcg@10", "miracl/recall@100"):
        from me5.eval.miracl import LANGUAGES

        metric = key.split("/")[1]
        return tuple(f"miracl/{lang}/{metric}" for lang in LANGUAGES)
    if key in ("bucc/f1", "tatoeba/f1"):
        from me5.eval.bitext import TASK_PAIRS

        task = key.split("/")[0]
        return tuple(f"{task}/{pair}/f1" for pair in TASK_PAIRS[task])
    return (key,)


def paper_model(name: str) -> str:
    """The :data:`MODELS` column of ``name``: ``base``, ``mE5-base``, ``intfloat/multilingual-e5-base``, ..."""
    key = str(name).strip().lower().replace("_", "-").rsplit("/", 1)[-1]
    for prefix in ("multilingual-e5-", "me5-"):
        key = key.removeprefix(prefix)
    if key not in MODELS:
        raise ValueError(f"no paper column '{name}'; the paper's models are {', '.join(MODELS)}")
    return key


# ---------------------------------------------------------------------------------------------- released
@dataclass(frozen=True)
class Released:
    """The published scores of one released checkpoint (fractions, our keys) and where they come from."""

    model: str  # a MODELS column
    hub_id: str  # intfloat/multilingual-e5-<model>
    scores: Mapping[str, float]
    sources: tuple[Mapping[str, str], ...]

    def mean(self, keys: Sequence[str]) -> float | None:
        """The mean over ``keys`` (fraction), or None when one of them is not published."""
        if not keys or any(k not in self.scores for k in keys):
            return None
        return sum(self.scores[k] for k in keys) / len(keys)


@functools.cache
def released_scores(model: str) -> Released:
    """The released checkpoint of a :data:`MODELS` column (or any name :func:`paper_model` reads)."""
    col = paper_model(model)
    data = json.loads(resources.files("me5.eval").joinpath(RELEASED_FILE).read_text(encoding="utf-8"))
    entry = data["models"][col]
    return Released(col, entry["hub_id"], dict(entry["scores"]), tuple(entry["sources"]))


# ---------------------------------------------------------------------------------------------- rows
@dataclass(frozen=True)
class Row:
    """One line of the side by side (values x100, ``None`` where missing).

    ``ours``; ``released``: the released checkpoint's mean over the items ``ours`` covers (all of them when ours is
    missing or its items are unknown); ``paper``; ``delta`` = ours - paper, only when ours covers every item;
    ``released_delta`` = ours - released. ``covered``: how many of the ``of`` items the run holds (-1: unknown).
    """

    benchmark: str
    metric: str
    key: str
    ours: float | None
    paper: float
    delta: float | None
    source: str
    tag: str
    released: float | None = None
    released_delta: float | None = None
    covered: int = 0
    of: int = 1

    @property
    def complete(self) -> bool:
        return self.covered == self.of


@dataclass(frozen=True)
class TaskRow:
    """One MTEB task or bitext pair of the run beside the released checkpoint's score (x100)."""

    key: str
    ours: float
    released: float | None
    delta: float | None


COLUMNS = ("benchmark", "metric", "key", "ours", "released", "released_delta", "paper", "delta", "source")


@dataclass(frozen=True)
class SideBySide:
    model: str  # a MODELS column
    rows: tuple[Row, ...]
    tasks: tuple[TaskRow, ...] = ()
    released: Released | None = None

    @property
    def title(self) -> str:
        return MODEL_TITLES[self.model]

    def markdown(self, *, heading: str = "##") -> str:
        """One section per benchmark, ``| metric | ours | released | Δ | paper | Δ | source |`` with one decimal and
        ``-`` where missing, then the task-by-task section (when the run has per-task scores)."""
        hub = self.released.hub_id if self.released else "released"
        blocks = []
        for bench in [b for b in BENCHMARKS if any(r.benchmark == b for r in self.rows)]:
            rows = [r for r in self.rows if r.benchmark == bench]
            header = ["metric", "ours", f"{hub} (released)", "Δ", f"{self.title} (paper)", "Δ", "source"]
            body = [[r.metric, _fmt(r.ours), _fmt(r.released), _fmt(r.released_delta, sign=True), f"{r.paper:.1f}",
                     _fmt(r.delta, sign=True), f"{r.source} [{r.tag}]"] for r in rows]
            blocks.append(f"{heading} {bench}\n\n" + _table(header, body, left=(0, 6)))
        if self.tasks:
            header = ["task", "ours", f"{hub} (released)", "Δ"]
            body = [[t.key, _fmt(t.ours), _fmt(t.released), _fmt(t.delta, sign=True)] for t in self.tasks]
            blocks.append(f"{heading} Task by task: ours and {hub}\n\n" + _table(header, body, left=(0,)))
        return "\n\n".join(blocks) + "\n"

    def records(self) -> dict:
        """JSON-ready (no NaN): ``{"model", "paper", "released": {hub_id, sources}, "rows": [...], "tasks": [...]}``."""
        return {
            "model": self.model,
            "paper": "arXiv 2402.05672",
            "released": None if self.released is None else {"hub_id": self.released.hub_id,
                                                            "sources": [dict(s) for s in self.released.sources]},
            "rows": [
                {"key": r.key, "benchmark": r.benchmark, "metric": r.metric, "ours": _round(r.ours),
                 "released": _round(r.released), "released_delta": _round(r.released_delta), "paper": r.paper,
                 "delta": _round(r.delta), "covered": r.covered, "of": r.of, "source": r.source, "tag": r.tag}
                for r in self.rows
            ],
            "tasks": [{"key": t.key, "ours": _round(t.ours), "released": _round(t.released), "delta": _round(t.delta)}
                      for t in self.tasks],
        }

    def table(self) -> tuple[list[str], list[list]]:
        """``(columns, data)`` for a W&B table; missing values are ``None``."""
        return list(COLUMNS), [
            [r.benchmark, r.metric, r.key, _round(r.ours), _round(r.released), _round(r.released_delta), r.paper,
             _round(r.delta), f"{r.source} [{r.tag}]"]
            for r in self.rows
        ]


def side_by_side(
    metrics: Mapping[str, float],
    model: str,
    *,
    benchmarks: Sequence[str] | None = None,
    only_present: bool = False,
    released: bool = True,
) -> SideBySide:
    """Our flat ``metrics`` (values in [0, 1]) beside the paper's column ``model`` (see :func:`paper_model`) and
    (``released``) the released checkpoint's published scores (:func:`released_scores`).

    ``benchmarks``: keep these sections (:data:`BENCHMARKS`; default all). ``only_present``: leave out the rows
    the run has no metric for (default: they show as ``-``). A value outside [0, 1] is a ValueError (it is
    probably x100 already); NaN counts as missing. A mean over fewer items than the paper's is labelled with its
    coverage and has no delta against the paper (see the module docstring).
    """
    col = paper_model(model)
    keep = BENCHMARKS if benchmarks is None else tuple(benchmarks)
    unknown = set(keep) - set(BENCHMARKS)
    if unknown:
        raise ValueError(f"unknown benchmarks {sorted(unknown)}; have {list(BENCHMARKS)}")
    rel = released_scores(col) if released else None
    rows = []
    for n in PAPER:
        if n.benchmark not in keep:
            continue
        ours = _pct(metrics, n.key)
        if ours is None and only_present:
            continue
        items = n.items
        present = [k for k in items if _pct(metrics, k) is not None]
        if ours is None:
            covered = len(present)
        elif items == (n.key,):
            covered = 1
        else:
            covered = len(present) if present else -1  # an aggregate without its items: coverage unknown
        paper = n.value(col)
        rel_keys = present if ours is not None and covered > 0 else list(items)
        rel_mean = rel.mean(rel_keys) if rel is not None else None
        rel_value = None if rel_mean is None else 100 * rel_mean
        complete = covered == len(items)
        rows.append(Row(
            n.benchmark, n.label(covered if ours is not None else None), n.key, ours, paper,
            None if ours is None or not complete else ours - paper, n.source, n.tag,
            released=rel_value,
            released_delta=None if ours is None or rel_value is None or covered < 0 else ours - rel_value,
            covered=covered, of=len(items),
        ))
    tasks = []
    per_task = [k for n in PAPER if n.benchmark in keep and n.items != (n.key,) for k in n.items
                if not k.startswith("miracl/")]  # MIRACL's languages have rows of their own
    for key in per_task:
        ours = _pct(metrics, key)
        if ours is None:
            continue
        r = None if rel is None or key not in rel.scores else 100 * rel.scores[key]
        tasks.append(TaskRow(key, ours, r, None if r is None else ours - r))
    return SideBySide(col, tuple(rows), tuple(dict.fromkeys(tasks)), rel)


def _pct(metrics: Mapping[str, float], key: str) -> float | None:
    value = metrics.get(key)
    if value is None or math.isnan(float(value)):
        return None
    value = float(value)
    if not -1e-9 <= value <= 1 + 1e-9:
        raise ValueError(f"metric '{key}' is {value}: expected a fraction in [0, 1] (not x100)")
    return 100 * value


def _table(header: list[str], body: list[list[str]], *, left: tuple[int, ...]) -> str:
    widths = [max(len(line[i]) for line in [header, *body]) for i in range(len(header))]

    def line(cells):
        return "| " + " | ".join(c.ljust(w) if i in left else c.rjust(w)
                                 for i, (c, w) in enumerate(zip(cells, widths, strict=True))) + " |"

    rule = "|" + "|".join("-" * (w + 2) if i in left else "-" * (w + 1) + ":" for i, w in enumerate(widths)) + "|"
    return "\n".join([line(header), rule, *(line(b) for b in body)])


def _fmt(value: float | None, *, sign: bool = False) -> str:
    if value is None:
        return "-"
    return f"{value:+.1f}" if sign else f"{value:.1f}"


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 4)
