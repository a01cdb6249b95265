"""The reader's sample order: a pure function of the shard counts and the order settings (numpy only).

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

No I/O here (no fsspec, no torch): ``repa.data.reader`` fetches and decodes what this module locates.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = [
    "DEFAULT_CHUNK_SIZE",
    "DEFAULT_SHARDS_IN_FLIGHT",
    "EpochOrder",
    "ReaderState",
    "batch_positions",
    "check_order_args",
    "check_resume_state",
    "epoch_order",
    "hash_permutation",
    "shard_readers",
    "state_after",
]

DEFAULT_SHARDS_IN_FLIGHT = 64
DEFAULT_CHUNK_SIZE = 8

# Domain tags keep the shard permutation and the per-shard permutations independent streams.
_TAG_SHARDS = 0x5348  # "SH"
_TAG_SAMPLES = 0x5341  # "SA"


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
        check_order_args(shards_in_flight, chunk_size)
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


def check_order_args(shards_in_flight: int, chunk_size: int) -> None:
    """ValueError naming the setting unless ``shards_in_flight`` and ``chunk_size`` are >= 1."""
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


# What fixes the order of a run (StreamLoader.state_dict() names) -> the config key it comes from.
_ORDER_KEYS = {
    "seed": "data.seed",
    "shards_in_flight": "data.shards_in_flight",
    "chunk_size": "data.chunk_size",
    "epoch_size": "data.url",
}


def check_resume_state(saved: Mapping[str, Any], current: Mapping[str, Any]) -> None:
    """ValueError naming the config key if a saved reader state was made with another data order.

    ``saved`` is a ``StreamLoader.state_dict()`` from a checkpoint, ``current`` the same fields of
    the reader about to resume. Compared: ``seed``, ``shards_in_flight`` and ``chunk_size`` (the
    order's parameters) and ``epoch_size`` (the dataset's sample count, i.e. ``data.url``); resuming
    with any of them changed would repeat or skip samples. A field missing from either side is not
    compared (a state may hold only ``samples_consumed``).
    """
    for name, key in _ORDER_KEYS.items():
        if name not in saved or name not in current:
            continue
        was, now = int(saved[name]), int(current[name])
        if was == now:
            continue
        if name == "epoch_size":
            raise ValueError(
                f"{key}: {was} samples per epoch in the checkpoint, {now} now; the data order of a run is "
                "fixed by its dataset — resume on the dataset the run started with"
            )
        raise ValueError(
            f"{key}: {was} in the checkpoint, {now} now; the data order of a run is fixed by data.seed, "
            "data.shards_in_flight and data.chunk_size — keep them for the whole run"
        )
