"""`repa eval` and `repa eval ref-stats` end to end: prepared shards -> reference statistics ->
samples of a committed checkpoint -> metrics -> result JSON + TensorBoard scalars.

Most tests use a tiny random conv network as the feature extractor (G's FeatureExtractor protocol,
reported as FD_tiny-conv); one test runs the real Inception path with random weights.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from repa.config import RunConfig
from repa.data import format as fmt
from repa.eval import sample as S
from repa.eval.features import INCEPTION_NAME, InceptionFeatureExtractor
from repa.eval.provenance import ALL_FIELDS
from repa.eval.refstats import compute_reference_stats, load_reference_stats, save_reference_stats
from repa.tensorboard import read_scalars
from tests.support.tiny_features import FEATS
from tests.support.tiny_runs import commit_tiny_checkpoint as commit_checkpoint
from tests.support.tiny_runs import tiny_run_config

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_config(run_url: str, reference_stats_url: str | None = None, **sample) -> dict:
    return tiny_run_config(
        run_url,
        sample={"num_samples": 12, "num_steps": 4, "batch_size_per_device": 6, **sample},
        eval={"reference_stats_url": reference_stats_url},
    )


def write_config(path: Path, tree: dict) -> str:
    path.write_text(yaml.safe_dump(tree))
    return str(path)


def random_images(n: int, size: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def write_dataset(root: Path, images: np.ndarray, per_shard: int = 10) -> str:
    """A prepared dataset (manifest + tar shards of PNGs) as `repa prepare` writes it."""
    root.mkdir(parents=True)
    shards = []
    for i, start in enumerate(range(0, len(images), per_shard)):
        samples = [
            fmt.Sample(key=fmt.sample_key(j), png=fmt.encode_png(images[j]), label=j % 3, moments=None)
            for j in range(start, min(start + per_shard, len(images)))
        ]
        data = fmt.write_shard(samples)
        (root / fmt.shard_name(i)).write_bytes(data)
        shards.append(fmt.ShardInfo(fmt.shard_name(i), start, len(samples), len(data), fmt.sha256_hex(data)))
    manifest = fmt.Manifest(resolution=images.shape[1], class_names=("a", "b", "c"), shards=tuple(shards))
    (root / fmt.MANIFEST_NAME).write_text(manifest.validate().to_json())
    return str(root)


def tiny_run_with_reference(tmp_path: Path, size: int = 16, **sample) -> tuple[str, str, str]:
    """A run whose reference statistics are the tiny network's over 20 random images of ``size`` px,
    with step 100 committed: ``(run_url, ref_url, cfg_path)``."""
    ref_url = str(tmp_path / f"ref{size}.npz")
    save_reference_stats(
        ref_url, compute_reference_stats(random_images(20, size), __import__("repa_test_feats").build())
    )
    run_url = str(tmp_path / "run")
    cfg_path = write_config(tmp_path / "cfg.yaml", tiny_config(run_url, ref_url, **sample))
    commit_checkpoint(RunConfig.from_dict(tiny_config(run_url, ref_url, **sample)), 100)
    return run_url, ref_url, cfg_path


def cli(*argv: str) -> int:
    from repa.cli import main

    return main(list(argv))


def test_ref_stats_from_shards_then_eval_writes_result_json_and_tensorboard(tmp_path, feats, capsys):
    data_url = write_dataset(tmp_path / "data", random_images(24, 16))
    ref_url = str(tmp_path / "ref.npz")
    run_url = str(tmp_path / "run")
    cfg_path = write_config(tmp_path / "cfg.yaml", tiny_config(run_url, ref_url))
    assert (
        cli(
            "eval",
            "ref-stats",
            "--config",
            cfg_path,
            "--data-url",
            data_url,
            "--out",
            ref_url,
            "--feature-extractor",
            FEATS,
        )
        == 0
    )
    ref = load_reference_stats(ref_url)
    assert ref.num_images == 24 and ref.image_size == (16, 16) and ref.features.shape == (24, 16)
    assert ref.feature_extractor == "tiny-conv"

    cfg = RunConfig.from_dict(tiny_config(run_url, ref_url))
    commit_checkpoint(cfg, 100)
    argv = ("eval", "--config", cfg_path, "--feature-extractor", FEATS, "--chunk-size", "4", "--no-progress")
    assert cli(*argv) == 0
    (result_file,) = Path(run_url, "eval", "step-0000100").glob("result-*.json")
    result = json.loads(result_file.read_text())
    protocol = result["protocol"]
    assert result["metric_name"] == "FD_tiny-conv" and result["num_samples"] == 12
    assert result["inception_score_mean"] is None  # the tiny network has no logits
    assert 0 <= result["precision"] <= 1 and 0 <= result["recall"] <= 1
    assert protocol["checkpoint"]["step"] == 100 and protocol["checkpoint"]["weights"] == "ema"
    assert protocol["sampling"] == {
        **protocol["sampling"],
        "sampler": "sde",
        "num_steps": 4,
        "cfg_scale": 1.8,
        "guidance_low": 0.0,
        "guidance_high": 0.7,
        "num_samples": 12,
        "seed": 0,
    }
    assert protocol["reference_stats"] == {"url": ref_url, "sha256": ref.sha256}
    assert protocol["code"]["repa_version"] and protocol["precision"] == "fp32"
    assert result_file.name == f"result-{protocol['digest'][:12]}.json"

    # The number is the metric of exactly the samples on storage.
    from repa.eval.metrics import score_images

    sample_set = S.SampleSet.open(protocol["samples_url"])
    extractor = __import__("repa_test_feats").build()
    direct = score_images(sample_set.iter_images(), ref, extractor, inception_score_splits=None)
    assert result["fid"] == pytest.approx(direct.fid, rel=1e-9)

    scalars = read_scalars(str(Path(run_url, "tensorboard", "eval")))
    assert [step for step, _ in scalars["eval/fd_tiny-conv"]] == [100]
    assert scalars["eval/fd_tiny-conv"][0][1] == pytest.approx(result["fid"], rel=1e-6)
    assert set(scalars) == {
        "eval/fd_tiny-conv",
        "eval/best_fd_tiny-conv",
        "eval/precision_tiny-conv",  # never Inception's eval/precision
        "eval/recall_tiny-conv",
    }

    # Idempotent: a second run finds the result and touches nothing.
    mtime = result_file.stat().st_mtime_ns
    capsys.readouterr()
    assert cli(*argv) == 0
    printed = capsys.readouterr().out
    assert "(already evaluated)" in printed
    # the printed line says what the number is and how it was made
    assert (
        printed.startswith("FD_tiny-conv (12 samples) ")
        and "[sde 4 steps, 4 NFE, cfg 1.8 on [0, 0.7], ema" in printed
    )
    assert result_file.stat().st_mtime_ns == mtime


def test_missing_reference_stats_is_a_clear_error_naming_the_url(tmp_path, feats, capsys):
    run_url = str(tmp_path / "run")
    missing = str(tmp_path / "nowhere" / "VIRTUAL_imagenet256_labeled.npz")
    cfg_path = write_config(tmp_path / "cfg.yaml", tiny_config(run_url, missing))
    commit_checkpoint(RunConfig.from_dict(tiny_config(run_url, missing)), 100)
    assert cli("eval", "--config", cfg_path, "--feature-extractor", FEATS) == 2
    err = capsys.readouterr().err
    assert f"eval.reference_stats_url: {missing} not found" in err
    assert "Traceback" not in err
    assert not Path(run_url, "samples").exists()  # failed before sampling


def test_unset_reference_stats_is_a_config_error(tmp_path, capsys):
    run_url = str(tmp_path / "run")
    cfg_path = write_config(tmp_path / "cfg.yaml", tiny_config(run_url, None))
    assert cli("eval", "--config", cfg_path) == 2
    assert "eval.reference_stats_url: required by `repa eval`" in capsys.readouterr().err


def test_reference_of_another_image_size_is_refused_before_sampling(tmp_path, feats, capsys):
    run_url, _, cfg_path = tiny_run_with_reference(tmp_path, size=32)
    assert cli("eval", "--config", cfg_path, "--feature-extractor", FEATS) == 2
    err = capsys.readouterr().err
    assert "generated images will be 16x16" in err and "are for 32x32 images" in err
    assert not Path(run_url, "samples").exists()


def test_inception_fid_and_is_end_to_end_with_random_weights(tmp_path):
    """The real torch-fidelity InceptionV3 path (random weights: FID values meaningless, code path exact)."""
    from repa.eval.features import build_inception
    from tests.support.fidelity_weights import random_inception_weights_path

    weights = random_inception_weights_path()
    ref_url = str(tmp_path / "ref.npz")
    save_reference_stats(ref_url, compute_reference_stats(random_images(10, 16), build_inception(weights)))
    run_url = str(tmp_path / "run")
    tree = tiny_config(run_url, ref_url, num_samples=10)
    tree["eval"].update(inception_weights_url=weights, metrics=["fid", "is"])
    cfg_path = write_config(tmp_path / "cfg.yaml", tree)
    commit_checkpoint(RunConfig.from_dict(tree), 200)
    assert cli("eval", "--config", cfg_path, "--chunk-size", "5", "--no-progress") == 0
    (result_file,) = Path(run_url, "eval", "step-0000200").glob("result-*.json")
    result = json.loads(result_file.read_text())
    assert result["metric_name"] == "FD" and np.isfinite(result["fid"]) and result["fid"] > 0
    balance = result["class_balance"]  # class-conditional samples: the labels' balance is recorded
    assert balance["num_samples"] == 10 and balance["num_classes"] > 1 and balance["problem"] is None
    assert result["score_label"] == "FD (unpublished Inception weights, 10 samples)"  # never "FID"
    provenance = result["provenance"]
    assert set(provenance) == set(ALL_FIELDS)
    assert provenance["sampler.nfe"] == 4 and provenance["samples.count"] == 10  # SDE: 4 steps, 4 calls
    # the conversion the decoder used: the toy run's identity decoder rounds (SD-VAE truncates)
    assert (
        provenance["uint8_conversion"]
        == "clamp(255 * (x + 1) / 2, 0, 255), rounded (identity decoder: exact round trip)"
    )
    assert provenance["reference.sha256"] == result["reference_sha256"]
    assert provenance["checkpoint.weights_sha256"] and provenance["labels.distribution"]["num_classes"] > 0
    assert provenance["extractors"] == [
        {
            "name": INCEPTION_NAME,
            "weights_sha256": result["feature_extractor_sha256"],
            "resize": InceptionFeatureExtractor.resize,
        }
    ]
    assert cli("eval", "compare", str(result_file), str(result_file)) == 0
    # IS over ADM's 10 splits; with 10 samples every split holds one image, so p(y) = p(y|x): IS = 1 exactly.
    assert result["inception_score_mean"] == pytest.approx(1.0) and result["precision"] is None
    assert result["protocol"]["feature_extractor"]["weights_url"] == weights
    assert result["feature_extractor_sha256"] == ref_sha(ref_url)
    scalars = read_scalars(str(Path(run_url, "tensorboard", "eval")))
    # random Inception weights (not the published file): the tags say so
    assert set(scalars) == {
        "eval/fd_unpublished_inception",
        "eval/best_fd_unpublished_inception",
        "eval/is_unpublished_inception",
        "eval/sfid_unpublished_inception",  # repa's Inception reference statistics carry mu_s/sigma_s
    }
    assert np.isfinite(result["sfid"]) and result["sfid"] > 0
    assert scalars["eval/fd_unpublished_inception"][0][0] == 200


def ref_sha(ref_url: str) -> str:
    return load_reference_stats(ref_url, load_images=False).feature_extractor_sha256


def test_fd_dinov2_beside_the_main_score_from_config_to_result(tmp_path, feats, monkeypatch, capsys):
    """eval.metrics fd_dinov2: `ref-stats --dinov2` from the staged weights, then `repa eval` scores
    FD-DINOv2 in the same read of the samples, labels it by the network it ran, records its provenance
    and writes its TensorBoard tag; the number is the metric of exactly the samples on storage."""
    from repa.eval.dinov2 import DINOV2_NAME, build_dinov2
    from repa.eval.metrics import MetricJob, evaluate_many
    from repa.eval.provenance import DINOV2_FIELDS
    from tests.support.tiny_dinov2 import TINY, shrink_registry_dinov2, write_tiny_dinov2

    shrink_registry_dinov2(monkeypatch)
    weights = write_tiny_dinov2(tmp_path / "weights" / "dinov2.pth")
    data_url = write_dataset(tmp_path / "data", random_images(24, 16))
    ref_url, dref_url, run_url = str(tmp_path / "ref.npz"), str(tmp_path / "dref.npz"), str(tmp_path / "run")
    tree = tiny_config(run_url, ref_url)
    plain_cfg = RunConfig.from_dict(tree)
    tree["eval"].update(
        metrics=["fid", "precision_recall", "fd_dinov2"],
        dinov2_weights_url=weights,
        dinov2_reference_stats_url=dref_url,
    )
    cfg_path = write_config(tmp_path / "cfg.yaml", tree)
    common = ("--config", cfg_path, "--data-url", data_url)
    assert cli("eval", "ref-stats", *common, "--out", ref_url, "--feature-extractor", FEATS) == 0
    assert cli("eval", "ref-stats", *common, "--out", dref_url, "--dinov2", "--keep-features", "0") == 0
    dref = load_reference_stats(dref_url, load_images=False)
    assert (
        dref.feature_extractor == DINOV2_NAME
        and dref.num_images == 24
        and dref.stats.dim == TINY["embed_dim"]
    )

    cfg = RunConfig.from_dict(tree)
    commit_checkpoint(cfg, 100)
    capsys.readouterr()
    argv = ("eval", "--config", cfg_path, "--feature-extractor", FEATS, "--chunk-size", "4", "--no-progress")
    assert cli(*argv) == 0
    printed = capsys.readouterr().out
    (result_file,) = Path(run_url, "eval", "step-0000100").glob("result-*.json")
    result = json.loads(result_file.read_text())
    label = "FD (DINOv2 code path, not ViT-L/14: ViT, 32 features, 2 blocks, patch 14)"
    assert result["dinov2"]["label"] == label and result["dinov2"]["standard"] is False
    assert f"{label} {result['fd_dinov2']:.4f}" in printed  # never called FD-DINOv2 on a tiny network
    assert result["dinov2"]["reference_sha256"] == dref.sha256 and result["dinov2"]["num_samples"] == 12

    # the same numbers as scoring the stored samples directly, both networks in one pass
    sample_set = S.SampleSet.open(result["protocol"]["samples_url"])
    main = __import__("repa_test_feats").build()
    dinov2 = build_dinov2(weights, device="cpu", model_kwargs=TINY)
    ref = load_reference_stats(ref_url)
    direct, direct_dinov2 = evaluate_many(
        sample_set.iter_images(), [MetricJob(main, ref, None, 3), MetricJob(dinov2, dref)]
    )
    assert result["fid"] == pytest.approx(direct.fid, rel=1e-9)
    assert result["fd_dinov2"] == pytest.approx(direct_dinov2.fid, rel=1e-9)

    provenance = result["provenance"]
    assert provenance["dinov2.reference.url"] == dref_url and provenance["dinov2.reference.count"] == 24
    assert provenance["dinov2.extractor"]["name"] == DINOV2_NAME
    assert provenance["dinov2.extractor"]["weights_sha256"] == dref.feature_extractor_sha256
    assert [e["name"] for e in provenance["extractors"]] == ["tiny-conv"]
    assert result["protocol"]["fd_dinov2"]["weights_url"] == weights
    scalars = read_scalars(str(Path(run_url, "tensorboard", "eval")))
    assert scalars["eval/fd_dinov2_not_vit_l14"] == [(100, pytest.approx(result["fd_dinov2"], rel=1e-6))]

    # FD-DINOv2 is part of the digest only when asked for: other evaluations keep their file names
    from repa.checkpoint import resolve_checkpoint
    from repa.eval.evaluate import plan_evaluation

    def as_run(config: RunConfig) -> RunConfig:  # the command line's --feature-extractor
        tree = config.to_dict()
        return RunConfig.from_dict({**tree, "eval": {**tree["eval"], "feature_extractor": FEATS}})

    source = resolve_checkpoint(None, run_url)
    with_dinov2 = plan_evaluation(as_run(cfg), source).identity
    without = plan_evaluation(as_run(plain_cfg), source).identity
    assert "fd_dinov2" not in without and with_dinov2["fd_dinov2"]["weights_url"] == weights
    assert {k for k in with_dinov2 if with_dinov2[k] != without.get(k)} == {"fd_dinov2", "metrics"}
    assert set(DINOV2_FIELDS) <= set(provenance)


def test_fd_dinov2_refuses_before_sampling_a_reference_of_another_network(
    tmp_path, feats, monkeypatch, capsys
):
    from tests.support.tiny_dinov2 import shrink_registry_dinov2, write_tiny_dinov2

    shrink_registry_dinov2(monkeypatch)
    ref_url, run_url = str(tmp_path / "ref.npz"), str(tmp_path / "run")
    save_reference_stats(
        ref_url, compute_reference_stats(random_images(20, 16), __import__("repa_test_feats").build())
    )
    tree = tiny_config(run_url, ref_url)
    tree["eval"].update(
        metrics=["fid", "fd_dinov2"],
        dinov2_weights_url=write_tiny_dinov2(tmp_path / "dinov2.pth"),
        dinov2_reference_stats_url=ref_url,  # the tiny-conv statistics, not DINOv2's
    )
    cfg_path = write_config(tmp_path / "cfg.yaml", tree)
    commit_checkpoint(RunConfig.from_dict(tree), 100)
    assert cli("eval", "--config", cfg_path, "--feature-extractor", FEATS) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "computed with feature extractor 'tiny-conv', not 'dinov2-vit-l-14'" in err[0]
    assert not Path(run_url, "samples").exists()  # refused before any sample was drawn


@pytest.mark.parametrize(
    ("eval_keys", "named"),
    [
        ({"metrics": ["fid", "fd_dinov2"]}, "eval.dinov2_weights_url: required by eval.metrics fd_dinov2"),
        (
            {"metrics": ["fid", "fd_dinov2"], "dinov2_weights_url": "/w.pth"},
            "eval.dinov2_reference_stats_url: required by eval.metrics fd_dinov2",
        ),
        ({"dinov2_reference_stats_url": "/d.npz"}, "eval.dinov2_reference_stats_url: set, but eval.metrics"),
    ],
)
def test_fd_dinov2_config_errors_name_the_key(tmp_path, capsys, eval_keys, named):
    tree = tiny_config(str(tmp_path / "run"), str(tmp_path / "ref.npz"))
    tree["eval"].update(eval_keys)
    assert cli("eval", "--config", write_config(tmp_path / "cfg.yaml", tree)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and named in err[0], err


def test_delete_samples_keeps_the_result_of_a_run_checkpoint_and_of_a_weights_file(tmp_path, feats, capsys):
    """--delete-samples removes the samples once scored, never the result: a weights file's result
    lives in its samples folder (a step's in {run}/eval/)."""
    import shutil

    run_url, _, cfg_path = tiny_run_with_reference(tmp_path)
    step = Path(run_url, "checkpoints", "step-0000100")
    plain = tmp_path / "plain" / "w.pt"
    plain.parent.mkdir()
    shutil.copy(step / "ema.pt", plain)
    base = ("eval", "--config", cfg_path, "--feature-extractor", FEATS, "--no-progress", "--delete-samples")
    for checkpoint in (str(step), str(plain)):
        assert cli(*base, "--checkpoint", checkpoint) == 0, capsys.readouterr().err
        printed = capsys.readouterr().out.strip()
        result = Path(printed.rsplit(" -> ", 1)[1])
        assert json.loads(result.read_text())["num_samples"] == 12
        if checkpoint == str(plain):  # the file's sha256, hashed as it was loaded
            recorded = json.loads(result.read_text())["provenance"]["checkpoint.weights_sha256"]
            assert recorded == hashlib.sha256(plain.read_bytes()).hexdigest()
        samples = Path(json.loads(result.read_text())["protocol"]["samples_url"])
        assert not (samples / "chunks").exists() and not (samples / "protocol.json").exists()
        # idempotent: the kept result is found again, nothing is sampled
        assert cli(*base, "--checkpoint", checkpoint) == 0
        assert "(already evaluated)" in capsys.readouterr().out
        assert not (samples / "chunks").exists()


@pytest.mark.parametrize(
    ("reference", "metrics", "num_samples", "named"),
    [
        ("adm", ["fid"], 12, "record no feature extractor (ADM's files: Inception's features)"),
        ("wide", ["fid"], 12, "have 32 features, tiny-conv gives 16"),
        (
            "tiny",
            ["fid", "precision_recall"],
            3,
            "sample.num_samples: 3 samples are too few for precision/recall",
        ),
    ],
)
def test_refused_before_any_sample_is_drawn(tmp_path, feats, capsys, reference, metrics, num_samples, named):
    """A reference of no recorded network (ADM's, assumed Inception) with another network, a reference
    of another feature count, too few samples for a metric: one line, and no sample folder."""
    from repa.eval.refstats import ReferenceStats

    rng = np.random.default_rng(0)
    dim = {"adm": 16, "wide": 32, "tiny": 16}[reference]
    x = rng.normal(size=(40, dim))
    ref = ReferenceStats(mu=x.mean(0), sigma=np.cov(x, rowvar=False), features=x.astype(np.float32))
    if reference != "adm":
        ref.feature_extractor, ref.num_images, ref.image_size = "tiny-conv", 40, (16, 16)
    ref_url = str(tmp_path / "ref.npz")
    save_reference_stats(ref_url, ref)
    run_url = str(tmp_path / "run")
    tree = tiny_config(run_url, ref_url, num_samples=num_samples, batch_size_per_device=3)
    tree["eval"]["metrics"] = metrics
    cfg_path = write_config(tmp_path / "cfg.yaml", tree)
    commit_checkpoint(RunConfig.from_dict(tree), 100)
    assert cli("eval", "--config", cfg_path, "--feature-extractor", FEATS) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and named in err[0], err
    assert not Path(run_url, "samples").exists()


def test_compare_of_real_evaluations_names_exactly_the_setting_changed(tmp_path, feats, capsys):
    """Issue 22: change one setting of a real (tiny) evaluation at a time; `repa eval compare` against
    the base result exits 1 naming exactly that setting (what follows from it, e.g. the NFE of another
    sampler, is shown as a consequence, not as a cause); the same settings again compare equal."""
    import shutil

    _, ref_url, cfg_path = tiny_run_with_reference(tmp_path)
    extractor = __import__("repa_test_feats").build()

    def evaluate(name: str, *sets: str) -> str:
        overrides = [a for s in sets for a in ("--set", s)]
        argv = ("eval", "--config", cfg_path, "--feature-extractor", FEATS, "--no-progress", "--force")
        assert cli(*argv, *overrides) == 0, capsys.readouterr().err
        result = capsys.readouterr().out.strip().rsplit(" -> ", 1)[1]
        kept = str(tmp_path / f"{name}.json")
        shutil.copy(result, kept)
        return kept

    base = evaluate("base")
    assert cli("eval", "compare", base, evaluate("again")) == 0
    capsys.readouterr()
    changes = {
        "samples.seed": ["sample.seed=1"],
        "sampler.name": ["sample.sampler=ode_heun"],
        "sampler.num_steps": ["sample.num_steps=5"],
        "checkpoint.weights": ["sample.checkpoint_weights=model"],
        "guidance.scale": ["sample.cfg_scale=2.5"],
        "precision": ["sample.precision=bf16"],
        "samples.count": ["sample.num_samples=10"],
    }
    for field, sets in changes.items():
        other = evaluate(field, *sets)
        assert cli("eval", "compare", base, other) == 1, field
        out = capsys.readouterr().out.strip().splitlines()
        assert out[-1] == f"NOT comparable: {field} differ", (field, out)
        if field == "sampler.name":  # Heun: two model calls per step, shown as what follows
            assert any(
                line.startswith("  differs (follows from sampler.name): sampler.nfe: 4 | ") for line in out
            )
    # the reference file re-made under the same URL (other images): its sha256 says so
    save_reference_stats(ref_url, compute_reference_stats(random_images(20, 16, seed=7), extractor))
    other = evaluate("reference")
    assert cli("eval", "compare", base, other) == 1
    assert capsys.readouterr().out.strip().splitlines()[-1] == "NOT comparable: reference.sha256 differ"


def test_ref_stats_refuses_constant_images_and_no_images_writing_nothing(tmp_path, feats, capsys):
    data_url = write_dataset(tmp_path / "data", np.full((12, 16, 16, 3), 128, np.uint8))
    out = tmp_path / "ref.npz"
    cfg_path = write_config(tmp_path / "cfg.yaml", tiny_config(str(tmp_path / "run")))
    base = ("eval", "ref-stats", "--config", cfg_path, "--data-url", data_url, "--out", str(out))
    assert cli(*base, "--feature-extractor", FEATS) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "features are constant over all 12 samples" in err[0] and data_url in err[0]
    assert cli(*base, "--feature-extractor", FEATS, "--max-images", "0") == 2
    assert "--max-images 0: expected at least 1 image" in capsys.readouterr().err
    assert not out.exists()


def test_no_inception_weights_names_the_key_before_sampling(tmp_path, capsys):
    """A toy run (no published networks) may evaluate without Inception weights configured; then the
    evaluation stops before sampling naming eval.inception_weights_url and the command that fills it."""
    from repa.eval.refstats import ReferenceStats

    x = np.random.default_rng(0).normal(size=(40, 2048))
    ref_url = str(tmp_path / "ref.npz")
    save_reference_stats(ref_url, ReferenceStats(mu=x.mean(0), sigma=np.cov(x, rowvar=False)))
    run_url = str(tmp_path / "run")
    tree = tiny_config(run_url, ref_url)
    tree["eval"]["metrics"] = ["fid"]
    cfg_path = write_config(tmp_path / "cfg.yaml", tree)
    commit_checkpoint(RunConfig.from_dict(tree), 100)
    assert cli("eval", "--config", cfg_path) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "eval.inception_weights_url is null" in err[0] and "--only inception" in err[0]
    assert not Path(run_url, "samples").exists()
