"""A data source: where its records live, how a raw record becomes an example, its language and prompt role.

A :class:`Source` is a plain, picklable object (no Lightning, no loaded data). Each paper source is a small
subclass (``me5/data/sources``) that changes only what differs: its default path (hub id or local layout),
``convert`` (raw record -> the fields of :class:`~me5.data.schema.PairExample`), its language(s), and its
prompt role (``symmetric``; ``task``, the key of its instruction in :data:`me5.prompts.TASKS`). Reading with
file:line errors (``me5.data.readers``), classifying records with counted skips (``me5.data.records``),
sampling, sharding and the checkpointed position (``me5.data.datamodule``) are shared.
"""

from __future__ import annotations

import dataclasses
import logging
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path

from me5.data.readers import SHARDS_MANIFEST, count_lines, iter_records, list_units, resolve_files
from me5.data.records import RecordClassifier, check_long_texts
from me5.data.schema import PairExample
from me5.data.stream import Leaf
from me5.errors import ConfigError, DataError
from me5.prompts import task_instruction

log = logging.getLogger(__name__)

# local data larger than this streams when ``streaming`` is not set
STREAM_MIN_BYTES = 1 << 30


class Source:
    """One text-pair source: query, positive, optional hard negatives and teacher scores, language.

    Args:
        path: a hub dataset id (streamed through ``datasets``) or a local jsonl(.gz)/parquet file or folder.
            Defaults to the class's ``default_path``.
        name: the source's name in logs and mixtures (defaults to the class's ``source_name``; a DataModule
            names its sources by their keys).
        data_files: glob pattern(s) inside a local folder (for a hub id: passed to ``load_dataset``).
        hub_config / split: the hub dataset's config name and split.
        lang: the language of records that do not carry one.
        max_examples: read at most this many kept examples (``None``: all; in-memory path only).
        max_chars: cut a query or passage longer than this many characters (at a word boundary), keeping the
            record (counted ``truncated/too_long``), or skip the record: see ``long_texts``.
        long_texts: ``"truncate"`` (default: no data lost) or ``"drop"`` (``skipped/too_long``) for a text over
            ``max_chars``. A source's own published filter (E5's Reddit comments over 4096 characters) is its own.
        n_negatives: the hard negatives this source's examples take (``None``: the stage's
            ``stages.<stage>.n_negatives``). E5's NLI recipe is the contradiction as the one hard negative:
            ``n_negatives: 1`` on the NLI source. A batch holds one group size, so sources with their own count
            need ``homogeneous`` batches (one source per global batch); the DataModule checks it.
        symmetric: both sides are the same kind of text (NLI, paraphrase, bitext): both get the query prompt
            (``me5.prompts``).
        task: the key of the source's task definition in :data:`me5.prompts.TASKS` (the instruct prompt style).
        instruction: a task definition of its own instead (e.g. for a user's data).
        strict: a malformed record is an error (default); with ``False`` it is skipped and counted.
        streaming: read shards lazily instead of loading every example (``None``: automatic: a hub id, a
            ``me5.prepare`` shard folder, or local data over 1 GiB).
        size: the number of pairs, when known (a mixture's default weight); else counted or read from metadata.
    """

    source_name: str = "pairs"
    default_path: str | None = None
    default_lang: str = "und"
    symmetric: bool = False
    task: str = "generic"

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
        long_texts: str = "truncate",
        n_negatives: int | None = None,
        symmetric: bool | None = None,
        task: str | None = None,
        instruction: str | None = None,
        strict: bool = True,
        streaming: bool | None = None,
        size: int | None = None,
    ):
        self.path = path if path is not None else self.default_path
        if self.path is None:
            raise ConfigError("data.path", f"source '{name or self.source_name}' needs a path or hub id")
        self.name = name or self.source_name
        self.data_files = data_files
        self.hub_config = hub_config
        self.split = split
        self.lang = lang or self.default_lang
        self.max_examples = max_examples
        if max_chars is not None and (isinstance(max_chars, bool) or not isinstance(max_chars, int) or max_chars < 1):
            raise ConfigError(f"data.sources.{name or self.source_name}.max_chars", f"must be an integer >= 1, got {max_chars!r}")
        self.max_chars = max_chars
        self.long_texts = check_long_texts(long_texts, f"data.sources.{name or self.source_name}.long_texts")
        if n_negatives is not None and (isinstance(n_negatives, bool) or not isinstance(n_negatives, int)
                                        or n_negatives < 0):
            raise ConfigError(f"data.sources.{name or self.source_name}.n_negatives",
                              f"must be an integer >= 0 or null, got {n_negatives!r}")
        self.n_negatives = n_negatives
        if symmetric is not None:
            self.symmetric = symmetric
        if task is not None:
            self.task = task
        self._instruction = instruction
        if instruction is None:
            task_instruction(self.task)  # an unknown task name fails here, before any reading
        self.strict = strict
        self.streaming = streaming
        self.size = size

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, path={str(self.path)!r})"

    # ------------------------------------------------------------------ what a source overrides
    def convert(self, record: Mapping) -> Mapping:
        """Map one raw record to the fields of :class:`PairExample`. The default reads them by name.

        Raise :class:`~me5.errors.SkipRecord` to skip a record on purpose (counted by its reason), or
        :class:`~me5.errors.DataError` for a malformed one (an error, or counted with ``strict=False``).
        """
        return record

    def file_lang(self, file: str) -> str | None:
        """The one language of every record of local ``file`` when that is known without reading it, else
        ``None``. Language temperature streams such files per language like single-language shards; a record
        that then turns out to carry another language stops the run (``LeafReader``). The base class knows
        none (its records usually carry their own ``lang``)."""
        return None

    def default_lang_for(self, file: str) -> str:
        """The language of the records of ``file`` that carry none: :meth:`file_lang`, else :attr:`lang`."""
        return self.file_lang(file) or self.lang

    def prepare_data(self) -> None:
        """Make the data available (download or generate) once per node; most sources have nothing to do."""

    def generates(self) -> list[str]:
        """Folders :meth:`prepare_data` creates (the app does not expect them to exist before it runs)."""
        return []

    def check(self) -> None:
        """Cheap checks before any heavy work: a local path that matches no file is a :class:`DataError`."""
        resolve_files(self.path, self.data_files)

    def reads_prepared(self) -> bool:
        """Whether ``path`` is a ``me5.prepare`` / ``me5.mine`` / ``me5.score`` folder (or a shard of one): its records
        are in the normalised schema already, so they are read as they are, not through :meth:`convert`. A
        source class pointed at its own prepared (mined, scored) shards keeps its name, task, symmetry and
        language, and nothing its raw layout would not carry (mined negatives, teacher scores) is lost."""
        if self.path is None:
            return False
        p = Path(str(self.path))
        return (p / SHARDS_MANIFEST).is_file() or (p.is_file() and (p.parent / SHARDS_MANIFEST).is_file())

    @property
    def instruction(self) -> str:
        """The task definition of the instruct prompt style: the source's own, else :data:`TASKS` [``task``]."""
        return self._instruction if self._instruction is not None else task_instruction(self.task)

    # ------------------------------------------------------------------ reading
    def classifier(self, **kwargs) -> RecordClassifier:
        """The :class:`~me5.data.records.RecordClassifier` of this source (kwargs: what the stage needs)."""
        return RecordClassifier(self, **kwargs)

    def load_examples(self, classify: RecordClassifier | None = None) -> tuple[list[PairExample], Counter]:
        """Read and classify every record (in memory); returns the kept examples and the counts by reason."""
        classify = classify or self.classifier()
        counts: Counter = Counter()
        kept: list[PairExample] = []
        records = iter_records(self.path, data_files=self.data_files, name=self.hub_config, split=self.split,
                               errors="raise" if classify.strict else "yield")
        for file, line, record in records:
            ex = classify(record, file, line, counts)
            if ex is not None:
                kept.append(ex)
                if self.max_examples is not None and len(kept) >= self.max_examples:
                    break
        counts["kept"] = len(kept)
        log.info("source %s (%s): %s", self.name, self.path, dict(counts))
        if not kept:
            raise DataError(f"source '{self.name}' has no usable examples (counts: {dict(counts)})", file=str(self.path))
        return kept, counts

    def shortfall(self, *, n_negatives: int = 0, require_teacher: bool = False, sample: int = 64) -> dict[str, int]:
        """What a stage's needs would skip, from the first ``sample`` readable records (a cheap look, no full
        pass): ``{"read", "too_few_negatives", "no_teacher_scores", "kept"}``. Empty when the data is not local
        (a hub id) or not there yet (a generated source)."""
        if self.generates() or resolve_files(self.path, self.data_files) is None:
            return {}
        classify = self.classifier(n_negatives=n_negatives, require_teacher=require_teacher, strict=False)
        counts: Counter = Counter()
        kept = 0
        for file, line, record in iter_records(self.path, data_files=self.data_files, name=self.hub_config,
                                               split=self.split, errors="yield"):
            kept += classify(record, file, line, counts) is not None
            if counts["read"] >= sample:
                break
        return {"read": counts["read"], "too_few_negatives": counts["skipped/too_few_negatives"],
                "no_teacher_scores": counts["skipped/no_teacher_scores"], "kept": kept}

    # ------------------------------------------------------------------ streaming: shards, sizes
    def wants_streaming(self) -> bool:
        """``streaming`` when set; else True for a hub id, a ``me5.prepare`` shard folder, or > 1 GiB."""
        if self.streaming is not None:
            return bool(self.streaming)
        files = resolve_files(self.path, self.data_files)
        if files is None:
            return True
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
                                  "temperature needs single-language shards (run me5.prepare)")
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
                              "me5.prepare --split-langs writes, or raw files whose published name gives the "
                              "language (or a source with one lang)")
        langs = sorted({u.lang for u in units})
        return [Leaf(key=f"{self.name}/{lang}", source=self.name, lang=lang, units=[u for u in units if u.lang == lang])
                for lang in langs]

    def num_pairs(self, leaves: Sequence[Leaf] | None = None) -> int:
        """This source's size (a mixture's default weight): ``size``, else the rows of its streams."""
        if self.size is not None:
            return int(self.size)
        total = 0
        for lf in leaves if leaves is not None else self.stream_leaves():
            if lf.hub is not None:
                raise ConfigError(f"data.weights.{self.name}",
                                  "a hub source's size is unknown offline: give the mixture's weights or the source's size")
            total += _leaf_rows(lf)
        return total

    def lang_sizes(self, leaves: Sequence[Leaf] | None = None) -> dict[str, int]:
        """Pairs per language of the streams (for language temperature)."""
        if leaves is None or not all(lf.lang for lf in leaves):
            leaves = self.stream_leaves(by_lang=True)
        return {lf.lang: _leaf_rows(lf) for lf in leaves}


def _leaf_rows(leaf: Leaf) -> int:
    """Records of a local stream: the units' known row counts, else their lines (counted, fast, in C)."""
    return sum(u.rows if u.rows is not None else count_lines(u.file) for u in leaf.units)
