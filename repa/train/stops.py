"""Why a run stops at a step boundary, behind one :meth:`Stops.poll`: a signal (SIGTERM: preemption;
SIGINT: Ctrl-C), a failed background upload, a lost lease.

Every rank must stop at the same step (they run in lock-step, and the elastic PyTorchJob succeeds as
soon as any worker exits 0), but a signal reaches one process and the upload and the lease live on rank
0. So each rank's :meth:`Stops.flags` travel in the step's one all-reduce (the health verdict's, see
``Trainer.train_step``): a flag reduced by mean is > 0 on every rank when it was set on any.

Ctrl-C keeps the work (docs/kubernetes.md, "Exit codes"): the first SIGINT is handled as SIGTERM --
commit a checkpoint at the end of the step, say which, exit 130 -- and a second one aborts at once,
naming the last committed checkpoint. A terminal sends Ctrl-C to every process of the foreground group
and torchrun forwards the SIGINT it gets to its workers, so one keypress can arrive twice within
milliseconds; a second SIGINT counts only when it comes more than :data:`SECOND_SIGINT_AFTER_S` later.
"""

from __future__ import annotations

import logging
import signal
import time
from collections.abc import Callable, Sequence
from typing import Any

from repa import storage
from repa.checkpoint import BackgroundSaver
from repa.lease import Lease, LeaseError

log = logging.getLogger(__name__)

PREEMPTED_EXIT_CODE = 143  # 128 + SIGTERM: the operator recreates the pod; 0 would end the job
INTERRUPTED_EXIT_CODE = 130  # 128 + SIGINT: Ctrl-C, after the checkpoint of the step was committed
SECOND_SIGINT_AFTER_S = 1.0
FLAGS = ("sigterm", "sigint", "upload_failed", "lease_lost")


class UploadFailedError(storage.StorageError):
    """Rank 0's background checkpoint upload failed; raised on the other ranks (rank 0 raises the cause)."""


class Stops:
    """The stop conditions of one process; ``last_committed`` describes the newest committed checkpoint
    for the message of an abort (a callable, so it is read when the second Ctrl-C comes)."""

    def __init__(
        self,
        saver: BackgroundSaver,
        lease: Callable[[], Lease | None],
        last_committed: Callable[[], str],
        *,
        is_main: bool,
    ) -> None:
        self.saver = saver
        self.lease = lease
        self.last_committed = last_committed
        self.is_main = is_main
        self.signals: set[int] = set()
        self._first_sigint: float | None = None

    def install(self) -> None:
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)

    def _on_signal(self, signum: int, frame: Any) -> None:
        now = time.monotonic()
        if signum == signal.SIGINT and self._first_sigint is not None:
            if now - self._first_sigint > SECOND_SIGINT_AFTER_S:
                in_flight = f"; the upload of step {self.saver.step} is abandoned" if self.saver.busy else ""
                log.error(
                    "second Ctrl-C: aborting now; last committed: %s%s", self.last_committed(), in_flight
                )
                raise KeyboardInterrupt
            return
        if signum == signal.SIGINT:
            self._first_sigint = now
            log.warning(
                "Ctrl-C: will commit a checkpoint at the end of this step and exit %d "
                "(press Ctrl-C again to abort at once)",
                INTERRUPTED_EXIT_CODE,
            )
        else:
            log.warning(
                "received signal %d: will commit a checkpoint at the end of this step and exit", signum
            )
        self.signals.add(signum)

    def flags(self) -> list[float]:
        """This process's flags, in :data:`FLAGS` order (1.0 set, 0.0 not), for the step's all-reduce."""
        lease = self.lease() if self.is_main else None
        return [
            float(signal.SIGTERM in self.signals),
            float(signal.SIGINT in self.signals),
            float(self.is_main and self.saver.failed()),
            float(lease is not None and bool(lease.lost)),
        ]

    def poll(self, agreed: Sequence[float]) -> int | None:
        """The exit code to stop with after this step (None: go on), from the all-reduced flags.

        Raises the upload's own error (rank 0; :class:`UploadFailedError` elsewhere) or
        :class:`repa.lease.LeaseError`: those runs commit nothing more.
        """
        sigterm, sigint, upload_failed, lease_lost = (v > 0 for v in agreed)
        if lease_lost:  # first: a lost lease also fails the upload it fenced; every rank exits 5
            lease = self.lease()
            raise LeaseError(lease.lost if lease is not None and lease.lost else "rank 0 lost the lease")
        if upload_failed:
            if self.is_main:
                self.saver.wait()  # raises the upload's own error (operation + URL)
            raise UploadFailedError("rank 0's checkpoint upload failed (its log names the operation)")
        if sigint:
            return INTERRUPTED_EXIT_CODE
        if sigterm:
            return PREEMPTED_EXIT_CODE
        return None
