"""Shared test set-up: offline hubs, no W&B, deterministic small threads."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(min(2, os.cpu_count() or 1))


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """The sample data and tokenizer, generated once per test module (seeded, so identical everywhere; made before
    a run starts, so the jobs of a sweep do not race to make them)."""
    from me5.data.synthetic import generate_sample_data
    from me5.models.tokenizer import ensure_sample_tokenizer

    root = tmp_path_factory.mktemp("data")
    generate_sample_data(root / "sample", seed=0)
    ensure_sample_tokenizer(root / "sample")
    return root
