"""The batch plan of a stage: global batch, world size, per-device batch and gradient-cache chunk, derived once.

The config sets ``stages.<stage>.global_batch_size`` (mE5: 32k pairs in pre-training, 512 in fine-tuning) and
optionally ``per_device_batch_size`` (a cross-check) and ``chunk_rows`` / ``chunk_tokens`` (gradient caching).
The app builds one :class:`BatchPlan` per stage as soon as the world size is known, before any data or model
is touched, and hands it to the DataModule (which draws global batches and keeps this rank's slice) and to
the LightningModule (which embeds the slice in chunks). Every contradiction is a
:class:`~me5.errors.ConfigError` naming the field.
"""

from __future__ import annotations

from dataclasses import dataclass

from me5.errors import ConfigError


@dataclass(frozen=True)
class BatchPlan:
    """How one stage's global batch is cut (build it with :meth:`build`, which validates).

    Attributes:
        global_batch_size: pairs per optimiser step over all devices.
        world_size: devices (ranks) sharing it.
        per_device_batch_size: ``global_batch_size / world_size``, this rank's slice.
        chunk_rows / chunk_tokens: gradient caching: texts, or tokens (padded; real ones for a packed encoder), per
            re-forward chunk (at most one is set; neither: one plain forward/backward over the per-device batch).
        where: the config prefix the fields live under (``stages.pretrain``), for messages.
    """

    global_batch_size: int
    world_size: int = 1
    per_device_batch_size: int = 0
    chunk_rows: int | None = None
    chunk_tokens: int | None = None
    where: str = "stage"

    @classmethod
    def build(cls, *, global_batch_size: int, world_size: int = 1, per_device_batch_size: int | None = None,
              chunk_rows: int | None = None, chunk_tokens: int | None = None, where: str = "stage") -> BatchPlan:
        """Derive the per-device batch and check every field against the others."""
        gbs = _positive(global_batch_size, f"{where}.global_batch_size")
        world = _positive(world_size, "trainer (world size)")
        if gbs % world:
            raise ConfigError(f"{where}.global_batch_size", f"{gbs} is not divisible by the {world} devices")
        per_device = gbs // world
        if per_device_batch_size is not None:
            pd = _positive(per_device_batch_size, f"{where}.per_device_batch_size")
            if pd > gbs:
                raise ConfigError(f"{where}.per_device_batch_size",
                                  f"{pd} is larger than the global batch {where}.global_batch_size={gbs}")
            if gbs % pd:
                raise ConfigError(f"{where}.per_device_batch_size", f"{pd} does not divide the global batch {gbs}")
            if pd != per_device:
                raise ConfigError(f"{where}.per_device_batch_size",
                                  f"global {gbs} / per-device {pd} = {gbs // pd} devices, but the trainer has {world}")
        if chunk_rows is not None and chunk_tokens is not None:
            raise ConfigError(f"{where}.chunk_tokens", "set chunk_rows or chunk_tokens, not both")
        if chunk_rows is not None:
            chunk_rows = _positive(chunk_rows, f"{where}.chunk_rows")
            if chunk_rows > per_device:
                raise ConfigError(f"{where}.chunk_rows", f"{chunk_rows} is larger than the per-device batch {per_device}")
        if chunk_tokens is not None:
            chunk_tokens = _positive(chunk_tokens, f"{where}.chunk_tokens")
        return cls(gbs, world, per_device, chunk_rows, chunk_tokens, where)

    def with_world_size(self, world_size: int) -> BatchPlan:
        """The same stage on ``world_size`` devices (validated again)."""
        return BatchPlan.build(global_batch_size=self.global_batch_size, world_size=world_size,
                               chunk_rows=self.chunk_rows, chunk_tokens=self.chunk_tokens, where=self.where)

    def rank_slice(self, rank: int) -> slice:
        """The slots of a global batch that ``rank`` keeps."""
        if not 0 <= rank < self.world_size:
            raise ValueError(f"rank {rank} is not in [0, {self.world_size})")
        return slice(rank * self.per_device_batch_size, (rank + 1) * self.per_device_batch_size)


def _positive(value, field: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(field, f"must be an integer >= 1, got {value!r}")
    return value
