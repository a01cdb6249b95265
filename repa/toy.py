"""Laptop-scale REPA: a procedural class-conditional image set, a toy encoder and a toy FD network.

REPA's claim (Yu et al., ICLR 2025) is that aligning an early SiT block with a *pretrained* frozen
encoder speeds up diffusion training. To test the claim end to end on a CPU we need three things
that no package ships at 16-32 px (docs/convergence.md):

- data: :func:`make_shapes` draws 10 classes of coloured shapes and textures (disk, ring, square,
  outline, triangle, plus, X, horizontal / vertical stripes, checkerboard) with random colours,
  size, position and rotation; :func:`write_image_tree` writes them as ``<class>/<i>.png``, the
  ImageNet-style tree ``repa prepare`` reads;
- a meaningful frozen encoder for alignment: :func:`train_vit_encoder` trains a small timm ViT
  (supervised classification, mean-pooled patch tokens, so every patch token carries the class
  signal) and saves a timm state dict that the normal registry loads (``timm:<name>`` +
  ``encoder.weights_urls`` + ``encoder.model_kwargs``);
- an evaluation network that is *not* the alignment encoder: :class:`ToyClassifier`, a small CNN
  whose pooled penultimate features give ``FD_toy-shapes-cnn`` through ``repa eval``/``repa watch``
  (``--feature-extractor repa.toy:classifier_extractor``, weights from ``$REPA_TOY_CLASSIFIER``).

Randomness is explicit (``seed=`` arguments); nothing here downloads anything.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw
from torch import nn

from repa import storage

logger = logging.getLogger(__name__)

__all__ = [
    "CLASSIFIER_ENV",
    "CLASSIFIER_NAME",
    "SHAPE_CLASSES",
    "ToyClassifier",
    "classifier_extractor",
    "load_classifier",
    "make_shapes",
    "train_classifier",
    "train_vit_encoder",
    "write_image_tree",
]

SHAPE_CLASSES = (
    "00-disk",
    "01-ring",
    "02-square",
    "03-outline",
    "04-triangle",
    "05-plus",
    "06-cross",
    "07-hstripes",
    "08-vstripes",
    "09-checker",
)
CLASSIFIER_NAME = "toy-shapes-cnn"
"""Name of the evaluation network: its Fréchet distance is reported as ``FD_toy-shapes-cnn``."""
CLASSIFIER_ENV = "REPA_TOY_CLASSIFIER"
"""Environment variable holding the classifier's weights URL for :func:`classifier_extractor`."""

_SUPERSAMPLE = 4  # draw at 4x the resolution, then box-filter down (anti-aliased edges)


# ----------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------


def _colours(rng: np.random.Generator) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Background and foreground RGB with a luma difference >= 90 (so every shape is visible)."""
    luma = np.array([0.299, 0.587, 0.114])
    while True:
        bg, fg = rng.integers(0, 256, size=(2, 3))
        if abs(float(luma @ bg) - float(luma @ fg)) >= 90:
            return tuple(int(v) for v in bg), tuple(int(v) for v in fg)


def _polygon(cx: float, cy: float, r: float, n: int, angle: float) -> list[tuple[float, float]]:
    return [
        (cx + r * math.cos(angle + 2 * math.pi * k / n), cy + r * math.sin(angle + 2 * math.pi * k / n))
        for k in range(n)
    ]


def _draw(label: int, size: int, rng: np.random.Generator) -> Image.Image:
    """One image of class ``label`` at ``size * _SUPERSAMPLE`` px (drawn with PIL)."""
    s = size * _SUPERSAMPLE
    bg, fg = _colours(rng)
    img = Image.new("RGB", (s, s), bg)
    d = ImageDraw.Draw(img)
    cx, cy = (s / 2 + rng.uniform(-0.12, 0.12) * s for _ in range(2))
    r = rng.uniform(0.22, 0.34) * s
    angle = rng.uniform(0, 2 * math.pi)
    w = max(2.0, rng.uniform(0.08, 0.13) * s)  # stroke width
    name = SHAPE_CLASSES[label][3:]
    if name == "disk":
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fg)
    elif name == "ring":
        d.ellipse([cx - r, cy - r, cx + r, cy + r], outline=fg, width=int(w))
    elif name == "square":
        d.polygon(_polygon(cx, cy, r * 1.2, 4, angle), fill=fg)
    elif name == "outline":
        d.line([*_polygon(cx, cy, r * 1.2, 4, angle)] * 2, fill=fg, width=int(w), joint="curve")
    elif name == "triangle":
        d.polygon(_polygon(cx, cy, r * 1.3, 3, angle), fill=fg)
    elif name in ("plus", "cross"):
        base = (0.0 if name == "plus" else math.pi / 4) + rng.uniform(-0.2, 0.2)
        for k in range(2):
            a = base + k * math.pi / 2
            dx, dy = r * 1.2 * math.cos(a), r * 1.2 * math.sin(a)
            d.line([(cx - dx, cy - dy), (cx + dx, cy + dy)], fill=fg, width=int(w))
    elif name in ("hstripes", "vstripes"):
        period = rng.uniform(0.22, 0.34) * s
        phase = rng.uniform(0, period)
        for k in range(-1, int(s / period) + 2):
            a = phase + k * period
            box = [0, a, s, a + period / 2] if name == "hstripes" else [a, 0, a + period / 2, s]
            d.rectangle(box, fill=fg)
    elif name == "checker":
        cell = rng.uniform(0.22, 0.3) * s
        ox, oy = rng.uniform(0, 2 * cell, size=2)
        for i in range(-2, int(s / cell) + 2):
            for j in range(-2, int(s / cell) + 2):
                if (i + j) % 2 == 0:
                    x0, y0 = i * cell - ox, j * cell - oy
                    d.rectangle([x0, y0, x0 + cell, y0 + cell], fill=fg)
    else:  # pragma: no cover - SHAPE_CLASSES and this function change together
        raise AssertionError(name)
    return img


def make_shapes(
    per_class: int, resolution: int = 16, seed: int = 0, num_classes: int = 10
) -> tuple[np.ndarray, np.ndarray]:
    """``(images uint8 (N, H, W, 3), labels int64 (N,))``, ``per_class`` images of each class, in class
    order. Deterministic in ``seed``; a different seed gives a disjoint-looking held-out set."""
    if not 1 <= num_classes <= len(SHAPE_CLASSES):
        raise ValueError(f"num_classes: expected 1..{len(SHAPE_CLASSES)}, got {num_classes}")
    if per_class < 1 or resolution < 4:
        raise ValueError(f"need per_class >= 1 and resolution >= 4, got {per_class}, {resolution}")
    rng = np.random.default_rng(seed)
    images = np.empty((num_classes * per_class, resolution, resolution, 3), np.uint8)
    labels = np.repeat(np.arange(num_classes, dtype=np.int64), per_class)
    for i, label in enumerate(labels):
        big = _draw(int(label), resolution, rng)
        images[i] = np.asarray(big.resize((resolution, resolution), Image.BOX))
    return images, labels


def write_image_tree(root: str | Path, images: np.ndarray, labels: np.ndarray) -> Path:
    """``root/<class name>/<index>.png`` for every image (the layout ``repa prepare images`` reads)."""
    root = Path(root)
    for i, (img, label) in enumerate(zip(images, labels)):
        folder = root / SHAPE_CLASSES[int(label)]
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(folder / f"{i:06d}.png")
    return root


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
) -> None:
    """AdamW + cosine decay on cross-entropy, random shifts as augmentation (``inputs`` float NCHW)."""
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    model.train()
    for step in range(steps):
        idx = torch.randint(0, len(inputs), (batch_size,), generator=gen)
        loss = F.cross_entropy(model(_shift(inputs[idx], gen)), labels[idx])
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


def train_vit_encoder(
    name: str,
    model_kwargs: Mapping[str, Any],
    train: tuple[np.ndarray, np.ndarray],
    val: tuple[np.ndarray, np.ndarray],
    out_url: str,
    *,
    steps: int = 400,
    batch_size: int = 128,
    lr: float = 2e-3,
    seed: int = 0,
) -> float:
    """Train ``timm:<name>`` with ``model_kwargs`` to classify ``train``; save its state dict to ``out_url``.

    The input is exactly what :class:`repa.encoders.FrozenEncoder` feeds it (the registry's
    preprocessing for ``timm:`` entries), so the saved weights see the same distribution at
    alignment time. Use ``global_pool='avg', class_token=False, fc_norm=False`` in ``model_kwargs``:
    the classifier then reads the mean of the final-LayerNorm patch tokens, which makes each patch
    token (REPA's target) carry the class signal. Returns the held-out accuracy.
    """
    import timm

    from repa.encoders import resolve_encoder_spec
    from repa.encoders.frozen import preprocess_raw_image

    spec = resolve_encoder_spec(f"timm:{name}")
    resolution = train[0].shape[1]
    size = spec.preprocessing.input_size(resolution, model_kwargs.get("img_size"))
    torch.manual_seed(seed)
    model = timm.create_model(
        spec.timm_name, pretrained=False, num_classes=int(train[1].max()) + 1, **dict(model_kwargs)
    )

    def prep(images: np.ndarray) -> torch.Tensor:
        return preprocess_raw_image(_to_nchw(images), spec.preprocessing, size)

    x, y = prep(train[0]), torch.as_tensor(train[1])
    _fit(model, x, y, steps, batch_size, lr, seed, f"encoder timm:{name}")
    acc = _accuracy(model, prep(val[0]), torch.as_tensor(val[1]))
    state = {k: v.detach().clone() for k, v in model.state_dict().items() if not k.startswith("head.")}
    _save(state, out_url)
    logger.info("encoder timm:%s: held-out accuracy %.3f -> %s", name, acc, out_url)
    return acc


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

    As a :class:`repa.eval.metrics.FeatureExtractor` it maps uint8 images (B, 3, H, W) to the pooled
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
    """``--feature-extractor repa.toy:classifier_extractor``: the classifier at ``$REPA_TOY_CLASSIFIER``.

    The factory takes no arguments (the eval CLI's contract), so the weights URL comes from the
    environment; the sha256 of the file is recorded with every result and checked against the
    reference statistics.
    """
    url = os.environ.get(CLASSIFIER_ENV)
    if not url:
        raise ValueError(f"{CLASSIFIER_ENV}: set it to the weights file of the toy classifier")
    return load_classifier(url)
