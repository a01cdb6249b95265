"""`repa watch`: each committed checkpoint evaluated once (also across restarts), uncommitted ones never;
selection (every n-th, only latest); back-off on storage errors; SIGTERM; Job launching; S3 (moto).

Metrics use a tiny random conv feature extractor (FD_tiny-conv) so a whole evaluation takes < 1 s.
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from repa import checkpoint as ckpt
from repa import storage
from repa.config import RunConfig
from repa.tensorboard import read_scalars
from tests.support.tiny_features import FEATS
from tests.support.tiny_runs import commit_tiny_checkpoint, tiny_run_config

# NB: repa.eval.watch / repa.eval.evaluate are imported inside the tests: importing the module
# `repa.eval.evaluate` rebinds the package attribute `repa.eval.evaluate` (metrics' function), which
# would break modules collected later that do `from repa.eval import evaluate`.

REPO = Path(__file__).resolve().parents[2]


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_config(run_url: str, reference_stats_url: str, **sections) -> dict:
    tree = tiny_run_config(
        run_url,
        sample={"num_samples": 8, "num_steps": 3, "batch_size_per_device": 8},
        train={"max_steps": 1000},
        checkpoint={"every_steps": 100, "keep_every_steps": 0},
        log={"every_steps": 100},
        eval={"reference_stats_url": reference_stats_url, "watch_poll_seconds": 1},
    )
    for name, values in sections.items():
        tree[name] = {**tree[name], **values}
    return tree


def commit_checkpoint(cfg: RunConfig, step: int) -> None:
    commit_tiny_checkpoint(cfg, step, seed=step)


def setup_run(tmp_path: Path, run_url: str, reference: str, steps=(100, 200, 300), **sections):
    tree = tiny_config(run_url, reference, **sections)
    cfg = RunConfig.from_dict(tree)
    for step in steps:
        commit_checkpoint(cfg, step)
    cfg_path = tmp_path / "cfg.yaml"
    cfg_path.write_text(yaml.safe_dump(tree))
    return str(cfg_path), cfg


def cli(*argv: str) -> int:
    from repa.cli import main

    return main(list(argv))


def result_files(run_url: str) -> dict[int, Path]:
    out = {}
    for path in Path(run_url, "eval").glob("step-*/result-*.json"):
        out[int(path.parent.name.removeprefix("step-"))] = path
    return out


# ----------------------------------------------------------------------------------------------
# In-process evaluation
# ----------------------------------------------------------------------------------------------


def test_watch_once_evaluates_each_committed_checkpoint_once_even_after_restart(tmp_path, reference, capsys):
    run_url = str(tmp_path / "run")
    cfg_path, cfg = setup_run(tmp_path, run_url, reference)
    # Traps: a crash mid-save (files, no COMMITTED marker), a foreign folder, a stray file.
    partial = Path(run_url, "checkpoints", "step-0000400")
    partial.mkdir()
    (partial / "state.pt").write_bytes(b"truncated")
    Path(run_url, "checkpoints", "step-latest").mkdir()
    Path(run_url, "checkpoints", "notes.txt").write_text("x")

    argv = ("watch", "--config", cfg_path, "--once", "--feature-extractor", FEATS, "--chunk-size", "4")
    assert cli(*argv, "--no-progress") == 0
    assert "3 checkpoint(s) handled [100, 200, 300], 0 failed" in capsys.readouterr().out
    results = result_files(run_url)
    assert sorted(results) == [100, 200, 300]
    fds = {step: json.loads(p.read_text())["fid"] for step, p in results.items()}
    assert len(set(fds.values())) == 3  # three different checkpoints, three numbers
    scalars = read_scalars(str(Path(run_url, "tensorboard", "eval")))
    assert [s for s, _ in scalars["eval/fd_tiny-conv"]] == [100, 200, 300]
    assert [v for _, v in scalars["eval/fd_tiny-conv"]] == pytest.approx([fds[100], fds[200], fds[300]])

    # A restarted watcher finds everything done and rewrites nothing.
    stamps = {step: p.stat().st_mtime_ns for step, p in results.items()}
    assert cli(*argv, "--no-progress") == 0
    assert "0 checkpoint(s) handled []" in capsys.readouterr().out
    assert {step: p.stat().st_mtime_ns for step, p in result_files(run_url).items()} == stamps

    # Once the trainer commits step 400, it (and only it) is evaluated.
    commit_checkpoint(cfg, 400)
    assert cli(*argv, "--no-progress") == 0
    assert "1 checkpoint(s) handled [400]" in capsys.readouterr().out
    assert sorted(result_files(run_url)) == [100, 200, 300, 400]


def test_every_nth_and_only_latest_select_by_step(tmp_path, reference):
    from repa.eval.evaluate import plan_evaluation
    from repa.eval.watch import Watcher, WatchReport

    run_url = str(tmp_path / "run")
    tree = tiny_config(run_url, reference, eval={"watch_every_nth": 2}, train={"max_steps": 650})
    cfg = RunConfig.from_dict(tree)
    refs = [
        ckpt.CheckpointRef(step, f"{run_url}/checkpoints/{ckpt.step_dir_name(step)}")
        for step in range(100, 700, 100)
    ]
    refs.append(ckpt.CheckpointRef(650, f"{run_url}/checkpoints/{ckpt.step_dir_name(650)}"))  # the final one

    def pending_steps(cfg: RunConfig, done=()) -> list[int]:
        watcher = Watcher(
            cfg,
            process=lambda source, plan: None,
            is_done=lambda plan: plan.source.step in done,
            plan=lambda source: plan_evaluation(cfg, source),
        )
        return [source.step for source, _ in watcher.pending(refs)]

    # Index = step / checkpoint.every_steps: every 2nd is 200, 400, 600; the final step always counts.
    assert pending_steps(cfg) == [200, 400, 600, 650]
    assert pending_steps(cfg, done={200, 400}) == [600, 650]
    latest = RunConfig.from_dict(tiny_config(run_url, reference, eval={"watch_only_latest": True}))
    assert pending_steps(latest) == [650]
    assert pending_steps(latest, done={650}) == []  # the backlog is never gone back to
    assert WatchReport().processed == []


class RecordingStop(threading.Event):
    """A stop event whose waits return at once and are recorded (no real sleeping in tests)."""

    def __init__(self, stop_after: int) -> None:
        super().__init__()
        self.waits: list[float] = []
        self.stop_after = stop_after

    def wait(self, timeout: float | None = None) -> bool:
        self.waits.append(timeout)
        if len(self.waits) >= self.stop_after:
            self.set()
        return self.is_set()


def test_listing_errors_back_off_exponentially_up_to_a_cap(tmp_path, reference, monkeypatch, caplog):
    from repa.eval import watch as W

    run_url = str(tmp_path / "run")
    cfg = RunConfig.from_dict(
        tiny_config(run_url, reference, eval={"watch_poll_seconds": 10, "feature_extractor": FEATS})
    )
    calls = []
    real = ckpt.list_checkpoints

    def flaky(run):
        calls.append(run)
        if len(calls) <= 4:  # four failed listings (e.g. the object store is throttling), then healthy
            raise ConnectionResetError(104, "Connection reset by peer")
        return real(run)

    monkeypatch.setattr(W.ckpt, "list_checkpoints", flaky)
    stop = RecordingStop(stop_after=6)
    watcher = W.make_watcher(cfg, stop=stop)
    watcher.max_backoff_seconds = 40
    report = watcher.run()
    assert stop.waits == [10, 20, 40, 40, 10, 10]  # poll * 2^k, capped; back to the poll period after success
    assert report.polls == 2 and report.stopped
    assert "retrying in 40 s" in caplog.text


def test_a_failing_checkpoint_is_retried_then_given_up_without_blocking_others(tmp_path, reference, capsys):
    run_url = str(tmp_path / "run")
    cfg_path, _ = setup_run(tmp_path, run_url, reference, steps=(100, 200))
    ema = Path(run_url, "checkpoints", "step-0000100", "ema.pt")
    ema.write_bytes(b"corrupted after commit")
    argv = ("watch", "--config", cfg_path, "--once", "--feature-extractor", FEATS, "--max-attempts", "1")
    assert cli(*argv, "--no-progress") == 1  # --once reports the failure in its exit code
    out = capsys.readouterr().out
    assert "1 checkpoint(s) handled [200], 1 failed [100]" in out
    assert sorted(result_files(run_url)) == [200]


def test_sigterm_stops_the_watcher_at_once_without_partial_results(tmp_path, reference, feats):
    run_url = str(tmp_path / "run")
    # Enough work that the evaluation is still sampling when the signal comes.
    cfg_path, _ = setup_run(
        tmp_path, run_url, reference, steps=(100,), sample={"num_samples": 4000, "num_steps": 50}
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{REPO}{os.pathsep}{feats}"}
    proc = subprocess.Popen(
        [
            *(sys.executable, "-m", "repa", "watch", "--config", cfg_path),
            *("--feature-extractor", FEATS, "--chunk-size", "8", "--no-progress"),
        ],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    samples = Path(run_url, "samples")
    deadline = time.monotonic() + 240
    while not list(samples.glob("*/chunks/chunk-*.npz")):  # sampling is under way
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.monotonic() < deadline, "the watcher never started sampling"
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    try:
        out, err = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise
    assert proc.returncode == 0, err[-3000:]
    assert "received SIGTERM: stopping" in err and "abandoned checkpoint step 100" in err
    assert result_files(run_url) == {}  # nothing partial was written
    assert "(stopped)" in out


# ----------------------------------------------------------------------------------------------
# Kubernetes Jobs
# ----------------------------------------------------------------------------------------------

JOB_TEMPLATE = """
apiVersion: batch/v1
kind: Job
metadata:
  name: my-release-eval
  namespace: ml
  labels: {app.kubernetes.io/instance: my-release}
spec:
  backoffLimit: 2
  ttlSecondsAfterFinished: 86400
  template:
    metadata:
      labels: {app.kubernetes.io/component: eval}
    spec:
      restartPolicy: Never
      containers:
        - name: eval
          image: ghcr.io/owner/repa:0.1.0
          args: [eval, --config, /etc/repa/config.yaml, --checkpoint, $(REPA_CHECKPOINT_URL)]
          env:
            - {name: REPA_CHECKPOINT_URL, value: placeholder}
            - {name: NOTE, value: "evaluates ${CHECKPOINT_URL} as ${JOB_NAME}"}
"""


class ApiError(Exception):
    def __init__(self, status: int) -> None:
        super().__init__(f"HTTP {status}")
        self.status = status


class StubBatchApi:
    """Records create_namespaced_job calls; answers 409 for names in ``existing``. The Jobs run until a
    test sets ``conditions[name]`` (batch/v1 JobStatus conditions, as the Job controller writes them)."""

    def __init__(self, existing=()) -> None:
        self.calls: list[tuple[str, dict]] = []
        self.deleted: list[str] = []
        self.existing = set(existing)
        self.conditions: dict[str, list[dict]] = {}

    def create_namespaced_job(self, namespace: str, body: dict) -> dict:
        self.calls.append((namespace, body))
        if body["metadata"]["name"] in self.existing:
            raise ApiError(409)
        self.existing.add(body["metadata"]["name"])
        return body

    def read_namespaced_job_status(self, name: str, namespace: str) -> dict:
        if name not in self.existing:
            raise ApiError(404)
        return {"metadata": {"name": name}, "status": {"conditions": self.conditions.get(name, [])}}

    def delete_namespaced_job(self, name: str, namespace: str, propagation_policy: str) -> None:
        assert propagation_policy == "Background"  # the pods go too
        self.existing.discard(name)
        self.conditions.pop(name, None)
        self.deleted.append(name)


FAILED = [{"type": "Failed", "status": "True", "reason": "BackoffLimitExceeded"}]
COMPLETE = [{"type": "Complete", "status": "True"}]


def test_launch_jobs_creates_one_job_per_checkpoint_and_409_means_done(tmp_path, reference):
    from repa.cluster import jobs
    from repa.eval.watch import make_watcher
    from repa.eval.watch_jobs import launch_marker_url

    run_url = str(tmp_path / "run")
    _, cfg = setup_run(tmp_path, run_url, reference, steps=(100, 200))
    (tmp_path / "eval-job.yaml").write_text(JOB_TEMPLATE)
    template = jobs.load_job_template(str(tmp_path / "eval-job.yaml"))
    api = StubBatchApi()
    report = make_watcher(cfg, launcher=jobs.JobLauncher(api, template)).run(once=True)
    assert report.processed == [100, 200]
    assert [ns for ns, _ in api.calls] == ["ml", "ml"]
    for (_, job), step in zip(api.calls, (100, 200)):
        name = job["metadata"]["name"]
        assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", name) and len(name) <= 63
        assert name.startswith(f"my-release-eval-step-{step:07d}-")
        assert job["metadata"]["labels"]["repa.io/checkpoint-step"] == str(step)
        container = job["spec"]["template"]["spec"]["containers"][0]
        url = f"{run_url}/checkpoints/step-{step:07d}"
        env = {e["name"]: e["value"] for e in container["env"]}
        assert env["REPA_CHECKPOINT_URL"] == url and env["REPA_CHECKPOINT_STEP"] == str(step)
        assert env["NOTE"] == f"evaluates {url} as {name}"
        assert container["args"][-1] == "$(REPA_CHECKPOINT_URL)"  # expanded by Kubernetes from env
    assert template["metadata"]["name"] == "my-release-eval"  # the template itself is untouched

    # Restart: markers say the Jobs exist (still running): they are read, not created again.
    again = StubBatchApi(existing={job["metadata"]["name"] for _, job in api.calls})
    assert make_watcher(cfg, launcher=jobs.JobLauncher(again, template)).run(once=True).processed == []
    assert again.calls == []

    # A Job that already exists (another watcher made it) counts as launched.
    commit_checkpoint(cfg, 300)
    from repa.eval.evaluate import plan_evaluation

    plan = plan_evaluation(cfg, ckpt.resolve_checkpoint(f"{run_url}/checkpoints/step-0000300", None))
    taken = jobs.job_name("my-release-eval", 300, plan.digest)
    clash = StubBatchApi(existing={taken})
    assert make_watcher(cfg, launcher=jobs.JobLauncher(clash, template)).run(once=True).processed == [300]
    marker = json.loads(storage.read_bytes(launch_marker_url(plan)))
    assert marker["job"] == taken and marker["created"] is False
    assert result_files(run_url) == {}  # in Job mode the watcher itself evaluates nothing


def test_a_failed_eval_job_is_retried_after_a_backoff_and_the_retry_succeeds(tmp_path, reference, caplog):
    from repa.cluster import jobs
    from repa.eval.evaluate import plan_evaluation
    from repa.eval.watch import Watcher
    from repa.eval.watch_jobs import JobTracker, launch_marker_url

    run_url = str(tmp_path / "run")
    _, cfg = setup_run(tmp_path, run_url, reference, steps=(100,))
    (tmp_path / "eval-job.yaml").write_text(JOB_TEMPLATE)
    api = StubBatchApi()
    launcher = jobs.JobLauncher(api, jobs.load_job_template(str(tmp_path / "eval-job.yaml")))
    now = [1000.0]
    tracker = JobTracker(launcher, max_attempts=3, retry_seconds=30, clock=lambda: now[0])

    def poll():  # one poll of a fresh watcher process: all state is in storage and the cluster
        plan = lambda source: plan_evaluation(cfg, source)  # noqa: E731
        return Watcher(cfg, tracker.process, tracker.is_done, plan=plan).run(once=True)

    plan = plan_evaluation(cfg, ckpt.resolve_checkpoint(f"{run_url}/checkpoints/step-0000100", None))
    marker = lambda: json.loads(storage.read_bytes(launch_marker_url(plan)))  # noqa: E731
    assert poll().processed == [100]
    (name,) = {body["metadata"]["name"] for _, body in api.calls}
    assert poll().processed == [] and len(api.calls) == 1  # running: nothing to do
    api.conditions[name] = FAILED
    assert poll().processed == [] and api.deleted == []  # failure seen: retry in 30 s
    assert marker()["retry_at"] == 1030.0 and "retrying in 30 s" in caplog.text
    now[0] = 1031.0
    assert poll().processed == [100]  # deleted and created again under the same name
    assert api.deleted == [name] and [b["metadata"]["name"] for _, b in api.calls] == [name, name]
    assert marker()["attempts"] == 2 and marker()["state"] == "launched" and "retry_at" not in marker()
    api.conditions[name] = COMPLETE
    report = poll()
    assert report.processed == [] and report.failed == [] and len(api.calls) == 2
    assert tracker.is_done(plan) is False  # no result yet: the next watcher looks again, launches nothing
    storage.write_bytes_atomic(plan.result_url, b"{}")
    assert tracker.is_done(plan)


def test_an_eval_job_that_keeps_failing_is_given_up_and_a_deleted_checkpoint_is_not_retried(
    tmp_path, reference, caplog
):
    from repa.cluster import jobs
    from repa.eval.evaluate import plan_evaluation
    from repa.eval.watch import Watcher
    from repa.eval.watch_jobs import JobTracker, launch_marker_url

    run_url = str(tmp_path / "run")
    _, cfg = setup_run(tmp_path, run_url, reference, steps=(100, 200))
    (tmp_path / "eval-job.yaml").write_text(JOB_TEMPLATE)
    api = StubBatchApi()
    launcher = jobs.JobLauncher(api, jobs.load_job_template(str(tmp_path / "eval-job.yaml")))
    tracker = JobTracker(launcher, max_attempts=2, retry_seconds=0)
    watcher = Watcher(cfg, tracker.process, tracker.is_done, plan=lambda s: plan_evaluation(cfg, s))
    assert watcher.run(once=True).processed == [100, 200]
    for _, body in api.calls:
        api.conditions[body["metadata"]["name"]] = FAILED
    # Retention deletes step 100 before its Job could read it (the Job failed on the missing files).
    shutil.rmtree(Path(run_url, "checkpoints", "step-0000100"))
    watcher.run(once=True)  # 200: relaunched (attempt 2); 100 is no longer listed at all
    for _, body in api.calls[2:]:
        api.conditions[body["metadata"]["name"]] = FAILED
    report = watcher.run(once=True)
    assert report.failed == [200] and "giving up" in caplog.text
    plan = plan_evaluation(cfg, ckpt.resolve_checkpoint(f"{run_url}/checkpoints/step-0000200", None))
    assert json.loads(storage.read_bytes(launch_marker_url(plan)))["state"] == "failed"
    assert tracker.is_done(plan)  # final: a restarted watcher does not start over


def test_an_eval_job_whose_checkpoint_vanished_is_reported_as_deleted_not_failed(tmp_path, reference):
    from repa.cluster import jobs
    from repa.eval.evaluate import plan_evaluation
    from repa.eval.watch_jobs import JobTracker, launch_marker_url

    run_url = str(tmp_path / "run")
    _, cfg = setup_run(tmp_path, run_url, reference, steps=(100,))
    (tmp_path / "eval-job.yaml").write_text(JOB_TEMPLATE)
    api = StubBatchApi()
    tracker = JobTracker(jobs.JobLauncher(api, jobs.load_job_template(str(tmp_path / "eval-job.yaml"))))
    source = ckpt.resolve_checkpoint(f"{run_url}/checkpoints/step-0000100", None)
    plan = plan_evaluation(cfg, source)
    assert tracker.process(source, plan).action == "launched"
    api.conditions[api.calls[0][1]["metadata"]["name"]] = FAILED
    Path(run_url, "checkpoints", "step-0000100", ckpt.MARKER).unlink()  # retention removes the marker first
    assert tracker.process(source, plan).action == "checkpoint-deleted"
    assert json.loads(storage.read_bytes(launch_marker_url(plan)))["state"] == "checkpoint-deleted"
    assert tracker.is_done(plan) and len(api.calls) == 1


def test_job_names_are_dns_1123_labels_even_for_long_prefixes():
    from repa.cluster.jobs import job_name

    name = job_name("A_Very.Long-Release-Name-That-Goes-On-And-On-And-On-eval", 4_000_000, "AbCdEf0123")
    assert len(name) <= 63 and re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", name)
    assert name.endswith("-step-4000000-abcdef")


def test_forbidden_job_creation_names_the_missing_permission(tmp_path):
    from repa.cluster import jobs

    (tmp_path / "t.yaml").write_text(JOB_TEMPLATE)

    class Forbidden(StubBatchApi):
        def create_namespaced_job(self, namespace, body):
            raise ApiError(403)

    launcher = jobs.JobLauncher(Forbidden(), jobs.load_job_template(str(tmp_path / "t.yaml")))
    with pytest.raises(jobs.JobLaunchError, match=r"needs `create` on jobs.batch in namespace ml"):
        launcher.launch("s3://b/run/checkpoints/step-0000100", 100, "abc")
    (tmp_path / "bad.yaml").write_text("apiVersion: v1\nkind: Pod\n")
    with pytest.raises(jobs.JobLaunchError, match=r"expected kind Job, got 'Pod'"):
        jobs.load_job_template(str(tmp_path / "bad.yaml"))


# ----------------------------------------------------------------------------------------------
# Job mode with the guidance sweep (eval.sweep_every_nth): the sweep's Indexed Job, then the best cell
# ----------------------------------------------------------------------------------------------

SWEEP = {
    "feature_extractor": FEATS,
    "sweep_every_nth": 2,  # checkpoint index 2 (step 200) is swept, index 1 (step 100) is not
    "sweep_num_samples": 4,
    "sweep_cfg_scales": [1.0, 1.8],
    "sweep_guidance_highs": [0.7, 1.0],
    "sweep_pods": 2,
}


def sweep_run(tmp_path: Path, reference: str, steps=(100, 200)) -> tuple[str, str, RunConfig, dict]:
    """A run with the sweep on and an eval Job template whose container runs `repa eval` on its config."""
    from repa.cluster import jobs

    run_url = str(tmp_path / "run")
    cfg_path, cfg = setup_run(tmp_path, run_url, reference, steps=steps, sample={"chunk_size": 4}, eval=SWEEP)
    (tmp_path / "eval-job.yaml").write_text(JOB_TEMPLATE.replace("/etc/repa/config.yaml", cfg_path))
    return run_url, cfg_path, cfg, jobs.load_job_template(str(tmp_path / "eval-job.yaml"))


def run_pod(body: dict, monkeypatch, index: int | None = None) -> None:
    """Run a created Job's container as its pod would: `repa` with its args, $(VAR) expanded from env."""
    (container,) = body["spec"]["template"]["spec"]["containers"]
    env = {e["name"]: e["value"] for e in container["env"]}
    args = [re.sub(r"\$\((\w+)\)", lambda m: env[m.group(1)], a) for a in container["args"]]
    if index is not None:  # an Indexed Job's pod
        monkeypatch.setenv("JOB_COMPLETION_INDEX", str(index))
    assert cli(*args, "--no-progress") == 0


def test_launch_jobs_sweeps_every_nth_checkpoint_in_one_indexed_job_then_scores_its_best_cell(
    tmp_path, reference, monkeypatch, caplog
):
    from repa.cluster import jobs
    from repa.eval.evaluate import plan_evaluation
    from repa.eval.watch import WatchSweep, make_watcher

    caplog.set_level("INFO", logger="repa.eval.watch_jobs")
    run_url, cfg_path, cfg, template = sweep_run(tmp_path, reference)
    api = StubBatchApi()
    watcher = lambda api_: make_watcher(cfg, launcher=jobs.JobLauncher(api_, template))  # noqa: E731
    assert watcher(api).run(once=True).processed == [100, 200]
    (_, plain), (_, swept) = api.calls
    assert plain["metadata"]["name"].startswith("my-release-eval-step-0000100-")
    assert plain["spec"]["template"]["spec"]["containers"][0]["args"][-2:] == [
        "--checkpoint",
        "$(REPA_CHECKPOINT_URL)",
    ]  # not swept: the configured guidance

    # Step 200: ONE Indexed Job, 2 indices sharing the 4 cells at eval.sweep_num_samples each.
    spec = swept["spec"]
    assert (spec["completionMode"], spec["completions"], spec["parallelism"]) == ("Indexed", 2, 2)
    name = swept["metadata"]["name"]
    assert name.startswith("my-release-eval-step-0000200-") and "-sweep-" in name and len(name) <= 63
    (container,) = spec["template"]["spec"]["containers"]
    assert container["args"] == [
        *("eval", "sweep", "--config", cfg_path, "--checkpoint", "$(REPA_CHECKPOINT_URL)"),
        *("--num-samples", "4", "--cfg-scale", "1,1.8", "--guidance-high", "0.7,1", "--count", "2"),
    ]

    # While it runs, neither this watcher nor a restarted one (same cluster, fresh process) creates more.
    assert watcher(api).run(once=True).processed == [] and len(api.calls) == 2
    restarted = StubBatchApi(existing=set(api.existing))
    assert watcher(restarted).run(once=True).processed == [] and restarted.calls == []

    # The pods run (in any order); the last to finish writes sweep.json where the watcher looks for it.
    for index in (1, 0):
        run_pod(swept, monkeypatch, index)
    source = ckpt.resolve_checkpoint(f"{run_url}/checkpoints/step-0000200", None)
    summary = json.loads(storage.read_bytes(WatchSweep(cfg).folder(source).join("sweep.json")))
    best = summary["best"]["fid"]
    assert summary["score"] == "FD_tiny-conv (4 samples)" and len(summary["cells"]) == 4
    api.conditions[name] = COMPLETE

    # Next poll: the ordinary eval Job of step 200, at the best cell's guidance.
    assert watcher(api).run(once=True).processed == [200] and len(api.calls) == 3
    (_, scored) = api.calls[-1]
    plan = plan_evaluation(WatchSweep(cfg).config_for(source), source)
    assert scored["metadata"]["name"] == jobs.job_name("my-release-eval", 200, plan.digest)
    assert "completionMode" not in scored["spec"]
    assert scored["spec"]["template"]["spec"]["containers"][0]["args"][-6:] == [
        *("--set", f"sample.cfg_scale={best['cfg_scale']!r}"),
        *("--set", f"sample.guidance_high={best['guidance_high']!r}"),
        *("--set", "eval.tensorboard_run=eval_best_guidance"),  # its own curve
    ]
    assert "at the sweep's best cell" in caplog.text
    run_pod(scored, monkeypatch)  # its pod writes the very result file the watcher waits for
    result = json.loads(storage.read_bytes(plan.result))
    assert result["num_samples"] == 8 and result["provenance"]["guidance.scale"] == best["cfg_scale"]
    api.conditions[scored["metadata"]["name"]] = COMPLETE
    assert watcher(api).run(once=True).processed == [] and len(api.calls) == 3
    committed, _ = ckpt.list_checkpoints(cfg.storage.locate(run_url))
    assert [s.step for s, _ in watcher(StubBatchApi()).pending(committed)] == [100]  # 200: done
    from repa.cluster.status import storage_view

    # `repa status` reads past sweep-*/ and lists the full-protocol score only, never the 4-sample cells
    (scores,) = [line for line in storage_view(cfg) if line.startswith("  scores:")]
    assert scores == f"  scores: step 200: FD_tiny-conv (8 samples) {result['fid']:.2f}"


def test_a_failing_sweep_job_is_retried_then_given_up_in_one_line(
    tmp_path, reference, caplog, capsys, monkeypatch
):
    import logging

    from repa.cluster import jobs
    from repa.cluster.status import storage_view
    from repa.config import ConfigError
    from repa.eval.watch import make_watcher

    _, cfg_path, cfg, template = sweep_run(tmp_path, reference, steps=(200,))
    api = StubBatchApi()
    watcher = lambda: make_watcher(  # noqa: E731
        cfg, launcher=jobs.JobLauncher(api, template), max_attempts=2, job_retry_seconds=0
    )
    monkeypatch.setattr(jobs, "batch_api", lambda: api)  # the in-cluster API of `repa watch --launch-jobs`
    argv = ("watch", "--config", cfg_path, "--once", "--launch-jobs", "--job-template")
    assert cli(*argv, str(tmp_path / "eval-job.yaml")) == 0
    assert "1 checkpoint(s) handled [200], 0 failed" in capsys.readouterr().out
    ((_, body),) = api.calls
    name = body["metadata"]["name"]
    assert "-sweep-" in name
    api.conditions[name] = FAILED
    assert watcher().run(once=True).processed == [200]  # deleted and created again, same name
    assert api.deleted == [name] and [b["metadata"]["name"] for _, b in api.calls] == [name, name]
    # The retry "completes" without a sweep.json (e.g. a pod's config differs): that is no success.
    api.conditions[name] = COMPLETE
    caplog.clear()
    report = watcher().run(once=True)
    assert report.failed == [200] and report.processed == [] and len(api.calls) == 2
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and "\n" not in errors[0]
    assert errors[0].startswith(f"sweep job {name} for checkpoint step 200 completed without writing ")
    assert "sweep.json 2 time(s); giving up (kubectl logs -n ml job/" in errors[0]
    # Final: a restarted watcher neither sweeps again nor scores the checkpoint some other way.
    assert watcher().run(once=True).failed == [] and len(api.calls) == 2
    assert any(f"step 200 {name} (failed, 2 attempt(s))" in line for line in storage_view(cfg))

    # A template whose container does not run `repa eval` cannot run the sweep: refused at start-up.
    template["spec"]["template"]["spec"]["containers"][0]["args"] = ["sample"]
    with pytest.raises(ConfigError, match=r"eval.sweep_every_nth: the eval Job template's container 'eval'"):
        make_watcher(cfg, launcher=jobs.JobLauncher(api, template))


# ----------------------------------------------------------------------------------------------
# Object storage
# ----------------------------------------------------------------------------------------------


def test_watch_on_s3_writes_results_and_tensorboard_to_the_bucket(tmp_path, reference, s3_bucket, capsys):
    run_url = f"{s3_bucket}/runs/tiny"
    cfg_path, _ = setup_run(tmp_path, run_url, reference, steps=(100, 200), sample={"save_npz": True})
    storage.write_bytes_atomic(f"{run_url}/checkpoints/step-0000300/state.pt", b"uncommitted")
    argv = ("watch", "--config", cfg_path, "--once", "--feature-extractor", FEATS, "--chunk-size", "4")
    assert cli(*argv, "--no-progress") == 0
    assert "2 checkpoint(s) handled [100, 200]" in capsys.readouterr().out
    for step in (100, 200):
        (name,) = storage.listdir(f"{run_url}/eval/step-{step:07d}")
        result = json.loads(storage.read_bytes(f"{run_url}/eval/step-{step:07d}/{name}"))
        samples_url = result["protocol"]["samples_url"]
        assert samples_url.startswith(f"{run_url}/samples/step-{step:07d}-")
        # samples.npz streamed to the bucket (multipart upload + server-side rename), ADM layout
        with np.load(io.BytesIO(storage.read_bytes(f"{samples_url}/samples.npz"))) as npz:
            assert npz["arr_0"].shape == (8, 16, 16, 3) and npz["arr_0"].dtype == np.uint8
        assert not [n for n in storage.listdir(samples_url) if n.startswith(".tmp-")]
    scalars = read_scalars(f"{run_url}/tensorboard/eval")
    assert [s for s, _ in scalars["eval/fd_tiny-conv"]] == [100, 200]
    assert cli(*argv, "--no-progress") == 0
    assert "0 checkpoint(s) handled" in capsys.readouterr().out


def test_the_watchers_own_sets_reach_every_job_it_creates(tmp_path, reference):
    """`repa watch --launch-jobs --set k=v`: the plans (and Job names) include the override, so the Jobs'
    `repa eval` and the sweep's pods get it too; else they would score another protocol than the
    watcher waits for."""
    from repa.cluster import jobs
    from repa.eval.watch import make_watcher

    _, _, cfg, template = sweep_run(tmp_path, reference)
    forward = ("--set", "sample.seed=3")
    api = StubBatchApi()
    make_watcher(cfg, launcher=jobs.JobLauncher(api, template), job_args=forward).run(once=True)
    (_, plain), (_, swept) = api.calls
    assert plain["spec"]["template"]["spec"]["containers"][0]["args"][-2:] == list(forward)
    args = swept["spec"]["template"]["spec"]["containers"][0]["args"]
    assert args[:2] == ["eval", "sweep"] and "sample.seed=3" in args


def test_a_sweep_cell_count_too_small_for_the_metrics_is_refused_at_start_up(tmp_path, reference, capsys):
    run_url = str(tmp_path / "run")
    cfg_path, _ = setup_run(
        tmp_path, run_url, reference, steps=(100,), eval={**SWEEP, "sweep_num_samples": 2}
    )
    assert cli("watch", "--config", cfg_path, "--once", "--no-progress") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "eval.sweep_num_samples: per sweep cell: 2 samples are too few" in err[0]
    assert not Path(run_url, "samples").exists()
