"""Latent space: SD-VAE (diffusers ``AutoencoderKL``) or the identity ``none`` mode for pixel toys.

Reference (sihyun-yu/REPA ``preprocessing/`` and ``generate.py``):

- ``encode_moments``: pixels ``x / 127.5 - 1`` (in [-1, 1]) -> ``vae.encode(x).latent_dist`` ->
  ``cat([mean, std], dim=1)``, float32 (B, 8, H/8, W/8). This is what data preparation stores
  (``preprocessing/encoders.py`` in REPA; note **std**, not logvar).
- ``sample_posterior``: a fresh sample every training step,
  ``z = (mean + std * eps) * latents_scale + latents_bias`` with scale 0.18215 and bias 0.
- ``decode_to_uint8``: ``x = vae.decode((z - bias) / scale)``, ``x = (x + 1) / 2``,
  ``clamp(255 * x, 0, 255).to(uint8)`` — **truncation**, not DiT's rounding (``generate.py``).

Identity mode ``none`` (not in the reference; for pixel-space toy runs): latent_channels 3,
downsample 1, moments ``[x / 127.5 - 1, 0]`` (std 0, so a posterior sample is exact) and
latents_scale 1.0. Its decode **rounds** instead of truncating: ``v / 127.5 - 1`` is not exact in
float32, and truncation would map 63 of the 256 values ``v`` to ``v - 1``; rounding makes
``decode(encode(x)) == x`` exactly.

Weights never download silently: ``weights_url`` is a diffusers-format folder (``config.json`` +
``diffusion_pytorch_model.safetensors``) given as a local path or fsspec URL (remote folders are
copied to a local cache first), or a hub id with ``allow_download=True``.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from repa import storage
from repa.weights import WeightsError

logger = logging.getLogger(__name__)

__all__ = [
    "SD_VAE_CONFIG",
    "VAE",
    "VAE_NAMES",
    "build_vae",
    "default_latents_bias",
    "default_latents_scale",
    "images_to_vae_input",
    "sample_posterior",
    "to_uint8",
]

VAE_NAMES = ("sd-vae-ft-mse", "sd-vae-ft-ema", "none")

# config.json of huggingface.co/stabilityai/sd-vae-ft-mse (identical for sd-vae-ft-ema): 83,653,863 params.
SD_VAE_CONFIG: dict[str, Any] = {
    "_class_name": "AutoencoderKL",
    "act_fn": "silu",
    "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "in_channels": 3,
    "latent_channels": 4,
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "out_channels": 3,
    "sample_size": 256,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "scaling_factor": 0.18215,
}

HUB_IDS = {"sd-vae-ft-mse": "stabilityai/sd-vae-ft-mse", "sd-vae-ft-ema": "stabilityai/sd-vae-ft-ema"}

# train.py: latents_scale = 0.18215 for all 4 channels, latents_bias = 0 (Rombach et al. 2022's SD scale).
_LATENTS_SCALE = {"sd-vae-ft-mse": 0.18215, "sd-vae-ft-ema": 0.18215, "none": 1.0}

WEIGHTS_FILE = "diffusion_pytorch_model.safetensors"
CONFIG_FILE = "config.json"

Rounding = Literal["truncate", "round"]


def default_latents_scale(name: str) -> float:
    """Scale applied to posterior samples: 0.18215 for SD-VAE (unit-variance latents), 1.0 for ``none``."""
    _check_name(name)
    return _LATENTS_SCALE[name]


def default_latents_bias(name: str) -> float:
    """Bias added to posterior samples: 0 for every VAE here (as train.py)."""
    _check_name(name)
    return 0.0


def _check_name(name: str) -> None:
    if name not in VAE_NAMES:
        raise ValueError(f"vae name {name!r}: unknown; choose one of {', '.join(VAE_NAMES)}")


# ----------------------------------------------------------------------------------------------
# Pure tensor helpers
# ----------------------------------------------------------------------------------------------


def _check_uint8_images(images: Any, downsample: int = 1) -> None:
    if not isinstance(images, torch.Tensor) or images.dtype != torch.uint8:
        got = images.dtype if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"images: expected a uint8 tensor (B,3,H,W) of raw pixels in [0, 255], got {got}")
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"images: expected shape (B, 3, H, W), got {tuple(images.shape)}")
    if images.shape[-2] % downsample or images.shape[-1] % downsample:
        raise ValueError(
            f"images: H and W must be multiples of the VAE downsampling factor {downsample}, "
            f"got {tuple(images.shape[-2:])}"
        )


def images_to_vae_input(images: torch.Tensor) -> torch.Tensor:
    """uint8 (B,3,H,W) -> float32 in [-1, 1]: ``x / 127.5 - 1`` (REPA's StabilityVAEEncoder)."""
    _check_uint8_images(images)
    return images.to(torch.float32) / 127.5 - 1


def to_uint8(x: torch.Tensor, rounding: Rounding = "truncate") -> torch.Tensor:
    """[-1, 1] float images -> uint8: ``clamp(255 * (x + 1) / 2, 0, 255)``.

    ``truncate`` is the reference (``.to(torch.uint8)`` drops the fraction: 254.9 -> 254);
    ``round`` rounds to nearest (used by the identity mode, see the module docstring).
    """
    x = (x + 1) / 2
    x = torch.clamp(255.0 * x, 0, 255)
    if rounding == "round":
        x = x.round()
    elif rounding != "truncate":
        raise ValueError(f"rounding: expected 'truncate' or 'round', got {rounding!r}")
    return x.to(torch.uint8)


def _per_channel(value: float | torch.Tensor, channels: int, like: torch.Tensor, what: str) -> Any:
    """A scalar stays a Python number; a tensor of C values becomes (1, C, 1, 1)."""
    if not isinstance(value, torch.Tensor):
        return float(value)
    if value.numel() == 1:
        return value.to(like).reshape(1, 1, 1, 1)
    if value.numel() != channels:
        raise ValueError(
            f"{what}: expected a scalar or {channels} per-channel values, got shape {tuple(value.shape)}"
        )
    return value.to(like).reshape(1, channels, 1, 1)


def sample_posterior(
    moments: torch.Tensor,
    latents_scale: float | torch.Tensor = 0.18215,
    latents_bias: float | torch.Tensor = 0.0,
    noise: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """``z = (mean + std * eps) * latents_scale + latents_bias`` from moments ``cat([mean, std])`` (B,2C,h,w).

    ``eps`` is ``noise`` if given, else ``randn`` from ``generator`` (None: the global RNG, which is
    the reference's ``torch.randn_like(mean)``).
    """
    if not isinstance(moments, torch.Tensor) or moments.ndim != 4 or moments.shape[1] % 2:
        shape = tuple(moments.shape) if isinstance(moments, torch.Tensor) else type(moments).__name__
        raise ValueError(f"moments: expected a tensor (B, 2C, h, w) = cat([mean, std]), got {shape}")
    if not moments.is_floating_point():
        raise ValueError(f"moments: expected a floating-point tensor, got {moments.dtype}")
    mean, std = moments.chunk(2, dim=1)  # (B, C, h, w) each
    if noise is None:
        noise = torch.randn(mean.shape, generator=generator, dtype=mean.dtype, device=mean.device)
    elif noise.shape != mean.shape:
        raise ValueError(f"noise: expected shape {tuple(mean.shape)}, got {tuple(noise.shape)}")
    c = mean.shape[1]
    scale = _per_channel(latents_scale, c, mean, "latents_scale")
    bias = _per_channel(latents_bias, c, mean, "latents_bias")
    return (mean + std * noise) * scale + bias


# ----------------------------------------------------------------------------------------------
# The VAE module
# ----------------------------------------------------------------------------------------------


class VAE(nn.Module):
    """Frozen image <-> latent codec: ``encode_moments`` (data preparation), ``decode_to_uint8`` (samples)."""

    def __init__(
        self,
        name: str,
        autoencoder: nn.Module | None,
        weights_url: str | None = None,
        local_dir: str | None = None,
    ) -> None:
        super().__init__()
        _check_name(name)
        self.name = name
        self.weights_url = weights_url
        self._local_dir = local_dir
        self._weights_sha256: str | None = None
        self.autoencoder = autoencoder
        if autoencoder is None:  # identity
            self.latent_channels, self.downsample = 3, 1
        else:
            autoencoder.eval().requires_grad_(False)
            cfg = autoencoder.config
            self.latent_channels = int(cfg.latent_channels)
            self.downsample = 2 ** (len(cfg.block_out_channels) - 1)  # one 2x downsampler per extra block

    @property
    def is_identity(self) -> bool:
        return self.autoencoder is None

    @property
    def device(self) -> torch.device | None:
        p = None if self.autoencoder is None else next(self.autoencoder.parameters(), None)
        return None if p is None else p.device

    def train(self, mode: bool = True) -> VAE:
        """Always eval: the VAE is frozen."""
        return super().train(False)

    @torch.no_grad()
    def encode_moments(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (B,3,H,W) -> float32 (B, 2C, H/f, W/f) = cat([mean, std]) of the posterior."""
        _check_uint8_images(images, self.downsample)
        if self.device is not None:
            images = images.to(self.device)
        x = images_to_vae_input(images)  # (B, 3, H, W) in [-1, 1]
        if self.autoencoder is None:
            return torch.cat([x, torch.zeros_like(x)], dim=1)
        dist = self.autoencoder.encode(x).latent_dist  # DiagonalGaussianDistribution
        return torch.cat([dist.mean, dist.std], dim=1).float()

    @torch.no_grad()
    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Unscaled latents (B, C, h, w) -> images in [-1, 1] (float)."""
        if self.autoencoder is None:
            return z
        return self.autoencoder.decode(z).sample

    @torch.no_grad()
    def decode_to_uint8(
        self,
        z: torch.Tensor,
        latents_scale: float | torch.Tensor | None = None,
        latents_bias: float | torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Scaled latents (B, C, h, w) -> uint8 (B, 3, h*f, w*f): ``decode((z - bias) / scale)`` -> uint8.

        Scale/bias default to ``default_latents_scale(name)`` / 0. SD-VAE truncates as the reference
        (``generate.py``); the identity mode rounds (exact round trip).
        """
        if not isinstance(z, torch.Tensor) or z.ndim != 4 or z.shape[1] != self.latent_channels:
            shape = tuple(z.shape) if isinstance(z, torch.Tensor) else type(z).__name__
            raise ValueError(
                f"z: expected latents (B, {self.latent_channels}, h, w) for vae {self.name!r}, got {shape}"
            )
        if not z.is_floating_point():
            raise ValueError(f"z: expected floating-point latents, got {z.dtype}")
        if self.device is not None:
            z = z.to(self.device)
        c = self.latent_channels
        scale = _per_channel(
            default_latents_scale(self.name) if latents_scale is None else latents_scale,
            c,
            z,
            "latents_scale",
        )
        bias = _per_channel(0.0 if latents_bias is None else latents_bias, c, z, "latents_bias")
        x = self.decode((z - bias) / scale)
        return to_uint8(x, self.uint8_rounding)

    @property
    def uint8_rounding(self) -> Rounding:
        """``truncate`` as the reference's ``generate.py`` for SD-VAE; ``round`` for the identity mode."""
        return "round" if self.is_identity else "truncate"

    @property
    def uint8_conversion(self) -> str:
        """How :meth:`decode_to_uint8` makes uint8 pixels, in words (recorded with every evaluation)."""
        how = (
            "rounded (identity decoder: exact round trip)"
            if self.is_identity
            else "truncated (reference generate.py)"
        )
        return f"clamp(255 * (x + 1) / 2, 0, 255), {how}"

    @property
    def weights_sha256(self) -> str | None:
        """sha256 of ``diffusion_pytorch_model.safetensors`` (computed on first access; None if no file)."""
        if self._local_dir is None:
            return None
        if self._weights_sha256 is None:
            h = hashlib.sha256()
            with open(os.path.join(self._local_dir, WEIGHTS_FILE), "rb") as f:
                for chunk in iter(lambda: f.read(1 << 24), b""):
                    h.update(chunk)
            self._weights_sha256 = h.hexdigest()
        return self._weights_sha256

    def describe(self) -> dict[str, Any]:
        """Identity for data manifests: which latent space the stored moments live in."""
        return {
            "name": self.name,
            "latent_channels": self.latent_channels,
            "downsample": self.downsample,
            "weights_url": self.weights_url,
            "weights_sha256": self.weights_sha256,
            "random_init": self.autoencoder is not None
            and self._local_dir is None
            and self.weights_url is None,
            "latents_scale": default_latents_scale(self.name),
            "latents_bias": default_latents_bias(self.name),
        }

    def save_pretrained(self, directory: str) -> None:
        """Write a diffusers-format folder (config.json + safetensors) that ``build_vae`` can load."""
        if self.autoencoder is None:
            raise ValueError("vae 'none' has no weights to save")
        self.autoencoder.save_pretrained(directory, safe_serialization=True)

    def extra_repr(self) -> str:
        return f"name={self.name!r}, latent_channels={self.latent_channels}, downsample={self.downsample}"


# ----------------------------------------------------------------------------------------------
# Building and loading
# ----------------------------------------------------------------------------------------------


def _fetch_folder(where: storage.Location, cache_dir: str) -> str:
    """Copy config.json + safetensors of a remote diffusers folder into the cache; return the local dir.

    (Two files that must sit side by side, so not ``storage.local_copy``, which caches single files.)
    """
    url = where.url
    local = os.path.join(cache_dir, "vae", hashlib.sha256(url.encode()).hexdigest()[:16])
    fs, root = storage.filesystem(where, operation="read")
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        src = storage.join(where, name)
        dst = os.path.join(local, name)
        try:
            size = fs.size(storage.join(root, name))
        except FileNotFoundError:
            raise WeightsError(_missing_message(url, name)) from None
        if os.path.exists(dst) and os.path.getsize(dst) == size:
            continue  # same file already cached (size check: the copy itself is atomic)
        logger.info("vae: copying %s to %s", src, dst)
        storage.write_bytes_atomic(dst, storage.read_bytes(src))
    return local


def _missing_message(url: str, name: str) -> str:
    return (
        f"vae weights folder {url!r}: {name} not found. Expected a diffusers-format folder with "
        f"{CONFIG_FILE} and {WEIGHTS_FILE} (e.g. a copy of huggingface.co/stabilityai/sd-vae-ft-mse)"
    )


def _load_folder(local_dir: str, url: str) -> nn.Module:
    from diffusers import AutoencoderKL

    if not os.path.isdir(local_dir):
        raise WeightsError(f"vae weights folder {url!r} not found (no such directory)")
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        if not os.path.isfile(os.path.join(local_dir, name)):
            raise WeightsError(_missing_message(url, name))
    config = json.loads(Path(local_dir, CONFIG_FILE).read_text())
    if config.get("_class_name", "AutoencoderKL") != "AutoencoderKL":
        raise WeightsError(
            f"vae weights folder {url!r}: config is a {config['_class_name']}, not an AutoencoderKL"
        )
    try:
        return AutoencoderKL.from_pretrained(local_dir, local_files_only=True, use_safetensors=True)
    except Exception as e:
        raise WeightsError(f"vae weights folder {url!r} could not be loaded: {str(e).splitlines()[0]}") from e


def build_vae(
    name: str = "sd-vae-ft-mse",
    weights_url: str | storage.Location | None = None,
    *,
    config_overrides: Mapping[str, Any] | None = None,
    allow_download: bool = False,
    cache_dir: str | None = None,
) -> VAE:
    """Build the VAE ``name`` (``sd-vae-ft-mse``, ``sd-vae-ft-ema`` or ``none``).

    weights_url: diffusers-format folder as a local path, ``file://`` or remote fsspec URL, or a
        ``repa.storage.Location`` (URL + fsspec options); remote folders are copied to ``cache_dir``
        (default ``repa.storage.cache_dir()``); a hub id such as
        ``stabilityai/sd-vae-ft-mse`` only with ``allow_download=True``. None: random init from
        ``SD_VAE_CONFIG`` (+ ``config_overrides``, e.g. a tiny test VAE) with a WARNING.
    """
    _check_name(name)
    where = weights_url if isinstance(weights_url, storage.Location) else None
    if where is None and weights_url:
        where = storage.Location(weights_url)
    weights_url = where.url if where is not None and where.url else None
    if name == "none":
        if weights_url or config_overrides:
            raise ValueError("vae 'none' (identity) takes no weights_url or config_overrides")
        return VAE("none", None)

    from diffusers import AutoencoderKL

    if weights_url is None:
        config = {**SD_VAE_CONFIG, **(config_overrides or {})}
        allowed = set(inspect.signature(AutoencoderKL.__init__).parameters) - {"self"}
        unknown = {k for k in config if not k.startswith("_")} - allowed
        if unknown:
            raise ValueError(f"vae config_overrides: unknown AutoencoderKL arguments {sorted(unknown)}")
        logger.warning(
            "vae %s: no weights_url given, using RANDOM weights. Latents and decoded images are "
            "meaningless; set vae.weights_url to a diffusers folder (config.json + %s), e.g. a copy of "
            "huggingface.co/%s on local disk, s3:// or gs://.",
            name,
            WEIGHTS_FILE,
            HUB_IDS[name],
        )
        return VAE(name, AutoencoderKL.from_config(config))

    if config_overrides:
        raise ValueError(
            "vae config_overrides only apply to random init (weights_url=None); the folder has its config"
        )
    local = storage.local_path(weights_url)
    if local is not None and not os.path.exists(local) and _looks_like_hub_id(weights_url):
        if not allow_download:
            raise WeightsError(
                f"vae weights_url {weights_url!r} is not a local folder; repa never downloads silently: "
                f"stage it with `repa weights fetch DEST` or name it as hf://{weights_url} (read through the "
                "Hugging Face cache)"
            )
        logger.info("vae: downloading %s from the Hugging Face hub", weights_url)
        return VAE(
            name, AutoencoderKL.from_pretrained(weights_url, use_safetensors=True), weights_url=weights_url
        )
    if local is None:
        local = _fetch_folder(where, cache_dir or storage.cache_dir())
    return VAE(name, _load_folder(local, weights_url), weights_url=weights_url, local_dir=local)


def _looks_like_hub_id(s: str) -> bool:
    parts = s.split("/")
    return len(parts) == 2 and all(parts) and not s.startswith((".", "/", "~"))
