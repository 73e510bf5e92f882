"""The run loop: one stage (module, trainer, fit, evaluation, export, record) and the stages of a run in order.

:class:`StageSpec` is what ``stages.<name>`` in the config holds (``conf/stage/<name>.yaml`` mirrors it): every
value of a stage under one key. The app checks the whole run first and builds, per stage, a :class:`StageRun`
(the spec, its :class:`~me5.batching.BatchPlan` on the trainer's world size, its DataModule and loss); then
:func:`run_stages` trains them in order. What needs the app's tools (Hydra building, the loggers, the callbacks)
comes in as factories, so nothing here imports Hydra, OmegaConf or W&B.

A run folder (:class:`~me5.training.record.RunRecord`) makes a run restartable: a finished stage is skipped and
its export is the next stage's start; an unfinished one resumes from its last checkpoint.
"""

from __future__ import annotations

import functools
import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback

from me5.batching import BatchPlan
from me5.errors import ConfigError
from me5.eval.suite import evaluate_all
from me5.export import export_encoder
from me5.losses import WeightedLoss
from me5.training.checkpointing import resume_checkpoint
from me5.training.record import DONE, RunRecord

log = logging.getLogger("me5.train")

STAGES = ("pretrain", "finetune")  # the pipeline order


@dataclass(frozen=True)
class StageSpec:
    """One stage of a run, every value under one key (``stages.<name>.<field>``).

    Args:
        name: ``pretrain`` (stage 1) or ``finetune`` (stage 2).
        module: the LightningModule's constructor, partially bound (optimizer, scheduler, options); the run loop
            binds the encoder, loss, tokenizer, evaluators and the batch plan.
        global_batch_size / per_device_batch_size / chunk_rows / chunk_tokens: the batch plan's fields
            (:meth:`batch_plan`).
        max_steps / warmup_steps / lr: the schedule (the config's optimizer and scheduler read them).
        loss_weights: ``{term: weight}`` over the loss group's terms; 0 or absent: the term is not computed.
        n_negatives: hard negatives per query (0: in-batch negatives only).
        query_max_length / passage_max_length: tokens per text.
        val_every: the retrieval validation every N steps (None: only after the stage).
        init_from: an exported model folder or a ``.ckpt`` to start from (None: the previous stage's encoder, or the
            model config's initialisation).
    """

    name: str
    module: Callable[..., L.LightningModule]
    global_batch_size: int
    max_steps: int
    warmup_steps: int
    lr: float
    loss_weights: Mapping[str, float]
    per_device_batch_size: int | None = None
    chunk_rows: int | None = None
    chunk_tokens: int | None = None
    n_negatives: int = 0
    query_max_length: int = 64
    passage_max_length: int = 128
    val_every: int | None = None
    init_from: str | None = None

    def __post_init__(self) -> None:
        where = self.where
        if self.name not in STAGES:
            raise ConfigError(f"{where}.name", f"unknown stage '{self.name}'; stages are {list(STAGES)}")
        steps, warmup = int(self.max_steps), int(self.warmup_steps)
        if steps < 1:
            raise ConfigError(f"{where}.max_steps", f"must be >= 1, got {self.max_steps}")
        if warmup < 0:
            raise ConfigError(f"{where}.warmup_steps", f"must be >= 0, got {warmup}")
        if warmup > steps:
            raise ConfigError(f"{where}.warmup_steps", f"{warmup} warm-up steps is longer than the stage "
                                                       f"({where}.max_steps={steps})")
        if not float(self.lr) > 0:
            raise ConfigError(f"{where}.lr", f"must be > 0, got {self.lr}")
        if int(self.n_negatives) < 0:
            raise ConfigError(f"{where}.n_negatives", "must be >= 0")
        for term, w in (self.loss_weights or {}).items():
            if not (math.isfinite(float(w)) and float(w) >= 0):
                raise ConfigError(f"{where}.loss_weights.{term}", f"must be finite and >= 0, got {w}")
        if not any(float(w) > 0 for w in (self.loss_weights or {}).values()):
            raise ConfigError(f"{where}.loss_weights", f"no loss term has a positive weight in stage {self.name}")
        # the batch fields' own checks; the world size comes later (a per-device cross-check implies its own)
        pd, gbs = self.per_device_batch_size, self.global_batch_size
        implied = gbs // pd if isinstance(pd, int) and isinstance(gbs, int) and pd > 0 and gbs % pd == 0 else 1
        self.batch_plan(implied)

    @property
    def where(self) -> str:
        return f"stages.{self.name}"

    def batch_plan(self, world_size: int) -> BatchPlan:
        """The stage's :class:`~me5.batching.BatchPlan` on ``world_size`` devices (validated; errors name
        ``stages.<name>.<field>``)."""
        return BatchPlan.build(global_batch_size=self.global_batch_size, world_size=world_size,
                               per_device_batch_size=self.per_device_batch_size, chunk_rows=self.chunk_rows,
                               chunk_tokens=self.chunk_tokens, where=self.where)

    def weighted_loss(self, terms: Mapping[str, Any]) -> WeightedLoss:
        """The stage's :class:`~me5.losses.WeightedLoss` over the built loss ``terms`` with a positive weight; a
        weight for a term that is not configured names ``stages.<name>.loss_weights.<term>``."""
        unknown = [t for t in self.loss_weights if t not in terms and float(self.loss_weights[t]) > 0]
        if unknown:
            raise ConfigError(f"{self.where}.loss_weights.{unknown[0]}",
                              f"no loss term named '{unknown[0]}' (the loss group has {sorted(terms)})")
        weights = {t: float(w) for t, w in self.loss_weights.items() if t in terms and float(w) > 0}
        return WeightedLoss({t: terms[t] for t in weights}, weights, where=f"{self.where}.loss_weights")


@dataclass
class StageRun:
    """A stage, checked and ready: its spec, its batch plan on the job's world size, its DataModule and loss."""

    spec: StageSpec
    plan: BatchPlan
    datamodule: Any
    loss: WeightedLoss

    @property
    def name(self) -> str:
        return self.spec.name


@dataclass
class RunOptions:
    """How the stages run: which are evaluated (``evaluate``: stage names), the untrained baseline row, where the
    evaluation runs (``shared``: in the training job, split over its ranks; ``job``: an ``evaluate_<stage>.sh``
    script per stage), whether a rerun resumes, and what the export records about the run."""

    evaluate: Sequence[str] = ()
    baseline: bool = True
    eval_after: str = "shared"
    resume: bool = True
    export_metadata: Mapping = field(default_factory=dict)


class _BeforeFirstStep(Callback):
    """Calls ``fn(trainer, pl_module)`` when training is about to start, inside ``fit``: the checkpoint (if any) is
    restored and, in a distributed job, the process group exists and every rank is here."""

    def __init__(self, fn: Callable):
        self.fn = fn

    def on_train_start(self, trainer, pl_module) -> None:
        self.fn(trainer, pl_module)


def close_loggers(loggers) -> None:
    """Flush every logger (the default of :func:`run_stage`'s ``close``)."""
    for lg in loggers:
        lg.finalize("success")


def run_stage(stage: StageRun, *, encoder, tokenizer, prompts, evaluators: Mapping, trainer: Callable[..., L.Trainer],
              record: RunRecord, options: RunOptions, callbacks: Sequence[Callback] = (), show: bool = False,
              close: Callable = close_loggers) -> L.Trainer:
    """Train one stage and record it: connect the data (the batch plan, lengths, negatives, prompts), build the
    module, fit (resuming from the stage's last readable checkpoint), log the data counts, evaluate (each rank its
    part) when the stage is in ``options.evaluate``, export the encoder, write the record and mark the stage done.

    ``trainer(max_steps=, callbacks=, val_check_interval=, limit_val_batches=)`` builds the Lightning Trainer (the
    app binds the logger and its config's callbacks). Returns the Trainer.
    """
    spec, plan, datamodule, loss = stage.spec, stage.plan, stage.datamodule, stage.loss
    t0 = time.perf_counter()
    datamodule.connect(tokenizer, batch_plan=plan, n_negatives=spec.n_negatives,
                       require_teacher=loss.requires_teacher, query_max_length=spec.query_max_length,
                       passage_max_length=spec.passage_max_length, prompts=prompts)
    if not datamodule.is_streaming():  # in-memory data is read (a bad record found) before the Trainer starts
        datamodule.setup("fit")
    module = spec.module(encoder=encoder, loss=loss, tokenizer=tokenizer,
                         evaluators=evaluators if spec.val_every else {}, batch_plan=plan)
    fit = trainer(max_steps=spec.max_steps, callbacks=list(callbacks), val_check_interval=spec.val_every,
                  limit_val_batches=1.0 if spec.val_every else 0)
    ckpt_dir = record.checkpoint_dir(spec.name)
    resume = None
    if options.resume:
        found, unreadable = resume_checkpoint(ckpt_dir)
        for path, why in unreadable:
            log.error("checkpoint %s is unreadable (%s): not used", path, why)
        resume = str(found) if found is not None else None
    if resume:
        log.info("resuming stage %s from %s", spec.name, resume)
    fit.fit(module, datamodule=datamodule, ckpt_path=resume)
    record.data_counts[spec.name] = datamodule.data_counts()
    for lg in fit.loggers:
        lg.log_metrics({f"data/{k}": float(v) for k, v in record.data_counts[spec.name].items()},
                       step=fit.global_step)
    record.timings[f"{spec.name}/train_s"] = round(time.perf_counter() - t0, 1)
    evaluated = bool(evaluators) and spec.name in options.evaluate
    if evaluated and options.eval_after == "shared":  # each rank its part
        record.results[spec.name] = evaluate_all(evaluators, encoder, tokenizer)
        if fit.is_global_zero:
            for lg in fit.loggers:
                lg.log_metrics({f"test/{k}": v for k, v in record.results[spec.name].items()}, step=fit.global_step)
    if fit.is_global_zero:
        export_encoder(encoder, tokenizer, record.export_dir(spec.name), prompts=prompts,
                       extra_metadata={"stage": spec.name, **options.export_metadata})
        if evaluated and options.eval_after == "job":
            log.info("evaluate the %s export with its own job: %s", spec.name, record.write_eval_job(spec.name))
    close(fit.loggers)
    if fit.is_global_zero:  # the stage is complete: a rerun skips it and reads its results back
        record.write(show=show)
        record.mark_done(spec.name, fit.global_step)
    return fit


def run_stages(stages: Sequence[StageRun], *, record: RunRecord, prompts, options: RunOptions,
               tokenizer: Callable[[], Any], encoder: Callable[..., Any], evaluators: Callable[[], Mapping],
               trainer: Callable[..., L.Trainer], close: Callable = close_loggers,
               ) -> dict[str, dict[str, float]]:
    """Run the stages in order; return ``{row: {metric: value}}`` (rows: untrained, pretrain, finetune).

    Factories from the app: ``tokenizer()``; ``encoder(spec, tokenizer, init_from=, previous=)`` (the stage's
    encoder: the previous stage's, ``init_from`` or the model config's); ``evaluators()`` (built once, only when
    something is evaluated); ``trainer(spec, encoder, **kwargs)``: the stage's Trainer (its logger, the config's
    callbacks), called by :func:`run_stage` once the stage's data is read. A stage finished earlier in ``record``'s folder is skipped, its
    export the next stage's start; the untrained row is evaluated inside the first stage's fit (the ranks of a
    job then share it) unless the record has it.
    """
    names = [s.name for s in stages]
    done = record.finished_stages(names) if options.resume else []
    if done and len(done) == len(names):
        print(f"me5: {record.out_dir} finished earlier (every stage has checkpoints/<stage>/{DONE}): nothing to "
              f"do; results in {record.metrics_file}", flush=True)
        return dict(record.results)
    enc = tok = evals = None
    for stage in stages:
        spec = stage.spec
        if spec.name in done:  # a restart after this stage finished: its export is the next stage's start
            log.info("stage %s finished earlier (%s): skipped", spec.name, record.checkpoint_dir(spec.name) / DONE)
            tok = tok or tokenizer()
            enc = encoder(spec, tok, init_from=str(record.export_dir(spec.name)), previous=None)
            continue
        stage.datamodule.prepare_data()  # generates the sample data (the sample tokenizer is trained on it)
        tok = tok or tokenizer()
        if evals is None:  # none built when this run evaluates nothing (a stage-1 run of a split pipeline)
            wanted = options.evaluate or options.baseline or any(s.spec.val_every for s in stages)
            evals = dict(evaluators()) if wanted else {}
        enc = encoder(spec, tok, init_from=spec.init_from, previous=enc)
        at_start = []
        if options.baseline and not record.results and evals and options.eval_after == "shared":
            at_start.append(_BeforeFirstStep(_baseline(spec.name, evals, tok, record)))
        run_stage(stage, encoder=enc, tokenizer=tok, prompts=prompts, evaluators=evals,
                  trainer=functools.partial(trainer, spec, enc), record=record, options=options, callbacks=at_start,
                  show=spec.name == names[-1], close=close)
    return dict(record.results)


def _baseline(stage: str, evaluators: Mapping, tokenizer, record: RunRecord) -> Callable:
    """The untrained row, evaluated when the first stage's training starts (every rank is in ``fit`` then, so a
    distributed job shares it; before ``fit`` every rank would evaluate everything alone)."""

    def baseline(trainer, pl_module) -> None:
        if trainer.global_step > 0:
            log.warning("no untrained row: stage %s resumed at step %d, the weights are trained already",
                        stage, trainer.global_step)
            return
        record.results["untrained"] = evaluate_all(evaluators, pl_module.encoder, tokenizer)
        if trainer.is_global_zero:  # kept if this stage is interrupted: a rerun does not evaluate again
            record.write(show=False)

    return baseline
