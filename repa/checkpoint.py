"""Checkpoints on any fsspec URL: atomic commit, discovery, retention, EMA export.

Layout (names sort by step)::

    {run_url}/checkpoints/step-0000500/state.pt    model, EMA, optimizer, step, reader, config
    {run_url}/checkpoints/step-0000500/ema.pt      EMA weights in the REPA reference layout
    {run_url}/checkpoints/step-0000500/COMMITTED   JSON marker, written last

A checkpoint exists for every reader (resume, ``repa eval``, ``repa watch``) only once its
``COMMITTED`` marker does: the marker is written after every other file is complete, and as a
single atomic object (local rename or one object-store PUT). A crash mid-save leaves a folder
without a marker, which every reader ignores and the next save deletes. Files are loaded with
``torch.load(weights_only=True)``, so a checkpoint can never execute code.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import logging
import re
import time
from dataclasses import dataclass
from typing import Any

import torch

from repa import storage
from repa.weights import load_torch_file

log = logging.getLogger(__name__)

FORMAT = "repa-checkpoint-v1"
MARKER = "COMMITTED"
STATE_FILE = "state.pt"
EMA_FILE = "ema.pt"
_STEP_DIR = re.compile(r"^step-(\d{7,})$")


@dataclass(frozen=True, order=True)
class CheckpointRef:
    """A committed checkpoint: its training step and folder URL."""

    step: int
    url: str

    @property
    def state_url(self) -> str:
        return storage.join(self.url, STATE_FILE)

    @property
    def ema_url(self) -> str:
        return storage.join(self.url, EMA_FILE)


def checkpoints_url(run_url: str) -> str:
    return storage.join(run_url, "checkpoints")


def step_dir_name(step: int) -> str:
    return f"step-{step:07d}"


def list_checkpoints(
    run_url: str, storage_options: dict | None = None
) -> tuple[list[CheckpointRef], list[str]]:
    """``(committed checkpoints sorted by step, URLs of uncommitted step folders)``."""
    root = checkpoints_url(run_url)
    committed, partial = [], []
    for name in storage.listdir(root, storage_options):
        match = _STEP_DIR.match(name)
        if not match:
            continue
        url = storage.join(root, name)
        if storage.exists(storage.join(url, MARKER), storage_options):
            committed.append(CheckpointRef(int(match.group(1)), url))
        else:
            partial.append(url)
    return sorted(committed), partial


def latest_checkpoint(run_url: str, storage_options: dict | None = None) -> CheckpointRef | None:
    committed, _ = list_checkpoints(run_url, storage_options)
    return committed[-1] if committed else None


def _to_bytes(obj: Any) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def reference_args(model_config: dict[str, Any]) -> argparse.Namespace:
    """The ``args`` entry of a reference checkpoint (REPA's train.py stores its argparse Namespace)."""
    return argparse.Namespace(**model_config)


def save_checkpoint(
    run_url: str,
    step: int,
    state: dict[str, Any],
    ema_state_dict: dict[str, torch.Tensor] | None,
    reference_model_args: dict[str, Any] | None = None,
    storage_options: dict | None = None,
) -> CheckpointRef:
    """Write ``state`` (and the EMA export) under ``step-NNNNNNN/`` and commit it with the marker."""
    url = storage.join(checkpoints_url(run_url), step_dir_name(step))
    if storage.exists(storage.join(url, MARKER), storage_options):
        log.info("checkpoint for step %d already committed at %s", step, url)
        return CheckpointRef(step, url)
    files: dict[str, bytes] = {STATE_FILE: _to_bytes({"format": FORMAT, "step": step, **state})}
    if ema_state_dict is not None:
        # Reference layout: generate.py reads ckpt["ema"]; args/steps as train.py writes them.
        files[EMA_FILE] = _to_bytes(
            {"ema": ema_state_dict, "args": reference_args(reference_model_args or {}), "steps": step}
        )
    for name, data in files.items():
        storage.write_bytes_atomic(storage.join(url, name), data, storage_options)
    marker = {
        "format": FORMAT,
        "step": step,
        "time": time.time(),
        "files": {
            name: {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
            for name, data in files.items()
        },
    }
    storage.write_bytes_atomic(
        storage.join(url, MARKER), json.dumps(marker, indent=1).encode(), storage_options
    )
    log.info("committed checkpoint step %d -> %s", step, url)
    return CheckpointRef(step, url)


def load_checkpoint_state(ref: CheckpointRef, storage_options: dict | None = None) -> dict[str, Any]:
    """Load ``state.pt`` of a committed checkpoint (never executes code; checks the format tag)."""
    if not storage.exists(storage.join(ref.url, MARKER), storage_options):
        raise ValueError(f"checkpoint {ref.url} is not committed (no {MARKER} marker); refusing to load it")
    state = load_torch_file(ref.state_url, storage_options)
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise ValueError(f"{ref.state_url}: not a {FORMAT} file (format tag {state.get('format')!r})")
    return state


def apply_retention(
    run_url: str,
    keep_latest: int,
    keep_every_steps: int,
    storage_options: dict | None = None,
) -> list[str]:
    """Delete committed checkpoints except the latest ``keep_latest`` and every multiple of
    ``keep_every_steps`` (0 = none kept for that rule), and every uncommitted folder older than the
    newest committed one (left behind by a crash mid-save). Returns the deleted URLs.

    The marker goes first, so a concurrent reader never sees a committed folder with files missing.
    """
    committed, partial = list_checkpoints(run_url, storage_options)
    if not committed:
        return []
    newest = committed[-1].step
    keep = {ref.step for ref in committed[-keep_latest:]} if keep_latest > 0 else set()
    if keep_every_steps > 0:
        keep |= {ref.step for ref in committed if ref.step % keep_every_steps == 0}
    deleted = []
    for ref in committed:
        if ref.step not in keep:
            storage.remove(storage.join(ref.url, MARKER), storage_options=storage_options)
            storage.remove(ref.url, recursive=True, storage_options=storage_options)
            deleted.append(ref.url)
    for url in partial:
        match = _STEP_DIR.match(url.rstrip("/").rsplit("/", 1)[-1])
        if match and int(match.group(1)) < newest:
            storage.remove(url, recursive=True, storage_options=storage_options)
            deleted.append(url)
    return deleted
