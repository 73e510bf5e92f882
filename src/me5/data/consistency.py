"""The consistency filter of the English E5 recipe (arXiv 2212.03533), its model-free half: keep a pair only when
its positive ranks near the top among a pool of other passages, as an :data:`Embedder` scores them.

:func:`me5.data.shards.prepare` samples the pool and filters with :class:`ConsistencyFilter`; the scorer is the
caller's (the data room loads no model): ``mining.consistency.source_embedders`` builds one per source
from a saved model (``me5.prepare --consistency-model``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

Embedder = Callable[[Sequence[str], str], np.ndarray]  # (texts, "query" | "passage") -> (N, D) scores by dot


class ConsistencyFilter:
    """Keeps a pair when its positive ranks in the top ``top_k`` among itself and a pool of passages.

    Rank = 1 + the number of pool passages that score strictly higher than the positive for the query.
    """

    def __init__(self, embed: Embedder, pool_texts: Sequence[str], *, top_k: int = 2, batch_size: int = 256,
                 pool_embeddings: np.ndarray | None = None):
        self.embed, self.top_k, self.batch_size = embed, top_k, batch_size
        self.pool_texts = list(pool_texts)
        if pool_embeddings is None:
            pool_embeddings = np.concatenate([
                np.asarray(embed(self.pool_texts[i: i + batch_size], "passage"), dtype=np.float32)
                for i in range(0, len(self.pool_texts), batch_size)]) if self.pool_texts else np.zeros((0, 1), np.float32)
        self.pool = np.asarray(pool_embeddings, dtype=np.float32)

    def ranks(self, queries: Sequence[str], positives: Sequence[str]) -> np.ndarray:
        out = []
        for i in range(0, len(queries), self.batch_size):
            q = np.asarray(self.embed(queries[i: i + self.batch_size], "query"), dtype=np.float32)
            p = np.asarray(self.embed(positives[i: i + self.batch_size], "passage"), dtype=np.float32)
            s_pos = (q * p).sum(axis=1)
            higher = np.zeros(len(q), dtype=np.int64)
            for j in range(0, len(self.pool), 65536):
                higher += (q @ self.pool[j: j + 65536].T > s_pos[:, None]).sum(axis=1)
            out.append(1 + higher)
        return np.concatenate(out) if out else np.zeros(0, dtype=np.int64)

    def keep(self, queries: Sequence[str], positives: Sequence[str]) -> np.ndarray:
        return self.ranks(queries, positives) <= self.top_k
