"""Sampling throughput (CPU or GPU): images/s of the SDE and ODE samplers with and without guidance.

Compares, for each sampler, no CFG, CFG inside the guidance interval only (the paper's
``--cfg-scale 1.8 --guidance-high 0.7``) and CFG at every step. A guided step runs the model on a doubled
batch, so the cost is proportional to the *forward equivalents* (B-sized forwards) and not to the NFE:

    python benchmarks/sample.py --model SiT-S/2 --input-size 32 --batch 8 --steps 50 --threads 2

Weights are random (throughput does not depend on them); the projector head runs as in the reference,
whose SiT computes it on every forward. On a GPU, the paper's protocol (fp32 with TF32, as the official
``generate.py``; SDE, 250 steps, CFG 1.8 on [0, 0.7]) is what benchmarks/gpu.sh runs:

    python benchmarks/sample.py --model SiT-XL/2 --device cuda --precision fp32 --tf32 --batch 64 \\
        --samplers sde --steps 250 --modes interval

``--smoke`` is the CI smoke run (tests/integration/test_benchmarks.py): a tiny SiT, 2 steps. The latent
sampler only: VAE decoding is not timed.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

from repa import runtime
from repa.models import SiT_models, build_model
from repa.sampling import SAMPLERS, SamplerTrace, sample

MODES = ("none", "interval", "all")  # no CFG; CFG on [0, guidance_high]; CFG at every step
SMOKE = ["--model", "SiT-S/2", "--width", "32", "--depth", "2", "--input-size", "4", "--batch", "2",
         "--steps", "2", "--threads", "1"]  # fmt: skip


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="SiT-S/2", choices=list(SiT_models))
    p.add_argument("--input-size", type=int, default=32, help="latent side (32 = 256 px images)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--samplers", default="sde,ode_euler", help=f"comma-separated, from {', '.join(SAMPLERS)}")
    p.add_argument("--cfg-scale", type=float, default=1.8)
    p.add_argument("--guidance-high", type=float, default=0.7)
    p.add_argument("--repeats", type=int, default=1, help="timed runs per setting (the best is reported)")
    p.add_argument("--modes", default=",".join(MODES), help=f"comma-separated, from {', '.join(MODES)}")
    p.add_argument("--device", default="cpu")
    p.add_argument("--precision", default="fp32", choices=sorted(runtime.DTYPES), help="autocast dtype")
    p.add_argument("--tf32", action="store_true", help="allow TF32 matmuls on CUDA (the paper's protocol)")
    p.add_argument("--width", type=int, help="override the SiT width (tiny models for smoke runs)")
    p.add_argument("--depth", type=int, help="override the SiT depth")
    p.add_argument("--smoke", action="store_true", help=f"CI smoke run: {' '.join(SMOKE)}")
    args = p.parse_args(argv)
    if args.smoke:
        args = p.parse_args([*SMOKE, *(sys.argv[1:] if argv is None else argv)])
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    runtime.enable_tf32(device, args.tf32)
    torch.manual_seed(0)
    overrides = {"input_size": args.input_size}
    if args.width:
        overrides.update(hidden_size=args.width, num_heads=2, projector_dim=args.width)
    if args.depth:
        overrides.update(depth=args.depth, encoder_depth=1)
    model = build_model(args.model, **overrides).to(device).eval()
    z = torch.randn(args.batch, model.in_channels, args.input_size, args.input_size, device=device)
    y = torch.randint(0, model.num_classes, (args.batch,), device=device)
    all_modes = {
        "none": ("no cfg", dict(cfg_scale=1.0)),
        "interval": (
            f"cfg {args.cfg_scale} on [0,{args.guidance_high}]",
            dict(cfg_scale=args.cfg_scale, guidance_high=args.guidance_high),
        ),
        "all": (f"cfg {args.cfg_scale} on [0,1]", dict(cfg_scale=args.cfg_scale, guidance_high=1.0)),
    }
    modes = dict(all_modes[m] for m in args.modes.split(","))

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    with torch.no_grad(), runtime.autocast(device, args.precision):  # warm-up: allocations, kernels
        model(z, torch.rand(args.batch, device=device), y)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu, {args.threads} threads"
    tf32 = " + TF32" if args.tf32 and device.type == "cuda" else ""
    print(
        f"{args.model} latents {model.in_channels}x{args.input_size}x{args.input_size}, batch {args.batch}, "
        f"{args.steps} steps, {args.precision}{tf32}, {name}, torch {torch.__version__}"
    )
    header = ("sampler", "guidance", "NFE", "fwd-eq", "s/batch", "img/s", "ms/fwd-eq")
    print("{:<10} {:<22} {:>4} {:>6} {:>8} {:>7} {:>9}".format(*header))
    for name in args.samplers.split(","):
        for label, kw in modes.items():
            best = float("inf")
            for _ in range(args.repeats):
                trace = SamplerTrace()
                sync()
                start = time.perf_counter()
                with runtime.autocast(device, args.precision):
                    sample(model, z, y, sampler=name, num_steps=args.steps, trace=trace,
                           generator=torch.Generator(device).manual_seed(0), **kw)  # fmt: skip
                sync()
                best = min(best, time.perf_counter() - start)
            print(
                f"{name:<10} {label:<22} {trace.nfe:>4} {trace.forward_equivalents:>6} {best:>8.2f} "
                f"{args.batch / best:>7.2f} {1e3 * best / trace.forward_equivalents:>9.1f}"
            )
    if device.type == "cuda":
        print(f"peak memory {torch.cuda.max_memory_allocated(device) / 2**30:.1f} GiB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
