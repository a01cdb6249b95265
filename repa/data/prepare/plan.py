"""The `repa prepare` plan: which source file becomes which key in which shard, and which worker writes it.

Order and split are deterministic: synsets sorted (label = sorted index, as the reference), file
names sorted, then one fixed-seed global permutation (``numpy.random.RandomState(seed)``, whose
stream NumPy keeps frozen), then consecutive runs of ``samples_per_shard`` samples per shard. The
permutation makes every shard class-mixed: the streaming reader permutes the shards and the samples
within each shard and interleaves a few shards at a time (``repa.data.order``), which only mixes
classes well if each shard already holds many classes (ImageNet sorted by synset would put 1-2
classes in a shard). Worker ``i`` of ``N`` writes shards ``i, i+N, ...``, so N workers produce
byte-identical output to one. The plan's fingerprint goes into ``plan.json`` and every sidecar.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

import repa
from repa import storage
from repa.data.format import CROP, FORMAT_VERSION
from repa.data.prepare.report import PrepareError
from repa.data.prepare.sources import Source, SourceFile

__all__ = [
    "DEFAULT_TARGET_SHARD_BYTES",
    "PLAN_NAME",
    "Plan",
    "estimate_sample_bytes",
    "make_plan",
    "read_plan",
    "resolve_worker",
    "worker_shards",
    "write_or_check_plan",
]

PLAN_NAME = "plan.json"
# 50-100 MB shards: big enough that per-object request overhead is small next to transfer time on
# S3/GCS, small enough that a 1.28M-image ImageNet gives ~3,500 shards to spread over workers/readers.
DEFAULT_TARGET_SHARD_BYTES = 80_000_000
_TAR_BLOCK = 512


# ----------------------------------------------------------------------------------------------
# Work units
# ----------------------------------------------------------------------------------------------


def resolve_worker(
    worker_index: int | None = None, worker_count: int | None = None, env: Mapping[str, str] | None = None
) -> tuple[int, int]:
    """``(index, count)`` of this worker: flags, else a Kubernetes Indexed Job, else torchrun, else (0, 1).

    Indexed Job: ``JOB_COMPLETION_INDEX`` (set by Kubernetes) with the count from ``--worker-count``
    or ``REPA_WORKER_COUNT`` (the Job's ``completions``; Kubernetes does not expose it). torchrun:
    ``RANK`` and ``WORLD_SIZE``.
    """
    env = os.environ if env is None else env

    def env_int(name: str) -> int | None:
        value = env.get(name)
        if value is None or value == "":
            return None
        try:
            return int(value)
        except ValueError:
            raise PrepareError(f"environment {name}={value!r}: expected an integer") from None

    index, count = worker_index, worker_count
    if index is None and env_int("JOB_COMPLETION_INDEX") is not None:
        index = env_int("JOB_COMPLETION_INDEX")
        count = count if count is not None else env_int("REPA_WORKER_COUNT")
        if count is None:
            raise PrepareError(
                "JOB_COMPLETION_INDEX is set (Kubernetes Indexed Job) but the worker count is not: pass "
                "--worker-count or set REPA_WORKER_COUNT to the Job's completions"
            )
    elif index is None and env_int("RANK") is not None:
        index = env_int("RANK")
        count = count if count is not None else env_int("WORLD_SIZE")
    if count is None:
        count = env_int("REPA_WORKER_COUNT") if index is not None else 1
        count = 1 if count is None else count
    index = 0 if index is None else index
    if count < 1:
        raise PrepareError(f"worker count: expected >= 1, got {count}")
    if not 0 <= index < count:
        raise PrepareError(f"worker index {index}: expected 0 <= index < worker count {count}")
    return index, count


def worker_shards(num_shards: int, worker_index: int, worker_count: int) -> list[int]:
    """Shards of worker ``i`` of ``N``: ``i, i+N, i+2N, ...`` (round-robin balances the work)."""
    return list(range(worker_index, num_shards, worker_count))


def estimate_sample_bytes(
    resolution: int, moments_shape: Sequence[int] | None = None, moments_itemsize: int = 2
) -> int:
    """Upper estimate of one sample's bytes in a shard with stored (level-0) PNG and moments.

    PNG: ``H * (3W + 1)`` filter+pixel bytes plus headers; tar: a 512-byte header per member and
    padding to 512. ``moments_shape`` defaults to SD-VAE's (8, H/8, W/8), so shards sized before the
    latents stage stay in range after it.
    """

    def member(n: int) -> int:
        return _TAR_BLOCK + _TAR_BLOCK * math.ceil(n / _TAR_BLOCK)

    raw = resolution * (3 * resolution + 1)
    png = raw + 5 * math.ceil(raw / 65535) + 64  # deflate stored-block headers + IHDR/IDAT/IEND
    shape = tuple(moments_shape) if moments_shape is not None else (8, resolution // 8, resolution // 8)
    moments = 128 + int(np.prod(shape)) * moments_itemsize
    return member(png) + member(8) + member(moments)


# ----------------------------------------------------------------------------------------------
# The plan: which source file becomes which key in which shard
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Plan:
    """Deterministic layout of the dataset: a pure function of the file list and the parameters."""

    class_names: tuple[str, ...]
    files: tuple[SourceFile, ...]  # in the prepared (shuffled) order; key of files[i] = sample_key(i)
    resolution: int
    samples_per_shard: int
    seed: int
    png_compress_level: int

    @property
    def num_shards(self) -> int:
        return math.ceil(len(self.files) / self.samples_per_shard)

    def shard_items(self, shard: int) -> list[tuple[int, SourceFile]]:
        """``(global index, source file)`` of the samples planned for ``shard``."""
        start = shard * self.samples_per_shard
        stop = min(len(self.files), start + self.samples_per_shard)
        return [(i, self.files[i]) for i in range(start, stop)]

    @property
    def fingerprint(self) -> str:
        """sha256 over everything that decides the bytes of the shards (not the source location)."""
        h = hashlib.sha256()
        head = {
            "format_version": FORMAT_VERSION,
            "resolution": self.resolution,
            "crop": CROP,
            "samples_per_shard": self.samples_per_shard,
            "seed": self.seed,
            "png_compress_level": self.png_compress_level,
            "class_names": list(self.class_names),
        }
        h.update(json.dumps(head, sort_keys=True).encode())
        for f in self.files:
            h.update(f"\n{f.label}\t{f.rel}".encode())
        return h.hexdigest()

    def to_dict(self) -> dict[str, Any]:
        """``plan.json``: what finalize needs without the source (no file list; see the sidecars)."""
        return {
            "format_version": FORMAT_VERSION,
            "fingerprint": self.fingerprint,
            "created_by": f"repa {repa.__version__}",
            "resolution": self.resolution,
            "crop": CROP,
            "samples_per_shard": self.samples_per_shard,
            "num_shards": self.num_shards,
            "num_planned": len(self.files),
            "shuffle_seed": self.seed,
            "png_compress_level": self.png_compress_level,
            "class_names": list(self.class_names),
        }


def make_plan(
    source: Source, *, resolution: int, samples_per_shard: int, seed: int = 0, png_compress_level: int = 0
) -> Plan:
    """Sorted class/file list -> fixed-seed global permutation -> consecutive shards."""
    if resolution <= 0:
        raise PrepareError(f"resolution: expected > 0, got {resolution}")
    if samples_per_shard <= 0:
        raise PrepareError(f"samples_per_shard: expected > 0, got {samples_per_shard}")
    if not 0 <= png_compress_level <= 9:
        raise PrepareError(f"png_compress_level: expected 0..9, got {png_compress_level}")
    files = source.files
    # RandomState's stream is frozen by NumPy's compatibility policy (NEP 19): same order forever.
    order = np.random.RandomState(seed).permutation(len(files))
    return Plan(
        class_names=tuple(source.class_names),
        files=tuple(files[i] for i in order),
        resolution=resolution,
        samples_per_shard=samples_per_shard,
        seed=seed,
        png_compress_level=png_compress_level,
    )


def read_plan(data_url: str | storage.Location) -> dict[str, Any]:
    url = storage.join(data_url, PLAN_NAME)
    try:
        doc = json.loads(storage.read_bytes(url))
    except FileNotFoundError:
        raise PrepareError(
            f"{data_url}: no {PLAN_NAME}; run `repa prepare images SOURCE {data_url}` first"
        ) from None
    except json.JSONDecodeError as e:
        raise PrepareError(f"{url}: not valid JSON ({e})") from None
    for name in ("fingerprint", "num_shards", "resolution", "class_names", "shuffle_seed"):
        if name not in doc:
            raise PrepareError(f"{url}: field {name!r} missing")
    return doc


def write_or_check_plan(out_url: str | storage.Location, plan: Plan) -> None:
    url = storage.join(out_url, PLAN_NAME)
    text = json.dumps(plan.to_dict(), indent=1) + "\n"
    try:
        existing = storage.read_bytes(url)
    except FileNotFoundError:
        existing = None
    except (OSError, storage.StorageError) as e:  # e.g. a path component is a file, no permission
        raise PrepareError(f"{out_url}: output not writable ({type(e).__name__}: {e})") from e
    if existing is not None:
        try:
            old = json.loads(existing).get("fingerprint")
        except (json.JSONDecodeError, AttributeError):
            old = None
        if old != plan.fingerprint:
            raise PrepareError(
                f"{out_url} already holds a dataset prepared with other source files or settings "
                f"({PLAN_NAME} fingerprint {old} != {plan.fingerprint}); use a new output URL or delete it"
            )
        return
    try:
        storage.write_bytes_atomic(url, text.encode())
    except (OSError, storage.StorageError) as e:
        raise PrepareError(f"{out_url}: output not writable ({type(e).__name__}: {e})") from e
