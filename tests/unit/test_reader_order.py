"""The streaming reader's planning of the order: partition over ranks x workers, elastic resume, egress.

No I/O, no shards: the dataset objects here get an in-memory Manifest, so their planning code (the
same code the DataLoader workers run) is exercised without opening a shard. The order itself
(``repa.data.order``) is tests/unit/test_order.py.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from repa.data import format as fmt
from repa.data.order import ReaderState, epoch_order, shard_readers
from repa.data.reader import StreamingDataset, _WorkerStream

COUNTS = [10, 7, 13, 0, 5, 9, 12]  # uneven, one empty shard, N = 56 (not a multiple of most c)


def manifest_for(counts: list[int]) -> fmt.Manifest:
    shards, first = [], 0
    for i, n in enumerate(counts):
        shards.append(fmt.ShardInfo(fmt.shard_name(i), first, n, 1, "0" * 64))
        first += n
    return fmt.Manifest(resolution=8, class_names=("a", "b"), shards=tuple(shards))


def dataset(counts, **kw) -> StreamingDataset:
    kw.setdefault("shards_in_flight", 3)
    kw.setdefault("chunk_size", 2)
    return StreamingDataset("memory://unused", manifest=manifest_for(counts), **kw)


def rank_stream(ds: StreamingDataset, num_workers: int, num_batches: int) -> list[np.ndarray]:
    """What the rank's DataLoader returns: worker w's units w, w+nw, ... merged round-robin."""
    per_worker = []
    for w in range(num_workers):
        units = _WorkerStream(ds, w, num_workers).units()
        per_worker.append([next(units) for _ in range(len(range(w, num_batches, num_workers)))])
    out = []
    for i in range(num_batches):
        unit = per_worker[i % num_workers][i // num_workers]
        out.append(unit)
    return out


def consume(counts, *, world_size, batch_size, num_workers, start, num_global_batches, **kw):
    """Samples (epoch, shard, index) taken by all ranks in global-batch order, plus each rank's positions."""
    n = sum(counts)
    ranks = [
        rank_stream(
            dataset(
                counts, rank=r, world_size=world_size, batch_size=batch_size, samples_consumed=start, **kw
            ),
            num_workers,
            num_global_batches,
        )
        for r in range(world_size)
    ]
    samples, positions = [], []
    S = len(counts)
    for i in range(num_global_batches):
        for r in range(world_size):
            unit = ranks[r][i]
            positions.extend(unit.positions.tolist())
            for p, key, index in zip(unit.positions.tolist(), unit.keys.tolist(), unit.indices.tolist()):
                assert key // S == p // n  # epoch of the shard key matches the stream position
                samples.append((p // n, key % S, index))
    return samples, positions


def epoch_samples(counts, epoch, shards_in_flight=3, chunk_size=2) -> list[tuple[int, int, int]]:
    shard, index = epoch_order(
        counts, seed=0, epoch=epoch, shards_in_flight=shards_in_flight, chunk_size=chunk_size
    )
    return [(epoch, s, i) for s, i in zip(shard.tolist(), index.tolist())]


# ----------------------------------------------------------------------------------------------
# Partition over ranks x workers
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
@pytest.mark.parametrize("num_workers", [1, 2])
def test_ranks_and_workers_together_read_each_sample_of_an_epoch_once(world_size, num_workers):
    batch_size = 2
    n = sum(COUNTS)
    g = world_size * batch_size
    num_global = n // g
    samples, positions = consume(
        COUNTS,
        world_size=world_size,
        batch_size=batch_size,
        num_workers=num_workers,
        start=0,
        num_global_batches=num_global,
    )
    assert positions == list(range(num_global * g))  # global batch = G consecutive positions
    assert len(set(samples)) == len(samples)
    assert samples == epoch_samples(COUNTS, 0)[: num_global * g]


@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
def test_rank_order_does_not_depend_on_worker_count(world_size):
    seqs = []
    for nw in (1, 2, 3):
        ds = dataset(COUNTS, rank=world_size - 1, world_size=world_size, batch_size=3, samples_consumed=11)
        seqs.append([(u.keys.tolist(), u.indices.tolist()) for u in rank_stream(ds, nw, 9)])
    assert seqs[0] == seqs[1] == seqs[2]


def test_epoch_boundary_flows_into_the_next_epoch():
    n = sum(COUNTS)  # 56; G = 2 * 5 = 10: global batch 5 holds positions 50..59 = 6 of epoch 0, 4 of epoch 1
    samples, positions = consume(
        COUNTS, world_size=2, batch_size=5, num_workers=2, start=0, num_global_batches=12
    )
    assert positions == list(range(120))
    e0, e1, e2 = (epoch_samples(COUNTS, e) for e in range(3))
    assert samples == (e0 + e1 + e2)[:120]
    assert positions[n - 1] == n - 1 and samples[n] == e1[0]


# ----------------------------------------------------------------------------------------------
# Exact resume, also elastic
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("before", "after"), [(1, 2), (3, 2), (2, 4), (4, 1), (2, 2)])
def test_resume_with_another_world_size_neither_repeats_nor_skips(before, after):
    counts = [9, 14, 6, 11, 8]  # N = 48
    n = sum(counts)
    batch_size = 2
    reference, _ = consume(
        counts,
        world_size=1,
        batch_size=1,
        num_workers=1,
        start=0,
        num_global_batches=2 * n,
        shards_in_flight=2,
    )
    for stop in range(0, n // (before * batch_size) + 3):  # every stop in epoch 0, and into epoch 1
        first, _ = consume(
            counts,
            world_size=before,
            batch_size=batch_size,
            num_workers=2,
            start=0,
            num_global_batches=stop,
            shards_in_flight=2,
        )
        # The checkpoint holds only samples consumed (identical on every rank); the restart rebuilds.
        state = ReaderState.from_samples(stop * before * batch_size, n)
        resumed = dataset(
            counts, world_size=after, batch_size=batch_size, start_state=state, shards_in_flight=2
        ).samples_consumed
        rest_batches = -(-(2 * n - resumed) // (after * batch_size))
        second, _ = consume(
            counts,
            world_size=after,
            batch_size=batch_size,
            num_workers=1 + stop % 2,
            start=resumed,
            num_global_batches=rest_batches,
            shards_in_flight=2,
        )
        joined = (first + second)[: 2 * n]
        assert joined == reference, f"stop after {stop} global batches of world {before} -> {after}"
        epoch0 = [s for s in joined if s[0] == 0]
        assert len(epoch0) == n and len(set(epoch0)) == n


def test_dataset_state_counts_global_micro_batches():
    ds = dataset(COUNTS, rank=1, world_size=3, batch_size=4, samples_consumed=50)
    assert ds.state(0) == ReaderState(0, 50)
    assert ds.state(2) == ReaderState(1, 50 + 24 - 56)


# ----------------------------------------------------------------------------------------------
# Egress: which workers fetch which shard
# ----------------------------------------------------------------------------------------------


def worker_keys(
    counts, *, world_size, num_workers, batch_size, num_batches, **kw
) -> dict[tuple[int, int], set]:
    out = {}
    for r, w in itertools.product(range(world_size), range(num_workers)):
        ds = dataset(
            counts, rank=r, world_size=world_size, batch_size=batch_size, num_batches=num_batches, **kw
        )
        out[(r, w)] = {k for u in _WorkerStream(ds, w, num_workers).units() for k in u.keys.tolist()}
    return out


@pytest.mark.parametrize(("world_size", "num_workers"), [(1, 4), (2, 2), (4, 1), (2, 4), (8, 1)])
def test_aligned_layout_reads_each_shard_once_per_epoch(world_size, num_workers):
    # 16 shards of 8, c = 2 = B, K = 8 = multiple of (B/c) * W * nw: one consumer per shard and epoch.
    counts = [8] * 16
    for epoch in range(3):
        readers = shard_readers(
            counts,
            seed=0,
            epoch=epoch,
            shards_in_flight=8,
            chunk_size=2,
            world_size=world_size,
            batch_size=2,
            num_workers=num_workers,
        )
        assert readers.tolist() == [1] * 16
    n = sum(counts)
    keys = worker_keys(
        counts,
        world_size=world_size,
        num_workers=num_workers,
        batch_size=2,
        num_batches=3 * n // (2 * world_size),
        shards_in_flight=8,
        chunk_size=2,
    )
    for a, b in itertools.combinations(keys.values(), 2):
        assert not a & b  # no (epoch, shard) fetched by two workers
    assert sum(len(k) for k in keys.values()) == 3 * 16


def test_bad_dataset_arguments_are_named():
    with pytest.raises(ValueError, match="chunk_size"):
        dataset(COUNTS, batch_size=2, chunk_size=0)
    with pytest.raises(ValueError, match="rank/world_size"):
        dataset(COUNTS, rank=2, world_size=2, batch_size=2)
    with pytest.raises(ValueError, match="batch_size"):
        dataset(COUNTS, batch_size=0)
