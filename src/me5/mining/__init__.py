"""Stage-2 data from a model: hard negatives, teacher scores and the consistency filter, on :mod:`me5.embed`.

* :mod:`me5.mining.options`: :class:`~me5.mining.options.MineOptions` (the ``me5.mine`` flags, checked early) and
  the faiss index string's checks.
* :mod:`me5.mining.plan`: :func:`~me5.mining.plan.plan_mining`: the records and corpus of a job, each record's
  positive and excluded rows, checked before any model is loaded; corpus files, a source's records.
* :mod:`me5.mining.select`: the rank window, the positive-aware guards, the pick order and the teacher re-check
  (:func:`~me5.mining.select.select_negatives`), pure functions over search results.
* :mod:`me5.mining.output`: :class:`~me5.mining.output.ShardedOutput`: stage-2 shards shared out over processes,
  run keys and completion markers (resumable), the manifest and stats.
* :mod:`me5.mining.mine`: :func:`~me5.mining.mine.mine`, the driver of ``me5.mine`` (its docstring has the story).
* :mod:`me5.mining.teacher`: cross-encoder teacher scores (``me5.score``):
  :class:`~me5.mining.teacher.CrossEncoderScorer`, :func:`~me5.mining.teacher.score_records`.
* :mod:`me5.mining.consistency`: the consistency filter's model half (the saved model's embedder and prompt policy,
  the pipeline's scorers and pool search); the filter itself is :mod:`me5.data.consistency`, which the inline
  ``me5.data.shards.prepare`` is given embedders for (:func:`~me5.mining.consistency.source_embedders`).

The submodules are imported where they are used.
"""
