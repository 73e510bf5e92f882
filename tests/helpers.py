"""Test helpers: compose the real conf/ through Hydra's compose API."""

from __future__ import annotations

from pathlib import Path

from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, OmegaConf, open_dict

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"


def compose_cfg(overrides: list[str] | None = None, *, tmp_path: Path | None = None) -> DictConfig:
    """The app's config with ``overrides``; run folder and data under ``tmp_path`` when given."""
    overrides = list(overrides or [])
    if tmp_path is not None:
        overrides += [f"paths.output_dir={tmp_path / 'run'}", f"paths.log_dir={tmp_path / 'logs'}"]
    with initialize_config_dir(version_base="1.3", config_dir=str(CONF)):
        cfg = compose("config", overrides=overrides)
    return cfg


def group_options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


def to_plain(cfg: DictConfig) -> dict:
    with open_dict(cfg):
        return OmegaConf.to_container(cfg, resolve=True)
