"""Instruction data (issue 9, item 4): a task definition per record, E5-mistral's synthetic shapes, the stage-2
task definitions checked against E5-mistral and unilm, and pooling without the prompt's tokens in training,
evaluation and export (against sentence-transformers' ``Pooling(include_prompt=False)``)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from me5.batching import BatchPlan
from me5.data import ItemFormatter, PairCollator, PairExample, Source, to_example
from me5.data.shards import PrepareOptions, prepare
from me5.data.sources.instructions import SyntheticInstructions
from me5.data.sources.stage2 import STAGE2_SOURCES
from me5.embed.encode import encode_texts
from me5.errors import ConfigError, DataError
from me5.eval.mteb import CQADUPSTACK_INSTRUCTION, TASK_INSTRUCTIONS, TYPE_INSTRUCTIONS
from me5.export import export_encoder
from me5.models.encoder import Encoder
from me5.models.pooling import without_prompt
from me5.prompts import TASKS, PromptPolicy, prompt_token_count
from tests import tiny
from tests.helpers import write_jsonl
from tests.tiny import build_tiny_encoder, build_tokenizer

RETRIEVAL = "Given a recipe name, retrieve the recipe"


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return build_tokenizer(tmp_path_factory.mktemp("tok"))


# ------------------------------------------------------------------------------------------------ the schema
def test_a_record_carries_its_instruction_and_symmetry_through_prepared_shards(tmp_path):
    recs = [{"query": f"q{i}", "positive": f"p{i}", "instruction": f"task {i % 2}", "symmetric": i % 3 == 0}
            for i in range(6)] + [{"query": "plain", "positive": "pair"}]
    write_jsonl(tmp_path / "in.jsonl", recs)
    before = {ex.query: ex for ex in Source(str(tmp_path / "in.jsonl")).load_examples()[0]}
    assert before["q1"].instruction == "task 1" and before["q3"].symmetric is True and before["q1"].symmetric is False
    assert before["plain"].instruction is None and before["plain"].symmetric is None
    prepare({"mine": Source(str(tmp_path / "in.jsonl"))}, tmp_path / "out", PrepareOptions(progress=False))
    after = {ex.query: ex for ex in Source(str(tmp_path / "out" / "mine")).load_examples()[0]}
    assert after == {q: ex.__class__(**{**ex.__dict__, "source": after[q].source}) for q, ex in before.items()}


@pytest.mark.parametrize(("fields", "field", "message"), [
    ({"instruction": "  "}, "instruction", "empty text"),
    ({"instruction": 3}, "instruction", "expected a string"),
    ({"symmetric": "yes"}, "symmetric", "expected true or false"),
])
def test_bad_instruction_fields_name_file_line_and_field(fields, field, message):
    with pytest.raises(DataError, match=message) as err:
        to_example({"query": "q", "positive": "p", **fields}, source="s", file="x.jsonl", line=7)
    assert err.value.field == field and "x.jsonl:7" in str(err.value)


# ------------------------------------------------------------------------------------------------ prompts per record
def test_a_record_instruction_and_symmetry_win_over_the_source(tmp_path):
    src = Source(str(write_jsonl(tmp_path / "r.jsonl", [{"query": "q", "positive": "p"}])), task="miracl")
    rng = np.random.default_rng(0)
    instruct = ItemFormatter.for_source(src, prompts=PromptPolicy("instruct"))
    plain = PairExample("q", "p")
    own = PairExample("q", "p", instruction=RETRIEVAL)
    sym = PairExample("q", "p", instruction=TASKS["sts"], symmetric=True)
    assert instruct(plain, rng=rng)["query"] == f"Instruct: {TASKS['miracl']}\nQuery: q"
    item = instruct(own, rng=rng)
    assert (item["query"], item["passages"]) == (f"Instruct: {RETRIEVAL}\nQuery: q", ["p"])
    assert (item["query_prompt"], item["passage_prompt"]) == (f"Instruct: {RETRIEVAL}\nQuery: ", "")
    item = instruct(sym, rng=rng)  # symmetric: the instruction on both sides (unilm, symmetric tasks)
    assert item["passages"] == [f"Instruct: {TASKS['sts']}\nQuery: p"]
    e5 = ItemFormatter.for_source(src, prompts=PromptPolicy("e5"))
    assert e5(own, rng=rng)["query"] == "query: q" and e5(own, rng=rng)["passages"] == ["passage: p"]
    assert e5(sym, rng=rng)["passages"] == ["query: p"]  # E5: a symmetric pair is query: on both sides


# ------------------------------------------------------------------------------------------------ synthetic source
GENERATED = [
    {"task": RETRIEVAL, "language": "German", "user_query": "Apfelkuchen", "positive_document": "Rezept",
     "hard_negative_document": "Birnen"},
    {"task": "Classify the sentiment of a movie review", "task_type": "long-short",
     "response": '```json\n{"input_text": "great film", "label": "positive", "misleading_label": "neutral"}\n```'},
    {"instruction": "Match a word with its definition", "lang": "fr",
     "output": {"input": "chat", "positive_document": "un animal"}},
    {"task_type": "sts", "S1": "a cat sits", "S2": "a cat is sitting", "S3": "a dog runs"},
    {"task": TASKS["bitext"], "S1": "hello", "S2": "bonjour", "S3": "bonsoir"},
    {"task": RETRIEVAL, "user_query": "x", "positive_document": "   ", "hard_negative_document": "z"},
]


def test_synthetic_instruction_shapes_become_pairs_with_their_own_task(tmp_path):
    src = SyntheticInstructions(str(write_jsonl(tmp_path / "gen.jsonl", GENERATED)))
    kept, counts = src.load_examples()
    got = [(e.query, e.positive, e.negatives, e.instruction, e.symmetric, e.lang) for e in kept]
    assert got == [
        ("Apfelkuchen", "Rezept", ("Birnen",), RETRIEVAL, False, "German"),
        ("great film", "positive", ("neutral",), "Classify the sentiment of a movie review", False, "und"),
        ("chat", "un animal", (), "Match a word with its definition", False, "fr"),
        ("a cat sits", "a cat is sitting", ("a dog runs",), TASKS["sts"], True, "und"),
        ("hello", "bonjour", ("bonsoir",), TASKS["bitext"], True, "und"),
    ]
    assert counts["skipped/empty_positive_document"] == 1 and counts["kept"] == 5


@pytest.mark.parametrize(("record", "field", "message"), [
    ({"user_query": "q", "positive_document": "p"}, "task", "needs its task definition"),
    ({"S1": "a", "S2": "b"}, "task_type", "needs a task_type"),
    ({"task": "t", "task_type": "poetry", "S1": "a", "S2": "b"}, "task_type", "unknown task_type"),
    ({"task": "t", "response": "Sure! Here is the JSON:"}, "response", "not JSON"),
    ({"task": "t", "response": "[1, 2]"}, "response", "not an object"),
    ({"task": "t", "user_query": "q"}, "positive_document", "missing raw field"),
    ({"task": "t", "text": "q"}, "response", "none of the raw fields"),
])
def test_bad_synthetic_records_name_file_line_and_field(tmp_path, record, field, message):
    path = write_jsonl(tmp_path / "gen.jsonl", [GENERATED[0], record])
    with pytest.raises(DataError, match=message) as err:
        SyntheticInstructions(str(path)).load_examples()
    assert err.value.field == field and f"{path}:2" in str(err.value)


def test_paper_instruct_mixture_reads_the_synthetic_data():
    from tests.helpers import compose_cfg

    cfg = compose_cfg(["experiment=me5_large_instruct", "start_from=/x"])
    spec = cfg.data.finetune.sources.synthetic_instructions
    assert spec._target_ == "me5.data.sources.instructions.SyntheticInstructions"
    assert cfg.data.finetune.weights.synthetic_instructions == 500 and "msmarco_passage" in cfg.data.finetune.sources


# ------------------------------------------------------------------------------------------------ task definitions
#: E5-mistral (arXiv 2401.00368) Table 13, the instructions of its training datasets, as unilm spells them
E5_MISTRAL_TRAINING = {
    "msmarco_passage": "Given a web search query, retrieve relevant passages that answer the query",
    "msmarco_document": "Given a web search query, retrieve relevant documents that answer the query",
    "nq": "Given a question, retrieve Wikipedia passages that answer the question",
    "triviaqa": "Retrieve Wikipedia passages that answer the question",
    "squad": "Retrieve Wikipedia passages that answer the question",
    "nli": "Retrieve semantically similar text.",
    "eli5": "Provided a user question, retrieve the highest voted answers on Reddit ELI5 forum",
    "dureader": "Given a Chinese search query, retrieve web passages that answer the question",
    "fever": "Given a claim, retrieve documents that support or refute the claim",
    "hotpotqa": "Given a multi-hop question, retrieve documents that can help answer the question",
    "quora": "Given a question, retrieve questions that are semantically equivalent to the given question",
    "mrtydi": "Given a question, retrieve Wikipedia passages that answer the question",
    "miracl": "Given a question, retrieve Wikipedia passages that answer the question",
    "nllb": "Retrieve parallel sentences.",
}
#: the stage-2 tasks that are also evaluation tasks of unilm's map (``TASK_INSTRUCTIONS`` in me5.eval.mteb)
EVAL_TWINS = {"msmarco_passage": "MSMARCO", "nq": "NQ", "fever": "FEVER", "hotpotqa": "HotpotQA",
              "quora": "QuoraRetrieval"}


def test_stage2_task_definitions_are_e5_mistrals_and_unilms():
    assert {name: TASKS[cls.task] for name, cls in STAGE2_SOURCES.items()} == E5_MISTRAL_TRAINING
    for task, mteb_name in EVAL_TWINS.items():
        assert TASKS[task] == TASK_INSTRUCTIONS[mteb_name], task
    assert TASKS["sts"] == TYPE_INSTRUCTIONS["STS"] and TASKS["bitext"] == TYPE_INSTRUCTIONS["BitextMining"]
    assert CQADUPSTACK_INSTRUCTION.startswith("Given a question")


# ------------------------------------------------------------------------------------------------ pooling
@pytest.mark.parametrize("left", [False, True])
def test_without_prompt_equals_sentence_transformers_mask(left):
    from sentence_transformers.sentence_transformer.modules.pooling import Pooling

    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(1, 12, (16,), generator=g)
    pos = torch.arange(12)
    mask = ((pos >= 12 - lengths[:, None]) if left else (pos < lengths[:, None])).long()
    for k in range(0, 6):
        torch.testing.assert_close(without_prompt(mask, k), Pooling._exclude_prompt_from_mask(mask, k))
        torch.testing.assert_close(without_prompt(mask, torch.full((16,), k)), without_prompt(mask, k))


def test_prompt_token_count_equals_sentence_transformers(tok, tmp_path):
    from sentence_transformers import SentenceTransformer

    out = export_encoder(build_tiny_encoder(tok), tok, tmp_path / "m", prompts=PromptPolicy("e5"))
    st_model = SentenceTransformer(str(out), device="cpu")
    for prompt in ("query: ", "passage: ", f"Instruct: {RETRIEVAL}\nQuery: ", "Instruct: x\nQuery: ", "", "a"):
        ours = prompt_token_count(tok, prompt)
        assert ours == (st_model[0]._get_prompt_length(prompt) if prompt else 0), prompt


def test_include_prompt_needs_mean_pooling():
    with pytest.raises(ConfigError, match="include_prompt"):
        Encoder(tiny.encoder().backbone, pooling="cls", include_prompt=False)


TEXTS = ["a cat sits on the mat", "кошка сидит", "猫", "the quick brown fox jumps over the lazy dog again and again"]


@pytest.mark.parametrize("style", ["e5", "instruct"])
def test_export_without_prompt_pooling_equals_sentence_transformers(tok, tmp_path, style):
    """me5's encode path (encode_texts) == SentenceTransformer(export) with its prompts and
    include_prompt=False; me5.evaluate loads the setting back; pooling over the prompt gives other vectors."""
    from sentence_transformers import SentenceTransformer

    from me5.models.saved import load_model, read_saved_settings

    enc = build_tiny_encoder(tok)
    enc.include_prompt = False
    policy = PromptPolicy(style)
    out = export_encoder(enc, tok, tmp_path / "m", prompts=policy, instruction=RETRIEVAL)
    assert json.loads((out / "1_Pooling" / "config.json").read_text())["include_prompt"] is False
    assert json.loads((out / "me5.json").read_text())["include_prompt"] is False
    st_model = SentenceTransformer(str(out), device="cpu")
    for name, prefix in (("query", policy.query(RETRIEVAL)), ("document", policy.document(RETRIEVAL))):
        theirs = st_model.encode(TEXTS, prompt_name=name, convert_to_tensor=True)
        torch.testing.assert_close(encode_texts(enc, tok, TEXTS, prefix=prefix), theirs, atol=1e-5, rtol=1e-4)
    settings = read_saved_settings(out)
    assert settings.include_prompt is False
    loaded, _, _ = load_model(str(out), settings, "cpu")
    q = policy.query(RETRIEVAL)
    torch.testing.assert_close(encode_texts(loaded, tok, TEXTS, prefix=q), encode_texts(enc, tok, TEXTS, prefix=q))
    enc.include_prompt = True
    assert not torch.allclose(encode_texts(enc, tok, TEXTS, prefix=q), encode_texts(loaded, tok, TEXTS, prefix=q),
                              atol=1e-3)


def _collated(tok, tmp_path, style="instruct"):
    recs = [{"query": t, "positive": TEXTS[(i + 1) % 4], "negatives": [TEXTS[(i + 2) % 4]],
             "teacher_scores": [2.0, 1.0], "instruction": RETRIEVAL if i % 2 else None,
             "symmetric": True if i == 3 else None} for i, t in enumerate(TEXTS)]
    src = Source(str(write_jsonl(tmp_path / "d.jsonl", recs)), task="miracl")
    fmt = ItemFormatter.for_source(src, prompts=PromptPolicy(style), n_negatives=1)
    items = [fmt(ex, rng=np.random.default_rng(0)) for ex in src.load_examples()[0]]
    return items, PairCollator(tok, query_max_length=128, passage_max_length=128)(items)


def test_training_pools_the_same_tokens_as_evaluation(tok, tmp_path):
    """A collated batch's rows, pooled without their prompts, equal the evaluation path's vectors of the same
    texts under the same prompts (mixed instructions in one batch, a symmetric record among them)."""
    items, batch = _collated(tok, tmp_path)
    assert len({it["query_prompt"] for it in items}) == 2 and items[3]["passage_prompt"].startswith("Instruct: ")
    enc = build_tiny_encoder(tok)
    enc.include_prompt = False
    with torch.no_grad():
        q = enc(batch["query_input_ids"], batch["query_attention_mask"], batch["query_prompt_length"])
        p = enc(batch["passage_input_ids"], batch["passage_attention_mask"], batch["passage_prompt_length"])
    for i, it in enumerate(items):
        prompt = it["query_prompt"]
        ref = encode_texts(enc, tok, [it["query"][len(prompt):]], prefix=prompt, max_length=128)
        torch.testing.assert_close(q[i: i + 1], ref, atol=1e-5, rtol=1e-4)
        for j, text in enumerate(it["passages"]):
            d = it["passage_prompt"]
            ref = encode_texts(enc, tok, [text[len(d):]], prefix=d, max_length=128)
            torch.testing.assert_close(p[2 * i + j: 2 * i + j + 1], ref, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("chunking", [dict(batch_plan=BatchPlan.build(global_batch_size=4, chunk_rows=2)),
                                      dict(batch_plan=BatchPlan.build(global_batch_size=4, chunk_tokens=40),
                                           sort_by_length=True)])
def test_gradcache_without_prompt_pooling_equals_the_plain_step(tok, tmp_path, chunking):
    from me5.training import SupervisedFinetuning

    _, batch = _collated(tok, tmp_path)

    def module(include_prompt, **kw):
        enc = build_tiny_encoder(tok)  # eval mode: no dropout, so the two steps see the same network
        enc.include_prompt = include_prompt
        return SupervisedFinetuning(enc, tiny.loss("finetune"), optimizer=lambda p: torch.optim.SGD(p, lr=0.0),
                                    grad_clip=None, **kw)

    cached, plain, with_prompt = module(False, **chunking), module(False), module(True)
    out, ref = cached.compute_loss_and_backward(batch), plain.compute_loss_and_backward(batch)
    torch.testing.assert_close(out.loss, ref.loss, rtol=1e-5, atol=1e-6)
    tiny.assert_grads_close(tiny.take_grads(cached), tiny.take_grads(plain))
    assert not torch.allclose(with_prompt.compute_loss_and_backward(batch).loss, ref.loss)
    del batch["query_prompt_length"]
    with pytest.raises(ConfigError, match="prompt lengths"):
        plain.compute_loss_and_backward(batch)
