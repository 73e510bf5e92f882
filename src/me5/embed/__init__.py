"""Embed and search: the code that evaluation, mining and the consistency filter share (:mod:`me5.mining`).

* :mod:`me5.embed.encode`: :func:`~me5.embed.encode.encode_texts` (in memory) and
  :func:`~me5.embed.encode.encode_corpus` (fp16 shards split over ranks, resumable) with length-sorted
  token-budget batches; :class:`~me5.embed.encode.EmbeddingShards` streams the shards back.
* :mod:`me5.embed.search`: exact blockwise top-k (torch) and FAISS top-k, one API, ties in trec_eval's order.

The submodules are imported where they are used.
"""
