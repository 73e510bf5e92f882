"""Pooling of token states into one vector per text.

mE5 uses ``mean`` (average over non-pad tokens of the last layer; unilm ``e5/utils.py``). ``cls`` takes the
first token (SimLM, BGE) and ``last`` the last non-pad token (E5-mistral), for either padding side.

*Prompt tokens.* mE5 averages over every token, its ``query: `` / ``Instruct: ...`` prompt included. GritLM and
sentence-transformers (``Pooling(include_prompt=False)``) leave the prompt out: :func:`me5.prompts.prompt_token_count` gives
the number of leading tokens a prompt takes (sentence-transformers' rule: the prompt tokenised alone, ``<s>``
included, a closing special token not), and :func:`without_prompt` drops them from the pooling mask, counted from
each row's first real token (so left padding and GradCache's column trimming move nothing).
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


def without_prompt(mask_BT: Tensor, prompt_length: Tensor | int) -> Tensor:
    """``mask_BT`` with the first ``prompt_length`` real tokens of each row set to 0 (an int or a (B,) tensor)."""
    if not torch.is_tensor(prompt_length):
        prompt_length = torch.tensor(int(prompt_length))
    real_BT = mask_BT != 0
    rank_BT = real_BT.cumsum(dim=1)  # 1 for the first real token of a row, 2 for the second, ...
    keep_BT = real_BT & (rank_BT > prompt_length.to(mask_BT.device).reshape(-1, 1))
    return keep_BT.to(mask_BT.dtype)


POOLERS = {"mean": mean_pool, "cls": cls_pool, "last": last_token_pool}

# model types whose ``AutoModel`` has a pooler head (``pooler.dense``: Linear(D, D) + tanh) unless built with
# ``add_pooling_layer=False``. me5 never uses it (it pools ``last_hidden_state`` with :data:`POOLERS`): the
# encoder loads without it (``Encoder.pooler_state``) and the export writes it back (``export_encoder``).
POOLER_MODEL_TYPES = frozenset({"bert", "roberta", "xlm-roberta"})
