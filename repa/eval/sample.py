"""`repa sample`: images from a checkpoint for FID: deterministic per sample, chunked, resumable.

Protocol (the paper's FID setting, the ``sample`` defaults): Euler–Maruyama SDE, 250 steps, CFG 1.8
inside the guidance interval t ∈ [0, 0.7], 50,000 samples with uniform random labels, EMA weights,
the model in fp32 (TF32 matmuls allowed, as ``generate.py``), decoded to uint8 by sd-vae-ft-ema (SD-VAE
truncates as ``generate.py``; ``RunConfig.decoder_vae``). ``sample.class_balanced`` gives
labels ``i mod num_classes`` (50 per class for 50K) instead.

Determinism. What sample ``i`` is made of depends only on ``(seed, i)``: one CPU ``torch.Generator``
seeded with :func:`sample_seed` draws, in this order, the random label, the initial noise ``z_i``
(C, h, w) and, for the SDE, all of its per-step noise ``ε_i`` (N−1, C, h, w). The SDE noise goes to
``repa.sampling`` as its ``noise=`` tensor, so the sampler's own RNG is never used. (DiT/REPA seed one
RNG per rank, ``global_seed·world_size + rank`` in ``sample_ddp.py`` — so their samples change with the number
of GPUs.) Samples are made in chunks of ``chunk_size`` consecutive indices; a chunk is always split
into the same batches (``[lo, lo+B), [lo+B, lo+2B), ...``) whichever process runs it, so the images are
**bit-identical for any world size, chunk-to-rank assignment and resume point** on the same kind of
device. A different batch size gives the same inputs but may differ in the last bits: CPU/GPU GEMM
kernels pick their summation order by matrix size (measured on CPU: ≤ 3e-7 in the latents, i.e. a rare
±1 in a uint8 pixel), so the batch size is recorded with the samples.

Output: a sample set (``repa.eval.sample_set``: protocol.json + atomic chunk files), so a rerun
skips finished chunks. Under torchrun, rank 0 lists the missing chunks and rank r takes every W-th.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import logging
import re
import sys
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from repa import checkpoint as ckpt
from repa import runtime, storage
from repa.config import ConfigError, RunConfig
from repa.eval.args import add_checkpoint_argument, add_sampling_arguments, cli_error, resolve_config
from repa.eval.sample_set import (
    SampleSet,
    SampleSpec,
    SamplingError,
    SamplingInterrupted,
    assemble_npz,
    encode_chunk,
    identity_digest,
    prepare_output,
    sampling_identity,
    wait_for_chunks,
)
from repa.runtime import DistInfo, broadcast_object

log = logging.getLogger(__name__)

__all__ = [
    "SampleInputs",
    "SampleSet",
    "SampleSpec",
    "SamplingError",
    "SamplingInterrupted",
    "add_arguments",
    "build_decoder_vae",
    "decoder_vae_identity",
    "default_output_url",
    "generate_samples",
    "run",
    "run_sampler",
    "sample_inputs",
    "sample_seed",
]


def _fmix32(h: int) -> int:
    """MurmurHash3's 32-bit finaliser: a bijection on [0, 2**32) that scatters neighbouring inputs."""
    h ^= h >> 16
    h = (h * 0x85EBCA6B) & 0xFFFFFFFF
    h ^= h >> 13
    h = (h * 0xC2B2AE35) & 0xFFFFFFFF
    h ^= h >> 16
    return h


def sample_seed(seed: int, index: int) -> int:
    """The 32-bit ``torch.Generator`` seed of sample ``index`` under the global ``seed``.

    torch's CPU generator (mt19937) keeps only the low 32 bits of its seed, so the seed is built in
    32 bits: ``fmix32((base(seed) + index) mod 2**32)``, ``base`` from sha256 of the seed. For a fixed
    seed this is injective in ``index`` (< 2**32), so no two samples of a run share their noise.
    """
    if index < 0 or index >= 2**32:
        raise SamplingError(f"sample index {index} is outside [0, 2**32)")
    base = int.from_bytes(hashlib.sha256(f"repa-sample-seed:{seed}".encode()).digest()[:4], "little")
    return _fmix32((base + index) & 0xFFFFFFFF)


@dataclass
class SampleInputs:
    """Random inputs of a batch of samples (CPU): labels, initial noise and the SDE's per-step noise."""

    indices: np.ndarray  # (B,) int64 global sample indices
    y: torch.Tensor  # (B,) int64
    z: torch.Tensor  # (B, C, h, w) float32, the state at t = 1
    noise: torch.Tensor | None  # (N-1, B, C, h, w) float32 for the SDE, else None


def sample_inputs(spec: SampleSpec, indices: Sequence[int], latent_shape: Sequence[int]) -> SampleInputs:
    """Label, initial noise and SDE noise of each sample in ``indices``: a function of (seed, i) only.

    Per sample one generator draws, in order: a uniform label in [0, num_classes) (also when
    class-balanced, which then uses ``i mod num_classes``, so z does not depend on that option), z, and
    the SDE's N−1 noise tensors.
    """
    shape = tuple(int(s) for s in latent_shape)
    labels, zs, noises = [], [], []
    for i in indices:
        g = torch.Generator().manual_seed(sample_seed(spec.seed, int(i)))
        label = int(torch.randint(spec.num_classes, (), generator=g))
        labels.append(int(i) % spec.num_classes if spec.class_balanced else label)
        zs.append(torch.randn(shape, generator=g))
        if spec.sampler == "sde":
            noises.append(torch.randn((spec.num_steps - 1, *shape), generator=g))
    return SampleInputs(
        indices=np.asarray(list(indices), dtype=np.int64),
        y=torch.tensor(labels, dtype=torch.int64),
        z=torch.stack(zs),
        noise=torch.stack(noises, dim=1) if noises else None,
    )


def run_sampler(
    model: Any, spec: SampleSpec, z: torch.Tensor, y: torch.Tensor, noise: torch.Tensor | None, **kwargs: Any
) -> torch.Tensor:
    """``repa.sampling.sample`` with the sampler, steps and guidance of ``spec`` (``kwargs``: e.g.
    ``trace=``); the one place a spec becomes sampler arguments."""
    from repa.sampling import sample

    return sample(
        model,
        z,
        y,
        sampler=spec.sampler,
        num_steps=spec.num_steps,
        cfg_scale=spec.cfg_scale,
        guidance_low=spec.guidance_low,
        guidance_high=spec.guidance_high,
        path_type=spec.path_type,
        noise=noise,
        **kwargs,
    )


class _Autocast:
    """``model(x, t, y)`` under autocast (bf16 on GPU); forwards ``null_class`` for the samplers."""

    def __init__(self, model: nn.Module, device: torch.device, precision: str) -> None:
        self.model, self.device, self.precision = model, device, precision

    @property
    def null_class(self) -> int | None:
        return getattr(self.model, "null_class", None)

    def __call__(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> Any:
        with runtime.autocast(self.device, self.precision):
            return self.model(x, t, y)


def generate_samples(
    model: nn.Module,
    spec: SampleSpec,
    *,
    out: storage.Location | str,
    vae: Any,
    batch_size: int = 64,
    dist: DistInfo | None = None,
    device: torch.device | str | None = None,
    precision: str = "auto",
    latents_scale: float | None = None,
    latents_bias: float | None = None,
    save_npz: bool = False,
    checkpoint: dict[str, Any] | None = None,
    vae_identity: dict[str, Any] | None = None,
    progress: bool = True,
    should_stop: Callable[[], bool] | None = None,
    wait_poll_seconds: float = 2.0,
    share: tuple[int, int] | None = None,
) -> SampleSet:
    """Generate ``spec.num_samples`` images into ``out`` (chunked, resumable); returns the set.

    ``model(x, t, y) -> (v, ...)`` with attributes ``in_channels``/``input_size`` (SiT), ``vae`` with
    ``decode_to_uint8(z, scale, bias)`` on the same device. ``dist``: this process's rank/world (None =
    single process); every rank calls this, rank 0 returns only once all chunks exist (and
    ``samples.npz`` if ``save_npz``). ``checkpoint``/``vae_identity`` are recorded in the identity.
    ``should_stop()`` is polled between batches; when true, raises :class:`SamplingInterrupted`.
    ``share=(part, parts)``: only chunks ``c`` with ``c % parts == part`` (another process, e.g. a pod
    of a sweep's Indexed Job, makes the rest); rank 0 then returns once this share exists.
    """
    if device is None:  # the process's device under torchrun, else where the model is
        device = dist.device if dist is not None else next(model.parameters()).device
    device = torch.device(device)
    info = dist or DistInfo(rank=0, world_size=1, local_rank=0, device=device)
    try:
        precision = runtime.resolve_precision(precision, device)
    except ValueError as e:
        raise SamplingError(f"sample.precision: {e}") from None
    if batch_size < 1:
        raise SamplingError(f"sample.batch_size_per_device: must be >= 1, got {batch_size}")
    sample_set = SampleSet(out, sampling_identity(spec, checkpoint, vae_identity))
    out_url = sample_set.url

    # Rank 0 decides what is left; every rank gets the same list (or rank 0's error).
    pending: list[int] | None = None
    error: str | None = None
    failure: BaseException | None = None
    if info.is_main:
        try:
            pending = prepare_output(sample_set)
        except Exception as e:
            failure, error = e, f"{type(e).__name__}: {e}"
    pending, error = broadcast_object(info, (pending, error))  # type: ignore[misc]
    if failure is not None:
        raise failure
    if error is not None:
        raise SamplingError(f"rank 0 could not prepare {out_url}: {error}")
    assert pending is not None
    done_before = spec.num_chunks - len(pending)
    share_part, share_parts = share or (0, 1)
    if not 0 <= share_part < share_parts:
        raise SamplingError(f"sample share {share_part} of {share_parts}: expected 0 <= part < parts")
    pending = [c for c in pending if c % share_parts == share_part]
    mine = pending[info.rank :: info.world_size]
    if info.is_main:
        log.info(
            "sampling %d images into %s: %d of %d chunks done, %d to do on %d process(es)%s",
            spec.num_samples,
            out_url,
            done_before,
            spec.num_chunks,
            len(pending),
            info.world_size,
            f" (this process's share: chunks c % {share_parts} == {share_part})" if share_parts > 1 else "",
        )

    model.eval()
    call = _Autocast(model, device, precision)
    latent_shape = (int(model.in_channels), int(model.input_size), int(model.input_size))
    batches = [
        (c, range(lo, min(lo + batch_size, r.stop)))
        for c in mine
        for r in [spec.chunk_range(c)]
        for lo in range(r.start, r.stop, batch_size)
    ]
    total = sum(len(b) for _, b in batches)
    bar = _progress_bar(total, enabled=progress and info.is_main)
    started = time.perf_counter()
    parts: dict[int, list[tuple[np.ndarray, np.ndarray, np.ndarray]]] = {}
    # The next batch's random inputs are drawn on a CPU thread while the device samples this one.
    with ThreadPoolExecutor(max_workers=1) as pool, torch.no_grad(), contextlib.closing(bar):
        future = pool.submit(sample_inputs, spec, batches[0][1], latent_shape) if batches else None
        for k, (chunk, indices) in enumerate(batches):
            if should_stop is not None and should_stop():
                raise SamplingInterrupted(f"stopped before chunk {chunk}; completed chunks are kept")
            inputs = future.result()
            if k + 1 < len(batches):
                future = pool.submit(sample_inputs, spec, batches[k + 1][1], latent_shape)
            latents = run_sampler(
                call,
                spec,
                inputs.z.to(device),
                inputs.y.to(device),
                None if inputs.noise is None else inputs.noise.to(device),
            )  # (B, C, h, w) float64
            images = vae.decode_to_uint8(latents.float(), latents_scale, latents_bias)  # (B, 3, H, W) uint8
            parts.setdefault(chunk, []).append(
                (images.permute(0, 2, 3, 1).cpu().numpy(), inputs.y.numpy(), inputs.indices)
            )
            bar.update(len(indices))
            if indices.stop == spec.chunk_range(chunk).stop:  # last batch of the chunk: commit it
                imgs, labels, idx = (np.concatenate(a) for a in zip(*parts.pop(chunk)))
                storage.write_bytes_atomic(
                    sample_set.chunk_url(chunk),
                    encode_chunk(imgs, labels, idx, sample_set.digest),
                )
                log.debug("rank %d committed chunk %d (%d images)", info.rank, chunk, len(idx))
    elapsed = time.perf_counter() - started
    if total:
        log.info("rank %d: %d images in %.1f s (%.2f images/s)", info.rank, total, elapsed, total / elapsed)

    if info.is_main:
        wait_for_chunks(sample_set, wait_poll_seconds, should_stop, part=share_part, parts=share_parts)
        if save_npz and not sample_set.missing_chunks():
            assemble_npz(sample_set)
    return sample_set


def _progress_bar(total: int, enabled: bool) -> Any:
    if not enabled:
        return _NoBar()
    from tqdm.auto import tqdm

    return tqdm(total=total, unit="img", desc="sampling", dynamic_ncols=True, file=sys.stderr)


class _NoBar:
    def update(self, n: int) -> None:
        pass

    def close(self) -> None:
        pass


def decoder_vae_identity(cfg: RunConfig) -> dict[str, Any]:
    """Which VAE decodes the samples (``RunConfig.decoder_vae``: sd-vae-ft-ema for SD-VAE latents unless
    ``sample.vae_name`` says otherwise), its weights, scale and bias."""
    name, weights_url = cfg.decoder_vae()
    return {
        "name": name,
        "weights_url": weights_url,
        "latents_scale": cfg.vae.latents_scale,
        "latents_bias": cfg.vae.latents_bias,
    }


def build_decoder_vae(cfg: RunConfig, device: torch.device | str = "cpu") -> tuple[Any, dict[str, Any]]:
    """The VAE that decodes samples (see :func:`decoder_vae_identity`) on ``device``, and its identity."""
    from repa.vae import build_vae

    identity = decoder_vae_identity(cfg)
    vae = build_vae(identity["name"], cfg.storage.locate(identity["weights_url"]))
    return vae.to(device), identity


def default_output_url(cfg: RunConfig, source: ckpt.CheckpointSource, digest: str) -> str:
    """``sample.output_url``, else ``{run_url}/samples/step-NNNNNNN-<digest[:10]>`` (run checkpoints) or
    ``{storage.run_url}/samples/<file name>-<digest[:10]>`` (weights files)."""
    if cfg.sample.output_url:
        return cfg.sample.output_url
    run_url = source.run_url or cfg.storage.run_url
    if not run_url:
        raise ConfigError(
            "sample.output_url",
            f"required for checkpoint {source.url}, which is not inside a run (or set storage.run_url)",
        )
    if source.kind == "run" and source.step is not None:
        stem = ckpt.step_dir_name(source.step)
    else:
        name = source.url.rstrip("/").rsplit("/", 1)[-1]
        stem = re.sub(r"[^A-Za-z0-9_.-]", "_", name.rsplit(".", 1)[0])
    return storage.join(run_url, "samples", f"{stem}-{digest[:10]}")


# ----------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_sampling_arguments(parser)
    add_checkpoint_argument(
        parser,
        "step folder, its ema.pt/state.pt, or a REPA .pt file ({ema, args, ...} or a bare state dict, "
        "built from the config's model args); default: sample.checkpoint_url, else the latest committed "
        "checkpoint under storage.run_url",
    )
    parser.add_argument("--output", metavar="URL", help="where samples go (sets sample.output_url)")


def run(args: argparse.Namespace) -> int:
    info = None
    try:
        verb = resolve_config(args)
        cfg, source = verb.cfg, verb.source
        cfg.require_weights("sample", args.config)  # published networks: random weights only on purpose
        info = runtime.init_distributed(cfg.train.device, cfg.train.process_group_timeout_seconds)
        loaded = ckpt.load_model(
            cfg,
            source,
            device=info.device,
            check_config=verb.explicit,
        )
        runtime.enable_tf32(info.device, cfg.train.allow_tf32)
        vae, vae_identity = build_decoder_vae(cfg, info.device)
        spec = SampleSpec.from_config(cfg)
        checkpoint = source.describe(loaded.weights)
        digest = identity_digest(sampling_identity(spec, checkpoint, vae_identity))
        sample_set = generate_samples(
            loaded.model,
            spec,
            out=cfg.storage.locate(default_output_url(cfg, source, digest)),
            vae=vae,
            batch_size=cfg.sample.batch_size_per_device,
            dist=info,
            precision=cfg.sample_precision(),
            latents_scale=cfg.vae.latents_scale,
            latents_bias=cfg.vae.latents_bias,
            save_npz=cfg.sample.save_npz,
            checkpoint=checkpoint,
            vae_identity=vae_identity,
            progress=not args.no_progress,
        )
    except (SamplingError, ValueError, FileNotFoundError) as e:
        if isinstance(e, ConfigError):
            raise
        return cli_error("sample", e)
    finally:
        if info is not None:
            runtime.shutdown()
    if info.is_main:
        print(f"{sample_set.num_samples} samples in {sample_set.url}")
    return 0
