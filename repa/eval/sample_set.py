"""A sample set: what the samples are (spec, identity digest) and how they are stored (chunk files).

Layout (``output_url``, any fsspec URL)::

    protocol.json             what the samples are (spec, checkpoint, VAE) and its sha256 digest
    chunks/chunk-000000.npz   arr_0 uint8 (n, H, W, 3), labels, indices; written atomically
    samples.npz               optional (``sample.save_npz``): ADM-compatible ``arr_0`` (N, H, W, 3)

A chunk file exists only once complete (atomic write), so a rerun skips finished chunks and redoes
the rest; a rerun with different settings into the same folder is refused (the digest differs).
Chunk bytes are deterministic (fixed zip timestamps), so the same samples give the same sha256.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import json
import logging
import math
import re
import time
import uuid
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

import repa
from repa import storage

if TYPE_CHECKING:
    from repa.config import RunConfig

log = logging.getLogger(__name__)

__all__ = [
    "FORMAT",
    "NPZ_FILE",
    "PROTOCOL_FILE",
    "SampleSet",
    "SampleSpec",
    "SamplingError",
    "SamplingInterrupted",
    "assemble_npz",
    "encode_chunk",
    "identity_digest",
    "prepare_output",
    "sampling_identity",
    "wait_for_chunks",
]

FORMAT = "repa-samples-v1"
PROTOCOL_FILE = "protocol.json"
NPZ_FILE = "samples.npz"
_CHUNK_RE = re.compile(r"^chunk-(\d{6,})\.npz$")
# Fixed zip timestamps: the same samples give the same chunk bytes (and sha256) on every run.
_ZIP_DATE = (1980, 1, 1, 0, 0, 0)


class SamplingError(ValueError):
    """Bad sampling input or output location (names the URL/field); never a deep traceback."""


class SamplingInterrupted(RuntimeError):
    """``should_stop()`` asked to stop; completed chunks are kept, nothing partial is written."""


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
    chunk_size: int = 1000  # the default of sample.chunk_size

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
    def from_config(cls, cfg: RunConfig) -> SampleSpec:
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
            chunk_size=s.chunk_size,
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


def sampling_identity(
    spec: SampleSpec, checkpoint: dict[str, Any] | None = None, vae: dict[str, Any] | None = None
) -> dict[str, Any]:
    """The JSON-able description that names a sample set (its digest picks the default folder)."""
    return {"format": FORMAT, "spec": spec.to_dict(), "checkpoint": checkpoint or {}, "vae": vae or {}}


def identity_digest(identity: dict[str, Any]) -> str:
    """sha256 of the canonical JSON of ``identity``."""
    return hashlib.sha256(json.dumps(identity, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


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


def encode_chunk(images: np.ndarray, labels: np.ndarray, indices: np.ndarray, digest: str) -> bytes:
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

    location: storage.Location | str  # a plain URL string means no storage options
    identity: dict[str, Any]

    def __post_init__(self) -> None:
        if not isinstance(self.location, storage.Location):
            object.__setattr__(self, "location", storage.Location(str(self.location)))

    @property
    def url(self) -> str:
        return self.location.url

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
    def npz_url(self) -> storage.Location:
        return self.location.join(NPZ_FILE)

    def chunk_url(self, chunk: int) -> storage.Location:
        return self.location.join("chunks", f"chunk-{chunk:06d}.npz")

    def completed_chunks(self) -> set[int]:
        """Chunks whose file exists (atomic writes: existing = complete; temporary files do not match)."""
        names = storage.listdir(self.location.join("chunks"))
        done = {int(m.group(1)) for m in map(_CHUNK_RE.match, names) if m}
        return {c for c in done if c < self.spec.num_chunks}

    def missing_chunks(self) -> list[int]:
        done = self.completed_chunks()
        return [c for c in range(self.spec.num_chunks) if c not in done]

    def delete(self) -> None:
        """Remove the samples (chunks, ``samples.npz``, ``protocol.json``) and nothing else: the folder of
        a weights file's samples also holds its evaluation results (``repa.eval.evaluate``)."""
        for name in ("chunks", NPZ_FILE, PROTOCOL_FILE):
            where = self.location.join(name)
            try:
                if storage.exists(where):
                    storage.remove(where, recursive=name == "chunks")
            except FileNotFoundError:  # another process deleted it first: the same end state
                pass

    def read_chunk(self, chunk: int) -> dict[str, np.ndarray]:
        url = self.chunk_url(chunk)
        with np.load(io.BytesIO(storage.read_bytes(url)), allow_pickle=False) as npz:
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
    def open(cls, where: storage.Location | str) -> SampleSet:
        """The sample set at ``where`` (SamplingError naming it if there is none)."""
        at = storage.locate(where)
        purl = at.join(PROTOCOL_FILE)
        try:
            protocol = json.loads(storage.read_bytes(purl))
        except FileNotFoundError:
            raise SamplingError(f"{purl}: not found; {at} is not a `repa sample` output folder") from None
        if protocol.get("format") != FORMAT:
            raise SamplingError(f"{purl}: format {protocol.get('format')!r}, expected {FORMAT!r}")
        return cls(at, protocol["identity"])


def prepare_output(sample_set: SampleSet, overwrite_protocol: bool = False) -> list[int]:
    """Rank 0: write or check ``protocol.json``; return the chunks still to do."""
    url = sample_set.url
    purl = sample_set.location.join(PROTOCOL_FILE)
    if storage.exists(purl):
        existing = json.loads(storage.read_bytes(purl))
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
        storage.write_bytes_atomic(purl, json.dumps(protocol, indent=1, sort_keys=True).encode())
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


def wait_for_chunks(
    sample_set: SampleSet,
    poll_seconds: float,
    should_stop: Callable[[], bool] | None,
    *,
    part: int = 0,
    parts: int = 1,
) -> None:
    """Rank 0 waits for the other ranks' chunks by listing storage (no collective, so no timeout);
    with ``parts`` > 1 only for the chunks of its share (``c % parts == part``)."""
    last_log = 0.0
    while True:
        missing = [c for c in sample_set.missing_chunks() if c % parts == part]
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
    url = sample_set.npz_url
    if storage.exists(url):
        return url.url
    first = sample_set.read_chunk(0)["arr_0"]
    shape = (sample_set.num_samples, *first.shape[1:])
    tmp = sample_set.location.join(f".tmp-{uuid.uuid4().hex}-{NPZ_FILE}")
    fs, tmp_path = storage.filesystem(tmp)
    try:
        with storage.open_url(tmp, "wb") as f:
            writer = _NpzWriter(f)
            writer.add_streamed("arr_0", shape, np.uint8, sample_set.iter_images())
            writer.add("labels", sample_set.labels())
            writer.close()
        fs.mv(tmp_path, storage.filesystem(url)[1])
    finally:
        with contextlib.suppress(Exception):
            storage.remove(tmp)
    log.info("wrote %s (%s uint8)", url, "x".join(map(str, shape)))
    return url.url
