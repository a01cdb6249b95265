"""The GPU A/B (helm/repa/ab/, docs/ab-test.md) checked on a CPU: both values files render and validate,
both arms train 2 steps at toy size with everything else as written, and `python -m repa.ab_compare`
compares the two toy runs' score-vs-step curves (scored by `repa watch` with a tiny feature extractor)."""

from __future__ import annotations

import contextlib
import io
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from repa.ab_compare import main as compare_main
from repa.cli import main as repa
from repa.config import load_config
from repa.data.prepare import prepare_images, prepare_latents
from repa.fashion_mnist import find
from tests.support.tiny_features import FEATS

CHART = Path(__file__).resolve().parents[2] / "helm" / "repa"
AB = CHART / "ab"


def _helm() -> str:
    """helm as scripts/install-tools.sh installs it (the venv's bin/), else from PATH."""
    path = Path(sys.executable).parent / "helm"
    found = str(path) if path.exists() else shutil.which("helm")
    assert found, "helm: not installed; run scripts/install-tools.sh (make tools)"
    return found


ARMS = ("repa", "vanilla")


def _config(arm: str, folder: Path) -> Path:
    values = yaml.safe_load((AB / f"{arm}.yaml").read_text())
    path = folder / f"{arm}.yaml"
    path.write_text(yaml.safe_dump(values["config"]))
    return path


def test_the_arms_differ_only_in_the_alignment_keys(tmp_path):
    a, b = (load_config(str(_config(arm, tmp_path))).to_dict() for arm in ARMS)
    differ = {
        f"{section}.{key}"
        for section in a
        for key in set(a[section]) | set(b[section])
        if a[section].get(key) != b[section].get(key)
    }
    assert differ == {
        "model.encoder_depth",  # projector_dim: 2048 in both (the default), unused in vanilla
        "encoder.names",
        "encoder.weights_urls",
        "objective.proj_coeff",
        "storage.run_url",
    }
    cfg = load_config(str(_config("repa", tmp_path)))
    assert (cfg.model.name, cfg.train.global_batch_size, cfg.train.max_steps) == ("SiT-B/2", 256, 400_000)
    assert (cfg.model.encoder_depth, cfg.encoder.names, cfg.objective.proj_coeff) == (
        4,
        ["dinov2-vit-b"],
        0.5,
    )
    assert (cfg.sample.sampler, cfg.sample.num_steps, cfg.sample.cfg_scale, cfg.sample.num_samples) == (
        "sde",
        250,
        1.0,
        50_000,
    )


@pytest.mark.parametrize("arm", ARMS)
def test_each_values_file_renders_and_its_config_validates(arm, tmp_path):
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert repa(["config", "validate", "--config", str(_config(arm, tmp_path))]) == 0
    values = ["-f", str(AB / f"{arm}.yaml"), "--set", "image.repository=registry.example.com/repa"]
    proc = subprocess.run(
        [_helm(), "template", f"sit-b-2-{arm}", str(CHART), *values], capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr
    rendered = proc.stdout
    docs = [d for d in yaml.safe_load_all(rendered) if d]
    config_maps = [d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"].endswith("-config")]
    assert len(config_maps) == 1
    rendered_config = yaml.safe_load(config_maps[0]["data"]["config.yaml"])
    assert rendered_config["storage"]["run_url"] == f"s3://repa-ab/runs/sit-b-2-{arm}"
    assert any(d["kind"] in ("TrainJob", "PyTorchJob") for d in docs)


TOY = [
    "model.hidden_size=32",
    "model.depth=2",
    "model.num_heads=2",
    "model.encoder_depth=1",  # must fit depth 2 even where unused (vanilla)
    "model.num_classes=10",
    "vae.name=none",
    "vae.weights_url=null",
    "vae.latents_scale=1.0",
    "data.resolution=16",
    "data.num_workers=0",
    "data.chunk_size=2",
    "train.global_batch_size=4",
    "train.max_steps=2",
    "train.precision=fp32",
    "train.device=cpu",
    "checkpoint.every_steps=1",
    "checkpoint.keep_latest=3",
    "checkpoint.keep_every_steps=0",
    "log.every_steps=1",
    "log.sample_every_steps=0",
    "sample.num_steps=2",
    "sample.num_samples=4",
    "sample.batch_size_per_device=4",
    "eval.metrics=[fid]",
    "eval.inception_weights_url=null",
    f"eval.feature_extractor={FEATS}",
    "eval.watch_every_nth=1",
]
TOY_REPA = [  # the tiny random timm ViT instead of DINOv2-B; the token grids match (8x8)
    "model.projector_dim=64",
    "encoder.names=[timm:vit_tiny_patch16_224]",
    "encoder.weights_urls=[null]",
    "encoder.model_kwargs=[{img_size: 16, patch_size: 2, embed_dim: 32, depth: 1, num_heads: 2}]",
]


def test_both_arms_train_two_steps_at_toy_size_and_the_compare_command_reads_them(tmp_path, feats, reference):
    data = f"file://{tmp_path}/data"
    prepare_images(
        str(find(prefer_subset=True).folder), data, resolution=16, max_per_class=2, samples_per_shard=10
    )
    prepare_latents(data, vae="none")
    runs = {}
    for arm in ARMS:
        runs[arm] = f"file://{tmp_path}/runs/{arm}"
        sets = [
            *TOY,
            *(TOY_REPA if arm == "repa" else []),
            f"data.url={data}",
            f"storage.run_url={runs[arm]}",
        ]
        sets.append(f"eval.reference_stats_url={reference}")
        args = ["--config", str(_config(arm, tmp_path)), *[a for s in sets for a in ("--set", s)]]
        assert repa(["train", *args]) == 0, arm
        with contextlib.redirect_stdout(io.StringIO()):
            assert repa(["watch", "--once", *args, "--no-progress"]) == 0, arm
        results = sorted((tmp_path / "runs" / arm / "eval").glob("step-*/result-*.json"))
        assert [json.loads(p.read_text())["num_samples"] for p in results] == [4, 4]

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert compare_main([runs["repa"], runs["vanilla"], "--csv", str(tmp_path / "ab.csv")]) == 0
    report = out.getvalue()
    assert "4 samples vs training step" in report and runs["repa"] in report
    rows = [line.split() for line in report.splitlines() if line.strip().startswith(("1 ", "2 "))]
    assert [r[0] for r in rows] == ["1", "2"] and all(len(r) == 5 for r in rows)
    assert (tmp_path / "ab.csv").read_text().splitlines()[0] == "step,a,b"


def test_the_compare_command_names_a_run_without_results(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert compare_main([f"file://{tmp_path}/empty", f"file://{tmp_path}/empty"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no evaluation results" in err and str(tmp_path / "empty") in err
