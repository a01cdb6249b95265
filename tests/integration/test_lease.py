"""One writer per run, for real (issue 21): conditional writes on every store, the start race, fencing
of an evicted trainer.

Stores: the local file system, the session's moto S3 server (its PUT made atomic by
``tests.support.moto_conditions``, as AWS's is) and the GCS emulator (``tests.support.gcs_emulator`` adds
``ifGenerationMatch``).
"""

from __future__ import annotations

import dataclasses
import os
import re
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from repa import checkpoint as ckpt
from repa import storage
from repa.lease import Lease, LeaseError
from repa.storage import Location, conditional
from tests.integration.test_train import TINY, _make_data, _subprocess_env, _wait_for

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("lease-data")
    return _make_data(root, f"file://{root}/shards")


@pytest.fixture(params=["file", "s3", "gcs"])
def store(request, tmp_path) -> str:
    """A fresh, empty prefix on one store; returns its URL."""
    if request.param == "file":
        return f"file://{tmp_path}/store"
    if request.param == "s3":
        from tests.support.moto_conditions import serialize_puts

        serialize_puts()
        return request.getfixturevalue("s3_bucket") + "/store"
    return request.getfixturevalue("gcs_bucket") + "/store"


# ----------------------------------------------------------------------------------------------
# 1. The primitives
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("extra", [[], ["memory"]], ids=["", "memory"])
def test_conditional_writes_hold_their_conditions(store, extra):
    url = f"memory://cond-{uuid.uuid4().hex}" if extra else store
    where = Location(f"{url}/OBJ")
    conditional.check(where)
    assert conditional.read(where) is None
    first = conditional.create(where, b"one")
    with pytest.raises(conditional.PreconditionFailed):
        conditional.create(where, b"two")
    assert conditional.read(where) == conditional.Versioned(b"one", first)
    second = conditional.replace(where, b"three", first)
    assert second != first
    with pytest.raises(conditional.PreconditionFailed):  # a writer that read the old version loses
        conditional.replace(where, b"four", first)
    with pytest.raises(conditional.PreconditionFailed):
        conditional.delete(where, first)
    assert conditional.read(where).data == b"three"
    conditional.delete(where, second)
    assert conditional.read(where) is None
    with pytest.raises(conditional.PreconditionFailed):
        conditional.replace(where, b"five", second)


def test_a_store_without_conditional_writes_is_refused_unless_opted_out(monkeypatch, tmp_path):
    """A store that ignores If-None-Match (the second create succeeds) is caught by the probe."""
    from repa.config import ConfigError

    real = conditional.create

    def ignoring(where, data):
        if "conditional-probe" in where.url:
            return "x"
        return real(where, data)

    monkeypatch.setattr(conditional, "_kind", lambda where: ("s3", None, ""))
    monkeypatch.setattr(conditional, "create", ignoring)
    lease = Lease(f"file://{tmp_path}/run", stale_seconds=60, renew_seconds=30)
    with pytest.raises(ConfigError, match=r"storage\.lease_conditional_writes"):
        lease.acquire()
    monkeypatch.undo()
    plain = Lease(f"file://{tmp_path}/run", stale_seconds=60, renew_seconds=30, conditional_writes=False)
    plain.acquire()
    plain.check_held()
    plain.release()


def test_a_takeover_race_has_one_winner_and_fences_the_old_owner(tmp_path):
    url = f"file://{tmp_path}/run"
    old = Lease(url, stale_seconds=60, renew_seconds=30, job="a", clock=lambda: time.time() - 1000)
    old.acquire()
    old.release(remove=False)  # crashed: a heartbeat 1000 s ago
    a = Lease(url, stale_seconds=60, renew_seconds=30, job="b")
    b = Lease(url, stale_seconds=60, renew_seconds=30, job="c")
    # Both read the stale lease before either writes: only the first replace of that version wins.
    seen = a._read()
    a_token = seen[1]
    b.acquire()
    with pytest.raises(conditional.PreconditionFailed):
        conditional.replace(a.location, a._record(), a_token)
    with pytest.raises(LeaseError, match=f"taken over by owner {b.owner}"):
        old.check_held()
    b.check_held()
    assert b.read().generation == 2
    b.release()


# ----------------------------------------------------------------------------------------------
# 2. The start race
# ----------------------------------------------------------------------------------------------

OFFSETS_MS = (0, 10, 25, 50, 100)
TRIALS = int(os.environ.get("REPA_LEASE_TRIALS", "20"))


def _config(data_url: str, run_url: str):
    """The tiny ``repa train`` config and its manifest, loaded as ``repa.train.trainer.run`` does."""
    import argparse

    from repa.config import add_config_arguments, config_from_args
    from repa.train.trainer import check_inputs

    parser = argparse.ArgumentParser()
    add_config_arguments(parser)
    sets = [*TINY, f"data.url={data_url}", f"storage.run_url={run_url}", "train.device=cpu"]
    cfg = config_from_args(
        parser.parse_args(["--config", "toy-cpu", *[a for s in sets for a in ("--set", s)]])
    )
    return cfg, check_inputs(cfg)


def _candidate(make_candidate, conn) -> None:
    """A candidate process: for each ``(run_url, start_at)`` it receives, wait for ``start_at``, then do
    what ``repa train`` does before its first step that touches the run (write probe, lease,
    ``config.yaml``: ``repa.train.checkpointer.claim_run``); answer ``(exit code, the CLI's one-line
    error, lease owner)``. A won lease is held (heartbeat running) until the next trial begins."""
    from repa.cli import describe_failure
    from repa.train.checkpointer import claim_run

    held = None
    while True:
        message = conn.recv()
        if held is not None:
            held.release(remove=False)
            held = None
        if message is None:
            return
        run_url, start_at = message
        run_cfg, info = make_candidate(run_url)
        time.sleep(max(0.0, start_at - time.time()))
        try:
            held = claim_run(run_cfg, info)
        except BaseException as e:
            code, line = describe_failure(e)
            conn.send((code, line + "\n", ""))
            continue
        conn.send((0, "", held.owner))


def test_two_candidates_at_0_to_100_ms_apart_have_exactly_one_winner(store, data, tmp_path):
    """Two starts on one fresh run, 0, 10, 25, 50 and 100 ms apart, 20 trials each: exactly one takes
    the lease and writes ``config.yaml``; the other fails with exit code 5 and one line before its
    first step.

    The candidates are two real processes (forked from this one, config loaded) that run the trainer's
    own start-up code (``repa.train.checkpointer.claim_run``: write probe, lease, ``config.yaml``) once per
    trial, each trial on a fresh run; they report the exit code and line ``repa train`` would print.
    A pair of full ``repa train`` processes costs seconds of imports, S3/GCS client set-up and model
    building on 2 cores, so 300 pairs would take most of an hour, and nothing before the lease touches
    the run. ``test_two_full_trainers_started_together_leave_one_run`` runs real ``repa train`` pairs
    (process exit code 5, nothing written by the loser).
    """
    import multiprocessing

    from repa import runtime

    cfg, _ = _config(data, f"{store}/warm")
    info = runtime.init_distributed("cpu", 60)

    def make_candidate(run_url: str):
        run_cfg = dataclasses.replace(cfg, storage=dataclasses.replace(cfg.storage, run_url=run_url))
        return run_cfg, info

    ctx = multiprocessing.get_context("fork")
    pipes = [ctx.Pipe() for _ in range(2)]
    workers = [
        ctx.Process(target=_candidate, args=(make_candidate, child), daemon=True) for _, child in pipes
    ]
    for worker in workers:
        worker.start()
    outcomes: dict[int, list[int]] = {}
    try:
        for offset in OFFSETS_MS:
            for trial in range(TRIALS):
                run_url = f"{store}/race-{offset}-{trial}"
                start = time.time() + 0.05
                for (conn, _), delay in zip(pipes, (0.0, offset / 1000.0), strict=True):
                    conn.send((run_url, start + delay))
                results = []
                for conn, _ in pipes:
                    assert conn.poll(120), f"{offset} ms apart, trial {trial}: a candidate did not answer"
                    results.append(conn.recv())
                codes = sorted(code for code, _, _ in results)
                assert codes == [0, 5], f"{offset} ms apart, trial {trial}: exit codes {codes}: {results}"
                (winner,) = [r for r in results if r[0] == 0]
                (loser,) = [r for r in results if r[0] == 5]
                assert loser[1].count("\n") == 1 and "Traceback" not in loser[1], loser[1]
                assert "lease" in loser[1] or "being trained by another process" in loser[1], loser[1]
                lease = Lease(run_url, stale_seconds=60, renew_seconds=30).read()
                assert lease is not None and lease.owner == winner[2]
                assert storage.exists(storage.join(run_url, "config.yaml"))
                outcomes.setdefault(offset, []).append(results.index(winner))
    finally:
        for conn, _ in pipes:
            conn.send(None)
        for worker in workers:
            worker.join(timeout=30)
    print({offset: f"first won {wins.count(0)}/{len(wins)}" for offset, wins in outcomes.items()})


def _train_argv(data_url: str, run_url: str, *extra: str) -> list[str]:
    sets = [*TINY, f"data.url={data_url}", f"storage.run_url={run_url}", "log.sample_every_steps=0", *extra]
    return [
        sys.executable,
        "-m",
        "repa",
        "train",
        "--config",
        "toy-cpu",
        *[a for s in sets for a in ("--set", s)],
    ]


@pytest.mark.parametrize("offset_ms", [0, 25])
def test_two_full_trainers_started_together_leave_one_run(data, tmp_path, offset_ms):
    """Real ``repa train`` pairs, released together once both have imported torch and repa: one trains
    every step and commits every checkpoint; the other exits 5 with one line and writes nothing."""
    run_url = f"file://{tmp_path}/run"
    argv = _train_argv(data, run_url, "train.max_steps=30", "checkpoint.every_steps=10", "log.every_steps=10")
    go = tmp_path / "go"
    wrapper = (
        "import os, sys, time, runpy\n"
        "import torch, repa.cli, repa.train.trainer\n"
        f"open(os.path.join({str(tmp_path)!r}, 'ready-%d' % os.getpid()), 'w').close()\n"
        f"while not os.path.exists({str(go)!r}): time.sleep(0.001)\n"
        "time.sleep(float(sys.argv.pop(1)))\n"
        "sys.argv = ['repa'] + sys.argv[1:]\n"
        "runpy.run_module('repa', run_name='__main__')\n"
    )
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", wrapper, str(delay), *argv[3:]],
            env=_subprocess_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for delay in (0.0, offset_ms / 1000.0)
    ]
    _wait_for(lambda: len(list(tmp_path.glob("ready-*"))) == 2, 240, "both trainers importing repa")
    go.touch()
    outs = [p.communicate(timeout=300) for p in procs]
    codes = sorted(p.returncode for p in procs)
    assert codes == [0, 5], [(p.returncode, err[-2000:]) for p, (_, err) in zip(procs, outs, strict=True)]
    loser_err = next(err for p, (_, err) in zip(procs, outs, strict=True) if p.returncode == 5)
    assert "Traceback" not in loser_err and "lease" in loser_err.splitlines()[-1], loser_err
    committed, _ = ckpt.list_checkpoints(run_url)
    assert [ref.step for ref in committed] == [10, 20, 30]


# ----------------------------------------------------------------------------------------------
# 3. Fencing: a frozen owner whose lease was taken over commits nothing
# ----------------------------------------------------------------------------------------------


def _seeds(run_url: str) -> dict[int, int]:
    """``{step: train.seed}`` of every committed checkpoint, each verified against its COMMITTED."""
    committed, _ = ckpt.list_checkpoints(run_url)
    return {ref.step: ckpt.load_checkpoint_state(ref)["config"]["train"]["seed"] for ref in committed}


def test_a_frozen_owner_whose_lease_was_taken_over_exits_5_and_commits_nothing(
    data, s3_bucket, s3_proxy, tmp_path
):
    """Owner A (seed 0) uploads its step-2 checkpoint slowly through a throttled proxy and is frozen
    (SIGSTOP) during that upload. While it is frozen the proxy resets its connections (S3 closes a
    connection idle for ~20 s; the default stale time is 600 s), its lease goes stale, and B (seed 1,
    straight to the store) takes the run over and commits step 2. A is then continued (SIGCONT): it
    exits 5, not 134, commits nothing, and every checkpoint of the run is B's (seed 1, verified)."""
    import signal

    run_url = f"{s3_bucket}/run"
    lease_keys = ("storage.lease_stale_seconds=4", "storage.lease_renew_seconds=1", "log.tensorboard=false")
    slow = (
        f"storage.storage_options.client_kwargs.endpoint_url={s3_proxy.url}",
        "storage.deadline_seconds=60",
        "storage.read_timeout_seconds=30",
    )
    env = _subprocess_env()
    a_argv = _train_argv(data, run_url, "train.max_steps=4", "checkpoint.every_steps=2", "log.every_steps=1")
    s3_proxy.throttle(150_000)  # state.pt (~1 MB) takes ~7 s
    log = tmp_path / "a.log"
    with open(log, "w") as out:
        a = subprocess.Popen(
            [*a_argv, *[x for k in (*lease_keys, *slow) for x in ("--set", k)]],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    b = None
    try:
        _wait_for(lambda: re.search(r"step +2 of", log.read_text()), 240, "owner A at step 2", a)
        time.sleep(1.0)  # the step-2 upload is under way (about 7 s at this rate)
        a.send_signal(signal.SIGSTOP)
        frozen = time.monotonic()
        assert not storage.exists(f"{run_url}/checkpoints/step-0000002/COMMITTED")
        s3_proxy.set_mode("drop")  # the store drops the frozen client's idle connections
        time.sleep(0.5)
        s3_proxy.set_mode("pass")
        s3_proxy.throttle(None)
        time.sleep(max(0.0, frozen + 5.0 - time.monotonic()))  # A's lease is now stale (4 s)
        b_argv = _train_argv(
            data, run_url, "train.max_steps=4", "checkpoint.every_steps=2", "train.seed=1", *lease_keys
        )
        b = subprocess.Popen(b_argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        _wait_for(
            lambda: storage.exists(f"{run_url}/checkpoints/step-0000002/COMMITTED"), 240, "B's step 2", b
        )
        a.send_signal(signal.SIGCONT)  # while B is still training
        a.wait(timeout=240)
        b_out, _ = b.communicate(timeout=240)
    finally:
        for proc in (a, b):
            if proc is not None and proc.poll() is None:
                proc.send_signal(signal.SIGCONT)
                proc.kill()
    a_out = log.read_text()
    assert a.returncode == 5, a_out[-6000:]
    assert "terminate called" not in a_out and "Traceback" not in a_out, a_out[-6000:]
    assert a_out.splitlines()[-1].startswith("repa train: error: the lease of"), a_out[-6000:]
    assert b.returncode == 0, b_out[-6000:]
    assert "is stale" in b_out and "taking it over" in b_out, b_out[-6000:]
    assert "committed checkpoint step" not in a_out, a_out[-6000:]
    assert _seeds(run_url) == {2: 1, 4: 1}  # B's own, not "already committed" by A
