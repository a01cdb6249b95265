"""Does REPA speed up training at laptop scale? Vanilla SiT vs REPA vs REPA with a random encoder.

One command, end to end through the product (docs/convergence.md):

    .venv/bin/python benchmarks/convergence.py --workdir /tmp/repa-convergence

1. data: 10 classes of procedural shapes/textures at 16 px (``repa.toy.make_shapes``), written as an
   ImageNet-style tree, then ``repa prepare`` (images -> shards, ``vae none`` -> pixel "latents");
2. a frozen encoder for alignment: a small timm ViT (16 px, patch 2 -> 64 patch tokens = SiT's 64)
   trained to classify the shapes, saved as a state dict and loaded by ``repa train`` through the
   normal registry (``timm:vit_tiny_patch16_224`` + ``encoder.weights_urls`` + ``model_kwargs``);
3. an evaluation network that is not that encoder: a small CNN classifier; reference statistics of
   the training set (``repa.eval.evaluate.compute_dataset_reference_stats``) and ``FD_toy-shapes-cnn``;
4. runs with the same tiny SiT, seeds, data order and steps: ``vanilla`` (``encoder.names=[]``),
   ``repa`` (lambda 0.5, tap at block depth * 8/28), ``repa-random`` (same encoder, random weights)
   and optionally ``repa-half`` (alignment only for the first half); each is ``repa train`` followed by
   ``repa watch --once --feature-extractor repa.toy:classifier_extractor`` over its committed
   checkpoints (EMA weights, Euler ODE, class-balanced labels, no guidance);
5. a table, ``results.json`` and a plot of FD vs step; the speed-up is (vanilla's steps) / (first
   evaluated step at which a run reaches vanilla's final FD).

Runs go ``--jobs`` at a time (default 3: all variants at once, so they share the CPU equally) as
subprocesses with one thread each. Re-running with a larger ``--steps`` in the same ``--workdir``
resumes every run from its last checkpoint (bit-identical to a straight run) and evaluates only the
new checkpoints.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import datetime
import json
import logging
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from repa import toy  # noqa: E402
from repa.config import load_config  # noqa: E402

log = logging.getLogger("convergence")

ENCODER = "timm:vit_tiny_patch16_224"
FD_TAG = f"eval/fd_{toy.CLASSIFIER_NAME}"
COLOURS = {
    "vanilla": (40, 40, 40),
    "repa": (214, 39, 40),
    "repa-random": (31, 119, 180),
    "repa-half": (255, 127, 14),
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workdir", default="/tmp/repa-convergence", help="data, weights and runs go here")
    p.add_argument("--variants", default="vanilla,repa,repa-random", help="also: repa-half")
    p.add_argument("--steps", type=int, default=1600, help="optimiser steps per run")
    p.add_argument("--eval-every", type=int, default=200, help="checkpoint (and evaluate) every N steps")
    p.add_argument("--eval-samples", type=int, default=400, help="generated images per evaluation")
    p.add_argument("--sample-steps", type=int, default=20, help="Euler ODE steps per sample")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--ema-decay", type=float, default=0.995)
    p.add_argument("--hidden", type=int, default=64, help="SiT width")
    p.add_argument("--depth", type=int, default=6, help="SiT blocks")
    p.add_argument("--encoder-depth", type=int, help="tap block (default: round(depth * 8 / 28), >= 1)")
    p.add_argument("--proj-coeff", type=float, default=0.5)
    p.add_argument("--projector-dim", type=int, default=256)
    p.add_argument("--per-class", type=int, default=400, help="training images per class")
    p.add_argument("--resolution", type=int, default=16)
    p.add_argument("--encoder-steps", type=int, default=500, help="ViT encoder training steps")
    p.add_argument("--classifier-steps", type=int, default=400, help="CNN classifier training steps")
    p.add_argument("--jobs", type=int, default=3, help="runs trained at once (one thread each)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--plot", default=str(ROOT / "docs" / "convergence.png"), help="PNG of FD vs step")
    return p.parse_args(argv)


def encoder_kwargs(resolution: int) -> dict:
    """A ViT whose patch grid matches SiT's (patch 2 on both): mean-pooled, final-LN patch tokens."""
    return {
        "img_size": resolution,
        "patch_size": 2,
        "embed_dim": 64,
        "depth": 3,
        "num_heads": 4,
        "global_pool": "avg",
        "class_token": False,
        "fc_norm": False,
    }


# ----------------------------------------------------------------------------------------------
# Stage 1-3: data, encoder, classifier, reference statistics (each skipped when already done)
# ----------------------------------------------------------------------------------------------


def prepare_assets(args: argparse.Namespace, work: Path) -> dict:
    import torch

    from repa.data.prepare import prepare_images, prepare_latents
    from repa.eval.evaluate import compute_dataset_reference_stats

    torch.set_num_threads(max(1, args.jobs))
    info_path = work / "assets.json"
    if info_path.exists():
        return json.loads(info_path.read_text())
    t0 = time.perf_counter()
    train = toy.make_shapes(args.per_class, args.resolution, seed=args.seed)
    val = toy.make_shapes(max(20, args.per_class // 5), args.resolution, seed=args.seed + 1000)
    tree = toy.write_image_tree(work / "images", *train)
    data_url = f"file://{work}/shards"
    prepare_images(str(tree), data_url, resolution=args.resolution, samples_per_shard=500, seed=args.seed)
    prepare_latents(data_url, vae="none", batch_size=256)
    t_data = time.perf_counter() - t0

    t0 = time.perf_counter()
    enc_url = str(work / "encoder-vit.pt")
    enc_acc = toy.train_vit_encoder(
        ENCODER.removeprefix("timm:"),
        encoder_kwargs(args.resolution),
        train,
        val,
        enc_url,
        steps=args.encoder_steps,
        batch_size=64,
        seed=args.seed,
    )
    t_enc = time.perf_counter() - t0
    t0 = time.perf_counter()
    cls_url = str(work / "classifier-cnn.pt")
    cls_acc = toy.train_classifier(train, val, cls_url, steps=args.classifier_steps, seed=args.seed + 1)
    ref_url = str(work / "reference-stats.npz")
    compute_dataset_reference_stats(data_url, ref_url, toy.load_classifier(cls_url), keep_features=0)
    t_cls = time.perf_counter() - t0
    info = {
        "data_url": data_url,
        "encoder_url": enc_url,
        "encoder_accuracy": enc_acc,
        "classifier_url": cls_url,
        "classifier_accuracy": cls_acc,
        "reference_stats_url": ref_url,
        "num_images": len(train[1]),
        "seconds": {"data": t_data, "encoder": t_enc, "classifier_and_reference": t_cls},
    }
    info_path.write_text(json.dumps(info, indent=2))
    return info


# ----------------------------------------------------------------------------------------------
# Stage 4: one config per variant; train + watch as subprocesses (the real CLI)
# ----------------------------------------------------------------------------------------------


def variant_overrides(name: str, args: argparse.Namespace, assets: dict) -> list[str]:
    tap = args.encoder_depth or max(1, round(args.depth * 8 / 28))
    kw = json.dumps(encoder_kwargs(args.resolution))
    align = [
        f"encoder.names=[{ENCODER}]",
        f"encoder.model_kwargs=[{kw}]",
        f"model.encoder_depth={tap}",
        f"objective.proj_coeff={args.proj_coeff}",
    ]
    if name == "vanilla":
        return ["encoder.names=[]", "encoder.weights_urls=[]", "encoder.model_kwargs=[]"]
    if name == "repa":
        return [*align, f"encoder.weights_urls=[{assets['encoder_url']}]"]
    if name == "repa-random":
        return [*align, "encoder.weights_urls=[null]"]
    if name == "repa-half":
        return [
            *align,
            f"encoder.weights_urls=[{assets['encoder_url']}]",
            f"objective.align_until_step={args.steps // 2}",
        ]
    raise SystemExit(f"--variants: unknown variant {name!r} (vanilla, repa, repa-random, repa-half)")


def write_config(name: str, args: argparse.Namespace, assets: dict, work: Path) -> Path:
    common = [
        "model.name=SiT-S/2",
        f"model.hidden_size={args.hidden}",
        f"model.depth={args.depth}",
        "model.num_heads=4",
        "model.patch_size=2",
        "model.num_classes=10",
        f"model.projector_dim={args.projector_dim}",
        f"data.url={assets['data_url']}",
        f"data.resolution={args.resolution}",
        "data.chunk_size=4",
        "data.shards_in_flight=4",
        f"data.seed={args.seed}",
        f"train.seed={args.seed}",
        f"train.global_batch_size={args.batch_size}",
        f"train.max_steps={args.steps}",
        f"train.lr={args.lr}",
        f"train.ema_decay={args.ema_decay}",
        f"checkpoint.every_steps={args.eval_every}",
        "checkpoint.keep_latest=1000",
        "checkpoint.keep_every_steps=0",
        "log.every_steps=50" if args.eval_every % 50 == 0 else f"log.every_steps={args.eval_every}",
        f"log.tensorboard_flush_every_steps={args.eval_every}",
        "log.sample_every_steps=0",
        "sample.sampler=ode_euler",
        f"sample.num_steps={args.sample_steps}",
        "sample.cfg_scale=1.0",
        f"sample.num_samples={args.eval_samples}",
        "sample.class_balanced=true",
        f"sample.seed={args.seed}",
        "sample.batch_size_per_device=250",
        "eval.metrics=[fid]",
        f"eval.reference_stats_url={assets['reference_stats_url']}",
        f"storage.run_url=file://{work}/runs/{name}",
    ]
    cfg = load_config("toy-cpu", [*common, *variant_overrides(name, args, assets)])
    path = work / "configs" / f"{name}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(cfg.to_yaml())
    return path


def run_variant(name: str, config: Path, work: Path, classifier_url: str) -> dict:
    """``repa train`` then ``repa watch --once`` (every committed checkpoint), one thread, logged."""
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
        toy.CLASSIFIER_ENV: classifier_url,
        "PYTHONPATH": str(ROOT),
    }
    repa = [sys.executable, "-m", "repa"]
    logfile = work / "logs" / f"{name}.log"
    logfile.parent.mkdir(parents=True, exist_ok=True)
    seconds = {}
    with logfile.open("a") as out:
        for stage, argv in (
            ("train", [*repa, "train", "--config", str(config)]),
            (
                "eval",
                [
                    *repa,
                    "watch",
                    "--config",
                    str(config),
                    "--once",
                    "--feature-extractor",
                    "repa.toy:classifier_extractor",
                    "--delete-samples",
                    "--no-progress",
                    "--chunk-size",
                    "250",
                ],
            ),
        ):
            t0 = time.perf_counter()
            code = subprocess.call(argv, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
            seconds[stage] = time.perf_counter() - t0
            if code != 0:
                raise RuntimeError(f"{name}: `repa {stage}` exited {code}; see {logfile}")
    log.info("%s: train %.0f s, eval %.0f s", name, seconds["train"], seconds["eval"])
    return seconds


# ----------------------------------------------------------------------------------------------
# Stage 5: results, speed-up, plot
# ----------------------------------------------------------------------------------------------


def collect(name: str, work: Path) -> dict:
    from repa.train.metrics import read_scalars

    run = f"file://{work}/runs/{name}"
    evals = read_scalars(f"{run}/tensorboard/eval")
    train = read_scalars(f"{run}/tensorboard")
    if FD_TAG not in evals:
        raise RuntimeError(f"{name}: no {FD_TAG} scalars in {run}/tensorboard/eval (tags {sorted(evals)})")
    return {
        "fd": [[s, v] for s, v in evals[FD_TAG]],
        "alignment": [[s, v] for s, v in train.get("train/alignment", [])],
        "denoising_loss": [[s, v] for s, v in train.get("train/denoising_loss", [])],
    }


def steps_to_reach(curve: list[list[float]], target: float) -> int | None:
    """First evaluated step whose FD is <= target (None if never)."""
    return next((int(s) for s, v in curve if v <= target), None)


def plot(results: dict, path: Path, title: str) -> None:
    """Line plot of FD vs step with PIL (no matplotlib in the environment)."""
    w, h, left, right, top, bottom = 900, 560, 80, 180, 50, 60
    img = Image.new("RGB", (w, h), "white")
    d = ImageDraw.Draw(img)
    curves = {k: v["fd"] for k, v in results.items()}
    xs = [s for c in curves.values() for s, _ in c]
    ys = [v for c in curves.values() for _, v in c]
    x0, x1 = 0, max(xs)
    y0, y1 = 0.0, max(ys) * 1.05

    def px(s: float, v: float) -> tuple[float, float]:
        return (
            left + (s - x0) / (x1 - x0) * (w - left - right),
            h - bottom - (v - y0) / (y1 - y0) * (h - top - bottom),
        )

    d.rectangle([left, top, w - right, h - bottom], outline="black")
    for i in range(6):
        v = y0 + (y1 - y0) * i / 5
        _, y = px(0, v)
        d.line([left - 4, y, left, y], fill="black")
        d.line([left, y, w - right, y], fill=(230, 230, 230))
        d.text((8, y - 6), f"{v:.4g}", fill="black")
    for i in range(5):
        s = x0 + (x1 - x0) * i / 4
        x, _ = px(s, 0)
        d.line([x, h - bottom, x, h - bottom + 4], fill="black")
        d.text((x - 12, h - bottom + 8), f"{int(s)}", fill="black")
    d.text((left + (w - left - right) // 2 - 40, h - 22), "training step", fill="black")
    d.text((8, 20), f"FD_{toy.CLASSIFIER_NAME} (lower is better)", fill="black")
    d.text((left + 150, 20), title, fill="black")
    for i, (name, curve) in enumerate(curves.items()):
        colour = COLOURS.get(name, (120, 120, 120))
        pts = [px(s, v) for s, v in curve]
        d.line(pts, fill=colour, width=3)
        for x, y in pts:
            d.ellipse([x - 3, y - 3, x + 3, y + 3], fill=colour)
        d.line([w - right + 15, top + 20 + 22 * i, w - right + 45, top + 20 + 22 * i], fill=colour, width=3)
        d.text((w - right + 52, top + 14 + 22 * i), name, fill="black")
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)


def report(results: dict, args: argparse.Namespace) -> dict:
    """Markdown table + speed-ups (steps to vanilla's final FD)."""
    summary: dict = {}
    target = results["vanilla"]["fd"][-1][1] if "vanilla" in results else None
    steps = sorted({int(s) for r in results.values() for s, _ in r["fd"]})
    names = list(results)
    lines = ["| step | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for s in steps:
        row = [dict((int(a), b) for a, b in results[n]["fd"]).get(s) for n in names]
        lines.append(f"| {s} | " + " | ".join("" if v is None else f"{v:.3f}" for v in row) + " |")
    lines.append("")
    lines.append("| run | final FD | best FD | final alignment | steps to vanilla's final FD | speed-up |")
    lines.append("|---|---|---|---|---|---|")
    for n in names:
        fd = results[n]["fd"]
        align = results[n]["alignment"][-1][1] if results[n]["alignment"] else None
        reach = steps_to_reach(fd, target) if target is not None else None
        speed = args.steps / reach if reach else None
        summary[n] = {
            "final_fd": fd[-1][1],
            "best_fd": min(v for _, v in fd),
            "final_alignment": align,
            "steps_to_vanilla_final_fd": reach,
            "speedup": speed,
        }
        lines.append(
            f"| {n} | {fd[-1][1]:.3f} | {min(v for _, v in fd):.3f} | "
            f"{'' if align is None else f'{align:.3f}'} | {reach if reach else 'not reached'} | "
            f"{'' if speed is None else f'{speed:.2f}x'} |"
        )
    summary["table"] = "\n".join(lines)
    return summary


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    args = parse_args(argv)
    work = Path(args.workdir).resolve()
    work.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    assets = prepare_assets(args, work)
    log.info(
        "assets: encoder accuracy %.3f, classifier accuracy %.3f (%s)",
        assets["encoder_accuracy"],
        assets["classifier_accuracy"],
        {k: round(v) for k, v in assets["seconds"].items()},
    )
    names = [n.strip() for n in args.variants.split(",") if n.strip()]
    configs = {n: write_config(n, args, assets, work) for n in names}
    with concurrent.futures.ThreadPoolExecutor(max(1, args.jobs)) as pool:
        futures = {n: pool.submit(run_variant, n, configs[n], work, assets["classifier_url"]) for n in names}
        seconds = {n: f.result() for n, f in futures.items()}
    results = {n: collect(n, work) for n in names}
    summary = report(results, args)
    total = time.perf_counter() - started
    cpu = next(
        (line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
         if line.startswith("model name")),
        platform.processor(),
    )  # fmt: skip
    out = {
        "args": vars(args),
        "assets": assets,
        "seconds": {"total": total, "runs": seconds},
        "results": results,
        "summary": {k: v for k, v in summary.items() if k != "table"},
        "machine": {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version()},
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
    }
    (work / "results.json").write_text(json.dumps(out, indent=2))
    title = f"SiT h{args.hidden} d{args.depth}, {args.resolution}px, bs {args.batch_size}"
    plot(results, Path(args.plot), title)
    print(summary["table"])
    print(f"\nwall time {total / 60:.1f} min; results {work / 'results.json'}; plot {args.plot}")
    if "vanilla" in summary and "repa" in summary:
        best = np.array([v for _, v in results["repa"]["fd"]])
        print(f"repa reaches vanilla's final FD at step {summary['repa']['steps_to_vanilla_final_fd']} "
              f"(min FD {best.min():.3f})")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
