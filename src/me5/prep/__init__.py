"""``prepare`` at scale: raw sources -> deduplicated, decontaminated, optionally consistency-filtered parquet
shards, as a pipeline of datatrove stages (local by default, SLURM through datatrove's executor).

Stages (each a datatrove ``PipelineStep``; ``experiments/data_prep.md`` says why datatrove):

1. ``eval`` (1 task, with ``eval_sets``): the eval sets' text digests, one sorted array every worker memory-maps.
2. ``read`` (``read_tasks`` tasks): each raw input (a file of a source, or a hub stream) is read through the
   source's :class:`~me5.data.records.RecordClassifier` (the loader's and ``me5.data.shards.prepare``'s: the same
   kept rows and skip reasons), with the language and eval-overlap checks; kept rows are hash-partitioned by
   (query, positive) into ``buckets`` files per input. An input's done-marker holds its counts.
3. ``pool`` (1 task per source, with a consistency model): a uniform sample of each source's positives (the
   smallest seeded hashes: the same sample whatever the task count) embedded through the embed core.
4. ``write`` (``buckets`` tasks): each bucket's exact duplicates (same query and positive, anywhere in the
   corpus) are removed, keeping the first in (source, input, line) order; the consistency filter embeds the rest
   and searches the pool with FAISS; the kept rows are written as ``me5.prepare`` shards (per-language row
   groups with ``split_langs``).
5. ``merge`` (1 task): per-source and per-language counts by reason, the shard manifests, ``OUT/stats.json``.

A killed run continues where it stopped: datatrove skips finished tasks, a read task skips finished inputs, a
write task redoes its bucket only, and embeddings resume by shard (``me5.embed.encode.encode_corpus``). The
output depends on the data and the options only, not on the number of tasks or workers (tested).
"""

from me5.prep.pipeline import CONSISTENCY_PRESETS, ConsistencyOptions, PrepOptions, SlurmOptions, run_prep

__all__ = ["CONSISTENCY_PRESETS", "ConsistencyOptions", "PrepOptions", "SlurmOptions", "run_prep"]
