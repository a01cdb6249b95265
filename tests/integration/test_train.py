"""`repa train` end to end on a tiny SiT + tiny encoder: checkpoints, exact resume, SIGTERM, TensorBoard,
and an elastic torchrun run (2 processes, c10d on loopback, gloo) that survives a SIGKILLed worker.

The data are real shards made by `repa prepare` (vae 'none': pixel space) from a synthetic
ImageNet-style tree; the S3 tests use the moto server on 127.0.0.1 (tests/conftest.py).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from repa import checkpoint as ckpt
from repa import storage
from repa.cli import main as repa_main
from repa.data.prepare import prepare_images, prepare_latents
from repa.tensorboard import read_scalars
from tests.support.datasets import make_imagenet_tree
from tests.support.tiny_runs import TINY_TRAIN_SETS, latent_run_sets, stage_latent_run

ROOT = Path(__file__).resolve().parents[2]

# toy-cpu preset, made smaller still: 16 px pixels, 64 tokens, SiT hidden 32 x depth 2.
TINY = [
    *TINY_TRAIN_SETS,
    "log.every_steps=2",
    "log.tensorboard_flush_every_steps=4",
    "log.sample_every_steps=4",
    "log.sample_num_images=2",
    "log.sample_num_steps=2",
    "checkpoint.every_steps=4",
    "checkpoint.keep_latest=10",
]


def _make_data(root: Path, out_url: str) -> str:
    tree = make_imagenet_tree(root, per_class=6, corrupt=0)
    prepare_images(str(tree.root), out_url, resolution=16, samples_per_shard=4)
    prepare_latents(out_url, vae="none", batch_size=8)
    return out_url


@pytest.fixture(scope="module")
def local_data(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("train-data")
    return _make_data(root, f"file://{root}/shards")


def _args(data_url: str, run_url: str, *extra: str) -> list[str]:
    sets = [*TINY, f"data.url={data_url}", f"storage.run_url={run_url}", *extra]
    return ["train", "--config", "toy-cpu", *[a for s in sets for a in ("--set", s)]]


def _train(data_url: str, run_url: str, *extra: str) -> int:
    return repa_main(_args(data_url, run_url, *extra))


def _final_state(run_url: str) -> dict:
    ref = ckpt.latest_checkpoint(run_url)
    assert ref is not None
    return ckpt.load_checkpoint_state(ref)


def _assert_states_identical(a: dict, b: dict) -> None:
    assert a["step"] == b["step"] and a["reader"] == b["reader"]
    for part in ("model", "ema"):
        assert a[part].keys() == b[part].keys()
        for key in a[part]:
            assert torch.equal(a[part][key], b[part][key]), f"{part}.{key} differs"
    opt_a, opt_b = a["optimizer"]["state"], b["optimizer"]["state"]
    assert opt_a.keys() == opt_b.keys()
    for index in opt_a:
        for name, value in opt_a[index].items():
            assert torch.equal(value, opt_b[index][name]), f"optimizer state {index}.{name} differs"


def test_run_commits_checkpoints_and_logs_scalars_and_sample_grids(local_data, tmp_path):
    run_url = f"file://{tmp_path}/run"
    assert _train(local_data, run_url, "train.max_steps=8") == 0
    committed, partial = ckpt.list_checkpoints(run_url)
    assert [r.step for r in committed] == [4, 8] and partial == []
    state = _final_state(run_url)
    assert state["reader"]["samples_consumed"] == 8 * 4
    assert state["config"]["train"]["max_steps"] == 8
    scalars = read_scalars(f"{run_url}/tensorboard")
    for tag in ("train/loss", "train/denoising_loss", "train/projection_loss", "train/grad_norm", "train/lr"):
        assert [step for step, _ in scalars[tag]] == [2, 4, 6, 8], tag
    assert all(-1.0 <= v <= 1.0 for _, v in scalars["train/projection_loss"])
    assert storage.exists(f"{run_url}/config.yaml")


def test_resume_after_stop_is_bit_identical_to_an_uninterrupted_run(local_data, tmp_path):
    straight, resumed = f"file://{tmp_path}/straight", f"file://{tmp_path}/resumed"
    assert _train(local_data, straight, "train.max_steps=8") == 0
    assert _train(local_data, resumed, "train.max_steps=4") == 0  # stops after committing step 4
    assert _train(local_data, resumed, "train.max_steps=8") == 0  # a new process resumes from step 4
    _assert_states_identical(_final_state(straight), _final_state(resumed))
    # The TensorBoard curve of the resumed run is continuous: every logged step exactly once.
    steps = [s for s, _ in read_scalars(f"{resumed}/tensorboard")["train/loss"]]
    assert steps == [2, 4, 6, 8]


def test_rerunning_a_finished_run_does_nothing_and_exits_zero(local_data, tmp_path):
    run_url = f"file://{tmp_path}/run"
    assert _train(local_data, run_url, "train.max_steps=4") == 0
    before = ckpt.list_checkpoints(run_url)
    assert _train(local_data, run_url, "train.max_steps=4") == 0
    assert ckpt.list_checkpoints(run_url) == before


def test_uncommitted_checkpoints_are_never_loaded(local_data, tmp_path):
    run_url = f"file://{tmp_path}/run"
    assert _train(local_data, run_url, "train.max_steps=4") == 0
    bogus = storage.join(ckpt.checkpoints_url(run_url), ckpt.step_dir_name(9_999_999))
    storage.write_bytes_atomic(storage.join(bogus, ckpt.STATE_FILE), b"half-written garbage")
    assert _train(local_data, run_url, "train.max_steps=8") == 0
    assert _final_state(run_url)["step"] == 8


def test_bad_inputs_fail_before_any_work_with_the_field_named(local_data, tmp_path, capsys):
    run_url = f"file://{tmp_path}/run"
    assert _train(f"file://{tmp_path}/nowhere", run_url) == 2
    assert "manifest.json" in capsys.readouterr().err
    assert _train(local_data, run_url, "train.global_batch_size=6", "train.batch_size_per_device=4") == 2
    assert "train.batch_size_per_device" in capsys.readouterr().err
    # a random SD-VAE on purpose (else its missing weights are reported first), but pixel data: vae.name
    sets = ("vae.name=sd-vae-ft-mse", "vae.latents_scale=0.18215", "model.allow_random_weights=true")
    assert _train(local_data, run_url, *sets) == 2
    assert "vae.name" in capsys.readouterr().err
    assert not storage.exists(f"{run_url}/checkpoints")


def _subprocess_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT)
    env["OMP_NUM_THREADS"] = "1"
    # As the Helm chart sets it: without it torchrun's c10d rendezvous shares one TCPStore across restart
    # rounds and a restarted group can pick up the previous round's stale peer addresses and hang in
    # init_process_group (seen here: gloo "connection refused" / a hang after a worker was SIGKILLed).
    env["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"] = "1"
    return env


def _wait_for(predicate, timeout: float, what: str, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        if proc is not None and proc.poll() is not None:
            out = proc.stdout.read() if proc.stdout else ""
            raise AssertionError(f"process exited ({proc.returncode}) before {what}:\n{out[-4000:]}")
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def test_sigterm_commits_a_checkpoint_before_exit(local_data, tmp_path):
    run_url = f"file://{tmp_path}/run"
    args = _args(
        local_data, run_url, "train.max_steps=100000", "checkpoint.every_steps=50000", "log.every_steps=1"
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "repa", *args],
        env=_subprocess_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        lines: list[str] = []

        def trained_a_few_steps() -> bool:
            line = proc.stdout.readline()
            lines.append(line)
            words = line.split(" step ", 1)[-1].split() if " step " in line else []
            return bool(words) and words[0].isdigit() and int(words[0]) >= 3

        _wait_for(trained_a_few_steps, 120, "three training steps", proc)
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=120)
    finally:
        proc.kill()
    assert code == 143, "a preempted run must not exit 0 (an elastic PyTorchJob would be marked Succeeded)"
    ref = ckpt.latest_checkpoint(run_url)
    assert ref is not None and ref.step >= 3
    assert ckpt.load_checkpoint_state(ref)["reader"]["samples_consumed"] == ref.step * 4


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _children(pid: int) -> list[int]:
    out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


def test_elastic_torchrun_survives_a_killed_worker_with_data_and_run_on_s3(s3_bucket, tmp_path):
    data_url = _make_data(tmp_path, f"{s3_bucket}/shards")
    run_url = f"{s3_bucket}/run"
    # An uncommitted folder from a "crashed save" at a later step: must never be loaded.
    storage.write_bytes_atomic(f"{run_url}/checkpoints/step-9000000/state.pt", b"partial")
    cmd = [
        sys.executable, "-m", "torch.distributed.run",
        "--nnodes=1:2", "--nproc-per-node=2", "--max-restarts=3",
        "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{_free_port()}", "--rdzv-id=repa-test",
        "--rdzv-conf=last_call_timeout=1",
        "-m", "repa", *_args(data_url, run_url, "train.max_steps=16", "checkpoint.every_steps=4",
                             # alignment stops half-way (HASTE): projectors idle under DDP afterwards
                             "objective.align_until_step=10"),
    ]  # fmt: skip
    proc = subprocess.Popen(
        cmd, env=_subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        _wait_for(lambda: ckpt.latest_checkpoint(run_url) is not None, 240, "the first checkpoint", proc)
        workers = _children(proc.pid)
        assert len(workers) == 2, workers
        os.kill(workers[1], signal.SIGKILL)
        try:
            output, _ = proc.communicate(timeout=300)
        except subprocess.TimeoutExpired:
            proc.kill()
            output = proc.communicate()[0]
            raise AssertionError(f"torchrun did not finish after the kill:\n{output[-30000:]}") from None
    finally:
        proc.kill()
    assert proc.returncode == 0, output[-30000:]
    assert "resumed from" in output, "the restarted workers must resume from the latest checkpoint"
    state = _final_state(run_url)
    assert state["step"] == 16 and state["world_size"] == 2
    assert state["reader"]["samples_consumed"] == 16 * 4
    steps = [s for s, _ in read_scalars(f"{run_url}/tensorboard")["train/loss"]]
    assert steps == sorted(set(steps)) and steps[-1] == 16


# ----------------------------------------------------------------------------------------------
# Storage options in the config only; data-order settings fixed for a run
# ----------------------------------------------------------------------------------------------


def test_s3_endpoint_given_only_in_the_config_reaches_data_weights_and_checkpoints(
    s3_server, s3_bucket, tmp_path, monkeypatch
):
    """MinIO/Ceph style: the endpoint lives in storage_options, no AWS_ENDPOINT_URL_S3. The encoder and
    VAE weights (checked before the run, then loaded) must be read through the same options."""
    import s3fs

    stage_latent_run(tmp_path, s3_bucket)  # while the env endpoint is set

    monkeypatch.delenv("AWS_ENDPOINT_URL_S3")
    monkeypatch.setenv("REPA_CACHE_DIR", str(tmp_path / "cache"))
    s3fs.S3FileSystem.clear_instance_cache()
    options = f"{{client_kwargs: {{endpoint_url: '{s3_server}'}}}}"
    run_url = f"{s3_bucket}/run"
    sets = latent_run_sets(s3_bucket, options)
    argv = ["train", "--config", "toy-cpu", *[a for s in sets for a in ("--set", s)]]
    assert repa_main(argv) == 0
    with_options = {"client_kwargs": {"endpoint_url": s3_server}}
    ref = ckpt.latest_checkpoint(storage.Location(run_url, with_options))
    assert ref is not None and ref.step == 2
    state = ckpt.load_checkpoint_state(ref)
    assert state["config"]["encoder"]["weights_urls"] == [f"{s3_bucket}/weights/encoder.pt"]
    assert "train/loss" in read_scalars(storage.Location(f"{run_url}/tensorboard", with_options))


@pytest.mark.parametrize(
    ("key", "value"), [("data.chunk_size", 1), ("data.shards_in_flight", 2), ("data.seed", 5)]
)
def test_resume_with_another_data_order_is_refused_naming_the_key(local_data, tmp_path, capsys, key, value):
    run_url = f"file://{tmp_path}/run"
    assert _train(local_data, run_url, "train.max_steps=4") == 0
    capsys.readouterr()
    assert _train(local_data, run_url, "train.max_steps=8", f"{key}={value}") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and key in err and "Traceback" not in err, err
    assert [r.step for r in ckpt.list_checkpoints(run_url)[0]] == [4]  # nothing trained past the stop
