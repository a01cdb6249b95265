"""`repa demo` end to end at a tiny size: every stage runs the product's verbs and leaves its output.

One demo run (4 Fashion-MNIST classes x 8 images, 8 training steps, checkpoints at 4 and 8, FD on 4
samples with the random-weights Inception, the judge trained on 4 x 150 held-out images) is shared by the
tests of this module; it takes ~30 s on one core.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from repa import checkpoint as ckpt
from repa import fashion_mnist
from repa.classifier import SampleClassifier
from repa.config import load_config
from repa.demo import HELD_OUT_PER_CLASS, RANDOM_INCEPTION_NAME, DemoOptions, demo_overrides
from repa.demo import main as demo_main
from repa.tensorboard import read_scalars

CLASSES, PER_CLASS, GRID_ROWS, RESOLUTION = 4, 8, 2, 16
TINY = [
    *("--classes", str(CLASSES), "--images-per-class", str(PER_CLASS)),
    *("--steps", "8", "--checkpoint-every", "4", "--batch-size", "8"),
    *("--eval-samples", "4", "--ref-images", "8", "--grid-per-class", str(GRID_ROWS)),
    *("--threads", "1", "--no-progress"),
]


def _run(out: Path, *extra: str) -> tuple[int, str, str]:
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        code = demo_main(["--out", str(out), *TINY, *extra])
    return code, stdout.getvalue(), stderr.getvalue()


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> tuple[Path, str]:
    out = tmp_path_factory.mktemp("demo") / "demo-output"
    code, stdout, stderr = _run(out)
    assert code == 0, stderr[-4000:]
    return out, stdout


def test_demo_commits_checkpoints_and_the_watcher_scores_each_with_fid(demo):
    out, _ = demo
    committed, partial = ckpt.list_checkpoints(f"file://{out}/run")
    assert [r.step for r in committed] == [4, 8] and partial == []
    results = {p.parent.name: json.loads(p.read_text()) for p in (out / "run" / "eval").glob("step-*/*.json")}
    assert sorted(results) == ["step-0000004", "step-0000008"]
    for result in results.values():
        assert result["metric_name"] == "FD" and math.isfinite(result["fid"]) and result["fid"] >= 0
        assert result["num_samples"] == 4
        # The random Inception is named as such in the result's protocol, never passed off as real.
        assert RANDOM_INCEPTION_NAME in result["protocol"]["feature_extractor"]["weights_url"]


def test_demo_logs_losses_and_fid_to_tensorboard(demo):
    out, _ = demo
    train = read_scalars(f"file://{out}/run/tensorboard")
    assert [s for s, _ in train["train/loss"]][-1] == 8
    assert all(math.isfinite(v) for _, v in train["train/loss"])
    fid = read_scalars(f"file://{out}/run/tensorboard/eval")
    assert [s for s, _ in fid["eval/fd_unpublished_inception"]] == [4, 8]  # the demo's Inception is random


def test_demo_writes_a_sample_grid_with_one_column_per_class(demo):
    out, _ = demo
    scale = 128 // RESOLUTION
    for name in ("samples-grid.png", "real-grid.png"):
        with Image.open(out / name) as image:
            size = image.size
            pixels = np.asarray(image.convert("RGB"))
        assert size == ((CLASSES * (RESOLUTION + 2) + 2) * scale, (GRID_ROWS * (RESOLUTION + 2) + 2) * scale)
        assert pixels.std() > 5, f"{name} is (nearly) uniform"


def test_demo_leaves_a_config_that_reruns_its_steps(demo):
    out, _ = demo
    cfg = load_config(str(out / "config.yaml"))
    assert cfg.data.url == f"file://{out}/data" and cfg.storage.run_url == f"file://{out}/run"
    assert cfg.model.num_classes == CLASSES and cfg.train.max_steps == 8
    assert Path(cfg.eval.inception_weights_url).name == RANDOM_INCEPTION_NAME
    assert (out / "data" / "manifest.json").exists()
    images, labels = fashion_mnist.load_split(out / "images", "train")
    assert (
        images.shape == (CLASSES * PER_CLASS, 28, 28)
        and np.bincount(labels).tolist() == [PER_CLASS] * CLASSES
    )
    _, held_labels = fashion_mnist.load_split(out / "images", "t10k")
    assert np.bincount(held_labels).tolist() == [HELD_OUT_PER_CLASS] * CLASSES


def test_demo_judges_its_samples_with_a_classifier_that_is_not_the_repa_encoder(demo):
    out, stdout = demo
    judge = torch.load(out / "classifier.pt", weights_only=True)
    assert judge.keys() == SampleClassifier(CLASSES).state_dict().keys()  # the judge's own small CNN
    encoder_kwargs = load_config(str(out / "config.yaml")).encoder.model_kwargs[0]
    assert encoder_kwargs["embed_dim"] == 64 and "features.0.0.weight" in judge  # a ViT vs a CNN
    summary = stdout[stdout.index("Samples (") :]
    line = next(x for x in summary.splitlines() if "classifier accuracy of the" in x)
    assert f"of the {CLASSES * GRID_ROWS} generated samples" in line and "(chance 25%;" in line
    assert "Expect:" in summary and "samples-grid.png" in summary.splitlines()[0]


def test_demo_shows_training_progress_without_verbose(demo):
    _, stdout = demo
    train = stdout[stdout.index("repa train:") : stdout.index("FID reference statistics")]
    assert "step     8/8  loss" in train and "ETA" in train


def test_demo_says_which_weights_are_random_and_how_to_open_tensorboard(demo):
    _, stdout = demo
    assert "RANDOM weights were used for: encoder, Inception" in stdout
    for flag in ("--encoder-weights", "--vae-weights", "--inception-weights"):
        assert flag in stdout
    assert f"tensorboard --logdir {demo[0] / 'run' / 'tensorboard'}" in stdout


def test_rerunning_the_demo_reuses_finished_work(demo):
    out, _ = demo
    # Checkpoints, the watcher's samples and results, the grid's samples (train rewrites config.yaml and
    # opens a TensorBoard writer on every start, so those are not compared).
    watched = [
        p
        for d in ("run/checkpoints", "run/samples", "run/eval", "grid-samples")
        for p in (out / d).rglob("*")
    ]
    before = {p: p.stat().st_mtime_ns for p in watched if p.is_file()}
    assert len(before) > 6
    code, stdout, stderr = _run(out)
    assert code == 0, stderr[-4000:]
    assert "0 checkpoint(s) handled" in stdout  # the watcher found every checkpoint already scored
    after = {p: p.stat().st_mtime_ns for p in before}
    assert after == before, "a rerun must not retrain, resample or rescore"


def test_other_options_never_overwrite_an_earlier_demo(demo):
    out, _ = demo
    code, _, stderr = _run(out, "--steps", "9")
    assert code == 2 and "other options (steps)" in stderr and "--fresh" in stderr
    assert [r.step for r in ckpt.list_checkpoints(f"file://{out}/run")[0]] == [4, 8]


def test_a_folder_the_demo_did_not_make_is_never_used_or_deleted(tmp_path):
    (tmp_path / "precious.txt").write_text("keep me")
    code, _, stderr = _run(tmp_path, "--fresh")
    assert code == 2 and "not a `repa demo` output folder" in stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["precious.txt"]


def test_bad_options_fail_before_anything_is_written(tmp_path):
    out = tmp_path / "out"
    code, _, stderr = _run(out, "--classes", "11")
    assert code == 2 and "--classes" in stderr
    code, _, stderr = _run(out, "--ref-images", "1000")
    assert code == 2 and "--ref-images" in stderr
    assert not out.exists()


def test_real_weight_flags_land_in_the_config_and_keep_token_grids_equal(tmp_path):
    """With weights given the same command does the real thing: the files go into the config keys
    the verbs read, and SiT's token grid is sized to the encoder's (REPA aligns token j with j)."""
    opts = DemoOptions(
        encoder="dinov2-vit-s",
        encoder_weights=None,  # a registered encoder, random weights: no file needed for the geometry
        vae_weights="/weights/sd-vae-ft-mse",
        inception_weights="s3://bucket/pt_inception.pth",
    )
    cfg = load_config("toy-cpu", demo_overrides(opts, tmp_path, opts.inception_weights))
    assert cfg.encoder.names == ["dinov2-vit-s"] and cfg.encoder.model_kwargs == []
    assert (cfg.vae.name, cfg.vae.weights_url, cfg.vae.latents_scale) == (
        "sd-vae-ft-mse",
        "/weights/sd-vae-ft-mse",
        0.18215,
    )
    assert cfg.eval.inception_weights_url == "s3://bucket/pt_inception.pth"
    assert cfg.data.resolution == 256  # DINOv2's preprocessing needs >= 256 px
    latent_side = 256 // 8
    assert (latent_side // cfg.model.patch_size) ** 2 == 256  # = DINOv2's 16 x 16 patch tokens at 256 px

    pixels = load_config("toy-cpu", demo_overrides(DemoOptions(), tmp_path, "/x.pth"))
    assert pixels.vae.name == "none"
    assert pixels.data.resolution == 16 and pixels.train.global_batch_size == 64
    side = 16 // pixels.model.patch_size
    assert side**2 == 16 and pixels.encoder.model_kwargs[0]["patch_size"] == 16 // side


def test_demo_is_a_repa_verb():
    from repa.cli import COMMANDS

    assert "demo" in COMMANDS, "add the demo to repa.cli.COMMANDS (`repa demo`, `make demo`)"


@pytest.fixture(autouse=True)
def _restore_threads():
    before = torch.get_num_threads()
    yield
    assert torch.get_num_threads() == before, "the demo must restore torch's thread count"
