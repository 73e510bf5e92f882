"""The base LightningDataModule of one text-pair source, and the data position it checkpoints.

A source is a small subclass (see ``me5/data/sources``) that says where the data lives, how a raw record
becomes a :class:`~me5.data.schema.PairExample` (``convert``), its language(s), and its prefix policy.
Everything else (reading with file:line errors, filtering with counted reasons, weighted sampling,
sharding over ranks and workers, resumable position, tokenisation) is shared.

Two ways to serve batches (``me5.data.stream`` describes both):

* **in memory** (small data, the sample run): ``setup`` reads every example into a list;
* **streaming** (``streaming=True``, or automatically for hub ids, ``me5.data.prepare`` shard folders and
  local data over 1 GiB): ``setup`` only lists the shards; ranks and DataLoader workers read disjoint parts.

The data position in a checkpoint (``state_dict``): ``consumed_batches`` (= optimiser steps) and, when
streaming, every reader's position after the last batch the training loop consumed (gathered over ranks),
plus the realised mixture (pairs per source and language). Batches carry their bookkeeping in
``batch["data_state"]``, which :meth:`TextPairDataModule.on_before_batch_transfer` takes out.
"""

from __future__ import annotations

import dataclasses
import logging
from collections import Counter, deque
from collections.abc import Mapping, Sequence

import lightning as L
import numpy as np
from torch.utils.data import DataLoader

from me5.data.collate import PairCollator, TrainItem
from me5.data.readers import count_lines, list_units, resolve_files
from me5.data.schema import PairExample, to_example
from me5.data.stream import Leaf, PairBatchStream, ShardedPairStream
from me5.errors import ConfigError, DataError, SkipRecord

log = logging.getLogger(__name__)

# local data larger than this streams when ``streaming`` is not set
STREAM_MIN_BYTES = 1 << 30
STATE_VERSION = 1

__all__ = ["TextPairDataModule", "MixtureDataModule", "PairBatchStream", "ShardedPairStream"]  # noqa: F822 (lazy)


def __getattr__(name: str):  # MixtureDataModule lives in me5.data.mixture (it imports this module)
    if name == "MixtureDataModule":
        from me5.data.mixture import MixtureDataModule

        return MixtureDataModule
    raise AttributeError(f"module 'me5.data.base' has no attribute '{name}'")


def gather_objects(obj) -> list:
    """``[obj of rank 0, obj of rank 1, ...]`` when torch.distributed runs (a collective: every rank must
    call it), else ``[obj]``."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        out = [None] * dist.get_world_size()
        dist.all_gather_object(out, obj)
        return out
    return [obj]


def _add_mix(into: dict, mix: Mapping) -> None:
    for src, langs in mix.items():
        d = into.setdefault(src, {})
        for lang, n in langs.items():
            d[lang] = d.get(lang, 0) + int(n)


def _check_word_cache(n) -> int:
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ConfigError("data.word_cache", f"must be an integer >= 0 (0 turns the cache off), got {n!r}")
    return n


class TextPairDataModule(L.LightningDataModule):
    """One text-pair source: query, positive, optional hard negatives and teacher scores, language, source.

    Args:
        path: a hub dataset id (streamed through ``datasets``) or a local jsonl/parquet file or folder.
            Defaults to the class's ``default_path``.
        name: the source's name in logs and mixtures (defaults to the class's ``source_name``).
        data_files: glob pattern(s) inside a local folder (for a hub id: passed to ``load_dataset``).
        hub_config / split: the hub dataset's config name and split.
        lang: the language of records that do not carry one.
        max_examples: read at most this many kept examples (``None``: all; in-memory path only).
        max_chars: skip (and count) examples whose query or any passage is longer than this many characters.
        query_prefix / passage_prefix: override the source's prefix policy (mE5: ``query: `` / ``passage: ``).
        symmetric: give passages the query prefix too (mE5 model-card FAQ: symmetric tasks such as NLI use
            ``query: `` on both sides).
        instruction: the task definition for the ``instruct`` prompt style (mE5-large-instruct,
            ``Instruct: {task}\nQuery: {text}``; passages get no prefix, symmetric tasks the template on both sides).
        strict: a malformed record is an error (default); with ``False`` it is skipped and counted.
        seed / num_workers: loader settings. When streaming, ``num_workers`` also fixes the number of readers
            per rank (``max(1, num_workers)``), hence the batch sequence; resume with the same value.
        streaming: read shards lazily instead of loading every example (``None``: automatic, see the module
            docstring).
        word_cache: distinct words the collator memoises per loader process (``me5.data.collate``; 0: off).
            Exact by construction and checked; it only changes speed.
        size: the number of pairs, when known (a mixture's default weight); else counted or read from metadata.
    """

    source_name: str = "pairs"
    default_path: str | None = None
    default_lang: str = "und"
    query_prefix: str = "query: "
    passage_prefix: str = "passage: "
    symmetric: bool = False
    instruction: str = "Given a query, retrieve relevant passages"
    homogeneous: bool = False

    def __init__(
        self,
        path: str | None = None,
        *,
        name: str | None = None,
        data_files: str | Sequence[str] | None = None,
        hub_config: str | None = None,
        split: str = "train",
        lang: str | None = None,
        max_examples: int | None = None,
        max_chars: int | None = None,
        query_prefix: str | None = None,
        passage_prefix: str | None = None,
        symmetric: bool | None = None,
        instruction: str | None = None,
        strict: bool = True,
        seed: int = 0,
        num_workers: int = 0,
        streaming: bool | None = None,
        size: int | None = None,
        word_cache: int = 262_144,
    ):
        super().__init__()
        self.path = path if path is not None else self.default_path
        if self.path is None:
            raise ConfigError("data.path", f"source '{name or self.source_name}' needs a path or hub id")
        self.name = name or self.source_name
        self.data_files = data_files
        self.hub_config = hub_config
        self.split = split
        self.lang = lang or self.default_lang
        self.max_examples = max_examples
        self.max_chars = max_chars
        if query_prefix is not None:
            self.query_prefix = query_prefix
        if passage_prefix is not None:
            self.passage_prefix = passage_prefix
        if symmetric is not None:
            self.symmetric = symmetric
        if instruction is not None:
            self.instruction = instruction
        self.prompt_style = "e5"
        self.strict = strict
        self._init_loading(seed=seed, num_workers=num_workers, streaming=streaming, size=size, word_cache=word_cache)

    def _init_loading(self, *, seed: int, num_workers: int, streaming: bool | None, size: int | None,
                      word_cache: int) -> None:
        """The loading options shared with the mixture (which does not call ``__init__``), then the runtime state."""
        self.seed = seed
        self.num_workers = num_workers
        self.streaming = streaming
        self.size = size
        self.word_cache = _check_word_cache(word_cache)
        self._init_runtime()

    def _init_runtime(self) -> None:
        """State that only exists at run time (shared by the mixture, which does not call ``__init__``)."""
        self.counts: Counter = Counter()
        self.examples: list[PairExample] | None = None
        self.leaves: list[Leaf] | None = None
        self._loader_args: dict | None = None
        self._start_batch = 0
        self._consumed_seen = 0
        self._streaming_now: bool | None = None
        self._layout: dict | None = None
        self._loaded_stream: dict | None = None
        self._carry_states: dict[int, dict] = {}
        self._reader_hist: dict[int, deque] = {}
        self._reader_counts: dict[int, dict] = {}
        self._mix: dict[str, dict[str, int]] = {}

    # ------------------------------------------------------------------ what a source overrides
    def convert(self, record: Mapping) -> Mapping:
        """Map one raw record to the fields of :class:`PairExample`. The default reads them by name.

        Raise :class:`~me5.errors.SkipRecord` to skip a record on purpose (counted by its reason), or
        :class:`~me5.errors.DataError` for a malformed one (an error, or counted with ``strict=False``).
        """
        return record

    def default_lang_for(self, file: str) -> str:
        """The language of the records of ``file`` that carry none: :meth:`file_lang`, else :attr:`lang` (raw
        sources whose published files are one language each read it from the file name)."""
        return self.file_lang(file) or self.lang

    def file_lang(self, file: str) -> str | None:
        """The one language of every record of local ``file`` when that is known without reading it, else
        ``None``. Language temperature streams such files per language like single-language shards; a record
        that then turns out to carry another language stops the run (``LeafReader``). The base class knows
        none (its records usually carry their own ``lang``)."""
        return None

    # ------------------------------------------------------------------ reading
    def _to_kept(self, record, file: str, line: int, counts: Counter, *, n_negatives: int = 0,
                 require_teacher: bool = False) -> PairExample | None:
        """One raw record -> a kept example, or ``None`` (counted by reason); errors name file:line.

        ``record`` may be a :class:`DataError` (an unreadable jsonl line): an error, or ``skipped/malformed``.
        """
        counts["read"] += 1
        if isinstance(record, DataError):
            if self.strict:
                raise DataError(record.message, file=record.file, line=record.line)
            counts["skipped/malformed"] += 1
            return None
        try:
            ex = to_example(self.convert(record), source=self.name, default_lang=self.default_lang_for(file),
                            file=file, line=line)
        except SkipRecord as skip:
            counts[f"skipped/{skip.reason}"] += 1
            return None
        except DataError as err:
            if self.strict:
                if err.file is None:  # raised by convert(), which does not know where the record came from
                    raise DataError(err.message, file=file, line=line, field=err.field) from err
                raise
            counts["skipped/malformed"] += 1
            return None
        reason = self._skip_reason(ex, n_negatives=n_negatives, require_teacher=require_teacher)
        if reason:
            counts[f"skipped/{reason}"] += 1
            return None
        counts["kept"] += 1
        return ex

    def load_examples(self, *, n_negatives: int = 0, require_teacher: bool = False) -> list[PairExample]:
        """Read, convert, validate and filter every record; every skip is counted by reason.

        ``n_negatives``: examples with fewer hard negatives are skipped (``skipped/too_few_negatives``).
        """
        from me5.data.readers import iter_records

        counts: Counter = Counter()
        kept: list[PairExample] = []
        records = iter_records(self.path, data_files=self.data_files, name=self.hub_config, split=self.split,
                               errors="raise" if self.strict else "yield")
        for file, line, record in records:
            ex = self._to_kept(record, file, line, counts, n_negatives=n_negatives, require_teacher=require_teacher)
            if ex is not None:
                kept.append(ex)
                if self.max_examples is not None and len(kept) >= self.max_examples:
                    break
        counts["kept"] = len(kept)
        self.counts = counts
        log.info("source %s (%s): %s", self.name, self.path, dict(counts))
        if not kept:
            raise DataError(f"source '{self.name}' has no usable examples (counts: {dict(counts)})", file=str(self.path))
        return kept

    def _skip_reason(self, ex: PairExample, *, n_negatives: int, require_teacher: bool) -> str | None:
        if len(ex.negatives) < n_negatives:
            return "too_few_negatives"
        if require_teacher and ex.teacher_scores is None:
            return "no_teacher_scores"
        if self.max_chars is not None:
            if max(len(ex.query), len(ex.positive), *(len(n) for n in ex.negatives[:n_negatives])) > self.max_chars:
                return "too_long"
        return None

    def format(self, ex: PairExample, *, n_negatives: int, rng: np.random.Generator) -> TrainItem:
        """Apply this source's prefix policy; pick ``n_negatives`` of the example's hard negatives at random."""
        qp = self.query_prefix
        if self.prompt_style == "instruct":
            qp = f"Instruct: {self.instruction}\nQuery: "
            pp = qp if self.symmetric else ""
        else:
            pp = qp if self.symmetric else self.passage_prefix
        picked: Sequence[int] = ()
        if n_negatives:
            picked = sorted(rng.choice(len(ex.negatives), size=n_negatives, replace=False).tolist())
        scores = None
        if ex.teacher_scores is not None:
            scores = [ex.teacher_scores[0]] + [ex.teacher_scores[1 + i] for i in picked]
        return TrainItem(
            query=qp + ex.query,
            passages=[pp + ex.positive] + [pp + ex.negatives[i] for i in picked],
            teacher_scores=scores,
            lang=ex.lang,
            source=ex.source,
        )

    # ------------------------------------------------------------------ streaming: shards, sizes
    def wants_streaming(self) -> bool:
        """``streaming`` when set; else True for a hub id, a ``me5.data.prepare`` shard folder, or > 1 GiB."""
        if self.streaming is not None:
            return bool(self.streaming)
        files = resolve_files(self.path, self.data_files)
        if files is None:
            return True
        from me5.data.readers import SHARDS_MANIFEST

        if any((f.parent / SHARDS_MANIFEST).is_file() for f in files[:1]):
            return True
        return sum(f.stat().st_size for f in files) > STREAM_MIN_BYTES

    def stream_leaves(self, *, by_lang: bool = False) -> list[Leaf]:
        """The streams of this source: one, or one per language (``by_lang``; needs single-language units)."""
        if self.max_examples is not None:
            log.warning("source %s: max_examples applies to the in-memory path only; streaming reads everything",
                        self.name)
        files = resolve_files(self.path, self.data_files)
        if files is None:
            if by_lang:
                raise ConfigError("data.lang_temperature_alpha", f"source '{self.name}' is a hub dataset: language "
                                  "temperature needs single-language shards (run me5.data.prepare)")
            hub = {"path": str(self.path), "name": self.hub_config, "split": self.split, "data_files": self.data_files}
            return [Leaf(key=self.name, source=self.name, hub=hub, rows=self.size)]
        units = list_units(files)
        if not units:
            raise DataError(f"source '{self.name}' has no records", file=str(self.path))
        if not by_lang:
            return [Leaf(key=self.name, source=self.name, units=units)]
        units = [u if u.lang is not None else dataclasses.replace(u, lang=self.file_lang(u.file)) for u in units]
        unknown = [u for u in units if u.lang is None]
        if unknown:
            where = f"row group {unknown[0].row_group}" if unknown[0].kind == "parquet" else "the file"
            raise ConfigError("data.lang_temperature_alpha",
                              f"source '{self.name}': {unknown[0].file} ({where}) may mix languages; language "
                              "temperature when streaming needs single-language units: row groups that "
                              "me5.data.prepare --split-langs writes, or raw files whose published name gives the "
                              "language (or a source with one lang)")
        langs = sorted({u.lang for u in units})
        return [Leaf(key=f"{self.name}/{lang}", source=self.name, lang=lang, units=[u for u in units if u.lang == lang])
                for lang in langs]

    def num_pairs(self) -> int:
        """This source's size (a mixture's default weight): ``size``, the loaded examples, or the shards' rows."""
        if self.size is not None:
            return int(self.size)
        if self.examples is not None:
            return len(self.examples)
        leaves = self.leaves if self.leaves is not None else self.stream_leaves()
        total = 0
        for lf in leaves:
            if lf.hub is not None:
                raise ConfigError(f"data.weights.{self.name}",
                                  "a hub source's size is unknown offline: give the mixture's weights or the source's size")
            total += sum(u.rows if u.rows is not None else count_lines(u.file) for u in lf.units)
        return total

    def lang_sizes(self) -> dict[str, int]:
        """Pairs per language (for language temperature)."""
        if self.examples is not None:
            return dict(sorted(Counter(ex.lang for ex in self.examples).items()))
        leaves = self.leaves if self.leaves is not None and all(lf.lang for lf in self.leaves) else self.stream_leaves(by_lang=True)
        return {lf.lang: sum(u.rows if u.rows is not None else count_lines(u.file) for u in lf.units) for lf in leaves}

    # ------------------------------------------------------------------ Lightning hooks
    def connect(
        self,
        tokenizer,
        *,
        global_batch_size: int,
        n_negatives: int = 0,
        require_teacher: bool = False,
        query_max_length: int = 64,
        passage_max_length: int = 128,
        prompt_style: str = "e5",
    ) -> None:
        """Runtime inputs that exist only once the model does (litgpt's ``connect``).

        ``prompt_style``: ``e5`` (``query: ``/``passage: `` prefixes) or ``instruct`` (mE5-large-instruct).
        """
        if prompt_style not in {"e5", "instruct"}:
            raise ConfigError("model.prompt_style", f"unknown '{prompt_style}'; choose e5 or instruct")
        for src in self.sources().values():
            src.prompt_style = prompt_style
        self._loader_args = dict(
            tokenizer=tokenizer,
            global_batch_size=global_batch_size,
            n_negatives=n_negatives,
            require_teacher=require_teacher,
            query_max_length=query_max_length,
            passage_max_length=passage_max_length,
        )

    def sources(self) -> dict[str, TextPairDataModule]:
        return {self.name: self}

    def weights(self) -> dict[str, float]:
        """Unnormalised source weights as given (a single source: 1)."""
        return {self.name: 1.0}

    def sampling_weights(self) -> dict[str, float]:
        """The weights the sampler uses (a mixture applies its temperature)."""
        return self.weights()

    def lang_weights(self) -> dict[str, dict[str, float]] | None:
        """Per-source language weights (language temperature), or ``None``."""
        return None

    def is_streaming(self) -> bool:
        if self._streaming_now is None:
            self._streaming_now = any(src.wants_streaming() for src in self.sources().values())
        return self._streaming_now

    def setup(self, stage: str | None = None) -> None:
        if self._loader_args is None:
            raise RuntimeError("call connect(tokenizer, ...) before setup()")
        a = self._loader_args
        by_lang = self.lang_weights_requested()
        for src in self.sources().values():
            if self.is_streaming():
                if src.leaves is None:
                    src.leaves = src.stream_leaves(by_lang=by_lang)
            elif src.examples is None:
                src.examples = src.load_examples(n_negatives=a["n_negatives"], require_teacher=a["require_teacher"])

    def lang_weights_requested(self) -> bool:
        return False

    def data_counts(self) -> dict[str, int]:
        """Read/kept/skipped counts per source, flat keys ``<source>/<reason>`` for logging.

        When streaming: the counts of the readers whose batches this rank consumed (cumulative over resumes).
        """
        if self.is_streaming() and self._loader_args is not None:
            agg: dict[str, Counter] = {}
            for per_src in self._reader_counts.values():
                for name, c in per_src.items():
                    agg.setdefault(name, Counter()).update(c)
            for name, src in self.sources().items():
                src.counts = agg.get(name, Counter())
        return {f"{name}/{k}": v for name, src in self.sources().items() for k, v in sorted(src.counts.items())}

    def _rank_world(self) -> tuple[int, int]:
        return (self.trainer.global_rank, self.trainer.world_size) if self.trainer is not None else (0, 1)

    def train_dataloader(self) -> DataLoader:
        a = self._loader_args
        rank, world = self._rank_world()
        if a["global_batch_size"] % world:
            raise ConfigError(
                "stage.global_batch_size", f"{a['global_batch_size']} is not divisible by the world size {world}"
            )
        collator = PairCollator(a["tokenizer"], query_max_length=a["query_max_length"],
                                passage_max_length=a["passage_max_length"], word_cache=self.word_cache)
        if not self.is_streaming():
            stream = PairBatchStream(
                self.sources(),
                self.sampling_weights(),
                collator=collator,
                global_batch_size=a["global_batch_size"],
                n_negatives=a["n_negatives"],
                rank=rank,
                world_size=world,
                seed=self.seed,
                homogeneous=self.homogeneous,
                start_batch=self._start_batch,
                lang_weights=self.lang_weights(),
            )
            return DataLoader(stream, batch_size=None, num_workers=self.num_workers, persistent_workers=False)
        stream = self.build_stream(collator, rank=rank, world=world)
        return DataLoader(stream, batch_size=None, num_workers=self.num_workers, persistent_workers=False)

    def build_stream(self, collator, *, rank: int = 0, world: int = 1) -> ShardedPairStream:
        """The streaming dataset of ``rank`` of ``world``, positioned at the loaded state (if any)."""
        a = self._loader_args
        readers_per_rank = max(1, self.num_workers)
        self._layout = {"world_size": world, "readers_per_rank": readers_per_rank}
        leaves, weights = self._leaf_weights()
        self._carry_states = self._start_states(leaves)
        return ShardedPairStream(
            self.sources(),
            leaves,
            weights,
            collator=collator,
            global_batch_size=a["global_batch_size"],
            n_negatives=a["n_negatives"],
            require_teacher=a["require_teacher"],
            rank=rank,
            world_size=world,
            readers_per_rank=readers_per_rank,
            seed=self.seed,
            homogeneous=self.homogeneous,
            start_batch=self._start_batch,
            start_states={rid: st for rid, st in self._carry_states.items()
                          if rid // readers_per_rank == rank},
        )

    def _leaf_weights(self) -> tuple[list[Leaf], list[float]]:
        sw = self.sampling_weights()
        lw = self.lang_weights() or {}
        leaves, weights = [], []
        for name, src in self.sources().items():
            for lf in src.leaves:
                w = sw[name]
                if lf.lang is not None and name in lw:
                    total = sum(lw[name].values())
                    w = w * lw[name].get(lf.lang, 0.0) / total if total > 0 else 0.0
                leaves.append(lf)
                weights.append(w)
        return leaves, weights

    def _start_states(self, leaves: Sequence[Leaf]) -> dict[int, dict]:
        """Reader states to resume from: the checkpoint's when its layout matches, else a fresh epoch."""
        loaded = self._loaded_stream
        if not loaded:
            return {}
        readers = {int(k): v for k, v in (loaded.get("readers") or {}).items()}
        same = (loaded.get("world_size"), loaded.get("readers_per_rank")) == (
            self._layout["world_size"], self._layout["readers_per_rank"])
        if same:
            return readers
        log.warning(
            "the data layout changed (world size x readers per rank %s x %s -> %s x %s): the streaming position "
            "cannot be restored exactly; every reader starts the next epoch of its source",
            loaded.get("world_size"), loaded.get("readers_per_rank"), self._layout["world_size"],
            self._layout["readers_per_rank"])
        next_epoch: dict[str, int] = {}
        for st in readers.values():
            for key, pos in (st.get("positions") or {}).items():
                e = pos["epoch"] if isinstance(pos, Mapping) else pos[0]
                next_epoch[key] = max(next_epoch.get(key, 0), int(e) + 1)
        n = self._layout["world_size"] * self._layout["readers_per_rank"]
        pos = {lf.key: ({"epoch": next_epoch.get(lf.key, 0)} if lf.hub is not None else [next_epoch.get(lf.key, 0), 0, 0, 0, 0])
               for lf in leaves}
        return {rid: {"positions": pos} for rid in range(n)}

    # ------------------------------------------------------------------ data position
    def on_before_batch_transfer(self, batch, dataloader_idx: int):
        """Called by Lightning on each batch the training loop is about to use: take out its bookkeeping."""
        if isinstance(batch, dict) and "data_state" in batch:
            self.observe(batch.pop("data_state"))
        return batch

    def observe(self, state: Mapping) -> None:
        """Record a consumed batch's ``data_state`` (the realised mixture; a streaming reader's position)."""
        b = int(state["batch"])
        self._consumed_seen = max(self._consumed_seen, b + 1)
        _add_mix(self._mix, state.get("mix") or {})
        if "reader" in state:
            rid = int(state["reader"])
            self._reader_hist.setdefault(rid, deque(maxlen=8)).append(
                (b, {"positions": state["positions"], "counts": state["counts"]}))
            self._reader_counts[rid] = state["counts"]

    def realised_mixture(self, *, gather: bool = False) -> dict[str, dict[str, int]]:
        """Pairs consumed so far per source and language, ``{source: {lang: pairs}}``, over this rank's
        batches (cumulative over resumes). ``gather=True`` sums over ranks (a collective: call it on every rank)."""
        out: dict[str, dict[str, int]] = {}
        for part in gather_objects(self._mix) if gather else [self._mix]:
            _add_mix(out, part)
        return {s: dict(sorted(v.items())) for s, v in sorted(out.items())}

    def _consumed(self) -> int:
        if self.trainer is not None:
            return int(self.trainer.global_step)
        return max(self._start_batch, self._consumed_seen)

    def state_dict(self) -> dict:
        """The data position: consumed global batches (= optimiser steps), the realised mixture, and (when
        streaming) each reader's position. Gathers over ranks, so every rank must call it (Lightning does)."""
        consumed = self._consumed()
        state = {"version": STATE_VERSION, "consumed_batches": int(consumed), "seed": self.seed}
        local_readers = {}
        for rid, hist in self._reader_hist.items():
            done = [(b, st) for b, st in hist if b < consumed]
            if done:
                local_readers[rid] = max(done, key=lambda t: t[0])[1]
        parts = gather_objects({"readers": local_readers, "mix": self._mix})
        mix: dict = {}
        readers = dict(self._carry_states)
        for part in parts:
            _add_mix(mix, part["mix"])
            readers.update(part["readers"])
        state["realised_mixture"] = mix
        if self._streaming_now and self._layout is not None:
            state["stream"] = {**self._layout, "readers": readers}
        return state

    def load_state_dict(self, state: dict) -> None:
        if state.get("seed", self.seed) != self.seed:
            log.warning("resuming with data seed %s, checkpoint used %s: the batch order will differ", self.seed, state["seed"])
        self._start_batch = int(state.get("consumed_batches", 0))
        self._consumed_seen = self._start_batch
        self._loaded_stream = state.get("stream")
        rank = self._rank_world()[0]
        self._mix = {}
        if rank == 0:  # the saved mixture is the sum over ranks: keep it once
            _add_mix(self._mix, state.get("realised_mixture") or {})
        self._reader_hist = {}
