"""Bitext mining (BUCC 2018, Tatoeba) with mteb's semantics, read from mteb's published layouts in a local folder.

**What is scored** (mteb 2.26, ``mteb/_evaluators/text/bitext_mining_evaluator.py`` and
``mteb/abstasks/text/bitext_mining.py``; the paper's mteb 1.0.2 did the same): every source sentence (mteb's
``sentence1`` column) takes its top-1 cosine neighbour among all target sentences (``sentence2``); there is no
margin scoring and no threshold. With ``labels[i]`` the gold target of source ``i`` and ``predictions[i]`` its
neighbour, the metrics are scikit-learn's ``precision_score`` / ``recall_score`` / ``f1_score`` with
``average="weighted", zero_division=0`` and ``accuracy_score``. mteb's main score is ``f1`` for BUCC, BUCC.v2
and Tatoeba. (Weighted recall equals accuracy; F1 differs from accuracy when several sources share a neighbour.)

**Layouts** (per language pair, split ``test``), detected from the first record:

* *lists* -- ``mteb/BUCC`` (mteb task ``BUCC``, the paper's setting; also ``mteb/bucc-bitext-mining`` before
  2024, revision ``d51519689f``): one record with ``sentence1`` (all source sentences), ``sentence2`` (all target
  sentences) and ``gold`` (1-based ``[source, target]`` pairs). As mteb's ``BUCCBitextMining.dataset_transform``:
  the sources are ``sentence1[i]`` for each gold pair in gold order (a source in two pairs is searched twice) and
  each is searched among **all** of ``sentence2``.
* *rows* -- ``mteb/bucc-bitext-mining`` (task ``BUCC.v2``, gold pairs only: each source is searched among the
  gold targets) and ``mteb/tatoeba-bitext-mining`` (task ``Tatoeba``): one record per aligned pair,
  ``sentence1``, ``sentence2`` and optionally ``lang``; row ``i``'s gold target is row ``i``'s ``sentence2``.
  Rows whose ``lang`` names another pair are left out (mteb's ``fast_load`` groups rows by ``lang``).

The files of pair ``P`` are the first of these that exist under ``data_dir`` (``.jsonl.gz``, ``.jsonl``,
``.json.gz``, ``.json`` (all JSON lines) or ``.parquet``): ``test/P.*`` (the current hub layout of both
datasets), ``P/test.*`` (the older one), ``P/test-*.*`` (``push_to_hub`` shards, ``mteb/BUCC``), ``P/test/*.*``
and ``P/*-test.*`` (the hub's parquet conversions). A downloaded dataset folder
(``huggingface-cli download mteb/BUCC --repo-type dataset --local-dir ...``) is a valid ``data_dir`` as it is.

**Directions.** ``forward`` is mteb's (``sentence1`` -> ``sentence2``: xx -> en for BUCC, xxx -> eng for
Tatoeba). ``backward`` searches the other way (eng -> xxx; a *lists* pair then searches each gold target among
all of ``sentence1``); its pairs are named the other way round (``eng-deu``).

**Prompts.** Bitext is symmetric: every sentence gets the policy's query prompt for :data:`TASKS` ``"bitext"``
(E5: the query prefix; instruct: the bitext instruction, as mteb's ``abstask_prompt``; none: nothing).
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from me5.data.readers import iter_jsonl, iter_parquet
from me5.embed.encode import encode_texts
from me5.embed.search import exact_search
from me5.errors import ConfigError, DataError
from me5.prompts import PromptPolicy, task_instruction

log = logging.getLogger(__name__)

#: the language pairs of mteb's tasks, in mteb's order (``BUCC`` / ``BUCC.v2``; ``Tatoeba``: 112 xxx-eng pairs)
TASK_PAIRS: dict[str, tuple[str, ...]] = {
    "bucc": ("de-en", "fr-en", "ru-en", "zh-en"),
    "tatoeba": tuple(
        f"{lang}-eng"
        for lang in (
            "sqi fry kur tur deu nld ron ang ido jav isl slv cym kaz est heb gla mar lat bel pms gle pes nob bul "
            "cbk hun uig rus spa hye tel afr mon arz hrv nov gsw nds ukr uzb lit ina lfn zsm ita cmn lvs glg ceb "
            "bre ben swg arq kab fra por tat oci pol war aze vie nno cha mhr dan ell amh pam hsb srp epo kzj awa "
            "fao mal ile bos cor cat eus yue swe dtp kat jpn csb xho orv ind tuk max swh hin dsb ber tam slk tgl "
            "ast mkd khm ces tzl urd ara kor yid fin tha wuu"
        ).split()
    ),
}
#: where each task is published on the Hugging Face hub, and the revision mteb 2.26 pins
HUB_DATASETS: dict[str, dict[str, str]] = {
    "BUCC": {"path": "mteb/BUCC", "revision": "414572247440f0ccacf7eb0bb70a31533a0e5443"},
    "BUCC.v2": {"path": "mteb/bucc-bitext-mining", "revision": "1739dc11ffe9b7bfccd7f3d585aeb4c544fc6677"},
    "Tatoeba": {"path": "mteb/tatoeba-bitext-mining", "revision": "69e8f12da6e31d59addadda9a9c8a2e601a0e282"},
}
DIRECTIONS = ("forward", "backward")
METRICS = ("precision", "recall", "f1", "accuracy")
SUFFIXES = (".jsonl.gz", ".jsonl", ".json.gz", ".json", ".parquet")
# file name patterns of one pair, in the order they are tried ({p}: pair, {s}: split; a suffix is appended)
_PATTERNS = ("{s}/{p}", "{p}/{s}", "{p}/{s}-*", "{p}/{s}/*", "{p}/*-{s}")


@dataclass
class BitextPair:
    """One language pair to mine: each of ``sources`` is searched among ``targets``; ``gold[i]`` is the index in
    ``targets`` of source ``i``'s translation. ``name`` is the pair as searched (``de-en``; ``en-de`` backward),
    ``layout`` is ``lists`` or ``rows`` (see the module docstring), ``files`` what it was read from."""

    name: str
    sources: list[str]
    targets: list[str]
    gold: list[int]
    layout: str = "rows"
    files: list[Path] = field(default_factory=list, compare=False)

    def __post_init__(self):
        if len(self.gold) != len(self.sources):
            raise ValueError(f"{self.name}: {len(self.sources)} sources but {len(self.gold)} gold targets")
        if not self.sources:
            raise ValueError(f"{self.name}: no source sentences")
        bad = next((g for g in self.gold if not 0 <= g < len(self.targets)), None)
        if bad is not None:
            raise ValueError(f"{self.name}: gold target {bad} out of range for {len(self.targets)} targets")


# ---------------------------------------------------------------------------------------------- loading
def check_task(task: str, languages: Sequence[str] | None = None, direction: str = "forward") -> list[str]:
    """The pairs to evaluate (the task's, in mteb's order, or ``languages``); unknown values are a ConfigError."""
    if task not in TASK_PAIRS:
        raise ConfigError("eval.task", f"unknown bitext task '{task}'; choose one of {sorted(TASK_PAIRS)}")
    if direction not in DIRECTIONS:
        raise ConfigError("eval.direction", f"unknown direction '{direction}'; choose one of {list(DIRECTIONS)}")
    known = TASK_PAIRS[task]
    if languages is None:
        return list(known)
    if isinstance(languages, str):
        languages = [languages]
    unknown = [p for p in languages if p not in known]
    if unknown:
        raise ConfigError("eval.languages", f"{task} has no pairs {unknown}; its pairs are {list(known)}")
    if not languages:
        raise ConfigError("eval.languages", "an empty list of pairs")
    return list(dict.fromkeys(languages))


def load_bitext(
    data_dir: str | Path,
    *,
    task: str = "bucc",
    languages: Sequence[str] | None = None,
    split: str = "test",
    direction: str = "forward",
) -> dict[str, BitextPair]:
    """Read the pairs of ``task`` from a folder in mteb's published layout: {pair name as searched: pair}.

    Every requested pair must be there (``languages=None``: all pairs of the task); a missing pair, a missing
    column or a malformed value raises :class:`DataError` naming the folder, or the file, line and field.
    """
    pairs = check_task(task, languages, direction)
    root = Path(data_dir)
    if not root.is_dir():
        raise DataError("no such data folder", file=str(root))
    out: dict[str, BitextPair] = {}
    for pair in pairs:
        p = _load_pair(root, pair, split, direction)
        out[p.name] = p
    return out


def pair_files(root: Path, pair: str, split: str = "test") -> list[Path]:
    """The files holding ``pair`` under ``root`` (the first pattern and suffix that match); DataError if none."""
    for pattern in _PATTERNS:
        stem = pattern.format(p=pair, s=split)
        for suffix in SUFFIXES:
            files = sorted(f for f in root.glob(stem + suffix) if f.is_file())
            if files:
                return files
    looked = ", ".join(pattern.format(p=pair, s=split) + ".{jsonl.gz,jsonl,json.gz,json,parquet}"
                       for pattern in _PATTERNS[:3])
    have = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    hint = f"; folders here: {', '.join(have[:12])}{' ...' if len(have) > 12 else ''}" if have else ""
    raise DataError(
        f"no data for language pair '{pair}' (split '{split}'): looked for {looked} and the parquet "
        f"conversions {pair}/{split}/*, {pair}/*-{split}.*{hint}; pass languages= to evaluate fewer pairs",
        file=str(root / pair),
    )


def _records(files: Sequence[Path]) -> Iterator[tuple[Path, int, dict]]:
    for f in files:
        rows = iter_parquet(f) if f.name.endswith(".parquet") else iter_jsonl(f)
        for line, rec in rows:
            yield f, line, rec


def _load_pair(root: Path, pair: str, split: str, direction: str) -> BitextPair:
    files = pair_files(root, pair, split)
    records = _records(files)
    first = next(records, None)
    if first is None:
        raise DataError(f"no records for pair '{pair}'", file=str(files[0]))
    f, line, rec = first
    if "sentence1" not in rec:
        raise DataError(f"missing 'sentence1' (columns: {sorted(rec)})", file=str(f), line=line, field="sentence1")
    if isinstance(rec["sentence1"], list):
        return _from_lists(pair, first, records, files, direction)
    return _from_rows(pair, first, records, files, direction)


def _text(rec: dict, name: str, f: Path, line: int) -> str:
    value = rec.get(name)
    if not isinstance(value, str):
        what = f"missing '{name}'" if value is None else f"expected a string, got {type(value).__name__}"
        raise DataError(what, file=str(f), line=line, field=name)
    return value


def _from_rows(pair, first, records, files, direction) -> BitextPair:
    src: list[str] = []
    tgt: list[str] = []
    other: Counter[str] = Counter()
    for f, line, rec in _chain(first, records):
        lang = rec.get("lang")
        if lang is not None and lang != pair:
            other[str(lang)] += 1
            continue
        s1, s2 = _text(rec, "sentence1", f, line), _text(rec, "sentence2", f, line)
        src.append(s1)
        tgt.append(s2)
    if other:
        log.warning("%s: left out %d rows of other pairs (lang %s)", files[0], sum(other.values()), dict(other))
    if not src:
        raise DataError(f"no rows with lang '{pair}' (rows of {sorted(other)})", file=str(files[0]), field="lang")
    if direction == "backward":
        src, tgt = tgt, src
    return BitextPair(_named(pair, direction), src, tgt, list(range(len(src))), layout="rows", files=list(files))


def _from_lists(pair, first, records, files, direction) -> BitextPair:
    f, line, rec = first
    extra = next(records, None)
    if extra is not None:
        raise DataError(
            "a BUCC pair holds its sentences as lists in one record, but this pair has more than one record",
            file=str(extra[0]), line=extra[1],
        )
    lists = {}
    for name in ("sentence1", "sentence2"):
        value = rec.get(name)
        if not isinstance(value, list) or not all(isinstance(s, str) for s in value):
            what = f"missing '{name}'" if value is None else "expected a list of strings"
            raise DataError(what, file=str(f), line=line, field=name)
        lists[name] = value
    s1, s2 = lists["sentence1"], lists["sentence2"]
    gold = rec.get("gold")
    if not isinstance(gold, list) or not gold:
        what = "missing 'gold'" if gold is None else "expected a non-empty list of [source, target] pairs"
        raise DataError(f"{what} (1-based indices into sentence1 and sentence2)", file=str(f), line=line,
                        field="gold")
    pairs0: list[tuple[int, int]] = []
    for k, g in enumerate(gold):
        ok = isinstance(g, (list, tuple)) and len(g) == 2 and all(isinstance(x, int) and not isinstance(x, bool)
                                                                    for x in g)
        if not ok or not (1 <= g[0] <= len(s1) and 1 <= g[1] <= len(s2)):
            raise DataError(
                f"gold[{k}] = {g!r} is not a 1-based [source, target] pair within {len(s1)} sources and "
                f"{len(s2)} targets", file=str(f), line=line, field="gold",
            )
        pairs0.append((g[0] - 1, g[1] - 1))
    if direction == "forward":  # mteb's BUCC transform: sentence1[i] per gold pair, searched among all targets
        src, tgt, labels = [s1[i] for i, _ in pairs0], s2, [j for _, j in pairs0]
    else:
        src, tgt, labels = [s2[j] for _, j in pairs0], s1, [i for i, _ in pairs0]
    return BitextPair(_named(pair, direction), src, list(tgt), labels, layout="lists", files=list(files))


def _chain(first, rest):
    yield first
    yield from rest


def _named(pair: str, direction: str) -> str:
    return pair if direction == "forward" else "-".join(reversed(pair.split("-")))


# ---------------------------------------------------------------------------------------------- scoring
def nearest_targets(
    source_SD: Tensor, target_TD: Tensor, *, device: torch.device | str | None = None
) -> list[int]:
    """The index of each source's top-1 cosine neighbour among the targets (mteb's ``_similarity_search``).

    Cosine in float32 (both sides L2-normalised, as mteb's ``cos_sim``); an exact tie goes to the lower target
    index (what ``torch.topk(k=1)`` in mteb's evaluator returns on CPU; mteb does not define it).
    """
    if source_SD.ndim != 2 or target_TD.ndim != 2 or source_SD.size(1) != target_TD.size(1):
        raise ValueError(f"need (S, D) and (T, D) embeddings, got {tuple(source_SD.shape)} and {tuple(target_TD.shape)}")
    if target_TD.size(0) == 0:
        raise ValueError("no target embeddings")
    src = F.normalize(source_SD.float(), p=2, dim=1)
    tgt = F.normalize(target_TD.float(), p=2, dim=1)
    _, idx = exact_search(src, tgt, 1, device=device if device is not None else src.device)
    return idx[:, 0].tolist()


def mining_metrics(predictions: Sequence[int], gold: Sequence[int]) -> dict[str, float]:
    """mteb's bitext metrics of predicted vs gold target indices: scikit-learn's weighted precision, recall and
    F1 (``average="weighted", zero_division=0``: per gold label, weighted by its count in ``gold``; a label only
    predicted weighs nothing) and accuracy."""
    if len(predictions) != len(gold):
        raise ValueError(f"{len(predictions)} predictions for {len(gold)} gold labels")
    if not gold:
        raise ValueError("no gold labels")
    n = len(gold)
    support = Counter(gold)
    predicted = Counter(predictions)
    hits = Counter(g for g, p in zip(gold, predictions, strict=True) if g == p)
    labels = sorted(support)
    precision = sum(support[lb] * (hits[lb] / predicted[lb] if predicted[lb] else 0.0) for lb in labels) / n
    recall = sum(support[lb] * (hits[lb] / support[lb]) for lb in labels) / n
    f1 = sum(support[lb] * (2 * hits[lb] / (support[lb] + predicted[lb])) for lb in labels) / n
    accuracy = sum(hits.values()) / n
    return {"precision": float(precision), "recall": float(recall), "f1": float(f1), "accuracy": float(accuracy)}


def score_bitext(
    source_SD: Tensor, target_TD: Tensor, gold: Sequence[int], *, device: torch.device | str | None = None
) -> dict[str, float]:
    """Metrics of one pair from fixed embeddings: top-1 cosine mining, then :func:`mining_metrics`."""
    if source_SD.size(0) != len(gold):
        raise ValueError(f"{source_SD.size(0)} source embeddings for {len(gold)} gold targets")
    return mining_metrics(nearest_targets(source_SD, target_TD, device=device), gold)


# ---------------------------------------------------------------------------------------------- evaluator
class BitextEvaluator:
    """Embeds each pair's sentences with an :class:`~me5.models.encoder.Encoder` and scores top-1 mining.

    Args:
        data: a folder in mteb's published layout (see the module docstring) or pairs from :func:`load_bitext`.
        task: ``bucc`` or ``tatoeba`` (which pairs exist, and the default ``name``).
        prompts: the model's :class:`~me5.prompts.PromptPolicy` (required); every sentence gets
            ``prompts.query(TASKS["bitext"])``.
        languages: pairs in the task's forward naming (``de-en``, ``sqi-eng``); ``None``: all of the task's.
        split: the split's name in the layout (mteb evaluates ``test``).
        direction: ``forward`` (mteb's: xx -> en, xxx -> eng) or ``backward`` (en -> xx, eng -> xxx).
        name: prefix of the metric keys; default ``task`` forward and ``{task}_backward`` backward.
        batch_size, max_length: encoding batch size and truncation in tokens (mE5's MTEB runs: 512).

    ``evaluate`` returns ``{name}/{pair}/{metric}`` for ``precision``, ``recall``, ``f1`` (mteb's main score) and
    ``accuracy``, and ``{name}/{metric}``: their macro average over the pairs (the paper's BUCC and Tatoeba
    columns average the pairs' scores).
    """

    #: in a distributed job one rank evaluates (:func:`me5.eval.suite.evaluate_all`): the sets are small
    shares_ranks = False

    def __init__(
        self,
        data: str | Path | Mapping[str, BitextPair],
        *,
        task: str = "bucc",
        prompts: PromptPolicy,
        languages: Sequence[str] | None = None,
        split: str = "test",
        direction: str = "forward",
        name: str | None = None,
        batch_size: int = 128,
        max_length: int = 512,
    ):
        pairs = check_task(task, languages, direction)
        if batch_size < 1 or max_length < 1:
            raise ConfigError("eval.batch_size", f"need positive batch_size and max_length, got {batch_size}, {max_length}")
        self.task, self.direction, self.split = task, direction, split
        self.name = name or (task if direction == "forward" else f"{task}_{direction}")
        self.prompts = prompts
        self.prefix = self.prompts.query(task_instruction("bitext"))
        self.batch_size, self.max_length = batch_size, max_length
        if isinstance(data, Mapping):
            wanted = [_named(p, direction) for p in pairs] if languages is not None else list(data)
            missing = [p for p in wanted if p not in data]
            if missing:
                raise ConfigError("eval.languages", f"no data for {missing}; have {sorted(data)}")
            self.data = {p: data[p] for p in wanted}
        else:
            self.data = load_bitext(data, task=task, languages=pairs, split=split, direction=direction)

    @torch.no_grad()
    def evaluate(self, encoder, tokenizer, *, device=None, show_progress: bool = False) -> dict[str, float]:
        """Flat metrics: the macro averages ``{name}/{metric}`` then ``{name}/{pair}/{metric}`` per pair."""
        if device is None:  # search where the encoder lives (encode returns CPU tensors)
            param = next(iter(encoder.parameters()), None) if hasattr(encoder, "parameters") else None
            device = param.device if param is not None else torch.device("cpu")
        common = {
            "prefix": self.prefix, "max_length": self.max_length, "max_batch": self.batch_size,
            "device": device, "show_progress": show_progress,
        }
        per_pair: dict[str, dict[str, float]] = {}
        for pair_name, pair in self.data.items():
            src = encode_texts(encoder, tokenizer, pair.sources, desc=f"{self.name} {pair_name} sources", **common)
            tgt = encode_texts(encoder, tokenizer, pair.targets, desc=f"{self.name} {pair_name} targets", **common)
            per_pair[pair_name] = score_bitext(src, tgt, pair.gold, device=device)
        out = {f"{self.name}/{m}": _mean(v[m] for v in per_pair.values()) for m in METRICS}
        for pair_name, metrics in per_pair.items():
            out.update({f"{self.name}/{pair_name}/{m}": metrics[m] for m in METRICS})
        return out


def _mean(values: Iterable[float]) -> float:
    values = list(values)
    return float(sum(values) / len(values)) if values else math.nan
