"""Throughput: repa's one-pass evaluation vs torch-fidelity's ``calculate_metrics`` (same images and weights).

repa: :func:`repa.eval.metrics.evaluate_many` reads the generated images once and runs Inception once
per image for FID, sFID, IS and precision/recall, and DINOv2 once per image for FD-DINOv2.
torch-fidelity: ``calculate_metrics(fid, isc, prc)`` with its ``inception-v3-compat`` (one Inception
pass for its three metrics; it has no sFID), then ``calculate_metrics(fid)`` with its
``dinov2-vit-l-14`` on the same DINOv2 network (handed to it through ``torch.hub.load``). Both sides
score only the generated images: the reference side is precomputed (repa: reference statistics;
torch-fidelity: its feature cache, filled by an untimed warm-up run).

Random weights of the real architectures (Inception-v3, 91 MiB; DINOv2 ViT-L/14 by default) unless
files are given: the cost per image does not depend on the weights' values.

    .venv/bin/python benchmarks/eval_throughput.py --images 256 --device cuda
    .venv/bin/python benchmarks/eval_throughput.py --images 64 --dinov2-width 384 --dinov2-depth 12  # CPU

Prints images/s of each side, their ratio, and the metrics of both side by side (FD-DINOv2 differs
on non-224 px images by design: torch-fidelity resizes with TF1 bilinear, dgm-eval and repa with PIL
bicubic; docs/benchmarks.md, "Evaluation throughput").
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from repa.eval.dinov2 import DINOV2_NAME, build_dinov2
from repa.eval.features import INCEPTION_NAME, build_inception
from repa.eval.images import UInt8ImageDataset
from repa.eval.metrics import MetricJob, evaluate_many
from repa.eval.random_inception import make_random_inception_weights
from repa.eval.refstats import compute_reference_stats

SMOKE = [*("--images", "10", "--resolution", "64", "--batch-size", "5", "--device", "cpu")]
SMOKE += [*("--dinov2-width", "32", "--dinov2-depth", "2", "--dinov2-heads", "2", "--threads", "1")]


def synthetic_images(n: int, size: int, seed: int) -> torch.Tensor:
    """uint8 (n, 3, size, size): smooth noise at mixed scales (a network sees structure)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        res = (4, 8, 16)[i % 3]
        x = F.interpolate(torch.rand(1, 3, res, res, generator=g), size=(size, size), mode="bilinear")
        out.append((x * 255).round().clamp(0, 255).to(torch.uint8))
    return torch.cat(out)


def random_dinov2_weights(path: str, width: int | None, depth: int | None, heads: int | None) -> dict:
    """A DINOv2 ViT/14 state dict as released (518 px grid), random; returns the timm size overrides."""
    import timm

    kwargs = {k: v for k, v in (("embed_dim", width), ("depth", depth), ("num_heads", heads)) if v}
    torch.manual_seed(0)
    model = timm.create_model(
        "vit_large_patch14_dinov2.lvd142m", pretrained=False, num_classes=0, img_size=518, **kwargs
    )
    state = model.state_dict()
    for k in state:
        if k.endswith(".gamma"):  # released layer scales are far from timm's 1e-5 init: blocks matter
            state[k] = torch.ones_like(state[k])
    torch.save(state, path)
    return kwargs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--images", type=int, default=256, help="generated images scored (and as many references)"
    )
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--inception-weights", help="torch-fidelity Inception file (default: random weights)")
    parser.add_argument("--dinov2-weights", help="DINOv2 ViT-L/14 file (default: random weights)")
    parser.add_argument("--dinov2-width", type=int, help="random DINOv2 only: embed_dim (ViT-L: 1024)")
    parser.add_argument("--dinov2-depth", type=int, help="random DINOv2 only: depth (ViT-L: 24)")
    parser.add_argument("--dinov2-heads", type=int, help="random DINOv2 only: heads (ViT-L: 16)")
    parser.add_argument(
        "--repeats",
        type=int,
        default=2,
        help="timed runs per side, alternating repa / torch-fidelity; the fastest of each is reported "
        "(a shared machine's load then hits both sides alike)",
    )
    parser.add_argument("--smoke", action="store_true", help=f"CI smoke run: {' '.join(SMOKE)}")
    args = parser.parse_args(argv)
    if args.smoke:  # tests/integration/test_benchmarks.py
        args = parser.parse_args([*SMOKE, *(sys.argv[1:] if argv is None else argv)])
    if args.threads:
        torch.set_num_threads(args.threads)
    import torch_fidelity

    scratch = tempfile.mkdtemp(prefix="repa-eval-bench-")
    inception_path = args.inception_weights or make_random_inception_weights(
        os.path.join(scratch, "inception.pth")
    )
    dinov2_path, dinov2_kwargs = args.dinov2_weights, {}
    if not dinov2_path:
        dinov2_path = os.path.join(scratch, "dinov2.pth")
        dinov2_kwargs = random_dinov2_weights(
            dinov2_path, args.dinov2_width, args.dinov2_depth, args.dinov2_heads
        )
    inception = build_inception(inception_path, device=args.device)
    dinov2 = build_dinov2(dinov2_path, device=args.device, model_kwargs=dinov2_kwargs)
    n, size = args.images, args.resolution
    splits = min(10, n)
    generated, reference = synthetic_images(n, size, seed=1), synthetic_images(n, size, seed=2)
    inception_ref = compute_reference_stats(reference, inception, batch_size=args.batch_size, keep_features=n)
    dinov2_ref = compute_reference_stats(reference, dinov2, batch_size=args.batch_size, keep_features=0)
    sync = torch.cuda.synchronize if torch.device(args.device).type == "cuda" else (lambda: None)

    jobs = [MetricJob(inception, inception_ref, splits, 3), MetricJob(dinov2, dinov2_ref)]
    evaluate_many(generated[: args.batch_size], jobs[1:], batch_size=args.batch_size)  # warm-up (kernels)

    def ours() -> tuple[float, Any]:
        sync()
        start = time.perf_counter()
        results = evaluate_many(generated, jobs, batch_size=args.batch_size)
        sync()
        return time.perf_counter() - start, results

    common = dict(
        cuda=torch.device(args.device).type == "cuda",
        batch_size=args.batch_size,
        save_cpu_ram=True,
        verbose=False,
        cache=True,
        cache_root=os.path.join(scratch, "fidelity-cache"),
        input2_cache_name="reference",
        samples_shuffle=False,  # ADM's IS splits are contiguous
        isc_splits=splits,
    )
    inception_kw = dict(
        feature_extractor=INCEPTION_NAME,
        feature_extractor_weights_path=inception_path,
        feature_layer_prc="2048",
    )
    torch.hub.load = lambda repo, name, *a, **k: dinov2.net.model  # torch-fidelity's DINOv2 loader
    gen_ds, ref_ds = UInt8ImageDataset(generated), UInt8ImageDataset(reference)
    for name_kw in (
        dict(fid=True, isc=True, prc=True, **inception_kw),
        dict(fid=True, feature_extractor=DINOV2_NAME),
    ):
        torch_fidelity.calculate_metrics(input1=ref_ds, input2=ref_ds, **common, **name_kw)  # fills the cache

    def theirs() -> tuple[float, Any]:
        sync()
        start = time.perf_counter()
        inception_metrics = torch_fidelity.calculate_metrics(
            input1=gen_ds, input2=ref_ds, fid=True, isc=True, prc=True, **inception_kw, **common
        )
        dinov2_metrics = torch_fidelity.calculate_metrics(
            input1=gen_ds, input2=ref_ds, fid=True, feature_extractor=DINOV2_NAME, **common
        )
        sync()
        return time.perf_counter() - start, (inception_metrics, dinov2_metrics)

    ours_times, theirs_times = [], []
    for _ in range(max(1, args.repeats)):  # alternating, so load changes hit both sides
        seconds, (ours_inception, ours_dinov2) = ours()
        ours_times.append(seconds)
        seconds, (theirs_inception, theirs_dinov2) = theirs()
        theirs_times.append(seconds)
    ours_s, theirs_s = min(ours_times), min(theirs_times)

    dino = "ViT-L/14" if not dinov2_kwargs else f"ViT/14 {dinov2_kwargs}"
    weights = "given" if args.inception_weights else "random"
    # Numbers say what they are: random weights give an FD, not a FID; a resized DINOv2 not FD-DINOv2.
    fd = "FID" if args.inception_weights else "FD (random Inception)"
    fd_dinov2 = "FD-DINOv2" if not dinov2_kwargs else "FD (DINOv2 code path, not ViT-L/14)"
    print(
        f"eval throughput: {n} generated images of {size}x{size}, batch {args.batch_size}, {args.device}, "
        f"fastest of {len(ours_times)} alternating runs per side"
    )
    print(f"  networks: Inception-v3 ({weights} weights), DINOv2 {dino}")
    print(
        "  (the scoring pass of `repa eval`, evaluate_many; sampling is not timed: torch-fidelity does none)"
    )
    print(f"  repa evaluate_many (FD, sFD, IS, P/R; DINOv2 FD): {n / ours_s:8.2f} img/s ({ours_s:.2f} s)")
    print(
        f"  torch-fidelity calculate_metrics x2 (FD, IS, P/R; DINOv2 FD): {n / theirs_s:8.2f} img/s ", end=""
    )
    print(f"({theirs_s:.2f} s)")
    print(f"  ratio repa / torch-fidelity: {theirs_s / ours_s:.2f}x")
    rows = [
        (fd, ours_inception.fid, theirs_inception["frechet_inception_distance"]),
        ("sFID" if args.inception_weights else "sFD (random Inception)", ours_inception.sfid, None),
        (
            "IS" if args.inception_weights else "IS (random Inception)",
            ours_inception.inception_score_mean,
            theirs_inception["inception_score_mean"],
        ),
        ("precision", ours_inception.precision, theirs_inception["precision"]),
        ("recall", ours_inception.recall, theirs_inception["recall"]),
        (fd_dinov2, ours_dinov2.fid, theirs_dinov2["frechet_inception_distance"]),
    ]
    for label, ours, theirs in rows:
        their_text = "n/a (no sFID)" if theirs is None else f"{theirs:.6f}"
        print(f"  {label:>36}: repa {ours:.6f}  torch-fidelity {their_text}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
