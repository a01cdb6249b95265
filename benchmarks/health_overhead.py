"""Cost of the training health guard (repa/train/health.py): trainer step time with it and without.

Times `Trainer.train_step` (as benchmarks/trainer_step.py: posterior sample, frozen encoder, REPA
loss, backward, clipping, AdamW, EMA; batches from memory) with ``health.enabled`` on and off,
alternating step by step so that a change of machine load hits both alike, and then the guard's own
work per step alone (the verdict and the window update with a full window of W values: four medians
of W floats in Python), which is the whole difference between the two, since the step's one
all-reduce and its host sync exist without the guard too (for the logged metrics).

    .venv/bin/python benchmarks/health_overhead.py                  # SiT-S/2 + DINOv2-S, batch 8, 256 px
    .venv/bin/python benchmarks/health_overhead.py --steps 40 --model SiT-B/2 --encoder dinov2-vit-b

Prints the median step time of each, their ratio, and the guard's microseconds per step as a
fraction of the step (docs/benchmarks.md, "Health guard overhead").
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from repa.config import load_config
from repa.runtime import DistInfo
from repa.train.health import HealthGuard
from repa.train.trainer import Trainer

# The CI smoke run: a tiny timm encoder on 32 px images (4 tokens, like SiT-S/2 on 4x4 latents).
SMOKE = [
    *("--encoder", "timm:vit_tiny_patch16_224", "--resolution", "32", "--batch-size", "2"),
    *("--warmup", "1", "--steps", "2", "--threads", "1"),
]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="SiT-S/2")
    parser.add_argument("--encoder", default="dinov2-vit-s")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=20, help="timed steps per setting (alternating)")
    parser.add_argument("--smoke", action="store_true", help=f"CI smoke run: {' '.join(SMOKE)}")
    args = parser.parse_args(argv)
    if args.smoke:  # tests/integration/test_benchmarks.py
        args = parser.parse_args([*SMOKE, *(sys.argv[1:] if argv is None else argv)])

    torch.set_num_threads(args.threads)
    overrides = [
        f"model.name={args.model}",
        f"model.encoder_depth={4 if args.model.startswith(('SiT-S', 'SiT-B')) else 8}",
        f"encoder.names=[{args.encoder}]",
        f"train.global_batch_size={args.batch_size}",
        "train.precision=fp32",
        "train.device=cpu",
        f"data.resolution={args.resolution}",
        "vae.name=sd-vae-ft-mse",
        # Thresholds are computed as always but never reached: a skipped step (no AdamW, no EMA) would
        # be cheaper and bias the "on" time; the window holds only the few warm-up values repeated.
        "health.spike_k=1e9",
    ]
    cfg = load_config(None, overrides)
    trainer = Trainer(cfg, DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu")), None)
    latent = args.resolution // 8
    trainer.manifest = SimpleNamespace(
        moments_shape=(8, latent, latent), class_names=[str(i) for i in range(1000)]
    )
    trainer.build()
    batch = {
        "image": torch.randint(
            0, 256, (args.batch_size, 3, args.resolution, args.resolution), dtype=torch.uint8
        ),
        "moments": torch.cat(
            [torch.randn(args.batch_size, 4, latent, latent), torch.rand(args.batch_size, 4, latent, latent)],
            1,
        ),
        "label": torch.randint(0, 1000, (args.batch_size,)),
    }
    guard = trainer.health
    seen = []
    for _ in range(args.warmup):
        metrics = trainer.train_step([batch])
        seen.append((metrics["loss"], metrics["grad_norm"]))
        trainer.step += 1
    for loss, norm in itertools.islice(itertools.cycle(seen), guard.cfg.window_steps):
        guard.accept(loss, norm)  # a full window: the spike checks run at their full cost
    times: dict[bool, list[float]] = {True: [], False: []}
    skipped = 0
    for i in range(2 * args.steps):
        on = i % 2 == 0
        guard.cfg.enabled = on
        start = time.perf_counter()
        metrics = trainer.train_step([batch])
        times[on].append(time.perf_counter() - start)
        skipped += bool(metrics["failed"])
        trainer.step += 1
    guard.cfg.enabled = True

    # The guard's own work per step, alone: verdict + window update on a full window.
    alone = HealthGuard(cfg.health)
    for loss, norm in itertools.islice(itertools.cycle(seen), cfg.health.window_steps):
        alone.accept(loss, norm)
    calls = 2000
    start = time.perf_counter()
    for j in range(calls):
        loss, norm = seen[j % len(seen)]
        alone.judge(loss, norm)
        alone.accept(loss, norm)
    guard_seconds = (time.perf_counter() - start) / calls

    on, off = statistics.median(times[True]), statistics.median(times[False])
    print(f"model               {args.model} + {args.encoder}, batch {args.batch_size}, fp32, CPU")
    print(f"threads             {args.threads}; {args.steps} timed steps each, alternating")
    print(f"step, guard on      {on * 1000:.1f} ms (median)")
    print(f"step, guard off     {off * 1000:.1f} ms (median)")
    print(f"on / off            {on / off:.4f}")
    print(f"guard alone         {guard_seconds * 1e6:.1f} us/step (W = {cfg.health.window_steps})")
    print(f"guard / step        {guard_seconds / off * 100:.4f} %")
    print(f"skipped steps       {skipped}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
