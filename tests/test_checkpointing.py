"""Checkpoints that survive a kill (me5.training.checkpointing): atomic writes, corrupt-file detection,
what a restart resumes from, pruning."""

from __future__ import annotations

import pytest
import torch

from me5.training.checkpointing import (
    AtomicCheckpointIO,
    checkpoint_is_readable,
    prune_step_checkpoints,
    resume_checkpoint,
)


def _save(path, step):
    AtomicCheckpointIO().save_checkpoint({"global_step": step, "w": torch.arange(1000.0) * step}, path)


def test_a_failed_write_leaves_the_previous_checkpoint_whole(tmp_path, monkeypatch):
    path = tmp_path / "last.ckpt"
    _save(path, 1)

    def dies_mid_write(obj, fh, *a, **k):
        fh.write(b"PK\x03\x04 partial")
        raise KeyboardInterrupt("killed")

    monkeypatch.setattr(torch, "save", dies_mid_write)
    with pytest.raises(KeyboardInterrupt):
        _save(path, 2)
    monkeypatch.undo()
    assert torch.load(path, weights_only=False)["global_step"] == 1
    assert checkpoint_is_readable(path) == (True, "")


def test_truncated_or_corrupt_checkpoints_are_named_and_the_previous_one_is_used(tmp_path):
    for step in (2, 4, 6):
        _save(tmp_path / f"step{step:06d}.ckpt", step)
    _save(tmp_path / "last.ckpt", 6)
    assert resume_checkpoint(tmp_path) == (tmp_path / "last.ckpt", [])
    data = (tmp_path / "last.ckpt").read_bytes()
    (tmp_path / "last.ckpt").write_bytes(data[: len(data) // 2])
    blob = bytearray((tmp_path / "step000006.ckpt").read_bytes())
    i = blob.index(b"data.pkl") + 200  # inside a stored member: its CRC no longer matches
    blob[i] ^= 0xFF
    (tmp_path / "step000006.ckpt").write_bytes(bytes(blob))
    found, bad = resume_checkpoint(tmp_path)
    assert found == tmp_path / "step000004.ckpt"
    assert [p.name for p, _ in bad] == ["last.ckpt", "step000006.ckpt"]
    assert "truncated" in bad[0][1]
    (tmp_path / "x.ckpt").write_text("not a zip")
    assert not checkpoint_is_readable(tmp_path / "x.ckpt")[0]
    assert resume_checkpoint(tmp_path / "empty") == (None, [])


def test_prune_keeps_the_newest_step_checkpoints_and_last(tmp_path):
    for step in (5, 10, 15, 20, 100):
        _save(tmp_path / f"step{step:06d}.ckpt", step)
    _save(tmp_path / "last.ckpt", 100)
    removed = prune_step_checkpoints(tmp_path, 2)
    assert sorted(p.name for p in removed) == ["step000005.ckpt", "step000010.ckpt", "step000015.ckpt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt", "step000020.ckpt", "step000100.ckpt"]
    assert prune_step_checkpoints(tmp_path, -1) == []
