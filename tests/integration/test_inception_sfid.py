"""sFID: ADM's ``mixed_6/conv`` spatial features from the same Inception pass as pool_3 and the logits.

The layer is checked against torch-fidelity's graph (block order, module, shapes, ADM's NHWC
flattening); the sFID number against an independent implementation of ADM's formula (mean, np.cov,
scipy ``sqrtm``) on the same features; ADM-style npz files with ``mu_s``/``sigma_s`` are read as they
are. Inception has random weights (tests/support/fidelity_weights.py) except in the opt-in test, which reads
the real file from ``$REPA_TEST_INCEPTION_WEIGHTS_DIR`` (skipped otherwise).
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from torch import nn

from repa.eval import compute_reference_stats, load_reference_stats, save_reference_stats
from repa.eval.features import (
    INCEPTION_WEIGHTS_FILENAME,
    build_inception,
    extract_features,
    extractor_provenance,
)
from repa.eval.inception import (
    SPATIAL_DIM,
    SPATIAL_MODULE,
    TF_BLOCK_NAMES,
    TORCH_BLOCK_NAMES,
    spatial_features,
)
from repa.eval.metrics import score_images
from repa.eval.refstats import ReferenceStats, ReferenceStatsError
from tests.support.eval_helpers import adm_frechet_distance, mixed_images, rel

pytestmark = pytest.mark.usefixtures("eval_single_thread")

N = 12


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return mixed_images(N, seed=3)


@pytest.fixture(scope="module")
def reference_images() -> torch.Tensor:
    return mixed_images(N, seed=4, contrast=0.7)


def test_spatial_layer_is_adms_mixed_6_conv_in_torch_fidelitys_graph(inception):
    from torch_fidelity.feature_extractor_inceptionv3 import InceptionA, InceptionB, InceptionC, InceptionD

    net = inception.net
    # The Inception blocks of torch-fidelity's port, in forward order, are the TF graph's mixed..mixed_10.
    blocks = [name for name, m in net.named_children() if type(m).__name__.startswith("Inception")]
    assert blocks == list(TORCH_BLOCK_NAMES) and len(blocks) == len(TF_BLOCK_NAMES) == 11
    assert SPATIAL_MODULE == "Mixed_6d.branch1x1"  # mixed_6 = the seventh block; conv = its 1x1 branch
    block = net.get_submodule("Mixed_6d")
    assert isinstance(block, InceptionC) and not isinstance(block, (InceptionA, InceptionB, InceptionD))
    branch = net.get_submodule(SPATIAL_MODULE)
    assert branch.conv.kernel_size == (1, 1) and branch.conv.out_channels == 192  # conv + BN + ReLU

    seen = {}
    handle = branch.register_forward_hook(lambda m, i, o: seen.setdefault("act", o.clone()))
    try:
        feats, logits, spatial = inception.features_logits_spatial(mixed_images(2, seed=0))
    finally:
        handle.remove()
    act = seen["act"]
    assert act.shape == (2, 192, 17, 17) and (act >= 0).all()  # after the ReLU, at 17x17
    assert feats.shape == (2, 2048) and logits.shape == (2, 1008)
    assert spatial.shape == (2, SPATIAL_DIM) == (2, 2023)
    # ADM: spatial[..., :7] of the NHWC tensor, reshaped to (B, -1): index (h * 17 + w) * 7 + c.
    for b, c, h, w in [(0, 0, 0, 0), (1, 6, 16, 16), (0, 3, 5, 11), (1, 1, 9, 2)]:
        assert spatial[b, (h * 17 + w) * 7 + c] == act[b, c, h, w]
    assert torch.equal(spatial_features(act), spatial)
    provenance = extractor_provenance(inception)
    assert provenance["name"] == "inception-v3-compat" and "299x299" in provenance["resize"]
    assert len(provenance["weights_sha256"]) == 64


def test_one_inception_pass_per_image_gives_all_three_outputs(inception, images):
    calls = []
    handle = inception.net.Conv2d_1a_3x3.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0]))
    try:
        out = extract_features(inception, images, batch_size=8, with_logits=True, with_spatial=True)
    finally:
        handle.remove()
    assert calls == [8, 4]  # each image went through the network once
    assert out.spatial_stats is not None and out.spatial_stats.dim == 2023
    assert out.logits.shape == (N, 1008) and out.features.shape == (N, 2048)


def test_sfid_equals_an_independent_adm_formula_on_the_same_features(inception, images, reference_images):
    def spatial_of(x):
        rows = [inception.features_logits_spatial(chunk)[2] for chunk in x.split(8)]
        return torch.cat(rows).double().numpy()

    with torch.inference_mode():
        gen, ref = spatial_of(images), spatial_of(reference_images)
    reference = compute_reference_stats(reference_images, inception, keep_features=0)
    assert reference.mu_s.shape == (2023,) and reference.sigma_s.shape == (2023, 2023)
    np.testing.assert_allclose(reference.mu_s, ref.mean(axis=0), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(reference.sigma_s, np.cov(ref, rowvar=False), rtol=1e-8, atol=1e-10)

    result = score_images(images, reference, inception, inception_score_splits=None, precision_recall_k=None)
    expected = adm_frechet_distance(gen.mean(axis=0), np.cov(gen, rowvar=False), ref.mean(axis=0),
                                    np.cov(ref, rowvar=False))  # fmt: skip
    assert expected > 1.0  # the two sets differ: not a 0 vs 0 comparison
    # scipy's sqrtm of the rank-deficient (N=12 < 2023) product drifts ~1e-6 relative (repa.eval.stats).
    assert rel(result.sfid, expected) < 1e-5
    assert result.fid > 0 and result.to_dict()["sfid"] == result.sfid


def test_adm_style_npz_with_mu_s_sigma_s_is_read_as_it_is(tmp_path, inception, images):
    rng = np.random.default_rng(0)
    spatial = rng.normal(size=(40, SPATIAL_DIM))
    pool = rng.normal(size=(40, 2048))
    path = tmp_path / "VIRTUAL_like.npz"
    np.savez(  # ADM's keys: arr_0 images, mu/sigma (pool_3), mu_s/sigma_s (mixed_6/conv)
        path,
        arr_0=rng.integers(0, 256, size=(4, 64, 64, 3), dtype=np.uint8),
        mu=pool.mean(0).astype(np.float32),
        sigma=np.cov(pool, rowvar=False).astype(np.float32),
        mu_s=spatial.mean(0).astype(np.float32),
        sigma_s=np.cov(spatial, rowvar=False).astype(np.float32),
    )
    ref = load_reference_stats(str(path))
    np.testing.assert_array_equal(ref.mu_s, spatial.mean(0).astype(np.float32))
    assert ref.sigma_s.shape == (2023, 2023) and ref.spatial_stats.dim == 2023
    result = score_images(images[:4], ref, inception, inception_score_splits=None, precision_recall_k=None)
    assert result.sfid is not None and np.isfinite(result.sfid)


def test_repa_reference_stats_keep_mu_s_through_a_save(tmp_path, inception, images):
    ref = compute_reference_stats(images[:4], inception, keep_features=0)
    url = str(tmp_path / "ref.npz")
    save_reference_stats(url, ref)
    back = load_reference_stats(url)
    np.testing.assert_array_equal(back.mu_s, ref.mu_s)
    np.testing.assert_array_equal(back.sigma_s, ref.sigma_s)


def test_reference_without_sfid_statistics_gives_no_sfid_and_half_a_pair_is_refused(tmp_path):
    mu, sigma = np.zeros(3), np.eye(3)
    assert ReferenceStats(mu=mu, sigma=sigma).spatial_stats is None
    with pytest.raises(ReferenceStatsError, match="mu_s and sigma_s"):
        ReferenceStats(mu=mu, sigma=sigma, mu_s=np.zeros(2023))


def test_toy_extractor_reference_has_no_spatial_statistics(toy, images):
    assert isinstance(toy, nn.Module) and not hasattr(toy, "features_logits_spatial")
    assert compute_reference_stats(images[:4], toy, keep_features=0).mu_s is None


# ----------------------------------------------------------------------------------------------------------
# Opt-in: the real TF-ported Inception weights from a local folder
# ----------------------------------------------------------------------------------------------------------


def _real_weights() -> str:
    folder = os.environ.get("REPA_TEST_INCEPTION_WEIGHTS_DIR", "")
    path = os.path.join(folder, INCEPTION_WEIGHTS_FILENAME)
    if not folder or not os.path.isfile(path):
        pytest.skip(f"set REPA_TEST_INCEPTION_WEIGHTS_DIR to a folder holding {INCEPTION_WEIGHTS_FILENAME}")
    return path


def test_real_inception_sfid_of_a_reference_batch_against_itself_is_zero(images):
    inception = build_inception(_real_weights(), device="cpu")
    reference = compute_reference_stats(images, inception, keep_features=0)
    result = score_images(images, reference, inception, inception_score_splits=None, precision_recall_k=None)
    assert abs(result.sfid) < 1e-6 and abs(result.fid) < 1e-6
