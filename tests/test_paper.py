"""The paper's numbers (mE5 Tables 3-6) against the recipe, and the side by side with ours."""

from __future__ import annotations

import json
import re

import pytest

from me5.eval.miracl import LANGUAGES
from me5.eval.paper import BENCHMARKS, BY_KEY, MODELS, PAPER, paper_model, side_by_side
from tests.helpers import ROOT

RECIPE = next((p for p in (ROOT.parent / "shared", ROOT / "shared")
               if (p / "reference" / "me5-recipe.md").is_file()), ROOT.parent / "shared") / "reference" / "me5-recipe.md"
MTEB_TYPES = {"classification": 12, "clustering": 11, "pairclassification": 3, "reranking": 4, "retrieval": 15,
              "sts": 10, "summarization": 1}  # datasets per type (Table 7; 56 in all)


def paper(key, model):
    return BY_KEY[key].value(model)


# ---------------------------------------------------------------------------------------------- the numbers
@pytest.mark.parametrize(
    ("key", "model", "value"),
    [
        ("mteb/avg", "small", 57.9), ("mteb/avg", "base", 59.5), ("mteb/avg", "large-instruct", 64.4),  # Table 3
        ("mteb/avg/clustering", "large-instruct", 47.1), ("mteb/avg/summarization", "large", 29.7),  # [D]
        ("mteb/avg/pairclassification", "base", 83.6), ("mteb/avg/sts", "small", 79.1),
        ("miracl/ndcg@10", "large", 66.5), ("miracl/ndcg@10", "large-instruct", 65.7),  # Table 4
        ("miracl/recall@100", "small", 92.4), ("miracl/recall@100", "large-instruct", 94.6),
        ("bucc/f1", "base", 98.1), ("bucc/f1", "large-instruct", 99.0),  # Table 5
        ("tatoeba/accuracy", "small", 64.2), ("tatoeba/accuracy", "large", 75.7),
        ("miracl/ar/ndcg@10", "small", 71.4), ("miracl/te/ndcg@10", "base", 75.2),  # Table 6
        ("miracl/zh/ndcg@10", "large-instruct", 56.2), ("miracl/en/recall@100", "large", 87.6),
        ("miracl/th/recall@100", "small", 98.2), ("miracl/ko/recall@100", "base", 91.6),
    ],
)
def test_spot_checks_against_the_recipe(key, model, value):
    assert paper(key, model) == value


def test_the_map_is_complete_and_cited():
    keys = [n.key for n in PAPER]
    assert len(keys) == len(set(keys))
    expected = {"mteb/avg", "miracl/ndcg@10", "miracl/recall@100", "bucc/f1", "tatoeba/accuracy"}
    expected |= {f"mteb/avg/{t}" for t in MTEB_TYPES}
    expected |= {f"miracl/{lang}/{m}" for lang in LANGUAGES for m in ("ndcg@10", "recall@100")}
    assert set(keys) == expected
    for n in PAPER:
        assert len(n.values) == len(MODELS) and n.benchmark in BENCHMARKS
        assert re.fullmatch(r"Table [3-7]( mean)?", n.source), n
        assert n.tag == ("D" if n.key.startswith("mteb/avg/") else "P"), n


def test_table_4_is_the_mean_of_table_6():
    for metric in ("ndcg@10", "recall@100"):
        for model in MODELS:
            per_lang = [paper(f"miracl/{lang}/{metric}", model) for lang in LANGUAGES]
            assert sum(per_lang) / 16 == pytest.approx(paper(f"miracl/{metric}", model), abs=0.1), (metric, model)


def test_the_mteb_category_means_give_table_3():
    for model in MODELS:
        weighted = sum(paper(f"mteb/avg/{t}", model) * n for t, n in MTEB_TYPES.items()) / 56
        assert weighted == pytest.approx(paper("mteb/avg", model), abs=0.1), model


@pytest.mark.skipif(not RECIPE.is_file(), reason="shared/reference/me5-recipe.md is not here")
def test_every_number_equals_the_recipe():
    text = RECIPE.read_text(encoding="utf-8")

    def row(label):
        m = re.search(rf"^\| {re.escape(label)} \|(.+)\|$", text, re.M)
        return [float(c.strip().strip("*")) for c in m.group(1).split("|")]

    assert [paper("mteb/avg", m) for m in MODELS] == row("45.2")[-4:]  # Table 3: LaBSE's 45.2 opens the row
    cats = re.search(r"^\| Class \| Clust.*\n\|[-|]+\|\n\|(.+)\|$", text, re.M).group(1).split("|")
    for t, cell in zip(MTEB_TYPES, cats, strict=True):
        assert [paper(f"mteb/avg/{t}", m) for m in MODELS] == [float(v) for v in cell.strip().split("/")], t
    assert [paper("miracl/ndcg@10", m) for m in MODELS] == row("nDCG@10")[-4:]
    assert [paper("miracl/recall@100", m) for m in MODELS] == row("R@100")[-4:]
    assert [paper("bucc/f1", m) for m in MODELS] == row("BUCC (4 languages)")[-4:]
    assert [paper("tatoeba/accuracy", m) for m in MODELS] == row("Tatoeba (112 languages)")[-4:]
    for lang in LANGUAGES:
        ndcg, rec = re.search(rf"^\| {lang} \| ([\d./]+) \| ([\d./]+) \|$", text, re.M).groups()
        assert [paper(f"miracl/{lang}/ndcg@10", m) for m in MODELS] == [float(v) for v in ndcg.split("/")]
        assert [paper(f"miracl/{lang}/recall@100", m) for m in MODELS] == [float(v) for v in rec.split("/")]


# ---------------------------------------------------------------------------------------------- side by side
FAKE = {
    "miracl/ndcg@10": 0.6012,
    "miracl/recall@100": 0.93,
    "miracl/ar/ndcg@10": 0.70,
    "miracl/sw/recall@100": float("nan"),  # counts as missing
    "bucc/f1": 0.985,
    "mteb/avg": 0.60,
    "mteb/avg/sts": 0.81,
    "sample/ndcg@10": 0.5,  # not a paper number: ignored
}


def test_rows_with_deltas():
    sbs = side_by_side(FAKE, "base")
    assert sbs.model == "base" and len(sbs.rows) == len(PAPER)
    by_key = {r.key: r for r in sbs.rows}
    r = by_key["miracl/ndcg@10"]
    assert (r.benchmark, r.source, r.tag) == ("MIRACL dev", "Table 4", "P")
    assert r.ours == pytest.approx(60.12) and r.paper == 62.3 and r.delta == pytest.approx(-2.18)
    assert by_key["bucc/f1"].delta == pytest.approx(98.5 - 98.1)
    assert by_key["mteb/avg/sts"].tag == "D" and by_key["mteb/avg/sts"].delta == pytest.approx(0.7)
    assert by_key["miracl/sw/recall@100"].ours is None and by_key["miracl/sw/recall@100"].delta is None
    assert by_key["tatoeba/accuracy"].ours is None and by_key["tatoeba/accuracy"].paper == 68.1
    present = side_by_side(FAKE, "mE5-large", only_present=True)
    assert [r.key for r in present.rows] == ["mteb/avg", "mteb/avg/sts", "miracl/ndcg@10", "miracl/recall@100",
                                             "miracl/ar/ndcg@10", "bucc/f1"]
    assert present.rows[2].paper == 66.5
    assert [r.key for r in side_by_side(FAKE, "small", benchmarks=["Bitext mining"]).rows] == \
        ["bucc/f1", "tatoeba/accuracy"]


def test_markdown_sections():
    md = side_by_side(FAKE, "large-instruct").markdown()
    assert [line for line in md.splitlines() if line.startswith("## ")] == \
        ["## MTEB English", "## MIRACL dev", "## Bitext mining"]
    lines = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]]
             for line in md.splitlines() if line.startswith("| ")}
    assert lines["metric"] == ["ours", "mE5-large-instruct (paper)", "Δ", "source"]
    assert lines["nDCG@10 (mean of 16)"] == ["60.1", "65.7", "-5.6", "Table 4 [P]"]
    assert lines["BUCC (4 languages)"] == ["98.5", "99.0", "-0.5", "Table 5 [P]"]
    assert lines["Tatoeba (112 languages)"] == ["-", "83.8", "-", "Table 5 [P]"]
    assert lines["sw R@100"] == ["-", "97.2", "-", "Table 6 [P]"]
    assert lines["STS (10)"] == ["81.0", "84.8", "-3.8", "Table 7 mean [D]"]
    assert side_by_side({}, "small").markdown().count(" - |") >= len(PAPER)  # nothing measured: all "-"


def test_json_and_wandb_rows():
    sbs = side_by_side(FAKE, "small")
    rec = sbs.records()
    json.dumps(rec, allow_nan=False)  # JSON-ready: no NaN
    assert rec["model"] == "small" and len(rec["rows"]) == len(PAPER)
    row = next(r for r in rec["rows"] if r["key"] == "miracl/ar/ndcg@10")
    assert row == {"key": "miracl/ar/ndcg@10", "benchmark": "MIRACL dev", "metric": "ar nDCG@10", "ours": 70.0,
                   "paper": 71.4, "delta": -1.4, "source": "Table 6", "tag": "P"}
    columns, data = sbs.table()
    assert columns == ["benchmark", "metric", "key", "ours", "paper", "delta", "source"]
    assert len(data) == len(PAPER) and all(len(d) == len(columns) for d in data)
    assert data[0] == ["MTEB English", "average (56 datasets)", "mteb/avg", 60.0, 57.9, 2.1, "Table 3 [P]"]
    assert next(d for d in data if d[2] == "tatoeba/accuracy")[3:6] == [None, 64.2, None]


def test_model_names_and_bad_values():
    assert paper_model("intfloat/multilingual-e5-large-instruct") == "large-instruct"
    assert paper_model("mE5-base") == "base" and paper_model("large_instruct") == "large-instruct"
    with pytest.raises(ValueError, match="small, base, large, large-instruct"):
        side_by_side(FAKE, "tiny")
    with pytest.raises(ValueError, match="miracl/ndcg@10.*not x100"):
        side_by_side({"miracl/ndcg@10": 62.3}, "base")
    with pytest.raises(ValueError, match="unknown benchmarks"):
        side_by_side(FAKE, "base", benchmarks=["BEIR"])
