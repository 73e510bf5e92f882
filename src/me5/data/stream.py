"""The batch streams every DataModule serves: in memory (small data) and sharded streaming (any size).

Both are endless ``IterableDataset``s of collated per-device batches with the same global-batch semantics:
global batch ``b`` is drawn once (the same on every rank), rank ``k`` keeps slots ``[k*B:(k+1)*B]``, and
DataLoader worker ``w`` of ``W`` produces the batches ``b`` with ``(b - start) % W == w`` (PyTorch reads
workers round-robin, so the loader yields ``start, start+1, ...`` in order). A mixture draws a source per
example, or one source per global batch (``homogeneous``), so a homogeneous global batch is single-source on
every rank.

**In memory** (:class:`PairBatchStream`): every rank holds the examples; the global batch is a pure function
of ``(seed, b)`` drawn from one sequential generator, and a resume replays the cheap index draws.

**Streaming** (:class:`ShardedPairStream`): nothing is loaded up front.

* *Plan.* The sources of global batch ``b`` come from a generator seeded with ``(seed, b)``, so no replay is
  needed at any position.
* *Readers.* Each rank has ``L = max(1, num_workers)`` logical readers; batch ``b`` of rank ``k`` is filled by
  reader ``k*L + b % L`` of ``N = world*L``, which pulls the slice's examples of each source from its own part
  of that source. Worker ``w`` always serves the same reader, ``(w + start) % L``.
* *Disjoint parts.* A source is cut into units (parquet row groups, jsonl files; hub datasets: their shards,
  see ``datasets.distributed.split_dataset_by_node``). With at least ``N`` units, each epoch permutes the
  units (seeded per source and epoch) and deals them to the ``N`` readers, balanced by rows (largest-load
  first; ties to the lower reader); every unit goes to one reader. With fewer units than readers, every
  reader reads every unit and keeps the records whose index in the epoch is ``r mod N`` (disjoint records;
  each reader then parses every unit, so prefer many shards: ``me5.prepare`` writes row groups of 10k).
  Either way the readers of an epoch together cover every record exactly once. Readers advance at the rate
  their batches ask for, so a reader with more rows than another starts its next epoch a little later.
* *Order.* Units are permuted per epoch and the rows of a parquet row group are permuted per epoch too
  (seeded); jsonl files are read in order.
* *Position.* A reader's position per source is ``[epoch, unit index in its epoch list, offset in the unit,
  byte offset, line]`` (the byte offset lets a jsonl reader seek; parquet seeks by row group). Every batch
  carries its reader's position after it (``data_state``); the DataModule keeps, per reader, the position
  after the last batch the training loop consumed, and the checkpoint stores them. A resumed reader seeks
  there, so the resumed run sees exactly the batches of an uninterrupted one (same world size and
  ``num_workers``; with another layout the readers start a fresh epoch, with a warning).
"""

from __future__ import annotations

import gc
import heapq
import logging
import zlib
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from torch.utils.data import IterableDataset, get_worker_info

from me5.batching import BatchPlan
from me5.data.readers import Unit, count_lines, hub_rows, iter_jsonl_at, load_hub_stream, read_row_group
from me5.errors import DataError

log = logging.getLogger(__name__)

PLAN_TAG = 0x6D6535  # "me5": separates the plan's generator from other seeded draws
ROW_TAG = 0x726F77  # "row"
MAX_MISSES = 100_000  # a reader that skips this many records in a row stops with an error (misconfigured filter)


def _key_seed(key: str) -> int:
    return zlib.crc32(key.encode("utf-8"))


def _mix_counts(names: Sequence[str], langs: Sequence[str]) -> dict[str, dict[str, int]]:
    out: dict[str, dict[str, int]] = {}
    for n, lang in zip(names, langs):
        d = out.setdefault(n, {})
        d[lang] = d.get(lang, 0) + 1
    return out


# ============================================================================================== in memory
class PairBatchStream(IterableDataset):
    """An endless, deterministic stream of collated per-device batches from in-memory examples.

    Global batch ``b`` is a pure function of ``(seed, b)``: every rank draws the same global batch and keeps
    its slice ``[rank*B:(rank+1)*B]``, and DataLoader worker ``w`` of ``W`` collates batches with
    ``b % W == w`` (PyTorch reads workers round-robin, so the order is kept). Resuming at ``start_batch``
    replays the cheap index draws only, so a resumed run sees exactly the batches of an uninterrupted one.
    Each source is read in a fresh permutation per pass (epoch).

    ``lang_weights`` (optional, ``{source: {lang: weight}}``): draw each example's language within its source
    by these weights (language temperature), then the next example of that language. The language draws come
    from their own generator, so without ``lang_weights`` the sequence is the one this class always drew.
    """

    def __init__(
        self,
        examples: Mapping[str, Sequence],
        weights: Mapping[str, float],
        *,
        collator,
        formatters: Mapping,
        batch_plan: BatchPlan,
        rank: int = 0,
        seed: int = 0,
        homogeneous: bool = False,
        start_batch: int = 0,
        lang_weights: Mapping[str, Mapping[str, float]] | None = None,
    ):
        self.names = [n for n in examples if weights[n] > 0]
        self.examples = examples
        self.formatters = formatters
        p = np.array([weights[n] for n in self.names], dtype=np.float64)
        self.p = p / p.sum()
        self.collator = collator
        self.global_batch_size = batch_plan.global_batch_size
        self.slots = batch_plan.rank_slice(rank)
        self.rank = rank
        self.seed = seed
        self.homogeneous = homogeneous
        self.start_batch = start_batch
        self.lang_p: dict[str, tuple[list[str], np.ndarray]] = {}
        for name, lw in (lang_weights or {}).items():
            if name in self.names:
                langs = [lang for lang, w in lw.items() if w > 0]
                q = np.array([lw[lang] for lang in langs], dtype=np.float64)
                self.lang_p[name] = (langs, q / q.sum())

    def _by_lang(self) -> dict[str, dict[str, np.ndarray]]:
        out = {}
        for name in self.lang_p:
            langs = np.array([ex.lang for ex in self.examples[name]])
            out[name] = {lang: np.flatnonzero(langs == lang) for lang in self.lang_p[name][0]}
        return out

    def _global_batches(self) -> Iterator[list[tuple[str, int]]]:
        rng = np.random.default_rng(self.seed)
        order = {n: None for n in self.names}
        cursor = dict.fromkeys(self.names, 0)
        epoch = dict.fromkeys(self.names, 0)
        by_lang = self._by_lang() if self.lang_p else {}
        lang_state: dict[tuple[str, str], list] = {}  # (source, lang) -> [order, cursor, epoch]

        def next_index(name: str) -> int:
            exs = self.examples[name]
            if order[name] is None or cursor[name] >= len(exs):
                if order[name] is not None:
                    epoch[name] += 1
                perm_rng = np.random.default_rng([self.seed, self.names.index(name), epoch[name]])
                order[name] = perm_rng.permutation(len(exs))
                cursor[name] = 0
            i = int(order[name][cursor[name]])
            cursor[name] += 1
            return i

        def next_lang_index(name: str, lang: str) -> int:
            idx = by_lang[name][lang]
            st = lang_state.setdefault((name, lang), [None, 0, 0])
            if st[0] is None or st[1] >= len(idx):
                if st[0] is not None:
                    st[2] += 1
                perm_rng = np.random.default_rng([self.seed, self.names.index(name), _key_seed(lang), st[2]])
                st[0], st[1] = idx[perm_rng.permutation(len(idx))], 0
            i = int(st[0][st[1]])
            st[1] += 1
            return i

        b = 0
        while True:
            if self.homogeneous:
                picks = [self.names[rng.choice(len(self.names), p=self.p)]] * self.global_batch_size
            else:
                picks = [self.names[k] for k in rng.choice(len(self.names), size=self.global_batch_size, p=self.p)]
            if not self.lang_p:
                yield [(name, next_index(name)) for name in picks]
            else:
                lrng = np.random.default_rng([self.seed, PLAN_TAG, b])
                slots = []
                for name in picks:
                    if name in self.lang_p:
                        langs, q = self.lang_p[name]
                        slots.append((name, next_lang_index(name, langs[lrng.choice(len(langs), p=q)])))
                    else:
                        slots.append((name, next_index(name)))
                yield slots
            b += 1

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        wid, n_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        freeze_gc_in_worker()
        for b, slots in enumerate(self._global_batches()):
            if b < self.start_batch or (b - self.start_batch) % n_workers != wid:
                continue
            neg_rng = np.random.default_rng([self.seed, b, self.rank])
            exs = [(name, self.examples[name][i]) for name, i in slots[self.slots]]
            items = [self.formatters[name](ex, rng=neg_rng) for name, ex in exs]
            batch = self.collator(items)
            batch["batch_index"] = b
            batch["data_state"] = {
                "batch": b,
                "rank": self.rank,
                "mix": _mix_counts([n for n, _ in exs], [ex.lang for _, ex in exs]),
            }
            yield batch


# ============================================================================================== streaming
def freeze_gc_in_worker() -> None:
    """In a DataLoader worker process, move the objects it inherited into the garbage collector's permanent
    generation (``gc.freeze``); elsewhere, nothing.

    A worker inherits the trainer's ~0.5M tracked objects (torch, transformers, lightning modules) and keeps
    them all its life. A full collection walks every one of them (~0.3 s on the 2-core VM), and the stream of
    short-lived records sets one off every few tens of batches: about a tenth of a worker's time in
    ``python -m benchmarks.data_loader``. Frozen, they are skipped; objects the worker creates later are collected as
    usual. It also spares the forked pages that a collection would otherwise write to (copy on write).
    """
    if get_worker_info() is not None:
        gc.freeze()


@dataclass
class Leaf:
    """One stream the plan draws from: a source, or one language of a source (language temperature).

    Exactly one of ``units`` (local files) and ``hub`` (``datasets`` streaming arguments) is set.
    """

    key: str
    source: str
    lang: str | None = None
    units: list[Unit] | None = None
    hub: dict | None = None
    rows: int | None = None


def deal_units(units: Sequence[Unit], *, key: str, epoch: int, seed: int, n_readers: int) -> list[list[int]] | None:
    """Each reader's unit indices for ``epoch`` (in reading order), or ``None`` when there are fewer units than
    readers (then every reader strides over every unit).

    The units are permuted (seeded by ``seed``, the leaf ``key`` and ``epoch``); then, largest first, each goes
    to the reader with the fewest rows so far (ties: the lower reader), so the readers' shares differ by at most
    one unit's rows; each reader reads its units in the permuted order.
    """
    if len(units) < n_readers:
        return None
    perm = np.random.default_rng([seed, _key_seed(key), epoch]).permutation(len(units)).tolist()
    rank_of = {u: i for i, u in enumerate(perm)}
    heap = [(0, r) for r in range(n_readers)]
    out: list[list[int]] = [[] for _ in range(n_readers)]
    for u in sorted(perm, key=lambda u: -units[u].weight):  # largest first (stable: ties in permuted order)
        load, r = heapq.heappop(heap)
        out[r].append(u)
        heapq.heappush(heap, (load + units[u].weight, r))
    return [sorted(part, key=rank_of.__getitem__) for part in out]  # each reader reads in permuted order


class LeafReader:
    """Reader ``reader`` of ``n_readers`` over one leaf's local units; yields the kept examples (``classify``:
    the source's :class:`~me5.data.records.RecordClassifier`).

    ``position()``: ``[epoch, unit_pos, offset, byte, line]``, the point just after the last example handed
    out; a reader built with that position continues exactly there.
    """

    def __init__(self, leaf: Leaf, classify, *, reader: int, n_readers: int, seed: int, counts: Counter,
                 position: Sequence[int] | None = None, shuffle_rows: bool = True):
        self.leaf, self.classify = leaf, classify
        self.reader, self.n_readers, self.seed = reader, n_readers, seed
        self.counts = counts
        self.shuffle_rows = shuffle_rows
        self.units = list(leaf.units or [])
        if not self.units:
            raise DataError(f"source '{leaf.source}' has no data" + (f" in language {leaf.lang}" if leaf.lang else ""))
        self.epoch, self.unit_pos, self.offset, self.byte, self.line = (list(position) if position else [0, 0, 0, 0, 0])
        self._it = self._examples()

    def position(self) -> list[int]:
        return [self.epoch, self.unit_pos, self.offset, self.byte, self.line]

    def next(self):
        return next(self._it)

    # ------------------------------------------------------------------ internals
    def _epoch_plan(self) -> tuple[list[int], int, int]:
        """(unit order, stride, phase): with ``stride`` > 1 the reader keeps epoch records ``phase mod stride``."""
        dealt = deal_units(self.units, key=self.leaf.key, epoch=self.epoch, seed=self.seed, n_readers=self.n_readers)
        if dealt is not None:
            return dealt[self.reader], 1, 0
        order = np.random.default_rng([self.seed, _key_seed(self.leaf.key), self.epoch]).permutation(len(self.units))
        total = sum(self._rows(u) for u in range(len(self.units)))
        if total < self.n_readers:  # cannot give every reader its own record: share (replicated) instead
            return order.tolist(), max(1, total), self.reader % max(1, total)
        return order.tolist(), self.n_readers, self.reader

    def _rows(self, u: int) -> int:
        unit = self.units[u]
        if unit.rows is None:  # a jsonl file in stride mode: count its lines once (fast, in C)
            unit = Unit(unit.file, unit.kind, unit.row_group, count_lines(unit.file), unit.weight, unit.first_row,
                        unit.lang)
            self.units[u] = unit
        return unit.rows

    def _examples(self) -> Iterator:
        empty_epochs = misses = 0
        while True:
            order, stride, phase = self._epoch_plan()
            full_epoch = self.unit_pos == 0 and self.offset == 0
            # records before this unit in the epoch (stride mode only)
            base = sum(self._rows(u) for u in order[: self.unit_pos]) if stride > 1 else 0
            kept = False
            while self.unit_pos < len(order):
                u = order[self.unit_pos]
                for rec, where, line in self._read_unit(self.units[u], u, (phase - base) % stride, stride):
                    ex = self.classify(rec, where, line, self.counts)
                    if ex is None:
                        misses += 1
                        if misses >= MAX_MISSES:
                            raise DataError(f"source '{self.leaf.source}': {misses} records in a row were skipped "
                                            f"(counts: {dict(self.counts)})", file=where, line=line)
                        continue
                    if self.leaf.lang is not None and ex.lang != self.leaf.lang:
                        raise DataError(f"source '{self.leaf.source}': the record's language '{ex.lang}' is not "
                                        f"'{self.leaf.lang}', the language of its unit that language temperature "
                                        "streams it under", file=where, line=line, field="lang")
                    kept, misses = True, 0
                    self.counts["kept"] += 1
                    yield ex
                if stride > 1:
                    base += self._rows(u)
                self.unit_pos, self.offset, self.byte, self.line = self.unit_pos + 1, 0, 0, 0
            empty_epochs = 0 if kept or not full_epoch else empty_epochs + 1
            if empty_epochs >= 3:  # the units dealt to this reader in three epochs held nothing usable
                raise DataError(f"source '{self.leaf.source}' gives reader {self.reader} of {self.n_readers} no "
                                f"usable examples (counts: {dict(self.counts)})", file=self.units[0].file)
            self.epoch, self.unit_pos, self.offset, self.byte, self.line = self.epoch + 1, 0, 0, 0, 0

    def _read_unit(self, unit: Unit, u: int, first: int, stride: int) -> Iterator[tuple[dict | DataError, str, int]]:
        """Records of ``unit`` from ``self.offset`` whose unit index ``j`` has ``j % stride == first``; the
        position moves to just after each record before it is handed out. A jsonl line that cannot be read is
        handed out as its :class:`DataError` (the source's filter raises or counts it)."""
        if unit.kind == "parquet":
            table = read_row_group(unit.file, unit.row_group)
            n = table.num_rows
            if unit.rows is not None and n != unit.rows:  # a corrupt page can decode to fewer rows without an error
                raise DataError(f"row group {unit.row_group} has {unit.rows} rows but {n} could be read", file=unit.file)
            if self.shuffle_rows:
                rows = np.random.default_rng([self.seed, ROW_TAG, _key_seed(self.leaf.key), self.epoch, u]).permutation(n)
            else:
                rows = np.arange(n)
            start = self.offset + ((first - self.offset) % stride)
            js = np.arange(start, n, stride)
            for c in range(0, len(js), 1024):
                chunk = js[c: c + 1024]
                try:  # a corrupt page may decode only here (e.g. a string that is not UTF-8)
                    recs = table.take(rows[chunk]).to_pylist()
                except Exception as err:
                    raise DataError(f"cannot read row group {unit.row_group} ({type(err).__name__}: {err})",
                                    file=unit.file) from err
                for j, rec in zip(chunk.tolist(), recs):
                    self.offset = j + 1
                    yield rec, unit.file, unit.first_row + int(rows[j])
        else:  # jsonl: unit index = physical line - 1, read in order; offset = lines consumed
            select = (stride, first) if stride > 1 else None
            for line_no, end, rec in iter_jsonl_at(unit.file, start_byte=self.byte, start_line=self.line, allow_arrays=True,
                                                   errors="yield", select=select):
                self.offset, self.byte, self.line = line_no, end, line_no
                yield rec, unit.file, line_no


class HubLeafReader:
    """Reader ``reader`` of ``n_readers`` over a hub dataset streamed with ``datasets``.

    The stream is split with ``split_dataset_by_node`` (whole shards when the shard count divides the number of
    readers, else every ``n_readers``-th example); the position is ``datasets``' own ``state_dict`` (exact,
    no shuffle buffer is used) plus the epoch and the number of records read.
    """

    def __init__(self, leaf: Leaf, classify, *, reader: int, n_readers: int, seed: int, counts: Counter,
                 position: Mapping | None = None, shuffle_rows: bool = True):
        from datasets.distributed import split_dataset_by_node

        h = leaf.hub
        ds = load_hub_stream(h["path"], name=h.get("name"), split=h.get("split", "train"), data_files=h.get("data_files"))
        self.ds = split_dataset_by_node(ds, rank=reader, world_size=n_readers)
        self.leaf, self.classify, self.counts = leaf, classify, counts
        self.where = f"hub:{h['path']}/{h.get('split', 'train')}"
        position = dict(position or {})
        self.epoch, self.read = int(position.get("epoch", 0)), int(position.get("read", 0))
        self._hf_state = position.get("hf")
        self._it = self._examples()

    def position(self) -> dict:
        return {"epoch": self.epoch, "read": self.read, "hf": self.ds.state_dict() if self.read else None}

    def next(self):
        return next(self._it)

    def _examples(self):
        while True:
            self.ds.set_epoch(self.epoch)
            if self._hf_state is not None:
                self.ds.load_state_dict(self._hf_state)
                self._hf_state = None
            kept_before, read_any = self.counts.get("kept", 0), False
            # ``iter`` (not ``__iter__``): inside a DataLoader worker ``__iter__`` would split the shards over the
            # workers a second time; the split over all readers is already done
            for row in hub_rows(self.ds.iter(batch_size=1), where=self.where, read=self.read):
                rec = {k: v[0] for k, v in row.items()}
                self.read += 1
                read_any = True
                ex = self.classify(rec, self.where, self.read, self.counts)
                if ex is not None:
                    self.counts["kept"] += 1
                    yield ex
            if not read_any or self.counts.get("kept", 0) == kept_before:
                raise DataError(f"source '{self.leaf.source}' has no usable examples (counts: {dict(self.counts)})",
                                file=self.where)
            self.epoch, self.read = self.epoch + 1, 0


def plan_batch(b: int, *, seed: int, global_batch_size: int, leaf_p: np.ndarray, source_of_leaf: np.ndarray,
               source_p: np.ndarray, homogeneous: bool) -> np.ndarray:
    """The leaf index of every slot of global batch ``b`` (a pure function of ``seed`` and ``b``)."""
    rng = np.random.default_rng([seed, PLAN_TAG, b])
    if not homogeneous:
        return rng.choice(len(leaf_p), size=global_batch_size, p=leaf_p)
    s = rng.choice(len(source_p), p=source_p)
    leaves = np.flatnonzero(source_of_leaf == s)
    if len(leaves) == 1:
        return np.full(global_batch_size, leaves[0])
    q = leaf_p[leaves] / leaf_p[leaves].sum()
    return leaves[rng.choice(len(leaves), size=global_batch_size, p=q)]


class ShardedPairStream(IterableDataset):
    """An endless stream of collated per-device batches read from sharded sources (see the module docstring).

    Args:
        classifiers: source name -> its :class:`~me5.data.records.RecordClassifier` (what a record must be).
        leaves: the streams the plan draws from; ``leaf_weights``: their sampling weights (>= 0).
        formatters: source name -> its :class:`~me5.data.collate.ItemFormatter` (prompts, negatives).
        batch_plan: the stage's :class:`~me5.batching.BatchPlan` (global batch, this rank's slice).
        readers_per_rank: ``L``; the DataLoader must have ``num_workers`` = L (or 0 when L = 1).
        start_states: ``{global reader id: {"positions": {leaf key: position}, "counts": {source: {...}}}}``
            after the last consumed batch of each reader (from the checkpoint).
    """

    def __init__(
        self,
        classifiers: Mapping,
        leaves: Sequence[Leaf],
        leaf_weights: Sequence[float],
        *,
        collator,
        formatters: Mapping,
        batch_plan: BatchPlan,
        rank: int = 0,
        readers_per_rank: int = 1,
        seed: int = 0,
        homogeneous: bool = False,
        start_batch: int = 0,
        start_states: Mapping[int, Mapping] | None = None,
        shuffle_rows: bool = True,
    ):
        w = np.asarray(leaf_weights, dtype=np.float64)
        keep = w > 0
        self.leaves = [lf for lf, k in zip(leaves, keep) if k]
        self.leaf_p = w[keep] / w[keep].sum()
        names = list(dict.fromkeys(lf.source for lf in self.leaves))
        self.source_of_leaf = np.array([names.index(lf.source) for lf in self.leaves])
        sp = np.array([self.leaf_p[self.source_of_leaf == i].sum() for i in range(len(names))])
        self.source_p = sp / sp.sum()
        self.classifiers, self.formatters = classifiers, formatters
        self.collator = collator
        self.global_batch_size = batch_plan.global_batch_size
        self.slots = batch_plan.rank_slice(rank)
        self.rank, self.world_size = rank, batch_plan.world_size
        self.readers_per_rank = max(1, readers_per_rank)
        self.seed, self.homogeneous, self.start_batch = seed, homogeneous, start_batch
        self.start_states = dict(start_states or {})
        self.shuffle_rows = shuffle_rows

    def plan(self, b: int) -> np.ndarray:
        return plan_batch(b, seed=self.seed, global_batch_size=self.global_batch_size, leaf_p=self.leaf_p,
                          source_of_leaf=self.source_of_leaf, source_p=self.source_p, homogeneous=self.homogeneous)

    def reader_for_batch(self, b: int) -> int:
        return self.rank * self.readers_per_rank + b % self.readers_per_rank

    def _open_readers(self, reader: int) -> tuple[dict, dict[str, Counter]]:
        state = self.start_states.get(reader) or {}
        positions = state.get("positions") or {}
        counts = {name: Counter(c) for name, c in (state.get("counts") or {}).items()}
        readers = {}
        for lf in self.leaves:
            cls = HubLeafReader if lf.hub is not None else LeafReader
            readers[lf.key] = cls(lf, self.classifiers[lf.source], reader=reader,
                                  n_readers=self.world_size * self.readers_per_rank, seed=self.seed,
                                  counts=counts.setdefault(lf.source, Counter()),
                                  position=positions.get(lf.key), shuffle_rows=self.shuffle_rows)
        return readers, counts

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        wid, n_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        if n_workers != self.readers_per_rank:
            raise RuntimeError(f"the stream has {self.readers_per_rank} readers per rank but the DataLoader has "
                               f"{n_workers} worker(s); build it with num_workers={self.readers_per_rank}")
        freeze_gc_in_worker()
        return self.iter_worker(wid)

    def iter_worker(self, wid: int) -> Iterator[dict]:
        """The batches DataLoader worker ``wid`` produces (what ``__iter__`` runs in the worker)."""
        n_workers = self.readers_per_rank
        first = self.start_batch + wid
        reader = self.reader_for_batch(first)
        readers, counts = self._open_readers(reader)
        b = first
        while True:
            slots = self.plan(b)[self.slots]
            neg_rng = np.random.default_rng([self.seed, b, self.rank])
            names, exs = [], []
            for li in slots.tolist():
                lf = self.leaves[li]
                names.append(lf.source)
                exs.append(readers[lf.key].next())
            items = [self.formatters[n](ex, rng=neg_rng) for n, ex in zip(names, exs)]
            batch = self.collator(items)
            batch["batch_index"] = b
            batch["data_state"] = {
                "batch": b,
                "rank": self.rank,
                "reader": reader,
                "positions": {k: r.position() for k, r in readers.items()},
                "counts": {n: dict(c) for n, c in counts.items()},
                "mix": _mix_counts(names, [ex.lang for ex in exs]),
            }
            yield batch
            b += n_workers
