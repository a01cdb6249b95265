"""What the trainer reads: the inputs checked before any work, how the global batch is split, the
rank's streaming loader and its part of a checkpoint, and the faults tests inject into batches."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from repa import runtime as D
from repa import storage
from repa.config import ConfigError, HealthConfig, RunConfig, TrainConfig
from repa.data.format import Manifest


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


def check_inputs(cfg: RunConfig) -> Manifest:
    """Everything that can fail cheaply fails here, before the process group, models or data.

    Runs before ``init_distributed``: under torchrun a bad config then costs each (pointless)
    restart a second, not a process-group timeout.
    """
    from repa.data.format import read_manifest

    cfg.require_for("train")
    try:
        manifest = read_manifest(cfg.data.location())
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


class ReaderPart:
    """The reader's part of a checkpoint. Saving asks the loader; loading keeps the state for the next
    :func:`make_rank_loader` (a running loop's loader is moved by ``Trainer.make_batches`` from
    ``samples_consumed``: loading a state into a loader under a live iterator would not move it)."""

    def __init__(self) -> None:
        self.loader: Any = None
        self.resumed: dict[str, Any] | None = None

    def state_dict(self) -> dict[str, Any]:
        return self.loader.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.resumed = dict(state)


def make_rank_loader(
    cfg: RunConfig,
    info: D.DistInfo,
    geometry: BatchGeometry,
    manifest: Manifest,
    samples_consumed: int,
    step: int,
    resumed: dict[str, Any] | None,
) -> Any:
    """The rank's streaming loader at ``samples_consumed``; a resumed run's reader state (``resumed``, at
    ``step``) must match this config's data order (ConfigError naming the key otherwise)."""
    from repa.data.reader import StreamingDataset, make_loader

    dataset = StreamingDataset(
        cfg.data.location(),
        rank=info.rank,
        world_size=info.world_size,
        batch_size=geometry.micro_batch,
        seed=cfg.data.seed,
        samples_consumed=samples_consumed,
        shards_in_flight=cfg.data.shards_in_flight,
        chunk_size=cfg.data.chunk_size,
        manifest=manifest,
    )
    loader = make_loader(
        dataset,
        num_workers=cfg.data.num_workers,
        prefetch_factor=cfg.data.prefetch_factor,
        pin_memory=info.device.type == "cuda",
    )
    if resumed is not None:
        try:
            loader.load_state_dict(resumed)
        except ValueError as e:
            raise ConfigError(f"cannot resume step {step} of {cfg.storage.run_url}: {e}") from None
    return loader


def inject_fault(cfg: HealthConfig, batch: dict[str, Any]) -> torch.Tensor:
    """``health.inject_sample_ranges`` (for tests): corrupt the moments of the samples at those stream
    positions, as a poisoned sample would (``health.inject_fault``)."""
    moments = batch["moments"]
    position = batch["position"]
    hit = torch.zeros_like(position, dtype=torch.bool)
    for start, end in cfg.inject_sample_ranges:
        hit |= (position >= start) & (position < end)
    if not hit.any():
        return moments
    moments = moments.clone()
    moments[hit] = float("nan") if cfg.inject_fault == "nan" else moments[hit] * 1000.0
    return moments
