"""What every loss term reads (:class:`EmbeddingBatch`), the term interface, and their weighted sum.

Passage layout (the collator's, kept after the cross-rank gather): query-major groups of size G, ranks
concatenated in rank order::

    passages = [r0: q0_pos, q0_neg1 .. q0_neg{G-1}, q1_pos, ...,  r1: q0_pos, ...]      (P = world * B * G, D)

so local query ``i`` on rank ``r`` has its positive at column ``(r * B + i) * G`` and its own group at the G
columns that follow. Every other column is an in-batch (or cross-rank) negative.
"""

from __future__ import annotations

import abc
import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from me5.errors import ConfigError


@dataclass
class EmbeddingBatch:
    """Embeddings and indices of one step, as seen by one rank.

    Attributes:
        query: (B, D) this rank's query embeddings.
        passages: (P, D) every candidate passage (all ranks' when gathered, P = world * B * G).
        positive_index: (B,) long, column of each query's positive in ``passages``.
        group_index: (B, G) long, columns of each query's own group: positive first, then its hard negatives.
        teacher_scores: (B, G) float cross-encoder scores of each query's group (same order), or None.
        candidate_mask: (B, P) bool or None; False removes that column from the query's negatives (e.g. a
            duplicate of its positive). The positive's own column is always kept.
    """

    query: Tensor
    passages: Tensor
    positive_index: Tensor
    group_index: Tensor
    teacher_scores: Tensor | None = None
    candidate_mask: Tensor | None = None

    @property
    def group_size(self) -> int:
        return self.group_index.size(1)

    @classmethod
    def build(
        cls,
        query: Tensor,
        passages: Tensor,
        *,
        group_size: int,
        rank: int = 0,
        local_batch: int | None = None,
        teacher_scores: Tensor | None = None,
        candidate_mask: Tensor | None = None,
    ) -> EmbeddingBatch:
        """Index the query-major layout (module docstring) for rank ``rank``.

        ``local_batch`` is the per-rank number of queries that sets the rank offset (default ``query.size(0)``):
        ``positive_index[i] = (rank * local_batch + i) * G`` and ``group_index[i] = positive_index[i] + arange(G)``.
        """
        B, G = query.size(0), int(group_size)
        offset_rows = rank * (B if local_batch is None else local_batch)
        if G < 1:
            raise ValueError(f"group_size must be >= 1, got {G}")
        if passages.size(0) < (offset_rows + B) * G:
            raise ValueError(
                f"passages has {passages.size(0)} rows but rank {rank} with {B} queries of group size {G} "
                f"needs at least {(offset_rows + B) * G}"
            )
        if teacher_scores is not None and tuple(teacher_scores.shape) != (B, G):
            raise ValueError(f"teacher_scores must be (B, G) = ({B}, {G}), got {tuple(teacher_scores.shape)}")
        if candidate_mask is not None and tuple(candidate_mask.shape) != (B, passages.size(0)):
            raise ValueError(
                f"candidate_mask must be (B, P) = ({B}, {passages.size(0)}), got {tuple(candidate_mask.shape)}"
            )
        positive_B = (offset_rows + torch.arange(B, device=query.device)) * G
        group_BG = positive_B.unsqueeze(1) + torch.arange(G, device=query.device)
        return cls(query, passages, positive_B, group_BG, teacher_scores, candidate_mask)


class LossTerm(nn.Module, abc.ABC):
    """One objective over an :class:`EmbeddingBatch`; returns a scalar (mean over this rank's queries).

    ``requires_teacher``: the term reads ``batch.teacher_scores``. ``min_group_size``: the smallest G it is
    meaningful for (KD needs hard negatives). :class:`WeightedLoss` checks both and names the term.
    """

    requires_teacher: bool = False
    min_group_size: int = 1

    @abc.abstractmethod
    def forward(self, batch: EmbeddingBatch) -> Tensor: ...


class WeightedLoss(nn.Module):
    """``total = Σ_name weight[name] * term[name](batch)``; terms with weight 0 are not computed.

    ``forward`` returns ``(total, parts)`` where ``parts[name]`` is the UNWEIGHTED value of each computed term
    (logged as ``train/loss/<name>``).
    """

    def __init__(self, terms: Mapping[str, LossTerm], weights: Mapping[str, float], *, where: str = "loss_weights"):
        """``where``: the config node the weights live in (``stages.<stage>.loss_weights``), for messages."""
        super().__init__()
        if not terms:
            raise ConfigError("loss.terms", "no loss terms are configured; add at least one (e.g. infonce)")
        for name in weights:
            if name not in terms:
                raise ConfigError(f"{where}.{name}", f"no loss term named '{name}'; the terms are {sorted(terms)}")
        for name in terms:
            if name not in weights:
                raise ConfigError(f"{where}.{name}", "missing: every loss term needs a weight")
            w = float(weights[name])
            if not math.isfinite(w) or w < 0:
                raise ConfigError(f"{where}.{name}", f"must be finite and >= 0, got {weights[name]}")
        if all(float(w) == 0 for w in weights.values()):
            raise ConfigError(where, f"every loss weight is 0 ({dict(weights)}); nothing would be trained")
        self.terms = nn.ModuleDict(dict(terms))
        self.weights = {name: float(weights[name]) for name in terms}

    @property
    def requires_teacher(self) -> bool:
        """True when a term with a positive weight reads teacher scores (the data must provide them)."""
        return any(t.requires_teacher and self.weights[n] > 0 for n, t in self.terms.items())

    @property
    def min_group_size(self) -> int:
        """The smallest group (1 + hard negatives) every weighted term can work with."""
        return max((t.min_group_size for n, t in self.terms.items() if self.weights[n] > 0), default=1)

    def forward(self, batch: EmbeddingBatch) -> tuple[Tensor, dict[str, Tensor]]:
        total: Tensor | None = None
        parts: dict[str, Tensor] = {}
        for name, term in self.terms.items():
            weight = self.weights[name]
            if weight == 0:
                continue
            if term.requires_teacher and batch.teacher_scores is None:
                raise ConfigError(
                    f"loss.terms.{name}",
                    "this term needs teacher scores but the data has no teacher scores; use a source with "
                    "cross-encoder scores or set its weight for this stage to 0",
                )
            if batch.group_size < term.min_group_size:
                raise ConfigError(
                    f"loss.terms.{name}",
                    f"needs groups of at least {term.min_group_size} passages but the group size is "
                    f"{batch.group_size}: the data has no hard negatives",
                )
            parts[name] = value = term(batch)
            total = weight * value if total is None else total + weight * value
        assert total is not None  # at least one weight is > 0 (checked in __init__)
        return total, parts
