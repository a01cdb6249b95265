"""Streaming reader: an IterableDataset over prepared shards; order = f(seed, epoch), exact elastic resume.

The order of samples is a pure function of the manifest's per-shard counts and
``(seed, epoch, shards_in_flight, chunk_size)``: it does not depend on the world size, the number
of DataLoader workers or the storage. Training reads it as one infinite *stream*: epoch 0's
sequence, then epoch 1's, ... (the trainer is step-based, so a global batch may straddle two
epochs). The only state is ``samples_consumed`` = stream position = ``epoch * N + position``,
identical on every rank (edm2's ``start_idx=cur_nimg``), so a checkpoint needs no gather and a
restart with another world size continues exactly.

Epoch sequence (see docs/data.md, "Streaming reader"):

1. Shards are permuted per (seed, epoch); each shard's samples are permuted per (seed, epoch, shard);
   concatenated, this is the sequence Z (N samples).
2. Z's first ``h = (-epoch * N) mod c`` samples are the *lead-in*: they complete the chunk the
   previous epoch left open, so chunk boundaries stay on the stream's grid of ``c`` (``chunk_size``).
3. The rest of Z is cut into ``K`` (``shards_in_flight``) contiguous *lanes* of (almost) equal
   length in chunks; the epoch interleaves the lanes chunk-wise: lane 0 chunk 0, lane 1 chunk 0,
   ..., lane K-1 chunk 0, lane 0 chunk 1, ... Only the final round can be partial, and its
   present lanes are a prefix, so every chunk but the last is full and on the grid.

Consumption: global micro-batch ``i`` is the stream range ``[S0 + i*G, S0 + (i+1)*G)``, ``G = W*B``;
rank ``r`` takes ``[S0 + i*G + r*B, ... + B)``; DataLoader worker ``w`` of ``nw`` takes the rank's
micro-batches ``w, w + nw, ...``, which DataLoader's round-robin returns in order. A worker fetches
only the shards its positions fall in; when ``c`` divides ``B`` and ``(B/c) * W * nw`` divides
``K``, every lane, hence every shard, is read by exactly one worker of one rank per epoch (plus the
shards cut by lane boundaries; ``shard_readers`` measures it).
"""

from __future__ import annotations

import io
import logging
import tarfile
from collections import Counter, OrderedDict, deque
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from repa import storage
from repa.data import format as fmt

log = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_CHUNK_SIZE",
    "DEFAULT_SHARDS_IN_FLIGHT",
    "EpochOrder",
    "ReaderState",
    "ShardReadError",
    "StreamLoader",
    "StreamingDataset",
    "batch_positions",
    "epoch_order",
    "hash_permutation",
    "make_loader",
    "shard_readers",
    "state_after",
]

DEFAULT_SHARDS_IN_FLIGHT = 64
DEFAULT_CHUNK_SIZE = 8

# Domain tags keep the shard permutation and the per-shard permutations independent streams.
_TAG_SHARDS = 0x5348  # "SH"
_TAG_SAMPLES = 0x5341  # "SA"


class ShardReadError(storage.StorageError):
    """A shard could not be read (after retries); the message names the shard URL."""


# ----------------------------------------------------------------------------------------------
# Order (pure: numpy only, no I/O)
# ----------------------------------------------------------------------------------------------


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64 (Steele et al., 2014) on a uint64 array: a bijection of uint64, so distinct inputs
    give distinct outputs. Defined here (not numpy's RNG) so the order cannot change with numpy."""
    x = x + np.uint64(0x9E3779B97F4A7C15)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def _mix(words: Sequence[int]) -> np.ndarray:
    h = np.zeros(1, dtype=np.uint64)  # arrays, not numpy scalars: uint64 wrap-around without warnings
    for w in words:
        h = _splitmix64(h ^ np.array([int(w) % 2**64], dtype=np.uint64))
    return h


def hash_permutation(n: int, *words: int) -> np.ndarray:
    """A permutation of ``range(n)`` determined by the integers ``words`` (int64 array).

    ``argsort(splitmix64(mix(words) ^ i))``: the keys are distinct (bijection), so the result
    is unique; it is the same on every host and numpy version.
    """
    if n < 0:
        raise ValueError(f"permutation size: expected >= 0, got {n}")
    keys = _splitmix64(_mix(words) ^ np.arange(n, dtype=np.uint64))
    return np.argsort(keys, kind="stable").astype(np.int64)


class EpochOrder:
    """The sample order of one epoch: position ``p`` in ``[0, N)`` -> (shard, index in shard).

    ``index`` is the sample's place in ``ShardInfo.keys()`` (the shard's stored order). The map is
    closed-form from the manifest counts (O(S) set-up, per-shard permutations computed on first
    use), so a worker never materialises the whole epoch nor opens a shard to find a sample.
    """

    def __init__(
        self,
        counts: Sequence[int],
        *,
        seed: int,
        epoch: int,
        shards_in_flight: int,
        chunk_size: int,
    ) -> None:
        _check_order_args(shards_in_flight, chunk_size)
        self.counts = np.asarray(counts, dtype=np.int64)
        if self.counts.ndim != 1 or (self.counts < 0).any():
            raise ValueError("counts: expected a list of non-negative per-shard sample counts")
        if epoch < 0:
            raise ValueError(f"epoch: expected >= 0, got {epoch}")
        self.seed, self.epoch = int(seed), int(epoch)
        self.K, self.c = int(shards_in_flight), int(chunk_size)
        self.num_samples = N = int(self.counts.sum())
        # 1. shard order and the concatenated sequence Z (as cumulative counts in that order)
        self.shard_perm = hash_permutation(len(self.counts), _TAG_SHARDS, self.seed, self.epoch)
        self.cum = np.concatenate([[0], np.cumsum(self.counts[self.shard_perm])]).astype(np.int64)
        # 2. lead-in: close the chunk the previous epochs left open (stream grid of c)
        self.lead_in = min((-self.epoch * N) % self.c, N)
        # 3. lanes: equal numbers of full chunks (the first full % K lanes one more); the short
        #    remainder chunk belongs to lane full % K, which comes right after them in the final round
        rest = N - self.lead_in
        full, remainder = divmod(rest, self.c)
        lanes = np.arange(self.K)
        lengths = (full // self.K + (lanes < full % self.K)) * self.c
        if remainder:
            lengths[full % self.K] += remainder
        self.lane_starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
        self._sample_perms: dict[int, np.ndarray] = {}

    def sample_permutation(self, shard: int) -> np.ndarray:
        """Permutation of shard ``shard``'s samples in this epoch (cached)."""
        perm = self._sample_perms.get(shard)
        if perm is None:
            perm = hash_permutation(int(self.counts[shard]), _TAG_SAMPLES, self.seed, self.epoch, shard)
            self._sample_perms[shard] = perm
        return perm

    def forget(self, shards: Sequence[int]) -> None:
        """Drop cached per-shard permutations (a worker calls this when it evicts shards)."""
        for s in shards:
            self._sample_perms.pop(int(s), None)

    def z_index(self, positions: np.ndarray) -> np.ndarray:
        """Epoch positions -> indices into Z (the concatenation of permuted shards)."""
        p = np.asarray(positions, dtype=np.int64)
        if p.size and (p.min() < 0 or p.max() >= self.num_samples):
            raise ValueError(f"positions: expected in [0, {self.num_samples}), got [{p.min()}, {p.max()}]")
        q = p - self.lead_in  # position after the lead-in
        k, i = np.divmod(np.maximum(q, 0), self.c)  # chunk number, offset in chunk
        t, lane = np.divmod(k, self.K)  # round, lane (the final round holds a prefix of lanes)
        z = self.lead_in + self.lane_starts[lane] + t * self.c + i
        return np.where(q < 0, p, z)

    def locate(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Epoch positions -> (shard, index within ``ShardInfo.keys()``), both int64 arrays."""
        z = self.z_index(positions)
        rank = np.searchsorted(self.cum, z, side="right") - 1  # which shard of the permuted order
        shard = self.shard_perm[rank]
        offset = z - self.cum[rank]  # offset in that shard's permuted sample order
        index = np.empty_like(offset)
        by_shard = np.argsort(shard, kind="stable")
        shards, firsts = np.unique(shard[by_shard], return_index=True)
        for s, a, b in zip(shards.tolist(), firsts.tolist(), [*firsts[1:].tolist(), len(by_shard)]):
            sel = by_shard[a:b]
            index[sel] = self.sample_permutation(s)[offset[sel]]
        return shard, index


def _check_order_args(shards_in_flight: int, chunk_size: int) -> None:
    if int(shards_in_flight) < 1:
        raise ValueError(f"shards_in_flight: expected >= 1, got {shards_in_flight}")
    if int(chunk_size) < 1:
        raise ValueError(f"chunk_size: expected >= 1, got {chunk_size}")


def epoch_order(
    counts: Sequence[int], *, seed: int, epoch: int, shards_in_flight: int, chunk_size: int
) -> tuple[np.ndarray, np.ndarray]:
    """The whole epoch's (shard, index) arrays, length N (for tests and analysis; workers use locate)."""
    order = EpochOrder(
        counts, seed=seed, epoch=epoch, shards_in_flight=shards_in_flight, chunk_size=chunk_size
    )
    return order.locate(np.arange(order.num_samples))


def batch_positions(
    samples_consumed: int,
    batch_index: int,
    *,
    rank: int,
    world_size: int,
    batch_size: int,
) -> np.ndarray:
    """Stream positions of rank ``rank``'s micro-batch ``batch_index`` after a start at ``samples_consumed``.

    Global micro-batch ``i`` = stream ``[S0 + i*G, S0 + (i+1)*G)`` with ``G = world_size * batch_size``;
    rank ``r`` takes the ``r``-th slice of ``batch_size``. Worker ``w`` of ``nw`` serves the rank's
    micro-batches ``w, w + nw, ...``.
    """
    start = samples_consumed + batch_index * world_size * batch_size + rank * batch_size
    return np.arange(start, start + batch_size, dtype=np.int64)


@dataclass(frozen=True)
class ReaderState:
    """Reader progress: ``epoch`` and ``position`` (samples of that epoch consumed by all ranks together)."""

    epoch: int
    position: int

    def samples_consumed(self, epoch_size: int) -> int:
        """The stream position: ``epoch * epoch_size + position``."""
        return self.epoch * epoch_size + self.position

    @classmethod
    def from_samples(cls, samples_consumed: int, epoch_size: int) -> ReaderState:
        if epoch_size < 1:
            raise ValueError(f"epoch_size: expected >= 1, got {epoch_size}")
        if samples_consumed < 0:
            raise ValueError(f"samples_consumed: expected >= 0, got {samples_consumed}")
        epoch, position = divmod(int(samples_consumed), int(epoch_size))
        return cls(epoch, position)

    def to_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position}


def state_after(start: ReaderState, samples: int, epoch_size: int) -> ReaderState:
    """The state after ``samples`` more samples were consumed globally (rolls over epochs)."""
    return ReaderState.from_samples(start.samples_consumed(epoch_size) + samples, epoch_size)


def shard_readers(
    counts: Sequence[int],
    *,
    seed: int,
    epoch: int,
    shards_in_flight: int,
    chunk_size: int,
    world_size: int,
    batch_size: int,
    num_workers: int = 1,
    samples_consumed: int = 0,
) -> np.ndarray:
    """How many (rank, worker) consumers read each shard during ``epoch`` (per-shard int array).

    The run started at stream position ``samples_consumed`` (the batch grid is anchored there);
    ``sum(result) / count_nonzero(counts)`` is the egress factor of that epoch (1.0 = each shard
    fetched once by the whole job). A worker that needs a shard again after evicting it refetches
    it; that does not happen within a lane, so it is not counted here.
    """
    order = EpochOrder(
        counts, seed=seed, epoch=epoch, shards_in_flight=shards_in_flight, chunk_size=chunk_size
    )
    n = order.num_samples
    p = np.arange(n, dtype=np.int64)
    q = (epoch * n + p - samples_consumed) // batch_size  # global micro-batch slot of each position
    if (q < 0).any():
        raise ValueError("samples_consumed: the run starts after this epoch's first sample")
    consumer = (q % world_size) * num_workers + (q // world_size) % num_workers
    z = order.z_index(p)
    shard = order.shard_perm[np.searchsorted(order.cum, z, side="right") - 1]
    pairs = np.unique(shard * (world_size * num_workers) + consumer)
    return np.bincount(pairs // (world_size * num_workers), minlength=len(order.counts))


# ----------------------------------------------------------------------------------------------
# Storage: manifest and shards
# ----------------------------------------------------------------------------------------------


class _NpyDecoder:
    """``.npy`` bytes -> array; the header is parsed once per distinct header, then ``frombuffer``.

    numpy's own header parser (``np.load``) evaluates the header text (~0.3 ms, a third of a
    256px PNG decode); every moments file of a dataset has the same header, so cache it.
    """

    _MAGIC = b"\x93NUMPY"

    def __init__(self) -> None:
        self.cache: dict[bytes, tuple[np.dtype, tuple[int, ...], int]] = {}

    def __call__(self, buf: bytes) -> np.ndarray:
        if buf[:6] == self._MAGIC and len(buf) >= 12 and buf[6] in (1, 2, 3):
            start = 10 if buf[6] == 1 else 12
            end = start + int.from_bytes(buf[8:start], "little")
            hit = self.cache.get(buf[:end])
            if hit is not None:
                dtype, shape, count = hit
                if len(buf) != end + count * dtype.itemsize:
                    raise ValueError(
                        f"npy data is {len(buf) - end} bytes, header says {count * dtype.itemsize}"
                    )
                return np.frombuffer(buf, dtype=dtype, count=count, offset=end).reshape(shape)
            array = fmt.decode_moments(buf)
            if array.flags.c_contiguous and not array.dtype.hasobject and len(buf) == end + array.nbytes:
                self.cache[buf[:end]] = (array.dtype, array.shape, array.size)
            return array
        return fmt.decode_moments(buf)


class _Shard:
    """One shard in memory, indexed in place: members are sliced out of the bytes when a sample is used.

    ``format.iter_shard`` streams (it must work on non-seekable object-store streams) and decodes
    every member up front; the reader holds the whole shard anyway, so it lists the members once
    (tarfile's random-access mode), checks the key set against the manifest, and validates and
    decodes each sample when it is used. A sample with a missing or corrupt member is replaced
    (``_WorkerStream.get``), so this is where per-sample problems are found.
    """

    def __init__(self, url: str, data: bytes, keys: list[str]) -> None:
        self.url, self.data, self.keys = url, data, keys
        self.members: list[dict[str, tuple[int, int]]] = [{} for _ in keys]  # suffix -> (offset, size)
        self.problems: dict[int, str] = {}  # index -> why the sample is unusable (found so far)
        position = {k: i for i, k in enumerate(keys)}
        present: set[str] = set()
        extra: set[str] = set()
        try:
            with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
                infos = tar.getmembers()
        except tarfile.TarError as e:
            raise fmt.ShardError(f"{url}: not a readable tar ({e})") from e
        for info in infos:
            if not info.isfile():
                continue
            # WebDataset: key = path up to the first dot of the basename; suffix = the rest
            slash = info.name.rfind("/")
            dot = info.name.find(".", slash + 1)
            key, suffix = (info.name, "") if dot < 0 else (info.name[:dot], info.name[dot + 1 :])
            i = position.get(key)
            if i is None:
                extra.add(key)
                continue
            present.add(key)
            if info.offset_data + info.size > len(data):
                raise fmt.ShardError(f"{url}: truncated member {info.name!r}")
            if suffix in self.members[i]:
                self.problems[i] = f"{url}: sample {key}: duplicate member {info.name!r}"
            self.members[i][suffix] = (info.offset_data, info.size)
        if extra or len(present) != len(keys):
            missing = sorted(set(keys) - present)
            raise fmt.ShardError(
                f"{url}: holds {len(present) + len(extra)} samples but manifest.json lists {len(keys)} "
                f"(missing {missing[:5]}, unexpected {sorted(extra)[:5]}); the shard and manifest "
                "disagree (re-run `repa prepare`)"
            )

    def member(self, index: int, suffix: str) -> bytes | None:
        where = self.members[index].get(suffix)
        if where is None:
            return None
        offset, size = where
        return self.data[offset : offset + size]


def _load_shard(
    url: str,
    info: fmt.ShardInfo,
    *,
    verify_sha256: bool,
    storage_options: dict[str, Any] | None,
    retry_attempts: int,
) -> _Shard:
    """GET the whole shard (one request, retried), check it against the manifest, index it."""
    fs, path = storage.filesystem(url, storage_options)
    protocols = fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)
    # s3fs splits objects > 50 MB into concurrent ranged GETs plus a HEAD and reassembles them in
    # a bytearray: twice the CPU of one streamed GET (measured on moto, benchmarks/loader.py).
    kwargs = {"max_concurrency": 1} if "s3" in protocols else {}
    try:
        data = storage.retry(lambda: fs.cat_file(path, **kwargs), what=url, attempts=retry_attempts)
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
    return _Shard(url, data, info.keys())


# ----------------------------------------------------------------------------------------------
# Dataset
# ----------------------------------------------------------------------------------------------


class StreamingDataset(IterableDataset):
    """Per-rank micro-batches from a prepared dataset at ``url`` (s3://, gs://, file://, memory://...).

    Yields dicts (already batched; use ``make_loader``, which sets ``batch_size=None``):
    ``image`` uint8 (B, 3, H, W), ``moments`` float32 (B, 2C, h, w) (if the data has latents),
    ``label`` int64 (B,), ``position`` int64 (B,) stream positions, ``replaced`` bool (B,), ``key`` list[str].

    Args:
        url: the folder holding ``manifest.json`` and the shards.
        rank, world_size: this process among the data-parallel ranks.
        batch_size: per-rank micro-batch ``B``; one global micro-batch is ``world_size * B`` samples.
        seed: the data order seed (``data.seed``).
        samples_consumed: stream position to start at (global samples consumed; from the checkpoint).
        start_state: alternatively a ``ReaderState`` (epoch, position); overrides ``samples_consumed``.
        shards_in_flight: ``K`` lanes (shards read concurrently by the whole job); part of the order.
        chunk_size: ``c`` consecutive samples from one lane; part of the order.
        storage_options: fsspec options (endpoint, credentials) from the config; env otherwise.
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
        url: str,
        *,
        rank: int = 0,
        world_size: int = 1,
        batch_size: int,
        seed: int = 0,
        samples_consumed: int = 0,
        start_state: ReaderState | None = None,
        shards_in_flight: int = DEFAULT_SHARDS_IN_FLIGHT,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        storage_options: dict[str, Any] | None = None,
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
        _check_order_args(shards_in_flight, chunk_size)
        if (readahead_shards is not None and readahead_shards < 0) or io_threads < 1 or retry_attempts < 1:
            raise ValueError("readahead_shards >= 0, io_threads >= 1 and retry_attempts >= 1 required")
        if num_batches is not None and num_batches < 0:
            raise ValueError(f"num_batches: expected >= 0 or None, got {num_batches}")
        self.url = url.rstrip("/")
        self.storage_options = dict(storage_options) if storage_options else None
        self.manifest = (
            manifest if manifest is not None else fmt.read_manifest(self.url, self.storage_options)
        )
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

    def shard_url(self, shard: int) -> str:
        return storage.join(self.url, self.manifest.shards[shard].name)

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
        self.npy = _NpyDecoder()
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
    def fetch(self, key: int) -> _Shard:
        ds = self.ds
        epoch, shard = divmod(key, self.S)
        loaded = _load_shard(
            ds.shard_url(shard),
            ds.manifest.shards[shard],
            verify_sha256=ds.verify_sha256,
            storage_options=ds.storage_options,
            retry_attempts=ds.retry_attempts,
        )
        log.debug("rank %d worker %d fetched %s for epoch %d", ds.rank, self.worker, loaded.url, epoch)
        return loaded

    def run(self) -> Iterator[dict[str, Any]]:
        ds = self.ds
        units = self.units()
        ahead: deque[_Unit] = deque()  # planned units not yet produced
        refs: Counter[int] = Counter()  # key -> planned units still needing it
        to_fetch: deque[int] = deque()  # keys in order of first need, not yet submitted
        loaded: dict[int, Future[_Shard]] = {}  # submitted keys (in flight or in memory)
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
    def check(self, shard: _Shard, index: int) -> tuple[np.ndarray, np.ndarray | None, int] | str:
        """Decoded (image, moments, label) of a sample, or why it is unusable."""
        if index in shard.problems:
            return shard.problems[index]
        where = f"{shard.url}: sample {shard.keys[index]}"
        png, cls = shard.member(index, fmt.PNG), shard.member(index, fmt.CLS)
        if png is None or cls is None:
            return f"{where}: missing member '.{fmt.PNG if png is None else fmt.CLS}'"
        try:
            text = cls.decode("ascii").strip()
            if not text.isdigit():
                raise ValueError(text)
            label = int(text)
        except (UnicodeDecodeError, ValueError):
            return f"{where}: corrupt member '.{fmt.CLS}' (expected a non-negative integer as ASCII)"
        if label >= self.num_classes:
            return f"{where}: label {label} outside [0, {self.num_classes})"
        try:
            image = fmt.decode_png(png)
        except Exception as e:  # PIL raises many types for corrupt data
            return f"{where}: corrupt member '.{fmt.PNG}' ({type(e).__name__}: {e})"
        if image.shape != (3, self.resolution, self.resolution):
            return f"{where}: image {image.shape}, manifest resolution {self.resolution}"
        moments = None
        if self.moments_shape is not None:
            raw = shard.member(index, fmt.MOMENTS)
            if raw is None:
                return f"{where}: missing member '.{fmt.MOMENTS}'"
            try:
                m = self.npy(raw)
            except (ValueError, OSError, EOFError) as e:
                return f"{where}: corrupt member '.{fmt.MOMENTS}' ({e})"
            if tuple(m.shape) != self.moments_shape or m.dtype.kind != "f":
                return f"{where}: moments {m.dtype} {tuple(m.shape)}, manifest says {self.moments_shape}"
            moments = m.astype(np.float32)
            if not np.isfinite(moments).all():
                return f"{where}: moments not finite"
        return image, moments, label

    def get(self, shard: _Shard, index: int) -> tuple[tuple[np.ndarray, np.ndarray | None, int], str, bool]:
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
            f"{shard.url}: no usable sample in the whole shard (first problem: {shard.problems[index]})"
        )

    def assemble(self, unit: _Unit, shards: dict[int, _Shard]) -> dict[str, Any]:
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

    ``state_dict()`` = ``{"samples_consumed", "epoch", "position", "seed"}`` after the batches yielded
    so far (same on every rank); ``load_state_dict()`` before ``iter()`` resumes there. A second
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

    def state_dict(self) -> dict[str, int]:
        ds: StreamingDataset = self.dataset  # type: ignore[assignment]
        state = ReaderState.from_samples(self.samples_consumed(), ds.epoch_size)
        return {
            "samples_consumed": self.samples_consumed(),
            **state.to_dict(),
            # what defines the order: resuming with other values would repeat or skip samples
            "seed": ds.seed,
            "shards_in_flight": ds.shards_in_flight,
            "chunk_size": ds.chunk_size,
            "epoch_size": ds.epoch_size,
        }

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Resume at ``state["samples_consumed"]``; the order-defining fields, if present, must match."""
        ds: StreamingDataset = self.dataset  # type: ignore[assignment]
        mine = {"seed": ds.seed, "shards_in_flight": ds.shards_in_flight, "chunk_size": ds.chunk_size}
        mine["epoch_size"] = ds.epoch_size
        for name, value in mine.items():
            if name in state and int(state[name]) != value:
                raise ValueError(
                    f"reader state: {name}={state[name]} but this reader has {value}; resuming would change "
                    "the data order mid-epoch (keep data.seed/shards_in_flight/chunk_size and the dataset)"
                )
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
