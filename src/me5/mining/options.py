"""What a mining job does: :class:`MineOptions` (the ``me5.mine`` flags), checked before any data is read, and the
faiss index string's checks (:func:`approximate`, :func:`check_index`). The procedure is
:mod:`me5.mining.mine`'s docstring.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass

import numpy as np

from me5.embed.encode import DEFAULT_MAX_LENGTH
from me5.errors import ConfigError

SAMPLING = ("top", "random")
MISSING_POSITIVE = ("report", "skip", "error")
OWN_NEGATIVES = ("keep", "replace")


@dataclass
class MineOptions:
    """What :func:`~me5.mining.mine.mine` does (the ``me5.mine`` flags of the same names)."""

    n_negatives: int = 7  # E5: 7 hard negatives per query [S]; mE5 does not say [U]
    range_min: int = 0  # first candidate rank of the window (0-based, positives not counted)
    range_max: int = 100  # one past the last rank of the window
    perc_pos: float | None = 0.95  # TopK-PercPos: drop candidates above perc_pos x the positive's score
    absolute_margin: float | None = None  # drop candidates above the positive's score minus this
    sampling: str = "top"  # top | random
    seed: int = 0  # random sampling and the row shuffle of each shard
    missing_positive: str = "report"  # a positive absent from a corpus file: report | skip | error
    search: str = "exact"  # exact (torch, blockwise) | faiss
    index: str = "Flat"  # faiss index-factory string: Flat (exact), IVF4096,Flat, HNSW32, ...
    index_params: str | None = None  # faiss search-time parameters: nprobe=64, efSearch=128
    query_max_length: int = DEFAULT_MAX_LENGTH
    passage_max_length: int = DEFAULT_MAX_LENGTH
    max_batch: int = 256  # rows per forward (encode_texts / encode_corpus)
    max_tokens: int | None = None  # padded tokens per forward (default: max_batch rows of max_length)
    precision: str = "fp16"  # CUDA autocast dtype of the encoder (fp32 elsewhere)
    embed_shard_rows: int = 65536  # corpus rows per embedding shard
    shard_rows: int = 100_000  # records per output shard (me5.prepare's default)
    row_group_rows: int = 10_000
    split_langs: bool = False  # single-language row groups (language temperature when streaming)
    max_shards: int | None = None  # write at most this many output shards, then stop (resume later)
    # a record's own negatives: "keep" them first and mine the rest up to n_negatives (the recipe: NLI keeps its
    # contradiction); "replace" them by n_negatives mined ones (sentence-transformers' mine_hard_negatives)
    own_negatives: str = "keep"

    def check(self) -> None:
        """Reject bad values before any data is read; errors name the ``mine.<field>``."""
        if self.own_negatives not in OWN_NEGATIVES:
            raise ConfigError("mine.own_negatives", f"unknown '{self.own_negatives}'; choose one of {list(OWN_NEGATIVES)}")
        if self.n_negatives < 1:
            raise ConfigError("mine.n_negatives", f"must be >= 1, got {self.n_negatives}")
        if self.range_min < 0:
            raise ConfigError("mine.range_min", f"must be >= 0, got {self.range_min}")
        if self.range_max <= self.range_min:
            raise ConfigError("mine.range_max", f"must be larger than range_min={self.range_min}, got {self.range_max}")
        if self.n_negatives > self.range_max - self.range_min:
            raise ConfigError("mine.n_negatives", f"{self.n_negatives} negatives do not fit in the window "
                              f"[{self.range_min}, {self.range_max}) of {self.range_max - self.range_min} ranks")
        if self.perc_pos is not None and not (0.0 < self.perc_pos <= 1.0):
            raise ConfigError("mine.perc_pos", f"must be in (0, 1] (0.95: TopK-PercPos), got {self.perc_pos}")
        if self.absolute_margin is not None and not np.isfinite(self.absolute_margin):
            raise ConfigError("mine.absolute_margin", f"must be finite, got {self.absolute_margin}")
        if self.sampling not in SAMPLING:
            raise ConfigError("mine.sampling", f"unknown '{self.sampling}'; choose one of {list(SAMPLING)}")
        if self.missing_positive not in MISSING_POSITIVE:
            raise ConfigError("mine.missing_positive", f"unknown '{self.missing_positive}'; choose one of "
                              f"{list(MISSING_POSITIVE)}")
        if self.search not in ("exact", "faiss"):
            raise ConfigError("mine.search", f"unknown '{self.search}'; choose one of ['exact', 'faiss']")
        if not approximate(self.index) and self.index.replace(" ", "") != "Flat":
            raise ConfigError("mine.index", f"'{self.index}' is not a faiss index-factory string")
        if approximate(self.index) and self.search != "faiss":
            raise ConfigError("mine.index", f"the approximate index '{self.index}' needs search='faiss'")
        for name in ("query_max_length", "passage_max_length", "max_batch", "embed_shard_rows", "shard_rows",
                     "row_group_rows"):
            if int(getattr(self, name)) < 1:
                raise ConfigError(f"mine.{name}", f"must be >= 1, got {getattr(self, name)}")

    def fingerprint(self) -> dict:
        """The fields that change what is written (not the stop point)."""
        d = asdict(self)
        d.pop("max_shards")
        return d


def approximate(index: str) -> bool:
    """Whether a faiss index-factory string is an approximate index (anything but ``Flat``)."""
    s = index.replace(" ", "")
    return s != "Flat" and bool(re.match(r"^[A-Za-z]", s))


def check_index(options: MineOptions, *, dim: int, n_passages: int) -> None:
    """An index string that faiss cannot build, or an IVF with more lists than passages, is a
    :class:`ConfigError` naming ``mine.index`` (checked before the corpus is embedded)."""
    if not approximate(options.index):
        return
    from me5.embed.search import import_faiss

    faiss = import_faiss()
    try:
        faiss.index_factory(int(dim), options.index, faiss.METRIC_INNER_PRODUCT)
    except Exception as err:  # noqa: BLE001 -- faiss raises RuntimeError with its own message
        raise ConfigError("mine.index", f"faiss cannot build '{options.index}' for dimension {dim} ({err})") from None
    m = re.search(r"IVF(\d+)", options.index)
    if m and int(m.group(1)) > n_passages:
        raise ConfigError("mine.index", f"'{options.index}' has {m.group(1)} inverted lists for a corpus of "
                          f"{n_passages} passages; use fewer lists (about sqrt(N) to 16 sqrt(N))")

