"""The checkpoint store on any fsspec location: atomic commit, discovery, verified loads, quarantine,
retention.

Layout (names sort by step)::

    {run_url}/checkpoints/step-0000500/state.pt    model, EMA, optimizer, step, reader, config
    {run_url}/checkpoints/step-0000500/ema.pt      EMA weights in the REPA reference layout
    {run_url}/checkpoints/step-0000500/COMMITTED   JSON marker, written last

A checkpoint exists for every reader (resume, ``repa eval``, ``repa watch``) only once its
``COMMITTED`` marker does: the marker is written after every other file is complete, and as a
single atomic object (local rename or one object-store PUT). A crash mid-save leaves a folder
without a marker, which every reader ignores and the next save deletes. Files are loaded with
``torch.load(weights_only=True)``, so a checkpoint can never execute code.

Verified loads: ``COMMITTED`` records each file's size and sha256; every load hashes the bytes as
they are read (:func:`repa.storage.read_bytes_hashed`, one pass) and refuses a file that differs
(:class:`CorruptCheckpointError`). A committed checkpoint that fails verification or does not unpickle
is *quarantined*: a ``QUARANTINED`` marker beside ``COMMITTED`` (with the reason) hides it from every
listing while keeping its files for inspection, and :func:`load_latest_verified` falls back to the
next-newest one. A later save of the same step first sets the quarantined folder aside under
``checkpoints/quarantined/``.

Fencing (one writer per run, ``repa.lease``): the writes that change what a reader sees -- the
``COMMITTED`` marker, a ``QUARANTINED`` marker, the deletions of retention and rollback, setting a
folder aside -- call ``fence()`` right before them; the trainer passes its lease's
:meth:`repa.lease.Lease.check_held`, so a trainer whose lease was taken over raises
:class:`repa.lease.LeaseError` instead of writing. ``state.pt`` and ``ema.pt`` are not fenced: without the
marker no reader sees them, and the owner's own save of that step rewrites them before its marker.

Every function takes a ``repa.storage.Location`` (or a plain URL: no options); the options travel on
with the :class:`CheckpointRef` it returns.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import logging
import os
import re
import socket
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from repa import storage
from repa.config import ConfigError
from repa.storage import Location, conditional, locate
from repa.weights import WeightsError, load_torch_bytes

log = logging.getLogger(__name__)

Fence = Callable[[], None]  # raises (repa.lease.LeaseError) when this process may no longer write


class CheckpointError(ValueError):
    """A checkpoint is missing, uncommitted or unreadable; the message names it."""


class CorruptCheckpointError(CheckpointError):
    """A committed checkpoint whose files differ from what ``COMMITTED`` records, or do not load."""


class ModelMismatchError(ConfigError):
    """The checkpoint was trained with another model configuration than the one given."""

    def __init__(self, message: str) -> None:
        super().__init__("model", message)


FORMAT = "repa-checkpoint-v1"
MARKER = "COMMITTED"
QUARANTINE = "QUARANTINED"
QUARANTINE_DIR = "quarantined"
STATE_FILE = "state.pt"
EMA_FILE = "ema.pt"
_STEP_DIR = re.compile(r"^step-(\d{7,})$")


def _no_fence() -> None:
    """Writers without a lease (tests, tools acting on a stopped run) are never fenced."""


@dataclass(frozen=True, order=True)
class CheckpointRef:
    """A committed checkpoint: its training step and folder URL (and the options to reach it, which
    take no part in comparisons)."""

    step: int
    url: str
    options: Mapping[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @property
    def location(self) -> Location:
        return Location(self.url, dict(self.options))

    @property
    def state_url(self) -> str:
        return storage.join(self.url, STATE_FILE)

    @property
    def ema_url(self) -> str:
        return storage.join(self.url, EMA_FILE)


def checkpoints_url(run: str | Location) -> Any:
    """``{run}/checkpoints`` (a Location for a Location, a string for a string)."""
    return storage.join(run, "checkpoints")


def step_dir_name(step: int) -> str:
    return f"step-{step:07d}"


def list_checkpoints(run: str | Location) -> tuple[list[CheckpointRef], list[str]]:
    """``(committed checkpoints sorted by step, URLs of uncommitted step folders)``.

    Quarantined folders (``QUARANTINED`` marker) are in neither list: never loaded, never deleted.
    """
    root = checkpoints_url(locate(run))
    committed, partial = [], []
    for name in storage.listdir(root):
        match = _STEP_DIR.match(name)
        if not match:
            continue
        folder = root.join(name)
        names = set(storage.listdir(folder))
        if QUARANTINE in names:
            continue
        if MARKER in names:
            committed.append(CheckpointRef(int(match.group(1)), folder.url, dict(folder.options)))
        else:
            partial.append(folder.url)
    return sorted(committed), partial


def latest_checkpoint(run: str | Location) -> CheckpointRef | None:
    committed, _ = list_checkpoints(run)
    return committed[-1] if committed else None


def read_marker(folder: str | Location) -> dict[str, Any]:
    """The ``COMMITTED`` JSON of a step folder (CheckpointError if absent, quarantined or bad)."""
    folder = locate(folder)
    try:
        marker = json.loads(storage.read_bytes(folder.join(MARKER)))
    except FileNotFoundError:
        raise CheckpointError(
            f"checkpoint {folder.url} is not committed (no {MARKER} marker); refusing to load it"
        ) from None
    except ValueError as e:
        raise CorruptCheckpointError(f"checkpoint {folder.url}: {MARKER} is not valid JSON ({e})") from None
    if not isinstance(marker, dict):
        raise CorruptCheckpointError(f"checkpoint {folder.url}: {MARKER} is not a JSON object")
    return marker


def quarantine_reason(folder: str | Location) -> str | None:
    """Why a step folder was quarantined, or None if it was not."""
    try:
        data = storage.read_bytes(locate(folder).join(QUARANTINE))
    except FileNotFoundError:
        return None
    try:
        return str(json.loads(data).get("reason", "no reason recorded"))
    except (ValueError, AttributeError):
        return "no reason recorded"


def read_verified(folder: str | Location, name: str, marker: dict[str, Any] | None = None) -> bytes:
    """File ``name`` of a committed step folder, checked against the size and sha256 in ``COMMITTED``
    while it is read; :class:`CorruptCheckpointError` when it differs or is missing.

    A marker without a record of the file (written by an older repa) is read unverified, with a warning.
    """
    folder = locate(folder)
    marker = read_marker(folder) if marker is None else marker
    file = folder.join(name)
    expected = (marker.get("files") or {}).get(name)
    if not isinstance(expected, dict):
        log.warning("%s: %s records no size/sha256 for it; loading it unverified", file.url, MARKER)
        try:
            return storage.read_bytes(file)
        except FileNotFoundError:
            raise CorruptCheckpointError(f"checkpoint file {file.url} is missing") from None
    try:
        data, digest = storage.read_bytes_hashed(file)
    except FileNotFoundError:
        raise CorruptCheckpointError(
            f"checkpoint file {file.url} is missing, but {MARKER} lists it"
        ) from None
    if len(data) != expected.get("bytes"):
        raise CorruptCheckpointError(
            f"checkpoint file {file.url} has {len(data)} bytes, {MARKER} records {expected.get('bytes')} "
            "(truncated or overwritten)"
        )
    if digest != expected.get("sha256"):
        raise CorruptCheckpointError(
            f"checkpoint file {file.url} is corrupt: sha256 {digest[:16]}... differs from "
            f"{str(expected.get('sha256'))[:16]}... recorded in {MARKER}"
        )
    return data


def quarantine_checkpoint(ref: CheckpointRef, reason: str, fence: Fence = _no_fence) -> None:
    """Mark a committed checkpoint so that no reader picks it again; its files are kept."""
    record = {"reason": reason, "time": time.time(), "host": socket.gethostname(), "pid": os.getpid()}
    fence()  # the marker hides a checkpoint from every reader
    storage.write_bytes_atomic(ref.location.join(QUARANTINE), json.dumps(record, indent=1).encode())
    log.warning(
        "quarantined checkpoint step %d (%s): %s; its files are kept, no reader will load it again",
        ref.step,
        ref.url,
        reason,
    )


def load_latest_verified(
    run: str | Location, *, quarantine: bool = True, fence: Fence = _no_fence
) -> tuple[CheckpointRef | None, dict[str, Any] | None]:
    """``(ref, state)`` of the newest committed checkpoint that verifies and loads, or ``(None, None)``.
    Each newer one that fails is quarantined (``quarantine``; a reader that must not write, e.g. a
    test comparing runs, skips it), with a warning naming it. One process should choose (rank 0) and
    tell the others the ref.
    """
    committed, _ = list_checkpoints(run)
    for ref in reversed(committed):
        try:
            return ref, load_checkpoint_state(ref)
        except CorruptCheckpointError as e:
            if quarantine:
                quarantine_checkpoint(ref, str(e), fence)
            else:
                log.warning("skipping checkpoint step %d: %s", ref.step, e)
    return None, None


def _to_bytes(obj: Any) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def reference_args(model_config: dict[str, Any]) -> argparse.Namespace:
    """The ``args`` entry of a reference checkpoint (REPA's train.py stores its argparse Namespace)."""
    return argparse.Namespace(**model_config)


def serialize_checkpoint(
    step: int,
    state: dict[str, Any],
    ema_state_dict: dict[str, torch.Tensor] | None,
    reference_model_args: dict[str, Any] | None = None,
) -> dict[str, bytes]:
    """The files of a checkpoint: ``state.pt`` and, with ``ema_state_dict``, the reference ``ema.pt``."""
    files: dict[str, bytes] = {STATE_FILE: _to_bytes({"format": FORMAT, "step": step, **state})}
    if ema_state_dict is not None:
        # Reference layout: generate.py reads ckpt["ema"]; args/steps as train.py writes them.
        files[EMA_FILE] = _to_bytes(
            {"ema": ema_state_dict, "args": reference_args(reference_model_args or {}), "steps": step}
        )
    return files


def save_checkpoint(
    run: str | Location,
    step: int,
    state: dict[str, Any],
    ema_state_dict: dict[str, torch.Tensor] | None,
    reference_model_args: dict[str, Any] | None = None,
    *,
    fence: Fence = _no_fence,
    writer: str | None = None,
) -> CheckpointRef:
    """Write ``state`` (and the EMA export) under ``step-NNNNNNN/`` and commit it with the marker.

    ``writer`` (the lease owner) is recorded in the marker; a step another writer committed is never
    taken as this save's own: it is set aside under ``checkpoints/quarantined/`` and saved again.
    """
    run = locate(run)
    root = checkpoints_url(run)
    folder = root.join(step_dir_name(step))
    names = set(storage.listdir(folder))
    aside_reason = None
    if QUARANTINE in names:
        aside_reason = "quarantined"
    elif MARKER in names:
        other = read_marker(folder).get("writer") if writer is not None else None
        if other is None or other == writer:
            log.info("checkpoint for step %d already committed at %s", step, folder.url)
            return CheckpointRef(step, folder.url, dict(folder.options))
        aside_reason = f"committed by another writer ({other})"
    if aside_reason is not None:
        aside = root.join(QUARANTINE_DIR, f"{step_dir_name(step)}-{int(time.time())}")
        log.warning(
            "setting checkpoint %s (%s) aside to %s before saving step %d again",
            folder.url,
            aside_reason,
            aside.url,
            step,
        )
        fence()  # moving a folder changes what readers see
        storage.move(folder, aside)
    elif names:  # an unfinished save (a crash, an evicted writer): its files go, ours are created below
        fence()
        for name in names:
            storage.remove(folder.join(name), recursive=True)
    files = serialize_checkpoint(step, state, ema_state_dict, reference_model_args)
    for name, data in files.items():
        # Create-if-absent, fenced: a late write of an evicted writer never replaces ours
        # (repa.storage.conditional).
        conditional.write_fenced(folder.join(name), data, fence, exclusive=True)
    marker = {
        "format": FORMAT,
        "step": step,
        "time": time.time(),
        "files": {
            name: {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
            for name, data in files.items()
        },
    }
    if writer is not None:
        marker["writer"] = writer
    # The marker makes the checkpoint visible: only the lease holder may write it (fenced right before
    # the bytes land), and only once (create-if-absent).
    conditional.write_fenced(
        folder.join(MARKER), json.dumps(marker, indent=1).encode(), fence, exclusive=True
    )
    log.info("committed checkpoint step %d -> %s", step, folder.url)
    return CheckpointRef(step, folder.url, dict(folder.options))


def load_checkpoint_state(ref: CheckpointRef) -> dict[str, Any]:
    """Load ``state.pt`` of a committed checkpoint, verified against ``COMMITTED`` (never executes code;
    checks the format tag). :class:`CorruptCheckpointError` if it fails verification or does not load."""
    marker = read_marker(ref.location)
    data = read_verified(ref.location, STATE_FILE, marker)
    try:
        state = load_torch_bytes(data, ref.state_url)
    except WeightsError as e:
        raise CorruptCheckpointError(str(e)) from e
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        tag = state.get("format") if isinstance(state, dict) else type(state).__name__
        raise CorruptCheckpointError(f"{ref.state_url}: not a {FORMAT} file (format tag {tag!r})")
    return state


def delete_checkpoint(ref: CheckpointRef, fence: Fence = _no_fence) -> None:
    """Delete a committed checkpoint, marker first, so a concurrent reader never sees a committed
    folder with files missing."""
    fence()  # removing the marker changes what readers see
    storage.remove(ref.location.join(MARKER))
    storage.remove(ref.location, recursive=True)


def apply_retention(
    run: str | Location, keep_latest: int, keep_every_steps: int, fence: Fence = _no_fence
) -> list[str]:
    """Delete committed checkpoints except the latest ``keep_latest`` and every multiple of
    ``keep_every_steps`` (0 = none kept for that rule), and every uncommitted folder older than the
    newest committed one (left behind by a crash mid-save). Returns the deleted URLs.
    """
    run = locate(run)
    committed, partial = list_checkpoints(run)
    if not committed:
        return []
    newest = committed[-1].step
    keep = {ref.step for ref in committed[-keep_latest:]} if keep_latest > 0 else set()
    if keep_every_steps > 0:
        keep |= {ref.step for ref in committed if ref.step % keep_every_steps == 0}
    deleted = []
    for ref in committed:
        if ref.step not in keep:
            delete_checkpoint(ref, fence)
            deleted.append(ref.url)
    for url in partial:
        match = _STEP_DIR.match(url.rstrip("/").rsplit("/", 1)[-1])
        if match and int(match.group(1)) < newest:
            # Invisible to readers, but it may be the folder a new owner is writing: fenced too.
            fence()
            storage.remove(Location(url, dict(run.options)), recursive=True)
            deleted.append(url)
    return deleted
