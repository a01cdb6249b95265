"""The official REPA checkpoint layout (sihyun-yu/REPA ``train.py``): what a file holds, read back.

``train.py`` saves ``{"model", "ema", "opt", "args", "steps"}`` with ``args`` its argparse Namespace;
the released EMA files are bare state dicts. This module knows those key names, the wrapper prefixes
third-party files carry, and how the recorded ``args`` (or the tensor shapes) map to SiT constructor
arguments, so repa loads such files strictly.

``train.py`` records no projector widths: it builds ``z_dims = [encoder.embed_dim for encoder in
encoders]`` from ``--enc-type`` (comma-separated, one projector each; ``utils.load_encoders``), so
:func:`z_dims_from_enc_type` reads them from repa's encoder registry, and for REPA's other encoder
families (``mocov3``, ``clip``, ``mae``, ``jepa``, ``dinov1``: ``{type}-vit-{size}``) from the ViT width
of the size letter.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch

# Key prefixes added by wrappers rather than by the model: `module.` by DistributedDataParallel /
# DataParallel when a wrapped model's state_dict() is saved, `_orig_mod.` by torch.compile's
# OptimizedModule. Third-party REPA checkpoints carry them (the official save uses model.module);
# repa itself unwraps before saving, so they are stripped only when loading such files.
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")

# Token widths of the ViT sizes in REPA's ``{type}-vit-{size}`` encoder names: ViT-S/B/L/H (Dosovitskiy
# et al. 2021, Table 1; DeiT's S) and ViT-g/14 of DINOv2 (Oquab et al. 2023). CLIP's "L" is ViT-L/14.
_VIT_WIDTHS = {"s": 384, "b": 768, "l": 1024, "h": 1280, "g": 1536}


def z_dims_from_enc_type(enc_type: str) -> list[int]:
    """Projector widths of an official ``train.py --enc-type`` value, one per encoder.

    ``"dinov2-vit-b,dinov2-vit-l"`` -> ``[768, 1024]``; ``"None"`` (a vanilla SiT) -> ``[]``. Registered
    encoders give their ``embed_dim``; other ``{type}-vit-{s,b,l,h,g}`` names the ViT width. Raises
    ValueError naming an encoder whose width is unknown.
    """
    from repa.encoders.registry import ENCODERS

    if str(enc_type).strip() in ("None", ""):
        return []
    dims = []
    for name in (part.strip() for part in str(enc_type).split(",")):
        spec = ENCODERS.get(name)
        parts = name.split("-")
        if spec is not None and spec.embed_dim:
            dims.append(int(spec.embed_dim))
        elif len(parts) == 3 and parts[1] == "vit" and parts[2].lower() in _VIT_WIDTHS:
            dims.append(_VIT_WIDTHS[parts[2].lower()])
        else:
            raise ValueError(
                f"checkpoint args: enc_type {enc_type!r}: the width of encoder {name!r} is unknown; expected "
                f"a registered encoder ({', '.join(sorted(ENCODERS))}) or <type>-vit-<s|b|l|h|g>"
            )
    return dims


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
    sd = _without_empty_projectors(sd)
    stripped = True
    while stripped:  # wrappers nest in either order, e.g. `module._orig_mod.`
        stripped = False
        for prefix in _WRAPPER_PREFIXES:
            if all(k.startswith(prefix) for k in sd):
                sd = {k[len(prefix) :]: v for k, v in sd.items()}
                stripped = True
    return sd


def _without_empty_projectors(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop projectors whose output layer is 0 wide: ``train.py --enc-type None`` builds
    ``z_dims = [0]``, a projector with no output that never enters the loss (a vanilla SiT)."""
    empty = set()
    for key, value in sd.items():
        parts = key.split(".")
        i = parts.index("projectors") if "projectors" in parts else -1
        if i >= 0 and len(parts) > i + 3 and key.endswith(".4.weight") and value.numel() == 0:
            empty.add(".".join(parts[: i + 2]) + ".")
    return {k: v for k, v in sd.items() if not any(k.startswith(p) for p in empty)} if empty else sd


def _is_state_dict(d: Mapping) -> bool:
    return len(d) > 0 and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in d.items())


def _sit_params() -> set[str]:
    import inspect

    from repa.models.sit import SiT

    return set(inspect.signature(SiT).parameters)


def with_table_sizes(args: Mapping[str, Any]) -> dict[str, Any]:
    """Fill depth/hidden_size/num_heads/patch_size from the size table entry ``args['model']``."""
    from repa.models.sizes import SIT_SIZES

    name = args.get("model")
    if name not in SIT_SIZES:
        raise ValueError(f"checkpoint records model {name!r}, which is not one of {', '.join(SIT_SIZES)}")
    out = dict(args)
    for key, value in SIT_SIZES[name].items():
        if out.get(key) is None:
            out[key] = value
    return out


def model_args_from_recorded(recorded: Mapping[str, Any]) -> dict[str, Any]:
    """SiT arguments (plus ``model``, the table name) from a checkpoint's recorded ``args``.

    Two layouts: repa's ``ema.pt`` records SiT's own keyword arguments; the official ``train.py``
    records its command line (``resolution``, ``encoder_depth``, ``enc_type`` ...), whose latents are
    ``resolution / 8`` per side (SD-VAE) and whose projector widths follow from ``enc_type``
    (:func:`z_dims_from_enc_type`; generate.py's ``projector_embed_dims`` is read when there is none).
    """
    if "input_size" in recorded:  # repa: SiT kwargs + model name
        keep = _sit_params() | {"model"}
        args = {k: v for k, v in recorded.items() if k in keep}
    elif "resolution" in recorded:  # official REPA train.py (enc_type), or generate.py's projector_embed_dims
        if recorded.get("enc_type") is not None:
            z_dims = z_dims_from_enc_type(recorded["enc_type"])
        else:
            dims = recorded.get("projector_embed_dims", "768")
            z_dims = [int(d) for d in str(dims).split(",") if d.strip()]
        args = {
            "model": recorded.get("model"),
            "input_size": int(recorded["resolution"]) // 8,
            "in_channels": 4,
            "encoder_depth": int(recorded.get("encoder_depth", 8)),
            "z_dims": z_dims,
            "num_classes": int(recorded.get("num_classes", 1000)),
            "qk_norm": bool(recorded.get("qk_norm", False)),
            "fused_attn": bool(recorded.get("fused_attn", True)),
        }
    else:
        raise ValueError(f"checkpoint args have neither input_size nor resolution: keys {sorted(recorded)}")
    if "z_dims" in args:
        args["z_dims"] = [int(z) for z in args["z_dims"]]
    return with_table_sizes(args)


def infer_model_args(sd: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """What the tensor shapes of a SiT state dict say about its architecture (reference key names)."""
    out: dict[str, Any] = {}
    w = sd.get("x_embedder.proj.weight")
    if w is not None and w.ndim == 4:
        out["hidden_size"], out["in_channels"], out["patch_size"] = (
            int(w.shape[0]),
            int(w.shape[1]),
            int(w.shape[2]),
        )
        pos = sd.get("pos_embed")
        if pos is not None and pos.ndim == 3:
            out["input_size"] = math.isqrt(int(pos.shape[1])) * out["patch_size"]
    blocks = {int(k.split(".")[1]) for k in sd if k.startswith("blocks.")}
    if blocks:
        out["depth"] = max(blocks) + 1
    table = sd.get("y_embedder.embedding_table.weight")
    if table is not None:
        out["num_classes"] = int(table.shape[0]) - 1  # + the null row
    heads = sorted(
        {int(k.split(".")[1]) for k in sd if k.startswith("projectors.") and k.endswith(".4.weight")}
    )
    out["z_dims"] = [int(sd[f"projectors.{h}.4.weight"].shape[0]) for h in heads]
    if heads:
        out["projector_dim"] = int(sd[f"projectors.{heads[0]}.0.weight"].shape[0])
    return out
