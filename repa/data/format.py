"""The prepared-dataset format: WebDataset tar shards + a ``manifest.json`` (pure: no storage, no env).

A prepared dataset is a folder (any fsspec URL) holding::

    manifest.json            Manifest: classes, resolution, VAE identity, per-shard counts/bytes/sha256
    shard-000000.tar         WebDataset shard: per sample {key}.cls, {key}.moments.npy, {key}.png
    shard-000000.json        sidecar written after its shard (prepare's restart bookkeeping)
    ...

Per sample (WebDataset convention: members of one sample are consecutive and share the key, the
part of the name before the first dot):

- ``{key}.png``: RGB uint8 ``resolution x resolution`` after the ADM center crop (``adm_center_crop``).
- ``{key}.cls``: the class index as ASCII digits = index of the synset in the sorted synset list.
- ``{key}.moments.npy`` (after ``repa prepare latents``): ``cat([mean, std])`` of the VAE posterior,
  shape (2C, h, w), e.g. (8, 32, 32), as a NumPy ``.npy`` (float16 by default, see docs/data.md).

Keys are the zero-padded global index in the prepared order (``sample_key(i)``), so they are unique,
deterministic and sort like the order. Images and latents are joined **by key**, never by position:
the reference (REPA ``dataset.py``, ``CustomDataset``) pairs two sorted file lists by position, and
one missing file silently shifts every later pair. ``SampleDecoder`` reports a sample with a missing
or corrupt member instead; ``iter_shard`` (streaming) and ``IndexedShard`` (a shard held in memory,
the streaming reader's) both decode with it. See docs/data.md.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import re
import tarfile
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import IO, TYPE_CHECKING, Any, TypedDict

import numpy as np
from PIL import Image

if TYPE_CHECKING:
    from repa.storage import Location

__all__ = [
    "CLS",
    "CROP",
    "FORMAT_VERSION",
    "KEY_DIGITS",
    "MANIFEST_NAME",
    "MOMENTS",
    "MOMENTS_DTYPES",
    "PNG",
    "IndexedShard",
    "Manifest",
    "ManifestError",
    "Sample",
    "SampleDecoder",
    "SampleError",
    "ShardError",
    "ShardInfo",
    "SkippedFile",
    "adm_center_crop",
    "check_shard_bytes",
    "decode_moments",
    "decode_png",
    "encode_moments",
    "encode_png",
    "iter_shard",
    "moments_float16_error",
    "parse_label",
    "parse_shard_index",
    "read_manifest",
    "sample_key",
    "sha256_hex",
    "shard_name",
    "sidecar_name",
    "split_member_name",
    "write_shard",
]

FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
CROP = "adm-center"
KEY_DIGITS = 8  # 10**8 samples: ImageNet-1k has 1,281,167, ImageNet-21k ~14M.
MOMENTS_DTYPES = ("float16", "float32")

# Member suffixes (the part after the key's first dot).
PNG, CLS, MOMENTS = "png", "cls", "moments.npy"

# Fixed tar header fields: two runs over the same samples give byte-identical shards.
_TAR_MTIME = 0
_TAR_MODE = 0o644
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_SHARD_RE = re.compile(r"^shard-(\d{6,})\.tar$")
_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")


class ManifestError(ValueError):
    """manifest.json (or a sidecar) is malformed or inconsistent; the message names file and field."""


class ShardError(ValueError):
    """A shard is corrupt or disagrees with the manifest; the message names the shard (and the key)."""


class SampleError(ValueError):
    """One sample's member is missing or corrupt; the message names the member (callers add the shard)."""


class Sample(TypedDict):
    """One decoded-from-tar sample: PNG bytes (decode with ``decode_png``), label, optional moments.

    Moments decoded by ``SampleDecoder`` may be a read-only view of the member's bytes: copy (or
    ``astype``) before writing to them.
    """

    key: str
    png: bytes
    label: int
    moments: np.ndarray | None


# ----------------------------------------------------------------------------------------------
# Names
# ----------------------------------------------------------------------------------------------


def shard_name(index: int) -> str:
    """``shard-{index:06d}.tar``: zero-padded so names sort in shard order."""
    if index < 0:
        raise ValueError(f"shard index: expected >= 0, got {index}")
    return f"shard-{index:06d}.tar"


def sidecar_name(index: int) -> str:
    """``shard-{index:06d}.json``: the per-shard record written after the shard is committed."""
    return shard_name(index)[: -len(".tar")] + ".json"


def parse_shard_index(name: str) -> int:
    """Inverse of ``shard_name`` (accepts a full URL/path); ValueError for any other name."""
    base = name.rstrip("/").rsplit("/", 1)[-1]
    m = _SHARD_RE.match(base)
    if not m:
        raise ValueError(f"{name!r}: not a shard name (expected shard-NNNNNN.tar)")
    return int(m.group(1))


def sample_key(index: int) -> str:
    """Key of the sample at global position ``index`` of the prepared order: ``f"{index:08d}"``."""
    if not 0 <= index < 10**KEY_DIGITS:
        raise ValueError(f"sample index {index}: out of range [0, 10**{KEY_DIGITS})")
    return f"{index:0{KEY_DIGITS}d}"


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# ----------------------------------------------------------------------------------------------
# Manifest
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class SkippedFile:
    """A source image that could not be used; its key stays unused (keys of a shard may have gaps)."""

    key: str
    source: str  # path relative to the source root, e.g. "n01440764/n01440764_10026.JPEG"
    reason: str

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Any, *, where: str) -> SkippedFile:
        _require_mapping(d, where)
        _check_keys(d, {"key", "source", "reason"}, where)
        return cls(
            key=_get(d, "key", str, where),
            source=_get(d, "source", str, where),
            reason=_get(d, "reason", str, where),
        )


@dataclasses.dataclass(frozen=True)
class ShardInfo:
    """One shard: its planned key range, how many samples it holds, and its exact bytes.

    The shard was planned to hold the keys ``first_index .. first_index + num_samples + len(skipped) - 1``;
    the ``skipped`` ones (unreadable source images) are absent.
    """

    name: str
    first_index: int
    num_samples: int
    bytes: int
    sha256: str
    skipped: tuple[SkippedFile, ...] = ()

    @property
    def index(self) -> int:
        return parse_shard_index(self.name)

    @property
    def num_planned(self) -> int:
        return self.num_samples + len(self.skipped)

    def keys(self) -> list[str]:
        """The keys this shard holds, in order (planned range minus skipped)."""
        skipped = {s.key for s in self.skipped}
        return [
            k
            for k in (sample_key(i) for i in range(self.first_index, self.first_index + self.num_planned))
            if k not in skipped
        ]

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["skipped"] = [s.to_dict() for s in self.skipped]
        return d

    @classmethod
    def from_dict(cls, d: Any, *, where: str) -> ShardInfo:
        _require_mapping(d, where)
        _check_keys(d, {"name", "first_index", "num_samples", "bytes", "sha256", "skipped"}, where)
        name = _get(d, "name", str, where)
        try:
            parse_shard_index(name)
        except ValueError as e:
            raise ManifestError(f"{where}.name: {e}") from None
        sha = _get(d, "sha256", str, where)
        if not _SHA256_RE.match(sha):
            raise ManifestError(f"{where}.sha256: expected 64 lowercase hex digits, got {sha!r}")
        skipped_raw = d.get("skipped", [])
        if not isinstance(skipped_raw, list):
            raise ManifestError(f"{where}.skipped: expected a list, got {type(skipped_raw).__name__}")
        info = cls(
            name=name,
            first_index=_get_int(d, "first_index", where, minimum=0),
            num_samples=_get_int(d, "num_samples", where, minimum=0),
            bytes=_get_int(d, "bytes", where, minimum=1),
            sha256=sha,
            skipped=tuple(
                SkippedFile.from_dict(s, where=f"{where}.skipped[{j}]") for j, s in enumerate(skipped_raw)
            ),
        )
        planned = {sample_key(i) for i in range(info.first_index, info.first_index + info.num_planned)}
        for j, s in enumerate(info.skipped):
            if s.key not in planned:
                raise ManifestError(f"{where}.skipped[{j}].key: {s.key!r} is outside this shard's key range")
        return info


@dataclasses.dataclass(frozen=True)
class Manifest:
    """``manifest.json``: everything a reader needs without listing the bucket or opening shards.

    ``vae`` is None until ``repa prepare latents`` ran; then ``vae`` (name, e.g. "sd-vae-ft-mse" or
    "none"), ``moments_dtype`` and ``moments_shape`` (2C, h, w) describe every ``.moments.npy``.
    """

    resolution: int
    class_names: tuple[str, ...]
    shards: tuple[ShardInfo, ...]
    shuffle_seed: int = 0
    crop: str = CROP
    vae: str | None = None
    vae_details: dict[str, Any] | None = None
    moments_dtype: str | None = None
    moments_shape: tuple[int, ...] | None = None
    created_by: str = ""
    format_version: int = FORMAT_VERSION

    @property
    def num_samples(self) -> int:
        return sum(s.num_samples for s in self.shards)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def total_bytes(self) -> int:
        return sum(s.bytes for s in self.shards)

    @property
    def has_moments(self) -> bool:
        return self.vae is not None

    def shard(self, name_or_index: str | int) -> ShardInfo:
        index = name_or_index if isinstance(name_or_index, int) else parse_shard_index(name_or_index)
        if not 0 <= index < len(self.shards):
            raise KeyError(f"shard {name_or_index!r}: manifest has shards 0..{len(self.shards) - 1}")
        return self.shards[index]

    def validate(self, where: str = MANIFEST_NAME) -> Manifest:
        """Cross-field checks; raises ManifestError naming ``where`` and the field. Returns self."""
        if self.format_version != FORMAT_VERSION:
            raise ManifestError(
                f"{where}: format_version {self.format_version} is not supported by this repa "
                f"(reads {FORMAT_VERSION}); re-run `repa prepare` or upgrade repa"
            )
        if self.resolution <= 0:
            raise ManifestError(f"{where}: resolution: expected > 0, got {self.resolution}")
        if self.crop != CROP:
            raise ManifestError(f"{where}: crop: expected {CROP!r}, got {self.crop!r}")
        if not self.class_names:
            raise ManifestError(f"{where}: class_names: empty")
        if list(self.class_names) != sorted(set(self.class_names)):
            raise ManifestError(f"{where}: class_names: must be sorted and unique (label = sorted index)")
        expected_first = 0
        for i, s in enumerate(self.shards):
            if s.name != shard_name(i):
                raise ManifestError(f"{where}: shards[{i}].name: expected {shard_name(i)!r}, got {s.name!r}")
            if s.first_index != expected_first:
                raise ManifestError(
                    f"{where}: shards[{i}].first_index: expected {expected_first} (previous shard's "
                    f"first_index + planned count), got {s.first_index}"
                )
            expected_first += s.num_planned
        if self.vae is None:
            if self.moments_dtype is not None or self.moments_shape is not None:
                raise ManifestError(f"{where}: moments_dtype/moments_shape set but vae is null")
        else:
            if self.moments_dtype not in MOMENTS_DTYPES:
                raise ManifestError(
                    f"{where}: moments_dtype: expected one of {MOMENTS_DTYPES}, got {self.moments_dtype!r}"
                )
            shape = self.moments_shape
            if shape is None or len(shape) != 3 or any(d <= 0 for d in shape) or shape[0] % 2:
                raise ManifestError(
                    f"{where}: moments_shape: expected (2C, h, w) with positive sizes, got {shape!r}"
                )
        return self

    def to_dict(self) -> dict[str, Any]:
        return {
            "format_version": self.format_version,
            "created_by": self.created_by,
            "resolution": self.resolution,
            "crop": self.crop,
            "shuffle_seed": self.shuffle_seed,
            "num_samples": self.num_samples,
            "num_classes": self.num_classes,
            "class_names": list(self.class_names),
            "vae": self.vae,
            "vae_details": self.vae_details,
            "moments_dtype": self.moments_dtype,
            "moments_shape": None if self.moments_shape is None else list(self.moments_shape),
            "total_bytes": self.total_bytes,
            "shards": [s.to_dict() for s in self.shards],
        }

    def to_json(self) -> str:
        """Deterministic JSON (fixed key order, no timestamps): N workers and 1 write identical bytes."""
        return json.dumps(self.to_dict(), indent=1) + "\n"

    @classmethod
    def from_dict(cls, d: Any, *, where: str = MANIFEST_NAME) -> Manifest:
        _require_mapping(d, where)
        version = d.get("format_version")
        if not isinstance(version, int) or isinstance(version, bool):
            raise ManifestError(f"{where}: format_version: expected an int, got {version!r}")
        if version != FORMAT_VERSION:
            raise ManifestError(
                f"{where}: format_version {version} is not supported by this repa (reads {FORMAT_VERSION})"
            )
        derived = {"num_samples", "num_classes", "total_bytes"}
        fields = {f.name for f in dataclasses.fields(cls)}
        _check_keys(d, fields | derived, where)
        for name in ("resolution", "class_names", "shards"):
            if name not in d:
                raise ManifestError(f"{where}: {name}: missing")
        class_names = d["class_names"]
        if not isinstance(class_names, list) or not all(isinstance(c, str) for c in class_names):
            raise ManifestError(f"{where}: class_names: expected a list of strings")
        shards_raw = d["shards"]
        if not isinstance(shards_raw, list):
            raise ManifestError(f"{where}: shards: expected a list, got {type(shards_raw).__name__}")
        shape = d.get("moments_shape")
        if shape is not None and (
            not isinstance(shape, list)
            or not all(isinstance(x, int) and not isinstance(x, bool) for x in shape)
        ):
            raise ManifestError(f"{where}: moments_shape: expected a list of ints or null, got {shape!r}")
        vae_details = d.get("vae_details")
        if vae_details is not None and not isinstance(vae_details, dict):
            raise ManifestError(f"{where}: vae_details: expected an object or null")
        m = cls(
            resolution=_get_int(d, "resolution", where, minimum=1),
            class_names=tuple(class_names),
            shards=tuple(
                ShardInfo.from_dict(s, where=f"{where}: shards[{i}]") for i, s in enumerate(shards_raw)
            ),
            shuffle_seed=_get_int(d, "shuffle_seed", where, default=0),
            crop=_get(d, "crop", str, where, default=CROP),
            vae=_get(d, "vae", (str, type(None)), where, default=None),
            vae_details=vae_details,
            moments_dtype=_get(d, "moments_dtype", (str, type(None)), where, default=None),
            moments_shape=None if shape is None else tuple(shape),
            created_by=_get(d, "created_by", str, where, default=""),
            format_version=version,
        ).validate(where)
        for name in derived:  # derived fields are written for humans; if present they must agree
            if name in d and d[name] != getattr(m, name):
                raise ManifestError(
                    f"{where}: {name}: says {d[name]!r} but the shards/classes give {getattr(m, name)!r}"
                )
        return m

    @classmethod
    def from_json(cls, text: str | bytes, *, where: str = MANIFEST_NAME) -> Manifest:
        try:
            d = json.loads(text)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ManifestError(f"{where}: not valid JSON: {e}") from None
        return cls.from_dict(d, where=where)


def read_manifest(data: str | Location) -> Manifest:
    """Load and validate ``{data}/manifest.json`` (``data``: a URL or a ``repa.storage.Location``);
    ManifestError naming the URL if absent or bad.

    The one I/O helper here: it imports ``repa.storage`` lazily, so importing this module stays pure.
    """
    from repa import storage  # lazy: keeps fsspec out of format.py's imports

    where = storage.join(data, MANIFEST_NAME)
    url = str(where)
    try:
        text = storage.read_bytes(where)
    except FileNotFoundError:
        raise ManifestError(
            f"{url}: not found; prepare the dataset with `repa prepare images` (and `repa prepare latents`), "
            "or finish it with `repa prepare finalize`"
        ) from None
    return Manifest.from_json(text, where=url)


def _require_mapping(d: Any, where: str) -> None:
    if not isinstance(d, dict):
        raise ManifestError(f"{where}: expected a JSON object, got {type(d).__name__}")


def _check_keys(d: dict[str, Any], allowed: set[str], where: str) -> None:
    unknown = sorted(set(d) - allowed)
    if unknown:
        raise ManifestError(f"{where}: unknown field(s) {unknown}; allowed: {sorted(allowed)}")


_MISSING = object()


def _get(
    d: dict[str, Any], name: str, types: type | tuple[type, ...], where: str, default: Any = _MISSING
) -> Any:
    if name not in d:
        if default is _MISSING:
            raise ManifestError(f"{where}.{name}: missing")
        return default
    value = d[name]
    if not isinstance(value, types):
        raise ManifestError(f"{where}.{name}: expected {_type_names(types)}, got {value!r}")
    return value


def _get_int(
    d: dict[str, Any], name: str, where: str, *, minimum: int | None = None, default: Any = _MISSING
) -> int:
    value = _get(d, name, int, where, default)
    if isinstance(value, bool):
        raise ManifestError(f"{where}.{name}: expected an int, got {value!r}")
    if minimum is not None and value < minimum:
        raise ManifestError(f"{where}.{name}: expected >= {minimum}, got {value}")
    return value


def _type_names(types: type | tuple[type, ...]) -> str:
    types = types if isinstance(types, tuple) else (types,)
    return " or ".join("null" if t is type(None) else t.__name__ for t in types)


# ----------------------------------------------------------------------------------------------
# Pixels: ADM center crop and PNG
# ----------------------------------------------------------------------------------------------


def adm_center_crop(pil_image: Image.Image, resolution: int) -> np.ndarray:
    """ADM center crop (guided-diffusion ``center_crop_arr``, used by REPA/edm2 ``center-crop-dhariwal``).

    While the short side is >= 2*resolution, halve the image with a BOX filter (cheap, alias-free
    for exact 2x); then BICUBIC-resize so the short side equals ``resolution`` (other side
    ``round(x * scale)``); then take the central ``resolution x resolution`` crop, offsets rounded
    down. Returns uint8 (resolution, resolution, 3) HWC RGB.
    """
    if resolution <= 0:
        raise ValueError(f"resolution: expected > 0, got {resolution}")
    image = pil_image if pil_image.mode == "RGB" else pil_image.convert("RGB")
    while min(*image.size) >= 2 * resolution:
        image = image.resize(tuple(x // 2 for x in image.size), resample=Image.BOX)
    scale = resolution / min(*image.size)
    image = image.resize(tuple(round(x * scale) for x in image.size), resample=Image.BICUBIC)
    arr = np.asarray(image)  # (H, W, 3)
    top = (arr.shape[0] - resolution) // 2
    left = (arr.shape[1] - resolution) // 2
    return np.ascontiguousarray(arr[top : top + resolution, left : left + resolution])


def encode_png(image: np.ndarray, compress_level: int = 0) -> bytes:
    """uint8 (H, W, 3) RGB -> PNG bytes. Level 0 (stored, as edm2/REPA) decodes fastest; PNG is lossless."""
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        desc = f"{image.dtype} {image.shape}" if isinstance(image, np.ndarray) else type(image).__name__
        raise ValueError(f"image: expected a uint8 (H, W, 3) RGB array, got {desc}")
    if not 0 <= compress_level <= 9:
        raise ValueError(f"png compress_level: expected 0..9, got {compress_level}")
    buf = io.BytesIO()
    Image.fromarray(image, mode="RGB").save(buf, format="PNG", compress_level=compress_level, optimize=False)
    return buf.getvalue()


def decode_png(data: bytes) -> np.ndarray:
    """PNG bytes -> uint8 (3, H, W) RGB (CHW: the layout models and encoders take)."""
    if not data.startswith(_PNG_SIGNATURE):
        raise ValueError("not a PNG (bad signature)")
    with Image.open(io.BytesIO(data)) as image:
        image.load()
        rgb = image if image.mode == "RGB" else image.convert("RGB")
        arr = np.asarray(rgb)
    return np.ascontiguousarray(arr.transpose(2, 0, 1))


# ----------------------------------------------------------------------------------------------
# Moments
# ----------------------------------------------------------------------------------------------


def encode_moments(moments: np.ndarray, dtype: str = "float16") -> bytes:
    """(2C, h, w) float ``cat([mean, std])`` -> ``.npy`` bytes in ``dtype`` (float16 or float32)."""
    if dtype not in MOMENTS_DTYPES:
        raise ValueError(f"moments dtype: expected one of {MOMENTS_DTYPES}, got {dtype!r}")
    if not isinstance(moments, np.ndarray) or moments.ndim != 3 or moments.shape[0] % 2:
        desc = moments.shape if isinstance(moments, np.ndarray) else type(moments).__name__
        raise ValueError(f"moments: expected an array (2C, h, w) = cat([mean, std]), got {desc}")
    with np.errstate(over="ignore"):  # overflow is detected and explained just below
        out = moments.astype(dtype)
    if not np.isfinite(out).all():
        bad = "overflows float16 (|x| > 65504)" if np.isfinite(moments).all() else "is not finite"
        raise ValueError(f"moments: {bad}; use moments dtype float32")
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(out), allow_pickle=False)
    return buf.getvalue()


def decode_moments(data: bytes) -> np.ndarray:
    """``.npy`` bytes -> array (never unpickles)."""
    return np.load(io.BytesIO(data), allow_pickle=False)


def moments_float16_error(
    moments: np.ndarray, latents_scale: float = 0.18215, noise: np.ndarray | None = None, seed: int = 0
) -> dict[str, float]:
    """How much storing moments in float16 changes the posterior latents the model trains on.

    ``moments``: (..., 2C, h, w) float32 ``cat([mean, std])``. With the same noise ``eps``, compares
    ``z = (mean + std * eps) * scale`` from float32 vs float16-rounded moments. Returns
    ``rel_l2`` = ||z16 - z32|| / ||z32||, ``max_abs`` = max |z16 - z32|, ``max_abs_over_std`` =
    max |z16 - z32| / (scale * std) (0 when std is 0): the error next to the posterior's own noise.
    ``bf16_input_rel_l2``: the same metric for rounding z32 to bfloat16, what mixed-precision
    training does to the model input anyway, as a yardstick.
    """
    m32 = np.asarray(moments, dtype=np.float32)
    c = m32.shape[-3] // 2
    mean32, std32 = m32[..., :c, :, :], m32[..., c:, :, :]
    m16 = m32.astype(np.float16).astype(np.float32)
    mean16, std16 = m16[..., :c, :, :], m16[..., c:, :, :]
    if noise is None:
        noise = np.random.default_rng(seed).standard_normal(mean32.shape).astype(np.float32)
    z32 = ((mean32.astype(np.float64) + std32 * noise.astype(np.float64)) * latents_scale).astype(np.float32)
    z16 = ((mean16.astype(np.float64) + std16 * noise.astype(np.float64)) * latents_scale).astype(np.float32)
    diff = np.abs(z16.astype(np.float64) - z32)
    norm = float(np.linalg.norm(z32.astype(np.float64)))
    posterior = latents_scale * std32.astype(np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.where(posterior > 0, diff / posterior, 0.0)
    # bfloat16 rounding (round-to-nearest-even on the top 16 bits of the float32 pattern).
    bits = z32.view(np.uint32).astype(np.uint64)
    bf16 = (((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16) << 16).astype(np.uint32).view(np.float32)
    return {
        "rel_l2": float(np.linalg.norm(diff)) / norm if norm else 0.0,
        "max_abs": float(diff.max()) if diff.size else 0.0,
        "max_abs_over_std": float(ratio.max()) if ratio.size else 0.0,
        "bf16_input_rel_l2": float(np.linalg.norm(bf16.astype(np.float64) - z32)) / norm if norm else 0.0,
    }


# ----------------------------------------------------------------------------------------------
# Samples: the one decoder of a sample's members
# ----------------------------------------------------------------------------------------------


def parse_label(data: bytes) -> int:
    """``.cls`` bytes -> the class index; ValueError unless they are ASCII digits (whitespace stripped)."""
    try:
        text = data.decode("ascii").strip()
    except UnicodeDecodeError:
        raise ValueError("not ASCII") from None
    if not text.isdigit():
        raise ValueError(text)
    return int(text)


class SampleDecoder:
    """A sample's members (suffix -> bytes) -> ``Sample``, or SampleError naming the bad member.

    ``.png`` and ``.cls`` (and ``.moments.npy`` if ``require_moments``) must be present; the PNG must
    carry its signature (its pixels are decoded later, by ``decode_png``, only when needed); the
    label must parse; moments, when present, must be a valid ``.npy``. ``iter_shard`` and the
    streaming reader (via ``IndexedShard``) both decode with this class.

    ``.npy`` headers are parsed once per distinct header, then the data is a ``frombuffer`` view:
    numpy's own parser (``np.load``) evaluates the header text (~0.3 ms, a third of a 256px PNG
    decode), and every moments member of a dataset has the same header. Whether a member decodes
    does not depend on what was decoded before (the data length is checked on both paths).
    """

    _NPY_MAGIC = b"\x93NUMPY"

    def __init__(self, *, require_moments: bool = False) -> None:
        self.require_moments = require_moments
        self._npy_headers: dict[bytes, tuple[np.dtype, tuple[int, ...], int]] = {}

    def __call__(self, key: str, members: Mapping[str, bytes]) -> Sample:
        for suffix in (PNG, CLS) + ((MOMENTS,) if self.require_moments else ()):
            if suffix not in members:
                raise SampleError(f"missing member '{key}.{suffix}'")
        png = members[PNG]
        if not png.startswith(_PNG_SIGNATURE):
            raise SampleError(f"corrupt member '{key}.{PNG}' (not a PNG)")
        try:
            label = parse_label(members[CLS])
        except ValueError:
            raise SampleError(
                f"corrupt member '{key}.{CLS}' (expected a non-negative integer as ASCII)"
            ) from None
        moments = None
        if MOMENTS in members:
            try:
                moments = self.moments(members[MOMENTS])
            except (ValueError, OSError, EOFError) as e:
                raise SampleError(f"corrupt member '{key}.{MOMENTS}' ({e})") from None
        return Sample(key=key, png=png, label=label, moments=moments)

    def moments(self, data: bytes) -> np.ndarray:
        """``.npy`` bytes -> array (never unpickles); ValueError if corrupt or of the wrong length."""
        if data[:6] != self._NPY_MAGIC or len(data) < 12 or data[6] not in (1, 2, 3):
            return decode_moments(data)
        start = 10 if data[6] == 1 else 12
        end = start + int.from_bytes(data[8:start], "little")
        hit = self._npy_headers.get(data[:end])
        if hit is None:
            array = decode_moments(data)
            if len(data) != end + array.nbytes:
                raise ValueError(f"npy data is {len(data) - end} bytes, header says {array.nbytes}")
            if array.flags.c_contiguous and not array.dtype.hasobject:
                self._npy_headers[data[:end]] = (array.dtype, array.shape, array.size)
            return array
        dtype, shape, count = hit
        if len(data) != end + count * dtype.itemsize:
            raise ValueError(f"npy data is {len(data) - end} bytes, header says {count * dtype.itemsize}")
        return np.frombuffer(data, dtype=dtype, count=count, offset=end).reshape(shape)


# ----------------------------------------------------------------------------------------------
# Shards
# ----------------------------------------------------------------------------------------------


def _tar_member(name: str, data: bytes) -> tuple[tarfile.TarInfo, io.BytesIO]:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = _TAR_MTIME
    info.mode = _TAR_MODE
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    info.type = tarfile.REGTYPE
    return info, io.BytesIO(data)


def write_shard(samples: Iterable[Sample], *, moments_dtype: str | None = None) -> bytes:
    """Samples -> tar bytes, deterministic (fixed mtime/uid/gid/mode, USTAR, members sorted per sample).

    Member order per sample is ``{key}.cls``, ``{key}.moments.npy`` (if moments is not None), ``{key}.png``.
    Moments are cast to ``moments_dtype`` (float16/float32); None keeps each array's dtype, which
    must then be one of those. Keys must be unique and must not contain '.' or '/'.
    """
    buf = io.BytesIO()
    seen: set[str] = set()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for sample in samples:
            key = sample["key"]
            if not key or "." in key or "/" in key:
                raise ValueError(f"sample key {key!r}: must be non-empty without '.' or '/'")
            if key in seen:
                raise ValueError(f"sample key {key!r}: duplicate in one shard")
            seen.add(key)
            label = sample["label"]
            if not isinstance(label, (int, np.integer)) or isinstance(label, bool) or label < 0:
                raise ValueError(f"sample {key}: label must be a non-negative int, got {label!r}")
            png = sample["png"]
            if not isinstance(png, (bytes, bytearray)) or not bytes(png[:8]) == _PNG_SIGNATURE:
                raise ValueError(f"sample {key}: png must be PNG bytes (see encode_png)")
            members = {CLS: str(int(label)).encode("ascii"), PNG: bytes(png)}
            moments = sample.get("moments")
            if moments is not None:
                dtype = moments_dtype or moments.dtype.name
                try:
                    members[MOMENTS] = encode_moments(moments, dtype)
                except ValueError as e:
                    raise ValueError(f"sample {key}: {e}") from None
            for suffix in sorted(members):
                tar.addfile(*_tar_member(f"{key}.{suffix}", members[suffix]))
    return buf.getvalue()


def check_shard_bytes(data: bytes, info: ShardInfo) -> None:
    """ShardError naming the shard if ``data`` is not the shard the manifest describes (size, sha256)."""
    if len(data) != info.bytes:
        raise ShardError(
            f"{info.name}: {len(data)} bytes but the manifest says {info.bytes}; the shard or "
            "manifest.json is stale or truncated (re-run `repa prepare`)"
        )
    digest = sha256_hex(data)
    if digest != info.sha256:
        raise ShardError(
            f"{info.name}: sha256 {digest} but the manifest says {info.sha256}; the shard is corrupt or "
            "was rewritten after manifest.json (re-run `repa prepare`)"
        )


def split_member_name(name: str) -> tuple[str, str]:
    """``(key, suffix)`` of a tar member (WebDataset): key = path up to the first dot of the basename."""
    slash = name.rfind("/")
    dot = name.find(".", slash + 1)
    if dot < 0:
        return name, ""
    return name[:dot], name[dot + 1 :]


def iter_shard(
    fileobj: IO[bytes],
    *,
    name: str = "<shard>",
    expected_keys: Sequence[str] | None = None,
    require_moments: bool = False,
    on_error: Callable[[ShardError], None] | None = None,
) -> Iterator[Sample]:
    """Stream samples out of a shard (sequential read: works on non-seekable object-store streams).

    Members are grouped by key; each sample must have ``.png`` and ``.cls`` (and ``.moments.npy``
    if ``require_moments``), parse, and appear once, contiguously. ``expected_keys`` (e.g.
    ``ShardInfo.keys()``) also catches whole samples missing or unexpected. A bad sample is
    reported as a ``ShardError`` naming shard and key: raised if ``on_error`` is None, otherwise
    passed to ``on_error`` and the sample skipped, so data is never silently misaligned. Unknown
    suffixes are ignored (WebDataset convention). A truncated/unreadable tar always raises.
    """

    def report(key: str, message: str) -> None:
        err = ShardError(f"{name}: sample {key}: {message}")
        if on_error is None:
            raise err
        on_error(err)

    expected = list(expected_keys) if expected_keys is not None else None
    position = {k: i for i, k in enumerate(expected)} if expected is not None else {}
    next_expected = 0
    seen: set[str] = set()
    decode = SampleDecoder(require_moments=require_moments)

    def build(key: str, members: dict[str, bytes]) -> Sample | None:
        nonlocal next_expected
        if key in seen:
            report(key, "members are not contiguous or the key repeats")
            return None
        seen.add(key)
        if expected is not None:
            pos = position.get(key)
            if pos is None or pos < next_expected:
                report(key, "unexpected key (not in the manifest's key list for this shard, or out of order)")
                return None
            for missing in expected[next_expected:pos]:
                report(missing, "missing from the shard (whole sample absent)")
            next_expected = pos + 1
        try:
            return decode(key, members)
        except SampleError as e:
            report(key, str(e))
            return None

    try:
        tar = tarfile.open(fileobj=fileobj, mode="r|")  # noqa: SIM115 (closed by the `with tar` below)
    except tarfile.TarError as e:
        raise ShardError(f"{name}: not a readable tar ({e})") from e
    current: str | None = None
    members: dict[str, bytes] = {}
    try:
        with tar:
            for member in tar:
                if not member.isfile():
                    continue
                key, suffix = split_member_name(member.name)
                if key != current:
                    if current is not None:
                        sample = build(current, members)
                        if sample is not None:
                            yield sample
                    current, members = key, {}
                f = tar.extractfile(member)
                data = f.read() if f is not None else b""
                if len(data) != member.size:
                    raise ShardError(f"{name}: truncated member {member.name!r}")
                if suffix in members:
                    report(key, f"duplicate member '{member.name}'")
                members[suffix] = data
    except tarfile.TarError as e:
        raise ShardError(f"{name}: corrupt or truncated tar ({e})") from e
    if current is not None:
        sample = build(current, members)
        if sample is not None:
            yield sample
    if expected is not None:
        for missing in expected[next_expected:]:
            report(missing, "missing from the shard (whole sample absent)")


class IndexedShard:
    """A whole shard in memory, indexed in place: a sample's members are sliced out when it is used.

    ``iter_shard`` streams (it must work on non-seekable object-store streams) and decodes every
    member up front; a reader that holds the whole shard anyway lists its members once (tarfile's
    random-access mode), checks the key set against ``keys`` (the manifest's ``ShardInfo.keys()``)
    and decodes a sample only when it is used (``sample``). ShardError naming ``name`` if the tar is
    unreadable or truncated or the key sets differ. ``problems`` maps a sample's index to why it is
    unusable: duplicate members are found here, users add what they find when decoding.
    """

    def __init__(self, name: str, data: bytes, keys: list[str]) -> None:
        self.name, self.data, self.keys = name, data, keys
        self.members: list[dict[str, tuple[int, int]]] = [{} for _ in keys]  # suffix -> (offset, size)
        self.problems: dict[int, str] = {}
        position = {k: i for i, k in enumerate(keys)}
        present: set[str] = set()
        extra: set[str] = set()
        try:
            with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
                infos = tar.getmembers()
        except tarfile.TarError as e:
            raise ShardError(f"{name}: not a readable tar ({e})") from e
        for info in infos:
            if not info.isfile():
                continue
            key, suffix = split_member_name(info.name)
            i = position.get(key)
            if i is None:
                extra.add(key)
                continue
            present.add(key)
            if info.offset_data + info.size > len(data):
                raise ShardError(f"{name}: truncated member {info.name!r}")
            if suffix in self.members[i]:
                self.problems[i] = f"{name}: sample {key}: duplicate member {info.name!r}"
            self.members[i][suffix] = (info.offset_data, info.size)
        if extra or len(present) != len(keys):
            missing = sorted(set(keys) - present)
            raise ShardError(
                f"{name}: holds {len(present) + len(extra)} samples but manifest.json lists {len(keys)} "
                f"(missing {missing[:5]}, unexpected {sorted(extra)[:5]}); the shard and manifest "
                "disagree (re-run `repa prepare`)"
            )

    def member(self, index: int, suffix: str) -> bytes | None:
        """The bytes of member ``{key}.{suffix}`` of sample ``index``, None if it has none."""
        where = self.members[index].get(suffix)
        if where is None:
            return None
        offset, size = where
        return self.data[offset : offset + size]

    def sample(
        self, index: int, decode: SampleDecoder, suffixes: Sequence[str] = (PNG, CLS, MOMENTS)
    ) -> Sample:
        """Sample ``index`` decoded by ``decode`` from its members among ``suffixes``; SampleError if bad."""
        members = {}
        for suffix in suffixes:
            data = self.member(index, suffix)
            if data is not None:
                members[suffix] = data
        return decode(self.keys[index], members)
