"""Data-loader throughput: repa's StreamingDataset vs the `webdataset` library, same shards, same S3 server.

Starts ``moto_server`` on loopback, writes synthetic shards in repa's format (``{key}.png`` RGB
256x256, ``{key}.moments.npy`` float16 (8, 32, 32), ``{key}.cls``), then reads them with

- repa: ``StreamingDataset`` over ``s3://`` (s3fs), ``make_loader(num_workers=W)``;
- webdataset: ``WebDataset(presigned http://.../shard-*.tar URLs)`` (webdataset's curl opener)
  ``.decode("torchrgb8")`` (PNG -> uint8 CHW tensor via PIL, npy via
  numpy, cls -> int) ``.to_tuple(...).batched(B)`` in a DataLoader with the same workers,

and prints decoded samples/s (wall) and samples per CPU-second of the loader processes (worker
CPU, from ``RUSAGE_CHILDREN``; the S3 server's CPU is not counted), per worker, and the ratio.
webdataset runs without a shuffle buffer (its fastest configuration); repa always permutes.

    .venv/bin/python benchmarks/loader.py --samples 1536 --workers 1 --rounds 2
"""

from __future__ import annotations

import argparse
import gc
import os
import resource
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_moto(port: int) -> subprocess.Popen:
    exe = shutil.which("moto_server") or os.path.join(os.path.dirname(sys.executable), "moto_server")
    proc = subprocess.Popen(
        [exe, "-H", "127.0.0.1", "-p", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.time() + 30
    while time.time() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return proc
        except OSError:
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError(f"moto_server did not start on port {port}")


def natural_ish(rng: np.random.Generator, size: int) -> np.ndarray:
    """A smooth random field plus fine noise: compresses roughly like a photo (PNG levels > 0)."""
    low = rng.random((size // 32, size // 32, 3), dtype=np.float32)
    up = np.kron(low, np.ones((32, 32, 1), np.float32))  # blocky low frequencies
    # soften the blocks with a separable box blur
    k = np.ones(15, np.float32) / 15
    for axis in (0, 1):
        up = np.apply_along_axis(lambda v: np.convolve(v, k, mode="same"), axis, up)
    img = up * 200 + rng.normal(0, 6, up.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def write_dataset(url: Any, *, samples: int, per_shard: int, resolution: int, png_level: int) -> None:
    """Write the benchmark's shards and manifest at ``url`` (a URL or ``repa.storage.Location``)."""
    from repa import storage
    from repa.data import format as fmt

    rng = np.random.default_rng(0)
    bases = [natural_ish(rng, resolution) for _ in range(16)]  # vary cheaply: shift + noise
    shards, first = [], 0
    for s in range(-(-samples // per_shard)):
        batch = []
        for i in range(first, min(first + per_shard, samples)):
            img = np.roll(bases[i % 16], shift=(i * 7) % resolution, axis=1)
            img = np.clip(img.astype(np.int16) + rng.integers(-3, 4, img.shape), 0, 255).astype(np.uint8)
            batch.append(
                fmt.Sample(
                    key=fmt.sample_key(i),
                    png=fmt.encode_png(img, compress_level=png_level),
                    label=i % 1000,
                    moments=rng.standard_normal((8, resolution // 8, resolution // 8)).astype(np.float16),
                )
            )
        data = fmt.write_shard(batch)
        storage.write_bytes_atomic(storage.join(url, fmt.shard_name(s)), data)
        shards.append(fmt.ShardInfo(fmt.shard_name(s), first, len(batch), len(data), fmt.sha256_hex(data)))
        first += len(batch)
    manifest = fmt.Manifest(
        resolution=resolution,
        class_names=tuple(f"n{c:08d}" for c in range(1000)),
        shards=tuple(shards),
        vae="bench",
        moments_dtype="float16",
        moments_shape=(8, resolution // 8, resolution // 8),
    )
    storage.write_bytes_atomic(storage.join(url, fmt.MANIFEST_NAME), manifest.to_json().encode())


def timed(make_batches: Callable[[], Iterable], samples: int) -> dict[str, float]:
    """Wall time, time to the first batch, steady-state rate and worker CPU to decode ``samples`` samples."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    n = 0
    first = None
    it = iter(make_batches())
    for batch in it:
        n += len(batch[0]) if isinstance(batch, (list, tuple)) else batch["image"].shape[0]
        if first is None:
            first, n_first = time.perf_counter() - t0, n
        if n >= samples:
            break
    wall = time.perf_counter() - t0
    del it  # shuts the workers down; their CPU time is then in RUSAGE_CHILDREN
    gc.collect()
    time.sleep(0.5)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return {
        "n": n,
        "wall": wall,
        "first": first,
        "rate": n / wall,
        "steady": (n - n_first) / max(wall - first, 1e-9),
        "per_cpu": n / max(cpu, 1e-9),
        "cpu": cpu,
    }


# The CI smoke run (tests/integration/test_benchmarks.py): 2 shards of 8 tiny images, one round.
SMOKE = ["--samples", "16", "--per-shard", "8", "--resolution", "32", "--batch-size", "4", "--rounds", "1"]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--samples", type=int, default=1536)
    p.add_argument("--per-shard", type=int, default=256, help="samples per shard (~55 MB at 256px, level 0)")
    p.add_argument("--resolution", type=int, default=256)
    p.add_argument("--png-level", type=int, default=0, help="PNG compress level (repa prepare's default: 0)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--smoke", action="store_true", help=f"CI smoke run: {' '.join(SMOKE)}")
    args = p.parse_args(argv)
    if args.smoke:
        args = p.parse_args([*SMOKE, *(sys.argv[1:] if argv is None else argv)])

    import torch
    import webdataset as wds

    from repa.data import format as fmt
    from repa.data.reader import StreamingDataset, make_loader
    from repa.storage import Location

    torch.set_num_threads(1)
    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    os.environ.update(
        AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION="us-east-1"
    )
    options = {"key": "bench", "secret": "bench", "client_kwargs": {"endpoint_url": endpoint}}
    server = start_moto(port)
    try:
        import s3fs

        s3fs.S3FileSystem(**options).mkdir("bench")
        t = time.perf_counter()
        data = Location("s3://bench/data", options)
        write_dataset(
            data,
            samples=args.samples,
            per_shard=args.per_shard,
            resolution=args.resolution,
            png_level=args.png_level,
        )
        num_shards = -(-args.samples // args.per_shard)
        print(f"wrote {args.samples} samples in {num_shards} shards in {time.perf_counter() - t:.1f}s")
        # presigned GET URLs: how webdataset's curl opener reads private S3 objects
        fs = s3fs.S3FileSystem(**options)
        urls = [fs.url(f"bench/data/{fmt.shard_name(s)}", expires=3600) for s in range(num_shards)]

        def repa_batches():
            ds = StreamingDataset(
                data,
                batch_size=args.batch_size,
                shards_in_flight=max(1, args.workers),
                chunk_size=args.batch_size,
                num_batches=args.samples // args.batch_size,
            )
            return make_loader(ds, num_workers=args.workers, prefetch_factor=2)

        def wds_batches():
            pipeline = (
                wds.WebDataset(
                    urls, shardshuffle=False, workersplitter=wds.split_by_worker, empty_check=False
                )
                .decode("torchrgb8")
                .to_tuple("png", "moments.npy", "cls")
                .batched(args.batch_size)
            )
            return torch.utils.data.DataLoader(
                pipeline, batch_size=None, num_workers=args.workers, prefetch_factor=2
            )

        def decode_only():
            # the floor: PNG + npy decode of in-memory bytes, one process, no storage
            shard = fmt.write_shard(
                fmt.Sample(
                    key=fmt.sample_key(i),
                    png=fmt.encode_png(
                        natural_ish(np.random.default_rng(i), args.resolution), args.png_level
                    ),
                    label=1,
                    moments=np.zeros((8, 32, 32), np.float16),
                )
                for i in range(64)
            )
            import io

            t0 = time.process_time()
            n = 0
            for _ in range(4):
                for s in fmt.iter_shard(io.BytesIO(shard)):
                    fmt.decode_png(s["png"])
                    n += 1
            return n / (time.process_time() - t0)

        target = (args.samples // args.batch_size) * args.batch_size
        results: dict[str, list[dict[str, float]]] = {"repa": [], "webdataset": []}
        for r in range(args.rounds):
            for name, fn in (("repa", repa_batches), ("webdataset", wds_batches)):
                m = timed(fn, target)
                results[name].append(m)
                print(
                    f"round {r} {name:10s}: {m['n']} samples in {m['wall']:.2f}s = {m['rate']:6.1f}/s "
                    f"(first batch {m['first']:.2f}s, then {m['steady']:6.1f}/s); "
                    f"worker CPU {m['cpu']:.2f}s = {m['per_cpu']:6.1f} samples/CPU-s"
                )
        floor = decode_only()
        best = {
            k: {f: max(m[f] for m in v) for f in ("rate", "steady", "per_cpu")} for k, v in results.items()
        }
        print()
        print(
            f"{os.cpu_count()} CPUs (shared); workers={args.workers} batch={args.batch_size} "
            f"png_level={args.png_level} {args.resolution}px, {args.samples} samples in {num_shards} shards"
        )
        for k in ("repa", "webdataset"):
            b = best[k]
            print(
                f"{k:10s}: best {b['rate']:6.1f} samples/s wall, {b['steady']:6.1f}/s after the first batch, "
                f"{b['per_cpu']:6.1f} samples per worker-CPU-second ({args.workers} worker(s))"
            )
        ratio = {f: best["repa"][f] / best["webdataset"][f] for f in ("rate", "steady", "per_cpu")}
        print(
            f"ratio repa/webdataset: wall {ratio['rate']:.2f}x, after first batch {ratio['steady']:.2f}x, "
            f"per CPU-second {ratio['per_cpu']:.2f}x"
        )
        print(f"decode-only floor (in-process, PNG+npy, no I/O): {floor:.1f} samples per CPU-second")
    finally:
        server.terminate()
        server.wait(10)
    return 0


if __name__ == "__main__":
    sys.exit(main())
