"""Tokenise a list of training items into the batch tensors every stage reads.

Queries and passages are tokenised separately with their own maximum length. Truncation is counted, never
silent: the counts ride along in the batch (``n_truncated_queries``/``n_truncated_passages``) and the
LightningModule logs them.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import TypedDict

import torch


class TrainItem(TypedDict):
    """One formatted example: prefixes applied, passages = [positive, *hard_negatives]."""

    query: str
    passages: list[str]
    teacher_scores: list[float] | None
    lang: str
    source: str


def text_hash(text: str) -> int:
    """A stable signed 64-bit hash of a text (identical across processes and runs, unlike ``hash``)."""
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "little", signed=True)


class PairCollator:
    """``list[TrainItem]`` -> dict of tensors (see docs/ARCHITECTURE.md, "The batch").

    Args:
        tokenizer: a fast ``transformers`` tokenizer.
        query_max_length / passage_max_length: token budgets including special tokens (mE5: 128 in pre-training,
            192 in fine-tuning for E5; the unilm maintainer, microsoft/unilm#1273).
        pad_to_multiple_of: pad the time dimension to a multiple of this (tensor-core friendly).
    """

    def __init__(self, tokenizer, *, query_max_length: int = 64, passage_max_length: int = 128, pad_to_multiple_of: int = 8):
        if tokenizer.pad_token_id is None:
            raise ValueError("the tokenizer has no pad token")
        self.tokenizer = tokenizer
        self.query_max_length = query_max_length
        self.passage_max_length = passage_max_length
        self.pad_to_multiple_of = pad_to_multiple_of

    def _encode(self, texts: Sequence[str], max_length: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        ids = self.tokenizer(list(texts), add_special_tokens=True, truncation=False)["input_ids"]
        n_truncated = 0
        eos = self.tokenizer.sep_token_id if self.tokenizer.sep_token_id is not None else self.tokenizer.eos_token_id
        out = []
        for row in ids:
            if len(row) > max_length:
                n_truncated += 1
                # keep the closing special token, as `truncation=True` does
                row = row[: max_length - 1] + [eos] if eos is not None and row[-1] == eos else row[:max_length]
            out.append(row)
        width = max(len(r) for r in out)
        m = self.pad_to_multiple_of
        width = min(max_length, -(-width // m) * m) if m else width
        input_ids = torch.full((len(out), width), self.tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(out), width), dtype=torch.long)
        for i, row in enumerate(out):
            input_ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
            mask[i, : len(row)] = 1
        return input_ids, mask, n_truncated

    def __call__(self, items: Sequence[TrainItem]) -> dict:
        if not items:
            raise ValueError("cannot collate an empty batch")
        group = len(items[0]["passages"])
        if any(len(it["passages"]) != group for it in items):
            raise ValueError("every item in a batch must have the same number of passages")
        q_ids, q_mask, q_trunc = self._encode([it["query"] for it in items], self.query_max_length)
        passages = [p for it in items for p in it["passages"]]
        p_ids, p_mask, p_trunc = self._encode(passages, self.passage_max_length)
        batch = {
            "query_input_ids": q_ids,
            "query_attention_mask": q_mask,
            "passage_input_ids": p_ids,
            "passage_attention_mask": p_mask,
            "group_size": group,
            "passage_hash": torch.tensor([text_hash(p) for p in passages], dtype=torch.long),
            "n_truncated_queries": q_trunc,
            "n_truncated_passages": p_trunc,
            "lang": [it["lang"] for it in items],
            "source": [it["source"] for it in items],
        }
        if all(it["teacher_scores"] is not None for it in items):
            batch["teacher_scores"] = torch.tensor([it["teacher_scores"] for it in items], dtype=torch.float)
        return batch
