"""GradCache gives the parameter gradients of an ordinary backward, dropout included."""

from __future__ import annotations

import pytest
import torch

import me5.gradcache as gc
from me5.gradcache import (
    RandContext,
    gradcache_step,
    plan_chunks,
    split_by_rows,
    split_by_tokens,
    split_to_count,
)
from me5.losses import EmbeddingBatch, InfoNCE, KLDistillation, WeightedLoss
from me5.models.encoder import Encoder
from tests import tiny

B, G = 6, 3
SEED = 1234


@pytest.fixture(scope="module")
def tokenizer():
    return tiny.tokenizer()


def _encoder(tokenizer, dropout: float = 0.1) -> Encoder:
    return tiny.encoder(dropout)


def _texts(n: int, lo: int, hi: int, seed: int) -> list[str]:
    return tiny.texts(n, lo, hi, seed)


@pytest.fixture(scope="module")
def inputs(tokenizer):
    q = tokenizer(_texts(B, 2, 10, seed=1), padding=True, return_tensors="pt")
    p = tokenizer(_texts(B * G, 3, 20, seed=2), padding=True, return_tensors="pt")
    teacher = torch.randn(B, G, generator=torch.Generator().manual_seed(3)) * 2
    return dict(q), dict(p), teacher


def _loss_fn(kind: str, teacher):
    """(loss module, loss_fn(q, p) -> (loss, parts)) for stage 1 (InfoNCE, pairs) or stage 2 (InfoNCE + KD, G=3)."""
    if kind == "infonce":
        module = InfoNCE(temperature=0.05, learnable_temperature=True)

        def fn(q, p):
            return module(EmbeddingBatch.build(q, p[::G], group_size=1)), {}  # positives only
    else:
        module = WeightedLoss({"infonce": InfoNCE(), "kd": KLDistillation()}, {"infonce": 0.2, "kd": 1.0})

        def fn(q, p):
            return module(EmbeddingBatch.build(q, p, group_size=G, teacher_scores=teacher))

    return module, fn


def _chunks(mask, chunk_rows, chunk_tokens):
    if chunk_tokens is not None:
        return split_by_tokens(mask, chunk_tokens, max_rows=chunk_rows)
    return split_by_rows(mask.size(0), chunk_rows or mask.size(0))


def _reference_step(
    encoder, q, p, loss_fn, *, chunk_rows=None, chunk_tokens=None, sort_by_length=False, trim=True
):
    """Ordinary backward: every chunk embedded with a graph (in the same order, so the same dropout draws).

    With ``sort_by_length`` the rows are permuted by the same plan first and the embeddings put back into batch
    order by plain indexing (an independent implementation of the un-sort).
    """
    embs = []
    for side in (q, p):
        order, chunks = plan_chunks(
            side["attention_mask"], chunk_rows=chunk_rows, chunk_tokens=chunk_tokens, sort_by_length=sort_by_length
        )
        ids_all, mask_all = side["input_ids"], side["attention_mask"]
        if order is not None:
            ids_all, mask_all = ids_all[order], mask_all[order]
        parts = []
        for sl in chunks:
            ids, mask = ids_all[sl], mask_all[sl]
            if trim:  # right padding: cut to the chunk's longest row
                length = int(mask.sum(1).max())
                ids, mask = ids[:, :length], mask[:, :length]
            parts.append(encoder(ids, mask))
        emb = torch.cat(parts)
        if order is not None:
            emb = emb[torch.argsort(order)]
        embs.append(emb)
    loss, _ = loss_fn(*embs)
    loss.backward()
    return loss.detach()


CHUNKINGS = {
    "rows3": dict(chunk_rows=3),
    "tokens": dict(chunk_tokens=40),
    "tokens+rows": dict(chunk_rows=2, chunk_tokens=60),
    "tokens+sorted": dict(chunk_tokens=40, sort_by_length=True),
}


@pytest.mark.parametrize("chunking", list(CHUNKINGS))
@pytest.mark.parametrize("kind", ["infonce", "stage2"])
def test_gradcache_matches_ordinary_backward_with_dropout(tokenizer, inputs, kind, chunking):
    q, p, teacher = inputs
    kwargs = CHUNKINGS[chunking]
    assert len(plan_chunks(p["attention_mask"], **kwargs)[1]) > 2
    encoder = _encoder(tokenizer, dropout=0.1)
    module, loss_fn = _loss_fn(kind, teacher)

    torch.manual_seed(SEED)
    loss, parts = gradcache_step(encoder, q, p, loss_fn, **kwargs)
    cached = tiny.take_grads(encoder, module)
    assert not loss.requires_grad and all(not v.requires_grad for v in parts.values())
    if kind == "stage2":
        assert set(parts) == {"infonce", "kd"}

    torch.manual_seed(SEED)
    ref_loss = _reference_step(encoder, q, p, loss_fn, **kwargs)
    reference = tiny.take_grads(encoder, module)

    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    tiny.assert_grads_close(cached, reference)
    if kind == "infonce":
        # the learnable temperature's gradient comes from the loss's own backward
        assert reference["1.log_scale"].abs() > 0


def test_gradcache_single_chunk_equals_plain_full_batch_with_dropout(tokenizer, inputs):
    q, p, teacher = inputs
    encoder = _encoder(tokenizer, dropout=0.1)
    module, loss_fn = _loss_fn("stage2", teacher)
    torch.manual_seed(SEED)
    gradcache_step(encoder, q, p, loss_fn)
    cached = tiny.take_grads(encoder, module)
    torch.manual_seed(SEED)
    loss, _ = loss_fn(
        encoder(q["input_ids"], q["attention_mask"]), encoder(p["input_ids"], p["attention_mask"])
    )
    loss.backward()
    tiny.assert_grads_close(cached, tiny.take_grads(encoder, module))


@pytest.mark.parametrize("chunking", ["rows3", "tokens", "tokens+sorted"])
def test_gradcache_equals_plain_full_batch_without_dropout(tokenizer, inputs, chunking):
    """Chunking and trimming the padding are exact: with dropout off, GradCache == one untrimmed full batch."""
    q, p, teacher = inputs
    encoder = _encoder(tokenizer, dropout=0.0)
    module, loss_fn = _loss_fn("stage2", teacher)
    gradcache_step(encoder, q, p, loss_fn, **CHUNKINGS[chunking])
    cached = tiny.take_grads(encoder, module)
    _reference_step(encoder, q, p, loss_fn, trim=False)  # one chunk per side, full padded length
    tiny.assert_grads_close(cached, tiny.take_grads(encoder, module))


def test_without_rng_restore_the_gradients_differ(tokenizer, inputs, monkeypatch):
    """Control: replaying fresh dropout masks in the re-forward gives wrong gradients, and the test sees it."""

    class NoRestore:
        def __init__(self, *tensors):
            pass

        def __enter__(self):
            pass

        def __exit__(self, *exc):
            pass

    q, p, teacher = inputs
    encoder = _encoder(tokenizer, dropout=0.1)
    module, loss_fn = _loss_fn("stage2", teacher)
    monkeypatch.setattr(gc, "RandContext", NoRestore)
    torch.manual_seed(SEED)
    gradcache_step(encoder, q, p, loss_fn, chunk_rows=3)
    cached = tiny.take_grads(encoder, module)
    torch.manual_seed(SEED)
    _reference_step(encoder, q, p, loss_fn, chunk_rows=3)
    reference = tiny.take_grads(encoder, module)
    with pytest.raises(AssertionError):
        tiny.assert_grads_close(cached, reference)


def test_backward_fn_is_called_once_per_chunk(tokenizer, inputs):
    q, p, teacher = inputs
    encoder = _encoder(tokenizer)
    _, loss_fn = _loss_fn("stage2", teacher)
    calls = []

    def backward_fn(surrogate):
        calls.append(surrogate.detach())
        surrogate.backward()

    gradcache_step(encoder, q, p, loss_fn, chunk_rows=4, backward_fn=backward_fn)
    assert len(calls) == len(split_by_rows(B, 4)) + len(split_by_rows(B * G, 4))


def test_length_bucketing_packs_tighter_and_unsorts(tokenizer, inputs):
    """Sorting by length cuts fewer padded tokens, and the embeddings come back in batch order."""
    _, p, _ = inputs
    mask = p["attention_mask"]
    lengths = mask.sum(1)

    def padded_tokens(order, chunks):
        ls = lengths if order is None else lengths[order]
        return sum((sl.stop - sl.start) * int(ls[sl].max()) for sl in chunks)

    plain, bucketed = plan_chunks(mask, chunk_tokens=40), plan_chunks(mask, chunk_tokens=40, sort_by_length=True)
    assert plain[0] is None and sorted(bucketed[0].tolist()) == list(range(mask.size(0)))
    assert (lengths[bucketed[0]].diff() <= 0).all()  # longest first
    assert padded_tokens(*bucketed) < padded_tokens(*plain)

    class RowId(torch.nn.Module):  # "embeds" each row as the sum of its ids: checks the un-sort exactly
        def __init__(self):
            super().__init__()
            self.one = torch.nn.Parameter(torch.ones(()))

        def forward(self, ids, mask):
            return (ids * mask).sum(1, keepdim=True).float() * self.one

    got = {}

    def loss_fn(q_BD, p_ND):
        got["p"] = p_ND.detach().clone()
        return (q_BD.sum() + p_ND.sum()) * 0, {}

    gradcache_step(RowId(), p, p, loss_fn, chunk_tokens=40, sort_by_length=True)
    want = (p["input_ids"] * mask).sum(1, keepdim=True).float()
    assert want.unique().numel() == want.numel()
    torch.testing.assert_close(got["p"], want)


def test_grad_sync_is_true_only_for_the_last_backward(tokenizer, inputs):
    q, p, teacher = inputs
    encoder = _encoder(tokenizer)
    _, loss_fn = _loss_fn("stage2", teacher)
    flags = []
    gradcache_step(encoder, q, p, loss_fn, chunk_rows=4, grad_sync=flags.append)
    assert flags == [False] * (len(flags) - 1) + [True] and len(flags) == 2 + 5


def test_split_to_count_and_equalized_gradcache(tokenizer, inputs):
    chunks = [slice(0, 5), slice(5, 6), slice(6, 9)]
    assert split_to_count(chunks, 3) == chunks
    got = split_to_count(chunks, 5)
    assert len(got) == 5 and got[0].start == 0 and got[-1].stop == 9
    assert all(a.stop == b.start for a, b in zip(got, got[1:], strict=False))
    with pytest.raises(ValueError):
        split_to_count([slice(0, 1), slice(1, 2)], 3)
    # equalizing to more chunks (as another rank would ask) changes nothing but the chunking
    q, p, teacher = inputs
    encoder = _encoder(tokenizer, dropout=0.0)
    module, loss_fn = _loss_fn("stage2", teacher)
    calls = []

    def backward_fn(surrogate):
        calls.append(1)
        surrogate.backward()

    gradcache_step(encoder, q, p, loss_fn, chunk_tokens=60, equalize_chunks=lambda counts: [c + 2 for c in counts],
                   backward_fn=backward_fn)
    n_plain = sum(len(plan_chunks(side["attention_mask"], chunk_tokens=60)[1]) for side in (q, p))
    assert len(calls) == n_plain + 4
    cached = tiny.take_grads(encoder, module)
    _reference_step(encoder, q, p, loss_fn, trim=False)
    tiny.assert_grads_close(cached, tiny.take_grads(encoder, module))


def test_rand_context_replays_dropout():
    x = torch.ones(4, 8)
    ctx = RandContext(x)
    first = torch.nn.functional.dropout(x, 0.5)
    after = torch.get_rng_state()
    with ctx:
        again = torch.nn.functional.dropout(x, 0.5)
    torch.testing.assert_close(first, again)
    assert torch.equal(torch.get_rng_state(), after)  # the replay leaves the outer RNG untouched


def test_split_by_tokens_respects_budget():
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(1, 30, (40,), generator=g)
    lengths[7] = 29
    mask = (torch.arange(32) < lengths[:, None]).long()
    for budget in (10, 50, 64, 200, 10_000):
        for max_rows in (None, 3):
            chunks = split_by_tokens(mask, budget, max_rows=max_rows)
            assert chunks[0].start == 0 and chunks[-1].stop == 40
            assert all(a.stop == b.start for a, b in zip(chunks, chunks[1:], strict=False))
            for sl in chunks:
                rows = sl.stop - sl.start
                assert rows >= 1
                assert rows == 1 or rows * int(lengths[sl].max()) <= budget
                assert max_rows is None or rows <= max_rows
    assert split_by_tokens(mask, 10_000) == [slice(0, 40)]
    assert split_by_rows(7, 3) == [slice(0, 3), slice(3, 6), slice(6, 7)]
