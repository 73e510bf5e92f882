"""One prompt policy: its strings, and every consumer taking them from it (collator, evaluator, export,
consistency filter); no prompt string anywhere else in the library."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest
import torch

from me5.data import PairExample, Source
from me5.embed.encode import encode_texts
from me5.errors import ConfigError
from me5.eval.retrieval import RetrievalData, RetrievalEvaluator
from me5.export import export_encoder
from me5.prompts import STYLES, TASKS, PromptPolicy, task_instruction
from tests.helpers import ROOT, format_item

BITEXT = "Retrieve parallel sentences."
MIRACL = "Given a question, retrieve Wikipedia passages that answer the question"


@pytest.mark.parametrize(
    ("style", "symmetric", "query", "document"),
    [
        ("e5", False, "query: ", "passage: "),
        ("e5", True, "query: ", "query: "),
        ("instruct", False, f"Instruct: {MIRACL}\nQuery: ", ""),
        ("instruct", True, f"Instruct: {MIRACL}\nQuery: ", f"Instruct: {MIRACL}\nQuery: "),
        ("none", False, "", ""),
        ("none", True, "", ""),
    ],
)
def test_the_three_policies(style, symmetric, query, document):
    assert PromptPolicy(style).pair(TASKS["miracl"], symmetric=symmetric) == (query, document)


def test_bad_policy_inputs_name_the_field():
    with pytest.raises(ConfigError, match="prompts.style"):
        PromptPolicy("e6")
    with pytest.raises(ConfigError, match="needs a task instruction"):
        PromptPolicy("instruct").query(None)
    with pytest.raises(ConfigError, match="unknown task 'mirakl'"):
        task_instruction("mirakl")
    with pytest.raises(ConfigError, match="unknown task"):
        Source("x.jsonl", task="mirakl")  # at construction, before any reading


def test_policy_is_recovered_from_its_prompts():
    for style in STYLES:
        p = PromptPolicy(style)
        st = p.sentence_transformers()["prompts"]
        assert PromptPolicy.infer(st["query"], st["passage"]) == p
    with pytest.raises(ConfigError, match="match no prompt style"):
        PromptPolicy.infer("q: ", "p: ")


def test_collator_items_take_the_policy_and_the_source_task():
    ex = PairExample("the cat", "le chat", ("un chien",), (2.0, 1.0))
    nllb = Source("x.jsonl", symmetric=True, task="nllb")
    msmarco = Source("x.jsonl", task="msmarco_passage")
    assert format_item(nllb, ex)["passages"] == ["query: le chat"]
    item = format_item(msmarco, ex, n_negatives=1, prompt_style="instruct")
    assert item["query"] == f"Instruct: {TASKS['msmarco_passage']}\nQuery: the cat"
    assert item["passages"] == ["le chat", "un chien"] and item["teacher_scores"] == [2.0, 1.0]
    assert format_item(nllb, ex, prompt_style="instruct")["passages"] == [f"Instruct: {BITEXT}\nQuery: le chat"]


class _Recorder(torch.nn.Module):
    """An encoder stand-in that records the texts it is asked to embed."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.texts: list[str] = []

    def encode(self, texts, tokenizer, *, prefix="", **_):
        self.texts += [prefix + t for t in texts]
        return torch.nn.functional.normalize(torch.randn(len(texts), 4, generator=torch.Generator().manual_seed(0)), dim=-1)


@pytest.mark.parametrize("style", STYLES)
def test_evaluator_embeds_with_the_policy(style):
    data = RetrievalData({"d1": {"title": "T", "text": "body"}}, {"q1": {"text": "what"}}, {"q1": {"d1": 1}})
    enc = _Recorder()
    RetrievalEvaluator(data, prompts=PromptPolicy(style), task="miracl").evaluate(enc, None, device="cpu")
    q, d = PromptPolicy(style).pair(TASKS["miracl"])
    assert enc.texts == [d + "T body", q + "what"]


def test_export_writes_the_policy_for_sentence_transformers(tmp_path):
    st = pytest.importorskip("sentence_transformers")
    from tests.tiny import build_tiny_encoder, build_tokenizer

    tok = build_tokenizer(tmp_path / "tok")
    enc = build_tiny_encoder(tok)
    out = export_encoder(enc, tok, tmp_path / "m", prompts=PromptPolicy("instruct"), instruction=TASKS["miracl"])
    cfg = json.loads((out / "config_sentence_transformers.json").read_text())
    q = f"Instruct: {MIRACL}\nQuery: "
    assert cfg["prompts"] == {"query": q, "passage": "", "document": ""} and cfg["default_prompt_name"] == "query"
    meta = json.loads((out / "me5.json").read_text())
    assert meta["prompts"] == {"style": "instruct"} and meta["query_prefix"] == q
    model = st.SentenceTransformer(str(out), device="cpu")
    texts = ["a cat", "кошка"]
    for name, prefix in (("query", q), ("document", "")):
        got = model.encode(texts, prompt_name=name, convert_to_tensor=True)
        torch.testing.assert_close(got, encode_texts(enc, tok, texts, prefix=prefix), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(model.encode(texts, convert_to_tensor=True), encode_texts(enc, tok, texts, prefix=q),
                               atol=1e-5, rtol=1e-4)  # the default prompt is the query prompt


def _non_docstring_strings(path: Path):
    tree = ast.parse(path.read_text(encoding="utf-8"))
    docs = {id(n.body[0].value) for n in ast.walk(tree)
            if isinstance(n, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
            and n.body and isinstance(n.body[0], ast.Expr) and isinstance(n.body[0].value, ast.Constant)}
    for n in ast.walk(tree):
        if isinstance(n, ast.Constant) and isinstance(n.value, str) and id(n) not in docs:
            yield n.lineno, n.value


def test_no_prompt_string_outside_the_prompt_module():
    """``query: ``, ``passage: `` and the instruct template are written in me5/prompts.py only (the collator's
    tokenizer self-check probe is a test string, not a prompt)."""
    allowed = {("data/collate.py", "query: a  b")}
    found = []
    for f in sorted((ROOT / "src" / "me5").rglob("*.py")):
        rel = f.relative_to(ROOT / "src" / "me5").as_posix()
        if rel == "prompts.py":
            continue
        for line, s in _non_docstring_strings(f):
            if any(k in s for k in ("query: ", "passage: ", "Instruct:", "\nQuery: ")) and (rel, s) not in allowed:
                found.append(f"{rel}:{line}: {s!r}")
    for f in sorted((ROOT / "conf").rglob("*.yaml")):
        for i, line in enumerate(f.read_text().splitlines(), 1):
            code = line.split("#", 1)[0]  # a quoted prompt as a value (a key such as `passage: lead` is not one)
            if any(q + k in code for q in "\"'" for k in ("query: ", "passage: ", "Instruct:")):
                found.append(f"{f.relative_to(ROOT)}:{i}: {line.strip()}")
    assert not found, found
