"""The health guard end to end (`repa train` on the tiny run of test_train.py; docs/training-health.md).

Faults are injected with ``health.inject_sample_ranges`` (documented "for tests"): the moments of the
samples at those stream positions become NaN (or x1000 for a spike) before the forward pass, on the
rank that reads them, as a poisoned sample would. Global batch 4, so step s reads positions
[4s, 4s + 4) (rank r of 2: [4s + 2r, 4s + 2r + 2)).
"""

from __future__ import annotations

import itertools
import logging
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch

from repa import checkpoint as ckpt
from repa.cli import main as repa_main
from repa.config import RunConfig
from repa.tensorboard import read_scalars
from repa.train.health import HEALTH_EXIT_CODE
from tests.integration.test_train import (
    TINY,
    _args,
    _assert_states_identical,
    _final_state,
    _free_port,
    _make_data,
    _subprocess_env,
)
from tests.support.tiny_runs import commit_tiny_checkpoint, tiny_run_config

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("health-data")
    return _make_data(root, f"file://{root}/shards")


def _train(data_url: str, run_url: str, *extra: str) -> int:
    return repa_main(_args(data_url, run_url, "log.sample_every_steps=0", *extra))


def _assert_finite(state: dict) -> None:
    for part in ("model", "ema"):
        assert ckpt.first_nonfinite(state[part]) is None, part


def _warnings(caplog, text: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if text in r.getMessage()]


def test_a_nan_step_is_skipped_and_equals_a_run_that_skipped_those_samples(data, tmp_path, caplog):
    caplog.set_level(logging.INFO)
    nan, skip, resumed = (f"file://{tmp_path}/{name}" for name in ("nan", "skip", "resumed"))
    inject = "health.inject_sample_ranges=[[9, 10]]"  # one sample of step 2's batch [8, 12)
    assert _train(data, nan, "train.max_steps=8", inject) == 0
    assert _train(data, skip, "train.max_steps=8", "health.skip_sample_ranges=[[8, 12]]") == 0
    state = _final_state(nan)
    _assert_finite(state)
    _assert_states_identical(state, _final_state(skip))  # model, EMA, AdamW state, data position
    assert state["step"] == 8 and state["reader"]["samples_consumed"] == 9 * 4
    (bad,) = state["health"]["skipped"]
    assert (bad["step"], bad["start"], bad["end"]) == (2, 8, 12)
    assert bad["checks"] == ["loss_nonfinite", "grad_nonfinite"]
    assert len(bad["keys"]) == 4 and state["health"]["rollbacks"] == []
    (line,) = _warnings(caplog, "health: skipped")
    assert "step 2: loss_nonfinite+grad_nonfinite" in line and "[8, 12)" in line and bad["keys"][1] in line
    scalars = read_scalars(f"{nan}/tensorboard")
    assert scalars["health/skipped_steps"][-1] == (8, 1.0) and scalars["health/rollbacks"][-1] == (8, 0.0)
    # The checkpoint carries the guard: stopped after the skip and resumed, the run is the same run.
    assert _train(data, resumed, "train.max_steps=4", inject) == 0
    assert _train(data, resumed, "train.max_steps=8", inject) == 0
    again = _final_state(resumed)
    _assert_states_identical(state, again)
    assert repr(again["health"]) == repr(state["health"])  # repr: the recorded NaN loss != itself


def test_repeated_nans_roll_back_once_and_skip_the_window(data, tmp_path, caplog):
    caplog.set_level(logging.INFO)
    nan, skip = f"file://{tmp_path}/nan", f"file://{tmp_path}/skip"
    # Steps 6, 6, 6 (an update is not counted when skipped) read [24, 28), [28, 32), [32, 36): all bad.
    assert _train(data, nan, "train.max_steps=10", "health.inject_sample_ranges=[[24, 36]]") == 0
    assert _train(data, skip, "train.max_steps=10", "health.skip_sample_ranges=[[24, 36]]") == 0
    state = _final_state(nan)
    _assert_finite(state)
    _assert_states_identical(state, _final_state(skip))
    health = state["health"]
    assert health["rollbacks"] == [{"step": 6, "to_step": 4, "start": 24, "end": 36}]
    assert [(b["step"], b["start"]) for b in health["skipped"]] == [(6, 24), (6, 28), (6, 32)]
    assert health["skip_ranges"] == [[24, 36]]
    (line,) = _warnings(caplog, "health: rolled back")
    assert "from step 6 to" in line and "step-0000004" in line and "[24, 36)" in line
    assert all(b["keys"][0] in " ".join(_warnings(caplog, "health: skipped")) for b in health["skipped"])
    assert [r.step for r in ckpt.list_checkpoints(nan)[0]] == [4, 8, 10]
    steps = [s for s, _ in read_scalars(f"{nan}/tensorboard")["train/loss"]]
    assert steps == [2, 4, 6, 8, 10]  # the replayed steps once each


def test_a_run_that_keeps_failing_stops_after_max_rollbacks(data, tmp_path, caplog):
    caplog.set_level(logging.INFO)
    run_url = f"file://{tmp_path}/run"
    sets = ("train.max_steps=12", "health.inject_sample_ranges=[[24, 100000]]", "health.max_rollbacks=2")
    assert _train(data, run_url, *sets) == HEALTH_EXIT_CODE == 3
    assert len(_warnings(caplog, "health: rolled back")) == 2
    (stop,) = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert "\n" not in stop and "health: stopping at step 6" in stop and "needs a human" in stop
    assert [r.step for r in ckpt.list_checkpoints(run_url)[0]] == [4]


def test_spikes_are_detected_and_a_healthy_300_step_run_never_fires(data, tmp_path):
    spike = f"file://{tmp_path}/spike"
    sets = ("health.window_steps=8", "health.inject_fault=spike", "health.inject_sample_ranges=[[48, 49]]")
    assert _train(data, spike, "train.max_steps=16", *sets) == 0
    (bad,) = _final_state(spike)["health"]["skipped"]
    assert bad["step"] == 12 and "loss_spike" in bad["checks"]

    healthy = f"file://{tmp_path}/healthy"
    every = ("checkpoint.every_steps=300", "log.every_steps=50", "log.tensorboard=false")
    assert _train(data, healthy, "train.max_steps=300", *every) == 0  # default health settings
    health = _final_state(healthy)["health"]
    assert health["skipped"] == [] and health["rollbacks"] == []
    defaults = RunConfig().health
    # Margin: the largest robust z-score of any applied step stays well below the default k (batch 4 is
    # noisier than any real run; 1000 such steps peak at 7.9, docs/training-health.md).
    assert max(health["max_scores"].values()) < 0.75 * defaults.spike_k, health["max_scores"]


def test_align_until_step_counts_optimiser_updates(data, tmp_path):
    run_url = f"file://{tmp_path}/run"
    every = ("log.every_steps=1", "checkpoint.every_steps=1")
    assert _train(data, run_url, "train.max_steps=3", "objective.align_until_step=2", *every) == 0
    states = [ckpt.load_checkpoint_state(ref) for ref in ckpt.list_checkpoints(run_url)[0]]
    projector = [k for k in states[0]["model"] if k.startswith("projectors.")]
    assert projector
    moved = [
        any(not torch.equal(a["model"][k], b["model"][k]) for k in projector)
        for a, b in itertools.pairwise(states)
    ]
    assert moved == [True, False]  # update 2 (of 1, 2, 3) aligned, update 3 did not


WORKER = """
import sys, torch
from repa import runtime as D
from repa.config import load_config
from repa.train.trainer import Trainer, check_inputs
cfg = load_config("toy-cpu", sys.argv[2:])
info = D.init_distributed(cfg.train.device, cfg.train.process_group_timeout_seconds)
trainer = Trainer(cfg, info, check_inputs(cfg))
code = trainer.train()
torch.save({"model": trainer.raw_model.state_dict(), "ema": trainer.ema.state_dict(),
            "skipped": trainer.health.skipped_steps}, f"{sys.argv[1]}/rank{info.rank}.pt")
D.shutdown()
sys.exit(code)
"""


def test_torchrun_ranks_skip_the_same_step_when_only_rank_1_sees_the_nan(data, tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(textwrap.dedent(WORKER))
    sets = [*TINY, f"data.url={data}", f"storage.run_url=file://{tmp_path}/run", "train.max_steps=8"]
    sets += ["log.sample_every_steps=0", "health.inject_sample_ranges=[[22, 23]]"]  # step 5, rank 1's half
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--nproc-per-node=2",
        "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{_free_port()}", "--rdzv-id=repa-health",
        str(script), str(tmp_path), *sets,
    ]  # fmt: skip
    proc = subprocess.run(cmd, env=_subprocess_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-8000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    assert ranks[0]["skipped"] == ranks[1]["skipped"] == 1
    for part in ("model", "ema"):
        assert ckpt.first_nonfinite(ranks[0][part]) is None
        for key, value in ranks[0][part].items():
            assert torch.equal(value, ranks[1][part][key]), f"{part}.{key} differs between ranks"
    state = _final_state(f"file://{tmp_path}/run")
    (bad,) = state["health"]["skipped"]
    assert (bad["step"], bad["start"], bad["end"]) == (5, 20, 24) and state["step"] == 8
    # the record and both ranks' log lines name rank 1's keys (gathered), not each rank its own
    assert len(bad["keys"]) == 2  # rank 1's micro-batch of 2, not the whole batch of 4
    lines = [line for line in (proc.stdout + proc.stderr).splitlines() if "health: skipped" in line]
    assert len(lines) == 2 and all(f"keys: {', '.join(bad['keys'])})" in line for line in lines), lines


def test_sample_and_eval_refuse_a_checkpoint_with_a_nan_in_the_ema(tmp_path, feats, capsys):
    from repa.eval.refstats import compute_reference_stats, save_reference_stats
    from tests.integration.test_eval_cli import random_images, write_config
    from tests.support.tiny_features import FEATS

    ref_url = str(tmp_path / "ref.npz")
    save_reference_stats(
        ref_url, compute_reference_stats(random_images(20, 16), __import__("repa_test_feats").build())
    )
    run_url = str(tmp_path / "run")
    tree = tiny_run_config(
        run_url, sample={"num_samples": 4, "num_steps": 2}, eval={"reference_stats_url": ref_url}
    )
    cfg_path = write_config(tmp_path / "cfg.yaml", tree)
    cfg = RunConfig.from_dict(tree)
    commit_tiny_checkpoint(cfg, 100)
    ref = ckpt.latest_checkpoint(run_url)
    # A NaN that was trained in (the checkpoint is committed with it, so its sha256 values match):
    # rewrite the step through save_checkpoint rather than editing a committed file.
    state = {k: v for k, v in ckpt.load_checkpoint_state(ref).items() if k not in ("format", "step")}
    ema = torch.load(ref.ema_url, weights_only=False)
    name = sorted(ema["ema"])[3]
    ema["ema"][name].view(-1)[0] = float("nan")
    state["ema"] = ema["ema"]
    shutil.rmtree(ref.url)
    ckpt.save_checkpoint(run_url, 100, state, ema["ema"], vars(ema["args"]))
    for argv in (
        ("sample", "--config", cfg_path),
        ("eval", "--config", cfg_path, "--feature-extractor", FEATS),
    ):
        capsys.readouterr()
        assert repa_main(list(argv)) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "Traceback" not in err, err
        assert ref.url in err and f"(first: {name})" in err and "non-finite" in err
    assert not (tmp_path / "run" / "samples").exists() and not (tmp_path / "run" / "eval").exists()
