"""`repa demo`: the whole REPA pipeline, offline, on real images, on a laptop CPU in a few minutes.

    real images                            <out>/images: Fashion-MNIST (repa.fashion_mnist: the subset
                                           shipped with repa, or the full set where installed) as IDX
                                           files, train split + held-out test split
      -> repa prepare images / latents     <out>/data: shards + manifest.json (vae none = pixels)
      -> repa train                        <out>/run: tiny SiT + REPA (toy-cpu preset), TensorBoard,
                                           committed checkpoints
      -> repa eval ref-stats               <out>/ref-stats.npz: FID statistics of the prepared shards
      -> repa watch --once                 sample + FID of every committed checkpoint -> run/eval/*.json
                                           and eval/fid in TensorBoard
      -> repa sample                       <out>/samples-grid.png (one column per class)
      -> judge the samples                 a small CNN (repa.classifier) trained on the held-out real
                                           images labels the grid's samples: accuracy vs chance

Every stage is the product's own verb, called through :func:`repa.cli.main` with the run config the
demo writes to ``<out>/config.yaml`` (the toy-cpu preset plus a few overrides), so each step can be
re-run by hand with ``--config <out>/config.yaml``. Only the reference statistics go through the
Python API that ``repa eval ref-stats`` calls, to show a progress bar. Every verb is idempotent, so
running the demo again into the same folder reuses what is done (``--fresh`` starts over).

Weights. repa never downloads anything. Without files the demo says so and uses random weights: a
random tiny ViT as the REPA target encoder, pixel space instead of the SD-VAE, and a random-weights
Inception-v3 (repa.eval.random_inception, written once to ``<out>/weights/``, named RANDOM) so FID's code
path runs; its numbers are then meaningless. ``--encoder-weights``, ``--vae-weights`` and
``--inception-weights`` (local paths or fsspec URLs) put real files into the config keys
``encoder.weights_urls``, ``vae.weights_url`` and ``eval.inception_weights_url``, and the same command
does the real thing.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import math
import os
import shutil
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from repa import fashion_mnist
from repa.eval.random_inception import make_random_inception_weights

__all__ = [
    "DemoError",
    "DemoOptions",
    "DemoResult",
    "add_arguments",
    "choose_threads",
    "demo_overrides",
    "run",
    "run_demo",
    "summary_lines",
    "tensorboard_command",
]

RANDOM_INCEPTION_NAME = "inception-v3-RANDOM-WEIGHTS-not-for-real-FID.pth"
DEFAULT_ENCODER = "dinov2-vit-b"  # REPA's target encoder, used when --encoder-weights is given


class DemoError(RuntimeError):
    """A demo stage failed or the options do not fit together; the message says which and why."""


# ----------------------------------------------------------------------------------------------
# Options -> run config
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass
class DemoOptions:
    """What `repa demo` does. The defaults take about three minutes on two CPU cores (docs/benchmarks.md)."""

    out: str = "demo-output"
    classes: int = 10
    images_per_class: int = 500
    resolution: int | None = None  # None: 16 (random tiny encoder) or 256 (a registered encoder)
    steps: int = 600
    checkpoint_every: int | None = None  # None: steps / 2
    batch_size: int = 64
    lr: float = 2e-3
    eval_samples: int = 30
    ref_images: int = 60
    grid_per_class: int = 8
    seed: int = 0
    encoder: str | None = None
    encoder_weights: str | None = None
    vae_weights: str | None = None
    inception_weights: str | None = None
    device: str = "cpu"
    overrides: list[str] = dataclasses.field(default_factory=list)
    # How, not what (not part of the output folder's identity):
    threads: int | None = None  # None: the cores not already busy (choose_threads)
    fresh: bool = False
    progress: bool = True
    verbose: bool = False

    _HOW = ("threads", "fresh", "progress", "verbose")

    def identity(self) -> dict[str, Any]:
        """The options that decide the outputs: a folder made with other ones cannot be reused."""
        return {k: v for k, v in dataclasses.asdict(self).items() if k not in self._HOW and k != "out"}

    def check(self) -> None:
        positive = {
            "--classes": self.classes,
            "--images-per-class": self.images_per_class,
            "--steps": self.steps,
            "--batch-size": self.batch_size,
            "--grid-per-class": self.grid_per_class,
        }
        for flag, value in positive.items():
            if value < 1:
                raise DemoError(f"{flag}: {value}; must be >= 1")
        n_classes = len(fashion_mnist.CLASS_NAMES)
        if not 1 <= self.classes <= n_classes:
            raise DemoError(f"--classes: {self.classes}; Fashion-MNIST has 1 to {n_classes} classes")
        for flag, value in (("--eval-samples", self.eval_samples), ("--ref-images", self.ref_images)):
            if value < 2:
                raise DemoError(f"{flag}: {value}; a Fréchet distance needs at least 2 images")
        if self.ref_images > self.classes * self.images_per_class:
            raise DemoError(
                f"--ref-images: {self.ref_images} > the {self.classes * self.images_per_class} images drawn "
                "(--classes x --images-per-class)"
            )
        if not self.lr > 0:
            raise DemoError(f"--lr: {self.lr}; must be > 0")
        every = self.checkpoint_every
        if every is not None and not 1 <= every <= self.steps:
            raise DemoError(f"--checkpoint-every: {every}; must be in [1, --steps={self.steps}]")
        if self.encoder and self.encoder.startswith("timm:"):
            raise DemoError(
                f"--encoder {self.encoder}: use a registered name (e.g. {DEFAULT_ENCODER}); a timm: encoder "
                "needs its size in encoder.model_kwargs, so give it with --set encoder.names=... instead"
            )


@dataclasses.dataclass
class DemoResult:
    """Where the demo put things (absolute paths) and what it measured."""

    out: Path
    config_path: Path
    run_dir: Path
    checkpoints: list[int]
    results: dict[int, dict[str, Any]]  # step -> the watcher's result JSON
    grid_png: Path
    real_grid_png: Path
    seconds: float
    random_weights: list[str]
    judge: Judgement | None = None

    @property
    def tensorboard_dir(self) -> Path:
        return self.run_dir / "tensorboard"


def _url(path: Path) -> str:
    return f"file://{path.resolve()}"


def _geometry(opts: DemoOptions) -> dict[str, Any]:
    """Resolution, SiT patch and encoder overrides such that SiT's token grid = the encoder's.

    REPA aligns SiT token j with encoder patch token j, so both grids must have the same side T.
    SiT's is (resolution / VAE downsampling) / patch; a registered encoder's is fixed by its
    preprocessing (DINOv2: 224 px / 14 = 16 per side at 256 px), so SiT's patch follows from it.
    The random tiny ViT is instead sized to SiT's grid, whose patch keeps 4 x 4 = 16 tokens: that is
    what makes a CPU step cheap. Measured on Fashion-MNIST (400 steps, 2 busy cores): 16 px with 16
    tokens at batch 64 trains in about the time of 32 px with 64 tokens at batch 16, and its samples
    are recognisable far more often (30-46% vs 10% = chance, by repa.classifier).
    """
    real_encoder = bool(opts.encoder_weights or opts.encoder)
    resolution = opts.resolution or (256 if real_encoder else 16)
    down = 8 if opts.vae_weights else 1
    if resolution % down or resolution < 8:
        raise DemoError(
            f"--resolution {resolution}: must be >= 8 and divisible by the VAE's downsampling {down}"
        )
    latent = resolution // down
    if real_encoder:
        from repa.encoders import build_encoder

        name = opts.encoder or DEFAULT_ENCODER
        try:
            encoder = build_encoder(name, weights_url=opts.encoder_weights, resolution=resolution)
        except ValueError as e:
            raise DemoError(f"--encoder {name}: {e}") from e
        side = math.isqrt(encoder.num_tokens)
        if latent % side:
            raise DemoError(
                f"--encoder {name} has {side}x{side} tokens at resolution {resolution}, which does not "
                f"divide SiT's {latent}x{latent} input; use a resolution that is a multiple of 256"
            )
        weights = json.dumps(opts.encoder_weights) if opts.encoder_weights else "null"
        encoder_sets = [
            f"encoder.names=[{json.dumps(name)}]",
            f"encoder.weights_urls=[{weights}]",
            "encoder.model_kwargs=[]",
        ]
        return {"resolution": resolution, "patch": latent // side, "encoder": encoder_sets}
    patch = max(1, latent // 4)
    if latent % patch:
        raise DemoError(f"--resolution {resolution}: SiT's input side {latent} is not divisible by 4")
    side = latent // patch
    kwargs = {
        "img_size": resolution,
        "patch_size": resolution // side,
        "embed_dim": 64,
        "depth": 2,
        "num_heads": 2,
    }
    return {
        "resolution": resolution,
        "patch": patch,
        "encoder": [f"encoder.model_kwargs=[{json.dumps(kwargs)}]"],
    }


def demo_overrides(opts: DemoOptions, out: Path, inception_url: str) -> list[str]:
    """``--set`` overrides of the toy-cpu preset for this demo (the user's ``--set`` go last)."""
    geo = _geometry(opts)
    every = opts.checkpoint_every or max(1, opts.steps // 2)
    log_every = math.gcd(every, 10)  # every checkpoint step must be a logged step (a config rule)
    n_checkpoints = -(-opts.steps // every)
    sets = [
        f"data.url={_url(out / 'data')}",
        f"data.resolution={geo['resolution']}",
        "data.shards_in_flight=4",
        f"storage.run_url={_url(out / 'run')}",
        f"model.num_classes={opts.classes}",
        f"model.patch_size={geo['patch']}",
        *geo["encoder"],
        f"train.max_steps={opts.steps}",
        f"train.global_batch_size={opts.batch_size}",
        f"train.lr={opts.lr}",
        f"train.device={opts.device}",
        f"train.seed={opts.seed}",
        f"checkpoint.every_steps={every}",
        f"checkpoint.keep_latest={n_checkpoints + 1}",  # keep them all: the watcher scores each one
        f"log.every_steps={log_every}",
        f"log.tensorboard_flush_every_steps={log_every}",
        f"log.sample_every_steps={every}",
        "log.sample_num_images=16",
        "log.sample_num_steps=16",
        "sample.num_steps=16",
        f"sample.num_samples={opts.eval_samples}",
        "sample.batch_size_per_device=20",
        "sample.class_balanced=true",
        f"eval.reference_stats_url={_url(out / 'ref-stats.npz')}",
        f"eval.inception_weights_url={json.dumps(inception_url)}",
        "eval.metrics=[fid]",
        "eval.watch_poll_seconds=1",
    ]
    if opts.vae_weights:
        sets += [
            "vae.name=sd-vae-ft-mse",
            f"vae.weights_url={json.dumps(opts.vae_weights)}",
            "vae.latents_scale=0.18215",
            "sample.vae_name=sd-vae-ft-mse",  # one VAE folder given: decode with it too
        ]
    return sets + list(opts.overrides)


# ----------------------------------------------------------------------------------------------
# The demo
# ----------------------------------------------------------------------------------------------

EXPECT = (
    "blurry but recognisable garments, one class per column; trousers, bags, sandals, sneakers and "
    "boots are easy to tell apart, tops, pullovers, coats and shirts are often confused (by the classifier "
    "on real images too)"
)
MARKER = "REPA_DEMO.json"  # in the output folder: which options made it (so --fresh never deletes other data)


def choose_threads(requested: int | None = None) -> int:
    """CPU threads for torch and BLAS: ``requested``, else the cores not already busy, at least 1.

    Why: threads that wait for each other (OpenMP and OpenBLAS barriers spin) are several times slower
    than one thread when other processes hold the cores. Measured on 2 shared cores at load 6: one
    thread trained the demo model 5-7x faster than two, and an FID's 2048 x 2048 eigendecompositions
    took 2.7 s instead of 36 s.
    """
    import torch

    if requested is not None:
        if requested < 1:
            raise DemoError(f"--threads: {requested}; must be >= 1")
        return requested
    cores = os.cpu_count() or 1
    try:
        load = os.getloadavg()[0]
    except (OSError, AttributeError):  # no load average on Windows
        load = 0.0
    return max(1, min(torch.get_num_threads(), int(cores - load + 0.5)))


@contextlib.contextmanager
def _limits(threads: int, verbose: bool) -> Iterator[None]:
    """torch and (via threadpoolctl, if installed) BLAS threads; repa's INFO logs off unless verbose."""
    import logging

    import torch

    before = torch.get_num_threads()
    repa_logger = logging.getLogger("repa")
    level = repa_logger.level
    torch.set_num_threads(threads)
    if not verbose:
        repa_logger.setLevel(logging.WARNING)  # warnings (e.g. "RANDOM weights") still show
    try:
        with contextlib.ExitStack() as stack:
            try:
                from threadpoolctl import threadpool_limits

                stack.enter_context(threadpool_limits(limits=threads))
            except ImportError:
                pass
            yield
    finally:
        torch.set_num_threads(before)
        repa_logger.setLevel(level)


class _Stages:
    """Numbered stage headers with elapsed times (the demo is a CLI verb: it prints)."""

    def __init__(self, total: int) -> None:
        self.total, self.n = total, 0
        self.t0 = self.started = time.monotonic()

    def _done(self) -> None:
        if self.n:
            print(f"    ({time.monotonic() - self.started:.1f} s)", flush=True)

    def __call__(self, title: str) -> None:
        self._done()
        self.n += 1
        self.started = time.monotonic()
        print(f"\n[{self.n}/{self.total}] {title}", flush=True)

    def end(self) -> float:
        self._done()
        return time.monotonic() - self.t0


def _verb(*argv: str) -> None:
    """Run one product verb exactly as `repa ...` would; a non-zero exit fails the demo, naming it."""
    from repa.cli import main

    code = main(list(argv))
    if code != 0:
        raise DemoError(f"`repa {' '.join(argv)}` exited with code {code} (its error is printed above)")


def _weights_report(opts: DemoOptions, inception: str) -> tuple[list[str], list[str]]:
    """Lines saying, per network, where its weights come from (RANDOM: how to give real ones)."""
    lines, random_parts = [], []
    if opts.encoder_weights:
        lines.append(f"  encoder    {opts.encoder or DEFAULT_ENCODER} from {opts.encoder_weights}")
    else:
        what = opts.encoder if opts.encoder else "tiny ViT, 2 blocks"
        name = opts.encoder or DEFAULT_ENCODER
        lines += [
            f"  encoder    RANDOM weights ({what}): the alignment targets are random features, so REPA",
            f"             cannot help here. Real: --encoder-weights PATH|URL, a {name} weights file",
            f"             (sets encoder.names=[{name}] and encoder.weights_urls; images become 256 px)",
        ]
        random_parts.append("encoder")
    if opts.vae_weights:
        lines.append(f"  VAE        sd-vae-ft-mse from {opts.vae_weights}")
    else:
        lines += [
            "  VAE        none: SiT models pixels, no VAE weights needed. Latents: --vae-weights PATH|URL,",
            "             a diffusers sd-vae-ft-mse folder (sets vae.name and vae.weights_url)",
        ]
    if opts.inception_weights:
        lines.append(f"  Inception  {opts.inception_weights}")
    else:
        lines += [
            "  Inception  RANDOM weights: FID runs end to end but its values are MEANINGLESS.",
            f"             {_shown(Path(inception))}",
            "             Real: --inception-weights PATH|URL, torch-fidelity's",
            "             weights-inception-2015-12-05-6726825d.pth (sets eval.inception_weights_url)",
        ]
        random_parts.append("Inception")
    return ["Weights (repa never downloads any):", *lines], random_parts


def _grid(images: np.ndarray, columns: int, scale: int) -> Image.Image:
    """uint8 (N, H, W, 3) -> one image: row-major, ``columns`` per row, 2 px gaps, ``scale``x nearest."""
    n, h, w, _ = images.shape
    rows, gap = -(-n // columns), 2
    canvas = np.full((rows * (h + gap) + gap, columns * (w + gap) + gap, 3), 255, np.uint8)
    for i, img in enumerate(images):
        y, x = gap + (i // columns) * (h + gap), gap + (i % columns) * (w + gap)
        canvas[y : y + h, x : x + w] = img
    out = Image.fromarray(canvas, "RGB")
    return out.resize((out.width * scale, out.height * scale), Image.NEAREST) if scale > 1 else out


HELD_OUT_PER_CLASS = fashion_mnist.SUBSET_TEST  # test-split images per class: the judge's training set


def _write_real_images(folder: Path, opts: DemoOptions) -> fashion_mnist.FashionMnist:
    """The demo's Fashion-MNIST pick as IDX files: the first --images-per-class train images and the
    first HELD_OUT_PER_CLASS test images of each of the first --classes classes. The shipped subset holds
    exactly these images whenever it is big enough, and reads ~10x faster than the full set's 26 MB."""
    source = fashion_mnist.find(prefer_subset=opts.images_per_class <= fashion_mnist.SUBSET_TRAIN)
    try:
        fashion_mnist.write_subset(
            source.folder, folder, opts.images_per_class, HELD_OUT_PER_CLASS, opts.classes
        )
    except ValueError as e:
        more = (
            " (the subset shipped with repa has "
            f"{fashion_mnist.SUBSET_TRAIN} per class; `apt-get install dataset-fashion-mnist` gives 6,000)"
            if source.kind == "subset"
            else ""
        )
        raise DemoError(f"--images-per-class {opts.images_per_class}: {e}{more}") from None
    return source


def _load_real(folder: Path, split: str, resolution: int) -> tuple[np.ndarray, np.ndarray]:
    """IDX split -> (uint8 (N, R, R, 3) as the model sees them (ADM crop, as `repa prepare`), labels)."""
    from repa.data.format import adm_center_crop

    images, labels = fashion_mnist.load_split(folder, split)
    return np.stack([adm_center_crop(Image.fromarray(i, "L"), resolution) for i in images]), labels


def _grid_layout(images: np.ndarray, labels: np.ndarray, classes: int, per_class: int) -> np.ndarray:
    """The first ``per_class`` images of each class, row-major with one column per class."""
    first = [np.flatnonzero(labels == c)[:per_class] for c in range(classes)]
    return np.stack([images[first[c][i]] for i in range(per_class) for c in range(classes)])


@dataclasses.dataclass
class Judgement:
    """What the independent classifier (repa.classifier) says about the generated grid."""

    accuracy: float  # share of generated samples labelled as the class they were drawn for
    samples: int
    chance: float
    real_accuracy: float  # the same classifier on the real training images: the ceiling
    real_images: int
    held_out_images: int  # what it was trained on (Fashion-MNIST test split, never seen by the SiT)

    def lines(self) -> list[str]:
        return [
            f"  classifier accuracy of the {self.samples} generated samples: {100 * self.accuracy:.0f}% "
            f"(chance {100 * self.chance:.0f}%; on {self.real_images} real training images: "
            f"{100 * self.real_accuracy:.0f}%)",
            f"  (a small CNN trained on {self.held_out_images} held-out real images, grayscale and "
            "standardised per image; not the REPA encoder)",
        ]


def _judge(
    images_dir: Path,
    samples: np.ndarray,
    opts: DemoOptions,
    resolution: int,
    train: tuple[np.ndarray, np.ndarray],
) -> Judgement:
    """Train the classifier on the held-out split (cached in the folder) and label ``samples``;
    ``train``: the real training images and labels (already loaded for the real grid), its ceiling."""
    import torch

    from repa.classifier import SampleClassifier, accuracy, train_classifier

    cache = images_dir.parent / "classifier.pt"
    train_x, train_y = train
    if cache.exists():
        model = SampleClassifier(opts.classes)
        model.load_state_dict(torch.load(cache, weights_only=True))
    else:
        held_x, held_y = _load_real(images_dir, "t10k", resolution)
        model, _ = train_classifier(held_x, held_y, opts.classes, seed=opts.seed)
        torch.save(model.state_dict(), cache)
    sample_labels = np.arange(len(samples)) % opts.classes  # repa sample's class_balanced order
    return Judgement(
        accuracy=accuracy(model, samples, sample_labels),
        samples=len(samples),
        chance=1.0 / opts.classes,
        real_accuracy=accuracy(model, train_x, train_y),
        real_images=len(train_x),
        held_out_images=HELD_OUT_PER_CLASS * opts.classes,
    )


class _TrainProgress(logging.Handler):
    """One progress line for `repa train` (step, loss, ETA) from the trainer's per-step log records.

    The demo keeps repa's INFO logs off unless --verbose; this shows the longest stage moving anyway:
    rewritten in place on a terminal, else a line every ~10% of the steps. Other records of WARNING
    and above go on to the root handlers as before.
    """

    def __init__(self, total: int) -> None:
        super().__init__(logging.INFO)
        self.total, self.t0, self.shown = total, time.monotonic(), 0
        self.tty = sys.stdout.isatty()

    def emit(self, record: logging.LogRecord) -> None:
        args = record.args if isinstance(record.args, tuple) else ()
        if not (record.msg.startswith("step ") and len(args) >= 6):
            if record.levelno >= logging.WARNING:
                logging.getLogger().handle(record)
            return
        step, loss = int(args[0]), float(args[5])
        done = step >= self.total
        if not (self.tty or done or step - self.shown >= max(1, self.total // 10)):
            return
        self.shown = step
        elapsed = time.monotonic() - self.t0
        eta = elapsed / max(step, 1) * (self.total - step)
        line = f"  step {step:>5d}/{self.total}  loss {loss:.4f}  elapsed {elapsed:4.0f} s  ETA {eta:4.0f} s"
        print(f"\r{line}" if self.tty else line, end="\n" if done or not self.tty else "", flush=True)


@contextlib.contextmanager
def _train_progress(total: int, verbose: bool) -> Iterator[None]:
    """Route the trainer's step records to a _TrainProgress line while the train stage runs."""
    if verbose:  # the INFO logs themselves are shown
        yield
        return
    trainer_log = logging.getLogger("repa.train.metrics")  # the step lines (MetricsProcessor)
    handler = _TrainProgress(total)
    level, propagate = trainer_log.level, trainer_log.propagate
    trainer_log.addHandler(handler)
    trainer_log.setLevel(logging.INFO)
    trainer_log.propagate = False
    try:
        yield
    finally:
        trainer_log.removeHandler(handler)
        trainer_log.setLevel(level)
        trainer_log.propagate = propagate


def _reference_stats(cfg: Any, out_url: str, max_images: int, progress: bool) -> None:
    """What `repa eval ref-stats --max-images N` does (same functions), plus a progress bar."""
    from tqdm.auto import tqdm

    from repa.eval.features import build_extractor
    from repa.eval.refstats import compute_reference_stats, iter_dataset_images, save_reference_stats
    from repa.runtime import resolve_device

    extractor = build_extractor(cfg, resolve_device(cfg.train.device))
    bar = tqdm(total=max_images, unit="img", desc="reference", disable=not progress, file=sys.stderr)

    def batches() -> Iterator[Any]:
        for batch in iter_dataset_images(cfg.data.url, 20, max_images):
            yield batch
            bar.update(len(batch))

    with bar:
        ref = compute_reference_stats(batches(), extractor, batch_size=20, keep_features=max_images)
    save_reference_stats(out_url, ref)


def _claim_output(out: Path, opts: DemoOptions) -> None:
    """Make ``out`` this demo's folder: refuse foreign folders and folders made with other options."""
    marker = out / MARKER
    identity = opts.identity()
    if out.exists() and any(out.iterdir()):
        if not marker.exists():
            raise DemoError(
                f"--out {out}: exists and is not a `repa demo` output folder (no {MARKER}); "
                "choose another --out (the demo never deletes folders it did not make)"
            )
        previous = json.loads(marker.read_text()).get("options", {})
        if opts.fresh:
            shutil.rmtree(out)
        elif previous != identity:
            changed = sorted(k for k in set(previous) | set(identity) if previous.get(k) != identity.get(k))
            raise DemoError(
                f"--out {out}: holds a demo made with other options ({', '.join(changed)}); "
                "add --fresh to start over there, or choose another --out"
            )
    out.mkdir(parents=True, exist_ok=True)
    marker.write_text(json.dumps({"options": identity}, indent=1, sort_keys=True) + "\n")


def run_demo(opts: DemoOptions) -> DemoResult:
    """Run every stage (see the module docstring); returns where everything went.

    Reruns into the same folder with the same options reuse finished work: every verb is idempotent.
    """
    opts.check()
    threads = choose_threads(opts.threads)
    with _limits(threads, opts.verbose):
        return _run_demo(opts, threads)


def _run_demo(opts: DemoOptions, threads: int) -> DemoResult:
    from repa import checkpoint as ckpt
    from repa.config import load_config
    from repa.eval.sample_set import SampleSet

    out = Path(opts.out).resolve()
    stages = _Stages(8)
    stages("Output folder, run config and weights")
    inception = opts.inception_weights or str(out / "weights" / RANDOM_INCEPTION_NAME)
    cfg = load_config("toy-cpu", demo_overrides(opts, out, inception))  # validated before any write
    _claim_output(out, opts)
    config_path = out / "config.yaml"
    config_path.write_text(
        "# Written by `repa demo`: the toy-cpu preset plus the demo's overrides. Re-run any step with\n"
        f"# `repa <verb> --config {config_path}`.\n" + cfg.to_yaml()
    )
    lines, random_parts = _weights_report(opts, inception)
    print("\n".join(lines))
    if not opts.inception_weights and not Path(inception).exists():
        make_random_inception_weights(inception)
    print(f"  config     {_shown(config_path)}")
    print(f"  threads    {threads} (--threads; default: the CPU cores not already busy)")
    res, config = cfg.data.resolution, ("--config", str(config_path))
    quiet = () if opts.progress else ("--no-progress",)

    n_images = opts.classes * opts.images_per_class
    names = fashion_mnist.CLASS_NAMES[: opts.classes]
    stages(f"Real images: Fashion-MNIST, {opts.classes} classes x {opts.images_per_class} training images")
    images = out / "images"
    source = _write_real_images(images, opts)
    print(f"  {', '.join(names)}")
    print(f"  from {source.describe()} -> {_shown(images)}/ (IDX files)")
    print(f"  + {HELD_OUT_PER_CLASS} held-out test images per class, for the judge only (stage 8)")

    stages("repa prepare images + latents: shards on local disk")
    per_shard = str(max(8, -(-n_images // 8)))  # ~8 shards, each holding every class
    _verb(
        "prepare",
        "images",
        str(images),
        cfg.data.url,
        "--resolution",
        str(res),
        "--samples-per-shard",
        per_shard,
        *quiet,
    )
    latents = ["prepare", "latents", cfg.data.url, "--vae", cfg.vae.name, "--device", opts.device, *quiet]
    if cfg.vae.weights_url:
        latents += ["--vae-weights-url", cfg.vae.weights_url]
    _verb(*latents)

    every = cfg.checkpoint.every_steps
    stages(f"repa train: {opts.steps} steps of a tiny SiT + REPA, a checkpoint every {every}")
    with _train_progress(opts.steps, opts.verbose):
        _verb("train", *config)

    stages(f"FID reference statistics of {opts.ref_images} prepared images (Inception)")
    ref_path = out / "ref-stats.npz"
    if not ref_path.exists():
        _reference_stats(cfg, str(ref_path), opts.ref_images, opts.progress)
    print(f"  {_shown(ref_path)}")

    stages("repa watch --once: sample and score every committed checkpoint")
    _verb("watch", "--once", *config, *quiet)

    stages(f"repa sample: {opts.grid_per_class} images per class for the sample grid")
    grid_url = _url(out / "grid-samples")
    grid = [
        f"sample.num_samples={opts.grid_per_class * opts.classes}",
        "sample.num_steps=32",
        "sample.cfg_scale=5.0",  # strong guidance, over the whole trajectory: measured +16 points of
        "sample.guidance_high=1.0",  # classifier accuracy over cfg 3.0 in [0, 0.7] for this tiny model
    ]
    _verb("sample", *config, "--output", grid_url, *quiet, *[a for s in grid for a in ("--set", s)])
    samples = np.concatenate(list(SampleSet.open(grid_url).iter_images()))  # (N, R, R, 3), label = i mod C
    scale = max(1, 128 // res)
    grid_png, real_png = out / "samples-grid.png", out / "real-grid.png"
    _grid(samples, opts.classes, scale).save(grid_png)
    real_x, real_y = _load_real(images, "train", res)
    _grid(_grid_layout(real_x, real_y, opts.classes, opts.grid_per_class), opts.classes, scale).save(real_png)

    stages("Judge: an independent classifier, trained on held-out real images, labels the samples")
    judge = _judge(images, samples, opts, res, (real_x, real_y))
    print("\n".join(judge.lines()))
    seconds = stages.end()

    run_dir = out / "run"
    committed, _ = ckpt.list_checkpoints(cfg.storage.run_url)
    results = {}
    for path in sorted((run_dir / "eval").glob("step-*/result-*.json")):
        results[int(path.parent.name.removeprefix("step-"))] = json.loads(path.read_text())
    result = DemoResult(
        out=out,
        config_path=config_path,
        run_dir=run_dir,
        checkpoints=[r.step for r in committed],
        results=results,
        grid_png=grid_png,
        real_grid_png=real_png,
        seconds=seconds,
        random_weights=random_parts,
        judge=judge,
    )
    print("\n".join(summary_lines(result)), flush=True)
    return result


def _shown(path: Path) -> str:
    """``path`` relative to the working directory when inside it (shorter to copy), else absolute."""
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def tensorboard_command(logdir: Path) -> str:
    """The command that serves ``logdir``: this environment's tensorboard (e.g. .venv/bin/tensorboard)."""
    exe = Path(sys.executable).parent / "tensorboard"
    return f"{_shown(exe) if exe.exists() else 'tensorboard'} --logdir {_shown(logdir)}"


def summary_lines(r: DemoResult) -> list[str]:
    """What the demo made and where (printed at the end)."""
    rows = [
        (f"{_shown(r.out / 'images')}/", "the real images (Fashion-MNIST IDX files: train + held-out)"),
        (f"{_shown(r.out / 'data')}/", "prepared shards + manifest.json (`repa prepare`)"),
        (_shown(r.config_path), "the run config: `repa <verb> --config` it to re-run a step"),
        (f"{_shown(r.run_dir)}/checkpoints/", f"committed checkpoints, steps {r.checkpoints}"),
        (f"{_shown(r.run_dir)}/eval/", "the watcher's result JSON per checkpoint"),
        (f"{_shown(r.tensorboard_dir)}/", "TensorBoard: losses, sample grids; eval/: FID"),
        (_shown(r.grid_png), "generated samples, one column per class"),
        (_shown(r.real_grid_png), "training images in the same layout"),
    ]
    width = max(len(p) for p, _ in rows)
    lines = ["", f"Demo finished in {r.seconds:.0f} s. Outputs:"]
    lines += [f"  {p:<{width}}  {what}" for p, what in rows]
    if r.judge is not None:
        lines += ["", f"Samples ({_shown(r.grid_png)}):", *r.judge.lines(), f"  Expect: {EXPECT}"]
    if r.results:
        lines.append("")
        for step, res in sorted(r.results.items()):
            label = res.get("score_label") or f"{res.get('metric_name', 'FD')} ({res['num_samples']} samples)"
            lines.append(f"  step {step:>6d}: {label} {res['fid']:.2f}")  # repa.eval.report.score_label
    if r.random_weights:
        lines += [
            "",
            f"RANDOM weights were used for: {', '.join(r.random_weights)}"
            + (" (so the FID values are meaningless)" if "Inception" in r.random_weights else "")
            + ". Real ones: see `repa demo --help`.",
        ]
    from repa.eval.report import tensorboard_hint

    lines += [
        "",
        "Open TensorBoard:",
        f"  {tensorboard_command(r.tensorboard_dir)}",
        f"  {tensorboard_hint()}",
    ]
    return lines


# ----------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    d = DemoOptions()
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.description = (
        "Run the whole pipeline on this machine, offline: real images (Fashion-MNIST, shipped with repa), "
        "prepare shards, train a tiny class-conditional SiT + REPA with TensorBoard logs and checkpoints, "
        "score every checkpoint with the watcher (FD), write a sample grid, and have an independent "
        "classifier say how many samples look like their class. A few minutes on a laptop CPU."
    )
    parser.epilog = (
        "Real weights (local paths or s3://, gs://, ... URLs; repa never downloads any):\n"
        "  --encoder-weights    DINOv2 ViT-B/14 file (timm or original)  -> encoder.weights_urls\n"
        "  --vae-weights        diffusers sd-vae-ft-mse folder           -> vae.name, vae.weights_url\n"
        "  --inception-weights  weights-inception-2015-12-05-6726825d.pth -> eval.inception_weights_url\n"
        "Without them the demo uses random weights and says so. With a real encoder the images are\n"
        "256 px (DINOv2 needs >= 256), which is slow on a CPU: add --device cuda where there is a GPU."
    )
    g = parser.add_argument_group("output")
    g.add_argument("--out", default=d.out, metavar="DIR", help=f"output folder (default ./{d.out})")
    g.add_argument("--fresh", action="store_true", help="delete an earlier demo in --out first")
    g.add_argument("--no-progress", action="store_true", help="no progress bars")
    g.add_argument("--verbose", action="store_true", help="show the verbs' INFO logs")
    g = parser.add_argument_group("size")
    sizes = [
        ("--classes", d.classes, f"Fashion-MNIST classes, 1-{len(fashion_mnist.CLASS_NAMES)}"),
        ("--images-per-class", d.images_per_class, "training images per class"),
        ("--steps", d.steps, "training steps"),
        ("--batch-size", d.batch_size, "global batch"),
        ("--eval-samples", d.eval_samples, "samples per FID"),
        ("--ref-images", d.ref_images, "images in the FID reference statistics"),
        ("--grid-per-class", d.grid_per_class, "rows of the sample grid"),
        ("--seed", d.seed, "seed of the data set and the run"),
    ]
    for flag, default, text in sizes:
        g.add_argument(flag, type=int, default=default, metavar="N", help=f"{text} (default {default})")
    g.add_argument("--lr", type=float, default=d.lr, metavar="LR", help=f"learning rate (default {d.lr})")
    g.add_argument(
        "--resolution", type=int, metavar="PX", help="image side (default 16; 256 with --encoder*)"
    )
    g.add_argument(
        "--checkpoint-every", type=int, metavar="N", help="steps between checkpoints (default steps/2)"
    )
    g.add_argument("--device", default=d.device, help="cpu (default), cuda, cuda:N or mps")
    g.add_argument(
        "--threads", type=int, metavar="N", help="CPU threads (default: the cores not already busy)"
    )
    g = parser.add_argument_group("real weights and config")
    g.add_argument(
        "--encoder",
        metavar="NAME",
        help=f"registered encoder (default {DEFAULT_ENCODER} with --encoder-weights)",
    )
    g.add_argument("--encoder-weights", metavar="URL", help="target encoder weights -> encoder.weights_urls")
    g.add_argument("--vae-weights", metavar="URL", help="SD-VAE, a diffusers folder -> vae.weights_url")
    g.add_argument(
        "--inception-weights", metavar="URL", help="FID Inception-v3 -> eval.inception_weights_url"
    )
    g.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="any run-config override, applied last (repeatable), e.g. --set model.depth=6",
    )


def options_from_args(args: argparse.Namespace) -> DemoOptions:
    names = {f.name for f in dataclasses.fields(DemoOptions)}
    values = {k: v for k, v in vars(args).items() if k in names}
    return DemoOptions(**values, progress=not args.no_progress)


def run(args: argparse.Namespace) -> int:
    """`repa demo`: exit 0 when every stage succeeded, 2 with a one-line message otherwise."""
    from repa.config import ConfigError

    try:
        run_demo(options_from_args(args))
    except (DemoError, ConfigError) as e:
        print(f"repa demo: error: {e}", file=sys.stderr)
        return 2
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m repa.demo [options]``: the same as ``repa demo``."""
    import logging

    parser = argparse.ArgumentParser(prog="repa demo")
    add_arguments(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
