"""Loss terms over :class:`EmbeddingBatch` and their weighted sum."""

from me5.losses.base import EmbeddingBatch, LossTerm, WeightedLoss
from me5.losses.infonce import InfoNCE
from me5.losses.kd import KLDistillation

__all__ = ["EmbeddingBatch", "LossTerm", "WeightedLoss", "InfoNCE", "KLDistillation"]
