"""The Hydra application: ``python -m me5.train [overrides]``.

Runs the configured stages in order (default: pre-training, then fine-tuning from its weights), evaluates
the untrained encoder and each stage's result, exports the final encoder, and writes ``metrics.json`` and
a results table into the run folder. Everything it builds comes from ``conf/`` through ``_target_``.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from me5.distributed import shutdown_process_group
from me5.errors import Me5Error

CONF_DIR = str(Path(__file__).resolve().parents[2] / "conf")
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
    """Console entry point; a bad config or bad data exits 2 with the message, no traceback."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        _hydra_main()
    finally:  # multi-process runs: no gloo teardown abort at exit (see me5.distributed.shutdown_process_group)
        shutdown_process_group()


def run(cfg: DictConfig) -> dict[str, dict[str, float]]:
    """Run every configured stage; return ``{row: {metric: value}}`` (rows: untrained, pretrain, finetune)."""
    import lightning as L
    from hydra.utils import instantiate

    from me5.pipeline import (
        ConfigInCheckpoint,
        build_encoder,
        build_loss,
        evaluate_all,
        finish_loggers,
        stage_order,
        validate_config,
        write_results,
    )
    from me5.runinfo import flatten, git_info, parameter_counts

    stages = validate_config(cfg)
    out_dir = Path(cfg.paths.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    L.seed_everything(cfg.seed, workers=True)
    config = OmegaConf.to_container(cfg, resolve=True)
    meta = {"git": git_info(), "run_dir": str(out_dir), "command": " ".join(sys.argv)}
    run_name = sweep_run_name(cfg.run_name)
    results: dict[str, dict[str, float]] = {}
    timings: dict[str, float] = {}
    data_counts: dict[str, dict[str, int]] = {}
    encoder = tokenizer = evaluators = None
    for name in stage_order(stages):
        scfg = cfg.stages[name]
        t0 = time.perf_counter()
        datamodule = instantiate(cfg.data[name])
        datamodule.prepare_data()
        if tokenizer is None:
            tokenizer = instantiate(cfg.model.tokenizer)
        if evaluators is None:
            evaluators = {k: instantiate(v) for k, v in cfg.eval.items()}
        encoder = build_encoder(cfg.model.encoder, tokenizer, init_from=scfg.init_from, previous=encoder)
        meta["parameters"] = parameter_counts(encoder)
        if cfg.eval_baseline and not results and evaluators:
            results["untrained"] = evaluate_all(evaluators, encoder, tokenizer)
        loss = build_loss(cfg.loss.terms, name)
        datamodule.connect(
            tokenizer,
            global_batch_size=scfg.global_batch_size,
            n_negatives=scfg.n_negatives,
            require_teacher=loss.requires_teacher,
            query_max_length=scfg.query_max_length,
            passage_max_length=scfg.passage_max_length,
            prompt_style=cfg.model.prompt_style,
        )
        module = instantiate(
            scfg.module, encoder=encoder, loss=loss, tokenizer=tokenizer, evaluators=evaluators if scfg.val_every else {}
        )
        logger = instantiate(
            cfg.logger, save_dir=str(out_dir), run_name=run_name, stage=name,
            **({"group": sweep_group(cfg.logger.get("group"), cfg.run_name)} if "group" in cfg.logger else {}),
            hparams={**flatten(config), "stage": name, "git.sha": meta["git"]["sha"], "git.dirty": meta["git"]["dirty"],
                    **{f"parameters.{k}": v for k, v in meta["parameters"].items()}},
        )
        ckpt_dir = out_dir / "checkpoints" / name
        from lightning.pytorch.callbacks import ModelCheckpoint

        from me5.data.mixture import RealisedMixtureLogger

        callbacks = [
            ModelCheckpoint(dirpath=ckpt_dir, filename="step{step:06d}", auto_insert_metric_name=False,
                            every_n_train_steps=cfg.checkpoint_every, save_top_k=-1, save_last=True,
                            enable_version_counter=False),
            ConfigInCheckpoint(config, meta),
            RealisedMixtureLogger(every_n_steps=cfg.checkpoint_every),
        ]
        trainer = instantiate(
            cfg.trainer, max_steps=scfg.max_steps, logger=logger, callbacks=callbacks, default_root_dir=str(out_dir),
            val_check_interval=scfg.val_every, limit_val_batches=1.0 if scfg.val_every else 0,
        )
        validate_config(cfg, world_size=trainer.world_size)
        ckpt = ckpt_dir / "last.ckpt"
        resume = str(ckpt) if cfg.resume and ckpt.exists() else None
        if resume:
            log.info("resuming stage %s from %s", name, resume)
        trainer.fit(module, datamodule=datamodule, ckpt_path=resume)
        data_counts[name] = datamodule.data_counts()
        for lg in trainer.loggers:
            lg.log_metrics({f"data/{k}": float(v) for k, v in data_counts[name].items()}, step=trainer.global_step)
        timings[f"{name}/train_s"] = round(time.perf_counter() - t0, 1)
        if trainer.is_global_zero:
            if evaluators:
                results[name] = evaluate_all(evaluators, encoder, tokenizer)
                for lg in trainer.loggers:
                    lg.log_metrics({f"test/{k}": v for k, v in results[name].items()}, step=trainer.global_step)
            export_dir = out_dir / "export" / name
            encoder.save_pretrained(export_dir, tokenizer, max_seq_length=scfg.passage_max_length,
                                    extra_metadata={"stage": name, "git": meta["git"]})
            log.info("exported the %s encoder to %s", name, export_dir)
        finish_loggers(trainer.loggers)
    if evaluators is not None and trainer.is_global_zero:
        write_results(out_dir, results, meta=meta, timings=timings, data_counts=data_counts)
    return results


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
