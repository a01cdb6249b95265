"""The weights catalogue of `repa weights fetch` matches its upstream sources."""

from __future__ import annotations

import pytest

from repa.encoders.registry import ENCODERS
from repa.hub import INCEPTION_URL, catalogue, set_lines, wanted


def test_inception_url_is_torch_fidelitys():
    from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3

    assert INCEPTION_URL == URL_INCEPTION_V3


def test_every_registry_encoder_is_a_timm_hub_repo_and_the_vaes_are_diffusers_folders():
    known = catalogue()
    for name, spec in ENCODERS.items():
        assert known[name].repo_id == f"timm/{spec.timm_name}" and known[name].files == ("model.safetensors",)
    assert known["dinov2-vit-b"].repo_id == "timm/vit_base_patch14_dinov2.lvd142m"
    for vae in ("sd-vae-ft-mse", "sd-vae-ft-ema"):
        assert known[vae].repo_id == f"stabilityai/{vae}" and known[vae].folder
        assert known[vae].dest("s3://b/w") == f"s3://b/w/stabilityai/{vae}"


def test_a_run_needs_its_encoders_both_vaes_and_inception():
    from repa.config import load_config

    two = ["encoder.names=[dinov2-vit-b, timm:vit_small_patch16_224]", "encoder.weights_urls=[]"]
    cfg = load_config("sit-xl-2-repa", two)
    assert wanted(cfg) == ["dinov2-vit-b", "sd-vae-ft-mse", "sd-vae-ft-ema", "inception"]
    staged = {"dinov2-vit-b": "/w/dino.safetensors", "sd-vae-ft-ema": "/w/ema", "sd-vae-ft-mse": "/w/mse"}
    assert set_lines(cfg, staged) == [
        'encoder.weights_urls=["/w/dino.safetensors",null]',
        "vae.weights_url=/w/mse",
        "sample.vae_weights_url=/w/ema",
    ]
    decode_with_mse = load_config(None, ["sample.vae_name=sd-vae-ft-mse", "eval.feature_extractor=m:f"])
    assert wanted(decode_with_mse) == ["dinov2-vit-b", "sd-vae-ft-mse"]


def test_fd_dinov2_adds_the_vit_l_weights_and_their_set_line():
    from repa.config import load_config

    cfg = load_config("sit-xl-2-repa", ["eval.metrics=[fid, fd_dinov2]"])
    assert wanted(cfg)[-1] == "dinov2-vit-l"
    assert set_lines(cfg, {"dinov2-vit-l": "/w/l.safetensors"}) == [
        "eval.dinov2_weights_url=/w/l.safetensors"
    ]
    assert set_lines(load_config("sit-xl-2-repa"), {"dinov2-vit-l": "/w/l.safetensors"}) == []


@pytest.mark.parametrize("status", [401, 403])
def test_a_hub_that_refuses_the_token_is_a_credentials_failure_naming_hf_token(status):
    from types import SimpleNamespace

    from repa import storage
    from repa.hf_cache import _failure

    refused = RuntimeError("Client error")
    refused.response = SimpleNamespace(status_code=status)  # as HfHubHTTPError carries it
    error = _failure("hf://org/gated/model.safetensors", refused)
    assert isinstance(error, storage.StorageError) and error.kind == "access"
    assert "hf://org/gated/model.safetensors" in str(error) and "HF_TOKEN" in str(error)


def test_an_unreachable_hub_is_an_unreachable_store_naming_hf_endpoint():
    from repa import storage
    from repa.hf_cache import _failure

    try:
        raise OSError("wrapped") from ConnectionRefusedError("refused")
    except OSError as e:
        error = _failure("hf://org/name/config.json", e)
    assert isinstance(error, storage.StorageError) and error.kind == "unreachable"
    assert "HF_ENDPOINT" in str(error) and "HF_HUB_OFFLINE" in str(error)
