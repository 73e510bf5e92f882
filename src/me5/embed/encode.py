"""Encode a corpus: length-sorted token-budget batches, fp16 autocast on CUDA, sharded over processes, resumable.

The one embedding core of evaluation, mining and the consistency filter:

* :func:`encode_texts` embeds texts in memory and returns a CPU float32 matrix in input order.
* :func:`encode_corpus` embeds ``(ids, texts)`` into a folder of fp16 shards, each process (rank ``r`` of
  ``world``) its own slice of the corpus, so that memory is bounded by one shard; a killed run resumes where it
  stopped (finished shards are kept), and :class:`EmbeddingShards` streams the shards back for search. A caller
  that read only its rank's rows passes them as :class:`RankRows` with the corpus's digest (``corpus_key``).

Batching. The texts of a chunk (a shard, or ``chunk_rows`` texts in memory) are tokenised with the caller's prompt
prefix (from :class:`~me5.prompts.PromptPolicy`; this module writes no prompt of its own), sorted by tokenised
length (longest first) and cut into batches whose padded size ``rows * padded_length`` stays within
``max_tokens``, at most ``max_batch`` rows each (:func:`plan_batches`); embeddings go back to input order.

Packed rows. An encoder built with ``packed=True`` gets each batch as one flat stream of whole rows (at most
``max_tokens`` real tokens, in input order: :func:`plan_packed_batches`), so no padding is computed; the
embeddings equal the padded path's (tested).

Precision. On CUDA the forward runs under ``torch.autocast`` in ``fp16`` (the default: unilm encodes with fp16
autocast) or ``bf16``; on any other device it runs in fp32. An :class:`~me5.models.encoder.Encoder` whose own
``autocast`` field is not ``fp32`` keeps its own (inner) autocast dtype.

The shard folder::

    manifest.json              fingerprint (model, tokenizer, prefix, max length, precision, corpus) + layout
    emb-r{rank}-{k:05d}.npy    (rows, D) float16, shard k of rank ``rank``
    emb-r{rank}-{k:05d}.json   its ids and corpus rows, and the run key; written last (the shard's completion mark)

A shard counts as done when its ``.json`` carries the key of this run (fingerprint + layout) and its ``.npy``
has the right shape; every file is written to a temporary name and renamed, so a kill leaves no half shard.
A folder holding another run (other model weights, prompt, length, precision, corpus or layout) is an error
naming the differing fields, or with ``overwrite=True`` is started over.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from me5.errors import ConfigError, DataError
from me5.jsonio import read_json, write_atomic, write_json
from me5.prompts import prompt_token_count

log = logging.getLogger(__name__)

PRECISIONS: dict[str, torch.dtype | None] = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": None}
SPLITS = ("contiguous", "strided")
FORMAT = 1
MANIFEST = "manifest.json"
DEFAULT_MAX_LENGTH = 512  # the recipe's evaluation length (unilm mteb_beir_eval.py)
DEFAULT_SHARD_ROWS = 65536
TOKENIZE_SLICE = 512  # texts per encode_batch call of the tokenizer thread pool


# ---------------------------------------------------------------------------------------------- batching
def plan_batches(lengths: Sequence[int], *, max_tokens: int, max_batch: int, pad_multiple: int = 8) -> list[list[int]]:
    """Indices of ``lengths`` sorted longest first (ties by index) and cut into batches.

    A batch's padded size ``rows * round_up(longest, pad_multiple)`` stays within ``max_tokens`` and it holds at
    most ``max_batch`` rows; a single text longer than the budget is a batch of its own.
    """
    if max_tokens < 1 or max_batch < 1:
        raise ConfigError("embed.max_tokens", f"need max_tokens >= 1 and max_batch >= 1, got {max_tokens}, {max_batch}")
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    batches: list[list[int]] = []
    cur: list[int] = []
    width = 0
    for i in order:
        if cur and (len(cur) >= max_batch or (len(cur) + 1) * width > max_tokens):
            batches.append(cur)
            cur = []
        if not cur:
            width = round_up(lengths[i], pad_multiple)
        cur.append(i)
    if cur:
        batches.append(cur)
    return batches


def plan_packed_batches(lengths: Sequence[int], *, max_tokens: int, max_batch: int) -> list[list[int]]:
    """Indices of ``lengths`` in input order, cut into packed batches of at most ``max_tokens`` REAL tokens and
    ``max_batch`` rows (a text longer than the budget is a batch of its own): no sorting is needed when no
    padding is computed (:mod:`me5.models.packing`)."""
    if max_tokens < 1 or max_batch < 1:
        raise ConfigError("embed.max_tokens", f"need max_tokens >= 1 and max_batch >= 1, got {max_tokens}, {max_batch}")
    from me5.models.packing import split_by_real_tokens

    return [list(range(sl.start, sl.stop)) for sl in split_by_real_tokens(lengths, max_tokens, max_rows=max_batch)]


def round_up(n: int, multiple: int) -> int:
    """``n`` rounded up to a multiple of ``multiple`` (at least one multiple; at least 1): a padded width."""
    return max(multiple, -(-n // multiple) * multiple) if multiple > 1 else max(n, 1)


def prompt_length_for(encoder: nn.Module, tokenizer, prefix: str) -> int | None:
    """The token count of ``prefix`` for an encoder that pools without its prompt (``include_prompt=False``,
    :func:`~me5.prompts.prompt_token_count`); ``None`` for one that pools over every token."""
    if getattr(encoder, "include_prompt", True) or not prefix:
        return None
    return prompt_token_count(tokenizer, prefix)


def _cpu_threads() -> int:
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        n = os.cpu_count() or 1
    return max(1, min(n, 32))


def tokenize(tokenizer, texts: Sequence[str], *, prefix: str = "", max_length: int = DEFAULT_MAX_LENGTH) -> list[list[int]]:
    """Token ids of ``prefix + text`` for each text, truncated to ``max_length`` (special tokens included).

    Equal to ``tokenizer(texts, max_length=, truncation=True)["input_ids"]`` (tested). A fast tokenizer's Rust
    backend is called directly, slices of :data:`TOKENIZE_SLICE` texts on a pool of threads (``encode_batch``
    releases the GIL, so this is parallel even where ``TOKENIZERS_PARALLELISM=false`` keeps each call serial):
    on a GPU, single-threaded tokenisation, not the encoder, bounds the corpus rate.
    """
    if not texts:
        return []
    inputs = [prefix + t for t in texts]
    rust = getattr(tokenizer, "backend_tokenizer", None) if getattr(tokenizer, "is_fast", False) else None
    if rust is None:  # a slow (Python) tokenizer
        out = tokenizer(inputs, max_length=max_length, truncation=True, add_special_tokens=True,
                        return_attention_mask=False)
        return [list(ids) for ids in out["input_ids"]]
    # the settings ``tokenizer(..., truncation=True, max_length=)`` puts on the same backend object (HF sets them
    # on every call, so they are restored by the next HF call that needs others)
    rust.no_padding()
    rust.enable_truncation(max_length, stride=0, strategy="longest_first",
                           direction=getattr(tokenizer, "truncation_side", "right"))

    def run(lo: int) -> list[list[int]]:
        return [enc.ids for enc in rust.encode_batch(inputs[lo : lo + TOKENIZE_SLICE], add_special_tokens=True)]

    starts = range(0, len(inputs), TOKENIZE_SLICE)
    workers = min(_cpu_threads(), len(starts))
    if workers == 1:
        return run(0)
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(workers, thread_name_prefix="me5-tokenize") as pool:
        return [ids for part in pool.map(run, starts) for ids in part]


def effective_precision(precision: str, device: torch.device) -> str:
    """``precision`` on CUDA, ``fp32`` elsewhere; an unknown name is a :class:`ConfigError`."""
    if precision not in PRECISIONS:
        raise ConfigError("embed.precision", f"unknown '{precision}'; choose one of {sorted(PRECISIONS)}")
    return precision if device.type == "cuda" else "fp32"


def _autocast(device: torch.device, precision: str):
    dtype = PRECISIONS[effective_precision(precision, device)]
    return torch.autocast(device_type="cuda", dtype=dtype) if dtype is not None else contextlib.nullcontext()


def _device_of(encoder: nn.Module, device) -> torch.device:
    if device is not None:
        return torch.device(device)
    param = next(iter(encoder.parameters()), None)
    if param is None:
        param = next(iter(encoder.buffers()), None)
    return param.device if param is not None else torch.device("cpu")


@contextlib.contextmanager
def _eval_mode(encoder: nn.Module):
    was_training = encoder.training
    encoder.eval()
    try:
        yield
    finally:
        encoder.train(was_training)


@torch.no_grad()
def _embed_token_rows(encoder: nn.Module, rows: list[list[int]], *, pad_id: int, left_pad: bool, max_tokens: int,
                      max_batch: int, device: torch.device, precision: str, progress=None,
                      prompt_length: int | None = None) -> Tensor:
    """(len(rows), D) float32 CPU embeddings of already tokenised rows, in their order; ``prompt_length`` (the
    tokens of the prompt every row starts with) goes to the encoder when given (:func:`prompt_length_for`).

    The host never waits for the device inside the loop: on CUDA a batch is built in pinned memory and copied
    without blocking, its embeddings stay on the device (in batch order), and one copy at the end brings them
    back, so building batch k+1 overlaps the forward of batch k.
    """
    if getattr(encoder, "packed", False):
        return _embed_packed_rows(encoder, rows, max_tokens=max_tokens, max_batch=max_batch, device=device,
                                  precision=precision, progress=progress, prompt_length=prompt_length)
    extra = () if prompt_length is None else (prompt_length,)
    cuda = device.type == "cuda"
    order: list[int] = []
    parts: list[Tensor] = []
    for batch in plan_batches([len(r) for r in rows], max_tokens=max_tokens, max_batch=max_batch):
        width = round_up(len(rows[batch[0]]), 8)
        ids = np.full((len(batch), width), pad_id, dtype=np.int64)
        mask = np.zeros((len(batch), width), dtype=np.int64)
        for j, i in enumerate(batch):
            n = len(rows[i])
            span = slice(width - n, width) if left_pad else slice(0, n)
            ids[j, span] = rows[i]
            mask[j, span] = 1
        ids_t, mask_t = torch.from_numpy(ids), torch.from_numpy(mask)
        if cuda:
            ids_t, mask_t = ids_t.pin_memory(), mask_t.pin_memory()
        with _autocast(device, precision):
            emb = encoder(ids_t.to(device, non_blocking=True), mask_t.to(device, non_blocking=True), *extra)
        parts.append(emb.float() if cuda else emb.float().cpu())
        order += batch
        if progress is not None:
            progress.update(len(batch))
    if not parts:
        return torch.zeros(0, 0)
    stacked = torch.cat(parts).cpu()
    out = torch.empty_like(stacked)
    out[torch.tensor(order)] = stacked
    return out


def _embed_packed_rows(encoder: nn.Module, rows: list[list[int]], *, max_tokens: int, max_batch: int,
                       device: torch.device, precision: str, progress=None, prompt_length: int | None = None) -> Tensor:
    """:func:`_embed_token_rows` for a ``packed`` encoder: each batch is one flat stream of whole rows built on the
    host (:func:`~me5.models.packing.pack_token_lists`; no padded matrix, no sorting), ``max_tokens`` REAL tokens
    at most; embeddings stay on the device until one copy at the end."""
    from me5.models.packing import pack_token_lists

    cuda = device.type == "cuda"
    parts: list[Tensor] = []
    for batch in plan_packed_batches([len(r) for r in rows], max_tokens=max_tokens, max_batch=max_batch):
        packed = pack_token_lists([rows[i] for i in batch], offset=encoder.first_position, device=device,
                                  prompt_length=prompt_length)
        with _autocast(device, precision):
            emb = encoder(packed)
        parts.append(emb.float() if cuda else emb.float().cpu())
        if progress is not None:
            progress.update(len(batch))
    if not parts:
        return torch.zeros(0, 0)
    return torch.cat(parts).cpu()


def _pad_info(tokenizer) -> tuple[int, bool]:
    pad_id = tokenizer.pad_token_id
    if pad_id is None:
        raise ConfigError("model.tokenizer", "the tokenizer has no pad token")
    return int(pad_id), getattr(tokenizer, "padding_side", "right") == "left"


def _budget(max_tokens: int | None, max_batch: int, max_length: int) -> int:
    return int(max_tokens) if max_tokens is not None else max_batch * round_up(max_length, 8)


def encode_texts(encoder: nn.Module, tokenizer, texts: Sequence[str], *, prefix: str = "",
                 max_length: int = DEFAULT_MAX_LENGTH, max_tokens: int | None = None, max_batch: int = 256,
                 precision: str = "fp16", device: torch.device | str | None = None,
                 chunk_rows: int = DEFAULT_SHARD_ROWS, show_progress: bool = False, desc: str = "encode") -> Tensor:
    """Embed ``texts`` (``prefix`` put in front of each) with ``encoder(input_ids, attention_mask)`` in eval mode.

    Returns a CPU float32 tensor (N, D) in input order. Texts are tokenised and length-sorted ``chunk_rows`` at a
    time (what one shard of :func:`encode_corpus` holds); ``max_tokens`` defaults to ``max_batch`` rows of
    ``max_length`` tokens. The batches depend on the texts only, so every rank of a data-parallel job that calls
    this with the same texts runs the same forwards (as FSDP needs).
    """
    from tqdm.auto import tqdm

    device = _device_of(encoder, device)
    effective_precision(precision, device)
    pad_id, left_pad = _pad_info(tokenizer)
    budget = _budget(max_tokens, max_batch, max_length)
    prompt_length = prompt_length_for(encoder, tokenizer, prefix)
    parts = []
    with _eval_mode(encoder), tqdm(total=len(texts), desc=desc, disable=not show_progress, leave=False) as bar:
        for c0 in range(0, len(texts), chunk_rows):
            rows = tokenize(tokenizer, texts[c0 : c0 + chunk_rows], prefix=prefix, max_length=max_length)
            parts.append(_embed_token_rows(encoder, rows, pad_id=pad_id, left_pad=left_pad, max_tokens=budget,
                                           prompt_length=prompt_length,
                                           max_batch=max_batch, device=device, precision=precision, progress=bar))
    if not parts:
        return torch.zeros(0, _dim_or_zero(encoder))
    return torch.cat(parts)


def is_fsdp_sharded(encoder: nn.Module) -> bool:
    """Whether any parameter is a DTensor (FSDP2): its forwards are collectives, the same on every rank."""
    return any(hasattr(p, "to_local") and hasattr(p, "placements") for p in encoder.parameters())


def _dim_or_zero(encoder) -> int:
    try:
        return int(encoder.dim)
    except (AttributeError, TypeError):
        return 0


# ---------------------------------------------------------------------------------------------- fingerprints
def model_digest(encoder: nn.Module, *, sample: int = 4096) -> str:
    """A short hash of the encoder's weights: name, shape, dtype and a strided sample of each tensor, plus the
    pooling / normalisation / autocast fields of an :class:`~me5.models.encoder.Encoder` (cheap for any size)."""
    h = hashlib.blake2b(digest_size=16)
    for name in ("pooling", "normalize", "autocast", "include_prompt"):
        h.update(f"{name}={getattr(encoder, name, None)!r};".encode())
    for name, t in encoder.state_dict().items():
        t = t.detach()
        if hasattr(t, "to_local"):  # a DTensor (FSDP2): its local shard
            t = t.to_local()
        flat = t.reshape(-1)
        step = max(1, flat.numel() // sample)
        values = flat[::step][:sample].to("cpu", torch.float64).numpy()
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype};".encode())
        h.update(values.tobytes())
    return h.hexdigest()


def tokenizer_digest(tokenizer) -> str:
    """A short hash of the tokenizer's class, name, vocabulary and truncation/padding side."""
    h = hashlib.blake2b(digest_size=16)
    h.update(f"{type(tokenizer).__name__};{getattr(tokenizer, 'name_or_path', '')};{len(tokenizer)};".encode())
    h.update(f"{getattr(tokenizer, 'padding_side', '')};{getattr(tokenizer, 'truncation_side', '')};".encode())
    vocab = tokenizer.get_vocab() if hasattr(tokenizer, "get_vocab") else {}
    h.update(json.dumps(sorted(vocab.items()), ensure_ascii=False).encode())
    return h.hexdigest()


def corpus_digest(ids: Sequence[str], texts: Sequence[str], *, chunk: int = 65536) -> str:
    """A hash of the corpus rows (ids and texts, in order)."""
    h = hashlib.blake2b(digest_size=16)
    for c0 in range(0, len(ids), chunk):
        h.update("\x00".join(map(str, ids[c0 : c0 + chunk])).encode("utf-8", "surrogatepass"))
        h.update(b"\x01")
        h.update("\x00".join(texts[c0 : c0 + chunk]).encode("utf-8", "surrogatepass"))
        h.update(b"\x02")
    return h.hexdigest()


class RankRows:
    """One column (ids or texts) of an ``n``-row corpus of which this process holds only the rows ``rows`` (its
    :func:`rank_rows`): ``len()`` is the corpus's, indexing a row outside ``rows`` is an ``IndexError``. What
    :func:`encode_corpus` takes from a caller that read only its part of the corpus file (with ``corpus_key``)."""

    def __init__(self, n: int, rows: range, values: Sequence):
        if len(rows) != len(values):
            raise ValueError(f"{len(values)} values for {len(rows)} rows")
        if len(rows) and not (0 <= rows[0] and rows[-1] < n):
            raise ValueError(f"rows {rows} are not inside a corpus of {n} rows")
        self.n, self.rows, self.values = int(n), rows, values

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i):
        if not isinstance(i, int):
            raise TypeError("RankRows is indexed by one corpus row at a time")
        try:
            return self.values[self.rows.index(i)]
        except ValueError:
            raise IndexError(f"row {i} is not held here (rows {self.rows} of {self.n})") from None

    def __iter__(self):
        raise TypeError("a RankRows holds one rank's rows only: index it by corpus row, or iterate over .values")


def _digest(obj) -> str:
    return hashlib.blake2b(json.dumps(obj, sort_keys=True).encode(), digest_size=16).hexdigest()


# ---------------------------------------------------------------------------------------------- layout
def rank_rows(n: int, rank: int, world: int, split: str = "contiguous") -> range:
    """The corpus rows of ``rank``: a contiguous block (``[r*n//w, (r+1)*n//w)``) or every ``world``-th row."""
    if split not in SPLITS:
        raise ConfigError("embed.split", f"unknown '{split}'; choose one of {list(SPLITS)}")
    if not 0 <= rank < world:
        raise ConfigError("embed.rank", f"rank {rank} is not in [0, {world})")
    if split == "strided":
        return range(rank, n, world)
    return range(rank * n // world, (rank + 1) * n // world)


def shard_rows_of(n: int, rank: int, world: int, split: str, shard_rows: int) -> list[range]:
    """The corpus rows of each shard of ``rank`` (consecutive pieces of :func:`rank_rows`)."""
    rows = rank_rows(n, rank, world, split)
    return [rows[s : s + shard_rows] for s in range(0, len(rows), shard_rows)]


def shard_name(rank: int, k: int) -> str:
    return f"emb-r{rank}-{k:05d}"


def _world(rank: int | None, world: int | None) -> tuple[int, int]:
    dist = torch.distributed
    initialised = dist.is_available() and dist.is_initialized()
    if rank is None:
        rank = dist.get_rank() if initialised else 0
    if world is None:
        world = dist.get_world_size() if initialised else 1
    return int(rank), int(world)


def _shard_done(folder: Path, rank: int, k: int, key: str, rows: range) -> bool:
    meta = read_json(folder / f"{shard_name(rank, k)}.json")
    if not meta or meta.get("key") != key or meta.get("rows") != [rows.start, rows.stop, rows.step]:
        return False
    try:
        arr = np.load(folder / f"{shard_name(rank, k)}.npy", mmap_mode="r")
    except (OSError, ValueError):
        return False
    return arr.shape[0] == len(rows)


# ---------------------------------------------------------------------------------------------- sharded encoding
@dataclass
class EncodeResult:
    """What one rank's :func:`encode_corpus` did: shards ``written`` now, ``skipped`` (done before), ``pending``
    (left for later: ``max_new_shards``), and whether the whole folder is ``complete`` (every rank) on return."""

    path: Path
    rank: int
    world: int
    written: int
    skipped: int
    pending: int
    complete: bool

    def open(self) -> EmbeddingShards:
        return EmbeddingShards(self.path)


@torch.no_grad()
def encode_corpus(
    encoder: nn.Module,
    tokenizer,
    ids: Sequence[str],
    texts: Sequence[str],
    out_dir: str | Path,
    *,
    prefix: str = "",
    max_length: int = DEFAULT_MAX_LENGTH,
    max_tokens: int | None = None,
    max_batch: int = 256,
    precision: str = "fp16",
    shard_rows: int = DEFAULT_SHARD_ROWS,
    rank: int | None = None,
    world: int | None = None,
    split: str = "contiguous",
    overwrite: bool = False,
    model_id: str | None = None,
    device: torch.device | str | None = None,
    max_new_shards: int | None = None,
    corpus_key: str | None = None,
    barrier: bool = True,
    show_progress: bool = False,
    desc: str = "encode",
) -> EncodeResult:
    """Embed this rank's slice of the corpus into fp16 shards under ``out_dir`` (see the module docstring).

    Args:
        ids, texts: the corpus rows (the same on every rank), or :class:`RankRows` holding only this rank's
            rows (then ``corpus_key`` is needed: the texts of the other ranks are not there to hash).
        prefix: the prompt of these texts (``PromptPolicy.document(...)`` / ``.query(...)``).
        max_length, max_tokens, max_batch, precision: as :func:`encode_texts`.
        shard_rows: rows per shard (memory per rank is one shard of embeddings and tokens).
        rank, world: this process and the number of processes; default: torch.distributed's, else ``0, 1``.
        split: ``contiguous`` (rank r gets one block of rows) or ``strided`` (every world-th row; balances
            lengths when the corpus is sorted by length or source).
        overwrite: a folder holding another run is started over instead of being an error.
        model_id: a name recorded in the fingerprint besides the weights' hash (a path, a step).
        max_new_shards: stop after writing this many shards (a time-boxed job; the next call resumes).
        corpus_key: the corpus's digest as the caller computed it, the same on every rank (e.g. from the file
            the corpus was read from: :func:`me5.eval.retrieval.read_corpus_part`); default
            :func:`corpus_digest` of ``ids`` and ``texts`` (every text, on every rank).
        barrier: wait for every rank at the end when torch.distributed runs ``world`` processes.
    """
    from tqdm.auto import tqdm

    if len(ids) != len(texts):
        raise ConfigError("embed.ids", f"{len(ids)} ids for {len(texts)} texts")
    if shard_rows < 1:
        raise ConfigError("embed.shard_rows", f"need a positive number of rows per shard, got {shard_rows}")
    rank, world = _world(rank, world)
    partial = [name for name, col in (("ids", ids), ("texts", texts)) if isinstance(col, RankRows)]
    if partial and corpus_key is None:
        raise ConfigError("embed.corpus_key", f"{' and '.join(partial)} hold only this rank's rows: give the "
                          "corpus's digest (corpus_key), computed the same way on every rank")
    for name in partial:
        col = ids if name == "ids" else texts
        want = rank_rows(len(ids), rank, world, split)
        if col.rows != want:
            raise ConfigError(f"embed.{name}", f"holds rows {col.rows}, but rank {rank} of {world} ({split}) "
                              f"encodes rows {want}")
    if world > 1 and is_fsdp_sharded(encoder):
        raise ConfigError("embed.world", "an FSDP-sharded encoder runs the same forwards on every rank; encode "
                          "the corpus with encode_texts (in memory) or on one process")
    device = _device_of(encoder, device)
    precision_used = effective_precision(precision, device)
    pad_id, left_pad = _pad_info(tokenizer)
    budget = _budget(max_tokens, max_batch, max_length)
    folder = Path(out_dir)
    folder.mkdir(parents=True, exist_ok=True)

    fingerprint = {
        "model": model_digest(encoder),
        "model_id": model_id,
        "tokenizer": tokenizer_digest(tokenizer),
        "prefix": prefix,
        "max_length": int(max_length),
        "precision": precision_used,
        "corpus": corpus_key if corpus_key is not None else corpus_digest(ids, texts),
        "rows": len(ids),
    }
    layout = {"world": world, "split": split, "shard_rows": int(shard_rows)}
    key = _digest({"fingerprint": fingerprint, "layout": layout})
    shards = shard_rows_of(len(ids), rank, world, split, shard_rows)
    _check_manifest(folder, fingerprint, layout, key, rank, overwrite)

    done = {k for k, rows in enumerate(shards) if _shard_done(folder, rank, k, key, rows)}
    todo = [k for k in range(len(shards)) if k not in done]
    if max_new_shards is not None:
        todo = todo[: max(0, int(max_new_shards))]
    written = 0
    total = sum(len(shards[k]) for k in todo)
    bar = tqdm(total=total, desc=desc, disable=not (show_progress and rank == 0), leave=False)
    prompt_length = prompt_length_for(encoder, tokenizer, prefix)
    with _eval_mode(encoder), bar:
        for k in todo:
            rows = shards[k]
            token_rows = tokenize(tokenizer, [texts[i] for i in rows], prefix=prefix, max_length=max_length)
            emb = _embed_token_rows(encoder, token_rows, pad_id=pad_id, left_pad=left_pad, max_tokens=budget,
                                    prompt_length=prompt_length,
                                    max_batch=max_batch, device=device, precision=precision, progress=bar)
            name = shard_name(rank, k)
            arr = emb.to(torch.float16).numpy()
            write_atomic(folder / f"{name}.npy", lambda fh, a=arr: np.save(fh, a))
            write_json(folder / f"{name}.json", {"key": key, "rank": rank, "shard": k,
                                                 "rows": [rows.start, rows.stop, rows.step],
                                                 "ids": [str(ids[i]) for i in rows]}, indent=None, end="")
            written += 1
    dist = torch.distributed
    if barrier and world > 1 and dist.is_available() and dist.is_initialized() and dist.get_world_size() == world:
        dist.barrier()
    pending = len(shards) - len(done) - written
    log.info("%s: rank %d/%d wrote %d shards, %d were done, %d pending", folder, rank, world, written, len(done),
             pending)
    return EncodeResult(folder, rank, world, written, len(done), pending, _complete(folder, key))


def _check_manifest(folder: Path, fingerprint: dict, layout: dict, key: str, rank: int, overwrite: bool) -> None:
    path = folder / MANIFEST
    manifest = {"format": FORMAT, "key": key, "fingerprint": fingerprint, "layout": layout, "dtype": "float16"}
    old = read_json(path)
    if old is not None and old.get("key") != key:
        if not overwrite:
            differ = sorted({f for f in fingerprint if (old.get("fingerprint") or {}).get(f) != fingerprint[f]}
                            | {f"layout.{f}" for f in layout if (old.get("layout") or {}).get(f) != layout[f]})
            raise DataError(
                f"the folder holds embeddings of another run (differs: {', '.join(differ) or 'format'}); "
                "pass overwrite=True to start over, or use another folder", file=str(path))
        log.warning("%s: embeddings of another run; starting over", folder)
        # this rank's files and, on rank 0, those of ranks outside the new layout; stale shards inside the layout
        # are recognised by their key and rewritten
        for f in folder.glob("emb-r*-*.*"):
            try:
                r = int(f.name.split("-")[1][1:])
            except ValueError:
                continue
            if r == rank or (rank == 0 and r >= layout["world"]):
                f.unlink(missing_ok=True)
    if old is None or old.get("key") != key:
        # the same content on every rank: concurrent writes agree
        write_json(path, manifest, indent=None, end="")


def _complete(folder: Path, key: str) -> bool:
    try:
        EmbeddingShards(folder, key=key)
    except DataError:
        return False
    return True


# ---------------------------------------------------------------------------------------------- reading
class EmbeddingShards:
    """The shards of a finished :func:`encode_corpus` folder, streamed (memory-mapped) for search.

    ``ids`` and ``rows`` (the corpus row of each) are in storage order: rank, then shard, then row; search
    results index into this order. An unfinished or mixed folder is a :class:`DataError` naming what is missing.
    """

    def __init__(self, path: str | Path, *, key: str | None = None):
        self.path = Path(path)
        manifest = read_json(self.path / MANIFEST)
        if manifest is None:
            raise DataError("no embedding manifest (not an encode_corpus folder, or not started)",
                            file=str(self.path / MANIFEST))
        if key is not None and manifest.get("key") != key:
            raise DataError("the manifest is of another run", file=str(self.path / MANIFEST))
        self.manifest = manifest
        key = manifest["key"]
        layout, n = manifest["layout"], int(manifest["fingerprint"]["rows"])
        self._files: list[Path] = []
        self.ids: list[str] = []
        rows: list[np.ndarray] = []
        missing: dict[int, list[int]] = {}
        dim = None
        for r in range(layout["world"]):
            for k, shard in enumerate(shard_rows_of(n, r, layout["world"], layout["split"], layout["shard_rows"])):
                name = shard_name(r, k)
                meta = read_json(self.path / f"{name}.json")
                ok = bool(meta) and meta.get("key") == key and meta.get("rows") == [shard.start, shard.stop, shard.step]
                if ok:
                    try:
                        arr = np.load(self.path / f"{name}.npy", mmap_mode="r")
                        ok = arr.shape[0] == len(shard) and len(meta["ids"]) == len(shard)
                        dim = arr.shape[1] if arr.ndim == 2 else dim
                    except (OSError, ValueError):
                        ok = False
                if not ok:
                    missing.setdefault(r, []).append(k)
                    continue
                self._files.append(self.path / f"{name}.npy")
                self.ids.extend(meta["ids"])
                rows.append(np.arange(shard.start, shard.stop, shard.step, dtype=np.int64))
        if missing:
            what = "; ".join(f"rank {r}: shards {ks[:8]}{' ...' if len(ks) > 8 else ''}" for r, ks in missing.items())
            raise DataError(f"unfinished embedding folder ({what} missing); run encode_corpus again to finish it",
                            file=str(self.path))
        self.rows = np.concatenate(rows) if rows else np.zeros(0, dtype=np.int64)
        self.dim = int(dim) if dim is not None else 0
        self.fingerprint = manifest["fingerprint"]

    def __len__(self) -> int:
        return len(self.ids)

    def blocks(self, *, dtype=np.float32, files: Sequence[int] | None = None) -> Iterator[tuple[int, np.ndarray]]:
        """``(offset, block)`` per shard: ``block`` (rows, D) in ``dtype`` holds rows ``offset:offset+rows`` of
        :attr:`ids`; ``files``: only these shards (indices in storage order)."""
        wanted = None if files is None else set(files)
        offset = 0
        for j, f in enumerate(self._files):
            arr = np.load(f, mmap_mode="r")
            if wanted is None or j in wanted:
                yield offset, np.asarray(arr, dtype=dtype)
            offset += arr.shape[0]

    def part(self, rank: int, world: int) -> EmbeddingShardPart:
        """The shards that process ``rank`` of ``world`` searches (every ``world``-th file, whichever rank wrote
        it): a block source over the same :attr:`ids`, so search results index the whole corpus."""
        if not 0 <= rank < world:
            raise ValueError(f"rank {rank} is not in a world of {world}")
        return EmbeddingShardPart(self, rank, world)

    def matrix(self, *, dtype=np.float32, order: str = "stored") -> np.ndarray:
        """Every embedding in one array: in storage order (``stored``, as :attr:`ids`) or corpus order (``input``)."""
        out = np.empty((len(self), self.dim), dtype=dtype)
        for offset, block in self.blocks(dtype=dtype):
            out[offset : offset + len(block)] = block
        if order == "input":
            restored = np.empty_like(out)
            restored[self.rows] = out
            return restored
        if order != "stored":
            raise ValueError(f"order must be 'stored' or 'input', got {order!r}")
        return out


class EmbeddingShardPart:
    """One process's share of an :class:`EmbeddingShards` folder for a distributed search: ``blocks()`` yields
    only its shards (global offsets); ``ids``, ``len`` and ``dim`` are the whole corpus's, so a search over the
    part ranks the same doc ids with the same tie order, and the parts' top-k merge into the whole's
    (:func:`me5.embed.search.merge_topk`)."""

    def __init__(self, shards: EmbeddingShards, rank: int, world: int):
        self.shards, self.rank, self.world = shards, rank, world
        self.files = list(range(rank, len(shards._files), world))
        self.ids, self.dim = shards.ids, shards.dim

    def __len__(self) -> int:
        return len(self.shards)

    def blocks(self, *, dtype=np.float32) -> Iterator[tuple[int, np.ndarray]]:
        return self.shards.blocks(dtype=dtype, files=self.files)
