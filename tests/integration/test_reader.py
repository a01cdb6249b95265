"""The streaming reader on real storage: file://, memory:// and S3 (moto server), real DataLoader workers.

Shards are written with ``repa.data.format.write_shard`` (tiny 8x8 images, random float16 moments),
so these tests exercise the real format, storage and worker processes.
"""

from __future__ import annotations

import dataclasses
import io
import logging
import socket
import tarfile
import threading
import uuid

import numpy as np
import pytest
import torch

from repa import storage
from repa.data import format as fmt
from repa.data.order import ReaderState
from repa.data.reader import ShardReadError, StreamingDataset, _WorkerStream, make_loader

RES = 8
MOMENTS_SHAPE = (6, 2, 2)
CLASSES = tuple(f"n{i:08d}" for i in range(5))


def sample_content(i: int) -> tuple[np.ndarray, int, np.ndarray]:
    rng = np.random.default_rng(i)
    image = rng.integers(0, 256, (RES, RES, 3), dtype=np.uint8)
    moments = rng.standard_normal(MOMENTS_SHAPE).astype(np.float16)
    return image, i % len(CLASSES), moments


def tar_bytes(members: list[tuple[str, bytes]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def members_of(data: bytes) -> list[tuple[str, bytes]]:
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        return [(m.name, tar.extractfile(m).read()) for m in tar.getmembers()]


def write_dataset(
    url: str | storage.Location,
    counts: list[int],
    *,
    raw_shards: dict[int, bytes] | None = None,
) -> fmt.Manifest:
    """Shards of synthetic samples + manifest.json; ``raw_shards[i]`` replaces shard i's bytes."""
    shards, first = [], 0
    for s, n in enumerate(counts):
        samples = []
        for i in range(first, first + n):
            image, label, moments = sample_content(i)
            samples.append(
                fmt.Sample(key=fmt.sample_key(i), png=fmt.encode_png(image), label=label, moments=moments)
            )
        data = (raw_shards or {}).get(s) or fmt.write_shard(samples)
        storage.write_bytes_atomic(storage.join(url, fmt.shard_name(s)), data)
        shards.append(fmt.ShardInfo(fmt.shard_name(s), first, n, len(data), fmt.sha256_hex(data)))
        first += n
    manifest = fmt.Manifest(
        resolution=RES,
        class_names=CLASSES,
        shards=tuple(shards),
        vae="none",
        moments_dtype="float16",
        moments_shape=MOMENTS_SHAPE,
    )
    storage.write_bytes_atomic(storage.join(url, fmt.MANIFEST_NAME), manifest.to_json().encode())
    return manifest


def collect(loader, num_batches: int | None = None) -> list[dict]:
    out = []
    for batch in loader:
        out.append(batch)
        if num_batches is not None and len(out) == num_batches:
            break
    return out


def keys_of(batches: list[dict]) -> list[str]:
    return [k for b in batches for k in b["key"]]


COUNTS = [9, 14, 6, 11, 8, 12]  # N = 60


@pytest.fixture
def file_url(tmp_path) -> str:
    url = f"file://{tmp_path}/data"
    write_dataset(url, COUNTS)
    return url


@pytest.fixture
def memory_url() -> str:
    url = f"memory://reader-{uuid.uuid4().hex[:8]}/data"
    write_dataset(url, COUNTS)
    yield url
    storage.remove(url, recursive=True)


# ----------------------------------------------------------------------------------------------
# Batches, order, workers
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["file", "memory", "s3"])
def test_one_epoch_yields_every_sample_once_with_its_content(backend, tmp_path, request):
    if backend == "file":
        url = f"file://{tmp_path}/data"
    elif backend == "memory":
        url = f"memory://reader-{uuid.uuid4().hex[:8]}/data"
    else:
        url = request.getfixturevalue("s3_bucket") + "/data"
    write_dataset(url, COUNTS)
    ds = StreamingDataset(url, batch_size=6, seed=1, shards_in_flight=3, chunk_size=2, num_batches=10)
    batches = collect(make_loader(ds, num_workers=0))
    for b in batches:
        assert b["image"].dtype == torch.uint8 and b["image"].shape == (6, 3, RES, RES)
        assert b["moments"].dtype == torch.float32 and b["moments"].shape == (6, *MOMENTS_SHAPE)
        assert b["label"].dtype == torch.int64 and b["label"].shape == (6,)
        for j, key in enumerate(b["key"]):
            image, label, moments = sample_content(int(key))
            assert torch.equal(b["image"][j], torch.from_numpy(image).permute(2, 0, 1))
            assert int(b["label"][j]) == label
            assert torch.equal(b["moments"][j], torch.from_numpy(moments.astype(np.float32)))
    keys = keys_of(batches)
    assert sorted(keys) == [fmt.sample_key(i) for i in range(60)]
    assert keys != sorted(keys)  # shuffled
    assert torch.cat([b["position"] for b in batches]).tolist() == list(range(60))
    if backend == "memory":
        storage.remove(url, recursive=True)


@pytest.mark.filterwarnings("ignore:This DataLoader will create 3 worker processes")
def test_dataloader_workers_return_the_same_sequence_as_no_workers(file_url):
    def run(num_workers: int) -> list[str]:
        ds = StreamingDataset(
            file_url,
            batch_size=4,
            seed=5,
            shards_in_flight=2,
            chunk_size=2,
            num_batches=37,
            readahead_shards=1,
        )
        return keys_of(collect(make_loader(ds, num_workers=num_workers, prefetch_factor=2)))

    reference = run(0)
    assert len(reference) == 37 * 4  # crosses two epoch boundaries (N = 60)
    assert run(2) == reference
    assert run(3) == reference


def test_sequence_is_the_same_on_every_backend(file_url, memory_url, s3_bucket):
    write_dataset(s3_bucket + "/data", COUNTS)
    seqs = []
    for url in (file_url, memory_url, s3_bucket + "/data"):
        ds = StreamingDataset(url, batch_size=5, seed=2, shards_in_flight=4, chunk_size=1, num_batches=13)
        seqs.append(keys_of(collect(make_loader(ds))))
    assert seqs[0] == seqs[1] == seqs[2]


# ----------------------------------------------------------------------------------------------
# Partition over ranks and exact (elastic) resume
# ----------------------------------------------------------------------------------------------


def run_ranks(url, world_size, *, start, num_batches, batch_size=3, num_workers=0) -> tuple[list[str], int]:
    """All ranks' keys in global-batch order, and the (identical) samples_consumed each rank reports."""
    per_rank, states = [], set()
    for r in range(world_size):
        ds = StreamingDataset(
            url,
            rank=r,
            world_size=world_size,
            batch_size=batch_size,
            seed=7,
            samples_consumed=start,
            shards_in_flight=2,
            chunk_size=3,
            num_batches=num_batches,
        )
        loader = make_loader(ds, num_workers=num_workers)
        per_rank.append(collect(loader))
        states.add(loader.state_dict()["samples_consumed"])
    assert len(states) == 1  # a checkpoint needs no gather
    keys = [k for i in range(num_batches) for r in range(world_size) for k in per_rank[r][i]["key"]]
    return keys, states.pop()


@pytest.mark.parametrize(("before", "after"), [(1, 2), (3, 2), (2, 4)])
def test_elastic_restart_continues_the_epoch_exactly(memory_url, before, after):
    n = sum(COUNTS)
    reference, _ = run_ranks(memory_url, 1, start=0, num_batches=2 * n // 3)
    for stop in (1, 3, 5):
        first, consumed = run_ranks(memory_url, before, start=0, num_batches=stop)
        assert consumed == stop * before * 3
        rest = -(-(2 * n - consumed) // (after * 3))
        second, _ = run_ranks(memory_url, after, start=consumed, num_batches=rest)
        joined = (first + second)[: 2 * n]
        assert joined == reference
        assert sorted(joined[:n]) == [fmt.sample_key(i) for i in range(n)]  # epoch 0: each sample once


def test_ranks_with_workers_partition_the_epoch(file_url):
    keys, consumed = run_ranks(file_url, 2, start=0, num_batches=10, num_workers=2)
    assert sorted(keys) == [fmt.sample_key(i) for i in range(60)]
    assert consumed == 60


def test_loader_state_dict_round_trips_and_resumes(file_url):
    ds = StreamingDataset(file_url, batch_size=4, seed=3, shards_in_flight=2, chunk_size=2, num_batches=40)
    full = keys_of(collect(make_loader(ds)))
    first = make_loader(
        StreamingDataset(file_url, batch_size=4, seed=3, shards_in_flight=2, chunk_size=2, num_batches=17)
    )
    head = keys_of(collect(first))
    state = first.state_dict()
    assert state == {
        "samples_consumed": 68,
        "epoch": 1,
        "position": 8,
        "seed": 3,
        "shards_in_flight": 2,
        "chunk_size": 2,
        "epoch_size": 60,
    }
    resumed = make_loader(
        StreamingDataset(
            file_url,
            batch_size=4,
            seed=3,
            shards_in_flight=2,
            chunk_size=2,
            num_batches=23,
            start_state=ReaderState(state["epoch"], state["position"]),
        )
    )
    assert head + keys_of(collect(resumed)) == full
    other = make_loader(StreamingDataset(file_url, batch_size=4, seed=3, shards_in_flight=2, chunk_size=2))
    other.load_state_dict(state)
    assert keys_of(collect(other, 3)) == full[68 : 68 + 12]
    assert keys_of(collect(other, 2)) == full[80 : 80 + 8]  # a new iterator continues the stream
    assert other.state_dict()["samples_consumed"] == 88
    with pytest.raises(ValueError, match=r"^data\.seed: 4 in the checkpoint, 3 now"):
        other.load_state_dict({**state, "seed": 4})
    with pytest.raises(ValueError, match=r"^data\.chunk_size: 4 in the checkpoint, 2 now"):
        other.load_state_dict({**state, "chunk_size": 4})
    with pytest.raises(ValueError, match=r"^data\.url: 56 samples per epoch in the checkpoint, 60 now"):
        other.load_state_dict({**state, "epoch_size": 56})
    assert other.state_dict()["samples_consumed"] == 88  # a refused state changes nothing


def test_each_shard_is_fetched_by_one_worker_of_one_rank_when_the_layout_is_aligned(tmp_path, caplog):
    url = f"file://{tmp_path}/aligned"
    write_dataset(url, [8] * 8)  # c = B = 2, K = 4 = 2 ranks x 2 workers: one lane per worker
    caplog.set_level(logging.DEBUG, logger="repa.data.reader")
    streams = []
    for rank in range(2):
        for worker in range(2):
            ds = StreamingDataset(
                url,
                rank=rank,
                world_size=2,
                batch_size=2,
                shards_in_flight=4,
                chunk_size=2,
                num_batches=32,  # two epochs of 64
                readahead_shards=1,
            )
            stream = _WorkerStream(ds, worker, 2)
            assert sum(b["image"].shape[0] for b in stream.run()) == 32  # 16 batches of 2
            streams.append(stream)
    fetched = [r.getMessage().split(" fetched ")[1] for r in caplog.records if " fetched " in r.getMessage()]
    assert sum(s.fetches for s in streams) == len(fetched) == 16  # 8 shards x 2 epochs: one GET each
    assert len(set(fetched)) == 16  # ... each (shard, epoch) by exactly one worker of one rank
    # memory: its lane's current shard, the next one while a chunk straddles both, one read ahead
    assert max(s.peak_shards for s in streams) <= 3


# ----------------------------------------------------------------------------------------------
# Faults
# ----------------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_s3_outage_mid_epoch_loses_and_repeats_nothing(s3_server):
    """Stop the S3 server after the first batch, restart it on the same port 2 s later."""
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    options = {"client_kwargs": {"endpoint_url": f"http://127.0.0.1:{port}"}}
    try:
        bucket = f"outage-{uuid.uuid4().hex[:8]}"
        fs, _ = storage.filesystem(storage.Location(f"s3://{bucket}", options))
        fs.mkdir(bucket)
        url = storage.Location(f"s3://{bucket}/data", options)
        write_dataset(url, [6] * 8)

        def loader(num_workers: int):
            ds = StreamingDataset(
                url,
                batch_size=4,
                seed=0,
                shards_in_flight=1,  # one lane: shards are fetched one after the other
                chunk_size=4,
                readahead_shards=0,
                io_threads=1,
                num_batches=24,  # two epochs of 48
                retry_attempts=8,
            )
            # forkserver: forked workers would inherit the moto server's listening socket, so the
            # restarted server could not bind its port (a test artefact; the trainer hosts no server).
            context = "forkserver" if num_workers else None
            return make_loader(ds, num_workers=num_workers, multiprocessing_context=context)

        reference = keys_of(collect(loader(0)))
        for num_workers in (0, 2):
            got, restart = [], None
            for batch in loader(num_workers):
                got.extend(batch["key"])
                if restart is None:  # outage right after the first batch, the rest must come after it
                    server.stop()
                    restart = threading.Timer(2.0, server.start)
                    restart.start()
            restart.join()
            assert got == reference, f"num_workers={num_workers}"
            # moto keeps its state in-process: the bucket survived the restart
            assert storage.exists(storage.join(url, fmt.MANIFEST_NAME))
    finally:
        server.stop()


def test_corrupt_members_are_replaced_by_the_next_sample_and_counted(tmp_path, caplog):
    url = f"file://{tmp_path}/corrupt"
    counts = [6, 6]
    # shard 1 (keys 6..11): 7 bad PNG, 8 missing .cls, 9 bad .npy, 10 label out of range; 11 fine
    members = []
    for i in range(6, 12):
        image, label, moments = sample_content(i)
        key = fmt.sample_key(i)
        png = fmt.encode_png(image)
        npy = fmt.encode_moments(moments.astype(np.float32), "float16")
        cls = str(label).encode()
        if i == 7:
            png = png[:8] + b"garbage" * 20
        if i == 9:
            npy = b"\x93NUMPY not really"
        if i == 10:
            cls = b"99"
        if i != 8:
            members.append((f"{key}.cls", cls))
        members += [(f"{key}.moments.npy", npy), (f"{key}.png", png)]
    write_dataset(url, counts, raw_shards={1: tar_bytes(members)})
    caplog.set_level(logging.WARNING, logger="repa.data.reader")
    ds = StreamingDataset(url, batch_size=4, shards_in_flight=1, chunk_size=1, num_batches=3)
    loader = make_loader(ds)
    batches = collect(loader)
    keys = keys_of(batches)
    assert all(b["image"].shape == (4, 3, RES, RES) for b in batches)  # shapes stay fixed
    assert loader.replaced == 4
    bad = {fmt.sample_key(i) for i in (7, 8, 9, 10)}
    assert not bad & set(keys)
    # each bad sample became the next usable one of its shard in stored order: 7,8,9,10 -> 11
    assert keys.count(fmt.sample_key(11)) == 5
    assert sorted(set(keys)) == sorted({fmt.sample_key(i) for i in range(12)} - bad)
    replaced_flags = torch.cat([b["replaced"] for b in batches])
    assert int(replaced_flags.sum()) == 4
    text = caplog.text
    for i in (7, 8, 9, 10):
        assert f"{url}/shard-000001.tar: sample {fmt.sample_key(i)}" in text
    with_workers = make_loader(
        StreamingDataset(url, batch_size=4, shards_in_flight=1, chunk_size=1, num_batches=3), num_workers=2
    )
    assert keys_of(collect(with_workers)) == keys and with_workers.replaced == 4


def test_shard_that_disagrees_with_the_manifest_is_a_clear_error(tmp_path):
    url = f"file://{tmp_path}/mismatch"
    manifest = write_dataset(url, [4, 4])
    shard1 = storage.join(url, fmt.shard_name(1))
    # 1. an extra sample: the size in the manifest is updated, so only the key set disagrees
    extra = tar_bytes([*members_of(storage.read_bytes(shard1)), (f"{fmt.sample_key(99)}.cls", b"1")])
    storage.write_bytes_atomic(shard1, extra)
    info = dataclasses.replace(manifest.shards[1], bytes=len(extra), sha256=fmt.sha256_hex(extra))
    edited = dataclasses.replace(manifest, shards=(manifest.shards[0], info))
    storage.write_bytes_atomic(storage.join(url, fmt.MANIFEST_NAME), edited.to_json().encode())
    ds = StreamingDataset(url, batch_size=8, shards_in_flight=2, chunk_size=1, num_batches=1)
    with pytest.raises(
        fmt.ShardError, match=r"shard-000001\.tar: holds 5 samples but manifest\.json lists 4"
    ):
        collect(make_loader(ds))
    # 2. same size, different bytes: caught by sha256 when verification is on
    write_dataset(url, [4, 4])
    data = bytearray(storage.read_bytes(shard1))
    with tarfile.open(fileobj=io.BytesIO(bytes(data))) as tar:
        png = next(m for m in tar.getmembers() if m.name.endswith(".png"))
    data[png.offset_data + png.size // 2] ^= 0xFF  # one bit of one image: same size, other sha256
    storage.write_bytes_atomic(shard1, bytes(data))
    ds = StreamingDataset(
        url, batch_size=8, shards_in_flight=2, chunk_size=1, num_batches=1, verify_sha256=True
    )
    with pytest.raises(fmt.ShardError, match=r"shard-000001\.tar.*sha256"):
        collect(make_loader(ds))
    # 3. truncated shard: the size check always runs, also in a worker process
    storage.write_bytes_atomic(shard1, bytes(data[:1024]))
    ds = StreamingDataset(url, batch_size=8, shards_in_flight=2, chunk_size=1, num_batches=1)
    with pytest.raises(fmt.ShardError, match=r"shard-000001\.tar: 1024 bytes but manifest\.json says"):
        collect(make_loader(ds, num_workers=1))


def test_unreadable_shard_names_its_url(tmp_path, s3_server):
    url = f"file://{tmp_path}/gone"
    write_dataset(url, [4, 4])
    storage.remove(storage.join(url, fmt.shard_name(0)))
    ds = StreamingDataset(url, batch_size=8, shards_in_flight=1, chunk_size=1, num_batches=1)
    with pytest.raises(ShardReadError, match=r"gone/shard-000000\.tar: not found"):
        collect(make_loader(ds))
    # S3 that goes away for good: retried, then an error naming the shard URL
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    fast_fail = {
        "client_kwargs": {"endpoint_url": f"http://127.0.0.1:{port}"},
        "config_kwargs": {"retries": {"max_attempts": 1}, "connect_timeout": 1},
    }
    bucket = f"dead-{uuid.uuid4().hex[:8]}"
    storage.filesystem(storage.Location(f"s3://{bucket}", fast_fail))[0].mkdir(bucket)
    data = storage.Location(f"s3://{bucket}/data", fast_fail)
    write_dataset(data, [4])
    ds = StreamingDataset(data, batch_size=4, retry_attempts=2, num_batches=1)
    server.stop()
    with pytest.raises(ShardReadError, match=rf"s3://{bucket}/data/shard-000000\.tar: could not be read"):
        collect(make_loader(ds))


def test_missing_manifest_names_the_url(tmp_path):
    with pytest.raises(fmt.ManifestError, match=r"nothing/manifest\.json: not found"):
        StreamingDataset(f"file://{tmp_path}/nothing", batch_size=2)
