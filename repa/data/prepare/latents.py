"""`repa prepare latents`: every shard -> VAE moments (``cat([mean, std])``) added as ``{key}.moments.npy``.

REPA's ``preprocessing/dataset_tools.py encode``, but batched, CPU or GPU, multi-worker (the
reference's is CUDA-only, batch 1, single process). Each shard is rewritten in place, crash-safe
(the sidecar announces the new shard's sha256 before it replaces the old one).
"""

from __future__ import annotations

import dataclasses
import io
import logging
import time
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from repa import storage
from repa.data.format import (
    MANIFEST_NAME,
    MOMENTS_DTYPES,
    Sample,
    ShardError,
    decode_png,
    iter_shard,
    moments_float16_error,
    sha256_hex,
    shard_name,
    sidecar_name,
    write_shard,
)
from repa.data.prepare.finalize import finalize
from repa.data.prepare.plan import read_plan, resolve_worker, worker_shards
from repa.data.prepare.report import PrepareError, PrepareSummary, progress_bar
from repa.data.prepare.sidecars import Sidecar, read_sidecar, write_sidecar

logger = logging.getLogger(__name__)

__all__ = ["prepare_latents"]


def _batches(items: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def prepare_latents(
    data_url: str | storage.Location,
    *,
    vae: Any = "sd-vae-ft-mse",
    vae_weights_url: str | storage.Location | None = None,
    batch_size: int = 64,
    device: str = "cpu",
    moments_dtype: str = "float16",
    worker_index: int | None = None,
    worker_count: int | None = None,
    progress: bool = False,
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
    plan = read_plan(data_url)
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
    storage.cleanup_temps(data_url, [n for s in mine for n in (shard_name(s), sidecar_name(s))])

    todo: list[tuple[int, Sidecar]] = []
    for s in mine:
        try:
            side = read_sidecar(data_url, s)
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
        storage.remove(storage.join(data_url, MANIFEST_NAME))

    fp16_worst: dict[str, float] = {}
    with progress_bar(len(todo), "latents", progress) as bar:
        for s, side in todo:
            name = shard_name(s)
            url = storage.join(data_url, name)
            data = storage.read_bytes(url)
            digest = sha256_hex(data)
            if digest != side.shard.sha256:
                if side.pending and digest == side.pending["sha256"]:  # crashed after the shard write
                    _commit_pending(data_url, s, side)
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
            write_sidecar(data_url, s, side)  # 1. announce the new shard
            storage.write_bytes_atomic(url, new)  # 2. replace the shard atomically
            _commit_pending(data_url, s, side)  # 3. commit its record
            for k, v in shard_err.items():
                fp16_worst[k] = max(fp16_worst.get(k, 0.0), v)
            summary.shards_written += 1
            summary.samples_written += len(out)
            summary.bytes_written += len(new)
            bar.update(1)
            bar.set_postfix(samples=summary.samples_written)
    summary.moments_fp16_error = fp16_worst or None
    summary.manifest = finalize(data_url)
    summary.seconds = time.monotonic() - t0
    logger.info("%s", summary.format().splitlines()[0])
    return summary


def _commit_pending(data_url: str | storage.Location, shard: int, side: Sidecar) -> None:
    assert side.pending is not None
    side.shard = dataclasses.replace(side.shard, bytes=side.pending["bytes"], sha256=side.pending["sha256"])
    side.pending = None
    write_sidecar(data_url, shard, side)
