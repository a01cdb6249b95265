"""CPU throughput of one REPA training step, and of faster variants, measured in the same run.

One step = REPALoss forward (SiT with projector, random (B, T, 768) target features in place of DINOv2)
+ backward + grad clipping at 1.0 + AdamW (lr 1e-4, wd 0), as in the reference train.py (no EMA,
no encoder, no data loading: those belong to the full trainer step).

    .venv/bin/python benchmarks/train_step.py        # SiT-B/2, batch 8, 2 threads, all variants
    .venv/bin/python benchmarks/train_step.py --variants reference,bf16_autocast --steps 5
    .venv/bin/python benchmarks/train_step.py --smoke     # CI: tiny SiT, every variant but compile

Variants change one thing relative to ``reference`` (SDPA attention, fp32, torch's default AdamW, which
on CPU is the per-parameter for-loop), except ``bf16_fused`` (two). Results are medians over the timed
steps after the warm-up steps; ratios are against ``reference`` (or the first variant run).

Two clocks: wall time (what a user sees) and the process's CPU time per step. On a machine shared with
other jobs the wall time depends on the load at that moment, while CPU time / threads estimates the
wall time the step would take with the cores to itself (``est. idle img/s``; an estimate: OpenMP threads
also burn CPU while spin-waiting, which makes it pessimistic).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from repa.models import build_model
from repa.objective import REPALoss


@dataclass(frozen=True)
class Variant:
    description: str
    fused_attn: bool = True
    adamw: str = "default"  # default | foreach | fused
    autocast_bf16: bool = False
    compile: bool = False


VARIANTS: dict[str, Variant] = {
    "reference": Variant("as the reference: SDPA attention, fp32, default AdamW (for-loop on CPU)"),
    "explicit_attn": Variant("timm explicit softmax(QK^T)V attention instead of SDPA", fused_attn=False),
    "adamw_foreach": Variant("AdamW(foreach=True): multi-tensor update", adamw="foreach"),
    "adamw_fused": Variant("AdamW(fused=True): fused CPU kernel", adamw="fused"),
    "bf16_autocast": Variant(
        "forward + loss under CPU bf16 autocast (AMX), fp32 master weights", autocast_bf16=True
    ),
    "bf16_fused": Variant("bf16 autocast + fused AdamW", adamw="fused", autocast_bf16=True),
    "compile": Variant("torch.compile(model) (inductor, C++ codegen), fp32", compile=True),
}


# The CI smoke run (tests/integration/test_benchmarks.py): a tiny SiT, every variant but `compile`
# (a CPU inductor compile alone takes about a minute).
SMOKE = [
    "--model", "SiT-S/2", "--width", "32", "--depth", "2", "--input-size", "4", "--batch-size", "2",
    "--steps", "1", "--warmup", "1", "--threads", "1",
    "--variants", ",".join(v for v in VARIANTS if v != "compile"),
]  # fmt: skip


@dataclass
class Result:
    variant: str
    description: str
    images_per_s: float
    step_s_median: float
    step_s_min: float
    step_s_max: float
    cpu_s_median: float
    idle_images_per_s_est: float
    warmup_s: float
    timed_steps: int
    final_loss: float


def run_variant(name: str, args: argparse.Namespace) -> Result:
    variant = VARIANTS[name]
    torch.manual_seed(0)
    overrides = {}
    if args.width:
        overrides.update(hidden_size=args.width, num_heads=2, projector_dim=args.width)
    if args.depth:
        overrides.update(depth=args.depth, encoder_depth=1)
    model = build_model(args.model, input_size=args.input_size, fused_attn=variant.fused_attn, **overrides)
    model.train()
    opt_kwargs = {"foreach": {"foreach": True}, "fused": {"fused": True}}.get(variant.adamw, {})
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.999), weight_decay=0.0, **opt_kwargs)
    forward_model = torch.compile(model) if variant.compile else model
    loss_fn = REPALoss(proj_coeff=0.5)

    gen = torch.Generator().manual_seed(1)
    B, T = args.batch_size, (args.input_size // model.patch_size) ** 2
    x = torch.randn(B, model.in_channels, args.input_size, args.input_size, generator=gen)
    y = torch.randint(0, model.num_classes, (B,), generator=gen)
    zs = [torch.randn(B, T, z, generator=gen) for z in model.z_dims]
    autocast = (
        torch.autocast("cpu", dtype=torch.bfloat16) if variant.autocast_bf16 else contextlib.nullcontext()
    )
    params = [p for p in model.parameters() if p.requires_grad]

    def step() -> float:
        opt.zero_grad(set_to_none=True)
        with autocast:
            out = loss_fn(forward_model, x, y, zs, generator=gen)
        out.total.backward()
        torch.nn.utils.clip_grad_norm_(params, max_norm=1.0)
        opt.step()
        return out.total.item()

    t0 = time.perf_counter()
    for _ in range(args.warmup):
        step()
    warmup_s = time.perf_counter() - t0
    times, cpu_times, loss = [], [], float("nan")
    for _ in range(args.steps):
        t0, c0 = time.perf_counter(), time.process_time()
        loss = step()
        times.append(time.perf_counter() - t0)
        cpu_times.append(time.process_time() - c0)
    median, cpu_median = statistics.median(times), statistics.median(cpu_times)
    return Result(
        variant=name,
        description=variant.description,
        images_per_s=B / median,
        step_s_median=median,
        step_s_min=min(times),
        step_s_max=max(times),
        cpu_s_median=cpu_median,
        idle_images_per_s_est=B * args.threads / cpu_median,
        warmup_s=warmup_s,
        timed_steps=len(times),
        final_loss=loss,
    )


def cpu_name() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="SiT-B/2")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--input-size", type=int, default=32, help="latent side (32 = 256 px images)")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per variant")
    parser.add_argument(
        "--warmup", type=int, default=3, help="untimed steps per variant (compile happens here)"
    )
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"comma list of {', '.join(VARIANTS)}")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--width", type=int, help="override the SiT width (tiny models for smoke runs)")
    parser.add_argument("--depth", type=int, help="override the SiT depth")
    parser.add_argument("--smoke", action="store_true", help=f"CI smoke run: {' '.join(SMOKE)}")
    args = parser.parse_args(argv)
    if args.smoke:
        args = parser.parse_args([*SMOKE, *(sys.argv[1:] if argv is None else argv)])
    names = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        parser.error(f"unknown variant(s) {unknown}; choose from {list(VARIANTS)}")

    torch.set_num_threads(args.threads)
    print(
        f"{args.model}, batch {args.batch_size}, latents {args.input_size}x{args.input_size}, "
        f"{args.threads} threads, torch {torch.__version__}, CPU {cpu_name()}, "
        f"{args.warmup} warm-up + {args.steps} timed steps per variant",
        flush=True,
    )
    results: list[Result] = []
    for name in names:
        result = run_variant(name, args)
        results.append(result)
        print(
            f"{name:14s} {result.images_per_s:7.3f} img/s  step median {result.step_s_median:6.2f} s "
            f"(min {result.step_s_min:.2f}, max {result.step_s_max:.2f}), "
            f"CPU {result.cpu_s_median:6.2f} s/step "
            f"(est. idle {result.idle_images_per_s_est:.2f} img/s), warm-up {result.warmup_s:6.1f} s, "
            f"loss {result.final_loss:.4f}",
            flush=True,
        )
        gc.collect()

    base = next((r for r in results if r.variant == "reference"), results[0])
    print(
        f"\n| variant | img/s (wall) | step median (s) | vs {base.variant} (wall) | CPU s/step "
        f"| est. idle img/s | vs {base.variant} (CPU) | what changes |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for r in results:
        print(
            f"| {r.variant} | {r.images_per_s:.2f} | {r.step_s_median:.2f} | "
            f"{r.images_per_s / base.images_per_s:.2f}x | {r.cpu_s_median:.2f} | "
            f"{r.idle_images_per_s_est:.2f} | "
            f"{base.cpu_s_median / r.cpu_s_median:.2f}x | {r.description} |"
        )
    if args.json:
        args.json.write_text(
            json.dumps(
                {"args": vars(args) | {"json": str(args.json)}, "results": [asdict(r) for r in results]},
                indent=2,
            )
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
