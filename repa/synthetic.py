"""Procedural class-conditional images: one painter of coloured shapes, written as ImageNet-style trees.

It draws the data of ``repa demo`` (:func:`make_shapes_dataset`: ``<root>/train/<class>/*.JPEG``) and
of the laptop-scale convergence experiment (:func:`make_shapes` arrays with foreground masks, written
by :func:`write_image_tree`; benchmarks/convergence/, docs/convergence.md). Both are the layout
``repa prepare images`` reads. Each of the 10 classes is one shape or texture (:data:`SHAPES`) with a
random position, size, rotation, stripe period and phase; image ``i`` of class ``c`` depends only on
``(seed, c, i)``. Nothing is downloaded.
"""

from __future__ import annotations

import colorsys
import json
import math
import os
import shutil
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

__all__ = [
    "NOISE",
    "PALETTES",
    "SHAPES",
    "class_folder",
    "draw_shape",
    "make_shapes",
    "make_shapes_dataset",
    "write_image_tree",
]

# (class name, base hue): each class is one shape or texture in one colour family, so class
# conditioning is visible in the demo's samples after a few hundred CPU steps (colour is learnt first).
SHAPES: tuple[tuple[str, float], ...] = (
    ("disc", 0.00),
    ("square", 0.08),
    ("triangle", 0.16),
    ("ring", 0.30),
    ("cross", 0.45),
    ("hstripes", 0.55),
    ("vstripes", 0.64),
    ("checker", 0.72),
    ("diamond", 0.82),
    ("dots", 0.92),
)

PALETTES = ("class", "random", "mono")
"""Colours of :func:`draw_shape`. ``class``: a bright foreground in the class's hue family on a dark,
greyish random background (colour is a class cue; the demo's); ``random``: the same with a random
foreground hue (only the shape tells the class); ``mono``: white on black. The colours are drawn from
the random stream in every palette, so a seed gives the same shapes in all three."""

NOISE = 6.0
"""Std of the demo's per-pixel Gaussian noise (a little texture, so no two pixels are equal)."""


def _rgb(h: float, s: float, v: float) -> tuple[int, int, int]:
    r, g, b = colorsys.hsv_to_rgb(h % 1.0, s, v)
    return int(r * 255), int(g * 255), int(b * 255)


def _polygon(cx: float, cy: float, radius: float, sides: int, angle: float) -> list[tuple[float, float]]:
    return [
        (
            cx + radius * math.cos(angle + 2 * math.pi * k / sides),
            cy + radius * math.sin(angle + 2 * math.pi * k / sides),
        )
        for k in range(sides)
    ]


def _draw_mask(kind: str, s: int, rng: np.random.Generator, scale: int) -> Image.Image:
    """Foreground of one ``kind`` image on an ``s x s`` canvas ("L": 255 = shape, 0 = background).

    ``scale`` is the supersampling factor: the minimum stroke and dot spacing are ``scale`` canvas px."""
    cx, cy = s * (0.5 + rng.uniform(-0.12, 0.12)), s * (0.5 + rng.uniform(-0.12, 0.12))
    r = s * rng.uniform(0.2, 0.32)
    angle = rng.uniform(0, 2 * math.pi)
    period = s * rng.uniform(0.12, 0.22)
    phase = rng.uniform(0, period)
    mask = Image.new("L", (s, s), 0)
    d = ImageDraw.Draw(mask)
    if kind == "disc":
        d.ellipse((cx - r, cy - r, cx + r, cy + r), fill=255)
    elif kind == "square":
        d.polygon(_polygon(cx, cy, r * 1.2, 4, angle), fill=255)
    elif kind == "triangle":
        d.polygon(_polygon(cx, cy, r * 1.3, 3, angle), fill=255)
    elif kind == "ring":
        d.ellipse((cx - r, cy - r, cx + r, cy + r), outline=255, width=max(scale, int(r * 0.35)))
    elif kind == "cross":
        w = r * 0.35
        d.rectangle((cx - r, cy - w, cx + r, cy + w), fill=255)
        d.rectangle((cx - w, cy - r, cx + w, cy + r), fill=255)
    elif kind == "diamond":
        d.polygon(_polygon(cx, cy, r * 1.3, 4, 0.0), fill=255)
    elif kind in ("hstripes", "vstripes", "checker"):
        yy, xx = np.mgrid[0:s, 0:s].astype(np.float32)
        h_on = ((yy + phase) // (period / 2)) % 2 == 0
        v_on = ((xx + phase) // (period / 2)) % 2 == 0
        on = {"hstripes": h_on, "vstripes": v_on, "checker": h_on ^ v_on}[kind]
        mask = Image.fromarray(on.astype(np.uint8) * 255, "L")
    elif kind == "dots":
        step = max(2.0 * scale, period)
        dot = step * 0.3
        for y in np.arange(phase % step, s, step):
            for x in np.arange((phase * 0.7) % step, s, step):
                d.ellipse((x - dot, y - dot, x + dot, y + dot), fill=255)
    else:  # pragma: no cover - SHAPES and this function change together
        raise AssertionError(kind)
    return mask


def draw_shape(
    label: int,
    size: int,
    rng: np.random.Generator,
    *,
    palette: str = "class",
    supersample: int = 1,
    noise: float = NOISE,
) -> tuple[np.ndarray, np.ndarray]:
    """One image of class ``label`` (an index into :data:`SHAPES`): ``(uint8 (size, size, 3), mask)``.

    ``mask`` (float32 (size, size) in [0, 1]) is the shape's coverage of each pixel: the shape is drawn
    at ``supersample`` times the size and box-filtered down (anti-aliased edges; 1 = binary mask).
    The image is ``rint(bg + mask * (fg - bg))`` plus Gaussian noise of std ``noise``, clipped (and
    truncated) to uint8; with ``noise=0`` it is exactly the composite. ``palette``: :data:`PALETTES`.
    """
    if palette not in PALETTES:
        raise ValueError(f"palette: expected one of {', '.join(PALETTES)}, got {palette!r}")
    if not 0 <= label < len(SHAPES):
        raise ValueError(f"label: expected 0..{len(SHAPES) - 1}, got {label}")
    if supersample < 1 or size < 1:
        raise ValueError(f"need size >= 1 and supersample >= 1, got {size}, {supersample}")
    kind, hue = SHAPES[label]
    hue = rng.uniform(0, 1) if palette == "random" else hue + rng.uniform(-0.03, 0.03)
    fg = _rgb(hue, rng.uniform(0.65, 1.0), rng.uniform(0.75, 1.0))
    bg = _rgb(rng.uniform(0, 1), rng.uniform(0.0, 0.3), rng.uniform(0.08, 0.35))
    if palette == "mono":
        fg, bg = (255, 255, 255), (0, 0, 0)
    big = _draw_mask(kind, size * supersample, rng, supersample)
    small = big.resize((size, size), Image.BOX) if supersample > 1 else big
    mask = np.asarray(small, np.float32) / 255.0
    lo, hi = np.asarray(bg, np.float32), np.asarray(fg, np.float32)
    colour = np.rint(lo + mask[..., None] * (hi - lo))
    if noise:
        colour = colour + rng.normal(0.0, noise, (size, size, 3))
    return np.clip(colour, 0, 255).astype(np.uint8), mask


def make_shapes(
    per_class: int,
    size: int,
    *,
    seed: int = 0,
    num_classes: int = len(SHAPES),
    palette: str = "class",
    supersample: int = 1,
    noise: float = NOISE,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(images uint8 (N, size, size, 3), labels int64 (N,), masks float32 (N, size, size))``:
    ``per_class`` images of each of the first ``num_classes`` classes, in class order, drawn by
    :func:`draw_shape` (the other arguments are its). Image ``i`` of class ``c`` is the one
    :func:`make_shapes_dataset` draws for ``(seed, c, i)``; another seed gives a held-out set."""
    if not 1 <= num_classes <= len(SHAPES):
        raise ValueError(f"num_classes: expected 1..{len(SHAPES)}, got {num_classes}")
    if per_class < 1:
        raise ValueError(f"per_class: expected >= 1, got {per_class}")
    n = num_classes * per_class
    images = np.empty((n, size, size, 3), np.uint8)
    masks = np.empty((n, size, size), np.float32)
    labels = np.repeat(np.arange(num_classes, dtype=np.int64), per_class)
    for j, label in enumerate(labels):
        rng = np.random.default_rng([seed, int(label), j % per_class])
        images[j], masks[j] = draw_shape(
            int(label), size, rng, palette=palette, supersample=supersample, noise=noise
        )
    return images, labels, masks


def class_folder(label: int) -> str:
    """``00_disc``: the numeric prefix makes sorted folder order (= repa's label order) the table order."""
    return f"{label:02d}_{SHAPES[label][0]}"


def make_shapes_dataset(
    root: str | os.PathLike, *, num_classes: int = 10, per_class: int = 40, size: int = 64, seed: int = 0
) -> Path:
    """Write ``root/train/<NN_shape>/<NN_shape>_<i>.JPEG`` (ImageNet layout; the demo's); returns ``root``.

    Image ``i`` of class ``c`` is :func:`draw_shape` with the defaults (``class`` palette, noise) and
    the random stream ``(seed, c, i)``. A ``dataset.json`` written last records the parameters; if it
    matches, nothing is redrawn.
    """
    if not 1 <= num_classes <= len(SHAPES):
        raise ValueError(f"num_classes: {num_classes}; 1 to {len(SHAPES)} classes can be drawn")
    if per_class < 1:
        raise ValueError(f"per_class: {per_class}; need at least 1")
    root = Path(root)
    spec = {"num_classes": num_classes, "per_class": per_class, "size": size, "seed": seed, "format": "JPEG"}
    marker = root / "dataset.json"
    if marker.exists() and json.loads(marker.read_text()).get("spec") == spec:
        return root
    if root.exists():
        shutil.rmtree(root)
    for label in range(num_classes):
        folder = root / "train" / class_folder(label)
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            image, _ = draw_shape(label, size, np.random.default_rng([seed, label, i]))
            path = folder / f"{class_folder(label)}_{i:04d}.JPEG"
            Image.fromarray(image, "RGB").save(path, format="JPEG", quality=95)
    classes = [class_folder(c) for c in range(num_classes)]
    marker.write_text(json.dumps({"spec": spec, "classes": classes}, indent=1) + "\n")
    return root


def write_image_tree(
    root: str | os.PathLike,
    images: np.ndarray,
    labels: np.ndarray,
    class_names: Sequence[str] | None = None,
) -> Path:
    """``root/<class name>/<index>.png`` for every image (lossless; the layout ``repa prepare images``
    reads). ``class_names[label]`` names the folders (default :func:`class_folder`); returns ``root``."""
    root = Path(root)
    names = class_names or [class_folder(c) for c in range(len(SHAPES))]
    for i, (img, label) in enumerate(zip(images, labels)):
        folder = root / names[int(label)]
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(folder / f"{i:06d}.png")
    return root
