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


# ----------------------------------------------------------------------------------------------
# Locations, fencing and writers (repa.checkpoint.store), the trainer's Checkpointer
# ----------------------------------------------------------------------------------------------


def test_a_location_s_options_travel_with_the_refs_it_lists(tmp_path):
    run = storage.Location(f"file://{tmp_path}/run", {"auto_mkdir": True})
    ref = ckpt.save_checkpoint(run, 3, _state(3), None)
    (listed,) = ckpt.list_checkpoints(run)[0]
    assert listed == ref == ckpt.CheckpointRef(3, ref.url)  # options take no part in comparisons
    assert dict(listed.options) == {"auto_mkdir": True} and listed.location.options == run.options
    assert ckpt.load_checkpoint_state(listed)["step"] == 3


class _Evicted(Exception):
    pass


def _evicted() -> None:
    raise _Evicted


def test_fenced_writes_are_refused_before_they_change_what_readers_see(run_url):
    # every file and the marker are fenced writes: an evicted writer writes no file and no COMMITTED
    # (a local file system may keep the empty step folder)
    with pytest.raises(_Evicted):
        ckpt.save_checkpoint(run_url, 4, _state(4), None, fence=_evicted)
    committed, partial = ckpt.list_checkpoints(run_url)
    assert committed == [] and all(not storage.listdir(url) for url in partial)
    for step in (8, 12):
        ckpt.save_checkpoint(run_url, step, _state(step), None)
    committed = ckpt.list_checkpoints(run_url)[0]
    with pytest.raises(_Evicted):  # retention deletes
        ckpt.apply_retention(run_url, keep_latest=1, keep_every_steps=0, fence=_evicted)
    with pytest.raises(_Evicted):  # quarantine marker
        ckpt.quarantine_checkpoint(committed[0], "bad", fence=_evicted)
    with pytest.raises(_Evicted):  # rollback deletes
        ckpt.delete_checkpoint(committed[0], fence=_evicted)
    assert ckpt.list_checkpoints(run_url)[0] == committed


def test_a_step_committed_by_another_writer_is_never_taken_as_this_save_s_own(run_url):
    ckpt.save_checkpoint(run_url, 4, _state(1), None, writer="evicted")
    ref = ckpt.save_checkpoint(run_url, 4, _state(2), None, writer="owner")
    assert ckpt.read_marker(ref.url)["writer"] == "owner"
    assert torch.equal(ckpt.load_checkpoint_state(ref)["model"]["w"], torch.full((2,), 2.0))
    aside = storage.listdir(f"{run_url}/checkpoints/{ckpt.QUARANTINE_DIR}")
    assert len(aside) == 1 and aside[0].startswith("step-0000004-")
    again = ckpt.save_checkpoint(run_url, 4, _state(3), None, writer="owner")  # its own: kept
    assert torch.equal(ckpt.load_checkpoint_state(again)["model"]["w"], torch.full((2,), 2.0))


def test_lease_check_held_names_the_new_owner(tmp_path):
    from repa.lease import Lease, LeaseError

    run_url = f"file://{tmp_path}/run"
    first = Lease(run_url, stale_seconds=0.0, renew_seconds=3600, job="a")
    first.acquire()
    first.check_held()
    second = Lease(run_url, stale_seconds=0.0, renew_seconds=3600, job="b")
    second.acquire()  # the first one's heartbeat is "stale" at once
    with pytest.raises(LeaseError, match="taken over by"):
        first.check_held()
    assert first.lost
    first.release(remove=False)
    second.release()


class _Counter:
    """A Stateful part that is not a tensor container."""

    def __init__(self) -> None:
        self.value = 0

    def state_dict(self) -> dict:
        return {"value": self.value}

    def load_state_dict(self, state: dict) -> None:
        self.value = state["value"]


class _TrainerState:
    def __init__(self) -> None:
        self.step = 0

    def state_dict(self) -> dict:
        return {"step": self.step, "samples_consumed": 4 * self.step}

    def load_state_dict(self, state: dict) -> None:
        self.step = state["step"]


def _checkpointer(run_url: str, seed: int):
    from repa.config import load_config
    from repa.runtime import DistInfo
    from repa.train.checkpointer import Checkpointer
    from repa.train.health import HealthGuard

    cfg = load_config(None, [f"storage.run_url={run_url}", "checkpoint.export_ema=false"])
    torch.manual_seed(seed)
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.randn(4, 3)).sum().backward()
    optimizer.step()
    parts = {"model": model, "optimizer": optimizer, "reader": _Counter(), "health": HealthGuard(cfg.health)}
    trainer = _TrainerState()
    info = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    return Checkpointer(cfg, info, parts, trainer, {"model": "SiT-S/2"}), parts, trainer


def test_the_checkpointer_saves_its_stateful_parts_only_and_resumes_them(tmp_path):
    run_url = f"file://{tmp_path}/run"
    saver, parts, trainer = _checkpointer(run_url, seed=0)
    trainer.step, parts["reader"].value = 7, 42
    parts["health"].accept(1.5, 0.5)
    ref = saver.save(trainer.step, wait=True)
    assert ref is not None and ref.step == 7 and saver.last_committed == ref
    state = ckpt.load_checkpoint_state(ref)
    assert set(state) == {"format", "step", "samples_consumed", "model", "optimizer", "reader", "health"}

    loader, fresh, fresh_trainer = _checkpointer(run_url, seed=1)
    assert not torch.equal(fresh["model"].weight, parts["model"].weight)
    assert loader.resume() == ref
    assert fresh_trainer.step == 7 and fresh["reader"].value == 42 and list(fresh["health"].losses) == [1.5]
    for key, value in parts["model"].state_dict().items():
        assert torch.equal(fresh["model"].state_dict()[key], value)
    assert torch.equal(
        fresh["optimizer"].state_dict()["state"][0]["exp_avg"],
        parts["optimizer"].state_dict()["state"][0]["exp_avg"],
    )


def test_an_evicted_checkpointer_commits_nothing_and_its_upload_thread_is_joined(tmp_path):
    from repa.lease import Lease, LeaseError

    run_url = f"file://{tmp_path}/run"
    saver, _, trainer = _checkpointer(run_url, seed=0)
    saver.lease = Lease(run_url, stale_seconds=3600, renew_seconds=3600, job="evicted")
    saver.lease.acquire()
    trainer.step = 4
    assert saver.save(4, wait=True).step == 4  # held: committed
    owner = Lease(run_url, stale_seconds=0.0, renew_seconds=3600, job="new-owner")
    owner.acquire()  # to it, any heartbeat is stale: it takes the lease over
    trainer.step = 8
    with pytest.raises(LeaseError, match="taken over by"):
        saver.save(8, wait=True)
    assert [r.step for r in ckpt.list_checkpoints(run_url)[0]] == [4]  # step 8: files, no marker
    saver.abandon(join=True)
    assert not saver.saver.busy
    saver.lease.release()
    owner.release()
