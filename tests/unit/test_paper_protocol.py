"""The paper's evaluation protocol is the default, and official REPA checkpoints load.

- Sampling runs the model in fp32 (REPA ``generate.py``: no autocast, TF32 allowed), whatever
  ``train.precision`` says, unless ``sample.precision`` is set.
- Samples are decoded by sd-vae-ft-ema (``generate.py --vae ema``) for SD-VAE latents, and a config
  that would decode real latents with a random sd-vae-ft-ema is refused, naming the key to set.
- A checkpoint written by the official ``train.py`` (``{model, ema, opt, args, steps}``, ``args`` its
  argparse Namespace, no projector widths recorded) with two encoders loads strictly: ``z_dims`` comes
  from ``enc_type``.
"""

from __future__ import annotations

import argparse
import subprocess
import sys

import pytest
import torch

from repa import checkpoint as ckpt
from repa.checkpoint import model_args_from_recorded, z_dims_from_enc_type
from repa.config import ConfigError, load_config
from repa.eval import sample as S
from repa.eval.args import resolve_config
from repa.models import build_model


def official_train_py_args(**changes) -> argparse.Namespace:
    """The ``args`` entry of an official ``train.py`` checkpoint: its whole argparse Namespace, every
    option at its default (sihyun-yu/REPA ``train.py parse_args``) except the ones changed."""
    args = {
        "output_dir": "exps",
        "exp_name": "linear-dinov2-b-enc8",
        "logging_dir": "logs",
        "report_to": "wandb",
        "sampling_steps": 10000,
        "resume_step": 0,
        "model": None,
        "num_classes": 1000,
        "encoder_depth": 8,
        "fused_attn": True,
        "qk_norm": False,
        "data_dir": "../data/imagenet256",
        "resolution": 256,
        "batch_size": 256,
        "allow_tf32": False,
        "mixed_precision": "fp16",
        "epochs": 1400,
        "max_train_steps": 400000,
        "checkpointing_steps": 50000,
        "gradient_accumulation_steps": 1,
        "learning_rate": 1e-4,
        "adam_beta1": 0.9,
        "adam_beta2": 0.999,
        "adam_weight_decay": 0.0,
        "adam_epsilon": 1e-08,
        "max_grad_norm": 1.0,
        "seed": 0,
        "num_workers": 4,
        "path_type": "linear",
        "prediction": "v",
        "cfg_prob": 0.1,
        "enc_type": "dinov2-vit-b",
        "proj_coeff": 0.5,
        "weighting": "uniform",
        "legacy": False,
    }
    unknown = set(changes) - set(args)
    assert not unknown, unknown
    return argparse.Namespace(**{**args, **changes})


# ----------------------------------------------------------------------------- precision


def test_sampling_defaults_to_fp32_whatever_the_training_precision():
    assert load_config().sample.precision == "fp32"
    for train_precision in ("auto", "bf16", "fp32"):
        cfg = load_config(None, [f"train.precision={train_precision}", "train.device=cuda"])
        assert cfg.sample_precision() == "fp32", train_precision
    # a config written before the default (sample.precision: null) samples in fp32 too
    assert load_config(None, ["sample.precision=null", "train.precision=bf16"]).sample_precision() == "fp32"
    # only an explicit setting changes it: the key, or --precision of repa sample / eval / watch
    assert load_config(None, ["sample.precision=bf16"]).sample_precision() == "bf16"
    parser = argparse.ArgumentParser()
    S.add_arguments(parser)
    cfg = resolve_config(
        parser.parse_args(["--precision", "bf16", "--set", "train.precision=fp32"]), checkpoint=False
    ).cfg
    assert cfg.sample_precision() == "bf16"
    cfg = resolve_config(parser.parse_args(["--set", "train.precision=bf16"]), checkpoint=False).cfg
    assert cfg.sample_precision() == "fp32"


# ----------------------------------------------------------------------------- decoding VAE


def test_samples_are_decoded_by_sd_vae_ft_ema_by_default_and_in_the_paper_presets():
    for source in (None, "sit-xl-2-repa", "sit-b-2-repa", "sit-xl-2-vanilla"):
        cfg = load_config(source)
        assert cfg.vae.name == "sd-vae-ft-mse"  # training latents
        assert S.decoder_vae_identity(cfg)["name"] == "sd-vae-ft-ema", source
    staged = load_config(
        "sit-xl-2-repa",
        ["vae.weights_url=s3://b/w/sd-vae-ft-mse", "sample.vae_weights_url=s3://b/w/sd-vae-ft-ema"],
    )
    identity = S.decoder_vae_identity(staged)
    assert (identity["name"], identity["weights_url"]) == ("sd-vae-ft-ema", "s3://b/w/sd-vae-ft-ema")
    # decoding with the training VAE is one key away, and uses its weights
    mse = load_config(None, ["vae.weights_url=/w/mse", "sample.vae_name=sd-vae-ft-mse"])
    assert S.decoder_vae_identity(mse)["name"] == "sd-vae-ft-mse"
    assert S.decoder_vae_identity(mse)["weights_url"] == "/w/mse"
    # pixel-space toys decode with the identity
    assert S.decoder_vae_identity(load_config("toy-cpu"))["name"] == "none"


def test_real_latents_are_never_decoded_by_a_random_sd_vae_ft_ema():
    cfg = load_config("sit-xl-2-repa", ["vae.weights_url=s3://b/w/sd-vae-ft-mse"])
    with pytest.raises(ConfigError) as e:
        S.decoder_vae_identity(cfg)
    assert e.value.key == "sample.vae_weights_url" and "sample.vae_name=sd-vae-ft-mse" in str(e.value)
    # `repa config validate --for eval` says so before a job starts (exit 2, one line naming the key)
    out = subprocess.run(
        [
            *(sys.executable, "-m", "repa", "config", "validate", "-c", "sit-xl-2-repa", "--for", "eval"),
            *("--set", "vae.weights_url=s3://b/w/sd-vae-ft-mse", "--set", "eval.reference_stats_url=/r.npz"),
        ],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 2 and "sample.vae_weights_url" in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1


# ----------------------------------------------------------------------------- official checkpoints


def test_z_dims_follow_from_enc_type():
    assert z_dims_from_enc_type("dinov2-vit-b") == [768]
    assert z_dims_from_enc_type("dinov2-vit-b,dinov2-vit-l") == [768, 1024]
    assert z_dims_from_enc_type("dinov2-vit-g,mocov3-vit-s,clip-vit-L,jepa-vit-h") == [1536, 384, 1024, 1280]
    assert z_dims_from_enc_type("None") == []
    with pytest.raises(ValueError, match="'siglip-so400m'"):
        z_dims_from_enc_type("dinov2-vit-b,siglip-so400m")


def test_official_train_py_checkpoint_with_two_encoders_loads_strictly(tmp_path):
    args = official_train_py_args(model="SiT-B/2", encoder_depth=4, enc_type="dinov2-vit-b,dinov2-vit-l")
    assert model_args_from_recorded(vars(args))["z_dims"] == [768, 1024]
    # The official model's state dict, shapes only (meta), filled with stride-0 zeros so the file is tiny;
    # the projector outputs get real values to check they land in the right place.
    with torch.device("meta"):
        official = build_model("SiT-B/2", input_size=32, encoder_depth=4, z_dims=(768, 1024))
    shapes = {k: v.shape for k, v in official.state_dict().items()}
    # REPA's measured parameter counts: SiT-B/2 130,500,112 + 7,344,896 (z=768) + 7,869,440 (z=1024)
    assert sum(s.numel() for s in shapes.values()) == 130_500_112 + 7_344_896 + 7_869_440
    g = torch.Generator().manual_seed(0)
    sd = {k: torch.zeros(()).expand(s) for k, s in shapes.items()}
    for i in (0, 1):
        sd[f"projectors.{i}.4.weight"] = torch.randn(shapes[f"projectors.{i}.4.weight"], generator=g)
    path = tmp_path / "0400000.pt"
    torch.save({"model": sd, "ema": sd, "opt": {}, "args": args, "steps": 400_000}, path)

    two = ["encoder.names=[dinov2-vit-b, dinov2-vit-l]", "encoder.weights_urls=[]"]
    cfg = load_config("sit-b-2-repa", two)
    loaded = ckpt.load_model(cfg, ckpt.resolve_checkpoint(str(path), None))  # strict, config checked
    assert loaded.model_args["z_dims"] == [768, 1024] and loaded.model_args["encoder_depth"] == 4
    assert [p[-1].out_features for p in loaded.model.projectors] == [768, 1024]
    for i in (0, 1):
        assert torch.equal(loaded.model.projectors[i][4].weight, sd[f"projectors.{i}.4.weight"])


def test_official_vanilla_checkpoint_drops_its_empty_projector(tmp_path):
    # train.py --enc-type None builds z_dims = [0]: a projector whose output layer is 0 wide
    args = official_train_py_args(model="SiT-B/2", enc_type="None", proj_coeff=0.0)
    with torch.device("meta"):
        vanilla = build_model("SiT-B/2", input_size=32, z_dims=(8,))
    sd = {k: torch.zeros(()).expand(v.shape) for k, v in vanilla.state_dict().items()}
    sd["projectors.0.4.weight"], sd["projectors.0.4.bias"] = torch.zeros(0, 2048), torch.zeros(0)
    path = tmp_path / "vanilla.pt"
    torch.save({"ema": sd, "args": args, "steps": 1}, path)
    cfg = load_config("sit-b-2-repa", ["encoder.names=[]", "encoder.weights_urls=[]"])
    loaded = ckpt.load_model(cfg, ckpt.resolve_checkpoint(str(path), None))
    assert loaded.model_args["z_dims"] == [] and len(loaded.model.projectors) == 0
