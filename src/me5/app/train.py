"""The Hydra application: ``python -m me5.train [overrides]``.

Checks the whole configuration first (fields, schedules, batch plans on the trainer's world size, data paths, the
first records of every source, the stage-2 needs, evaluation inputs: :func:`me5.app.pipeline.check_run`;
``dry_run=true`` stops there and prints the plan, :mod:`me5.app.dry_run`), then runs the configured stages in
order (default: pre-training, then fine-tuning from its weights), evaluates the untrained encoder and the result
of each stage of ``eval_stages``, exports each stage's encoder, and writes ``metrics.json`` and a results table
into the run folder.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

import me5.app.resolvers  # noqa: F401 -- registers ${me5.slurm_count:...} / ${me5.slurm_gpus:...} of hydra/launcher=slurm
from me5.distributed import shutdown_process_group
from me5.errors import Me5Error

CONF_DIR = str(Path(__file__).resolve().parents[1] / "conf")
log = logging.getLogger("me5.train")


@hydra.main(config_path=CONF_DIR, config_name="config", version_base="1.3")
def _hydra_main(cfg: DictConfig) -> float | None:
    try:
        results = run(cfg)
    except Me5Error as err:
        # a bad config or bad data: the message names the field/file/line; no traceback, exit status 2
        log.error("%s", err)
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    # the sweep objective (e.g. for Optuna): the last stage's main score
    last = results.get("finetune") or results.get("pretrain") or {}
    return next((v for k, v in last.items() if k.endswith("ndcg@10") and k.count("/") == 1), None)


def main() -> None:
    """Console entry point; a bad config or bad data exits 2 with the message, no traceback. ``dry_run=true`` on
    the command line checks and plans the run without Hydra's run folder (:mod:`me5.app.dry_run`)."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from me5.app import dry_run

    if dry_run.requested(sys.argv[1:]):
        sys.exit(dry_run.main(sys.argv[1:]))
    try:
        _hydra_main()
    finally:  # multi-process runs: no gloo teardown abort at exit (see me5.distributed.shutdown_process_group)
        shutdown_process_group()


def run(cfg: DictConfig) -> dict[str, dict[str, float]]:
    """Check the run, then run every configured stage (:func:`me5.training.run.run_stages`); return
    ``{row: {metric: value}}`` (rows: untrained, pretrain, finetune)."""
    import lightning as L

    from me5.app.console import tidy_console
    from me5.app.pipeline import (
        build,
        build_callbacks,
        build_encoder,
        check_run,
        evaluated_stages,
        finish_loggers,
    )
    from me5.app.runinfo import flatten, git_info, parameter_counts
    from me5.training.record import RunRecord
    from me5.training.run import RunOptions, run_stages

    tidy_console()
    plan = check_run(cfg)  # every check before any heavy work: a failed one leaves only Hydra's files behind
    if cfg.get("dry_run"):  # set in a config file (the command line's dry_run=true never reaches Hydra: main)
        from me5.app.dry_run import describe

        print(describe(cfg, plan), flush=True)
        return {}
    out_dir = Path(cfg.paths.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for folder in plan.generate_sample:  # the tiny tokenizer / sample evaluation beside data of your own
        from me5.data.synthetic import generate_sample_data

        generate_sample_data(folder, seed=0)
    L.seed_everything(cfg.seed, workers=True)
    config = resolved_config(cfg)
    meta = {"git": git_info(), "run_dir": str(out_dir), "command": " ".join(sys.argv)}
    # the rows of an earlier attempt (finished stages, or the untrained row written when stage 1 started)
    record = RunRecord.load(out_dir, meta=meta) if cfg.resume else RunRecord(out_dir, meta=meta)
    options = RunOptions(evaluate=evaluated_stages(cfg.get("eval_stages", "all"), plan.names),
                         baseline=bool(cfg.eval_baseline), eval_after=cfg.eval_after, resume=bool(cfg.resume),
                         export_metadata={"git": meta["git"]})
    run_name = sweep_run_name(cfg.run_name)

    def trainer(spec, encoder, *, callbacks, **kwargs):
        """The stage's Trainer: its logger (the run's hyperparameters) and the config's callbacks, built once the
        stage's data is read (a bad record stops the run before any logger starts)."""
        meta["parameters"] = parameter_counts(encoder)
        logger = build(
            cfg.logger, save_dir=str(out_dir), run_name=run_name, stage=spec.name,
            **({"group": sweep_group(cfg.logger.get("group"), cfg.run_name)} if "group" in cfg.logger else {}),
            hparams={**flatten(config), "stage": spec.name, "git.sha": meta["git"]["sha"],
                     "git.dirty": meta["git"]["dirty"], **{f"parameters.{k}": v for k, v in meta["parameters"].items()}},
        )
        configured = build_callbacks(cfg.callbacks, dirpath=str(record.checkpoint_dir(spec.name)), run_config=config,
                                     meta=meta)
        if not cfg.trainer.get("enable_progress_bar", True):  # Lightning refuses a bar callback then
            from lightning.pytorch.callbacks import ProgressBar

            configured = [c for c in configured if not isinstance(c, ProgressBar)]
        return build(cfg.trainer, logger=logger, callbacks=configured + list(callbacks), default_root_dir=str(out_dir),
                     **kwargs)

    return run_stages(
        plan.stages, record=record, prompts=plan.prompts, options=options,
        tokenizer=lambda: build(cfg.model.tokenizer),
        encoder=lambda spec, tok, *, init_from, previous: build_encoder(cfg.model.encoder, tok, init_from=init_from,
                                                                         previous=previous),
        evaluators=lambda: {k: build(v, prompts=plan.prompts) for k, v in cfg.eval.items()},
        trainer=trainer, close=finish_loggers,
    )


def resolved_config(cfg: DictConfig) -> dict:
    """The resolved config as plain containers; a field left ``???`` (bound at run time, or a stage that does
    not run) becomes ``None``."""

    def clean(x):
        if isinstance(x, dict):
            return {k: clean(v) for k, v in x.items()}
        if isinstance(x, list):
            return [clean(v) for v in x]
        return None if x == "???" else x

    return clean(OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False))


def _sweep() -> tuple[int, str] | None:
    """``(job number, sweep folder name)`` inside a Hydra multirun, else None."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if HydraConfig.initialized():
        hc = HydraConfig.get()
        if hc.mode == RunMode.MULTIRUN:
            return int(hc.job.num), Path(hc.sweep.dir).name
    return None


def sweep_run_name(run_name: str) -> str:
    """In a multirun, ``<run_name>-<job number>``; otherwise ``run_name``."""
    sweep = _sweep()
    return f"{run_name}-{sweep[0]}" if sweep else run_name


def sweep_group(group: str | None, run_name: str) -> str:
    """The W&B group: a sweep's runs share ``<group>@<sweep time>``, so each sweep is one group."""
    sweep = _sweep()
    base = group or run_name
    return f"{base}@{sweep[1]}" if sweep else base


if __name__ == "__main__":
    main()
