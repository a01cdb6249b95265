"""Streaming reader: an IterableDataset over prepared shards on any fsspec URL, and its DataLoader.

Which sample comes where is ``repa.data.order`` (a pure function of the manifest counts and
``(seed, epoch, shards_in_flight, chunk_size)``); this module fetches the shards the positions fall
in (one GET per shard, in background threads, ahead of need), decodes the samples with
``format.SampleDecoder`` and batches them; ``StreamLoader`` counts the batches it hands out, so its
``state_dict()`` resumes the stream exactly, with any world size. See docs/data.md, "Streaming reader".
"""

from __future__ import annotations

import logging
from collections import Counter, OrderedDict, deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from repa import storage
from repa.data import format as fmt
from repa.data.order import (
    DEFAULT_CHUNK_SIZE,
    DEFAULT_SHARDS_IN_FLIGHT,
    EpochOrder,
    ReaderState,
    batch_positions,
    check_order_args,
    check_resume_state,
)

log = logging.getLogger(__name__)

__all__ = ["ShardReadError", "StreamLoader", "StreamingDataset", "make_loader"]


class ShardReadError(storage.StorageError):
    """A shard could not be read (after retries); the message names the shard URL."""


# ----------------------------------------------------------------------------------------------
# Storage: shards
# ----------------------------------------------------------------------------------------------


def _load_shard(
    where: storage.Location,
    info: fmt.ShardInfo,
    *,
    verify_sha256: bool,
    retry_attempts: int,
) -> fmt.IndexedShard:
    """GET the whole shard (one request, retried), check it against the manifest, index it."""
    url = where.url
    try:
        data = storage.read_bytes(where, attempts=retry_attempts)
    except FileNotFoundError:
        raise ShardReadError(
            f"{url}: not found, but manifest.json lists it (data.url points at the wrong folder?)"
        ) from None
    except storage.StorageError as e:
        raise ShardReadError(f"{url}: could not be read: {e}") from e
    except Exception as e:  # not transient: permission, bad endpoint...
        raise ShardReadError(f"{url}: could not be read: {type(e).__name__}: {e}") from e
    if len(data) != info.bytes:
        raise fmt.ShardError(
            f"{url}: {len(data)} bytes but manifest.json says {info.bytes}; the shard or the manifest is "
            "stale or truncated (re-run `repa prepare`)"
        )
    if verify_sha256:
        try:
            fmt.check_shard_bytes(data, info)
        except fmt.ShardError as e:
            raise fmt.ShardError(f"{url}: {e}") from None
    return fmt.IndexedShard(url, data, info.keys())


# ----------------------------------------------------------------------------------------------
# Dataset
# ----------------------------------------------------------------------------------------------


class StreamingDataset(IterableDataset):
    """Per-rank micro-batches from a prepared dataset at ``url`` (s3://, gs://, file://, memory://...).

    Yields dicts (already batched; use ``make_loader``, which sets ``batch_size=None``):
    ``image`` uint8 (B, 3, H, W), ``moments`` float32 (B, 2C, h, w) (if the data has latents),
    ``label`` int64 (B,), ``position`` int64 (B,) stream positions, ``replaced`` bool (B,), ``key`` list[str].

    Args:
        url: the folder holding ``manifest.json`` and the shards: a URL, or a ``repa.storage.Location``
            with the fsspec options that reach it (``cfg.storage.locate(cfg.data.url)``).
        rank, world_size: this process among the data-parallel ranks.
        batch_size: per-rank micro-batch ``B``; one global micro-batch is ``world_size * B`` samples.
        seed: the data order seed (``data.seed``).
        samples_consumed: stream position to start at (global samples consumed; from the checkpoint).
        start_state: alternatively a ``ReaderState`` (epoch, position); overrides ``samples_consumed``.
        shards_in_flight: ``K`` lanes (shards read concurrently by the whole job); part of the order.
        chunk_size: ``c`` consecutive samples from one lane; part of the order.
        readahead_shards: shards fetched ahead of need per worker (memory: live + this many). None:
            the lanes per worker, ``ceil(K / (world_size * num_workers))`` (double buffering: every
            lane's next shard arrives while the current ones are decoded).
        io_threads: background fetch threads per worker.
        verify_sha256: hash every shard against the manifest (size and key set are always checked).
        retry_attempts: attempts per shard GET on transient errors (``storage.retry``).
        num_batches: micro-batches this rank yields in total (None: endless, the trainer stops).
        manifest: an already-read Manifest (skips reading ``manifest.json``).
    """

    def __init__(
        self,
        url: str | storage.Location,
        *,
        rank: int = 0,
        world_size: int = 1,
        batch_size: int,
        seed: int = 0,
        samples_consumed: int = 0,
        start_state: ReaderState | None = None,
        shards_in_flight: int = DEFAULT_SHARDS_IN_FLIGHT,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        readahead_shards: int | None = None,
        io_threads: int = 2,
        verify_sha256: bool = False,
        retry_attempts: int = 5,
        num_batches: int | None = None,
        manifest: fmt.Manifest | None = None,
    ) -> None:
        super().__init__()
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank/world_size: expected 0 <= rank < world_size, got {rank}/{world_size}")
        if batch_size < 1:
            raise ValueError(f"batch_size: expected >= 1, got {batch_size}")
        check_order_args(shards_in_flight, chunk_size)
        if (readahead_shards is not None and readahead_shards < 0) or io_threads < 1 or retry_attempts < 1:
            raise ValueError("readahead_shards >= 0, io_threads >= 1 and retry_attempts >= 1 required")
        if num_batches is not None and num_batches < 0:
            raise ValueError(f"num_batches: expected >= 0 or None, got {num_batches}")
        where = storage.locate(url)
        self.location = storage.Location(where.url.rstrip("/"), where.options)
        self.url = self.location.url
        self.manifest = manifest if manifest is not None else fmt.read_manifest(self.location)
        self.epoch_size = self.manifest.num_samples
        if self.epoch_size < 1:
            raise ValueError(f"{self.url}: the manifest lists no samples")
        self.counts = [s.num_samples for s in self.manifest.shards]
        self.rank, self.world_size, self.batch_size = rank, world_size, batch_size
        self.seed, self.shards_in_flight, self.chunk_size = int(seed), int(shards_in_flight), int(chunk_size)
        self.readahead_shards, self.io_threads = readahead_shards, io_threads
        self.verify_sha256, self.retry_attempts, self.num_batches = verify_sha256, retry_attempts, num_batches
        self.samples_consumed = 0
        self.set_start(start_state.samples_consumed(self.epoch_size) if start_state else samples_consumed)

    @property
    def global_batch_size(self) -> int:
        """Samples consumed by all ranks together per micro-batch: ``world_size * batch_size``."""
        return self.world_size * self.batch_size

    def set_start(self, samples_consumed: int) -> None:
        """Start (the next ``iter``) at this stream position."""
        if samples_consumed < 0:
            raise ValueError(f"samples_consumed: expected >= 0, got {samples_consumed}")
        self.samples_consumed = int(samples_consumed)

    def state(self, batches_consumed: int = 0) -> ReaderState:
        """The state after every rank consumed ``batches_consumed`` micro-batches from the start."""
        return ReaderState.from_samples(
            self.samples_consumed + batches_consumed * self.global_batch_size, self.epoch_size
        )

    def shard_location(self, shard: int) -> storage.Location:
        return self.location.join(self.manifest.shards[shard].name)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        return _WorkerStream(self, worker, num_workers).run()


@dataclass
class _Unit:
    """One micro-batch to produce: its stream positions and the (epoch, shard) keys/indices they need."""

    positions: np.ndarray  # (B,) stream positions
    keys: np.ndarray  # (B,) epoch * S + shard
    indices: np.ndarray  # (B,) index in ShardInfo.keys()


class _WorkerStream:
    """One DataLoader worker's share: plans units, fetches shards ahead in threads, assembles batches."""

    def __init__(self, ds: StreamingDataset, worker: int, num_workers: int) -> None:
        self.ds, self.worker, self.num_workers = ds, worker, num_workers
        self.S = len(ds.counts)
        self.orders: OrderedDict[int, EpochOrder] = OrderedDict()
        manifest = ds.manifest
        self.resolution = manifest.resolution
        self.moments_shape = tuple(manifest.moments_shape) if manifest.has_moments else None
        self.num_classes = manifest.num_classes
        lanes_per_worker = -(-ds.shards_in_flight // (ds.world_size * num_workers))
        self.readahead = ds.readahead_shards if ds.readahead_shards is not None else lanes_per_worker
        self.decode = fmt.SampleDecoder(require_moments=manifest.has_moments)
        self.suffixes = (fmt.PNG, fmt.CLS) + ((fmt.MOMENTS,) if manifest.has_moments else ())
        self.replaced = 0
        self.fetches = 0  # shard GETs submitted by this worker
        self.peak_shards = 0  # most shards held or in flight at once (memory bound: see docs/data.md)

    # -- planning ---------------------------------------------------------------------------------
    def order(self, epoch: int) -> EpochOrder:
        order = self.orders.get(epoch)
        if order is None:
            ds = self.ds
            order = EpochOrder(
                ds.counts,
                seed=ds.seed,
                epoch=epoch,
                shards_in_flight=ds.shards_in_flight,
                chunk_size=ds.chunk_size,
            )
            self.orders[epoch] = order
            while len(self.orders) > 4:  # epochs in flight: current, next, and straddles
                self.orders.popitem(last=False)
        return order

    def units(self) -> Iterator[_Unit]:
        ds, n = self.ds, self.ds.epoch_size
        i = self.worker
        while ds.num_batches is None or i < ds.num_batches:
            pos = batch_positions(
                ds.samples_consumed, i, rank=ds.rank, world_size=ds.world_size, batch_size=ds.batch_size
            )
            epochs, within = np.divmod(pos, n)
            keys = np.empty_like(pos)
            indices = np.empty_like(pos)
            for e in np.unique(epochs):
                sel = epochs == e
                shard, index = self.order(int(e)).locate(within[sel])
                keys[sel] = int(e) * self.S + shard
                indices[sel] = index
            yield _Unit(pos, keys, indices)
            i += self.num_workers

    # -- I/O ----------------------------------------------------------------------------------------
    def fetch(self, key: int) -> fmt.IndexedShard:
        ds = self.ds
        epoch, shard = divmod(key, self.S)
        loaded = _load_shard(
            ds.shard_location(shard),
            ds.manifest.shards[shard],
            verify_sha256=ds.verify_sha256,
            retry_attempts=ds.retry_attempts,
        )
        log.debug("rank %d worker %d fetched %s for epoch %d", ds.rank, self.worker, loaded.name, epoch)
        return loaded

    def run(self) -> Iterator[dict[str, Any]]:
        ds = self.ds
        units = self.units()
        ahead: deque[_Unit] = deque()  # planned units not yet produced
        refs: Counter[int] = Counter()  # key -> planned units still needing it
        to_fetch: deque[int] = deque()  # keys in order of first need, not yet submitted
        loaded: dict[int, Future[fmt.IndexedShard]] = {}  # submitted keys (in flight or in memory)
        touched: set[int] = set()  # submitted keys whose first unit has been produced
        exhausted = False
        pool = ThreadPoolExecutor(max_workers=ds.io_threads, thread_name_prefix="repa-shard-fetch")

        # Plan units this far ahead (stream positions): a shard lives in one lane for at most
        # ceil(n/c) rounds of K chunks, so within the horizon the worker sees every further use of
        # the shards it holds and evicts each after its last use. (A shard cut by a lane boundary
        # is used at both ends of the epoch: it is fetched twice rather than held all epoch.)
        horizon = (max(ds.counts) + 2 * ds.chunk_size) * ds.shards_in_flight + 2 * ds.global_batch_size * (
            self.num_workers
        )

        def submit(key: int) -> None:
            loaded[key] = pool.submit(self.fetch, key)
            self.fetches += 1

        def plan_ahead() -> None:
            nonlocal exhausted
            while not exhausted and (
                len(ahead) < 2 or ahead[-1].positions[0] - ahead[0].positions[0] < horizon
            ):
                unit = next(units, None)
                if unit is None:
                    exhausted = True
                    break
                ahead.append(unit)
                for key in dict.fromkeys(unit.keys.tolist()):
                    if refs[key] == 0 and key not in loaded:
                        to_fetch.append(key)
                    refs[key] += 1

        try:
            while True:
                plan_ahead()
                if not ahead:
                    return
                unit = ahead.popleft()
                needed = dict.fromkeys(unit.keys.tolist())
                while to_fetch and (
                    to_fetch[0] in needed
                    or sum(1 for k in loaded if k not in touched and k not in needed) < self.readahead
                ):
                    key = to_fetch.popleft()
                    if key not in loaded:
                        submit(key)
                for key in needed:  # a key evicted and needed again (rare) is fetched again
                    if key not in loaded:
                        submit(key)
                self.peak_shards = max(self.peak_shards, len(loaded))
                batch = self.assemble(unit, {k: loaded[k].result() for k in needed})
                touched.update(needed)
                for key in needed:
                    refs[key] -= 1
                    if refs[key] <= 0:
                        del refs[key]
                        loaded.pop(key, None)
                        touched.discard(key)
                        order = self.orders.get(key // self.S)
                        if order is not None:
                            order.forget([key % self.S])
                yield batch
        finally:
            for future in loaded.values():
                future.cancel()
            pool.shutdown(wait=False, cancel_futures=True)

    # -- decoding -----------------------------------------------------------------------------------
    def check(self, shard: fmt.IndexedShard, index: int) -> tuple[np.ndarray, np.ndarray | None, int] | str:
        """Decoded (image, moments, label) of a sample, or why it is unusable."""
        if index in shard.problems:
            return shard.problems[index]
        where = f"{shard.name}: sample {shard.keys[index]}"
        try:
            sample = shard.sample(index, self.decode, self.suffixes)
        except fmt.SampleError as e:
            return f"{where}: {e}"
        label = sample["label"]
        if label >= self.num_classes:
            return f"{where}: label {label} outside [0, {self.num_classes})"
        try:
            image = fmt.decode_png(sample["png"])
        except Exception as e:  # PIL raises many types for corrupt data
            return f"{where}: corrupt member '{sample['key']}.{fmt.PNG}' ({type(e).__name__}: {e})"
        if image.shape != (3, self.resolution, self.resolution):
            return f"{where}: image {image.shape}, manifest resolution {self.resolution}"
        moments = None
        if self.moments_shape is not None:
            m = sample["moments"]
            assert m is not None  # the decoder requires the member
            if tuple(m.shape) != self.moments_shape or m.dtype.kind != "f":
                return f"{where}: moments {m.dtype} {tuple(m.shape)}, manifest says {self.moments_shape}"
            moments = m.astype(np.float32)
            if not np.isfinite(moments).all():
                return f"{where}: moments not finite"
        return image, moments, label

    def get(
        self, shard: fmt.IndexedShard, index: int
    ) -> tuple[tuple[np.ndarray, np.ndarray | None, int], str, bool]:
        """The sample at ``index``, or if unusable the next usable one of the same shard (stored order)."""
        n = len(shard.keys)
        for step in range(n):
            j = (index + step) % n
            result = self.check(shard, j)
            if isinstance(result, str):
                shard.problems.setdefault(j, result)
                continue
            if step > 0:
                log.warning(
                    "%s; replaced by sample %s (the next usable one of the shard)",
                    shard.problems[index],
                    shard.keys[j],
                )
            return result, shard.keys[j], step > 0
        raise fmt.ShardError(
            f"{shard.name}: no usable sample in the whole shard (first problem: {shard.problems[index]})"
        )

    def assemble(self, unit: _Unit, shards: dict[int, fmt.IndexedShard]) -> dict[str, Any]:
        images, moments, labels, keys, replaced = [], [], [], [], []
        for key, index in zip(unit.keys.tolist(), unit.indices.tolist()):
            (image, m, label), sample_key, was_replaced = self.get(shards[key], index)
            images.append(image)
            moments.append(m)
            labels.append(label)
            keys.append(sample_key)
            replaced.append(was_replaced)
        self.replaced += sum(replaced)
        batch: dict[str, Any] = {
            "image": torch.from_numpy(np.stack(images)),
            "label": torch.tensor(labels, dtype=torch.int64),
            "position": torch.from_numpy(unit.positions.copy()),
            "replaced": torch.tensor(replaced, dtype=torch.bool),
            "key": keys,
        }
        if self.moments_shape is not None:
            batch["moments"] = torch.from_numpy(np.stack(moments))
        return batch


# ----------------------------------------------------------------------------------------------
# Loader
# ----------------------------------------------------------------------------------------------


def _identity(batch: Any) -> Any:
    return batch


class StreamLoader(DataLoader):
    """A DataLoader over a StreamingDataset that counts the micro-batches it handed out.

    ``state_dict()`` = ``{"samples_consumed", "epoch", "position"}`` after the batches yielded so far
    (same on every rank) plus the settings that fix the order (``seed``, ``shards_in_flight``,
    ``chunk_size``, ``epoch_size``); ``load_state_dict()`` before ``iter()`` resumes there. A second
    ``iter()`` continues after the batches the first one yielded.
    """

    def __init__(self, dataset: StreamingDataset, **kwargs: Any) -> None:
        super().__init__(dataset, batch_size=None, collate_fn=_identity, **kwargs)
        self.batches_yielded = 0
        self.replaced = 0  # samples replaced because a member was missing or corrupt (see StreamingDataset)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        # A new iterator continues where the previous one stopped (it is one stream).
        ds: StreamingDataset = self.dataset  # type: ignore[assignment]
        ds.set_start(self.samples_consumed())
        self.batches_yielded = 0
        for batch in super().__iter__():
            self.batches_yielded += 1
            self.replaced += int(batch["replaced"].sum())
            yield batch

    def samples_consumed(self) -> int:
        ds: StreamingDataset = self.dataset  # type: ignore[assignment]
        return ds.samples_consumed + self.batches_yielded * ds.global_batch_size

    def _order_settings(self) -> dict[str, int]:
        """What defines the order: resuming with other values would repeat or skip samples."""
        ds: StreamingDataset = self.dataset  # type: ignore[assignment]
        return {
            "seed": ds.seed,
            "shards_in_flight": ds.shards_in_flight,
            "chunk_size": ds.chunk_size,
            "epoch_size": ds.epoch_size,
        }

    def state_dict(self) -> dict[str, int]:
        ds: StreamingDataset = self.dataset  # type: ignore[assignment]
        state = ReaderState.from_samples(self.samples_consumed(), ds.epoch_size)
        return {"samples_consumed": self.samples_consumed(), **state.to_dict(), **self._order_settings()}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Resume at ``state["samples_consumed"]``; the order-defining fields, if present, must match
        (``order.check_resume_state``: ValueError naming the config key)."""
        check_resume_state(state, self._order_settings())
        ds: StreamingDataset = self.dataset  # type: ignore[assignment]
        ds.set_start(int(state["samples_consumed"]))
        self.batches_yielded = 0


def make_loader(
    dataset: StreamingDataset,
    num_workers: int = 0,
    prefetch_factor: int | None = 2,
    pin_memory: bool = False,
    multiprocessing_context: str | None = None,
) -> StreamLoader:
    """DataLoader yielding the rank's micro-batches in exact order for any ``num_workers``.

    ``batch_size=None``: the dataset yields whole micro-batches and worker ``w`` produces the rank's
    micro-batches ``w, w + nw, ...``, which DataLoader's in-order round-robin over workers returns
    as ``0, 1, 2, ...``.
    """
    if num_workers < 0:
        raise ValueError(f"num_workers: expected >= 0, got {num_workers}")
    kwargs: dict[str, Any] = {"num_workers": num_workers, "pin_memory": pin_memory}
    if num_workers > 0:
        kwargs["prefetch_factor"] = prefetch_factor
        kwargs["multiprocessing_context"] = multiprocessing_context
    return StreamLoader(dataset, **kwargs)
