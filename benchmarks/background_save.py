"""Step rate of the trainer while a background checkpoint upload is in flight, vs. without one.

`repa train` saves by copying its state to CPU (`repa.checkpoint.cpu_snapshot`) and letting a thread
serialize, hash, upload and commit it (`repa.checkpoint.BackgroundSaver`) while training continues.
This runs `Trainer.train_step` (SiT + loss + AdamW + EMA, synthetic in-memory batches) against an S3
store that is slow on purpose: a moto server in a subprocess behind `tests.support.netproxy.NetProxy` (another
subprocess) limited to `--mbps`, so the upload of the few-hundred-MB state takes many steps.

    .venv/bin/python benchmarks/background_save.py                      # SiT-S/2 (~0.66 GB per save)
    .venv/bin/python benchmarks/background_save.py --model SiT-B/2 --mbps 60

Prints the state size, the blocking part of the save (the CPU snapshot), the upload time, and the
steps/s before, during and after the upload; the figure of merit is during / mean(before, after).
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

from repa import checkpoint as ckpt  # noqa: E402
from repa.config import load_config  # noqa: E402
from repa.runtime import DistInfo  # noqa: E402
from repa.train.trainer import Trainer  # noqa: E402


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_port(port: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise RuntimeError(f"nothing listens on 127.0.0.1:{port}")


def _as_remote() -> None:
    """The store's processes run at nice 5: on a small machine they stand in for a remote store
    (which costs the trainer no CPU) rather than competing with the training thread as equals."""
    os.nice(5)


PROXY = """
import sys, time
from tests.support.netproxy import NetProxy
proxy = NetProxy("127.0.0.1", int(sys.argv[1]))
proxy.throttle(float(sys.argv[2]))
print(proxy.port, flush=True)
while True:
    time.sleep(3600)
"""


# The CI smoke run: 4x4 latents (fast steps), a fast store; the same figures, in seconds.
SMOKE = ["--resolution", "32", "--batch-size", "2", "--mbps", "400", "--steps", "3"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="SiT-S/2")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--resolution", type=int, default=128, help="image side; latents are side/8")
    parser.add_argument("--mbps", type=float, default=15.0, help="store bandwidth, MB/s (both directions)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--steps", type=int, default=15, help="timed steps before and after the upload")
    parser.add_argument("--smoke", action="store_true", help=f"CI smoke run: {' '.join(SMOKE)}")
    args = parser.parse_args(argv)
    if args.smoke:  # tests/integration/test_benchmarks.py
        args = parser.parse_args([*SMOKE, *(sys.argv[1:] if argv is None else argv)])
    torch.set_num_threads(args.threads)

    env = {**os.environ, "AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench"}
    env.update(AWS_DEFAULT_REGION="us-east-1", PYTHONPATH=str(ROOT))
    moto_port = _free_port()
    children = [
        subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(moto_port)],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            preexec_fn=_as_remote,
        )
    ]
    try:
        _wait_port(moto_port)
        proxy = subprocess.Popen(
            [sys.executable, "-c", PROXY, str(moto_port), str(args.mbps * 1e6)],
            env=env,
            stdout=subprocess.PIPE,
            text=True,
            preexec_fn=_as_remote,
        )
        children.append(proxy)
        proxy_port = int(proxy.stdout.readline())
        os.environ.update(
            {k: env[k] for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")}
        )
        os.environ["AWS_ENDPOINT_URL_S3"] = f"http://127.0.0.1:{proxy_port}"
        import boto3

        boto3.client("s3", endpoint_url=f"http://127.0.0.1:{moto_port}").create_bucket(Bucket="bench")
        return _measure(args)
    finally:
        for child in children:
            child.kill()
            child.wait()


def _measure(args: argparse.Namespace) -> int:
    overrides = [
        f"model.name={args.model}",
        "model.encoder_depth=0",
        "encoder.names=[]",
        f"train.global_batch_size={args.batch_size}",
        "train.device=cpu",
        f"data.resolution={args.resolution}",
        "vae.name=sd-vae-ft-mse",
        "storage.run_url=s3://bench/run",
        "storage.deadline_seconds=3600",
    ]
    cfg = load_config(None, overrides)
    latent = args.resolution // 8
    manifest = SimpleNamespace(moments_shape=(8, latent, latent), class_names=[f"c{i}" for i in range(1000)])
    trainer = Trainer(cfg, DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu")), manifest)
    trainer.build()
    trainer.reader.loader = SimpleNamespace(state_dict=lambda: {"samples_consumed": 0})
    batch = {
        "image": torch.zeros(args.batch_size, 3, args.resolution, args.resolution, dtype=torch.uint8),
        "moments": torch.cat(
            [torch.randn(args.batch_size, 4, latent, latent), torch.rand(args.batch_size, 4, latent, latent)],
            1,
        ),
        "label": torch.randint(0, 1000, (args.batch_size,)),
    }

    def step() -> float:
        start = time.perf_counter()
        trainer.train_step([batch])
        trainer.step += 1
        return time.perf_counter() - start

    for _ in range(3):
        step()
    before = [step() for _ in range(args.steps)]
    start = time.perf_counter()
    trainer.save()  # blocking part: the CPU snapshot; the upload runs in the background
    blocking = time.perf_counter() - start
    during = []
    while trainer.saver.busy:
        during.append(step())
    ref = trainer.saver.wait()
    upload = time.perf_counter() - start
    after = [step() for _ in range(args.steps)]

    marker = ckpt.read_marker(ref.url)
    size = sum(f["bytes"] for f in marker["files"].values())
    rate = {
        name: len(t) / sum(t) if t else float("nan")
        for name, t in (("before", before), ("during", during), ("after", after))
    }
    baseline = statistics.mean([rate["before"], rate["after"]])
    print(f"model               {args.model}, batch {args.batch_size}, {latent}x{latent} latents, 1 process")
    print(f"checkpoint          {size / 1e6:.0f} MB (state.pt + ema.pt) to S3 at {args.mbps:g} MB/s")
    print(f"save, blocking      {blocking * 1000:.0f} ms (CPU snapshot + thread start)")
    print(f"save, until commit  {upload:.1f} s ({size / 1e6 / upload:.1f} MB/s end to end)")
    print(f"steps/s before      {rate['before']:.2f}  ({len(before)} steps)")
    print(f"steps/s during      {rate['during']:.2f}  ({len(during)} steps while uploading)")
    print(f"steps/s after       {rate['after']:.2f}  ({len(after)} steps)")
    print(f"during / baseline   {rate['during'] / baseline:.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
