"""InfoNCE, KL distillation and WeightedLoss against explicit float64 references."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from me5.errors import ConfigError
from me5.losses import EmbeddingBatch, InfoNCE, KLDistillation, LossTerm, WeightedLoss

TAU = 0.01


def _embeddings(B: int, G: int, D: int = 8, *, world: int = 1, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    q_BD = F.normalize(torch.randn(B, D, generator=g, dtype=torch.float64), dim=-1)
    p_PD = F.normalize(torch.randn(world * B * G, D, generator=g, dtype=torch.float64), dim=-1)
    return q_BD.requires_grad_(), p_PD.requires_grad_()


def _infonce_reference(q_BD, p_PD, positives, candidates, tau=TAU):
    """Loop over queries: -log softmax of the positive among the listed candidate columns; mean over queries."""
    losses = []
    for i in range(q_BD.size(0)):
        cols = candidates[i]
        logits = torch.stack([q_BD[i] @ p_PD[j] / tau for j in cols])
        losses.append(-(logits[cols.index(positives[i])] - torch.logsumexp(logits, dim=0)))
    return torch.stack(losses).mean()


def _infonce_grads_analytic(q_BD, p_PD, positives, candidates, tau=TAU):
    """dL/dq_i = (Σ_j softmax_ij p_j − p_pos(i)) / (Bτ); dL/dp_j = Σ_i (softmax_ij − 1[j = pos(i)]) q_i / (Bτ)."""
    q, p = q_BD.detach(), p_PD.detach()
    B = q.size(0)
    dq, dp = torch.zeros_like(q), torch.zeros_like(p)
    for i in range(B):
        cols = candidates[i]
        probs = torch.softmax(torch.stack([q[i] @ p[j] for j in cols]) / tau, dim=0)
        for prob, j in zip(probs, cols, strict=True):
            coeff = (prob - (1.0 if j == positives[i] else 0.0)) / (B * tau)
            dq[i] += coeff * p[j]
            dp[j] += coeff * q[i]
    return dq, dp


def _grads(loss, *xs):
    return torch.autograd.grad(loss, xs)


# ------------------------------------------------------------------------------------------------ batch layout
def test_build_indices_query_major_with_rank_offset():
    q, p = _embeddings(B=3, G=2, world=2)
    b0 = EmbeddingBatch.build(q, p, group_size=2, rank=0)
    b1 = EmbeddingBatch.build(q, p, group_size=2, rank=1)
    assert b0.positive_index.tolist() == [0, 2, 4]
    assert b1.positive_index.tolist() == [6, 8, 10]
    assert b1.group_index.tolist() == [[6, 7], [8, 9], [10, 11]]
    assert b1.group_size == 2
    with pytest.raises(ValueError, match="needs at least"):
        EmbeddingBatch.build(q, p[:8], group_size=2, rank=1)


# ------------------------------------------------------------------------------------------------ InfoNCE
@pytest.mark.parametrize(("G", "world", "rank"), [(1, 1, 0), (3, 1, 0), (3, 2, 1)])
def test_infonce_value_and_gradient_match_reference(G, world, rank):
    B = 4
    q, p = _embeddings(B, G, world=world, seed=G + rank)
    batch = EmbeddingBatch.build(q, p, group_size=G, rank=rank)
    loss = InfoNCE(temperature=TAU)(batch)

    positives = [(rank * B + i) * G for i in range(B)]  # independent of build(): query-major layout
    assert batch.positive_index.tolist() == positives
    all_cols = [list(range(p.size(0)))] * B
    ref = _infonce_reference(q, p, positives, all_cols)
    torch.testing.assert_close(loss, ref, rtol=0, atol=1e-6)

    dq, dp = _grads(loss, q, p)
    dq_ref, dp_ref = _infonce_grads_analytic(q, p, positives, all_cols)
    torch.testing.assert_close(dq, dq_ref, rtol=0, atol=1e-6)
    torch.testing.assert_close(dp, dp_ref, rtol=0, atol=1e-6)
    dq_loop, dp_loop = _grads(ref, q, p)
    torch.testing.assert_close(dq, dq_loop, rtol=0, atol=1e-6)
    torch.testing.assert_close(dp, dp_loop, rtol=0, atol=1e-6)


def test_infonce_hard_negative_positive_is_the_group_head():
    """With G > 1 the target is column i*G: making that passage equal to q_i (and the rest orthogonal) gives ~0."""
    B, G, D = 3, 3, 16
    q = torch.eye(D, dtype=torch.float64)[:B]
    p = torch.eye(D, dtype=torch.float64)[B : B + B * G].clone()
    for i in range(B):
        p[i * G] = q[i]
    loss = InfoNCE(temperature=TAU)(EmbeddingBatch.build(q, p, group_size=G))
    assert loss.item() < 1e-10
    p_shifted = p.roll(1, dims=0)  # positives now sit at i*G + 1
    wrong = InfoNCE(temperature=TAU)(EmbeddingBatch.build(q, p_shifted, group_size=G))
    assert wrong.item() > 50


def test_infonce_candidate_mask_equals_reduced_candidate_set():
    B, G = 4, 2
    q, p = _embeddings(B, G, seed=3)
    P = p.size(0)
    g = torch.Generator().manual_seed(1)
    mask = torch.rand(B, P, generator=g) > 0.4
    positives = [i * G for i in range(B)]
    mask[0, positives[0]] = False  # masking a positive is ignored: the positive is always a candidate
    batch = EmbeddingBatch.build(q, p, group_size=G, candidate_mask=mask)
    loss = InfoNCE(temperature=TAU)(batch)
    candidates = [sorted({j for j in range(P) if mask[i, j]} | {positives[i]}) for i in range(B)]
    ref = _infonce_reference(q, p, positives, candidates)
    torch.testing.assert_close(loss, ref, rtol=0, atol=1e-6)
    dq, dp = _grads(loss, q, p)
    dq_ref, dp_ref = _infonce_grads_analytic(q, p, positives, candidates)
    torch.testing.assert_close(dq, dq_ref, rtol=0, atol=1e-6)
    torch.testing.assert_close(dp, dp_ref, rtol=0, atol=1e-6)
    unmasked = InfoNCE(temperature=TAU)(EmbeddingBatch.build(q, p, group_size=G))
    assert not torch.allclose(loss, unmasked)


def test_infonce_learnable_temperature_gets_gradient_and_is_clamped():
    q, p = _embeddings(4, 2, seed=5)
    batch = EmbeddingBatch.build(q.detach().float(), p.detach().float(), group_size=2)
    loss_fn = InfoNCE(temperature=0.05, learnable_temperature=True, max_scale=100.0)
    assert loss_fn.temperature == pytest.approx(0.05, rel=1e-6)
    loss_fn(batch).backward()
    grad = loss_fn.log_scale.grad
    assert grad is not None and torch.isfinite(grad) and grad.abs() > 0
    torch.testing.assert_close(loss_fn(batch), InfoNCE(temperature=0.05)(batch))

    # initialised at the bound (τ = 0.01, scale 100): still trainable
    at_bound = InfoNCE(temperature=0.01, learnable_temperature=True, max_scale=100.0)
    at_bound(batch).backward()
    assert at_bound.log_scale.grad.abs() > 0

    with torch.no_grad():
        loss_fn.log_scale.fill_(math.log(1000.0))  # scale 1000 > max_scale: used as 100
    assert loss_fn.temperature == pytest.approx(0.01, rel=1e-6)
    torch.testing.assert_close(loss_fn(batch), InfoNCE(temperature=0.01)(batch))
    with pytest.raises(ConfigError, match="max_scale"):
        InfoNCE(temperature=0.001, learnable_temperature=True, max_scale=100.0)
    with pytest.raises(ConfigError, match="temperature"):
        InfoNCE(temperature=0.0)


def test_infonce_equals_sentence_transformers_mnrl():
    st_losses = pytest.importorskip("sentence_transformers.sentence_transformer.losses")
    from sentence_transformers.util import cos_sim

    B, G = 5, 3
    q, p = _embeddings(B, G, seed=11)
    ours = InfoNCE(temperature=TAU)(EmbeddingBatch.build(q, p, group_size=G))
    # ST takes columns: [anchors, positives, negatives_1, ...]; ours is query-major, so regroup by position g
    columns = [p.view(B, G, -1)[:, g] for g in range(G)]
    mnrl = st_losses.MultipleNegativesRankingLoss(model=None, scale=1.0 / TAU, similarity_fct=cos_sim)
    theirs = mnrl.compute_loss_from_embeddings([q, *columns], labels=None)
    torch.testing.assert_close(ours, theirs.to(ours.dtype), rtol=0, atol=1e-6)


# ------------------------------------------------------------------------------------------------ KD
def _kd_reference(q_BD, p_PD, teacher_BG, G, tau=TAU, tau_t=1.0):
    """Σ_i Σ_j p_t (log p_t − log p_s) / B, written out per query."""
    B = q_BD.size(0)
    total = 0.0
    for i in range(B):
        s = torch.stack([q_BD[i] @ p_PD[i * G + j] for j in range(G)]) / tau
        log_ps = s - torch.logsumexp(s, dim=0)
        t = teacher_BG[i] / tau_t
        log_pt = t - torch.logsumexp(t, dim=0)
        total = total + (log_pt.exp() * (log_pt - log_ps)).sum()
    return total / B


@pytest.mark.parametrize("tau_t", [1.0, 0.5])
def test_kd_value_and_gradient_match_reference(tau_t):
    B, G = 4, 3
    q, p = _embeddings(B, G, seed=7)
    teacher = torch.randn(B, G, generator=torch.Generator().manual_seed(2), dtype=torch.float64) * 3
    kd = KLDistillation(temperature=TAU, teacher_temperature=tau_t)
    loss = kd(EmbeddingBatch.build(q, p, group_size=G, teacher_scores=teacher))
    ref = _kd_reference(q, p, teacher, G, tau_t=tau_t)
    torch.testing.assert_close(loss, ref, rtol=0, atol=1e-6)
    for got, want in zip(_grads(loss, q, p), _grads(ref, q, p), strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6)

    student = torch.einsum("bd,bgd->bg", q, p.view(B, G, -1)) / TAU
    torch_kl = F.kl_div(
        F.log_softmax(student, -1), F.log_softmax(teacher / tau_t, -1), log_target=True, reduction="batchmean"
    )
    torch.testing.assert_close(loss, torch_kl, rtol=0, atol=1e-9)


def test_kd_is_zero_when_student_equals_teacher():
    B, G = 3, 4
    q, p = _embeddings(B, G, seed=9)
    student = torch.einsum("bd,bgd->bg", q, p.view(B, G, -1)).detach()
    teacher = student / TAU * 0.5  # teacher/τ_t == student/τ with τ_t = 0.5
    loss = KLDistillation(TAU, teacher_temperature=0.5)(
        EmbeddingBatch.build(q, p, group_size=G, teacher_scores=teacher)
    )
    assert abs(loss.item()) < 1e-12


def test_kd_group_of_one_is_a_config_error():
    q, p = _embeddings(3, 1)
    batch = EmbeddingBatch.build(q, p, group_size=1, teacher_scores=torch.zeros(3, 1, dtype=torch.float64))
    with pytest.raises(ConfigError, match="no hard negatives"):
        KLDistillation()(batch)
    weighted = WeightedLoss(
        {"infonce": InfoNCE(), "distill": KLDistillation()}, {"infonce": 1.0, "distill": 1.0}
    )
    with pytest.raises(ConfigError, match="loss.terms.distill.*no hard negatives"):
        weighted(batch)


# ------------------------------------------------------------------------------------------------ WeightedLoss
class _Exploding(LossTerm):
    def forward(self, batch):
        raise AssertionError("a zero-weight term must not be computed")


def test_weighted_loss_total_is_weighted_sum_of_unweighted_parts():
    B, G = 4, 3
    q, p = _embeddings(B, G, seed=13)
    teacher = torch.randn(B, G, dtype=torch.float64)
    batch = EmbeddingBatch.build(q, p, group_size=G, teacher_scores=teacher)
    weighted = WeightedLoss(
        {"infonce": InfoNCE(), "kd": KLDistillation(), "off": _Exploding()},
        {"infonce": 0.2, "kd": 1.0, "off": 0.0},
    )
    total, parts = weighted(batch)
    assert set(parts) == {"infonce", "kd"}
    torch.testing.assert_close(parts["infonce"], InfoNCE()(batch))
    torch.testing.assert_close(parts["kd"], KLDistillation()(batch))
    torch.testing.assert_close(total, 0.2 * parts["infonce"] + 1.0 * parts["kd"])


def test_weighted_loss_errors():
    q, p = _embeddings(2, 2)
    no_teacher = EmbeddingBatch.build(q, p, group_size=2)
    weighted = WeightedLoss({"infonce": InfoNCE(), "ce_kd": KLDistillation()}, {"infonce": 1.0, "ce_kd": 1.0})
    with pytest.raises(ConfigError, match="loss.terms.ce_kd.*no teacher scores") as err:
        weighted(no_teacher)
    assert err.value.field == "loss.terms.ce_kd"
    total, parts = WeightedLoss({"infonce": InfoNCE(), "kd": KLDistillation()}, {"infonce": 1.0, "kd": 0.0})(
        no_teacher
    )
    assert set(parts) == {"infonce"}

    with pytest.raises(ConfigError) as err:
        WeightedLoss({"infonce": InfoNCE()}, {"infonce": 1.0, "kd": 1.0})
    assert err.value.field == "loss_weights.kd"
    with pytest.raises(ConfigError) as err:
        WeightedLoss({"infonce": InfoNCE(), "kd": KLDistillation()}, {"infonce": 1.0},
                     where="stages.finetune.loss_weights")
    assert err.value.field == "stages.finetune.loss_weights.kd"
    for bad in (-1.0, float("nan"), float("inf")):
        with pytest.raises(ConfigError, match="finite"):
            WeightedLoss({"infonce": InfoNCE()}, {"infonce": bad})
    with pytest.raises(ConfigError):
        WeightedLoss({}, {})
    with pytest.raises(ConfigError, match="every loss weight is 0"):
        WeightedLoss({"infonce": InfoNCE()}, {"infonce": 0.0})


# ------------------------------------------------------------------------------------------------ InfoNCE: mask HN
def _simlm_kd_ce_reference(q_all_ND, p_PD, *, G, rank, local_batch, mask_hn, keep_NP=None, tau=TAU):
    """SimLM's contrastive term of the KD loss, written from unilm ``simlm/src/models/biencoder_model.py``.

    ``all_scores`` of every rank's queries against every gathered passage, the rows of rank ``rank``
    (``index_select``), ``group_indices`` from ``select_grouped_indices(start=rank * B * G)``, ``torch.scatter``
    of -inf at ``group_indices[:, 1:]`` when ``kd_mask_hn``, then ``cross_entropy(scores, labels)``. ``keep_NP``
    (False: a duplicate of the row's positive) is ours, not SimLM's; it is applied first, as a -inf fill.
    """
    N = q_all_ND.size(0)
    all_scores = q_all_ND @ p_PD.T / tau
    all_labels = torch.arange(N) * G  # full_contrastive_scores_and_labels(use_all_pairs=False)
    if keep_NP is not None:
        all_scores = all_scores.masked_fill(~keep_NP, float("-inf"))
    start = rank * local_batch
    local = torch.arange(start, start + local_batch)
    scores, labels = all_scores.index_select(0, local), all_labels.index_select(0, local)
    group_indices = torch.arange(G).repeat(local_batch, 1) + torch.arange(local_batch).unsqueeze(-1) * G
    group_indices += start * G
    if mask_hn:
        scores = torch.scatter(input=scores, dim=1, index=group_indices[:, 1:], value=float("-inf"))
    return F.cross_entropy(scores, labels)


def _duplicate_keep(p_PD, positives):
    """(N, P) False where a passage equals (exactly) row n's positive, except the positive itself."""
    same_NP = (p_PD[positives].unsqueeze(1) == p_PD.unsqueeze(0)).all(-1)
    same_NP[torch.arange(len(positives)), positives] = False
    return ~same_NP


def _infonce_before_option(loss_fn, batch):
    """InfoNCE.forward as it was before ``mask_hard_negatives`` existed (for the bit-identity check)."""
    dtype = torch.promote_types(batch.query.dtype, torch.float32)
    q_BD, p_PD = batch.query.to(dtype), batch.passages.to(dtype)
    logits_BP = (q_BD @ p_PD.T) * loss_fn.scale()
    if batch.candidate_mask is not None:
        keep_BP = batch.candidate_mask.clone()
        keep_BP[torch.arange(keep_BP.size(0), device=keep_BP.device), batch.positive_index] = True
        logits_BP = logits_BP.masked_fill(~keep_BP, float("-inf"))
    return F.cross_entropy(logits_BP, batch.positive_index)


@pytest.mark.parametrize("tau", [TAU, 0.2])  # 0.2: every column weighs in the softmax, not only the hard ones
@pytest.mark.parametrize("world", [1, 2])
@pytest.mark.parametrize("with_duplicates", [False, True])
def test_infonce_mask_hard_negatives_matches_simlm(world, with_duplicates, tau):
    B, G, D = 3, 3, 8
    g = torch.Generator().manual_seed(21 + world)
    q_all = F.normalize(torch.randn(world * B, D, generator=g, dtype=torch.float64), dim=-1)
    noise = 0.4 * torch.randn(world * B * G, D, generator=g, dtype=torch.float64)
    # hard negatives: every member of a group lies near its query
    p = F.normalize(q_all.repeat_interleave(G, dim=0) + noise, dim=-1)
    positives = [n * G for n in range(world * B)]
    keep = None
    if with_duplicates:
        p[4] = p[0]  # query 1's hard negative is query 0's positive: masked for query 0 by the duplicate mask
        p[2] = p[0]  # query 0's own hard negative duplicates its positive: masked either way
        p[7] = p[1]  # query 2's hard negative is query 0's hard negative: SimLM masks columns, so it stays
        if world > 1:
            p[13] = p[3]  # rank 1's query 4 holds a copy of rank 0's query 1 positive (cross-rank duplicate)
        keep = _duplicate_keep(p, positives)
        assert not keep[0, 4] and not keep[0, 2] and keep[0, 7] and keep[2, 1]
        assert world == 1 or not keep[1, 13]
    q_all.requires_grad_()
    p.requires_grad_()

    total_ours, total_ref = 0.0, 0.0
    for rank in range(world):
        rows = slice(rank * B, (rank + 1) * B)
        batch = EmbeddingBatch.build(
            q_all[rows], p, group_size=G, rank=rank, candidate_mask=None if keep is None else keep[rows]
        )
        ours = InfoNCE(temperature=tau, mask_hard_negatives=True)(batch)
        ref = _simlm_kd_ce_reference(
            q_all, p, G=G, rank=rank, local_batch=B, tau=tau, mask_hn=True, keep_NP=keep
        )
        torch.testing.assert_close(ours, ref, rtol=0, atol=1e-10)
        for got, want in zip(_grads(ours, q_all, p), _grads(ref, q_all, p), strict=True):
            torch.testing.assert_close(got, want, rtol=0, atol=1e-10)

        # the mask matters: SimLM without kd_mask_hn is the option off, and differs from it
        off = InfoNCE(temperature=tau)(batch)
        ref_off = _simlm_kd_ce_reference(
            q_all, p, G=G, rank=rank, local_batch=B, tau=tau, mask_hn=False, keep_NP=keep
        )
        torch.testing.assert_close(off, ref_off, rtol=0, atol=1e-10)
        assert (ours - off).abs().item() > 1e-3
        # each local query's own hard negatives get no gradient through its own term
        for i in range(B):
            single = EmbeddingBatch.build(
                q_all[rows][i : i + 1],
                p,
                group_size=G,
                rank=rank * B + i,
                local_batch=1,
                candidate_mask=None if keep is None else keep[rows][i : i + 1],
            )
            own = (rank * B + i) * G
            (dp,) = _grads(InfoNCE(temperature=tau, mask_hard_negatives=True)(single), p)
            assert dp[own + 1 : own + G].abs().max().item() == 0.0
            (dp_off,) = _grads(InfoNCE(temperature=tau)(single), p)
            assert dp_off[own + 1 : own + G].abs().max().item() > 0  # they are hard: unmasked they get one
        total_ours, total_ref = total_ours + ours.detach(), total_ref + ref.detach()

    # the union batch: rank-mean of the per-rank losses is SimLM's cross_entropy(all_scores, all_labels)
    all_scores = (
        (q_all @ p.T / tau).masked_fill(~keep, float("-inf")) if keep is not None else q_all @ p.T / tau
    )
    own_hn = torch.tensor(positives).unsqueeze(1) + torch.arange(1, G)
    union = F.cross_entropy(all_scores.scatter(1, own_hn, float("-inf")), torch.tensor(positives))
    torch.testing.assert_close(total_ours / world, union, rtol=0, atol=1e-10)
    torch.testing.assert_close(total_ref / world, union, rtol=0, atol=1e-10)


def test_infonce_mask_hard_negatives_removes_false_negatives():
    """Hard negatives equal to the positive (false negatives) tie with it: log G when kept, 0 when masked."""
    B, G, D = 3, 4, 16
    q = torch.eye(D, dtype=torch.float64)[:B]
    p = q.repeat_interleave(
        G, dim=0
    )  # every passage of group i is q_i; the other groups are orthogonal to it
    batch = EmbeddingBatch.build(q, p, group_size=G)
    kept = InfoNCE(temperature=TAU)(batch)
    masked = InfoNCE(temperature=TAU, mask_hard_negatives=True)(batch)
    assert kept.item() == pytest.approx(math.log(G), abs=1e-12)
    assert masked.item() < 1e-12


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("with_mask", [False, True])
def test_infonce_mask_hard_negatives_off_is_bit_identical(dtype, with_mask):
    B, G, world, rank = 4, 3, 2, 1
    q, p = _embeddings(B, G, world=world, seed=31)
    q, p = q.detach().to(dtype).requires_grad_(), p.detach().to(dtype).requires_grad_()
    mask = torch.rand(B, p.size(0), generator=torch.Generator().manual_seed(4)) > 0.3 if with_mask else None
    batch = EmbeddingBatch.build(q, p, group_size=G, rank=rank, candidate_mask=mask)
    before = _infonce_before_option(InfoNCE(temperature=TAU), batch)
    before_grads = _grads(before, q, p)
    for loss_fn in (InfoNCE(temperature=TAU), InfoNCE(temperature=TAU, mask_hard_negatives=False)):
        now = loss_fn(batch)
        assert torch.equal(now, before)
        for got, want in zip(_grads(now, q, p), before_grads, strict=True):
            assert torch.equal(got, want)
    assert not torch.equal(InfoNCE(temperature=TAU, mask_hard_negatives=True)(batch), before)


@pytest.mark.parametrize("with_mask", [False, True])
def test_infonce_mask_hard_negatives_changes_nothing_without_hard_negatives(with_mask):
    B, G, world, rank = 4, 1, 2, 1
    q, p = _embeddings(B, G, world=world, seed=37)
    mask = torch.rand(B, p.size(0), generator=torch.Generator().manual_seed(5)) > 0.3 if with_mask else None
    batch = EmbeddingBatch.build(q, p, group_size=G, rank=rank, candidate_mask=mask)
    on = InfoNCE(temperature=TAU, mask_hard_negatives=True)(batch)
    off = InfoNCE(temperature=TAU)(batch)
    assert torch.equal(on, off)
    for got, want in zip(_grads(on, q, p), _grads(off, q, p), strict=True):
        assert torch.equal(got, want)


def test_infonce_mask_hard_negatives_config_field(tmp_path):
    from me5.app.pipeline import build_loss, validate_config
    from tests.helpers import compose_cfg

    def finetune_loss(overrides):
        cfg = compose_cfg(overrides, tmp_path=tmp_path)
        return build_loss(cfg, validate_config(cfg)["finetune"])

    assert finetune_loss([]).terms["infonce"].mask_hard_negatives is False
    assert finetune_loss(["loss.terms.infonce.mask_hard_negatives=true"]).terms["infonce"].mask_hard_negatives is True
    with pytest.raises(ConfigError) as err:
        finetune_loss(["loss.terms.infonce.mask_hard_negatives=yes"])
    assert err.value.field == "loss.terms.infonce.mask_hard_negatives"
