"""The trainer's checkpoints: which parts a checkpoint holds, resume, saves on the cadence in the
background, the barriers that wait for them, and the deletions of a health rollback.

As torchtitan's ``CheckpointManager``, the :class:`Checkpointer` owns *Stateful* parts (objects with
``state_dict()``/``load_state_dict()``): model, EMA, optimiser, reader, health guard, each under its own
key of ``state.pt``, and the trainer itself, whose entries (``step``, ``samples_consumed``, the RNG scheme,
config, world size) sit at the top level as in every ``state.pt`` written before. Nothing else goes in.

- **Resume**: rank 0 picks the newest committed checkpoint that verifies (quarantining broken ones,
  ``repa.checkpoint.load_latest_verified``); every rank loads that one.
- **Saves do not stall training**: rank 0 copies the state to CPU and a background thread serializes,
  uploads and commits it (``repa.checkpoint.BackgroundSaver``); a later save, the end of the run and a stop
  wait for it. No rank waits in a collective with the process-group timeout for an upload: waits happen in
  a barrier of a gloo group whose timeout covers the storage deadline.
- **Fencing** (``repa.checkpoint.store``): every write that makes state visible checks first that this
  process still holds the run's lease (:meth:`repa.lease.Lease.check_held`); an evicted trainer commits
  nothing, and :meth:`abandon` joins the upload thread before the process exits.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from datetime import timedelta
from typing import Any, Protocol

import torch

from repa import checkpoint as ckpt
from repa import runtime as D
from repa import storage
from repa.config import ConfigError, RunConfig
from repa.lease import Lease, LeaseError

log = logging.getLogger(__name__)


def claim_run(cfg: RunConfig, info: D.DistInfo) -> Lease | None:
    """Before any other work: rank 0 writes (and removes) a probe object, takes the run's lease
    (returned) and records the resolved config beside the run; every rank learns the outcome (so none
    waits in a collective for a rank 0 that failed)."""
    failure: tuple[str, str] | None = None
    error: Exception | None = None
    lease: Lease | None = None
    if info.is_main:
        try:
            lease = _probe_and_lease(cfg)
        except (ConfigError, LeaseError, storage.StorageError) as e:
            error = e
            kind = "config" if isinstance(e, ConfigError) else "lease" if isinstance(e, LeaseError) else "io"
            failure = (kind, str(e))
    failure = D.broadcast_object(info, failure)
    if error is not None:
        raise error
    if failure is not None:  # rank 0 failed; the others end with its message
        kind, message = failure
        if kind == "config":
            raise ConfigError(message)
        if kind == "lease":
            raise LeaseError(message)
        raise storage.StorageError(message, operation="(rank 0)")
    return lease


def _probe_and_lease(cfg: RunConfig) -> Lease:
    run = cfg.storage.locate(cfg.storage.run_url)
    probe = run.join(f".write-probe-{uuid.uuid4().hex}")
    try:
        storage.write_bytes_atomic(probe, b"ok")
        storage.remove(probe)
    except storage.StorageError:
        raise
    except Exception as e:
        raise ConfigError("storage.run_url", f"{cfg.storage.run_url} is not writable: {e}") from e
    lease = Lease(
        run,
        stale_seconds=cfg.storage.lease_stale_seconds,
        renew_seconds=cfg.storage.lease_renew_seconds,
        conditional_writes=cfg.storage.lease_conditional_writes,
    )
    lease.acquire()
    storage.write_bytes_atomic(run.join("config.yaml"), cfg.to_yaml().encode())
    return lease


class Stateful(Protocol):
    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> Any: ...


OPTIONAL_PARTS = ("health",)  # checkpoints of older repa versions have no guard state: it starts fresh


class Checkpointer:
    def __init__(
        self,
        cfg: RunConfig,
        info: D.DistInfo,
        parts: dict[str, Stateful],
        trainer: Stateful,
        reference_args: dict[str, Any],
    ) -> None:
        self.cfg = cfg
        self.info = info
        self.parts = parts
        self.trainer = trainer
        self.reference_args = dict(reference_args)
        self.run = cfg.storage.locate(cfg.storage.run_url)
        self.saver = ckpt.BackgroundSaver()
        self.lease: Lease | None = None  # rank 0's, set once taken
        self.last_committed: ckpt.CheckpointRef | None = None
        self._abandoned = threading.Event()
        self._snapshot_pool: dict[tuple, torch.Tensor] = {}
        self._wait_group: Any = None  # gloo group for barriers that wait on uploads (see _wait_barrier)

    # ------------------------------------------------------------------ fencing
    def fence(self) -> None:
        """Called by the store right before each write that makes state visible."""
        if self._abandoned.is_set():
            raise LeaseError("this trainer is stopping: the checkpoint upload in flight was abandoned")
        if self.lease is not None:
            self.lease.check_held()

    def describe_last_committed(self) -> str:
        ref = self.last_committed
        return "no checkpoint of this run yet" if ref is None else f"step {ref.step} ({ref.url})"

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """The checkpoint: each part under its name, the trainer's own entries at the top level."""
        return {**{name: part.state_dict() for name, part in self.parts.items()}, **self.trainer.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for name, part in self.parts.items():
            if name not in state and name not in OPTIONAL_PARTS:
                raise ckpt.CorruptCheckpointError(
                    f"checkpoint step {state.get('step')} has no {name!r} entry"
                )
            part.load_state_dict(state.get(name))
        self.trainer.load_state_dict(state)

    # ------------------------------------------------------------------ resume
    def resume(self) -> ckpt.CheckpointRef | None:
        """Load the newest committed checkpoint that verifies (rank 0 chooses, quarantining broken
        ones; every rank loads the chosen one, verified again)."""
        state: dict[str, Any] | None = None
        ref: ckpt.CheckpointRef | None = None
        if self.info.is_main:
            ref, state = ckpt.load_latest_verified(self.run, fence=self.fence)
        ref = D.broadcast_object(self.info, ref)
        if ref is None:
            return None
        if state is None:
            state = ckpt.load_checkpoint_state(ref)
        self.load_state_dict(state)
        self.last_committed = ref
        return ref

    # ------------------------------------------------------------------ saves
    def due(self, step: int) -> bool:
        return step % self.cfg.checkpoint.every_steps == 0 or step == self.cfg.train.max_steps

    def step_end(self, step: int) -> None:
        """Checkpoint on the cadence (``checkpoint.every_steps``; the last step waits for its commit)."""
        if self.due(step):
            last = step == self.cfg.train.max_steps
            self.save(step, wait=last or not self.cfg.checkpoint.background_upload)

    def save(self, step: int, *, wait: bool = False) -> ckpt.CheckpointRef | None:
        """Checkpoint this step: rank 0 snapshots the state to CPU and uploads it in the background
        (``wait``: and blocks until it is committed, returning it). Every rank then meets in a barrier
        without the process-group timeout, so a slow upload of the previous save never times out the
        others."""
        ref = None
        if self.info.is_main:
            self.saver.wait()  # the previous upload must be committed (its error raised) first
            snapshot = ckpt.cpu_snapshot(self.state_dict(), self._snapshot_pool)
            if self.info.device.type == "cuda":
                torch.cuda.synchronize(self.info.device)  # the pinned copies are complete
            self.saver.submit(step, lambda: self._upload(step, snapshot))
            if wait:
                ref = self.saver.wait()
        self._wait_barrier()
        return ref

    def _upload(self, step: int, snapshot: dict[str, Any]) -> ckpt.CheckpointRef:
        """The background part of a save: serialize, upload, commit (fenced), retention (fenced)."""
        cfg = self.cfg
        started = time.monotonic()
        ref = ckpt.save_checkpoint(
            self.run,
            step,
            snapshot,
            snapshot["ema"] if cfg.checkpoint.export_ema else None,
            self.reference_args,
            fence=self.fence,
            writer=self.lease.owner if self.lease is not None else None,
        )
        self.last_committed = ref
        ckpt.apply_retention(
            self.run, cfg.checkpoint.keep_latest, cfg.checkpoint.keep_every_steps, self.fence
        )
        log.info("checkpoint step %d saved in %.1f s", step, time.monotonic() - started)
        return ref

    def finish(self) -> None:
        """Wait for the upload in flight (rank 0), then let every rank go on together."""
        if self.info.is_main:
            self.saver.wait()
        self._wait_barrier()

    def abandon(self, *, join: bool) -> None:
        """The run is failing: whatever upload is in flight must commit nothing more (the fence refuses
        its marker). ``join``: wait for its thread to end, so the process never exits under a thread busy
        in native code (a ``terminate called without an active exception`` abort); without it (the store
        is down: joining would wait out another deadline) the daemon thread is left to die with us."""
        self._abandoned.set()
        if not self.saver.busy:
            return
        log.warning("abandoning the checkpoint upload of step %s in flight", self.saver.step)
        if join:
            try:
                self.saver.wait()
            except Exception as e:
                log.info(
                    "the abandoned upload of step %s ended: %s: %s", self.saver.step, type(e).__name__, e
                )

    # ------------------------------------------------------------------ rollback
    def delete_after(self, step: int) -> None:
        """Delete (rank 0, fenced) every committed checkpoint written after ``step``, marker first."""
        self.finish()  # an upload in flight belongs to the timeline being abandoned or kept
        if self.info.is_main:
            committed, _ = ckpt.list_checkpoints(self.run)
            for ref in committed:
                if ref.step > step:
                    log.warning("health: deleting %s (written after the first bad step)", ref.url)
                    ckpt.delete_checkpoint(ref, self.fence)
        D.barrier(self.info)

    def _wait_barrier(self) -> None:
        """A barrier of every rank whose timeout covers an upload (the storage deadline, x2 for the two
        files and the marker, plus a margin), not the process-group timeout meant for lost peers."""
        if not self.info.distributed:
            return
        import torch.distributed as dist

        if self._wait_group is None:
            seconds = 2 * self.cfg.storage.deadline_seconds + self.cfg.train.process_group_timeout_seconds
            self._wait_group = dist.new_group(backend="gloo", timeout=timedelta(seconds=seconds))
        dist.barrier(group=self._wait_group)
