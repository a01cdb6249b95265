"""Tiny runs shared by the tests: the pixel-space SiT of the sampling, eval and watch tests (config tree,
committed checkpoints of random but not all-zero-output weights), the ``--set`` lines of the tiny training
runs, and a toy-width SD-VAE layout."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import torch
from torch import nn

from repa import checkpoint as ckpt
from repa import storage
from repa.config import RunConfig
from repa.models import build_model

NUM_CLASSES = 10

# `repa train --config toy-cpu` made smaller still: 16 px pixels, SiT hidden 32 x depth 2 aligned at block 1
# with a one-block timm ViT (64 tokens each); test modules append their own cadences.
TINY_TRAIN_SETS = [
    "model.hidden_size=32",
    "model.depth=2",
    "model.num_heads=2",
    "model.encoder_depth=1",
    "model.projector_dim=64",
    "model.num_classes=10",
    "encoder.model_kwargs=[{img_size: 16, patch_size: 2, embed_dim: 32, depth: 1, num_heads: 2}]",
    "data.resolution=16",
    "data.chunk_size=2",
    "data.shards_in_flight=4",
    "train.global_batch_size=4",
]

# SD-VAE layout (4 levels = 8x downsampling, 4 latent channels) at toy width: 32 px -> 4x4 latents.
TINY_SD_VAE = dict(
    block_out_channels=[4, 4, 4, 4],
    down_block_types=["DownEncoderBlock2D"] * 4,
    up_block_types=["UpDecoderBlock2D"] * 4,
    layers_per_block=1,
    norm_num_groups=2,
    sample_size=32,
)
# A timm ViT whose 16 patch tokens at 32 px match SiT-*/1 on those 4x4 latents.
TINY_ENCODER_KWARGS = {"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 1, "num_heads": 2}


def upload_folder(local: Path, url: str) -> None:
    """Copy every file below ``local`` to ``url`` (same relative paths)."""
    for path in sorted(local.rglob("*")):
        if path.is_file():
            storage.write_bytes_atomic(f"{url}/{path.relative_to(local)}", path.read_bytes())


def stage_latent_run(tmp_path: Path, bucket_url: str) -> None:
    """A toy SD-VAE (``TINY_SD_VAE``) and timm encoder (``TINY_ENCODER_KWARGS``) with real weights files,
    and 32 px latents made with that VAE, all copied to ``bucket_url``: ``shards/``, ``weights/vae/``,
    ``weights/encoder.pt`` (the storage-options-only-in-the-config tests on S3 and GCS)."""
    import timm

    from repa.data.prepare import prepare_images, prepare_latents
    from repa.vae import build_vae
    from tests.support.datasets import make_imagenet_tree

    torch.manual_seed(0)
    vae_dir = tmp_path / "vae"
    build_vae("sd-vae-ft-mse", config_overrides=TINY_SD_VAE).save_pretrained(str(vae_dir))
    encoder = timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, num_classes=0, **TINY_ENCODER_KWARGS
    )
    tree = make_imagenet_tree(tmp_path, per_class=4, corrupt=0)
    data_url = f"file://{tmp_path}/shards"
    prepare_images(str(tree.root), data_url, resolution=32, samples_per_shard=4)
    prepare_latents(data_url, vae="sd-vae-ft-mse", vae_weights_url=str(vae_dir), batch_size=8)
    upload_folder(tmp_path / "shards", f"{bucket_url}/shards")
    upload_folder(vae_dir, f"{bucket_url}/weights/vae")
    buffer = io.BytesIO()
    torch.save(encoder.state_dict(), buffer)
    storage.write_bytes_atomic(f"{bucket_url}/weights/encoder.pt", buffer.getvalue())


def tiny_run_config(run_url: str, **sections: dict[str, Any]) -> dict:
    """Config tree of a hidden-32, depth-2 SiT on 16 px identity latents; ``sections`` are merged
    into (or added as) the named sections."""
    tree: dict[str, dict[str, Any]] = {
        "model": {
            "name": "SiT-S/2",
            "hidden_size": 32,
            "depth": 2,
            "num_heads": 2,
            "encoder_depth": 0,
            "num_classes": NUM_CLASSES,
        },
        "encoder": {"names": []},
        "vae": {"name": "none", "latents_scale": 1.0},
        "data": {"resolution": 16},
        "train": {"device": "cpu"},
        "storage": {"run_url": run_url},
    }
    for name, values in sections.items():
        tree[name] = {**tree.get(name, {}), **values}
    return tree


def perturb(model: nn.Module, scale: float = 0.05) -> nn.Module:
    """adaLN-Zero makes a fresh SiT's output 0; add noise to every trainable weight so outputs (and
    samples) depend on the weights."""
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(scale * torch.randn_like(p))
    return model


def commit_tiny_checkpoint(cfg: RunConfig, step: int, seed: int = 0) -> None:
    """Commit ``step`` of ``cfg``'s run: a perturbed random SiT (torch seed ``seed``) as model and EMA."""
    args = ckpt.model_kwargs(cfg, z_dims=[])
    name = args.pop("model")
    torch.manual_seed(seed)
    sd = perturb(build_model(name, **args)).state_dict()
    state = {"model": sd, "ema": sd, "config": cfg.to_dict()}
    ckpt.save_checkpoint(cfg.storage.run_url, step, state, sd, {"model": name, **args})


def latent_run_sets(bucket_url: str, options: str) -> list[str]:
    """``--set`` lines of a 2-step run on what :func:`stage_latent_run` put in ``bucket_url``, reaching
    the store only through ``options`` (YAML of the fsspec options, in data and storage)."""
    return [
        *("model.hidden_size=32", "model.depth=2", "model.num_heads=2", "model.patch_size=1"),
        *("model.encoder_depth=1", "model.projector_dim=64", "model.num_classes=10"),
        f"encoder.model_kwargs=[{TINY_ENCODER_KWARGS}]".replace("'", ""),
        f"encoder.weights_urls=[{bucket_url}/weights/encoder.pt]",
        *("vae.name=sd-vae-ft-mse", f"vae.weights_url={bucket_url}/weights/vae", "vae.latents_scale=0.18215"),
        *(f"data.url={bucket_url}/shards", "data.resolution=32", f"data.storage_options={options}"),
        *(f"storage.run_url={bucket_url}/run", f"storage.storage_options={options}"),
        *("train.global_batch_size=4", "train.max_steps=2", "log.every_steps=1"),
        *("log.sample_every_steps=2", "log.sample_num_images=1", "log.sample_num_steps=1"),
        *("checkpoint.every_steps=2", "data.chunk_size=2", "data.shards_in_flight=2"),
    ]
