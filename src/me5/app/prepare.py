"""``python -m me5.prepare``: raw sources -> sharded parquet files of the normalised schema.

It runs as a pipeline of datatrove stages (:mod:`me5.prep`; ``--engine pipeline``, the default): read and
classify -> exact duplicates (same query and positive) removed across the whole corpus (``--no-dedup``: kept) ->
decontaminated -> optionally consistency-filtered -> written, on this machine (``--executor local``,
``--workers`` processes) or as SLURM job arrays (``--executor slurm``, ``--slurm-*``). ``--engine inline`` is the
one-process path of ``me5.data.shards`` (no dedup; ``--max-shards``). ``experiments/data_prep.md`` has the design
and the figures.

For each source (a source class and its raw path, or a config of several) it writes

* ``OUT/<source>/part-<bucket>-<shard>.parquet`` (inline: ``part-<input>-<shard>``): columns ``query, positive, negatives, teacher_scores, lang,
  source``; each shard's rows shuffled (seeded), in row groups of ``--row-group-rows`` rows (the units the
  streaming readers share out); with ``--split-langs`` every row group holds **one language**, which language
  temperature needs when streaming (each language is then its own stream, and a worker holds one row group
  per language and source: lower ``--row-group-rows`` when there are hundreds);
* ``OUT/<source>/shards.json``: the shard manifest the streaming readers plan from (no footer reads);
* ``OUT/<source>/stats.json`` and ``OUT/stats.json``: read / kept / skipped-by-reason counts per source and per
  language, also printed as a table.

Optional steps from the English E5 recipe (arXiv 2212.03533):

* ``--eval-sets DIR ...``: drop pairs whose query or positive passage appears in an evaluation set in its published
  layout (BEIR ``corpus.jsonl``/``queries.jsonl``, or per-language subfolders of them; MIRACL's ``miracl-corpus``
  and ``miracl`` downloads; MTEB v2 hub folders); exact match after whitespace normalisation
  (``skipped/eval_overlap``);
* ``--consistency-model PATH``: keep a pair only when its positive ranks in the top ``--consistency-top-k``
  (default 2) among itself and a random pool of ``--consistency-pool`` passages of the same source, scored by an
  existing model (an exported me5 folder or any ``Encoder.from_pretrained`` path; ``--consistency-preset paper``:
  E5's 1M pool and top 2)
  (``skipped/inconsistent``). The model embeds with its own saved prompt policy (its ``me5.json``, else the
  prompts of its sentence-transformers files, as ``me5.evaluate`` reads them; ``--prompt-style`` ``e5``,
  ``instruct`` or ``none`` overrides it): its query and passage prompts follow each source's task (its
  instruction, and ``symmetric``), as in training.

Bad data is skipped and counted per reason (``undecodable``, ``malformed_json``, ``missing_field``,
``empty_text``, ``bad_type``, ``bad_teacher_scores``, ``malformed``, ``too_long``, ``wrong_language`` with
``--langs``, and the reasons a source's ``convert`` gives; the same reasons as the training loader's, see
``me5.data.records``), or with ``--strict`` stops with an error naming file:line.

Interrupted runs resume. The pipeline: finished stages, tasks, inputs and embedding shards are kept; a killed
bucket is redone. Inline: each input file has a progress marker (``_progress/<input>.json``) holding the input
position after the last written shard and the counts so far; shards are written atomically, so a rerun skips
finished inputs and continues the others where their last shard ended.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from me5.app.cli import import_object, parse_key_values
from me5.data.shards import PrepareOptions, format_stats, prepare
from me5.errors import ConfigError, Me5Error
from me5.prompts import STYLES


def build_sources(args) -> tuple[dict[str, object], dict]:
    """The sources (and config-file options) named on the command line."""
    if args.config:
        from hydra.utils import instantiate
        from omegaconf import OmegaConf

        cfg = OmegaConf.load(args.config)
        if "sources" not in cfg:
            raise ConfigError("prepare.sources", f"{args.config} has no 'sources' mapping")
        names = list(cfg.sources)
        if args.only:
            unknown = set(args.only) - set(names)
            if unknown:
                raise ConfigError("prepare.only", f"no source {sorted(unknown)} in {args.config}; sources: {names}")
            names = [n for n in names if n in args.only]
        sources = {}
        for n in names:
            node = cfg.sources[n]
            if "_target_" not in node:
                raise ConfigError(f"prepare.sources.{n}", "needs a _target_ (the source class)")
            sources[n] = instantiate(node, name=n) if "name" not in node else instantiate(node)
        opts = {k: v for k, v in OmegaConf.to_container(cfg, resolve=True).items() if k != "sources"}
        return sources, opts
    if not args.source or not args.raw:
        raise ConfigError("prepare", "give --source CLASS --raw PATH, or --config FILE")
    cls = import_object(args.source, field="prepare.source")
    src = cls(args.raw, **parse_key_values(args.source_arg, field="prepare.source_arg"))
    return {args.name or src.name: src}, {}


#: the pipeline's own options (``me5.prep.PrepOptions`` and the consistency/slurm flags), besides ``PrepareOptions``'
PIPELINE_KEYS = ("dedup", "buckets", "read_tasks", "workers", "flush_rows", "executor", "start_method", "consistency",
                 "slurm", "consistency_preset", "consistency_packed", "consistency_precision", "consistency_search",
                 "slurm_partition", "slurm_gpu_partition", "slurm_time", "slurm_cpus", "slurm_mem_gb", "slurm_gpus",
                 "slurm_venv", "slurm_qos")


def pipeline_options(flat: dict):
    """:class:`me5.prep.PrepOptions` from the flat options (config file, then flags)."""
    from me5.prep.pipeline import ConsistencyOptions, PrepOptions, SlurmOptions

    cons = dict(flat.get("consistency") or {})
    for flag, name in (("consistency_model", "model"), ("consistency_pool", "pool"), ("consistency_top_k", "top_k"),
                       ("consistency_batch_size", "max_batch"), ("consistency_max_length", "max_length"),
                       ("prompt_style", "prompt_style"), ("device", "device"), ("consistency_packed", "packed"),
                       ("consistency_precision", "precision"), ("consistency_search", "search")):
        if flat.get(flag) is not None:
            cons[name] = flat[flag]
    consistency = None
    if cons.get("model") is not None:
        preset = flat.get("consistency_preset")
        consistency = ConsistencyOptions.preset(preset, **cons) if preset else ConsistencyOptions(**cons)
    elif flat.get("consistency_preset"):
        raise ConfigError("prepare.consistency_preset", "needs --consistency-model (the scoring model)")
    slurm = dict(flat.get("slurm") or {})
    for flag, name in (("slurm_partition", "partition"), ("slurm_gpu_partition", "gpu_partition"),
                       ("slurm_time", "time"), ("slurm_cpus", "cpus_per_task"), ("slurm_mem_gb", "mem_per_cpu_gb"),
                       ("slurm_gpus", "gpus"), ("slurm_venv", "venv"), ("slurm_qos", "qos")):
        if flat.get(flag) is not None:
            slurm[name] = flat[flag]
    kw = {k: flat[k] for k in ("shard_rows", "row_group_rows", "max_chars", "langs", "eval_sets", "strict", "seed",
                               "split_langs", "dedup", "buckets", "read_tasks", "workers", "flush_rows", "executor",
                               "start_method", "force") if flat.get(k) is not None}
    return PrepOptions(**kw, consistency=consistency, slurm=SlurmOptions(**slurm))


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m me5.prepare", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="output folder (one subfolder per source)")
    p.add_argument("--source", help="source class, e.g. me5.data.sources.columns.ColumnPairs")
    p.add_argument("--raw", help="the source's raw path (file, folder or hub id)")
    p.add_argument("--name", help="output name of the source (default: its source_name)")
    p.add_argument("--source-arg", action="append", metavar="KEY=VALUE", help="constructor argument (YAML value)")
    p.add_argument("--config", help="YAML with 'sources: {name: {_target_: CLASS, path: ..., ...}}' and options")
    p.add_argument("--only", nargs="+", help="with --config: prepare only these sources")
    p.add_argument("--engine", choices=("pipeline", "inline"), default="pipeline",
                   help="pipeline: the datatrove stages (me5.prep, default); inline: one process (me5.data.shards)")
    p.add_argument("--shard-rows", type=int)
    p.add_argument("--row-group-rows", type=int)
    p.add_argument("--max-chars", type=int)
    p.add_argument("--langs", help="comma-separated language codes to keep (script-checked)")
    p.add_argument("--eval-sets", nargs="+", help="eval sets (BEIR, MIRACL or MTEB layout) removed by exact match")
    p.add_argument("--consistency-model", help="exported me5 folder or Encoder.from_pretrained path")
    p.add_argument("--consistency-preset", help="named pool/top-k: 'paper' = E5's 1M passages, top 2")
    p.add_argument("--consistency-top-k", type=int)
    p.add_argument("--consistency-pool", type=int)
    p.add_argument("--consistency-batch-size", type=int)
    p.add_argument("--consistency-max-length", type=int)
    p.add_argument("--consistency-precision", choices=("fp16", "bf16", "fp32"), help="pipeline: autocast on CUDA")
    p.add_argument("--consistency-packed", action="store_true", default=None, help="pipeline: packed rows")
    p.add_argument("--consistency-search", choices=("faiss", "exact"), help="pipeline: pool search (default faiss)")
    p.add_argument("--prompt-style", choices=STYLES,
                   help="override the consistency model's saved prompt policy (default: the model's own)")
    p.add_argument("--device")
    p.add_argument("--seed", type=int)
    p.add_argument("--max-shards", type=int, help="inline: stop after writing this many shards (rerun to continue)")
    p.add_argument("--split-langs", action="store_true", help="single-language row groups (language temperature)")
    p.add_argument("--strict", action="store_true", help="a bad record is an error naming file:line")
    p.add_argument("--force", action="store_true", help="start over (delete the sources' output folders)")
    p.add_argument("--no-progress", action="store_true")
    g = p.add_argument_group("pipeline (--engine pipeline)")
    g.add_argument("--no-dedup", dest="dedup", action="store_false", default=None,
                   help="keep exact duplicates (same query and positive)")
    g.add_argument("--buckets", type=int, help="dedup hash partitions = write tasks (default 16; ~pairs/2M)")
    g.add_argument("--read-tasks", type=int, help="read tasks (default 8)")
    g.add_argument("--workers", type=int, help="local executor: tasks run at once (default 1)")
    g.add_argument("--executor", choices=("local", "slurm"), help="datatrove executor (default local)")
    g.add_argument("--slurm-partition")
    g.add_argument("--slurm-gpu-partition", help="partition of the embedding stages (default: --slurm-partition)")
    g.add_argument("--slurm-time")
    g.add_argument("--slurm-cpus", type=int)
    g.add_argument("--slurm-mem-gb", type=int, help="memory per CPU")
    g.add_argument("--slurm-gpus", type=int, help="GPUs of each embedding task (default 1)")
    g.add_argument("--slurm-qos")
    g.add_argument("--slurm-venv", help="venv activated in the job scripts (default: the running one)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        sources, cfg_opts = build_sources(args)
        fields = {f.name for f in PrepareOptions.__dataclass_fields__.values()}
        unknown = set(cfg_opts) - fields - set(PIPELINE_KEYS)
        if unknown:
            raise ConfigError(f"prepare.{sorted(unknown)[0]}",
                              f"unknown option; options: {sorted(fields | set(PIPELINE_KEYS))}")
        flat = dict(cfg_opts)
        for name, v in vars(args).items():
            if v is not None and (v is not False or name == "dedup") and (name in fields or name in PIPELINE_KEYS):
                flat[name] = v
        if isinstance(flat.get("langs"), str):
            flat["langs"] = [x.strip() for x in flat["langs"].split(",") if x.strip()]
        if args.engine == "pipeline":
            if flat.get("max_shards") is not None:
                raise ConfigError("prepare.max_shards", "is the inline engine's (--engine inline); the pipeline "
                                  "resumes by itself: kill it and run the same command again")
            from me5.prep import run_prep

            opts = pipeline_options(flat)
            stats = run_prep(sources, args.out, opts)
            if opts.executor != "local":
                print(f"submitted; the merge job writes {Path(args.out) / 'stats.json'}")
                return 0
        else:
            extra = sorted(set(flat) & set(PIPELINE_KEYS))
            if extra:
                raise ConfigError(f"prepare.{extra[0]}", "is an option of the pipeline (--engine pipeline)")
            opts = PrepareOptions(**{k: v for k, v in flat.items() if k in fields})
            opts.progress = not args.no_progress and opts.progress
            embedder_for = None
            if opts.consistency_model is not None:  # the model half is mining's: me5.data loads no model
                from me5.mining.consistency import source_embedders

                opts, embedder_for = source_embedders(opts)
            stats = prepare(sources, args.out, opts, embedder_for=embedder_for)
    except Me5Error as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(format_stats(stats))
    if stats.get("_stopped"):
        print(f"\nstopped after {opts.max_shards} shard(s); run the same command again to continue")
    else:
        print(f"\nstats: {Path(args.out) / 'stats.json'}")
    return 0
