"""`repa prepare images`: ImageNet-style source -> ADM-cropped PNG shards (png + cls) + sidecars.

Each worker writes its shards of the plan (``plan.worker_shards``), skipping the ones already done;
per image: read, ADM center crop (``format.adm_center_crop``), PNG. Unreadable images are skipped
and listed. The worker that completes the set writes ``manifest.json`` (``finalize``).
"""

from __future__ import annotations

import io
import logging
import os
import re
import time
from concurrent.futures import ThreadPoolExecutor

from PIL import Image

from repa import storage
from repa.data.format import (
    ManifestError,
    Sample,
    ShardInfo,
    SkippedFile,
    adm_center_crop,
    encode_png,
    sample_key,
    sha256_hex,
    shard_name,
    sidecar_name,
    write_shard,
)
from repa.data.prepare.finalize import finalize
from repa.data.prepare.plan import (
    DEFAULT_TARGET_SHARD_BYTES,
    estimate_sample_bytes,
    make_plan,
    resolve_worker,
    worker_shards,
    write_or_check_plan,
)
from repa.data.prepare.report import (
    DEFAULT_MAX_BAD_FRACTION,
    PrepareError,
    PrepareSummary,
    progress_bar,
    too_many_bad,
)
from repa.data.prepare.sidecars import Sidecar, read_sidecar, write_sidecar
from repa.data.prepare.sources import Source, SourceFile, open_source

logger = logging.getLogger(__name__)

__all__ = ["prepare_images"]

_OBJECT_REPR = re.compile(r"\s*<[^<>]* at 0x[0-9a-fA-F]+>")


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
    data_url: str | storage.Location, shard: int, fingerprint: str, entries: dict[str, storage.Entry]
) -> bool:
    """True if shard and sidecar are committed for this plan and the shard has the recorded size."""
    side, tar = entries.get(sidecar_name(shard)), entries.get(shard_name(shard))
    if side is None or tar is None:
        return False
    try:
        sidecar = read_sidecar(data_url, shard)
    except ManifestError as e:
        logger.warning("%s; redoing the shard", e)
        return False
    if sidecar.plan != fingerprint:
        raise PrepareError(
            f"{storage.join(data_url, sidecar_name(shard))}: belongs to another plan ({sidecar.plan}); "
            "the output URL holds a different dataset: use a new URL or delete it"
        )
    size = tar.size if tar.size is not None else storage.size(storage.join(data_url, shard_name(shard)))
    expected = sidecar.pending["bytes"] if sidecar.pending else sidecar.shard.bytes
    if size not in (sidecar.shard.bytes, expected):
        logger.warning("%s: size %s != %s in its sidecar; redoing it", shard_name(shard), size, expected)
        return False
    return True


def prepare_images(
    source_url: str | storage.Location,
    out_url: str | storage.Location,
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
    source = open_source(source_url, max_per_class=max_per_class, num_threads=threads)
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
        write_or_check_plan(out_url, plan)
        mine = worker_shards(plan.num_shards, index, count)
        summary.shards_assigned = len(mine)
        storage.cleanup_temps(out_url, [n for s in mine for n in (shard_name(s), sidecar_name(s))])
        entries = {e.name: e for e in storage.list_entries(out_url)}
        with ThreadPoolExecutor(16) as pool:  # one small GET per finished shard: overlap them
            done = list(pool.map(lambda s: _shard_done(out_url, s, plan.fingerprint, entries), mine))
        todo = [s for s, finished in zip(mine, done) if not finished]
        summary.shards_skipped = len(mine) - len(todo)
        # Early abort only once this worker cannot end below the limit; finalize checks the whole set.
        planned = sum(len(plan.shard_items(s)) for s in mine)
        with ThreadPoolExecutor(max(1, threads)) as pool, progress_bar(len(todo), "images", progress) as bar:
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
                    raise PrepareError(too_many_bad(summary.bad_files, planned, max_bad_fraction, out_url))
                data = write_shard(samples)
                info = ShardInfo(
                    shard_name(s), items[0][0], len(samples), len(data), sha256_hex(data), tuple(skipped)
                )
                sidecar = Sidecar(plan.fingerprint, info, {sample_key(i): f.rel for i, f in items})
                storage.write_bytes_atomic(storage.join(out_url, shard_name(s)), data)
                write_sidecar(out_url, s, sidecar)
                summary.shards_written += 1
                summary.samples_written += len(samples)
                summary.bytes_written += len(data)
                bar.update(1)
                bar.set_postfix(samples=summary.samples_written, bad=len(summary.bad_files))
    finally:
        source.close()
    summary.manifest = finalize(out_url, max_bad_fraction=max_bad_fraction)
    summary.seconds = time.monotonic() - t0
    logger.info("%s", summary.format().splitlines()[0])
    return summary
