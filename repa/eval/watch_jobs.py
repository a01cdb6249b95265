"""`repa watch --launch-jobs`: one Kubernetes Job per checkpoint, followed through storage and its status.

The watcher (``repa.eval.watch``) decides which checkpoints to evaluate; in Job mode it hands each one
to :class:`JobTracker`, which creates the eval Job (``repa.cluster.jobs.JobLauncher``: the release's
eval-job template), records it in a ``job-<digest>.json`` marker beside the result file, and on every
poll reports it done, running, retried (``retry_seconds · 2^(attempts-1)``, capped) or given up
(``failed``, ``checkpoint-deleted``: final marks ``repa status`` shows). With ``eval.sweep_every_nth``
:class:`SweepJobs` first runs the checkpoint's guidance sweep as one Indexed Job, then the eval Job
of its best cell. Every state is in storage or in Job names that depend only on the checkpoint and the
protocol, so a restarted watcher picks up where the last one stopped.
"""

from __future__ import annotations

import datetime
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import repa.eval.evaluate as E
from repa import checkpoint as ckpt
from repa import storage
from repa.cluster.jobs import JobStatus
from repa.config import ConfigError
from repa.eval.evaluate import EvalProtocol

log = logging.getLogger(__name__)

__all__ = ["JobProgress", "JobTracker", "SweepJobs", "TrackedJob", "launch_marker_url"]

DEFAULT_JOB_RETRY_SECONDS = 60.0  # first wait before re-creating a failed eval Job; doubles per attempt
DEFAULT_MAX_RETRY_SECONDS = 600.0  # the cap of that doubling


def launch_marker_url(plan: EvalProtocol) -> storage.Location:
    """``job-<digest>.json`` beside the result file: the Job for this protocol has been created."""
    folder, _, name = plan.result.url.rpartition("/")
    return storage.Location(f"{folder}/job-{name.removeprefix('result-')}", plan.result.options)


@dataclass(frozen=True)
class JobProgress:
    """What Job mode did with one checkpoint on this poll (:class:`JobTracker`)."""

    action: str  # launched, relaunched, running, waiting, succeeded, failed, checkpoint-deleted
    job: str = ""

    @property
    def final(self) -> bool:
        return self.action in ("succeeded", "failed", "checkpoint-deleted")


@dataclass(frozen=True)
class TrackedJob:
    """One Job the watcher follows for one checkpoint: an eval Job, or a guidance sweep's Indexed Job."""

    what: str  # "eval job" / "sweep job", for the log lines
    source: ckpt.CheckpointSource
    marker: storage.Location  # job-<digest>.json: the Job's state in storage
    output: storage.Location  # what the Job writes when it succeeds: the result JSON, sweep.json
    create: Callable[[], Any]  # creates the Job (a JobLauncher call), returns its LaunchResult
    complete_is_done: bool = True  # a Complete Job counts as done even before its output is seen


class JobTracker:
    """Job mode: one eval Job per checkpoint, followed through its marker and the Job's status.

    The marker (``job-<digest>.json``: job, namespace, created, checkpoint_url, result_url, time, attempts,
    state, retry_at) is the state, so a restarted watcher carries on. A Failed Job, or one gone (TTL)
    without a result, is retried ``retry_seconds · 2^(attempts-1)`` (capped) after the failure was seen:
    deleted, then created again under the same name (``repa eval-job`` stays idempotent). After
    ``max_attempts`` it is marked ``failed``; a checkpoint deleted by retention before its Job scored it
    is marked ``checkpoint-deleted`` and not retried (it can never succeed). :meth:`follow` does this for
    any :class:`TrackedJob` (:class:`SweepJobs` uses it for the sweep's Indexed Job).
    """

    FINAL = ("failed", "checkpoint-deleted")

    def __init__(
        self,
        launcher: Any,
        *,
        max_attempts: int = 3,
        retry_seconds: float = DEFAULT_JOB_RETRY_SECONDS,
        max_retry_seconds: float = DEFAULT_MAX_RETRY_SECONDS,
        clock: Callable[[], float] = time.time,
        forward: tuple[str, ...] = (),
    ) -> None:
        self.launcher = launcher
        # The watcher's own --set lines: its plans (and so the Jobs' names) include them, so the Jobs'
        # `repa eval` must run with them too, after the ConfigMap's config.
        self.forward = tuple(forward)
        self.max_attempts = max_attempts
        self.retry_seconds = retry_seconds
        self.max_retry_seconds = max_retry_seconds
        self.clock = clock

    @staticmethod
    def read_marker(at: storage.Location) -> dict[str, Any] | None:
        try:
            return json.loads(storage.read_bytes(at))
        except FileNotFoundError:
            return None

    def is_final(self, at: storage.Location) -> bool:
        """The marker at ``at`` says its Job was given up for good (``failed``, ``checkpoint-deleted``)."""
        marker = self.read_marker(at)
        return marker is not None and marker.get("state") in self.FINAL

    def is_done(self, plan: EvalProtocol) -> bool:
        return storage.exists(plan.result) or self.is_final(launch_marker_url(plan))

    def process(
        self, source: ckpt.CheckpointSource, plan: EvalProtocol, args: tuple[str, ...] = ()
    ) -> JobProgress:
        """Follow the eval Job of ``plan`` (``args``: extra ``repa eval`` arguments of its container)."""
        assert source.step is not None
        step = source.step
        return self.follow(
            TrackedJob(
                "eval job",
                source,
                launch_marker_url(plan),
                plan.result,
                lambda: self.launcher.launch(source.url, step, plan.digest, (*self.forward, *args)),
            )
        )

    @staticmethod
    def _write(at: storage.Location, marker: dict[str, Any]) -> None:
        storage.write_bytes_atomic(at, json.dumps(marker, indent=1).encode())

    def _launch(self, job: TrackedJob, attempts: int) -> dict[str, Any]:
        result = job.create()
        marker = {
            "job": result.name,
            "namespace": result.namespace,
            "created": result.created,
            "checkpoint_url": job.source.url,
            "result_url": job.output.url,
            "time": datetime.datetime.now(datetime.timezone.utc).isoformat(),
            "attempts": attempts,
            "state": "launched",
        }
        self._write(job.marker, marker)
        return marker

    def follow(self, job: TrackedJob) -> JobProgress:
        """Create the Job once, then on each poll: done, still running, or failed (retry, give up)."""
        marker = self.read_marker(job.marker)
        if marker is None:
            return JobProgress("launched", self._launch(job, 1)["job"])
        name, step = marker["job"], job.source.step
        status = self.launcher.status(name)
        if storage.exists(job.output) or (status == JobStatus.SUCCEEDED and job.complete_is_done):
            return JobProgress("succeeded", name)
        if status == JobStatus.RUNNING:
            return JobProgress("running", name)
        # Failed, gone without a result, or complete without its output.
        if not storage.exists(storage.Location(job.source.url, job.output.options).join(ckpt.MARKER)):
            log.info(
                "checkpoint step %d was deleted (retention) before %s %s scored it; not retried",
                step,
                job.what,
                name,
            )
            self._write(job.marker, {**marker, "state": "checkpoint-deleted"})
            return JobProgress("checkpoint-deleted", name)
        why = {
            JobStatus.FAILED: "failed",
            JobStatus.SUCCEEDED: f"completed without writing {job.output.url}",
        }.get(status, "vanished without a result")
        attempts = int(marker.get("attempts", 1))
        if attempts >= self.max_attempts:
            log.error(
                "%s %s for checkpoint step %d %s %d time(s); giving up (kubectl logs -n %s job/%s)",
                job.what,
                name,
                step,
                why,
                attempts,
                self.launcher.namespace,
                name,
            )
            self._write(job.marker, {**marker, "state": "failed"})
            return JobProgress("failed", name)
        now = self.clock()
        if marker.get("retry_at") is None:
            delay = min(self.max_retry_seconds, self.retry_seconds * 2 ** (attempts - 1))
            log.warning(
                "%s %s for checkpoint step %d %s (attempt %d of %d); retrying in %.0f s",
                job.what,
                name,
                step,
                why,
                attempts,
                self.max_attempts,
                delay,
            )
            marker = {**marker, "retry_at": now + delay}
            self._write(job.marker, marker)
        if now < marker["retry_at"]:
            return JobProgress("waiting", name)
        self.launcher.delete(name)
        return JobProgress("relaunched", self._launch(job, attempts + 1)["job"])


class SweepJobs:
    """Job mode with ``eval.sweep_every_nth``: a checkpoint the sweep applies to first gets the sweep's
    Indexed Job (:meth:`WatchSweep.job`, ``eval.sweep_pods`` indices sharing the cells), followed like an
    eval Job through ``job-sweep-<digest>.json`` beside the results (retries, ``max_attempts``, final
    marks); once its ``sweep.json`` exists, the ordinary eval Job of the best cell
    (``--set sample.cfg_scale=W --set sample.guidance_high=H``). Other checkpoints get their eval Job.

    State is storage (``sweep.json``, result JSONs, markers) and Job names that depend only on the
    checkpoint and the protocol, so a restarted watcher neither repeats a sweep nor creates a second
    sweep Job while one runs (its marker names it; a lost marker still meets the same name: HTTP 409).
    A sweep Job that completes without ``sweep.json`` is retried like a failed one: its finished cells
    are kept, so the retry only writes the summary.
    """

    def __init__(self, tracker: JobTracker, sweeps: Any, pods: int) -> None:  # sweeps: watch.WatchSweep
        self.tracker, self.sweeps, self.pods = tracker, sweeps, pods
        # At start-up, not once per checkpoint: the sweep's pods run `repa eval sweep` in its place.
        for container in tracker.launcher.template["spec"]["template"]["spec"]["containers"]:
            if (container.get("args") or [None])[0] != "eval":
                raise ConfigError(
                    "eval.sweep_every_nth",
                    f"the eval Job template's container {container.get('name')!r} does not run `repa eval` "
                    "(args: [eval, ...]), so it cannot run the sweep; fix --job-template or set 0",
                )

    def marker_url(self, source: ckpt.CheckpointSource) -> storage.Location:
        folder = self.sweeps.folder(source)
        parent, _, name = folder.url.rpartition("/")
        return storage.Location(f"{parent}/job-{name}.json", folder.options)

    def is_done(self, plan: EvalProtocol) -> bool:
        if self.tracker.is_done(plan):
            return True
        return self.sweeps.pending(plan.source) and self.tracker.is_final(self.marker_url(plan.source))

    def process(self, source: ckpt.CheckpointSource, plan: EvalProtocol) -> JobProgress:
        if self.sweeps.pending(source):
            sweep = self.tracker.follow(
                TrackedJob(
                    "sweep job",
                    source,
                    self.marker_url(source),
                    self.sweeps.folder(source).join("sweep.json"),
                    lambda: self.tracker.launcher.create(
                        self.sweeps.job(self.tracker.launcher, source, self.pods, self.tracker.forward)
                    ),
                    complete_is_done=False,
                )
            )
            if sweep.action != "succeeded":
                return sweep
        chosen = self.sweeps.config_for(source)  # the best cell's once sweep.json exists
        args: tuple[str, ...] = ()
        if chosen is not self.sweeps.cfg:
            s = chosen.sample
            args = (
                "--set",
                f"sample.cfg_scale={s.cfg_scale!r}",
                "--set",
                f"sample.guidance_high={s.guidance_high!r}",
                "--set",
                f"eval.tensorboard_run={chosen.eval.tensorboard_run}",
            )
        progress = self.tracker.process(source, E.plan_evaluation(chosen, source), args)
        if args and progress.action == "launched":
            log.info(
                "eval job %s: step %s at the sweep's best cell (cfg_scale %g, guidance_high %g)",
                progress.job,
                source.step,
                chosen.sample.cfg_scale,
                chosen.sample.guidance_high,
            )
        return progress
