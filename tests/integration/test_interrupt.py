"""Ctrl-C keeps the work: SIGINT to `repa train` (and to `repa torchrun` with 2 processes) commits the
step it stops at, names it, exits 130, and a resume from there is bit-identical to an uninterrupted run.

Same tiny run as tests/integration/test_train.py (toy-cpu, 16 px pixels, SiT hidden 32 x depth 2).
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from repa import checkpoint as ckpt
from repa.cli import main as repa_main
from repa.data.prepare import prepare_images, prepare_latents
from repa.tensorboard import read_scalars
from tests.support.datasets import make_imagenet_tree
from tests.support.tiny_runs import TINY_TRAIN_SETS

ROOT = Path(__file__).resolve().parents[2]
TINY = [*TINY_TRAIN_SETS, "log.every_steps=1", "checkpoint.every_steps=50000", "checkpoint.keep_latest=10"]
COMMITTED = re.compile(r"committed step (\d+) \((\S+)\); exit code 130")


@pytest.fixture(scope="module")
def data_url(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("interrupt-data")
    tree = make_imagenet_tree(root, per_class=6, corrupt=0)
    url = f"file://{root}/shards"
    prepare_images(str(tree.root), url, resolution=16, samples_per_shard=4)
    prepare_latents(url, vae="none", batch_size=8)
    return url


def _args(data_url: str, run_url: str, *extra: str) -> list[str]:
    sets = [*TINY, f"data.url={data_url}", f"storage.run_url={run_url}", *extra]
    return ["train", "--config", "toy-cpu", *[a for s in sets for a in ("--set", s)]]


def _env() -> dict[str, str]:
    return {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "OMP_NUM_THREADS": "1",
        "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1",  # as the chart sets it (see test_train.py)
    }


def _interrupt_after(cmd: list[str], step: int, timeout: float = 240) -> tuple[int, str]:
    """Start ``cmd``, send SIGINT once its log shows ``step``, return (exit code, output)."""
    proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    try:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line and proc.poll() is not None:
                raise AssertionError(
                    f"exited ({proc.returncode}) before step {step}:\n{''.join(lines)[-4000:]}"
                )
            lines.append(line)
            found = re.search(r" step +(\d+) of ", line)
            if found and int(found.group(1)) >= step:
                break
        proc.send_signal(signal.SIGINT)
        rest, _ = proc.communicate(timeout=timeout)
    finally:
        proc.kill()
    return proc.returncode, "".join(lines) + rest


def _state(run_url: str, step: int) -> dict:
    committed, _ = ckpt.list_checkpoints(run_url)
    (ref,) = [r for r in committed if r.step == step]
    return ckpt.load_checkpoint_state(ref)  # verified against COMMITTED (size + sha256)


def _assert_states_identical(a: dict, b: dict) -> None:
    assert a["step"] == b["step"] and a["reader"] == b["reader"]
    for part in ("model", "ema"):
        for key in a[part]:
            assert torch.equal(a[part][key], b[part][key]), f"{part}.{key} differs"
    for index, values in a["optimizer"]["state"].items():
        for name, value in values.items():
            assert torch.equal(value, b["optimizer"]["state"][index][name]), f"optimizer {index}.{name}"


def test_ctrl_c_commits_the_step_names_it_exits_130_and_resumes_bit_identically(data_url, tmp_path):
    run_url = f"file://{tmp_path}/run"
    code, output = _interrupt_after(
        [sys.executable, "-m", "repa", *_args(data_url, run_url, "train.max_steps=100000")], step=3
    )
    assert code == 130, output[-4000:]
    named = COMMITTED.search(output)
    assert named, output[-4000:]
    step = int(named.group(1))
    assert step >= 3 and named.group(2).endswith(ckpt.step_dir_name(step))
    assert ckpt.latest_checkpoint(run_url).step == step
    assert _state(run_url, step)["reader"]["samples_consumed"] == step * 4
    # every trained and committed step has its scalars, the interrupted one included
    assert [s for s, _ in read_scalars(f"{run_url}/tensorboard")["train/loss"]] == list(range(1, step + 1))

    end = step + 2
    assert repa_main(_args(data_url, run_url, f"train.max_steps={end}")) == 0
    straight = f"file://{tmp_path}/straight"
    assert repa_main(_args(data_url, straight, f"train.max_steps={end}")) == 0
    _assert_states_identical(_state(straight, end), _state(run_url, end))
    assert [s for s, _ in read_scalars(f"{run_url}/tensorboard")["train/loss"]] == list(range(1, end + 1))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ctrl_c_to_repa_torchrun_commits_the_step_on_both_workers_and_exits_130(data_url, tmp_path):
    run_url = f"file://{tmp_path}/run"
    cmd = [
        sys.executable, "-m", "repa", "torchrun", "--nnodes=1", "--nproc-per-node=2",
        "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{_free_port()}", "--rdzv-id=repa-interrupt",
        "-m", "repa", *_args(data_url, run_url, "train.max_steps=100000"),
    ]  # fmt: skip
    code, output = _interrupt_after(cmd, step=3)  # torchrun forwards the SIGINT to both workers
    assert code == 130 and "stopped by signal SIGINT" in output, output[-6000:]
    named = COMMITTED.findall(output)
    assert len(named) == 1, output[-6000:]  # rank 0 commits; both workers stop at that step
    step = int(named[0][0])
    assert ckpt.latest_checkpoint(run_url).step == step
    state = _state(run_url, step)
    assert state["world_size"] == 2 and state["reader"]["samples_consumed"] == step * 4
    assert output.count("train finished with exit code 130") == 1  # rank 0's line (the others log warnings)
