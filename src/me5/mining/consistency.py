"""The consistency filter of the English E5 recipe (arXiv 2212.03533): keep a pair only when an existing model
ranks its positive near the top among a pool of other passages. This is its model half; the filter itself
(:class:`~me5.data.consistency.ConsistencyFilter`, the pool and the top-k keep) is in :mod:`me5.data.consistency`.

The scorer is an :data:`~me5.data.consistency.Embedder`; :func:`model_embedder` builds one from a saved model, with
the prompts of the :class:`~me5.prompts.PromptPolicy` the model was trained with (:func:`model_policy`: its own
saved policy, unless the caller overrides it). ``me5.prepare --engine inline --consistency-model`` runs it through
:func:`source_embedders` (what :func:`me5.data.shards.prepare` is given: one embedder per source).

At scale (``me5.prep``, the pipeline of ``me5.prepare``): :class:`ModelScorer` embeds through the embed core
(sharded, fp16, resumable, packed rows with ``packed=True``) and :func:`pool_ranks` ranks each positive against a
sampled pool with one FAISS top-``(k + 1)`` search; the same ranks as
:class:`~me5.data.consistency.ConsistencyFilter`'s brute force (tested against a NumPy reference).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import TYPE_CHECKING

import numpy as np

from me5.data.consistency import Embedder
from me5.errors import ConfigError
from me5.prompts import PromptPolicy

if TYPE_CHECKING:
    from me5.data.shards import PrepareOptions
    from me5.data.source import Source


def model_policy(path: str) -> PromptPolicy:
    """The prompt policy a saved model was trained with: its ``me5.json``, else the prompts of its
    sentence-transformers files (:func:`me5.models.saved.read_saved_settings`, as ``me5.evaluate`` reads it)."""
    from me5.models.saved import read_saved_settings

    return read_saved_settings(path).prompts


def model_embedder(path: str, *, prompts: PromptPolicy, instruction: str | None = None, symmetric: bool = False,
                   device: str | None = None, max_length: int = 128, batch_size: int = 256) -> Embedder:
    """An :data:`Embedder` from an exported me5 folder or any ``Encoder.from_pretrained`` path.

    The model is read as ``me5.evaluate`` reads it (:func:`me5.models.saved.read_saved_settings`: pooling,
    normalisation and ``include_prompt`` from its ``me5.json`` or sentence-transformers files). Queries get
    ``prompts.query(instruction)``, passages ``prompts.document(instruction, symmetric=symmetric)`` (the source's
    task: its instruction, and whether both sides are the same kind of text).
    """
    from me5.embed.encode import encode_texts
    from me5.models.saved import load_model, read_saved_settings

    query_prompt = prompts.query(instruction)
    passage_prompt = prompts.document(instruction, symmetric=symmetric)
    encoder, tokenizer, device = load_model(path, read_saved_settings(path), device)

    def embed(texts: Sequence[str], kind: str) -> np.ndarray:
        prefix = query_prompt if kind == "query" else passage_prompt
        return encode_texts(encoder, tokenizer, list(texts), prefix=prefix, max_length=max_length,
                            max_batch=batch_size, device=device).numpy()

    return embed


def source_embedders(options: PrepareOptions) -> tuple[PrepareOptions, Callable[[Source], Embedder]]:
    """What :func:`me5.data.shards.prepare` needs for ``options.consistency_model``: the options with the model's
    prompt style (``options.prompt_style``, else the model's own saved policy, :func:`model_policy`), and a factory
    of each source's :data:`Embedder` (:func:`model_embedder` with the source's instruction and symmetry, the model
    loaded when ``prepare`` reaches that source)."""
    options.check()
    path = options.consistency_model
    if path is None:
        raise ConfigError("prepare.consistency_model", "no consistency model to build the embedders from")
    if options.prompt_style is None:
        options = replace(options, prompt_style=model_policy(path).style)
    policy = PromptPolicy(options.prompt_style)

    def embedder_for(source: Source) -> Embedder:
        return model_embedder(path, prompts=policy, instruction=source.instruction, symmetric=bool(source.symmetric),
                              device=options.device, max_length=options.consistency_max_length,
                              batch_size=options.consistency_batch_size)

    return options, embedder_for


# ============================================================================================== at scale
def pool_ranks(queries_QD, positives_QD, pool_ND, *, top_k: int, pos_keys=None, pool_keys=None,
               method: str = "faiss", use_gpu: bool | None = None) -> np.ndarray:
    """The rank of each positive among itself and the pool, capped at ``top_k + 1`` (enough to decide
    ``rank <= top_k``), from embeddings, by a top-``(top_k + 1)`` search of the pool
    (:func:`me5.embed.search.search`: FAISS ``IndexFlatIP``, exact; on the GPU where faiss has one).

    Rank = 1 + the pool passages that score strictly higher than the positive (as
    :class:`~me5.data.consistency.ConsistencyFilter`).
    ``pos_keys`` / ``pool_keys`` (optional, ``uint64``: a hash of each text): a pool passage with the text of the
    pair's own positive is not counted, whatever its score: its embedding, computed in another batch (fp16), may
    differ from the positive's in the last bits, and the same text is never "another passage". The pool holds
    each text once, so one search of ``top_k + 1`` finds ``top_k`` others after that exclusion.
    """
    from me5.embed.search import search

    q = np.ascontiguousarray(queries_QD, dtype=np.float32)
    p = np.ascontiguousarray(positives_QD, dtype=np.float32)
    s_pos = (q * p).sum(axis=1)
    n_pool = int(pool_ND.shape[0])
    k = min(int(top_k) + 1, n_pool)
    if len(q) == 0 or k == 0:
        return np.ones(len(q), dtype=np.int64)
    if method == "exact" and isinstance(pool_ND, np.ndarray) and not pool_ND.flags.writeable:
        pool_ND = np.array(pool_ND, dtype=np.float32)  # a memory-mapped pool: torch wants its own copy
    scores, idx = search(q, pool_ND, k, method=method, **({"use_gpu": use_gpu} if method == "faiss" else {}))
    scores, idx = scores.numpy(), idx.numpy()
    valid = idx >= 0
    if pos_keys is not None and pool_keys is not None:
        same = np.asarray(pool_keys)[np.where(valid, idx, 0)] == np.asarray(pos_keys)[:, None]
        valid &= ~same
    higher = ((scores > s_pos[:, None]) & valid).sum(axis=1)
    return 1 + np.minimum(higher, int(top_k))


class CallableScorer:
    """A scorer of the ``me5.prep`` pipeline from an :data:`Embedder` (in memory, in batches; for tests and small
    runs): ``embed(texts, kind, folder, prefix)`` ignores ``folder`` and ``prefix`` (the embedder has its own)."""

    def __init__(self, fn: Embedder, batch_size: int = 4096):
        self.fn, self.batch_size = fn, batch_size

    def embed(self, texts: Sequence[str], kind: str, folder=None, prefix: str = "") -> np.ndarray:
        if not texts:
            return np.zeros((0, 1), np.float32)
        return np.concatenate([np.asarray(self.fn(texts[i: i + self.batch_size], kind), dtype=np.float32)
                               for i in range(0, len(texts), self.batch_size)])


class ModelScorer:
    """A scorer of the ``me5.prep`` pipeline from a saved model, through the embed core
    (:func:`me5.embed.encode.encode_corpus`: length-sorted token-budget batches, fp16 autocast on CUDA, packed rows
    with ``packed=True``, fp16 shards in ``folder`` that a killed run resumes from).

    The model is read as ``me5.evaluate`` reads it (:func:`me5.models.saved.read_saved_settings`), loaded on first
    use in the process that embeds (the scorer itself is a small picklable object: pipeline tasks get a copy).
    """

    def __init__(self, path: str, *, max_length: int = 128, max_batch: int = 256, max_tokens: int | None = None,
                 precision: str = "fp16", packed: bool = False, shard_rows: int = 65536, device: str | None = None):
        self.path, self.max_length, self.max_batch, self.max_tokens = path, max_length, max_batch, max_tokens
        self.precision, self.packed, self.shard_rows, self.device = precision, packed, shard_rows, device
        self._model = None

    def __getstate__(self):
        return {**self.__dict__, "_model": None}

    def model(self):
        if self._model is None:
            import torch

            from me5.models.encoder import Encoder
            from me5.models.saved import read_saved_settings
            from me5.models.tokenizer import load_tokenizer

            settings = read_saved_settings(self.path)
            tokenizer = load_tokenizer(self.path)
            encoder = Encoder.from_pretrained(self.path, pooling=settings.pooling, normalize=settings.normalize,
                                              include_prompt=settings.include_prompt, tokenizer=tokenizer,
                                              packed=self.packed)
            dev = torch.device(self.device or ("cuda" if torch.cuda.is_available() else "cpu"))
            self._model = (encoder.to(dev), tokenizer, dev)
        return self._model

    def embed(self, texts: Sequence[str], kind: str, folder, prefix: str = "") -> np.ndarray:
        """(N, D) float32 embeddings of ``texts`` with ``prefix``, through fp16 shards in ``folder``."""
        from me5.embed.encode import EmbeddingShards, encode_corpus

        encoder, tokenizer, device = self.model()
        encode_corpus(encoder, tokenizer, [str(i) for i in range(len(texts))], list(texts), folder, prefix=prefix,
                      max_length=self.max_length, max_tokens=self.max_tokens, max_batch=self.max_batch,
                      precision=self.precision, shard_rows=self.shard_rows, rank=0, world=1, overwrite=True,
                      model_id=str(self.path), device=device, barrier=False)
        return EmbeddingShards(folder).matrix(dtype=np.float32, order="input")
