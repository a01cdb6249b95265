"""`repa train`: the REPA training loop, standalone or under torchrun (elastic, c10d).

One optimiser step, as the reference ``train.py`` (sihyun-yu/REPA; docs/architecture.md):

    x   = (mean + std * eps) * 0.18215            posterior sample of the stored VAE moments
    zs  = encoder(image)                           frozen encoder features of the clean image
    L   = denoising + proj_coeff * projection      repa.objective.REPALoss
    AdamW step after clipping the grad norm to max_grad_norm; EMA (fp32) every step.

The loop is five calls (torchtitan's shape): step -> health verdict -> stops -> metrics -> checkpointer,
each a component with one job: ``repa.train.health`` (which steps to skip, when to roll back),
``repa.train.stops`` (signals, a failed upload, a lost lease), ``repa.train.metrics`` (log, TensorBoard,
throughput, MFU), ``repa.train.checkpointer`` (the Stateful parts, resume, background saves, fencing).

Design choices that make restarts exact and elastic:
- Randomness is a function of progress: before each micro-batch the global RNG is seeded from
  (seed, step, rank, micro-batch) (edm2's approach), so resuming needs no RNG blobs and a resumed
  run draws exactly what the uninterrupted run drew.
- The data position is ``samples_consumed`` (global), stored in every checkpoint with the reader's
  order settings (``data.seed``, ``shards_in_flight``, ``chunk_size``); the reader maps it to shards
  and offsets for any world size, and a resume whose order settings changed is refused.
- Every process resumes from the newest *committed* checkpoint found at start (rank 0 looks,
  all ranks load the same one), so a torchrun restart after a member died simply continues.
- One collective per step, before the update: the mean losses, the grad norm, the count of ranks with a
  non-finite loss and every rank's stop flags travel in one all-reduce, so the guard's verdict and the
  decision to stop are the same on every rank; all ranks stop at the same step, so the elastic
  PyTorchJob (which succeeds as soon as ANY worker exits 0) only succeeds when the run is finished. A
  preempted run (SIGTERM) commits a checkpoint and exits 143, a Ctrl-C'd one 130; never 0.
- Rank 0 holds the run's lease (``repa.lease``) from before its first write to exit; on a storage
  failure the cleanup (TensorBoard upload, lease removal) is skipped, so the error that ends the run is
  the first one, not a later one of the cleanup.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel

from repa import checkpoint as ckpt
from repa import runtime as D
from repa import storage
from repa.config import RunConfig, add_config_arguments, config_from_args
from repa.data.format import Manifest
from repa.lease import Lease
from repa.train.checkpointer import Checkpointer, claim_run
from repa.train.ema import make_ema, update_ema
from repa.train.health import HEALTH_EXIT_CODE, BadStep, HealthGuard
from repa.train.inputs import BatchGeometry, ReaderPart, check_inputs, inject_fault, make_rank_loader
from repa.train.metrics import MetricsProcessor, flops_per_image, sample_grid
from repa.train.stops import INTERRUPTED_EXIT_CODE, PREEMPTED_EXIT_CODE, Stops, UploadFailedError

__all__ = ["PREEMPTED_EXIT_CODE", "BatchGeometry", "Trainer", "UploadFailedError", "check_inputs", "run"]

log = logging.getLogger(__name__)

METRICS = ("loss", "denoising_loss", "projection_loss", "alignment", "grad_norm")  # all-reduced per step


def step_seed(seed: int, step: int, rank: int, micro: int) -> int:
    """A well-mixed 63-bit seed for one micro-batch (numpy's SeedSequence hashes the tuple)."""
    return int(np.random.SeedSequence([seed, step, rank, micro]).generate_state(2, dtype=np.uint64)[0] >> 1)


class Trainer:
    def __init__(self, cfg: RunConfig, info: D.DistInfo, manifest: Manifest):
        self.cfg = cfg
        self.manifest = manifest
        self.info = info
        self.device = info.device
        self.geometry = BatchGeometry.from_config(cfg.train, info.world_size)
        self.step = 0
        self.samples_consumed = 0
        self.health = HealthGuard(cfg.health)
        self.reader = ReaderPart()
        self.lease: Lease | None = None  # rank 0's (claim_run)
        self.checkpointer: Checkpointer | None = None  # built with the model (build)

    # ------------------------------------------------------------------ Stateful
    def state_dict(self) -> dict[str, Any]:
        """The trainer's own entries of a checkpoint (top level of ``state.pt``)."""
        return {
            "step": self.step,
            "samples_consumed": self.samples_consumed,
            # RNG is reseeded from (train.seed, step, rank, micro-batch) every micro-batch, so the
            # step is the whole RNG state; recorded here so a reader of the file knows.
            "rng": {"scheme": "per-micro-batch reseed", "seed": self.cfg.train.seed},
            "config": self.cfg.to_dict(),
            "world_size": self.info.world_size,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step = int(state["step"])
        self.samples_consumed = int(state["reader"]["samples_consumed"])  # the reader's is authoritative

    # ------------------------------------------------------------------ set-up
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
        self.flops_per_image = flops_per_image(self.raw_model, self.model_args, self.encoders)
        parts = {
            "model": self.raw_model,
            "ema": self.ema,
            "optimizer": self.optimizer,
            "reader": self.reader,  # position + the settings that define the data order (checked on resume)
            "health": self.health,  # running statistics, counters, skipped samples
        }
        self.checkpointer = Checkpointer(cfg, self.info, parts, self, self.model_args)
        self.checkpointer.lease = self.lease
        self.stops = Stops(
            self.checkpointer.saver,
            lambda: self.lease,
            self.checkpointer.describe_last_committed,
            is_main=self.info.is_main,
        )
        self.metrics = MetricsProcessor(
            cfg,
            self.info,
            self.health,
            lambda: self.optimizer.param_groups[0]["lr"],
            self.flops_per_image,
            getattr(self.manifest, "num_samples", 0),
            self.sample_grid,
        )

    def autocast(self) -> contextlib.AbstractContextManager:
        return D.autocast(self.device, self.cfg.train.precision)

    @property
    def saver(self) -> ckpt.BackgroundSaver:
        assert self.checkpointer is not None, "build() first"
        return self.checkpointer.saver

    def resume(self) -> ckpt.CheckpointRef | None:
        """Continue from the newest committed checkpoint that verifies (``Checkpointer.resume``)."""
        assert self.checkpointer is not None, "build() first"
        ref = self.checkpointer.resume()
        if ref is not None:
            log.info(
                "resumed from %s (step %d, %d samples consumed)", ref.url, self.step, self.samples_consumed
            )
        return ref

    def save(self, *, wait: bool = False) -> ckpt.CheckpointRef | None:
        """Checkpoint the current step (``Checkpointer.save``)."""
        assert self.checkpointer is not None, "build() first"
        return self.checkpointer.save(self.step, wait=wait)

    # ------------------------------------------------------------------ data
    def make_batches(self) -> Iterator[list[dict[str, torch.Tensor]]]:
        """Per-step lists of ``accumulation`` micro-batches from the reader's loader.

        Each step starts at ``self.samples_consumed`` moved past the stream ranges never trained on
        (those the health guard skipped, and ``health.skip_sample_ranges``); when that is not where the
        loader stands (a skipped range, or a rollback reset the position), the loader restarts there.
        """
        iterator = None
        while True:
            position = self.health.next_position(self.samples_consumed, self.cfg.health.skip_sample_ranges)
            if position != self.reader.loader.samples_consumed():
                self.reader.loader.load_state_dict({"samples_consumed": position})
                iterator = None
            self.samples_consumed = position
            if iterator is None:
                iterator = iter(self.reader.loader)
            yield [next(iterator) for _ in range(self.geometry.accumulation)]

    # ------------------------------------------------------------------ one step
    def train_step(self, micro_batches: list[dict[str, torch.Tensor]]) -> dict[str, Any]:
        from repa.vae import sample_posterior

        cfg = self.cfg
        self.model.train()
        sums = torch.zeros(5, device=self.device)  # total, denoising, projection, alignment, non-finite
        for i, batch in enumerate(micro_batches):
            torch.manual_seed(step_seed(cfg.train.seed, self.step, self.info.rank, i))
            image = batch["image"].to(self.device, non_blocking=True)
            moments = inject_fault(cfg.health, batch) if cfg.health.inject_sample_ranges else batch["moments"]
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
        # The step's one collective, before the update: every rank gets the same mean losses, norm, count
        # of ranks with a non-finite loss and stop flags (repa.train.stops), so the guard's verdict and the
        # decision to stop are the same everywhere. The flags are set on the device (no host-to-device copy).
        local_flags = self.stops.flags()
        flags = torch.zeros(len(local_flags), device=self.device)
        for i, flag in enumerate(local_flags):
            if flag:
                flags[i] = 1.0
        local = torch.cat([sums / len(micro_batches), grad_norm.reshape(1)])
        values = D.all_reduce_mean(self.info, torch.cat([local, flags]))
        # The step's one host sync: the verdict decides in Python whether AdamW and the EMA run. On the
        # device only the non-finite check could gate them (the fused AdamW's ``found_inf``, which also
        # undoes its step count); the spike checks compare with the median/MAD of the last W applied
        # steps and feed the rollback bookkeeping, and the stop flags end the loop: host decisions, every
        # step. Reading the values once serves the guard, the stops and the logged metrics alike.
        loss, den, proj, align, nonfinite, norm, *stops = values.tolist()
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
            "keys": self._bad_keys(micro_batches, float(sums[4])) if failed else [],
            "stops": stops,  # the all-reduced flags of repa.train.stops.FLAGS
        }

    def _bad_keys(self, micro_batches: list[dict[str, Any]], nonfinite: float) -> list[str]:
        """Sample keys of a skipped step (a rare event: one more collective): those of the ranks whose
        loss was not finite, gathered from every rank; every rank's when none was (a spike or a
        non-finite gradient belongs to the whole batch)."""
        keys = [k for batch in micro_batches for k in batch.get("key", [])]
        if not self.info.distributed:
            return keys
        import torch.distributed as dist

        gathered: list[Any] = [None] * self.info.world_size
        dist.all_gather_object(gathered, (nonfinite > 0, keys))
        culprits = [k for bad, rank_keys in gathered if bad for k in rank_keys]
        return culprits or [k for _, rank_keys in gathered for k in rank_keys]

    # ------------------------------------------------------------------ sample grid
    def sample_grid(self) -> torch.Tensor:
        """Grid for TensorBoard (EMA weights by default; ``repa.train.metrics.sample_grid``)."""
        from repa.vae import build_vae

        cfg = self.cfg
        if not hasattr(self, "_grid_vae"):
            self._grid_vae = build_vae(cfg.vae.name, cfg.storage.locate(cfg.vae.weights_url)).to(self.device)
        model = self.ema if cfg.log.sample_weights == "ema" else self.raw_model
        return sample_grid(cfg, model, len(self.manifest.class_names), self.device, self._grid_vae)

    # ------------------------------------------------------------------ loop
    def train(self) -> int:
        self.lease = claim_run(self.cfg, self.info)
        failed: BaseException | None = None
        try:
            self.build()
            assert self.checkpointer is not None
            resumed = self.resume()
            self.stops.install()
            if self.info.is_main:
                log.info(self.geometry.describe() + f"; {self.manifest.num_samples:,} samples/epoch")
            self.metrics.open(self.step, resumed is not None)
            self.reader.loader = make_rank_loader(
                self.cfg,
                self.info,
                self.geometry,
                self.manifest,
                self.samples_consumed,
                self.step,
                self.reader.resumed,
            )
            return self._loop()
        except BaseException as e:
            failed = e
            raise
        finally:
            self._close(failed)

    def _loop(self) -> int:
        assert self.checkpointer is not None
        batches = self.make_batches()
        while self.step < self.cfg.train.max_steps:
            out = self.train_step(next(batches))  # the step's one all-reduce: metrics, verdict, stop flags
            self.samples_consumed += self.geometry.global_batch_size
            if out["failed"]:  # skipped: the step counter stays (it counts optimiser updates)
                if self.on_bad_step(out) == "stop":
                    self.checkpointer.finish()
                    return HEALTH_EXIT_CODE
                continue
            self.step += 1
            code = self.stops.poll(out["stops"])  # raises after a failed upload or with the lease lost
            last = code is not None or self.step == self.cfg.train.max_steps
            self.metrics.step_end(self.step, {k: out[k] for k in METRICS}, self.samples_consumed, last=last)
            if code is not None:
                return self._stop(code)
            self.checkpointer.step_end(self.step)
        self.checkpointer.finish()
        return 0

    def _stop(self, code: int) -> int:
        """A signal: commit this step (its scalars are logged already), say which, exit ``code``."""
        assert self.checkpointer is not None
        what = "interrupted (Ctrl-C)" if code == INTERRUPTED_EXIT_CODE else "preempted"
        log.warning("%s at step %d: committing a checkpoint, then exiting", what, self.step)
        self.metrics.scalars({"train/preempted_at_step": float(self.step)}, self.step)
        ref = self.checkpointer.save(self.step, wait=True)
        if ref is not None:
            log.warning(
                "committed step %d (%s); exit code %d: run the same command again to continue",
                ref.step,
                ref.url,
                code,
            )
        return code

    def _close(self, failed: BaseException | None) -> None:
        """Flush TensorBoard and drop the lease; after a storage failure touch the store no more (each
        call would wait out another deadline and its error would hide the first one). A failing run's
        upload in flight commits nothing (fenced); with the store up (and no second Ctrl-C) its thread is
        joined first."""
        store_down = failed is not None and _is_storage_failure(failed)
        if failed is not None and self.info.is_main and self.checkpointer is not None:
            aborted = isinstance(failed, KeyboardInterrupt)  # a second Ctrl-C: at once, no waiting
            self.checkpointer.abandon(join=not store_down and not aborted)
        try:
            if hasattr(self, "metrics"):
                self.metrics.close(upload=not store_down)
        except Exception as e:
            if failed is None:
                raise
            log.warning("could not close TensorBoard after the failure (%s: %s)", type(e).__name__, e)
        finally:
            if self.lease is not None:
                self.lease.release(remove=not store_down)

    # ------------------------------------------------------------------ health guard
    def on_bad_step(self, out: dict[str, Any]) -> str:
        """Record a skipped step (every rank: the guard's state is the same everywhere) and roll back
        after ``health.max_bad_steps`` of them; ``"skipped"``, ``"rolled back"`` or ``"stop"``."""
        G = self.geometry.global_batch_size
        failed = out["failed"]
        bad = BadStep(
            self.step,
            self.samples_consumed - G,
            self.samples_consumed,
            failed,
            out["loss"],
            out["grad_norm"],
            out["keys"],
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
        if self.info.is_main:
            self.metrics.scalars(self.health.scalars(), self.step)
        if verdict == "rolled back":  # drop the abandoned steps' events
            self.metrics.reopen(self.step)
        return verdict

    def rollback(self) -> None:
        """Reload the newest committed checkpoint written before the episode's first bad step and move
        the data past the episode's window.

        Checkpoints committed after that step belong to the abandoned timeline (their steps are trained
        again), so they are deleted first, marker first as retention does; the newest committed one is
        then the target. Without one the state stays and only the window is skipped.
        """
        assert self.checkpointer is not None
        first_step, _, _ = self.health.episode()
        at_step = self.step
        self.checkpointer.delete_after(first_step)
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
