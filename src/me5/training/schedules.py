"""Learning-rate schedules as ``LambdaLR`` factories (bound to the optimiser by the module)."""

from __future__ import annotations

import math

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR


def warmup_decay(optimizer: Optimizer, *, total_steps: int, warmup_steps: int = 0, decay: str = "linear", min_ratio: float = 0.0) -> LambdaLR:
    """Linear warm-up to the peak LR over ``warmup_steps``, then ``linear``/``cosine``/``constant`` decay.

    E5 and SimLM use linear warm-up and linear decay (transformers' ``get_linear_schedule_with_warmup``).
    """
    if decay not in {"linear", "cosine", "constant"}:
        raise ValueError(f"unknown decay '{decay}'")

    def factor(step: int) -> float:
        if warmup_steps and step < warmup_steps:
            return (step + 1) / warmup_steps
        if decay == "constant" or total_steps <= warmup_steps:
            return 1.0
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        shape = 1.0 - progress if decay == "linear" else 0.5 * (1.0 + math.cos(math.pi * progress))
        return min_ratio + (1.0 - min_ratio) * shape

    return LambdaLR(optimizer, factor)
