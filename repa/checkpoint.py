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

:func:`model_kwargs` is the only place that turns a run config into SiT constructor arguments: the
trainer builds its model with it, ``ema.pt`` records them, and :func:`load_model` compares a
checkpoint's recorded arguments (or those of an official REPA file) against it.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import logging
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from repa import storage
from repa.config import ConfigError
from repa.weights import load_torch_file

if TYPE_CHECKING:
    from torch import nn

    from repa.config import RunConfig

log = logging.getLogger(__name__)


class CheckpointError(ValueError):
    """A checkpoint is missing, uncommitted or unreadable; the message names it."""


class ModelMismatchError(ConfigError):
    """The checkpoint was trained with another model configuration than the one given."""

    def __init__(self, message: str) -> None:
        super().__init__("model", message)


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
        raise CheckpointError(
            f"checkpoint {ref.url} is not committed (no {MARKER} marker); refusing to load it"
        )
    state = load_torch_file(ref.state_url, storage_options)
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{ref.state_url}: not a {FORMAT} file (format tag {state.get('format')!r})")
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
            obj = load_torch_file(ema_url, storage_options)
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
