"""The Hydra application: ``python -m me5.train [overrides]``.

Checks the whole configuration first (fields, schedules, batch plans on the trainer's world size, data paths, the
first records of every source, the stage-2 needs, evaluation inputs: :func:`me5.app.pipeline.check_run`;
``dry_run=true`` stops there and prints the plan, :mod:`me5.app.dry_run`), then runs the configured stages in
order (default: pre-training, then fine-tuning from its weights), evaluates the untrained encoder and the result
of each stage of ``eval_stages``, exports each stage's encoder, and writes ``metrics.json`` and a results table
into the run folder.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
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
    """Run every configured stage; return ``{row: {metric: value}}`` (rows: untrained, pretrain, finetune)."""
    import lightning as L

    from me5.app.callbacks import AtTrainStart
    from me5.app.console import tidy_console
    from me5.app.pipeline import (
        build,
        build_callbacks,
        build_encoder,
        build_loss,
        check_run,
        evaluate_all,
        evaluated_stages,
        finish_loggers,
        write_results,
    )
    from me5.app.runinfo import flatten, git_info, parameter_counts
    from me5.training.checkpointing import resume_checkpoint

    tidy_console()
    plan = check_run(cfg)  # every check before any heavy work: a failed one leaves only Hydra's files behind
    if cfg.get("dry_run"):  # set in a config file (the command line's dry_run=true never reaches Hydra: main)
        from me5.app.dry_run import describe

        print(describe(cfg, plan), flush=True)
        return {}
    eval_after_stage = set(evaluated_stages(cfg.get("eval_stages", "all"), plan.stages))
    out_dir = Path(cfg.paths.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for folder in plan.generate_sample:  # the tiny tokenizer / sample evaluation beside data of your own
        from me5.data.synthetic import generate_sample_data

        generate_sample_data(folder, seed=0)
    L.seed_everything(cfg.seed, workers=True)
    config = resolved_config(cfg)
    meta = {"git": git_info(), "run_dir": str(out_dir), "command": " ".join(sys.argv)}
    run_name = sweep_run_name(cfg.run_name)
    done = finished_stages(out_dir, plan.stages) if cfg.resume else []
    # the rows of an earlier attempt (finished stages, or the untrained row written when stage 1 started)
    earlier = _read_json(out_dir / "metrics.json") if cfg.resume else {}
    if done and len(done) == len(plan.stages):
        print(f"me5: {out_dir} finished earlier (every stage has checkpoints/<stage>/{DONE}): nothing to do; "
              f"results in {out_dir / 'metrics.json'}", flush=True)
        return dict(earlier.get("results", {}))
    results: dict[str, dict[str, float]] = dict(earlier.get("results", {}))
    timings: dict[str, float] = dict(earlier.get("timings_s", {}))
    data_counts: dict[str, dict[str, int]] = dict(earlier.get("data_counts", {}))
    encoder = tokenizer = evaluators = trainer = None
    for name in plan.stages:
        scfg, batch_plan, datamodule = cfg.stages[name], plan.plans[name], plan.datamodules[name]
        t0 = time.perf_counter()
        if name in done:  # a restart after this stage finished: its export is the next stage's start
            log.info("stage %s finished earlier (%s): skipped", name, out_dir / "checkpoints" / name / DONE)
            tokenizer = tokenizer or build(cfg.model.tokenizer)
            encoder = build_encoder(cfg.model.encoder, tokenizer, init_from=str(out_dir / "export" / name))
            continue
        datamodule.prepare_data()  # generates the sample data (the sample tokenizer is trained on it)
        if tokenizer is None:
            tokenizer = build(cfg.model.tokenizer)
        if evaluators is None:  # none built when this run evaluates nothing (a stage-1 run of a split pipeline)
            wanted = eval_after_stage or cfg.eval_baseline or any(cfg.stages[s].val_every for s in plan.stages)
            evaluators = {k: build(v, prompts=plan.prompts) for k, v in cfg.eval.items()} if wanted else {}
        encoder = build_encoder(cfg.model.encoder, tokenizer, init_from=scfg.init_from, previous=encoder)
        meta["parameters"] = parameter_counts(encoder)
        at_start = []
        if cfg.eval_baseline and not results and evaluators and cfg.eval_after == "shared":
            # inside fit, when training is about to start: a distributed job's ranks then share the evaluation
            # (the process group exists; before fit every rank would evaluate everything alone, and a child that
            # Lightning's launcher starts would reach its first collective only after its own whole pass)
            def baseline(trainer, pl_module, stage=name, evaluators=evaluators, tokenizer=tokenizer):
                if trainer.global_step > 0:
                    log.warning("no untrained row: stage %s resumed at step %d, the weights are trained already",
                                stage, trainer.global_step)
                    return
                results["untrained"] = evaluate_all(evaluators, pl_module.encoder, tokenizer)
                if trainer.is_global_zero:  # kept if this stage is interrupted: a rerun does not evaluate again
                    write_results(out_dir, results, meta=meta, timings=timings, data_counts=data_counts, show=False)

            at_start.append(AtTrainStart(baseline))
        loss = build_loss(cfg.loss.terms, name)
        datamodule.connect(
            tokenizer, batch_plan=batch_plan, n_negatives=scfg.n_negatives, require_teacher=loss.requires_teacher,
            query_max_length=scfg.query_max_length, passage_max_length=scfg.passage_max_length, prompts=plan.prompts,
        )
        if not datamodule.is_streaming():  # in-memory data is read (a bad record found) before any logger starts
            datamodule.setup("fit")
        module = build(scfg.module, encoder=encoder, loss=loss, tokenizer=tokenizer,
                       evaluators=evaluators if scfg.val_every else {},
                       chunk_rows=batch_plan.chunk_rows, chunk_tokens=batch_plan.chunk_tokens)
        logger = build(
            cfg.logger, save_dir=str(out_dir), run_name=run_name, stage=name,
            **({"group": sweep_group(cfg.logger.get("group"), cfg.run_name)} if "group" in cfg.logger else {}),
            hparams={**flatten(config), "stage": name, "git.sha": meta["git"]["sha"], "git.dirty": meta["git"]["dirty"],
                     **{f"parameters.{k}": v for k, v in meta["parameters"].items()}},
        )
        ckpt_dir = out_dir / "checkpoints" / name
        callbacks = build_callbacks(cfg.callbacks, dirpath=str(ckpt_dir), run_config=config, meta=meta) + at_start
        if not cfg.trainer.get("enable_progress_bar", True):  # Lightning refuses a bar callback then
            from lightning.pytorch.callbacks import ProgressBar

            callbacks = [c for c in callbacks if not isinstance(c, ProgressBar)]
        trainer = build(
            cfg.trainer, max_steps=scfg.max_steps, logger=logger, callbacks=callbacks, default_root_dir=str(out_dir),
            val_check_interval=scfg.val_every, limit_val_batches=1.0 if scfg.val_every else 0,
        )
        resume = None
        if cfg.resume:
            found, unreadable = resume_checkpoint(ckpt_dir)
            for path, why in unreadable:
                log.error("checkpoint %s is unreadable (%s): not used", path, why)
            resume = str(found) if found is not None else None
        if resume:
            log.info("resuming stage %s from %s", name, resume)
        trainer.fit(module, datamodule=datamodule, ckpt_path=resume)
        data_counts[name] = datamodule.data_counts()
        for lg in trainer.loggers:
            lg.log_metrics({f"data/{k}": float(v) for k, v in data_counts[name].items()}, step=trainer.global_step)
        timings[f"{name}/train_s"] = round(time.perf_counter() - t0, 1)
        if evaluators and cfg.eval_after == "shared" and name in eval_after_stage:  # each rank its part
            results[name] = evaluate_all(evaluators, encoder, tokenizer)
            if trainer.is_global_zero:
                for lg in trainer.loggers:
                    lg.log_metrics({f"test/{k}": v for k, v in results[name].items()}, step=trainer.global_step)
        if trainer.is_global_zero:
            export_dir = out_dir / "export" / name
            encoder.save_pretrained(export_dir, tokenizer, prompts=plan.prompts,
                                    extra_metadata={"stage": name, "git": meta["git"]})
            if evaluators and cfg.eval_after == "job" and name in eval_after_stage:
                log.info("evaluate the %s export with its own job: %s", name, write_eval_job(out_dir, name))
        finish_loggers(trainer.loggers)
        if trainer.is_global_zero:  # the stage is complete: a rerun skips it and reads its results back
            write_results(out_dir, results, meta=meta, timings=timings, data_counts=data_counts,
                          show=name == plan.stages[-1])
            (ckpt_dir / DONE).write_text(json.dumps({"global_step": trainer.global_step, "export": str(
                out_dir / "export" / name)}) + "\n")
    return results


DONE = "done.json"  # <run dir>/checkpoints/<stage>/done.json: the stage trained, exported and evaluated


def finished_stages(out_dir: Path, stages) -> list[str]:
    """The stages of this run folder that completed (their ``done.json`` and export exist)."""
    return [s for s in stages if (out_dir / "checkpoints" / s / DONE).is_file() and (out_dir / "export" / s).is_dir()]


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def write_eval_job(out_dir: Path, stage: str) -> Path:
    """``<run dir>/evaluate_<stage>.sh``: the command that evaluates this stage's export on the run's ``eval``
    group (``bash`` it, ``sbatch`` it, or run it under ``torchrun --nproc-per-node N``)."""
    script = out_dir / f"evaluate_{stage}.sh"
    script.write_text(
        "#!/usr/bin/env bash\n# evaluates the export of stage " + stage + " on this run's eval group; "
        "for many GPUs: torchrun --nproc-per-node N -m me5.evaluate ...\n"
        f"exec {sys.executable} -m me5.evaluate --run {out_dir.resolve()} --stage {stage} \"$@\"\n"
    )
    script.chmod(0o755)
    return script


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
