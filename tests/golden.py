"""Access to the golden parity file produced by the official REPA code (see tests/fixtures/README.md).

The path comes from ``REPA_GOLDEN`` (default: the vendored copy), so any file of the same format —
other sizes, the cosine path, several encoders, other sampler settings — is checked with no code change.
Tests build shapes and key names from the ``meta_*`` entries, never from constants.
"""

from __future__ import annotations

import os
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
import torch

DEFAULT_GOLDEN = Path(__file__).parent / "fixtures" / "repa_golden_public.npz"


@cache
def golden() -> dict[str, np.ndarray]:
    path = Path(os.environ.get("REPA_GOLDEN", DEFAULT_GOLDEN))
    with np.load(path, allow_pickle=False) as g:
        return {k: g[k] for k in g.files}


def meta(key: str) -> Any:
    value = golden()["meta_" + key]
    return value.tolist() if value.ndim else value.item()


def tensor(key: str) -> torch.Tensor:
    return torch.from_numpy(np.array(golden()[key]))


def state_dict(prefix: str = "sd.") -> dict[str, torch.Tensor]:
    return {k[len(prefix) :]: tensor(k) for k in golden() if k.startswith(prefix)}


def keys(prefix: str) -> list[str]:
    return sorted(k for k in golden() if k.startswith(prefix))


# The official SiT constructor arguments recorded as ``meta_*`` entries.
SIT_ARGS = (
    "input_size",
    "patch_size",
    "in_channels",
    "hidden_size",
    "encoder_depth",
    "depth",
    "num_heads",
    "mlp_ratio",
    "class_dropout_prob",
    "num_classes",
    "use_cfg",
    "z_dims",
    "projector_dim",
    "fused_attn",
    "qk_norm",
)


def sit_kwargs(**overrides: Any) -> dict[str, Any]:
    """The golden SiT's constructor arguments, from ``meta_*``.

    The official constructor also takes ``decoder_hidden_size``; repa's SiT has no such argument (the
    final layer always reads the last block's width), so the file must record it equal to hidden_size.
    """
    decoder = meta("decoder_hidden_size") if "meta_decoder_hidden_size" in golden() else None
    assert decoder in (None, meta("hidden_size")), f"golden decoder_hidden_size {decoder} != hidden_size"
    return {**{name: meta(name) for name in SIT_ARGS}, **overrides}


def sit_model(**overrides: Any):
    """The golden SiT with the ``sd.*`` weights loaded strictly, in eval mode (labels never dropped)."""
    from repa.models import SiT

    model = SiT(**sit_kwargs(**overrides))
    model.load_state_dict(state_dict(), strict=True)
    return model.eval()
