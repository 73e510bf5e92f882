"""Data parallelism that works with gradient caching: no DDP reducer, one explicit gradient all-reduce.

Gradient caching runs several backward passes per optimiser step (the loss w.r.t. the embeddings, then one
per re-forwarded chunk), and learnable loss parameters (a temperature) get their gradient from a backward
that never touches the encoder. DDP's reducer expects one backward per forward and every parameter's hook to
fire, so instead of wrapping the model we broadcast rank 0's parameters once and average the gradients
ourselves (:func:`me5.distributed.all_reduce_gradients`) right before the optimiser step.
"""

from __future__ import annotations

from collections.abc import Iterable

from lightning.pytorch.overrides.distributed import _sync_module_states
from lightning.pytorch.strategies import DDPStrategy, ModelParallelStrategy
from torch import nn


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


class FSDP2Strategy(ModelParallelStrategy):
    """Fully sharded data parallelism with FSDP2 (``torch.distributed.fsdp.fully_shard``) that works with GradCache.

    Why not Lightning's ``FSDPStrategy``: it wraps the whole LightningModule in one FSDP1 root unit and runs
    ``training_step`` *inside* that unit's forward. A backward inside it (manual optimisation, so every
    GradCache chunk) reaches the root's parameters (the embeddings) before the root's pre-backward hook ever
    ran: torch 2.13 FSDP1 raises ``Expects BACKWARD_PRE or BACKWARD_POST state but got FORWARD``, and the
    final callback that moves the reduced gradient shards into ``.grad`` is never queued. FSDP2 has no wrapper:
    the encoder's backbone is the root, each chunk's forward/backward is a complete FSDP2 iteration, and
    several backward passes per step accumulate correctly.

    This is ``ModelParallelStrategy`` with every process in one data-parallel dimension (no tensor parallelism)
    and a full (rank-0, single-file) checkpoint. The LightningModule calls :meth:`shard` from
    ``configure_model``; :class:`me5.training.module.EmbeddingModule` does.

    Args:
        layer_classes: module classes sharded one FSDP unit each (default: :func:`fsdp_layer_classes`).
        reshard_after_forward: free each layer's gathered parameters after its forward (ZeRO-3); False keeps
            them until backward (ZeRO-2-like, more memory, fewer all-gathers).
        sync_every_chunk: reduce-scatter the gradients after every GradCache chunk (sharded accumulation,
            least memory) instead of once per step after the last chunk (default: unsharded accumulation in
            the gradients' full size, one reduce-scatter per step).
        **kwargs: ``ModelParallelStrategy``'s ``process_group_backend`` and ``timeout``.
    """

    strategy_name = "me5_fsdp2"

    def __init__(
        self,
        *,
        layer_classes: Iterable[type] | None = None,
        reshard_after_forward: bool = True,
        sync_every_chunk: bool = False,
        **kwargs,
    ) -> None:
        super().__init__(data_parallel_size="auto", tensor_parallel_size=1, save_distributed_checkpoint=False, **kwargs)
        self.layer_classes = tuple(layer_classes) if layer_classes is not None else None
        self.reshard_after_forward = bool(reshard_after_forward)
        self.sync_every_chunk = bool(sync_every_chunk)

    def setup_environment(self) -> None:
        # one data-parallel dimension over every process (ModelParallelStrategy's "auto" is the node count)
        self._data_parallel_size = self.num_nodes * self.num_processes
        self._tensor_parallel_size = 1
        super().setup_environment()

    def shard(self, module: nn.Module) -> nn.Module:
        """``fully_shard`` each layer of ``module`` (an HF backbone), then ``module`` itself as the root unit."""
        from torch.distributed.fsdp import fully_shard

        mesh = self.device_mesh["data_parallel"]
        classes = self.layer_classes or tuple(fsdp_layer_classes())
        layers = [m for m in module.modules() if isinstance(m, classes)]
        if not layers:
            raise ValueError(f"no {[c.__name__ for c in classes]} layer in {type(module).__name__} to shard")
        for layer in layers:
            fully_shard(layer, mesh=mesh, reshard_after_forward=self.reshard_after_forward)
        fully_shard(module, mesh=mesh, reshard_after_forward=self.reshard_after_forward)
        return module
