"""FD-DINOv2 (Stein et al. 2023, "Exposing flaws of generative model evaluation metrics") as dgm-eval has it.

dgm-eval (layer6ai-labs/dgm-eval ``dgm_eval/models/dinov2.py``) scores with DINOv2 ViT-L/14
(``torch.hub.load('facebookresearch/dinov2', 'dinov2_vitl14')``): each image, a PIL RGB image, goes
through ``Resize((224, 224), BICUBIC)`` (PIL's antialiased bicubic), ``ToTensor`` and ImageNet
``Normalize``; the feature is the model's output, the CLS token after the final LayerNorm
(``x_norm_clstoken``, 1024 dims); FD-DINOv2 is the Fréchet distance of those features' Gaussians
(:func:`repa.eval.stats.frechet_distance`, the same as FID's).

What comes from torch-fidelity 0.4 (``FeatureExtractorDinoV2``, registered as ``dinov2-vit-l-14``):
its ``forward`` (uint8 -> TF1-bilinear resize to 224 -> ImageNet normalisation on the 0..255 scale ->
``model(x)``), used as is. What does not fit, and is done here instead:

- loading: torch-fidelity builds the network with ``torch.hub.load`` (a download at eval time, which
  repa never does; a local weights path raises ``NotImplementedError``). Here the network is timm's
  ``vit_large_patch14_dinov2.lvd142m`` (the encoder registry's ``dinov2-vit-l``, the file ``repa
  weights fetch`` stages; timm's or facebookresearch's layout) built at 224 px.
- the resize: torch-fidelity resizes with TF1 bilinear, dgm-eval with PIL bicubic. Images are resized
  here with PIL, as dgm-eval does, to 224x224 uint8 first; torch-fidelity's resize of a 224x224 image is
  the identity, so the rest of its forward runs unchanged.
- the position embedding: the released weights hold a 37x37 grid (518 px). DINOv2 resamples it for a
  16x16 input at every call (``interpolate_pos_encoding``: bicubic, ``scale_factor=(16 + 0.1) / 37``,
  no antialias); timm's loader would resample differently (``resample_abs_pos_embed``, antialiased,
  to size 16), so :func:`dinov2_pos_embed_for` does DINOv2's resampling once, at load.

tests/unit/test_dinov2.py checks FD-DINOv2 on a tiny random-weight ViT of this code path against
torch-fidelity's ``calculate_metrics`` on the same images.
"""

from __future__ import annotations

import logging
import math
import sys
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from repa import storage
from repa.eval.errors import MetricsError

if TYPE_CHECKING:
    from repa.config import RunConfig

__all__ = [
    "DINOV2_ENCODER",
    "DINOV2_INPUT_SIZE",
    "DINOV2_NAME",
    "DinoV2FeatureExtractor",
    "build_dinov2",
    "build_dinov2_from_config",
    "dinov2_identity",
    "dinov2_pos_embed_for",
    "pil_bicubic_resize",
]

logger = logging.getLogger(__name__)

DINOV2_NAME = "dinov2-vit-l-14"
"""torch-fidelity's name for the extractor (and the name stored with reference statistics)."""
DINOV2_ENCODER = "dinov2-vit-l"
"""The encoder registry's (and ``repa weights fetch``'s) name for the weights."""
DINOV2_INPUT_SIZE = 224
PATCH_SIZE = 14
INTERPOLATE_OFFSET = 0.1  # DINOv2's DinoVisionTransformer.interpolate_offset
VIT_L_FEATURES, VIT_L_DEPTH = 1024, 24  # ViT-L/14: the network FD-DINOv2 is defined on


def pil_bicubic_resize(images: torch.Tensor, size: int = DINOV2_INPUT_SIZE) -> torch.Tensor:
    """uint8 (B, 3, H, W) -> uint8 (B, 3, size, size) by PIL's bicubic resize, as dgm-eval's
    ``torchvision.transforms.Resize((224, 224), BICUBIC)`` does on PIL images (PIL returns a copy
    when the size already matches). On the CPU: PIL is the reference, not an approximation of it."""
    from PIL import Image

    if images.shape[-2:] == (size, size):
        return images
    hwc = images.permute(0, 2, 3, 1).cpu().numpy()
    out = np.stack([np.asarray(Image.fromarray(im).resize((size, size), Image.BICUBIC)) for im in hwc])
    return torch.from_numpy(out).permute(0, 3, 1, 2).contiguous().to(images.device)


def dinov2_pos_embed_for(pos_embed: torch.Tensor, grid: int) -> torch.Tensor:
    """DINOv2's ``interpolate_pos_encoding`` of a (1, 1 + M*M, D) table for a ``grid`` x ``grid`` input.

    Bicubic, ``scale_factor = (grid + 0.1) / M``, no antialias, in float32; the CLS row kept.
    """
    n = pos_embed.shape[1] - 1
    m = math.isqrt(n)
    if m * m != n:
        raise MetricsError(f"DINOv2 position embedding of {n} patches is not a square grid")
    if m == grid:
        return pos_embed
    dim = pos_embed.shape[-1]
    pe = pos_embed.float()
    scale = float(grid + INTERPOLATE_OFFSET) / m
    patch = F.interpolate(
        pe[:, 1:].reshape(1, m, m, dim).permute(0, 3, 1, 2),
        scale_factor=(scale, scale),
        mode="bicubic",
        antialias=False,
    )
    if patch.shape[-2:] != (grid, grid):
        raise MetricsError(
            f"DINOv2 position embedding resampled to {tuple(patch.shape[-2:])}, not {grid}x{grid}"
        )
    patch = patch.permute(0, 2, 3, 1).reshape(1, grid * grid, dim)
    return torch.cat([pe[:, :1], patch], dim=1).to(pos_embed.dtype)


def _fidelity_class() -> type:
    from torch_fidelity.feature_extractor_base import FeatureExtractorBase
    from torch_fidelity.feature_extractor_dinov2 import FeatureExtractorDinoV2

    class _LocalDinoV2(FeatureExtractorDinoV2):
        """torch-fidelity's DINOv2 extractor with a given network instead of a torch.hub download."""

        def __init__(self, model: nn.Module) -> None:
            FeatureExtractorBase.__init__(self, DINOV2_NAME, ["dinov2"])  # skips the hub load, nothing else
            self.feature_extractor_internal_dtype = torch.float32
            self.model = model
            self.requires_grad_(False)
            self.eval()

    return _LocalDinoV2


class DinoV2FeatureExtractor(nn.Module):
    """dgm-eval's FD-DINOv2 features: PIL bicubic to 224 px, then torch-fidelity's DINOv2 forward (CLS).

    ``standard``: the network has ViT-L/14's shape (1024 features, 24 blocks), the one FD-DINOv2 is
    defined on; any other (the tiny test networks) is labelled as such wherever its number is shown.
    """

    name = DINOV2_NAME
    resize = "PIL bicubic to 224x224 (dgm-eval), then ImageNet mean/std (torch-fidelity's DINOv2 forward)"

    def __init__(self, model: nn.Module, weights_sha256: str | None) -> None:
        super().__init__()
        self.net = _fidelity_class()(model)
        self.weights_sha256 = weights_sha256
        self.feature_dim = int(getattr(model, "num_features", 0) or getattr(model, "embed_dim", 0))
        depth = len(getattr(model, "blocks", ()))
        self.standard = (self.feature_dim, depth) == (VIT_L_FEATURES, VIT_L_DEPTH)
        self.architecture = f"ViT, {self.feature_dim} features, {depth} blocks, patch {PATCH_SIZE}"
        self.requires_grad_(False).eval()

    def train(self, mode: bool = True) -> DinoV2FeatureExtractor:
        """Stays in eval mode: features must not depend on train/eval state."""
        return super().train(False)

    @property
    def device(self) -> torch.device:
        return next(self.net.parameters()).device

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        (features,) = self.net(pil_bicubic_resize(images))  # (B, D) CLS token after the final norm
        return features


def build_dinov2(
    weights: str | storage.Location | None,
    device: str | torch.device | None = None,
    model_kwargs: dict[str, Any] | None = None,
) -> DinoV2FeatureExtractor:
    """The FD-DINOv2 network from the file ``repa weights fetch`` stages (``dinov2-vit-l``); never downloads.

    ``weights``: a local path, fsspec URL or Location of a timm (``model.safetensors``) or
    facebookresearch (``dinov2_vitl14_pretrain.pth``) state dict. ``model_kwargs`` override timm's
    constructor (tiny test networks). No weights is an error: random features would be meaningless.
    """
    import timm

    from repa.encoders.registry import resolve_encoder_spec
    from repa.weights import WeightsError, load_torch_bytes

    spec = resolve_encoder_spec(DINOV2_ENCODER)
    if weights is None or (isinstance(weights, storage.Location) and not weights.url):
        raise MetricsError(
            f"no DINOv2 weights given: FD-DINOv2 needs {spec.timm_name} ({DINOV2_ENCODER}); stage them with "
            f"`repa weights fetch DEST --only {DINOV2_ENCODER}` and pass that file (repa never downloads)"
        )
    location = storage.locate(weights)
    kwargs = {**spec.model_kwargs, **(model_kwargs or {}), "img_size": DINOV2_INPUT_SIZE}
    model = timm.create_model(spec.timm_name, pretrained=False, num_classes=0, **kwargs)
    try:
        data, digest = storage.read_bytes_hashed(location)  # read once: hashed and loaded from the same bytes
    except FileNotFoundError as e:
        raise MetricsError(
            f"DINOv2 weights {location.url!r} not found (eval.dinov2_weights_url); stage them with "
            f"`repa weights fetch DEST --only {DINOV2_ENCODER}` and point the key at the file it prints"
        ) from e
    try:
        state = load_torch_bytes(data, location.url)
    except WeightsError as e:
        raise MetricsError(str(e)) from e
    for key in ("model", "state_dict"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or "pos_embed" not in state:
        raise MetricsError(f"DINOv2 weights {location.url!r} are not a ViT state dict (no pos_embed)")
    state = dict(state)
    state["pos_embed"] = dinov2_pos_embed_for(state["pos_embed"], DINOV2_INPUT_SIZE // PATCH_SIZE)
    convert = getattr(sys.modules[type(model).__module__], "checkpoint_filter_fn", lambda sd, m: sd)
    state = {k: v for k, v in convert(state, model).items() if not k.startswith("head.")}
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise MetricsError(
            f"DINOv2 weights {location.url!r} do not fit {spec.timm_name}: {str(e).splitlines()[0]}"
        ) from e
    extractor = DinoV2FeatureExtractor(model.eval(), digest)
    device = (
        torch.device(device)
        if device is not None
        else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    )
    logger.info("FD-DINOv2: %s from %s (sha256 %s)", spec.timm_name, location.url, digest[:12])
    return extractor.to(device)


def dinov2_identity(cfg: RunConfig) -> dict[str, Any] | None:
    """What decides FD-DINOv2 before anything is loaded (None when eval.metrics lacks fd_dinov2): part
    of an evaluation's digest only when asked for, so results without it keep their names."""
    if "fd_dinov2" not in cfg.eval.metrics:
        return None
    return {
        "name": DINOV2_NAME,
        "weights_url": cfg.eval.dinov2_weights_url,
        "reference_stats_url": cfg.eval.dinov2_reference_stats_url,
    }


def build_dinov2_from_config(
    cfg: RunConfig, device: str | torch.device | None = None
) -> DinoV2FeatureExtractor:
    """The FD-DINOv2 network of ``eval.dinov2_weights_url`` (error naming the key when it is null)."""
    if not cfg.eval.dinov2_weights_url:
        raise MetricsError(
            f"eval.dinov2_weights_url is null: FD-DINOv2 needs the {DINOV2_ENCODER} weights; stage them with "
            f"`repa weights fetch DEST --only {DINOV2_ENCODER}` and set the key (repa never downloads)"
        )
    return build_dinov2(cfg.storage.locate(cfg.eval.dinov2_weights_url), device)
