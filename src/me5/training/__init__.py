"""LightningModules of the two stages, the gradient all-reduce strategy and LR schedules."""

from me5.training.module import ContrastivePretraining, EmbeddingModule, SupervisedFinetuning
from me5.training.strategy import AllReduceDDPStrategy, FSDP2Strategy, fsdp_layer_classes

__all__ = ["AllReduceDDPStrategy", "FSDP2Strategy", "fsdp_layer_classes", "ContrastivePretraining", "EmbeddingModule", "SupervisedFinetuning"]
