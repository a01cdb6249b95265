"""repa.eval.images: every image source gives the same statistics; bad images are named clearly."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch

from repa import storage
from repa.eval import MetricsError, compute_feature_stats, iter_image_batches
from tests.support.eval_helpers import smooth_images

pytestmark = pytest.mark.usefixtures("eval_single_thread")


def test_all_image_sources_give_the_same_statistics(toy, tmp_path):
    from PIL import Image

    images = smooth_images(10, seed=6, size=16)  # (N, 3, H, W)
    nhwc = images.permute(0, 2, 3, 1).numpy()
    np.savez(tmp_path / "samples.npz", arr_0=nhwc)
    folder = tmp_path / "pngs"
    folder.mkdir()
    for i, img in enumerate(nhwc):
        Image.fromarray(img).save(folder / f"{i:06d}.png")
    buf = io.BytesIO()
    np.savez(buf, arr_0=nhwc)
    storage.write_bytes_atomic("memory://samples/remote.npz", buf.getvalue())
    for name, rows in (("chunk-000000.npz", slice(0, 7)), ("chunk-000001.npz", slice(7, 10))):
        buf = io.BytesIO()
        np.savez(buf, arr_0=nhwc[rows], labels=np.zeros(10)[rows])
        storage.write_bytes_atomic(f"memory://samples/chunks/{name}", buf.getvalue())
    sources = {
        "tensor": images,
        "nhwc array": nhwc,
        "batches": [images[:3], nhwc[3:4], images[4:]],
        "npz": tmp_path / "samples.npz",
        "remote npz": "memory://samples/remote.npz",
        "png folder": str(folder),
        "folder of npz chunks": "memory://samples/chunks",
    }
    try:
        stats = {name: compute_feature_stats(toy, src, batch_size=4) for name, src in sources.items()}
    finally:
        storage.remove("memory://samples", recursive=True)
    for name, s in stats.items():
        assert s.num_samples == 10, name
        np.testing.assert_allclose(s.mu, stats["tensor"].mu, rtol=1e-6, err_msg=name)
        np.testing.assert_allclose(s.sigma, stats["tensor"].sigma, rtol=1e-5, atol=1e-9, err_msg=name)
    with pytest.raises(MetricsError, match=r"memory://nothing-here/x\.npz: not found"):
        next(iter_image_batches("memory://nothing-here/x.npz", 4))
    with pytest.raises(MetricsError, match=r"no \.npz files and no \.png/\.jpg/\.jpeg images found"):
        next(iter_image_batches(str(tmp_path / "empty-folder"), 4))


def test_bad_image_dtype_layout_and_channels_are_named(toy):
    with pytest.raises(MetricsError, match=r"must be uint8.*float32"):
        compute_feature_stats(toy, torch.rand(4, 3, 16, 16))
    with pytest.raises(MetricsError, match=r"3 channels, got shape \(4, 1, 16, 16\)"):
        compute_feature_stats(toy, torch.zeros(4, 1, 16, 16, dtype=torch.uint8))
    with pytest.raises(MetricsError, match=r"numpy images must be \(N, H, W, 3\)"):
        compute_feature_stats(toy, np.zeros((4, 3, 16, 16), np.uint8))
    with pytest.raises(
        MetricsError, match=r"batch 1\): image size \(8, 8\) differs from earlier batches \(16, 16\)"
    ):
        compute_feature_stats(
            toy, [torch.zeros(2, 3, 16, 16, dtype=torch.uint8), torch.zeros(2, 3, 8, 8, dtype=torch.uint8)]
        )
    with pytest.raises(MetricsError, match="no images were given"):
        compute_feature_stats(toy, [])
