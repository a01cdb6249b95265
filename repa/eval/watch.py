"""`repa watch`: evaluate every newly committed checkpoint of a run once, in step order.

The watcher lists ``{run_url}/checkpoints`` every ``eval.watch_poll_seconds`` and handles each
committed checkpoint (``COMMITTED`` marker; uncommitted folders are never read) that is not done yet:

- in-process (default): ``repa eval`` of that checkpoint; done = its result JSON exists
  (``{run_url}/eval/step-NNNNNNN/result-<digest>.json``, see ``repa.eval.evaluate``);
- ``--launch-jobs``: one Kubernetes Job per checkpoint (``repa.cluster.jobs``), followed through a
  marker ``job-<digest>.json`` beside the result (``repa.eval.watch_jobs``): done = the result JSON, or
  the Job Complete; a Failed Job (or one gone without a result) is deleted and created again after a backoff,
  at most ``max_attempts`` times, then marked ``failed``; a checkpoint deleted by retention before its
  Job scored it is marked ``checkpoint-deleted``. Both marks are final (``repa status`` shows them).

With ``eval.sweep_every_nth`` (:class:`WatchSweep`) every Nth checkpoint is first swept over the guidance
grid at ``eval.sweep_num_samples`` per cell, then scored at the full protocol at the best cell: in-process
one after the other; with ``--launch-jobs`` as the sweep's Indexed Job (``eval.sweep_pods`` pods, the
manifest of ``repa eval-job --sweep``) and, once its ``sweep.json`` exists, the best cell's eval Job
(``repa.eval.watch_jobs.SweepJobs``), both followed like any eval Job.

State lives only in storage, so the watcher is idempotent and survives restarts: a new pod simply
resumes (a half-made sample set is reused chunk by chunk). Selection: every checkpoint, or with
``eval.watch_every_nth = n`` those whose index ``step / checkpoint.every_steps`` is a multiple of n
(stable under retention; the final ``train.max_steps`` checkpoint always counts), and with
``eval.watch_only_latest`` only the newest checkpoint (a backlog is skipped for good).

Failures: listing errors back off exponentially (``poll · 2^k``, capped); a checkpoint that fails to
evaluate is retried on later polls, at most ``max_attempts`` times per process; one deleted by
retention mid-evaluation is skipped. SIGTERM/SIGINT stop the loop at once and abandon a running
evaluation at its next batch, writing no result (finished sample chunks are kept); exit code 0.
``--once`` handles what is there and exits (tests, CronJobs).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

import repa.eval.evaluate as E
from repa import checkpoint as ckpt
from repa import storage
from repa.config import ConfigError, RunConfig
from repa.eval import sample as S
from repa.eval.args import (
    EVAL_FLAG_KEYS,
    add_eval_arguments,
    add_sampling_arguments,
    cli_error,
    flag_overrides,
    resolve_config,
)
from repa.eval.errors import EvalError, MetricsError
from repa.eval.evaluate import EvalProtocol
from repa.eval.stats import check_sample_count
from repa.eval.watch_jobs import DEFAULT_JOB_RETRY_SECONDS, JobProgress, JobTracker, SweepJobs
from repa.runtime import DistInfo, resolve_device

log = logging.getLogger(__name__)

__all__ = ["WatchReport", "WatchSweep", "Watcher", "add_arguments", "make_watcher", "run"]

DEFAULT_MAX_BACKOFF_SECONDS = 600.0
ONCE_LIST_ATTEMPTS = 5  # --once: listing attempts before giving up with exit code 1


@dataclass
class WatchReport:
    """What one ``run`` did (steps in processing order)."""

    processed: list[int] = field(default_factory=list)
    failed: list[int] = field(default_factory=list)
    skipped: list[int] = field(default_factory=list)  # vanished (retention) while being handled
    polls: int = 0
    stopped: bool = False


class Watcher:
    """Polls a run's checkpoints and hands each pending one to ``process`` (evaluate or launch a Job).

    ``process(source, plan)`` does the work; ``is_done(plan)`` says whether a checkpoint needs none.
    Both are injected so the same loop serves in-process evaluation, Job launching and tests.
    """

    def __init__(
        self,
        cfg: RunConfig,
        process: Callable[[ckpt.CheckpointSource, EvalProtocol], Any],
        is_done: Callable[[EvalProtocol], bool],
        *,
        plan: Callable[[ckpt.CheckpointSource], EvalProtocol],
        stop: threading.Event | None = None,
        max_attempts: int = 3,
        max_backoff_seconds: float = DEFAULT_MAX_BACKOFF_SECONDS,
    ) -> None:
        if not cfg.storage.run_url:
            raise ConfigError(
                "storage.run_url", "required by `repa watch` (the run whose checkpoints to watch)"
            )
        self.cfg = cfg
        self.run_url = cfg.storage.run_url.rstrip("/")
        self.run_at = cfg.storage.locate(self.run_url)
        self.process = process
        self.is_done = is_done
        self.plan = plan
        self.stop = stop or threading.Event()
        self.max_attempts = max_attempts
        self.max_backoff_seconds = max_backoff_seconds
        self.attempts: dict[int, int] = {}
        self.finished: set[int] = set()  # done, given up or vanished: not looked at again by this process

    # ------------------------------------------------------------------ selection
    def eligible(self, step: int) -> bool:
        n = self.cfg.eval.watch_every_nth
        if n <= 1 or step == self.cfg.train.max_steps:
            return True
        return step % (n * self.cfg.checkpoint.every_steps) == 0

    def pending(
        self, committed: list[ckpt.CheckpointRef]
    ) -> list[tuple[ckpt.CheckpointSource, EvalProtocol]]:
        """Committed, eligible, not yet done checkpoints in step order.

        With ``eval.watch_only_latest`` only the newest eligible checkpoint is considered: older ones
        are never gone back to, so a backlog is skipped for good.
        """
        refs = [ref for ref in sorted(committed) if self.eligible(ref.step)]
        if self.cfg.eval.watch_only_latest:
            refs = refs[-1:]
        out = []
        for ref in refs:
            if ref.step in self.finished:
                continue
            source = ckpt.CheckpointSource(ref.url, "run", ref.step, self.run_url, ref.options)
            plan = self.plan(source)
            if self.is_done(plan):
                self.finished.add(ref.step)
                continue
            out.append((source, plan))
        return out

    # ------------------------------------------------------------------ one poll
    def poll_once(self, report: WatchReport) -> None:
        """List once and handle every pending checkpoint. Listing errors propagate (the caller backs off)."""
        committed, partial = ckpt.list_checkpoints(self.run_at)
        report.polls += 1
        if partial:
            log.debug("ignoring %d uncommitted checkpoint folder(s): %s", len(partial), partial[:3])
        for source, plan in self.pending(committed):
            if self.stop.is_set():
                report.stopped = True
                return
            step = source.step
            assert step is not None
            log.info("handling checkpoint step %d (%s)", step, source.url)
            try:
                outcome = self.process(source, plan)
            except S.SamplingInterrupted:
                log.info("stop requested: abandoned checkpoint step %d without writing a result", step)
                report.stopped = True
                return
            except Exception as e:
                if not self._still_committed(source):
                    log.info("checkpoint step %d was deleted while being handled (retention); skipped", step)
                    self.finished.add(step)
                    report.skipped.append(step)
                    continue
                if storage.is_transient(e):
                    raise  # storage trouble: back off and retry the whole poll
                if isinstance(e, ckpt.CorruptCheckpointError):  # verification failed: never again
                    ckpt.quarantine_checkpoint(ckpt.CheckpointRef(step, source.url, source.options), str(e))
                    self.attempts[step] = self.max_attempts - 1
                self.attempts[step] = self.attempts.get(step, 0) + 1
                left = self.max_attempts - self.attempts[step]
                log.error(
                    "checkpoint step %d failed (%s: %s); %s",
                    step,
                    type(e).__name__,
                    e,
                    f"will retry ({left} attempt(s) left)" if left > 0 else "giving up on it",
                    exc_info=log.isEnabledFor(logging.DEBUG),
                )
                if left <= 0:
                    self.finished.add(step)
                    report.failed.append(step)
                continue
            if isinstance(outcome, JobProgress):  # Job mode: look again on later polls until final
                if outcome.action in ("launched", "relaunched"):
                    report.processed.append(step)
                elif outcome.action == "failed":
                    report.failed.append(step)
                elif outcome.action == "checkpoint-deleted":
                    report.skipped.append(step)
                if outcome.final:
                    self.finished.add(step)
                continue
            self.finished.add(step)
            report.processed.append(step)

    def _still_committed(self, source: ckpt.CheckpointSource) -> bool:
        try:
            return storage.exists(storage.Location(source.url, self.run_at.options).join(ckpt.MARKER))
        except Exception:
            return True  # cannot tell: assume it is there (the error is then handled as a failure)

    # ------------------------------------------------------------------ loop
    def run(self, once: bool = False) -> WatchReport:
        """Poll until stopped (or one successful poll with ``once``)."""
        report = WatchReport()
        failures = 0
        poll = float(self.cfg.eval.watch_poll_seconds)
        while not self.stop.is_set():
            try:
                self.poll_once(report)
                failures = 0
                delay = poll
            except Exception as e:
                if not (storage.is_transient(e) or isinstance(e, (storage.StorageError, OSError))):
                    raise
                failures += 1
                delay = min(self.max_backoff_seconds, poll * 2 ** (failures - 1))
                log.warning(
                    "listing %s failed (%s: %s); retrying in %.0f s", self.run_url, type(e).__name__, e, delay
                )
                if once and failures >= ONCE_LIST_ATTEMPTS:
                    raise
                if once:
                    self.stop.wait(min(delay, 2.0 * failures))
                    continue
            if report.stopped or once:
                break
            self.stop.wait(delay)
        report.stopped = report.stopped or self.stop.is_set()
        return report


# ----------------------------------------------------------------------------------------------
# Wiring: in-process evaluation or Job launching
# ----------------------------------------------------------------------------------------------


def _check_eval_inputs(cfg: RunConfig) -> None:
    """Fail at start-up (not once per checkpoint) when the evaluation can never work."""
    cfg.require_for("eval")
    if not storage.exists(cfg.storage.locate(cfg.eval.reference_stats_url)):
        raise EvalError(f"eval.reference_stats_url: {cfg.eval.reference_stats_url} not found")
    url = cfg.eval.inception_weights_url
    if not cfg.eval.feature_extractor and url and not storage.exists(cfg.storage.locate(url)):
        raise EvalError(f"eval.inception_weights_url: {url} not found")


def make_watcher(
    cfg: RunConfig,
    *,
    check_config: bool = True,
    progress: bool = False,
    launcher: Any = None,
    stop: threading.Event | None = None,
    max_attempts: int = 3,
    job_retry_seconds: float = DEFAULT_JOB_RETRY_SECONDS,
    job_args: tuple[str, ...] = (),
) -> Watcher:
    """A Watcher that evaluates in this process, or launches Jobs through ``launcher`` (a JobLauncher);
    ``job_args``: the watcher's ``--set`` lines, forwarded to every Job's ``repa eval``."""
    stop = stop or threading.Event()
    sweeps = WatchSweep(cfg) if cfg.eval.sweep_every_nth else None

    def plan(source: ckpt.CheckpointSource) -> EvalProtocol:
        return E.plan_evaluation(sweeps.config_for(source) if sweeps else cfg, source)

    if launcher is None:
        device = resolve_device(cfg.train.device)
        info = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device(device))
        cache: dict[Any, Any] = {}  # reference statistics and feature network, loaded once

        def process(source: ckpt.CheckpointSource, plan_: EvalProtocol) -> Any:
            chosen = sweeps.config_for(source) if sweeps else cfg
            if sweeps is not None and chosen is cfg and sweeps.applies(source):  # not swept yet
                sweeps.run(
                    source, info=info, check_config=check_config, progress=progress, should_stop=stop.is_set
                )
                chosen = sweeps.config_for(source)
            return E.evaluate_checkpoint(
                chosen,
                source,
                info=info,
                check_config=check_config,
                progress=progress,
                should_stop=stop.is_set,
                cache=cache,
            )

        def is_done(plan_: EvalProtocol) -> bool:
            return storage.exists(plan_.result)

    else:
        tracker = JobTracker(
            launcher, max_attempts=max_attempts, retry_seconds=job_retry_seconds, forward=job_args
        )
        process, is_done = tracker.process, tracker.is_done
        if sweeps is not None:  # the sweep's Indexed Job first, then the best cell's eval Job
            swept = SweepJobs(tracker, sweeps, cfg.eval.sweep_pods)
            process, is_done = swept.process, swept.is_done

    return Watcher(cfg, process, is_done, plan=plan, stop=stop, max_attempts=max_attempts)


class WatchSweep:
    """``eval.sweep_every_nth``: every Nth checkpoint gets a guidance sweep at ``eval.sweep_num_samples``
    (repa.eval.sweep), then the full-protocol evaluation uses its best cell (lowest Fréchet distance).

    The sweep's ``sweep.json`` is the state: once it exists, the checkpoint's plan is the best cell's, so
    a restarted watcher finds the checkpoint done by that result file.
    """

    def __init__(self, cfg: RunConfig) -> None:
        from repa.eval import sweep

        self.cfg, self.sweep = cfg, sweep
        self.grid = sweep.SweepGrid(tuple(cfg.eval.sweep_cfg_scales), tuple(cfg.eval.sweep_guidance_highs))
        tree = cfg.to_dict()
        tree["sample"]["num_samples"] = cfg.eval.sweep_num_samples
        self.small = RunConfig.from_dict(tree)
        self._folders: dict[tuple[str, int | None], storage.Location] = {}
        try:  # at start-up, not as a failed evaluation per checkpoint
            check_sample_count(
                cfg.eval.sweep_num_samples,
                "per sweep cell",
                # IS only from Inception's logits (a custom network without them scores no IS)
                is_splits=E.IS_SPLITS
                if "is" in cfg.eval.metrics and not cfg.eval.feature_extractor
                else None,
                pr_k=E.PR_K if "precision_recall" in cfg.eval.metrics else None,
            )
        except MetricsError as e:
            raise ConfigError("eval.sweep_num_samples", str(e)) from None

    def applies(self, source: ckpt.CheckpointSource) -> bool:
        index = (source.step or 0) // self.cfg.checkpoint.every_steps
        return index % self.cfg.eval.sweep_every_nth == 0

    def run(self, source: ckpt.CheckpointSource, **kwargs: Any) -> Any:
        return self.sweep.run_sweep(self.small, source, self.grid, **kwargs)

    def folder(self, source: ckpt.CheckpointSource) -> storage.Location:
        """``sweep-<digest>`` of this checkpoint (repa.eval.sweep.sweep_folder at sweep_num_samples);
        kept per checkpoint: every poll asks for it several times, and it plans every cell."""
        key = (source.url, source.step)
        if key not in self._folders:
            self._folders[key] = self.sweep.sweep_folder(self.small, source, self.grid)
        return self._folders[key]

    def pending(self, source: ckpt.CheckpointSource) -> bool:
        """The sweep applies to this checkpoint and its ``sweep.json`` is not written yet."""
        return self.applies(source) and not storage.exists(self.folder(source).join("sweep.json"))

    def config_for(self, source: ckpt.CheckpointSource) -> RunConfig:
        """The best cell's config once this checkpoint's sweep is summarised, else the configured one."""
        if not self.applies(source):
            return self.cfg
        at = self.folder(source).join("sweep.json")
        if not storage.exists(at):
            return self.cfg
        best = json.loads(storage.read_bytes(at))["best"]["fid"]
        return self.sweep.cell_config(
            self.cfg, best["cfg_scale"], best["guidance_high"], tensorboard_run=self.best_cell_run
        )

    @property
    def best_cell_run(self) -> str:
        """The TensorBoard run of the best cells' scores: a curve of its own, never mixed with the
        configured guidance's (``eval/fid`` of ``eval.tensorboard_run``)."""
        return f"{self.cfg.eval.tensorboard_run}_best_guidance"

    def job(
        self, launcher: Any, source: ckpt.CheckpointSource, pods: int, forward: tuple[str, ...] = ()
    ) -> dict[str, Any]:
        """The sweep's Indexed Job (``repa eval-job --sweep``'s manifest, repa.eval.sweep.sweep_job) over
        this grid, ``pods`` indices, ``eval.sweep_num_samples`` per cell, so its pods write the very
        ``sweep.json`` that :meth:`config_for` reads."""
        assert source.step is not None
        body = launcher.render(
            source.url,
            source.step,
            E.plan_evaluation(self.cfg, source).digest,
            (*forward, "--num-samples", str(self.cfg.eval.sweep_num_samples)),
        )
        return self.sweep.sweep_job(
            body, self.grid, pods, self.sweep.sweep_digest(self.small, source, self.grid)
        )


# ----------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from repa.cluster.jobs import DEFAULT_TEMPLATE_PATH

    add_sampling_arguments(parser)
    add_eval_arguments(parser)
    parser.add_argument("--once", action="store_true", help="handle the checkpoints there now, then exit")
    parser.add_argument(
        "--launch-jobs",
        action="store_true",
        help="create one Kubernetes Job per checkpoint (in-cluster API) instead of evaluating here "
        "(with eval.sweep_every_nth: first the sweep's Indexed Job)",
    )
    parser.add_argument(
        "--job-template",
        default=os.environ.get("REPA_EVAL_JOB_TEMPLATE", DEFAULT_TEMPLATE_PATH),
        metavar="PATH",
        help="Job manifest template for --launch-jobs "
        f"(default: $REPA_EVAL_JOB_TEMPLATE, else {DEFAULT_TEMPLATE_PATH})",
    )
    parser.add_argument("--namespace", help="namespace of the Jobs (default: template's, else the pod's)")
    parser.add_argument(
        "--job-name-prefix", help="Job names are PREFIX-step-NNNNNNN-<digest> (default: template name)"
    )
    parser.add_argument(
        "--max-attempts",
        type=int,
        default=3,
        help="evaluations of one checkpoint before giving up (default 3; with --launch-jobs: Jobs created)",
    )
    parser.add_argument(
        "--job-retry-seconds",
        type=float,
        default=DEFAULT_JOB_RETRY_SECONDS,
        help=f"--launch-jobs: wait before re-creating a failed Job, doubled per attempt "
        f"(default {DEFAULT_JOB_RETRY_SECONDS:.0f})",
    )


def run(args: argparse.Namespace) -> int:
    from repa.weights import WeightsError

    verb = resolve_config(args, EVAL_FLAG_KEYS, checkpoint=False, require_for="watch")
    cfg, explicit = verb.cfg, verb.explicit
    launcher = None
    try:
        if args.launch_jobs:
            from repa.cluster import jobs

            template = jobs.load_job_template(args.job_template)
            launcher = jobs.JobLauncher(
                jobs.batch_api(), template, namespace=args.namespace, name_prefix=args.job_name_prefix
            )
            cfg.require_for("eval")
        else:
            _check_eval_inputs(cfg)
    except (EvalError, MetricsError, WeightsError, RuntimeError) as e:
        return cli_error("watch", e)

    stop = threading.Event()

    def on_signal(signum: int, frame: Any) -> None:
        log.info("received %s: stopping", signal.Signals(signum).name)
        stop.set()

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        watcher = make_watcher(
            cfg,
            check_config=explicit,
            progress=not args.no_progress,
            launcher=launcher,
            stop=stop,
            max_attempts=args.max_attempts,
            job_retry_seconds=args.job_retry_seconds,
            job_args=tuple(
                a
                for o in [*(args.overrides or []), *flag_overrides(args, EVAL_FLAG_KEYS)]
                for a in ("--set", o)
            ),
        )
        log.info(
            "watching %s (%s, every %d s)",
            ckpt.checkpoints_url(cfg.storage.run_url),
            "launching Jobs" if launcher else "evaluating in-process",
            cfg.eval.watch_poll_seconds,
        )
        try:
            report = watcher.run(once=args.once)
        except (storage.StorageError, OSError) as e:
            return cli_error("watch", e)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    print(
        f"watch: {len(report.processed)} checkpoint(s) handled {report.processed}, "
        f"{len(report.failed)} failed {report.failed}{' (stopped)' if report.stopped else ''}"
    )
    # --once (CronJob, tests): failures show in the exit code, also a checkpoint that failed in this one
    # poll and would only be retried by a later one; a watcher stopped by SIGTERM exits 0.
    refused = sorted(set(watcher.attempts) - watcher.finished)
    if args.once and refused:
        print(f"watch: {len(refused)} checkpoint(s) failed and not retried (--once) {refused}")
    return 1 if (args.once and (report.failed or refused)) else 0
