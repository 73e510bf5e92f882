"""LightningModules of the two stages, the gradient all-reduce strategy and LR schedules."""

from me5.training.module import ContrastivePretraining, EmbeddingModule, SupervisedFinetuning
from me5.training.strategy import AllReduceDDPStrategy, fsdp_layer_classes

__all__ = ["AllReduceDDPStrategy", "fsdp_layer_classes", "ContrastivePretraining", "EmbeddingModule", "SupervisedFinetuning"]
