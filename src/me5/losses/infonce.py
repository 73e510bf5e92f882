"""InfoNCE with in-batch, cross-rank and hard negatives (the mE5 / E5 contrastive objective)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from me5.errors import ConfigError
from me5.losses.base import EmbeddingBatch, LossTerm


class InfoNCE(LossTerm):
    r"""Contrastive loss: each query must score its positive above every other candidate passage.

    For each query ``q_i`` the candidates ``C_i`` are all columns of ``batch.passages``: its own positive, its
    hard negatives, and every other query's positive and hard negatives (from every rank when the passages were
    gathered), minus the columns where ``batch.candidate_mask`` is False. With ``s`` the dot product (the cosine
    for the unit-norm mE5 embeddings) and temperature ``τ``:

    .. math::

        L = -\frac{1}{B} \sum_{i=1}^{B} \log
            \frac{\exp(s(q_i, p_i^+) / τ)}{\sum_{p \in C_i} \exp(s(q_i, p) / τ)}

    i.e. cross-entropy over the logits ``logits_BP = q_BD @ p_PD.T / τ`` with target ``positive_index``.
    ``temperature = 1 / scale``: this is sentence-transformers' ``MultipleNegativesRankingLoss`` with
    ``scale = 1 / τ`` (``τ = 0.01`` is ``scale = 100``).

    With ``mask_hard_negatives`` (SimLM's ``kd_mask_hn``) each query's own hard negatives
    ``H_i = {g_{i,1} .. g_{i,G-1}}`` (``batch.group_index[i, 1:]``, already offset by the rank) leave its candidates,
    so its positive competes only with the passages of the other queries (every rank's when gathered):

    .. math::

        L = -\frac{1}{B} \sum_{i=1}^{B} \log
            \frac{\exp(s(q_i, p_i^+) / τ)}{\sum_{p \in C_i \setminus H_i} \exp(s(q_i, p) / τ)}

    The ranking within the own group is then left to the KD term (:class:`~me5.losses.kd.KLDistillation` reads
    the full group either way; SimLM's help text: "mask out hard negatives for distillation"), so a mined
    negative the teacher scores near the positive is not also pushed down here. With G = 1 there are no hard
    negatives and the option changes nothing. A copy of ``q_i``'s hard negative elsewhere in the batch (another
    query's group) stays a candidate, as in SimLM, which masks columns, not texts; ``candidate_mask`` (duplicates
    of the positive) still applies on top.

    Args:
        temperature: τ. mE5 / E5 use 0.01 (the multilingual-e5 model card FAQ: "the cosine similarity scores
            distribute around 0.7 to 1.0 ... because we use a low temperature 0.01 for InfoNCE").
        learnable_temperature: learn ``log(1 / τ)`` as a parameter initialised from ``temperature`` (CLIP style);
            the scale is clamped to ``max_scale`` in the forward pass, where its gradient is then 0.
        max_scale: upper bound on ``1 / τ`` when learnable (CLIP uses 100).
        mask_hard_negatives: drop each query's own hard negatives from its candidates (SimLM ``kd_mask_hn``,
            above). Off by default: mE5 does not say, and SimLM's own KD script runs with it off. Off is
            bit-identical to the loss without the option.

    Inputs (:class:`~me5.losses.base.EmbeddingBatch`):
        ``query`` (B, D), ``passages`` (P, D), ``positive_index`` (B,), optional ``candidate_mask`` (B, P).
        Works for pairs (G = 1: in-batch negatives only) and groups with hard negatives (G > 1).

    References:
        mE5 (Wang et al. 2024, arXiv 2402.05672) §2: weakly-supervised pre-training with InfoNCE over in-batch
        negatives, then supervised fine-tuning adding mined hard negatives. E5 (Wang et al. 2022, arXiv
        2212.03533) §3.1: the same loss, its equation, and τ = 0.01. Originally van den Oord et al. 2018
        (arXiv 1807.03748). ``mask_hard_negatives``: SimLM (Wang et al. 2023, arXiv 2207.02578),
        unilm ``simlm/src/models/biencoder_model.py`` ``BiencoderModel.forward``, KD branch::

            # (optionally) mask out hard negatives
            if self.training and self.args.kd_mask_hn:
                scores = torch.scatter(input=scores, dim=1, index=group_indices[:, 1:], value=float('-inf'))
            ...
                ce_loss = self.cross_entropy(scores, labels)

        where ``group_indices = select_grouped_indices(scores, group_size=train_n_passages,
        start=process_index * batch_size * train_n_passages)`` (the rank offset, as ``group_index`` here) and
        ``config.py`` has ``kd_mask_hn: bool = True`` but asserts ``not kd_mask_hn`` under its default
        ``use_scaled_loss``; ``scripts/train_kd_biencoder.sh`` passes ``--kd_mask_hn False``. Unlike SimLM the
        mask here does not depend on ``self.training``: this loss is only evaluated in training steps.

    Relations:
        - :class:`~me5.losses.kd.KLDistillation` is the stage-2 companion (E5 §3.2: KD + α · InfoNCE).
        - sentence-transformers' ``MultipleNegativesRankingLoss`` (same value, same ``scale = 1/τ``) and its
          ``CachedMultipleNegativesRankingLoss`` (GradCache; here :mod:`me5.gradcache` does the caching outside
          the loss).
    """

    requires_teacher = False

    def __init__(
        self,
        temperature: float = 0.01,
        learnable_temperature: bool = False,
        max_scale: float = 100.0,
        *,
        mask_hard_negatives: bool = False,
    ):
        super().__init__()
        if not isinstance(mask_hard_negatives, bool):
            raise ConfigError(
                "loss.terms.infonce.mask_hard_negatives",
                f"must be true or false, got {mask_hard_negatives!r}",
            )
        self.mask_hard_negatives = mask_hard_negatives
        if not (math.isfinite(temperature) and temperature > 0):
            raise ConfigError("loss.terms.infonce.temperature", f"must be finite and > 0, got {temperature}")
        if not (math.isfinite(max_scale) and max_scale > 0):
            raise ConfigError("loss.terms.infonce.max_scale", f"must be finite and > 0, got {max_scale}")
        self.learnable_temperature = bool(learnable_temperature)
        self.max_scale = float(max_scale)
        if self.learnable_temperature:
            if 1.0 / temperature > max_scale * (1 + 1e-6):
                raise ConfigError(
                    "loss.terms.infonce.temperature",
                    f"1/temperature = {1.0 / temperature:g} exceeds max_scale = {max_scale:g}; "
                    "raise max_scale or the temperature",
                )
            self.log_scale = nn.Parameter(torch.tensor(math.log(1.0 / temperature)))
        else:
            self.fixed_scale = 1.0 / float(temperature)

    def scale(self) -> Tensor | float:
        """``1 / τ``: a float when fixed, a differentiable 0-d tensor (clamped to ``max_scale``) when learnable."""
        if not self.learnable_temperature:
            return self.fixed_scale
        return self.log_scale.clamp(max=math.log(self.max_scale)).exp()

    @property
    def temperature(self) -> float:
        """The current τ, for logging."""
        scale = self.scale()
        return 1.0 / (scale.detach().item() if isinstance(scale, Tensor) else scale)

    def forward(self, batch: EmbeddingBatch) -> Tensor:
        dtype = torch.promote_types(batch.query.dtype, torch.float32)  # bf16/fp16 embeddings: fp32 logits
        q_BD, p_PD = batch.query.to(dtype), batch.passages.to(dtype)
        logits_BP = (q_BD @ p_PD.T) * self.scale()
        mask_own = self.mask_hard_negatives and batch.group_size > 1
        if batch.candidate_mask is not None or mask_own:
            if batch.candidate_mask is not None:
                keep_BP = batch.candidate_mask.clone()
            else:
                keep_BP = torch.ones_like(logits_BP, dtype=torch.bool)
            if mask_own:
                # SimLM's scatter of -inf at group_indices[:, 1:]; group_index carries the rank offset
                keep_BP.scatter_(1, batch.group_index[:, 1:], False)
            keep_BP[torch.arange(keep_BP.size(0), device=keep_BP.device), batch.positive_index] = True
            logits_BP = logits_BP.masked_fill(~keep_BP, float("-inf"))
        return F.cross_entropy(logits_BP, batch.positive_index)
