"""Which SiT a checkpoint file holds, and rebuilding it: repa's own step folders and the official REPA
layout (sihyun-yu/REPA ``train.py``).

:func:`model_kwargs` is the only place that turns a run config into SiT constructor arguments: the
trainer builds its model with it, ``ema.pt`` records them, and :func:`load_model` compares a
checkpoint's recorded arguments (or those of an official REPA file) against it.

The official layout: what a file holds, read back.

``train.py`` saves ``{"model", "ema", "opt", "args", "steps"}`` with ``args`` its argparse Namespace;
the released EMA files are bare state dicts. This module knows those key names, the wrapper prefixes
third-party files carry, and how the recorded ``args`` (or the tensor shapes) map to SiT constructor
arguments, so repa loads such files strictly.

``train.py`` records no projector widths: it builds ``z_dims = [encoder.embed_dim for encoder in
encoders]`` from ``--enc-type`` (comma-separated, one projector each; ``utils.load_encoders``), so
:func:`z_dims_from_enc_type` reads them from repa's encoder registry, and for REPA's other encoder
families (``mocov3``, ``clip``, ``mae``, ``jepa``, ``dinov1``: ``{type}-vit-{size}``) from the ViT width
of the size letter.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from repa import storage
from repa.checkpoint.store import (
    EMA_FILE,
    MARKER,
    STATE_FILE,
    CheckpointError,
    CheckpointRef,
    CorruptCheckpointError,
    ModelMismatchError,
    checkpoints_url,
    latest_checkpoint,
    load_checkpoint_state,
    locate,
    quarantine_reason,
    read_verified,
)
from repa.config import ConfigError
from repa.storage import Location
from repa.weights import WeightsError, load_torch_bytes

if TYPE_CHECKING:
    from torch import nn

    from repa.config import RunConfig

log = logging.getLogger(__name__)

# Key prefixes added by wrappers rather than by the model: `module.` by DistributedDataParallel /
# DataParallel when a wrapped model's state_dict() is saved, `_orig_mod.` by torch.compile's
# OptimizedModule. Third-party REPA checkpoints carry them (the official save uses model.module);
# repa itself unwraps before saving, so they are stripped only when loading such files.
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")

# Token widths of the ViT sizes in REPA's ``{type}-vit-{size}`` encoder names: ViT-S/B/L/H (Dosovitskiy
# et al. 2021, Table 1; DeiT's S) and ViT-g/14 of DINOv2 (Oquab et al. 2023). CLIP's "L" is ViT-L/14.
_VIT_WIDTHS = {"s": 384, "b": 768, "l": 1024, "h": 1280, "g": 1536}


def z_dims_from_enc_type(enc_type: str) -> list[int]:
    """Projector widths of an official ``train.py --enc-type`` value, one per encoder.

    ``"dinov2-vit-b,dinov2-vit-l"`` -> ``[768, 1024]``; ``"None"`` (a vanilla SiT) -> ``[]``. Registered
    encoders give their ``embed_dim``; other ``{type}-vit-{s,b,l,h,g}`` names the ViT width. Raises
    ValueError naming an encoder whose width is unknown.
    """
    from repa.encoders.registry import ENCODERS

    if str(enc_type).strip() in ("None", ""):
        return []
    dims = []
    for name in (part.strip() for part in str(enc_type).split(",")):
        spec = ENCODERS.get(name)
        parts = name.split("-")
        if spec is not None and spec.embed_dim:
            dims.append(int(spec.embed_dim))
        elif len(parts) == 3 and parts[1] == "vit" and parts[2].lower() in _VIT_WIDTHS:
            dims.append(_VIT_WIDTHS[parts[2].lower()])
        else:
            raise ValueError(
                f"checkpoint args: enc_type {enc_type!r}: the width of encoder {name!r} is unknown; expected "
                f"a registered encoder ({', '.join(sorted(ENCODERS))}) or <type>-vit-<s|b|l|h|g>"
            )
    return dims


def load_reference_state_dict(obj: Any, which: str = "ema") -> dict[str, torch.Tensor]:
    """SiT state dict from an official REPA checkpoint ``{model, ema, opt, args, steps}`` or a bare one.

    ``obj`` is what ``repa.weights.load_torch_file`` returned; ``which`` picks ``"ema"`` (what the paper
    evaluates) or ``"model"`` (the raw training weights). Wrapper prefixes are stripped when every key
    has them. Raises ValueError naming the available keys when ``which`` is missing.
    """
    if not isinstance(obj, Mapping):
        raise ValueError(
            f"checkpoint: expected a dict (state dict or {{model, ema, ...}}), got {type(obj).__name__}"
        )
    if _is_state_dict(obj):
        sd = dict(obj)
    elif which in obj:
        sd = obj[which]
        if not isinstance(sd, Mapping) or not _is_state_dict(sd):
            raise ValueError(
                f"checkpoint[{which!r}]: expected a state dict of tensors, got {type(sd).__name__}"
            )
        sd = dict(sd)
    else:
        raise ValueError(
            f"checkpoint has no {which!r} entry (keys: {sorted(map(str, obj))}); "
            "expected the REPA layout {model, ema, opt, args, steps} or a bare state dict"
        )
    sd = _without_empty_projectors(sd)
    stripped = True
    while stripped:  # wrappers nest in either order, e.g. `module._orig_mod.`
        stripped = False
        for prefix in _WRAPPER_PREFIXES:
            if all(k.startswith(prefix) for k in sd):
                sd = {k[len(prefix) :]: v for k, v in sd.items()}
                stripped = True
    return sd


def _without_empty_projectors(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop projectors whose output layer is 0 wide: ``train.py --enc-type None`` builds
    ``z_dims = [0]``, a projector with no output that never enters the loss (a vanilla SiT)."""
    empty = set()
    for key, value in sd.items():
        parts = key.split(".")
        i = parts.index("projectors") if "projectors" in parts else -1
        if i >= 0 and len(parts) > i + 3 and key.endswith(".4.weight") and value.numel() == 0:
            empty.add(".".join(parts[: i + 2]) + ".")
    return {k: v for k, v in sd.items() if not any(k.startswith(p) for p in empty)} if empty else sd


def _is_state_dict(d: Mapping) -> bool:
    return len(d) > 0 and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in d.items())


def _sit_params() -> set[str]:
    import inspect

    from repa.models.sit import SiT

    return set(inspect.signature(SiT).parameters)


def with_table_sizes(args: Mapping[str, Any]) -> dict[str, Any]:
    """Fill depth/hidden_size/num_heads/patch_size from the size table entry ``args['model']``."""
    from repa.models.sizes import SIT_SIZES

    name = args.get("model")
    if name not in SIT_SIZES:
        raise ValueError(f"checkpoint records model {name!r}, which is not one of {', '.join(SIT_SIZES)}")
    out = dict(args)
    for key, value in SIT_SIZES[name].items():
        if out.get(key) is None:
            out[key] = value
    return out


def model_args_from_recorded(recorded: Mapping[str, Any]) -> dict[str, Any]:
    """SiT arguments (plus ``model``, the table name) from a checkpoint's recorded ``args``.

    Two layouts: repa's ``ema.pt`` records SiT's own keyword arguments; the official ``train.py``
    records its command line (``resolution``, ``encoder_depth``, ``enc_type`` ...), whose latents are
    ``resolution / 8`` per side (SD-VAE) and whose projector widths follow from ``enc_type``
    (:func:`z_dims_from_enc_type`; generate.py's ``projector_embed_dims`` is read when there is none).
    """
    if "input_size" in recorded:  # repa: SiT kwargs + model name
        keep = _sit_params() | {"model"}
        args = {k: v for k, v in recorded.items() if k in keep}
    elif "resolution" in recorded:  # official REPA train.py (enc_type), or generate.py's projector_embed_dims
        if recorded.get("enc_type") is not None:
            z_dims = z_dims_from_enc_type(recorded["enc_type"])
        else:
            dims = recorded.get("projector_embed_dims", "768")
            z_dims = [int(d) for d in str(dims).split(",") if d.strip()]
        args = {
            "model": recorded.get("model"),
            "input_size": int(recorded["resolution"]) // 8,
            "in_channels": 4,
            "encoder_depth": int(recorded.get("encoder_depth", 8)),
            "z_dims": z_dims,
            "num_classes": int(recorded.get("num_classes", 1000)),
            "qk_norm": bool(recorded.get("qk_norm", False)),
            "fused_attn": bool(recorded.get("fused_attn", True)),
        }
    else:
        raise ValueError(f"checkpoint args have neither input_size nor resolution: keys {sorted(recorded)}")
    if "z_dims" in args:
        args["z_dims"] = [int(z) for z in args["z_dims"]]
    return with_table_sizes(args)


def infer_model_args(sd: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """What the tensor shapes of a SiT state dict say about its architecture (reference key names)."""
    out: dict[str, Any] = {}
    w = sd.get("x_embedder.proj.weight")
    if w is not None and w.ndim == 4:
        out["hidden_size"], out["in_channels"], out["patch_size"] = (
            int(w.shape[0]),
            int(w.shape[1]),
            int(w.shape[2]),
        )
        pos = sd.get("pos_embed")
        if pos is not None and pos.ndim == 3:
            out["input_size"] = math.isqrt(int(pos.shape[1])) * out["patch_size"]
    blocks = {int(k.split(".")[1]) for k in sd if k.startswith("blocks.")}
    if blocks:
        out["depth"] = max(blocks) + 1
    table = sd.get("y_embedder.embedding_table.weight")
    if table is not None:
        out["num_classes"] = int(table.shape[0]) - 1  # + the null row
    heads = sorted(
        {int(k.split(".")[1]) for k in sd if k.startswith("projectors.") and k.endswith(".4.weight")}
    )
    out["z_dims"] = [int(sd[f"projectors.{h}.4.weight"].shape[0]) for h in heads]
    if heads:
        out["projector_dim"] = int(sd[f"projectors.{heads[0]}.0.weight"].shape[0])
    return out


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
    """Where weights come from: a committed step folder of a run, or a weights file (and the options to
    reach it, which take no part in comparisons)."""

    url: str  # step folder (kind "run") or .pt/.pth/.safetensors file (kind "file")
    kind: str  # "run" | "file"
    step: int | None = None
    run_url: str | None = None
    options: Mapping[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @property
    def location(self) -> Location:
        return Location(self.url, dict(self.options))

    def describe(self, weights: str) -> dict[str, Any]:
        return {"url": self.url, "step": self.step, "weights": weights}


_WEIGHT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors", ".ckpt")


def _parent(url: str) -> tuple[str, str]:
    head, _, name = url.rstrip("/").rpartition("/")
    return head, name


def resolve_checkpoint(checkpoint: str | Location | None, run: str | Location | None) -> CheckpointSource:
    """A checkpoint (step folder, its ema.pt/state.pt, or any weights file) or the latest committed
    checkpoint of ``run``; uncommitted step folders are refused."""
    if checkpoint is None:
        if run is None or not locate(run).url:
            raise ConfigError(
                "sample.checkpoint_url",
                "no checkpoint given: pass --checkpoint URL, or set storage.run_url to use the run's latest "
                "committed checkpoint",
            )
        run = locate(run)
        ref = latest_checkpoint(run)
        if ref is None:
            raise CheckpointError(f"no committed checkpoint under {checkpoints_url(run.url)}")
        return CheckpointSource(ref.url, "run", ref.step, run.url.rstrip("/"), dict(run.options))
    where = locate(checkpoint)
    url, options = where.url, dict(where.options)
    folder, name = _parent(url)
    if name in (EMA_FILE, STATE_FILE) and storage.exists(Location(storage.join(folder, MARKER), options)):
        url = folder  # a file inside a committed step folder: use the folder (and its recorded args)
    elif url.lower().endswith(_WEIGHT_SUFFIXES):
        if not storage.exists(where):
            raise CheckpointError(f"checkpoint {url}: not found")
        return CheckpointSource(url, "file", options=options)
    here = Location(url, options)
    reason = quarantine_reason(here)
    if reason is not None:
        raise CheckpointError(f"checkpoint {url} is quarantined ({reason}); use another step")
    try:
        marker = json.loads(storage.read_bytes(here.join(MARKER)))
    except FileNotFoundError:
        what = "does not exist" if not storage.listdir(here) else f"has no {MARKER} marker"
        raise CheckpointError(
            f"checkpoint {url}: {what}; only committed checkpoints are used (give a step folder with "
            f"{MARKER}, or a .pt file)"
        ) from None
    checkpoints_dir = _parent(url)[0]
    run_candidate, dir_name = _parent(checkpoints_dir)
    run_url = run_candidate if dir_name == "checkpoints" else None
    return CheckpointSource(url.rstrip("/"), "run", int(marker["step"]), run_url, options)


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
    file_sha256: str | None = None  # of a plain weights file, hashed as it was read (steps: COMMITTED)

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

    weights = weights or cfg.sample.checkpoint_weights
    if weights not in ("ema", "model"):
        raise ConfigError("sample.checkpoint_weights", f"{weights!r}; choose ema or model")
    recorded: dict[str, Any] | None = None
    file_sha256 = None
    if source.kind == "run":
        ema_url = storage.join(source.url, EMA_FILE)
        if weights == "ema" and storage.exists(source.location.join(EMA_FILE)):
            data = read_verified(source.location, EMA_FILE)  # checked against COMMITTED
            try:
                obj = load_torch_bytes(data, ema_url)
            except WeightsError as e:
                raise CorruptCheckpointError(str(e)) from e
            recorded = _recorded_args(obj)
            sd = load_reference_state_dict(obj, "ema")
        else:
            state = load_checkpoint_state(CheckpointRef(source.step or 0, source.url, source.options))
            sd = load_reference_state_dict(state, weights)
            if state.get("config"):
                z_dims = infer_model_args(sd)["z_dims"]
                recorded = model_kwargs(RunConfig.from_dict(state["config"]), z_dims)
    else:
        try:  # hashed while read: the evaluation's provenance records it without a second read
            data, file_sha256 = storage.read_bytes_hashed(source.location)
        except FileNotFoundError as e:
            raise WeightsError(f"weights file {source.url!r} not found") from e
        obj = load_torch_bytes(data, source.url)
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
    return LoadedModel(model.to(device), args, source, weights, file_sha256)
