"""One writer per run: a lease object at ``{run_url}/LEASE`` that rank 0 of ``repa train`` holds.

Two trainers on one ``storage.run_url`` (two Helm releases, a re-submitted job) would interleave their
checkpoints under one ``config.yaml``; the second one's saves of a step the first already committed
would even be skipped as "already committed". So rank 0 takes the lease before its first write
(``config.yaml``), renews it every ``storage.lease_renew_seconds`` from a daemon thread and removes it
when the process ends. A second trainer refuses with a one-line :class:`LeaseError` naming the owner,
unless

- the lease belongs to the **same job** (``REPA_JOB_ID``, else torchrun's ``TORCHELASTIC_RUN_ID``: the
  rendezvous id, which the Kubeflow operator sets from the PyTorchJob, so a torchrun restart round and
  a pod the operator recreated are the same job), which is taken over silently;
- it is **stale**: no heartbeat for ``storage.lease_stale_seconds`` (its owner crashed or was SIGKILLed),
  or it names a process on this host that no longer exists; then it is taken over with a warning.

Object stores have no compare-and-swap that fsspec exposes, so two trainers starting in the same
second can both write; each reads the lease back after writing and the loser refuses. That narrows the
window to the store's read-after-write delay (S3 and GCS are strongly consistent), it does not close it.
A renewal that finds another owner marks the lease lost; the trainer stops (exit code 5) without saving.
Heartbeats compare wall clocks of different hosts: keep the stale time far above any clock skew.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from dataclasses import asdict, dataclass
from typing import Any

from repa import storage

log = logging.getLogger(__name__)

__all__ = ["LEASE_FILE", "Lease", "LeaseError", "LeaseRecord", "job_identity"]

LEASE_FILE = "LEASE"


class LeaseError(RuntimeError):
    """Another writer holds the run's lease (or took it over); the message names it."""


def job_identity() -> str | None:
    """This process's job: ``REPA_JOB_ID``, else torchrun's ``TORCHELASTIC_RUN_ID``, else None.

    torchrun's default run id (``--rdzv-id``) is the literal ``none``: every plain ``torchrun`` (and the
    Kubeflow Trainer's torch runtime, whose static rendezvous passes no id) has it, so it names no job.
    Then the job is this launch of torchrun: its elastic agent (our parent process) on this host, which
    stays the same across the agent's restart rounds and differs for every new launch. The chart sets
    ``REPA_JOB_ID`` for both backends (docs/kubernetes.md "One writer per run").
    """
    explicit = os.environ.get("REPA_JOB_ID")
    if explicit:
        return explicit
    run_id = os.environ.get("TORCHELASTIC_RUN_ID")
    if not run_id:
        return None
    if run_id == "none":
        return f"torchrun-{socket.gethostname()}-{os.getppid()}"
    return run_id


@dataclass(frozen=True)
class LeaseRecord:
    """The JSON stored at ``{run_url}/LEASE``."""

    owner: str
    job: str | None
    host: str
    pid: int
    started: float
    heartbeat: float

    def describe(self, now: float) -> str:
        started = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.started))
        return (
            f"owner {self.owner} (job {self.job or 'none'}, host {self.host}, pid {self.pid}, "
            f"started {started}, last heartbeat {max(0.0, now - self.heartbeat):.0f} s ago)"
        )

    @staticmethod
    def parse(data: bytes) -> LeaseRecord | None:
        try:
            raw = json.loads(data)
            return LeaseRecord(
                owner=str(raw["owner"]),
                job=raw.get("job"),
                host=str(raw["host"]),
                pid=int(raw["pid"]),
                started=float(raw["started"]),
                heartbeat=float(raw["heartbeat"]),
            )
        except (ValueError, KeyError, TypeError):
            return None  # unreadable: treated as no lease (and overwritten)


def _process_gone(record: LeaseRecord) -> bool:
    """True if ``record`` names a process on this host that no longer runs."""
    if record.host != socket.gethostname() or record.pid == os.getpid():
        return False
    try:
        os.kill(record.pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # exists, owned by someone else
        return False
    return False


class Lease:
    """The lease of one run, held by this process once :meth:`acquire` returned."""

    def __init__(
        self,
        run_url: str,
        *,
        stale_seconds: float,
        renew_seconds: float,
        storage_options: dict[str, Any] | None = None,
        job: str | None = None,
        clock: Any = time.time,
    ) -> None:
        self.url = storage.join(run_url, LEASE_FILE)
        self.run_url = run_url
        self.stale_seconds = float(stale_seconds)
        self.renew_seconds = float(renew_seconds)
        self.storage_options = storage_options
        self.job = job_identity() if job is None else job
        self.owner = uuid.uuid4().hex[:16]
        self.clock = clock
        self.started = clock()
        self.lost: str | None = None  # why the lease was lost (set by the heartbeat thread)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ reading and writing
    def read(self) -> LeaseRecord | None:
        try:
            data = storage.read_bytes(self.url, self.storage_options)
        except FileNotFoundError:
            return None
        return LeaseRecord.parse(data)

    def _write(self) -> None:
        record = LeaseRecord(
            owner=self.owner,
            job=self.job,
            host=socket.gethostname(),
            pid=os.getpid(),
            started=self.started,
            heartbeat=self.clock(),
        )
        storage.write_bytes_atomic(
            self.url, json.dumps(asdict(record), indent=1).encode(), self.storage_options
        )

    # ------------------------------------------------------------------ life cycle
    def acquire(self) -> None:
        """Take the lease (LeaseError if another live writer holds it), then start the heartbeat."""
        now = self.clock()
        current = self.read()
        if current is not None and current.owner != self.owner:
            age = now - current.heartbeat
            if self.job is not None and current.job == self.job:
                log.info("lease %s: taking over from an earlier process of job %s", self.url, self.job)
            elif age > self.stale_seconds:
                log.warning(
                    "lease %s is stale (%s, more than storage.lease_stale_seconds=%g): taking it over",
                    self.url,
                    current.describe(now),
                    self.stale_seconds,
                )
            elif _process_gone(current):
                log.warning(
                    "lease %s names process %d on this host, which is gone: taking it over",
                    self.url,
                    current.pid,
                )
            else:
                left = max(0.0, self.stale_seconds - age)
                raise LeaseError(
                    f"{self.run_url} is being trained by another process: {current.describe(now)}; stop it "
                    f"or use another storage.run_url (the lease goes stale in {left:.0f} s without a "
                    "heartbeat, storage.lease_stale_seconds)"
                )
        self._write()
        mine = self.read()
        if mine is None or mine.owner != self.owner:
            other = mine.describe(self.clock()) if mine is not None else "it vanished"
            raise LeaseError(f"{self.run_url}: another process took the lease at the same time: {other}")
        self._thread = threading.Thread(target=self._heartbeat, name="repa-lease", daemon=True)
        self._thread.start()

    def renew(self) -> None:
        """One heartbeat: rewrite the lease if it is still ours, else record it as lost."""
        current = self.read()
        if current is not None and current.owner != self.owner:
            self.lost = f"the lease of {self.run_url} was taken over by {current.describe(self.clock())}"
            log.error("%s; this trainer will stop", self.lost)
            return
        self._write()

    def check_held(self) -> None:
        """Fencing: raise :class:`LeaseError` naming the new owner unless this process still holds the
        lease. Called right before every write that makes state visible (``repa.checkpoint.store``).

        This body re-reads the record and compares the owner (a read-then-write window remains); a store
        that supports conditional writes replaces it with a generation/ETag fencing token, same name and
        semantics.
        """
        current = self.read()
        if current is not None and current.owner == self.owner:
            return
        who = current.describe(self.clock()) if current is not None else "nobody (the lease object is gone)"
        self.lost = self.lost or f"the lease of {self.run_url} was taken over by {who}"
        raise LeaseError(f"{self.lost}; this trainer writes nothing more")

    def _heartbeat(self) -> None:
        while not self._stop.wait(self.renew_seconds):
            try:
                self.renew()
            except Exception as e:  # storage trouble: the next heartbeat tries again
                log.warning("lease %s: heartbeat failed (%s: %s)", self.url, type(e).__name__, e)
            if self.lost:
                return

    def release(self, *, remove: bool = True) -> None:
        """Stop the heartbeat and (with ``remove``) delete the lease if it is still ours."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        if not remove or self.lost:
            return
        try:
            current = self.read()
            if current is not None and current.owner == self.owner:
                storage.remove(self.url, storage_options=self.storage_options)
        except Exception as e:
            log.warning(
                "lease %s: could not remove it (%s: %s); it goes stale by itself",
                self.url,
                type(e).__name__,
                e,
            )
