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
- it is **stale**: no heartbeat for ``storage.lease_stale_seconds`` (its owner crashed, froze or was
  SIGKILLed), or it names a process on this host that no longer exists; then it is taken over with a
  warning.

Exclusion is the store's, not a read-back: every write of the lease is conditional
(``repa.storage.conditional``): the first one is a create-if-absent, a renewal or a takeover replaces exactly
the version (ETag, GCS generation, content hash) that was read. Of two trainers starting at the same
moment, or two taking over one stale lease, the store lets one write win; the other gets a failed
precondition and refuses. A store that cannot do this refuses the run unless
``storage.lease_conditional_writes=false`` (then the lease is written plainly and read back: two
trainers started within the store's round-trip time can both win).

Fencing: each takeover raises the lease's ``generation`` (the fencing token); :meth:`Lease.check_held`
compares the store's lease with this process's and raises :class:`LeaseError` naming the new owner.
The trainer calls it right before every write that makes state visible to others: a checkpoint's
``COMMITTED`` marker (and its files, so an evicted upload stops early), ``QUARANTINED`` markers and
retention deletes. The other writes need no fence: files inside a step folder without ``COMMITTED``
are invisible to every reader, and TensorBoard events are a log, not the run's state. A trainer frozen
between the check and the write (milliseconds) can still write once: object stores offer no
condition across two objects.
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
from repa.config import ConfigError
from repa.storage import Location, conditional

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
    generation: int = 0
    """The fencing token: 1 for the first holder of the run's lease, +1 at every takeover."""

    def describe(self, now: float) -> str:
        started = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.started))
        return (
            f"owner {self.owner} (job {self.job or 'none'}, host {self.host}, pid {self.pid}, "
            f"started {started}, last heartbeat {max(0.0, now - self.heartbeat):.0f} s ago, "
            f"lease generation {self.generation})"
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
                generation=int(raw.get("generation", 0)),
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
        run: str | Location,
        *,
        stale_seconds: float,
        renew_seconds: float,
        conditional_writes: bool = True,
        job: str | None = None,
        clock: Any = time.time,
    ) -> None:
        run = storage.locate(run)
        self.location = run.join(LEASE_FILE)
        self.url = self.location.url
        self.run_url = run.url
        self.stale_seconds = float(stale_seconds)
        self.renew_seconds = float(renew_seconds)
        self.conditional_writes = conditional_writes
        self.job = job_identity() if job is None else job
        self.owner = uuid.uuid4().hex[:16]
        self.clock = clock
        self.started = clock()
        self.generation = 0  # the fencing token this process holds (LeaseRecord.generation)
        self.lost: str | None = None  # why the lease was lost (set by the heartbeat thread or a fence)
        self._token: str | None = None  # the store's version of the lease this process wrote last
        self._lock = threading.Lock()  # renewals (heartbeat thread) against fences (upload thread)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ reading and writing
    def _read(self) -> tuple[LeaseRecord | None, str | None]:
        """The stored record (None if absent or unreadable) and its version token (None if absent)."""
        if self.conditional_writes:
            found = conditional.read(self.location)
            if found is None:
                return None, None
            return LeaseRecord.parse(found.data), found.token
        try:
            data = storage.read_bytes(self.location)
        except FileNotFoundError:
            return None, None
        return LeaseRecord.parse(data), "plain"

    def read(self) -> LeaseRecord | None:
        return self._read()[0]

    def _record(self) -> bytes:
        record = LeaseRecord(
            owner=self.owner,
            job=self.job,
            host=socket.gethostname(),
            pid=os.getpid(),
            started=self.started,
            heartbeat=self.clock(),
            generation=self.generation,
        )
        return json.dumps(asdict(record), indent=1).encode()

    def _write(self, token: str | None) -> None:
        """Write this process's record: create if ``token`` is None, else replace version ``token``
        (``conditional.PreconditionFailed`` when the store holds something else)."""
        data = self._record()
        if not self.conditional_writes:  # storage.lease_conditional_writes=false: plain write
            storage.write_bytes_atomic(self.location, data)
            self._token = "plain"
        elif token is None:
            self._token = conditional.create(self.location, data)
        else:
            self._token = conditional.replace(self.location, data, token)

    def _mine_after_failed_write(self) -> tuple[bool, LeaseRecord | None]:
        """After a failed precondition: ``(mine, stored record)``; the record is adopted if it is this
        process's own (a retried write whose first attempt had landed, its answer lost)."""
        record, token = self._read()
        if record is not None and record.owner == self.owner:
            self._token = token
            return True, record
        return False, record

    # ------------------------------------------------------------------ life cycle
    def acquire(self) -> None:
        """Take the lease (LeaseError if another live writer holds it or wins the race for it), then
        start the heartbeat."""
        if self.conditional_writes:
            try:
                conditional.check(self.location)
            except conditional.Unsupported as e:
                raise ConfigError("storage.lease_conditional_writes", str(e)) from e
        for _ in range(3):  # a create that lost to another creator looks once more at the winner
            now = self.clock()
            current, token = self._read()
            if token is None:
                self.generation = 1
            elif current is not None and current.owner == self.owner:
                break
            elif current is not None:
                self._may_take_over(current, now)
                self.generation = current.generation + 1
            else:
                log.warning("lease %s is unreadable: replacing it", self.url)
                self.generation = 1
            try:
                self._write(token)
            except conditional.PreconditionFailed:
                mine, winner = self._mine_after_failed_write()
                if mine:
                    break
                if token is not None:
                    who = winner.describe(self.clock()) if winner is not None else "it was deleted"
                    raise LeaseError(
                        f"{self.run_url}: another process took the lease over at the same time: {who}; "
                        "stop it or use another storage.run_url"
                    ) from None
                continue  # another trainer created it first: judge that one
            break
        else:
            raise LeaseError(f"{self.run_url}: the lease keeps changing while it is taken; try again")
        if not self.conditional_writes:  # no exclusion by the store: narrow the race by reading back
            mine = self.read()
            if mine is None or mine.owner != self.owner:
                other = mine.describe(self.clock()) if mine is not None else "it vanished"
                raise LeaseError(f"{self.run_url}: another process took the lease at the same time: {other}")
        log.info("lease %s taken (generation %d)", self.url, self.generation)
        self._thread = threading.Thread(target=self._heartbeat, name="repa-lease", daemon=True)
        self._thread.start()

    def _may_take_over(self, current: LeaseRecord, now: float) -> None:
        """Return if ``current`` may be taken over (same job, stale, or its process is gone); else raise."""
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
                "lease %s names process %d on this host, which is gone: taking it over", self.url, current.pid
            )
        else:
            left = max(0.0, self.stale_seconds - age)
            raise LeaseError(
                f"{self.run_url} is being trained by another process: {current.describe(now)}; stop it "
                f"or use another storage.run_url (the lease goes stale in {left:.0f} s without a "
                "heartbeat, storage.lease_stale_seconds)"
            )

    def _lose(self, current: LeaseRecord | None) -> str:
        if current is None:
            self.lost = f"the lease of {self.run_url} is gone (taken over, then released or deleted)"
        else:
            self.lost = f"the lease of {self.run_url} was taken over by {current.describe(self.clock())}"
        return self.lost

    def renew(self) -> None:
        """One heartbeat: rewrite the lease if it is still ours (a conditional replace), else record
        it as lost."""
        with self._lock:
            if self.lost:
                return
            if not self.conditional_writes:
                current = self.read()
                if current is None or current.owner != self.owner:
                    log.error("%s; this trainer will stop", self._lose(current))
                    return
                self._write(self._token)
                return
            try:
                self._write(self._token)
            except conditional.PreconditionFailed:
                mine, other = self._mine_after_failed_write()
                if not mine:
                    log.error("%s; this trainer will stop", self._lose(other))

    def check_held(self) -> None:
        """The fence: raise :class:`LeaseError` (naming the new owner) unless the store's lease is
        still this process's (same owner, same generation). Call it right before a visible write."""
        with self._lock:
            if self.lost:
                raise LeaseError(f"{self.lost}; this trainer commits nothing more")
            current, _ = self._read()
            if current is None or current.owner != self.owner or current.generation != self.generation:
                log.error("%s; this trainer will stop", self._lose(current))
                raise LeaseError(f"{self.lost}; this trainer commits nothing more")

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
        if not remove or self.lost or self._token is None:
            return
        try:
            with self._lock:
                if self.conditional_writes:
                    conditional.delete(self.location, self._token)
                else:
                    current = self.read()
                    if current is not None and current.owner == self.owner:
                        storage.remove(self.location)
        except conditional.PreconditionFailed:
            log.info("lease %s: no longer ours at exit, left to its new owner", self.url)
        except Exception as e:
            log.warning(
                "lease %s: could not remove it (%s: %s); it goes stale by itself",
                self.url,
                type(e).__name__,
                e,
            )
