"""The base LightningDataModule of one text-pair source, and the batch stream every DataModule serves.

A source is a small subclass (see ``me5/data/sources``) that says where the data lives, how a raw record
becomes a :class:`~me5.data.schema.PairExample` (``convert``), its language(s), and its prefix policy.
Everything else (reading with file:line errors, filtering with counted reasons, weighted sampling,
sharding over ranks and workers, resumable position, tokenisation) is shared.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence

import lightning as L
import numpy as np
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from me5.data.collate import PairCollator, TrainItem
from me5.data.readers import iter_records
from me5.data.schema import PairExample, to_example
from me5.errors import ConfigError, DataError, SkipRecord

log = logging.getLogger(__name__)


class TextPairDataModule(L.LightningDataModule):
    """One text-pair source: query, positive, optional hard negatives and teacher scores, language, source.

    Args:
        path: a hub dataset id (streamed through ``datasets``) or a local jsonl/parquet file or folder.
            Defaults to the class's ``default_path``.
        name: the source's name in logs and mixtures (defaults to the class's ``source_name``).
        data_files: glob pattern(s) inside a local folder.
        hub_config / split: the hub dataset's config name and split.
        lang: the language of records that do not carry one.
        max_examples: read at most this many kept examples (``None``: all).
        max_chars: skip (and count) examples whose query or any passage is longer than this many characters.
        query_prefix / passage_prefix: override the source's prefix policy (mE5: ``query: `` / ``passage: ``).
        symmetric: give passages the query prefix too (mE5 model-card FAQ: symmetric tasks such as NLI use
            ``query: `` on both sides).
        instruction: the task definition for the ``instruct`` prompt style (mE5-large-instruct,
            ``Instruct: {task}\nQuery: {text}``; passages get no prefix, symmetric tasks the template on both sides).
        strict: a malformed record is an error (default); with ``False`` it is skipped and counted.
        seed / num_workers: loader settings.
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
        self.seed = seed
        self.num_workers = num_workers
        self.counts: Counter = Counter()
        self.examples: list[PairExample] | None = None
        self._loader_args: dict | None = None
        self._start_batch = 0

    # ------------------------------------------------------------------ what a source overrides
    def convert(self, record: Mapping) -> Mapping:
        """Map one raw record to the fields of :class:`PairExample`. The default reads them by name.

        Raise :class:`~me5.errors.SkipRecord` to skip a record on purpose (counted by its reason), or
        :class:`~me5.errors.DataError` for a malformed one (an error, or counted with ``strict=False``).
        """
        return record

    # ------------------------------------------------------------------ reading
    def load_examples(self, *, n_negatives: int = 0, require_teacher: bool = False) -> list[PairExample]:
        """Read, convert, validate and filter every record; every skip is counted by reason.

        ``n_negatives``: examples with fewer hard negatives are skipped (``skipped/too_few_negatives``).
        """
        counts: Counter = Counter()
        kept: list[PairExample] = []
        for file, line, record in iter_records(self.path, data_files=self.data_files, name=self.hub_config, split=self.split):
            counts["read"] += 1
            try:
                ex = to_example(self.convert(record), source=self.name, default_lang=self.lang, file=file, line=line)
            except SkipRecord as skip:
                counts[f"skipped/{skip.reason}"] += 1
                continue
            except DataError as err:
                if self.strict:
                    if err.file is None:  # raised by convert(), which does not know where the record came from
                        raise DataError(err.message, file=file, line=line, field=err.field) from err
                    raise
                counts["skipped/malformed"] += 1
                continue
            reason = self._skip_reason(ex, n_negatives=n_negatives, require_teacher=require_teacher)
            if reason:
                counts[f"skipped/{reason}"] += 1
                continue
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
        return {self.name: 1.0}

    def setup(self, stage: str | None = None) -> None:
        if self._loader_args is None:
            raise RuntimeError("call connect(tokenizer, ...) before setup()")
        a = self._loader_args
        for src in self.sources().values():
            if src.examples is None:
                src.examples = src.load_examples(n_negatives=a["n_negatives"], require_teacher=a["require_teacher"])

    def data_counts(self) -> dict[str, int]:
        """Read/kept/skipped counts per source, flat keys ``<source>/<reason>`` for logging."""
        return {f"{name}/{k}": v for name, src in self.sources().items() for k, v in sorted(src.counts.items())}

    def train_dataloader(self) -> DataLoader:
        a = self._loader_args
        rank, world = (self.trainer.global_rank, self.trainer.world_size) if self.trainer is not None else (0, 1)
        if a["global_batch_size"] % world:
            raise ConfigError(
                "stage.global_batch_size", f"{a['global_batch_size']} is not divisible by the world size {world}"
            )
        stream = PairBatchStream(
            self.sources(),
            self.weights(),
            collator=PairCollator(
                a["tokenizer"], query_max_length=a["query_max_length"], passage_max_length=a["passage_max_length"]
            ),
            global_batch_size=a["global_batch_size"],
            n_negatives=a["n_negatives"],
            rank=rank,
            world_size=world,
            seed=self.seed,
            homogeneous=self.homogeneous,
            start_batch=self._start_batch,
        )
        return DataLoader(stream, batch_size=None, num_workers=self.num_workers, persistent_workers=False)

    def state_dict(self) -> dict:
        """The data position: how many global batches were consumed (= optimiser steps)."""
        consumed = self.trainer.global_step if self.trainer is not None else self._start_batch
        return {"consumed_batches": int(consumed), "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        if state.get("seed", self.seed) != self.seed:
            log.warning("resuming with data seed %s, checkpoint used %s: the batch order will differ", self.seed, state["seed"])
        self._start_batch = int(state.get("consumed_batches", 0))


class MixtureDataModule(TextPairDataModule):
    """Samples examples from several sources by weight (each draw picks a source with probability w / Σw).

    Args:
        sources: name -> source DataModule.
        weights: name -> weight (defaults to 1 each); unnormalised, e.g. Table 1's pair counts in millions.
        homogeneous: draw one source per *global* batch instead of per example.
    """

    def __init__(
        self,
        sources: Mapping[str, TextPairDataModule],
        *,
        weights: Mapping[str, float] | None = None,
        homogeneous: bool = False,
        seed: int = 0,
        num_workers: int = 0,
    ):
        L.LightningDataModule.__init__(self)
        if not sources:
            raise ConfigError("data.sources", "a mixture needs at least one source")
        self._sources = dict(sources)
        for name, src in self._sources.items():
            src.name = name
        weights = dict(weights) if weights is not None else {n: 1.0 for n in self._sources}
        unknown = set(weights) - set(self._sources)
        if unknown:
            raise ConfigError(f"data.weights.{sorted(unknown)[0]}", f"no such source; sources: {sorted(self._sources)}")
        missing = set(self._sources) - set(weights)
        if missing:
            raise ConfigError(f"data.weights.{sorted(missing)[0]}", "every source needs a weight")
        if any(not (w >= 0) for w in weights.values()) or sum(weights.values()) <= 0:
            raise ConfigError("data.weights", f"weights must be >= 0 with a positive sum, got {weights}")
        self._weights = {n: float(w) for n, w in weights.items()}
        self.name = "mixture"
        self.homogeneous = homogeneous
        self.seed = seed
        self.num_workers = num_workers
        self._loader_args = None
        self._start_batch = 0
        self.counts = Counter()

    def sources(self) -> dict[str, TextPairDataModule]:
        return self._sources

    def weights(self) -> dict[str, float]:
        return self._weights

    def prepare_data(self) -> None:
        for src in self._sources.values():
            src.prepare_data()


class PairBatchStream(IterableDataset):
    """An endless, deterministic stream of collated per-device batches.

    Global batch ``b`` is a pure function of ``(seed, b)``: every rank draws the same global batch and keeps
    its slice ``[rank*B:(rank+1)*B]``, and DataLoader worker ``w`` of ``W`` collates batches with
    ``b % W == w`` (PyTorch reads workers round-robin, so the order is kept). Resuming at ``start_batch``
    replays the cheap index draws only, so a resumed run sees exactly the batches of an uninterrupted one.
    Each source is read in a fresh permutation per pass (epoch).
    """

    def __init__(
        self,
        sources: Mapping[str, TextPairDataModule],
        weights: Mapping[str, float],
        *,
        collator: PairCollator,
        global_batch_size: int,
        n_negatives: int = 0,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        homogeneous: bool = False,
        start_batch: int = 0,
    ):
        self.names = [n for n in sources if weights[n] > 0]
        self.sources = sources
        p = np.array([weights[n] for n in self.names], dtype=np.float64)
        self.p = p / p.sum()
        self.collator = collator
        self.global_batch_size = global_batch_size
        self.local_batch_size = global_batch_size // world_size
        self.n_negatives = n_negatives
        self.rank = rank
        self.seed = seed
        self.homogeneous = homogeneous
        self.start_batch = start_batch

    def _global_batches(self) -> Iterator[list[tuple[str, int]]]:
        rng = np.random.default_rng(self.seed)
        order = {n: None for n in self.names}
        cursor = dict.fromkeys(self.names, 0)
        epoch = dict.fromkeys(self.names, 0)

        def next_index(name: str) -> int:
            exs = self.sources[name].examples
            if order[name] is None or cursor[name] >= len(exs):
                if order[name] is not None:
                    epoch[name] += 1
                perm_rng = np.random.default_rng([self.seed, self.names.index(name), epoch[name]])
                order[name] = perm_rng.permutation(len(exs))
                cursor[name] = 0
            i = int(order[name][cursor[name]])
            cursor[name] += 1
            return i

        while True:
            if self.homogeneous:
                picks = [self.names[rng.choice(len(self.names), p=self.p)]] * self.global_batch_size
            else:
                picks = [self.names[k] for k in rng.choice(len(self.names), size=self.global_batch_size, p=self.p)]
            yield [(name, next_index(name)) for name in picks]

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        wid, n_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        lo, hi = self.rank * self.local_batch_size, (self.rank + 1) * self.local_batch_size
        for b, slots in enumerate(self._global_batches()):
            if b < self.start_batch or (b - self.start_batch) % n_workers != wid:
                continue
            neg_rng = np.random.default_rng([self.seed, b, self.rank])
            items = [
                self.sources[name].format(self.sources[name].examples[i], n_negatives=self.n_negatives, rng=neg_rng)
                for name, i in slots[lo:hi]
            ]
            batch = self.collator(items)
            batch["batch_index"] = b
            yield batch


