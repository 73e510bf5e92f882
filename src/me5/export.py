"""Export an :class:`~me5.models.encoder.Encoder` as a Hugging Face folder that sentence-transformers also loads.

The folder holds the backbone and tokenizer (``transformers.AutoModel.from_pretrained(out_dir)``), the
sentence-transformers modules (Transformer -> Pooling -> Normalize) with the model's prompts, and ``me5.json``
(pooling, normalisation, prefixes and run metadata) that ``python -m me5.evaluate`` reads.

The saved checkpoint holds every weight that plain ``AutoModel.from_pretrained(out_dir)`` builds, pooler head
included (bert, roberta, xlm-roberta): the checkpoint's own pooler when the encoder was loaded from one, else a
zero one. me5 never uses the pooler (it pools ``last_hidden_state``: mean, cls or last token); it is written so
that a reload reports no freshly initialised weights and gives a deterministic ``pooler_output``.

The sentence-transformers files use the long-standing layout that the published mE5 checkpoints use
(``sentence_transformers.models.*`` module types, ``pooling_mode_*`` flags): sentence-transformers 6 maps it
to its new classes without warnings, and older releases (2.x-5.x) read it too.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Any

import torch

from me5.errors import ConfigError
from me5.jsonio import write_json
from me5.models.encoder import model_max_length, position_limit
from me5.models.pooling import POOLER_MODEL_TYPES
from me5.models.saved import ME5_CONFIG
from me5.prompts import PromptPolicy

log = logging.getLogger(__name__)


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


def export_encoder(
    encoder,
    tokenizer,
    out_dir: str | Path,
    *,
    prompts: PromptPolicy,
    instruction: str | None = None,
    max_seq_length: int | None = None,
    extra_metadata: dict[str, Any] | None = None,
) -> Path:
    """Write ``encoder`` + ``tokenizer`` to ``out_dir``; returns the folder.

    ``prompts`` (required) is the model's :class:`~me5.prompts.PromptPolicy`; ``instruction`` the task of the
    instruct policy's query prompt (default: the generic web-search retrieval task).
    ``SentenceTransformer(out_dir).encode(texts, prompt_name="query")`` then equals
    ``me5.embed.encode.encode_texts(encoder, tokenizer, texts, prefix=prompts.query(...))``
    (``"passage"``/``"document"`` likewise: the document prompt), and plain ``encode(texts)`` uses the query
    prompt (``PromptPolicy.sentence_transformers``).
    ``max_seq_length`` is sentence-transformers' truncation length (``me5.json`` records it too): by default
    (None) the model's own limit, the smaller of ``tokenizer.model_max_length`` and the backbone's usable
    positions (512 for XLM-R), not any training length; an explicit value is capped at the positions.
    ``extra_metadata`` (git sha, resolved config, ...) goes to ``me5.json`` as is (non-JSON values as strings).
    """
    if encoder.pooling not in _ST_POOLING:
        raise ConfigError(
            "model.encoder.pooling", f"'{encoder.pooling}' has no sentence-transformers equivalent"
        )
    st_prompts = prompts.sentence_transformers(instruction)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    backbone = encoder.backbone
    config = backbone.config
    if max_seq_length is None:
        max_seq_length = model_max_length(config, tokenizer)
    else:
        max_seq_length = _cap_length(config, max_seq_length)

    state_dict = None
    pooler = _pooler_state(encoder)
    if pooler is not None:
        state_dict = {**backbone.state_dict(), **pooler}
    backbone.save_pretrained(out, state_dict=state_dict)
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
    write_json(out / "modules.json", modules, indent=2, default=str)

    pooling = {"word_embedding_dimension": int(config.hidden_size)}
    pooling.update({flag: flag == _ST_POOLING[encoder.pooling] for flag in _ST_POOLING_FLAGS})
    # mE5 pools over the prompt tokens too; include_prompt=False (GritLM-style) leaves the same tokens out as me5
    pooling["include_prompt"] = bool(getattr(encoder, "include_prompt", True))
    (out / "1_Pooling").mkdir(exist_ok=True)
    write_json(out / "1_Pooling" / "config.json", pooling, indent=2, default=str)

    # no model_args: the checkpoint has the pooler that AutoModel builds by default (add_pooling_layer=False
    # would make transformers list it as UNEXPECTED); sentence-transformers pools token embeddings anyway
    write_json(out / "sentence_bert_config.json", {"max_seq_length": max_seq_length, "do_lower_case": False},
               indent=2, default=str)

    write_json(
        out / "config_sentence_transformers.json",
        {
            "__version__": _versions(),
            "model_type": "SentenceTransformer",
            **st_prompts,
            "similarity_fn_name": "cosine" if encoder.normalize else "dot",
        },
        indent=2,
        default=str,
    )
    write_json(
        out / ME5_CONFIG,
        {
            "pooling": encoder.pooling,
            "normalize": bool(encoder.normalize),
            "include_prompt": bool(getattr(encoder, "include_prompt", True)),
            "prompts": prompts.to_dict(),
            "query_prefix": st_prompts["prompts"]["query"],
            "passage_prefix": st_prompts["prompts"]["passage"],
            "max_seq_length": max_seq_length,
            "versions": _versions(),
            "metadata": extra_metadata or {},
        },
        indent=2,
        default=str,
    )
    log.info("exported encoder to %s", out)
    return out


def _cap_length(config, max_seq_length: int) -> int:
    limit = position_limit(config)
    if limit is not None and max_seq_length > limit:
        log.info(
            "max_seq_length %d exceeds the backbone's %d positions; using %d", max_seq_length, limit, limit
        )
        return limit
    return max_seq_length


def _pooler_state(encoder) -> dict[str, torch.Tensor] | None:
    """The ``pooler.*`` tensors to add to the saved backbone, or None when there is nothing to add.

    The checkpoint's own pooler when ``Encoder.from_pretrained`` kept one (``encoder.pooler_state``), else zeros:
    a from-scratch model never had one, and me5 never uses it (it pools ``last_hidden_state``); zeros are
    deterministic where a fresh ``AutoModel`` pooler would be random, and they make ``pooler_output`` plainly
    meaningless (tanh(0) = 0) rather than plausible noise.
    """
    backbone = encoder.backbone
    config = backbone.config
    if config.model_type not in POOLER_MODEL_TYPES or getattr(backbone, "pooler", None) is not None:
        return None  # no pooler in this architecture, or the backbone's own is in its state dict already
    ref = backbone.get_input_embeddings().weight
    state = getattr(encoder, "pooler_state", None)
    if state is None:
        dim = int(config.hidden_size)
        state = {"pooler.dense.weight": torch.zeros(dim, dim), "pooler.dense.bias": torch.zeros(dim)}
    return {k: v.detach().to(device=ref.device, dtype=ref.dtype) for k, v in state.items()}


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for pkg in ("me5", "transformers", "torch"):
        with contextlib.suppress(PackageNotFoundError):  # a package run from a source tree has no metadata
            out["pytorch" if pkg == "torch" else pkg] = version(pkg)
    return out
