"""The callbacks of a training run (the ``callbacks`` config group): checkpoints carry the config, the realised
mixture is logged (a W&B table and bar chart, or scalars)."""

from __future__ import annotations

from collections.abc import Mapping

from lightning.pytorch.callbacks import Callback

from me5.data.mixture import mixture_scalars, mixture_table


class ConfigInCheckpoint(Callback):
    """Stores the resolved config and run metadata in every checkpoint (``me5_config``, ``me5_meta``).

    The app binds both at run time (``run_config``, ``meta``): they exist only once the run has started.
    """

    def __init__(self, run_config: Mapping, meta: Mapping):
        from omegaconf import OmegaConf

        # plain containers in the checkpoint (instantiate hands mappings over as config nodes)
        self.config = OmegaConf.to_container(run_config) if OmegaConf.is_config(run_config) else dict(run_config)
        self.meta = OmegaConf.to_container(meta) if OmegaConf.is_config(meta) else dict(meta)

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        checkpoint["me5_config"] = self.config
        checkpoint["me5_meta"] = self.meta


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
