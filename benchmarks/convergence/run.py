"""Does REPA speed up training at laptop scale? Vanilla SiT vs REPA vs REPA with a random encoder.

One command, end to end through the product (docs/convergence.md):

    .venv/bin/python benchmarks/convergence/run.py --workdir /tmp/repa-convergence

1. data: 10 classes of procedural shapes/textures at 16 px, white on black by default
   (``toy.make_shapes``: the product's painter, ``repa.synthetic``), written as an ImageNet-style
   tree (``repa.synthetic.write_image_tree``; one folder when ``--conditioning unconditional``, the
   default), then ``repa prepare`` (images -> shards, ``vae none`` -> pixel "latents");
2. a frozen encoder for alignment: a small timm ViT (16 px, patch 2 -> 64 patch tokens = SiT's 64)
   trained on the true labels (``--encoder-objective classify`` or ``segment``), saved as a state dict
   and loaded by ``repa train`` through the normal registry (``timm:vit_tiny_patch16_224`` +
   ``encoder.weights_urls`` + ``model_kwargs``); what its tokens hold is logged
   (``toy.encoder_token_stats``);
3. an evaluation network that is not that encoder: a small CNN classifier; reference statistics of
   the training set (``repa.eval.refstats.compute_dataset_reference_stats``) and ``FD_toy-shapes-cnn``;
4. runs with the same tiny SiT, data order and steps, one per variant and ``--train-seeds`` seed:
   ``vanilla`` (``encoder.names=[]``), ``repa`` (lambda 0.5, tap at block depth * 8/28),
   ``repa-random`` (same encoder, random weights) and optionally ``repa-half`` (alignment only for the
   first half); each is ``repa train`` followed by ``repa watch --once --feature-extractor
   benchmarks.convergence.toy:classifier_extractor`` over its committed checkpoints (EMA weights,
   Euler ODE, no guidance, the same noises for every run);
5. tables (mean +- std over seeds), ``results.json``, a plot of FD vs step and a grid of samples; the
   speed-up is (last evaluated step) / (first evaluated step at which a variant's mean FD reaches
   vanilla's final mean FD).

Runs go ``--jobs`` at a time (default 2, one per core) as subprocesses with one thread each.
Re-running with a larger ``--steps`` in the same ``--workdir`` resumes every run from its last
checkpoint (bit-identical to a straight run) and evaluates only the new checkpoints.
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
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from benchmarks.convergence import toy  # noqa: E402
from repa import fashion_mnist, synthetic  # noqa: E402
from repa.classifier import SampleClassifier  # noqa: E402
from repa.classifier import accuracy as judge_accuracy  # noqa: E402
from repa.classifier import train_classifier as train_judge  # noqa: E402
from repa.config import load_config  # noqa: E402

log = logging.getLogger("convergence")

ENCODER = "timm:vit_tiny_patch16_224"
FD_TAG = f"eval/fd_{toy.CLASSIFIER_NAME}"
COLOURS = {
    "vanilla": (40, 40, 40),
    "repa": (214, 39, 40),
    "repa-random": (31, 119, 180),
    "repa-ssl": (44, 160, 44),
    "repa-half": (255, 127, 14),
}
HELD_OUT_PER_CLASS = fashion_mnist.SUBSET_TEST  # Fashion-MNIST test images per class: FD network + judge
# Two-sided 95% Student-t quantiles by degrees of freedom (n seeds - 1), for paired-difference intervals.
T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}


def fashion_splits(per_class: int, resolution: int) -> tuple[tuple, tuple, str]:
    """(train images, labels), (held-out images, labels) at ``resolution`` (ADM crop, RGB uint8) and what
    was read: the first ``per_class`` train and HELD_OUT_PER_CLASS test images of every class, in file
    order (the same images from the shipped subset and from the full set)."""
    from repa.data.format import adm_center_crop

    src = fashion_mnist.find()

    def pick(split: str, n: int) -> tuple[np.ndarray, np.ndarray]:
        images, labels = fashion_mnist.load_split(src.folder, split)
        chosen = [np.flatnonzero(labels == c)[:n] for c in range(len(fashion_mnist.CLASS_NAMES))]
        if min(len(c) for c in chosen) < n:
            raise SystemExit(f"--per-class {n}: {src.describe()} has fewer {split} images in some class")
        keep = np.sort(np.concatenate(chosen))
        x = np.stack([adm_center_crop(Image.fromarray(images[i], "L"), resolution) for i in keep])
        return x, labels[keep]

    return pick("train", per_class), pick("t10k", HELD_OUT_PER_CLASS), src.describe()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workdir", default="/tmp/repa-convergence", help="data, weights and runs go here")
    data_help = (
        "fashion: real Fashion-MNIST (the full set's first images or repa's subset); shapes: procedural"
    )
    p.add_argument("--data", default="fashion", choices=("fashion", "shapes"), help=data_help)
    variants_help = (
        "vanilla, repa (classifier-trained encoder), repa-random, repa-ssl (self-supervised), repa-half"
    )
    p.add_argument("--variants", default="vanilla,repa,repa-random,repa-ssl", help=variants_help)
    p.add_argument("--steps", type=int, default=400, help="optimiser steps per run")
    p.add_argument("--eval-every", type=int, default=100, help="checkpoint (and evaluate) every N steps")
    p.add_argument("--eval-samples", type=int, default=200, help="generated images per evaluation")
    p.add_argument("--sample-steps", type=int, default=20, help="Euler ODE steps per sample")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--ema-decay", type=float, default=0.99)
    p.add_argument("--hidden", type=int, default=64, help="SiT width")
    p.add_argument("--depth", type=int, default=4, help="SiT blocks")
    p.add_argument("--encoder-depth", type=int, help="tap block (default: round(depth * 8 / 28), >= 1)")
    p.add_argument("--proj-coeff", type=float, default=0.5)
    p.add_argument("--projector-dim", type=int, default=256)
    p.add_argument("--per-class", type=int, default=500, help="training images per class")
    p.add_argument("--resolution", type=int, default=16)
    p.add_argument("--patch", type=int, default=4, help="SiT and encoder patch (16 px / 4 = 4x4 tokens)")
    p.add_argument("--palette", default="mono", choices=synthetic.PALETTES, help="colours of the toy shapes")
    p.add_argument("--encoder-steps", type=int, default=500, help="ViT encoder training steps")
    p.add_argument(
        "--conditioning",
        default="class",
        choices=("unconditional", "class"),
        help="unconditional: the SiT gets no labels (one class); class: 10-class conditional",
    )
    p.add_argument(
        "--encoder-objective",
        default="classify",
        choices=toy.ENCODER_OBJECTIVES,
        help="how the encoder is trained",
    )
    p.add_argument("--classifier-steps", type=int, default=400, help="CNN classifier training steps")
    p.add_argument(
        "--judge-epochs", type=int, default=15, help="epochs of the accuracy judge (repa.classifier)"
    )
    p.add_argument("--jobs", type=int, default=2, help="runs trained at once (one thread each)")
    p.add_argument("--seed", type=int, default=0, help="data, encoder, FD network and sampling noise")
    p.add_argument(
        "--train-seeds",
        default="0,1,2",
        help="comma-separated: one run per variant and seed (init and data order)",
    )
    p.add_argument("--plot", default=str(ROOT / "docs" / "convergence.png"), help="PNG of FD vs step")
    p.add_argument(
        "--samples-plot",
        default=str(ROOT / "docs" / "convergence-samples.png"),
        help="PNG of samples of every variant (first train seed) at the 2nd, 3rd and last evaluation",
    )
    p.add_argument("--smoke", action="store_true", help=f"CI smoke run: {' '.join(SMOKE)}")
    args = p.parse_args(argv)
    if args.smoke:  # tiny everything; workdir and plots in a fresh temporary folder, never docs/
        args = p.parse_args([*SMOKE, *(sys.argv[1:] if argv is None else argv)])
        if args.workdir == p.get_default("workdir"):
            args.workdir = tempfile.mkdtemp(prefix="repa-convergence-smoke-")
        for key in ("plot", "samples_plot"):
            if getattr(args, key) == p.get_default(key):
                setattr(args, key, str(Path(args.workdir) / Path(p.get_default(key)).name))
    return args


# The CI smoke run (tests/integration/test_benchmarks.py): one variant, one seed, 4 steps, 2 evaluations.
SMOKE = [
    "--variants", "repa,repa-ssl", "--train-seeds", "0", "--steps", "4", "--eval-every", "2",
    "--eval-samples", "8", "--sample-steps", "2", "--batch-size", "8", "--hidden", "32", "--depth", "2",
    "--projector-dim", "32", "--per-class", "4", "--encoder-steps", "2", "--classifier-steps", "2",
    "--judge-epochs", "1",
]  # fmt: skip


def encoder_kwargs(resolution: int, patch: int = 2) -> dict:
    """A ViT whose patch grid matches SiT's (the same patch on both): mean-pooled, final-LN patch tokens."""
    return {
        "img_size": resolution,
        "patch_size": patch,
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
    from repa.eval.refstats import compute_dataset_reference_stats

    torch.set_num_threads(max(1, args.jobs))
    info_path = work / "assets.json"
    if info_path.exists():
        return json.loads(info_path.read_text())
    t0 = time.perf_counter()
    if args.data == "fashion":
        train, val, source = fashion_splits(args.per_class, args.resolution)
        log.info("data: %s", source)
    else:
        train = toy.make_shapes(args.per_class, args.resolution, seed=args.seed, palette=args.palette)
        val = toy.make_shapes(
            max(20, args.per_class // 5), args.resolution, seed=args.seed + 1000, palette=args.palette
        )
    # --conditioning unconditional: one class folder, so the SiT gets no label (the encoder and the
    # FD network still learn from the true labels)
    if args.conditioning == "unconditional":
        tree = synthetic.write_image_tree(work / "images", train[0], np.zeros_like(train[1]), ["shapes"])
    else:
        tree = synthetic.write_image_tree(work / "images", *train[:2], [f"{c}" for c in range(10)])
    data_url = f"file://{work}/shards"
    prepare_images(str(tree), data_url, resolution=args.resolution, samples_per_shard=500, seed=args.seed)
    prepare_latents(data_url, vae="none", batch_size=256)
    t_data = time.perf_counter() - t0

    t0 = time.perf_counter()
    enc_url, ssl_url = str(work / "encoder-vit.pt"), str(work / "encoder-vit-ssl.pt")
    enc_acc, ssl_r2 = (
        toy.train_vit_encoder(
            ENCODER.removeprefix("timm:"),
            encoder_kwargs(args.resolution, args.patch),
            train,
            val,
            url,
            steps=args.encoder_steps,
            objective=objective,
            batch_size=64,
            seed=args.seed,
        )
        for url, objective in ((enc_url, args.encoder_objective), (ssl_url, "reconstruct"))
    )
    t_enc = time.perf_counter() - t0
    t0 = time.perf_counter()
    # The FD network and the accuracy judge learn from held-out images (Fashion-MNIST's test split),
    # never from what the SiT and the encoders were trained on.
    cls_url = str(work / "classifier-cnn.pt")
    cls_acc = toy.train_classifier(
        val[:2], train[:2], cls_url, steps=args.classifier_steps, seed=args.seed + 1
    )
    judge_url = str(work / "judge.pt")
    judge, _ = train_judge(val[0], val[1], 10, epochs=args.judge_epochs, seed=args.seed)
    judge_acc = judge_accuracy(judge, train[0], train[1])
    torch.save(judge.state_dict(), judge_url)
    ref_url = str(work / "reference-stats.npz")
    compute_dataset_reference_stats(data_url, ref_url, toy.load_classifier(cls_url), keep_features=0)
    t_cls = time.perf_counter() - t0
    info = {
        "data_url": data_url,
        "encoder_url": enc_url,
        "encoder_accuracy": enc_acc,
        "ssl_encoder_url": ssl_url,
        "ssl_encoder_r2": ssl_r2,
        "classifier_url": cls_url,
        "classifier_accuracy": cls_acc,
        "judge_url": judge_url,
        "judge_accuracy_on_train_images": judge_acc,
        "data": args.data,
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
    kw = json.dumps(encoder_kwargs(args.resolution, args.patch))
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
    if name == "repa-ssl":
        return [*align, f"encoder.weights_urls=[{assets['ssl_encoder_url']}]"]
    if name == "repa-half":
        return [
            *align,
            f"encoder.weights_urls=[{assets['encoder_url']}]",
            f"objective.align_until_step={args.steps // 2}",
        ]
    raise SystemExit(
        f"--variants: unknown variant {name!r} (vanilla, repa, repa-random, repa-ssl, repa-half)"
    )


def run_name(variant: str, seed: int) -> str:
    return f"{variant}-s{seed}"


def write_config(variant: str, seed: int, args: argparse.Namespace, assets: dict, work: Path) -> Path:
    name = run_name(variant, seed)
    common = [
        "model.name=SiT-S/2",
        f"model.hidden_size={args.hidden}",
        f"model.depth={args.depth}",
        "model.num_heads=4",
        f"model.patch_size={args.patch}",
        f"model.num_classes={1 if args.conditioning == 'unconditional' else 10}",
        f"model.projector_dim={args.projector_dim}",
        f"data.url={assets['data_url']}",
        f"data.resolution={args.resolution}",
        "data.chunk_size=4",
        "data.shards_in_flight=4",
        f"data.seed={seed}",
        f"train.seed={seed}",
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
    cfg = load_config("toy-cpu", [*common, *variant_overrides(variant, args, assets)])
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
                    "benchmarks.convergence.toy:classifier_extractor",
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


def encoder_targets(args: argparse.Namespace, assets: dict) -> dict:
    """What each REPA target's patch tokens hold (``toy.encoder_token_stats``) on 500 held-out images:
    the share that is constant per image (1 - that share = the spatial share, our spatial-structure
    score), and how linear in the own pixels."""
    if args.data == "fashion":
        images = fashion_splits(1, args.resolution)[1][0][:500]
    else:
        images = toy.make_shapes(50, args.resolution, seed=args.seed + 2000, palette=args.palette)[0]
    kwargs = encoder_kwargs(args.resolution, args.patch)
    return {
        name: toy.measure_encoder_targets(ENCODER, url, kwargs, images, seed=args.seed)
        for name, url in (
            ("repa", assets["encoder_url"]),
            ("repa-ssl", assets["ssl_encoder_url"]),
            ("repa-random", None),
        )
    }


def sample_accuracy(run_dir: Path, judge: SampleClassifier | None) -> list[list[float]]:
    """[[step, share of the watcher's samples the judge labels as their class], ...] (class-balanced
    sampling: sample i has label i mod 10); [] without a judge (unconditional runs)."""
    from repa.eval.sample_set import SampleSet

    if judge is None:
        return []
    out = []
    for path in sorted(run_dir.glob("eval/step-*/result-*.json")):
        step = int(path.parent.name.removeprefix("step-"))
        images = np.concatenate(
            list(SampleSet.open(json.loads(path.read_text())["protocol"]["samples_url"]).iter_images())
        )
        out.append([step, judge_accuracy(judge, images, np.arange(len(images)) % judge.num_classes)])
    return out


def collect(name: str, work: Path, judge: SampleClassifier | None = None) -> dict:
    from repa.tensorboard import read_scalars

    run = f"file://{work}/runs/{name}"
    evals = read_scalars(f"{run}/tensorboard/eval")
    train = read_scalars(f"{run}/tensorboard")
    if FD_TAG not in evals:
        raise RuntimeError(f"{name}: no {FD_TAG} scalars in {run}/tensorboard/eval (tags {sorted(evals)})")
    return {
        "fd": [[s, v] for s, v in evals[FD_TAG]],
        "accuracy": sample_accuracy(work / "runs" / name, judge),
        "alignment": [[s, v] for s, v in train.get("train/alignment", [])],
        "denoising_loss": [[s, v] for s, v in train.get("train/denoising_loss", [])],
    }


def steps_to_reach(curve: list[list[float]], target: float) -> int | None:
    """First evaluated step whose FD is <= target (None if never)."""
    return next((int(s) for s, v in curve if v <= target), None)


def mean_curve(runs: list[dict], key: str = "fd") -> list[list[float]]:
    """Mean over seeds of ``key`` at the steps every seed has, and the standard deviation."""
    per_run = [dict((int(s), v) for s, v in r[key]) for r in runs]
    steps = sorted(set.intersection(*(set(c) for c in per_run)))
    out = []
    for step in steps:
        values = np.array([c[step] for c in per_run], dtype=np.float64)
        out.append([step, float(values.mean()), float(values.std(ddof=1)) if len(values) > 1 else 0.0])
    return out


def plot(curves: dict, per_seed: dict, path: Path, title: str) -> None:
    """FD vs step with PIL (no matplotlib in the environment): the mean over seeds thick, each seed thin."""
    w, h, left, right, top, bottom = 900, 560, 80, 180, 50, 60
    img = Image.new("RGB", (w, h), "white")
    d = ImageDraw.Draw(img)
    every = [c for runs in per_seed.values() for c in runs]
    xs = [s for c in every for s, _ in c]
    ys = [v for c in every for _, v in c]
    x0, x1 = 0, max(xs)
    y0, y1 = min(ys) * 0.95, max(ys) * 1.02  # not from 0: the runs differ by a few per cent

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
        faint = tuple(int(c + (255 - c) * 0.6) for c in colour)
        if len(per_seed[name]) > 1:
            for seed_curve in per_seed[name]:
                d.line([px(s, v) for s, v in seed_curve], fill=faint, width=1)
        pts = [px(s, v) for s, v, _ in curve]
        d.line(pts, fill=colour, width=3)
        for x, y in pts:
            d.ellipse([x - 3, y - 3, x + 3, y + 3], fill=colour)
        d.line([w - right + 15, top + 20 + 22 * i, w - right + 45, top + 20 + 22 * i], fill=colour, width=3)
        d.text((w - right + 52, top + 14 + 22 * i), name, fill="black")
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)


def sample_grid(
    work: Path, variants: list[str], seed: int, steps: list[int], path: Path, n: int = 16
) -> None:
    """EMA samples of each variant's ``seed`` run at ``steps`` (rows), the same ``n`` noises everywhere:
    Euler ODE 20 steps, through the product's checkpoint loader, sampler and (identity) VAE."""
    import torch

    from repa.checkpoint import CheckpointSource, load_model
    from repa.eval.sample import build_decoder_vae
    from repa.sampling import sample

    rows = []
    for variant in variants:
        cfg = load_config(str(work / "configs" / f"{run_name(variant, seed)}.yaml"))
        vae, _ = build_decoder_vae(cfg)
        gen = torch.Generator().manual_seed(cfg.sample.seed)
        res = cfg.data.resolution
        noise = torch.randn(n, 3, res, res, generator=gen)
        labels = torch.arange(n) % cfg.model.num_classes
        for step in steps:
            url = f"{cfg.storage.run_url}/checkpoints/step-{step:07d}"
            model = load_model(cfg, CheckpointSource(url, "run", step), weights="ema").model
            with torch.no_grad():
                z = sample(model, noise, labels, "ode_euler", cfg.sample.num_steps).float()
            images = vae.decode_to_uint8(z, cfg.vae.latents_scale, cfg.vae.latents_bias)
            rows.append((f"{variant} @{step}", torch.cat(list(images), dim=2)))  # (3, H, n*W)
    scale, label_w = 4, 150
    h, w = rows[0][1].shape[1] * scale, rows[0][1].shape[2] * scale
    img = Image.new("RGB", (label_w + w, len(rows) * (h + 4)), "white")
    d = ImageDraw.Draw(img)
    for i, (label, strip) in enumerate(rows):
        tile = Image.fromarray(strip.permute(1, 2, 0).numpy()).resize((w, h), Image.NEAREST)
        img.paste(tile, (label_w, i * (h + 4)))
        d.text((6, i * (h + 4) + h // 2 - 6), label, fill="black")
    img.save(path)


def report(results: dict, variants: list[str], seeds: list[int]) -> dict:
    """Markdown tables (mean +- std over seeds) and the speed-up: the first evaluated step at which a
    variant's mean FD reaches vanilla's final mean FD, as a fraction of the run length."""
    curves = {v: mean_curve([results[run_name(v, s)] for s in seeds]) for v in variants}
    align = {v: mean_curve([results[run_name(v, s)] for s in seeds], "alignment") for v in variants}
    target = curves["vanilla"][-1][1] if "vanilla" in curves else None
    steps = sorted({s for c in curves.values() for s, _, _ in c})
    sd = len(seeds) > 1
    lines = [
        f"FD_{toy.CLASSIFIER_NAME}, mean{' +- std' if sd else ''} over train seeds {seeds}:",
        "",
        "| step | " + " | ".join(variants) + " |",
        "|---|" + "---|" * len(variants),
    ]
    for step in steps:
        cells = []
        for v in variants:
            point = next((p for p in curves[v] if p[0] == step), None)
            cells.append("" if point is None else f"{point[1]:.3g}" + (f" +- {point[2]:.2g}" if sd else ""))
        lines.append(f"| {step} | " + " | ".join(cells) + " |")
    lines += ["", "| run | final FD | best FD | final alignment | steps to vanilla's final FD | speed-up |"]
    lines.append("|---|---|---|---|---|---|")
    summary: dict = {"curves": curves}
    for v in variants:
        fd = curves[v]
        final_align = next((a for _, a, _ in reversed(align[v]) if a == a), None)  # skip NaN
        reach = steps_to_reach([[s, m] for s, m, _ in fd], target) if target is not None else None
        speed = fd[-1][0] / reach if reach else None
        summary[v] = {
            "final_fd": fd[-1][1],
            "final_fd_std": fd[-1][2],
            "final_fd_per_seed": [results[run_name(v, s)]["fd"][-1][1] for s in seeds],
            "best_fd": min(m for _, m, _ in fd),
            "final_alignment": final_align,
            "steps_to_vanilla_final_fd": reach,
            "speedup": speed,
        }
        lines.append(
            f"| {v} | {fd[-1][1]:.3g} | {summary[v]['best_fd']:.3g} | "
            f"{'' if final_align is None else f'{final_align:.3f}'} | {reach if reach else 'not reached'} | "
            f"{'' if speed is None else f'{speed:.2f}x'} |"
        )
    if "vanilla" in variants and len(seeds) > 1:
        others = [v for v in variants if v != "vanilla"]
        summary["paired_vs_vanilla"] = {}
        for key, what, fmt in (
            ("fd", "FD", "{:+.3g}"),
            ("accuracy", "classifier accuracy of the samples (percentage points)", "{:+.1f}"),
        ):
            if not all(results[run_name(v, s)].get(key) for v in variants for s in seeds):
                continue
            scale = 100.0 if key == "accuracy" else 1.0
            lines += [
                "",
                f"Paired by seed (same train seed, data order and sampling noise): variant - vanilla {what}, "
                f"mean and 95% t-interval over {len(seeds)} seeds ("
                + ("negative" if key == "fd" else "positive")
                + " = better than vanilla):",
                "",
                "| step | " + " | ".join(f"{v} - vanilla" for v in others) + " |",
                "|---|" + "---|" * len(others),
            ]
            at = {name: {int(step): val * scale for step, val in r[key]} for name, r in results.items()}
            table = summary["paired_vs_vanilla"].setdefault(key, {})
            for step in steps:
                cells = []
                for v in others:
                    pairs = [(at[run_name(v, s)], at[run_name("vanilla", s)]) for s in seeds]
                    d = np.array([a[step] - b[step] for a, b in pairs if step in a and step in b])
                    if len(d) < 2:
                        cells.append("")
                        continue
                    half = T95.get(len(d) - 1, 2.0) * float(d.std(ddof=1) / np.sqrt(len(d)))
                    table.setdefault(v, []).append([step, float(d.mean()), half])
                    lo, hi = fmt.format(d.mean() - half), fmt.format(d.mean() + half)
                    cells.append(f"{fmt.format(d.mean())} [{lo}, {hi}]")
                lines.append(f"| {step} | " + " | ".join(cells) + " |")
    if any(results[run_name(v, seeds[0])].get("accuracy") for v in variants):
        acc = {v: mean_curve([results[run_name(v, s)] for s in seeds], "accuracy") for v in variants}
        summary["accuracy_curves"] = acc
        lines += [
            "",
            f"Classifier accuracy of the samples (%, chance 10%), mean{' +- std' if sd else ''} over seeds:",
            "",
            "| step | " + " | ".join(variants) + " |",
            "|---|" + "---|" * len(variants),
        ]
        for step in steps:
            cells = []
            for v in variants:
                point = next((p for p in acc[v] if p[0] == step), None)
                cells.append(
                    ""
                    if point is None
                    else f"{100 * point[1]:.1f}" + (f" +- {100 * point[2]:.1f}" if sd else "")
                )
            lines.append(f"| {step} | " + " | ".join(cells) + " |")
    summary["table"] = "\n".join(lines)
    return summary


def spatial_order(summary: dict, targets: dict, variants: list[str]) -> dict:
    """Does the gain order by the target's spatial structure (iREPA, arXiv 2512.10794)? Spatial score =
    1 - the per-image-constant share of the target's tokens; gain = vanilla's final FD - the variant's
    (mean over seeds)."""
    rows = []
    final = {v: summary[v]["final_fd"] for v in variants if v in summary}
    for v in ("repa-random", "repa-ssl", "repa"):
        if v in final and v in targets and "vanilla" in final:
            rows.append((v, 1 - targets[v]["global_share"], final["vanilla"] - final[v]))
    lines = [
        "| REPA target | spatial score (1 - per-image-constant share) | FD gain over vanilla at the end |"
    ]
    lines.append("|---|---|---|")
    lines += [f"| {v} | {score:.2f} | {gain:+.3g} |" for v, score, gain in rows]
    by_score = [v for v, _, _ in sorted(rows, key=lambda r: r[1])]
    by_gain = [v for v, _, _ in sorted(rows, key=lambda r: r[2])]
    ordered = len(rows) >= 2 and by_score == by_gain
    # An order is only read off gains that the seeds resolve: the last paired FD interval excludes 0.
    paired = summary.get("paired_vs_vanilla", {}).get("fd", {})
    resolved = [v for v, _, _ in rows if paired.get(v) and abs(paired[v][-1][1]) > paired[v][-1][2]]
    verdict = ("yes" if ordered else "no") if len(resolved) >= 2 else "not resolved"
    lines.append(
        f"\nGain orders by spatial score: {verdict} (by score: {', '.join(by_score)}; by gain: "
        f"{', '.join(by_gain)}; gains resolved by the seeds' 95% intervals: {', '.join(resolved) or 'none'})."
    )
    return {
        "rows": rows,
        "ordered": ordered,
        "resolved": resolved,
        "verdict": verdict,
        "text": "\n".join(lines),
    }


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    args = parse_args(argv)
    work = Path(args.workdir).resolve()
    work.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    import torch

    torch.set_num_threads(1)
    assets = prepare_assets(args, work)
    log.info(
        "assets: encoder accuracy %.3f, classifier accuracy %.3f (%s)",
        assets["encoder_accuracy"],
        assets["classifier_accuracy"],
        {k: round(v) for k, v in assets["seconds"].items()},
    )
    targets = encoder_targets(args, assets)
    for name, stats in targets.items():
        log.info(
            "%s encoder tokens: %.0f%% per-image constant, R^2 %.2f from own pixels",
            name,
            100 * stats["global_share"],
            stats["pixel_r2"],
        )
    variants = [n.strip() for n in args.variants.split(",") if n.strip()]
    seeds = [int(s) for s in args.train_seeds.split(",") if s.strip()]
    runs = [(v, s) for s in seeds for v in variants]  # seed-major: every variant's first seed first
    configs = {run_name(v, s): write_config(v, s, args, assets, work) for v, s in runs}
    with concurrent.futures.ThreadPoolExecutor(max(1, args.jobs)) as pool:
        futures = {
            n: pool.submit(run_variant, n, c, work, assets["classifier_url"]) for n, c in configs.items()
        }
        seconds = {n: f.result() for n, f in futures.items()}
    judge = None
    if args.conditioning == "class":
        judge = SampleClassifier(10)
        judge.load_state_dict(torch.load(assets["judge_url"], weights_only=True))
    results = {n: collect(n, work, judge) for n in configs}
    summary = report(results, variants, seeds)
    summary["spatial_order"] = spatial_order(summary, targets, variants)
    summary["table"] += "\n\n" + summary["spatial_order"]["text"]
    total = time.perf_counter() - started
    cpu = next(
        (line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
         if line.startswith("model name")),
        platform.processor(),
    )  # fmt: skip
    out = {
        "args": vars(args),
        "assets": assets,
        "encoder_targets": targets,
        "seconds": {"total": total, "runs": seconds},
        "results": results,
        "summary": {k: v for k, v in summary.items() if k != "table"},
        "machine": {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version()},
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
    }
    (work / "results.json").write_text(json.dumps(out, indent=2))
    title = f"SiT h{args.hidden} d{args.depth}, {args.resolution}px {args.conditioning}, bs {args.batch_size}"
    per_seed = {v: [results[run_name(v, s)]["fd"] for s in seeds] for v in variants}
    plot(summary["curves"], per_seed, Path(args.plot), title)
    evaluated = [int(s) for s, _, _ in summary["curves"][variants[0]]]
    shown = sorted({evaluated[min(i, len(evaluated) - 1)] for i in (1, 2)} | {evaluated[-1]})  # early + end
    sample_grid(work, variants, seeds[0], shown, Path(args.samples_plot))
    print(summary["table"])
    print(f"\nwall time {total / 60:.1f} min; results {work / 'results.json'}")
    print(f"plots {args.plot}, {args.samples_plot}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
