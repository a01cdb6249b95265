"""The convergence experiment's toy networks (benchmarks/convergence/toy.py): the segmentation targets
and encoder, and the token statistics docs/convergence.md uses to explain what a REPA target holds.
The shape painter itself is tested in tests/unit/test_synthetic.py."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from benchmarks.convergence import toy
from repa import synthetic
from repa.encoders.frozen import build_encoder

ENCODER = "vit_tiny_patch16_224"
KWARGS = {
    "img_size": 16,
    "patch_size": 2,
    "embed_dim": 16,
    "depth": 1,
    "num_heads": 2,
    "global_pool": "avg",
    "class_token": False,
    "fc_norm": False,
}


def test_experiment_shapes_are_the_product_painter_anti_aliased_and_noise_free():
    images, labels, masks = toy.make_shapes(2, 16, seed=3, palette="mono")
    assert images.shape == (20, 16, 16, 3) and labels.tolist() == sorted(labels.tolist())
    assert all((images[..., c] == np.rint(masks * 255)).all() for c in range(3))  # exactly white on black
    painted = synthetic.make_shapes(2, 16, seed=3, palette="mono", supersample=toy.SUPERSAMPLE, noise=0)
    assert all((x == y).all() for x, y in zip(painted, (images, labels, masks)))


def test_patch_targets_are_the_class_where_a_patch_is_at_least_half_shape():
    masks = torch.zeros(2, 1, 4, 4)
    masks[0, 0, :2, :2] = 1.0  # top-left patch full
    masks[1, 0, 2:, 2:] = 0.5  # bottom-right patch half covered
    masks[1, 0, 0, 0] = 0.75  # top-left patch 3/16 covered: background
    targets = toy._patch_targets(masks, torch.tensor([3, 7]), grid=2, num_classes=10)
    assert targets.tolist() == [[3, 10, 10, 10], [10, 10, 10, 7]]


def test_segment_encoder_trains_saves_and_loads_through_the_registry(tmp_path: Path):
    torch.manual_seed(0)
    train = toy.make_shapes(6, 16, seed=0, palette="mono")
    val = toy.make_shapes(2, 16, seed=1, palette="mono")
    with pytest.raises(ValueError, match="masks"):
        toy.train_vit_encoder(ENCODER, KWARGS, train[:2], val[:2], str(tmp_path / "x"), objective="segment")
    with pytest.raises(ValueError, match=r"objective.*'mae'"):
        toy.train_vit_encoder(ENCODER, KWARGS, train, val, str(tmp_path / "x.pt"), objective="mae")
    url = str(tmp_path / "enc.pt")
    acc = toy.train_vit_encoder(
        ENCODER, KWARGS, train, val, url, steps=40, batch_size=16, lr=3e-3, objective="segment"
    )
    # most patches are background: a model that learned anything beats chance over 11 labels easily
    assert 0.3 < acc <= 1.0
    encoder = build_encoder(f"timm:{ENCODER}", url, 16, KWARGS)
    tokens = encoder(torch.as_tensor(val[0]).permute(0, 3, 1, 2).contiguous())
    assert tokens.shape == (20, 64, 16)


def test_token_stats_separate_global_spatial_and_pixel_linear_targets():
    images = torch.as_tensor(toy.make_shapes(4, 16, seed=2)[0]).permute(0, 3, 1, 2).contiguous()
    b = images.shape[0]
    pixels = torch.nn.functional.unfold(images.double() / 127.5 - 1, 2, stride=2).transpose(1, 2)
    per_image = torch.randn(b, 1, 8).expand(b, 64, 8)
    constant = toy.encoder_token_stats(per_image, images, 2)
    assert constant["global_share"] == pytest.approx(1.0) and constant["spatial_share"] == pytest.approx(0.0)
    linear = toy.encoder_token_stats(pixels @ torch.randn(12, 8).double() + 3.0, images, 2)
    assert linear["pixel_r2"] > 0.8  # normalisation bends a linear map a little
    noise = toy.encoder_token_stats(torch.randn(b, 64, 8), images, 2)
    assert noise["pixel_r2"] < 0.1 and noise["spatial_share"] > 0.9
    with pytest.raises(ValueError, match="pixel patches"):
        toy.encoder_token_stats(torch.randn(b, 16, 8), images, 2)
