"""A saved model folder (an me5 export, a sentence-transformers folder, or a hub id): its settings and loading.

Pooling, normalisation, ``include_prompt`` and the prompt policy come from the folder's ``me5.json`` (written by
:func:`me5.export.export_encoder`), else from its sentence-transformers files (the policy whose prompts they
hold), else the mE5 defaults (mean pooling, unit vectors, prompts pooled, the E5 policy). Used by
``me5.evaluate``, ``me5.mine`` and the consistency filter, so a model is read the same way everywhere.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from me5.errors import ConfigError
from me5.prompts import PromptPolicy

DEFAULTS = {"pooling": "mean", "normalize": True, "include_prompt": True, "prompts": "e5"}
_FROM_ST_POOLING = {"mean": "mean", "cls": "cls", "lasttoken": "last"}
_ST_FLAG_POOLING = {
    "pooling_mode_mean_tokens": "mean",
    "pooling_mode_cls_token": "cls",
    "pooling_mode_lasttoken": "last",
}


def read_model_settings(model: str) -> dict[str, Any]:
    """Pooling / normalize / include_prompt / prompt style of a saved model: ``me5.json``, else
    sentence-transformers files, else defaults."""
    settings = dict(DEFAULTS)
    me5_cfg = _read_json(model, "me5.json")
    if me5_cfg is not None:
        settings.update({k: me5_cfg[k] for k in ("pooling", "normalize", "include_prompt") if k in me5_cfg})
        if "prompts" in me5_cfg:
            settings["prompts"] = PromptPolicy.from_dict(me5_cfg["prompts"]).style
        elif "query_prefix" in me5_cfg:  # folders exported before the prompt policy existed
            settings["prompts"] = PromptPolicy.infer(me5_cfg["query_prefix"], me5_cfg.get("passage_prefix", "")).style
        return settings
    modules = _read_json(model, "modules.json")
    if modules is None:
        return settings
    types = {m.get("type", "").rsplit(".", 1)[-1]: m.get("path", "") for m in modules}
    settings["normalize"] = "Normalize" in types
    if "Pooling" in types:
        pooling_cfg = _read_json(model, f"{types['Pooling']}/config.json") or {}
        settings["pooling"] = _pooling_from_st(pooling_cfg, model)
        settings["include_prompt"] = bool(pooling_cfg.get("include_prompt", True))
    prompts = (_read_json(model, "config_sentence_transformers.json") or {}).get("prompts") or {}
    if "query" in prompts:
        doc = next((prompts[n] for n in ("passage", "document") if n in prompts), "")
        settings["prompts"] = PromptPolicy.infer(prompts["query"], doc).style
    return settings


def _pooling_from_st(cfg: dict, model: str) -> str:
    mode = cfg.get("pooling_mode")
    if mode is None:
        modes = [name for flag, name in _ST_FLAG_POOLING.items() if cfg.get(flag)]
        other = [
            k for k, v in cfg.items() if k.startswith("pooling_mode_") and v and k not in _ST_FLAG_POOLING
        ]
        if other or len(modes) > 1:
            raise ConfigError("model", f"{model}: sentence-transformers pooling {other + modes} is not supported")
        return modes[0] if modes else "mean"
    if isinstance(mode, list) and len(mode) == 1:
        mode = mode[0]
    if mode not in _FROM_ST_POOLING:
        raise ConfigError("model", f"{model}: sentence-transformers pooling '{mode}' is not supported")
    return _FROM_ST_POOLING[mode]


def _read_json(model: str, filename: str) -> Any | None:
    """A json file of a local model folder or a (cached) hub repo; ``None`` when absent."""
    path = Path(model) / filename
    if Path(model).is_dir():
        if not path.is_file():
            return None
    else:
        try:
            from huggingface_hub import hf_hub_download

            path = Path(hf_hub_download(model, filename))
        except Exception:  # not on the hub, offline, or no such file: fall back to the next source
            return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ConfigError("model", f"{path}: malformed JSON ({err.msg} at line {err.lineno})") from err


def load_model(model: str, settings: dict, device: str | None):
    """The encoder and tokenizer of a saved model, on ``device`` (default: cuda when available)."""
    import torch

    from me5.models.encoder import Encoder
    from me5.models.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(model)
    encoder = Encoder.from_pretrained(model, pooling=settings["pooling"], normalize=settings["normalize"],
                                      include_prompt=settings.get("include_prompt", True), tokenizer=tokenizer)
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    return encoder.to(dev), tokenizer, dev
