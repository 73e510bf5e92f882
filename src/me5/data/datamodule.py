"""The one LightningDataModule: sources mixed by weight, served in memory or streamed, resumable exactly.

A single source is a mixture of one. Each example (or each global batch, with ``homogeneous``) draws its
source with probability

    p(s) ∝ w_s ** temperature_alpha,

where ``w_s`` is the given weight (by default the source's size, e.g. the pair counts of mE5 Table 1 or 2).
``temperature_alpha`` = 1 samples in proportion to size; below 1 it flattens the mixture so that small
(low-resource) sources are not drowned (XLM-R/mT5 use α ≈ 0.3 over languages); 0 is uniform. With
``lang_temperature_alpha`` the same is done over the languages inside each source:
p(lang | s) ∝ n_{s,lang} ** lang_temperature_alpha.

Two ways to serve batches (``me5.data.stream`` describes both):

* **in memory** (small data, the sample run): ``setup`` reads every example into a list;
* **streaming** (``streaming=True``, or automatically for hub ids, ``me5.prepare`` shard folders and local
  data over 1 GiB): ``setup`` only lists the shards; ranks and DataLoader workers read disjoint parts.

Runtime inputs arrive through :meth:`PairDataModule.connect` once they exist: the tokenizer, the stage's
:class:`~me5.batching.BatchPlan`, what the loss needs of a record, the lengths and the
:class:`~me5.prompts.PromptPolicy`. The checkpointed position is a :class:`~me5.data.position.DataPosition`.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import lightning as L
from torch.utils.data import DataLoader

from me5.batching import BatchPlan
from me5.data.collate import ItemFormatter, PairCollator
from me5.data.position import DataPosition
from me5.data.schema import PairExample
from me5.data.source import Source
from me5.data.stream import Leaf, PairBatchStream, ShardedPairStream
from me5.errors import ConfigError, DataError
from me5.prompts import PromptPolicy

log = logging.getLogger(__name__)


def _check_word_cache(n) -> int:
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ConfigError("data.word_cache", f"must be an integer >= 0 (0 turns the cache off), got {n!r}")
    return n


@dataclass(frozen=True)
class Connection:
    """What :meth:`PairDataModule.connect` binds once the model and the world size exist: the tokenizer, the
    stage's whole :class:`~me5.batching.BatchPlan`, the lengths, and each source's record classifier and item
    formatter (prompts, negatives)."""

    tokenizer: object
    batch_plan: BatchPlan
    query_max_length: int
    passage_max_length: int
    classifiers: dict
    formatters: dict


class PairDataModule(L.LightningDataModule):
    """Samples text pairs from one or several sources by weight.

    Args:
        sources: name -> :class:`~me5.data.source.Source` (each takes its key as its name).
        weights: name -> weight, unnormalised (e.g. Table 1's pair counts in millions); ``None``: each source's
            size (its ``size``, loaded examples, or shard row counts).
        temperature_alpha: p(source) ∝ weight ** alpha (1: as given; < 1 flattens; 0: uniform).
        lang_temperature_alpha: when set, p(lang | source) ∝ pairs_in_lang ** alpha inside every source
            (streaming needs single-language units: row groups as ``me5.prepare --split-langs`` writes them,
            or raw files whose published name gives the language; see ``Source.file_lang``).
        homogeneous: draw one source per *global* batch instead of per example.
        seed: the data seed (batch order, negatives drawn, row shuffles).
        num_workers: DataLoader workers. When streaming it also fixes the number of readers per rank
            (``max(1, num_workers)``), hence the batch sequence; resume with the same value.
        streaming: stream every source (``None``: when any source would stream on its own).
        word_cache: distinct words the collator memoises per loader process (``me5.data.collate``; 0: off).
            Exact by construction and checked; it only changes speed.
    """

    def __init__(
        self,
        sources: Mapping[str, Source],
        *,
        weights: Mapping[str, float] | None = None,
        temperature_alpha: float = 1.0,
        lang_temperature_alpha: float | None = None,
        homogeneous: bool = False,
        seed: int = 0,
        num_workers: int = 0,
        streaming: bool | None = None,
        word_cache: int = 262_144,
    ):
        super().__init__()
        if not sources:
            raise ConfigError("data.sources", "a DataModule needs at least one source")
        self._sources = dict(sources)
        for name, src in self._sources.items():
            if not isinstance(src, Source):
                raise ConfigError(f"data.sources.{name}", f"expected a me5.data.Source, got {type(src).__name__}")
            src.name = name
        if weights is not None:
            weights = dict(weights)
            unknown = set(weights) - set(self._sources)
            if unknown:
                raise ConfigError(f"data.weights.{sorted(unknown)[0]}", f"no such source; sources: {sorted(self._sources)}")
            missing = set(self._sources) - set(weights)
            if missing:
                raise ConfigError(f"data.weights.{sorted(missing)[0]}", "every source needs a weight")
            if any(not (w >= 0) for w in weights.values()) or sum(weights.values()) <= 0:
                raise ConfigError("data.weights", f"weights must be >= 0 with a positive sum, got {weights}")
            weights = {n: float(w) for n, w in weights.items()}
        self._weights = weights
        if not (temperature_alpha >= 0):
            raise ConfigError("data.temperature_alpha", f"must be >= 0, got {temperature_alpha}")
        if lang_temperature_alpha is not None and not (lang_temperature_alpha >= 0):
            raise ConfigError("data.lang_temperature_alpha", f"must be >= 0 or null, got {lang_temperature_alpha}")
        self.temperature_alpha = float(temperature_alpha)
        self.lang_temperature_alpha = lang_temperature_alpha
        self.homogeneous = homogeneous
        self.seed = seed
        self.num_workers = num_workers
        self.streaming = streaming
        self.word_cache = _check_word_cache(word_cache)
        self.position = DataPosition(seed)
        self.examples: dict[str, list[PairExample]] = {}
        self.leaves: dict[str, list[Leaf]] = {}
        self.counts: dict[str, Counter] = {name: Counter() for name in self._sources}
        self._connected: Connection | None = None
        self._streaming_now: bool | None = None
        self._layout: dict | None = None

    @classmethod
    def from_path(cls, path: str | Sequence[str], *, name: str = "files", data_files: str | Sequence[str] | None = None,
                  lang: str | None = None, symmetric: bool | None = None, task: str | None = None,
                  instruction: str | None = None, strict: bool = True, max_examples: int | None = None,
                  max_chars: int | None = None, long_texts: str = "truncate", n_negatives: int | None = None,
                  **kwargs) -> PairDataModule:
        """One source of files in the normalised schema (``query``, ``positive``, optional ``negatives``,
        ``teacher_scores``, ``lang``): a jsonl(.gz)/parquet file, a folder of them, or a ``me5.prepare`` folder.
        ``kwargs``: the loader options of :class:`PairDataModule`."""
        source = Source(str(path), name=name, data_files=data_files, lang=lang, symmetric=symmetric, task=task,
                        instruction=instruction, strict=strict, max_examples=max_examples, max_chars=max_chars,
                        long_texts=long_texts, n_negatives=n_negatives)
        return cls({name: source}, **kwargs)

    # ------------------------------------------------------------------ sources and weights
    def sources(self) -> dict[str, Source]:
        return self._sources

    def check(self) -> None:
        """Every source's cheap checks (paths exist), before any data is generated or read."""
        for src in self._sources.values():
            src.check()

    def prepare_data(self) -> None:
        for src in self._sources.values():
            src.prepare_data()

    def is_streaming(self) -> bool:
        if self._streaming_now is None:
            self._streaming_now = (bool(self.streaming) if self.streaming is not None
                                   else any(src.wants_streaming() for src in self._sources.values()))
        return self._streaming_now

    def num_pairs(self, name: str) -> int:
        """A source's size: its ``size``, its loaded examples, or its shards' rows."""
        src = self._sources[name]
        if src.size is None and name in self.examples:
            return len(self.examples[name])
        return src.num_pairs(self.leaves.get(name))

    def weights(self) -> dict[str, float]:
        """The weights as given, or each source's size (known after ``setup``)."""
        if self._weights is not None:
            return dict(self._weights)
        if len(self._sources) == 1:  # one source: its weight changes nothing (and a hub stream has no known size)
            return {n: 1.0 for n in self._sources}
        sizes = {n: float(self.num_pairs(n)) for n in self._sources}
        if sum(sizes.values()) <= 0:
            raise ConfigError("data.weights", f"every source is empty: {sizes}")
        return sizes

    def sampling_weights(self) -> dict[str, float]:
        """``weight ** temperature_alpha`` per source (unnormalised; exactly the weights when alpha = 1)."""
        a = self.temperature_alpha
        return {n: (w**a if w > 0 else 0.0) for n, w in self.weights().items()}

    def probabilities(self) -> dict[str, float]:
        """The normalised probability of drawing each source."""
        w = self.sampling_weights()
        total = sum(w.values())
        return {n: v / total for n, v in w.items()}

    def lang_sizes(self, name: str) -> dict[str, int]:
        """Pairs per language of a source (for language temperature)."""
        if name in self.examples:
            return dict(sorted(Counter(ex.lang for ex in self.examples[name]).items()))
        return self._sources[name].lang_sizes(self.leaves.get(name))

    def lang_weights(self) -> dict[str, dict[str, float]] | None:
        """``{source: {lang: pairs ** lang_temperature_alpha}}``, or ``None`` without language temperature."""
        if self.lang_temperature_alpha is None:
            return None
        b = float(self.lang_temperature_alpha)
        return {n: {lang: float(c) ** b for lang, c in self.lang_sizes(n).items() if c > 0} for n in self._sources}

    def negatives_per_source(self, n_negatives: int) -> dict[str, int]:
        """The hard negatives each source's examples take: its own ``n_negatives``, else the stage's."""
        return {n: int(src.n_negatives) if src.n_negatives is not None else int(n_negatives)
                for n, src in self._sources.items()}

    def check_group_sizes(self, n_negatives: int, *, where: str = "stages.<stage>.n_negatives") -> dict[str, int]:
        """Every batch holds one group size (1 + hard negatives: the collator and the losses need it), so sources
        whose counts differ need ``homogeneous`` batches. Returns :meth:`negatives_per_source`; a mixed batch that
        could hold two group sizes is a :class:`ConfigError` naming the sources."""
        per = self.negatives_per_source(n_negatives)
        drawn = {n: k for n, k in per.items() if self._weights is None or self._weights.get(n, 0) > 0}
        if len(set(drawn.values())) > 1 and not self.homogeneous:
            by_count: dict[int, list[str]] = {}
            for n, k in drawn.items():
                by_count.setdefault(k, []).append(n)
            groups = "; ".join(f"{k}: {', '.join(v[:4])}{' ...' if len(v) > 4 else ''}" for k, v in sorted(by_count.items()))
            raise ConfigError("data.homogeneous", f"the sources take different numbers of hard negatives ({groups}; "
                              f"the stage's is {where}={n_negatives}) and a batch holds one group size: set "
                              "homogeneous=true (one source per global batch) or give them one count")
        return per

    # ------------------------------------------------------------------ Lightning hooks
    def connect(self, tokenizer, *, batch_plan: BatchPlan, n_negatives: int = 0, require_teacher: bool = False,
                query_max_length: int = 64, passage_max_length: int = 128, prompts: PromptPolicy) -> None:
        """Runtime inputs that exist only once the model and the world size do (litgpt's ``connect``): the
        tokenizer, the batch plan and the run's prompt policy (``prompts``, required: the app binds it)."""
        per = self.check_group_sizes(n_negatives)
        self._connected = Connection(
            tokenizer=tokenizer, batch_plan=batch_plan, query_max_length=query_max_length,
            passage_max_length=passage_max_length,
            classifiers={n: src.classifier(n_negatives=per[n], require_teacher=require_teacher)
                         for n, src in self._sources.items()},
            formatters={n: ItemFormatter.for_source(src, prompts=prompts, n_negatives=per[n])
                        for n, src in self._sources.items()},
        )

    @property
    def batch_plan(self) -> BatchPlan:
        if self._connected is None:
            raise RuntimeError("call connect(tokenizer, batch_plan=...) first")
        return self._connected.batch_plan

    def setup(self, stage: str | None = None) -> None:
        if self._connected is None:
            raise RuntimeError("call connect(tokenizer, batch_plan=...) before setup()")
        by_lang = self.lang_temperature_alpha is not None
        for name, src in self._sources.items():
            if self.is_streaming():
                if name not in self.leaves:
                    self.leaves[name] = src.stream_leaves(by_lang=by_lang)
            elif name not in self.examples:
                self.examples[name], self.counts[name] = src.load_examples(self._connected.classifiers[name])
        self._check_size()

    def _check_size(self) -> None:
        """A dataset smaller than one global batch is an error (it would repeat examples inside every batch)."""
        gbs = self.batch_plan.global_batch_size
        sizes = {}
        for name, src in self._sources.items():
            if name in self.examples or src.size is not None:
                sizes[name] = self.num_pairs(name)
                continue
            units = [u for lf in self.leaves.get(name, []) for u in (lf.units or [None])]
            if not units or any(u is None or u.rows is None for u in units):
                return  # a hub stream or raw jsonl: its size is unknown without a pass over it
            sizes[name] = sum(u.rows for u in units)
        w = self.sampling_weights()
        total = sum(n for name, n in sizes.items() if w.get(name, 0) > 0)
        if total < gbs:
            where = ", ".join(f"{n}: {sizes[n]}" for n in sizes)
            raise DataError(f"the data has {total} usable pairs ({where}), fewer than one global batch of {gbs} "
                            f"({self.batch_plan.where}.global_batch_size): every batch would repeat examples",
                            file=str(next(iter(self._sources.values())).path))

    def data_counts(self) -> dict[str, int]:
        """Read/kept/skipped counts per source, flat keys ``<source>/<reason>`` for logging.

        When streaming: the counts of the readers whose batches this rank consumed (cumulative over resumes).
        """
        if self.is_streaming() and self._connected is not None:
            agg: dict[str, Counter] = {}
            for per_src in self.position.reader_counts.values():
                for name, c in per_src.items():
                    agg.setdefault(name, Counter()).update(c)
            self.counts = {name: agg.get(name, Counter()) for name in self._sources}
        return {f"{name}/{k}": v for name, c in self.counts.items() for k, v in sorted(c.items())}

    def _rank_world(self) -> tuple[int, int]:
        return (self.trainer.global_rank, self.trainer.world_size) if self.trainer is not None else (0, 1)

    def train_dataloader(self) -> DataLoader:
        rank, world = self._rank_world()
        if world != self.batch_plan.world_size:
            raise RuntimeError(f"the batch plan is for {self.batch_plan.world_size} devices, the trainer has {world}")
        return DataLoader(self.build_stream(self._collator(), rank=rank), batch_size=None,
                          num_workers=self.num_workers, persistent_workers=False)

    def _collator(self) -> PairCollator:
        c = self._connected
        return PairCollator(c.tokenizer, query_max_length=c.query_max_length,
                            passage_max_length=c.passage_max_length, word_cache=self.word_cache)

    def build_stream(self, collator, *, rank: int = 0, world: int | None = None):
        """The dataset rank ``rank`` iterates (``world``: simulate another world size than the plan's)."""
        c = self._connected
        plan = self.batch_plan if world is None or world == self.batch_plan.world_size else \
            self.batch_plan.with_world_size(world)
        if not self.is_streaming():
            return PairBatchStream(self.examples, self.sampling_weights(), collator=collator,
                                   formatters=c.formatters, batch_plan=plan, rank=rank, seed=self.seed,
                                   homogeneous=self.homogeneous, start_batch=self.position.start_batch,
                                   lang_weights=self.lang_weights())
        readers_per_rank = max(1, self.num_workers)
        self._layout = {"world_size": plan.world_size, "readers_per_rank": readers_per_rank}
        leaves, weights = self._leaf_weights()
        carry = self.position.start_states(leaves, self._layout)
        return ShardedPairStream(
            c.classifiers, leaves, weights, collator=collator, formatters=c.formatters, batch_plan=plan,
            rank=rank, readers_per_rank=readers_per_rank, seed=self.seed, homogeneous=self.homogeneous,
            start_batch=self.position.start_batch,
            start_states={rid: st for rid, st in carry.items() if rid // readers_per_rank == rank},
        )

    def _leaf_weights(self) -> tuple[list[Leaf], list[float]]:
        sw = self.sampling_weights()
        lw = self.lang_weights() or {}
        leaves, weights = [], []
        for name in self._sources:
            for lf in self.leaves[name]:
                w = sw[name]
                if lf.lang is not None and name in lw:
                    total = sum(lw[name].values())
                    w = w * lw[name].get(lf.lang, 0.0) / total if total > 0 else 0.0
                leaves.append(lf)
                weights.append(w)
        return leaves, weights

    # ------------------------------------------------------------------ data position
    def on_before_batch_transfer(self, batch, dataloader_idx: int):
        """Called by Lightning on each batch the training loop is about to use: take out its bookkeeping."""
        if isinstance(batch, dict) and "data_state" in batch:
            self.position.observe(batch.pop("data_state"))
        return batch

    def realised_mixture(self, *, gather: bool = False) -> dict[str, dict[str, int]]:
        """Pairs consumed so far per source and language, ``{source: {lang: pairs}}``; ``gather=True`` sums
        over ranks (a collective: call it on every rank)."""
        return self.position.realised_mixture(gather=gather)

    def _consumed(self) -> int:
        if self.trainer is not None:
            return int(self.trainer.global_step)
        return max(self.position.start_batch, self.position.consumed_seen)

    def state_dict(self) -> dict:
        """The data position (:class:`~me5.data.position.DataPosition`); a collective over ranks."""
        layout = self._layout if self._streaming_now and self._layout is not None else None
        return self.position.state_dict(self._consumed(), layout=layout)

    def load_state_dict(self, state: dict) -> None:
        self.position.load_state_dict(state, rank=self._rank_world()[0])

