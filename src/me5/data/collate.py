"""Tokenise a list of training items into the batch tensors every stage reads.

Queries and passages are tokenised separately with their own maximum length. Truncation is counted, never
silent: the counts ride along in the batch (``n_truncated_queries``/``n_truncated_passages``) and the
LightningModule logs them.

Speed (see ``python -m me5.bench_data``): with a fast (Rust) tokenizer the whole batch is one
``encode_batch_fast`` call per side on a private copy of the backend tokenizer, with the tokenizer's own
truncation (so ``</s>`` is kept exactly as ``truncation=True`` keeps it); a text counts as truncated when
its encoding has overflowing tokens (exact). Padding is one vectorised numpy scatter.

*Pre-cut* (``pre_truncate``): a text much longer than its token budget is first cut at a word boundary after
``max_length * chars_per_token`` characters. When the pre-tokenizer splits on whitespace (XLM-R's Metaspace,
BERT, whitespace splitters; detected), the tokens of a word-boundary prefix are the first tokens of the full
text, so a cut text whose encoding still overflows gives exactly the truncated encoding of the full text.
A cut text that does *not* overflow is re-encoded in full, so the output and the truncation counts are
exact either way; the cut only saves the work of tokenising text that would be thrown away.
"""

from __future__ import annotations

import hashlib
import itertools
import json
from collections.abc import Sequence
from typing import TypedDict

import numpy as np
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


# pre-tokenizers after which a whitespace-bounded prefix of a text tokenises to a prefix of the text's tokens
_WORD_SPLITTERS = {"Metaspace", "WhitespaceSplit", "Whitespace", "BertPreTokenizer"}
_SUB_SPLITTERS = {"Punctuation", "Split", "Digits", "UnicodeScripts", "CharDelimiterSplit"}


def _splits_on_whitespace(backend) -> bool:
    """True when ``backend``'s pre-tokenizer starts every word at whitespace (so the pre-cut is exact)."""
    try:
        spec = json.loads(backend.to_str()).get("pre_tokenizer")
    except Exception:  # pragma: no cover - exotic backends
        return False
    if not spec:
        return False
    parts = spec.get("pretokenizers", []) if spec.get("type") == "Sequence" else [spec]
    types = [p.get("type") for p in parts]
    if not any(t in _WORD_SPLITTERS for t in types) or not all(t in _WORD_SPLITTERS | _SUB_SPLITTERS for t in types):
        return False
    return all(p.get("split", True) for p in parts if p.get("type") == "Metaspace")


def _cut(text: str, limit: int) -> str | None:
    """``text`` cut at the last space at or before ``limit`` characters; ``None`` when not cut."""
    if len(text) <= limit:
        return None
    # only an ASCII space: every whitespace-splitting pre-tokenizer splits there (Metaspace splits on nothing else)
    j = text.rfind(" ", 0, limit + 1)
    return text[:j] if j > 0 else None


class PairCollator:
    """``list[TrainItem]`` -> dict of tensors (see docs/ARCHITECTURE.md, "The batch").

    Args:
        tokenizer: a ``transformers`` tokenizer; a fast one (with ``backend_tokenizer``) takes the fast path.
        query_max_length / passage_max_length: token budgets including special tokens (mE5: 128 in pre-training,
            192 in fine-tuning for E5; the unilm maintainer, microsoft/unilm#1273).
        pad_to_multiple_of: pad the time dimension to a multiple of this (tensor-core friendly), never beyond
            the budget.
        pre_truncate: cut very long texts at a word boundary before tokenising (exact, see the module
            docstring); ``None``: on when the tokenizer's pre-tokenizer splits on whitespace.
        chars_per_token: the pre-cut keeps ``max_length * chars_per_token`` characters.
    """

    def __init__(
        self,
        tokenizer,
        *,
        query_max_length: int = 64,
        passage_max_length: int = 128,
        pad_to_multiple_of: int = 8,
        pre_truncate: bool | None = None,
        chars_per_token: int = 8,
    ):
        if tokenizer.pad_token_id is None:
            raise ValueError("the tokenizer has no pad token")
        self.tokenizer = tokenizer
        self.query_max_length = query_max_length
        self.passage_max_length = passage_max_length
        self.pad_to_multiple_of = pad_to_multiple_of
        self.pad_id = int(tokenizer.pad_token_id)
        self.chars_per_token = chars_per_token
        backend = getattr(tokenizer, "backend_tokenizer", None)
        self._backends: dict[int, object] = {}
        if backend is not None:
            from tokenizers import Tokenizer

            for length in {query_max_length, passage_max_length}:
                tok = Tokenizer.from_str(backend.to_str())  # a private copy: its settings are ours alone
                tok.no_padding()
                tok.enable_truncation(length, stride=0, strategy="longest_first", direction="right")
                self._backends[length] = tok
        self.pre_truncate = (backend is not None and _splits_on_whitespace(backend)) if pre_truncate is None else pre_truncate

    # ------------------------------------------------------------------ encoding
    def _encode(self, texts: Sequence[str], max_length: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        if max_length in self._backends:
            rows, n_truncated = self._encode_fast(texts, max_length)
        else:
            rows, n_truncated = self._encode_python(texts, max_length)
        return (*self._pad(rows, max_length), n_truncated)

    def _encode_fast(self, texts: Sequence[str], max_length: int) -> tuple[list[list[int]], int]:
        tok = self._backends[max_length]
        texts = list(texts)
        inputs, cut_at = texts, []
        if self.pre_truncate:
            limit = max_length * self.chars_per_token
            inputs = []
            for i, t in enumerate(texts):
                c = _cut(t, limit) if len(t) > limit else None
                if c is not None:
                    cut_at.append(i)
                inputs.append(t if c is None else c)
        encs = tok.encode_batch_fast(inputs)
        if cut_at:
            # a cut text that does not overflow may still be short of the budget: encode it in full
            redo = [i for i in cut_at if not encs[i].overflowing]
            if redo:
                for i, e in zip(redo, tok.encode_batch_fast([texts[i] for i in redo])):
                    encs[i] = e
        n_truncated = sum(1 for e in encs if e.overflowing)
        return [e.ids for e in encs], n_truncated

    def _encode_python(self, texts: Sequence[str], max_length: int) -> tuple[list[list[int]], int]:
        """Slow tokenizers: encode in full, truncate here keeping the closing special token."""
        ids = self.tokenizer(list(texts), add_special_tokens=True, truncation=False)["input_ids"]
        eos = self.tokenizer.sep_token_id if self.tokenizer.sep_token_id is not None else self.tokenizer.eos_token_id
        out, n_truncated = [], 0
        for row in ids:
            if len(row) > max_length:
                n_truncated += 1
                row = row[: max_length - 1] + [eos] if eos is not None and row[-1] == eos else row[:max_length]
            out.append(row)
        return out, n_truncated

    def _pad(self, rows: list[list[int]], max_length: int) -> tuple[torch.Tensor, torch.Tensor]:
        lengths = np.fromiter((len(r) for r in rows), dtype=np.int64, count=len(rows))
        width = int(lengths.max())
        m = self.pad_to_multiple_of
        width = min(max_length, -(-width // m) * m) if m else width
        mask = np.arange(width)[None, :] < lengths[:, None]
        ids = np.full((len(rows), width), self.pad_id, dtype=np.int64)
        ids[mask] = np.fromiter(itertools.chain.from_iterable(rows), dtype=np.int64, count=int(lengths.sum()))
        return torch.from_numpy(ids), torch.from_numpy(mask.astype(np.int64))

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
