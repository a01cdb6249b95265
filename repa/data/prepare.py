"""`repa prepare`: ImageNet-style images -> WebDataset shards at any URL, then VAE moments into them.

Two stages, each idempotent and split into work units (shards) for N workers:

``images``  ``train/<synset>/*.JPEG`` (a folder or a ``.tar`` of it, on local disk or any fsspec URL)
            -> ADM center crop -> ``shard-NNNNNN.tar`` with ``{key}.png`` + ``{key}.cls``.
``latents`` each shard -> ``repa.vae`` ``encode_moments`` -> the same shard rewritten with
            ``{key}.moments.npy`` added (REPA's ``dataset_tools.py encode``, but batched, CPU or GPU,
            multi-worker; the reference's is CUDA-only, batch 1, single process, REPA.md §4).

Order and split are deterministic: synsets sorted (label = sorted index, as the reference), file
names sorted, then one fixed-seed global permutation (``numpy.random.RandomState(seed)``, whose
stream NumPy keeps frozen), then consecutive runs of ``samples_per_shard`` samples per shard. The
permutation makes every shard class-mixed: the streaming reader shuffles the shard order and a
buffer within shards, which only mixes classes well if each shard already holds many classes
(ImageNet sorted by synset would put 1-2 classes in a shard). Worker ``i`` of ``N`` writes shards
``i, i+N, ...``, so N workers produce byte-identical output to one.

Restart: a shard is committed atomically (local: temp file + rename; object stores: one PUT), then
its sidecar ``shard-NNNNNN.json`` (ShardInfo + key -> source file). A shard whose sidecar exists,
belongs to the same plan and whose size matches is skipped. ``manifest.json`` is assembled from
the sidecars by whichever worker finds them all present (or by ``repa prepare finalize``).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import io
import json
import logging
import math
import os
import re
import sys
import tarfile
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
from PIL import Image

import repa
from repa import storage
from repa.data.format import (
    CROP,
    FORMAT_VERSION,
    MANIFEST_NAME,
    MOMENTS_DTYPES,
    Manifest,
    ManifestError,
    Sample,
    ShardError,
    ShardInfo,
    SkippedFile,
    adm_center_crop,
    check_shard_bytes,
    decode_png,
    encode_png,
    iter_shard,
    moments_float16_error,
    read_manifest,
    sample_key,
    sha256_hex,
    shard_name,
    sidecar_name,
    write_shard,
)

logger = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_MAX_BAD_FRACTION",
    "DEFAULT_TARGET_SHARD_BYTES",
    "IMAGE_EXTENSIONS",
    "PLAN_NAME",
    "Plan",
    "PrepareError",
    "PrepareSummary",
    "SourceFile",
    "add_arguments",
    "estimate_sample_bytes",
    "finalize",
    "make_plan",
    "open_source",
    "prepare_images",
    "prepare_latents",
    "read_manifest",
    "resolve_worker",
    "run",
    "verify_dataset",
    "worker_shards",
]

IMAGE_EXTENSIONS = (".jpeg", ".jpg", ".png")
PLAN_NAME = "plan.json"
# 50-100 MB shards: big enough that per-object request overhead is small next to transfer time on
# S3/GCS, small enough that a 1.28M-image ImageNet gives ~3,500 shards to spread over workers/readers.
DEFAULT_TARGET_SHARD_BYTES = 80_000_000
DEFAULT_MAX_BAD_FRACTION = 0.001
_TAR_BLOCK = 512
_OBJECT_REPR = re.compile(r"\s*<[^<>]* at 0x[0-9a-fA-F]+>")


class PrepareError(ValueError):
    """Bad input or state for `repa prepare` (source layout, unwritable output, too many bad images)."""


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
# Sources: a folder tree or a tar of it
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class SourceFile:
    """One source image: ``rel`` = ``"<synset>/<file name>"``; tar sources also give its byte range."""

    rel: str
    label: int
    offset: int = -1
    size: int = -1


def _is_image(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS) and not name.startswith(".")


def _build_files(
    per_class: dict[str, list[SourceFile]], url: str, max_per_class: int | None
) -> list[SourceFile]:
    """Sorted classes, sorted names, labels = sorted class index; optional per-class cap."""
    if not per_class:
        raise PrepareError(
            f"{url}: no class folders found (expected <class>/<image>.JPEG, "
            "e.g. ILSVRC train/n01440764/*.JPEG)"
        )
    files = []
    for label, name in enumerate(sorted(per_class)):
        entries = sorted(per_class[name], key=lambda f: f.rel)
        if not entries:
            raise PrepareError(f"{url}: class folder {name!r} has no images ({', '.join(IMAGE_EXTENSIONS)})")
        if max_per_class is not None:
            entries = entries[:max_per_class]
        files.extend(dataclasses.replace(f, label=label) for f in entries)
    return files


class FolderSource:
    """``root/<class>/<image>`` on any fsspec URL; ``root/train/<class>/...`` is found too (ILSVRC)."""

    def __init__(
        self,
        url: str,
        *,
        max_per_class: int | None = None,
        storage_options: dict[str, Any] | None = None,
        num_threads: int = 8,
    ) -> None:
        self.storage_options = storage_options
        entries = storage.list_entries(url, storage_options)
        dirs = [e.name for e in entries if e.is_dir and not e.name.startswith(".")]
        if dirs == ["train"] or ("train" in dirs and {"val", "test"} & set(dirs)):
            logger.info("%s: using its train/ folder (ILSVRC layout)", url)
            url = storage.join(url, "train")
            entries = storage.list_entries(url, storage_options)
            dirs = [e.name for e in entries if e.is_dir and not e.name.startswith(".")]
        self.url = url

        def list_class(name: str) -> list[SourceFile]:
            found = storage.list_entries(storage.join(url, name), storage_options)
            return [SourceFile(f"{name}/{e.name}", -1) for e in found if not e.is_dir and _is_image(e.name)]

        with ThreadPoolExecutor(max(1, num_threads)) as pool:  # object stores: one LIST per class
            listed = dict(zip(dirs, pool.map(list_class, dirs)))
        self.files = _build_files(listed, url, max_per_class)
        self.class_names = tuple(sorted(listed))

    def read(self, f: SourceFile) -> bytes:
        return storage.read_bytes(storage.join(self.url, f.rel), self.storage_options)

    def close(self) -> None:
        pass


class TarSource:
    """A ``.tar`` of the class tree (``[prefix/]<class>/<image>``) or of per-class tars (``<class>.tar``,
    the layout of ILSVRC2012_img_train.tar). Members are indexed once by scanning headers, then read
    by byte range, so workers read only their own images (local disk: cheap; object stores: the
    scan streams the file once per worker, so prefer an extracted folder there for large N).
    """

    def __init__(
        self, url: str, *, max_per_class: int | None = None, storage_options: dict[str, Any] | None = None
    ) -> None:
        self.url = url
        fs, path = storage.filesystem(url, storage_options)
        self._file = storage.retry(lambda: fs.open(path, "rb"), what=url)
        self._lock = threading.Lock()
        per_class: dict[str, list[SourceFile]] = {}
        depths: set[int] = set()
        try:
            with tarfile.open(fileobj=self._file, mode="r:") as outer:
                for member in outer:
                    if not member.isfile():
                        continue
                    parts = [p for p in member.name.split("/") if p not in ("", ".")]
                    if not parts or parts[-1].startswith("."):
                        continue
                    if len(parts) == 1 and parts[0].lower().endswith(".tar"):  # <class>.tar
                        name = parts[0][: -len(".tar")]
                        inner_file = outer.extractfile(member)
                        with tarfile.open(fileobj=inner_file, mode="r:") as inner:
                            per_class[name] = [
                                SourceFile(
                                    f"{name}/{m.name.rsplit('/', 1)[-1]}",
                                    -1,
                                    member.offset_data + m.offset_data,
                                    m.size,
                                )
                                for m in inner
                                if m.isfile() and _is_image(m.name.rsplit("/", 1)[-1])
                            ]
                    elif len(parts) >= 2 and _is_image(parts[-1]):
                        depths.add(len(parts))
                        rel = f"{parts[-2]}/{parts[-1]}"
                        per_class.setdefault(parts[-2], []).append(
                            SourceFile(rel, -1, member.offset_data, member.size)
                        )
        except tarfile.TarError as e:
            self._file.close()
            raise PrepareError(f"{url}: not a readable tar ({e})") from e
        if len(depths) > 1:
            self._file.close()
            raise PrepareError(
                f"{url}: images at different folder depths {sorted(depths)}; "
                "expected one <class>/<image> level"
            )
        rels = [f.rel for files in per_class.values() for f in files]
        if len(rels) != len(set(rels)):
            self._file.close()
            raise PrepareError(f"{url}: the same <class>/<image> appears twice in the tar")
        self.files = _build_files(per_class, url, max_per_class)
        self.class_names = tuple(sorted(per_class))

    def read(self, f: SourceFile) -> bytes:
        def read() -> bytes:
            with self._lock:  # one shared handle: seek + read must not interleave between threads
                self._file.seek(f.offset)
                return self._file.read(f.size)

        data = storage.retry(read, what=f"{self.url}:{f.rel}")
        if len(data) != f.size:
            raise PrepareError(f"{self.url}: member {f.rel} is truncated ({len(data)} of {f.size} bytes)")
        return data

    def close(self) -> None:
        self._file.close()


Source = FolderSource | TarSource


def open_source(
    source_url: str,
    *,
    max_per_class: int | None = None,
    storage_options: dict[str, Any] | None = None,
    num_threads: int = 8,
) -> Source:
    """A FolderSource or (``*.tar``) TarSource; PrepareError if missing or without class folders."""
    if not storage.exists(source_url, storage_options):
        raise PrepareError(f"{source_url}: source not found")
    if source_url.rstrip("/").lower().endswith(".tar"):
        return TarSource(source_url, max_per_class=max_per_class, storage_options=storage_options)
    return FolderSource(
        source_url, max_per_class=max_per_class, storage_options=storage_options, num_threads=num_threads
    )


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


def _read_plan(data_url: str, storage_options: dict[str, Any] | None) -> dict[str, Any]:
    url = storage.join(data_url, PLAN_NAME)
    try:
        doc = json.loads(storage.read_bytes(url, storage_options))
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


def _write_or_check_plan(out_url: str, plan: Plan, storage_options: dict[str, Any] | None) -> None:
    url = storage.join(out_url, PLAN_NAME)
    text = json.dumps(plan.to_dict(), indent=1) + "\n"
    try:
        existing = storage.read_bytes(url, storage_options)
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
        storage.write_bytes_atomic(url, text.encode(), storage_options)
    except (OSError, storage.StorageError) as e:
        raise PrepareError(f"{out_url}: output not writable ({type(e).__name__}: {e})") from e


# ----------------------------------------------------------------------------------------------
# Sidecars: per-shard records, the unit of restart
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Sidecar:
    """``shard-NNNNNN.json``: the committed shard's ShardInfo, provenance, and latents state."""

    plan: str
    shard: ShardInfo
    sources: dict[str, str]  # key -> "<class>/<file>"
    vae: str | None = None
    vae_details: dict[str, Any] | None = None
    moments_dtype: str | None = None
    moments_shape: tuple[int, ...] | None = None
    moments_fp16_error: dict[str, float] | None = None
    pending: dict[str, Any] | None = None  # latents rewrite in flight: the new shard's {bytes, sha256}

    def to_json(self) -> bytes:
        d = dataclasses.asdict(self)
        d["shard"] = self.shard.to_dict()
        d["moments_shape"] = None if self.moments_shape is None else list(self.moments_shape)
        d["format_version"] = FORMAT_VERSION
        return (json.dumps(d, indent=1) + "\n").encode()

    @classmethod
    def from_json(cls, data: bytes, *, where: str) -> Sidecar:
        try:
            d = json.loads(data)
            if not isinstance(d, dict):
                raise ValueError("not an object")
            shape = d.get("moments_shape")
            return cls(
                plan=d["plan"],
                shard=ShardInfo.from_dict(d["shard"], where=f"{where}: shard"),
                sources=dict(d.get("sources", {})),
                vae=d.get("vae"),
                vae_details=d.get("vae_details"),
                moments_dtype=d.get("moments_dtype"),
                moments_shape=None if shape is None else tuple(shape),
                moments_fp16_error=d.get("moments_fp16_error"),
                pending=d.get("pending"),
            )
        except ManifestError:
            raise
        except (ValueError, KeyError, TypeError) as e:
            raise ManifestError(f"{where}: malformed sidecar ({type(e).__name__}: {e})") from None


def _read_sidecar(data_url: str, shard: int, storage_options: dict[str, Any] | None) -> Sidecar:
    url = storage.join(data_url, sidecar_name(shard))
    return Sidecar.from_json(storage.read_bytes(url, storage_options), where=url)


def _write_sidecar(
    data_url: str, shard: int, sidecar: Sidecar, storage_options: dict[str, Any] | None
) -> None:
    storage.write_bytes_atomic(
        storage.join(data_url, sidecar_name(shard)), sidecar.to_json(), storage_options
    )


# ----------------------------------------------------------------------------------------------
# Summary
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass
class PrepareSummary:
    """What one `repa prepare` invocation did (printed by the CLI)."""

    stage: str
    worker_index: int = 0
    worker_count: int = 1
    shards_assigned: int = 0
    shards_written: int = 0
    shards_skipped: int = 0
    samples_written: int = 0
    bytes_written: int = 0
    bad_files: list[SkippedFile] = dataclasses.field(default_factory=list)
    moments_fp16_error: dict[str, float] | None = None
    manifest: Manifest | None = None
    seconds: float = 0.0

    def format(self) -> str:
        lines = [
            f"repa prepare {self.stage}: worker {self.worker_index}/{self.worker_count}: "
            f"{self.shards_written} of {self.shards_assigned} shards written, "
            f"{self.shards_skipped} already done; "
            f"{self.samples_written:,} samples, {self.bytes_written / 1e6:,.1f} MB in {self.seconds:,.1f} s"
        ]
        if self.bad_files:
            lines.append(f"skipped {len(self.bad_files)} unreadable source image(s):")
            lines.extend(f"  {b.source} (key {b.key}): {b.reason}" for b in self.bad_files[:50])
            if len(self.bad_files) > 50:
                lines.append(f"  ... and {len(self.bad_files) - 50} more (listed in the shards' sidecars)")
        if self.moments_fp16_error:
            e = self.moments_fp16_error
            lines.append(
                f"float16 moments: posterior-latent relative error {e['rel_l2']:.2e} "
                f"(max |err|/posterior std {e['max_abs_over_std']:.2e}; "
                f"bfloat16 rounding of the same latents: {e['bf16_input_rel_l2']:.2e})"
            )
        if self.manifest is not None:
            m = self.manifest
            lines.append(
                f"{MANIFEST_NAME} written: {m.num_samples:,} samples, {len(m.shards)} shards, "
                f"{m.num_classes} classes, {m.total_bytes / 1e9:,.2f} GB, vae={m.vae}"
            )
        else:
            lines.append(f"{MANIFEST_NAME} not written yet: other shards are still to do (or run `finalize`)")
        return "\n".join(lines)


def _progress(total: int, desc: str, enabled: bool) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="shard", disable=not enabled, dynamic_ncols=True)


# ----------------------------------------------------------------------------------------------
# Stage 1: images
# ----------------------------------------------------------------------------------------------


def _load_image(source: Source, f: SourceFile, resolution: int, compress_level: int) -> bytes | str:
    """PNG bytes of the ADM-cropped image, or the reason it is unusable (read errors propagate)."""
    raw = source.read(f)
    try:
        with Image.open(io.BytesIO(raw)) as image:
            image.load()
            return encode_png(adm_center_crop(image, resolution), compress_level)
    except Exception as e:  # PIL raises OSError, ValueError, SyntaxError, DecompressionBombError ...
        # Reasons go into sidecars and manifest.json, which must be byte-identical between runs:
        # drop object reprs such as "<_io.BytesIO object at 0x7f...>".
        message = _OBJECT_REPR.sub("", str(e)).strip()
        return f"{type(e).__name__}: {message}" if message else type(e).__name__


def _shard_done(
    data_url: str, shard: int, fingerprint: str, entries: dict[str, storage.Entry], options
) -> bool:
    """True if shard and sidecar are committed for this plan and the shard has the recorded size."""
    side, tar = entries.get(sidecar_name(shard)), entries.get(shard_name(shard))
    if side is None or tar is None:
        return False
    try:
        sidecar = _read_sidecar(data_url, shard, options)
    except ManifestError as e:
        logger.warning("%s; redoing the shard", e)
        return False
    if sidecar.plan != fingerprint:
        raise PrepareError(
            f"{storage.join(data_url, sidecar_name(shard))}: belongs to another plan ({sidecar.plan}); "
            "the output URL holds a different dataset: use a new URL or delete it"
        )
    size = (
        tar.size if tar.size is not None else storage.size(storage.join(data_url, shard_name(shard)), options)
    )
    expected = sidecar.pending["bytes"] if sidecar.pending else sidecar.shard.bytes
    if size not in (sidecar.shard.bytes, expected):
        logger.warning("%s: size %s != %s in its sidecar; redoing it", shard_name(shard), size, expected)
        return False
    return True


def prepare_images(
    source_url: str,
    out_url: str,
    *,
    resolution: int = 256,
    samples_per_shard: int | None = None,
    target_shard_bytes: int = DEFAULT_TARGET_SHARD_BYTES,
    seed: int = 0,
    max_per_class: int | None = None,
    png_compress_level: int = 0,
    num_workers: int | None = None,
    worker_index: int | None = None,
    worker_count: int | None = None,
    max_bad_fraction: float = DEFAULT_MAX_BAD_FRACTION,
    progress: bool = False,
    storage_options: dict[str, Any] | None = None,
    source_storage_options: dict[str, Any] | None = None,
) -> PrepareSummary:
    """Stage 1: ImageNet-style source -> ``shard-NNNNNN.tar`` (png + cls) + sidecars at ``out_url``.

    ``samples_per_shard`` defaults to ``target_shard_bytes // estimate_sample_bytes(resolution)``.
    ``num_workers``: decode threads in this process (PIL releases the GIL while decoding/resizing).
    ``worker_index/worker_count``: this process's share (see ``resolve_worker``). Unreadable source
    images are skipped and listed; PrepareError once more than ``max_bad_fraction`` of this worker's
    images are bad. Writes ``manifest.json`` if this worker completes the set.
    """
    t0 = time.monotonic()
    index, count = resolve_worker(worker_index, worker_count)
    if not 0.0 <= max_bad_fraction <= 1.0:
        raise PrepareError(f"max_bad_fraction: expected 0..1, got {max_bad_fraction}")
    if samples_per_shard is None:
        samples_per_shard = max(1, target_shard_bytes // estimate_sample_bytes(resolution))
    threads = num_workers if num_workers is not None else min(8, os.cpu_count() or 1)
    source = open_source(
        source_url, max_per_class=max_per_class, storage_options=source_storage_options, num_threads=threads
    )
    summary = PrepareSummary("images", index, count)
    try:
        plan = make_plan(
            source,
            resolution=resolution,
            samples_per_shard=samples_per_shard,
            seed=seed,
            png_compress_level=png_compress_level,
        )
        logger.info(
            "plan %s: %d images, %d classes, %d shards of %d; worker %d/%d",
            plan.fingerprint[:12],
            len(plan.files),
            len(plan.class_names),
            plan.num_shards,
            samples_per_shard,
            index,
            count,
        )
        _write_or_check_plan(out_url, plan, storage_options)
        mine = worker_shards(plan.num_shards, index, count)
        summary.shards_assigned = len(mine)
        storage.cleanup_temps(
            out_url, [n for s in mine for n in (shard_name(s), sidecar_name(s))], storage_options
        )
        entries = {e.name: e for e in storage.list_entries(out_url, storage_options)}
        with ThreadPoolExecutor(16) as pool:  # one small GET per finished shard: overlap them
            done = list(
                pool.map(lambda s: _shard_done(out_url, s, plan.fingerprint, entries, storage_options), mine)
            )
        todo = [s for s, finished in zip(mine, done) if not finished]
        summary.shards_skipped = len(mine) - len(todo)
        # Early abort only once this worker cannot end below the limit; finalize checks the whole set.
        planned = sum(len(plan.shard_items(s)) for s in mine)
        with ThreadPoolExecutor(max(1, threads)) as pool, _progress(len(todo), "images", progress) as bar:
            for s in todo:
                items = plan.shard_items(s)
                results = list(
                    pool.map(lambda it: _load_image(source, it[1], resolution, png_compress_level), items)
                )
                samples: list[Sample] = []
                skipped: list[SkippedFile] = []
                for (i, f), result in zip(items, results):
                    key = sample_key(i)
                    if isinstance(result, str):
                        skipped.append(SkippedFile(key, f.rel, result))
                    else:
                        samples.append(Sample(key=key, png=result, label=f.label, moments=None))
                summary.bad_files.extend(skipped)
                if len(summary.bad_files) > max_bad_fraction * planned:
                    raise PrepareError(_too_many_bad(summary.bad_files, planned, max_bad_fraction, out_url))
                data = write_shard(samples)
                info = ShardInfo(
                    shard_name(s), items[0][0], len(samples), len(data), sha256_hex(data), tuple(skipped)
                )
                sidecar = Sidecar(plan.fingerprint, info, {sample_key(i): f.rel for i, f in items})
                storage.write_bytes_atomic(storage.join(out_url, shard_name(s)), data, storage_options)
                _write_sidecar(out_url, s, sidecar, storage_options)
                summary.shards_written += 1
                summary.samples_written += len(samples)
                summary.bytes_written += len(data)
                bar.update(1)
                bar.set_postfix(samples=summary.samples_written, bad=len(summary.bad_files))
    finally:
        source.close()
    summary.manifest = finalize(out_url, max_bad_fraction=max_bad_fraction, storage_options=storage_options)
    summary.seconds = time.monotonic() - t0
    logger.info("%s", summary.format().splitlines()[0])
    return summary


def _too_many_bad(bad: Sequence[SkippedFile], total: int, limit: float, where: str) -> str:
    listed = "; ".join(f"{b.source}: {b.reason}" for b in bad[:10])
    more = f" (+{len(bad) - 10} more)" if len(bad) > 10 else ""
    return (
        f"{where}: {len(bad)} of {total} source images are unreadable, more than max_bad_fraction={limit} "
        f"allows: {listed}{more}. Check the source, or raise --max-bad-fraction to accept them"
    )


# ----------------------------------------------------------------------------------------------
# Manifest assembly and verification
# ----------------------------------------------------------------------------------------------


def _vae_identity(sidecar: Sidecar) -> tuple[Any, ...]:
    details = sidecar.vae_details or {}
    return (sidecar.vae, details.get("weights_sha256"), sidecar.moments_dtype, sidecar.moments_shape)


def finalize(
    data_url: str,
    *,
    max_bad_fraction: float | None = None,
    storage_options: dict[str, Any] | None = None,
) -> Manifest | None:
    """Assemble ``manifest.json`` from ``plan.json`` + all sidecars; None if some shard is not done yet.

    Idempotent and deterministic (N workers racing here write identical bytes, atomically). Also
    None while a latents run is half done (shards with and without moments). PrepareError if the
    dataset-wide fraction of unreadable images exceeds ``max_bad_fraction``.
    """
    plan = _read_plan(data_url, storage_options)
    num_shards = int(plan["num_shards"])
    names = {e.name for e in storage.list_entries(data_url, storage_options)}
    missing = [s for s in range(num_shards) if sidecar_name(s) not in names or shard_name(s) not in names]
    if missing:
        logger.info(
            "%s: %d of %d shards not done yet; manifest not written", data_url, len(missing), num_shards
        )
        return None
    with ThreadPoolExecutor(16) as pool:
        sidecars = list(pool.map(lambda s: _read_sidecar(data_url, s, storage_options), range(num_shards)))
    for s, side in enumerate(sidecars):
        if side.plan != plan["fingerprint"]:
            raise PrepareError(
                f"{storage.join(data_url, sidecar_name(s))}: belongs to another plan ({side.plan})"
            )
    identities = {_vae_identity(side) for side in sidecars}
    pending = [s for s, side in enumerate(sidecars) if side.pending]
    if len(identities) > 1 or pending:
        logger.info(
            "%s: latents stage incomplete (shards differ in vae/moments); manifest not written", data_url
        )
        return None
    bad = [b for side in sidecars for b in side.shard.skipped]
    planned = sum(side.shard.num_planned for side in sidecars)
    if max_bad_fraction is not None and len(bad) > max_bad_fraction * planned:
        raise PrepareError(_too_many_bad(bad, planned, max_bad_fraction, data_url))
    first = sidecars[0]
    manifest = Manifest(
        resolution=int(plan["resolution"]),
        class_names=tuple(plan["class_names"]),
        shards=tuple(side.shard for side in sidecars),
        shuffle_seed=int(plan["shuffle_seed"]),
        vae=first.vae,
        vae_details=first.vae_details,
        moments_dtype=first.moments_dtype,
        moments_shape=first.moments_shape,
        created_by=str(plan.get("created_by", "")),
    ).validate(storage.join(data_url, MANIFEST_NAME))
    text = manifest.to_json().encode()
    url = storage.join(data_url, MANIFEST_NAME)
    try:
        current = storage.read_bytes(url, storage_options)
    except FileNotFoundError:
        current = None
    if current != text:
        storage.write_bytes_atomic(url, text, storage_options)
    logger.info("%s: %d samples in %d shards", url, manifest.num_samples, len(manifest.shards))
    return manifest


def verify_dataset(
    data_url: str, *, check_samples: bool = True, storage_options: dict[str, Any] | None = None
) -> Manifest:
    """Check every shard against ``manifest.json`` (bytes, sha256, keys, labels, moments).

    Raises ShardError naming the first bad shard (and sample); returns the manifest if all agree.
    """
    manifest = read_manifest(data_url, storage_options)
    for info in manifest.shards:
        data = storage.read_bytes(storage.join(data_url, info.name), storage_options)
        check_shard_bytes(data, info)
        if not check_samples:
            continue
        n = 0
        for sample in iter_shard(
            io.BytesIO(data), name=info.name, expected_keys=info.keys(), require_moments=manifest.has_moments
        ):
            if sample["label"] >= manifest.num_classes:
                raise ShardError(
                    f"{info.name}: sample {sample['key']}: label {sample['label']} >= "
                    f"{manifest.num_classes} classes"
                )
            m = sample["moments"]
            if (
                manifest.has_moments
                and m is not None
                and (tuple(m.shape) != manifest.moments_shape or m.dtype.name != manifest.moments_dtype)
            ):
                raise ShardError(
                    f"{info.name}: sample {sample['key']}: moments {m.dtype.name}{tuple(m.shape)}, "
                    f"manifest says {manifest.moments_dtype}{manifest.moments_shape}"
                )
            n += 1
        if n != info.num_samples:
            raise ShardError(f"{info.name}: {n} samples but the manifest says {info.num_samples}")
    return manifest


# ----------------------------------------------------------------------------------------------
# Stage 2: latents
# ----------------------------------------------------------------------------------------------


def _batches(items: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def prepare_latents(
    data_url: str,
    *,
    vae: Any = "sd-vae-ft-mse",
    vae_weights_url: str | None = None,
    batch_size: int = 64,
    device: str = "cpu",
    moments_dtype: str = "float16",
    worker_index: int | None = None,
    worker_count: int | None = None,
    progress: bool = False,
    storage_options: dict[str, Any] | None = None,
) -> PrepareSummary:
    """Stage 2: add ``{key}.moments.npy`` (VAE ``cat([mean, std])``) to every shard of this worker.

    ``vae``: a name for ``repa.vae.build_vae`` (``sd-vae-ft-mse``, ``sd-vae-ft-ema``, ``none``) or a
    built VAE (``.name``, ``.encode_moments(uint8 (B,3,H,W)) -> (B,2C,h,w)``). Shards already
    holding moments of the same VAE and dtype are skipped. Each rewrite is crash-safe: the sidecar
    records the new shard's sha256 as ``pending`` before the shard is replaced, so a restart can
    tell "old shard, redo" from "new shard, just commit the sidecar".
    """
    import torch

    t0 = time.monotonic()
    if moments_dtype not in MOMENTS_DTYPES:
        raise PrepareError(f"moments_dtype: expected one of {MOMENTS_DTYPES}, got {moments_dtype!r}")
    if batch_size <= 0:
        raise PrepareError(f"batch_size: expected > 0, got {batch_size}")
    index, count = resolve_worker(worker_index, worker_count)
    plan = _read_plan(data_url, storage_options)
    if isinstance(vae, str):
        from repa.vae import build_vae

        if vae != "none" and not vae_weights_url:
            raise PrepareError(
                f"vae {vae!r}: no weights URL (--vae-weights-url or vae.weights_url); refusing to store "
                "moments of a randomly initialised VAE. Point it at a diffusers folder (config.json + "
                "diffusion_pytorch_model.safetensors), e.g. a copy of huggingface.co/stabilityai/"
                f"{vae}"
            )

        vae = build_vae(vae, vae_weights_url)
    if hasattr(vae, "to"):
        vae = vae.to(device)
    details = vae.describe() if hasattr(vae, "describe") else {"name": vae.name}
    latents_scale = float(details.get("latents_scale", 0.18215))
    summary = PrepareSummary("latents", index, count)
    mine = worker_shards(int(plan["num_shards"]), index, count)
    summary.shards_assigned = len(mine)
    storage.cleanup_temps(
        data_url, [n for s in mine for n in (shard_name(s), sidecar_name(s))], storage_options
    )

    todo: list[tuple[int, Sidecar]] = []
    for s in mine:
        try:
            side = _read_sidecar(data_url, s, storage_options)
        except FileNotFoundError:
            raise PrepareError(
                f"{data_url}: {shard_name(s)} has no sidecar: its images stage is not done; "
                "run `repa prepare images` (same worker split) first"
            ) from None
        same_vae = side.vae == vae.name and (side.vae_details or {}).get("weights_sha256") == details.get(
            "weights_sha256"
        )
        if same_vae and side.moments_dtype == moments_dtype and side.pending is None:
            summary.shards_skipped += 1
        else:
            todo.append((s, side))
    if todo:  # the old manifest's checksums are about to go stale: readers should fail clearly, not late
        storage.remove(storage.join(data_url, MANIFEST_NAME), storage_options=storage_options)

    fp16_worst: dict[str, float] = {}
    with _progress(len(todo), "latents", progress) as bar:
        for s, side in todo:
            name = shard_name(s)
            url = storage.join(data_url, name)
            data = storage.read_bytes(url, storage_options)
            digest = sha256_hex(data)
            if digest != side.shard.sha256:
                if side.pending and digest == side.pending["sha256"]:  # crashed after the shard write
                    _commit_pending(data_url, s, side, storage_options)
                    summary.shards_skipped += 1
                    bar.update(1)
                    continue
                raise ShardError(
                    f"{url}: sha256 {digest} matches neither its sidecar ({side.shard.sha256}) nor a pending "
                    "rewrite; the shard is corrupt: delete it and its sidecar and re-run "
                    "`repa prepare images`"
                )
            samples = list(iter_shard(io.BytesIO(data), name=name, expected_keys=side.shard.keys()))
            out: list[Sample] = []
            moments_shape = None
            shard_err: dict[str, float] = {}
            for batch in _batches(samples, batch_size):
                pixels = torch.from_numpy(
                    np.stack([decode_png(x["png"]) for x in batch])
                )  # (B, 3, H, W) uint8
                with torch.inference_mode():
                    moments = vae.encode_moments(pixels.to(device)).float().cpu().numpy()  # (B, 2C, h, w)
                moments_shape = tuple(moments.shape[1:])
                if moments_dtype == "float16":
                    err = moments_float16_error(moments, latents_scale=latents_scale, seed=s)
                    for k, v in err.items():
                        shard_err[k] = max(shard_err.get(k, 0.0), v)
                for x, m in zip(batch, moments):
                    out.append(
                        Sample(key=x["key"], png=x["png"], label=x["label"], moments=m.astype(moments_dtype))
                    )
            new = write_shard(out, moments_dtype=moments_dtype)
            info = dataclasses.replace(side.shard, bytes=len(new), sha256=sha256_hex(new))
            side.pending = {"bytes": info.bytes, "sha256": info.sha256}
            side.vae, side.vae_details, side.moments_dtype = vae.name, details, moments_dtype
            side.moments_shape = moments_shape
            side.moments_fp16_error = shard_err or None
            _write_sidecar(data_url, s, side, storage_options)  # 1. announce the new shard
            storage.write_bytes_atomic(url, new, storage_options)  # 2. replace the shard atomically
            _commit_pending(data_url, s, side, storage_options)  # 3. commit its record
            for k, v in shard_err.items():
                fp16_worst[k] = max(fp16_worst.get(k, 0.0), v)
            summary.shards_written += 1
            summary.samples_written += len(out)
            summary.bytes_written += len(new)
            bar.update(1)
            bar.set_postfix(samples=summary.samples_written)
    summary.moments_fp16_error = fp16_worst or None
    summary.manifest = finalize(data_url, storage_options=storage_options)
    summary.seconds = time.monotonic() - t0
    logger.info("%s", summary.format().splitlines()[0])
    return summary


def _commit_pending(data_url: str, shard: int, side: Sidecar, storage_options: dict[str, Any] | None) -> None:
    assert side.pending is not None
    side.shard = dataclasses.replace(side.shard, bytes=side.pending["bytes"], sha256=side.pending["sha256"])
    side.pending = None
    _write_sidecar(data_url, shard, side, storage_options)


# ----------------------------------------------------------------------------------------------
# CLI: `repa prepare images | latents | finalize | verify`
# ----------------------------------------------------------------------------------------------


def _add_worker_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--worker-index",
        type=int,
        default=None,
        help="this worker's index (default: $JOB_COMPLETION_INDEX of an Indexed Job, else $RANK, else 0)",
    )
    p.add_argument(
        "--worker-count",
        type=int,
        default=None,
        help="number of workers (default: $REPA_WORKER_COUNT, else $WORLD_SIZE, else 1)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bars (logs only)")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Sub-stages of `repa prepare` (the CLI table calls this with the verb's sub-parser)."""
    from repa.config import add_config_arguments

    sub = parser.add_subparsers(dest="prepare_stage", metavar="STAGE", required=True)

    p = sub.add_parser(
        "images",
        help="ImageNet-style folder/tar -> ADM-cropped PNG shards (png + cls) + manifest.json",
        description="Stage 1: <source>/<synset>/*.JPEG (folder or .tar, any URL) -> WebDataset shards.",
    )
    p.add_argument(
        "source_url", help="folder of class folders (ILSVRC train/), or a .tar of it; any fsspec URL"
    )
    p.add_argument("data_url", nargs="?", help="output dataset URL (default: data.url of --config)")
    p.add_argument("--resolution", type=int, default=None, help="image side after the ADM crop (default 256)")
    size = p.add_mutually_exclusive_group()
    size.add_argument(
        "--samples-per-shard", type=int, default=None, help="samples per shard (fixes the split)"
    )
    size.add_argument(
        "--target-shard-mb",
        type=float,
        default=DEFAULT_TARGET_SHARD_BYTES / 1e6,
        help="target shard size in MB incl. latents; sets samples per shard (default %(default)s)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the global shuffle (default 0)")
    p.add_argument(
        "--max-per-class", type=int, default=None, help="use only the first N images of each class"
    )
    p.add_argument(
        "--png-compress-level", type=int, default=0, help="0 (stored, fastest decode; default) .. 9"
    )
    p.add_argument("--num-workers", type=int, default=None, help="decode threads (default min(8, CPUs))")
    p.add_argument(
        "--max-bad-fraction",
        type=float,
        default=DEFAULT_MAX_BAD_FRACTION,
        help="fail if more than this fraction of source images is unreadable (default %(default)s)",
    )
    _add_worker_arguments(p)
    add_config_arguments(p)

    p = sub.add_parser(
        "latents",
        help="add VAE moments (cat[mean, std]) to every shard, in place",
        description="Stage 2: encode every shard's images with the VAE and add {key}.moments.npy.",
    )
    p.add_argument("data_url", nargs="?", help="dataset URL (default: data.url of --config)")
    p.add_argument("--vae", default=None, help="sd-vae-ft-mse | sd-vae-ft-ema | none (default: vae.name)")
    p.add_argument(
        "--vae-weights-url", default=None, help="diffusers folder of the VAE (default: vae.weights_url)"
    )
    p.add_argument("--batch-size", type=int, default=64, help="images per VAE forward pass (default 64)")
    p.add_argument("--device", default="cpu", help="torch device, e.g. cuda or cuda:0 (default cpu)")
    p.add_argument(
        "--moments-dtype",
        choices=MOMENTS_DTYPES,
        default="float16",
        help="stored dtype (default float16: latent error ~1e-4, see docs/data.md)",
    )
    _add_worker_arguments(p)
    add_config_arguments(p)

    p = sub.add_parser("finalize", help="write manifest.json from the sidecars (normally automatic)")
    p.add_argument("data_url", nargs="?", help="dataset URL (default: data.url of --config)")
    p.add_argument("--max-bad-fraction", type=float, default=DEFAULT_MAX_BAD_FRACTION)
    add_config_arguments(p)

    p = sub.add_parser("verify", help="check every shard against manifest.json (sizes, sha256, keys)")
    p.add_argument("data_url", nargs="?", help="dataset URL (default: data.url of --config)")
    p.add_argument("--quick", action="store_true", help="sizes and checksums only, do not parse samples")
    add_config_arguments(p)


def run(args: argparse.Namespace) -> int:
    """Run one `repa prepare` stage; prints a summary. Exit 0 ok, 1 failed (message on stderr)."""
    cfg = None
    if getattr(args, "config", None) or getattr(args, "overrides", None):
        from repa.config import config_from_args

        cfg = config_from_args(args)
    data_url = args.data_url or (cfg.data.url if cfg is not None else None)
    if not data_url:
        print(f"repa prepare {args.prepare_stage}: give DATA_URL or --config with data.url", file=sys.stderr)
        return 2
    options = (cfg.data.storage_options or None) if cfg is not None else None
    try:
        if args.prepare_stage == "images":
            resolution = args.resolution or (cfg.data.resolution if cfg is not None else 256)
            summary = prepare_images(
                args.source_url,
                data_url,
                resolution=resolution,
                samples_per_shard=args.samples_per_shard,
                target_shard_bytes=int(args.target_shard_mb * 1e6),
                seed=args.seed,
                max_per_class=args.max_per_class,
                png_compress_level=args.png_compress_level,
                num_workers=args.num_workers,
                worker_index=args.worker_index,
                worker_count=args.worker_count,
                max_bad_fraction=args.max_bad_fraction,
                progress=not args.no_progress,
                storage_options=options,
            )
            print(summary.format())
        elif args.prepare_stage == "latents":
            summary = prepare_latents(
                data_url,
                vae=args.vae or (cfg.vae.name if cfg is not None else "sd-vae-ft-mse"),
                vae_weights_url=args.vae_weights_url or (cfg.vae.weights_url if cfg is not None else None),
                batch_size=args.batch_size,
                device=args.device,
                moments_dtype=args.moments_dtype,
                worker_index=args.worker_index,
                worker_count=args.worker_count,
                progress=not args.no_progress,
                storage_options=options,
            )
            print(summary.format())
        elif args.prepare_stage == "finalize":
            manifest = finalize(data_url, max_bad_fraction=args.max_bad_fraction, storage_options=options)
            if manifest is None:
                print(
                    f"repa prepare finalize: {data_url}: not all shards are done; see the log",
                    file=sys.stderr,
                )
                return 1
            print(
                f"{storage.join(data_url, MANIFEST_NAME)}: {manifest.num_samples:,} samples, "
                f"{len(manifest.shards)} shards"
            )
        elif args.prepare_stage == "verify":
            manifest = verify_dataset(data_url, check_samples=not args.quick, storage_options=options)
            print(
                f"{data_url}: ok: {len(manifest.shards)} shards, {manifest.num_samples:,} samples "
                "agree with the manifest"
            )
    except (PrepareError, ManifestError, ShardError, storage.StorageError, FileNotFoundError) as e:
        print(f"repa prepare {args.prepare_stage}: error: {e}", file=sys.stderr)
        return 1
    return 0
