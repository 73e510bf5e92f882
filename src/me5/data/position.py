"""The data position a checkpoint stores, so that a resumed run sees exactly the batches of an uninterrupted one.

It holds ``consumed_batches`` (= optimiser steps), the realised mixture (pairs per source and language) and,
when streaming, every reader's position after the last batch the training loop consumed (gathered over
ranks). Batches carry their bookkeeping in ``batch["data_state"]``; the DataModule hands each consumed one
to :meth:`DataPosition.observe`.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Mapping, Sequence

log = logging.getLogger(__name__)

STATE_VERSION = 1


def gather_objects(obj) -> list:
    """``[obj of rank 0, obj of rank 1, ...]`` when torch.distributed runs (a collective: every rank must
    call it), else ``[obj]``."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        out = [None] * dist.get_world_size()
        dist.all_gather_object(out, obj)
        return out
    return [obj]


def add_mix(into: dict, mix: Mapping) -> None:
    """Add a realised mixture ``{source: {lang: pairs}}`` into ``into``."""
    for src, langs in mix.items():
        d = into.setdefault(src, {})
        for lang, n in langs.items():
            d[lang] = d.get(lang, 0) + int(n)


class DataPosition:
    """Where the data stream stands (see the module docstring). ``seed``: the data seed it belongs to."""

    def __init__(self, seed: int = 0):
        self.seed = seed
        self.start_batch = 0  # the first batch the loader yields (a resume starts after the checkpoint's)
        self.consumed_seen = 0
        self.loaded_stream: dict | None = None  # the checkpoint's streaming layout and reader states
        self.carry_states: dict[int, dict] = {}  # reader states restored and not yet advanced
        self.reader_hist: dict[int, deque] = {}
        self.reader_counts: dict[int, dict] = {}
        self.mix: dict[str, dict[str, int]] = {}

    def observe(self, state: Mapping) -> None:
        """Record a consumed batch's ``data_state`` (the realised mixture; a streaming reader's position)."""
        b = int(state["batch"])
        self.consumed_seen = max(self.consumed_seen, b + 1)
        add_mix(self.mix, state.get("mix") or {})
        if "reader" in state:
            rid = int(state["reader"])
            self.reader_hist.setdefault(rid, deque(maxlen=8)).append(
                (b, {"positions": state["positions"], "counts": state["counts"]}))
            self.reader_counts[rid] = state["counts"]

    def realised_mixture(self, *, gather: bool = False) -> dict[str, dict[str, int]]:
        """Pairs consumed so far per source and language over this rank's batches (cumulative over resumes);
        ``gather=True`` sums over ranks (a collective)."""
        out: dict[str, dict[str, int]] = {}
        for part in gather_objects(self.mix) if gather else [self.mix]:
            add_mix(out, part)
        return {s: dict(sorted(v.items())) for s, v in sorted(out.items())}

    def state_dict(self, consumed: int, *, layout: Mapping | None) -> dict:
        """The position after ``consumed`` global batches; ``layout``: the streaming layout (``None``: in
        memory). Gathers over ranks, so every rank must call it (Lightning does)."""
        state = {"version": STATE_VERSION, "consumed_batches": int(consumed), "seed": self.seed}
        local_readers = {}
        for rid, hist in self.reader_hist.items():
            done = [(b, st) for b, st in hist if b < consumed]
            if done:
                local_readers[rid] = max(done, key=lambda t: t[0])[1]
        parts = gather_objects({"readers": local_readers, "mix": self.mix})
        mix: dict = {}
        readers = dict(self.carry_states)
        for part in parts:
            add_mix(mix, part["mix"])
            readers.update(part["readers"])
        state["realised_mixture"] = mix
        if layout is not None:
            state["stream"] = {**layout, "readers": readers}
        return state

    def load_state_dict(self, state: Mapping, *, rank: int) -> None:
        if state.get("seed", self.seed) != self.seed:
            log.warning("resuming with data seed %s, checkpoint used %s: the batch order will differ", self.seed,
                        state["seed"])
        self.start_batch = int(state.get("consumed_batches", 0))
        self.consumed_seen = self.start_batch
        self.loaded_stream = state.get("stream")
        self.mix = {}
        if rank == 0:  # the saved mixture is the sum over ranks: keep it once
            add_mix(self.mix, state.get("realised_mixture") or {})
        self.reader_hist = {}

    def start_states(self, leaves: Sequence, layout: Mapping) -> dict[int, dict]:
        """Reader states to resume from (kept as :attr:`carry_states`): the checkpoint's when its layout matches
        ``layout``, else each reader at the start of the next epoch of every leaf, with a warning."""
        self.carry_states = self._start_states(leaves, layout)
        return self.carry_states

    def _start_states(self, leaves: Sequence, layout: Mapping) -> dict[int, dict]:
        loaded = self.loaded_stream
        if not loaded:
            return {}
        readers = {int(k): v for k, v in (loaded.get("readers") or {}).items()}
        if (loaded.get("world_size"), loaded.get("readers_per_rank")) == (layout["world_size"], layout["readers_per_rank"]):
            return readers
        log.warning(
            "the data layout changed (world size x readers per rank %s x %s -> %s x %s): the streaming position "
            "cannot be restored exactly; every reader starts the next epoch of its source",
            loaded.get("world_size"), loaded.get("readers_per_rank"), layout["world_size"], layout["readers_per_rank"])
        next_epoch: dict[str, int] = {}
        for st in readers.values():
            for key, pos in (st.get("positions") or {}).items():
                e = pos["epoch"] if isinstance(pos, Mapping) else pos[0]
                next_epoch[key] = max(next_epoch.get(key, 0), int(e) + 1)
        n = layout["world_size"] * layout["readers_per_rank"]
        pos = {lf.key: ({"epoch": next_epoch.get(lf.key, 0)} if lf.hub is not None
                        else [next_epoch.get(lf.key, 0), 0, 0, 0, 0]) for lf in leaves}
        return {rid: {"positions": pos} for rid in range(n)}
