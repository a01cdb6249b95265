"""VAE: posterior sampling parity (golden file), moments layout, SD-VAE loading, identity mode, errors."""

from __future__ import annotations

import hashlib
import logging
import os
import uuid
from pathlib import Path

import pytest
import torch

from repa import storage
from repa.vae import (
    SD_VAE_CONFIG,
    build_vae,
    default_latents_bias,
    default_latents_scale,
    images_to_vae_input,
    sample_posterior,
    to_uint8,
)
from repa.weights import WeightsError
from tests.support.golden import meta, tensor

# A tiny AutoencoderKL: 2 resolution levels (downsample 2), 4 latent channels, few parameters.
TINY = dict(
    block_out_channels=[8, 16],
    down_block_types=["DownEncoderBlock2D"] * 2,
    up_block_types=["UpDecoderBlock2D"] * 2,
    layers_per_block=1,
    norm_num_groups=4,
    sample_size=16,
)


@pytest.fixture(scope="module")
def tiny_vae():
    torch.manual_seed(0)
    return build_vae("sd-vae-ft-mse", config_overrides=TINY)


@pytest.fixture(scope="module")
def tiny_dir(tiny_vae, tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("vae") / "tiny-vae"
    tiny_vae.save_pretrained(str(path))
    return str(path)


def images(b: int = 2, side: int = 16, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (b, 3, side, side), generator=g, dtype=torch.uint8)


# ---------------------------------------------------------------- reference parity (golden)


def test_default_latent_scale_and_bias_are_the_reference_values():
    assert default_latents_scale("sd-vae-ft-mse") == meta("latents_scale")
    assert default_latents_bias("sd-vae-ft-mse") == meta("latents_bias")
    assert default_latents_scale("sd-vae-ft-ema") == 0.18215
    assert default_latents_scale("none") == 1.0


@pytest.mark.parametrize("per_channel", [False, True])
def test_posterior_sample_matches_reference_latents(per_channel):
    scale, bias = meta("latents_scale"), meta("latents_bias")
    if per_channel:  # train.py's layout: tensor([0.18215] * 4).view(1, 4, 1, 1), one value per channel
        c = meta("in_channels")
        scale, bias = torch.tensor([scale] * c).view(1, c, 1, 1), torch.tensor([bias] * c).view(1, c, 1, 1)
    z = sample_posterior(tensor("prep.moments"), scale, bias, noise=tensor("prep.posterior_noise"))
    torch.testing.assert_close(z, tensor("prep.latents"), atol=2e-6, rtol=0)


def test_posterior_noise_from_global_rng_is_the_reference_draw():
    torch.manual_seed(meta("posterior_seed"))
    z = sample_posterior(tensor("prep.moments"), meta("latents_scale"), meta("latents_bias"))
    torch.testing.assert_close(z, tensor("prep.latents"), atol=2e-6, rtol=0)
    g = torch.Generator().manual_seed(meta("posterior_seed"))
    torch.testing.assert_close(sample_posterior(tensor("prep.moments"), generator=g), z, atol=0, rtol=0)


def test_moments_are_read_as_mean_and_std_not_logvar():
    moments = tensor("prep.moments")
    mean, std = moments.chunk(2, dim=1)
    ones = torch.ones_like(mean)
    torch.testing.assert_close(sample_posterior(moments, 1.0, 0.0, noise=ones), mean + std)
    as_logvar = (mean + torch.exp(0.5 * std) * tensor("prep.posterior_noise")) * meta("latents_scale")
    assert (as_logvar - tensor("prep.latents")).abs().max() > 1e-2


def test_sample_posterior_rejects_bad_moments_and_noise():
    with pytest.raises(ValueError, match="moments"):
        sample_posterior(torch.zeros(2, 7, 4, 4))
    with pytest.raises(ValueError, match="noise: expected shape"):
        sample_posterior(torch.zeros(2, 8, 4, 4), noise=torch.zeros(2, 4, 2, 2))
    with pytest.raises(ValueError, match="latents_scale"):
        sample_posterior(torch.zeros(2, 8, 4, 4), latents_scale=torch.ones(3))


# ---------------------------------------------------------------- uint8 conversion


def test_decode_conversion_truncates_like_reference_not_rounds():
    # 255 * (x + 1) / 2 = 254.9, 0.6, 300 (clamped), -5 (clamped)
    x = torch.tensor([254.9, 0.6, 300.0, -5.0]) / 127.5 - 1
    assert to_uint8(x).tolist() == [254, 0, 255, 0]
    assert to_uint8(x, "round").tolist() == [255, 1, 255, 0]


def test_sd_vae_decode_to_uint8_unscales_then_truncates(tiny_vae, monkeypatch):
    seen = {}

    def fake_decode(z):
        seen["z"] = z
        return torch.full((z.shape[0], 3, 4, 4), 254.9 / 127.5 - 1)

    monkeypatch.setattr(tiny_vae, "decode", fake_decode)
    z = torch.full((1, 4, 2, 2), 0.5)
    out = tiny_vae.decode_to_uint8(z, latents_scale=0.25, latents_bias=0.1)
    torch.testing.assert_close(seen["z"], (z - 0.1) / 0.25)
    assert out.dtype == torch.uint8 and out.unique().tolist() == [254]
    # what evaluations record as their uint8 conversion is what this decoder did
    assert tiny_vae.uint8_conversion == "clamp(255 * (x + 1) / 2, 0, 255), truncated (reference generate.py)"


# ---------------------------------------------------------------- SD-VAE (diffusers) with a tiny config


def test_tiny_sd_vae_round_trip_shapes(tiny_vae):
    assert (tiny_vae.latent_channels, tiny_vae.downsample) == (4, 2)
    moments = tiny_vae.encode_moments(images())
    assert moments.shape == (2, 8, 8, 8) and moments.dtype == torch.float32
    assert (moments[:, 4:] > 0).all()  # second half is std (exp(logvar/2)), never negative
    z = sample_posterior(moments, default_latents_scale("sd-vae-ft-mse"))
    out = tiny_vae.decode_to_uint8(z)
    assert out.shape == (2, 3, 16, 16) and out.dtype == torch.uint8


def test_moments_are_diffusers_latent_dist_mean_and_std_of_scaled_pixels(tiny_vae):
    x = images()
    with torch.no_grad():
        dist = tiny_vae.autoencoder.encode(x.float() / 127.5 - 1).latent_dist
    torch.testing.assert_close(images_to_vae_input(x), x.float() / 127.5 - 1, atol=0, rtol=0)
    torch.testing.assert_close(
        tiny_vae.encode_moments(x), torch.cat([dist.mean, dist.std], 1), atol=0, rtol=0
    )


def test_vae_is_frozen_and_no_grad(tiny_vae):
    assert all(not p.requires_grad for p in tiny_vae.parameters())
    tiny_vae.train()
    assert not tiny_vae.training and not tiny_vae.autoencoder.training
    assert tiny_vae.encode_moments(images()).grad_fn is None


def _assert_same_vae(a, b):
    x = images(seed=3)
    torch.testing.assert_close(a.encode_moments(x), b.encode_moments(x), atol=0, rtol=0)
    z = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a.decode_to_uint8(z), b.decode_to_uint8(z))


def test_saved_folder_reloads_identically_by_path_and_file_url(tiny_vae, tiny_dir):
    for url in (tiny_dir, f"file://{tiny_dir}"):
        vae = build_vae("sd-vae-ft-mse", weights_url=url)
        _assert_same_vae(tiny_vae, vae)
        assert vae.describe()["weights_url"] == url and vae.describe()["random_init"] is False
    digest = hashlib.sha256(Path(tiny_dir, "diffusion_pytorch_model.safetensors").read_bytes())
    assert vae.weights_sha256 == digest.hexdigest()


def test_remote_folder_is_copied_to_cache_and_reloads_identically(tiny_vae, tiny_dir, tmp_path):
    url = f"memory://vae/{uuid.uuid4().hex}/sd-vae-tiny"
    for name in ("config.json", "diffusion_pytorch_model.safetensors"):
        storage.write_bytes_atomic(storage.join(url, name), Path(tiny_dir, name).read_bytes())
    try:
        vae = build_vae("sd-vae-ft-mse", weights_url=url, cache_dir=str(tmp_path / "cache"))
        _assert_same_vae(tiny_vae, vae)
        cached = [f for _, _, files in os.walk(tmp_path / "cache") for f in files]
        assert sorted(cached) == ["config.json", "diffusion_pytorch_model.safetensors"]
        again = build_vae("sd-vae-ft-mse", weights_url=url, cache_dir=str(tmp_path / "cache"))  # cache hit
        _assert_same_vae(vae, again)
    finally:
        storage.remove(url, recursive=True)


def test_full_sd_vae_config_builds_the_reference_architecture(caplog):
    with caplog.at_level(logging.WARNING, logger="repa.vae"), torch.device("meta"):
        vae = build_vae("sd-vae-ft-mse")
    assert any("RANDOM" in r.message and "weights_url" in r.message for r in caplog.records)
    assert (vae.latent_channels, vae.downsample) == (4, 8)
    assert sum(p.numel() for p in vae.parameters()) == 83_653_863  # SD-VAE (AutoencoderKL): 83.65 M
    assert SD_VAE_CONFIG["block_out_channels"] == [128, 256, 512, 512]


# ---------------------------------------------------------------- identity mode


def test_identity_mode_round_trip_is_exact_for_every_uint8_value():
    vae = build_vae("none")
    assert (vae.latent_channels, vae.downsample, vae.name) == (3, 1, "none")
    x = torch.arange(256, dtype=torch.uint8).repeat(3 * 4, 1).view(4, 3, 16, 16)
    moments = vae.encode_moments(x)
    assert moments.shape == (4, 6, 16, 16)
    assert torch.equal(moments[:, 3:], torch.zeros_like(moments[:, 3:]))
    torch.testing.assert_close(moments[:, :3], x.float() / 127.5 - 1, atol=0, rtol=0)
    z = sample_posterior(moments, default_latents_scale("none"), default_latents_bias("none"))
    torch.testing.assert_close(z, moments[:, :3], atol=0, rtol=0)  # std 0: deterministic
    assert torch.equal(vae.decode_to_uint8(z), x)
    assert vae.describe()["weights_sha256"] is None


# ---------------------------------------------------------------- errors


def test_bad_images_and_latents_are_rejected(tiny_vae):
    with pytest.raises(ValueError, match="uint8"):
        tiny_vae.encode_moments(images().float())
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        tiny_vae.encode_moments(images()[:, :2])
    with pytest.raises(ValueError, match="multiples of the VAE downsampling factor 2"):
        tiny_vae.encode_moments(images(side=15))
    with pytest.raises(ValueError, match=r"\(B, 4, h, w\)"):
        tiny_vae.decode_to_uint8(torch.zeros(1, 3, 8, 8))
    with pytest.raises(ValueError, match="uint8"):
        build_vae("none").encode_moments(images().float())


def test_missing_or_incomplete_weights_folder_is_named(tmp_path, tiny_dir):
    missing = str(tmp_path / "no-such-vae")
    with pytest.raises(WeightsError, match="no-such-vae"):
        build_vae("sd-vae-ft-mse", weights_url=missing)
    partial = tmp_path / "partial"
    partial.mkdir()
    (partial / "config.json").write_bytes(Path(tiny_dir, "config.json").read_bytes())
    with pytest.raises(WeightsError, match=r"partial.*diffusion_pytorch_model\.safetensors not found"):
        build_vae("sd-vae-ft-mse", weights_url=str(partial))
    with pytest.raises(WeightsError, match="not found"):
        build_vae(
            "sd-vae-ft-mse", weights_url=f"memory://vae/{uuid.uuid4().hex}", cache_dir=str(tmp_path / "c")
        )


def test_hub_ids_are_never_downloaded_without_permission(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # so the relative id is not a local folder
    with pytest.raises(WeightsError, match=r"never downloads silently.*repa weights fetch"):
        build_vae("sd-vae-ft-mse", weights_url="stabilityai/sd-vae-ft-mse")


def test_bad_names_and_options_are_rejected(tiny_dir):
    with pytest.raises(ValueError, match="sd-vae-ft-mse, sd-vae-ft-ema, none"):
        build_vae("sdxl-vae")
    with pytest.raises(ValueError, match="no_such_arg"):
        build_vae("sd-vae-ft-mse", config_overrides={"no_such_arg": 1})
    with pytest.raises(ValueError, match="only apply to random init"):
        build_vae("sd-vae-ft-mse", weights_url=tiny_dir, config_overrides=TINY)
    with pytest.raises(ValueError, match="identity"):
        build_vae("none", weights_url=tiny_dir)
