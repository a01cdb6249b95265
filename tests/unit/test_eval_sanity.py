"""Degenerate statistics are refused with one line naming the cause, before any number is made
(issue 22, item 5): constant, collapsed or non-finite features, too few samples, a reference of
another extractor or resolution; a class-conditional set with the wrong class balance is named in
the result. Tiny extractors only (tests/support/eval_helpers.py): the checks do not depend on the network."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from repa.eval import MetricsError, ReferenceStats, compute_reference_stats
from repa.eval.metrics import score_images
from repa.eval.stats import FeatureStats, check_gaussian, class_balance
from tests.support.eval_helpers import FeaturesOnly, ToyClassifier, mixed_images, smooth_images


def _refusal(match: str, fn, *args, **kwargs) -> str:
    with pytest.raises(MetricsError, match=match) as info:
        fn(*args, **kwargs)
    message = str(info.value)
    assert "\n" not in message  # one line
    return message


@pytest.fixture(scope="module")
def toy_reference() -> ReferenceStats:
    return compute_reference_stats(mixed_images(32, seed=7), ToyClassifier(), keep_features=32)


def _evaluate(images, reference, extractor=None, **kwargs):
    kwargs.setdefault("inception_score_splits", None)
    kwargs.setdefault("precision_recall_k", None)
    return score_images(images, reference, extractor or ToyClassifier(), **kwargs)


def test_healthy_sets_score(toy_reference):
    result = _evaluate(mixed_images(16, seed=8), toy_reference, precision_recall_k=3)
    assert result.fid > 0 and result.precision is not None and result.class_balance is None


def test_constant_features_are_refused(toy_reference):
    same = smooth_images(1, seed=0).repeat(12, 1, 1, 1)
    _refusal(r"generated samples \(toy features\): features are constant over all 12 samples", _evaluate,
             same, toy_reference)  # fmt: skip


def test_collapsed_features_are_refused(toy_reference):
    two = smooth_images(2, seed=0).repeat(20, 1, 1, 1)  # 40 samples, 2 distinct images
    _refusal(r"features collapsed: the covariance of 40 samples has rank 1 of a possible 8", _evaluate,
             two, toy_reference)  # fmt: skip


def test_a_nan_feature_is_refused(toy_reference):
    class NaNOnce(ToyClassifier):
        def features_and_logits(self, images):
            feats, logits = super().features_and_logits(images)
            feats = feats.clone()
            feats[0, 3] = float("nan")
            return feats, logits

    _refusal(r"1 of 8 feature vectors in a batch contain NaN or inf", _evaluate, mixed_images(8, seed=1),
             toy_reference, NaNOnce())  # fmt: skip
    with pytest.raises(MetricsError, match="NaN or inf"):
        check_gaussian(FeatureStats(mu=np.array([np.nan, 0.0]), sigma=np.eye(2), num_samples=5), "x")


def test_too_few_samples_for_the_requested_metric_are_refused(toy_reference):
    images = mixed_images(5, seed=1)
    _refusal(r"generated samples: 5 samples are too few for an Inception Score over 10 splits, which needs "
             r"at least 10", _evaluate, images, toy_reference, inception_score_splits=10)  # fmt: skip
    _refusal(r"3 samples are too few for precision/recall with k=3, which needs at least 4", _evaluate,
             images[:3], toy_reference, precision_recall_k=3)  # fmt: skip
    _refusal(r"feature statistics: 1 samples are too few for a Fréchet distance", _evaluate,
             images[:1], toy_reference)  # fmt: skip


def test_reference_of_another_extractor_or_resolution_is_refused(toy_reference):
    images = mixed_images(8, seed=1)
    flat = FeaturesOnly()
    _refusal(
        r"were computed with feature extractor 'toy', not 'flat'", _evaluate, images, toy_reference, flat
    )
    small = torch.nn.functional.interpolate(images.float(), size=(32, 32)).to(torch.uint8)
    _refusal(r"image size \(32, 32\) does not match the image size of reference statistics", _evaluate,
             small, toy_reference)  # fmt: skip


def test_wrong_class_balance_is_named_in_the_result(toy_reference):
    images = mixed_images(16, seed=8)
    rng = np.random.default_rng(0)
    fair = _evaluate(images, toy_reference, labels=rng.integers(0, 4, size=16), num_classes=4)
    assert fair.class_balance["problem"] is None and fair.class_balance["num_samples"] == 16
    one_class = _evaluate(images, toy_reference, labels=np.zeros(16, dtype=int), num_classes=4)
    assert "not a uniform draw over 4 classes" in one_class.class_balance["problem"]
    assert one_class.to_dict()["class_balance"]["classes_present"] == 1
    assert "outside [0, 4)" in class_balance([0, 1, 7], 4)["problem"]
    # 50,000 uniform draws over 1,000 classes (REPA's protocol) pass; 25 classes missing do not.
    draws = np.random.default_rng(1).integers(0, 1000, size=50_000)
    assert class_balance(draws, 1000)["problem"] is None
    assert class_balance(draws % 975, 1000)["problem"] is not None


def test_the_chi_square_p_value_equals_scipys_without_importing_scipy_at_run_time():
    """repa's images carry no scipy (a test-only dependency): the p-value is torch's regularized upper
    incomplete gamma, equal to scipy's chi-square survival function."""
    from scipy.stats import chi2

    rng = np.random.default_rng(3)
    for classes, n in ((4, 16), (10, 50), (1000, 5000)):
        got = class_balance(rng.integers(0, classes, n), classes)
        assert got["p_value"] == pytest.approx(chi2.sf(got["chi2"], classes - 1), rel=1e-9, abs=1e-300)
