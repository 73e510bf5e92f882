"""The dry run of the Hydra app: ``python -m me5.train [overrides] dry_run=true``.

Every pre-flight check of a real run (:func:`me5.app.pipeline.check_run`: fields, schedules, batch plans on the
trainer's world size, data paths, the first records of every source read as training reads them, the stage-2
needs, the evaluation inputs), then the plan: stages, steps, per-device batch and gradient-cache chunking, each
source with its size on disk, weight and probability, the evaluation suite and the compute estimate. Exit status
0, or 2 with the first failed check (the message names the field, file and line). Nothing is started or written:
no run folder (not even Hydra's ``.hydra/`` and log: the command line's ``dry_run=true`` is read before Hydra
runs, and the config is composed with Hydra's compose API), no logger, no W&B run, no sample data, no tokenizer.

With ``-m`` each job of the sweep is checked and planned in turn (the launcher is not called; the slurm
launcher's fields are resolved, so ``trainer.devices=auto`` under ``hydra/launcher=slurm`` is named). On a
machine without the configured accelerator (a login node) the world size comes from ``trainer.devices`` x
``trainer.num_nodes``; ``devices: auto`` is then planned for :data:`ASSUMED_DEVICES_PER_NODE` per node, which the
output says.
"""

from __future__ import annotations

import copy
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

from omegaconf import DictConfig, OmegaConf, open_dict, read_write

from me5.errors import Me5Error

ASSUMED_DEVICES_PER_NODE = 8  # the paper recipes' node (experiments/README.md) when devices=auto sees no GPU
TRUE = ("true", "True", "1", "yes")

# The compute model of experiments/README.md [D]: 6 x non-embedding parameters x tokens per example (forward and
# backward); gradient caching adds one forward pass (x 4/3); time at 40% MFU of the H200's measured bf16 peak.
PEAK_FLOPS, MFU = 790e12, 0.40
# backbones the model configs name, for the estimate without a download: (layers, hidden, intermediate)
KNOWN_BACKBONES = {
    "FacebookAI/xlm-roberta-base": (12, 768, 3072),
    "xlm-roberta-base": (12, 768, 3072),
    "FacebookAI/xlm-roberta-large": (24, 1024, 4096),
    "xlm-roberta-large": (24, 1024, 4096),
    "microsoft/Multilingual-MiniLM-L12-H384": (12, 384, 1536),
}


# ============================================================================================== the command line
def requested(argv: Sequence[str]) -> bool:
    """Whether the command line sets ``dry_run`` true (``dry_run=true``, ``+dry_run=true``, ``++dry_run=true``)."""
    for arg in argv:
        key, sep, value = arg.partition("=")
        if sep and key.lstrip("+") == "dry_run" and value.strip() in TRUE:
            return True
    return False


def main(argv: Sequence[str]) -> int:
    """Check and plan every job of the command line; 0 when all pass, else 2 (each failure printed to stderr)."""
    from hydra._internal.utils import get_args_parser

    args = get_args_parser().parse_args(list(argv))
    status = 0
    jobs = sweep_jobs(args.overrides) if args.multirun else [list(args.overrides)]
    for num, overrides in enumerate(jobs):
        if len(jobs) > 1:
            print(f"\n=== job {num} of {len(jobs)}: {' '.join(overrides)}", flush=True)
        try:
            cfg = compose(overrides, multirun=bool(args.multirun), job_num=num)
            try:
                print(plan_text(cfg, launcher=launcher_name() if args.multirun else None), flush=True)
            finally:
                _forget_hydra_config()
        except Me5Error as err:
            print(f"error: {err}", file=sys.stderr, flush=True)
            status = 2
        except Exception as err:  # a bad override (Hydra's own message), an unknown group option
            from hydra.errors import HydraException
            from omegaconf.errors import OmegaConfBaseException

            if not isinstance(err, HydraException | OmegaConfBaseException):
                raise
            print(f"error: {type(err).__name__}: {err}", file=sys.stderr, flush=True)
            status = 2
    return status


def sweep_jobs(overrides: Sequence[str]) -> list[list[str]]:
    """The jobs of ``-m overrides`` as Hydra's basic sweeper makes them (the cartesian product of the lists)."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides(list(overrides))
    return [job for batch in BasicSweeper.split_arguments(parsed, None) for job in batch]


def compose(overrides: Sequence[str], *, multirun: bool = False, job_num: int = 0) -> DictConfig:
    """The app's config for ``overrides`` as ``@hydra.main`` would give it, without creating the run folder:
    ``paths.output_dir`` (``${hydra:runtime.output_dir}``) is the folder the run would get."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    import me5.app.resolvers  # noqa: F401 -- the slurm launcher's ${me5.slurm_count:...}
    from me5.app.train import CONF_DIR

    with initialize_config_dir(version_base="1.3", config_dir=CONF_DIR, job_name="train"):
        cfg = hydra_compose("config", overrides=list(overrides), return_hydra_config=True)
    with read_write(cfg.hydra), open_dict(cfg.hydra):
        cfg.hydra.mode = RunMode.MULTIRUN if multirun else RunMode.RUN
        cfg.hydra.job.num = job_num
        out = (f"{cfg.hydra.sweep.dir}/{cfg.hydra.sweep.subdir}" if multirun else str(cfg.hydra.run.dir))
        cfg.hydra.runtime.output_dir = os.path.abspath(out)
    if multirun:  # the launcher's fields resolve (slurm: the device and node counts it must be given)
        OmegaConf.to_container(cfg.hydra.launcher, resolve=True)
    HydraConfig.instance().set_config(cfg)
    task = copy.deepcopy(cfg)
    with read_write(task), open_dict(task):
        del task["hydra"]
    return task


def launcher_name() -> str:
    """The class name of the configured Hydra launcher (of the last :func:`compose`)."""
    from hydra.core.hydra_config import HydraConfig

    return str(HydraConfig.get().launcher.get("_target_", "")).rsplit(".", 1)[-1]


def _forget_hydra_config() -> None:
    """Leave no Hydra run state behind (a later run in this process must not think it is inside a sweep)."""
    from hydra.core.hydra_config import HydraConfig

    HydraConfig.instance().cfg = None


# ============================================================================================== the plan
def planned_world_size(trainer_cfg) -> tuple[int, str | None]:
    """The world size of the configured Trainer, and a note when it is planned rather than measured (the
    accelerator is not on this machine)."""
    import torch

    from me5.app.pipeline import trainer_world_size

    accelerator = str(trainer_cfg.get("accelerator", "cpu"))
    if accelerator in ("gpu", "cuda") and not torch.cuda.is_available():
        nodes = int(trainer_cfg.get("num_nodes", 1))
        devices = trainer_cfg.get("devices", 1)
        if isinstance(devices, int) and devices > 0:
            return devices * nodes, (f"no GPU here: planned for trainer.devices={devices} x "
                                     f"trainer.num_nodes={nodes}")
        if isinstance(devices, Sequence) and not isinstance(devices, str):
            return len(devices) * nodes, f"no GPU here: planned for the {len(devices)} listed devices x {nodes} nodes"
        return ASSUMED_DEVICES_PER_NODE * nodes, (
            f"trainer.devices={devices} and no GPU here: planned for {ASSUMED_DEVICES_PER_NODE} per node x "
            f"trainer.num_nodes={nodes}; trainer.devices=N plans for N")
    import logging

    quiet = [logging.getLogger(n) for n in ("lightning.pytorch", "lightning.fabric", "lightning")]
    levels = [lg.level for lg in quiet]
    for lg in quiet:  # "GPU available: False ..." is the Trainer's, not the plan's
        lg.setLevel(logging.WARNING)
    try:
        return trainer_world_size(trainer_cfg), None
    finally:
        for lg, level in zip(quiet, levels, strict=True):
            lg.setLevel(level)


def plan_text(cfg: DictConfig, *, launcher: str | None = None) -> str:
    """Run every check of :func:`~me5.app.pipeline.check_run` and return the plan as text; a failed check raises
    its :class:`~me5.errors.Me5Error`."""
    from me5.app.pipeline import check_run

    world, note = planned_world_size(cfg.trainer)
    plan = check_run(cfg, world_size=world)
    return describe(cfg, plan, world_note=note, launcher=launcher)


def describe(cfg: DictConfig, plan, *, world_note: str | None = None, launcher: str | None = None) -> str:
    """The plan of a checked run (:class:`~me5.app.pipeline.RunPlan`) as text."""
    from me5.app.pipeline import evaluated_stages

    lines: list[str] = []
    add = lines.append
    choices = _choices()
    add("me5 dry run: every check passed; nothing was started or written")
    add(f"run folder   {cfg.paths.output_dir}  (not created)")
    if choices:
        add("config       " + "  ".join(f"{k}={v}" for k, v in choices.items()))
    if launcher:
        add(f"launcher     {launcher} (not called)")
    world = plan.stages[0].plan.world_size
    add(f"devices      {world}" + (f"  ({world_note})" if world_note else ""))
    add(f"model        {_model_name(cfg.model.encoder)}; prompts {cfg.prompts.style}; "
        f"loss temperature {cfg.loss.temperature}")
    add(f"stages       {' -> '.join(plan.names)}")
    est = _estimator(cfg.model.encoder)
    total_h = 0.0
    for stage in plan.stages:
        name, scfg, bp, dm, loss = stage.name, stage.spec, stage.plan, stage.datamodule, stage.loss
        per = dm.negatives_per_source(int(scfg.n_negatives))
        add("")
        add(f"stage {name}: {int(scfg.max_steps):,} steps, warm-up {int(scfg.warmup_steps):,}, peak LR {scfg.lr:g}"
            + (f", from {scfg.init_from}" if scfg.init_from else ""))
        chunk = (f"chunks of {bp.chunk_tokens:,} padded tokens" if bp.chunk_tokens else
                 f"chunks of {bp.chunk_rows:,} rows" if bp.chunk_rows else "off (one plain backward)")
        add(f"  batch      global {bp.global_batch_size:,} = {bp.world_size} x {bp.per_device_batch_size:,} per device;"
            f" gradient cache: {chunk}")
        negs = sorted(set(per.values()))
        add(f"  texts      query <= {scfg.query_max_length} tokens, passage <= {scfg.passage_max_length}; hard "
            f"negatives {negs[0] if len(negs) == 1 else per}; pairs seen "
            f"{int(scfg.max_steps) * bp.global_batch_size:,}")
        add("  loss       " + ", ".join(f"{t} x {w:g}" for t, w in loss.weights.items())
            + (" (teacher scores needed)" if loss.requires_teacher else ""))
        add(f"  sources    {len(dm.sources())}; p(source) = weight ** {dm.temperature_alpha:g} normalised"
            + ("; one source per global batch" if dm.homogeneous else "; mixed within a batch")
            + ("; streamed" if dm.streaming else ""))
        lines += _source_table(dm, per, require_teacher=loss.requires_teacher)
        flops, hours = est(stage_tokens(scfg, bp, per), chunked=bool(bp.chunk_tokens or bp.chunk_rows))
        if flops:
            total_h += hours
            add(f"  compute    {flops:.1e} FLOPs = {_hours(hours)} GPU time at {MFU:.0%} MFU of "
                f"{PEAK_FLOPS / 1e12:.0f} TFLOP/s (H200 bf16), {_hours(hours / world)} on {world} device"
                f"{'s' if world > 1 else ''} (an upper bound: every text at its token limit)")
    add("")
    evaluated = evaluated_stages(cfg.get("eval_stages", "all"), plan.names)
    when = ("the untrained encoder, then " if cfg.eval_baseline else "") + f"after {', '.join(evaluated) or 'no stage'}"
    if cfg.eval_after == "job":
        when = f"its own job per stage (evaluate_<stage>.sh) {when}"
    if not cfg.eval:
        add("evaluation   none")
    else:
        add(f"evaluation   {when}:")
        for name, node in cfg.eval.items():
            add(f"  {name:<17}{_eval_line(node)}")
    if len(plan.stages) > 1 and total_h:
        add(f"compute      {_hours(total_h)} GPU time in all, {_hours(total_h / world)} on {world} device"
            f"{'s' if world > 1 else ''}")
    return "\n".join(lines)


def stage_tokens(scfg, bp, per: Mapping[str, int]) -> float:
    """Tokens of the stage (upper bound): steps x global batch x (query + (1 + negatives) x passage) at the
    token limits; sources with their own negative counts at the largest."""
    n = max(per.values()) if per else int(scfg.n_negatives)
    per_example = int(scfg.query_max_length) + (1 + n) * int(scfg.passage_max_length)
    return float(int(scfg.max_steps) * bp.global_batch_size * per_example)


def _estimator(encoder_cfg):
    params = non_embedding_parameters(encoder_cfg)

    def estimate(tokens: float, *, chunked: bool) -> tuple[float, float]:
        if params is None:
            return 0.0, 0.0
        flops = 6.0 * params * tokens * (4.0 / 3.0 if chunked else 1.0)
        return flops, flops / (PEAK_FLOPS * MFU) / 3600.0

    return estimate


def non_embedding_parameters(encoder_cfg) -> float | None:
    """Transformer-layer parameters of the configured backbone (attention, FFN, biases, layer norms): from the
    config of a from-scratch model, a local folder's ``config.json``, or :data:`KNOWN_BACKBONES`."""
    shape = None
    if "num_hidden_layers" in encoder_cfg and "hidden_size" in encoder_cfg:
        h = int(encoder_cfg.hidden_size)
        shape = (int(encoder_cfg.num_hidden_layers), h, int(encoder_cfg.get("intermediate_size", 4 * h)))
    name = encoder_cfg.get("name_or_path")
    if shape is None and name is not None:
        cfg_file = Path(str(name)) / "config.json"
        if cfg_file.is_file():
            import json

            c = json.loads(cfg_file.read_text())
            shape = (c["num_hidden_layers"], c["hidden_size"], c.get("intermediate_size", 4 * c["hidden_size"]))
        else:
            shape = KNOWN_BACKBONES.get(str(name))
    if shape is None:
        return None
    layers, h, inter = shape
    return float(layers * (4 * h * h + 2 * h * inter + 9 * h + inter))


def _model_name(encoder_cfg) -> str:
    params = non_embedding_parameters(encoder_cfg)
    what = encoder_cfg.get("name_or_path") or (
        f"{encoder_cfg.get('model_type', '?')} from scratch ({encoder_cfg.get('num_hidden_layers')} layers, "
        f"hidden {encoder_cfg.get('hidden_size')})")
    return f"{what}, {params / 1e6:,.1f}M non-embedding parameters" if params else str(what)


def _choices() -> dict[str, str]:
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return {}
    choices = HydraConfig.get().runtime.choices
    keys = ("experiment", "model", "data", "stage", "loss", "prompts", "trainer", "eval", "logger")
    return {k: str(choices[k]) for k in keys if k in choices and choices[k] is not None}


def _source_table(dm, per: Mapping[str, int], *, require_teacher: bool = False) -> list[str]:
    """One row per source; with a stage need (hard negatives, teacher scores) the usable share of its first
    records: a source with fewer negatives than it takes is counted here, before the run."""
    needs = require_teacher or any(per.values())
    rows = [("source", "class", "weight", "p", "negatives", *(("first records",) if needs else ()), "on disk")]
    probs = _probabilities(dm)
    weights = dm._weights  # noqa: SLF001 -- the weights as given (None: by size)
    for name, src in dm.sources().items():
        w = "size" if weights is None else f"{weights[name]:g}"
        usable = ()
        if needs:
            got = src.shortfall(n_negatives=per[name], require_teacher=require_teacher)
            usable = (f"{got['kept']}/{got['read']} usable" + (f", {got['too_few_negatives']} too few negatives"
                                                                 if got["too_few_negatives"] else "")
                      if got else "-",)
        rows.append((name, type(src).__name__, w, f"{probs[name]:.3f}" if name in probs else "by size",
                     str(per[name]), *usable, _size(src)))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    left = {0, 1, len(rows[0]) - 1} | ({5} if needs else set())
    return ["    " + "  ".join(c.ljust(widths[i]) if i in left else c.rjust(widths[i])
                               for i, c in enumerate(r)).rstrip() for r in rows]


def _probabilities(dm) -> dict[str, float]:
    if dm._weights is None and len(dm.sources()) > 1:  # noqa: SLF001 -- by size: known after setup only
        return {}
    return dm.probabilities()


def _size(src) -> str:
    """What is on disk for ``src``: files, bytes and rows when the files say (parquet footers, shard manifests)."""
    from me5.data.readers import list_units, resolve_files

    if src.generates():
        return "generated when the run starts"
    files = resolve_files(src.path, src.data_files)
    if files is None:
        return f"hub dataset {src.path} (size unknown offline)"
    size = sum(f.stat().st_size for f in files)
    text = f"{len(files):,} file{'s' if len(files) != 1 else ''}, {_bytes(size)}"
    units = list_units(files)
    if units and all(u.rows is not None for u in units):
        rows = sum(u.rows for u in units)
        text += f", {rows:,} row{'s' if rows != 1 else ''}"
    return text + f"  ({src.path})"


def _hours(h: float) -> str:
    return "< 1 min" if h < 1 / 60 else f"~{h * 60:.0f} min" if h < 1 else f"~{h:,.1f} h"


def _bytes(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1024 or unit == "TB":
            return f"{n:,.0f} {unit}" if unit == "B" else f"{n:,.1f} {unit}"
        n /= 1024
    return str(n)


def _eval_line(node) -> str:
    target = str(node.get("_target_", "")).rsplit(".", 1)[-1]
    data = node.get("data")
    where = data.get("data_dir") if isinstance(data, Mapping) else data
    parts = [target]
    if node.get("languages"):
        parts.append(f"{len(node.languages)} languages")
    if node.get("task") and target == "BitextEvaluator":
        parts.append(str(node.task) + (f" ({node.direction})" if node.get("direction") else ""))
    if target == "MtebEvaluator":
        tasks = node.get("tasks")
        parts.append("the paper's 56 MTEB English tasks" if tasks == "paper" else f"tasks {tasks}")
        parts.append("datasets from the local Hugging Face cache"
                     + (", loaded when the run starts" if node.get("check_data") else ""))
    if where is not None:
        parts.append(str(where))
    return ", ".join(parts)


if __name__ == "__main__":  # pragma: no cover - python -m me5.train dry_run=true is the command
    sys.exit(main(sys.argv[1:]))
