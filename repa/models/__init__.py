"""SiT models and loading of the official REPA checkpoint layout."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from repa.models.sit import SiT, SiT_models, build_mlp, build_model, num_parameters

__all__ = ["SiT", "SiT_models", "build_mlp", "build_model", "load_reference_state_dict", "num_parameters"]

# Key prefixes added by wrappers rather than by the model: `module.` by DistributedDataParallel /
# DataParallel when a wrapped model's state_dict() is saved, `_orig_mod.` by torch.compile's
# OptimizedModule. Third-party REPA checkpoints carry them (the official save uses model.module);
# repa itself unwraps before saving, so they are stripped only when loading such files.
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")


def load_reference_state_dict(obj: Any, which: str = "ema") -> dict[str, torch.Tensor]:
    """SiT state dict from an official REPA checkpoint ``{model, ema, opt, args, steps}`` or a bare one.

    ``obj`` is what ``repa.weights.load_torch_file`` returned; ``which`` picks ``"ema"`` (what the paper
    evaluates) or ``"model"`` (the raw training weights). Wrapper prefixes are stripped when every key
    has them. Raises ValueError naming the available keys when ``which`` is missing.
    """
    if not isinstance(obj, Mapping):
        raise ValueError(
            f"checkpoint: expected a dict (state dict or {{model, ema, ...}}), got {type(obj).__name__}"
        )
    if _is_state_dict(obj):
        sd = dict(obj)
    elif which in obj:
        sd = obj[which]
        if not isinstance(sd, Mapping) or not _is_state_dict(sd):
            raise ValueError(
                f"checkpoint[{which!r}]: expected a state dict of tensors, got {type(sd).__name__}"
            )
        sd = dict(sd)
    else:
        raise ValueError(
            f"checkpoint has no {which!r} entry (keys: {sorted(map(str, obj))}); "
            "expected the REPA layout {model, ema, opt, args, steps} or a bare state dict"
        )
    stripped = True
    while stripped:  # wrappers nest in either order, e.g. `module._orig_mod.`
        stripped = False
        for prefix in _WRAPPER_PREFIXES:
            if all(k.startswith(prefix) for k in sd):
                sd = {k[len(prefix) :]: v for k, v in sd.items()}
                stripped = True
    return sd


def _is_state_dict(d: Mapping) -> bool:
    return len(d) > 0 and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in d.items())
