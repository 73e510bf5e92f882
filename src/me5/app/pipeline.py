"""The pieces the Hydra app composes: config checks, the batch plans, building, evaluation, results.

Kept apart from ``train.py`` so that the app stays a thin sequence of calls. :func:`check_run` runs every
check that needs no data and no model (fields, schedules, world size, data paths, evaluation folders) and
returns what the run needs to start; nothing heavy (data generation, tokenizer training, evaluation, a W&B
run) happens before it has passed.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from me5.batching import BatchPlan
from me5.errors import ConfigError, DataError, Me5Error

log = logging.getLogger(__name__)

STAGES = ("pretrain", "finetune")


def build(node, **kwargs):
    """``hydra.utils.instantiate`` that re-raises a me5 error of the target as itself (field/file named, exit 2)."""
    try:
        return instantiate(node, **kwargs)
    except InstantiationException as err:
        cause = err.__cause__
        while cause is not None and not isinstance(cause, Me5Error):
            cause = cause.__cause__
        if cause is not None:
            raise cause from None
        raise


def selected_stages(cfg) -> list[str]:
    """The stages the ``stage`` group selected: the ``stages.<name>`` nodes with a ``module``. An experiment that
    sets a field of both stages (``stages.finetune.chunk_tokens``) leaves a partial node for a stage that
    ``stage=[pretrain]`` does not run; it is not a stage of the run."""
    return [s for s, node in (cfg.get("stages") or {}).items() if node is not None and "module" in node]


def stage_order(stages) -> list[str]:
    """The configured stages in pipeline order."""
    return [s for s in STAGES if s in stages]


EVAL_AFTER = ("shared", "job")  # see conf/config.yaml eval_after


def validate_config(cfg) -> list[str]:
    """Reject unknown or contradictory settings before anything is built; each error names its field."""
    unknown = [s for s in (cfg.get("stages") or {}) if s not in STAGES]
    if unknown:
        raise ConfigError(f"stages.{unknown[0]}", f"unknown stage; stages are {list(STAGES)}")
    stages = selected_stages(cfg)
    if not stages:
        raise ConfigError("stage", "no stage selected (e.g. stage=[pretrain,finetune])")
    terms = cfg.loss.get("terms") or {}
    for tname, tcfg in terms.items():
        for sname, w in (tcfg.get("weight") or {}).items():
            if sname not in STAGES:
                raise ConfigError(f"loss.terms.{tname}.weight.{sname}", f"unknown stage; stages are {list(STAGES)}")
            if not (float(w) >= 0):
                raise ConfigError(f"loss.terms.{tname}.weight.{sname}", f"must be >= 0, got {w}")
    for key in cfg:  # a top-level ??? (e.g. an experiment's start_from) must be given on the command line
        if OmegaConf.is_missing(cfg, key):
            raise ConfigError(str(key), f"must be given (e.g. {key}=<run dir>/export/pretrain): see the experiment")
    build(cfg.prompts)  # an unknown prompt style names prompts.style
    evaluated_stages(cfg.get("eval_stages", "all"), stage_order(stages))
    if cfg.get("eval_after", "shared") not in EVAL_AFTER:
        raise ConfigError("eval_after", f"unknown '{cfg.eval_after}'; choose one of {list(EVAL_AFTER)}")
    if float(cfg.loss.temperature) <= 0:
        raise ConfigError("loss.temperature", f"must be > 0, got {cfg.loss.temperature}")
    for s in stages:
        scfg = cfg.stages[s]
        if s not in (cfg.data or {}):
            raise ConfigError(f"data.{s}", f"the data config '{cfg.data.get('name')}' has no data for stage {s}")
        for key in [k for k in cfg.data[s] if not str(k).startswith("_")]:
            if OmegaConf.is_missing(cfg.data[s], key):
                raise ConfigError(f"data.{s}.{key}", f"must be given for stage {s} (e.g. data.{s}.{key}=/my/pairs.jsonl)")
        if not any(float((t.get("weight") or {}).get(s, 0)) > 0 for t in terms.values()):
            raise ConfigError(f"loss.terms.*.weight.{s}", f"no loss term has a positive weight in stage {s}")
        _check_schedule(scfg, f"stages.{s}")
        if int(scfg.n_negatives) < 0:
            raise ConfigError(f"stages.{s}.n_negatives", "must be >= 0")
        BatchPlan.build(**_plan_fields(scfg), world_size=1, where=f"stages.{s}")  # field checks; world size later
    return stages


def evaluated_stages(eval_stages, stages: list[str]) -> list[str]:
    """The stages of this run after which the eval group runs. ``eval_stages``: ``all``, ``last`` (this run's
    last stage), or a list of stage names (``[finetune]``: a stage-1-only run of a split pipeline evaluates
    nothing, the stage-2 run the final model)."""
    if eval_stages in (None, "all"):
        return list(stages)
    if eval_stages == "last":
        return list(stages[-1:])
    if isinstance(eval_stages, str) or not all(isinstance(s, str) for s in eval_stages):
        raise ConfigError("eval_stages", f"choose all, last or a list of stage names, got {eval_stages!r}")
    unknown = [s for s in eval_stages if s not in STAGES]
    if unknown:
        raise ConfigError("eval_stages", f"unknown stage '{unknown[0]}'; stages are {list(STAGES)}")
    return [s for s in stages if s in eval_stages]


def _check_schedule(scfg, where: str) -> None:
    """Steps, warm-up and LR of a stage: each set once (``stages.<stage>.*``) and consistent."""
    steps, warmup = int(scfg.max_steps), int(scfg.warmup_steps)
    if steps < 1:
        raise ConfigError(f"{where}.max_steps", f"must be >= 1, got {scfg.max_steps}")
    if warmup < 0:
        raise ConfigError(f"{where}.warmup_steps", f"must be >= 0, got {warmup}")
    if warmup > steps:
        raise ConfigError(f"{where}.warmup_steps", f"{warmup} warm-up steps is longer than the stage "
                                                   f"({where}.max_steps={steps})")
    if not float(scfg.lr) > 0:
        raise ConfigError(f"{where}.lr", f"must be > 0, got {scfg.lr}")
    sched = scfg.module.get("scheduler")
    if sched is not None and "total_steps" in sched:
        raise ConfigError(f"{where}.module.scheduler.total_steps", f"the schedule spans the stage: set {where}.max_steps")


def _plan_fields(scfg) -> dict:
    return {k: scfg.get(k) for k in ("global_batch_size", "per_device_batch_size", "chunk_rows", "chunk_tokens")}


def trainer_world_size(trainer_cfg) -> int:
    """The number of processes the configured Trainer will run (devices x nodes), without starting any."""
    trainer = build(trainer_cfg, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                    enable_model_summary=False)
    return int(trainer.world_size)


def batch_plans(cfg, stages, world_size: int) -> dict[str, BatchPlan]:
    """Each stage's :class:`~me5.batching.BatchPlan` on ``world_size`` devices."""
    return {s: BatchPlan.build(**_plan_fields(cfg.stages[s]), world_size=world_size, where=f"stages.{s}")
            for s in stages}


@dataclass
class RunPlan:
    """What :func:`check_run` hands the app: the stages, their batch plans, DataModules and the prompt policy."""

    stages: list[str]
    plans: dict[str, BatchPlan]
    datamodules: dict
    prompts: object
    # the sample data folder when the tiny model's tokenizer or the sample evaluation reads it and no source of
    # the run generates it (data=files with model=tiny): the app generates it before anything else
    generate_sample: list[Path] = field(default_factory=list)


def check_run(cfg: DictConfig, *, world_size: int | None = None) -> RunPlan:
    """Every check that needs no model, in the order a user would fix them (see module docstring); the data is
    looked at only in its first records. ``world_size``: plan for it instead of building the configured Trainer
    (the dry run on a machine without the accelerator)."""
    stages = stage_order(validate_config(cfg))
    prompts = build(cfg.prompts)
    plans = batch_plans(cfg, stages, world_size if world_size is not None else trainer_world_size(cfg.trainer))
    datamodules = {s: build(cfg.data[s]) for s in stages}
    generated: list[Path] = []
    for dm in datamodules.values():
        dm.check()
        generated += [Path(p) for src in dm.sources().values() for p in src.generates()]
    sample = sample_data_needed(cfg, generated)
    generated += sample
    for name, ev in (cfg.eval or {}).items():
        data = ev.get("data")
        # retrieval: data.data_dir (a load_beir node); bitext: data (the folder itself)
        data_dir, key = (data.get("data_dir"), "data.data_dir") if isinstance(data, Mapping) else (data, "data")
        if data_dir is not None and not Path(data_dir).is_dir() and not _inside(Path(data_dir), generated):
            raise DataError(f"no such evaluation data folder (eval.{name}.{key})", file=str(data_dir))
    check_eval_inputs(cfg.eval)
    for s in stages:
        check_init_from(cfg.stages[s].get("init_from"), f"stages.{s}.init_from")
    for s in stages:  # the first records of every source: a malformed one is named before anything starts
        check_first_records(datamodules[s], s)
    for s in stages:  # stage 2's needs are checked before stage 1 trains, not when stage 2 builds its data
        loss = build_loss(cfg.loss.terms, s)
        check_group_sizes(datamodules[s], s, n_negatives=int(cfg.stages[s].n_negatives),
                          min_group_size=loss.min_group_size)
        check_stage_needs(datamodules[s], s, n_negatives=int(cfg.stages[s].n_negatives),
                          require_teacher=loss.requires_teacher)
    return RunPlan(stages, plans, datamodules, prompts, sample)


def sample_data_needed(cfg, generated) -> list[Path]:
    """``[paths.sample_dir]`` when something besides the data reads the generated sample data (the tiny model's
    tokenizer is trained on it; ``eval=sample`` is its held-out split), no source of the run generates it and it
    is not there yet; else ``[]``. The folder must be safe to generate into."""
    from me5.data.synthetic import check_sample_folder

    sample = Path(str(cfg.paths.sample_dir))
    readers = [str((cfg.model.get("tokenizer") or {}).get("data_dir", ""))]
    for ev in (cfg.eval or {}).values():
        data = ev.get("data")
        readers.append(str(data.get("data_dir") if isinstance(data, Mapping) else data))
    needed = any(r and _inside(Path(r), [sample]) for r in readers if r not in ("", "None"))
    if not needed or _inside(sample, generated) or (sample / "pretrain.jsonl").is_file():
        return []
    check_sample_folder(sample)
    return [sample]


FIRST_RECORDS = 256  # records of every source read (strictly) before the run starts


def check_first_records(datamodule, stage: str, *, n: int = FIRST_RECORDS) -> dict[str, dict[str, int]]:
    """Read and classify the first ``n`` records of every local source of ``stage`` as training will (strict
    sources raise the :class:`DataError` naming file:line and field): a malformed record there stops the run
    before any logger, W&B run or training. Returns ``{source: counts}`` (empty for a hub id or data a source
    generates when the run starts)."""
    from collections import Counter

    from me5.data.readers import iter_records, resolve_files

    out: dict[str, dict[str, int]] = {}
    for name, src in datamodule.sources().items():
        if src.generates() or resolve_files(src.path, src.data_files) is None:
            continue
        classify = src.classifier()
        counts: Counter = Counter()
        for file, line, record in iter_records(src.path, data_files=src.data_files, name=src.hub_config,
                                               split=src.split, errors="raise" if classify.strict else "yield"):
            classify(record, file, line, counts)
            if counts["read"] >= n:
                break
        out[name] = dict(counts)
    return out


def check_group_sizes(datamodule, stage: str, *, n_negatives: int, min_group_size: int) -> dict[str, int]:
    """One group size per batch (:meth:`~me5.data.PairDataModule.check_group_sizes`) and every source's group
    (1 + its hard negatives) at least what the loss needs (distillation: 2). Returns the negatives per source."""
    per = datamodule.check_group_sizes(n_negatives, where=f"stages.{stage}.n_negatives")
    for name, k in per.items():
        if 1 + k < min_group_size:
            own = datamodule.sources()[name].n_negatives is not None
            raise ConfigError(f"data.{stage}.sources.{name}.n_negatives" if own else f"stages.{stage}.n_negatives",
                              f"{k} hard negatives: the loss of stage {stage} needs groups of at least "
                              f"{min_group_size} passages (the kd term distils over the positive and its negatives)")
    return per


def check_stage_needs(datamodule, stage: str, *, n_negatives: int, require_teacher: bool, sample: int = 64) -> None:
    """Every source of the stage must carry what the loss needs: its hard negatives (the source's own
    ``n_negatives``, else the stage's) and, for distillation, teacher scores. A source whose first ``sample``
    records all lack them is an error naming the source, what it lacks and the command that makes it
    (``me5.mine``, ``me5.score``)."""
    per = datamodule.negatives_per_source(n_negatives)
    for name, src in datamodule.sources().items():
        n_neg = per[name]
        if not (n_neg or require_teacher):
            continue
        got = src.shortfall(n_negatives=n_neg, require_teacher=require_teacher, sample=sample)
        if not got or got["read"] == 0 or got["kept"] > 0:
            continue
        lacks, make = [], []
        if got["too_few_negatives"]:
            field = f"data.{stage}.sources.{name}.n_negatives" if src.n_negatives is not None else \
                f"stages.{stage}.n_negatives"
            n_negatives = n_neg
            lacks.append(f"{n_neg} hard negatives ({field})")
            make.append(f"python -m me5.mine {_mine_input(src)} --model <stage-1 export> --n {n_negatives} "
                        f"--out <mined>")
        if require_teacher:  # mined shards carry no teacher scores either: scoring comes after mining
            lacks.append("teacher scores (the kd loss term)")
            make.append(f"python -m me5.score --data {'<mined>' if make else src.path} --out <scored>")
        raise DataError(f"source '{name}' of stage {stage} has none of its first {got['read']} records with "
                        f"{' and '.join(lacks)}; make them first: {' ; '.join(make)} and point data.{stage} "
                        f"at the result (or lower stages.{stage}.n_negatives / drop the kd term)",
                        file=str(src.path))


def check_eval_inputs(eval_cfg) -> None:
    """What the evaluation needs besides its folders (:func:`~me5.app.pipeline.check_run` checks those): each
    retrieval language's folder, and the ``mteb`` package, task names and (offline) every task's dataset in the
    local cache for an MTEB evaluator."""
    for name, node in (eval_cfg or {}).items():
        target = str(node.get("_target_", ""))
        data = node.get("data")
        if node.get("languages") and isinstance(data, Mapping) and data.get("data_dir") is not None:
            root = Path(str(data.data_dir))
            missing = [lang for lang in node.languages if not (root / lang).is_dir()]
            if missing:
                raise DataError(f"eval.{name}: no folder for {len(missing)} of {len(node.languages)} languages "
                                f"({', '.join(missing)}); `python -m me5.app.convert_miracl --help` writes them",
                                file=str(root / missing[0]))
        if target.endswith("MtebEvaluator"):
            if importlib.util.find_spec("mteb") is None:
                raise ConfigError(f"eval.{name}", "the mteb package is not installed (pip install mteb)")
            from me5.eval.mteb import resolve_tasks
            from me5.eval.paper import PAPER_MTEB_EN

            tasks = node.get("tasks", "paper")
            names = list(PAPER_MTEB_EN) if tasks == "paper" else [tasks] if isinstance(tasks, str) else list(tasks)
            resolved = resolve_tasks(names)
            if node.get("offline", True):  # every dataset in the local cache (milliseconds; nothing is loaded)
                from me5.eval.mteb import missing_data

                cache_dir = node.get("cache_dir")
                missing = missing_data(resolved, cache_dir=cache_dir)
                if missing:
                    shown = "; ".join(missing[:3]) + (f"; ... ({len(missing) - 3} more)" if len(missing) > 3 else "")
                    which = "list(PAPER_MTEB_EN)" if tasks == "paper" else repr(names)
                    where = "" if cache_dir is None else f", cache_dir={str(cache_dir)!r}"
                    fetch = (f"python -c \"from me5.eval.paper import PAPER_MTEB_EN; from me5.eval.mteb import "
                             f"download; download({which}{where})\"")
                    raise DataError(
                        f"eval.{name}: {len(missing)} MTEB dataset(s) are not in the local cache ({shown}); fetch "
                        f"them once with network access: {fetch}, or set eval.{name}.offline=false",
                        file=str(cache_dir) if cache_dir is not None else None)


def _mine_input(src) -> str:
    """The ``me5.mine`` arguments that read ``src`` as training does: ``--data`` for files in the normalised schema,
    ``--source <class> --raw <path>`` for a source class reading its raw layout."""
    from me5.data.source import Source

    if type(src) is Source or src.reads_prepared():
        return f"--data {src.path}"
    return f"--source {type(src).__module__}.{type(src).__qualname__} --raw {src.path}"


def _inside(path: Path, roots) -> bool:
    path = path.resolve()
    return any(path == r.resolve() or r.resolve() in path.parents for r in roots)


def check_init_from(init_from, field: str) -> None:
    if init_from is None:
        return
    path = Path(str(init_from))
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ConfigError(field, f"'{path}' has no config.json: not an exported model folder (a stage's "
                                     "export is <run dir>/export/<stage>, written when the stage finished)")
        return
    if path.suffix == ".ckpt":
        if not path.is_file():
            raise ConfigError(field, f"no such checkpoint: {path}")
        return
    raise ConfigError(field, f"'{path}' is neither an exported model folder nor a .ckpt file")


def encoder_settings(encoder_factory) -> dict:
    """Every field of the ``model.encoder`` node that :meth:`Encoder.from_pretrained` (the loader of an export
    folder) accepts: pooling, normalisation, ``include_prompt``, autocast, attention, checkpointing and any field
    added to the loader later; not the backbone's shape (``from_scratch``'s ``num_hidden_layers``, ...) nor
    ``name_or_path`` / ``tokenizer``, which the folder gives."""
    import inspect

    from me5.models.encoder import Encoder

    accepted = {name for name, prm in inspect.signature(Encoder.from_pretrained).parameters.items()
                if prm.kind in (prm.KEYWORD_ONLY, prm.POSITIONAL_OR_KEYWORD)} - {"self", "cls", "name_or_path",
                                                                                 "tokenizer"}
    return {k: v for k, v in encoder_factory.items() if k in accepted}


def build_encoder(encoder_factory, tokenizer, *, init_from: str | None = None, previous=None):
    """The stage's encoder: the previous stage's (same job), ``init_from`` (HF folder or .ckpt), or the config's.

    From an export folder the weights are the folder's and every ``model.encoder`` setting the folder loader
    accepts is the config's (:func:`encoder_settings`): a stage started from an export pools, normalises and
    runs exactly as one built from the config."""
    from me5.models.encoder import Encoder

    if init_from is None and previous is not None:
        return previous
    if init_from is not None:
        path = Path(str(init_from))
        if path.is_dir():
            return Encoder.from_pretrained(str(path), tokenizer=tokenizer, **encoder_settings(encoder_factory))
        encoder = build(encoder_factory)(tokenizer=tokenizer)
        state = torch.load(path, map_location="cpu", weights_only=False)["state_dict"]
        encoder.load_state_dict({k[len("encoder."):]: v for k, v in state.items() if k.startswith("encoder.")})
        return encoder
    return build(encoder_factory)(tokenizer=tokenizer)


def build_loss(terms_cfg: Mapping, stage: str):
    """The stage's :class:`~me5.losses.WeightedLoss`: every term with a positive weight for ``stage``."""
    from me5.losses import WeightedLoss

    terms, weights = {}, {}
    for name, tcfg in terms_cfg.items():
        w = float((tcfg.get("weight") or {}).get(stage, 0.0))
        if w > 0:
            terms[name] = build(tcfg.term)
            weights[name] = w
    return WeightedLoss(terms, weights)


def build_callbacks(callbacks_cfg, **runtime) -> list:
    """The ``callbacks`` group's callbacks; a field left ``???`` in the config is bound from ``runtime``
    (``dirpath``, ``run_config``, ``meta``: they exist only once the run does)."""
    out = []
    for name, node in (callbacks_cfg or {}).items():
        if node is None:
            continue
        kwargs = {}
        for key in node:
            if OmegaConf.is_missing(node, key):
                if key not in runtime:
                    raise ConfigError(f"callbacks.{name}.{key}", f"must be set (the app binds only {sorted(runtime)})")
                kwargs[key] = runtime[key]
        # not recursive: the bound run config holds _target_ nodes that must stay data
        out.append(build(node, _recursive_=False, **kwargs))
    return out


RANK0_WAIT_S = 48 * 3600  # how long the other ranks wait for rank 0's evaluators (MTEB's 56 tasks: hours)


def evaluate_all(evaluators: Mapping, encoder, tokenizer, *, wait_s: float = RANK0_WAIT_S) -> dict[str, float]:
    """Run every evaluator on the encoder's device; merged flat metrics, the same on every rank.

    In a distributed job an evaluator runs on every rank unless its ``shares_ranks`` is false: a retrieval corpus
    encoded under ``work_dir`` (each rank reads, encodes and searches its part) runs everywhere; MTEB, bitext
    mining and a retrieval corpus in memory run on rank 0 alone (:func:`on_rank0`), and the others receive their
    metrics. An evaluator without the attribute runs on every rank (it may use collectives, as before). An
    FSDP-sharded encoder runs collectives in its forward, so then every evaluator runs on every rank.
    """
    from me5.distributed import world_info
    from me5.embed.encode import is_fsdp_sharded

    device = next(encoder.parameters()).device
    _, world = world_info()
    everyone = world == 1 or is_fsdp_sharded(encoder)
    shared = [k for k, ev in evaluators.items() if everyone or getattr(ev, "shares_ranks", True)]
    alone = [k for k in evaluators if k not in shared]
    by_name = {k: evaluators[k].evaluate(encoder, tokenizer, device=device, show_progress=True) for k in shared}
    if alone:
        by_name.update(on_rank0(lambda: {k: evaluators[k].evaluate(encoder, tokenizer, device=device,
                                                                   show_progress=True) for k in alone},
                                wait_s=wait_s))
    out: dict[str, float] = {}
    for k in evaluators:  # the config's order
        out.update(by_name[k])
    return out


def on_rank0(fn, *, wait_s: float = RANK0_WAIT_S):
    """``fn()`` on rank 0 of the default process group, its result on every rank (``fn()`` alone in one process).

    The other ranks wait in a broadcast on a gloo group made for this call, whose timeout is ``wait_s``: not in
    a collective of the training group, whose timeout (Lightning's 30 min) an hours-long MTEB pass would exceed,
    nor in the next stage's first collective. An error on rank 0 reaches the others as a ``RuntimeError`` (after
    rank 0's own), so no rank is left waiting for a result that will not come.
    """
    from datetime import timedelta

    import torch.distributed as dist

    from me5.distributed import world_info

    rank, world = world_info()
    if world == 1:
        return fn()
    group = dist.new_group(backend="gloo", timeout=timedelta(seconds=wait_s))
    try:
        box: list = [None]
        error = None
        if rank == 0:
            try:
                box = [(True, fn())]
            except Exception as err:  # sent to the others, then raised here
                error, box = err, [(False, f"{type(err).__name__}: {err}")]
        dist.broadcast_object_list(box, src=0, group=group)
        if error is not None:
            raise error
        ok, value = box[0]
        if not ok:
            raise RuntimeError(f"rank 0's evaluation failed: {value}")
        return value
    finally:
        dist.destroy_process_group(group)


def finish_loggers(loggers) -> None:
    """Flush every logger; close W&B runs so the next stage starts its own run."""
    for lg in loggers:
        lg.finalize("success")
        if type(lg).__name__ == "WandbLogger":
            import wandb

            if wandb.run is not None:
                wandb.finish()


def write_results(out_dir: Path, results: Mapping, *, meta: Mapping, timings: Mapping, data_counts: Mapping,
                  show: bool = True) -> Path:
    """Write ``metrics.json`` and ``results.md`` (atomically: a kill mid-write leaves the previous ones) and, with
    ``show``, print the results table."""
    from me5.eval.retrieval import format_table

    table = format_table(dict(results)) if results else "(no evaluation configured)"
    payload = {"results": results, "timings_s": timings, "data_counts": data_counts, "meta": meta}
    path = Path(out_dir) / "metrics.json"
    for target, text in ((path, json.dumps(payload, indent=2, ensure_ascii=False, default=str)),
                         (Path(out_dir) / "results.md", table + "\n")):
        tmp = target.with_suffix(target.suffix + ".tmp")
        tmp.write_text(text)
        os.replace(tmp, target)
    if show:
        print("\n" + table + f"\n\nmetrics: {path}\n")
    return path
