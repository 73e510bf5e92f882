"""Which candidates become a record's negatives: the rank window, the positive-aware guards, the pick order and the
teacher re-check (steps 2-5 of :mod:`me5.mining.mine`'s docstring), as pure functions over search results.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from me5.errors import ConfigError
from me5.mining.options import SAMPLING, MineOptions


def candidate_window(cand_rows_QK: np.ndarray, exclude_QP: np.ndarray, *, range_min: int, range_max: int
                     ) -> tuple[np.ndarray, np.ndarray]:
    """``(window_QK, excluded_QK)`` boolean masks over search results in rank order.

    ``cand_rows_QK``: corpus rows (``-1``: no result); ``exclude_QP``: rows that are never negatives (a query's
    positives, ``-1`` padded). The excluded and empty columns get no rank; the others are ranked 0, 1, ... and
    the window holds ranks ``range_min <= r < range_max``.
    """
    excluded = (cand_rows_QK[:, :, None] == exclude_QP[:, None, :]).any(axis=2) & (cand_rows_QK >= 0)
    eligible = (cand_rows_QK >= 0) & ~excluded
    rank = np.cumsum(eligible, axis=1) - 1
    return eligible & (rank >= range_min) & (rank < range_max), excluded


def guard_masks(cand_scores_QK: np.ndarray, pos_scores_Q: np.ndarray, window_QK: np.ndarray, *,
                perc_pos: float | None, absolute_margin: float | None) -> dict[str, np.ndarray]:
    """``{reason: dropped_QK}`` for the window's candidates, each candidate under the first reason that drops it.

    ``perc_pos``: drop ``score > pos - |pos| * (1 - perc_pos)``; ``absolute_margin``: drop ``score > pos - m``.
    """
    pos = pos_scores_Q.astype(np.float32)[:, None]
    left = window_QK.copy()
    out: dict[str, np.ndarray] = {}
    if perc_pos is not None:
        thr = pos - np.abs(pos) * np.float32(1.0 - perc_pos)
        out["perc_pos"] = left & (cand_scores_QK > thr)
        left &= ~out["perc_pos"]
    if absolute_margin is not None:
        out["absolute_margin"] = left & (cand_scores_QK > pos - np.float32(absolute_margin))
        left &= ~out["absolute_margin"]
    return out


_M1, _M2, _M3 = np.uint64(0x9E3779B97F4A7C15), np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)


def _mix(z: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser on a uint64 array (wrapping arithmetic)."""
    z = (z ^ (z >> np.uint64(30))) * _M2
    z = (z ^ (z >> np.uint64(27))) * _M3
    return z ^ (z >> np.uint64(31))


def sample_priority(seed: int, record_ids_Q: np.ndarray, cand_rows_QK: np.ndarray) -> np.ndarray:
    """(Q, K) uint64: a pseudo-random priority of each (record, passage), independent of anything else."""
    with np.errstate(over="ignore"):
        s = _mix(np.full(1, seed, dtype=np.uint64) * _M1 + _M1)
        r = _mix(record_ids_Q.astype(np.uint64)[:, None] ^ s)
        return _mix(r ^ (cand_rows_QK.astype(np.int64).view(np.uint64) * _M1))


def pick_order(cand_rows_QK: np.ndarray, *, sampling: str, seed: int = 0,
               record_ids_Q: np.ndarray | None = None) -> np.ndarray:
    """(Q, K) column indices in the order candidates are picked: rank order (``top``) or by
    :func:`sample_priority` (``random``)."""
    q, k = cand_rows_QK.shape
    if sampling == "top":
        return np.broadcast_to(np.arange(k), (q, k)).copy()
    if sampling == "random":
        ids = record_ids_Q if record_ids_Q is not None else np.arange(q)
        return np.argsort(sample_priority(seed, ids, cand_rows_QK), axis=1, kind="stable")
    raise ConfigError("mine.sampling", f"unknown '{sampling}'; choose one of {list(SAMPLING)}")


def take(order_QK: np.ndarray, allowed_QK: np.ndarray, n: int | np.ndarray) -> np.ndarray:
    """(Q, K) bool: the first ``n`` allowed columns of each row in ``order_QK`` (``n``: one count, or (Q, 1))."""
    rows = np.arange(order_QK.shape[0])[:, None]
    allowed_sorted = allowed_QK[rows, order_QK]
    picked_sorted = allowed_sorted & (np.cumsum(allowed_sorted, axis=1) <= n)
    out = np.zeros_like(allowed_QK)
    out[rows, order_QK] = picked_sorted
    return out


@dataclass
class Selection:
    """What :func:`select_negatives` decided for a block of records (masks over the search results)."""

    window: np.ndarray  # (Q, K) in the rank window
    excluded: np.ndarray  # (Q, K) a positive or the query's own text
    dropped: dict[str, np.ndarray]  # reason -> (Q, K)
    chosen: np.ndarray  # (Q, K) the negatives
    teacher_QK: np.ndarray | None = None  # teacher scores of the candidates it scored (nan elsewhere)
    teacher_pos_Q: np.ndarray | None = None

    def counts(self, n_negatives: int | np.ndarray) -> Counter:
        """Counts of the block; ``n_negatives``: the negatives each record is mined for (a number, or (Q,))."""
        c: Counter = Counter()
        c["candidates/window"] += int(self.window.sum())
        c["excluded/positive"] += int(self.excluded.sum())
        for reason, mask in self.dropped.items():
            c[f"dropped/{reason}"] += int(mask.sum())
        got = self.chosen.sum(axis=1)
        c["negatives"] += int(got.sum())
        c["records/short"] += int((got < n_negatives).sum())
        return c


def select_negatives(cand_rows_QK: np.ndarray, cand_scores_QK: np.ndarray, pos_scores_Q: np.ndarray,
                     exclude_QP: np.ndarray, options: MineOptions, *, record_ids_Q: np.ndarray | None = None,
                     teacher: Callable[[np.ndarray, np.ndarray], np.ndarray] | None = None,
                     teacher_pos_Q: np.ndarray | None = None, need_Q: np.ndarray | None = None) -> Selection:
    """Window, guards, sampling and the optional teacher re-check (:mod:`me5.mining.mine`'s docstring, steps 2-5).

    ``teacher(q_idx, cols)`` scores the candidates at ``(q_idx[i], cols[i])``; ``teacher_pos_Q`` are the
    teacher's scores of the positives. Only the candidates that are picked get scored, round by round.
    ``need_Q``: how many negatives each record is mined for (default ``options.n_negatives``; fewer for a
    record with negatives of its own).
    """
    n = options.n_negatives if need_Q is None else np.asarray(need_Q, dtype=np.int64)[:, None]
    window, excluded = candidate_window(cand_rows_QK, exclude_QP, range_min=options.range_min,
                                        range_max=options.range_max)
    dropped = guard_masks(cand_scores_QK, pos_scores_Q, window, perc_pos=options.perc_pos,
                          absolute_margin=options.absolute_margin)
    survivors = window.copy()
    for mask in dropped.values():
        survivors &= ~mask
    order = pick_order(cand_rows_QK, sampling=options.sampling, seed=options.seed, record_ids_Q=record_ids_Q)
    if teacher is None:
        return Selection(window, excluded, dropped, take(order, survivors, n))
    if teacher_pos_Q is None:
        raise ValueError("the teacher re-check needs the teacher's scores of the positives")
    t = np.full(cand_rows_QK.shape, np.nan, dtype=np.float32)
    rejected = np.zeros_like(survivors)
    while True:  # each round scores at most n new candidates per record; stops when the picks are all scored
        chosen = take(order, survivors & ~rejected, n)
        need = chosen & np.isnan(t)
        if not need.any():
            break
        qi, kj = np.nonzero(need)
        t[qi, kj] = teacher(qi, kj)
        rejected |= need & (t > teacher_pos_Q[:, None])
    dropped["teacher"] = rejected
    return Selection(window, excluded, dropped, chosen, t, teacher_pos_Q)

