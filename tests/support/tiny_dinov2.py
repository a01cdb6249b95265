"""A tiny DINOv2-architecture ViT for FD-DINOv2 tests: the released file's layout at 1/32 the width.

``write_tiny_dinov2`` saves it as the release is shaped (518 px: a 37x37 position grid; layer scales 1,
as trained weights have them, not timm's 1e-5 init); ``shrink_registry_dinov2`` makes the encoder
registry's ``dinov2-vit-l`` build at this size, so the config path (``eval.dinov2_weights_url``) loads it.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

TINY = {"embed_dim": 32, "depth": 2, "num_heads": 2}


def write_tiny_dinov2(path: Path) -> str:
    import timm
    import torch

    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = timm.create_model(
            "vit_large_patch14_dinov2.lvd142m", pretrained=False, num_classes=0, img_size=518, **TINY
        )
    state = model.state_dict()
    for k in state:
        if k.endswith(".gamma"):
            state[k] = torch.ones_like(state[k])
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, path)
    return str(path)


def shrink_registry_dinov2(monkeypatch: Any) -> None:
    """``resolve_encoder_spec("dinov2-vit-l")`` -> the same spec at the TINY size (for this test only)."""
    from repa.encoders import registry

    real = registry.resolve_encoder_spec

    def tiny(name: str, *args: Any, **kwargs: Any) -> Any:
        spec = real(name, *args, **kwargs)
        if name != "dinov2-vit-l":
            return spec
        return dataclasses.replace(spec, model_kwargs={**spec.model_kwargs, **TINY})

    monkeypatch.setattr(registry, "resolve_encoder_spec", tiny)
