"""Knowledge distillation from a cross-encoder over each query's own passage group (stage 2)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from me5.errors import ConfigError
from me5.losses.base import EmbeddingBatch, LossTerm


class KLDistillation(LossTerm):
    r"""KL divergence from the teacher's to the student's distribution over each query's group.

    For query ``q_i`` with group ``g_i = (p_i^+, p_i^1 .. p_i^{G-1})`` (``batch.group_index``) and teacher
    (cross-encoder) scores ``t_i`` (``batch.teacher_scores``, same order):

    .. math::

        p^{stu}_{ij} = \mathrm{softmax}_j(s(q_i, g_{ij}) / τ), \qquad
        p^{ce}_{ij} = \mathrm{softmax}_j(t_{ij} / τ_t)

        L = \frac{1}{B} \sum_i D_{KL}(p^{ce}_i \| p^{stu}_i)
          = \frac{1}{B} \sum_i \sum_j p^{ce}_{ij} (\log p^{ce}_{ij} - \log p^{stu}_{ij})

    (``F.kl_div(log p_stu, log p_ce, log_target=True, reduction="batchmean")``). Only the group's G columns are
    scored: in-batch negatives have no teacher score. The teacher scores get no gradient.

    Args:
        temperature: τ of the student logits; the same τ = 0.01 as :class:`~me5.losses.infonce.InfoNCE`.
        teacher_temperature: τ_t applied to the raw teacher scores (1.0: use them as logits, as SimLM does).

    Inputs: ``query`` (B, D), ``passages`` (P, D), ``group_index`` (B, G), ``teacher_scores`` (B, G), G > 1.
    A group of size 1 would always give 0 loss (both distributions are [1]), so G = 1 is a config error:
    the data has no hard negatives.

    References:
        E5 (arXiv 2212.03533) §3.2: fine-tuning minimises ``D_KL(p_ce ‖ p_stu) + α L_cont``; mE5 (arXiv
        2402.05672) §2 fine-tunes with this recipe. SimLM's ``src/models/biencoder_model.py`` (unilm) is the
        reference: ``group_log_scores = log_softmax(gather(scores / t, group_indices))``,
        ``kd_log_target = log_softmax(kd_labels)``, ``KLDivLoss(reduction="batchmean", log_target=True)``,
        ``loss = kd_cont_loss_weight * ce_loss + kd_loss``. Here α is the InfoNCE weight of
        :class:`~me5.losses.base.WeightedLoss`.
    """

    requires_teacher = True
    min_group_size = 2

    def __init__(self, temperature: float = 0.01, teacher_temperature: float = 1.0):
        super().__init__()
        for field, value in (("temperature", temperature), ("teacher_temperature", teacher_temperature)):
            if not (math.isfinite(value) and value > 0):
                raise ConfigError(f"loss.terms.kd.{field}", f"must be finite and > 0, got {value}")
        self.temperature = float(temperature)
        self.teacher_temperature = float(teacher_temperature)

    def forward(self, batch: EmbeddingBatch) -> Tensor:
        if batch.teacher_scores is None:
            raise ConfigError("loss.terms.kd", "needs teacher scores but the data has no teacher scores")
        if batch.group_size < 2:
            raise ConfigError(
                "loss.terms.kd", "the group size is 1: the data has no hard negatives, so KD is always 0"
            )
        dtype = torch.promote_types(batch.query.dtype, torch.float32)
        q_BD, p_PD = batch.query.to(dtype), batch.passages.to(dtype)
        group_BGD = p_PD[batch.group_index]
        student_BG = torch.einsum("bd,bgd->bg", q_BD, group_BGD) / self.temperature
        teacher_BG = batch.teacher_scores.detach().to(dtype) / self.teacher_temperature
        return F.kl_div(
            F.log_softmax(student_BG, dim=-1),
            F.log_softmax(teacher_BG, dim=-1),
            log_target=True,
            reduction="batchmean",
        )
