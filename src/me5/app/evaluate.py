"""Evaluate a saved encoder on a BEIR / MIRACL-layout folder.

    python -m me5.evaluate --model outputs/finetune/model --data data/sample/eval --output metrics.json

Pooling, normalisation and the prompt policy come from the model folder's ``me5.json`` (written by
:func:`me5.export.export_encoder`), else from its sentence-transformers files (the policy whose prompts they
hold), else the mE5 defaults (mean pooling, unit vectors, the E5 policy); ``--prompts`` overrides the policy and
``--task`` names the task whose instruction the instruct policy uses (``me5.prompts.TASKS``).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

from me5.errors import ConfigError, DataError, Me5Error

# a saved model's settings and loading (the library's: the consistency filter reads models the same way)
from me5.models.saved import DEFAULTS, load_model, read_model_settings  # noqa: F401 -- also imported from here
from me5.prompts import STYLES, TASKS, PromptPolicy

log = logging.getLogger("me5.evaluate")


def build_parser() -> argparse.ArgumentParser:
    """The command-line interface of ``python -m me5.evaluate``."""
    p = argparse.ArgumentParser(prog="me5-evaluate", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="exported model folder or hub id")
    p.add_argument("--run", default=None,
                   help="a me5.train run folder: evaluate its export of --stage on the run's eval group (the job of "
                        "eval_after=job; under torchrun every rank takes a part of each corpus)")
    p.add_argument("--stage", default="finetune", help="with --run: the stage whose export to evaluate")
    p.add_argument("--data", default=None, help="BEIR folder, or folder of per-language BEIR folders (MIRACL)")
    p.add_argument("--suite", default=None, choices=sorted(SUITES),
                   help="a named suite instead of --data: 'paper' = MIRACL dev (16 languages), BUCC, Tatoeba (both "
                        "directions) and the 56 MTEB English tasks, written beside the paper's Tables 3-6; under "
                        "torchrun the ranks share MIRACL's corpora")
    p.add_argument("--data-root", default="data/eval",
                   help="with --suite: the folder holding miracl/ (me5.app.convert_miracl output), bucc/ "
                        "(mteb/BUCC) and tatoeba/ (mteb/tatoeba-bitext-mining); MTEB reads the HF datasets cache")
    p.add_argument("--benchmarks", nargs="+", default=None, choices=SUITE_BENCHMARKS,
                   help="with --suite: only these benchmarks (default: all)")
    p.add_argument("--paper-model", default=None,
                   help="the paper's column to compare with (small, base, large, large-instruct; default: from --model)")
    p.add_argument("--output-dir", default=None, help="with --suite: where results.md and metrics.json go")
    p.add_argument("--wandb", action="store_true", help="with --suite: log the side-by-side table to W&B "
                                                       "(offline without credentials)")
    p.add_argument("--split", default="test", help="qrels/{split}.tsv (default: test)")
    p.add_argument("--name", default=None, help="metric key prefix (default: the data folder's name)")
    p.add_argument("--output", default=None, help="write metrics to this json file")
    p.add_argument("--batch-size", type=int, default=128)
    # the recipe's protocol: 512 tokens on both sides (unilm mteb_beir_eval.py)
    p.add_argument("--query-max-length", type=int, default=512)
    p.add_argument("--passage-max-length", type=int, default=512)
    p.add_argument("--prompts", default=None, choices=STYLES, help="override the saved prompt policy")
    p.add_argument("--task", default="generic", choices=sorted(TASKS),
                   help="the task whose instruction the instruct policy puts on queries (default: generic)")
    p.add_argument("--languages", nargs="+", default=None, help="evaluate only these languages")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    return p


def run(args: argparse.Namespace) -> dict[str, float]:
    """Load the model and data named by ``args``, evaluate, print the table and write ``--output``."""
    if args.run is not None:
        return run_stage_job(args)
    if args.model is None:
        raise ConfigError("--model", "give --model (an exported folder or hub id), or --run")
    if args.suite is not None:
        return run_suite(args)
    if args.data is None:
        raise ConfigError("--data", "give --data (a BEIR folder) or --suite")
    from me5.eval.retrieval import RetrievalEvaluator, format_table, load_beir

    data = load_beir(args.data, split=args.split)  # data errors before the (slow) model load
    settings = read_model_settings(args.model)
    if args.prompts is not None:
        settings["prompts"] = args.prompts
    settings["task"] = args.task
    encoder, tokenizer, device = load_model(args.model, settings, args.device)
    name = args.name or Path(args.data).resolve().name
    evaluator = RetrievalEvaluator(
        data,
        name=name,
        prompts=PromptPolicy(settings["prompts"]),
        task=args.task,
        query_max_length=args.query_max_length,
        passage_max_length=args.passage_max_length,
        batch_size=args.batch_size,
        languages=args.languages,
    )
    metrics = evaluator.evaluate(encoder, tokenizer, device=device, show_progress=sys.stderr.isatty())
    print(format_table({Path(args.model).name or args.model: metrics}))
    if args.output:
        out = Path(args.output)
        out.parent.mkdir(parents=True, exist_ok=True)
        record = {
            "model": args.model,
            "data": args.data,
            "split": args.split,
            "settings": settings,
            "metrics": metrics,
        }
        out.write_text(json.dumps(record, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        log.info("wrote %s", out)
    return metrics


# ---------------------------------------------------------------------------------------------- run jobs
def launched_world() -> int:
    """The number of processes torchrun (or SLURM's srun with the same variables) started: ``WORLD_SIZE``."""
    import os

    return int(os.environ.get("WORLD_SIZE", "1"))


def start_distributed(device: str | None) -> tuple[int, int, str | None]:
    """``(rank, world, device)``: under torchrun (``WORLD_SIZE`` > 1) the default process group, NCCL when this
    process gets a GPU (``cuda:LOCAL_RANK``, unless ``device`` names one) and gloo otherwise; one process as is.
    End it with :func:`me5.distributed.shutdown_process_group`."""
    import os

    import torch

    world = launched_world()
    if world > 1 and not torch.distributed.is_initialized():
        local = int(os.environ.get("LOCAL_RANK", "0"))
        if torch.cuda.is_available() and device is None:
            torch.cuda.set_device(local)
            device = f"cuda:{local}"
        torch.distributed.init_process_group("nccl" if str(device or "cpu").startswith("cuda") else "gloo")
    if torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size(), device
    return 0, 1, device


def run_stage_job(args: argparse.Namespace) -> dict[str, float]:
    """``--run DIR --stage S``: the run's ``eval`` group on its stage-``S`` export, as its own job.

    Under torchrun (``WORLD_SIZE`` > 1) the processes form a group (NCCL on GPUs, else gloo) and share each
    sharded corpus as the training job would (``eval_after=shared``). Rank 0 writes ``DIR/eval/S.json`` and
    adds the row to ``DIR/metrics.json`` and ``DIR/results.md``.
    """
    from omegaconf import OmegaConf

    from me5.app.pipeline import build, evaluate_all, write_results
    from me5.distributed import shutdown_process_group

    run_dir = Path(args.run).resolve()
    cfg_file = run_dir / ".hydra" / "config.yaml"
    if not cfg_file.is_file():
        raise ConfigError("--run", f"{run_dir} is not a me5.train run folder (no .hydra/config.yaml)")
    export = run_dir / "export" / args.stage
    if not export.is_dir():
        have = sorted(p.name for p in (run_dir / "export").iterdir()) if (run_dir / "export").is_dir() else []
        raise ConfigError("--stage", f"no export of stage '{args.stage}' in {run_dir / 'export'} (have: {have})")
    cfg = OmegaConf.load(cfg_file)
    cfg.paths.output_dir = str(run_dir)  # Hydra's ${hydra:runtime.output_dir} is not there outside the run
    settings = read_model_settings(str(export))
    if args.prompts is not None:
        settings["prompts"] = args.prompts
    prompts = PromptPolicy(settings["prompts"])
    evaluators = {k: build(v, prompts=prompts) for k, v in (cfg.eval or {}).items()}  # data checks first
    if not evaluators:
        raise ConfigError("--run", f"the run's eval group is empty ({cfg_file})")
    rank, world, device = start_distributed(args.device)
    try:
        encoder, tokenizer, _ = load_model(str(export), settings, device)
        t0 = time.perf_counter()
        metrics = evaluate_all(evaluators, encoder, tokenizer)
        if rank == 0:
            record = {"stage": args.stage, "export": str(export), "settings": settings, "metrics": metrics,
                      "eval_s": round(time.perf_counter() - t0, 1), "world_size": world}
            out = run_dir / "eval" / f"{args.stage}.json"
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(record, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
            old = json.loads((run_dir / "metrics.json").read_text()) if (run_dir / "metrics.json").is_file() else {}
            results = {**old.get("results", {}), args.stage: metrics}
            write_results(run_dir, results, meta=old.get("meta", {}), timings=old.get("timings_s", {}),
                          data_counts=old.get("data_counts", {}))
    finally:
        shutdown_process_group()
    return metrics


# ---------------------------------------------------------------------------------------------- suites
# tatoeba_backward: Tatoeba eng -> xxx (the paper's and mteb's Tatoeba is xxx -> eng), from the same folder
SUITE_BENCHMARKS = ("miracl", "bucc", "tatoeba", "tatoeba_backward", "mteb")
SUITES = {"paper": SUITE_BENCHMARKS}
_BITEXT = {"bucc": ("bucc", "forward"), "tatoeba": ("tatoeba", "forward"), "tatoeba_backward": ("tatoeba", "backward")}


def _suite_evaluators(args, prompts, *, work_dir: Path | None) -> dict:
    """The suite's evaluators, with every data folder checked before the model is loaded; MIRACL's corpora are
    encoded into shards under ``work_dir`` (each rank its part) when it is given."""
    from me5.eval.bitext import TASK_PAIRS, BitextEvaluator
    from me5.eval.miracl import LANGUAGES
    from me5.eval.retrieval import RetrievalEvaluator, load_beir

    root = Path(args.data_root)
    wanted = args.benchmarks or SUITES[args.suite]
    out = {}
    for bench in wanted:
        if bench == "mteb":
            continue  # mteb checks its own datasets (the HF cache) task by task
        task, direction = _BITEXT.get(bench, (bench, "forward"))
        folder = root / task
        if not folder.is_dir():
            raise DataError(f"no {bench} data for --suite {args.suite} (see --data-root)", file=str(folder))
        if bench == "miracl":
            langs = [lang for lang in LANGUAGES if (folder / lang).is_dir()]
            _warn_missing(bench, LANGUAGES, langs, folder)
            # as conf/eval/miracl.yaml: one language at a time, the recipe's 512 tokens and fp16, and (with
            # work_dir) the corpus encoded into resumable fp16 shards, each rank reading and encoding its part
            out[bench] = RetrievalEvaluator(load_beir(folder, split="dev", lazy=True), name="miracl", prompts=prompts,
                                            task="miracl", languages=langs or list(LANGUAGES),
                                            batch_size=args.batch_size, query_max_length=args.query_max_length,
                                            passage_max_length=args.passage_max_length, max_tokens=65536,
                                            precision="fp16", work_dir=work_dir)
        else:
            pairs = [p for p in TASK_PAIRS[task] if _has_pair(folder, p)]
            _warn_missing(bench, TASK_PAIRS[task], pairs, folder)
            out[bench] = BitextEvaluator(folder, task=task, direction=direction, prompts=prompts,
                                         languages=pairs or None, batch_size=args.batch_size)
    return out


def _has_pair(folder: Path, pair: str) -> bool:
    from me5.eval.bitext import pair_files

    try:
        return bool(pair_files(folder, pair))
    except DataError:
        return False


def _warn_missing(bench: str, wanted, present, folder: Path) -> None:
    """The paper's mean is over every language: a partial folder is evaluated, and said so loudly."""
    missing = [x for x in wanted if x not in present]
    if missing and present:
        log.warning("%s: %d of the paper's %d languages are missing in %s (%s): its mean is not the paper's",
                    bench, len(missing), len(wanted), folder, ", ".join(missing))


def run_suite(args: argparse.Namespace) -> dict[str, float]:
    """``--suite``: every benchmark of the suite, our scores beside the paper's (``me5.eval.paper``), written to
    ``results.md``, ``metrics.json`` and (``--wandb``) a W&B table.

    Under torchrun (``WORLD_SIZE`` > 1) the processes form a group (NCCL on GPUs, else gloo) for MIRACL: each
    rank reads, encodes (into ``<output dir>/embeddings``) and searches its part of every corpus. Then the group
    is ended and rank 0 alone runs bitext mining and MTEB and writes the results; the other ranks return (no
    rank waits in a collective while rank 0 runs the rest).
    """
    from me5.distributed import shutdown_process_group
    from me5.eval.paper import paper_model, side_by_side

    try:
        column = paper_model(args.paper_model or args.model)
    except ValueError as err:
        raise ConfigError("--paper-model", str(err)) from None
    settings = read_model_settings(args.model)
    if args.prompts is not None:
        settings["prompts"] = args.prompts
    prompts = PromptPolicy(settings["prompts"])
    out = Path(args.output_dir or Path("outputs") / "eval" / (Path(args.model).name or "model"))
    # on disk with --output-dir, and always with several processes: the ranks share the corpus through the shards
    work_dir = out / "embeddings" if args.output_dir or launched_world() > 1 else None
    evaluators = _suite_evaluators(args, prompts, work_dir=work_dir)  # data errors before the (slow) model load
    rank, world, device = start_distributed(args.device)
    metrics: dict[str, float] = {}
    timings: dict[str, float] = {}

    def evaluate(bench: str) -> None:
        t0 = time.perf_counter()
        metrics.update(evaluators[bench].evaluate(encoder, tokenizer, device=device,
                                                  show_progress=rank == 0 and sys.stderr.isatty()))
        timings[bench] = round(time.perf_counter() - t0, 1)

    shared = [b for b, ev in evaluators.items() if world > 1 and getattr(ev, "shares_ranks", True)]
    try:
        encoder, tokenizer, device = load_model(args.model, settings, device)
        for bench in shared:
            evaluate(bench)
    finally:
        shutdown_process_group()  # what follows is rank 0's alone: no collective is left for the others to wait in
    if rank != 0:
        log.info("rank %d of %d: its part of %s is done; rank 0 runs the rest and writes the results", rank, world,
                 ", ".join(shared) or "nothing")
        return metrics
    for bench in [b for b in evaluators if b not in shared]:
        evaluate(bench)
    if "mteb" in (args.benchmarks or SUITES[args.suite]):
        from me5.eval.mteb import Me5MtebEncoder, evaluate_mteb, paper_tasks

        t0 = time.perf_counter()
        wrapper = Me5MtebEncoder(encoder, tokenizer, prompts=prompts, name=str(args.model), device=device,
                                 batch_size=args.batch_size)
        metrics.update(evaluate_mteb(wrapper, paper_tasks(), prompts=prompts, batch_size=args.batch_size))
        timings["mteb"] = round(time.perf_counter() - t0, 1)
    table = side_by_side(metrics, column)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.md").write_text(table.markdown() + "\n", encoding="utf-8")
    record = {"model": args.model, "suite": args.suite, "paper_model": column, "settings": settings,
              "metrics": metrics, "paper": table.records(), "timings_s": timings, "world_size": world}
    (out / "metrics.json").write_text(json.dumps(record, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    print(table.markdown())
    print(f"\nresults: {out / 'results.md'}")
    if args.wandb:
        _log_wandb(table, record, out)
    return metrics


def _log_wandb(table, record, out: Path) -> None:
    import wandb

    from me5.app.loggers import resolve_wandb_mode

    columns, rows = table.table()
    run = wandb.init(project="me5", job_type="evaluate", dir=str(out), mode=resolve_wandb_mode("auto"),
                     config={k: record[k] for k in ("model", "suite", "paper_model", "settings")})
    run.log({"paper/side_by_side": wandb.Table(columns=columns, data=rows),
             **{f"eval/{k}": v for k, v in record["metrics"].items()}})
    run.finish()


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit status (2 with the message on bad data or config, no traceback, as
    ``me5.train`` and ``me5.prepare``)."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        run(args)
    except Me5Error as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
