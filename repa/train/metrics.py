"""What the training loop reports: throughput, MFU, losses and health counters to the log and TensorBoard
on the ``log.*`` cadences, and sample grids (rank 0 only; the other ranks report nothing).

The :class:`MetricsProcessor` owns the TensorBoard writer: it opens it at the start (``purge_step`` after
a resume, so events of steps trained again are dropped) and opens it again after a health rollback, so
the abandoned timeline's events disappear from the curves.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from repa import runtime as D
from repa.config import RunConfig
from repa.tensorboard import TensorBoardLogger
from repa.train.health import HealthGuard
from repa.train.throughput import Throughput, gpu_memory_gib

log = logging.getLogger(__name__)


def flops_per_image(model: nn.Module, model_args: dict[str, Any], encoders: nn.ModuleList) -> float:
    """Training FLOPs per image: 3x the SiT forward (forward + backward) plus the frozen encoders'
    forward (repa/flops.py), the numerator of MFU."""
    from repa.flops import sit_forward_flops, vit_forward_flops

    total = 3 * sit_forward_flops(
        input_size=model_args["input_size"],
        patch_size=model.patch_size,
        in_channels=model.in_channels,
        hidden_size=model.hidden_size,
        depth=model.depth,
        mlp_ratio=model.blocks[0].mlp.fc1.out_features / model.hidden_size,
        z_dims=model_args["z_dims"],
        projector_dim=model_args["projector_dim"],
    )
    for enc in encoders:
        vit = getattr(enc, "model", None)
        if vit is not None and hasattr(vit, "blocks"):
            patch = vit.patch_embed.patch_size
            total += vit_forward_flops(
                image_size=enc.input_size,
                patch_size=patch[0] if isinstance(patch, tuple) else patch,
                embed_dim=enc.embed_dim,
                depth=len(vit.blocks),
                prefix_tokens=getattr(vit, "num_prefix_tokens", 1),
            )
    return total


@dataclass
class MetricsProcessor:
    """Per-step reporting of one process (a no-op except on rank 0)."""

    cfg: RunConfig
    info: D.DistInfo
    health: HealthGuard
    lr: Callable[[], float]
    flops_per_image: float
    num_samples: int  # per epoch (the manifest's), for the log line's epoch column
    sample_grid: Callable[[], torch.Tensor]
    meter: Throughput = field(default_factory=Throughput)
    tb: TensorBoardLogger | None = None

    # ------------------------------------------------------------------ the writer
    def open(self, step: int, resumed: bool) -> None:
        """Open TensorBoard (rank 0, ``log.tensorboard``); the config text and custom-scalars layout."""
        self.meter = Throughput()
        if self.info.is_main and self.cfg.log.tensorboard:
            self.tb = self._writer(purge_step=step + 1 if resumed else None)
            self.tb.run_started(self.cfg, step)

    def reopen(self, step: int) -> None:
        """After a rollback to ``step``: drop the events of the abandoned steps."""
        if self.tb is not None:
            self.tb.close()
            self.tb = self._writer(purge_step=step + 1)

    def _writer(self, purge_step: int | None) -> TensorBoardLogger:
        run = self.cfg.storage.locate(self.cfg.storage.run_url)
        return TensorBoardLogger(run.join("tensorboard"), purge_step=purge_step)

    def close(self, *, upload: bool = True) -> None:
        if self.tb is not None:
            tb, self.tb = self.tb, None
            tb.close(upload=upload)

    # ------------------------------------------------------------------ per step
    def step_end(self, step: int, metrics: dict[str, float], samples_consumed: int, *, last: bool) -> None:
        """An applied step: its metrics enter the window; log, sample grids and flushes on their
        cadences. ``last`` (the run's last step, or the step a stop commits) always logs, so every
        trained and committed step has its scalars."""
        cfg = self.cfg
        self.meter.update(cfg.train.global_batch_size, metrics)
        if last or step % cfg.log.every_steps == 0:
            self._log(step, samples_consumed)
        if self.tb is not None and cfg.log.sample_every_steps and step % cfg.log.sample_every_steps == 0:
            self.tb.image(f"samples/{cfg.log.sample_weights}", self.sample_grid(), step)
        if self.tb is not None and step % cfg.log.tensorboard_flush_every_steps == 0:
            self.tb.flush()

    def scalars(self, values: dict[str, float | None], step: int) -> None:
        if self.tb is not None:
            self.tb.scalars(values, step)

    def _log(self, step: int, samples_consumed: int) -> None:
        summary = self.meter.summary()
        if not self.info.is_main:
            return
        from repa.flops import mfu

        images_per_second = summary.pop("images_per_second")
        scalars = {f"train/{k}": v for k, v in summary.items()}
        scalars["train/lr"] = self.lr()
        scalars["perf/images_per_second"] = images_per_second
        scalars.update(self.health.scalars())
        max_steps = self.cfg.train.max_steps
        steps_per_second = images_per_second / self.cfg.train.global_batch_size
        eta = (max_steps - step) / steps_per_second if steps_per_second > 0 else None
        scalars["progress/step_of_max"] = step / max_steps
        scalars["progress/eta_hours"] = None if eta is None else eta / 3600
        if self.info.device.type == "cuda":
            scalars["perf/gpu_memory_gib"] = gpu_memory_gib(self.info.device)
            scalars["perf/mfu"] = mfu(
                self.flops_per_image,
                images_per_second,
                self.info.world_size,
                torch.cuda.get_device_name(self.info.device),
            )
        self.scalars(scalars, step)
        epoch = samples_consumed / max(self.num_samples, 1)
        eta_text = "?" if eta is None else f"{int(eta // 3600)}h{int(eta % 3600 // 60):02d}m"
        log.info(
            "step %8d of %d %5.1f%% | ETA %s | epoch %6.2f | loss %.4f | den %.4f | proj %.4f | grad %.3f"
            " | %8.1f img/s",
            step,
            max_steps,
            100 * step / max_steps,
            eta_text,
            epoch,
            summary["loss"],
            summary["denoising_loss"],
            summary["projection_loss"],
            summary["grad_norm"],
            images_per_second,
        )


@torch.no_grad()
def sample_grid(
    cfg: RunConfig, model: nn.Module, num_classes: int, device: torch.device, vae: nn.Module
) -> torch.Tensor:
    """Grid for TensorBoard; fixed noise and labels, comparable across steps."""
    from torchvision.utils import make_grid

    from repa.sampling import sample

    n = cfg.log.sample_num_images
    gen = torch.Generator().manual_seed(cfg.train.seed)
    z = torch.randn(n, model.in_channels, model.input_size, model.input_size, generator=gen).to(device)
    y = (torch.arange(n) % num_classes).to(device)
    model.eval()
    latents = sample(
        model,
        z,
        y,
        sampler=cfg.log.sample_sampler,
        num_steps=cfg.log.sample_num_steps,
        cfg_scale=cfg.log.sample_cfg_scale,
        path_type=cfg.objective.path_type,
    ).float()
    images = vae.decode_to_uint8(latents, cfg.vae.latents_scale, cfg.vae.latents_bias)
    return make_grid(images.cpu(), nrow=math.ceil(math.sqrt(n)))
