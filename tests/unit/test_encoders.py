"""Frozen encoders: parity with REPA's DINOv2 path (golden file), registry, weight formats, errors."""

from __future__ import annotations

import hashlib
import logging
import uuid
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from timm.layers import resample_abs_pos_embed

from repa import storage
from repa.encoders import (
    DINOV2_PREPROCESSING,
    ENCODERS,
    EncoderSpec,
    Preprocessing,
    UnknownEncoderError,
    build_encoder,
    preprocess_raw_image,
    register_encoder,
)
from repa.weights import WeightsError
from tests.support.golden import meta, state_dict, tensor

RESOLUTION = meta("prep_resolution")
GRID = meta("enc_pos_grid")  # patch grid after REPA's pos-embed resampling: 16 * (resolution // 256)
PATCH = meta("enc_patch_size")


def tiny_dinov2_kwargs() -> dict:
    """timm overrides that turn ``dinov2-vit-*`` into the golden file's tiny DINOv2."""
    if PATCH != 14 or meta("enc_num_register_tokens") != 0:
        pytest.skip(
            f"golden DINOv2 patch {PATCH}, {meta('enc_num_register_tokens')} registers: "
            "repa's dinov2-vit-* entries are patch-14 without registers"
        )
    return dict(
        embed_dim=meta("enc_embed_dim"),
        depth=meta("enc_depth"),
        num_heads=meta("enc_num_heads"),
        mlp_ratio=meta("enc_mlp_ratio"),
        init_values=meta("enc_init_values"),
    )


@pytest.fixture(scope="module")
def fb_weights_path(tmp_path_factory) -> str:
    """The golden ``enc.sd.*`` (facebookresearch DINOv2 layout, 37x37 pos-embed, mask_token) as a .pth."""
    path = tmp_path_factory.mktemp("enc") / "dinov2_tiny_pretrain.pth"
    torch.save(state_dict("enc.sd."), path)
    return str(path)


@pytest.fixture(scope="module")
def golden_encoder(fb_weights_path):
    return build_encoder(
        meta("enc_type"),
        weights_url=fb_weights_path,
        resolution=RESOLUTION,
        model_kwargs=tiny_dinov2_kwargs(),
    )


# ---------------------------------------------------------------- reference parity (golden)


def test_preprocessing_matches_reference_dinov2_input():
    x = preprocess_raw_image(tensor("prep.raw"), DINOV2_PREPROCESSING)
    assert x.dtype == torch.float32 and x.shape == tensor("prep.dinov2_input").shape
    torch.testing.assert_close(x, tensor("prep.dinov2_input"), atol=3e-4, rtol=0)


def test_preprocessing_antialias_or_bilinear_would_be_caught_by_tolerance():
    raw = tensor("prep.raw")
    mean = torch.tensor(DINOV2_PREPROCESSING.mean).view(1, 3, 1, 1)
    std = torch.tensor(DINOV2_PREPROCESSING.std).view(1, 3, 1, 1)
    normed = (raw / 255.0 - mean) / std
    for kwargs in (dict(mode="bicubic", antialias=True), dict(mode="bilinear")):
        wrong = F.interpolate(normed, size=tensor("prep.dinov2_input").shape[-1], **kwargs)
        assert (wrong - tensor("prep.dinov2_input")).abs().max() > 3e-4


def test_golden_encoder_preprocess_equals_reference_function(golden_encoder):
    torch.testing.assert_close(
        golden_encoder.preprocess(tensor("prep.raw")), tensor("prep.dinov2_input"), atol=3e-4, rtol=0
    )
    assert golden_encoder.input_size == 224 * (RESOLUTION // 256) == tensor("prep.dinov2_input").shape[-1]


def test_pos_embed_is_resampled_once_at_load_like_reference(golden_encoder):
    side = meta("enc_img_size") // PATCH  # the hub checkpoint's grid (37 for img_size 518)
    assert tuple(state_dict("enc.sd.")["pos_embed"].shape[1:]) == (1 + side * side, meta("enc_embed_dim"))
    torch.testing.assert_close(
        golden_encoder.model.pos_embed, tensor("enc.pos_embed_resampled"), atol=1e-6, rtol=0
    )
    assert golden_encoder.num_tokens == GRID**2


def test_patch_tokens_match_reference_on_stored_input(golden_encoder):
    out = golden_encoder.forward_preprocessed(tensor("prep.dinov2_input"))
    torch.testing.assert_close(out, tensor("enc.x_norm_patchtokens"), atol=1e-4, rtol=0)


def test_patch_tokens_match_reference_from_uint8_images(golden_encoder):
    out = golden_encoder(tensor("prep.raw"))
    assert out.shape == (meta("prep_batch"), golden_encoder.num_tokens, golden_encoder.embed_dim)
    assert golden_encoder.embed_dim == meta("enc_embed_dim")
    torch.testing.assert_close(out, tensor("enc.x_norm_patchtokens"), atol=1e-4, rtol=0)


def test_cls_token_matches_reference(golden_encoder):
    with torch.no_grad():
        tokens = golden_encoder.model.forward_features(tensor("prep.dinov2_input"))
    assert golden_encoder.num_prefix_tokens == 1 + meta("enc_num_register_tokens")
    torch.testing.assert_close(tokens[:, 0], tensor("enc.x_norm_clstoken"), atol=1e-4, rtol=0)


def test_weights_load_from_fsspec_memory_url(golden_encoder, fb_weights_path):
    url = f"memory://weights/{uuid.uuid4().hex}/dinov2_tiny.pth"
    storage.write_bytes_atomic(url, Path(fb_weights_path).read_bytes())
    try:
        enc = build_encoder(
            meta("enc_type"), weights_url=url, resolution=RESOLUTION, model_kwargs=tiny_dinov2_kwargs()
        )
        assert torch.equal(enc(tensor("prep.raw")), golden_encoder(tensor("prep.raw")))
        assert enc.weights_sha256 == hashlib.sha256(Path(fb_weights_path).read_bytes()).hexdigest()
    finally:
        storage.remove(url)


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_timm_format_weights_reload_to_identical_features(golden_encoder, tmp_path, suffix):
    sd = {k: v.clone() for k, v in golden_encoder.model.state_dict().items()}
    path = tmp_path / f"timm_format{suffix}"
    if suffix == ".safetensors":
        save_file(sd, str(path))
    else:
        torch.save({"model": sd}, path)  # timm's {'model': state_dict} container is unwrapped
    enc = build_encoder(
        meta("enc_type"), weights_url=str(path), resolution=RESOLUTION, model_kwargs=tiny_dinov2_kwargs()
    )
    assert torch.equal(
        enc.model.pos_embed, golden_encoder.model.pos_embed
    )  # already on the grid: not resampled
    torch.testing.assert_close(enc(tensor("prep.raw")), tensor("enc.x_norm_patchtokens"), atol=1e-4, rtol=0)


def test_register_variant_drops_cls_and_registers_like_dinov2(tmp_path):
    """facebookresearch ``_reg`` layout: pos-embed over CLS + grid, registers inserted after CLS, no pos."""
    torch.manual_seed(0)
    fb = state_dict("enc.sd.")
    fb["register_tokens"] = 0.02 * torch.randn(1, 4, meta("enc_embed_dim"))
    path = tmp_path / "dinov2_tiny_reg4_pretrain.pth"
    torch.save(fb, path)
    enc = build_encoder(
        "dinov2-vit-b-reg", weights_url=str(path), resolution=RESOLUTION, model_kwargs=tiny_dinov2_kwargs()
    )
    assert enc.num_prefix_tokens == 5 and enc.num_tokens == GRID**2

    # DINOv2's forward with the pos-embed pre-resampled as REPA does (1 prefix token, bicubic+antialias).
    x = tensor("prep.dinov2_input")
    pos = resample_abs_pos_embed(fb["pos_embed"], [GRID, GRID])  # (1, 1 + GRID**2, D)
    h = (
        F.conv2d(x, fb["patch_embed.proj.weight"], fb["patch_embed.proj.bias"], stride=PATCH)
        .flatten(2)
        .transpose(1, 2)
    )
    h = torch.cat([fb["cls_token"].expand(len(x), -1, -1), h], dim=1) + pos
    h = torch.cat([h[:, :1], fb["register_tokens"].expand(len(x), -1, -1), h[:, 1:]], dim=1)
    with torch.no_grad():
        for block in enc.model.blocks:
            h = block(h)
        expected = enc.model.norm(h)[:, 5:]
    torch.testing.assert_close(enc.forward_preprocessed(x), expected, atol=1e-5, rtol=0)


# ---------------------------------------------------------------- frozen-ness and random init


def test_random_init_warns_and_is_frozen(caplog):
    with caplog.at_level(logging.WARNING, logger="repa.encoders"):
        enc = build_encoder("dinov2-vit-s", resolution=RESOLUTION, model_kwargs=tiny_dinov2_kwargs())
    assert any("RANDOM" in r.message and "weights_url" in r.message for r in caplog.records)
    assert all(not p.requires_grad for p in enc.parameters())
    enc.train()
    assert not enc.training and not enc.model.training
    images = torch.randint(0, 256, (2, 3, RESOLUTION, RESOLUTION), dtype=torch.uint8)
    out = enc(images)
    assert out.shape == (2, GRID**2, meta("enc_embed_dim")) and out.grad_fn is None
    assert enc.describe()["weights_url"] is None and enc.weights_sha256 is None


# ---------------------------------------------------------------- registry


@pytest.mark.parametrize("name", sorted(n for n in ENCODERS if n.startswith("dinov2-")))
@pytest.mark.parametrize("resolution", [256, 512])
def test_dinov2_entries_build_with_reference_sizes(name, resolution):
    with torch.device("meta"):  # full-size architecture, no memory
        enc = build_encoder(name, resolution=resolution)
    grid = 16 * (resolution // 256)
    assert enc.input_size == 224 * (resolution // 256)
    assert enc.num_tokens == grid * grid
    assert (
        enc.embed_dim
        == ENCODERS[name].embed_dim
        == {"s": 384, "b": 768, "l": 1024, "g": 1536}[name.split("-")[2]]
    )
    assert enc.num_prefix_tokens == (5 if name.endswith("-reg") else 1)


def test_registry_has_the_reference_names():
    for size in "sblg":
        assert f"dinov2-vit-{size}" in ENCODERS and f"dinov2-vit-{size}-reg" in ENCODERS
    assert ENCODERS["dinov2-vit-b"].timm_name == "vit_base_patch14_dinov2.lvd142m"
    assert ENCODERS["dinov2-vit-g-reg"].timm_name == "vit_giant_patch14_reg4_dinov2.lvd142m"


def test_register_encoder_adds_one_entry_and_refuses_duplicates():
    spec = EncoderSpec(
        timm_name="vit_tiny_patch16_224",
        embed_dim=32,
        preprocessing=Preprocessing(resize="none"),
        model_kwargs=dict(patch_size=8, embed_dim=32, depth=1, num_heads=2),
    )
    register_encoder("toy-vit-test", spec)
    try:
        enc = build_encoder("toy-vit-test", resolution=32)
        assert (enc.num_tokens, enc.embed_dim, enc.input_size) == (16, 32, 32)
        with pytest.raises(ValueError, match="already registered"):
            register_encoder("toy-vit-test", spec)
    finally:
        del ENCODERS["toy-vit-test"]
    with pytest.raises(ValueError, match="timm:"):
        register_encoder("timm:foo", spec)


def test_bring_your_own_timm_encoder_loads_its_weights_file(tmp_path):
    kwargs = dict(patch_size=4, embed_dim=32, depth=2, num_heads=2, img_size=16)
    torch.manual_seed(0)
    toy = build_encoder("timm:vit_tiny_patch16_224", resolution=32, model_kwargs=kwargs)
    assert (toy.input_size, toy.num_tokens, toy.embed_dim) == (16, 16, 32)  # 32 px data resized to 16 px
    path = tmp_path / "toy.safetensors"
    save_file(toy.model.state_dict(), str(path))
    torch.manual_seed(1)
    loaded = build_encoder(
        "timm:vit_tiny_patch16_224", weights_url=str(path), resolution=32, model_kwargs=kwargs
    )
    images = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    assert torch.equal(loaded(images), toy(images))


# ---------------------------------------------------------------- errors


def test_unknown_encoder_name_lists_the_known_ones():
    with pytest.raises(UnknownEncoderError, match=r"dinov2-vit-b.*timm:"):
        build_encoder("dinov3-vit-b")
    with pytest.raises(UnknownEncoderError, match="no_such_model"):
        build_encoder("timm:no_such_model")


def test_missing_weights_file_names_the_url(tmp_path):
    url = str(tmp_path / "nope.pth")
    with pytest.raises(WeightsError, match=r"nope\.pth"):
        build_encoder(
            "dinov2-vit-s", weights_url=url, resolution=RESOLUTION, model_kwargs=tiny_dinov2_kwargs()
        )


def test_unloadable_weights_file_names_the_url(tmp_path):
    path = tmp_path / "garbage.pth"
    path.write_bytes(b"not a torch file")
    with pytest.raises(WeightsError, match=r"garbage\.pth"):
        build_encoder(
            "dinov2-vit-s", weights_url=str(path), resolution=RESOLUTION, model_kwargs=tiny_dinov2_kwargs()
        )


def test_state_dict_mismatch_names_missing_and_unexpected_keys(fb_weights_path):
    depth, dim, heads = meta("enc_depth"), meta("enc_embed_dim"), meta("enc_num_heads")
    kwargs = {**tiny_dinov2_kwargs(), "depth": depth - 1}
    with pytest.raises(WeightsError, match=rf"unexpected keys: blocks\.{depth - 1}\.") as err:
        build_encoder("dinov2-vit-b", weights_url=fb_weights_path, resolution=RESOLUTION, model_kwargs=kwargs)
    assert fb_weights_path in str(err.value)
    kwargs = {**tiny_dinov2_kwargs(), "depth": depth + 1}
    with pytest.raises(WeightsError, match=rf"missing keys: blocks\.{depth}\."):
        build_encoder("dinov2-vit-b", weights_url=fb_weights_path, resolution=RESOLUTION, model_kwargs=kwargs)
    small = dim // 2 if (dim // 2) % heads == 0 else dim - heads  # another width the heads divide
    kwargs = {**tiny_dinov2_kwargs(), "embed_dim": small}
    with pytest.raises(
        WeightsError, match=rf"shape mismatch.*cls_token: file \(1, 1, {dim}\) vs model \(1, 1, {small}\)"
    ):
        build_encoder("dinov2-vit-b", weights_url=fb_weights_path, resolution=RESOLUTION, model_kwargs=kwargs)


def test_bad_images_are_rejected_with_the_expected_layout(golden_encoder):
    good = tensor("prep.raw")
    with pytest.raises(ValueError, match="uint8"):
        golden_encoder(good.float())
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        golden_encoder(good[:, :1])
    half = RESOLUTION // 2
    with pytest.raises(ValueError, match=rf"{RESOLUTION}x{RESOLUTION} .* got {half}x{half}"):
        golden_encoder(good[..., :half, :half])
    with pytest.raises(ValueError, match=r"torch\.Tensor"):
        golden_encoder(good.numpy())


def test_dinov2_needs_resolution_of_at_least_256():
    with pytest.raises(ValueError, match="resolution >= 256"):
        build_encoder("dinov2-vit-b", resolution=128)
    with pytest.raises(ValueError, match="img_size=518 contradicts"):
        build_encoder("dinov2-vit-b", resolution=256, model_kwargs=dict(img_size=518))
