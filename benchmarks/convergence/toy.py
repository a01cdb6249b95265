"""The convergence experiment's toy networks: a frozen ViT encoder to align with and a CNN for the FD.

REPA's claim (Yu et al., ICLR 2025, arXiv 2410.06940) is that aligning an early SiT block with a
*pretrained* frozen encoder speeds up diffusion training. To test the claim end to end on a CPU
(benchmarks/convergence/run.py, docs/convergence.md) we need three things that no package ships at
16-32 px:

- data: :func:`make_shapes` is the product's shape painter (:mod:`repa.synthetic`: 10 classes of
  shapes and textures with random size, position and rotation), anti-aliased and noise-free, with
  each image's foreground mask; :func:`repa.synthetic.write_image_tree` writes them as
  ``<class>/<i>.png``, the ImageNet-style tree ``repa prepare`` reads;
- a meaningful frozen encoder for alignment: :func:`train_vit_encoder` trains a small timm ViT
  (supervised classification, mean-pooled patch tokens, so every patch token carries the class
  signal) and saves a timm state dict that the normal registry loads (``timm:<name>`` +
  ``encoder.weights_urls`` + ``encoder.model_kwargs``);
- an evaluation network that is *not* the alignment encoder: :class:`ToyClassifier`, a small CNN
  whose pooled penultimate features give ``FD_toy-shapes-cnn`` through ``repa eval``/``repa watch``
  (``--feature-extractor benchmarks.convergence.toy:classifier_extractor``, weights from
  ``$REPA_TOY_CLASSIFIER``; the repository root must be on ``PYTHONPATH``).

Experiment code, not part of the ``repa`` package (nothing under ``repa/`` imports it). Randomness is
explicit (``seed=`` arguments); nothing here downloads anything.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from repa import storage, synthetic

logger = logging.getLogger(__name__)

__all__ = [
    "CLASSIFIER_ENV",
    "CLASSIFIER_NAME",
    "ENCODER_OBJECTIVES",
    "SUPERSAMPLE",
    "ToyClassifier",
    "classifier_extractor",
    "encoder_token_stats",
    "load_classifier",
    "make_shapes",
    "measure_encoder_targets",
    "train_classifier",
    "train_vit_encoder",
]

CLASSIFIER_NAME = "toy-shapes-cnn"
"""Name of the evaluation network: its Fréchet distance is reported as ``FD_toy-shapes-cnn``."""
CLASSIFIER_ENV = "REPA_TOY_CLASSIFIER"
"""Environment variable holding the classifier's weights URL for :func:`classifier_extractor`."""

# ----------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------

SUPERSAMPLE = 4
"""The experiment's shapes are drawn at 4x the resolution and box-filtered down (anti-aliased edges)."""


def make_shapes(
    per_class: int, resolution: int = 16, seed: int = 0, num_classes: int = 10, palette: str = "random"
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(images uint8 (N, H, W, 3), labels int64 (N,), masks float32 (N, H, W))``: ``per_class`` images
    of each class, in class order, from :func:`repa.synthetic.make_shapes` drawn at :data:`SUPERSAMPLE`x
    without noise, so an image is exactly ``rint(bg + mask * (fg - bg))`` (``mono``: ``rint(mask * 255)``).
    ``masks`` is each image's foreground coverage in [0, 1]. Deterministic in ``seed``; a different seed
    gives a held-out set. ``palette`` is one of :data:`repa.synthetic.PALETTES`."""
    if resolution < 4:
        raise ValueError(f"resolution: expected >= 4, got {resolution}")
    return synthetic.make_shapes(
        per_class,
        resolution,
        seed=seed,
        num_classes=num_classes,
        palette=palette,
        supersample=SUPERSAMPLE,
        noise=0.0,
    )


def _to_nchw(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    x = torch.as_tensor(images)
    return x.permute(0, 3, 1, 2).contiguous() if x.shape[-1] == 3 else x


def _shift(x: torch.Tensor, gen: torch.Generator, max_shift: int = 2) -> torch.Tensor:
    """Random translation by up to ``max_shift`` px (edge padding), one offset per batch (augmentation)."""
    dx, dy = (int(v) for v in torch.randint(-max_shift, max_shift + 1, (2,), generator=gen))
    pad = F.pad(x.float(), (max_shift,) * 4, mode="replicate")
    h, w = x.shape[-2:]
    return pad[..., max_shift + dy : max_shift + dy + h, max_shift + dx : max_shift + dx + w]


def _fit(
    model: nn.Module,
    inputs: torch.Tensor,
    labels: torch.Tensor,
    steps: int,
    batch_size: int,
    lr: float,
    seed: int,
    what: str,
    loss_fn: Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
) -> None:
    """AdamW + cosine decay on ``loss_fn(model, inputs, labels)`` (default: cross-entropy of
    ``model(inputs)``), random shifts as augmentation (``inputs`` float NCHW)."""
    loss_fn = loss_fn or (lambda m, x, y: F.cross_entropy(m(x), y))
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    model.train()
    for step in range(steps):
        idx = torch.randint(0, len(inputs), (batch_size,), generator=gen)
        loss = loss_fn(model, _shift(inputs[idx], gen), labels[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if (step + 1) % max(1, steps // 4) == 0:
            logger.info("%s: step %d/%d, loss %.4f", what, step + 1, steps, loss.item())
    model.eval()


@torch.no_grad()
def _accuracy(model: nn.Module, inputs: torch.Tensor, labels: torch.Tensor) -> float:
    model.eval()
    pred = torch.cat([model(inputs[i : i + 256]).argmax(-1) for i in range(0, len(inputs), 256)])
    return float((pred == labels).float().mean())


# ----------------------------------------------------------------------------------------------
# The frozen encoder for alignment (a timm ViT, loaded later through repa.encoders)
# ----------------------------------------------------------------------------------------------


ENCODER_OBJECTIVES = ("classify", "segment", "reconstruct")
"""How :func:`train_vit_encoder` trains the toy encoder: ``classify`` (the class from the mean of the
patch tokens), ``segment`` (every patch token predicts the class of the shape it covers, or
"background"; shapes only, it needs masks), or ``reconstruct`` (self-supervised, no labels: half of the
patches are blanked and every patch token predicts its own patch's pixels, a minimal masked
auto-encoder after He et al. 2022, arXiv 2111.06377), which gives patch tokens a spatial structure
(docs/convergence.md)."""


def _patch_targets(masks: torch.Tensor, labels: torch.Tensor, grid: int, num_classes: int) -> torch.Tensor:
    """(B, grid*grid) segmentation targets: the image's class where a patch is >= half covered by the
    shape, else ``num_classes`` (background)."""
    cover = F.adaptive_avg_pool2d(masks, grid).flatten(1)  # (B, 1, H, W) -> (B, grid*grid)
    return torch.where(cover >= 0.5, labels[:, None], torch.full_like(labels[:, None], num_classes))


def train_vit_encoder(
    name: str,
    model_kwargs: Mapping[str, Any],
    train: tuple[np.ndarray, ...],
    val: tuple[np.ndarray, ...],
    out_url: str,
    *,
    steps: int = 400,
    batch_size: int = 128,
    lr: float = 2e-3,
    seed: int = 0,
    objective: str = "classify",
) -> float:
    """Train ``timm:<name>`` with ``model_kwargs`` on ``train``; save its state dict to ``out_url``.

    ``train``/``val`` are ``(images, labels)`` for ``objective="classify"`` and ``(images, labels,
    masks)`` (:func:`make_shapes`) for ``"segment"``. The input is exactly what
    :class:`repa.encoders.FrozenEncoder` feeds it (the registry's preprocessing for ``timm:`` entries),
    so the saved weights see the same distribution at alignment time. Use ``global_pool='avg',
    class_token=False, fc_norm=False`` in ``model_kwargs``: the classifier then reads the final-LayerNorm
    patch tokens (their mean for ``classify``, each one for ``segment``). Returns the held-out accuracy
    (per image for ``classify``, per patch for ``segment``).
    """
    import timm

    from repa.encoders import resolve_encoder_spec
    from repa.encoders.frozen import preprocess_raw_image

    if objective not in ENCODER_OBJECTIVES:
        raise ValueError(f"objective: expected one of {', '.join(ENCODER_OBJECTIVES)}, got {objective!r}")
    if objective == "reconstruct":
        return _train_reconstruct(
            name, model_kwargs, (train[0], val[0]), out_url, (steps, batch_size, lr, seed)
        )
    if objective == "segment" and (len(train) < 3 or len(val) < 3):
        raise ValueError("objective 'segment' needs (images, labels, masks) for train and val")
    spec = resolve_encoder_spec(f"timm:{name}")
    resolution = train[0].shape[1]
    size = spec.preprocessing.input_size(resolution, model_kwargs.get("img_size"))
    num_classes = int(train[1].max()) + 1
    torch.manual_seed(seed)
    model = timm.create_model(
        spec.timm_name,
        pretrained=False,
        num_classes=num_classes + (objective == "segment"),
        **dict(model_kwargs),
    )

    def prep(split: tuple[np.ndarray, ...]) -> torch.Tensor:
        x = preprocess_raw_image(_to_nchw(split[0]), spec.preprocessing, size)
        if objective == "segment":  # the mask rides along as a 4th channel, so shifts move it too
            masks = torch.as_tensor(split[2])[:, None]
            x = torch.cat([x, F.interpolate(masks, size=x.shape[-2:], mode="area")], dim=1)
        return x

    grid = int(model.patch_embed.grid_size[0])  # patch tokens per side

    def segment_logits(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return m.head(m.forward_features(x[:, :3]))  # (B, grid*grid, classes + 1)

    def segment_loss(m: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        target = _patch_targets(x[:, 3:], y, grid, num_classes)
        return F.cross_entropy(segment_logits(m, x).flatten(0, 1), target.flatten())

    x, y = prep(train), torch.as_tensor(train[1])
    loss_fn = segment_loss if objective == "segment" else None
    _fit(model, x, y, steps, batch_size, lr, seed, f"encoder timm:{name} ({objective})", loss_fn)
    xv, yv = prep(val), torch.as_tensor(val[1])
    if objective == "segment":
        with torch.no_grad():
            pred = segment_logits(model.eval(), xv).argmax(-1)
        acc = float((pred == _patch_targets(xv[:, 3:], yv, grid, num_classes)).float().mean())
    else:
        acc = _accuracy(model, xv, yv)
    state = {k: v.detach().clone() for k, v in model.state_dict().items() if not k.startswith("head.")}
    _save(state, out_url)
    logger.info("encoder timm:%s (%s): held-out accuracy %.3f -> %s", name, objective, acc, out_url)
    return acc


def _train_reconstruct(
    name: str,
    model_kwargs: Mapping[str, Any],
    images: tuple[np.ndarray, np.ndarray],
    out_url: str,
    fit: tuple,
) -> float:
    """The ``reconstruct`` objective of :func:`train_vit_encoder` on ``images`` = (train, held-out), no
    labels; ``fit`` = (steps, batch_size, lr, seed). Returns the held-out R^2 of the blanked pixels."""
    import timm

    from repa.encoders import resolve_encoder_spec
    from repa.encoders.frozen import preprocess_raw_image

    steps, batch_size, lr, seed = fit

    spec = resolve_encoder_spec(f"timm:{name}")
    size = spec.preprocessing.input_size(images[0].shape[1], model_kwargs.get("img_size"))
    torch.manual_seed(seed)
    probe = timm.create_model(spec.timm_name, pretrained=False, num_classes=0, **dict(model_kwargs))
    patch = int(probe.patch_embed.patch_size[0])
    model = timm.create_model(
        spec.timm_name, pretrained=False, num_classes=3 * patch * patch, **dict(model_kwargs)
    )
    grid = int(model.patch_embed.grid_size[0])
    gen = torch.Generator().manual_seed(seed + 7)

    def patches(x: torch.Tensor) -> torch.Tensor:  # (B, 3, H, W) -> (B, T, 3 * p * p)
        return F.unfold(x, patch, stride=patch).transpose(1, 2)

    def masked_loss(
        m: nn.Module, x: torch.Tensor, g: torch.Generator | None = None
    ) -> tuple[torch.Tensor, ...]:
        keep = (torch.rand(x.shape[0], 1, grid, grid, generator=g or gen) >= 0.5).float()
        blanked = x * F.interpolate(keep, size=x.shape[-2:], mode="nearest")
        pred = m.head(m.forward_features(blanked))  # (B, T, 3 p p): each token its own patch
        hidden = (1 - keep.flatten(1))[..., None]
        target = patches(x)
        return (
            (((pred - target) ** 2) * hidden).sum() / (hidden.sum() * target.shape[-1] + 1e-8),
            target,
            hidden,
        )

    x = preprocess_raw_image(_to_nchw(images[0]), spec.preprocessing, size)
    labels = torch.zeros(len(x), dtype=torch.long)
    _fit(
        model,
        x,
        labels,
        steps,
        batch_size,
        lr,
        seed,
        f"encoder timm:{name} (reconstruct)",
        lambda m, xb, _: masked_loss(m, xb)[0],
    )
    xv = preprocess_raw_image(_to_nchw(images[1]), spec.preprocessing, size)
    with torch.no_grad():
        mse, target, hidden = masked_loss(model.eval(), xv, torch.Generator().manual_seed(seed + 8))
        var = (((target - target.mean()) ** 2) * hidden).sum() / (hidden.sum() * target.shape[-1])
    r2 = float(1 - mse / var)
    state = {k: v.detach().clone() for k, v in model.state_dict().items() if not k.startswith("head.")}
    _save(state, out_url)
    logger.info(
        "encoder timm:%s (reconstruct): held-out R^2 of blanked patches %.3f -> %s", name, r2, out_url
    )
    return r2


@torch.no_grad()
def encoder_token_stats(tokens: torch.Tensor, images: torch.Tensor, patch_size: int) -> dict[str, float]:
    """What a REPA target holds, from an encoder's patch tokens ``(B, T, D)`` of uint8 ``images``.

    Tokens are L2-normalised first (REPA's loss compares directions). Returns

    - ``global_share``: the share of token variance that is the per-image mean token (constant over
      the image, e.g. the class: with labels as conditioning the SiT can match it without looking);
    - ``spatial_share``: ``1 - global_share``, how much the tokens differ within an image (the
      "spatial structure" iREPA, arXiv 2512.10794, finds to drive REPA's gains);
    - ``pixel_r2``: R^2 of a ridge-linear map from each token's own ``patch_size``-px pixel patch to
      the token (1.0: the target is a local linear function of pixels SiT's patch embedding already
      sees, as for a random ViT).
    """
    t = F.normalize(tokens.double(), dim=-1)
    image_mean = t.mean(1, keepdim=True)
    global_var = (image_mean - t.mean((0, 1))).pow(2).sum(-1).mean()
    spatial_var = (t - image_mean).pow(2).sum(-1).mean()
    pixels = F.unfold(images.double() / 127.5 - 1, patch_size, stride=patch_size).transpose(1, 2)
    if pixels.shape[1] != t.shape[1]:
        raise ValueError(f"{pixels.shape[1]} pixel patches of size {patch_size} vs {t.shape[1]} tokens")
    x = torch.cat([pixels.flatten(0, 1), torch.ones(pixels.shape[0] * pixels.shape[1], 1).double()], 1)
    y = t.flatten(0, 1)
    w = torch.linalg.solve(x.T @ x + 1e-3 * torch.eye(x.shape[1]).double(), x.T @ y)
    r2 = 1 - (y - x @ w).pow(2).sum() / (y - y.mean(0)).pow(2).sum()
    share = float(global_var / (global_var + spatial_var))
    return {"global_share": share, "spatial_share": 1 - share, "pixel_r2": float(r2)}


@torch.no_grad()
def measure_encoder_targets(
    name: str,
    weights_url: str | None,
    model_kwargs: Mapping[str, Any],
    images: np.ndarray,
    seed: int = 0,
) -> dict[str, float]:
    """:func:`encoder_token_stats` of encoder ``name`` (built through the registry like ``repa train``
    does; ``weights_url`` None = random weights from torch seed ``seed``) on uint8 ``images`` (N, H, W, 3)."""
    from repa.encoders.frozen import build_encoder

    torch.manual_seed(seed)
    encoder = build_encoder(name, weights_url, images.shape[1], model_kwargs)
    x = _to_nchw(images)
    return encoder_token_stats(encoder(x), x, int(encoder.model.patch_embed.patch_size[0]))


def _save(state: dict[str, torch.Tensor], url: str) -> None:
    import io

    buf = io.BytesIO()
    torch.save(state, buf)
    storage.write_bytes_atomic(url, buf.getvalue())


# ----------------------------------------------------------------------------------------------
# The evaluation network (FD_toy-shapes-cnn)
# ----------------------------------------------------------------------------------------------


class ToyClassifier(nn.Module):
    """Small CNN: 3 conv stages (16 -> 8 -> 4 px) -> global average pool (``width`` features) -> logits.

    As a :class:`repa.eval.features.FeatureExtractor` it maps uint8 images (B, 3, H, W) to the pooled
    features (B, width), the analogue of Inception's pool_3 for FID. A different architecture and
    training run from the alignment encoder, so an FD gain is not the encoder grading itself.
    """

    name = CLASSIFIER_NAME

    def __init__(self, num_classes: int = 10, width: int = 64) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, width // 2, 3, padding=1),
            nn.GELU(),
            nn.Conv2d(width // 2, width, 3, stride=2, padding=1),
            nn.GELU(),
            nn.Conv2d(width, width, 3, padding=1),
            nn.GELU(),
            nn.Conv2d(width, width, 3, stride=2, padding=1),
            nn.GELU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.head = nn.Linear(width, num_classes)
        self.weights_sha256: str | None = None

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """float input in [-1, 1] (B, 3, H, W) -> logits (training)."""
        return self.head(self.features(x))

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (B, 3, H, W) -> features (B, width)."""
        if images.dtype != torch.uint8:
            raise ValueError(f"{self.name}: expected uint8 images, got {images.dtype}")
        device = next(self.parameters()).device
        return self.features(images.to(device).float() / 127.5 - 1.0)


def train_classifier(
    train: tuple[np.ndarray, np.ndarray],
    val: tuple[np.ndarray, np.ndarray],
    out_url: str,
    *,
    steps: int = 300,
    batch_size: int = 128,
    lr: float = 3e-3,
    seed: int = 1,
) -> float:
    """Train :class:`ToyClassifier` on ``train`` and save its state dict to ``out_url``; returns held-out
    accuracy."""
    torch.manual_seed(seed)
    model = ToyClassifier(num_classes=int(train[1].max()) + 1)

    class _Logits(nn.Module):  # _fit calls model(x) on float input
        def __init__(self, m: ToyClassifier) -> None:
            super().__init__()
            self.m = m

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.m.logits(x)

    def prep(images: np.ndarray) -> torch.Tensor:
        return _to_nchw(images).float() / 127.5 - 1.0

    wrapped = _Logits(model)
    _fit(wrapped, prep(train[0]), torch.as_tensor(train[1]), steps, batch_size, lr, seed, CLASSIFIER_NAME)
    acc = _accuracy(wrapped, prep(val[0]), torch.as_tensor(val[1]))
    _save(model.state_dict(), out_url)
    logger.info("%s: held-out accuracy %.3f -> %s", CLASSIFIER_NAME, acc, out_url)
    return acc


def load_classifier(url: str, num_classes: int = 10) -> ToyClassifier:
    """A :class:`ToyClassifier` with the weights at ``url`` (eval mode, ``weights_sha256`` set)."""
    from repa.weights import load_torch_file

    data = storage.read_bytes(url)
    model = ToyClassifier(num_classes=num_classes)
    model.load_state_dict(load_torch_file(url), strict=True)
    model.weights_sha256 = hashlib.sha256(data).hexdigest()
    return model.eval().requires_grad_(False)


def classifier_extractor() -> ToyClassifier:
    """``--feature-extractor benchmarks.convergence.toy:classifier_extractor``: the classifier at
    ``$REPA_TOY_CLASSIFIER``.

    The factory takes no arguments (the eval CLI's contract), so the weights URL comes from the
    environment; the sha256 of the file is recorded with every result and checked against the
    reference statistics.
    """
    url = os.environ.get(CLASSIFIER_ENV)
    if not url:
        raise ValueError(f"{CLASSIFIER_ENV}: set it to the weights file of the toy classifier")
    return load_classifier(url)
