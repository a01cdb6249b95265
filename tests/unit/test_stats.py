"""repa.eval.stats: Fréchet distance against ADM's scipy formula and an exact value, running
statistics, Inception Score and precision/recall on hand-checked inputs, and their input checks."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from repa.eval import MetricsError, RunningFeatureStats, frechet_distance, inception_score, precision_recall
from tests.support.eval_helpers import adm_frechet_distance, exact_fid_from_features, rel

pytestmark = pytest.mark.usefixtures("eval_single_thread")


# ----------------------------------------------------------------------------------------------------------
# Fréchet distance
# ----------------------------------------------------------------------------------------------------------


def random_stats(rng, d: int, n: int, shift: float = 0.0, scale: float = 1.0):
    x = rng.normal(size=(n, d)) * scale + shift
    return x.mean(axis=0), np.atleast_2d(np.cov(x, rowvar=False))


@pytest.mark.parametrize("d", [1, 8, 64, 160])
def test_frechet_distance_matches_adm_scipy_sqrtm(d):
    rng = np.random.default_rng(d)
    mu1, s1 = random_stats(rng, d, n=4 * d + 10)
    mu2, s2 = random_stats(rng, d, n=3 * d + 10, shift=0.3, scale=1.5)
    assert rel(frechet_distance(mu1, s1, mu2, s2), adm_frechet_distance(mu1, s1, mu2, s2)) < 1e-6


@pytest.mark.parametrize(("d", "n"), [(16, 8), (64, 20), (160, 40), (64, 65)])
def test_frechet_distance_matches_adm_for_rank_deficient_covariances(d, n):
    # Fewer samples than dimensions: S1 S2 is singular, as for FID on < 2048 images.
    rng = np.random.default_rng(n)
    mu1, s1 = random_stats(rng, d, n)
    mu2, s2 = random_stats(rng, d, n, shift=0.2, scale=1.3)
    assert rel(frechet_distance(mu1, s1, mu2, s2), adm_frechet_distance(mu1, s1, mu2, s2)) < 1e-6


@pytest.mark.parametrize("d", [32, 128])
def test_frechet_distance_matches_adm_for_near_singular_spectra(d):
    rng = np.random.default_rng(d)
    q1, _ = np.linalg.qr(rng.normal(size=(d, d)))
    q2, _ = np.linalg.qr(rng.normal(size=(d, d)))
    s1 = (q1 * np.logspace(-12, 1, d)) @ q1.T
    s2 = (q2 * np.logspace(-10, 0, d)) @ q2.T
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    assert rel(frechet_distance(mu1, s1, mu2, s2), adm_frechet_distance(mu1, s1, mu2, s2)) < 1e-6


@pytest.mark.parametrize(("d", "n"), [(64, 20), (512, 24)])
def test_frechet_distance_is_exact_with_fewer_samples_than_dimensions(d, n):
    # The FID-on-few-images regime: ADM's sqrtm and torch-fidelity's eigvals drift by 1e-8..1e-5 here.
    rng = np.random.default_rng(d)
    x = rng.normal(size=(n, d)) * rng.uniform(0.01, 1.0, size=d) + 0.1
    y = rng.normal(size=(n + 3, d)) * rng.uniform(0.01, 1.0, size=d) + 0.12
    stats = [(f.mean(axis=0), np.cov(f, rowvar=False)) for f in (x, y)]
    assert rel(frechet_distance(*stats[0], *stats[1]), exact_fid_from_features(x, y)) < 1e-10


def test_frechet_distance_is_zero_for_identical_and_symmetric():
    rng = np.random.default_rng(0)
    mu1, s1 = random_stats(rng, 32, 20)  # rank-deficient on purpose
    mu2, s2 = random_stats(rng, 32, 100, shift=1.0)
    assert abs(frechet_distance(mu1, s1, mu1, s1)) < 1e-12 * np.trace(s1)
    assert rel(frechet_distance(mu1, s1, mu2, s2), frechet_distance(mu2, s2, mu1, s1)) < 1e-9


def test_frechet_distance_rejects_mismatched_dimensions():
    mu, s = np.zeros(4), np.eye(4)
    with pytest.raises(MetricsError, match="feature dimensions differ: mu1 has 4, mu2 has 3"):
        frechet_distance(mu, s, np.zeros(3), np.eye(3))
    with pytest.raises(MetricsError, match=r"sigma2 has shape \(3, 3\), expected \(4, 4\)"):
        frechet_distance(mu, s, mu, np.eye(3))
    with pytest.raises(MetricsError, match="mu1 and mu2 must be 1-D"):
        frechet_distance(np.zeros((2, 2)), s, mu, s)
    with pytest.raises(MetricsError, match="sigma1 is not positive semi-definite"):
        frechet_distance(mu, -np.eye(4), mu, s)


def test_running_stats_equal_numpy_and_merge_in_any_order():
    # A large mean offset would cancel catastrophically with a naive sum(x x^T) accumulator.
    rng = np.random.default_rng(0)
    x = rng.normal(size=(203, 16)) * 0.01 + 1000.0
    splits = np.split(x, [1, 50, 51, 150])
    a, b = RunningFeatureStats(), RunningFeatureStats()
    for part in splits[:3]:
        a.update(torch.from_numpy(part))
    for part in splits[3:]:
        b.update(part)
    b.merge(a)  # other order than the data
    stats = b.finalize()
    assert stats.num_samples == 203
    np.testing.assert_allclose(stats.mu, x.mean(axis=0), rtol=1e-12)
    np.testing.assert_allclose(stats.sigma, np.cov(x, rowvar=False), rtol=1e-8, atol=1e-14)


# ----------------------------------------------------------------------------------------------------------
# Inception Score and precision/recall on hand-checked inputs
# ----------------------------------------------------------------------------------------------------------


def test_inception_score_is_one_for_uninformative_and_k_for_k_confident_classes():
    mean, std = inception_score(torch.zeros(40, 7), splits=4)
    assert mean == pytest.approx(1.0, abs=1e-12) and std == pytest.approx(0.0, abs=1e-12)
    logits = 60.0 * F.one_hot(torch.arange(40) % 5, 7).double()  # each split holds 5 classes x 2
    mean, std = inception_score(logits, splits=4)
    assert mean == pytest.approx(5.0, rel=1e-9) and std < 1e-9
    with pytest.raises(MetricsError, match="at least splits=10 samples, got 3"):
        inception_score(torch.zeros(3, 7))


def test_precision_recall_on_a_hand_worked_example():
    ref = torch.tensor([[0.0], [1.0], [2.0], [3.0]])
    gen = torch.tensor([[0.5], [1.5], [10.0], [11.0]])
    # k=1 radii: every point's nearest neighbour is at distance 1 (ref) / 1 (gen).
    # precision: 0.5 and 1.5 lie in ref balls, 10 and 11 do not -> 2/4.
    # recall: 0, 1, 2 lie within 1 of 0.5 or 1.5; 3 does not -> 3/4.
    assert precision_recall(gen, ref, k=1) == (0.5, 0.75)
    assert precision_recall(ref, ref, k=2) == (1.0, 1.0)
    assert precision_recall(gen, ref, k=1, batch_size=1) == (0.5, 0.75)
    with pytest.raises(MetricsError, match="more than 3 generated samples, got 3"):
        precision_recall(gen[:3], ref, k=3)
