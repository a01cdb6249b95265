"""repa.eval.metrics: FID / IS / precision-recall of a sample set equal torch-fidelity's, other
extractors give FD_<name>, result files, and references that do not fit are refused up front.

Inception runs with random weights (tests/support/fidelity_weights.py) on 24 + 24 images of 64x64; an
Inception pass costs ~0.2 s per image on 2 idle CPU cores (torch-fidelity resizes to 299x299), so
the expensive results are module fixtures shared by several tests (4 passes of 24 images and one of 12
in all), and the module runs single-threaded (see ``single_thread``).
"""

from __future__ import annotations

import hashlib
import io
import json
import os

import numpy as np
import pytest
import torch

from repa import storage
from repa.eval import (
    INCEPTION_NAME,
    EvalResult,
    MetricsError,
    ReferenceStats,
    compute_feature_stats,
    compute_reference_stats,
    evaluate_features,
    extract_features,
    load_reference_stats,
    precision_recall,
    write_result_json,
)
from repa.eval.images import UInt8ImageDataset
from repa.eval.metrics import score_images
from tests.support.eval_helpers import (
    SIZE,
    FeaturesOnly,
    adm_frechet_distance,
    exact_fid_from_features,
    mixed_images,
    rel,
    smooth_images,
)

N_IMAGES = 24


pytestmark = pytest.mark.usefixtures("eval_single_thread")


@pytest.fixture(scope="module")
def generated_images() -> torch.Tensor:
    return mixed_images(N_IMAGES, seed=1, contrast=0.8)


@pytest.fixture(scope="module")
def reference_images() -> torch.Tensor:
    return mixed_images(N_IMAGES, seed=2)


@pytest.fixture(scope="module")
def fidelity_metrics(weights_path, generated_images, reference_images) -> dict:
    """torch-fidelity's own numbers, through its public ``calculate_metrics`` and its Dataset input path."""
    import torch_fidelity

    return torch_fidelity.calculate_metrics(
        input1=UInt8ImageDataset(generated_images),
        input2=UInt8ImageDataset(reference_images),
        isc=True,
        fid=True,
        prc=True,
        feature_extractor="inception-v3-compat",
        feature_layer_prc="2048",  # ADM's precision/recall use Inception pool features, not VGG16
        feature_extractor_weights_path=weights_path,
        samples_shuffle=False,  # ADM's IS splits are contiguous
        cuda=False,
        cache=False,
        save_cpu_ram=True,  # no DataLoader worker processes
        verbose=False,
        batch_size=64,
    )


@pytest.fixture(scope="module")
def own_reference(inception, reference_images) -> ReferenceStats:
    return compute_reference_stats(reference_images, inception, keep_features=N_IMAGES)


@pytest.fixture(scope="module")
def generated_features(inception, generated_images):
    return extract_features(inception, generated_images, with_logits=True)


@pytest.fixture(scope="module")
def our_result(generated_features, own_reference, inception) -> EvalResult:
    return evaluate_features(generated_features, own_reference, inception)


# ----------------------------------------------------------------------------------------------------------
# Agreement with torch-fidelity on the same images and the same (random) Inception weights
# ----------------------------------------------------------------------------------------------------------


def test_fid_equals_torch_fidelity_calculate_metrics(
    our_result, fidelity_metrics, generated_features, own_reference
):
    from torch_fidelity.metric_fid import fid_features_to_statistics, fid_statistics_to_metric

    expected = fidelity_metrics["frechet_inception_distance"]
    assert expected > 0.1  # the random network separates the two sets: the comparison is not 0 vs 0
    gen, ref = generated_features.features, torch.from_numpy(own_reference.features)  # in input order
    # 1. Same features: torch-fidelity's own formula on OUR features gives its calculate_metrics number.
    theirs_on_ours = fid_statistics_to_metric(
        fid_features_to_statistics(gen), fid_features_to_statistics(ref), verbose=False
    )["frechet_inception_distance"]
    assert rel(theirs_on_ours, expected) < 1e-12
    # 2. Our Fréchet distance is the exact value for these features ...
    assert rel(our_result.fid, exact_fid_from_features(gen.numpy(), ref.numpy())) < 1e-10
    # 3. ... while torch-fidelity's eigvals(S1 @ S2) carries ~1e-5 relative noise from the ~2000 null
    # eigenvalues of a rank-23 2048x2048 product (24 images). With full-rank stats (N > 2048) the two
    # agree to ~1e-8 (repa.eval.stats.frechet_distance); 1e-6 is out of reach at a test-sized N.
    assert rel(our_result.fid, expected) < 3e-5
    # random weights (not the published file): a Fréchet distance, never called FID
    assert our_result.metric_name == "FD" and our_result.feature_extractor == INCEPTION_NAME


def test_inception_score_equals_torch_fidelity(our_result, fidelity_metrics):
    # A random Inception is barely confident (IS ~ 1.03), so compare IS - 1, the informative part.
    assert fidelity_metrics["inception_score_mean"] > 1.01
    assert rel(our_result.inception_score_mean - 1, fidelity_metrics["inception_score_mean"] - 1) < 1e-6
    assert rel(our_result.inception_score_std, fidelity_metrics["inception_score_std"]) < 1e-6


def test_precision_recall_against_reference_images_equal_torch_fidelity(our_result, fidelity_metrics):
    assert our_result.precision == pytest.approx(fidelity_metrics["precision"], abs=1e-12)
    assert our_result.recall == pytest.approx(fidelity_metrics["recall"], abs=1e-12)
    assert 0.0 < our_result.precision < 1.0 or 0.0 < our_result.recall < 1.0  # not a trivial 0 or 1 pair


def test_adm_reference_batch_npz_is_loaded_and_its_images_used_for_precision_recall(
    tmp_path,
    monkeypatch,
    s3_bucket,
    own_reference,
    reference_images,
    generated_features,
    inception,
    our_result,
):
    monkeypatch.setenv("REPA_CACHE_DIR", str(tmp_path))
    # ADM layout: mu, sigma (float64), arr_0 NHWC uint8 (here the first 12 reference images, to save
    # Inception time), plus the sFID keys that we ignore; served from S3 (moto) like a real cluster's.
    url = f"{s3_bucket}/refs/VIRTUAL_fake64.npz"
    arr_0 = reference_images[:12].permute(0, 2, 3, 1).numpy()
    buf = io.BytesIO()
    sfid_keys = {"mu_s": np.zeros(3), "sigma_s": np.eye(3)}
    np.savez(buf, mu=own_reference.mu, sigma=own_reference.sigma, arr_0=arr_0, **sfid_keys)
    storage.write_bytes_atomic(url, buf.getvalue())
    ref = load_reference_stats(url)  # remote files are read from a local copy (under REPA_CACHE_DIR)
    assert ref.feature_extractor is None and ref.features is None  # nothing but ADM's keys
    assert ref.image_size == (SIZE, SIZE) and ref.images.shape == (12, SIZE, SIZE, 3)
    assert ref.sha256 == hashlib.sha256(buf.getvalue()).hexdigest()
    result = evaluate_features(generated_features, ref, inception)
    assert result.fid == our_result.fid  # same mu/sigma
    # Precision/recall used features of arr_0: the same as of those images extracted any other way.
    expected = precision_recall(generated_features.features, own_reference.features[:12])
    assert (result.precision, result.recall) == pytest.approx(expected, abs=1e-12)
    assert result.reference_sha256 == ref.sha256 and result.reference_url == url


# ----------------------------------------------------------------------------------------------------------
# Other extractors, result files
# ----------------------------------------------------------------------------------------------------------


def test_non_inception_extractor_gives_fd_named_after_it(toy):
    ref_images, gen_images = (
        smooth_images(24, seed=4, size=16),
        smooth_images(20, seed=5, contrast=0.5, size=16),
    )
    ref = compute_reference_stats(ref_images, toy, keep_features=24)
    result = score_images(gen_images, ref, toy, inception_score_splits=5, batch_size=8)
    gen_feats = toy(gen_images).detach().double().numpy()
    ref_feats = toy(ref_images).detach().double().numpy()
    expected = adm_frechet_distance(
        gen_feats.mean(0), np.cov(gen_feats, rowvar=False), ref_feats.mean(0), np.cov(ref_feats, rowvar=False)
    )
    assert result.metric_name == "FD_toy" and result.feature_extractor == "toy"
    assert rel(result.fid, expected) < 1e-6
    assert result.inception_score_mean >= 1.0 and result.precision is not None
    # The same path with a bare callable: stats only, no logits.
    flat = compute_feature_stats(FeaturesOnly(), gen_images)
    assert flat.dim == 3 and flat.num_samples == 20


def test_result_json_is_written_atomically_with_protocol(tmp_path, our_result):
    protocol = {"checkpoint": "s3://b/run/step-400000", "sampler": "sde", "num_steps": 250, "cfg_scale": 1.8}
    for url in (str(tmp_path / "eval" / "result.json"), "memory://eval/result.json"):
        write_result_json(url, our_result, protocol)
        payload = json.loads(storage.read_bytes(url))
        assert payload["fid"] == our_result.fid and payload["metric_name"] == "FD"
        assert payload["protocol"] == protocol and payload["num_samples"] == N_IMAGES
        assert payload["image_size"] == [SIZE, SIZE]
    storage.remove("memory://eval/result.json")
    assert os.listdir(tmp_path / "eval") == ["result.json"]  # no temporary file left behind
    assert json.loads(our_result.to_json())["reference_sha256"] is None  # computed in memory, never saved
    with pytest.raises(MetricsError, match="not JSON-serialisable"):
        write_result_json(str(tmp_path / "bad.json"), our_result, {"when": object()})


# ----------------------------------------------------------------------------------------------------------
# Reference checks -> clear errors
# ----------------------------------------------------------------------------------------------------------


def toy_reference_of_images(seed: int, size: int) -> ReferenceStats:
    """Statistics named for the toy network, holding 8 reference images (for precision/recall)."""
    images = smooth_images(8, seed=seed, size=size).permute(0, 2, 3, 1).numpy()
    return ReferenceStats(mu=np.zeros(8), sigma=np.eye(8), feature_extractor="toy", images=images)


def test_image_size_mismatch_with_reference_images_fails_before_any_feature(toy):
    ref = toy_reference_of_images(seed=7, size=32)
    toy.calls = 0
    expected = r"image size \(16, 16\) does not match the image size of reference statistics \(32, 32\)"
    with pytest.raises(MetricsError, match=expected):
        score_images(smooth_images(8, seed=8, size=16), ref, toy, inception_score_splits=None)
    assert toy.calls == 0


def test_reference_image_features_are_extracted_once_per_extractor(toy):
    ref = toy_reference_of_images(seed=10, size=16)
    toy.calls = 0
    first = score_images(
        smooth_images(8, seed=11, size=16), ref, toy, inception_score_splits=None, batch_size=8
    )
    assert toy.calls == 2  # one batch of samples, one of reference images
    second = score_images(
        smooth_images(8, seed=11, size=16), ref, toy, inception_score_splits=None, batch_size=8
    )
    assert toy.calls == 3 and (second.precision, second.recall) == (first.precision, first.recall)


def test_reference_from_another_extractor_or_without_pr_data_is_rejected(toy):
    images = smooth_images(12, seed=9, size=16)
    other = ReferenceStats(mu=np.zeros(8), sigma=np.eye(8), feature_extractor=INCEPTION_NAME)
    with pytest.raises(
        MetricsError, match="computed with feature extractor 'inception-v3-compat', not 'toy'"
    ):
        score_images(images, other, toy)
    unnamed = ReferenceStats(mu=np.zeros(8), sigma=np.eye(8), source="s3://b/adm.npz")  # ADM's: Inception's
    with pytest.raises(
        MetricsError, match=r"'s3://b/adm\.npz' record no feature extractor .* with 'toy' features"
    ):
        score_images(images, unnamed, toy, inception_score_splits=None, precision_recall_k=None)
    stats_only = ReferenceStats(
        mu=np.zeros(8), sigma=np.eye(8), feature_extractor="toy", source="s3://b/stats-only.npz"
    )
    toy.calls = 0
    with pytest.raises(MetricsError, match=r"'s3://b/stats-only\.npz' have neither"):
        score_images(images, stats_only, toy, inception_score_splits=None)
    assert toy.calls == 0  # refused before the pass over the samples
    result = score_images(images, stats_only, toy, inception_score_splits=None, precision_recall_k=None)
    assert result.precision is None and result.inception_score_mean is None
    wrong_dim = ReferenceStats(mu=np.zeros(5), sigma=np.eye(5), feature_extractor="toy")
    with pytest.raises(MetricsError, match="have 5 features, toy gives 8"):
        score_images(images, wrong_dim, toy, inception_score_splits=None, precision_recall_k=None)
    with pytest.raises(MetricsError, match="'flat' has no classifier logits"):
        score_images(images, stats_only, FeaturesOnly())
