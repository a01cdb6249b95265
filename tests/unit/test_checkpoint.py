"""Checkpoint commit protocol, discovery and retention on local and in-memory storage."""

from __future__ import annotations

import uuid

import pytest
import torch

from repa import checkpoint as ckpt
from repa import storage


@pytest.fixture(params=["file", "memory"])
def run_url(request, tmp_path) -> str:
    if request.param == "file":
        return f"file://{tmp_path}/run"
    return f"memory://runs/{uuid.uuid4().hex}"


def _state(step: int) -> dict:
    return {"model": {"w": torch.full((2,), float(step))}, "config": {"a": 1}}


def test_saved_checkpoint_is_listed_and_loads_back(run_url):
    ref = ckpt.save_checkpoint(run_url, 10, _state(10), {"w": torch.ones(2)}, {"model": "SiT-B/2"})
    assert ckpt.latest_checkpoint(run_url) == ref
    state = ckpt.load_checkpoint_state(ref)
    assert state["step"] == 10 and torch.equal(state["model"]["w"], torch.full((2,), 10.0))


def test_ema_export_has_the_reference_layout(run_url):
    from repa.weights import load_torch_file

    ref = ckpt.save_checkpoint(
        run_url, 5, _state(5), {"w": torch.ones(2)}, {"model": "SiT-B/2", "encoder_depth": 4}
    )
    exported = load_torch_file(ref.ema_url)
    assert set(exported) == {"ema", "args", "steps"}
    assert exported["args"].encoder_depth == 4 and exported["steps"] == 5


def test_folder_without_marker_is_never_listed_or_loaded(run_url):
    ckpt.save_checkpoint(run_url, 10, _state(10), None)
    partial = storage.join(ckpt.checkpoints_url(run_url), ckpt.step_dir_name(20))
    storage.write_bytes_atomic(storage.join(partial, ckpt.STATE_FILE), b"half a file")
    committed, uncommitted = ckpt.list_checkpoints(run_url)
    assert [r.step for r in committed] == [10]
    assert uncommitted == [partial]
    with pytest.raises(ValueError, match="not committed"):
        ckpt.load_checkpoint_state(ckpt.CheckpointRef(20, partial))


def test_retention_keeps_latest_and_every_mth_and_cleans_crashed_saves(run_url):
    for step in range(10, 101, 10):
        ckpt.save_checkpoint(run_url, step, _state(step), None)
    crashed = storage.join(ckpt.checkpoints_url(run_url), ckpt.step_dir_name(55))
    storage.write_bytes_atomic(storage.join(crashed, ckpt.STATE_FILE), b"partial")
    ckpt.apply_retention(run_url, keep_latest=2, keep_every_steps=40)
    committed, uncommitted = ckpt.list_checkpoints(run_url)
    assert [r.step for r in committed] == [40, 80, 90, 100]
    assert uncommitted == []


def test_a_file_that_is_not_a_checkpoint_is_refused_with_its_name(run_url):
    url = storage.join(ckpt.checkpoints_url(run_url), ckpt.step_dir_name(1))
    import io

    buffer = io.BytesIO()
    torch.save({"something": 1}, buffer)
    storage.write_bytes_atomic(storage.join(url, ckpt.STATE_FILE), buffer.getvalue())
    storage.write_bytes_atomic(storage.join(url, ckpt.MARKER), b"{}")
    with pytest.raises(ValueError, match=r"state\.pt: not a repa-checkpoint-v1 file"):
        ckpt.load_checkpoint_state(ckpt.CheckpointRef(1, url))
