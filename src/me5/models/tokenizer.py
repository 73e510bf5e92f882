"""Tokenizers without a download: an XLM-R-style SentencePiece-Unigram trained locally, and a checked loader.

mE5 uses XLM-R's tokenizer (SentencePiece Unigram, 250k pieces). The ``tiny`` model trains the same kind
of tokenizer from the sample data with the ``tokenizers`` library, so the default run never touches the hub:

* NFKC normalisation (XLM-R's SentencePiece model uses NFKC as well), runs of spaces collapsed;
* ``Metaspace`` pre-tokenisation and decoding (``▁`` marks a word start, prepended to every text);
  punctuation is split off (SentencePiece does this with ``split_by_unicode_script``), each Han ideograph
  is its own pre-token and katakana runs are kept apart (see ``CJK_SPLIT``, the one departure from
  XLM-R's SentencePiece; without it a whole Chinese sentence is one pre-token);
* a ``Unigram`` model with XLM-R's special tokens and ids: ``<s>``=0, ``<pad>``=1, ``</s>``=2, ``<unk>``=3,
  then ``<mask>``=4 (XLM-R puts ``<mask>`` last; nothing here depends on its id);
* XLM-R's templates: ``<s> A </s>`` and ``<s> A </s></s> B </s>``.

The trainer is ``tokenizers``' ``UnigramTrainer`` with one work-around for small corpora (see
``_with_seed_markers``), so that frequent whole words become pieces as SentencePiece would make them.

The result is a ``transformers`` fast tokenizer saved with ``save_pretrained``, so
``AutoTokenizer.from_pretrained(folder)`` reloads it.
"""

from __future__ import annotations

import json
import logging
import os
import string
from collections.abc import Iterable, Iterator
from pathlib import Path

from me5.errors import ConfigError, DataError
from me5.jsonio import write_text
from me5.prompts import E5_DOCUMENT, E5_QUERY

log = logging.getLogger(__name__)

SPECIAL_TOKENS = ("<s>", "<pad>", "</s>", "<unk>", "<mask>")
# Always in the alphabet, so that English text, digits and punctuation never map to <unk>.
BASE_ALPHABET = sorted(set(string.ascii_letters + string.digits + string.punctuation))
# Han ideographs are split into one pre-token each (as BERT does), katakana runs are kept apart. Scripts
# without spaces otherwise turn whole sentences into single pre-tokens, and the vocabulary fills up with
# sentence fragments that glue words of the template to the content words.
CJK_SPLIT = r"[\x{3400}-\x{4dbf}\x{4e00}-\x{9fff}\x{f900}-\x{faff}\x{20000}-\x{2fa1f}]|[\x{30a0}-\x{30ff}\x{31f0}-\x{31ff}]+"  # Oniguruma syntax
# See _with_seed_markers: a private-use character, and for katakana words (kept as isolated runs by
# CJK_SPLIT, so a marker must itself be katakana to stay attached) the rare iteration mark "ヽ" (NFKC-stable).
_MARKER = "\ue000"
_KATAKANA_MARKER = "\u30fd"
_MARKERS = (_MARKER, _KATAKANA_MARKER)
# The E5 prompts (me5.prompts): fed to the trainer so that each becomes one or two pieces instead of letters.
E5_PREFIXES = (E5_QUERY, E5_DOCUMENT)
# Very large model_max_length is the transformers default ("no limit"); always set a real one.
DEFAULT_MAX_LENGTH = 512


def train_unigram_tokenizer(
    texts: Iterable[str],
    out_dir: str | os.PathLike,
    *,
    vocab_size: int = 8000,
    model_max_length: int = DEFAULT_MAX_LENGTH,
):
    """Train an XLM-R-style Unigram tokenizer on ``texts``, save it to ``out_dir`` and return it.

    Returns a ``transformers.PreTrainedTokenizerFast``; ``out_dir`` then holds ``tokenizer.json`` and
    ``tokenizer_config.json`` (and ``special_tokens_map.json``), loadable with ``AutoTokenizer``.
    """
    from tokenizers import (
        Regex,
        Tokenizer,
        decoders,
        models,
        normalizers,
        pre_tokenizers,
        processors,
        trainers,
    )
    from transformers import PreTrainedTokenizerFast

    if vocab_size < len(SPECIAL_TOKENS) + len(BASE_ALPHABET):
        raise ConfigError(
            "model.tokenizer.vocab_size", f"{vocab_size} is too small (special tokens + alphabet need more)"
        )
    if not (isinstance(model_max_length, int) and 0 < model_max_length < 1_000_000):
        raise ConfigError(
            "model.tokenizer.model_max_length", f"must be a positive integer, got {model_max_length!r}"
        )

    tok = Tokenizer(models.Unigram())
    tok.normalizer = normalizers.Sequence(
        [normalizers.NFKC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Strip()]
    )
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always"),
            pre_tokenizers.Punctuation(behavior="isolated"),
            pre_tokenizers.Split(Regex(CJK_SPLIT), behavior="isolated"),
        ]
    )
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    trainer = trainers.UnigramTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        unk_token="<unk>",
        initial_alphabet=BASE_ALPHABET,
        shrinking_factor=0.75,
        max_piece_length=16,
        n_sub_iterations=2,
        show_progress=False,
    )
    texts = [t for t in texts if t]
    if not texts:
        raise DataError("no training text for the tokenizer (the iterable was empty)")
    markers = _with_seed_markers(tok, texts)
    tok.train_from_iterator(texts + markers, trainer=trainer, length=len(texts) + len(markers))
    tok = _drop_marker(tok)
    tok = _canonical_scores(tok, texts)
    ids = {t: tok.token_to_id(t) for t in SPECIAL_TOKENS}
    assert ids == {t: i for i, t in enumerate(SPECIAL_TOKENS)}, f"unexpected special token ids {ids}"
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>",
        pair="<s> $A </s> </s> $B </s>",
        special_tokens=[("<s>", ids["<s>"]), ("</s>", ids["</s>"])],
    )
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        mask_token="<mask>",
        cls_token="<s>",
        sep_token="</s>",
        model_max_length=model_max_length,
    )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    hf.save_pretrained(str(out))
    log.info("trained a Unigram tokenizer (%d pieces) on %d texts -> %s", len(hf), len(texts), out)
    return hf


def _with_seed_markers(tok, texts: list[str]) -> list[str]:
    """Every distinct pre-token of ``texts`` once, with a private-use marker appended (to train on as well).

    ``tokenizers``' Unigram trainer seeds its vocabulary with substrings that occur at least twice in the
    list of *distinct* pre-tokens (words), unweighted by their counts. On a small vocabulary (the sample
    data has ~2k distinct words) a frequent word that is no substring of another word (``▁query``,
    ``▁teacher``) is then never a candidate and ends up spelled in letters. Adding ``word + marker`` makes
    every word a repeated substring; the EM and pruning still weigh pieces by the real counts (the marked
    copies count once each), and the marker piece is removed afterwards (:func:`_drop_marker`).
    Computed before training: the tokenizer cannot pre-tokenize while it is training (it would deadlock).
    """
    words: dict[str, None] = {}
    for text in texts:
        for word, _ in tok.pre_tokenizer.pre_tokenize_str(tok.normalizer.normalize_str(text)):
            words[word] = None
    return [word + (_KATAKANA_MARKER if "\u30a0" <= word[-1] <= "\u30fe" else _MARKER) for word in words]


def _drop_marker(tok):
    """Rebuild the trained tokenizer without the pieces that contain the seed marker."""
    from tokenizers import Tokenizer

    spec = json.loads(tok.to_str())
    vocab = spec["model"]["vocab"]
    unk = vocab[spec["model"]["unk_id"]][0]
    kept = [(p, s) for p, s in vocab if not any(m in p for m in _MARKERS)]
    spec["model"]["vocab"] = kept
    spec["model"]["unk_id"] = [p for p, _ in kept].index(unk)
    spec["added_tokens"] = [
        dict(t, id=[p for p, _ in kept].index(t["content"])) for t in spec.get("added_tokens", [])
    ]
    return Tokenizer.from_str(json.dumps(spec))


def _canonical_scores(tok, texts: list[str], *, iterations: int = 3):
    """Re-estimate the piece scores deterministically and order the pieces canonically.

    ``tokenizers``' Unigram trainer is not deterministic: two runs on the same text give the same pieces but
    scores that differ by up to ~0.03 and tie orders that differ (hash-map iteration, parallel float sums),
    so token ids and segmentations would change from run to run and a seeded run would not reproduce. Here
    the scores are recomputed from the piece set alone by hard EM (Viterbi segmentation with the current
    scores, then ``score = log(count / total)``), starting from uniform scores (fewest pieces), and the
    pieces are ordered by (score desc, piece) after the special tokens.
    """
    import math

    from tokenizers import Tokenizer

    spec = json.loads(tok.to_str())
    pieces = [p for p, _ in spec["model"]["vocab"]]
    normal = sorted(p for p in pieces if p not in SPECIAL_TOKENS)
    scores = dict.fromkeys(normal, -math.log(len(normal)))
    for _ in range(iterations):
        spec["model"]["vocab"] = [[p, 0.0] for p in SPECIAL_TOKENS] + [[p, scores[p]] for p in normal]
        spec["model"]["unk_id"] = SPECIAL_TOKENS.index("<unk>")
        spec["added_tokens"] = [dict(t, id=SPECIAL_TOKENS.index(t["content"])) for t in spec.get("added_tokens", [])]
        current = Tokenizer.from_str(json.dumps(spec))
        counts = dict.fromkeys(normal, 0)
        for enc in current.encode_batch(texts, add_special_tokens=False):
            for t in enc.tokens:
                if t in counts:
                    counts[t] += 1
        total = sum(counts.values()) + 0.5 * len(counts)
        # every piece keeps a small count, so a rare piece stays usable (never -inf)
        scores = {p: round(math.log((counts[p] + 0.5) / total), 6) for p in normal}
    normal.sort(key=lambda p: (-scores[p], p))
    spec["model"]["vocab"] = [[p, 0.0] for p in SPECIAL_TOKENS] + [[p, scores[p]] for p in normal]
    spec["added_tokens"] = [dict(t, id=SPECIAL_TOKENS.index(t["content"])) for t in spec.get("added_tokens", [])]
    return Tokenizer.from_str(json.dumps(spec))


def load_tokenizer(name_or_path: str | os.PathLike, *, model_max_length: int | None = None):
    """``AutoTokenizer.from_pretrained`` with a :class:`ConfigError` naming the path when it cannot be loaded.

    ``model_max_length`` overrides the saved value; when neither sets a real limit (transformers' ~1e30
    default), 512 is used so truncation works.
    """
    from transformers import AutoTokenizer

    kwargs = {} if model_max_length is None else {"model_max_length": int(model_max_length)}
    name = str(name_or_path)
    path = Path(name).expanduser()
    if not path.exists() and name.startswith((".", "/", "~")):
        raise ConfigError("model.tokenizer", f"no such tokenizer folder '{name}'")
    if path.is_dir() and not any((path / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json")):
        raise ConfigError(
            "model.tokenizer", f"'{name}' is a folder without tokenizer.json or tokenizer_config.json"
        )
    try:
        tok = AutoTokenizer.from_pretrained(str(path) if path.exists() else name, **kwargs)
    except (OSError, ValueError, KeyError) as err:
        first = str(err).splitlines()[0] if str(err) else ""
        raise ConfigError(
            "model.tokenizer",
            f"cannot load tokenizer '{name}': not a local tokenizer folder, and the hub is unreachable "
            f"(offline) or has no such model ({err.__class__.__name__}: {first})",
        ) from err
    if model_max_length is None and (tok.model_max_length is None or tok.model_max_length > 1_000_000):
        tok.model_max_length = DEFAULT_MAX_LENGTH
    return tok


def _sample_records(path: Path) -> Iterator[dict]:
    """The records of one of the generated sample files (``me5.data.synthetic`` writes them: one JSON object per
    line); read here without the data room, which the models room does not reach."""
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            if line.strip():
                yield json.loads(line)


def _sample_texts(data_dir: Path) -> Iterator[str]:
    """Every training text of the sample data, with the E5 prefixes the collator will add."""
    for name in ("pretrain.jsonl", "finetune.jsonl"):
        for rec in _sample_records(data_dir / name):
            yield E5_PREFIXES[0] + rec["query"]
            yield E5_PREFIXES[1] + rec["positive"]
            for neg in rec.get("negatives") or ():
                yield E5_PREFIXES[1] + neg


def ensure_sample_tokenizer(
    data_dir: str | os.PathLike,
    *,
    vocab_size: int = 8000,
    model_max_length: int = DEFAULT_MAX_LENGTH,
    check: bool = True,
):
    """The sample data's tokenizer in ``data_dir/tokenizer``: trained from the training files if absent.

    Idempotent: an existing tokenizer trained with the same settings from the same data (its manifest's
    parameters) is loaded, not retrained. With
    ``check``, a few texts in each script (Latin, Cyrillic, CJK, kana, Arabic, Devanagari) and the eval files
    (when present) must tokenize without ``<unk>``.
    """
    data_dir = Path(data_dir)
    tok_dir = data_dir / "tokenizer"
    marker = tok_dir / "me5_tokenizer.json"
    for name in ("pretrain.jsonl", "finetune.jsonl"):
        if not (data_dir / name).is_file():
            raise DataError(
                "sample data file missing; run me5.data.synthetic.generate_sample_data first",
                file=str(data_dir / name),
            )
    manifest = data_dir / "manifest.json"
    data_params = (
        json.loads(manifest.read_text(encoding="utf-8")).get("params") if manifest.is_file() else None
    )
    wanted = {
        "vocab_size": vocab_size,
        "model_max_length": model_max_length,
        "trained_from": ["pretrain.jsonl", "finetune.jsonl"],
        "data": data_params,  # retrain when the sample data was regenerated differently
    }
    tok = None
    if marker.is_file() and (tok_dir / "tokenizer.json").is_file():
        try:
            if json.loads(marker.read_text(encoding="utf-8")) == wanted:
                tok = load_tokenizer(tok_dir, model_max_length=model_max_length)
        except (json.JSONDecodeError, ConfigError):
            tok = None
    if tok is None:
        tok = train_unigram_tokenizer(
            _sample_texts(data_dir), tok_dir, vocab_size=vocab_size, model_max_length=model_max_length
        )
        write_text(marker, json.dumps(wanted) + "\n")
    if check:
        check_no_unk(tok, _script_samples(data_dir))
    return tok


SCRIPT_SAMPLES = {
    "Latin": E5_QUERY + "The teacher wants to buy three red apple in Paris.",
    "Cyrillic": E5_DOCUMENT + "Учитель хочет купить три красный яблоко в Париж.",
    "CJK": E5_DOCUMENT + "老师想在巴黎买三个红色的苹果。",
    "Kana": E5_DOCUMENT + "教師はパリで赤いリンゴを三つ買うつもりだ。",
    "Arabic": E5_DOCUMENT + "يريد معلم أن يشتري ثلاثة تفاحة أحمر في باريس.",
    "Devanagari": E5_DOCUMENT + "शिक्षक पेरिस में तीन लाल सेब खरीदना चाहता है।",
}


def _script_samples(data_dir: Path) -> list[str]:
    texts = list(SCRIPT_SAMPLES.values())
    eval_dir = data_dir / "eval"
    if (eval_dir / "queries.jsonl").is_file() and (eval_dir / "corpus.jsonl").is_file():
        texts += [E5_PREFIXES[0] + r["text"] for r in _sample_records(eval_dir / "queries.jsonl")]
        texts += [E5_PREFIXES[1] + r["title"] + " " + r["text"] for r in _sample_records(eval_dir / "corpus.jsonl")]
    return texts


def check_no_unk(tokenizer, texts: Iterable[str]) -> None:
    """Raise :class:`DataError` quoting the first text that tokenizes to ``<unk>``."""
    unk = tokenizer.unk_token_id
    texts = list(texts)
    for text, ids in zip(texts, tokenizer(texts, add_special_tokens=False)["input_ids"], strict=True):
        if unk in ids:
            pieces = tokenizer.convert_ids_to_tokens(ids)
            raise DataError(
                f"the tokenizer maps part of {text!r} to <unk> (pieces: {pieces})", field="tokenizer"
            )
