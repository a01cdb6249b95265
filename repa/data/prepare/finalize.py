"""`repa prepare finalize | verify`: ``manifest.json`` assembled from plan.json + the sidecars, and checked.

``finalize`` is idempotent and deterministic (N workers racing there write identical bytes,
atomically); the stages call it after their shards, so it rarely needs running by hand.
``verify_dataset`` checks every shard against the manifest.
"""

from __future__ import annotations

import io
import logging
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from repa import storage
from repa.data.format import (
    MANIFEST_NAME,
    Manifest,
    ShardError,
    check_shard_bytes,
    iter_shard,
    read_manifest,
    shard_name,
    sidecar_name,
)
from repa.data.prepare.plan import read_plan
from repa.data.prepare.report import PrepareError, too_many_bad
from repa.data.prepare.sidecars import Sidecar, read_sidecar

logger = logging.getLogger(__name__)

__all__ = ["finalize", "verify_dataset"]


def _vae_identity(sidecar: Sidecar) -> tuple[Any, ...]:
    details = sidecar.vae_details or {}
    return (sidecar.vae, details.get("weights_sha256"), sidecar.moments_dtype, sidecar.moments_shape)


def finalize(
    data_url: str | storage.Location,
    *,
    max_bad_fraction: float | None = None,
) -> Manifest | None:
    """Assemble ``manifest.json`` from ``plan.json`` + all sidecars; None if some shard is not done yet.

    Idempotent and deterministic (N workers racing here write identical bytes, atomically). Also
    None while a latents run is half done (shards with and without moments). PrepareError if the
    dataset-wide fraction of unreadable images exceeds ``max_bad_fraction``.
    """
    plan = read_plan(data_url)
    num_shards = int(plan["num_shards"])
    names = {e.name for e in storage.list_entries(data_url)}
    missing = [s for s in range(num_shards) if sidecar_name(s) not in names or shard_name(s) not in names]
    if missing:
        logger.info(
            "%s: %d of %d shards not done yet; manifest not written", data_url, len(missing), num_shards
        )
        return None
    with ThreadPoolExecutor(16) as pool:
        sidecars = list(pool.map(lambda s: read_sidecar(data_url, s), range(num_shards)))
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
        raise PrepareError(too_many_bad(bad, planned, max_bad_fraction, data_url))
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
    ).validate(str(storage.join(data_url, MANIFEST_NAME)))
    text = manifest.to_json().encode()
    url = storage.join(data_url, MANIFEST_NAME)
    try:
        current = storage.read_bytes(url)
    except FileNotFoundError:
        current = None
    if current != text:
        storage.write_bytes_atomic(url, text)
    logger.info("%s: %d samples in %d shards", url, manifest.num_samples, len(manifest.shards))
    return manifest


def verify_dataset(data_url: str | storage.Location, *, check_samples: bool = True) -> Manifest:
    """Check every shard against ``manifest.json`` (bytes, sha256, keys, labels, moments).

    Raises ShardError naming the first bad shard (and sample); returns the manifest if all agree.
    """
    manifest = read_manifest(data_url)
    for info in manifest.shards:
        data = storage.read_bytes(storage.join(data_url, info.name))
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
