"""Bitext mining (BUCC, Tatoeba): the published layouts, mteb's scores on the same embeddings, prompts, errors."""

from __future__ import annotations

import gzip
import json
import random
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from me5.errors import ConfigError, DataError
from me5.eval import bitext
from me5.eval.bitext import (
    TASK_PAIRS,
    BitextEvaluator,
    BitextPair,
    load_bitext,
    mining_metrics,
    nearest_targets,
    pair_files,
    score_bitext,
)
from me5.prompts import TASKS, PromptPolicy

E5 = PromptPolicy("e5")
FIX = Path(__file__).parent / "fixtures" / "bitext"
BUCC_V1 = FIX / "BUCC"  # mteb/BUCC (task BUCC): one record of lists per pair, parquet
BUCC_V2 = FIX / "bucc-bitext-mining"  # mteb/bucc-bitext-mining (task BUCC.v2): gold pairs as rows, jsonl.gz
TATOEBA = FIX / "tatoeba-bitext-mining"  # mteb/tatoeba-bitext-mining (task Tatoeba): rows, jsonl.gz
BUCC_PAIRS, TATOEBA_PAIRS = ["de-en", "fr-en"], ["deu-eng", "fra-eng"]


# ---------------------------------------------------------------------------------------------- helpers
def _raw_pairs():
    """(source, target) gold pairs and every text of the fixtures, read here without me5's loader."""
    gold, texts = [], []
    for pair in BUCC_PAIRS:
        rec = pq.read_table(BUCC_V1 / pair / "test-00000-of-00001.parquet").to_pylist()[0]
        gold += [(rec["sentence1"][i - 1], rec["sentence2"][j - 1]) for i, j in rec["gold"]]
        texts += rec["sentence1"] + rec["sentence2"]
    for root, pairs in ((BUCC_V2, BUCC_PAIRS), (TATOEBA, TATOEBA_PAIRS)):
        for pair in pairs:
            with gzip.open(root / "test" / f"{pair}.jsonl.gz", "rt", encoding="utf-8") as fh:
                rows = [json.loads(line) for line in fh]
            gold += [(r["sentence1"], r["sentence2"]) for r in rows]
            texts += [t for r in rows for t in (r["sentence1"], r["sentence2"])]
    return gold, texts


def embedding_table(dim: int = 8, noise: float = 0.75, seed: int = 0) -> dict[str, torch.Tensor]:
    """Fixed vectors: a translation is its target's vector plus noise (some mined wrongly, some targets hit by
    several sources), other texts are random."""
    gen = torch.Generator().manual_seed(seed)
    table: dict[str, torch.Tensor] = {}
    gold, texts = _raw_pairs()
    for src, tgt in gold:
        if tgt not in table:
            table[tgt] = torch.randn(dim, generator=gen)
        if src not in table:
            table[src] = table[tgt] + noise * torch.randn(dim, generator=gen)
    for t in texts:
        if t not in table:
            table[t] = torch.randn(dim, generator=gen)
    return table


class TableEncoder:
    """An encoder over a text -> vector table (:func:`table_embedding` embeds with it); records each call's prefix,
    texts, max length and batch size."""

    def __init__(self, table):
        self.table, self.calls = table, []

    def embed(self, texts, *, prefix="", max_length=512, max_batch=256, **kwargs):
        self.calls.append({"prefix": prefix, "texts": list(texts), "max_length": max_length, "max_batch": max_batch})
        return torch.stack([self.table[t] for t in texts])


@pytest.fixture(autouse=True)
def table_embedding(monkeypatch):
    """The evaluator embeds through ``me5.embed.encode.encode_texts``; a :class:`TableEncoder` answers from its
    table, a real encoder goes through as is."""
    real = bitext.encode_texts

    def encode_texts(encoder, tokenizer, texts, **kwargs):
        if isinstance(encoder, TableEncoder):
            return encoder.embed(texts, **kwargs)
        return real(encoder, tokenizer, texts, **kwargs)

    monkeypatch.setattr(bitext, "encode_texts", encode_texts)


class MtebTableModel:
    """mteb's EncoderProtocol over the same table (cosine similarity, as mteb scores an E5 model)."""

    mteb_model_meta = None

    def __init__(self, table, model_name: str = "table", revision: str | None = None, device=None, **kwargs):
        self.table, self.seen = table, []

    def encode(self, inputs, *, task_metadata, hf_split, hf_subset, prompt_type=None, **kwargs):
        texts = [t for batch in inputs for t in batch["text"]]
        self.seen.append((hf_subset, texts))
        return torch.stack([self.table[t] for t in texts]).numpy()

    def similarity(self, a, b):
        from mteb.similarity_functions import cos_sim

        return cos_sim(a, b)

    def similarity_pairwise(self, a, b):  # pragma: no cover - not used by bitext mining
        raise NotImplementedError


def mteb_scores(task_name: str, folder: Path, subsets, table, cache_dir: Path) -> dict[str, dict[str, float]]:
    """mteb's own task (its load_data from a local copy of the hub dataset, dataset_transform, evaluator and
    metrics) on ``folder`` with the table's vectors: {subset: {metric: value}}."""
    mteb = pytest.importorskip("mteb")
    task = mteb.get_task(task_name, hf_subsets=list(subsets))
    dataset = {"path": str(folder), "revision": task.metadata.dataset["revision"], "cache_dir": str(cache_dir)}
    task.metadata = task.metadata.model_copy(update={"dataset": dataset})
    task.load_data()
    return task.evaluate(MtebTableModel(table), split="test", encode_kwargs={"batch_size": 4})


def write_jsonl_gz(path: Path, rows) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with gzip.open(path, "wt", encoding="utf-8") as fh:
        fh.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return path


# ---------------------------------------------------------------------------------------------- loading
def test_load_bucc_lists_layout():
    """mteb/BUCC: sentence1[i] per gold pair, in gold order, searched among all of sentence2."""
    pairs = load_bitext(BUCC_V1, task="bucc", languages=BUCC_PAIRS)
    assert list(pairs) == BUCC_PAIRS
    de = pairs["de-en"]
    rec = pq.read_table(BUCC_V1 / "de-en" / "test-00000-of-00001.parquet").to_pylist()[0]
    assert de.layout == "lists" and de.files == [BUCC_V1 / "de-en" / "test-00000-of-00001.parquet"]
    assert de.targets == rec["sentence2"]  # all 20 targets, distractors included
    assert de.sources == [rec["sentence1"][i - 1] for i, _ in rec["gold"]]
    assert de.gold == [j - 1 for _, j in rec["gold"]]
    assert len(de.sources) == 15 and len(de.targets) == 20
    cat = "Die Katze schläft auf dem Sofa."
    assert sorted(de.targets[g] for s, g in zip(de.sources, de.gold) if s == cat) == [
        "The cat sleeps on the sofa.", "The weather report was wrong."]  # one source, two gold targets
    assert "Das Konzert war ausverkauft." not in de.sources  # a sentence1 outside the gold set is never searched

    back = load_bitext(BUCC_V1, task="bucc", languages=["de-en"], direction="backward")["en-de"]
    assert back.targets == rec["sentence1"]
    assert back.sources == [rec["sentence2"][j - 1] for _, j in rec["gold"]]
    assert back.gold == [i - 1 for i, _ in rec["gold"]]


def test_load_rows_layouts():
    v2 = load_bitext(BUCC_V2, task="bucc", languages=BUCC_PAIRS)
    assert list(v2) == BUCC_PAIRS and v2["fr-en"].layout == "rows"
    assert v2["fr-en"].sources[0] == "Le chat dort sur le canapé."
    assert v2["fr-en"].targets[0] == "The cat sleeps on the sofa."
    assert v2["fr-en"].gold == list(range(15)) and len(v2["fr-en"].targets) == 15  # gold targets only

    tat = load_bitext(TATOEBA, task="tatoeba", languages=TATOEBA_PAIRS)
    assert list(tat) == TATOEBA_PAIRS and len(tat["deu-eng"].sources) == 16
    back = load_bitext(TATOEBA, task="tatoeba", languages=["fra-eng"], direction="backward")
    assert list(back) == ["eng-fra"]
    assert back["eng-fra"].sources == tat["fra-eng"].targets and back["eng-fra"].targets == tat["fra-eng"].sources


def test_pair_files_layouts(tmp_path):
    """Each published file layout of a pair is found; the first pattern that matches wins."""
    cases = {
        "a": "test/de-en.jsonl.gz",  # mteb/bucc-bitext-mining today
        "b": "de-en/test.json.gz",  # mteb/bucc-bitext-mining before 2024 (JSON lines, gzip)
        "c": "de-en/test-00000-of-00001.parquet",  # push_to_hub (mteb/BUCC)
        "d": "de-en/test/0000.parquet",  # the hub's parquet conversion
        "e": "de-en/bucc-bitext-mining-test.parquet",  # its older naming
        "f": "test/de-en.parquet",
    }
    for folder, rel in cases.items():
        f = tmp_path / folder / rel
        f.parent.mkdir(parents=True)
        f.write_bytes(b"")
        assert pair_files(tmp_path / folder, "de-en") == [f]
    (tmp_path / "c" / "de-en" / "test-00001-of-00002.parquet").write_bytes(b"")
    assert [p.name for p in pair_files(tmp_path / "c", "de-en")] == [
        "test-00000-of-00001.parquet", "test-00001-of-00002.parquet"]  # shards in order
    (tmp_path / "b" / "test").mkdir()
    (tmp_path / "b" / "test" / "de-en.jsonl").write_bytes(b"")
    assert pair_files(tmp_path / "b", "de-en") == [tmp_path / "b" / "test" / "de-en.jsonl"]


def test_jsonl_lists_and_parquet_rows(tmp_path):
    """Formats are not tied to layouts: a lists record in jsonl.gz, rows in parquet."""
    rec = {"sentence1": ["a", "b", "c"], "sentence2": ["x", "y"], "gold": [[3, 1], [1, 2]]}
    write_jsonl_gz(tmp_path / "v1" / "de-en" / "test.json.gz", [rec])
    p = load_bitext(tmp_path / "v1", languages=["de-en"])["de-en"]
    assert (p.sources, p.targets, p.gold, p.layout) == (["c", "a"], ["x", "y"], [0, 1], "lists")
    (tmp_path / "rows" / "test").mkdir(parents=True)
    pq.write_table(pa.table({"sentence1": ["a", "b"], "sentence2": ["x", "y"], "lang": ["fr-en", "fr-en"]}),
                   tmp_path / "rows" / "test" / "fr-en.parquet")
    p = load_bitext(tmp_path / "rows", languages=["fr-en"])["fr-en"]
    assert (p.sources, p.targets, p.gold, p.layout) == (["a", "b"], ["x", "y"], [0, 1], "rows")


def test_rows_of_another_pair_are_left_out(tmp_path, caplog):
    rows = [{"sentence1": "a", "sentence2": "x", "lang": "de-en"}, {"sentence1": "b", "sentence2": "y", "lang": "fr-en"},
            {"sentence1": "c", "sentence2": "z"}]
    write_jsonl_gz(tmp_path / "test" / "de-en.jsonl.gz", rows)
    p = load_bitext(tmp_path, languages=["de-en"])["de-en"]
    assert p.sources == ["a", "c"] and p.targets == ["x", "z"]
    assert "left out 1 rows of other pairs" in caplog.text


# ---------------------------------------------------------------------------------------------- errors
def test_missing_pair_folder():
    with pytest.raises(DataError, match=r"no data for language pair 'ru-en'.*test/ru-en\.\{jsonl\.gz") as err:
        load_bitext(BUCC_V1, task="bucc", languages=["de-en", "ru-en"])
    assert err.value.file == str(BUCC_V1 / "ru-en") and "folders here: de-en, fr-en" in str(err.value)
    with pytest.raises(DataError, match="pass languages="):
        BitextEvaluator(BUCC_V1, task="bucc", prompts=E5)  # all four pairs asked for, two present


def test_missing_column_names_file_line_field(tmp_path):
    f = write_jsonl_gz(tmp_path / "test" / "deu-eng.jsonl.gz",
                       [{"sentence1": "a", "sentence2": "x"}, {"sentence1": "b", "text": "y"}])
    with pytest.raises(DataError) as err:
        load_bitext(tmp_path, task="tatoeba", languages=["deu-eng"])
    assert (err.value.file, err.value.line, err.value.field) == (str(f), 2, "sentence2")
    assert str(err.value) == f"{f}:2, field 'sentence2': missing 'sentence2'"

    f = write_jsonl_gz(tmp_path / "s1" / "test" / "deu-eng.jsonl.gz", [{"source": "a", "sentence2": "x"}])
    with pytest.raises(DataError, match=r"field 'sentence1': missing 'sentence1' \(columns: \['sentence2', 'source'\]\)"):
        load_bitext(tmp_path / "s1", task="tatoeba", languages=["deu-eng"])

    f = write_jsonl_gz(tmp_path / "num" / "test" / "deu-eng.jsonl.gz", [{"sentence1": "a", "sentence2": 3}])
    with pytest.raises(DataError, match=r":1, field 'sentence2': expected a string, got int"):
        load_bitext(tmp_path / "num", task="tatoeba", languages=["deu-eng"])


def test_bad_lists_records(tmp_path):
    def write(folder, **rec):
        d = tmp_path / folder / "de-en"
        d.mkdir(parents=True)
        pq.write_table(pa.table({k: [v] for k, v in rec.items()}), d / "test-00000-of-00001.parquet")
        return tmp_path / folder

    root = write("nogold", sentence1=["a"], sentence2=["x"])
    with pytest.raises(DataError, match=r"test-00000-of-00001\.parquet:1, field 'gold': missing 'gold'"):
        load_bitext(root, languages=["de-en"])
    root = write("range", sentence1=["a"], sentence2=["x"], gold=[[1, 1], [1, 2]])
    with pytest.raises(DataError, match=r"field 'gold': gold\[1\] = \[1, 2\] is not a 1-based"):
        load_bitext(root, languages=["de-en"])
    root = write("zero", sentence1=["a"], sentence2=["x"], gold=[[0, 1]])  # 0-based by mistake
    with pytest.raises(DataError, match=r"gold\[0\] = \[0, 1\]"):
        load_bitext(root, languages=["de-en"])
    two = tmp_path / "two" / "de-en"
    two.mkdir(parents=True)
    write_jsonl_gz(two / "test.jsonl.gz", [{"sentence1": ["a"], "sentence2": ["x"], "gold": [[1, 1]]}] * 2)
    with pytest.raises(DataError, match=r"test\.jsonl\.gz:2: .*more than one record"):
        load_bitext(tmp_path / "two", languages=["de-en"])


def test_other_errors(tmp_path):
    with pytest.raises(DataError, match="no such data folder"):
        load_bitext(tmp_path / "nope")
    write_jsonl_gz(tmp_path / "test" / "de-en.jsonl.gz", [{"sentence1": "a", "sentence2": "x", "lang": "fr-en"}])
    with pytest.raises(DataError, match=r"field 'lang': no rows with lang 'de-en' \(rows of \['fr-en'\]\)"):
        load_bitext(tmp_path, languages=["de-en"])
    (tmp_path / "empty" / "test").mkdir(parents=True)
    (tmp_path / "empty" / "test" / "de-en.jsonl").write_text("\n")
    with pytest.raises(DataError, match="no records for pair 'de-en'"):
        load_bitext(tmp_path / "empty", languages=["de-en"])
    with pytest.raises(ConfigError, match="eval.languages.*no pairs \\['deu-eng'\\]"):
        load_bitext(TATOEBA, task="bucc", languages=["deu-eng"])
    with pytest.raises(ConfigError, match="eval.task"):
        BitextEvaluator(TATOEBA, task="mlqa", prompts=E5)
    with pytest.raises(ConfigError, match="eval.direction"):
        BitextEvaluator(TATOEBA, task="tatoeba", languages=TATOEBA_PAIRS, direction="both", prompts=E5)
    assert len(TASK_PAIRS["tatoeba"]) == 112 and len(set(TASK_PAIRS["tatoeba"])) == 112


def test_task_pairs_are_mtebs():
    mteb = pytest.importorskip("mteb")
    assert list(TASK_PAIRS["tatoeba"]) == mteb.get_task("Tatoeba").hf_subsets
    assert list(TASK_PAIRS["bucc"]) == mteb.get_task("BUCC").hf_subsets == mteb.get_task("BUCC.v2").hf_subsets
    for name in ("BUCC", "BUCC.v2", "Tatoeba"):
        assert mteb.get_task(name).metadata.main_score == "f1"


# ---------------------------------------------------------------------------------------------- scoring
def test_mining_metrics_is_sklearn_weighted():
    sk = pytest.importorskip("sklearn.metrics")
    rng = random.Random(0)
    cases = [([0, 1, 2, 3], [0, 1, 2, 3]), ([1, 1, 1, 0], [0, 1, 2, 3]), ([5, 5, 2, 2, 0], [0, 1, 2, 2, 4])]
    cases += [([rng.randrange(12) for _ in range(40)], [rng.randrange(10) for _ in range(40)]) for _ in range(20)]
    for pred, gold in cases:
        got = mining_metrics(pred, gold)
        want = {
            "precision": sk.precision_score(gold, pred, zero_division=0, average="weighted"),
            "recall": sk.recall_score(gold, pred, zero_division=0, average="weighted"),
            "f1": sk.f1_score(gold, pred, zero_division=0, average="weighted"),
            "accuracy": sk.accuracy_score(gold, pred),
        }
        assert got == pytest.approx(want, rel=1e-12, abs=1e-15)
    # two sources share one neighbour: accuracy 3/4 but F1 (1/4)(1 + 1 + 2/3 + 0)
    assert mining_metrics([0, 1, 2, 2], [0, 1, 2, 3]) == pytest.approx(
        {"precision": 0.625, "recall": 0.75, "f1": (2 + 2 / 3) / 4, "accuracy": 0.75})
    with pytest.raises(ValueError):
        mining_metrics([0], [0, 1])


def test_score_bitext_cosine_top1():
    targets = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    sources = torch.tensor([[10.0, 0.1], [0.2, 3.0], [2.0, 2.1], [0.0, -1.0]])  # cosine, not dot: norms ignored
    assert nearest_targets(sources, targets) == [0, 1, 2, 0]
    m = score_bitext(sources, targets, [0, 1, 2, 1])
    assert m["accuracy"] == 0.75 and m["recall"] == 0.75
    with pytest.raises(ValueError):
        score_bitext(sources, targets, [0, 1])
    twins = torch.tensor([[0.0, 1.0], [1.0, 0.0], [2.0, 0.0]])  # targets 1 and 2 tie: the lower index wins
    assert nearest_targets(torch.tensor([[1.0, 0.0]]), twins) == [1]


def test_bitext_pair_checks_gold():
    with pytest.raises(ValueError, match="out of range"):
        BitextPair("de-en", ["a"], ["x"], [1])


# ---------------------------------------------------------------------------------------------- vs mteb
@pytest.mark.parametrize(
    "mteb_task, folder, task, pairs",
    [("BUCC", BUCC_V1, "bucc", BUCC_PAIRS), ("BUCC.v2", BUCC_V2, "bucc", BUCC_PAIRS),
     ("Tatoeba", TATOEBA, "tatoeba", TATOEBA_PAIRS)],
)
def test_scores_equal_mtebs(mteb_task, folder, task, pairs, tmp_path):
    table = embedding_table()
    want = mteb_scores(mteb_task, folder, pairs, table, tmp_path / "hf")
    enc = TableEncoder(table)
    got = BitextEvaluator(folder, task=task, languages=pairs, batch_size=4, prompts=E5).evaluate(enc, tokenizer=None)
    for pair in pairs:
        assert {m: got[f"{task}/{pair}/{m}"] for m in ("precision", "recall", "f1", "accuracy")} == pytest.approx(
            {m: want[pair][m] for m in ("precision", "recall", "f1", "accuracy")}, rel=1e-12)
    assert got[f"{task}/f1"] == pytest.approx(sum(want[p]["main_score"] for p in pairs) / len(pairs), rel=1e-12)
    # the fixture is not trivial: some sources are mined wrongly, some targets are hit twice
    assert 0 < got[f"{task}/accuracy"] < 1 and got[f"{task}/f1"] < got[f"{task}/accuracy"]
    # each side is encoded as mteb encodes it (BUCC: 15 gold sources against all 20 targets)
    sizes = [len(c["texts"]) for c in enc.calls]
    assert sizes == ([15, 20] * 2 if mteb_task == "BUCC" else [15, 15] * 2 if task == "bucc" else [16, 16] * 2)


def test_backward_equals_mteb_on_swapped_columns(tmp_path):
    """eng -> xxx is mteb's Tatoeba on a copy whose sentence1 and sentence2 are swapped."""
    swapped = tmp_path / "swapped"
    for pair in TATOEBA_PAIRS:
        with gzip.open(TATOEBA / "test" / f"{pair}.jsonl.gz", "rt", encoding="utf-8") as fh:
            rows = [json.loads(line) for line in fh]
        write_jsonl_gz(swapped / "test" / f"{pair}.jsonl.gz",
                       [{"sentence1": r["sentence2"], "sentence2": r["sentence1"], "lang": r["lang"]} for r in rows])
    table = embedding_table(noise=1.0)
    want = mteb_scores("Tatoeba", swapped, TATOEBA_PAIRS, table, tmp_path / "hf")
    ev = BitextEvaluator(TATOEBA, task="tatoeba", languages=TATOEBA_PAIRS, direction="backward", prompts=E5)
    # the same direction as the eval config and the --suite expose it
    for built in (ev, *_configured_backward(tmp_path)):
        got = built.evaluate(TableEncoder(table), tokenizer=None)
        assert built.name == "tatoeba_backward" and built.direction == "backward"
        for pair in TATOEBA_PAIRS:
            xxx, eng = pair.split("-")
            for m in ("precision", "recall", "f1", "accuracy"):
                assert got[f"tatoeba_backward/{eng}-{xxx}/{m}"] == pytest.approx(want[pair][m], rel=1e-12)
    forward = BitextEvaluator(TATOEBA, task="tatoeba", languages=TATOEBA_PAIRS, prompts=E5).evaluate(
        TableEncoder(table), None)
    assert forward["tatoeba/f1"] != got["tatoeba_backward/f1"]


def _configured_backward(tmp_path) -> list[BitextEvaluator]:
    """``tatoeba_backward`` as ``eval=bitext`` (conf/eval/bitext.yaml) and ``--suite paper`` build it, on the
    fixture (its two pairs)."""
    import argparse

    from hydra.utils import instantiate

    from me5.app.evaluate import SuiteState, _suite_plan, suite_config
    from tests.helpers import compose_cfg

    cfg = compose_cfg(["eval=bitext", f"eval.tatoeba_backward.data={TATOEBA}",
                       f"+eval.tatoeba_backward.languages=[{','.join(TATOEBA_PAIRS)}]"])
    from_config = instantiate(cfg.eval.tatoeba_backward, prompts=PromptPolicy("e5"))
    root = tmp_path / "data-root"
    root.mkdir()
    (root / "tatoeba").symlink_to(TATOEBA, target_is_directory=True)
    assert "tatoeba_backward" in suite_config("paper", data_root=root, output_dir=tmp_path)
    args = argparse.Namespace(suite="paper", benchmarks=["tatoeba_backward"], data_root=str(root), batch_size=None,
                              output_dir=None, query_max_length=None, passage_max_length=None, mteb_cache_dir=None,
                              mteb_online=False)
    suite, inputs, _ = _suite_plan(args, PromptPolicy("e5"), work_dir=None, state=SuiteState(tmp_path / "out", {}))
    assert inputs == {"tatoeba_backward": list(TATOEBA_PAIRS)}
    # one protocol: the suite builds the eval group's node, batch size and length included (conf/eval/bitext.yaml)
    built = suite["tatoeba_backward"]
    assert (built.batch_size, built.max_length) == (from_config.batch_size, from_config.max_length) == (256, 512)
    return [from_config, built]


# ---------------------------------------------------------------------------------------------- evaluator
@pytest.mark.parametrize(
    "style, prefix",
    [("e5", "query: "), ("instruct", f"Instruct: {TASKS['bitext']}\nQuery: "), ("none", "")],
)
def test_prompts_on_both_sides(style, prefix):
    enc = TableEncoder(embedding_table())
    ev = BitextEvaluator(TATOEBA, task="tatoeba", prompts=PromptPolicy(style), languages=["deu-eng"],
                         batch_size=3, max_length=77)
    assert ev.prefix == prefix == PromptPolicy(style).query(TASKS["bitext"])
    ev.evaluate(enc, tokenizer=None)
    (src, tgt) = enc.calls
    assert src["prefix"] == tgt["prefix"] == prefix
    assert (src["max_length"], src["max_batch"]) == (77, 3)
    pair = ev.data["deu-eng"]
    assert src["texts"] == pair.sources and tgt["texts"] == pair.targets  # raw texts: the encoder adds the prefix
    assert src["texts"][0] == "Die Katze schläft auf dem Sofa."


def test_evaluate_keys_and_macro():
    table = embedding_table()
    got = BitextEvaluator(BUCC_V1, task="bucc", languages=BUCC_PAIRS, prompts=E5).evaluate(TableEncoder(table), None)
    metrics = ("precision", "recall", "f1", "accuracy")
    assert set(got) == {f"bucc/{m}" for m in metrics} | {f"bucc/{p}/{m}" for p in BUCC_PAIRS for m in metrics}
    for m in metrics:
        assert got[f"bucc/{m}"] == pytest.approx((got[f"bucc/de-en/{m}"] + got[f"bucc/fr-en/{m}"]) / 2)
        assert got[f"bucc/{m}"] == got[f"bucc/{m}"]  # not NaN
    assert got["bucc/recall"] == pytest.approx(got["bucc/accuracy"])


def test_evaluator_from_loaded_pairs():
    pairs = load_bitext(TATOEBA, task="tatoeba", languages=TATOEBA_PAIRS)
    table = embedding_table()
    a = BitextEvaluator(pairs, task="tatoeba", name="tat", prompts=E5).evaluate(TableEncoder(table), None)
    b = BitextEvaluator(TATOEBA, task="tatoeba", languages=TATOEBA_PAIRS, prompts=E5).evaluate(
        TableEncoder(table), None)
    assert {k.removeprefix("tat/"): v for k, v in a.items()} == {k.removeprefix("tatoeba/"): v for k, v in b.items()}
    one = BitextEvaluator(pairs, task="tatoeba", languages=["fra-eng"], prompts=E5)
    assert list(one.data) == ["fra-eng"]
    with pytest.raises(ConfigError, match="no data for \\['sqi-eng'\\]"):
        BitextEvaluator(pairs, task="tatoeba", languages=["sqi-eng"], prompts=E5)


def test_a_real_encoder_runs():
    """me5's Encoder (tiny, random) and a word-level tokenizer end to end: the keys and their ranges."""
    from tests import tiny

    ev = BitextEvaluator(BUCC_V2, task="bucc", languages=["de-en"], batch_size=4, max_length=32, prompts=E5)
    got = ev.evaluate(tiny.encoder(dropout=0.0), tiny.tokenizer())
    assert sorted(got) == sorted(f"bucc/{k}" for m in ("precision", "recall", "f1", "accuracy")
                                 for k in (m, f"de-en/{m}"))
    assert all(0.0 <= v <= 1.0 for v in got.values())
