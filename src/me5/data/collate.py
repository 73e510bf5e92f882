"""Tokenise a list of training items into the batch tensors every stage reads.

Queries and passages are tokenised separately with their own maximum length. Truncation is counted, never
silent: the counts ride along in the batch (``n_truncated_queries``/``n_truncated_passages``) and the
LightningModule logs them.

Speed (see ``python -m benchmarks.data_loader``): with a fast (Rust) tokenizer the whole batch is one
``encode_batch_fast`` call per side on a private copy of the backend tokenizer, with the tokenizer's own
truncation (so ``</s>`` is kept exactly as ``truncation=True`` keeps it); a text counts as truncated when
its encoding has overflowing tokens (exact). Padding is one vectorised numpy scatter.

*Pre-cut* (``pre_truncate``): a text much longer than its token budget is first cut at a word boundary after
``max_length * chars_per_token`` characters. When the pre-tokenizer splits on whitespace (XLM-R's Metaspace,
BERT, whitespace splitters; detected), the tokens of a word-boundary prefix are the first tokens of the full
text, so a cut text whose encoding still overflows gives exactly the truncated encoding of the full text.
A cut text that does *not* overflow is re-encoded in full, so the output and the truncation counts are
exact either way; the cut only saves the work of tokenising text that would be thrown away.

*Word cache* (``word_cache``, on by default): a whitespace-splitting tokenizer encodes a text as the
concatenation of the encodings of its space-separated chunks, so each distinct chunk is tokenised once and
memoised (per process, up to ``word_cache`` entries); a batch is then a few dict lookups per word plus one
``encode_batch_fast`` call for the chunks not seen before, and each text stops at its token budget. Natural
text is Zipf-distributed, so most words hit. The property is checked, not assumed: a probe of edge cases
(runs of spaces, tabs, newlines, NBSP, combining marks, punctuation, CJK, scripts without spaces) must encode
identically chunk by chunk and in full, and the first batch of each length is compared with the Rust path;
either failing switches the cache off with a logged reason. Texts without spaces (Chinese, Japanese, Thai)
are single chunks and cost what they cost without the cache.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from typing import NotRequired, TypedDict

import numpy as np
import torch

from me5.prompts import PromptPolicy, prompt_token_count

log = logging.getLogger(__name__)


class TrainItem(TypedDict):
    """One formatted example: prefixes applied, passages = [positive, *hard_negatives]; the prompts that were put
    in front of the query and of every passage (for pooling without them, ``Encoder(include_prompt=False)``)."""

    query: str
    passages: list[str]
    teacher_scores: list[float] | None
    lang: str
    source: str
    query_prompt: NotRequired[str]
    passage_prompt: NotRequired[str]


@lru_cache(maxsize=65536)
def _prompt_pair(prompts: PromptPolicy, instruction: str | None, symmetric: bool) -> tuple[str, str]:
    return prompts.pair(instruction, symmetric=symmetric)


@dataclass(frozen=True)
class ItemFormatter:
    """One source's training items: its prompts (``me5.prompts``) on every text, and ``n_negatives`` of an
    example's hard negatives drawn at random (with their teacher scores, positive first).

    A record with its own ``instruction`` or ``symmetric`` (instruction data) gets the prompts of those under
    ``prompts``; the source's (``instruction``, ``symmetric``) fill in what it does not carry. Built by
    :meth:`for_source`: the policy is always given, never a default.
    """

    query_prompt: str
    document_prompt: str
    n_negatives: int
    prompts: PromptPolicy = field(compare=False)
    instruction: str | None = None
    symmetric: bool = False

    @classmethod
    def for_source(cls, source, *, prompts: PromptPolicy, n_negatives: int = 0) -> ItemFormatter:
        """The formatter of a :class:`~me5.data.source.Source` under a :class:`~me5.prompts.PromptPolicy`."""
        instruction = source.instruction if prompts.style == "instruct" else None
        q, d = prompts.pair(instruction, symmetric=source.symmetric)
        return cls(q, d, n_negatives, prompts, instruction, bool(source.symmetric))

    def prompts_of(self, ex) -> tuple[str, str]:
        """``(query prompt, document prompt)`` of example ``ex``: the source's, or its own (see the class)."""
        if ex.instruction is None and ex.symmetric is None:
            return self.query_prompt, self.document_prompt
        instruction = (ex.instruction or self.instruction) if self.prompts.style == "instruct" else None
        symmetric = self.symmetric if ex.symmetric is None else ex.symmetric
        return _prompt_pair(self.prompts, instruction, symmetric)

    def __call__(self, ex, *, rng: np.random.Generator) -> TrainItem:
        picked: Sequence[int] = ()
        if self.n_negatives:
            picked = sorted(rng.choice(len(ex.negatives), size=self.n_negatives, replace=False).tolist())
        scores = None
        if ex.teacher_scores is not None:
            scores = [ex.teacher_scores[0]] + [ex.teacher_scores[1 + i] for i in picked]
        q, d = self.prompts_of(ex)
        return TrainItem(
            query=q + ex.query,
            passages=[d + ex.positive] + [d + ex.negatives[i] for i in picked],
            teacher_scores=scores,
            lang=ex.lang,
            source=ex.source,
            query_prompt=q,
            passage_prompt=d,
        )


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


# edge cases for the chunk-by-chunk property of the word cache (see the module docstring)
_WORD_CACHE_PROBE = (
    "", " ", "  ", "query: a  b", "  leading and trailing  ", "tab\there\nnewline\r\nx", "nbsp\u00a0word",
    "ideographic\u3000space", "combining \u0301acute e\u0301", "don't stop. (ok), \"quoted\" - dash",
    "猫が好き。犬も好き", "カタカナ テスト", "Привет, мир!", "مرحبا بالعالم", "नमस्ते दुनिया", "สวัสดีครับ", "emoji 🙂 ok",
    "Ǆ ﬁ ① Ⅻ ｆｕｌｌ", "1,234.5 km² 10%", "a , b ,c", "x" * 40 + " y", "\u200b zero\u200bwidth",
)


def _special_tokens(backend) -> tuple[list[int], list[int]] | None:
    """The ids a single-text encoding puts before and after the content (``<s>`` / ``</s>``), if separable."""
    probe = "probe text"
    full = backend.encode(probe).ids
    content = backend.encode(probe, add_special_tokens=False).ids
    for i in range(len(full) - len(content) + 1):
        if full[i: i + len(content)] == content:
            return full[:i], full[i + len(content):]
    return None


class _WordCache:
    """Memoised chunk-by-chunk encoding for a whitespace-splitting Rust tokenizer (see the module docstring).

    Build it with :meth:`create`, which returns ``None`` (and the reason) when the property does not hold.
    """

    def __init__(self, backend, prefix: list[int], suffix: list[int], max_entries: int):
        self.tok = backend  # no truncation, no padding, chunks encoded without special tokens
        self.prefix, self.suffix = prefix, suffix
        self.max_entries = max_entries
        self.table: dict[str, list[int]] = {}
        self.lookups = 0
        self.misses = 0

    @classmethod
    def create(cls, backend_json: str, max_entries: int) -> tuple[_WordCache | None, str]:
        from tokenizers import Tokenizer

        tok = Tokenizer.from_str(backend_json)
        tok.no_padding()
        tok.no_truncation()
        if not _splits_on_whitespace(tok):
            return None, "the pre-tokenizer does not split on whitespace"
        specials = _special_tokens(tok)
        if specials is None:
            return None, "the special tokens do not wrap the content"
        cache = cls(tok, *specials, max_entries=max_entries)
        for text in _WORD_CACHE_PROBE:
            rows, _ = cache.encode([text], 10_000)
            if rows[0] != tok.encode(text).ids:
                return None, f"chunk-by-chunk encoding differs from the full encoding on {text!r}"
        cache.table.clear()
        cache.lookups = cache.misses = 0
        return cache, ""

    def _fill(self, chunks: set[str]) -> dict[str, list[int]]:
        """Encode ``chunks`` (not in the table) in one call; store them while there is room."""
        missing = list(chunks)
        self.misses += len(missing)
        encs = self.tok.encode_batch_fast(missing, add_special_tokens=False)
        overflow: dict[str, list[int]] = {}
        room = self.max_entries - len(self.table)
        for i, (w, e) in enumerate(zip(missing, encs, strict=True)):
            (self.table if i < room else overflow)[w] = e.ids
        return overflow

    def encode(self, texts: Sequence[str], max_length: int) -> tuple[list[list[int]], int]:
        """Token ids with special tokens, truncated to ``max_length`` as the Rust tokenizer truncates."""
        budget = max_length - len(self.prefix) - len(self.suffix)
        get = self.table.get
        out: list[list[int]] = [[]] * len(texts)
        pending: list[tuple[int, list[str], list[int], int]] = []  # (row, chunks, ids so far, first unseen chunk)
        missing: set[str] = set()
        for row, text in enumerate(texts):
            # every non-empty chunk gives at least one token (almost always): budget + 1 chunks decide a text
            ws = text.split(" ", budget + 1)
            ids: list[int] = []
            piece = None
            for j, w in enumerate(ws):  # noqa: B007 - j is read after the loop; the common case: one pass
                piece = get(w)
                if piece is None:
                    break
                ids += piece
                if len(ids) > budget:
                    break
            if piece is not None:
                self.lookups += j + 1
                out[row] = ids
                continue
            pending.append((row, ws, ids, j))
            # unseen chunks up to where a lower bound on the length (1 per unseen chunk) passes the budget,
            # so a long text does not send the words past its cut to the tokenizer
            n = len(ids)
            for k in range(j, len(ws)):
                w = ws[k]
                piece = get(w)
                if piece is None:
                    missing.add(w)
                    n += 1
                else:
                    n += len(piece)
                if n > budget:
                    break
            self.lookups += k + 1
        if pending:
            overflow = self._fill(missing)
            for row, ws, ids, j in pending:
                for w in ws[j:]:
                    piece = get(w)
                    if piece is None:
                        piece = overflow.get(w)
                    if piece is None:  # past the lower bound (only after chunks with no tokens)
                        piece = self.tok.encode(w, add_special_tokens=False).ids
                    ids += piece
                    if len(ids) > budget:
                        break
                out[row] = ids
        rows, n_truncated = [], 0
        for ids in out:
            if len(ids) > budget:
                n_truncated += 1
                ids = ids[:budget]
            rows.append(self.prefix + ids + self.suffix)
        return rows, n_truncated

    def stats(self) -> dict[str, float]:
        """Chunks looked up, distinct chunks encoded (misses), entries kept; hit rate = 1 - misses / lookups."""
        return {"entries": len(self.table), "lookups": self.lookups, "misses": self.misses,
                "hit_rate": 1.0 - self.misses / self.lookups if self.lookups else 0.0}


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
        word_cache: the most distinct chunks the word cache keeps per process (about 200 bytes each); 0 turns
            it off. 262,144 (~50 MB per loader worker) covers the frequent words of a language mixture; later
            chunks are encoded each time they appear, exactly as without the cache.
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
        word_cache: int = 262_144,
    ):
        if tokenizer.pad_token_id is None:
            raise ValueError("the tokenizer has no pad token")
        self.tokenizer = tokenizer
        self._prompt_lengths: dict[str, int] = {}
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
        self._word_cache: _WordCache | None = None
        self._verified: set[int] = set()
        if backend is not None and word_cache > 0:
            self._word_cache, why = _WordCache.create(backend.to_str(), word_cache)
            if self._word_cache is None:
                log.info("word cache off: %s", why)

    def word_cache_stats(self) -> dict[str, float] | None:
        """Entries, lookups, misses and hit rate of the word cache in this process; ``None`` when it is off."""
        return None if self._word_cache is None else self._word_cache.stats()

    # ------------------------------------------------------------------ encoding
    def _encode(self, texts: Sequence[str], max_length: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        cache = self._word_cache
        if cache is not None and max_length in self._backends and max_length > len(cache.prefix) + len(cache.suffix):
            rows, n_truncated = self._encode_cached(texts, max_length)
        elif max_length in self._backends:
            rows, n_truncated = self._encode_fast(texts, max_length)
        else:
            rows, n_truncated = self._encode_python(texts, max_length)
        return (*self._pad(rows, max_length), n_truncated)

    def _encode_cached(self, texts: Sequence[str], max_length: int) -> tuple[list[list[int]], int]:
        rows, n_truncated = self._word_cache.encode(texts, max_length)
        if max_length not in self._verified:  # the first batch of each length: compare with the Rust path
            ref_rows, ref_truncated = self._encode_fast(texts, max_length)
            bad = next((i for i, (a, b) in enumerate(zip(rows, ref_rows, strict=True)) if a != b), None)
            if bad is not None or ref_truncated != n_truncated:
                where = f"on {texts[bad][:80]!r}" if bad is not None else "in the truncation count"
                log.warning("word cache off: it differs from the tokenizer %s", where)
                self._word_cache = None
                return ref_rows, ref_truncated
            self._verified.add(max_length)
        return rows, n_truncated

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
        if all("query_prompt" in it for it in items):  # the prompts' token counts, for pooling without them
            q_len = [self.prompt_length(it["query_prompt"]) for it in items]
            p_len = [self.prompt_length(it["passage_prompt"]) for it in items]
            batch["query_prompt_length"] = torch.tensor(q_len, dtype=torch.long)
            batch["passage_prompt_length"] = torch.tensor(p_len, dtype=torch.long).repeat_interleave(group)
        return batch

    def prompt_length(self, prompt: str) -> int:
        """The tokens ``prompt`` takes at the start of a text (:func:`~me5.prompts.prompt_token_count`),
        memoised per prompt."""
        n = self._prompt_lengths.get(prompt)
        if n is None:
            n = self._prompt_lengths[prompt] = prompt_token_count(self.tokenizer, prompt)
        return n
