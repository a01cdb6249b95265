"""Registry of frozen representation encoders: one entry says how to build, feed and read one.

REPA aligns SiT hidden states with the patch tokens of a frozen, pretrained vision encoder
(REPA §3.2). The reference hard-codes each encoder family twice, in ``utils.load_encoders``
(torch.hub) and in ``train.py preprocess_raw_image`` (``if 'dinov2' in enc_type`` ...). Here an
encoder is one :class:`EncoderSpec`: the timm architecture, its preprocessing, and which output
tokens are patch tokens. Adding CLIP, SigLIP or MAE is one ``register_encoder`` call; a model
that only exists as a file (e.g. a toy ViT trained on small data) is named ``timm:<model_name>``.

Nothing here downloads anything: weights always come from ``weights_url`` (see ``build_encoder``).
``reference_weights`` only documents where the official files live.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Literal

# timm.data.constants (the values torchvision's ImageNet models use).
IMAGENET_DEFAULT_MEAN = (0.485, 0.456, 0.406)
IMAGENET_DEFAULT_STD = (0.229, 0.224, 0.225)
# OpenAI CLIP (timm.data.constants.OPENAI_CLIP_MEAN/STD), for a future CLIP entry.
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

TIMM_PREFIX = "timm:"

ResizeRule = Literal["repa", "none", "model"]


class UnknownEncoderError(ValueError):
    """The encoder name is neither registered nor of the form ``timm:<model name>``."""


@dataclass(frozen=True)
class Preprocessing:
    """How uint8 images in [0, 255] become encoder input (``preprocess_raw_image`` in REPA's train.py).

    ``resize``:
      - ``"repa"``: bicubic to ``224 * (resolution // 256)`` per side (DINOv2, CLIP, I-JEPA in REPA:
        224 px at 256, 448 px at 512, so a patch-14 ViT sees 16x16 = 256 tokens per 256 px image);
      - ``"none"``: keep the image size (MoCo-v3, MAE, DINOv1 in REPA: patch 16 on 256 px);
      - ``"model"``: resize to the model's ``img_size`` if one is given, else keep the size (``timm:``).
    ``normalize_before_resize``: DINOv2 normalises then resizes, CLIP resizes then normalises. Both
    ops are linear, so the order only changes float rounding (1.7e-6, golden README), but we follow
    the reference exactly.
    """

    mean: tuple[float, float, float] = IMAGENET_DEFAULT_MEAN
    std: tuple[float, float, float] = IMAGENET_DEFAULT_STD
    resize: ResizeRule = "repa"
    normalize_before_resize: bool = True

    def input_size(self, resolution: int, img_size: int | None = None) -> int:
        """Side of the encoder input for square images of side ``resolution``."""
        if self.resize == "repa":
            if resolution < 256:
                raise ValueError(
                    f"resolution {resolution}: this encoder's preprocessing resizes to 224*(resolution//256)"
                    " px (REPA), which needs resolution >= 256; use a 'timm:' encoder for small images"
                )
            return 224 * (resolution // 256)
        if self.resize == "none":
            return resolution
        if self.resize == "model":
            return resolution if img_size is None else int(img_size)
        raise ValueError(
            f"Preprocessing.resize: unknown rule {self.resize!r} (use 'repa', 'none' or 'model')"
        )


DINOV2_PREPROCESSING = Preprocessing(IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, "repa", True)
CLIP_PREPROCESSING = Preprocessing(OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, "repa", False)


@dataclass(frozen=True, eq=False)
class EncoderSpec:
    """Everything needed to build one frozen encoder with timm and read its patch tokens."""

    timm_name: str
    """timm model name (a pretrained tag like ``.lvd142m`` selects timm's default config, no download)."""
    embed_dim: int | None = None
    """Width of the patch tokens (the projector's ``z_dim``); None = whatever the model has."""
    preprocessing: Preprocessing = DINOV2_PREPROCESSING
    model_kwargs: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))
    """Extra ``timm.create_model`` arguments (``img_size`` is set from the resolution)."""
    num_prefix_tokens: int | None = None
    """Tokens before the patch tokens in ``forward_features`` (CLS + registers); None = the model's own
    ``num_prefix_tokens`` attribute (timm ViTs: 1, or 5 with 4 registers)."""
    checkpoint_filter: Callable[[dict, Any], dict] | None = None
    """Converts a foreign state dict to timm names (``fn(state_dict, model)``); None = the timm model
    module's own ``checkpoint_filter_fn`` (the ViT one converts facebookresearch DINOv2, OpenAI CLIP...)."""
    reference_weights: str = ""
    """Where the official weights are published (documentation only; repa never downloads them)."""
    description: str = ""


def _dinov2(size: str, timm_arch: str, embed_dim: int, reg: bool) -> EncoderSpec:
    suffix = "_reg4" if reg else ""
    hub = f"dinov2_vit{size}14{suffix}"
    return EncoderSpec(
        timm_name=f"vit_{timm_arch}_patch14{suffix}_dinov2.lvd142m",
        embed_dim=embed_dim,
        preprocessing=DINOV2_PREPROCESSING,
        reference_weights=f"https://dl.fbaipublicfiles.com/dinov2/dinov2_vit{size}14/{hub}_pretrain.pth",
        description=f"DINOv2 ViT-{size.upper()}/14{' with 4 registers' if reg else ''} "
        f"(torch.hub facebookresearch/dinov2 '{hub.replace('_reg4', '_reg')}'), x_norm_patchtokens",
    )


ENCODERS: dict[str, EncoderSpec] = {}


def register_encoder(name: str, spec: EncoderSpec, *, overwrite: bool = False) -> EncoderSpec:
    """Add ``spec`` under ``name`` (the string configs use, e.g. ``encoder.name: dinov2-vit-b``)."""
    if not name or name.startswith(TIMM_PREFIX):
        raise ValueError(f"encoder name {name!r}: must be non-empty and not start with {TIMM_PREFIX!r}")
    if name in ENCODERS and not overwrite:
        raise ValueError(f"encoder {name!r} is already registered (pass overwrite=True to replace it)")
    if not isinstance(spec, EncoderSpec):
        raise TypeError(f"register_encoder({name!r}): spec must be an EncoderSpec, got {type(spec).__name__}")
    ENCODERS[name] = spec
    return spec


# REPA's --enc-type names; sizes from the DINOv2 paper / timm (S 384, B 768, L 1024, g 1536).
for _size, _arch, _dim in (
    ("s", "small", 384),
    ("b", "base", 768),
    ("l", "large", 1024),
    ("g", "giant", 1536),
):
    register_encoder(f"dinov2-vit-{_size}", _dinov2(_size, _arch, _dim, reg=False))
    register_encoder(f"dinov2-vit-{_size}-reg", _dinov2(_size, _arch, _dim, reg=True))


def resolve_encoder_spec(name: str) -> EncoderSpec:
    """The spec for a registered name, or a generic one for ``timm:<model name>``."""
    if name in ENCODERS:
        return ENCODERS[name]
    if name.startswith(TIMM_PREFIX) and len(name) > len(TIMM_PREFIX):
        return EncoderSpec(
            timm_name=name[len(TIMM_PREFIX) :],
            preprocessing=Preprocessing(IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, "model", True),
            description="bring-your-own timm encoder: ImageNet mean/std, resized to model_kwargs['img_size'] "
            "if given (else fed at the data resolution), weights from weights_url",
        )
    known = ", ".join(sorted(ENCODERS))
    raise UnknownEncoderError(f"unknown encoder {name!r}; known: {known}, or 'timm:<timm model name>'")
