"""The consistency filter of the English E5 recipe (arXiv 2212.03533): keep a pair only when an existing model
ranks its positive near the top among a pool of other passages.

The scorer is an :data:`Embedder`; :func:`model_embedder` builds one from a saved model, with the prompts of
the :class:`~me5.prompts.PromptPolicy` the model was trained with. ``me5.prepare --consistency-model`` runs it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from me5.prompts import PromptPolicy

Embedder = Callable[[Sequence[str], str], np.ndarray]  # (texts, "query" | "passage") -> (N, D) scores by dot


def model_embedder(path: str, *, prompts: PromptPolicy, instruction: str | None = None, symmetric: bool = False,
                   device: str | None = None, max_length: int = 128, batch_size: int = 256) -> Embedder:
    """An :data:`Embedder` from an exported me5 folder or any ``Encoder.from_pretrained`` path.

    The model is read as ``me5.evaluate`` reads it (:func:`me5.models.saved.read_model_settings`: pooling,
    normalisation and ``include_prompt`` from its ``me5.json`` or sentence-transformers files). Queries get
    ``prompts.query(instruction)``, passages ``prompts.document(instruction, symmetric=symmetric)`` (the source's
    task: its instruction, and whether both sides are the same kind of text).
    """
    from me5.models.saved import load_model, read_model_settings

    query_prompt = prompts.query(instruction)
    passage_prompt = prompts.document(instruction, symmetric=symmetric)
    encoder, tokenizer, device = load_model(path, read_model_settings(path), device)

    def embed(texts: Sequence[str], kind: str) -> np.ndarray:
        prefix = query_prompt if kind == "query" else passage_prompt
        return encoder.encode(list(texts), tokenizer, prefix=prefix, max_length=max_length, batch_size=batch_size,
                              device=device).numpy()

    return embed


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
