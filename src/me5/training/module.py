"""The two training stages as LightningModules sharing one implementation.

Both stages embed queries and passages with one shared :class:`~me5.models.encoder.Encoder`, gather the
passages of every rank (cross-device negatives; each rank scores only its own queries, "local loss"),
optionally mask duplicate passages, and minimise a :class:`~me5.losses.WeightedLoss`. They differ in their
data (stage 1: weak pairs, in-batch negatives only; stage 2: hard negatives and teacher scores) and their
default loss terms, which the config chooses.

Optimisation is manual so that gradient caching (``chunk_rows``/``chunk_tokens``) can run its several
backward passes per step; without chunking it is one plain forward/backward. The forward/backward of one step
is :meth:`EmbeddingModule.compute_loss_and_backward` (testable without a Trainer); it also synchronises the
gradients for the strategy in use:

- one device, or Lightning's ``DDPStrategy`` (its reducer; plain, unchunked steps only): nothing to do;
- :class:`~me5.training.strategy.AllReduceDDPStrategy`: one bucketed all-reduce (mean) after all backward passes;
- :class:`~me5.training.strategy.FSDP2Strategy`: FSDP2 reduce-scatters the encoder's gradients at the last
  chunk's backward (or every chunk's, ``sync_every_chunk``); loss-side parameters (a learnable temperature)
  are all-reduced here. Lightning's FSDP1 ``FSDPStrategy`` cannot run backward inside ``training_step`` and
  is refused with a message.
"""

from __future__ import annotations

import copy
import inspect
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import lightning as L
import torch
from torch import Tensor
from torch.utils.data import DataLoader

from me5.batching import BatchPlan
from me5.distributed import (
    all_reduce_gradients,
    clip_grad_norm_,
    gather_no_grad,
    gather_with_grad,
    is_dtensor,
    max_over_ranks,
    world_info,
)
from me5.errors import ConfigError
from me5.gradcache import gradcache_step
from me5.losses import EmbeddingBatch, WeightedLoss
from me5.models.encoder import Encoder
from me5.training.strategy import AllReduceDDPStrategy, FSDP2Strategy

log = logging.getLogger(__name__)

NO_DECAY = ("bias", "LayerNorm.weight", "layer_norm.weight", "LayerNorm.bias", "norm.weight")


@dataclass
class StepResult:
    """What :meth:`EmbeddingModule.compute_loss_and_backward` returns (gradients are left in ``.grad``)."""

    loss: Tensor
    parts: dict[str, Tensor] = field(default_factory=dict)
    n_masked: int = 0


class EmbeddingModule(L.LightningModule):
    """Contrastive training of a bi-encoder (shared by both stages).

    Args:
        encoder: the model to train.
        loss: the weighted loss terms of this stage.
        optimizer: ``functools.partial`` of a torch optimiser, bound here to the parameter groups
            (weight decay is not applied to biases and norms).
        scheduler: ``functools.partial`` taking the optimiser (``me5.training.schedules.warmup_decay``) or None;
            under a Trainer it also gets ``total_steps`` = the Trainer's ``max_steps``, so the schedule spans
            the stage.
        batch_plan: the stage's :class:`~me5.batching.BatchPlan` (the one the DataModule draws by): its
            ``chunk_rows`` / ``chunk_tokens`` set gradient caching (texts, or padded tokens, per chunk; neither,
            or no plan: one plain forward/backward over the whole per-device batch).
        sort_by_length: with gradient caching, bucket texts of similar length into the same chunk (less padding;
            same loss and gradient, other dropout draws). Off by default.
        compile_encoder: ``torch.compile`` the backbone in place (``dynamic=True``: chunk shapes vary; the state
            dict keys do not change). With dropout and gradient caching it also sets inductor's (global)
            ``fallback_random`` so that the re-forward replays the same dropout masks. Off by default.
        fused_optimizer: pass ``fused=True`` to the optimiser (e.g. AdamW) when the parameters are on CUDA;
            ignored (with a log line) on CPU. Off by default (fused and foreach AdamW differ in rounding).
        gather_negatives: score each query against the passages of every rank (True) or of its own rank only.
        mask_duplicates: exclude from a query's candidates any other passage with the same text as its positive.
        grad_clip: max global gradient norm (``None``: no clipping).
        tokenizer: needed only for the retrieval validation step.
        evaluators: ``name -> RetrievalEvaluator`` run as the validation step.
    """

    stage_name = "embed"

    def __init__(
        self,
        encoder: Encoder,
        loss: WeightedLoss,
        *,
        optimizer: Callable,
        scheduler: Callable | None = None,
        batch_plan: BatchPlan | None = None,
        sort_by_length: bool = False,
        compile_encoder: bool = False,
        fused_optimizer: bool = False,
        gather_negatives: bool = True,
        mask_duplicates: bool = True,
        grad_clip: float | None = 1.0,
        tokenizer=None,
        evaluators: Mapping | None = None,
    ):
        super().__init__()
        self.automatic_optimization = False
        self.encoder = encoder
        self.loss = loss
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.batch_plan = batch_plan
        self.chunk_rows = batch_plan.chunk_rows if batch_plan is not None else None
        self.chunk_tokens = batch_plan.chunk_tokens if batch_plan is not None else None
        self.sort_by_length = bool(sort_by_length)
        self.compile_encoder = bool(compile_encoder)
        self.fused_optimizer = bool(fused_optimizer)
        self._configured = False
        self._unsharded_encoder: list[Encoder] = []  # the original encoder while a sharded copy trains (FSDP2)
        self.gather_negatives = gather_negatives
        self.mask_duplicates = mask_duplicates
        self.grad_clip = grad_clip
        self.tokenizer = tokenizer
        self.evaluators = dict(evaluators or {})
        self._t_last: float | None = None
        self._seen = {"pairs": 0, "truncated_queries": 0, "truncated_passages": 0}
        # built objects are not hyperparameters; the app stores the resolved config in the checkpoint
        self.save_hyperparameters(
            ignore=["encoder", "loss", "optimizer", "scheduler", "tokenizer", "evaluators", "batch_plan"], logger=False
        )

    # ------------------------------------------------------------------ optimisation
    def configure_optimizers(self):
        decay, no_decay = [], []
        for name, p in self.named_parameters():
            if not p.requires_grad:
                continue
            (no_decay if p.ndim < 2 or any(k in name for k in NO_DECAY) else decay).append(p)
        groups = [{"params": decay}, {"params": no_decay, "weight_decay": 0.0}]
        opt = self.optimizer_factory(groups, **self._optimizer_kwargs([*decay, *no_decay]))
        if self.scheduler_factory is None:
            return opt
        # the schedule spans the stage: the Trainer's max_steps (stages.<stage>.max_steps), one place
        kwargs = {"total_steps": int(self.trainer.max_steps)} if self._trainer is not None and self.trainer.max_steps > 0 else {}
        return {"optimizer": opt, "lr_scheduler": {"scheduler": self.scheduler_factory(opt, **kwargs), "interval": "step"}}

    def _optimizer_kwargs(self, params: list[Tensor]) -> dict:
        if not self.fused_optimizer:
            return {}
        func = getattr(self.optimizer_factory, "func", self.optimizer_factory)
        try:
            accepts = "fused" in inspect.signature(func).parameters
        except (TypeError, ValueError):  # pragma: no cover - builtins without a signature
            accepts = False
        if not accepts:
            raise ConfigError("stages.*.module.fused_optimizer", f"{getattr(func, '__name__', func)} has no `fused` option")
        if params and all(p.device.type == "cuda" for p in params):
            return {"fused": True}
        log.info("fused_optimizer: the parameters are not on CUDA; using the default (foreach) implementation")
        return {}

    # ------------------------------------------------------------------ strategy set-up
    def _strategy(self):
        return self._trainer.strategy if self._trainer is not None else None

    def _check_strategy(self) -> None:
        from lightning.pytorch.strategies import DDPStrategy, FSDPStrategy

        strategy = self._strategy()
        if isinstance(strategy, FSDPStrategy):
            raise ConfigError(
                "trainer.strategy",
                "Lightning's FSDPStrategy (FSDP1) runs training_step inside the root FSDP unit's forward, where a "
                "manual backward fails (and gradient caching needs several); use trainer=fsdp "
                "(me5.training.FSDP2Strategy) or trainer=ddp (me5.training.AllReduceDDPStrategy)",
            )
        chunked = self.chunk_rows is not None or self.chunk_tokens is not None
        if chunked and isinstance(strategy, DDPStrategy) and not isinstance(strategy, AllReduceDDPStrategy):
            if strategy.world_size > 1:
                raise ConfigError(
                    "trainer.strategy",
                    "gradient caching runs several backward passes per step, which the DDP reducer does not "
                    "support; use trainer=ddp (me5.training.AllReduceDDPStrategy)",
                )

    def configure_model(self) -> None:
        """Shard the encoder for FSDP2 and compile it, once (Lightning calls this hook in every strategy)."""
        if self._configured:
            return
        self._configured = True
        self._check_strategy()
        strategy = self._strategy()
        if isinstance(strategy, FSDP2Strategy):
            # train a sharded copy; the caller's encoder object gets the trained weights back in on_fit_end
            self._unsharded_encoder = [self.encoder]
            self.encoder = copy.deepcopy(self.encoder)
            strategy.shard(self.encoder.backbone)
        if self.compile_encoder:
            self._compile_encoder()

    def _compile_encoder(self) -> None:
        backbone = self.encoder.backbone
        dropout = any(isinstance(m, torch.nn.Dropout) and m.p > 0 for m in backbone.modules()) or any(
            float(getattr(backbone.config, k, 0) or 0) > 0
            for k in ("hidden_dropout_prob", "attention_probs_dropout_prob")
        )
        if dropout and (self.chunk_rows is not None or self.chunk_tokens is not None):
            import torch._inductor.config as inductor_config

            # GradCache replays each chunk's RNG state in a *different* compiled graph (no-grad pass vs training
            # pass). Inductor's own RNG keys its draws to the generated kernels, so the replay is exact only if
            # both graphs lower the dropouts alike (they did on CPU, torch 2.13); eager RNG is exact by construction.
            inductor_config.fallback_random = True
            log.info("compile_encoder: inductor fallback_random=True so that GradCache replays dropout masks")
        backbone.compile(dynamic=True)

    def on_fit_end(self) -> None:
        """FSDP2: put the trained weights back into the caller's (unsharded) encoder on every rank."""
        if not self._unsharded_encoder:
            return
        original = self._unsharded_encoder.pop()
        state = {k: (v.full_tensor() if is_dtensor(v) else v) for k, v in self.encoder.state_dict().items()}
        original.load_state_dict(state)
        self.encoder = original.to(self.device)
        self._configured = False

    def _grad_sync_mode(self) -> str:
        """``none`` (one device, or a DDP wrapper's reducer), ``allreduce`` or ``fsdp2``."""
        strategy = self._strategy()
        if isinstance(strategy, FSDP2Strategy):
            return "fsdp2"
        if strategy is None or isinstance(strategy, AllReduceDDPStrategy):
            return "allreduce" if world_info()[1] > 1 else "none"
        return "none"

    # ------------------------------------------------------------------ the loss on embeddings
    def embedding_batch(self, q_BD: Tensor, p_PD: Tensor, batch: Mapping) -> tuple[EmbeddingBatch, int]:
        """Gather passages over ranks and build the loss input; returns it and the number of masked columns."""
        rank, world = world_info()
        group = int(batch["group_size"])
        hashes = batch["passage_hash"]
        if self.gather_negatives and world > 1:
            p_PD = gather_with_grad(p_PD)
            hashes = gather_no_grad(hashes)
        else:
            rank = 0
        teacher = batch.get("teacher_scores")
        mask, n_masked = None, 0
        if self.mask_duplicates:
            mask, n_masked = duplicate_mask(hashes, group_size=group, rank=rank, local_batch=q_BD.size(0))
        eb = EmbeddingBatch.build(q_BD, p_PD, group_size=group, rank=rank, teacher_scores=teacher, candidate_mask=mask)
        return eb, n_masked

    def _backward(self, tensor: Tensor) -> None:
        if self._trainer is not None:
            self.manual_backward(tensor)
        else:
            tensor.backward()

    def compute_loss_and_backward(self, batch: Mapping) -> StepResult:
        """Forward and backward of one step: leaves this step's synchronised gradients in ``.grad``.

        Plain (one forward/backward over the per-device batch) or GradCache (``chunk_rows``/``chunk_tokens``),
        then the strategy's gradient synchronisation (module docstring). Needs no Trainer: without one, rank and
        world size come from ``torch.distributed`` (and gradients are all-reduced when it is initialised).
        Gradient clipping and the optimiser step are :meth:`training_step`'s.
        """
        q_inputs = (batch["query_input_ids"], batch["query_attention_mask"])
        p_inputs = (batch["passage_input_ids"], batch["passage_attention_mask"])
        if not getattr(self.encoder, "include_prompt", True):  # pool without the prompts: each row's prompt length rides along
            if "query_prompt_length" not in batch:
                raise ConfigError("model.encoder.include_prompt",
                                  "pooling without the prompt needs the batch's prompt lengths (PairCollator)")
            q_inputs += (batch["query_prompt_length"],)
            p_inputs += (batch["passage_prompt_length"],)
        stats = {}
        mode = self._grad_sync_mode()

        def loss_fn(q_BD: Tensor, p_PD: Tensor):
            eb, stats["masked"] = self.embedding_batch(q_BD, p_PD, batch)
            return self.loss(eb)

        if self.chunk_rows is None and self.chunk_tokens is None:
            loss, parts = loss_fn(self.encoder(*q_inputs), self.encoder(*p_inputs))
            self._backward(loss)
            loss, parts = loss.detach(), {k: v.detach() for k, v in parts.items()}
        else:
            grad_sync = None
            if mode == "fsdp2" and not self._strategy().sync_every_chunk:
                backbone = self.encoder.backbone
                grad_sync = backbone.set_requires_gradient_sync  # reduce-scatter at the last chunk only
            try:
                loss, parts = gradcache_step(
                    self.encoder,
                    q_inputs,
                    p_inputs,
                    loss_fn,
                    chunk_rows=self.chunk_rows,
                    chunk_tokens=self.chunk_tokens,
                    sort_by_length=self.sort_by_length,
                    backward_fn=self._backward,
                    grad_sync=grad_sync,
                    # FSDP2 gathers parameters in every chunk's forward: every rank must run as many chunks
                    equalize_chunks=max_over_ranks if mode == "fsdp2" else None,
                )
            finally:
                if grad_sync is not None:
                    grad_sync(True)
        if mode == "allreduce":
            all_reduce_gradients([p for p in self.parameters() if p.grad is not None])
        elif mode == "fsdp2":  # FSDP2 reduced the encoder; the loss-side parameters are plain tensors
            all_reduce_gradients([p for p in self.parameters() if p.grad is not None and not is_dtensor(p)])
        return StepResult(loss, parts, stats.get("masked", 0))

    def training_step(self, batch: Mapping, batch_idx: int) -> Tensor:
        opt = self.optimizers()
        out = self.compute_loss_and_backward(batch)
        if self.grad_clip:
            if self._grad_sync_mode() == "fsdp2":  # Lightning's clipping cannot mix DTensor and plain grads
                clip_grad_norm_([p for p in self.parameters() if p.grad is not None], self.grad_clip)
            else:
                self.clip_gradients(opt, gradient_clip_val=self.grad_clip, gradient_clip_algorithm="norm")
        opt.step()
        opt.zero_grad(set_to_none=True)
        sch = self.lr_schedulers()
        if sch is not None:
            sch.step()
        self._log_step(batch, out.loss, out.parts, out.n_masked)
        return out.loss

    def _log_step(self, batch: Mapping, loss: Tensor, parts: Mapping[str, Tensor], n_masked: int) -> None:
        b = batch["query_input_ids"].size(0)
        self._seen["pairs"] += b * self.trainer.world_size
        self._seen["truncated_queries"] += int(batch["n_truncated_queries"])
        self._seen["truncated_passages"] += int(batch["n_truncated_passages"])
        metrics = {"train/loss": loss.detach()}
        metrics.update({f"train/loss/{k}": v.detach() for k, v in parts.items()})
        metrics["train/lr"] = self.optimizers().param_groups[0]["lr"]
        metrics["train/duplicates_masked"] = float(n_masked)
        for name, term in self.loss.terms.items():
            if hasattr(term, "temperature"):
                metrics[f"train/temperature/{name}"] = float(term.temperature)
        now = time.perf_counter()
        if self._t_last is not None:
            metrics["train/pairs_per_s"] = b * self.trainer.world_size / max(now - self._t_last, 1e-9)
        self._t_last = now
        metrics["data/pairs_seen"] = float(self._seen["pairs"])
        metrics["data/truncated_queries"] = float(self._seen["truncated_queries"])
        metrics["data/truncated_passages"] = float(self._seen["truncated_passages"])
        self.log_dict(metrics, on_step=True, prog_bar=False, batch_size=b)
        self.log("loss", loss.detach(), prog_bar=True, logger=False, batch_size=b)

    # ------------------------------------------------------------------ retrieval validation
    def val_dataloader(self) -> DataLoader:
        """One "batch" per evaluator name: the validation step runs a whole retrieval evaluation."""
        return DataLoader(list(self.evaluators), batch_size=None)

    def validation_step(self, name: str, batch_idx: int) -> None:
        if self.tokenizer is None:
            raise RuntimeError("retrieval validation needs the tokenizer")
        scores = self.evaluators[name].evaluate(self.encoder, self.tokenizer, device=self.device)
        self.log_dict({f"val/{k}": v for k, v in scores.items()}, batch_size=1, rank_zero_only=True)

    # ------------------------------------------------------------------ checkpoints
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["me5_stage"] = self.stage_name
        checkpoint["me5_seen"] = dict(self._seen)
        # dropout masks continue exactly after a resume only if the RNG does
        checkpoint["me5_rng"] = {
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        }

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self._seen.update(checkpoint.get("me5_seen", {}))
        self._pending_rng = checkpoint.get("me5_rng")

    def on_train_batch_start(self, batch, batch_idx: int) -> None:
        # restored here, not at load time: building the dataloader between the two draws from the RNG
        rng = getattr(self, "_pending_rng", None)
        if rng is not None:
            torch.set_rng_state(rng["torch"])
            if rng.get("cuda") is not None and torch.cuda.is_available():
                torch.cuda.set_rng_state_all(rng["cuda"])
            self._pending_rng = None


class ContrastivePretraining(EmbeddingModule):
    """Stage 1 (mE5 §2): InfoNCE over in-batch negatives on ~1B weakly supervised pairs, τ = 0.01."""

    stage_name = "pretrain"


class SupervisedFinetuning(EmbeddingModule):
    """Stage 2 (mE5 §2): in-batch + mined hard negatives, plus KL distillation from a cross-encoder teacher."""

    stage_name = "finetune"


def duplicate_mask(hash_P: Tensor, *, group_size: int, rank: int, local_batch: int) -> tuple[Tensor, int]:
    """Mask (False) candidates whose text equals a query's positive, except the positive itself.

    Web pairs repeat passages; without the mask a copy of the positive counts as a negative of itself.
    Returns the (B, P) candidate mask and the number of masked entries.
    """
    pos_B = (rank * local_batch + torch.arange(local_batch, device=hash_P.device)) * group_size
    same_BP = hash_P[pos_B].unsqueeze(1) == hash_P.unsqueeze(0)
    same_BP[torch.arange(local_batch, device=hash_P.device), pos_B] = False
    return ~same_BP, int(same_BP.sum())
