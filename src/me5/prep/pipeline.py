"""The options of the ``prepare`` pipeline, its plan (inputs, folders) and its executors (datatrove local/SLURM).

:func:`run_prep` is the entry point; the stages' work is in :mod:`me5.prep.stages`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

from me5.data.readers import resolve_files
from me5.errors import ConfigError, DataError
from me5.jsonio import read_json, write_json
from me5.prompts import STYLES

if TYPE_CHECKING:
    from me5.data.source import Source

log = logging.getLogger(__name__)

WORK = "_prep"  # the pipeline's own folder inside the output folder
PLAN_VERSION = 1
EXECUTORS = ("local", "slurm")

#: named settings of the consistency filter; ``paper``: E5's (arXiv 2212.03533 sec. 3.1: a pair is kept when its
#: positive ranks in the top 2 among 1M random passages)
CONSISTENCY_PRESETS: dict[str, dict] = {"paper": {"pool": 1_000_000, "top_k": 2}}


@dataclass
class ConsistencyOptions:
    """The consistency filter of the pipeline (``write`` stage), scored by a saved model.

    Args:
        model: an exported me5 folder or any ``Encoder.from_pretrained`` path.
        pool: passages sampled per source (the smallest seeded hashes of its distinct positives).
        top_k: a pair is kept when its positive ranks in the top ``top_k`` among itself and the pool.
        prompt_style: the model's prompt style (``me5.prompts.STYLES``); ``None``: its own saved policy
            (:func:`me5.mining.consistency.model_policy`), read once by :func:`run_prep`.
        max_length / max_batch / max_tokens / precision / packed: the embed core's settings
            (:func:`me5.embed.encode.encode_corpus`: fp16 autocast on CUDA; ``packed`` builds the encoder with
            ``packed=True``, padding-free rows).
        shard_rows: rows per embedding shard (the unit a killed filter resumes from).
        chunk_rows: pairs embedded and searched at a time in a bucket (memory: 2 x chunk_rows x dim floats).
        search: ``faiss`` (exact ``IndexFlatIP``, on the GPU where faiss has one) or ``exact`` (torch blocks).
        device: the model's device (default: cuda when available).
    """

    model: str
    pool: int = 100_000
    top_k: int = 2
    prompt_style: str | None = None
    max_length: int = 128
    max_batch: int = 256
    max_tokens: int | None = None
    precision: str = "fp16"
    packed: bool = False
    shard_rows: int = 65536
    chunk_rows: int = 262144
    search: str = "faiss"
    device: str | None = None

    @classmethod
    def preset(cls, name: str, **overrides) -> ConsistencyOptions:
        """The options of :data:`CONSISTENCY_PRESETS` ``[name]`` with ``overrides``."""
        if name not in CONSISTENCY_PRESETS:
            raise ConfigError("prepare.consistency_preset", f"unknown preset '{name}'; choose one of "
                                                            f"{sorted(CONSISTENCY_PRESETS)}")
        return cls(**{**CONSISTENCY_PRESETS[name], **overrides})

    def check(self) -> None:
        for name in ("pool", "top_k", "max_length", "max_batch", "shard_rows", "chunk_rows"):
            if int(getattr(self, name)) < 1:
                raise ConfigError(f"prepare.consistency_{name}", f"must be >= 1, got {getattr(self, name)}")
        if self.prompt_style is not None and self.prompt_style not in STYLES:
            raise ConfigError("prepare.prompt_style", f"unknown prompt style '{self.prompt_style}'; choose one of "
                                                      f"{list(STYLES)}")
        if self.search not in ("faiss", "exact"):
            raise ConfigError("prepare.consistency_search", f"unknown '{self.search}'; choose faiss or exact")


@dataclass
class SlurmOptions:
    """datatrove's ``SlurmPipelineExecutor`` settings (one job array per stage, chained by dependencies).

    ``gpus`` go to the stages that embed (``pool``, ``write`` with a consistency model); ``venv`` is activated in
    the job script (default: the running interpreter's venv); ``sbatch_args``: any other ``#SBATCH`` lines."""

    partition: str = "cpu"
    gpu_partition: str | None = None
    time: str = "24:00:00"
    cpus_per_task: int = 4
    mem_per_cpu_gb: int = 4
    gpus: int = 1
    qos: str | None = None
    venv: str | None = None
    job_name: str = "me5-prepare"
    sbatch_args: dict = field(default_factory=dict)


@dataclass
class PrepOptions:
    """What :func:`run_prep` does. The first fields are ``me5.data.shards.PrepareOptions``'s, with the same
    meaning; the rest are the pipeline's.

    Args:
        dedup: remove exact duplicates (same query and positive) across the whole corpus.
        buckets: hash partitions of the dedup (``write`` tasks); a bucket is held in memory by one task, so
            about ``pairs / 2M`` for a large corpus (1B pairs: 512).
        read_tasks: tasks of the ``read`` stage (inputs are shared out round-robin).
        workers: tasks run at once by the local executor (1: in this process).
        flush_rows: kept rows a read task buffers before writing a row group to each bucket file.
        executor: ``local`` (datatrove's ``LocalPipelineExecutor``) or ``slurm`` (``SlurmPipelineExecutor``).
        start_method: how the local executor starts its worker processes (``fork``: no re-import of torch and
            the sources in each; datatrove's default ``forkserver`` costs ~10 s a stage here). The embedding
            stages (``pool``, ``write`` with a consistency model) use ``forkserver`` with ``workers > 1``.
        consistency: the consistency filter (``None``: off).
    """

    shard_rows: int = 100_000
    row_group_rows: int = 10_000
    max_chars: int | None = None
    langs: Sequence[str] | None = None
    eval_sets: Sequence[str] = ()
    strict: bool = False
    seed: int = 0
    split_langs: bool = False
    dedup: bool = True
    buckets: int = 16
    read_tasks: int = 8
    workers: int = 1
    flush_rows: int = 50_000
    executor: str = "local"
    start_method: str = "fork"
    consistency: ConsistencyOptions | None = None
    slurm: SlurmOptions = field(default_factory=SlurmOptions)
    force: bool = False

    def check(self) -> None:
        for name in ("shard_rows", "row_group_rows", "buckets", "read_tasks", "workers", "flush_rows"):
            if int(getattr(self, name)) < 1:
                raise ConfigError(f"prepare.{name}", f"must be >= 1, got {getattr(self, name)}")
        if self.max_chars is not None and self.max_chars < 1:
            raise ConfigError("prepare.max_chars", f"must be >= 1, got {self.max_chars}")
        if self.executor not in EXECUTORS:
            raise ConfigError("prepare.executor", f"unknown '{self.executor}'; choose one of {list(EXECUTORS)}")
        if self.consistency is not None:
            self.consistency.check()

    def fingerprint(self) -> dict:
        """What changes the output (the plan refuses a folder prepared with other values)."""
        out = {k: getattr(self, k) for k in ("shard_rows", "row_group_rows", "max_chars", "strict", "seed",
                                            "split_langs", "dedup", "buckets")}
        out["langs"] = sorted(self.langs) if self.langs else None
        out["eval_sets"] = [str(Path(p).resolve()) for p in self.eval_sets]
        c = self.consistency
        out["consistency"] = None if c is None else {k: getattr(c, k) for k in (
            "model", "pool", "top_k", "prompt_style", "max_length", "precision", "packed")}
        return out


# ============================================================================================== the plan
@dataclass(frozen=True)
class Unit:
    """One input of the pipeline: a local file of a source, or its hub stream (``file=None``)."""

    index: int  # global, in (source order, file order): the order duplicates are resolved in
    source: str
    file: str | None


@dataclass
class Plan:
    """The inputs and folders of one pipeline run (pickled into every task)."""

    out: str
    sources: dict  # output name -> Source
    units: list[Unit]
    opts: PrepOptions
    scorer: object = None  # the consistency filter's scorer when not built from ``opts.consistency.model``

    @property
    def work(self) -> Path:
        return Path(self.out) / WORK

    def read_dir(self, unit: int) -> Path:
        return self.work / "read" / f"{unit:06d}"

    def bucket_file(self, unit: int, bucket: int) -> Path:
        return self.read_dir(unit) / f"b{bucket:05d}.parquet"

    def pool_dir(self, source: str) -> Path:
        return self.work / "pool" / source

    def bucket_stats(self, bucket: int) -> Path:
        return self.work / "write" / f"b{bucket:05d}.json"

    def eval_digests(self) -> Path:
        return self.work / "eval_digests.npy"

    def logs(self, stage: str) -> Path:
        return self.work / "logs" / stage

    def source_names(self) -> list[str]:
        return list(self.sources)


def make_plan(sources: Mapping[str, Source], out: str | os.PathLike, opts: PrepOptions) -> Plan:
    """The units of ``sources`` (each source's files in order, or its hub stream), checked against an earlier
    run in ``out`` (the same inputs and options, or an error; ``opts.force`` starts over)."""
    units: list[Unit] = []
    for name, src in sources.items():
        if "/" in name or name.startswith((".", "_")):
            raise ConfigError(f"prepare.sources.{name}", "a source name is a folder name: no '/', no leading '.' or '_'")
        files = resolve_files(src.path, src.data_files)
        if files is None:
            units.append(Unit(len(units), name, None))
        else:
            units += [Unit(len(units) + i, name, str(f)) for i, f in enumerate(files)]
    plan = Plan(str(Path(out).resolve()), dict(sources), units, opts)  # tasks may run elsewhere (SLURM)
    record = {"version": PLAN_VERSION, "options": opts.fingerprint(),
              "units": [[u.source, u.file or f"hub:{sources[u.source].path}"] for u in units],
              "sources": {n: repr(s) for n, s in sources.items()}}
    path = plan.work / "plan.json"
    if opts.force and plan.work.exists():
        for name in [*sources, WORK]:
            shutil.rmtree(Path(out) / name, ignore_errors=True)
    if path.is_file():
        old = json.loads(path.read_text(encoding="utf-8"))
        if old != json.loads(json.dumps(record)):
            differ = sorted(k for k in record if old.get(k) != json.loads(json.dumps(record[k])))
            differ += sorted(f"options.{k}" for k in record["options"]
                             if (old.get("options") or {}).get(k) != json.loads(json.dumps(record["options"][k])))
            raise DataError(f"the folder holds a run with other inputs or options (differs: {', '.join(differ)}); "
                            "pass force to start over, or use another folder", file=str(path))
    else:
        plan.work.mkdir(parents=True, exist_ok=True)
        write_json(path, record)
    return plan


def pair_key(query: str, positive: str) -> int:
    """The dedup key of a pair: 64 bits of blake2b over both texts (equal keys are compared by text too)."""
    h = hashlib.blake2b(query.encode("utf-8"), digest_size=8)
    h.update(b"\x00")
    h.update(positive.encode("utf-8"))
    return int.from_bytes(h.digest(), "little")


def text_key(text: str, seed: int) -> int:
    """A seeded 64-bit hash of a text (the pool sample: the smallest keys of a source's positives)."""
    h = hashlib.blake2b(text.encode("utf-8"), digest_size=8, key=seed.to_bytes(8, "little", signed=True))
    return int.from_bytes(h.digest(), "little")


# ============================================================================================== executors
def stage_list(plan: Plan) -> list[tuple[str, object, int]]:
    """``(name, step, tasks)`` of every stage of ``plan``, in order."""
    from me5.prep import stages

    opts = plan.opts
    out: list[tuple[str, object, int]] = []
    if opts.eval_sets:
        out.append(("eval", stages.EvalDigestsStep(plan), 1))
    out.append(("read", stages.ReadStep(plan), min(opts.read_tasks, max(1, len(plan.units)))))
    if opts.consistency is not None:
        out.append(("pool", stages.PoolStep(plan), len(plan.sources)))
    out.append(("write", stages.WriteStep(plan), opts.buckets))
    out.append(("merge", stages.MergeStep(plan), 1))
    return out


def build_executors(plan: Plan):
    """The datatrove executors of ``plan``'s stages, each depending on the one before; run the last."""
    opts = plan.opts
    executors = []
    prev = None
    for name, step, tasks in stage_list(plan):
        gpu = name in ("pool", "write") and opts.consistency is not None
        if opts.executor == "local":
            from datatrove.executor import LocalPipelineExecutor

            # a CUDA context does not survive fork: the embedding stages' workers start fresh
            ex = LocalPipelineExecutor([step], tasks=tasks, workers=min(opts.workers, tasks),
                                       start_method="forkserver" if gpu else opts.start_method,
                                       logging_dir=str(plan.logs(name)), depends=prev)
        else:
            from datatrove.executor import SlurmPipelineExecutor

            s = opts.slurm
            venv = s.venv or os.environ.get("VIRTUAL_ENV")
            ex = SlurmPipelineExecutor(
                [step], tasks=tasks, time=s.time,
                partition=(s.gpu_partition or s.partition) if gpu else s.partition,
                cpus_per_task=s.cpus_per_task, mem_per_cpu_gb=s.mem_per_cpu_gb, gpus_per_task=s.gpus if gpu else 0,
                job_name=f"{s.job_name}-{name}", qos=s.qos, venv_path=f"{venv}/bin/activate" if venv else None,
                sbatch_args=dict(s.sbatch_args), logging_dir=str(plan.logs(name)), depends=prev,
                slurm_logs_folder=str(plan.logs(name) / "slurm"))
        executors.append(ex)
        prev = ex
    return executors


def consistency_prompt_style(options: ConsistencyOptions, scorer=None) -> str:
    """The prompt style of the consistency model's prefixes: ``options.prompt_style`` when given, else the model's
    own saved policy (:func:`me5.mining.consistency.model_policy`). A scorer given as an
    :data:`~me5.data.consistency.Embedder` prompts by itself (the prefixes are not passed to it): ``none``; a
    scorer object needs ``prompt_style`` (the prefixes it is given)."""
    if options.prompt_style is not None:
        return options.prompt_style
    if scorer is not None and not hasattr(scorer, "embed"):
        return "none"
    if scorer is not None:
        raise ConfigError("prepare.prompt_style", "a scorer object given in place of the model needs the prompt "
                                                  "style of its prefixes")
    from me5.mining.consistency import model_policy

    return model_policy(options.model).style


def run_prep(sources: Mapping[str, Source], out_dir: str | os.PathLike, options: PrepOptions | None = None, *,
             scorer=None) -> dict[str, dict]:
    """Prepare ``sources`` into ``out_dir/<name>/`` with the pipeline; returns ``{name: stats}`` (as
    ``me5.data.shards.prepare``; also ``out_dir/stats.json``). With ``executor="slurm"`` the jobs are submitted
    and ``{}`` is returned (the ``merge`` job writes the stats).

    ``scorer`` (optional, tests and small runs): the consistency filter's scorer instead of
    ``options.consistency.model`` (an :data:`~me5.data.consistency.Embedder`, or any object with
    ``embed(texts, kind, folder, prefix)``). The prompt style is read here, once (:func:`consistency_prompt_style`).
    """
    opts = options or PrepOptions()
    opts.check()
    if scorer is not None and opts.consistency is None:
        raise ConfigError("prepare.consistency", "a scorer needs the consistency options (pool, top_k)")
    if opts.consistency is not None and opts.consistency.prompt_style is None:
        style = consistency_prompt_style(opts.consistency, scorer)
        opts = replace(opts, consistency=replace(opts.consistency, prompt_style=style))
    plan = make_plan(sources, out_dir, opts)
    for src in sources.values():
        src.check()
    plan.scorer = scorer
    executors = build_executors(plan)
    if opts.executor == "local":
        # datatrove's per-task console log (stats tables, tracebacks) goes to a file: the caller reports errors
        console = plan.work / "logs" / "datatrove.log"
        console.parent.mkdir(parents=True, exist_ok=True)
        log.info("prepare: %d inputs, stages %s; datatrove's log: %s", len(plan.units),
                 [s[0] for s in stage_list(plan)], console)
        from datatrove.utils.logging import setup_default_logger

        try:
            with open(console, "a", encoding="utf-8") as fh, contextlib.redirect_stderr(fh):
                setup_default_logger()  # the executor's own summaries too (its handler holds sys.stderr)
                executors[-1].run()
        finally:
            setup_default_logger()
    else:
        executors[-1].run()
    if opts.executor != "local":
        return {}
    overall = read_json(Path(out_dir) / "stats.json") or {}
    return {name: overall[name] for name in sources if name in overall}
