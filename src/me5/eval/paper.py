"""The mE5 paper's numbers (Wang et al. 2024, arXiv 2402.05672, Tables 3-6) beside ours.

:data:`PAPER` is the one table that says which of our metric keys maps to which published number: one row per
key with the four model columns (mE5-small / base / large / large-instruct), the paper's table and a tag:
**[P]** published in that table, **[D]** derived by us from a published table (the MTEB category means are
means over the Table 7 datasets of each task type). The numbers are copied from ``shared/reference/
me5-recipe.md`` ("Paper results"); ``tests/test_paper.py`` checks them against it.

Our keys are the flat metrics of a run (values in [0, 1]; the paper's are x100):

* ``mteb/avg``: the plain mean over the 56 English MTEB datasets (Table 3); ``mteb/avg/<type>``: the mean over
  one task type, ``<type>`` being MTEB's type name in lower case (``classification``, ``clustering``,
  ``pairclassification``, ``reranking``, ``retrieval``, ``sts``, ``summarization``).
* ``miracl/ndcg@10``, ``miracl/recall@100``: the macro average over the 16 dev languages (Table 4);
  ``miracl/<lang>/ndcg@10``, ``miracl/<lang>/recall@100``: one language (Table 6), as
  :class:`~me5.eval.retrieval.RetrievalEvaluator` names them.
* ``bucc/f1``: BUCC 2018, the mean over de/fr/ru/zh-en (Table 5); ``tatoeba/accuracy``: Tatoeba, the mean over
  the 112 languages (Table 5; whether the paper's number is F1 or accuracy is not stated [U]).

:func:`side_by_side` turns a metrics dict into rows (ours x100, the paper's, ours minus the paper's); a metric
the run lacks shows as ``-`` (``None`` in JSON and W&B rows). :meth:`SideBySide.markdown` renders
``results.md`` sections, :meth:`SideBySide.records` the ``metrics.json`` entries and
:meth:`SideBySide.table` the columns and rows of a W&B table (``wandb.Table(columns=..., data=...)``; this module
imports no W&B).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

MODELS = ("small", "base", "large", "large-instruct")
MODEL_TITLES = {m: f"mE5-{m}" for m in MODELS}

MTEB = "MTEB English"
MIRACL = "MIRACL dev"
BITEXT = "Bitext mining"
BENCHMARKS = (MTEB, MIRACL, BITEXT)  # the order of the sections


@dataclass(frozen=True)
class PaperNumber:
    """One published number per model: ``values`` in :data:`MODELS` order, x100 as printed."""

    key: str  # our metric key
    benchmark: str  # the section (results.md) it goes under
    metric: str  # the row label
    values: tuple[float, float, float, float]  # small, base, large, large-instruct
    source: str  # the paper's table
    tag: str  # "P" published, "D" derived by us

    def value(self, model: str) -> float:
        return self.values[MODELS.index(model)]


def _n(key, benchmark, metric, values, source, tag="P") -> PaperNumber:
    return PaperNumber(key, benchmark, metric, tuple(values), source, tag)


# fmt: off
# ------------------------------------------------------------------------------------------------------------
# our key                         benchmark  row label                  small  base  large  l-instr   table
PAPER: tuple[PaperNumber, ...] = (
    # Table 3 [P]: MTEB English, the 56-dataset average (mE5-base is 59.4 in Table 7, exact mean 59.45)
    _n("mteb/avg",                    MTEB, "average (56 datasets)",   (57.9, 59.5, 61.5, 64.4), "Table 3"),
    # [D]: the category means of Table 7 (recipe: "computed by us from Table 7")
    _n("mteb/avg/classification",     MTEB, "Classification (12)",     (70.7, 73.0, 74.8, 77.6), "Table 7 mean", "D"),
    _n("mteb/avg/clustering",         MTEB, "Clustering (11)",         (37.1, 37.9, 41.0, 47.1), "Table 7 mean", "D"),
    _n("mteb/avg/pairclassification", MTEB, "PairClassification (3)",  (82.6, 83.6, 84.7, 86.2), "Table 7 mean", "D"),
    _n("mteb/avg/reranking",          MTEB, "Reranking (4)",           (53.9, 54.8, 55.8, 58.6), "Table 7 mean", "D"),
    _n("mteb/avg/retrieval",          MTEB, "Retrieval (15)",          (46.7, 48.9, 51.4, 52.5), "Table 7 mean", "D"),
    _n("mteb/avg/sts",                MTEB, "STS (10)",                (79.1, 80.3, 81.5, 84.8), "Table 7 mean", "D"),
    _n("mteb/avg/summarization",      MTEB, "Summarization (1)",       (30.0, 30.1, 29.7, 30.4), "Table 7 mean", "D"),
    # Table 4 [P]: MIRACL dev, the mean over the 16 languages
    _n("miracl/ndcg@10",              MIRACL, "nDCG@10 (mean of 16)",  (60.8, 62.3, 66.5, 65.7), "Table 4"),
    _n("miracl/recall@100",           MIRACL, "R@100 (mean of 16)",    (92.4, 93.1, 94.3, 94.6), "Table 4"),
    # Table 6 [P]: MIRACL dev per language, nDCG@10
    _n("miracl/ar/ndcg@10",           MIRACL, "ar nDCG@10",            (71.4, 71.6, 76.0, 76.8), "Table 6"),
    _n("miracl/bn/ndcg@10",           MIRACL, "bn nDCG@10",            (68.2, 70.2, 75.9, 73.9), "Table 6"),
    _n("miracl/en/ndcg@10",           MIRACL, "en nDCG@10",            (48.0, 51.2, 52.9, 51.5), "Table 6"),
    _n("miracl/es/ndcg@10",           MIRACL, "es nDCG@10",            (51.2, 51.5, 52.9, 53.7), "Table 6"),
    _n("miracl/fa/ndcg@10",           MIRACL, "fa nDCG@10",            (53.3, 57.4, 59.0, 59.4), "Table 6"),
    _n("miracl/fi/ndcg@10",           MIRACL, "fi nDCG@10",            (73.3, 74.4, 77.8, 77.3), "Table 6"),
    _n("miracl/fr/ndcg@10",           MIRACL, "fr nDCG@10",            (47.6, 49.7, 54.5, 53.7), "Table 6"),
    _n("miracl/hi/ndcg@10",           MIRACL, "hi nDCG@10",            (55.2, 58.4, 62.0, 60.3), "Table 6"),
    _n("miracl/id/ndcg@10",           MIRACL, "id nDCG@10",            (50.7, 51.1, 52.9, 52.1), "Table 6"),
    _n("miracl/ja/ndcg@10",           MIRACL, "ja nDCG@10",            (63.6, 64.7, 70.6, 69.0), "Table 6"),
    _n("miracl/ko/ndcg@10",           MIRACL, "ko nDCG@10",            (61.2, 62.2, 66.5, 65.3), "Table 6"),
    _n("miracl/ru/ndcg@10",           MIRACL, "ru nDCG@10",            (59.1, 61.5, 67.4, 67.9), "Table 6"),
    _n("miracl/sw/ndcg@10",           MIRACL, "sw nDCG@10",            (68.4, 71.1, 74.9, 72.5), "Table 6"),
    _n("miracl/te/ndcg@10",           MIRACL, "te nDCG@10",            (81.3, 75.2, 84.6, 83.4), "Table 6"),
    _n("miracl/th/ndcg@10",           MIRACL, "th nDCG@10",            (75.0, 75.2, 80.2, 78.6), "Table 6"),
    _n("miracl/zh/ndcg@10",           MIRACL, "zh nDCG@10",            (45.9, 51.5, 56.0, 56.2), "Table 6"),
    # Table 6 [P]: MIRACL dev per language, R@100
    _n("miracl/ar/recall@100",        MIRACL, "ar R@100",              (96.2, 95.9, 97.3, 97.5), "Table 6"),
    _n("miracl/bn/recall@100",        MIRACL, "bn R@100",              (97.4, 96.6, 98.2, 98.2), "Table 6"),
    _n("miracl/en/recall@100",        MIRACL, "en R@100",              (85.3, 86.4, 87.6, 88.2), "Table 6"),
    _n("miracl/es/recall@100",        MIRACL, "es R@100",              (87.6, 88.6, 89.1, 89.3), "Table 6"),
    _n("miracl/fa/recall@100",        MIRACL, "fa R@100",              (90.4, 91.2, 92.9, 92.9), "Table 6"),
    _n("miracl/fi/recall@100",        MIRACL, "fi R@100",              (96.3, 96.9, 98.1, 97.9), "Table 6"),
    _n("miracl/fr/recall@100",        MIRACL, "fr R@100",              (89.5, 90.0, 90.6, 91.7), "Table 6"),
    _n("miracl/hi/recall@100",        MIRACL, "hi R@100",              (91.0, 92.6, 93.9, 94.1), "Table 6"),
    _n("miracl/id/recall@100",        MIRACL, "id R@100",              (86.2, 87.4, 87.9, 88.4), "Table 6"),
    _n("miracl/ja/recall@100",        MIRACL, "ja R@100",              (95.2, 96.0, 97.1, 96.9), "Table 6"),
    _n("miracl/ko/recall@100",        MIRACL, "ko R@100",              (92.0, 91.6, 93.4, 93.0), "Table 6"),
    _n("miracl/ru/recall@100",        MIRACL, "ru R@100",              (92.2, 92.7, 95.5, 95.4), "Table 6"),
    _n("miracl/sw/recall@100",        MIRACL, "sw R@100",              (94.7, 95.6, 96.7, 97.2), "Table 6"),
    _n("miracl/te/recall@100",        MIRACL, "te R@100",              (97.6, 98.0, 99.2, 99.0), "Table 6"),
    _n("miracl/th/recall@100",        MIRACL, "th R@100",              (98.2, 98.0, 98.9, 98.7), "Table 6"),
    _n("miracl/zh/recall@100",        MIRACL, "zh R@100",              (87.9, 92.1, 93.3, 94.9), "Table 6"),
    # Table 5 [P]: bitext mining
    _n("bucc/f1",                     BITEXT, "BUCC (4 languages)",      (93.2, 98.1, 98.6, 99.0), "Table 5"),
    _n("tatoeba/accuracy",            BITEXT, "Tatoeba (112 languages)", (64.2, 68.1, 75.7, 83.8), "Table 5"),
)
# fmt: on
BY_KEY: dict[str, PaperNumber] = {n.key: n for n in PAPER}
assert len(BY_KEY) == len(PAPER), "a metric key maps to two paper numbers"


def paper_model(name: str) -> str:
    """The :data:`MODELS` column of ``name``: ``base``, ``mE5-base``, ``intfloat/multilingual-e5-base``, ..."""
    key = str(name).strip().lower().replace("_", "-").rsplit("/", 1)[-1]
    for prefix in ("multilingual-e5-", "me5-"):
        key = key.removeprefix(prefix)
    if key not in MODELS:
        raise ValueError(f"no paper column '{name}'; the paper's models are {', '.join(MODELS)}")
    return key


# ---------------------------------------------------------------------------------------------- rows
@dataclass(frozen=True)
class Row:
    """One line of the side by side: ``ours`` x100 (``None`` when the run lacks the metric), ``delta`` = ours - paper."""

    benchmark: str
    metric: str
    key: str
    ours: float | None
    paper: float
    delta: float | None
    source: str
    tag: str


COLUMNS = ("benchmark", "metric", "key", "ours", "paper", "delta", "source")


@dataclass(frozen=True)
class SideBySide:
    model: str  # a MODELS column
    rows: tuple[Row, ...]

    @property
    def title(self) -> str:
        return MODEL_TITLES[self.model]

    def markdown(self, *, heading: str = "##") -> str:
        """One section per benchmark: ``| metric | ours | mE5-<model> | Δ |`` with one decimal, ``-`` where missing."""
        blocks = []
        for bench in [b for b in BENCHMARKS if any(r.benchmark == b for r in self.rows)]:
            rows = [r for r in self.rows if r.benchmark == bench]
            header = ["metric", "ours", f"{self.title} (paper)", "Δ", "source"]
            body = [[r.metric, _fmt(r.ours), f"{r.paper:.1f}", _fmt(r.delta, sign=True), f"{r.source} [{r.tag}]"]
                    for r in rows]
            widths = [max(len(line[i]) for line in [header, *body]) for i in range(len(header))]

            def line(cells, widths=widths):
                return "| " + " | ".join(
                    c.ljust(w) if i in (0, 4) else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths))
                ) + " |"

            rule = "|" + "|".join("-" * (w + 2) if i in (0, 4) else "-" * (w + 1) + ":"
                                  for i, w in enumerate(widths)) + "|"
            blocks.append("\n".join([f"{heading} {bench}", "", line(header), rule, *(line(b) for b in body)]))
        return "\n\n".join(blocks) + "\n"

    def records(self) -> dict:
        """JSON-ready (no NaN): ``{"model": ..., "paper": "arXiv 2402.05672", "rows": [{key, benchmark, ...}]}``."""
        return {
            "model": self.model,
            "paper": "arXiv 2402.05672",
            "rows": [
                {"key": r.key, "benchmark": r.benchmark, "metric": r.metric, "ours": _round(r.ours),
                 "paper": r.paper, "delta": _round(r.delta), "source": r.source, "tag": r.tag}
                for r in self.rows
            ],
        }

    def table(self) -> tuple[list[str], list[list]]:
        """``(columns, data)`` for a W&B table; missing values are ``None``."""
        return list(COLUMNS), [
            [r.benchmark, r.metric, r.key, _round(r.ours), r.paper, _round(r.delta), f"{r.source} [{r.tag}]"]
            for r in self.rows
        ]


def side_by_side(
    metrics: Mapping[str, float],
    model: str,
    *,
    benchmarks: Sequence[str] | None = None,
    only_present: bool = False,
) -> SideBySide:
    """Our flat ``metrics`` (values in [0, 1]) beside the paper's column ``model`` (see :func:`paper_model`).

    ``benchmarks``: keep these sections (:data:`BENCHMARKS`; default all). ``only_present``: leave out the rows
    the run has no metric for (default: they show as ``-``). A value outside [0, 1] is a ValueError (it is
    probably x100 already); NaN counts as missing.
    """
    col = paper_model(model)
    keep = BENCHMARKS if benchmarks is None else tuple(benchmarks)
    unknown = set(keep) - set(BENCHMARKS)
    if unknown:
        raise ValueError(f"unknown benchmarks {sorted(unknown)}; have {list(BENCHMARKS)}")
    rows = []
    for n in PAPER:
        if n.benchmark not in keep:
            continue
        value = metrics.get(n.key)
        ours = None
        if value is not None and not math.isnan(float(value)):
            value = float(value)
            if not -1e-9 <= value <= 1 + 1e-9:
                raise ValueError(f"metric '{n.key}' is {value}: expected a fraction in [0, 1] (not x100)")
            ours = 100 * value
        if ours is None and only_present:
            continue
        paper = n.value(col)
        rows.append(Row(n.benchmark, n.metric, n.key, ours, paper, None if ours is None else ours - paper,
                        n.source, n.tag))
    return SideBySide(col, tuple(rows))


def _fmt(value: float | None, *, sign: bool = False) -> str:
    if value is None:
        return "-"
    return f"{value:+.1f}" if sign else f"{value:.1f}"


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 4)
