"""The shape painter (repa/synthetic.py): masks and palettes, determinism, and the two folder trees it
writes (the demo's JPEG tree and the convergence experiment's PNG tree)."""

from __future__ import annotations

import colorsys
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from repa import synthetic


def test_images_are_the_masks_composited_with_the_palette():
    images, labels, masks = synthetic.make_shapes(2, 16, seed=3, palette="mono", supersample=4, noise=0)
    assert images.shape == (20, 16, 16, 3) and masks.shape == (20, 16, 16) and masks.dtype == np.float32
    assert masks.min() >= 0.0 and masks.max() <= 1.0
    assert 0.0 < masks.mean() < 1.0 and len(np.unique(masks)) > 2  # anti-aliased edges
    assert (masks.reshape(20, -1).max(1) > 0.5).all()  # every image has a visible shape
    expected = np.rint(masks * 255).astype(np.uint8)
    assert all((images[..., c] == expected).all() for c in range(3))  # white on black
    coloured, labels2, masks2 = synthetic.make_shapes(2, 16, seed=3, palette="random", supersample=4, noise=0)
    assert (labels2 == labels).all() and coloured.std(axis=(0, 1, 2)).min() > 10
    assert (masks2 == masks).all(), "a seed draws the same shapes in every palette"


def test_without_supersampling_and_noise_every_pixel_is_the_foreground_or_the_background():
    rng = np.random.default_rng(0)
    for label in range(len(synthetic.SHAPES)):
        image, mask = synthetic.draw_shape(label, 24, rng, noise=0)
        assert set(np.unique(mask).tolist()) <= {0.0, 1.0} and 0 < mask.mean() < 1
        fg, bg = image[mask == 1], image[mask == 0]
        assert (fg == fg[0]).all() and (bg == bg[0]).all() and (fg[0] != bg[0]).any()


def test_class_palette_gives_each_class_its_own_hue_and_noise_decorrelates_pixels():
    images, labels, masks = synthetic.make_shapes(3, 32, seed=1)  # the demo's: class hues, noise
    for label, (_, hue) in enumerate(synthetic.SHAPES):
        picked = images[labels == label][masks[labels == label] == 1].astype(np.float64) / 255
        h = colorsys.rgb_to_hsv(*picked.mean(0))[0]  # the mean foreground colour's hue
        assert min(abs(h - hue), 1 - abs(h - hue)) < 0.08, (label, h, hue)
    assert len(np.unique(images.reshape(-1, 3), axis=0)) > 1000  # noise: not a handful of colours


def test_unknown_palette_and_class_are_named():
    with pytest.raises(ValueError, match=r"palette.*'sepia'"):
        synthetic.make_shapes(1, 16, palette="sepia")
    with pytest.raises(ValueError, match="num_classes"):
        synthetic.make_shapes(1, 16, num_classes=11)
    with pytest.raises(ValueError, match="label"):
        synthetic.draw_shape(10, 16, np.random.default_rng(0))


def test_shapes_are_deterministic_class_balanced_and_drawn_per_image():
    a, la, _ = synthetic.make_shapes(3, 16, seed=5)
    b, lb, _ = synthetic.make_shapes(3, 16, seed=5)
    assert a.shape == (30, 16, 16, 3) and a.dtype.name == "uint8"
    assert (a == b).all() and (la == lb).all()
    assert sorted(set(la.tolist())) == list(range(10))
    assert not (synthetic.make_shapes(3, 16, seed=6)[0] == a).all()
    # image i of class c depends only on (seed, c, i): more images per class or fewer classes keep it
    more, _, _ = synthetic.make_shapes(4, 16, seed=5, num_classes=2)
    assert (more[[0, 1, 2, 4, 5, 6]] == a[:6]).all()


def test_image_tree_takes_other_class_names(tmp_path: Path):
    images, labels, _ = synthetic.make_shapes(1, 16, seed=0)
    synthetic.write_image_tree(tmp_path / "one", images, np.zeros_like(labels), ["shapes"])
    assert [p.name for p in (tmp_path / "one").iterdir()] == ["shapes"]
    assert len(list((tmp_path / "one" / "shapes").glob("*.png"))) == 10
    synthetic.write_image_tree(tmp_path / "all", images, labels)
    assert sorted(p.name for p in (tmp_path / "all").iterdir())[:2] == ["00_disc", "01_square"]
    with Image.open(tmp_path / "all" / "03_ring" / "000003.png") as png:
        assert (np.asarray(png) == images[3]).all()  # lossless


def test_demo_dataset_is_an_imagenet_tree_drawn_once(tmp_path: Path):
    root = synthetic.make_shapes_dataset(tmp_path / "images", num_classes=3, per_class=2, size=32, seed=4)
    files = sorted(p.relative_to(root / "train").as_posix() for p in (root / "train").rglob("*.JPEG"))
    assert files == [
        f"{synthetic.class_folder(c)}/{synthetic.class_folder(c)}_{i:04d}.JPEG"
        for c in range(3)
        for i in range(2)
    ]
    spec = json.loads((root / "dataset.json").read_text())
    assert spec["classes"] == ["00_disc", "01_square", "02_triangle"] and spec["spec"]["seed"] == 4
    with Image.open(root / "train" / "01_square" / "01_square_0001.JPEG") as jpeg:
        decoded = np.asarray(jpeg.convert("RGB"), np.float64)
    drawn, _ = synthetic.draw_shape(1, 32, np.random.default_rng([4, 1, 1]))  # image 1 of class 1
    other, _ = synthetic.draw_shape(1, 32, np.random.default_rng([4, 1, 0]))
    error = np.abs(decoded - drawn).mean()  # JPEG (quality 95, chroma subsampled) smooths the noise
    assert error < 10 and error < np.abs(decoded - other).mean() / 2
    before = {p: p.stat().st_mtime_ns for p in root.rglob("*")}
    synthetic.make_shapes_dataset(tmp_path / "images", num_classes=3, per_class=2, size=32, seed=4)
    assert {p: p.stat().st_mtime_ns for p in root.rglob("*")} == before  # same parameters: not redrawn
    synthetic.make_shapes_dataset(tmp_path / "images", num_classes=2, per_class=2, size=32, seed=4)
    assert sorted(p.name for p in (root / "train").iterdir()) == ["00_disc", "01_square"]
