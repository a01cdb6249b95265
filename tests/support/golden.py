"""Access to the golden parity file produced by the official REPA code (see tests/fixtures/README.md).

The path comes from ``REPA_GOLDEN`` (default: the vendored copy), read at every call, so any file of the
same format — other sizes, the cosine path, several encoders, other sampler settings — is checked with
no code change (and a test can point ``REPA_GOLDEN`` at a modified copy). Tests build shapes, key names,
counts, the interpolant and the time grids from the ``meta_*`` entries (and the stored grids), never
from constants; what a given file does not exercise is skipped with the reason.
"""

from __future__ import annotations

import os
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
import torch

DEFAULT_GOLDEN = Path(__file__).parent.parent / "fixtures" / "repa_golden_public.npz"


def golden_path() -> Path:
    return Path(os.environ.get("REPA_GOLDEN", DEFAULT_GOLDEN))


@cache
def load(path: Path) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as g:
        return {k: g[k] for k in g.files}


def golden() -> dict[str, np.ndarray]:
    return load(golden_path())


def meta(key: str) -> Any:
    value = golden()["meta_" + key]
    return value.tolist() if value.ndim else value.item()


def tensor(key: str) -> torch.Tensor:
    return torch.from_numpy(np.array(golden()[key]))


def state_dict(prefix: str = "sd.") -> dict[str, torch.Tensor]:
    return {k[len(prefix) :]: tensor(k) for k in golden() if k.startswith(prefix)}


def keys(prefix: str) -> list[str]:
    return sorted(k for k in golden() if k.startswith(prefix))


def per_projector(prefix: str) -> list[str]:
    """``prefix + i`` for each projector ``i`` of ``meta_z_dims``, in index order (``loss.zs.<i>``)."""
    return [f"{prefix}{i}" for i in range(len(meta("z_dims")))]


# ----------------------------------------------------------------------------- SiT


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


def official_sit_shapes() -> dict[str, tuple[int, ...]]:
    """Name -> shape of every key of the official ``models/sit.py`` ``SiT(...).state_dict()``, from meta.

    Independent of repa: the layout the golden README lists (58 keys for the public file), generalised
    over depth, projectors and qk_norm. The label table has a null row iff ``class_dropout_prob > 0``
    (the reference's ``LabelEmbedder``); ``qk_norm`` adds timm's affine LayerNorms over a head.
    """
    h, dh, p, c = meta("hidden_size"), meta("decoder_hidden_size"), meta("patch_size"), meta("in_channels")
    tokens = (meta("input_size") // p) ** 2
    mlp, pd = int(h * meta("mlp_ratio")), meta("projector_dim")
    rows = meta("num_classes") + int(meta("class_dropout_prob") > 0)
    shapes: dict[str, tuple[int, ...]] = {
        "pos_embed": (1, tokens, h),
        "x_embedder.proj.weight": (h, c, p, p),
        "x_embedder.proj.bias": (h,),
        "t_embedder.mlp.0.weight": (h, 256),  # frequency_embedding_size=256
        "t_embedder.mlp.0.bias": (h,),
        "t_embedder.mlp.2.weight": (h, h),
        "t_embedder.mlp.2.bias": (h,),
        "y_embedder.embedding_table.weight": (rows, h),
    }
    for i in range(meta("depth")):
        b = f"blocks.{i}."
        shapes |= {
            b + "attn.qkv.weight": (3 * h, h),
            b + "attn.qkv.bias": (3 * h,),
            b + "attn.proj.weight": (h, h),
            b + "attn.proj.bias": (h,),
        }
        if meta("qk_norm"):
            head = h // meta("num_heads")
            shapes |= {b + f"attn.{q}_norm.{w}": (head,) for q in "qk" for w in ("weight", "bias")}
        shapes |= {
            b + "mlp.fc1.weight": (mlp, h),
            b + "mlp.fc1.bias": (mlp,),
            b + "mlp.fc2.weight": (h, mlp),
            b + "mlp.fc2.bias": (h,),
            b + "adaLN_modulation.1.weight": (6 * h, h),
            b + "adaLN_modulation.1.bias": (6 * h,),
        }
    for j, z in enumerate(meta("z_dims")):
        pj = f"projectors.{j}."
        shapes |= {
            pj + "0.weight": (pd, h),
            pj + "0.bias": (pd,),
            pj + "2.weight": (pd, pd),
            pj + "2.bias": (pd,),
            pj + "4.weight": (z, pd),
            pj + "4.bias": (z,),
        }
    return shapes | {
        "final_layer.linear.weight": (p * p * c, dh),
        "final_layer.linear.bias": (p * p * c,),
        "final_layer.adaLN_modulation.1.weight": (2 * dh, dh),
        "final_layer.adaLN_modulation.1.bias": (2 * dh,),
    }


# ----------------------------------------------------------------------------- loss


def interpolate(x: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """``x_t = alpha_t x + sigma_t noise`` of the golden's ``meta_path_type``, ``t`` of shape (B,)."""
    from repa.objective import interpolant

    alpha, sigma, _, _ = interpolant(meta("path_type"), t.reshape(-1, 1, 1, 1))
    return alpha * x + sigma * noise


# ----------------------------------------------------------------------------- samplers


def guidance() -> dict[str, float]:
    """The ``_cfg`` runs' settings: ``cfg_scale``, ``guidance_low``, ``guidance_high``."""
    return dict(
        cfg_scale=meta("sample_cfg_scale"),
        guidance_low=meta("sample_guidance_low"),
        guidance_high=meta("sample_guidance_high"),
    )


def time_grid(sampler: str) -> list[float]:
    """The stored (N+1,) time grid of ``sampler`` ('ode' or 'sde'): ``sample.<sampler>_t_steps``."""
    return tensor(f"sample.{sampler}_t_steps").tolist()


def guided_steps(sampler: str) -> list[bool]:
    """Which steps of ``sampler``'s grid the reference's inclusive guidance interval guides."""
    g = guidance()
    return [
        g["cfg_scale"] > 1 and g["guidance_low"] <= t <= g["guidance_high"] for t in time_grid(sampler)[:-1]
    ]
