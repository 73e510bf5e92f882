"""The LightningModule's step: GradCache == no caching for both stages, duplicate masking, strategy checks.

``EmbeddingModule.compute_loss_and_backward`` is the forward/backward of ``training_step`` (plain or GradCache,
then the strategy's gradient sync). With dropout on, GradCache is compared with an ordinary backward that
embeds the same chunks in the same order (the dropout masks are drawn per chunk, so a single full-batch
forward would draw different ones; see tests/test_gradcache.py); with dropout off it is compared with the
module's own plain step over the whole batch.
"""

from __future__ import annotations

import functools
import math

import pytest
import torch
import torch.nn.functional as F

from me5.batching import BatchPlan
from me5.errors import ConfigError
from me5.gradcache import plan_chunks
from me5.training import ContrastivePretraining, SupervisedFinetuning
from me5.training.module import duplicate_mask
from tests import tiny

N_QUERIES = 6
GROUPS = {"pretrain": 1, "finetune": 3}
SEED = 4321


def make_module(stage: str, *, dropout: float = 0.1, **kwargs):
    cls = ContrastivePretraining if stage == "pretrain" else SupervisedFinetuning
    kwargs.setdefault("grad_clip", None)
    chunks = {k: kwargs.pop(k) for k in ("chunk_rows", "chunk_tokens") if k in kwargs}
    if chunks:  # the stage's batch plan, as the run loop hands it over
        kwargs["batch_plan"] = BatchPlan.build(global_batch_size=N_QUERIES, **chunks)
    return cls(
        tiny.encoder(dropout=dropout),
        tiny.loss(stage),
        optimizer=functools.partial(torch.optim.SGD, lr=0.0),
        **kwargs,
    )


def make_batch(stage: str) -> dict:
    group = GROUPS[stage]
    queries, passages, teacher = tiny.union_texts(N_QUERIES, group)
    return tiny.batch_from_texts(queries, passages, group, teacher if stage == "finetune" else None)


def reference_step(module, batch, *, chunk_rows=None, chunk_tokens=None, sort_by_length=False):
    """An ordinary backward through the module's loss path, with the same chunks embedded in the same order."""
    embs = []
    for side in ("query", "passage"):
        ids, mask = batch[f"{side}_input_ids"], batch[f"{side}_attention_mask"]
        order, chunks = plan_chunks(mask, chunk_rows=chunk_rows, chunk_tokens=chunk_tokens, sort_by_length=sort_by_length)
        if order is not None:
            ids, mask = ids[order], mask[order]
        parts = []
        for sl in chunks:
            length = int(mask[sl].sum(1).max())
            parts.append(module.encoder(ids[sl, :length], mask[sl, :length]))
        emb = torch.cat(parts)
        embs.append(emb if order is None else emb[torch.argsort(order)])
    eb, n_masked = module.embedding_batch(embs[0], embs[1], batch)
    loss, _ = module.loss(eb)
    loss.backward()
    return loss.detach(), n_masked


CHUNKINGS = {
    "rows2": dict(chunk_rows=2),
    "tokens": dict(chunk_tokens=24),
    "tokens+sorted": dict(chunk_tokens=24, sort_by_length=True),
}


@pytest.mark.parametrize("chunking", list(CHUNKINGS))
@pytest.mark.parametrize("stage", ["pretrain", "finetune"])
def test_module_gradcache_equals_ordinary_backward_with_dropout(stage, chunking):
    kwargs = CHUNKINGS[chunking]
    batch = make_batch(stage)
    module = make_module(stage, dropout=0.1, **kwargs)
    assert len(plan_chunks(batch["passage_attention_mask"], **kwargs)[1]) > 2  # really chunked

    torch.manual_seed(SEED)
    out = module.compute_loss_and_backward(batch)
    cached = tiny.take_grads(module)
    assert not out.loss.requires_grad and out.n_masked == 4  # two planted pairs: each copy is masked for the other's query
    assert set(out.parts) == ({"infonce"} if stage == "pretrain" else {"infonce", "kd"})

    torch.manual_seed(SEED)
    ref_loss, ref_masked = reference_step(module, batch, **kwargs)
    reference = tiny.take_grads(module)
    torch.testing.assert_close(out.loss, ref_loss, rtol=1e-5, atol=1e-6)
    assert ref_masked == out.n_masked
    tiny.assert_grads_close(cached, reference)
    if stage == "pretrain":  # the learnable temperature gets its gradient from the loss's own backward
        assert reference["loss.terms.infonce.log_scale"].abs() > 0


@pytest.mark.parametrize("chunking", ["rows2", "tokens+sorted"])
@pytest.mark.parametrize("stage", ["pretrain", "finetune"])
def test_module_gradcache_equals_plain_step_without_dropout(stage, chunking):
    """Independent of any reference code: the module's GradCache step == its plain full-batch step."""
    batch = make_batch(stage)
    cached_module = make_module(stage, dropout=0.0, **CHUNKINGS[chunking])
    plain_module = make_module(stage, dropout=0.0)
    out = cached_module.compute_loss_and_backward(batch)
    ref = plain_module.compute_loss_and_backward(batch)
    torch.testing.assert_close(out.loss, ref.loss, rtol=1e-5, atol=1e-6)
    for k in ref.parts:
        torch.testing.assert_close(out.parts[k], ref.parts[k], rtol=1e-5, atol=1e-6)
    assert out.n_masked == ref.n_masked == 4
    tiny.assert_grads_close(tiny.take_grads(cached_module), tiny.take_grads(plain_module))


# ---------------------------------------------------------------------------------------------- duplicates
def test_duplicate_mask_removes_exactly_the_planted_columns_across_ranks():
    """Two ranks of 3 queries, G = 2: rank 1's mask over the gathered 12 passages."""
    group, world, b = 2, 2, 3
    queries, passages, _ = tiny.union_texts(world * b, group)
    hashes = tiny.batch_from_texts(queries, passages, group)["passage_hash"]
    planted = tiny.planted_duplicate_columns(passages, group, world * b)
    assert planted[0] == {2} and planted[2] == {10} and planted[5] == {4}  # 5 is on rank 1, 2 on rank 0
    for rank in range(world):
        mask, n = duplicate_mask(hashes, group_size=group, rank=rank, local_batch=b)
        assert mask.shape == (b, world * b * group)
        for i in range(b):
            want_removed = planted[rank * b + i]
            assert {int(j) for j in (~mask[i]).nonzero().flatten()} == want_removed, (rank, i)
            assert mask[i, (rank * b + i) * group]  # the positive itself stays
        assert n == sum(len(planted[rank * b + i]) for i in range(b))


@pytest.mark.parametrize("stage", ["pretrain", "finetune"])
def test_masked_infonce_equals_the_loss_over_the_deduplicated_candidates(stage):
    group = GROUPS[stage]
    batch = make_batch(stage)
    queries, passages, _ = tiny.union_texts(N_QUERIES, group)
    module = make_module(stage, dropout=0.0)
    with torch.no_grad():
        q = module.encoder(batch["query_input_ids"], batch["query_attention_mask"])
        p = module.encoder(batch["passage_input_ids"], batch["passage_attention_mask"])
        eb, n_masked = module.embedding_batch(q, p, batch)
        got = module.loss.terms["infonce"](eb)
    # reference: per query, the candidate list with the other copies of its positive text dropped
    raw = module.loss.terms["infonce"].scale()
    scale = float(raw.detach() if torch.is_tensor(raw) else raw)
    losses = []
    for i in range(N_QUERIES):
        pos = i * group
        keep = [j for j, t in enumerate(passages) if j == pos or t != passages[pos]]
        logits = (p[keep] @ q[i]) * scale
        losses.append(-F.log_softmax(logits, dim=0)[keep.index(pos)])
    want = torch.stack(losses).mean()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert n_masked == 4
    # and masking matters here: without it the loss is larger (a copy of the positive is a "negative")
    module.mask_duplicates = False
    with torch.no_grad():
        unmasked = module.loss.terms["infonce"](module.embedding_batch(q, p, batch)[0])
    assert unmasked > got + 1e-4


class _Capture:
    """A minimal Lightning logger that keeps every logged metric."""

    def __new__(cls):
        from lightning.pytorch.loggers import Logger

        class Capture(Logger):
            name, version = "capture", 0

            def __init__(self):
                super().__init__()
                self.metrics: list[dict] = []

            def log_metrics(self, metrics, step=None):
                self.metrics.append(dict(metrics))

            def log_hyperparams(self, *args, **kwargs):
                pass

        return Capture()


def test_training_step_logs_duplicates_masked_and_steps():
    import lightning as L
    from torch.utils.data import DataLoader

    batch = make_batch("finetune")
    module = make_module("finetune", dropout=0.1, chunk_rows=4, grad_clip=1.0)
    module.optimizer_factory = functools.partial(torch.optim.AdamW, lr=1e-3)
    before = module.encoder.backbone.embeddings.word_embeddings.weight.detach().clone()
    logger = _Capture()
    trainer = L.Trainer(
        accelerator="cpu", devices=1, max_steps=2, logger=logger, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, log_every_n_steps=1, limit_val_batches=0,
    )
    trainer.fit(module, train_dataloaders=DataLoader([batch, batch], batch_size=None))
    logged = [m for m in logger.metrics if "train/duplicates_masked" in m]
    assert [m["train/duplicates_masked"] for m in logged] == [4.0, 4.0]
    assert all(math.isfinite(m["train/loss"]) and "train/loss/kd" in m for m in logged)
    assert not torch.equal(before, module.encoder.backbone.embeddings.word_embeddings.weight)


# ---------------------------------------------------------------------------------------------- options
def test_fused_optimizer_resolves_to_foreach_on_cpu():
    module = make_module("pretrain", fused_optimizer=True)
    module.optimizer_factory = functools.partial(torch.optim.AdamW, lr=1e-3)
    opt = module.configure_optimizers()
    assert not opt.defaults.get("fused")
    module.optimizer_factory = functools.partial(torch.optim.SGD, lr=1e-3)
    assert not module.configure_optimizers().defaults.get("fused")
    module.optimizer_factory = lambda groups, **kw: torch.optim.Rprop(groups, **kw)
    with pytest.raises(ConfigError, match="fused"):
        module.configure_optimizers()


def test_fsdp1_and_chunked_plain_ddp_are_refused():
    from lightning.pytorch.strategies import DDPStrategy, FSDPStrategy

    module = make_module("pretrain", chunk_rows=2)
    module._strategy = lambda: FSDPStrategy()
    with pytest.raises(ConfigError, match="FSDP2Strategy"):
        module._check_strategy()

    class TwoRankDDP(DDPStrategy):
        world_size = 2

    module._strategy = lambda: TwoRankDDP()
    with pytest.raises(ConfigError, match="AllReduceDDPStrategy"):
        module._check_strategy()


# ---------------------------------------------------------------------------------------------- GPU
gpu = pytest.mark.gpu


@gpu
@pytest.mark.parametrize("stage", ["pretrain", "finetune"])
def test_cuda_bf16_gradcache_with_dropout_matches_reference(stage):
    """On CUDA, bf16 autocast: GradCache replays the CUDA dropout RNG (same chunks, same order)."""
    batch = {k: (v.cuda() if torch.is_tensor(v) else v) for k, v in make_batch(stage).items()}
    module = make_module(stage, dropout=0.1, chunk_tokens=40, sort_by_length=True).cuda()
    module.encoder.autocast = "bf16"
    torch.manual_seed(SEED)
    out = module.compute_loss_and_backward(batch)
    cached = tiny.take_grads(module)
    torch.manual_seed(SEED)
    ref_loss, _ = reference_step(module, batch, chunk_tokens=40, sort_by_length=True)
    torch.testing.assert_close(out.loss, ref_loss, rtol=1e-3, atol=1e-3)
    tiny.assert_grads_close(cached, tiny.take_grads(module), atol=1e-3)


def _compiled_gradcache_matches_reference(device: str, *, atol: float):
    module = make_module("pretrain", dropout=0.1, chunk_rows=2, compile_encoder=True).to(device)
    module.configure_model()
    batch = {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in make_batch("pretrain").items()}
    torch.manual_seed(SEED)
    out = module.compute_loss_and_backward(batch)
    cached = tiny.take_grads(module)
    torch.manual_seed(SEED)
    ref_loss, _ = reference_step(module, batch, chunk_rows=2)
    torch.testing.assert_close(out.loss, ref_loss, rtol=max(1e-5, atol), atol=atol)
    tiny.assert_grads_close(cached, tiny.take_grads(module), atol=max(1e-5, atol))
    return module


@gpu
def test_cuda_compiled_encoder_gradcache_matches_reference_with_dropout():
    _compiled_gradcache_matches_reference("cuda", atol=1e-4)


@gpu
def test_fused_optimizer_on_cuda():
    module = make_module("pretrain", fused_optimizer=True).cuda()
    module.optimizer_factory = functools.partial(torch.optim.AdamW, lr=1e-3)
    assert module.configure_optimizers().defaults["fused"] is True


@pytest.mark.slow
def test_compiled_encoder_gradcache_matches_reference_with_dropout_on_cpu():
    """torch.compile + GradCache + dropout is exact on CPU too (~80 s of compilation: `make test-full`)."""
    module = _compiled_gradcache_matches_reference("cpu", atol=1e-6)
    assert set(module.encoder.state_dict()) == set(tiny.encoder().state_dict())  # in-place: same keys
