"""Mixtures of text-pair sources: sampling weights with temperature, and the realised mixture in the logs.

Each example (or each global batch, with ``homogeneous``) draws its source with probability

    p(s) ∝ w_s ** temperature_alpha,

where ``w_s`` is the given weight (by default the source's size, e.g. the pair counts of mE5 Table 1 or 2).
``temperature_alpha`` = 1 samples in proportion to size; below 1 it flattens the mixture so that small
(low-resource) sources are not drowned (XLM-R/mT5 use α ≈ 0.3 over languages); 0 is uniform. With
``lang_temperature_alpha`` the same is done over the languages inside each source:
p(lang | s) ∝ n_{s,lang} ** lang_temperature_alpha.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

import lightning as L
from lightning.pytorch.callbacks import Callback

from me5.data.base import TextPairDataModule
from me5.errors import ConfigError

log = logging.getLogger(__name__)


class MixtureDataModule(TextPairDataModule):
    """Samples examples from several sources by weight.

    Args:
        sources: name -> source DataModule.
        weights: name -> weight, unnormalised (e.g. Table 1's pair counts in millions); ``None``: each source's
            size (``num_pairs``: its ``size``, loaded examples, or shard row counts).
        temperature_alpha: p(source) ∝ weight ** alpha (1: as given; < 1 flattens; 0: uniform).
        lang_temperature_alpha: when set, p(lang | source) ∝ pairs_in_lang ** alpha inside every source
            (streaming needs single-language units: row groups as ``me5.data.prepare --split-langs`` writes
            them, or raw files whose published name gives the language; see ``file_lang``).
        homogeneous: draw one source per *global* batch instead of per example.
        streaming: stream every source (``None``: when any source would stream on its own).
    """

    def __init__(
        self,
        sources: Mapping[str, TextPairDataModule],
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
        L.LightningDataModule.__init__(self)
        if not sources:
            raise ConfigError("data.sources", "a mixture needs at least one source")
        self._sources = dict(sources)
        for name, src in self._sources.items():
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
        self.name = "mixture"
        self.homogeneous = homogeneous
        self._init_loading(seed=seed, num_workers=num_workers, streaming=streaming, size=None, word_cache=word_cache)

    def sources(self) -> dict[str, TextPairDataModule]:
        return self._sources

    def is_streaming(self) -> bool:
        if self._streaming_now is None:
            self._streaming_now = (bool(self.streaming) if self.streaming is not None
                                   else any(src.wants_streaming() for src in self._sources.values()))
        return self._streaming_now

    def weights(self) -> dict[str, float]:
        """The weights as given, or each source's size (known after ``setup``)."""
        if self._weights is not None:
            return dict(self._weights)
        sizes = {n: float(src.num_pairs()) for n, src in self._sources.items()}
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

    def lang_weights_requested(self) -> bool:
        return self.lang_temperature_alpha is not None

    def lang_weights(self) -> dict[str, dict[str, float]] | None:
        """``{source: {lang: pairs ** lang_temperature_alpha}}``, or ``None`` without language temperature."""
        if self.lang_temperature_alpha is None:
            return None
        b = float(self.lang_temperature_alpha)
        return {n: {lang: float(c) ** b for lang, c in src.lang_sizes().items() if c > 0}
                for n, src in self._sources.items()}

    def prepare_data(self) -> None:
        for src in self._sources.values():
            src.prepare_data()


# ============================================================================================== logging
def mixture_table(counts: Mapping[str, Mapping[str, int]]) -> list[tuple[str, str, int, float]]:
    """Rows ``(source, lang, pairs, share of all pairs)`` of a realised mixture, sorted."""
    total = sum(n for langs in counts.values() for n in langs.values()) or 1
    return [(s, lang, int(n), n / total) for s, langs in sorted(counts.items()) for lang, n in sorted(langs.items())]


def mixture_scalars(counts: Mapping[str, Mapping[str, int]], *, prefix: str = "data/mix") -> dict[str, float]:
    """``{prefix/<source>: share of pairs}`` and ``{prefix/lang/<lang>: share}`` of a realised mixture."""
    total = sum(n for langs in counts.values() for n in langs.values()) or 1
    out = {f"{prefix}/{s}": sum(langs.values()) / total for s, langs in sorted(counts.items())}
    by_lang: dict[str, int] = {}
    for langs in counts.values():
        for lang, n in langs.items():
            by_lang[lang] = by_lang.get(lang, 0) + n
    out.update({f"{prefix}/lang/{lang}": n / total for lang, n in sorted(by_lang.items())})
    return out


def log_realised_mixture(counts: Mapping[str, Mapping[str, int]], loggers, *, step: int | None = None,
                         prefix: str = "data/mix") -> dict[str, float]:
    """Log a realised mixture (``{source: {lang: pairs}}``) to Lightning loggers; returns the scalars.

    A W&B logger gets a table (source, lang, pairs, share) and a bar chart of pairs per source, plus the
    scalars; any other logger gets the scalars ``data/mix/<source>`` (share of pairs) and ``data/mix/lang/<lang>``.
    """
    scalars = mixture_scalars(counts, prefix=prefix)
    if not scalars:
        return scalars
    for lg in loggers if isinstance(loggers, (list, tuple)) else [loggers]:
        if type(lg).__name__ == "WandbLogger":
            try:
                import wandb
            except ImportError:  # pragma: no cover - wandb is a dependency, but stay usable without it
                wandb = None
            if wandb is not None:
                rows = [list(r) for r in mixture_table(counts)]
                per_source = [[s, sum(langs.values())] for s, langs in sorted(counts.items())]
                src_table = wandb.Table(columns=["source", "pairs"], data=per_source)
                payload = {
                    f"{prefix}/table": wandb.Table(columns=["source", "lang", "pairs", "share"], data=rows),
                    f"{prefix}/pairs_per_source": wandb.plot.bar(src_table, "source", "pairs",
                                                                 title="realised mixture: pairs per source"),
                }
                if step is not None:
                    payload["trainer/global_step"] = step
                lg.experiment.log(payload)
        lg.log_metrics(scalars, step=step)
    return scalars


class RealisedMixtureLogger(Callback):
    """Logs the realised mixture of the training data every ``every_n_steps`` steps and at the end of fit
    (summed over ranks; a W&B table + bar chart, or ``data/mix/<source>`` scalars). Add it to the Trainer's
    callbacks; it needs a DataModule with ``realised_mixture``."""

    def __init__(self, every_n_steps: int = 500):
        self.every_n_steps = every_n_steps

    def _log(self, trainer) -> None:
        dm = trainer.datamodule
        if dm is None or not hasattr(dm, "realised_mixture"):
            return
        counts = dm.realised_mixture(gather=True)  # collective: every rank gets here
        if trainer.is_global_zero and trainer.loggers:
            log_realised_mixture(counts, trainer.loggers, step=trainer.global_step)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.every_n_steps and trainer.global_step % self.every_n_steps == 0:
            self._log(trainer)

    def on_train_end(self, trainer, pl_module) -> None:
        self._log(trainer)
