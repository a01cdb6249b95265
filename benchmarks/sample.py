"""Sampling throughput on CPU: images/s of the SDE and ODE samplers with and without guidance.

Compares, for each sampler, no CFG, CFG inside the guidance interval only (the paper's
``--cfg-scale 1.8 --guidance-high 0.7``) and CFG at every step. A guided step runs the model on a doubled
batch, so the cost is proportional to the *forward equivalents* (B-sized forwards) and not to the NFE:

    python benchmarks/sample.py --model SiT-S/2 --input-size 32 --batch 8 --steps 50 --threads 2

Weights are random (throughput does not depend on them); the projector head runs as in the reference,
whose SiT computes it on every forward.
"""

from __future__ import annotations

import argparse
import time

import torch

from repa.models import SiT_models, build_model
from repa.sampling import SAMPLERS, SamplerTrace, sample


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
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = build_model(args.model, input_size=args.input_size).eval()
    z = torch.randn(args.batch, model.in_channels, args.input_size, args.input_size)
    y = torch.randint(0, model.num_classes, (args.batch,))
    modes = {
        "no cfg": dict(cfg_scale=1.0),
        f"cfg {args.cfg_scale} on [0,{args.guidance_high}]": dict(
            cfg_scale=args.cfg_scale, guidance_high=args.guidance_high
        ),
        f"cfg {args.cfg_scale} on [0,1]": dict(cfg_scale=args.cfg_scale, guidance_high=1.0),
    }

    with torch.no_grad():  # warm-up: first-call allocations and kernel selection
        model(z, torch.rand(args.batch), y)
    print(
        f"{args.model} latents {model.in_channels}x{args.input_size}x{args.input_size}, batch {args.batch}, "
        f"{args.steps} steps, {args.threads} threads, torch {torch.__version__}"
    )
    header = ("sampler", "guidance", "NFE", "fwd-eq", "s/batch", "img/s", "ms/fwd-eq")
    print("{:<10} {:<22} {:>4} {:>6} {:>8} {:>7} {:>9}".format(*header))
    for name in args.samplers.split(","):
        for label, kw in modes.items():
            best = float("inf")
            for _ in range(args.repeats):
                trace = SamplerTrace()
                start = time.perf_counter()
                sample(model, z, y, sampler=name, num_steps=args.steps, trace=trace,
                       generator=torch.Generator().manual_seed(0), **kw)  # fmt: skip
                best = min(best, time.perf_counter() - start)
            print(
                f"{name:<10} {label:<22} {trace.nfe:>4} {trace.forward_equivalents:>6} {best:>8.2f} "
                f"{args.batch / best:>7.2f} {1e3 * best / trace.forward_equivalents:>9.1f}"
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
