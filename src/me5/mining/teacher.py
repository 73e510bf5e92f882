"""Cross-encoder teacher scores for stage-2 distillation, written into stage-2 shards.

mE5 distils a cross-encoder into the bi-encoder in fine-tuning (arXiv 2402.05672 §2; E5's
``D_KL(p_ce || p_stu)``, :class:`~me5.losses.kd.KLDistillation`) without naming the teacher [U]. Any Hugging
Face cross-encoder that ``AutoModelForSequenceClassification`` loads with **one** output logit serves; the
documented multilingual default is ``BAAI/bge-reranker-v2-m3`` (XLM-R-large body, 100+ languages; a choice of
ours, not the paper's). The teacher scores are that raw logit (no sigmoid): the KD loss softmaxes them over
each query's group (``teacher_temperature`` 1.0 uses them as logits, as SimLM does).

:class:`CrossEncoderScorer` scores ``(query, passage)`` pairs: each pair tokenised once as the model's pair
input (``[CLS] q [SEP] p [SEP]`` / ``<s> q </s></s> p </s>``; ``longest_first`` truncation at ``max_length``, as
sentence-transformers' ``CrossEncoder``), sorted by length and cut into token-budget batches by
:func:`me5.embed.encode.plan_batches` (the encoder's batching), under bf16 autocast on CUDA (fp32 elsewhere);
scores come back in input order, whatever the batching.

:func:`score_records` writes each record's scores (``teacher_scores``: the positive first, then its negatives,
as :class:`~me5.data.schema.PairExample` says) into shards of the prepared layout, resumable and shared out over
processes exactly as :func:`me5.mining.mine.mine` writes its shards (:class:`~me5.mining.output.ShardedOutput`;
``score_stats.json`` beside ``shards.json``).
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import os
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch

from me5.data.schema import PairExample
from me5.embed.encode import (
    PRECISIONS,
    effective_precision,
    model_digest,
    plan_batches,
    round_up,
    tokenizer_digest,
)
from me5.errors import ConfigError
from me5.mining.output import (
    FORMAT,
    JobResult,
    ShardedOutput,
    format_counts,
    records_digest,
    resolve_world,
    run_digest,
)

log = logging.getLogger(__name__)

DEFAULT_TEACHER = "BAAI/bge-reranker-v2-m3"
DEFAULT_MAX_LENGTH = 512  # FlagEmbedding's reranker default (the model itself takes 8192)
_TOKENIZE_CHUNK = 65536  # pairs tokenised at a time


def check_cross_encoder(name_or_path: str, *, field: str = "score.model") -> int:
    """The cross-encoder's number of outputs, read from its config (no weights); anything but one logit is a
    :class:`ConfigError` naming the model and ``field``."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(str(name_or_path))
    except Exception as err:  # OSError (no such repo / folder), ValueError (unknown model type) ...
        raise ConfigError(field, f"cannot load the cross-encoder config of '{name_or_path}' ({type(err).__name__}: "
                          f"{err})") from err
    n = int(getattr(config, "num_labels", 0) or 0)
    if n != 1:
        raise ConfigError(field, f"'{name_or_path}' has {n} outputs (num_labels={n}, "
                          f"{(config.architectures or ['?'])[0]}); teacher scores need a cross-encoder with one "
                          f"relevance logit (AutoModelForSequenceClassification, num_labels=1, e.g. {DEFAULT_TEACHER})")
    return n


class CrossEncoderScorer:
    """Scores ``(query, passage)`` pairs with a sequence-classification model's single logit (module docstring).

    Args:
        model, tokenizer: an ``AutoModelForSequenceClassification`` with ``num_labels == 1`` and its tokenizer.
        max_length: tokens per pair (``longest_first`` truncation).
        max_tokens, max_batch: padded tokens and rows per forward (default budget: ``max_batch`` rows of
            ``max_length``).
        precision: ``bf16`` (default), ``fp16`` or ``fp32``: the CUDA autocast dtype; fp32 on other devices.
        name: the model's name in messages and the run key.
    """

    def __init__(self, model, tokenizer, *, max_length: int = DEFAULT_MAX_LENGTH, max_tokens: int | None = None,
                 max_batch: int = 128, precision: str = "bf16", device: torch.device | str | None = None,
                 name: str | None = None, field: str = "score.model"):
        self.name = name or getattr(model, "name_or_path", None) or type(model).__name__
        self.field = field
        n = int(getattr(model.config, "num_labels", 0) or 0)
        if n != 1:
            raise ConfigError(field, f"'{self.name}' has {n} outputs (num_labels={n}); teacher scores need one "
                              "relevance logit")
        if max_length < 2 or max_batch < 1:
            raise ConfigError("score.max_length", f"need max_length >= 2 and max_batch >= 1, got {max_length}, "
                              f"{max_batch}")
        if tokenizer.pad_token_id is None:
            raise ConfigError(field, f"the tokenizer of '{self.name}' has no pad token")
        self.device = torch.device(device) if device is not None else next(iter(model.parameters())).device
        self.model = model.to(self.device).eval()
        self.tokenizer = tokenizer
        self.max_length = int(max_length)
        self.max_batch = int(max_batch)
        self.max_tokens = int(max_tokens) if max_tokens is not None else self.max_batch * round_up(self.max_length, 8)
        self.precision = effective_precision(precision, self.device)
        # segment ids go in when the tokenizer makes them by default (BERT-style cross-encoders), as HF pipelines
        # and sentence-transformers do; XLM-R rerankers (bge-reranker) have none
        self._types = ("token_type_ids" in getattr(tokenizer, "model_input_names", ())
                       and "token_type_ids" in inspect.signature(self.model.forward).parameters)

    @classmethod
    def from_pretrained(cls, name_or_path: str, *, device: torch.device | str | None = None,
                        field: str = "score.model", **kwargs) -> CrossEncoderScorer:
        """Load a cross-encoder by hub id or folder (its config checked first: :func:`check_cross_encoder`)."""
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        check_cross_encoder(name_or_path, field=field)
        tokenizer = AutoTokenizer.from_pretrained(str(name_or_path))
        model = AutoModelForSequenceClassification.from_pretrained(str(name_or_path))
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        return cls(model, tokenizer, device=device, name=str(name_or_path), field=field, **kwargs)

    def fingerprint(self) -> dict:
        """What the scores depend on: weights, tokenizer, length, precision."""
        return {"name": self.name, "model": model_digest(self.model), "tokenizer": tokenizer_digest(self.tokenizer),
                "max_length": self.max_length, "precision": self.precision}

    def _autocast(self):
        dtype = PRECISIONS[self.precision]
        return torch.autocast("cuda", dtype=dtype) if dtype is not None else contextlib.nullcontext()

    @torch.no_grad()
    def score(self, queries: Sequence[str], passages: Sequence[str], *, show_progress: bool = False,
              desc: str = "score") -> np.ndarray:
        """(N,) float32 logits of the pairs ``(queries[i], passages[i])``, in input order."""
        from tqdm.auto import tqdm

        if len(queries) != len(passages):
            raise ValueError(f"{len(queries)} queries for {len(passages)} passages")
        out = np.empty(len(queries), dtype=np.float32)
        pad_id = int(self.tokenizer.pad_token_id)
        left = getattr(self.tokenizer, "padding_side", "right") == "left"
        with tqdm(total=len(queries), desc=desc, disable=not show_progress, leave=False) as bar:
            for c0 in range(0, len(queries), _TOKENIZE_CHUNK):
                enc = self.tokenizer(list(queries[c0 : c0 + _TOKENIZE_CHUNK]), list(passages[c0 : c0 + _TOKENIZE_CHUNK]),
                                     truncation="longest_first", max_length=self.max_length,
                                     return_token_type_ids=self._types, return_attention_mask=False)
                ids = enc["input_ids"]
                types = enc.get("token_type_ids") if self._types else None
                for batch in plan_batches([len(r) for r in ids], max_tokens=self.max_tokens, max_batch=self.max_batch):
                    width = round_up(len(ids[batch[0]]), 8)
                    x = torch.full((len(batch), width), pad_id, dtype=torch.long)
                    mask = torch.zeros((len(batch), width), dtype=torch.long)
                    tt = torch.zeros((len(batch), width), dtype=torch.long) if types is not None else None
                    for j, i in enumerate(batch):
                        n = len(ids[i])
                        span = slice(width - n, width) if left else slice(0, n)
                        x[j, span] = torch.tensor(ids[i])
                        mask[j, span] = 1
                        if tt is not None:
                            tt[j, span] = torch.tensor(types[i])
                    kwargs = {"token_type_ids": tt.to(self.device)} if tt is not None else {}
                    with self._autocast():
                        logits = self.model(input_ids=x.to(self.device), attention_mask=mask.to(self.device),
                                            **kwargs).logits
                    if logits.ndim != 2 or logits.shape[1] != 1:
                        raise ConfigError(self.field, f"'{self.name}' returned logits of shape {tuple(logits.shape)};"
                                          " teacher scores need one relevance logit per pair")
                    out[c0 + np.asarray(batch)] = logits[:, 0].float().cpu().numpy()
                    bar.update(len(batch))
        return out


# ============================================================================================== the driver
@dataclass
class ScoreOptions:
    """What :func:`score_records` writes (the ``me5.score`` flags of the same names)."""

    shard_rows: int = 100_000  # records per output shard (me5.prepare's default)
    row_group_rows: int = 10_000
    seed: int = 0  # the row shuffle of each shard
    split_langs: bool = False
    max_shards: int | None = None  # write at most this many shards, then stop (resume later)

    def check(self) -> None:
        for name in ("shard_rows", "row_group_rows"):
            if int(getattr(self, name)) < 1:
                raise ConfigError(f"score.{name}", f"must be >= 1, got {getattr(self, name)}")


def score_records(records: Sequence[PairExample], scorer: CrossEncoderScorer, out_dir: str | os.PathLike, *,
                  options: ScoreOptions | None = None, name: str = "pairs", counts: Mapping[str, int] | None = None,
                  rank: int | None = None, world: int | None = None, overwrite: bool = False,
                  show_progress: bool = False) -> JobResult:
    """Score every record of this process's output shards and write them with their ``teacher_scores``.

    ``counts``: the read/skip counts of the source (summed into ``score_stats.json``). Records that carried
    teacher scores get the new ones (``records/rescored``).
    """
    from tqdm.auto import tqdm

    options = options or ScoreOptions()
    options.check()
    rank, world = resolve_world(rank, world)
    fields = {"options": {k: v for k, v in asdict(options).items() if k != "max_shards"},
              "teacher": scorer.fingerprint(), "records": records_digest(records)}
    key = run_digest({"kind": "score", "format": FORMAT, **fields})
    out = ShardedOutput(out_dir, kind="score", key=key, fields=fields, n_records=len(records),
                        shard_rows=options.shard_rows, rank=rank, world=world, overwrite=overwrite)
    todo = out.pending()
    skipped = len(out.own) - len(todo)
    if options.max_shards is not None:
        todo = todo[: max(0, int(options.max_shards))]
    written = 0
    with tqdm(total=len(todo), desc=f"score {name}", unit=" shard", disable=not (show_progress and rank == 0)) as bar:
        for k in todo:
            shard = [records[i] for i in out.ranges[k]]
            qs = [ex.query for ex in shard for _ in range(1 + len(ex.negatives))]
            ps = [p for ex in shard for p in (ex.positive, *ex.negatives)]
            scores = scorer.score(qs, ps, show_progress=show_progress and rank == 0, desc=f"shard {k}")
            exs, a = [], 0
            for ex in shard:
                g = 1 + len(ex.negatives)
                exs.append(replace(ex, teacher_scores=tuple(float(s) for s in scores[a : a + g])))
                a += g
            c = Counter({"records": len(shard), "pairs": len(ps),
                         "records/rescored": sum(ex.teacher_scores is not None for ex in shard)})
            out.write(k, exs, c, row_group_rows=options.row_group_rows, seed=options.seed,
                      split_langs=options.split_langs)
            written += 1
            bar.update(1)
    stats = out.finish(name=name, counts=counts or {}, extra={"teacher": scorer.name, "max_length": scorer.max_length,
                                                              "precision": scorer.precision})
    if stats is not None:
        log.info("%s: scoring done (%d records, %d shards)\n%s", Path(out_dir), stats["rows"], stats["shards"],
                 format_counts(stats["counts"]))
    pending = 0 if stats is not None else len(out.pending())
    return JobResult(Path(out_dir), rank, world, written, skipped, pending, stats is not None, stats)
