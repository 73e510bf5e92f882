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
import os
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from me5.errors import ConfigError, DataError, Me5Error
from me5.jsonio import write_json, write_text

# a saved model's settings and loading (the library's: the consistency filter reads models the same way)
from me5.models.saved import load_model, read_saved_settings
from me5.prompts import STYLES, TASKS

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
                        "directions) and the 56 MTEB English tasks, written beside the released checkpoint's "
                        "published scores and the paper's Tables 3-7; under torchrun the ranks share MIRACL's "
                        "corpora")
    p.add_argument("--data-root", default="data/eval",
                   help="with --suite: the folder holding miracl/ (me5.app.convert_miracl output), bucc/ "
                        "(mteb/BUCC) and tatoeba/ (mteb/tatoeba-bitext-mining); MTEB reads the HF datasets cache")
    p.add_argument("--benchmarks", nargs="+", default=None,
                   help="with --suite: only these benchmarks, the suite's keys (paper: miracl bucc tatoeba "
                        "tatoeba_backward mteb; default: all)")
    p.add_argument("--paper-model", default=None,
                   help="the paper's column to compare with (small, base, large, large-instruct; default: from --model)")
    p.add_argument("--output-dir", default=None,
                   help="with --suite: where results.md and metrics.json go (written after each benchmark and each "
                        "MTEB task; a rerun into the same folder evaluates only what is not done)")
    p.add_argument("--fresh", action="store_true",
                   help="with --suite: start over, overwriting the results already in --output-dir")
    p.add_argument("--mteb-cache-dir", default=None,
                   help="with --suite: the Hugging Face datasets cache holding MTEB's datasets (default: the "
                        "environment's, HF_DATASETS_CACHE / HF_HOME)")
    p.add_argument("--mteb-online", action="store_true",
                   help="with --suite: let mteb download the datasets that are not in the cache (default: offline)")
    p.add_argument("--wandb", action="store_true", help="with --suite: log the side-by-side table to W&B "
                                                       "(offline without credentials)")
    p.add_argument("--split", default="test", help="qrels/{split}.tsv (default: test)")
    p.add_argument("--name", default=None, help="metric key prefix (default: the data folder's name)")
    p.add_argument("--output", default=None, help="write metrics to this json file")
    # --data: 128 texts per batch and the recipe's 512 tokens on both sides (unilm mteb_beir_eval.py); --suite: the
    # eval group's values (conf/eval/<suite>.yaml) unless given
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--query-max-length", type=int, default=None)
    p.add_argument("--passage-max-length", type=int, default=None)
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
    settings = read_saved_settings(args.model).with_prompts(args.prompts)
    encoder, tokenizer, device = load_model(args.model, settings, args.device)
    name = args.name or Path(args.data).resolve().name
    evaluator = RetrievalEvaluator(
        data,
        name=name,
        prompts=settings.prompts,
        task=args.task,
        query_max_length=args.query_max_length or 512,
        passage_max_length=args.passage_max_length or 512,
        batch_size=args.batch_size or 128,
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
            "settings": {**settings.as_dict(), "task": args.task},
            "metrics": metrics,
        }
        out.write_text(json.dumps(record, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        log.info("wrote %s", out)
    return metrics


# ---------------------------------------------------------------------------------------------- run jobs
def launched_world() -> int:
    """The number of processes torchrun (or SLURM's srun with the same variables) started: ``WORLD_SIZE``."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def start_distributed(device: str | None) -> tuple[int, int, str | None]:
    """``(rank, world, device)``: under torchrun (``WORLD_SIZE`` > 1) the default process group, NCCL when this
    process gets a GPU (``cuda:LOCAL_RANK``, unless ``device`` names one) and gloo otherwise; one process as is.
    End it with :func:`me5.distributed.shutdown_process_group`."""
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

    from me5.app.pipeline import build
    from me5.distributed import shutdown_process_group
    from me5.eval.suite import evaluate_all
    from me5.training.record import RunRecord

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
    settings = read_saved_settings(export).with_prompts(args.prompts)
    prompts = settings.prompts
    evaluators = {k: build(v, prompts=prompts) for k, v in (cfg.eval or {}).items()}  # data checks first
    if not evaluators:
        raise ConfigError("--run", f"the run's eval group is empty ({cfg_file})")
    rank, world, device = start_distributed(args.device)
    try:
        encoder, tokenizer, _ = load_model(str(export), settings, device)
        t0 = time.perf_counter()
        metrics = evaluate_all(evaluators, encoder, tokenizer)
        if rank == 0:
            record = {"stage": args.stage, "export": str(export), "settings": settings.as_dict(), "metrics": metrics,
                      "eval_s": round(time.perf_counter() - t0, 1), "world_size": world}
            out = run_dir / "eval" / f"{args.stage}.json"
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(record, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
            run_record = RunRecord.load(run_dir)
            run_record.results[args.stage] = metrics
            run_record.write(show=True)
    finally:
        shutdown_process_group()
    return metrics


# ---------------------------------------------------------------------------------------------- suites
# tatoeba_backward: Tatoeba eng -> xxx (the paper's and mteb's Tatoeba is xxx -> eng), from the same folder
#: the ``eval`` group options ``--suite`` takes: the paper's suite and its families (conf/eval/<suite>.yaml, the
#: same nodes a training run evaluates with ``eval=<suite>``)
SUITES = ("paper", "miracl", "bitext", "mteb")


def suite_config(suite: str, *, data_root: str | os.PathLike, output_dir: str | os.PathLike):
    """The ``eval`` node of ``conf/eval/<suite>.yaml`` composed as the training app composes it, with
    ``paths.eval_dir`` = ``data_root`` and ``paths.output_dir`` = ``output_dir``: one definition of every
    benchmark's protocol (lengths, precision, batch sizes) for ``me5.train eval=paper`` and ``--suite paper``."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from me5.app.train import CONF_DIR

    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("config", overrides=[f"eval={suite}", f"paths.eval_dir={Path(data_root).resolve()}",
                                           f"paths.output_dir={Path(output_dir).resolve()}"])
    node = cfg.eval
    OmegaConf.resolve(node)
    return node


#: where each benchmark's folder under --data-root comes from
_FETCH = {
    "miracl": "python -m me5.app.convert_miracl (from the hub datasets miracl/miracl and miracl/miracl-corpus)",
    "bucc": "huggingface-cli download mteb/BUCC --repo-type dataset --local-dir <data-root>/bucc",
    "tatoeba": "huggingface-cli download mteb/tatoeba-bitext-mining --repo-type dataset --local-dir <data-root>/tatoeba",
}
STATE_FORMAT = "me5-suite/1"


class SuiteState:
    """What a suite's output folder already holds: ``metrics.json`` (rewritten after each benchmark and each MTEB
    task, with ``done``: the inputs each finished benchmark was evaluated on) and ``results.md``.

    A rerun into the same folder skips a benchmark whose inputs are unchanged (or whose folder is gone) and every
    MTEB task with a score; the results must be of the same model and settings (``fingerprint``), else the rerun is
    refused (``--fresh`` starts over).
    """

    def __init__(self, out: Path, fingerprint: dict, *, fresh: bool = False):
        self.out, self.fingerprint = out, fingerprint
        self.metrics: dict[str, float] = {}
        self.done: dict[str, list[str]] = {}
        self.timings: dict[str, float] = {}
        old_file = out / "metrics.json"
        if fresh or not old_file.is_file():
            return
        try:
            old = json.loads(old_file.read_text(encoding="utf-8"))
        except json.JSONDecodeError as err:
            raise DataError(f"malformed JSON ({err.msg}); --fresh starts over", file=str(old_file)) from None
        if old.get("format") != STATE_FORMAT:
            raise ConfigError("--output-dir", f"{old_file} was not written by this version of --suite (no "
                                              f"'{STATE_FORMAT}' format): give another --output-dir, or --fresh to "
                                              f"overwrite it")
        if old.get("fingerprint") != fingerprint:
            raise ConfigError("--output-dir", f"{old_file} holds results of another model or settings "
                                              f"({old.get('fingerprint')}, this run: {fingerprint}): give another "
                                              f"--output-dir, or --fresh to overwrite them")
        self.metrics = {k: float(v) for k, v in old.get("metrics", {}).items()}
        self.done = {k: list(v) for k, v in old.get("done", {}).items()}
        self.timings = dict(old.get("timings_s", {}))

    def is_done(self, bench: str, inputs: list[str] | None) -> bool:
        """Finished before on the same inputs, or finished and its inputs are gone (``inputs`` None)."""
        return bench in self.done and (inputs is None or self.done[bench] == inputs)

    def record(self, bench: str, metrics: Mapping[str, float], inputs: list[str], seconds: float) -> None:
        self.metrics = {k: v for k, v in self.metrics.items() if not k.startswith(f"{bench}/")}
        self.metrics.update(metrics)
        self.done[bench] = list(inputs)
        self.timings[bench] = round(seconds, 1)

    def record_mteb_task(self, name: str, scores: Mapping[str, float], seconds: float) -> None:
        from me5.eval.paper import PAPER_MTEB_EN_BY_TYPE, mteb_task_key

        self.metrics.update(scores)
        self.timings["mteb"] = round(self.timings.get("mteb", 0.0) + seconds, 1)
        # the means over the tasks finished so far (the end of the run replaces them with evaluate_mteb's)
        per_type = {t: [self.metrics[mteb_task_key(n)] for n in names if mteb_task_key(n) in self.metrics]
                    for t, names in PAPER_MTEB_EN_BY_TYPE.items()}
        for t, values in per_type.items():
            if values:
                self.metrics[f"mteb/avg/{t.lower()}"] = sum(values) / len(values)
        every = [v for values in per_type.values() for v in values]
        if every:
            self.metrics["mteb/avg"] = sum(every) / len(every)

    def write(self, column: str, meta: dict) -> tuple:
        """``results.md`` and ``metrics.json`` as they stand; returns the side by side and the record."""
        from me5.eval.paper import side_by_side

        table = side_by_side(self.metrics, column)
        self.out.mkdir(parents=True, exist_ok=True)
        record = {"format": STATE_FORMAT, **meta, "fingerprint": self.fingerprint, "metrics": self.metrics,
                  "done": self.done, "paper": table.records(), "timings_s": self.timings}
        write_json(self.out / "metrics.json", record, indent=2)
        write_text(self.out / "results.md", table.markdown() + "\n")
        return table, record


@dataclass
class MtebPlan:
    """The suite's MTEB part: every task of its node, those still to do, and the node's settings (a command-line
    ``--batch-size`` / ``--mteb-cache-dir`` / ``--mteb-online`` over them)."""

    every: list
    todo: list
    batch_size: int
    cache_dir: str | None
    online: bool


def _suite_plan(args, prompts, *, work_dir: Path | None, state: SuiteState) -> tuple[dict, dict, MtebPlan | None]:
    """Every input of the suite, checked before the model is loaded: ``(evaluators, inputs, mteb)`` of what is
    still to do (a finished benchmark or MTEB task is left out, see :class:`SuiteState`).

    The benchmarks are the nodes of ``conf/eval/<suite>.yaml`` (:func:`suite_config`), built as a training run
    builds them; the command line changes only the languages or pairs found under ``--data-root``, the corpus
    shards' ``work_dir`` and, when given, ``--batch-size`` / ``--query-max-length`` / ``--passage-max-length``.
    A benchmark folder that is missing is an error (``--benchmarks`` runs fewer), as is a missing ``mteb``
    package or an MTEB dataset that is not in the local cache (or, with ``--mteb-online``, not reachable either);
    one with only some of the paper's languages or pairs is evaluated (its rows name their coverage) with a
    warning. MIRACL's corpora are encoded into shards under ``work_dir`` (each rank its part) when it is given.
    """
    from me5.app.pipeline import build
    from me5.eval.bitext import TASK_PAIRS
    from me5.eval.miracl import LANGUAGES

    root = Path(args.data_root)
    nodes = suite_config(args.suite, data_root=root, output_dir=args.output_dir or ".")
    unknown = [b for b in args.benchmarks or () if b not in nodes]
    if unknown:
        raise ConfigError("--benchmarks", f"'{unknown[0]}' is not a benchmark of --suite {args.suite} "
                                          f"(conf/eval/{args.suite}.yaml: {', '.join(nodes)})")
    wanted = list(dict.fromkeys(args.benchmarks or nodes))
    evaluators, inputs, missing = {}, {}, []
    for bench in [b for b in wanted if _kind(nodes[b]) != "mteb"]:
        node = nodes[bench]
        retrieval = _kind(node) == "retrieval"
        folder = Path(str(node.data.data_dir if retrieval else node.data))
        task = str(node.get("task", bench))
        fetch = _FETCH.get(task, f"the {task} layout in {folder}")
        if not folder.is_dir():
            if state.is_done(bench, None):
                log.info("%s: done before (%s is gone): kept", bench, folder)
                continue
            missing.append(f"{bench}: no folder {folder} (fetch: {fetch})")
            continue
        universe = list(node.get("languages") or LANGUAGES) if retrieval else TASK_PAIRS[task]
        present = [x for x in universe if (folder / x).is_dir()] if retrieval else \
            [x for x in universe if _has_pair(folder, x)]
        if not present:
            missing.append(f"{bench}: none of the paper's {len(universe)} {'languages' if retrieval else 'pairs'}"
                           f" in {folder} (fetch: {fetch})")
            continue
        if state.is_done(bench, present):
            log.info("%s: done before on the same %d inputs: not evaluated again", bench, len(present))
            continue
        _warn_missing(bench, universe, present, folder)
        inputs[bench] = present
        given = {"batch_size": args.batch_size}
        if retrieval:
            given |= {"query_max_length": args.query_max_length, "passage_max_length": args.passage_max_length,
                      "work_dir": str(work_dir) if work_dir is not None else None}
        else:
            given |= {"max_length": args.query_max_length}
        overrides = {k: v for k, v in given.items() if v is not None or k == "work_dir"}
        evaluators[bench] = build(node, prompts=prompts, languages=present, **overrides)
    mteb = None
    for bench in [b for b in wanted if _kind(nodes[b]) == "mteb"]:
        try:
            from me5.eval import mteb as me5_mteb
        except ImportError as err:
            missing.append(f"mteb: the mteb package cannot be imported ({err}); pip install 'mteb>=2' (in me5's dev "
                           f"extra)")
            continue
        from me5.eval.paper import mteb_task_key

        node = nodes[bench]
        every = _mteb_tasks(node)
        todo = [t for t in every if mteb_task_key(t.metadata.name) not in state.metrics]
        if len(every) > len(todo):
            log.info("mteb: %d task(s) done before: not evaluated again", len(every) - len(todo))
        mteb = MtebPlan(every, todo, int(args.batch_size or node.batch_size),
                        args.mteb_cache_dir if args.mteb_cache_dir is not None else node.get("cache_dir"),
                        bool(args.mteb_online) or not node.get("offline", True))
        try:
            me5_mteb.check_data(todo, cache_dir=mteb.cache_dir, online=mteb.online)
        except DataError as err:
            missing.append(f"mteb: {err}")
    if missing:
        raise DataError(f"--suite {args.suite}: {len(missing)} input(s) missing (--data-root {root}); nothing was "
                        f"evaluated (--benchmarks runs fewer):\n" + "\n".join(f"- {m}" for m in missing))
    return evaluators, inputs, mteb if mteb is not None and mteb.todo else None


def _kind(node) -> str:
    target = str(node.get("_target_", ""))
    return "mteb" if target.endswith("MtebEvaluator") else "retrieval" if target.endswith("RetrievalEvaluator") \
        else "bitext"


def _mteb_tasks(node) -> list:
    from me5.eval.mteb import paper_tasks, resolve_tasks

    tasks = node.get("tasks", "paper")
    return paper_tasks() if tasks == "paper" else resolve_tasks([tasks] if isinstance(tasks, str) else list(tasks))


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
        log.warning("%s: %d of the paper's %d are missing in %s (%s): its mean is not the paper's and its row has "
                    "no delta against the paper", bench, len(missing), len(wanted), folder, ", ".join(missing))


def run_suite(args: argparse.Namespace) -> dict[str, float]:
    """``--suite``: every benchmark of the suite, our scores beside the released checkpoint's and the paper's
    (``me5.eval.paper``), written to ``results.md``, ``metrics.json`` and (``--wandb``) a W&B table.

    Every input is checked before the model is loaded (:func:`_suite_plan`); the results are written after each
    benchmark and each MTEB task, and a rerun into the same ``--output-dir`` goes on where the last one stopped
    (:class:`SuiteState`).

    Under torchrun (``WORLD_SIZE`` > 1) the processes form a group (NCCL on GPUs, else gloo) for MIRACL: each
    rank reads, encodes (into ``<output dir>/embeddings``) and searches its part of every corpus. Then the group
    is ended and rank 0 alone runs bitext mining and MTEB and writes the results; the other ranks return (no
    rank waits in a collective while rank 0 runs the rest).
    """
    from me5.distributed import shutdown_process_group
    from me5.eval.paper import paper_model

    try:
        column = paper_model(args.paper_model or args.model)
    except ValueError as err:
        raise ConfigError("--paper-model", str(err)) from None
    settings = read_saved_settings(args.model).with_prompts(args.prompts)
    prompts = settings.prompts
    out = Path(args.output_dir or Path("outputs") / "eval" / (Path(args.model).name or "model"))
    fingerprint = {"model": str(args.model), "settings": settings.as_dict(), "query_max_length": args.query_max_length,
                   "passage_max_length": args.passage_max_length}
    state = SuiteState(out, fingerprint, fresh=args.fresh)
    # on disk with --output-dir, and always with several processes: the ranks share the corpus through the shards
    work_dir = out / "embeddings" if args.output_dir or launched_world() > 1 else None
    evaluators, inputs, mteb = _suite_plan(args, prompts, work_dir=work_dir, state=state)  # before the model
    meta = {"model": args.model, "suite": args.suite, "paper_model": column, "settings": settings.as_dict(),
            "world_size": launched_world()}
    if not evaluators and mteb is None:
        log.info("nothing left to evaluate in %s", out)
        if int(os.environ.get("RANK", "0")) != 0:  # under torchrun: rank 0 writes
            return state.metrics
        return _finish(args, state, column, meta, out)
    rank, world, device = start_distributed(args.device)
    meta["world_size"] = world

    def evaluate(bench: str) -> None:
        t0 = time.perf_counter()
        metrics = evaluators[bench].evaluate(encoder, tokenizer, device=device,
                                             show_progress=rank == 0 and sys.stderr.isatty())
        state.record(bench, metrics, inputs[bench], time.perf_counter() - t0)
        if rank == 0:
            state.write(column, meta)
            log.info("%s: done in %.1f s; results so far in %s", bench, time.perf_counter() - t0, out / "results.md")

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
        return state.metrics
    for bench in [b for b in evaluators if b not in shared]:
        evaluate(bench)
    if mteb is not None:
        from me5.eval.mteb import Me5MtebEncoder, evaluate_mteb

        wrapper = Me5MtebEncoder(encoder, tokenizer, prompts=prompts, name=str(args.model), device=device,
                                 batch_size=mteb.batch_size)
        clock = [time.perf_counter()]

        def on_task(name: str, scores: dict[str, float]) -> None:
            state.record_mteb_task(name, scores, time.perf_counter() - clock[0])
            clock[0] = time.perf_counter()
            state.write(column, meta)

        done = {k: v for k, v in state.metrics.items() if k.startswith("mteb/")}
        state.metrics.update(evaluate_mteb(wrapper, mteb.every, prompts=prompts, batch_size=mteb.batch_size,
                                           cache_dir=mteb.cache_dir, offline=not mteb.online, done=done,
                                           on_task=on_task))
    return _finish(args, state, column, meta, out)


def _finish(args, state: SuiteState, column: str, meta: dict, out: Path) -> dict[str, float]:
    table, record = state.write(column, meta)
    print(table.markdown())
    print(f"\nresults: {out / 'results.md'}")
    if args.wandb:
        _log_wandb(table, record, out)
    return state.metrics


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
