"""Packed rows (me5.models.packing / attention): the padded path's vectors and gradients, no row attends to another."""

from __future__ import annotations

import contextlib
import functools
import json

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import me5.gradcache as gc
from me5.embed.encode import encode_texts
from me5.errors import ConfigError
from me5.export import export_encoder
from me5.gradcache import gradcache_step, plan_chunks
from me5.losses import EmbeddingBatch, InfoNCE, KLDistillation, WeightedLoss
from me5.models import attention
from me5.models.encoder import Encoder
from me5.models.packing import pack_padded, pack_rows, pack_token_lists, row_spans, split_by_real_tokens
from me5.prompts import PromptPolicy
from tests import tiny

SHAPES = {  # the real backbones' position schemes at a test size
    "xlm-roberta": dict(model_type="xlm-roberta", vocab_size=400, pad_token_id=1, max_position_embeddings=66),
    "bert": dict(model_type="bert", vocab_size=400, pad_token_id=0, max_position_embeddings=64, type_vocab_size=2),
}
BODY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)
LENGTHS = [17, 3, 9, 1, 12, 6]


def _pair(model: str, *, dropout: float = 0.0, seed: int = 0, **packed_kwargs) -> tuple[Encoder, Encoder]:
    """(padded, packed) encoders with the same weights."""
    cfg = {**SHAPES[model], **BODY, "hidden_dropout_prob": dropout, "attention_probs_dropout_prob": dropout}
    torch.manual_seed(seed)
    padded = Encoder.from_config(dict(cfg))
    packed = Encoder.from_config(dict(cfg), packed=True, **packed_kwargs)
    packed.load_state_dict(padded.state_dict())
    return padded, packed


def _batch(model: str, lengths=LENGTHS, *, left: bool = False, seed: int = 0):
    pad = SHAPES[model]["pad_token_id"]
    g = torch.Generator().manual_seed(seed)
    width = max(lengths) + 3
    ids = torch.full((len(lengths), width), pad)
    mask = torch.zeros(len(lengths), width, dtype=torch.long)
    for i, n in enumerate(lengths):
        span = slice(width - n, width) if left else slice(0, n)
        ids[i, span] = torch.randint(5, SHAPES[model]["vocab_size"], (n,), generator=g)
        mask[i, span] = 1
    return ids, mask


# ---------------------------------------------------------------------------------------------- same vectors
@pytest.mark.parametrize("model", list(SHAPES))
@pytest.mark.parametrize("pooling", ["mean", "mean-no-prompt", "cls", "last"])
def test_packed_embeddings_equal_padded(model, pooling):
    padded, packed = _pair(model)
    for enc in (padded, packed):
        enc.eval()
        enc.pooling = "mean" if pooling.startswith("mean") else pooling
        enc.include_prompt = pooling != "mean-no-prompt"
    ids, mask = _batch(model)
    prompt = torch.tensor([2, 1, 3, 0, 4, 2])
    want = padded(ids, mask, prompt)
    torch.testing.assert_close(packed(ids, mask, prompt), want, rtol=0, atol=1e-5)
    # a PackedBatch built on the host from token lists, as the embed core builds it
    rows = [ids[i, : n].tolist() for i, n in enumerate(LENGTHS)]
    flat = pack_token_lists(rows, offset=packed.first_position, prompt_length=None)
    flat.prompt_length = prompt
    torch.testing.assert_close(packed(flat), want, rtol=0, atol=1e-5)
    if pooling != "cls":  # cls reads column 0, which is padding under left padding in either path
        left_ids, left_mask = _batch(model, left=True)
        torch.testing.assert_close(packed(left_ids, left_mask, prompt), want, rtol=0, atol=1e-5)


@pytest.mark.parametrize("model,first", [("xlm-roberta", 2), ("bert", 0)])
def test_position_ids_restart_per_row_as_the_padded_model_counts(model, first):
    padded, packed = _pair(model)
    ids, mask = _batch(model)
    batch = pack_padded(ids, mask, offset=packed.first_position)
    assert packed.first_position == first
    assert batch.cu_seqlens.tolist() == [0, *np.cumsum(LENGTHS).tolist()]
    assert batch.max_length == max(LENGTHS) and batch.cu_seqlens.dtype == torch.int32
    expected = [first + j for n in LENGTHS for j in range(n)]
    assert batch.position_ids.tolist() == expected
    if model == "xlm-roberta":  # the ids XLM-R derives for the padded rows, real tokens only
        hf = padded.backbone.embeddings.create_position_ids_from_input_ids(ids, SHAPES[model]["pad_token_id"])
        assert hf[mask.bool()].tolist() == expected
    assert batch.input_ids.tolist() == ids[mask.bool()].tolist()


def test_packed_gradients_equal_padded_full_batch():
    """Same loss -> same parameter gradients through the packed and the padded forward (dropout off)."""
    padded, packed = _pair("xlm-roberta")
    ids, mask = _batch("xlm-roberta")
    for enc in (padded, packed):
        enc.train()
        emb = enc(ids, mask)
        (emb[:, :7].sum() + (emb[0] * emb[1]).sum()).backward()
    for (name, a), (_, b) in zip(padded.named_parameters(), packed.named_parameters(), strict=True):
        assert (a.grad is None) == (b.grad is None), name
        if a.grad is not None:
            torch.testing.assert_close(b.grad, a.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_export_of_a_packed_encoder_is_the_padded_export(tmp_path):
    tok = tiny.tokenizer()
    padded = tiny.encoder(0.0)
    packed = Encoder(padded.backbone, packed=True)  # the same backbone object, switched to packed attention
    out_packed = export_encoder(packed, tok, tmp_path / "packed", prompts=PromptPolicy("e5"))
    packed.backbone.set_attn_implementation("sdpa")
    out_padded = export_encoder(padded, tok, tmp_path / "padded", prompts=PromptPolicy("e5"))
    names = sorted(p.relative_to(out_padded).as_posix() for p in out_padded.rglob("*") if p.is_file())
    assert names == sorted(p.relative_to(out_packed).as_posix() for p in out_packed.rglob("*") if p.is_file())
    for name in names:
        a, b = (out / name for out in (out_padded, out_packed))
        if name.endswith(".json"):
            assert json.loads(a.read_text()) == json.loads(b.read_text()), name
        else:
            assert a.read_bytes() == b.read_bytes(), name
    assert "me5_varlen" not in (out_packed / "config.json").read_text()


# ---------------------------------------------------------------------------------------------- no cross-row attention
def test_a_flat_stream_cannot_reach_an_attention_that_ignores_cu_seqlens():
    padded, packed = _pair("xlm-roberta")
    padded.eval(), packed.eval()
    ids, mask = _batch("xlm-roberta")
    batch = pack_padded(ids, mask, offset=packed.first_position)
    with pytest.raises(ConfigError, match="packed=true"):
        padded(batch)  # a padded (sdpa) encoder refuses a PackedBatch
    packed.backbone.set_attn_implementation("sdpa")  # switched back behind the encoder's back
    with pytest.raises(ConfigError, match="ignores cu_seqlens"):
        packed(ids, mask)
    # control: what the guards prevent -- the stream through plain sdpa attends across rows and changes the vectors
    hidden = packed.backbone(input_ids=batch.input_ids[None], position_ids=batch.position_ids[None]).last_hidden_state
    first_row = torch.nn.functional.normalize(hidden[0, : LENGTHS[0]].mean(0), dim=-1)
    assert (first_row - padded(ids[:1], mask[:1])[0]).abs().max() > 1e-3


def test_packed_attention_checks_its_layout():
    padded, packed = _pair("bert")
    layer = packed.backbone.encoder.layer[0].attention.self
    q = torch.randn(2, 4, 5, 8)
    cu = torch.tensor([0, 5], dtype=torch.int32)
    with pytest.raises(ValueError, match="one flat stream"):
        attention.varlen_attention_forward(layer, q, q, q, None, cu_seq_lens_q=cu, max_length_q=5)
    with pytest.raises(ValueError, match="cu_seq_lens_k"):
        attention.varlen_attention_forward(layer, q[:1], q[:1], q[:1], None, cu_seq_lens_q=cu,
                                           cu_seq_lens_k=cu.clone(), max_length_q=5)


def test_packed_is_refused_where_positions_or_attention_are_unknown():
    with pytest.raises(ConfigError, match="position"):
        Encoder.from_config({**SHAPES["bert"], **BODY, "position_embedding_type": "relative_key"}, packed=True)
    with pytest.raises(ConfigError, match="sdpa or auto"):
        Encoder.from_config({**SHAPES["bert"], **BODY}, packed=True, attn_implementation="eager")
    with pytest.raises(ConfigError, match="packed_attention_dropout"):
        Encoder.from_config({**SHAPES["bert"], **BODY}, packed=True, packed_attention_dropout="sometimes")


# ---------------------------------------------------------------------------------------------- dropout
def test_attention_dropout_is_kept_unless_configured_off(caplog):
    """keep: packed training draws attention-probability dropout (and replays it); off: it does not, and says so."""
    cfg = {**SHAPES["xlm-roberta"], **BODY, "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.3}
    ids, mask = _batch("xlm-roberta")
    torch.manual_seed(0)
    keep = Encoder.from_config(dict(cfg), packed=True)
    off = Encoder.from_config(dict(cfg), packed=True, packed_attention_dropout="off")
    off.load_state_dict(keep.state_dict())
    assert "attention-probability dropout OFF" in caplog.text
    evaluated = keep.eval()(ids, mask)
    keep.train(), off.train()
    assert (keep(ids, mask) - evaluated).abs().max() > 1e-3  # dropout drawn
    torch.testing.assert_close(off(ids, mask), evaluated, rtol=0, atol=1e-6)  # none drawn
    torch.manual_seed(7)
    first = keep(ids, mask)
    torch.manual_seed(7)
    torch.testing.assert_close(keep(ids, mask), first, rtol=0, atol=0)  # the same RNG state, the same masks


# ---------------------------------------------------------------------------------------------- GradCache
@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(1, 40), min_size=1, max_size=60), st.integers(1, 120), st.one_of(st.none(), st.integers(1, 7)))
def test_split_by_real_tokens_fills_a_budget_with_whole_rows(lengths, budget, max_rows):
    chunks = split_by_real_tokens(lengths, budget, max_rows=max_rows)
    assert chunks[0].start == 0 and chunks[-1].stop == len(lengths)
    assert all(a.stop == b.start for a, b in zip(chunks, chunks[1:]))
    for k, sl in enumerate(chunks):
        rows = sl.stop - sl.start
        used = sum(lengths[sl])
        assert rows >= 1 and (rows == 1 or used <= budget)
        assert max_rows is None or rows <= max_rows
        if k + 1 < len(chunks):  # greedy: the next row did not fit
            nxt = lengths[sl.stop]
            assert used + nxt > budget or (max_rows is not None and rows == max_rows)


def _stage2(teacher, group):
    module = WeightedLoss({"infonce": InfoNCE(temperature=0.05), "kd": KLDistillation()}, {"infonce": 0.2, "kd": 1.0})

    def fn(q, p):
        return module(EmbeddingBatch.build(q, p, group_size=group, teacher_scores=teacher))

    return module, fn


def _grads(*modules):
    return {name: g for name, g in tiny.take_grads(*modules).items() if g is not None}


def _chunked_reference(packed, q, p):
    """Both sides embedded chunk by chunk with a graph, packed as GradCache packs them (chunk_tokens=14), in order."""
    embs = []
    for side in (q, p):
        lengths, starts = row_spans(side["attention_mask"])
        _, chunks = plan_chunks(side["attention_mask"], chunk_tokens=14, packed=True)
        embs.append(torch.cat([packed(pack_rows(side["input_ids"], np.arange(sl.start, sl.stop), lengths, starts,
                                                 offset=packed.first_position)) for sl in chunks]))
    return embs


@functools.cache
def _sides(model: str):
    q_ids, q_mask = _batch(model, [5, 2, 7, 3], seed=1)
    p_ids, p_mask = _batch(model, [17, 3, 9, 1, 12, 6, 8, 4], seed=2)
    return {"input_ids": q_ids, "attention_mask": q_mask}, {"input_ids": p_ids, "attention_mask": p_mask}


@pytest.mark.parametrize("model", list(SHAPES))
@pytest.mark.parametrize("sort", [False, True])
def test_packed_gradcache_equals_the_padded_full_batch(model, sort):
    """fp32, dropout off: packed GradCache chunks (by real tokens) == one padded forward/backward of the batch."""
    q, p = _sides(model)
    teacher = torch.randn(4, 2, generator=torch.Generator().manual_seed(3))
    padded, packed = _pair(model)
    module, loss_fn = _stage2(teacher, 2)
    chunks = plan_chunks(p["attention_mask"], chunk_tokens=14, sort_by_length=sort, packed=True)[1]
    assert len(chunks) >= 4  # really chunked
    loss, _ = gradcache_step(packed, q, p, loss_fn, chunk_tokens=14, sort_by_length=sort)
    cached = _grads(packed, module)
    ref, _ = loss_fn(padded(q["input_ids"], q["attention_mask"]), padded(p["input_ids"], p["attention_mask"]))
    ref.backward()
    reference = _grads(padded, module)
    torch.testing.assert_close(loss, ref.detach(), rtol=1e-5, atol=1e-6)
    assert cached.keys() == reference.keys()
    for name in reference:
        torch.testing.assert_close(cached[name], reference[name], rtol=1e-4, atol=1e-6, msg=name)


def test_packed_gradcache_replays_its_dropout(monkeypatch):
    """Dropout on: GradCache == the same packed chunks embedded with a graph in the same order (same draws)."""
    q, p = _sides("xlm-roberta")
    teacher = torch.randn(4, 2, generator=torch.Generator().manual_seed(3))
    _, packed = _pair("xlm-roberta", dropout=0.1)
    packed.train()
    module, loss_fn = _stage2(teacher, 2)
    torch.manual_seed(11)
    gradcache_step(packed, q, p, loss_fn, chunk_tokens=14)
    cached = _grads(packed, module)

    torch.manual_seed(11)
    ref, _ = loss_fn(*_chunked_reference(packed, q, p))
    ref.backward()
    reference = _grads(packed, module)
    for name in reference:
        torch.testing.assert_close(cached[name], reference[name], rtol=1e-4, atol=1e-6, msg=name)
    # control: without the replay the re-forward draws other masks and the gradients differ
    torch.manual_seed(11)
    monkeypatch.setattr(gc, "RandContext", lambda *tensors: contextlib.nullcontext())
    gradcache_step(packed, q, p, loss_fn, chunk_tokens=14)
    fresh = _grads(packed, module)
    assert any(not torch.allclose(fresh[n], reference[n], rtol=1e-4, atol=1e-6) for n in reference)


def test_packed_chunks_hold_the_real_token_budget():
    _, p = _sides("bert")
    lengths = p["attention_mask"].sum(1)
    order, chunks = plan_chunks(p["attention_mask"], chunk_tokens=14, packed=True)
    assert order is None
    assert all(sl.stop - sl.start == 1 or int(lengths[sl].sum()) <= 14 for sl in chunks)
    padded_chunks = plan_chunks(p["attention_mask"], chunk_tokens=14)[1]
    assert len(chunks) < len(padded_chunks)  # real tokens fill a budget that padding wastes


# ---------------------------------------------------------------------------------------------- the embed core
def test_embed_core_runs_packed_and_gives_the_padded_vectors(monkeypatch):
    tok = tiny.tokenizer()
    padded = tiny.encoder(0.1).eval()
    packed = Encoder(tiny.encoder(0.1).backbone, packed=True).eval()
    texts = tiny.texts(23, 1, 30, seed=5)
    seen = []
    forward = Encoder._forward_packed
    monkeypatch.setattr(Encoder, "_forward_packed", lambda self, b: seen.append(b.n_tokens) or forward(self, b))
    got = encode_texts(packed, tok, texts, prefix="w1 w2 ", max_tokens=64, max_batch=8)
    want = encode_texts(padded, tok, texts, prefix="w1 w2 ", max_tokens=64, max_batch=8)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    assert len(seen) > 3 and max(seen) <= 64 + 32  # several packed batches, each within the budget (or one row)


# ---------------------------------------------------------------------------------------------- CUDA kernels (gpu)
def _cuda_pair(model: str, dropout: float, **kwargs):
    cfg = {**SHAPES[model], "max_position_embeddings": 514, "vocab_size": 400, "hidden_size": 256, "num_hidden_layers": 2, "num_attention_heads": 4,
           "intermediate_size": 512, "hidden_dropout_prob": dropout, "attention_probs_dropout_prob": dropout}
    torch.manual_seed(0)
    padded = Encoder.from_config(dict(cfg)).cuda()
    packed = Encoder.from_config(dict(cfg), packed=True, **kwargs).cuda()
    packed.load_state_dict(padded.state_dict())
    return padded, packed


@pytest.mark.gpu
@pytest.mark.parametrize("model", list(SHAPES))
def test_cuda_bf16_packed_vectors_match_padded(model):
    """varlen_attn (no dropout, eval): bf16 cosine >= 0.999 with the padded sdpa path, per row."""
    padded, packed = _cuda_pair(model, 0.1)
    padded.eval(), packed.eval()
    ids, mask = _batch(model, [57, 3, 190, 1, 64, 128, 9, 255], seed=4)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        a, b = padded(ids.cuda(), mask.cuda()), packed(ids.cuda(), mask.cuda())
    assert attention.kernel_name(torch.device("cuda"), torch.bfloat16, 0.0) == "torch-varlen_attn"
    assert float(torch.nn.functional.cosine_similarity(a, b).min()) >= 0.999


@pytest.mark.gpu
def test_cuda_packed_dropout_kernel_replays_and_matches_without_dropout():
    """The flash varlen kernel with dropout_p: the same CUDA RNG state gives the same masks (forward and
    gradients), and at p = 0 it equals varlen_attn."""
    q, k, v = (torch.randn(300, 4, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    cu = torch.tensor([0, 100, 101, 260, 300], device="cuda", dtype=torch.int32)
    ref = attention.packed_attention(q, k, v, cu, 159, dropout=0.0)
    zero = attention._FlashVarlen.apply(q, k, v, cu, 159, 0.0, None)
    torch.testing.assert_close(zero, ref, rtol=0, atol=0)
    torch.manual_seed(5)
    first = attention._FlashVarlen.apply(q, k, v, cu, 159, 0.2, None)
    first.float().square().sum().backward()
    g1 = [t.grad.clone() for t in (q, k, v)]
    for t in (q, k, v):
        t.grad = None
    torch.manual_seed(5)
    again = attention._FlashVarlen.apply(q, k, v, cu, 159, 0.2, None)
    again.float().square().sum().backward()
    torch.testing.assert_close(again, first, rtol=0, atol=0)
    for a, b in zip(g1, (q.grad, k.grad, v.grad)):
        torch.testing.assert_close(b, a, rtol=0, atol=0)
    assert (first - ref).abs().max() > 1e-3  # dropout was drawn


@pytest.mark.gpu
def test_cuda_packed_gradcache_with_dropout_replays_exactly():
    """bf16 + dropout on CUDA: packed GradCache == the same packed chunks embedded with a graph (same draws)."""
    _, packed = _cuda_pair("xlm-roberta", 0.1)
    packed.train()
    q, p = ({k: v.cuda() for k, v in side.items()} for side in _sides("xlm-roberta"))
    teacher = torch.randn(4, 2, device="cuda")
    module, loss_fn = _stage2(teacher, 2)
    module.cuda()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        torch.manual_seed(11)
        gradcache_step(packed, q, p, loss_fn, chunk_tokens=14)
        cached = _grads(packed, module)
        torch.manual_seed(11)
        ref, _ = loss_fn(*_chunked_reference(packed, q, p))
    ref.backward()
    reference = _grads(packed, module)
    for name in reference:
        torch.testing.assert_close(cached[name], reference[name], rtol=2e-2, atol=1e-4, msg=name)
