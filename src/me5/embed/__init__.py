"""Embed and search: the code that evaluation, mining and the consistency filter share.

* :mod:`me5.embed.encode`: :func:`~me5.embed.encode.encode_texts` (in memory) and
  :func:`~me5.embed.encode.encode_corpus` (fp16 shards split over ranks, resumable) with length-sorted
  token-budget batches; :class:`~me5.embed.encode.EmbeddingShards` streams the shards back.
* :mod:`me5.embed.search`: exact blockwise top-k (torch) and FAISS top-k, one API, ties in trec_eval's order.
* :mod:`me5.embed.consistency`: the consistency filter of ``me5.prepare``.
* :mod:`me5.embed.mine`: hard-negative mining (rank window, positive-aware guards, sampling; the sharded,
  resumable driver of ``me5.mine``), on the two modules above.
* :mod:`me5.embed.teacher`: cross-encoder teacher scores (``me5.score``), batched by the encoder's planner.

The submodules are imported where they are used (``me5.data.shards`` reaches ``consistency`` lazily).
"""
