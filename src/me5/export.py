"""Export an :class:`~me5.models.encoder.Encoder` as a Hugging Face folder that sentence-transformers also loads.

The folder holds the backbone and tokenizer (``transformers.AutoModel.from_pretrained(out_dir)``), the
sentence-transformers modules (Transformer -> Pooling -> Normalize) with the mE5 prompts, and ``me5.json``
(pooling, normalisation, prefixes and run metadata) that ``python -m me5.evaluate`` reads.

The sentence-transformers files use the long-standing layout that the published mE5 checkpoints use
(``sentence_transformers.models.*`` module types, ``pooling_mode_*`` flags): sentence-transformers 6 maps it
to its new classes without warnings, and older releases (2.x-5.x) read it too.
"""

from __future__ import annotations

import contextlib
import json
import logging
from pathlib import Path
from typing import Any

from me5.errors import ConfigError

log = logging.getLogger(__name__)

ME5_CONFIG = "me5.json"

# me5 pooling name -> sentence-transformers pooling flag
_ST_POOLING = {
    "mean": "pooling_mode_mean_tokens",
    "cls": "pooling_mode_cls_token",
    "last": "pooling_mode_lasttoken",
}
_ST_POOLING_FLAGS = (
    "pooling_mode_cls_token",
    "pooling_mode_mean_tokens",
    "pooling_mode_max_tokens",
    "pooling_mode_mean_sqrt_len_tokens",
    "pooling_mode_weightedmean_tokens",
    "pooling_mode_lasttoken",
)
# model types whose position ids start after the padding index (usable length = max_position_embeddings - pad - 1)
_OFFSET_POSITIONS = {"roberta", "xlm-roberta", "camembert", "xlm-roberta-xl"}
_NO_POOLER_TYPES = {"bert", "roberta", "xlm-roberta"}


def export_encoder(
    encoder,
    tokenizer,
    out_dir: str | Path,
    *,
    query_prefix: str = "query: ",
    passage_prefix: str = "passage: ",
    max_seq_length: int = 512,
    extra_metadata: dict[str, Any] | None = None,
) -> Path:
    """Write ``encoder`` + ``tokenizer`` to ``out_dir``; returns the folder.

    ``SentenceTransformer(out_dir).encode(texts, prompt_name="query")`` then equals
    ``encoder.encode(texts, tokenizer, prefix=query_prefix)`` (``"passage"``/``"document"`` likewise), and
    ``max_seq_length`` (capped at the backbone's position limit) is sentence-transformers' truncation length.
    ``extra_metadata`` (git sha, resolved config, ...) goes to ``me5.json`` as is (non-JSON values as strings).
    """
    if encoder.pooling not in _ST_POOLING:
        raise ConfigError(
            "model.encoder.pooling", f"'{encoder.pooling}' has no sentence-transformers equivalent"
        )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    backbone = encoder.backbone
    config = backbone.config
    max_seq_length = _cap_length(config, max_seq_length)

    backbone.save_pretrained(out)
    tokenizer.save_pretrained(out)

    modules = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"}]
    modules.append(
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}
    )
    if encoder.normalize:
        modules.append(
            {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"}
        )
        # Normalize has no config: an empty folder, as sentence-transformers writes it
        (out / "2_Normalize").mkdir(exist_ok=True)
    _write_json(out / "modules.json", modules)

    pooling = {"word_embedding_dimension": int(config.hidden_size)}
    pooling.update({flag: flag == _ST_POOLING[encoder.pooling] for flag in _ST_POOLING_FLAGS})
    pooling["include_prompt"] = True  # mE5 pools over the prefix tokens too
    (out / "1_Pooling").mkdir(exist_ok=True)
    _write_json(out / "1_Pooling" / "config.json", pooling)

    st_config: dict[str, Any] = {"max_seq_length": max_seq_length, "do_lower_case": False}
    if config.model_type in _NO_POOLER_TYPES and getattr(backbone, "pooler", None) is None:
        st_config["model_args"] = {"add_pooling_layer": False}  # else AutoModel adds a random, unused pooler
    _write_json(out / "sentence_bert_config.json", st_config)

    _write_json(
        out / "config_sentence_transformers.json",
        {
            "__version__": _versions(),
            "model_type": "SentenceTransformer",
            "prompts": {"query": query_prefix, "passage": passage_prefix, "document": passage_prefix},
            "default_prompt_name": None,
            "similarity_fn_name": "cosine" if encoder.normalize else "dot",
        },
    )
    _write_json(
        out / ME5_CONFIG,
        {
            "pooling": encoder.pooling,
            "normalize": bool(encoder.normalize),
            "query_prefix": query_prefix,
            "passage_prefix": passage_prefix,
            "max_seq_length": max_seq_length,
            "versions": _versions(),
            "metadata": extra_metadata or {},
        },
    )
    log.info("exported encoder to %s", out)
    return out


def _cap_length(config, max_seq_length: int) -> int:
    limit = getattr(config, "max_position_embeddings", None)
    if limit is None:
        return max_seq_length
    if config.model_type in _OFFSET_POSITIONS:
        limit -= (config.pad_token_id or 0) + 1
    if max_seq_length > limit:
        log.info(
            "max_seq_length %d exceeds the backbone's %d positions; using %d", max_seq_length, limit, limit
        )
        return limit
    return max_seq_length


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for pkg in ("me5", "transformers", "torch"):
        with contextlib.suppress(PackageNotFoundError):  # a package run from a source tree has no metadata
            out["pytorch" if pkg == "torch" else pkg] = version(pkg)
    return out


def _write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False, default=str) + "\n", encoding="utf-8")
