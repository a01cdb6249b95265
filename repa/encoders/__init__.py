"""Frozen representation encoders (REPA's alignment targets): registry, preprocessing, loading.

``build_encoder("dinov2-vit-b", weights=..., resolution=256)`` returns a :class:`FrozenEncoder`
whose ``forward(uint8 images)`` gives the (B, 256, 768) ``x_norm_patchtokens`` targets. The registry
(``registry.py``) is plain data, imported eagerly; the torch/timm half (``frozen.py``) loads on first use,
so config validation never imports torch.
"""

from __future__ import annotations

import importlib
from typing import Any

from repa.encoders.registry import (
    CLIP_PREPROCESSING,
    DINOV2_PREPROCESSING,
    ENCODERS,
    IMAGENET_DEFAULT_MEAN,
    IMAGENET_DEFAULT_STD,
    TIMM_PREFIX,
    EncoderSpec,
    Preprocessing,
    UnknownEncoderError,
    register_encoder,
    resolve_encoder_spec,
)

_FROZEN = (
    "FrozenEncoder",
    "build_encoder",
    "check_encoder",
    "check_images",
    "load_encoder_weights",
    "preprocess_raw_image",
)

__all__ = [
    "CLIP_PREPROCESSING",
    "DINOV2_PREPROCESSING",
    "ENCODERS",
    "IMAGENET_DEFAULT_MEAN",
    "IMAGENET_DEFAULT_STD",
    "TIMM_PREFIX",
    "EncoderSpec",
    "FrozenEncoder",
    "Preprocessing",
    "UnknownEncoderError",
    "build_encoder",
    "check_encoder",
    "check_images",
    "load_encoder_weights",
    "preprocess_raw_image",
    "register_encoder",
    "resolve_encoder_spec",
]


def __getattr__(name: str) -> Any:
    if name in _FROZEN:
        return getattr(importlib.import_module("repa.encoders.frozen"), name)
    raise AttributeError(f"module 'repa.encoders' has no attribute {name!r}")
