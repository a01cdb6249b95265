"""Throughput of the FULL trainer step (`repa.train.trainer.Trainer.train_step`), CPU or GPU.

Unlike benchmarks/train_step.py (model + loss + AdamW only), this times exactly what `repa train`
runs per step: posterior sample of the VAE moments, frozen encoder forward on the uint8 images
(preprocessing included), REPA loss, backward, grad clipping, AdamW and the fp32 EMA update.
Data come from memory (synthetic uint8 images and moments), so the figure excludes the loader
(benchmarks/loader.py measures that). Encoder and SiT use random weights.

    .venv/bin/python benchmarks/trainer_step.py                        # CPU: SiT-B/2 + DINOv2-B, batch 8
    .venv/bin/python benchmarks/trainer_step.py --model SiT-XL/2 --device cuda --precision bf16 \\
        --batch-size 64 --compile                                      # GPU (benchmarks/gpu.sh)
    .venv/bin/python benchmarks/trainer_step.py --smoke                # tiny SiT + tiny timm ViT, seconds

``--set KEY=VALUE`` (repeatable) passes any further config override, as ``repa train --set`` does.

Prints images/s (median over the timed steps), MFU on known GPUs (FLOP formula: repa/flops.py) and
peak GPU memory.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from repa.config import load_config
from repa.data.format import Manifest
from repa.flops import mfu
from repa.runtime import DistInfo, resolve_device
from repa.train.trainer import Trainer

# Tiny SiT (width 32, 2 blocks) + a tiny timm ViT encoder at 32 px, 2 steps: the CI smoke run
# (tests/integration/test_benchmarks.py) and `bash benchmarks/gpu.sh --dry-run`.
TINY_ENCODER = (
    '[{"img_size": 32, "patch_size": 16, "embed_dim": 32, "depth": 1, "num_heads": 2, '
    '"class_token": false, "global_pool": "avg", "fc_norm": false}]'
)
TINY = [
    "--model", "SiT-S/2", "--encoder", "timm:vit_tiny_patch16_224", "--encoder-depth", "1",
    "--resolution", "32", "--batch-size", "2",
    "--set", "model.hidden_size=32", "--set", "model.depth=2", "--set", "model.num_heads=2",
    "--set", "model.projector_dim=32", "--set", f"encoder.model_kwargs={TINY_ENCODER}",
]  # fmt: skip
SMOKE = [*TINY, "--warmup", "1", "--steps", "2", "--threads", "1"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="SiT-B/2")
    parser.add_argument("--encoder", default="dinov2-vit-b", help="encoder registry name ('' = vanilla SiT)")
    parser.add_argument("--encoder-depth", type=int, default=None, help="default: 4 for SiT-B, else 8")
    parser.add_argument("--batch-size", type=int, default=8, help="per-device batch")
    parser.add_argument("--resolution", type=int, default=256, help="image side; latents are side/8")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    parser.add_argument("--compile", action="store_true", help="torch.compile the SiT")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads (ignored on GPU)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override")
    parser.add_argument("--smoke", action="store_true", help=f"CI smoke run: {' '.join(SMOKE)}")
    args = parser.parse_args(argv)
    if args.smoke:
        args = parser.parse_args([*SMOKE, *(argv or sys.argv[1:])])

    if args.device == "cpu":
        torch.set_num_threads(args.threads)
    encoder_depth = args.encoder_depth or (4 if args.model.startswith("SiT-B") else 8)
    overrides = [
        f"model.name={args.model}",
        f"model.encoder_depth={encoder_depth if args.encoder else 0}",
        f"encoder.names={[args.encoder] if args.encoder else []}",
        f"train.global_batch_size={args.batch_size}",
        f"train.precision={args.precision}",
        f"train.compile={str(args.compile).lower()}",
        f"train.device={args.device}",
        f"data.resolution={args.resolution}",
        "vae.name=sd-vae-ft-mse",
        *args.set,
    ]
    cfg = load_config(None, overrides)
    device = resolve_device(args.device)
    latent = args.resolution // 8
    # The trainer reads only the moments' shape and the class names from the manifest; no shards here.
    manifest = Manifest(
        resolution=args.resolution,
        class_names=tuple(f"c{i}" for i in range(cfg.model.num_classes)),
        shards=(),
        vae=cfg.vae.name,
        moments_dtype="float16",
        moments_shape=(8, latent, latent),
    )
    trainer = Trainer(cfg, DistInfo(rank=0, world_size=1, local_rank=0, device=device), manifest)
    trainer.build()

    batch = {
        "image": torch.randint(
            0, 256, (args.batch_size, 3, args.resolution, args.resolution), dtype=torch.uint8
        ),
        "moments": torch.cat(
            [torch.randn(args.batch_size, 4, latent, latent), torch.rand(args.batch_size, 4, latent, latent)],
            1,
        ),
        "label": torch.randint(0, cfg.model.num_classes, (args.batch_size,)),
    }
    times = []
    for i in range(args.warmup + args.steps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        trainer.train_step([batch])
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i >= args.warmup:
            times.append(time.perf_counter() - start)
        trainer.step += 1
    seconds = statistics.median(times)
    images_per_second = args.batch_size / seconds
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    utilisation = mfu(trainer.flops_per_image, images_per_second, 1, name) if device.type == "cuda" else None
    print(f"device              {name}")
    print(
        f"model               {args.model} + {args.encoder or 'no encoder'} (encoder_depth {encoder_depth})"
    )
    print(f"batch / precision   {args.batch_size} / {args.precision}{' + compile' if args.compile else ''}")
    print(f"step time (median)  {seconds * 1000:.1f} ms over {args.steps} steps")
    print(f"images/s            {images_per_second:.2f}")
    print(f"train GFLOP/image   {trainer.flops_per_image / 1e9:.4g}")
    # Every line is printed on every device (n/a where it does not apply), so the output has one shape.
    shown = f"{utilisation * 100:.1f} %" if utilisation is not None else f"n/a ({name})"
    print(f"MFU                 {shown}")
    if device.type == "cuda":
        print(f"peak memory         {torch.cuda.max_memory_allocated(device) / 2**30:.1f} GiB")
    else:
        print("peak memory         n/a (cpu)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
