"""The pure sample order (``repa.data.order``): pinned permutations, lanes, lead-in, state, egress.

No dataset, no shards, no torch: the functions take the manifest's per-shard counts. The reader's
planning on top of it (partition over ranks x workers, elastic resume) is tests/unit/test_reader_order.py.
"""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from repa.data.order import (
    EpochOrder,
    ReaderState,
    batch_positions,
    check_resume_state,
    epoch_order,
    hash_permutation,
    shard_readers,
    state_after,
)

COUNTS = [10, 7, 13, 0, 5, 9, 12]  # uneven, one empty shard, N = 56 (not a multiple of most c)


# ----------------------------------------------------------------------------------------------
# The order itself
# ----------------------------------------------------------------------------------------------


def test_hash_permutation_is_a_pinned_deterministic_permutation():
    p = hash_permutation(10, 1, 2, 3)
    assert sorted(p.tolist()) == list(range(10))
    # Pinned: the order is part of the data contract (a resumed run must see the same sequence).
    assert p.tolist() == [0, 7, 5, 8, 3, 6, 9, 2, 1, 4]
    assert hash_permutation(10, 1, 2, 4).tolist() != p.tolist()
    assert hash_permutation(0, 1).tolist() == []


def test_epoch_order_is_pinned():
    shard, index = epoch_order([5, 3, 4], seed=7, epoch=2, shards_in_flight=2, chunk_size=2)
    assert shard.tolist() == [2, 2, 0, 0, 2, 2, 0, 1, 0, 0, 1, 1]
    assert index.tolist() == [2, 1, 4, 1, 3, 0, 2, 2, 3, 0, 1, 0]


@pytest.mark.parametrize("shards_in_flight", [1, 2, 3, 5, 64])
@pytest.mark.parametrize("chunk_size", [1, 2, 3, 4, 16])
def test_every_epoch_holds_every_sample_exactly_once(shards_in_flight, chunk_size):
    everything = sorted((s, i) for s, n in enumerate(COUNTS) for i in range(n))
    orders = set()
    for epoch in range(4):
        shard, index = epoch_order(
            COUNTS, seed=3, epoch=epoch, shards_in_flight=shards_in_flight, chunk_size=chunk_size
        )
        assert sorted(zip(shard.tolist(), index.tolist())) == everything
        orders.add(tuple(zip(shard.tolist(), index.tolist())))
    assert len(orders) == 4  # reshuffled every epoch


def test_order_depends_on_seed_and_epoch_only_not_on_call_pattern():
    a = EpochOrder(COUNTS, seed=1, epoch=5, shards_in_flight=3, chunk_size=2)
    full = a.locate(np.arange(a.num_samples))
    b = EpochOrder(COUNTS, seed=1, epoch=5, shards_in_flight=3, chunk_size=2)
    picked = np.array([40, 3, 17, 55, 0])  # any subset, any order: the same answers
    shard, index = b.locate(picked)
    assert shard.tolist() == full[0][picked].tolist() and index.tolist() == full[1][picked].tolist()
    other = epoch_order(COUNTS, seed=2, epoch=5, shards_in_flight=3, chunk_size=2)
    assert other[0].tolist() != full[0].tolist() or other[1].tolist() != full[1].tolist()


def test_chunks_come_from_one_lane_and_lanes_rotate():
    # 4 equal shards, K=2 lanes of 2 shards, c=3: positions 0-2 lane 0, 3-5 lane 1, 6-8 lane 0, ...
    counts = [6, 6, 6, 6]
    order = EpochOrder(counts, seed=0, epoch=0, shards_in_flight=2, chunk_size=3)
    shard, _ = order.locate(np.arange(24))
    lane_of_shard = {int(s): rank // 2 for rank, s in enumerate(order.shard_perm)}
    lanes = [lane_of_shard[int(s)] for s in shard]
    assert lanes == [p // 3 % 2 for p in range(24)]


def test_lead_in_keeps_chunks_on_the_stream_grid_across_epochs():
    # N = 56, c = 8: epoch 1 starts at stream 56 = 7*8, epoch 2 at 112 = 14*8; with c = 5, epoch 1
    # starts mid-chunk and its first (-56) % 5 = 4 samples close that chunk.
    c, K = 5, 2
    for epoch in range(1, 4):
        order = EpochOrder(COUNTS, seed=0, epoch=epoch, shards_in_flight=K, chunk_size=c)
        assert order.lead_in == (-epoch * 56) % c
        z = order.z_index(np.arange(56))
        lane = np.searchsorted(order.lane_starts, z - order.lead_in, side="right") - 1
        grid = (epoch * 56 + np.arange(56)) // c  # stream chunk of each position
        for g in np.unique(grid):
            sel = (grid == g) & (np.arange(56) >= order.lead_in)
            assert len(set(lane[sel].tolist())) <= 1  # one stream chunk = one lane


# ----------------------------------------------------------------------------------------------
# State and resume checks
# ----------------------------------------------------------------------------------------------


def test_reader_state_rolls_over_epochs():
    assert state_after(ReaderState(0, 50), 10, 56) == ReaderState(1, 4)
    assert state_after(ReaderState(2, 0), 0, 56) == ReaderState(2, 0)
    assert ReaderState(3, 7).samples_consumed(56) == 3 * 56 + 7
    assert ReaderState.from_samples(3 * 56 + 7, 56) == ReaderState(3, 7)
    with pytest.raises(ValueError, match="samples_consumed"):
        ReaderState.from_samples(-1, 56)


SAVED = {
    "samples_consumed": 68,
    "epoch": 1,
    "position": 8,
    "seed": 3,
    "shards_in_flight": 2,
    "chunk_size": 4,
    "epoch_size": 60,
}


def test_resume_state_with_the_same_order_settings_is_accepted():
    current = {k: SAVED[k] for k in ("seed", "shards_in_flight", "chunk_size", "epoch_size")}
    check_resume_state(SAVED, current)
    check_resume_state(SAVED, {**current, "samples_consumed": 0})  # the position may differ, of course
    check_resume_state({"samples_consumed": 68}, current)  # a state without the settings: nothing to compare


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        (
            "seed",
            4,
            r"^data\.seed: 3 in the checkpoint, 4 now; the data order of a run is fixed by data\.seed",
        ),
        ("shards_in_flight", 8, r"^data\.shards_in_flight: 2 in the checkpoint, 8 now; "),
        ("chunk_size", 8, r"^data\.chunk_size: 4 in the checkpoint, 8 now; .* keep them for the whole run$"),
        ("epoch_size", 56, r"^data\.url: 60 samples per epoch in the checkpoint, 56 now; "),
    ],
)
def test_resume_state_with_other_order_settings_names_the_config_key(name, value, message):
    current = {k: SAVED[k] for k in ("seed", "shards_in_flight", "chunk_size", "epoch_size")}
    with pytest.raises(ValueError, match=message) as info:
        check_resume_state(SAVED, {**current, name: value})
    assert "\n" not in str(info.value)


# ----------------------------------------------------------------------------------------------
# Egress and arguments
# ----------------------------------------------------------------------------------------------


def test_imagenet_scale_egress_is_near_one_read_per_shard():
    # ImageNet-1k as `repa prepare` splits it: 3,463 shards of 370 (the last 227), 1,281,167 samples.
    counts = [370] * 3462 + [227]
    # 64 ranks x 8 workers, micro-batch 4 = c, K = 512 = (4/4) x 64 x 8: aligned; only the shards
    # cut by a lane boundary (<= K - 1) or by the lead-in are read a second time.
    readers = shard_readers(
        counts,
        seed=0,
        epoch=1,
        shards_in_flight=512,
        chunk_size=4,
        world_size=64,
        batch_size=4,
        num_workers=8,
    )
    assert readers.min() == 1 and readers.max() <= 2
    assert readers.sum() <= len(counts) + 512  # about 1.15x, against 64x if every rank read everything
    # Misaligned (K = 64 < (32/8) x 8 x 8 = 256): each shard is read by about 256/64 = 4 workers.
    readers = shard_readers(
        counts, seed=0, epoch=1, shards_in_flight=64, chunk_size=8, world_size=8, batch_size=32, num_workers=8
    )
    assert readers.max() <= 8 and 3.5 < readers.mean() < 4.5


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="shards_in_flight"):
        EpochOrder(COUNTS, seed=0, epoch=0, shards_in_flight=0, chunk_size=2)
    with pytest.raises(ValueError, match="chunk_size"):
        EpochOrder(COUNTS, seed=0, epoch=0, shards_in_flight=2, chunk_size=0)
    with pytest.raises(ValueError, match="positions"):
        EpochOrder(COUNTS, seed=0, epoch=0, shards_in_flight=2, chunk_size=2).locate(np.array([56]))


def test_batch_positions_slices_the_global_batch_by_rank():
    assert batch_positions(100, 0, rank=0, world_size=3, batch_size=2).tolist() == [100, 101]
    assert batch_positions(100, 0, rank=2, world_size=3, batch_size=2).tolist() == [104, 105]
    assert batch_positions(100, 1, rank=1, world_size=3, batch_size=2).tolist() == [108, 109]


def test_order_module_imports_neither_torch_nor_fsspec():
    code = "import sys, repa.data.order; print(sorted(m for m in ('torch', 'fsspec') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
