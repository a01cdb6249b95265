"""`repa train`: the REPA training loop, standalone or under torchrun (elastic, c10d).

One optimiser step, as the reference ``train.py`` (sihyun-yu/REPA; docs/architecture.md):

    x   = (mean + std * eps) * 0.18215            posterior sample of the stored VAE moments
    zs  = encoder(image)                           frozen encoder features of the clean image
    L   = denoising + proj_coeff * projection      repa.objective.REPALoss
    AdamW step after clipping the grad norm to max_grad_norm; EMA (fp32) every step.

Design choices that make restarts exact and elastic:
- Randomness is a function of progress: before each micro-batch the global RNG is seeded from
  (seed, step, rank, micro-batch) (edm2's approach), so resuming needs no RNG blobs and a resumed
  run draws exactly what the uninterrupted run drew.
- The data position is ``samples_consumed`` (global), stored in every checkpoint with the reader's
  order settings (``data.seed``, ``shards_in_flight``, ``chunk_size``); the reader maps it to shards
  and offsets for any world size, and a resume whose order settings changed is refused.
- Every process resumes from the newest *committed* checkpoint found at start (rank 0 looks,
  all ranks load the same one), so a torchrun restart after a member died simply continues.
- Before every update the health guard (``repa.train.health``, docs/training-health.md) judges the
  step from the same all-reduced loss and grad norm on every rank: a non-finite or spiking step is
  skipped (no AdamW, no EMA), repeated ones roll back to the checkpoint before them past the bad data,
  and too many rollbacks stop the run with exit code 3. ``self.step`` counts applied updates.
- All ranks stop at the same step (they run in lock-step), so the elastic PyTorchJob, which
  succeeds as soon as ANY worker exits 0, only succeeds when the run is really finished. A
  preempted run (SIGTERM) commits a checkpoint and exits 143, never 0.

Production faults (docs/kubernetes.md, "Preemption and restarts"):
- Saves do not stall training: rank 0 copies the state to CPU and a background thread serializes,
  uploads and commits it (``repa.checkpoint.BackgroundSaver``); a later save, the end of the run and
  SIGTERM wait for it. No rank waits in a collective with the process-group timeout for an upload:
  waits happen in a barrier of a gloo group whose timeout covers the storage deadline. A failed upload
  (after the storage retries) stops every rank at the next step (exit code 4).
- Resume loads the newest checkpoint that verifies against ``COMMITTED``; broken ones are quarantined
  (``repa.checkpoint.load_latest_verified``); rank 0 chooses, every rank loads that one.
- Rank 0 holds the run's lease (``repa.lease``) from before its first write to exit.
- On a storage failure the cleanup (TensorBoard upload, lease removal) is skipped, so the error that
  ends the run is the first one, not a later one of the cleanup.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import math
import signal
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import numpy as np
import torch
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel

from repa import checkpoint as ckpt
from repa import runtime as D
from repa import storage
from repa.config import ConfigError, RunConfig, TrainConfig, add_config_arguments, config_from_args
from repa.data.format import Manifest
from repa.lease import Lease, LeaseError
from repa.tensorboard import TensorBoardLogger
from repa.train.ema import make_ema, update_ema
from repa.train.health import HEALTH_EXIT_CODE, BadStep, HealthGuard
from repa.train.throughput import Throughput, gpu_memory_gib

log = logging.getLogger(__name__)

PREEMPTED_EXIT_CODE = 143  # 128 + SIGTERM: the operator recreates the pod; 0 would end the job


@dataclass(frozen=True)
class BatchGeometry:
    """How the global batch is split: global = micro_batch x accumulation x world_size."""

    global_batch_size: int
    world_size: int
    micro_batch: int
    accumulation: int

    @staticmethod
    def from_config(train: TrainConfig, world_size: int) -> BatchGeometry:
        micro, accumulation = train.batch_plan(world_size)
        return BatchGeometry(train.global_batch_size, world_size, micro, accumulation)

    def describe(self) -> str:
        return (
            f"images/step {self.global_batch_size} = {self.micro_batch} per micro-batch x "
            f"{self.accumulation} accumulation x {self.world_size} processes"
        )


def step_seed(seed: int, step: int, rank: int, micro: int) -> int:
    """A well-mixed 63-bit seed for one micro-batch (numpy's SeedSequence hashes the tuple)."""
    return int(np.random.SeedSequence([seed, step, rank, micro]).generate_state(2, dtype=np.uint64)[0] >> 1)


class _Preemption:
    """Records SIGTERM; the loop checks it at step boundaries and every rank agrees before stopping."""

    def __init__(self) -> None:
        self.requested = False

    def install(self) -> None:
        def handler(signum: int, frame: Any) -> None:
            log.warning(
                "received signal %d: will commit a checkpoint at the end of this step and exit", signum
            )
            self.requested = True

        signal.signal(signal.SIGTERM, handler)


def check_inputs(cfg: RunConfig) -> Manifest:
    """Everything that can fail cheaply fails here, before the process group, models or data.

    Runs before ``init_distributed``: under torchrun a bad config then costs each (pointless)
    restart a second, not a process-group timeout.
    """
    from repa.data.format import read_manifest

    cfg.require_for("train")
    try:
        manifest = read_manifest(cfg.data.url, cfg.data.storage_options or None)
    except (FileNotFoundError, ValueError) as e:
        raise ConfigError("data.url", str(e)) from e
    if manifest.vae is None:
        raise ConfigError("data.url", f"{cfg.data.url} has no latents yet; run `repa prepare latents` first")
    if manifest.vae != cfg.vae.name:
        raise ConfigError(
            "vae.name", f"{cfg.vae.name!r}, but the latents in {cfg.data.url} were made with {manifest.vae!r}"
        )
    if manifest.resolution != cfg.data.resolution:
        raise ConfigError(
            "data.resolution",
            f"{cfg.data.resolution}, but {cfg.data.url} holds {manifest.resolution}px images",
        )
    if manifest.num_classes > cfg.model.num_classes:
        raise ConfigError(
            "model.num_classes", f"{cfg.model.num_classes} < {manifest.num_classes} classes in the data"
        )
    channels, side, _ = cfg.latent_shape()
    if tuple(manifest.moments_shape) != (2 * channels, side, side):
        raise ConfigError(
            "data.url",
            f"{cfg.data.url} holds moments of shape {tuple(manifest.moments_shape)}, but vae.name="
            f"{cfg.vae.name!r} at data.resolution={cfg.data.resolution} gives {(2 * channels, side, side)}",
        )
    _check_encoders(cfg)
    # The same Locations (URL + storage.storage_options) are used to load the weights in Trainer.build.
    for i, url in enumerate(cfg.encoder.weights_urls):
        if url and not storage.exists(cfg.storage.locate(url)):
            raise ConfigError(f"encoder.weights_urls[{i}]", f"{url} does not exist")
    if cfg.vae.weights_url and not storage.exists(cfg.storage.locate(cfg.vae.weights_url)):
        raise ConfigError("vae.weights_url", f"{cfg.vae.weights_url} does not exist")
    return manifest


def _check_encoders(cfg: RunConfig) -> None:
    """Encoder names and ``encoder.model_kwargs`` that timm rejects fail here, naming the key."""
    from repa.encoders import UnknownEncoderError, check_encoder

    for i, name in enumerate(cfg.encoder.names):
        try:
            check_encoder(name, cfg.data.resolution, cfg.encoder.kwargs(i))
        except UnknownEncoderError as e:
            raise ConfigError(f"encoder.names[{i}]", str(e)) from None
        except ValueError as e:
            raise ConfigError(f"encoder.model_kwargs[{i}]", str(e)) from None


class UploadFailedError(storage.StorageError):
    """Rank 0's background checkpoint upload failed; raised on the other ranks (rank 0 raises the cause)."""


class Trainer:
    def __init__(self, cfg: RunConfig, info: D.DistInfo, manifest: Manifest):
        self.cfg = cfg
        self.manifest = manifest
        self.info = info
        self.device = info.device
        self.geometry = BatchGeometry.from_config(cfg.train, info.world_size)
        self.storage_options = cfg.storage.storage_options or None
        self.step = 0
        self.samples_consumed = 0
        self.resumed_reader_state: dict[str, Any] | None = None
        self.preemption = _Preemption()
        self.health = HealthGuard(cfg.health)
        self.saver = ckpt.BackgroundSaver()
        self._snapshot_pool: dict[tuple, torch.Tensor] = {}
        self.lease: Lease | None = None
        self._wait_group: Any = None  # gloo group for barriers that wait on uploads (see _wait_barrier)

    # ------------------------------------------------------------------ set-up
    def check_run_url_writable(self) -> None:
        """Rank 0 writes (and removes) a probe object, takes the run's lease and records the resolved
        config beside the run; every rank learns the outcome (so none waits in a collective for a
        rank 0 that failed)."""
        failure: tuple[str, str] | None = None
        error: Exception | None = None
        if self.info.is_main:
            try:
                self._probe_and_lease()
            except (ConfigError, LeaseError, storage.StorageError) as e:
                error = e
                kind = (
                    "config" if isinstance(e, ConfigError) else "lease" if isinstance(e, LeaseError) else "io"
                )
                failure = (kind, str(e))
        failure = D.broadcast_object(self.info, failure)
        if error is not None:
            raise error
        if failure is not None:  # rank 0 failed; the others end with its message
            kind, message = failure
            if kind == "config":
                raise ConfigError(message)
            if kind == "lease":
                raise LeaseError(message)
            raise storage.StorageError(message, operation="(rank 0)")

    def _probe_and_lease(self) -> None:
        cfg = self.cfg
        probe = storage.join(cfg.storage.run_url, f".write-probe-{uuid.uuid4().hex}")
        try:
            storage.write_bytes_atomic(probe, b"ok", self.storage_options)
            storage.remove(probe, storage_options=self.storage_options)
        except storage.StorageError:
            raise
        except Exception as e:
            raise ConfigError("storage.run_url", f"{cfg.storage.run_url} is not writable: {e}") from e
        lease = Lease(
            storage.Location(cfg.storage.run_url, self.storage_options or {}),
            stale_seconds=cfg.storage.lease_stale_seconds,
            renew_seconds=cfg.storage.lease_renew_seconds,
            conditional_writes=cfg.storage.lease_conditional_writes,
        )
        lease.acquire()
        self.lease = lease
        storage.write_bytes_atomic(
            storage.join(cfg.storage.run_url, "config.yaml"), cfg.to_yaml().encode(), self.storage_options
        )

    def build(self) -> None:
        from repa.encoders import build_encoder
        from repa.models import build_model
        from repa.objective import REPALoss

        cfg = self.cfg
        torch.manual_seed(cfg.train.seed)  # identical initial weights on every rank (DDP also broadcasts)
        D.enable_tf32(self.device, cfg.train.allow_tf32)
        self.encoders = nn.ModuleList(
            build_encoder(
                name,
                weights_url=cfg.storage.locate(cfg.encoder.weights_url(i)),
                resolution=cfg.data.resolution,
                model_kwargs=cfg.encoder.kwargs(i),
            )
            for i, name in enumerate(cfg.encoder.names)
        ).to(self.device)
        self.model_args = ckpt.model_kwargs(cfg, [enc.embed_dim for enc in self.encoders])
        model_name = self.model_args["model"]
        self.raw_model = build_model(
            model_name, **{k: v for k, v in self.model_args.items() if k != "model"}
        ).to(self.device)
        self.ema = make_ema(self.raw_model)
        self.model: nn.Module = self.raw_model
        if self.info.distributed:
            # Projectors get no gradient once alignment stops (align_until_step) or when proj_coeff is 0;
            # DDP must then be told to expect unused parameters, or it raises at the next step.
            projectors_may_idle = bool(cfg.encoder.names) and (
                cfg.objective.align_until_step is not None or cfg.objective.proj_coeff == 0
            )
            self.model = DistributedDataParallel(
                self.raw_model,
                device_ids=[self.device.index] if self.device.type == "cuda" else None,
                find_unused_parameters=projectors_may_idle,
            )
        if cfg.train.compile:
            self.model = torch.compile(self.model)
        self.optimizer = torch.optim.AdamW(
            [p for p in self.raw_model.parameters() if p.requires_grad],
            lr=cfg.train.lr,
            betas=(cfg.train.adam_beta1, cfg.train.adam_beta2),
            eps=cfg.train.adam_eps,
            weight_decay=cfg.train.weight_decay,
            # fused kernel on CUDA; multi-tensor on CPU (1.27x faster step than the per-parameter loop,
            # docs/benchmarks.md "Training step on CPU")
            **({"fused": True} if self.device.type == "cuda" else {"foreach": True}),
        )
        self.loss_fn = REPALoss(
            path_type=cfg.objective.path_type,
            time_sampling=cfg.objective.time_sampling,
            proj_coeff=cfg.objective.proj_coeff,
            align_until_step=cfg.objective.align_until_step,
        )
        self.flops_per_image = self._flops_per_image()

    def _flops_per_image(self) -> float:
        from repa.flops import sit_forward_flops, vit_forward_flops

        m = self.raw_model
        total = 3 * sit_forward_flops(
            input_size=self.model_args["input_size"],
            patch_size=m.patch_size,
            in_channels=m.in_channels,
            hidden_size=m.hidden_size,
            depth=m.depth,
            mlp_ratio=m.blocks[0].mlp.fc1.out_features / m.hidden_size,
            z_dims=self.model_args["z_dims"],
            projector_dim=self.model_args["projector_dim"],
        )
        for enc in self.encoders:
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

    def autocast(self) -> contextlib.AbstractContextManager:
        return D.autocast(self.device, self.cfg.train.precision)

    # ------------------------------------------------------------------ checkpoints
    def _fence(self) -> None:
        """Right before a visible write: this process must still hold the run's lease (rank 0)."""
        if self.lease is not None:
            self.lease.check_held()

    def resume(self) -> ckpt.CheckpointRef | None:
        """Load the newest committed checkpoint that verifies (rank 0 chooses, quarantining broken
        ones; every rank loads the chosen one, verified again)."""
        state: dict[str, Any] | None = None
        ref: ckpt.CheckpointRef | None = None
        if self.info.is_main:
            ref, state = ckpt.load_latest_verified(
                self.cfg.storage.run_url, self.storage_options, fence=self._fence
            )
        ref = D.broadcast_object(self.info, ref)
        if ref is None:
            return None
        if state is None:
            state = ckpt.load_checkpoint_state(ref, self.storage_options)
        self.raw_model.load_state_dict(state["model"], strict=True)
        self.ema.load_state_dict(state["ema"], strict=True)
        self.optimizer.load_state_dict(state["optimizer"])
        self.health.load_state_dict(state.get("health"))
        self.step = int(state["step"])
        self.samples_consumed = int(state["reader"]["samples_consumed"])
        self.resumed_reader_state = dict(state["reader"])
        log.info("resumed from %s (step %d, %d samples consumed)", ref.url, self.step, self.samples_consumed)
        return ref

    def save(self, *, wait: bool = False) -> None:
        """Checkpoint this step: rank 0 snapshots the state to CPU and uploads it in the background
        (``wait``: and blocks until it is committed). Every rank then meets in a barrier without the
        process-group timeout, so a slow upload of the previous save never times out the others."""
        if self.info.is_main:
            self.saver.wait()  # the previous upload must be committed (its error raised) first
            state = {
                "model": self.raw_model.state_dict(),
                "ema": self.ema.state_dict(),
                "optimizer": self.optimizer.state_dict(),
                # position + the settings that define the data order (checked on resume)
                "reader": self.loader.state_dict(),
                "health": self.health.state_dict(),  # running statistics, counters, skipped samples
                # RNG is reseeded from (train.seed, step, rank, micro-batch) every micro-batch, so the
                # step is the whole RNG state; recorded here so a reader of the file knows.
                "rng": {"scheme": "per-micro-batch reseed", "seed": self.cfg.train.seed},
                "config": self.cfg.to_dict(),
                "world_size": self.info.world_size,
            }
            snapshot = ckpt.cpu_snapshot(state, self._snapshot_pool)
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)  # the pinned copies are complete
            step, cfg, options, fence = self.step, self.cfg, self.storage_options, self._fence
            reference_args = dict(self.model_args)

            def upload() -> ckpt.CheckpointRef:
                started = time.monotonic()
                ref = ckpt.save_checkpoint(
                    cfg.storage.run_url,
                    step,
                    snapshot,
                    snapshot["ema"] if cfg.checkpoint.export_ema else None,
                    reference_args,
                    options,
                    fence=fence,
                )
                ckpt.apply_retention(
                    cfg.storage.run_url,
                    cfg.checkpoint.keep_latest,
                    cfg.checkpoint.keep_every_steps,
                    options,
                    fence=fence,
                )
                log.info("checkpoint step %d saved in %.1f s", step, time.monotonic() - started)
                return ref

            self.saver.submit(step, upload)
            if wait:
                self.saver.wait()
        self._wait_barrier()

    def finish_saves(self) -> None:
        """Wait for the upload in flight (rank 0), then let every rank go on together."""
        if self.info.is_main:
            self.saver.wait()
        self._wait_barrier()

    def _wait_barrier(self) -> None:
        """A barrier of every rank whose timeout covers an upload (the storage deadline, x2 for the two
        files and the marker, plus a margin), not the process-group timeout meant for lost peers."""
        if not self.info.distributed:
            return
        import torch.distributed as dist

        if self._wait_group is None:
            seconds = 2 * self.cfg.storage.deadline_seconds + self.cfg.train.process_group_timeout_seconds
            self._wait_group = dist.new_group(backend="gloo", timeout=timedelta(seconds=seconds))
        dist.barrier(group=self._wait_group)

    def _agree(self, *flags: bool) -> list[bool]:
        """Each flag true on every rank if it is true on any (one all-reduce per step)."""
        if not self.info.distributed:
            return list(flags)
        import torch.distributed as dist

        device = self.device if self.device.type == "cuda" else "cpu"
        t = torch.tensor([1.0 if f else 0.0 for f in flags], device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return [bool(v > 0) for v in t.tolist()]

    # ------------------------------------------------------------------ data
    def make_loader(self) -> Any:
        """The rank's streaming loader at ``samples_consumed``; a resumed run's reader state must match
        this config's data order (ConfigError naming the key otherwise)."""
        from repa.data.reader import StreamingDataset, make_loader

        dataset = StreamingDataset(
            self.cfg.data.url,
            rank=self.info.rank,
            world_size=self.info.world_size,
            batch_size=self.geometry.micro_batch,
            seed=self.cfg.data.seed,
            samples_consumed=self.samples_consumed,
            shards_in_flight=self.cfg.data.shards_in_flight,
            chunk_size=self.cfg.data.chunk_size,
            storage_options=self.cfg.data.storage_options or None,
            manifest=self.manifest,
        )
        loader = make_loader(
            dataset,
            num_workers=self.cfg.data.num_workers,
            prefetch_factor=self.cfg.data.prefetch_factor,
            pin_memory=self.device.type == "cuda",
        )
        if self.resumed_reader_state is not None:
            try:
                loader.load_state_dict(self.resumed_reader_state)
            except ValueError as e:
                raise ConfigError(
                    f"cannot resume step {self.step} of {self.cfg.storage.run_url}: {e}"
                ) from None
        return loader

    def make_batches(self) -> Iterator[list[dict[str, torch.Tensor]]]:
        """Per-step lists of ``accumulation`` micro-batches from ``self.loader``.

        Each step starts at ``self.samples_consumed`` moved past the stream ranges never trained on
        (those the health guard skipped, and ``health.skip_sample_ranges``); when that is not where the
        loader stands (a skipped range, or a rollback reset the position), the loader restarts there.
        """
        iterator = None
        while True:
            position = self.health.next_position(self.samples_consumed, self.cfg.health.skip_sample_ranges)
            if position != self.loader.samples_consumed():
                self.loader.load_state_dict({"samples_consumed": position})
                iterator = None
            self.samples_consumed = position
            if iterator is None:
                iterator = iter(self.loader)
            yield [next(iterator) for _ in range(self.geometry.accumulation)]

    def _inject_fault(self, batch: dict[str, Any]) -> torch.Tensor:
        """``health.inject_sample_ranges`` (for tests): corrupt the moments of the samples at those stream
        positions, as a poisoned sample would (``health.inject_fault``)."""
        moments = batch["moments"]
        position = batch["position"]
        hit = torch.zeros_like(position, dtype=torch.bool)
        for start, end in self.cfg.health.inject_sample_ranges:
            hit |= (position >= start) & (position < end)
        if not hit.any():
            return moments
        moments = moments.clone()
        moments[hit] = float("nan") if self.cfg.health.inject_fault == "nan" else moments[hit] * 1000.0
        return moments

    # ------------------------------------------------------------------ one step
    def train_step(self, micro_batches: list[dict[str, torch.Tensor]]) -> dict[str, Any]:
        from repa.vae import sample_posterior

        cfg = self.cfg
        self.model.train()
        sums = torch.zeros(5, device=self.device)  # total, denoising, projection, alignment, non-finite
        for i, batch in enumerate(micro_batches):
            torch.manual_seed(step_seed(cfg.train.seed, self.step, self.info.rank, i))
            image = batch["image"].to(self.device, non_blocking=True)
            moments = self._inject_fault(batch) if cfg.health.inject_sample_ranges else batch["moments"]
            moments = moments.to(self.device, non_blocking=True)
            y = batch["label"].to(self.device, non_blocking=True)
            with torch.no_grad():
                x = sample_posterior(moments, cfg.vae.latents_scale, cfg.vae.latents_bias)
                with self.autocast():
                    zs = [encoder(image) for encoder in self.encoders]
            last = i == len(micro_batches) - 1
            sync = contextlib.nullcontext() if last or not self.info.distributed else self.model.no_sync()
            with sync:
                with self.autocast():
                    out = self.loss_fn(self.model, x, y, zs, step=self.step)
                (out.total / len(micro_batches)).backward()
            total = out.total.detach()
            nonfinite = (~torch.isfinite(total)).to(total.dtype)
            sums += torch.stack(
                [total, out.denoising.detach(), out.projection.detach(), out.alignment.detach(), nonfinite]
            ).float()
        # The global (pre-clip) norm; max_grad_norm 0 = no clipping, but the guard still needs the norm.
        max_norm = cfg.train.max_grad_norm or float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(self.raw_model.parameters(), max_norm)
        # The step's one collective, before the update: every rank gets the same mean losses, norm and
        # count of ranks with a non-finite loss, so the guard's verdict is the same everywhere.
        values = D.all_reduce_mean(self.info, torch.cat([sums / len(micro_batches), grad_norm.reshape(1)]))
        loss, den, proj, align, nonfinite, norm = values.tolist()
        failed = self.health.judge(loss, norm, nonfinite)
        if not failed:
            self.optimizer.step()
            update_ema(self.ema, self.raw_model, cfg.train.ema_decay)
            self.health.accept(loss, norm)
        self.optimizer.zero_grad(set_to_none=True)
        return {
            "loss": loss,
            "denoising_loss": den,
            "projection_loss": proj,
            "alignment": align,
            "grad_norm": norm,
            "failed": failed,  # the guard's failed checks: non-empty = skipped (no update, no EMA)
            "keys": [k for batch in micro_batches for k in batch.get("key", [])] if failed else [],
        }

    # ------------------------------------------------------------------ sample grid
    @torch.no_grad()
    def sample_grid(self) -> torch.Tensor:
        """Grid for TensorBoard (EMA weights by default); fixed noise and labels, comparable across steps."""
        from torchvision.utils import make_grid

        from repa.sampling import sample
        from repa.vae import build_vae

        cfg = self.cfg
        if not hasattr(self, "_grid_vae"):
            self._grid_vae = build_vae(cfg.vae.name, cfg.storage.locate(cfg.vae.weights_url)).to(self.device)
        n = cfg.log.sample_num_images
        gen = torch.Generator().manual_seed(cfg.train.seed)
        m = self.ema
        z = torch.randn(n, m.in_channels, m.input_size, m.input_size, generator=gen).to(self.device)
        y = (torch.arange(n) % len(self.manifest.class_names)).to(self.device)
        model = self.ema if cfg.log.sample_weights == "ema" else self.raw_model
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
        images = self._grid_vae.decode_to_uint8(latents, cfg.vae.latents_scale, cfg.vae.latents_bias)
        return make_grid(images.cpu(), nrow=math.ceil(math.sqrt(n)))

    # ------------------------------------------------------------------ loop
    def train(self) -> int:
        cfg = self.cfg
        self.check_run_url_writable()
        self.tb: TensorBoardLogger | None = None
        failed: BaseException | None = None
        try:
            self.build()
            resumed = self.resume()
            self.preemption.install()
            if self.info.is_main:
                log.info(self.geometry.describe() + f"; {self.manifest.num_samples:,} samples/epoch")
                if cfg.log.tensorboard:
                    self.tb = TensorBoardLogger(
                        storage.join(cfg.storage.run_url, "tensorboard"),
                        purge_step=self.step + 1 if resumed else None,
                        storage_options=self.storage_options,
                    )
                    self.tb.run_started(cfg, self.step)  # config text, custom-scalars layout
            return self._loop()
        except BaseException as e:
            failed = e
            raise
        finally:
            self._close(self.tb, failed)

    def _loop(self) -> int:
        cfg = self.cfg
        meter = Throughput()
        self.loader = self.make_loader()
        batches = self.make_batches()
        while self.step < cfg.train.max_steps:
            metrics = self.train_step(next(batches))
            bad, keys = metrics.pop("failed"), metrics.pop("keys")
            self.samples_consumed += self.geometry.global_batch_size
            if bad:  # skipped: the step counter stays (it counts optimiser updates)
                verdict = self.on_bad_step(bad, keys, metrics, self.tb)
                if verdict == "stop":
                    self.finish_saves()
                    return HEALTH_EXIT_CODE
                if verdict == "rolled back" and self.tb is not None:  # drop the abandoned steps' events
                    self.tb.close()
                    self.tb = TensorBoardLogger(
                        storage.join(cfg.storage.run_url, "tensorboard"),
                        purge_step=self.step + 1,
                        storage_options=self.storage_options,
                    )
                continue
            self.step += 1
            meter.update(self.geometry.global_batch_size, metrics)
            tb = self.tb
            upload_failed = self.info.is_main and self.saver.failed()
            lease_lost = bool(self.info.is_main and self.lease is not None and self.lease.lost)
            preempted, upload_failed, lease_lost = self._agree(
                self.preemption.requested, upload_failed, lease_lost
            )
            if upload_failed:
                if self.info.is_main:
                    self.saver.wait()  # raises the upload's own error (operation + URL)
                raise UploadFailedError("rank 0's checkpoint upload failed (its log names the operation)")
            if lease_lost:
                raise LeaseError(
                    self.lease.lost if self.lease is not None and self.lease.lost else "lease lost"
                )
            if preempted:
                log.warning("preempted at step %d: committing a checkpoint, then exiting", self.step)
                if tb is not None:
                    tb.scalars({"train/preempted_at_step": float(self.step)}, self.step)
                self.save(wait=True)
                return PREEMPTED_EXIT_CODE
            if self.step % cfg.log.every_steps == 0 or self.step == cfg.train.max_steps:
                self._log(meter.summary(), tb)
            if tb is not None and cfg.log.sample_every_steps and self.step % cfg.log.sample_every_steps == 0:
                tb.image(f"samples/{cfg.log.sample_weights}", self.sample_grid(), self.step)
            if self.step % cfg.checkpoint.every_steps == 0 or self.step == cfg.train.max_steps:
                self.save(wait=self.step == cfg.train.max_steps or not cfg.checkpoint.background_upload)
            if tb is not None and self.step % cfg.log.tensorboard_flush_every_steps == 0:
                tb.flush()
        self.finish_saves()
        return 0

    def _close(self, tb: TensorBoardLogger | None, failed: BaseException | None) -> None:
        """Flush TensorBoard and drop the lease; after a storage failure touch the store no more (each
        call would wait out another deadline and its error would hide the first one)."""
        store_down = failed is not None and _is_storage_failure(failed)
        if isinstance(failed, LeaseError) and self.info.is_main and self.saver.busy:
            # Evicted: the upload thread stops at its next fence (before its next file or the marker);
            # join it, so that the interpreter never exits under a thread inside torch (SIGABRT, 134).
            log.warning("lease lost: stopping the checkpoint upload of step %s in flight", self.saver.step)
            with contextlib.suppress(Exception):
                self.saver.wait()
        elif failed is not None and self.info.is_main and self.saver.busy:
            log.warning("abandoning the checkpoint upload of step %s in flight", self.saver.step)
        try:
            if tb is not None:
                tb.close(upload=not store_down)
        except Exception as e:
            if failed is None:
                raise
            log.warning("could not close TensorBoard after the failure (%s: %s)", type(e).__name__, e)
        finally:
            if self.lease is not None:
                self.lease.release(remove=not store_down)

    # ------------------------------------------------------------------ health guard
    def on_bad_step(
        self, failed: list[str], keys: list[str], metrics: dict[str, float], tb: TensorBoardLogger | None
    ) -> str:
        """Record a skipped step (every rank: the guard's state is the same everywhere) and roll back
        after ``health.max_bad_steps`` of them; ``"skipped"``, ``"rolled back"`` or ``"stop"``."""
        G = self.geometry.global_batch_size
        bad = BadStep(
            self.step,
            self.samples_consumed - G,
            self.samples_consumed,
            failed,
            metrics["loss"],
            metrics["grad_norm"],
            keys,
        )
        log.warning("health: skipped %s", bad.describe())
        verdict = "skipped"
        if self.health.record_bad(bad):
            h = self.cfg.health
            if self.health.may_roll_back(self.step):
                self.rollback()
                verdict = "rolled back"
            else:
                log.error(
                    "health: stopping at step %d: %d bad steps within %d steps after %d rollbacks within "
                    "%d steps (last %s); the run needs a human: lower train.lr, try another "
                    "train.precision, or check the data (the checkpoints' 'health' entry lists every "
                    "skipped sample); exit code %d",
                    self.step,
                    h.max_bad_steps,
                    h.bad_step_window,
                    h.max_rollbacks,
                    h.rollback_horizon_steps,
                    "+".join(failed),
                    HEALTH_EXIT_CODE,
                )
                verdict = "stop"
        if tb is not None and self.info.is_main:
            tb.scalars(self.health.scalars(), self.step)
        return verdict

    def rollback(self) -> None:
        """Reload the newest committed checkpoint written before the episode's first bad step, through
        :meth:`resume`, and move the data past the episode's window.

        Checkpoints committed after that step belong to the abandoned timeline (their steps are trained
        again), so they are deleted first, marker first as retention does; the newest committed one is
        then the target. Without one the state stays and only the window is skipped.
        """
        first_step, _, _ = self.health.episode()
        at_step = self.step
        self.finish_saves()  # an upload in flight belongs to the timeline being abandoned or kept
        if self.info.is_main:
            committed, _ = ckpt.list_checkpoints(self.cfg.storage.run_url, self.storage_options)
            for ref in committed:
                if ref.step > first_step:
                    log.warning("health: deleting %s (written after the first bad step)", ref.url)
                    storage.remove(storage.join(ref.url, ckpt.MARKER), storage_options=self.storage_options)
                    storage.remove(ref.url, recursive=True, storage_options=self.storage_options)
        D.barrier(self.info)
        history = self.health.history()
        ref = self.resume()
        start, end = self.health.rolled_back(history, at_step, self.step)
        log.warning(
            "health: rolled back from step %d to %s (step %d); samples [%d, %d) are skipped (rollback %d)",
            at_step,
            ref.url if ref is not None else "the current weights (no checkpoint before the first bad step)",
            self.step,
            start,
            end,
            len(self.health.rollbacks),
        )

    def _log(self, summary: dict[str, float], tb: TensorBoardLogger | None) -> None:
        if not self.info.is_main:
            return
        from repa.flops import mfu

        images_per_second = summary.pop("images_per_second")
        scalars = {f"train/{k}": v for k, v in summary.items()}
        scalars["train/lr"] = self.optimizer.param_groups[0]["lr"]
        scalars["perf/images_per_second"] = images_per_second
        scalars.update(self.health.scalars())
        max_steps = self.cfg.train.max_steps
        steps_per_second = images_per_second / self.geometry.global_batch_size
        eta = (max_steps - self.step) / steps_per_second if steps_per_second > 0 else None
        scalars["progress/step_of_max"] = self.step / max_steps
        scalars["progress/eta_hours"] = None if eta is None else eta / 3600
        if self.device.type == "cuda":
            scalars["perf/gpu_memory_gib"] = gpu_memory_gib(self.device)
            scalars["perf/mfu"] = mfu(
                self.flops_per_image,
                images_per_second,
                self.info.world_size,
                torch.cuda.get_device_name(self.device),
            )
        if tb is not None:
            tb.scalars(scalars, self.step)
        epoch = self.samples_consumed / max(self.manifest.num_samples, 1)
        eta_text = "?" if eta is None else f"{int(eta // 3600)}h{int(eta % 3600 // 60):02d}m"
        log.info(
            "step %8d of %d %5.1f%% | ETA %s | epoch %6.2f | loss %.4f | den %.4f | proj %.4f | grad %.3f"
            " | %8.1f img/s",
            self.step,
            max_steps,
            100 * self.step / max_steps,
            eta_text,
            epoch,
            summary["loss"],
            summary["denoising_loss"],
            summary["projection_loss"],
            summary["grad_norm"],
            images_per_second,
        )


# ---------------------------------------------------------------------- CLI
def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser)


def _is_storage_failure(e: BaseException) -> bool:
    seen: set[int] = set()
    current: BaseException | None = e
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, storage.StorageError) or storage.is_transient(current):
            return True
        current = current.__cause__ or current.__context__
    return False


def run(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    manifest = check_inputs(cfg)
    info = D.init_distributed(cfg.train.device, cfg.train.process_group_timeout_seconds)
    if not info.is_main:
        logging.getLogger().setLevel(logging.WARNING)
    started = time.time()
    try:
        code = Trainer(cfg, info, manifest).train()
    finally:
        D.shutdown()
    log.info("train finished with exit code %d after %.1f s", code, time.time() - started)
    return code
