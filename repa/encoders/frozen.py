"""Frozen encoder: uint8 images -> reference preprocessing -> timm ViT -> patch tokens (REPA targets).

Reference procedure (docs/architecture.md, golden README "Encoder"), reproduced exactly:

1. ``preprocess_raw_image``: ``x / 255`` -> ImageNet mean/std -> ``F.interpolate(bicubic)`` to
   ``224 * (res // 256)`` (align_corners=False, **no** antialias; normalise first, then resize).
2. Position embedding resampled **once, at load**, from the checkpoint grid (37x37 for the 518 px
   DINOv2 release) to the target grid with ``timm.layers.resample_abs_pos_embed`` (bicubic,
   antialias=True, the CLS row kept as is). timm's ViT ``checkpoint_filter_fn`` does exactly this
   while converting the facebookresearch layout (drops ``mask_token``; register models fold the
   CLS position into ``cls_token`` and keep a grid-only table, which gives the same tokens).
   With the grid matching, nothing is interpolated at run time.
3. ``forward_features`` -> tokens after the final LayerNorm; the patch tokens are what is left
   after dropping CLS and register tokens (``x_norm_patchtokens``), shape (B, T, D).

The encoder is frozen (``requires_grad=False``, always ``eval()``, forward under ``no_grad``). It
is rebuilt from its weights file at every start, so its parameters do not belong in training
checkpoints: keep it outside the trained model and record :meth:`FrozenEncoder.describe` instead.
"""

from __future__ import annotations

import hashlib
import logging
import sys
from collections.abc import Mapping
from typing import Any

import timm
import torch
import torch.nn.functional as F
from torch import nn

from repa import storage
from repa.encoders.registry import (
    DINOV2_PREPROCESSING,
    EncoderSpec,
    Preprocessing,
    UnknownEncoderError,
    resolve_encoder_spec,
)
from repa.weights import WeightsError, load_torch_file

logger = logging.getLogger(__name__)

__all__ = ["FrozenEncoder", "build_encoder", "check_encoder", "check_images", "preprocess_raw_image"]


def check_images(images: Any, resolution: int | None = None, what: str = "images") -> None:
    """Raise ValueError unless ``images`` is a uint8 tensor (B, 3, H, W) with H = W (= resolution)."""
    if not isinstance(images, torch.Tensor):
        raise ValueError(f"{what}: expected a torch.Tensor of uint8 (B,3,H,W), got {type(images).__name__}")
    if images.dtype != torch.uint8:
        raise ValueError(
            f"{what}: expected dtype torch.uint8 with values in [0, 255] (raw pixels), got {images.dtype}"
        )
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"{what}: expected shape (B, 3, H, W), got {tuple(images.shape)}")
    h, w = images.shape[-2:]
    if resolution is not None and (h != resolution or w != resolution):
        raise ValueError(
            f"{what}: expected {resolution}x{resolution} images (the encoder's resolution), got {h}x{w}"
        )
    if h != w:
        raise ValueError(f"{what}: expected square images, got {h}x{w}")


def preprocess_raw_image(
    images: torch.Tensor,
    preprocessing: Preprocessing = DINOV2_PREPROCESSING,
    input_size: int | None = None,
) -> torch.Tensor:
    """uint8 (B,3,H,W) -> float32 (B,3,S,S) encoder input, as REPA's ``train.py preprocess_raw_image``.

    ``input_size`` defaults to ``preprocessing.input_size(H)`` (224 for 256 px DINOv2 input).
    """
    check_images(images)
    size = preprocessing.input_size(images.shape[-1]) if input_size is None else input_size
    mean = torch.tensor(preprocessing.mean, dtype=torch.float32, device=images.device).view(1, 3, 1, 1)
    std = torch.tensor(preprocessing.std, dtype=torch.float32, device=images.device).view(1, 3, 1, 1)
    x = images / 255.0  # (B,3,H,W) float32 in [0, 1]

    def resize(x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] == size:
            return x
        # bicubic, align_corners=False, no antialias: the reference's F.interpolate defaults.
        return F.interpolate(x, size=(size, size), mode="bicubic", align_corners=False)

    if preprocessing.normalize_before_resize:
        return resize((x - mean) / std)  # torchvision Normalize = (x - mean) / std per channel
    return (resize(x) - mean) / std


class FrozenEncoder(nn.Module):
    """A frozen timm encoder with its reference preprocessing: ``forward(uint8) -> (B, T, D)``."""

    def __init__(
        self,
        name: str,
        spec: EncoderSpec,
        model: nn.Module,
        resolution: int,
        input_size: int,
        weights: storage.Location | None = None,
    ) -> None:
        super().__init__()
        self.name = name
        self.spec = spec
        self.model = model.eval().requires_grad_(False)
        self.resolution = resolution
        self.input_size = input_size
        self.weights = weights
        self.weights_url = weights.url if weights is not None else None
        self._weights_sha256: str | None = None
        n_prefix = spec.num_prefix_tokens
        self.num_prefix_tokens = int(getattr(model, "num_prefix_tokens", 0) if n_prefix is None else n_prefix)
        self.embed_dim = int(getattr(model, "num_features", 0) or getattr(model, "embed_dim", 0))
        patch_embed = getattr(model, "patch_embed", None)
        if patch_embed is not None and getattr(patch_embed, "num_patches", None):
            self.num_tokens = int(patch_embed.num_patches)
        else:  # not a ViT: ask the model once with a dummy image
            probe = torch.zeros(1, 3, resolution, resolution, dtype=torch.uint8)
            self.num_tokens = 0
            _, self.num_tokens, dim = self.forward(probe.to(self.device)).shape
            self.embed_dim = self.embed_dim or dim

    @property
    def device(self) -> torch.device:
        p = next(self.model.parameters(), None)
        return p.device if p is not None else torch.device("cpu")

    def train(self, mode: bool = True) -> FrozenEncoder:
        """Stays in eval mode whatever is asked: the targets must not depend on train/eval state."""
        return super().train(False)

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (B,3,R,R), R = resolution -> float32 (B,3,S,S) encoder input."""
        check_images(images, self.resolution)
        return preprocess_raw_image(images, self.spec.preprocessing, self.input_size)

    @torch.no_grad()
    def forward_preprocessed(self, x: torch.Tensor) -> torch.Tensor:
        """Encoder input (B,3,S,S) -> patch tokens (B,T,D), prefix (CLS/register) tokens dropped."""
        tokens = self.model.forward_features(x)  # (B, prefix + T, D) after the final norm
        if isinstance(tokens, dict):  # facebookresearch-style outputs, if a custom model returns them
            return tokens["x_norm_patchtokens"]
        if tokens.ndim == 4:  # convolutional feature map (B, D, h, w) -> (B, h*w, D)
            return tokens.flatten(2).transpose(1, 2)
        return tokens[:, self.num_prefix_tokens :]

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (B,3,R,R) -> patch tokens (B, num_tokens, embed_dim) (REPA's alignment target)."""
        check_images(images, self.resolution)
        images = images.to(self.device)
        return self.forward_preprocessed(self.preprocess(images))

    @property
    def weights_sha256(self) -> str | None:
        """sha256 of the weights file (read again on first access; None for random init)."""
        if self.weights is None:
            return None
        if self._weights_sha256 is None:
            data = storage.read_bytes(self.weights)
            self._weights_sha256 = hashlib.sha256(data).hexdigest()
        return self._weights_sha256

    def describe(self) -> dict[str, Any]:
        """What to record in checkpoints/manifests instead of the (frozen) parameters."""
        return {
            "name": self.name,
            "timm_name": self.spec.timm_name,
            "weights_url": self.weights_url,
            "resolution": self.resolution,
            "input_size": self.input_size,
            "embed_dim": self.embed_dim,
            "num_tokens": self.num_tokens,
        }

    def extra_repr(self) -> str:
        return (
            f"name={self.name!r}, tokens={self.num_tokens}, dim={self.embed_dim}, input={self.input_size}px"
        )


# ----------------------------------------------------------------------------------------------
# Building and loading
# ----------------------------------------------------------------------------------------------


def _create_model(spec: EncoderSpec, kwargs: dict[str, Any], name: str, img_size_optional: bool) -> nn.Module:
    if not timm.is_model(spec.timm_name):
        raise UnknownEncoderError(f"encoder {name!r}: timm has no model named {spec.timm_name!r}")
    try:
        return timm.create_model(spec.timm_name, pretrained=False, num_classes=0, **kwargs)
    except TypeError as e:
        if img_size_optional and "img_size" in str(e):  # e.g. CNNs: any input size, no img_size argument
            return _create_model(spec, {k: v for k, v in kwargs.items() if k != "img_size"}, name, False)
        raise ValueError(
            f"encoder {name!r}: timm model {spec.timm_name!r} rejected model_kwargs {kwargs}: {e}"
        ) from e


def _state_dict_from(obj: Any, url: str) -> dict[str, torch.Tensor]:
    """Unwrap ``{'model': sd}`` / ``{'state_dict': sd}`` containers (timm's convention) to a flat dict."""
    for key in ("model", "state_dict"):
        if isinstance(obj, Mapping) and isinstance(obj.get(key), Mapping):
            obj = obj[key]
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        keys = list(obj)[:8] if isinstance(obj, Mapping) else type(obj).__name__
        raise WeightsError(f"weights file {url!r} is not a state dict of tensors (top level: {keys})")
    return dict(obj)


def _checkpoint_filter(spec: EncoderSpec, model: nn.Module):
    if spec.checkpoint_filter is not None:
        return spec.checkpoint_filter
    # timm convention: each model module defines checkpoint_filter_fn(state_dict, model).
    return getattr(sys.modules[type(model).__module__], "checkpoint_filter_fn", lambda sd, model: sd)


def load_encoder_weights(model: nn.Module, spec: EncoderSpec, weights: str | storage.Location) -> None:
    """Load timm- or original-format weights into ``model`` strictly, converting and resampling."""
    url = str(weights)
    state = _state_dict_from(load_torch_file(weights), url)
    try:
        state = _checkpoint_filter(spec, model)(state, model)
    except Exception as e:  # conversion code raises anything from KeyError to RuntimeError
        raise WeightsError(f"weights file {url!r}: could not convert to {spec.timm_name!r}: {e!r}") from e
    expected = model.state_dict()
    # We build the encoder without a classifier (num_classes=0); a checkpoint's head is irrelevant.
    dropped = [k for k in state if k.startswith("head.") and k not in expected]
    for k in dropped:
        del state[k]
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    mismatched = [
        f"{k}: file {tuple(state[k].shape)} vs model {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state and state[k].shape != v.shape
    ]
    if missing or unexpected or mismatched:
        parts = []
        for label, items in (
            ("missing", missing),
            ("unexpected", unexpected),
            ("shape mismatch", mismatched),
        ):
            if items:
                more = f" (+{len(items) - 5} more)" if len(items) > 5 else ""
                parts.append(f"{len(items)} {label} keys: {', '.join(items[:5])}{more}")
        raise WeightsError(
            f"weights file {url!r} does not fit encoder {spec.timm_name!r}: " + "; ".join(parts)
        )
    model.load_state_dict(state, strict=True)
    logger.info("encoder %s: loaded %d tensors from %s", spec.timm_name, len(state), url)


def build_encoder(
    name: str,
    weights_url: str | storage.Location | None = None,
    resolution: int = 256,
    model_kwargs: Mapping[str, Any] | None = None,
) -> FrozenEncoder:
    """Build the frozen encoder ``name`` for ``resolution`` px images.

    name: a key of ``ENCODERS`` (``dinov2-vit-b``...) or ``timm:<timm model name>``.
    weights_url: local path, fsspec URL or ``repa.storage.Location`` (URL + fsspec options) of a
        ``.pth``/``.pt``/``.safetensors`` state dict, in timm layout or the original one (e.g.
        facebookresearch ``dinov2_vitb14_pretrain.pth``). None builds a randomly initialised encoder
        (a WARNING is logged: its features are meaningless).
    model_kwargs: ``timm.create_model`` overrides (tiny test models, a toy ``timm:`` encoder's
        ``embed_dim``/``depth``/``num_heads``/``patch_size``/``img_size``).
    """
    spec = resolve_encoder_spec(name)
    kwargs = {**spec.model_kwargs, **(model_kwargs or {})}
    input_size = spec.preprocessing.input_size(resolution, kwargs.get("img_size"))
    if "img_size" in kwargs and int(kwargs["img_size"]) != input_size:
        raise ValueError(
            f"encoder {name!r}: model_kwargs img_size={kwargs['img_size']} contradicts its preprocessing, "
            f"which feeds {input_size} px at resolution {resolution}"
        )
    img_size_optional = "img_size" not in kwargs and spec.preprocessing.resize != "repa"
    kwargs["img_size"] = input_size
    model = _create_model(spec, kwargs, name, img_size_optional)
    weights = _as_location(weights_url)
    if weights is not None:
        load_encoder_weights(model, spec, weights)
    else:
        logger.warning(
            "encoder %s: no weights_url given, using RANDOM weights. Its features are meaningless, so "
            "REPA alignment will not help; set encoder.weights_url to a state dict file (local path or "
            "s3://, gs:// URL; timm or original format, e.g. a copy of %s).",
            name,
            spec.reference_weights or "the model's published weights",
        )
    encoder = FrozenEncoder(name, spec, model, resolution, input_size, weights)
    if (
        spec.embed_dim is not None
        and "embed_dim" not in (model_kwargs or {})
        and encoder.embed_dim != spec.embed_dim
    ):
        raise ValueError(
            f"encoder {name!r}: registry says embed_dim {spec.embed_dim}, model has {encoder.embed_dim}"
        )
    return encoder


def check_encoder(name: str, resolution: int, model_kwargs: Mapping[str, Any] | None = None) -> None:
    """Raise what :func:`build_encoder` would for ``name`` and ``model_kwargs``, in milliseconds.

    Builds the timm model on the ``meta`` device (no memory, no weights), so an unknown timm name
    (:class:`UnknownEncoderError`) or a keyword its constructor does not take (``ValueError``) fails
    before a process group or data loader exists (``repa.train.trainer.check_inputs``).
    """
    spec = resolve_encoder_spec(name)
    kwargs = {**spec.model_kwargs, **(model_kwargs or {})}
    input_size = spec.preprocessing.input_size(resolution, kwargs.get("img_size"))
    img_size_optional = "img_size" not in kwargs and spec.preprocessing.resize != "repa"
    kwargs["img_size"] = input_size
    with torch.device("meta"):
        _create_model(spec, kwargs, name, img_size_optional)


def _as_location(url: str | storage.Location | None) -> Any:
    """A weights URL as a Location (a Location keeps its own options); None for no weights."""
    if isinstance(url, storage.Location):
        return url if url.url else None
    return storage.Location(url) if url else None
