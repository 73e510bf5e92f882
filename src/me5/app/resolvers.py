"""OmegaConf resolvers of the app's configs, registered when this module is imported (the Hydra app imports it).

``${me5.slurm_count:${trainer.devices},trainer.devices}`` -- a count SLURM must be given as a positive integer
(``hydra/launcher=slurm``: nodes, tasks per node); ``"auto"``, ``-1`` or a device list are rejected with an
error that names the field, because SLURM allocates the tasks before Lightning could work out what "auto" means.
``${me5.slurm_gpus:${trainer.accelerator},${trainer.devices}}`` -- GPUs per node: the device count, or none on
``accelerator: cpu``.
"""

from __future__ import annotations

from omegaconf import OmegaConf

from me5.errors import ConfigError


def slurm_count(value, field: str = "trainer.devices") -> int:
    """``value`` as a positive int (an int, or a string of digits); otherwise a :class:`ConfigError` naming ``field``."""
    if isinstance(value, bool):
        value = None
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value.strip())
    if isinstance(value, int) and value > 0:
        return value
    raise ConfigError(field, f"hydra/launcher=slurm needs a positive integer (SLURM allocates the tasks before the "
                             f"job starts), got {value!r}; set it, e.g. {field}=8")


def slurm_gpus(accelerator, devices) -> int | None:
    """GPUs to request per node: ``None`` (no GPU request) for ``accelerator: cpu``, else the device count."""
    if str(accelerator) == "cpu":
        return None
    return slurm_count(devices, "trainer.devices")


def register() -> None:
    """Register the resolvers (idempotent)."""
    OmegaConf.register_new_resolver("me5.slurm_count", slurm_count, replace=True)
    OmegaConf.register_new_resolver("me5.slurm_gpus", slurm_gpus, replace=True)


register()
