"""Production faults (issue 13): object-store outages behind a loopback proxy, corrupt and truncated
checkpoints, the run lease, one-line errors, and preemption under torchrun.

The S3 tests talk to the session's moto server through ``tests.netproxy.NetProxy`` (``s3_proxy``),
which drops, blackholes or throttles the connections on command; data stay local so only the run's
own traffic (lease, config, checkpoints, TensorBoard) crosses the faulty network.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest

from repa import checkpoint as ckpt
from repa import storage
from repa.cli import main as repa_main
from tests.integration.test_train import (
    TINY,
    _assert_states_identical,
    _make_data,
)

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_POLICY = storage.Policy()


@pytest.fixture(autouse=True)
def _default_storage_policy():
    """A test's short deadlines must not leak into the next one (the policy is per process)."""
    yield
    storage.configure(
        connect_timeout=DEFAULT_POLICY.connect_timeout,
        read_timeout=DEFAULT_POLICY.read_timeout,
        deadline=DEFAULT_POLICY.deadline,
    )
    storage.reset_failures()


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("fault-data")
    return _make_data(root, f"file://{root}/shards")


def _sets(data_url: str, run_url: str, *extra: str) -> list[str]:
    return [*TINY, f"data.url={data_url}", f"storage.run_url={run_url}", "log.sample_every_steps=0", *extra]


def _argv(data_url: str, run_url: str, *extra: str) -> list[str]:
    return [
        "train",
        "--config",
        "toy-cpu",
        *[a for s in _sets(data_url, run_url, *extra) for a in ("--set", s)],
    ]


@pytest.fixture(scope="module")
def straight(data, tmp_path_factory) -> dict:
    """The final state of an uninterrupted 8-step run on local storage (the bit-identity reference)."""
    run_url = f"file://{tmp_path_factory.mktemp('straight')}/run"
    assert repa_main(_argv(data, run_url, "train.max_steps=8", "checkpoint.every_steps=4")) == 0
    ref, state = ckpt.load_latest_verified(run_url)
    assert ref is not None and ref.step == 8
    return state


def _via_proxy(proxy, deadline: float) -> list[str]:
    return [
        f"storage.storage_options.client_kwargs.endpoint_url={proxy.url}",
        "storage.connect_timeout_seconds=1",
        "storage.read_timeout_seconds=1.5",
        f"storage.deadline_seconds={deadline}",
    ]


def _fault_at_save(monkeypatch, step: int, action) -> list[float]:
    """Run ``action()`` just before the checkpoint of ``step`` is uploaded; returns [time it ran]."""
    real = ckpt.save_checkpoint
    when: list[float] = []

    def save(run_url, at_step, *args, **kwargs):
        if at_step == step and not when:
            when.append(time.monotonic())
            action()
        return real(run_url, at_step, *args, **kwargs)

    monkeypatch.setattr(ckpt, "save_checkpoint", save)
    return when


def _state(run_url: str, options: dict) -> dict:
    ref, state = ckpt.load_latest_verified(run_url, options, quarantine=False)
    assert ref is not None
    return state


# ----------------------------------------------------------------------------------------------
# 1. Outages: survived when short, a one-line error within the deadline when permanent
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["drop", "blackhole"])
def test_training_survives_an_8s_outage_bit_identically(
    mode, data, straight, s3_bucket, s3_proxy, monkeypatch
):
    run_url = f"{s3_bucket}/run"
    hit = _fault_at_save(monkeypatch, 4, lambda: s3_proxy.outage(mode, 8.0))
    extra = ("train.max_steps=8", "checkpoint.every_steps=4", *_via_proxy(s3_proxy, deadline=30))
    assert repa_main(_argv(data, run_url, *extra)) == 0
    assert hit and time.monotonic() - hit[0] >= 8.0, "the outage must have been waited out"
    options = {"client_kwargs": {"endpoint_url": s3_proxy.url}}
    assert [r.step for r in ckpt.list_checkpoints(run_url, options)[0]] == [4, 8]
    _assert_states_identical(_state(run_url, options), straight)


@pytest.mark.parametrize("mode", ["drop", "blackhole"])
def test_a_permanent_outage_ends_the_run_within_the_deadline_naming_the_first_failure(
    mode, data, s3_bucket, s3_proxy, monkeypatch, capsys
):
    run_url = f"{s3_bucket}/run"
    deadline = 4.0
    hit = _fault_at_save(monkeypatch, 4, lambda: s3_proxy.set_mode(mode))
    extra = ("train.max_steps=8", "checkpoint.every_steps=4", *_via_proxy(s3_proxy, deadline))
    assert repa_main(_argv(data, run_url, *extra)) == 4
    took = time.monotonic() - hit[0]
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    # The first operation that failed is the save of step 4 (the TensorBoard flush at the same step
    # fails too, a moment later; it must not be the one reported).
    assert f"{run_url}/checkpoints/step-0000004" in err and "tensorboard" not in err, err
    assert "storage.deadline_seconds" in err
    assert took < deadline + 6.0, f"took {took:.1f} s for a {deadline} s deadline"


# ----------------------------------------------------------------------------------------------
# 4. Verified loads: a corrupt or truncated newest checkpoint is quarantined, the previous one used
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def two_checkpoints(data, tmp_path_factory) -> Path:
    """A local run folder with committed steps 4 and 8 (copied by each test that damages it)."""
    root = tmp_path_factory.mktemp("two-checkpoints") / "run"
    assert repa_main(_argv(data, f"file://{root}", "train.max_steps=8", "checkpoint.every_steps=4")) == 0
    return root


def _damage(path: Path, how: str) -> None:
    data = bytearray(path.read_bytes())
    if how == "flip":
        data[len(data) // 2] ^= 0xFF  # one flipped byte in the middle of the tensors
    else:
        data = data[: len(data) // 3]
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("how", ["flip", "truncate"])
def test_a_damaged_newest_checkpoint_is_quarantined_and_the_previous_one_resumed(
    how, data, two_checkpoints, tmp_path, caplog
):

    run = tmp_path / "run"
    shutil.copytree(two_checkpoints, run)
    _damage(run / "checkpoints" / "step-0000008" / "state.pt", how)
    caplog.set_level("INFO")
    assert repa_main(_argv(data, f"file://{run}", "train.max_steps=12", "checkpoint.every_steps=4")) == 0
    assert "quarantined checkpoint step 8" in caplog.text
    assert f"resumed from file://{run}/checkpoints/step-0000004" in caplog.text
    # The damaged folder was kept (set aside when step 8 was saved again), marked with the reason.
    (aside,) = (run / "checkpoints" / ckpt.QUARANTINE_DIR).iterdir()
    reason = json.loads((aside / ckpt.QUARANTINE).read_text())["reason"]
    assert ("corrupt: sha256" if how == "flip" else "bytes, COMMITTED records") in reason
    assert [r.step for r in ckpt.list_checkpoints(f"file://{run}")[0]] == [4, 8, 12]
    assert ckpt.load_latest_verified(f"file://{run}")[0].step == 12


def test_a_user_named_corrupt_checkpoint_is_a_one_line_error_for_sample(tmp_path, capsys):
    import yaml

    from repa.config import RunConfig
    from tests.tiny_runs import commit_tiny_checkpoint, tiny_run_config

    run_url = str(tmp_path / "run")
    tree = tiny_run_config(run_url, sample={"num_samples": 4, "num_steps": 2, "batch_size_per_device": 4})
    commit_tiny_checkpoint(RunConfig.from_dict(tree), 100)
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(tree))
    folder = Path(run_url, "checkpoints", "step-0000100")
    _damage(folder / "ema.pt", "flip")
    argv = ["sample", "--config", str(tmp_path / "cfg.yaml"), "--checkpoint", str(folder), "--no-progress"]
    assert repa_main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert f"{folder}/ema.pt is corrupt" in err
    assert not (folder / ckpt.QUARANTINE).exists(), "a checkpoint the user named is reported, not hidden"
