"""The batch plan: derived once, every contradiction a ConfigError naming its field."""

from __future__ import annotations

import pytest

from me5.batching import BatchPlan
from me5.errors import ConfigError


def test_derives_the_per_device_batch_and_the_rank_slices():
    plan = BatchPlan.build(global_batch_size=32768, world_size=8, chunk_tokens=262144, where="stages.pretrain")
    assert plan.per_device_batch_size == 4096 and plan.chunk_tokens == 262144 and plan.chunk_rows is None
    assert [plan.rank_slice(r) for r in (0, 7)] == [slice(0, 4096), slice(28672, 32768)]
    assert plan.with_world_size(16).per_device_batch_size == 2048
    with pytest.raises(ValueError, match="rank 8"):
        plan.rank_slice(8)


@pytest.mark.parametrize(
    ("kwargs", "field", "message"),
    [
        ({"global_batch_size": 0}, "stages.pretrain.global_batch_size", ">= 1"),
        ({"global_batch_size": 64.0}, "stages.pretrain.global_batch_size", "integer"),
        ({"global_batch_size": 64, "world_size": 3}, "stages.pretrain.global_batch_size", "not divisible by the 3"),
        ({"global_batch_size": 64, "per_device_batch_size": 128}, "stages.pretrain.per_device_batch_size", "larger"),
        ({"global_batch_size": 64, "per_device_batch_size": 48}, "stages.pretrain.per_device_batch_size",
         "does not divide"),
        ({"global_batch_size": 64, "world_size": 4, "per_device_batch_size": 32},
         "stages.pretrain.per_device_batch_size", "the trainer has 4"),
        ({"global_batch_size": 64, "chunk_rows": 8, "chunk_tokens": 512}, "stages.pretrain.chunk_tokens", "not both"),
        ({"global_batch_size": 64, "world_size": 4, "chunk_rows": 32}, "stages.pretrain.chunk_rows",
         "larger than the per-device batch 16"),
        ({"global_batch_size": 64, "chunk_tokens": 0}, "stages.pretrain.chunk_tokens", ">= 1"),
    ],
)
def test_errors_name_the_field(kwargs, field, message):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")) as info:
        BatchPlan.build(**kwargs, where="stages.pretrain")
    assert message in str(info.value)
