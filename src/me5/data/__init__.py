"""Text-pair data: the normalised schema, readers, the base DataModule, mixtures and sources.

Names are imported lazily so that ``me5.data.readers`` and ``me5.data.schema`` load without Lightning.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "MixtureDataModule": "me5.data.mixture",
    "PairBatchStream": "me5.data.stream",
    "ShardedPairStream": "me5.data.stream",
    "log_realised_mixture": "me5.data.mixture",
    "RealisedMixtureLogger": "me5.data.mixture",
    "TextPairDataModule": "me5.data.base",
    "PairCollator": "me5.data.collate",
    "TrainItem": "me5.data.collate",
    "PairExample": "me5.data.schema",
    "to_example": "me5.data.schema",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'me5.data' has no attribute '{name}'")
