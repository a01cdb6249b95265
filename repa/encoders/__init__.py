"""Frozen representation encoders (REPA's alignment targets): registry, preprocessing, loading.

``build_encoder("dinov2-vit-b", weights_url=..., resolution=256)`` returns a :class:`FrozenEncoder`
whose ``forward(uint8 images)`` gives the (B, 256, 768) ``x_norm_patchtokens`` targets.
"""

from repa.encoders.frozen import (
    FrozenEncoder,
    build_encoder,
    check_images,
    load_encoder_weights,
    preprocess_raw_image,
)
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
    "check_images",
    "load_encoder_weights",
    "preprocess_raw_image",
    "register_encoder",
    "resolve_encoder_spec",
]
