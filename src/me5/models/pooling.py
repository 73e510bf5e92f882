"""Pooling of token states into one vector per text.

mE5 uses ``mean`` (average over non-pad tokens of the last layer; unilm ``e5/utils.py``). ``cls`` takes the
first token (SimLM, BGE) and ``last`` the last non-pad token (E5-mistral), for either padding side.
"""

from __future__ import annotations

import torch
from torch import Tensor


def mean_pool(hidden_BTD: Tensor, mask_BT: Tensor) -> Tensor:
    """Average of the hidden states where ``mask_BT`` is 1. Empty rows give zeros, not NaN."""
    mask = mask_BT.to(hidden_BTD.dtype).unsqueeze(-1)  # (B, T, 1)
    summed_BD = (hidden_BTD * mask).sum(dim=1)
    count_B1 = mask.sum(dim=1).clamp(min=1.0)
    return summed_BD / count_B1


def cls_pool(hidden_BTD: Tensor, mask_BT: Tensor) -> Tensor:
    """Hidden state of the first position (the ``<s>``/``[CLS]`` token with right padding)."""
    del mask_BT
    return hidden_BTD[:, 0]


def last_token_pool(hidden_BTD: Tensor, mask_BT: Tensor) -> Tensor:
    """Hidden state of each row's last non-pad token; handles left and right padding."""
    left_padded = bool(mask_BT[:, -1].all())
    if left_padded:
        return hidden_BTD[:, -1]
    last_B = mask_BT.long().sum(dim=1).clamp(min=1) - 1
    return hidden_BTD[torch.arange(hidden_BTD.size(0), device=hidden_BTD.device), last_B]


POOLERS = {"mean": mean_pool, "cls": cls_pool, "last": last_token_pool}
