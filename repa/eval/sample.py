"""`repa sample`: images from a checkpoint for FID: deterministic per sample, chunked, resumable.

Protocol (REPA.md §8; ``--preset paper``): Euler–Maruyama SDE, 250 steps, CFG 1.8 inside the guidance
interval t ∈ [0, 0.7], 50,000 samples with uniform random labels, EMA weights, decoded to uint8 by the
VAE (SD-VAE truncates as ``generate.py``). ``sample.class_balanced`` gives labels ``i mod num_classes``
(50 per class for 50K) instead.

Determinism. What sample ``i`` is made of depends only on ``(seed, i)``: one CPU ``torch.Generator``
seeded with :func:`sample_seed` draws, in this order, the random label, the initial noise ``z_i``
(C, h, w) and, for the SDE, all of its per-step noise ``ε_i`` (N−1, C, h, w). The SDE noise goes to
``repa.sampling`` as its ``noise=`` tensor, so the sampler's own RNG is never used. (DiT/REPA seed one
RNG per rank, ``global_seed·world_size + rank`` — STYLE.md §1 — so their samples change with the number
of GPUs.) Samples are made in chunks of ``chunk_size`` consecutive indices; a chunk is always split
into the same batches (``[lo, lo+B), [lo+B, lo+2B), ...``) whichever process runs it, so the images are
**bit-identical for any world size, chunk-to-rank assignment and resume point** on the same kind of
device. A different batch size gives the same inputs but may differ in the last bits: CPU/GPU GEMM
kernels pick their summation order by matrix size (measured on CPU: ≤ 3e-7 in the latents, i.e. a rare
±1 in a uint8 pixel), so the batch size is recorded with the samples.

Output (``output_url``, any fsspec URL)::

    protocol.json             what the samples are (spec, checkpoint, VAE) and its sha256 digest
    chunks/chunk-000000.npz   arr_0 uint8 (n, H, W, 3), labels, indices; written atomically
    samples.npz               optional (``sample.save_npz``): ADM-compatible ``arr_0`` (N, H, W, 3)

A chunk file exists only once complete (atomic write), so a rerun skips finished chunks and redoes
the rest; a rerun with different settings into the same folder is refused. Under torchrun, rank 0
lists the missing chunks and rank r takes every W-th of them.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import inspect
import io
import json
import logging
import math
import re
import sys
import time
import uuid
import zipfile
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

import repa
from repa import checkpoint as ckpt
from repa import storage
from repa.config import VAE_DOWNSAMPLE, ConfigError, RunConfig, load_config
from repa.runtime import DistInfo, broadcast_object

log = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_CHUNK_SIZE",
    "FORMAT",
    "PRESETS",
    "CheckpointSource",
    "LoadedModel",
    "ModelMismatchError",
    "SampleInputs",
    "SampleSet",
    "SampleSpec",
    "SamplingError",
    "SamplingInterrupted",
    "add_arguments",
    "build_decoder_vae",
    "cli_error",
    "decoder_vae_identity",
    "default_output_url",
    "enable_tf32",
    "generate_samples",
    "identity_digest",
    "load_model",
    "model_args_from_config",
    "resolve_checkpoint",
    "resolve_config",
    "resolve_precision",
    "run",
    "sample_inputs",
    "sample_seed",
    "sampling_identity",
]

FORMAT = "repa-samples-v1"
DEFAULT_CHUNK_SIZE = 1000
PROTOCOL_FILE = "protocol.json"
NPZ_FILE = "samples.npz"
_CHUNK_RE = re.compile(r"^chunk-(\d{6,})\.npz$")
# Fixed zip timestamps: the same samples give the same chunk bytes (and sha256) on every run.
_ZIP_DATE = (1980, 1, 1, 0, 0, 0)

# Named sampling protocols (`--preset`): values for the `sample` config section.
PRESETS: dict[str, dict[str, Any]] = {
    # REPA's FID-1.42 setting (README command; REPA.md §6-§8): SDE, 250 steps, w = 1.8 on t in [0, 0.7],
    # 50K samples with uniform random labels.
    "paper": {
        "sampler": "sde",
        "num_steps": 250,
        "cfg_scale": 1.8,
        "guidance_low": 0.0,
        "guidance_high": 0.7,
        "num_samples": 50_000,
        "class_balanced": False,
    },
}


class SamplingError(ValueError):
    """Bad sampling input or output location (names the URL/field); never a deep traceback."""


class ModelMismatchError(ConfigError):
    """The checkpoint was trained with another model configuration than the one given."""

    def __init__(self, message: str) -> None:
        super().__init__("model", message)


class SamplingInterrupted(RuntimeError):
    """``should_stop()`` asked to stop; completed chunks are kept, nothing partial is written."""


# ----------------------------------------------------------------------------------------------
# What the samples are: spec, per-sample inputs, identity
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SampleSpec:
    """Everything that decides the pixels of sample ``i`` besides the weights and the VAE."""

    num_samples: int
    seed: int
    num_classes: int
    sampler: str = "sde"
    num_steps: int = 250
    cfg_scale: float = 1.8
    guidance_low: float = 0.0
    guidance_high: float = 0.7
    path_type: str = "linear"
    class_balanced: bool = False
    chunk_size: int = DEFAULT_CHUNK_SIZE

    def __post_init__(self) -> None:
        from repa.sampling import SAMPLERS

        if self.sampler not in SAMPLERS:
            raise SamplingError(
                f"sample.sampler: {self.sampler!r} is unknown; choose one of {', '.join(SAMPLERS)}"
            )
        min_steps = 2 if self.sampler == "sde" else 1
        checks = [
            ("sample.num_samples", self.num_samples >= 1, ">= 1"),
            ("sample.seed", 0 <= self.seed < 2**63, "in [0, 2**63)"),
            ("model.num_classes", self.num_classes >= 1, ">= 1"),
            ("sample.num_steps", self.num_steps >= min_steps, f">= {min_steps} for {self.sampler}"),
            ("sample.cfg_scale", math.isfinite(self.cfg_scale) and self.cfg_scale >= 1.0, ">= 1"),
            (
                "sample.guidance_low",
                0.0 <= self.guidance_low <= self.guidance_high <= 1.0,
                "0 <= guidance_low <= guidance_high <= 1",
            ),
            ("chunk_size", self.chunk_size >= 1, ">= 1"),
        ]
        for key, ok, rule in checks:
            if not ok:
                raise SamplingError(f"{key}: must be {rule}; got spec {self}")

    @classmethod
    def from_config(cls, cfg: RunConfig, chunk_size: int = DEFAULT_CHUNK_SIZE) -> SampleSpec:
        s = cfg.sample
        return cls(
            num_samples=s.num_samples,
            seed=s.seed,
            num_classes=cfg.model.num_classes,
            sampler=s.sampler,
            num_steps=s.num_steps,
            cfg_scale=s.cfg_scale,
            guidance_low=s.guidance_low,
            guidance_high=s.guidance_high,
            path_type=cfg.objective.path_type,
            class_balanced=s.class_balanced,
            chunk_size=chunk_size,
        )

    @property
    def num_chunks(self) -> int:
        return -(-self.num_samples // self.chunk_size)

    def chunk_range(self, chunk: int) -> range:
        """Sample indices of chunk ``chunk``: ``[c·chunk_size, min((c+1)·chunk_size, N))``."""
        lo = chunk * self.chunk_size
        return range(lo, min(lo + self.chunk_size, self.num_samples))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


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


def sampling_identity(
    spec: SampleSpec, checkpoint: dict[str, Any] | None = None, vae: dict[str, Any] | None = None
) -> dict[str, Any]:
    """The JSON-able description that names a sample set (its digest picks the default folder)."""
    return {"format": FORMAT, "spec": spec.to_dict(), "checkpoint": checkpoint or {}, "vae": vae or {}}


def identity_digest(identity: dict[str, Any]) -> str:
    """sha256 of the canonical JSON of ``identity``."""
    return hashlib.sha256(json.dumps(identity, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


# ----------------------------------------------------------------------------------------------
# Chunk files: deterministic .npz bytes
# ----------------------------------------------------------------------------------------------


class _NpzWriter:
    """Uncompressed .npz with fixed timestamps (np.savez stamps the current time into the zip)."""

    def __init__(self, fileobj: Any) -> None:
        self.zf = zipfile.ZipFile(fileobj, "w", compression=zipfile.ZIP_STORED, allowZip64=True)

    def _member(self, name: str) -> Any:
        info = zipfile.ZipInfo(f"{name}.npy", date_time=_ZIP_DATE)
        info.compress_type = zipfile.ZIP_STORED
        return self.zf.open(info, "w", force_zip64=True)

    def add(self, name: str, array: np.ndarray) -> None:
        with self._member(name) as m:
            array = np.asarray(array)  # (np.ascontiguousarray would turn a 0-d array into 1-d)
            np.lib.format.write_array(
                m, array if array.flags.c_contiguous else array.copy(), allow_pickle=False
            )

    def add_streamed(
        self, name: str, shape: tuple[int, ...], dtype: Any, blocks: Iterator[np.ndarray]
    ) -> None:
        """Write an array of ``shape`` from row blocks without holding it in memory (50K x 256² = 9.8 GB)."""
        dtype = np.dtype(dtype)
        header = {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False, "shape": shape}
        rows = 0
        with self._member(name) as m:
            np.lib.format.write_array_header_1_0(m, header)
            for block in blocks:
                if block.dtype != dtype or block.shape[1:] != shape[1:]:
                    raise SamplingError(
                        f"{name}: block {block.dtype} {block.shape} does not fit {dtype} {shape}"
                    )
                m.write(np.ascontiguousarray(block).tobytes())
                rows += block.shape[0]
        if rows != shape[0]:
            raise SamplingError(f"{name}: wrote {rows} rows, expected {shape[0]}")

    def close(self) -> None:
        self.zf.close()


def _encode_chunk(images: np.ndarray, labels: np.ndarray, indices: np.ndarray, digest: str) -> bytes:
    buf = io.BytesIO()
    writer = _NpzWriter(buf)
    writer.add("arr_0", images)  # (n, H, W, 3) uint8: ADM's layout
    writer.add("labels", labels.astype(np.int64))
    writer.add("indices", indices.astype(np.int64))
    writer.add("identity_digest", np.asarray(digest))
    writer.close()
    return buf.getvalue()


@dataclass(frozen=True)
class SampleSet:
    """A finished (or partly finished) sample folder; reads chunks in sample order."""

    url: str
    identity: dict[str, Any]
    storage_options: dict[str, Any] | None = None

    @property
    def spec(self) -> SampleSpec:
        return SampleSpec(**self.identity["spec"])

    @property
    def digest(self) -> str:
        return identity_digest(self.identity)

    @property
    def num_samples(self) -> int:
        return self.spec.num_samples

    @property
    def npz_url(self) -> str:
        return storage.join(self.url, NPZ_FILE)

    def chunk_url(self, chunk: int) -> str:
        return storage.join(self.url, "chunks", f"chunk-{chunk:06d}.npz")

    def completed_chunks(self) -> set[int]:
        """Chunks whose file exists (atomic writes: existing = complete; temporary files do not match)."""
        names = storage.listdir(storage.join(self.url, "chunks"), self.storage_options)
        done = {int(m.group(1)) for m in map(_CHUNK_RE.match, names) if m}
        return {c for c in done if c < self.spec.num_chunks}

    def missing_chunks(self) -> list[int]:
        done = self.completed_chunks()
        return [c for c in range(self.spec.num_chunks) if c not in done]

    def read_chunk(self, chunk: int) -> dict[str, np.ndarray]:
        url = self.chunk_url(chunk)
        with np.load(io.BytesIO(storage.read_bytes(url, self.storage_options)), allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in npz.files}
        if str(arrays.get("identity_digest", "")) != self.digest:
            raise SamplingError(f"{url}: belongs to another sample set (digest differs from {PROTOCOL_FILE})")
        expected = self.spec.chunk_range(chunk)
        if not np.array_equal(arrays["indices"], np.arange(expected.start, expected.stop)):
            raise SamplingError(f"{url}: holds samples {arrays['indices'][:3]}..., expected {expected}")
        return arrays

    def iter_images(self) -> Iterator[np.ndarray]:
        """uint8 (n, H, W, 3) per chunk, in sample order (what ``repa.eval.metrics`` accepts)."""
        missing = self.missing_chunks()
        if missing:
            raise SamplingError(
                f"{self.url}: {len(missing)} chunk(s) missing (first {missing[:5]}); run `repa sample`"
            )
        for c in range(self.spec.num_chunks):
            yield self.read_chunk(c)["arr_0"]

    def labels(self) -> np.ndarray:
        return np.concatenate([self.read_chunk(c)["labels"] for c in range(self.spec.num_chunks)])

    @classmethod
    def open(cls, url: str, storage_options: dict[str, Any] | None = None) -> SampleSet:
        """The sample set at ``url`` (SamplingError naming it if there is none)."""
        purl = storage.join(url, PROTOCOL_FILE)
        try:
            protocol = json.loads(storage.read_bytes(purl, storage_options))
        except FileNotFoundError:
            raise SamplingError(f"{purl}: not found; {url} is not a `repa sample` output folder") from None
        if protocol.get("format") != FORMAT:
            raise SamplingError(f"{purl}: format {protocol.get('format')!r}, expected {FORMAT!r}")
        return cls(url, protocol["identity"], storage_options)


# ----------------------------------------------------------------------------------------------
# Generation
# ----------------------------------------------------------------------------------------------


class _Autocast:
    """``model(x, t, y)`` under autocast (bf16 on GPU); forwards ``null_class`` for the samplers."""

    def __init__(self, model: nn.Module, device: torch.device, dtype: torch.dtype | None) -> None:
        self.model, self.device, self.dtype = model, device, dtype

    @property
    def null_class(self) -> int | None:
        return getattr(self.model, "null_class", None)

    def __call__(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> Any:
        if self.dtype is None:
            return self.model(x, t, y)
        with torch.autocast(device_type=self.device.type, dtype=self.dtype):
            return self.model(x, t, y)


def resolve_precision(precision: str, device: torch.device) -> str:
    """``auto`` -> ``bf16`` on CUDA, ``fp32`` elsewhere; checks the name."""
    if precision == "auto":
        precision = "bf16" if torch.device(device).type == "cuda" else "fp32"
    if precision not in ("fp32", "bf16", "fp16"):
        raise SamplingError(f"precision: {precision!r}; choose auto, fp32, bf16 or fp16")
    return precision


def _autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[resolve_precision(precision, device)]


def _prepare_output(sample_set: SampleSet, overwrite_protocol: bool = False) -> list[int]:
    """Rank 0: write or check ``protocol.json``; return the chunks still to do."""
    url, so = sample_set.url, sample_set.storage_options
    purl = storage.join(url, PROTOCOL_FILE)
    if storage.exists(purl, so):
        existing = json.loads(storage.read_bytes(purl, so))
        if existing.get("digest") != sample_set.digest:
            diff = _describe_difference(existing.get("identity", {}), sample_set.identity)
            raise SamplingError(
                f"{url} already holds samples made with other settings ({diff}); use another output "
                "(sample.output_url) or delete that folder"
            )
    else:
        protocol = {
            "format": FORMAT,
            "digest": sample_set.digest,
            "identity": sample_set.identity,
            "num_chunks": sample_set.spec.num_chunks,
            "repa_version": repa.__version__,
            "created_at": time.time(),
        }
        storage.write_bytes_atomic(purl, json.dumps(protocol, indent=1, sort_keys=True).encode(), so)
    return sample_set.missing_chunks()


def _describe_difference(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> str:
    diffs = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            inner = _describe_difference(a, b, f"{prefix}{key}.")
            if inner:
                diffs.append(inner)
        elif a != b:
            diffs.append(f"{prefix}{key}: {a!r} there, {b!r} now")
    return "; ".join(diffs)


def generate_samples(
    model: nn.Module,
    spec: SampleSpec,
    *,
    out_url: str,
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
    storage_options: dict[str, Any] | None = None,
) -> SampleSet:
    """Generate ``spec.num_samples`` images into ``out_url`` (chunked, resumable); returns the set.

    ``model(x, t, y) -> (v, ...)`` with attributes ``in_channels``/``input_size`` (SiT), ``vae`` with
    ``decode_to_uint8(z, scale, bias)`` on the same device. ``dist``: this process's rank/world (None =
    single process); every rank calls this, rank 0 returns only once all chunks exist (and
    ``samples.npz`` if ``save_npz``). ``checkpoint``/``vae_identity`` are recorded in the identity.
    ``should_stop()`` is polled between batches; when true, raises :class:`SamplingInterrupted`.
    """
    from repa.sampling import sample

    if device is None:  # the process's device under torchrun, else where the model is
        device = dist.device if dist is not None else next(model.parameters()).device
    device = torch.device(device)
    info = dist or DistInfo(rank=0, world_size=1, local_rank=0, device=device)
    if batch_size < 1:
        raise SamplingError(f"sample.batch_size_per_device: must be >= 1, got {batch_size}")
    sample_set = SampleSet(out_url, sampling_identity(spec, checkpoint, vae_identity), storage_options)

    # Rank 0 decides what is left; every rank gets the same list (or rank 0's error).
    pending: list[int] | None = None
    error: str | None = None
    failure: BaseException | None = None
    if info.is_main:
        try:
            pending = _prepare_output(sample_set)
        except Exception as e:
            failure, error = e, f"{type(e).__name__}: {e}"
    pending, error = broadcast_object(info, (pending, error))  # type: ignore[misc]
    if failure is not None:
        raise failure
    if error is not None:
        raise SamplingError(f"rank 0 could not prepare {out_url}: {error}")
    assert pending is not None
    mine = pending[info.rank :: info.world_size]
    done_before = spec.num_chunks - len(pending)
    if info.is_main:
        log.info(
            "sampling %d images into %s: %d of %d chunks done, %d to do on %d process(es)",
            spec.num_samples,
            out_url,
            done_before,
            spec.num_chunks,
            len(pending),
            info.world_size,
        )

    model.eval()
    call = _Autocast(model, device, _autocast_dtype(precision, device))
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
            latents = sample(
                call,
                inputs.z.to(device),
                inputs.y.to(device),
                sampler=spec.sampler,
                num_steps=spec.num_steps,
                cfg_scale=spec.cfg_scale,
                guidance_low=spec.guidance_low,
                guidance_high=spec.guidance_high,
                path_type=spec.path_type,
                noise=None if inputs.noise is None else inputs.noise.to(device),
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
                    _encode_chunk(imgs, labels, idx, sample_set.digest),
                    storage_options,
                )
                log.debug("rank %d committed chunk %d (%d images)", info.rank, chunk, len(idx))
    elapsed = time.perf_counter() - started
    if total:
        log.info("rank %d: %d images in %.1f s (%.2f images/s)", info.rank, total, elapsed, total / elapsed)

    if info.is_main:
        _wait_for_chunks(sample_set, wait_poll_seconds, should_stop)
        if save_npz:
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


def _wait_for_chunks(
    sample_set: SampleSet, poll_seconds: float, should_stop: Callable[[], bool] | None
) -> None:
    """Rank 0 waits for the other ranks' chunks by listing storage (no collective, so no timeout)."""
    last_log = 0.0
    while True:
        missing = sample_set.missing_chunks()
        if not missing:
            return
        if should_stop is not None and should_stop():
            raise SamplingInterrupted(f"stopped while waiting for {len(missing)} chunk(s) of other ranks")
        if time.monotonic() - last_log > 60:
            log.info("waiting for %d chunk(s) from other ranks (first %s)", len(missing), missing[:5])
            last_log = time.monotonic()
        time.sleep(poll_seconds)


def assemble_npz(sample_set: SampleSet) -> str:
    """Write ``samples.npz`` (``arr_0`` uint8 (N, H, W, 3), ``labels``) from the chunks, streaming.

    Written under a temporary name and renamed, so ``samples.npz`` exists only once complete
    (a rename is atomic locally; on object stores it is a server-side copy).
    """
    url, so = sample_set.npz_url, sample_set.storage_options
    if storage.exists(url, so):
        return url
    first = sample_set.read_chunk(0)["arr_0"]
    shape = (sample_set.num_samples, *first.shape[1:])
    tmp = storage.join(sample_set.url, f".tmp-{uuid.uuid4().hex}-{NPZ_FILE}")
    fs, tmp_path = storage.filesystem(tmp, so)
    try:
        with storage.open_url(tmp, "wb", so) as f:
            writer = _NpzWriter(f)
            writer.add_streamed("arr_0", shape, np.uint8, sample_set.iter_images())
            writer.add("labels", sample_set.labels())
            writer.close()
        fs.mv(tmp_path, storage.filesystem(url, so)[1])
    finally:
        with contextlib.suppress(Exception):
            storage.remove(tmp, storage_options=so)
    log.info("wrote %s (%s uint8)", url, "x".join(map(str, shape)))
    return url


# ----------------------------------------------------------------------------------------------
# Checkpoints -> model
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CheckpointSource:
    """Where weights come from: a committed step folder of a run, or a weights file."""

    url: str  # step folder (kind "run") or .pt/.pth/.safetensors file (kind "file")
    kind: str  # "run" | "file"
    step: int | None = None
    run_url: str | None = None

    def describe(self, weights: str) -> dict[str, Any]:
        return {"url": self.url, "step": self.step, "weights": weights}


_WEIGHT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors", ".ckpt")


def _parent(url: str) -> tuple[str, str]:
    head, _, name = url.rstrip("/").rpartition("/")
    return head, name


def resolve_checkpoint(
    url: str | None, run_url: str | None, storage_options: dict[str, Any] | None = None
) -> CheckpointSource:
    """A checkpoint URL (step folder, its ema.pt/state.pt, or any weights file) or the latest committed
    checkpoint under ``run_url``; uncommitted step folders are refused."""
    if url is None:
        if not run_url:
            raise ConfigError(
                "sample.checkpoint_url",
                "no checkpoint given: pass --checkpoint URL, or set storage.run_url to use the run's latest "
                "committed checkpoint",
            )
        ref = ckpt.latest_checkpoint(run_url, storage_options)
        if ref is None:
            raise SamplingError(f"no committed checkpoint under {ckpt.checkpoints_url(run_url)}")
        return CheckpointSource(ref.url, "run", ref.step, run_url.rstrip("/"))
    folder, name = _parent(url)
    if name in (ckpt.EMA_FILE, ckpt.STATE_FILE) and storage.exists(
        storage.join(folder, ckpt.MARKER), storage_options
    ):
        url = folder  # a file inside a committed step folder: use the folder (and its recorded args)
    elif url.lower().endswith(_WEIGHT_SUFFIXES):
        if not storage.exists(url, storage_options):
            raise SamplingError(f"checkpoint {url}: not found")
        return CheckpointSource(url, "file")
    marker_url = storage.join(url, ckpt.MARKER)
    try:
        marker = json.loads(storage.read_bytes(marker_url, storage_options))
    except FileNotFoundError:
        what = (
            "does not exist" if not storage.listdir(url, storage_options) else f"has no {ckpt.MARKER} marker"
        )
        raise SamplingError(
            f"checkpoint {url}: {what}; only committed checkpoints are used (give a step folder with "
            f"{ckpt.MARKER}, or a .pt file)"
        ) from None
    checkpoints_dir = _parent(url)[0]
    run_candidate, dir_name = _parent(checkpoints_dir)
    run = run_candidate if dir_name == "checkpoints" else None
    return CheckpointSource(url.rstrip("/"), "run", int(marker["step"]), run)


def model_args_from_config(cfg: RunConfig) -> dict[str, Any]:
    """SiT constructor arguments (plus ``model``, the table name) that ``cfg`` describes.

    ``z_dims`` is not included: the encoders' widths are known only once built (or from a checkpoint).
    """
    from repa.vae import SD_VAE_CONFIG

    arch = cfg.model.architecture()
    return {
        "model": cfg.model.name,
        "input_size": cfg.data.resolution // VAE_DOWNSAMPLE[cfg.vae.name],
        "in_channels": 3 if cfg.vae.name == "none" else int(SD_VAE_CONFIG["latent_channels"]),
        **arch,
        "encoder_depth": cfg.model.encoder_depth if cfg.encoder.names else 0,
        "projector_dim": cfg.model.projector_dim,
        "class_dropout_prob": cfg.model.class_dropout_prob,
        "num_classes": cfg.model.num_classes,
        "qk_norm": cfg.model.qk_norm,
        "fused_attn": cfg.model.fused_attn,
    }


# Fields compared between a checkpoint and the config, with the config key that sets each.
_COMPARED = {
    "model": "model.name",
    "depth": "model.depth",
    "hidden_size": "model.hidden_size",
    "num_heads": "model.num_heads",
    "patch_size": "model.patch_size",
    "num_classes": "model.num_classes",
    "input_size": "data.resolution / vae downsampling",
    "in_channels": "vae.name (latent channels)",
    "qk_norm": "model.qk_norm",
}


def _sit_params() -> set[str]:
    from repa.models import SiT

    return set(inspect.signature(SiT).parameters)


def _resolve_arch(args: dict[str, Any]) -> dict[str, Any]:
    """Fill depth/hidden_size/num_heads/patch_size from the table entry ``args['model']``."""
    from repa.models import SiT_models

    name = args.get("model")
    if name not in SiT_models:
        raise SamplingError(f"checkpoint records model {name!r}, which is not in SiT_models")
    table = dict(getattr(SiT_models[name], "keywords", {}))
    out = dict(args)
    for key in ("depth", "hidden_size", "num_heads", "patch_size"):
        if out.get(key) is None:
            out[key] = table[key]
    return out


def _args_from_recorded(recorded: dict[str, Any]) -> dict[str, Any]:
    """Model args from a checkpoint's ``args``: repa's ema.pt layout, or REPA train.py's argparse args."""
    if "input_size" in recorded:  # repa: SiT kwargs + model name
        keep = _sit_params() | {"model"}
        args = {k: v for k, v in recorded.items() if k in keep}
    elif "resolution" in recorded:  # official REPA train.py: latents are resolution / 8 (SD-VAE)
        dims = recorded.get("projector_embed_dims", "768")
        args = {
            "model": recorded.get("model"),
            "input_size": int(recorded["resolution"]) // 8,
            "in_channels": 4,
            "encoder_depth": int(recorded.get("encoder_depth", 8)),
            "z_dims": [int(d) for d in str(dims).split(",") if d.strip()],
            "num_classes": int(recorded.get("num_classes", 1000)),
            "qk_norm": bool(recorded.get("qk_norm", False)),
            "fused_attn": bool(recorded.get("fused_attn", True)),
        }
    else:
        raise SamplingError(
            f"checkpoint args have neither input_size nor resolution: keys {sorted(recorded)}"
        )
    if "z_dims" in args:
        args["z_dims"] = [int(z) for z in args["z_dims"]]
    return _resolve_arch(args)


def _infer_from_state_dict(sd: dict[str, torch.Tensor]) -> dict[str, Any]:
    """What the tensor shapes say about the architecture (for error messages and missing z_dims)."""
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


def _mismatches(found: dict[str, Any], expected: dict[str, Any], label: str) -> list[str]:
    return [
        f"{_COMPARED[k]}: {label} {found[k]!r}, config {expected[k]!r}"
        for k in _COMPARED
        if k in found and k in expected and found[k] != expected[k]
    ]


@dataclass
class LoadedModel:
    """A SiT in eval mode with the arguments it was built from and where its weights came from."""

    model: nn.Module
    model_args: dict[str, Any]
    source: CheckpointSource
    weights: str

    @property
    def step(self) -> int | None:
        return self.source.step


def load_model(
    cfg: RunConfig,
    source: CheckpointSource,
    *,
    weights: str | None = None,
    device: torch.device | str = "cpu",
    check_config: bool = True,
    storage_options: dict[str, Any] | None = None,
) -> LoadedModel:
    """Rebuild the SiT a checkpoint was trained as, from its recorded arguments, and load its weights.

    Recorded arguments: ``ema.pt``'s ``args`` (repa or official REPA layout) or ``state.pt``'s config.
    A bare state dict (the authors' released EMA file) is built from ``cfg``. With ``check_config``,
    a checkpoint whose architecture differs from ``cfg``'s raises :class:`ModelMismatchError` naming
    every differing key.
    """
    from repa.models import build_model, load_reference_state_dict
    from repa.weights import load_torch_file

    weights = weights or cfg.sample.checkpoint_weights
    if weights not in ("ema", "model"):
        raise SamplingError(f"sample.checkpoint_weights: {weights!r}; choose ema or model")
    recorded: dict[str, Any] | None = None
    if source.kind == "run":
        ema_url = storage.join(source.url, ckpt.EMA_FILE)
        if weights == "ema" and storage.exists(ema_url, storage_options):
            obj = load_torch_file(ema_url, storage_options)
            recorded = (
                vars(obj["args"]) if isinstance(obj.get("args"), argparse.Namespace) else obj.get("args")
            )
            sd = load_reference_state_dict(obj, "ema")
        else:
            state = ckpt.load_checkpoint_state(
                ckpt.CheckpointRef(source.step or 0, source.url), storage_options
            )
            sd = load_reference_state_dict(state, weights)
            if state.get("config"):
                recorded = {
                    **model_args_from_config(RunConfig.from_dict(state["config"])),
                    "z_dims": _infer_from_state_dict(sd)["z_dims"],
                }
    else:
        obj = load_torch_file(source.url, storage_options)
        sd = load_reference_state_dict(obj, weights)
        args = obj.get("args") if isinstance(obj, dict) else None
        if isinstance(args, argparse.Namespace):
            recorded = vars(args)
        elif isinstance(args, dict):
            recorded = args
    inferred = _infer_from_state_dict(sd)
    expected = model_args_from_config(cfg)
    if recorded:
        args = _args_from_recorded(recorded)
        if check_config:
            problems = _mismatches(args, expected, "checkpoint")
            if problems:
                raise ModelMismatchError(
                    f"checkpoint {source.url} was trained as another model than the config describes: "
                    + "; ".join(problems)
                    + ". Use the run's own config (its config.yaml) or drop --config to use it"
                )
    else:
        args = {**expected, "z_dims": inferred["z_dims"]}
        if inferred.get("projector_dim"):
            args["projector_dim"] = inferred["projector_dim"]
        if not inferred["z_dims"]:
            args["encoder_depth"] = 0
    if args.get("z_dims") and not args.get("encoder_depth"):
        args["encoder_depth"] = 1  # projectors exist in the file; where they tap does not change v
    name = args["model"]
    kwargs = {k: v for k, v in args.items() if k != "model"}
    try:
        model = build_model(name, **kwargs)
        model.load_state_dict(sd, strict=True)
    except (RuntimeError, ValueError, TypeError) as e:
        problems = _mismatches(inferred, args, "weights")
        detail = "; ".join(problems) if problems else str(e).splitlines()[0]
        raise ModelMismatchError(f"weights in {source.url} do not fit model {name} {kwargs}: {detail}") from e
    model.eval().requires_grad_(False)
    log.info(
        "loaded %s weights of %s (step %s) into %s (%s)",
        weights,
        source.url,
        source.step,
        name,
        ", ".join(f"{k}={v}" for k, v in kwargs.items() if k in ("depth", "hidden_size", "input_size")),
    )
    return LoadedModel(model.to(device), args, source, weights)


def decoder_vae_identity(cfg: RunConfig) -> dict[str, Any]:
    """Which VAE decodes the samples: ``sample.vae_name`` (else ``vae.name``), its weights, scale and bias."""
    name = cfg.sample.vae_name or cfg.vae.name
    if cfg.sample.vae_name and cfg.sample.vae_name != cfg.vae.name:
        weights_url = cfg.sample.vae_weights_url
    else:
        weights_url = cfg.sample.vae_weights_url or cfg.vae.weights_url
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
    vae = build_vae(identity["name"], identity["weights_url"])
    return vae.to(device), identity


def default_output_url(cfg: RunConfig, source: CheckpointSource, digest: str) -> str:
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
        stem = re.sub(r"[^A-Za-z0-9_.-]", "_", _parent(source.url)[1].rsplit(".", 1)[0])
    return storage.join(run_url, "samples", f"{stem}-{digest[:10]}")


# ----------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------


def add_sampling_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags shared by `repa sample`, `repa eval` and `repa watch`."""
    from repa.config import add_config_arguments

    add_config_arguments(parser)
    parser.add_argument(
        "--preset",
        choices=sorted(PRESETS),
        help="named sampling protocol applied before --set (paper: SDE, 250 steps, cfg 1.8 on [0, 0.7], 50K)",
    )
    parser.add_argument(
        "--chunk-size",
        type=int,
        default=DEFAULT_CHUNK_SIZE,
        help="samples per chunk file: the unit of resumption and of work per rank "
        f"(default {DEFAULT_CHUNK_SIZE})",
    )
    parser.add_argument(
        "--precision",
        choices=["auto", "fp32", "bf16", "fp16"],
        help="autocast dtype of the model (default: train.precision; auto = bf16 on GPU, fp32 on CPU)",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_sampling_arguments(parser)
    parser.add_argument(
        "--checkpoint",
        "--reference-checkpoint",
        dest="checkpoint",
        metavar="URL",
        help="step folder, its ema.pt/state.pt, or a REPA .pt file ({ema, args, ...} or a bare state dict, "
        "built from the config's model args); default: sample.checkpoint_url, else the latest committed "
        "checkpoint under storage.run_url",
    )
    parser.add_argument("--output", metavar="URL", help="where samples go (sets sample.output_url)")


def resolve_config(args: argparse.Namespace, extra_overrides: Sequence[str] = ()) -> tuple[RunConfig, bool]:
    """The config for a sampling verb and whether it was given explicitly.

    Without ``--config``, a run checkpoint's own ``{run_url}/config.yaml`` is the base (so sampling a
    run needs no flags besides the checkpoint), then ``--preset`` and ``--set`` apply.
    """
    overrides = [f"sample.{k}={json.dumps(v)}" for k, v in PRESETS.get(args.preset or "", {}).items()]
    overrides += list(getattr(args, "overrides", []) or [])
    overrides += list(extra_overrides)
    cfg = load_config(args.config, overrides)
    if args.config is not None:
        return cfg, True
    so = cfg.storage.storage_options or None
    run_url = cfg.storage.run_url
    checkpoint = getattr(args, "checkpoint", None) or cfg.sample.checkpoint_url
    if checkpoint:
        with contextlib.suppress(SamplingError, FileNotFoundError):  # reported properly by the caller
            src = resolve_checkpoint(checkpoint, None, so)
            run_url = src.run_url or run_url
    if run_url:
        config_url = storage.join(run_url, "config.yaml")
        if storage.exists(config_url, so):
            log.info("using the run's config %s", config_url)
            return load_config(config_url, overrides), False
    return cfg, False


def cli_error(verb: str, e: BaseException) -> int:
    print(f"repa {verb}: error: {e}", file=sys.stderr)
    return 2


def run(args: argparse.Namespace) -> int:
    from repa import runtime as D

    extra = [f"sample.output_url={json.dumps(args.output)}"] if args.output else []
    cfg, explicit = resolve_config(args, extra)
    info = D.init_distributed(cfg.train.device, cfg.train.process_group_timeout_seconds)
    try:
        so = cfg.storage.storage_options or None
        source = resolve_checkpoint(args.checkpoint or cfg.sample.checkpoint_url, cfg.storage.run_url, so)
        loaded = load_model(cfg, source, device=info.device, check_config=explicit, storage_options=so)
        enable_tf32(cfg, info.device)
        vae, vae_identity = build_decoder_vae(cfg, info.device)
        spec = SampleSpec.from_config(cfg, args.chunk_size)
        checkpoint = source.describe(loaded.weights)
        digest = identity_digest(sampling_identity(spec, checkpoint, vae_identity))
        out_url = default_output_url(cfg, source, digest)
        sample_set = generate_samples(
            loaded.model,
            spec,
            out_url=out_url,
            vae=vae,
            batch_size=cfg.sample.batch_size_per_device,
            dist=info,
            precision=args.precision or cfg.train.precision,
            latents_scale=cfg.vae.latents_scale,
            latents_bias=cfg.vae.latents_bias,
            save_npz=cfg.sample.save_npz,
            checkpoint=checkpoint,
            vae_identity=vae_identity,
            progress=not args.no_progress,
            storage_options=so,
        )
    except (SamplingError, ValueError, FileNotFoundError) as e:
        if isinstance(e, ConfigError):
            raise
        return cli_error("sample", e)
    finally:
        D.shutdown()
    if info.is_main:
        print(f"{sample_set.num_samples} samples in {sample_set.url}")
    return 0


def enable_tf32(cfg: RunConfig, device: torch.device) -> None:
    if device.type == "cuda" and cfg.train.allow_tf32:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
