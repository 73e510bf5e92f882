"""Data parallelism that works with gradient caching: no DDP reducer, one explicit gradient all-reduce.

Gradient caching runs several backward passes per optimiser step (the loss w.r.t. the embeddings, then one
per re-forwarded chunk), and learnable loss parameters (a temperature) get their gradient from a backward
that never touches the encoder. DDP's reducer expects one backward per forward and every parameter's hook to
fire, so instead of wrapping the model we broadcast rank 0's parameters once and average the gradients
ourselves (:func:`me5.distributed.all_reduce_gradients`) right before the optimiser step.
"""

from __future__ import annotations

from lightning.pytorch.overrides.distributed import _sync_module_states
from lightning.pytorch.strategies import DDPStrategy


class AllReduceDDPStrategy(DDPStrategy):
    """``DDPStrategy`` without the ``DistributedDataParallel`` wrapper (processes, devices, launch unchanged).

    The LightningModule must average gradients itself; :class:`me5.training.module.EmbeddingModule` does so
    when it sees this strategy.
    """

    strategy_name = "me5_ddp"

    def configure_ddp(self) -> None:
        _sync_module_states(self.model)


def fsdp_layer_classes() -> set[type]:
    """The transformer-layer classes FSDP wraps one unit each (XLM-R and BERT bodies)."""
    from transformers.models.bert.modeling_bert import BertLayer
    from transformers.models.xlm_roberta.modeling_xlm_roberta import XLMRobertaLayer

    return {XLMRobertaLayer, BertLayer}
