"""A tiny pixel-space SiT run for the sampling, eval and watch tests: its config tree and committed
checkpoints of random (but not all-zero-output) weights."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from repa import checkpoint as ckpt
from repa.config import RunConfig
from repa.models import build_model

NUM_CLASSES = 10


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
