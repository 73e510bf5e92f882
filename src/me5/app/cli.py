"""What the argparse commands share: a class named by its dotted path, and ``KEY=VALUE`` arguments as YAML values
(``me5.prepare --source CLASS --source-arg k=v``, ``me5.mine`` / ``me5.score`` likewise)."""

from __future__ import annotations

import importlib
from collections.abc import Sequence

from me5.errors import ConfigError


def import_object(dotted: str, *, field: str):
    """The object at ``dotted`` (``package.module.Name``); an unknown one is a :class:`ConfigError` naming
    ``field``."""
    mod, _, attr = dotted.rpartition(".")
    if not mod:
        raise ConfigError(field, f"'{dotted}' is not a dotted class path (e.g. me5.data.source.Source)")
    try:
        return getattr(importlib.import_module(mod), attr)
    except (ImportError, AttributeError) as err:
        raise ConfigError(field, f"cannot import '{dotted}' ({err})") from err


def parse_value(text: str):
    """``text`` as a YAML value (``3``, ``true``, ``[a, b]``), else the string itself."""
    import yaml

    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def parse_key_values(pairs: Sequence[str] | None, *, field: str) -> dict:
    """``["k=v", ...]`` as ``{k: parse_value(v)}``; an item without ``=`` is a :class:`ConfigError` naming
    ``field``."""
    out = {}
    for kv in pairs or []:
        k, sep, v = kv.partition("=")
        if not sep:
            raise ConfigError(field, f"expected key=value, got '{kv}'")
        out[k] = parse_value(v)
    return out
