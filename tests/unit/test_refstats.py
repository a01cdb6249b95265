"""repa.eval.refstats: our own reference statistics round-trip through storage with their sha256;
missing or malformed reference files are named with what was found."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch

from repa import storage
from repa.eval import (
    ReferenceStatsError,
    compute_reference_stats,
    extract_features,
    load_reference_stats,
    save_reference_stats,
)
from tests.support.eval_helpers import smooth_images

pytestmark = pytest.mark.usefixtures("eval_single_thread")


def test_reference_stats_roundtrip_through_storage_with_sha256(toy, tmp_path, monkeypatch):
    monkeypatch.setenv("REPA_CACHE_DIR", str(tmp_path))  # remote files are read from a local copy there
    images = smooth_images(30, seed=3, size=16)
    ref = compute_reference_stats(images, toy, batch_size=7, keep_features=12, keep_images=5, seed=1)
    full = extract_features(toy, images)
    np.testing.assert_allclose(ref.mu, full.stats.mu, rtol=1e-12)
    np.testing.assert_allclose(ref.sigma, full.stats.sigma, rtol=1e-10, atol=1e-15)
    assert ref.num_images == 30 and ref.image_size == (16, 16) and ref.feature_extractor == "toy"
    # The kept rows are a subset of the samples, and kept images are among the kept features' samples.
    assert ref.features.shape == (12, 8) and ref.images.shape == (5, 16, 16, 3)
    dist = torch.cdist(torch.from_numpy(ref.features), full.features)
    # (batch composition changes float32 conv results at ~1e-5; distinct samples are >= 0.05 apart)
    assert (dist.min(dim=1).values < 1e-3).all() and len(set(dist.argmin(dim=1).tolist())) == 12
    kept_image_features = toy(torch.from_numpy(ref.images).permute(0, 3, 1, 2)).detach()
    assert (torch.cdist(kept_image_features, torch.from_numpy(ref.features)).min(dim=1).values < 1e-3).all()

    url = "memory://refs/toy-stats.npz"
    sha = save_reference_stats(url, ref)
    try:
        assert sha == hashlib.sha256(storage.read_bytes(url)).hexdigest() == ref.sha256
        loaded = load_reference_stats(url)
        without_images = load_reference_stats(url, load_images=False)
    finally:
        storage.remove(url)
    np.testing.assert_array_equal(loaded.mu, ref.mu)
    np.testing.assert_array_equal(loaded.sigma, ref.sigma)
    np.testing.assert_array_equal(loaded.features, ref.features)
    np.testing.assert_array_equal(loaded.images, ref.images)
    assert (loaded.num_images, loaded.feature_extractor, loaded.image_size) == (30, "toy", (16, 16))
    assert loaded.sha256 == sha and loaded.source == url
    assert without_images.images is None and without_images.image_size == (16, 16)


def test_missing_reference_file_is_named(tmp_path):
    with pytest.raises(ReferenceStatsError, match=r"VIRTUAL_imagenet256_labeled\.npz' not found"):
        load_reference_stats(str(tmp_path / "VIRTUAL_imagenet256_labeled.npz"))
    with pytest.raises(ReferenceStatsError, match=r"memory://nowhere/ref\.npz' not found"):
        load_reference_stats("memory://nowhere/ref.npz")


def test_reference_npz_without_mu_sigma_names_the_keys_found(tmp_path):
    path = tmp_path / "samples.npz"
    np.savez(path, arr_0=np.zeros((2, 4, 4, 3), np.uint8), labels=np.zeros(2))
    with pytest.raises(
        ReferenceStatsError, match=r"lack key\(s\) \['mu', 'sigma'\]; found keys \['arr_0', 'labels'\]"
    ):
        load_reference_stats(str(path))
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(ReferenceStatsError, match=r"junk\.npz' is not a readable \.npz"):
        load_reference_stats(str(tmp_path / "junk.npz"))


def test_reference_with_mismatched_mu_sigma_or_images_is_rejected(tmp_path):
    path = tmp_path / "bad.npz"
    np.savez(path, mu=np.zeros(8), sigma=np.eye(6))
    with pytest.raises(ReferenceStatsError, match=r"sigma has shape \(6, 6\) but mu has 8 features"):
        load_reference_stats(str(path))
    np.savez(path, mu=np.zeros(3), sigma=np.eye(3), arr_0=np.zeros((2, 3, 8, 8), np.uint8))
    with pytest.raises(ReferenceStatsError, match=r"arr_0 must be uint8 images \(N, H, W, 3\)"):
        load_reference_stats(str(path))
