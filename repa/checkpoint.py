"""Checkpoints on any fsspec URL: atomic commit, discovery, retention, EMA export, and the model
a checkpoint holds (the one config -> SiT arguments derivation, and rebuilding a SiT from a file).

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

Background saves (:class:`BackgroundSaver`): the trainer copies its state to CPU
(:func:`cpu_snapshot`, pinned buffers reused across saves on CUDA) and a thread serializes, uploads
and commits it while training continues. ``torch.distributed.checkpoint.async_save`` was considered
and not used: it writes its own sharded layout (``.distcp`` files + ``.metadata``), not the one-file
``state.pt`` + reference-layout ``ema.pt`` that ``repa sample`` and REPA's ``generate.py`` read, so
it would need a conversion pass (``dcp_to_torch_save``) over the whole state after every save; our
state is replicated (DDP), so there is nothing to shard either.

:func:`model_kwargs` is the only place that turns a run config into SiT constructor arguments: the
trainer builds its model with it, ``ema.pt`` records them, and :func:`load_model` compares a
checkpoint's recorded arguments (or those of an official REPA file) against it.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import logging
import os
import re
import socket
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from repa import conditional, storage
from repa.config import ConfigError
from repa.weights import WeightsError, load_torch_bytes, load_torch_file

if TYPE_CHECKING:
    from torch import nn

    from repa.config import RunConfig

log = logging.getLogger(__name__)


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
    """``(committed checkpoints sorted by step, URLs of uncommitted step folders)``.

    Quarantined folders (``QUARANTINED`` marker) are in neither list: never loaded, never deleted.
    """
    root = checkpoints_url(run_url)
    committed, partial = [], []
    for name in storage.listdir(root, storage_options):
        match = _STEP_DIR.match(name)
        if not match:
            continue
        url = storage.join(root, name)
        names = set(storage.listdir(url, storage_options))
        if QUARANTINE in names:
            continue
        if MARKER in names:
            committed.append(CheckpointRef(int(match.group(1)), url))
        else:
            partial.append(url)
    return sorted(committed), partial


def latest_checkpoint(run_url: str, storage_options: dict | None = None) -> CheckpointRef | None:
    committed, _ = list_checkpoints(run_url, storage_options)
    return committed[-1] if committed else None


def read_marker(url: str, storage_options: dict | None = None) -> dict[str, Any]:
    """The ``COMMITTED`` JSON of step folder ``url`` (CheckpointError if absent, quarantined or bad)."""
    try:
        marker = json.loads(storage.read_bytes(storage.join(url, MARKER), storage_options))
    except FileNotFoundError:
        raise CheckpointError(
            f"checkpoint {url} is not committed (no {MARKER} marker); refusing to load it"
        ) from None
    except ValueError as e:
        raise CorruptCheckpointError(f"checkpoint {url}: {MARKER} is not valid JSON ({e})") from None
    if not isinstance(marker, dict):
        raise CorruptCheckpointError(f"checkpoint {url}: {MARKER} is not a JSON object")
    return marker


def quarantine_reason(url: str, storage_options: dict | None = None) -> str | None:
    """Why step folder ``url`` was quarantined, or None if it was not."""
    try:
        data = storage.read_bytes(storage.join(url, QUARANTINE), storage_options)
    except FileNotFoundError:
        return None
    try:
        return str(json.loads(data).get("reason", "no reason recorded"))
    except (ValueError, AttributeError):
        return "no reason recorded"


def read_verified(
    url: str, name: str, storage_options: dict | None = None, marker: dict[str, Any] | None = None
) -> bytes:
    """File ``name`` of committed step folder ``url``, checked against the size and sha256 in
    ``COMMITTED`` while it is read; :class:`CorruptCheckpointError` when it differs or is missing.

    A marker without a record of the file (written by an older repa) is read unverified, with a warning.
    """
    marker = read_marker(url, storage_options) if marker is None else marker
    file_url = storage.join(url, name)
    expected = (marker.get("files") or {}).get(name)
    if not isinstance(expected, dict):
        log.warning("%s: %s records no size/sha256 for it; loading it unverified", file_url, MARKER)
        try:
            return storage.read_bytes(file_url, storage_options)
        except FileNotFoundError:
            raise CorruptCheckpointError(f"checkpoint file {file_url} is missing") from None
    try:
        data, digest = storage.read_bytes_hashed(
            file_url, storage_options, expected_size=int(expected.get("bytes", 0))
        )
    except FileNotFoundError:
        raise CorruptCheckpointError(
            f"checkpoint file {file_url} is missing, but {MARKER} lists it"
        ) from None
    if len(data) != expected.get("bytes"):
        raise CorruptCheckpointError(
            f"checkpoint file {file_url} has {len(data)} bytes, {MARKER} records {expected.get('bytes')} "
            "(truncated or overwritten)"
        )
    if digest != expected.get("sha256"):
        raise CorruptCheckpointError(
            f"checkpoint file {file_url} is corrupt: sha256 {digest[:16]}... differs from "
            f"{str(expected.get('sha256'))[:16]}... recorded in {MARKER}"
        )
    return data


def _no_fence() -> None:
    """A writer without a run lease (``repa watch``, tools): nothing to check."""


def quarantine_checkpoint(
    ref: CheckpointRef,
    reason: str,
    storage_options: dict | None = None,
    *,
    fence: Callable[[], None] = _no_fence,
) -> None:
    """Mark a committed checkpoint so that no reader picks it again; its files are kept. ``fence``
    (the trainer's ``Lease.check_held``) runs right before the marker is written."""
    fence()
    record = {"reason": reason, "time": time.time(), "host": socket.gethostname(), "pid": os.getpid()}
    storage.write_bytes_atomic(
        storage.join(ref.url, QUARANTINE), json.dumps(record, indent=1).encode(), storage_options
    )
    log.warning(
        "quarantined checkpoint step %d (%s): %s; its files are kept, no reader will load it again",
        ref.step,
        ref.url,
        reason,
    )


def load_latest_verified(
    run_url: str,
    storage_options: dict | None = None,
    *,
    max_step: int | None = None,
    quarantine: bool = True,
    fence: Callable[[], None] = _no_fence,
) -> tuple[CheckpointRef | None, dict[str, Any] | None]:
    """``(ref, state)`` of the newest committed checkpoint (at most ``max_step``) that verifies and
    loads, or ``(None, None)``. Each newer one that fails is quarantined (``quarantine``) or skipped,
    with a warning naming it. One process should choose (rank 0) and tell the others the ref.
    """
    committed, _ = list_checkpoints(run_url, storage_options)
    for ref in reversed(committed):
        if max_step is not None and ref.step > max_step:
            continue
        try:
            return ref, load_checkpoint_state(ref, storage_options)
        except CorruptCheckpointError as e:
            if quarantine:
                quarantine_checkpoint(ref, str(e), storage_options, fence=fence)
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
    run_url: str,
    step: int,
    state: dict[str, Any],
    ema_state_dict: dict[str, torch.Tensor] | None,
    reference_model_args: dict[str, Any] | None = None,
    storage_options: dict | None = None,
    *,
    fence: Callable[[], None] = _no_fence,
) -> CheckpointRef:
    """Write ``state`` (and the EMA export) under ``step-NNNNNNN/`` and commit it with the marker.

    ``fence`` (the trainer's ``Lease.check_held``) runs before each file and right before the marker:
    a trainer whose lease was taken over stops uploading and commits nothing (``repa.lease``).
    """
    url = storage.join(checkpoints_url(run_url), step_dir_name(step))
    names = set(storage.listdir(url, storage_options))
    if QUARANTINE in names:
        fence()
        aside = storage.join(
            checkpoints_url(run_url), QUARANTINE_DIR, f"{step_dir_name(step)}-{int(time.time())}"
        )
        log.warning(
            "setting quarantined checkpoint %s aside to %s before saving step %d again", url, aside, step
        )
        storage.move(url, aside, storage_options)
    elif MARKER in names:
        log.info("checkpoint for step %d already committed at %s", step, url)
        return CheckpointRef(step, url)
    elif names:  # an unfinished save (a crash, an evicted writer): its files go, ours are created below
        fence()
        for name in names:
            storage.remove(storage.join(url, name), recursive=True, storage_options=storage_options)
    files = serialize_checkpoint(step, state, ema_state_dict, reference_model_args)
    for name, data in files.items():
        where = storage.Location(storage.join(url, name), storage_options or {})
        conditional.write_fenced(where, data, fence, exclusive=True)  # a late write never replaces ours
    marker = {
        "format": FORMAT,
        "step": step,
        "time": time.time(),
        "files": {
            name: {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
            for name, data in files.items()
        },
    }
    conditional.write_fenced(
        storage.Location(storage.join(url, MARKER), storage_options or {}),
        json.dumps(marker, indent=1).encode(),
        fence,
        exclusive=True,
    )
    log.info("committed checkpoint step %d -> %s", step, url)
    return CheckpointRef(step, url)


def load_checkpoint_state(ref: CheckpointRef, storage_options: dict | None = None) -> dict[str, Any]:
    """Load ``state.pt`` of a committed checkpoint, verified against ``COMMITTED`` (never executes code;
    checks the format tag). :class:`CorruptCheckpointError` if it fails verification or does not load."""
    marker = read_marker(ref.url, storage_options)
    data = read_verified(ref.url, STATE_FILE, storage_options, marker)
    try:
        state = load_torch_bytes(data, ref.state_url)
    except WeightsError as e:
        raise CorruptCheckpointError(str(e)) from e
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        tag = state.get("format") if isinstance(state, dict) else type(state).__name__
        raise CorruptCheckpointError(f"{ref.state_url}: not a {FORMAT} file (format tag {tag!r})")
    return state


# ----------------------------------------------------------------------------------------------
# Snapshots and background saves
# ----------------------------------------------------------------------------------------------


def cpu_snapshot(obj: Any, pool: dict[tuple, torch.Tensor] | None = None, _path: tuple = ()) -> Any:
    """A copy of a (nested) state whose tensors live on the CPU and share nothing with ``obj``.

    ``pool`` keeps the CPU buffers between calls (pinned when the source is on CUDA, so the copy is a
    fast DMA): the next snapshot of the same state reuses them, so a save allocates nothing. The
    caller must not snapshot again while a previous snapshot from the same pool is still being saved.
    """
    if isinstance(obj, torch.Tensor):
        t = obj.detach()
        buf = pool.get(_path) if pool is not None else None
        if buf is None or buf.shape != t.shape or buf.dtype != t.dtype:
            buf = torch.empty(t.shape, dtype=t.dtype, device="cpu", pin_memory=t.is_cuda)
            if pool is not None:
                pool[_path] = buf
        buf.copy_(t, non_blocking=t.is_cuda)
        return buf
    if isinstance(obj, dict):
        return {k: cpu_snapshot(v, pool, (*_path, k)) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(cpu_snapshot(v, pool, (*_path, i)) for i, v in enumerate(obj))
    return obj


class BackgroundSaver:
    """Runs one save at a time in a daemon thread; :meth:`wait` joins it and re-raises its error.

    The trainer submits a closure over a CPU snapshot (serialize, upload, commit, retention) and keeps
    stepping; a later save, the end of the run and SIGTERM call :meth:`wait` first. :meth:`failed`
    lets the loop notice a failed upload at the next step rather than at the next save.
    """

    def __init__(self) -> None:
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._result: Any = None
        self.step: int | None = None

    @property
    def busy(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def submit(self, step: int, fn: Callable[[], Any]) -> None:
        if self.busy:
            raise RuntimeError("BackgroundSaver.submit while a save is in flight; call wait() first")
        self._error, self._result, self.step = None, None, step

        def run() -> None:
            # Lower this thread's CPU priority (Linux nice is per thread): where cores are scarce the
            # training thread and the data loader win, and the upload just takes longer.
            with contextlib.suppress(AttributeError, OSError):
                os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 10)
            try:
                self._result = fn()
            except BaseException as e:
                self._error = e

        self._thread = threading.Thread(target=run, name=f"repa-save-{step}", daemon=True)
        self._thread.start()

    def failed(self) -> bool:
        """True once the save in flight (or the last one) has ended with an error."""
        return self._error is not None and not self.busy

    def wait(self) -> Any:
        """Block until the save in flight is done; its result, or its exception re-raised (once)."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        error, self._error = self._error, None
        if error is not None:
            raise error
        return self._result


def apply_retention(
    run_url: str,
    keep_latest: int,
    keep_every_steps: int,
    storage_options: dict | None = None,
    *,
    fence: Callable[[], None] = _no_fence,
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
            fence()
            storage.remove(storage.join(ref.url, MARKER), storage_options=storage_options)
            storage.remove(ref.url, recursive=True, storage_options=storage_options)
            deleted.append(ref.url)
    for url in partial:
        match = _STEP_DIR.match(url.rstrip("/").rsplit("/", 1)[-1])
        if match and int(match.group(1)) < newest:
            fence()
            storage.remove(url, recursive=True, storage_options=storage_options)
            deleted.append(url)
    return deleted


# ----------------------------------------------------------------------------------------------
# The model a checkpoint holds
# ----------------------------------------------------------------------------------------------


def model_kwargs(cfg: RunConfig, z_dims: Sequence[int]) -> dict[str, Any]:
    """SiT constructor arguments (plus ``model``, the size-table name) that ``cfg`` describes.

    ``z_dims`` are the encoders' widths (one projector each), known once they are built or from a
    checkpoint; with no encoder there is no projector (``encoder_depth`` 0).
    """
    channels, side, _ = cfg.latent_shape()
    return {
        "model": cfg.model.name,
        "input_size": side,
        "in_channels": channels,
        **cfg.model.architecture(),
        "encoder_depth": cfg.model.encoder_depth if cfg.encoder.names else 0,
        "projector_dim": cfg.model.projector_dim,
        "z_dims": [int(z) for z in z_dims],
        "class_dropout_prob": cfg.model.class_dropout_prob,
        "num_classes": cfg.model.num_classes,
        "qk_norm": cfg.model.qk_norm,
        "fused_attn": cfg.model.fused_attn,
    }


@dataclass(frozen=True)
class CheckpointSource:
    """Where weights come from: a committed step folder of a run, or a weights file."""

    url: str  # step folder (kind "run") or .pt/.pth/.safetensors file (kind "file")
    kind: str  # "run" | "file"
    step: int | None = None
    run_url: str | None = None

    def describe(self, weights: str) -> dict[str, Any]:
        return {"url": self.url, "step": self.step, "weights": weights}


_WEIGHT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors", ".ckpt")


def _parent(url: str) -> tuple[str, str]:
    head, _, name = url.rstrip("/").rpartition("/")
    return head, name


def resolve_checkpoint(
    url: str | None, run_url: str | None, storage_options: dict[str, Any] | None = None
) -> CheckpointSource:
    """A checkpoint URL (step folder, its ema.pt/state.pt, or any weights file) or the latest committed
    checkpoint under ``run_url``; uncommitted step folders are refused."""
    if url is None:
        if not run_url:
            raise ConfigError(
                "sample.checkpoint_url",
                "no checkpoint given: pass --checkpoint URL, or set storage.run_url to use the run's latest "
                "committed checkpoint",
            )
        ref = latest_checkpoint(run_url, storage_options)
        if ref is None:
            raise CheckpointError(f"no committed checkpoint under {checkpoints_url(run_url)}")
        return CheckpointSource(ref.url, "run", ref.step, run_url.rstrip("/"))
    folder, name = _parent(url)
    if name in (EMA_FILE, STATE_FILE) and storage.exists(storage.join(folder, MARKER), storage_options):
        url = folder  # a file inside a committed step folder: use the folder (and its recorded args)
    elif url.lower().endswith(_WEIGHT_SUFFIXES):
        if not storage.exists(url, storage_options):
            raise CheckpointError(f"checkpoint {url}: not found")
        return CheckpointSource(url, "file")
    marker_url = storage.join(url, MARKER)
    reason = quarantine_reason(url, storage_options)
    if reason is not None:
        raise CheckpointError(f"checkpoint {url} is quarantined ({reason}); use another step")
    try:
        marker = json.loads(storage.read_bytes(marker_url, storage_options))
    except FileNotFoundError:
        what = "does not exist" if not storage.listdir(url, storage_options) else f"has no {MARKER} marker"
        raise CheckpointError(
            f"checkpoint {url}: {what}; only committed checkpoints are used (give a step folder with "
            f"{MARKER}, or a .pt file)"
        ) from None
    checkpoints_dir = _parent(url)[0]
    run_candidate, dir_name = _parent(checkpoints_dir)
    run = run_candidate if dir_name == "checkpoints" else None
    return CheckpointSource(url.rstrip("/"), "run", int(marker["step"]), run)


# Fields compared between a checkpoint and the config, with the config key that sets each.
_COMPARED = {
    "model": "model.name",
    "depth": "model.depth",
    "hidden_size": "model.hidden_size",
    "num_heads": "model.num_heads",
    "patch_size": "model.patch_size",
    "num_classes": "model.num_classes",
    "input_size": "data.resolution / vae downsampling",
    "in_channels": "vae.name (latent channels)",
    "qk_norm": "model.qk_norm",
}


def _mismatches(found: dict[str, Any], expected: dict[str, Any], label: str) -> list[str]:
    return [
        f"{_COMPARED[k]}: {label} {found[k]!r}, config {expected[k]!r}"
        for k in _COMPARED
        if k in found and k in expected and found[k] != expected[k]
    ]


@dataclass
class LoadedModel:
    """A SiT in eval mode with the arguments it was built from and where its weights came from."""

    model: nn.Module
    model_args: dict[str, Any]
    source: CheckpointSource
    weights: str

    @property
    def step(self) -> int | None:
        return self.source.step


def _recorded_args(obj: Any) -> dict[str, Any] | None:
    args = obj.get("args") if isinstance(obj, dict) else None
    if isinstance(args, argparse.Namespace):
        return vars(args)
    return args if isinstance(args, dict) else None


def first_nonfinite(state_dict: dict[str, Any]) -> str | None:
    """Name of the first floating-point tensor holding a NaN or Inf, else None.

    A run that went NaN keeps writing checkpoints whose samples are noise; its FID must never be
    reported as a result (docs/training-health.md).
    """
    for name, tensor in state_dict.items():
        if torch.is_tensor(tensor) and tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            return name
    return None


def load_model(
    cfg: RunConfig,
    source: CheckpointSource,
    *,
    weights: str | None = None,
    device: torch.device | str = "cpu",
    check_config: bool = True,
    storage_options: dict[str, Any] | None = None,
) -> LoadedModel:
    """Rebuild the SiT a checkpoint was trained as, from its recorded arguments, and load its weights.

    Recorded arguments: ``ema.pt``'s ``args`` (repa or official REPA layout) or ``state.pt``'s config.
    A bare state dict (the authors' released EMA file) is built from ``cfg``. With ``check_config``,
    a checkpoint whose architecture differs from ``cfg``'s raises :class:`ModelMismatchError` naming
    every differing key. Weights holding a NaN or Inf raise :class:`CheckpointError` naming the first
    bad tensor, so a poisoned checkpoint never yields samples or an FID.
    """
    from repa.config import RunConfig
    from repa.models import build_model
    from repa.models.reference import infer_model_args, load_reference_state_dict, model_args_from_recorded

    weights = weights or cfg.sample.checkpoint_weights
    if weights not in ("ema", "model"):
        raise ConfigError("sample.checkpoint_weights", f"{weights!r}; choose ema or model")
    recorded: dict[str, Any] | None = None
    if source.kind == "run":
        ema_url = storage.join(source.url, EMA_FILE)
        if weights == "ema" and storage.exists(ema_url, storage_options):
            data = read_verified(source.url, EMA_FILE, storage_options)  # checked against COMMITTED
            try:
                obj = load_torch_bytes(data, ema_url)
            except WeightsError as e:
                raise CorruptCheckpointError(str(e)) from e
            recorded = _recorded_args(obj)
            sd = load_reference_state_dict(obj, "ema")
        else:
            state = load_checkpoint_state(CheckpointRef(source.step or 0, source.url), storage_options)
            sd = load_reference_state_dict(state, weights)
            if state.get("config"):
                z_dims = infer_model_args(sd)["z_dims"]
                recorded = model_kwargs(RunConfig.from_dict(state["config"]), z_dims)
    else:
        obj = load_torch_file(source.url, storage_options)
        sd = load_reference_state_dict(obj, weights)
        recorded = _recorded_args(obj)
    bad = first_nonfinite(sd)
    if bad is not None:
        raise CheckpointError(
            f"checkpoint {source.url}: the {weights} weights hold non-finite values (first: {bad}); "
            "refusing to sample or evaluate it (see docs/training-health.md)"
        )
    inferred = infer_model_args(sd)
    expected = model_kwargs(cfg, inferred["z_dims"])
    if recorded:
        try:
            args = model_args_from_recorded(recorded)
        except ValueError as e:
            raise CheckpointError(f"checkpoint {source.url}: {e}") from None
        if check_config:
            problems = _mismatches(args, expected, "checkpoint")
            if problems:
                raise ModelMismatchError(
                    f"checkpoint {source.url} was trained as another model than the config describes: "
                    + "; ".join(problems)
                    + ". Use the run's own config (its config.yaml) or drop --config to use it"
                )
    else:
        args = dict(expected)
        if inferred.get("projector_dim"):
            args["projector_dim"] = inferred["projector_dim"]
        if not inferred["z_dims"]:
            args["encoder_depth"] = 0
    if args.get("z_dims") and not args.get("encoder_depth"):
        args["encoder_depth"] = 1  # projectors exist in the file; where they tap does not change v
    name = args["model"]
    kwargs = {k: v for k, v in args.items() if k != "model"}
    try:
        model = build_model(name, **kwargs)
        model.load_state_dict(sd, strict=True)
    except (RuntimeError, ValueError, TypeError) as e:
        problems = _mismatches(inferred, args, "weights")
        detail = "; ".join(problems) if problems else str(e).splitlines()[0]
        raise ModelMismatchError(f"weights in {source.url} do not fit model {name} {kwargs}: {detail}") from e
    model.eval().requires_grad_(False)
    log.info(
        "loaded %s weights of %s (step %s) into %s (%s)",
        weights,
        source.url,
        source.step,
        name,
        ", ".join(f"{k}={v}" for k, v in kwargs.items() if k in ("depth", "hidden_size", "input_size")),
    )
    return LoadedModel(model.to(device), args, source, weights)
