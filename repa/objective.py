"""The REPA training objective: flow-matching (velocity) loss + representation alignment.

Follows the official REPA ``loss.py`` ``SILoss`` and ``train.py`` (REPA §3.2, Eqs. 7-8):

    x_t = alpha_t x + sigma_t eps,          v_target = d_alpha_t x + d_sigma_t eps     (t=0 data, t=1 noise)
    denoising_b = mean_{C,H,W} (v_pred_b - v_target_b)^2
    projection  = - mean_{encoders, batch, tokens} cos(z_target, z_proj)
    total       = mean_b denoising_b + proj_coeff * projection

Pure: imports torch only; every random draw is injectable (``t=``, ``noise=``) or comes from ``generator=``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F

PathType = Literal["linear", "cosine"]
TimeSampling = Literal["uniform", "lognormal"]
PATH_TYPES: tuple[str, ...] = ("linear", "cosine")
TIME_SAMPLINGS: tuple[str, ...] = ("uniform", "lognormal")


def interpolant(
    path_type: str, t: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(alpha_t, sigma_t, d alpha_t/dt, d sigma_t/dt)`` of the interpolant ``x_t = alpha x + sigma eps``.

    linear (SiT/REPA default): alpha = 1 - t, sigma = t.
    cosine (GVP):              alpha = cos(pi t / 2), sigma = sin(pi t / 2).
    """
    if path_type == "linear":
        return 1 - t, t, -torch.ones_like(t), torch.ones_like(t)
    if path_type == "cosine":
        half_pi = math.pi / 2
        return (
            torch.cos(t * half_pi),
            torch.sin(t * half_pi),
            -half_pi * torch.sin(t * half_pi),
            half_pi * torch.cos(t * half_pi),
        )
    raise ValueError(f"path_type={path_type!r}: expected one of {PATH_TYPES}")


def sample_time(
    batch_size: int,
    time_sampling: str = "uniform",
    path_type: str = "linear",
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Training times, shape (B, 1, 1, 1) in [0, 1); one RNG call, as the reference (its ``--weighting``).

    uniform:   t ~ U[0, 1).
    lognormal: sigma = exp(N(0, 1)) (EDM-style), mapped to the t whose path has that noise-to-signal
               ratio: t = sigma / (1 + sigma) (linear), t = 2/pi atan(sigma) (cosine).
    """
    shape = (batch_size, 1, 1, 1)
    if device is None:
        device = generator.device if generator is not None else "cpu"
    if time_sampling == "uniform":
        return torch.rand(shape, generator=generator, device=device)
    if time_sampling == "lognormal":
        sigma = torch.randn(shape, generator=generator, device=device).exp()
        if path_type == "linear":
            return sigma / (1 + sigma)
        if path_type == "cosine":
            return 2 / math.pi * torch.atan(sigma)
        raise ValueError(f"path_type={path_type!r}: expected one of {PATH_TYPES}")
    raise ValueError(f"time_sampling={time_sampling!r}: expected one of {TIME_SAMPLINGS}")


def negative_cosine(z_target: torch.Tensor, z_proj: torch.Tensor) -> torch.Tensor:
    """Per-sample ``-mean_tokens cos(z_target, z_proj)``: (B, T, D) x 2 -> (B,).

    Normalised in float32 whatever the input dtype: in fp16 the squared norm overflows (or underflows
    and the 1e-12 eps rounds to 0), and the reference's loss turned NaN (REPA issue #46).
    """
    z_target = F.normalize(z_target.float(), dim=-1)  # (B, T, D)
    z_proj = F.normalize(z_proj.float(), dim=-1)  # (B, T, D)
    return -(z_target * z_proj).sum(dim=-1).mean(dim=-1)  # (B,)


@dataclass
class LossOutput:
    """Result of one ``REPALoss`` call. Scalars are 0-d tensors; ``total`` carries the gradient."""

    total: torch.Tensor
    """denoising + proj_coeff * projection (projection only while alignment is active)."""
    denoising: torch.Tensor
    """Mean over the batch of ``denoising_per_sample``."""
    denoising_per_sample: torch.Tensor
    """(B,) mean over C, H, W of the squared velocity error."""
    projection: torch.Tensor
    """Negative cosine similarity averaged over encoders, batch and tokens; 0 without targets."""
    alignment: torch.Tensor
    """Mean cosine similarity (= -projection), detached, for logging; NaN without targets (a tensor
    either way, so logging code can stack and all-reduce it unconditionally)."""
    v_pred: torch.Tensor
    """(B, C, H, W) model output."""
    zs_proj: list[torch.Tensor]
    """One (B, T, z_dim) projector output per encoder (empty for a vanilla SiT)."""
    t: torch.Tensor
    """(B,) times used."""
    x_t: torch.Tensor
    """(B, C, H, W) model input."""


class REPALoss:
    """Flow-matching loss with REPA's projection term.

    ``proj_coeff`` is lambda (paper: 0.5). ``align_until_step`` = N: the first N optimiser updates use
    the alignment loss, the rest do not (its value is still reported, without gradient). ``step`` is the
    0-based index of the update being computed (the number of updates already applied), so alignment is
    active while ``step < N``; N = 0 never aligns.
    ``time_sampling`` is the reference's ``--weighting`` (a misnomer: it changes sampling, not weights).
    """

    def __init__(
        self,
        path_type: PathType = "linear",
        time_sampling: TimeSampling = "uniform",
        proj_coeff: float = 0.5,
        align_until_step: int | None = None,
    ) -> None:
        if path_type not in PATH_TYPES:
            raise ValueError(f"path_type={path_type!r}: expected one of {PATH_TYPES}")
        if time_sampling not in TIME_SAMPLINGS:
            raise ValueError(f"time_sampling={time_sampling!r}: expected one of {TIME_SAMPLINGS}")
        if not math.isfinite(proj_coeff) or proj_coeff < 0:
            raise ValueError(f"proj_coeff={proj_coeff!r}: must be a finite number >= 0")
        if align_until_step is not None and align_until_step < 0:
            raise ValueError(f"align_until_step={align_until_step!r}: must be >= 0 or None")
        self.path_type = path_type
        self.time_sampling = time_sampling
        self.proj_coeff = float(proj_coeff)
        self.align_until_step = align_until_step

    def alignment_active(self, step: int | None) -> bool:
        """Whether the projection term enters ``total`` for update ``step`` (0-based: updates done so far)."""
        if self.proj_coeff == 0:
            return False
        if self.align_until_step is None:
            return True
        if step is None:
            raise ValueError("REPALoss: align_until_step is set, so pass step= (the optimiser step)")
        return step < self.align_until_step

    def __call__(
        self,
        model: nn.Module,
        x: torch.Tensor,
        y: torch.Tensor,
        zs_target: Sequence[torch.Tensor] | None = None,
        *,
        t: torch.Tensor | None = None,
        noise: torch.Tensor | None = None,
        step: int | None = None,
        generator: torch.Generator | None = None,
    ) -> LossOutput:
        """One loss evaluation. ``x`` (B, C, H, W) clean latents, ``y`` (B,) labels, ``zs_target`` one
        (B, T, z_dim) clean-image feature tensor per projector (None or [] = vanilla SiT).

        Draw order when not injected (the reference's): ``t`` (on ``generator``'s device, else the CPU
        global RNG), then ``noise`` (``generator``, else ``randn_like(x)``); label dropout follows in the
        model's forward.
        """
        if x.ndim != 4:
            raise ValueError(f"REPALoss x: expected (B, C, H, W) latents, got shape {tuple(x.shape)}")
        B = x.shape[0]
        zs_target = list(zs_target) if zs_target is not None else []

        # Times, then noise: the reference's RNG order.
        if t is None:
            t = sample_time(B, self.time_sampling, self.path_type, generator=generator)
        elif t.numel() != B or t.ndim not in (1, 4):
            raise ValueError(f"REPALoss t: expected shape ({B},) or ({B}, 1, 1, 1), got {tuple(t.shape)}")
        t = t.reshape(B, 1, 1, 1).to(device=x.device, dtype=x.dtype)  # (B, 1, 1, 1)
        if noise is None:
            if generator is None:
                noise = torch.randn_like(x)
            else:
                noise = torch.randn(x.shape, generator=generator, device=generator.device, dtype=x.dtype)
        elif noise.shape != x.shape:
            raise ValueError(
                f"REPALoss noise: expected shape {tuple(x.shape)} (as x), got {tuple(noise.shape)}"
            )
        noise = noise.to(device=x.device, dtype=x.dtype)

        alpha, sigma, d_alpha, d_sigma = interpolant(self.path_type, t)
        x_t = alpha * x + sigma * noise  # (B, C, H, W)
        v_target = d_alpha * x + d_sigma * noise  # (B, C, H, W)

        v_pred, zs_proj = model(x_t, t.flatten(), y)  # (B, C, H, W), [(B, T, z_i)]
        if v_pred.shape != x.shape:
            raise ValueError(f"REPALoss: model output {tuple(v_pred.shape)} != x shape {tuple(x.shape)}")
        # mean_flat: per-sample mean over C, H, W; float32 so a half-precision output cannot overflow.
        denoising_per_sample = (v_pred.float() - v_target.float()).pow(2).mean(dim=(1, 2, 3))  # (B,)
        denoising = denoising_per_sample.mean()

        if zs_target:
            _check_features(zs_target, zs_proj, B)
            active = self.alignment_active(step)
            with torch.set_grad_enabled(torch.is_grad_enabled() and active):
                projection = torch.stack([negative_cosine(z, zp).mean() for z, zp in zip(zs_target, zs_proj)])
                projection = projection.mean()  # mean over encoders of mean over batch & tokens
            alignment = -projection.detach()
            total = denoising + self.proj_coeff * projection if active else denoising
        else:
            projection = denoising.new_zeros(())
            alignment = denoising.new_full((), float("nan")).detach()
            total = denoising

        return LossOutput(
            total=total,
            denoising=denoising,
            denoising_per_sample=denoising_per_sample,
            projection=projection,
            alignment=alignment,
            v_pred=v_pred,
            zs_proj=list(zs_proj),
            t=t.flatten(),
            x_t=x_t,
        )


def _check_features(zs_target: list[torch.Tensor], zs_proj: Sequence[torch.Tensor], batch_size: int) -> None:
    """One target per projector, same (B, T, z_dim) shape; errors name the index and both shapes."""
    if len(zs_target) != len(zs_proj):
        raise ValueError(
            f"REPALoss: {len(zs_target)} target feature tensor(s) given but the model has {len(zs_proj)} "
            "projector(s) (one per encoder; a model with encoder_depth=0 or empty z_dims has none)"
        )
    for i, (z, zp) in enumerate(zip(zs_target, zs_proj)):
        if z.ndim != 3 or z.shape[0] != batch_size or z.shape != zp.shape:
            raise ValueError(
                f"REPALoss zs_target[{i}]: expected shape {tuple(zp.shape)} (B, tokens, z_dim of projector "
                f"{i}), got {tuple(z.shape)}"
            )
