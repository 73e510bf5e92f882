"""Timing helpers the benchmarks share: a device sync and the best of several timed calls."""

from __future__ import annotations

import math
import time

import torch


def sync(device: torch.device) -> None:
    """Wait for the device's queued work (CUDA); nothing to wait for on CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def best_time(fn, device: torch.device, repeats: int):
    """``(seconds, result)``: the fastest of ``repeats`` synced calls of ``fn()`` and the last call's result."""
    out, best = None, math.inf
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        out = fn()
        sync(device)
        best = min(best, time.perf_counter() - t0)
    return best, out
