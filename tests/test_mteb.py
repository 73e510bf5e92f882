"""MTEB through the ``mteb`` package: the paper's 56 tasks, E5's prompt policy per task type and side, un-normalised
classification vectors, scores equal to a SentenceTransformer of the same export, offline data errors.

The tasks are local: mteb's own mock tasks (``mteb.mocks.mock_tasks``), renamed after tasks of the suite so that
the instruction table is used, with a little more data for retrieval, STS and classification."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch

mteb = pytest.importorskip("mteb")
pytest.importorskip("sentence_transformers")

from datasets import Dataset, DatasetDict  # noqa: E402
from mteb.abstasks.retrieval_dataset_loaders import RetrievalSplitData  # noqa: E402
from mteb.mocks.mock_tasks import (  # noqa: E402
    MockClassificationTask,
    MockPairClassificationTask,
    MockRerankingTask,
    MockRetrievalTask,
    MockSTSTask,
    MockSummarizationTask,
)
from mteb.mocks.mock_tasks.clustering import MockClusteringTask  # noqa: E402
from mteb.models.sentence_transformer_wrapper import SentenceTransformerEncoderWrapper  # noqa: E402

from me5.embed.encode import encode_texts  # noqa: E402
from me5.errors import ConfigError, DataError  # noqa: E402
from me5.eval import mteb as me5_mteb  # noqa: E402
from me5.eval.mteb import (  # noqa: E402
    PAPER_MTEB_EN,
    PAPER_MTEB_EN_BY_TYPE,
    Me5MtebEncoder,
    evaluate_mteb,
    paper_tasks,
    resolve_tasks,
    task_instruction_for,
)
from me5.export import export_encoder  # noqa: E402
from me5.prompts import PromptPolicy  # noqa: E402

# ------------------------------------------------------------------------------------------ local tasks
DOCS = {
    "d1": ("Cats", "Cats are small domesticated felines that purr."),
    "d2": ("Dogs", "Dogs are loyal companions that bark."),
    "d3": ("Paris", "Paris is the capital city of France."),
    "d4": ("Berlin", "Berlin is the capital of Germany."),
    "d5": ("Rain", "Rain falls from clouds when water condenses."),
    "d6": ("Sun", "The sun is the star at the centre of the solar system."),
}
QUERIES = {"q1": "which animal purrs", "q2": "capital of France", "q3": "where does rain come from",
           "q4": "capital of Germany"}
QRELS = {"q1": {"d1": 1}, "q2": {"d3": 1}, "q3": {"d5": 1}, "q4": {"d4": 1}}


def _split(*, titles: bool = True, top_ranked=None) -> RetrievalSplitData:
    return RetrievalSplitData(
        queries=Dataset.from_list([{"id": q, "text": t} for q, t in QUERIES.items()]),
        corpus=Dataset.from_list([{"id": d, "title": ti if titles else "", "text": tx}
                                  for d, (ti, tx) in DOCS.items()]),
        relevant_docs=QRELS, top_ranked=top_ranked,
    )


def _named(base, name):
    """A local copy of an mteb mock task under the name of a suite task (its instruction, its rules)."""
    return type(name, (base,), {"metadata": base.metadata.model_copy(update={"name": name})})


class SciFact(_named(MockRetrievalTask, "SciFact")):
    def load_data(self, num_proc=None, **kwargs):
        self.dataset = {"default": {"test": _split(), "val": _split()}}
        self.data_loaded = True


class QuoraRetrieval(_named(MockRetrievalTask, "QuoraRetrieval")):
    def load_data(self, num_proc=None, **kwargs):
        self.dataset = {"default": {"test": _split(titles=False), "val": _split(titles=False)}}
        self.data_loaded = True


class SciDocsRR(_named(MockRerankingTask, "SciDocsRR")):
    def load_data(self, num_proc=None, **kwargs):
        self.dataset = {"default": {"test": _split(top_ranked={q: list(DOCS) for q in QUERIES})}}
        self.data_loaded = True


class STSBenchmark(_named(MockSTSTask, "STSBenchmark")):
    def load_data(self, num_proc=None, **kwargs):
        s1 = ["a cat sits on the mat", "the dog barks", "Paris is in France", "rain is wet", "the sun is hot"]
        s2 = ["a cat is on the mat", "a dog is barking", "Berlin is in Germany", "the sky is blue", "ice is cold"]
        self.dataset = DatasetDict({"test": Dataset.from_dict(
            {"sentence1": s1, "sentence2": s2, "score": [1.0, 0.9, 0.4, 0.2, 0.0]})})
        self.data_loaded = True


class Banking77Classification(_named(MockClassificationTask, "Banking77Classification")):
    n_experiments = 2
    samples_per_label = 4

    def load_data(self, num_proc=None, **kwargs):
        money = ["transfer money to my account", "my card payment failed", "how do I top up", "refund my charge",
                 "exchange rate for euros", "my transfer is pending"]
        other = ["the weather is nice", "cats like to sleep", "Paris is beautiful", "I like green tea",
                 "the train is late", "rain falls in spring"]
        texts, labels = money + other, [0] * 6 + [1] * 6
        self.dataset = DatasetDict({
            "train": Dataset.from_dict({"text": texts[::2] + texts[1::2][:2], "label": labels[::2] + labels[1::2][:2]}),
            "test": Dataset.from_dict({"text": texts[1::2], "label": labels[1::2]}),
        })
        self.data_loaded = True


TwentyNewsgroupsClustering = _named(MockClusteringTask, "TwentyNewsgroupsClustering")
SprintDuplicateQuestions = _named(MockPairClassificationTask, "SprintDuplicateQuestions")
SummEval = _named(MockSummarizationTask, "SummEval")

TASKS = [SciFact, QuoraRetrieval, SciDocsRR, STSBenchmark, Banking77Classification, TwentyNewsgroupsClustering,
         SprintDuplicateQuestions, SummEval]

# the prompts E5's policy gives each task (query side, document side); unilm e5/mteb_beir_eval.py and
# e5/mteb_except_retrieval_eval.py, instructions from e5/utils.py
E5 = {"SciFact": ("query: ", "passage: "), "QuoraRetrieval": ("query: ", "query: ")}
INSTRUCTIONS = {
    "SciFact": "Given a scientific claim, retrieve documents that support or refute the claim",
    "QuoraRetrieval": "Given a question, retrieve questions that are semantically equivalent to the given question",
    "SciDocsRR": "Given a title of a scientific paper, retrieve the titles of other relevant papers",
    "STSBenchmark": "Retrieve semantically similar text.",
    "Banking77Classification": "Given a online banking query, find the corresponding intents",
    "TwentyNewsgroupsClustering": "Identify the topic or theme of the given news articles",
    "SprintDuplicateQuestions": "Retrieve duplicate questions from Sprint forum",
    "SummEval": "Given a news summary, retrieve other semantically similar summaries",
}


def expected_prompts(style: str) -> dict[str, tuple[str, str]]:
    """task -> (prompt of its queries / of every text, prompt of its documents)."""
    if style == "e5":
        return {t.metadata.name: E5.get(t.metadata.name, ("query: ", "query: ")) for t in TASKS}
    out = {}
    for name, ins in INSTRUCTIONS.items():
        q = f"Instruct: {ins}\nQuery: "
        out[name] = (q, "" if name == "SciFact" else q)
    return out


# ------------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    from tests.tiny import build_tiny_encoder, build_tokenizer

    root = tmp_path_factory.mktemp("mteb")
    tok = build_tokenizer(root / "tok")
    return export_encoder(build_tiny_encoder(tok), tok, root / "model", prompts=PromptPolicy("e5"))


class _Recording:
    """Records what an :class:`Me5MtebEncoder` embeds: the texts with their prompts (through the module's
    ``encode_texts``, patched with ``monkeypatch``), and its output vectors."""

    def __init__(self, wrapper: Me5MtebEncoder, monkeypatch):
        self.texts: dict[tuple[str, str | None], list[str]] = {}
        self.prefixes: dict[tuple[str, str | None], set[str]] = {}
        self.vectors: dict[str, list[np.ndarray]] = {}
        wrapper_encode = wrapper.encode
        current = {}

        def recording_encode_texts(encoder, tokenizer, texts, *, prefix="", **kw):
            self.texts.setdefault(current["key"], []).extend(prefix + t for t in texts)
            self.prefixes.setdefault(current["key"], set()).add(prefix)
            return encode_texts(encoder, tokenizer, texts, prefix=prefix, **kw)

        def encode(inputs, *, task_metadata, prompt_type=None, **kw):
            current["key"] = (task_metadata.name, prompt_type.value if prompt_type else None)
            out = wrapper_encode(inputs, task_metadata=task_metadata, prompt_type=prompt_type, **kw)
            self.vectors.setdefault(task_metadata.name, []).append(out)
            return out

        monkeypatch.setattr(me5_mteb, "encode_texts", recording_encode_texts)
        wrapper.encode = encode


def _st_scores(folder, prompts: dict[str, tuple[str, str]]) -> dict[str, float]:
    """The same tasks through mteb's SentenceTransformer wrapper, the same prompts passed per task: mteb's results."""
    from sentence_transformers import SentenceTransformer

    st = SentenceTransformer(str(folder), device="cpu")
    st.prompts, st.default_prompt_name = {}, None
    raw = SentenceTransformer(modules=[st[0], st[1]], device="cpu")  # no Normalize module: classification
    model_prompts = {}
    for name, (q, d) in prompts.items():
        model_prompts.update({f"{name}-query": q, f"{name}-document": d, name: q})
    out = {}
    for model, tasks in ((st, [t for t in TASKS if t is not Banking77Classification]), (raw, [Banking77Classification])):
        wrapper = SentenceTransformerEncoderWrapper(model, model_prompts=model_prompts)
        result = mteb.evaluate(wrapper, [t() for t in tasks], cache=None, show_progress_bar=False,
                               encode_kwargs={"batch_size": 64})
        out.update({r.task_name: r for r in result.task_results})
    return out


# ------------------------------------------------------------------------------------------ the suite
def test_the_suite_is_the_papers_56_tasks():
    assert len(PAPER_MTEB_EN) == len(set(PAPER_MTEB_EN)) == 56
    assert {t: len(n) for t, n in PAPER_MTEB_EN_BY_TYPE.items()} == {
        "Classification": 12, "Clustering": 11, "PairClassification": 3, "Reranking": 4, "Retrieval": 15,
        "STS": 10, "Summarization": 1}
    registry = mteb.get_tasks(tasks=PAPER_MTEB_EN)
    assert sorted(t.metadata.name for t in registry) == sorted(PAPER_MTEB_EN)  # every name is valid in mteb 2
    assert sorted(t.metadata.name for t in mteb.get_benchmark("MTEB(eng, v1)").tasks) == sorted(PAPER_MTEB_EN)
    tasks = {t.metadata.name: t for t in paper_tasks()}
    for task_type, names in PAPER_MTEB_EN_BY_TYPE.items():
        assert {tasks[n].metadata.type for n in names} == {task_type}
    assert tasks["MSMARCO"].eval_splits == ["dev"] and tasks["STS17"].hf_subsets == ["en-en"]
    assert tasks["STS22"].hf_subsets == ["en"] and tasks["AmazonCounterfactualClassification"].hf_subsets == ["en"]
    assert len(tasks["CQADupstackRetrieval"].metadata.tasks) == 12
    with pytest.raises(ConfigError, match="STS99"):
        resolve_tasks(["STS12", "STS99"])


def test_every_suite_task_has_its_unilm_instruction(caplog):
    """No fallback for the 56 (and the 12 CQADupStack forums); where mteb ships a prompt (taken from E5-mistral),
    it is the same sentence."""
    for task in paper_tasks():
        for leaf in getattr(task.metadata, "tasks", None) or [task]:
            md = leaf.metadata
            mine = task_instruction_for(md)
            theirs = md.prompt.get("query") if isinstance(md.prompt, dict) else md.prompt
            assert theirs is None or theirs == mine, md.name
    assert "[U]" not in caplog.text
    fallback = task_instruction_for(MockSTSTask.metadata.model_copy(update={"type": "Clustering"}))
    assert fallback == MockSTSTask.metadata.description.rstrip(".")


def test_the_module_does_not_shadow_the_mteb_package():
    import me5.eval.mteb as ours

    assert ours.mteb is sys.modules["mteb"] and "site-packages" in sys.modules["mteb"].__file__


# ------------------------------------------------------------------------------------------ the wrapper
@pytest.mark.parametrize("style", ["e5", "instruct"])
def test_prompts_per_task_type_and_side_and_scores_match_sentence_transformers(exported, style, tmp_path, monkeypatch):
    wrapper = Me5MtebEncoder.from_pretrained(exported, prompts=style)
    rec = _Recording(wrapper, monkeypatch)
    scores = evaluate_mteb(wrapper, [t() for t in TASKS], prompts=None, output_dir=tmp_path / "results")
    prompts = expected_prompts(style)

    # the exact prompt each task type / side receives
    for (name, side), used in rec.prefixes.items():
        q, d = prompts[name]
        assert used == {d if side == "document" else q}, (name, side, used)
    sides = {k for k in rec.texts}
    assert {("SciFact", "query"), ("SciFact", "document"), ("QuoraRetrieval", "document"),
            ("SciDocsRR", "document"), ("STSBenchmark", None), ("Banking77Classification", None)} <= sides
    assert rec.texts[("QuoraRetrieval", "document")][0] == prompts["QuoraRetrieval"][0] + DOCS["d1"][1]
    assert rec.texts[("SciFact", "document")][0] == prompts["SciFact"][1] + " ".join(DOCS["d1"])

    # classification: un-normalised vectors; every other task: unit vectors
    for name, outs in rec.vectors.items():
        norms = np.linalg.norm(np.concatenate(outs), axis=1)
        if name == "Banking77Classification":
            assert np.all(np.abs(norms - 1) > 1e-3), norms
        else:
            np.testing.assert_allclose(norms, 1.0, atol=1e-5)
    assert wrapper.encoder.normalize is True  # the encoder's own flag is restored

    # the same scores as mteb's SentenceTransformer wrapper given the same prompts per task; the paper's metric is
    # mteb's main score but for pair classification (mteb 1's cosine AP, not mteb 2's max_ap: me5.eval.paper)
    st = _st_scores(exported, prompts)
    ours = {k.split("/")[1]: v for k, v in scores.items() if k.endswith("/main_score")}
    paper = {k.split("/")[1]: v for k, v in scores.items() if k.endswith("/score")}
    assert ours.keys() == paper.keys() == st.keys() == {t.metadata.name for t in TASKS}
    for name in ours:
        assert ours[name] == pytest.approx(st[name].get_score(), abs=1e-5), name
        if name == "SprintDuplicateQuestions":
            assert paper[name] == pytest.approx(st[name].get_score(getter=lambda s: s["cosine_ap"]), abs=1e-5)
            assert st[name].scores["test"][0]["main_score"] == st[name].scores["test"][0]["max_ap"]
        else:
            assert paper[name] == ours[name], name
    assert scores["mteb/avg/retrieval"] == pytest.approx((paper["SciFact"] + paper["QuoraRetrieval"]) / 2)
    assert scores["mteb/avg/pairclassification"] == paper["SprintDuplicateQuestions"]
    assert scores["mteb/avg"] == pytest.approx(np.mean(list(paper.values())))
    assert {k for k in scores if k.startswith("mteb/avg/")} == {
        f"mteb/avg/{t}" for t in ("retrieval", "reranking", "sts", "classification", "clustering",
                                  "pairclassification", "summarization")}
    assert len(list((tmp_path / "results").rglob("SciFact.json"))) == 1  # mteb's result files


def test_classification_vectors_are_the_pooled_vectors(exported):
    wrapper = Me5MtebEncoder.from_pretrained(exported)
    texts = ["a cat", "кошка", "the dog barks"]
    loader = torch.utils.data.DataLoader(Dataset.from_dict({"text": texts}), batch_size=2)
    kw = {"hf_split": "test", "hf_subset": "default"}
    cls = wrapper.encode(loader, task_metadata=Banking77Classification.metadata, **kw)
    sts = wrapper.encode(loader, task_metadata=STSBenchmark.metadata, **kw)
    enc, tok = wrapper.encoder, wrapper.tokenizer
    enc.normalize = False
    try:
        pooled = encode_texts(enc, tok, texts, prefix="query: ", max_length=wrapper.max_length)
    finally:
        enc.normalize = True
    np.testing.assert_allclose(cls, pooled.numpy(), atol=1e-5)
    np.testing.assert_allclose(sts, encode_texts(enc, tok, texts, prefix="query: ").numpy(), atol=1e-5)


def test_policy_comes_from_the_export_and_reranking_sides_are_an_option(tmp_path):
    from tests.tiny import build_tiny_encoder, build_tokenizer

    tok = build_tokenizer(tmp_path / "tok")
    folder = export_encoder(build_tiny_encoder(tok), tok, tmp_path / "m", prompts=PromptPolicy("instruct"))
    wrapper = Me5MtebEncoder.from_pretrained(folder)
    assert wrapper.prompts == PromptPolicy("instruct") and wrapper.mteb_model_meta.name == "me5/m"
    assert wrapper.prompt(SciDocsRR.metadata, "document") == wrapper.prompt(SciDocsRR.metadata, "query") != ""
    sided = Me5MtebEncoder(wrapper.encoder, tok, prompts="e5", asymmetric_reranking=True)
    assert (sided.prompt(SciDocsRR.metadata, "query"), sided.prompt(SciDocsRR.metadata, "document")) == (
        "query: ", "passage: ")
    assert Me5MtebEncoder(wrapper.encoder, tok, prompts="none").prompt(SciFact.metadata, "query") == ""


# ------------------------------------------------------------------------------------------ errors
def test_a_task_missing_from_the_local_cache_is_a_data_error(exported, tmp_path):
    with pytest.raises(DataError, match=r"'STS12'.*'mteb/sts12-sts'.*not in the local Hugging Face"):
        evaluate_mteb(exported, ["STS12"], prompts="e5", cache_dir=tmp_path / "empty")
    with pytest.raises(ConfigError, match="unknown mteb task"):
        evaluate_mteb(exported, ["NoSuchTask"], prompts="e5")


def test_the_eval_group_evaluator_is_evaluate_mteb_and_checks_the_cache_up_front(exported, tmp_path):
    from me5.eval.mteb import MtebEvaluator

    wrapper = Me5MtebEncoder.from_pretrained(exported)
    tasks = [SciFact(), STSBenchmark()]
    ev = MtebEvaluator(tasks, prompts=PromptPolicy("e5"), check_data=True)
    assert not any(t.data_loaded for t in tasks)  # checked, then dropped
    got = ev.evaluate(wrapper.encoder, wrapper.tokenizer)
    assert got == evaluate_mteb(wrapper, [SciFact(), STSBenchmark()], prompts="e5")
    assert len(MtebEvaluator(prompts=PromptPolicy("e5"), check_data=False).tasks) == 56
    with pytest.raises(DataError, match="'STS12'"):  # at build time, before any training
        MtebEvaluator(["STS12"], prompts=PromptPolicy("e5"), cache_dir=str(tmp_path / "empty"), check_data=True)
    with pytest.raises(ConfigError, match="no prompt policy of its own"):  # a bare encoder has no saved policy
        evaluate_mteb((wrapper.encoder, wrapper.tokenizer), ["STS12"], prompts=None)


# ------------------------------------------------------------------------------------------ resuming, data checks
def test_finished_tasks_are_not_evaluated_again_and_each_task_is_reported(exported, monkeypatch):
    wrapper = Me5MtebEncoder.from_pretrained(exported)
    rec = _Recording(wrapper, monkeypatch)
    reported = []
    done = {"mteb/SciFact/score": 0.25, "mteb/SciFact/main_score": 0.25, "mteb/avg": 0.9}
    got = evaluate_mteb(wrapper, [SciFact(), STSBenchmark()], prompts="e5", done=done,
                        on_task=lambda name, scores: reported.append((name, dict(scores))))
    assert {name for name, _ in rec.texts} == {"STSBenchmark"}  # SciFact was not embedded
    assert reported == [("STSBenchmark", {k: v for k, v in got.items() if k.startswith("mteb/STSBenchmark/")})]
    assert got["mteb/SciFact/score"] == 0.25 and got["mteb/avg/retrieval"] == 0.25
    assert got["mteb/avg"] == pytest.approx((0.25 + got["mteb/STSBenchmark/score"]) / 2)


def test_missing_datasets_are_found_in_seconds_without_loading_any(tmp_path, monkeypatch):
    import time

    import huggingface_hub

    from me5.eval.mteb import check_data, missing_data

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    cache = tmp_path / "datasets"
    cache.mkdir()
    tasks = paper_tasks()
    t0 = time.perf_counter()
    missing = missing_data(tasks, cache_dir=cache)
    assert time.perf_counter() - t0 < 5
    assert len(missing) == 55 + 12  # CQADupstackRetrieval: its 12 forums
    assert any("'STSBenchmark': dataset 'mteb/stsbenchmark-sts' (revision b0fddb56" in m for m in missing)
    assert not any(t.data_loaded for t in tasks)
    # a build in the datasets cache, the pinned revision in the hub cache, a local folder, loaded data: all there
    (cache / "mteb___stsbenchmark-sts").mkdir()
    sts12 = next(t for t in tasks if t.metadata.name == "STS12")
    (tmp_path / "hub" / "datasets--mteb--sts12-sts" / "snapshots" / sts12.metadata.dataset["revision"]).mkdir(
        parents=True)
    (tmp_path / "hub" / "datasets--mteb--sts13-sts" / "snapshots" / "another-revision").mkdir(parents=True)
    local = SciFact()
    local.metadata = local.metadata.model_copy(update={"dataset": {"path": str(tmp_path), "revision": "local"}})
    loaded = STSBenchmark()
    loaded.load_data()
    names = [m.split("'")[1] for m in missing_data(tasks, cache_dir=cache)]
    assert {"STSBenchmark", "STS12"} & set(names) == set() and "STS13" in names and len(names) == 65
    assert missing_data([local, loaded], cache_dir=cache) == [] and missing_data([SciFact()], cache_dir=cache)
    with pytest.raises(DataError, match=r"(?s)65 MTEB dataset.*not in the local Hugging Face datasets cache.*"
                                        r"download\(\[.*'STS13'"):
        check_data(tasks, cache_dir=cache)
    # online: what is not cached must answer from the hub (offline here: it cannot)
    with pytest.raises(DataError, match=r"'STS14'.*not cached and not reachable"):
        check_data([t for t in tasks if t.metadata.name == "STS14"], cache_dir=cache, online=True)
