"""What a run records about itself: git SHA and dirty flag, parameter counts, a flat config."""

from __future__ import annotations

import subprocess
from collections.abc import Mapping
from pathlib import Path

from torch import nn


def git_info(cwd: str | Path | None = None) -> dict:
    """``{"sha": ..., "dirty": bool}`` of the checkout holding this package (``sha`` None outside git)."""
    cwd = cwd or Path(__file__).resolve().parent
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, check=True).stdout.strip()
        status = subprocess.run(["git", "status", "--porcelain"], cwd=cwd, capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return {"sha": None, "dirty": None}
    return {"sha": sha, "dirty": bool(status.strip())}


def parameter_counts(model: nn.Module) -> dict:
    """Total, trainable, and embedding-table parameters (the embedding share is large for XLM-R's 250k vocab)."""
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    emb = 0
    get_emb = getattr(getattr(model, "backbone", model), "get_input_embeddings", None)
    if get_emb is not None and get_emb() is not None:
        emb = sum(p.numel() for p in get_emb().parameters())
    return {"total": total, "trainable": trainable, "embedding": emb, "non_embedding": total - emb}


def flatten(d: Mapping, prefix: str = "") -> dict:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``: one W&B config column per leaf, so sweep parameters show up."""
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(flatten(v, key + "."))
        elif isinstance(v, (list, tuple)) and any(isinstance(x, (Mapping, list, tuple)) for x in v):
            out.update(flatten({str(i): x for i, x in enumerate(v)}, key + "."))  # trainer.plugins.0._target_
        else:
            out[key] = v
    return out
