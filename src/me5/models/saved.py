"""A saved model folder (an exported encoder, a sentence-transformers folder, or a hub id): its settings and loading.

:func:`read_saved_settings` is the one reader of a saved model's settings (:class:`SavedSettings`): pooling,
normalisation, ``include_prompt``, the prompt policy and the export's length limit come from the folder's
``me5.json`` (written by the export, ``export_encoder``), else from its sentence-transformers files (the policy
whose prompts they hold), else the mE5 defaults (mean pooling, unit vectors, prompts pooled, the E5 policy).
``me5.evaluate``, the MTEB wrapper, ``me5.mine`` and the consistency filter read a model through it, so a model is
read the same way everywhere.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from me5.errors import ConfigError
from me5.prompts import PromptPolicy

ME5_CONFIG = "me5.json"  # the export's own record (export_encoder writes it)
_FROM_ST_POOLING = {"mean": "mean", "cls": "cls", "lasttoken": "last"}
_ST_FLAG_POOLING = {
    "pooling_mode_mean_tokens": "mean",
    "pooling_mode_cls_token": "cls",
    "pooling_mode_lasttoken": "last",
}


@dataclass(frozen=True)
class SavedSettings:
    """How a saved model embeds, as :func:`read_saved_settings` read it.

    Attributes:
        pooling: ``mean``, ``cls`` or ``last`` (:mod:`me5.models.pooling`).
        normalize: the model's vectors are L2-normalised.
        include_prompt: pooling covers the prompt's tokens too (mE5's; ``False``: GritLM-style).
        prompts: the model's :class:`~me5.prompts.PromptPolicy`.
        max_length: the model's own input limit as its export recorded it (``me5.json``'s ``max_seq_length``);
            ``None`` without one (the backbone then says: :func:`me5.models.encoder.model_max_length`).
        source: where the settings came from: ``me5.json``, ``sentence-transformers`` or ``defaults``.
        digest: the first 12 hex digits of the sha1 of the folder's ``me5.json`` (an export's revision; ``None``
            without one).
    """

    pooling: str
    normalize: bool
    include_prompt: bool
    prompts: PromptPolicy
    max_length: int | None
    source: str
    digest: str | None

    def with_prompts(self, prompts: PromptPolicy | str | None) -> SavedSettings:
        """These settings under another policy (``--prompts``); ``None`` keeps the saved one."""
        if prompts is None:
            return self
        policy = prompts if isinstance(prompts, PromptPolicy) else PromptPolicy(prompts)
        return dataclasses.replace(self, prompts=policy)

    def as_dict(self) -> dict[str, Any]:
        """``pooling``, ``normalize``, ``include_prompt`` and ``prompts`` (the style): what ``me5.evaluate`` records
        beside its metrics (and a suite's fingerprint holds)."""
        return {"pooling": self.pooling, "normalize": self.normalize, "include_prompt": self.include_prompt,
                "prompts": self.prompts.style}


def read_saved_settings(model: str | Path) -> SavedSettings:
    """The settings of a saved model (a local folder or a hub id): ``me5.json``, else its sentence-transformers
    files, else the mE5 defaults (see the module docstring)."""
    model = str(model)
    raw = _read_file(model, ME5_CONFIG)
    if raw is not None:
        cfg = _parse(raw, model, ME5_CONFIG)
        if "prompts" in cfg:
            prompts = PromptPolicy.from_dict(cfg["prompts"])
        elif "query_prefix" in cfg:  # folders exported before the prompt policy existed
            prompts = PromptPolicy.infer(cfg["query_prefix"], cfg.get("passage_prefix", ""))
        else:
            prompts = PromptPolicy("e5")
        max_length = cfg.get("max_seq_length")
        return SavedSettings(
            pooling=cfg.get("pooling", "mean"), normalize=bool(cfg.get("normalize", True)),
            include_prompt=bool(cfg.get("include_prompt", True)), prompts=prompts,
            max_length=int(max_length) if max_length is not None else None, source=ME5_CONFIG,
            digest=hashlib.sha1(raw).hexdigest()[:12],
        )
    defaults = SavedSettings(pooling="mean", normalize=True, include_prompt=True, prompts=PromptPolicy("e5"),
                             max_length=None, source="defaults", digest=None)
    modules = _read_json(model, "modules.json")
    if modules is None:
        return defaults
    types = {m.get("type", "").rsplit(".", 1)[-1]: m.get("path", "") for m in modules}
    pooling, include_prompt = "mean", True
    if "Pooling" in types:
        pooling_cfg = _read_json(model, f"{types['Pooling']}/config.json") or {}
        pooling = _pooling_from_st(pooling_cfg, model)
        include_prompt = bool(pooling_cfg.get("include_prompt", True))
    prompts = defaults.prompts
    st_prompts = (_read_json(model, "config_sentence_transformers.json") or {}).get("prompts") or {}
    if "query" in st_prompts:
        doc = next((st_prompts[n] for n in ("passage", "document") if n in st_prompts), "")
        prompts = PromptPolicy.infer(st_prompts["query"], doc)
    return dataclasses.replace(defaults, pooling=pooling, normalize="Normalize" in types,
                               include_prompt=include_prompt, prompts=prompts, source="sentence-transformers")


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


def _read_file(model: str, filename: str) -> bytes | None:
    """The bytes of a file of a local model folder or a (cached) hub repo; ``None`` when absent."""
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
    return path.read_bytes()


def _parse(raw: bytes, model: str, filename: str) -> Any:
    try:
        return json.loads(raw.decode("utf-8"))
    except json.JSONDecodeError as err:
        where = Path(model) / filename
        raise ConfigError("model", f"{where}: malformed JSON ({err.msg} at line {err.lineno})") from err


def _read_json(model: str, filename: str) -> Any | None:
    """A json file of a local model folder or a (cached) hub repo; ``None`` when absent."""
    raw = _read_file(model, filename)
    return None if raw is None else _parse(raw, model, filename)


def load_model(model: str, settings: SavedSettings, device: str | None):
    """The encoder and tokenizer of a saved model built with its ``settings`` (:func:`read_saved_settings`), on
    ``device`` (default: cuda when available); returns ``(encoder, tokenizer, device)``."""
    import torch

    from me5.models.encoder import Encoder
    from me5.models.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(model)
    encoder = Encoder.from_pretrained(model, pooling=settings.pooling, normalize=settings.normalize,
                                      include_prompt=settings.include_prompt, tokenizer=tokenizer)
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    return encoder.to(dev), tokenizer, dev
