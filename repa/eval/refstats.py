"""Reference statistics for FID: ADM's reference batches and our own ``.npz`` files.

Two formats are read, one is written:

- ADM (openai/guided-diffusion ``evaluations``), e.g. ``VIRTUAL_imagenet256_labeled.npz``:
  ``mu`` (2048,), ``sigma`` (2048, 2048) of Inception pool_3 features, ``arr_0`` (10000, 256, 256, 3)
  uint8 reference images for precision/recall, ``mu_s`` (2023,), ``sigma_s`` (2023, 2023) of the
  ``mixed_6/conv`` spatial features for sFID (:mod:`repa.eval.inception`). Read as they are.
- repa (``repa eval ref-stats``; :func:`save_reference_stats`): ``mu``, ``sigma`` (float64),
  ``mu_s``/``sigma_s`` as ADM's (when the extractor is Inception),
  ``num_images``, ``feature_extractor`` and ``feature_extractor_sha256`` (which network, which
  weights), ``image_size`` (H, W), and optionally ``features`` (a uniform random subset of the
  features, float32) and/or ``arr_0`` (the same subset of images, NHWC uint8) for precision/recall.
  Keeping ``arr_0`` makes the file readable by ADM's evaluator too.

A file is identified by the sha256 of its bytes, recorded with every evaluation result.
"""

from __future__ import annotations

import hashlib
import io
import logging
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from repa import storage
from repa.eval.errors import MetricsError
from repa.eval.features import FeatureExtractor, FeaturePass, sha256_file
from repa.eval.images import ImageSource, iter_image_batches
from repa.eval.stats import FeatureStats

__all__ = [
    "FORMAT_VERSION",
    "ReferenceStats",
    "ReferenceStatsError",
    "compute_dataset_reference_stats",
    "compute_reference_stats",
    "iter_dataset_images",
    "load_reference_stats",
    "save_reference_stats",
]

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1


class ReferenceStatsError(MetricsError):
    """A reference statistics file is missing or malformed; the message names the file and keys."""


@dataclass
class ReferenceStats:
    """What an evaluation compares against: Gaussian stats, plus optional data for precision/recall."""

    mu: np.ndarray  # (D,) float64
    sigma: np.ndarray  # (D, D) float64
    num_images: int | None = None  # images behind mu/sigma (ADM files do not record it)
    feature_extractor: str | None = None  # None: unknown (ADM files; assumed Inception)
    feature_extractor_sha256: str | None = None
    features: np.ndarray | None = None  # (M, D) float32 subset for precision/recall
    images: np.ndarray | None = None  # (M, H, W, 3) uint8 subset for precision/recall
    image_size: tuple[int, int] | None = None  # (H, W) the statistics were computed at
    sha256: str | None = None  # of the file it was loaded from / saved to
    source: str | None = None  # URL it was loaded from / saved to
    mu_s: np.ndarray | None = None  # (2023,) sFID statistics (ADM's mixed_6/conv[..., :7]); None: no sFID
    sigma_s: np.ndarray | None = None  # (2023, 2023)
    feature_cache: dict[tuple[str, str | None], Any] = field(default_factory=dict, repr=False, compare=False)
    """Features of ``images`` per (extractor name, weights sha256), filled by the first evaluation."""

    def __post_init__(self) -> None:
        where = self.source or "reference statistics"
        self.mu = np.asarray(self.mu, dtype=np.float64)
        self.sigma = np.asarray(self.sigma, dtype=np.float64)
        if self.mu.ndim != 1:
            raise ReferenceStatsError(f"{where}: mu must be 1-D, got shape {self.mu.shape}")
        d = self.mu.shape[0]
        if self.sigma.shape != (d, d):
            raise ReferenceStatsError(
                f"{where}: sigma has shape {self.sigma.shape} but mu has {d} features; expected ({d}, {d})"
            )
        if not (np.isfinite(self.mu).all() and np.isfinite(self.sigma).all()):
            raise ReferenceStatsError(f"{where}: mu or sigma contains NaN or inf")
        if (self.mu_s is None) != (self.sigma_s is None):
            raise ReferenceStatsError(f"{where}: mu_s and sigma_s (sFID) come together; only one is present")
        if self.mu_s is not None:
            self.mu_s = np.asarray(self.mu_s, dtype=np.float64)
            self.sigma_s = np.asarray(self.sigma_s, dtype=np.float64)
            ds = self.mu_s.shape[0] if self.mu_s.ndim == 1 else -1
            if ds < 0 or self.sigma_s.shape != (ds, ds):
                raise ReferenceStatsError(
                    f"{where}: mu_s {self.mu_s.shape} and sigma_s {self.sigma_s.shape} are not (D,), (D, D)"
                )
            if not (np.isfinite(self.mu_s).all() and np.isfinite(self.sigma_s).all()):
                raise ReferenceStatsError(f"{where}: mu_s or sigma_s contains NaN or inf")
        if self.features is not None:
            self.features = np.asarray(self.features, dtype=np.float32)
            if self.features.ndim != 2 or self.features.shape[1] != d:
                raise ReferenceStatsError(
                    f"{where}: features have shape {self.features.shape}, expected (M, {d}) to match mu"
                )
        if self.images is not None:
            imgs = self.images
            if imgs.dtype != np.uint8 or imgs.ndim != 4 or imgs.shape[-1] != 3:
                raise ReferenceStatsError(
                    f"{where}: arr_0 must be uint8 images (N, H, W, 3), got {imgs.dtype} {imgs.shape}"
                )
            size = (int(imgs.shape[1]), int(imgs.shape[2]))
            if self.image_size is not None and tuple(self.image_size) != size:
                raise ReferenceStatsError(
                    f"{where}: image_size {tuple(self.image_size)} but arr_0 images are {size}"
                )
            self.image_size = size
        if self.image_size is not None:
            self.image_size = (int(self.image_size[0]), int(self.image_size[1]))

    @property
    def stats(self) -> FeatureStats:
        return FeatureStats(mu=self.mu, sigma=self.sigma, num_samples=self.num_images or 0)

    @property
    def spatial_stats(self) -> FeatureStats | None:
        """sFID's Gaussian (``mu_s``/``sigma_s``), or None when the file has none."""
        if self.mu_s is None:
            return None
        return FeatureStats(mu=self.mu_s, sigma=self.sigma_s, num_samples=self.num_images or 0)


def load_reference_stats(url: str | storage.Location, load_images: bool = True) -> ReferenceStats:
    """Read an ADM reference batch or a repa statistics file from a local path or fsspec URL.

    Remote files are copied to ``repa.storage.cache_dir()/refstats`` first (ADM's 256px batch holds
    2 GB of images; ``np.load`` and the sha256 read it from local disk). ``load_images=False`` skips
    ``arr_0`` (FID only).
    """
    where, url = url, str(url)
    try:
        path = storage.local_copy(where, kind="refstats")
    except FileNotFoundError as e:
        raise ReferenceStatsError(f"reference statistics {url!r} not found") from e
    digest = sha256_file(path)
    try:
        npz = np.load(path, allow_pickle=False)
    except Exception as e:  # zipfile.BadZipFile, ValueError, OSError with library-specific texts
        raise ReferenceStatsError(f"reference statistics {url!r} is not a readable .npz: {e}") from e
    if not isinstance(npz, np.lib.npyio.NpzFile):
        raise ReferenceStatsError(
            f"reference statistics {url!r} is a single .npy array, not an .npz with mu/sigma"
        )
    with npz:
        keys = sorted(npz.files)
        missing = [k for k in ("mu", "sigma") if k not in keys]
        if missing:
            raise ReferenceStatsError(
                f"reference statistics {url!r} lack key(s) {missing}; found keys {keys}. Expected ADM's "
                "reference batch (mu, sigma, arr_0) or a file written by `repa eval ref-stats`"
            )

        def optional(key: str) -> np.ndarray | None:
            return npz[key] if key in keys else None

        def optional_scalar(key: str) -> Any:
            value = optional(key)
            return None if value is None else value.item()

        size = optional("image_size")
        ref = ReferenceStats(
            mu=npz["mu"],
            sigma=npz["sigma"],
            num_images=optional_scalar("num_images"),
            feature_extractor=optional_scalar("feature_extractor"),
            feature_extractor_sha256=optional_scalar("feature_extractor_sha256") or None,
            features=optional("features"),
            images=optional("arr_0") if load_images else None,
            image_size=None if size is None else tuple(int(s) for s in size),
            sha256=digest,
            source=url,
            mu_s=optional("mu_s"),
            sigma_s=optional("sigma_s"),
        )
    if ref.image_size is None and not load_images and "arr_0" in keys:
        # Keep the resolution check even when the images themselves are not loaded.
        shape = _npz_member_shape(path, "arr_0")
        ref.image_size = (int(shape[1]), int(shape[2]))
    logger.info(
        "reference statistics %s: %d features%s%s, sha256 %s",
        url,
        ref.mu.shape[0],
        f", {len(ref.images)} images" if ref.images is not None else "",
        f", {len(ref.features)} stored features" if ref.features is not None else "",
        digest[:12],
    )
    return ref


def _npz_member_shape(path: str, key: str) -> tuple[int, ...]:
    with zipfile.ZipFile(path) as zf, zf.open(key + ".npy") as member:
        version = np.lib.format.read_magic(member)
        read_header = (
            np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        )
        shape, _, _ = read_header(member)
    return tuple(shape)


def save_reference_stats(url: str | storage.Location, ref: ReferenceStats) -> str:
    """Write ``ref`` as an uncompressed ``.npz`` atomically; returns (and records in ``ref``) its sha256."""
    arrays: dict[str, np.ndarray] = {
        "mu": ref.mu.astype(np.float64),
        "sigma": ref.sigma.astype(np.float64),
        "format_version": np.asarray(FORMAT_VERSION, dtype=np.int64),
    }
    if ref.num_images is not None:
        arrays["num_images"] = np.asarray(ref.num_images, dtype=np.int64)
    if ref.feature_extractor is not None:
        arrays["feature_extractor"] = np.asarray(ref.feature_extractor)
    if ref.feature_extractor_sha256:
        arrays["feature_extractor_sha256"] = np.asarray(ref.feature_extractor_sha256)
    if ref.image_size is not None:
        arrays["image_size"] = np.asarray(ref.image_size, dtype=np.int64)
    if ref.mu_s is not None:
        arrays["mu_s"] = ref.mu_s.astype(np.float64)
        arrays["sigma_s"] = ref.sigma_s.astype(np.float64)
    if ref.features is not None:
        arrays["features"] = ref.features.astype(np.float32)
    if ref.images is not None:
        arrays["arr_0"] = ref.images
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    data = buf.getvalue()
    storage.write_bytes_atomic(url, data)
    ref.sha256 = hashlib.sha256(data).hexdigest()
    ref.source = str(url)
    return ref.sha256


class _Reservoir:
    """Uniform random subset of a stream (Algorithm R, Vitter 1985), reproducible from ``seed``.

    Dataset shards are often class-ordered, so "the first M images" would cover a few classes.
    Rows are copied only when they enter the reservoir.
    """

    def __init__(self, capacity: int, seed: int) -> None:
        self.capacity = capacity
        self.rng = np.random.default_rng(seed)
        self.items: list[tuple[np.ndarray, ...]] = []
        self.seen = 0

    def add(self, *columns: np.ndarray) -> None:
        for row in range(columns[0].shape[0]):
            if len(self.items) < self.capacity:
                self.items.append(tuple(c[row].copy() for c in columns))
            else:
                j = int(self.rng.integers(0, self.seen + 1))
                if j < self.capacity:
                    self.items[j] = tuple(c[row].copy() for c in columns)
            self.seen += 1

    def subset(self, column: int, size: int, order: np.ndarray) -> np.ndarray | None:
        """``size`` items of one column in the random ``order`` (any prefix is again a uniform subset)."""
        if not size or not self.items:
            return None
        return np.stack([self.items[i][column] for i in order[:size]])


def compute_reference_stats(
    images: ImageSource,
    extractor: FeatureExtractor,
    batch_size: int = 64,
    keep_features: int = 10000,
    keep_images: int = 0,
    seed: int = 0,
) -> ReferenceStats:
    """Statistics of ``extractor``'s features over a dataset, streamed (1.28M images fit in memory).

    ``keep_features`` / ``keep_images``: size of a uniform random subset (one reservoir, so the kept
    features and images are the same samples) stored for precision/recall; ADM's reference batch
    holds 10,000 images. sFID's ``mu_s``/``sigma_s`` come from the same pass when the extractor has
    spatial features (Inception). Save the result with :func:`save_reference_stats`.
    """
    if keep_features < 0 or keep_images < 0:
        raise ReferenceStatsError(
            f"keep_features/keep_images must be >= 0, got {keep_features}/{keep_images}"
        )
    with_spatial = hasattr(extractor, "features_logits_spatial")  # sFID's statistics from the same pass
    one = FeaturePass(extractor, with_spatial=with_spatial, keep_features=False)
    reservoir = _Reservoir(max(keep_features, keep_images), seed)
    with torch.inference_mode():
        for batch in iter_image_batches(images, batch_size):
            b = one.add(batch)
            if reservoir.capacity:
                columns = [b.features.numpy()]
                if keep_images:
                    columns.append(batch.permute(0, 2, 3, 1).numpy())  # (B, H, W, 3), ADM's layout
                reservoir.add(*columns)
    if one.size is None:
        raise ReferenceStatsError("no reference images were given")
    extracted = one.result()
    stats, spatial, size = extracted.stats, extracted.spatial_stats, extracted.image_size
    # The reservoir's slot order is not random (no replacement happens before it is full): shuffle, so the
    # kept images are a uniform subset of the kept features' samples. When everything is kept, keep the
    # input order.
    kept = len(reservoir.items)
    everything = reservoir.seen <= min(keep_features or kept, keep_images or kept)
    order = np.arange(kept) if everything else reservoir.rng.permutation(kept)
    return ReferenceStats(
        mu=stats.mu,
        sigma=stats.sigma,
        num_images=stats.num_samples,
        feature_extractor=getattr(extractor, "name", type(extractor).__name__),
        feature_extractor_sha256=getattr(extractor, "weights_sha256", None),
        features=reservoir.subset(0, keep_features, order),
        images=reservoir.subset(1, keep_images, order),
        image_size=size,
        mu_s=None if spatial is None else spatial.mu,
        sigma_s=None if spatial is None else spatial.sigma,
    )


# ----------------------------------------------------------------------------------------------------------
# Reference statistics of a prepared dataset (`repa eval ref-stats`)
# ----------------------------------------------------------------------------------------------------------


def iter_dataset_images(
    data: str | storage.Location, batch_size: int = 64, max_images: int | None = None
) -> Iterator[Any]:
    """uint8 (B, 3, H, W) torch batches of the images of a prepared dataset, in shard order."""
    import torch

    from repa.data import format as fmt

    data = storage.locate(data)
    manifest = fmt.read_manifest(data)
    batch: list[Any] = []
    seen = 0
    for info in manifest.shards:
        where = data.join(info.name)
        raw = storage.read_bytes(where)
        fmt.check_shard_bytes(raw, info)
        for sample in fmt.iter_shard(io.BytesIO(raw), name=where.url, expected_keys=info.keys()):
            batch.append(torch.from_numpy(fmt.decode_png(sample["png"])))
            seen += 1
            if len(batch) == batch_size:
                yield torch.stack(batch)
                batch = []
            if max_images is not None and seen >= max_images:
                break
        if max_images is not None and seen >= max_images:
            break
    if batch:
        yield torch.stack(batch)


def compute_dataset_reference_stats(
    data: str | storage.Location,
    out: str | storage.Location,
    extractor: FeatureExtractor,
    *,
    batch_size: int = 64,
    keep_features: int = 10_000,
    keep_images: int = 0,
    max_images: int | None = None,
    seed: int = 0,
) -> str:
    """Statistics of ``extractor`` over a prepared dataset, saved to ``out``; returns its sha256.

    Degenerate statistics (non-finite, constant or collapsed features: ``repa.eval.stats.check_gaussian``)
    are refused before anything is written, not when a later evaluation would read them."""
    from repa.eval.stats import check_gaussian

    if max_images is not None and max_images < 1:
        raise ReferenceStatsError(f"--max-images {max_images}: expected at least 1 image")
    ref = compute_reference_stats(
        iter_dataset_images(data, batch_size, max_images),
        extractor,
        batch_size=batch_size,
        keep_features=keep_features,
        keep_images=keep_images,
        seed=seed,
    )
    where = data.url if isinstance(data, storage.Location) else data
    check_gaussian(ref.stats, f"reference images of {where}")
    digest = save_reference_stats(out, ref)
    logger.info(
        "reference statistics of %d images of %s -> %s (sha256 %s)", ref.num_images, data, out, digest
    )
    return digest
