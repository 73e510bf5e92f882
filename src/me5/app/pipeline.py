"""The pieces the Hydra app composes: config checks, the batch plans, building, evaluation, results.

Kept apart from ``train.py`` so that the app stays a thin sequence of calls. :func:`check_run` runs every
check that needs no data and no model (fields, schedules, world size, data paths, evaluation folders) and
returns what the run needs to start; nothing heavy (data generation, tokenizer training, evaluation, a W&B
run) happens before it has passed.
"""

from __future__ import annotations

import importlib.util
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from me5.errors import ConfigError, DataError, Me5Error
from me5.training.run import STAGES, StageRun, StageSpec

log = logging.getLogger(__name__)


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


def stage_spec(cfg, stage: str) -> StageSpec:
    """``stages.<stage>`` built (:class:`~me5.training.run.StageSpec` checks its fields, naming them)."""
    node = cfg.stages[stage]
    if str(node.get("name")) != stage:
        raise ConfigError(f"stages.{stage}.name", f"is '{node.get('name')}': a stage's node holds its own name")
    sched = node.module.get("scheduler")
    if sched is not None and "total_steps" in sched:
        raise ConfigError(f"stages.{stage}.module.scheduler.total_steps",
                          f"the schedule spans the stage: set stages.{stage}.max_steps")
    return build(node)


def validate_config(cfg) -> dict[str, StageSpec]:
    """Reject unknown or contradictory settings before anything is built; each error names its field. Returns the
    selected stages' specs in pipeline order."""
    unknown = [s for s in (cfg.get("stages") or {}) if s not in STAGES]
    if unknown:
        raise ConfigError(f"stages.{unknown[0]}", f"unknown stage; stages are {list(STAGES)}")
    stages = stage_order(selected_stages(cfg))
    if not stages:
        raise ConfigError("stage", "no stage selected (e.g. stage=[pretrain,finetune])")
    for key in cfg:  # a top-level ??? (e.g. an experiment's start_from) must be given on the command line
        if OmegaConf.is_missing(cfg, key):
            raise ConfigError(str(key), f"must be given (e.g. {key}=<run dir>/export/pretrain): see the experiment")
    build(cfg.prompts)  # an unknown prompt style names prompts.style
    evaluated_stages(cfg.get("eval_stages", "all"), stages)
    if cfg.get("eval_after", "shared") not in EVAL_AFTER:
        raise ConfigError("eval_after", f"unknown '{cfg.eval_after}'; choose one of {list(EVAL_AFTER)}")
    if float(cfg.loss.temperature) <= 0:
        raise ConfigError("loss.temperature", f"must be > 0, got {cfg.loss.temperature}")
    specs = {}
    for s in stages:
        if s not in (cfg.data or {}):
            raise ConfigError(f"data.{s}", f"the data config '{cfg.data.get('name')}' has no data for stage {s}")
        for key in [k for k in cfg.data[s] if not str(k).startswith("_")]:
            if OmegaConf.is_missing(cfg.data[s], key):
                raise ConfigError(f"data.{s}.{key}", f"must be given for stage {s} (e.g. data.{s}.{key}=/my/pairs.jsonl)")
        specs[s] = stage_spec(cfg, s)
        build_loss(cfg, specs[s])  # every weighted term exists and builds
    return specs


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


def trainer_world_size(trainer_cfg) -> int:
    """The number of processes the configured Trainer will run (devices x nodes), without starting any."""
    trainer = build(trainer_cfg, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                    enable_model_summary=False)
    return int(trainer.world_size)


@dataclass
class RunPlan:
    """What :func:`check_run` hands the app: the stages (each checked and built: spec, batch plan, DataModule,
    loss) and the prompt policy."""

    stages: list[StageRun]
    prompts: object
    # the sample data folder when the tiny model's tokenizer or the sample evaluation reads it and no source of
    # the run generates it (data=files with model=tiny): the app generates it before anything else
    generate_sample: list[Path] = field(default_factory=list)

    @property
    def names(self) -> list[str]:
        return [s.name for s in self.stages]


def check_run(cfg: DictConfig, *, world_size: int | None = None) -> RunPlan:
    """Every check that needs no model, in the order a user would fix them (see module docstring); the data is
    looked at only in its first records. ``world_size``: plan for it instead of building the configured Trainer
    (the dry run on a machine without the accelerator)."""
    specs = validate_config(cfg)
    prompts = build(cfg.prompts)
    world = world_size if world_size is not None else trainer_world_size(cfg.trainer)
    stages = [StageRun(spec, spec.batch_plan(world), build(cfg.data[s]), build_loss(cfg, spec))
              for s, spec in specs.items()]
    generated: list[Path] = []
    for st in stages:
        st.datamodule.check()
        generated += [Path(p) for src in st.datamodule.sources().values() for p in src.generates()]
    sample = sample_data_needed(cfg, generated)
    generated += sample
    for name, ev in (cfg.eval or {}).items():
        data = ev.get("data")
        # retrieval: data.data_dir (a load_beir node); bitext: data (the folder itself)
        data_dir, key = (data.get("data_dir"), "data.data_dir") if isinstance(data, Mapping) else (data, "data")
        if data_dir is not None and not Path(data_dir).is_dir() and not _inside(Path(data_dir), generated):
            raise DataError(f"no such evaluation data folder (eval.{name}.{key})", file=str(data_dir))
    check_eval_inputs(cfg.eval)
    for st in stages:
        check_init_from(st.spec.init_from, f"stages.{st.name}.init_from")
    for st in stages:  # the first records of every source: a malformed one is named before anything starts
        check_first_records(st.datamodule, st.name)
    for st in stages:  # stage 2's needs are checked before stage 1 trains, not when stage 2 builds its data
        check_group_sizes(st.datamodule, st.name, n_negatives=st.spec.n_negatives,
                          min_group_size=st.loss.min_group_size)
        check_stage_needs(st.datamodule, st.name, n_negatives=st.spec.n_negatives,
                          require_teacher=st.loss.requires_teacher)
    return RunPlan(stages, prompts, sample)


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


def build_loss(cfg, spec: StageSpec):
    """The stage's :class:`~me5.losses.WeightedLoss`: the loss group's terms, weighted by the stage's
    ``loss_weights`` (terms with weight 0 are left out)."""
    terms = {name: build(node) for name, node in (cfg.loss.get("terms") or {}).items()}
    return spec.weighted_loss(terms)


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


def finish_loggers(loggers) -> None:
    """Flush every logger; close W&B runs so the next stage starts its own run."""
    for lg in loggers:
        lg.finalize("success")
        if type(lg).__name__ == "WandbLogger":
            import wandb

            if wandb.run is not None:
                wandb.finish()
