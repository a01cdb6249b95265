"""FD-DINOv2 (repa.eval.dinov2): a tiny random-weight ViT through the same code path as ViT-L/14 gives
torch-fidelity 0.4's ``calculate_metrics`` value on the same images (FD and precision/recall), the
weights come from a file (never the hub), and DINOv2's own position-embedding resampling is used.

torch-fidelity's extractor loads its network with ``torch.hub.load``; the test hands it the same tiny
network through that call (monkeypatched), so both sides score with identical weights. Images are
224x224: there torch-fidelity's TF1-bilinear resize and dgm-eval's PIL bicubic (used by repa) are both
the identity, the one place the two pipelines are meant to differ (docs/metrics.md).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from repa.eval import MetricsError, compute_reference_stats
from repa.eval.dinov2 import (
    DINOV2_NAME,
    build_dinov2,
    dinov2_pos_embed_for,
    pil_bicubic_resize,
)
from repa.eval.features import extractor_provenance
from repa.eval.images import UInt8ImageDataset
from repa.eval.metrics import score_images
from tests.support.eval_helpers import rel
from tests.support.tiny_dinov2 import TINY, write_tiny_dinov2

pytestmark = pytest.mark.usefixtures("eval_single_thread")


def _images(n: int, seed: int, size: int = 224, res: int = 8) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = F.interpolate(torch.rand(n, 3, res, res, generator=g), size=(size, size), mode="bilinear")
    return (x * 255).round().clamp(0, 255).to(torch.uint8)


@pytest.fixture(scope="module")
def tiny_weights(tmp_path_factory) -> str:
    """A tiny DINOv2-architecture ViT as released: 518 px (37x37 position grid), layer scale 1."""
    return write_tiny_dinov2(tmp_path_factory.mktemp("dinov2") / "tiny_dinov2.pth")


@pytest.fixture(scope="module")
def extractor(tiny_weights):
    return build_dinov2(tiny_weights, device="cpu", model_kwargs=TINY)


def test_fd_dinov2_and_precision_recall_equal_torch_fidelity(extractor, tiny_weights, monkeypatch):
    import torch_fidelity

    generated, reference_images = _images(20, seed=1), _images(20, seed=2, res=4)
    reference = compute_reference_stats(reference_images, extractor, keep_features=20)
    assert reference.feature_extractor == DINOV2_NAME and reference.mu_s is None
    ours = score_images(generated, reference, extractor, inception_score_splits=None, precision_recall_k=3)
    assert ours.metric_name == f"FD_{DINOV2_NAME}" and ours.feature_extractor_sha256
    provenance = extractor_provenance(extractor)
    assert provenance["name"] == DINOV2_NAME and "PIL bicubic to 224x224" in provenance["resize"]
    assert provenance["weights_sha256"] == hashlib.sha256(Path(tiny_weights).read_bytes()).hexdigest()

    monkeypatch.setattr(torch.hub, "load", lambda repo, name, *a, **k: extractor.net.model)
    theirs = torch_fidelity.calculate_metrics(
        input1=UInt8ImageDataset(generated),
        input2=UInt8ImageDataset(reference_images),
        fid=True,
        prc=True,
        feature_extractor=DINOV2_NAME,
        cuda=False,
        cache=False,
        save_cpu_ram=True,
        verbose=False,
        batch_size=64,
    )
    expected = theirs["frechet_inception_distance"]  # torch-fidelity's key, whatever the extractor
    assert expected > 0.01
    assert rel(ours.fid, expected) < 1e-6
    assert ours.precision == pytest.approx(theirs["precision"], abs=1e-12)
    assert ours.recall == pytest.approx(theirs["recall"], abs=1e-12)


def test_weights_are_required_and_never_downloaded(monkeypatch):
    def no_hub(*args, **kwargs):
        raise AssertionError("torch.hub.load called")

    monkeypatch.setattr(torch.hub, "load", no_hub)
    with pytest.raises(
        MetricsError, match=r"no DINOv2 weights given.*repa weights fetch DEST --only dinov2-vit-l"
    ):
        build_dinov2(None, device="cpu")
    with pytest.raises(MetricsError, match=r"DINOv2 weights '/nonexistent/x.pth' not found"):
        build_dinov2("/nonexistent/x.pth", device="cpu")


def test_position_embedding_is_resampled_as_dinov2_does_at_run_time():
    pe = torch.randn(1, 1 + 37 * 37, 8)
    out = dinov2_pos_embed_for(pe, 16)
    assert out.shape == (1, 257, 8) and torch.equal(out[:, 0], pe[:, 0])
    # DINOv2's interpolate_pos_encoding: bicubic with scale_factor (16 + 0.1) / 37 and no antialias.
    grid = pe[:, 1:].reshape(1, 37, 37, 8).permute(0, 3, 1, 2)
    want = F.interpolate(grid, scale_factor=(16.1 / 37, 16.1 / 37), mode="bicubic", antialias=False)
    assert torch.equal(out[:, 1:], want.permute(0, 2, 3, 1).reshape(1, 256, 8))
    # timm's loader would resample differently (antialiased, to size 16): the choice is visible.
    from timm.layers import resample_abs_pos_embed

    assert not torch.allclose(resample_abs_pos_embed(pe, (16, 16), num_prefix_tokens=1), out, atol=1e-3)
    assert dinov2_pos_embed_for(out, 16) is out


def test_resize_is_pils_bicubic_as_dgm_eval():
    from PIL import Image

    images = _images(2, seed=3, size=256)
    out = pil_bicubic_resize(images)
    assert out.shape == (2, 3, 224, 224) and out.dtype == torch.uint8
    pil = Image.fromarray(images[1].permute(1, 2, 0).numpy()).resize((224, 224), Image.BICUBIC)
    assert np.array_equal(out[1].permute(1, 2, 0).numpy(), np.asarray(pil))
    same = _images(1, seed=4)
    assert pil_bicubic_resize(same) is same


def test_inception_and_dinov2_jobs_share_one_read_of_the_images(extractor, toy):
    from repa.eval.metrics import MetricJob, evaluate_many

    images = _images(12, seed=5)
    reads = []

    def batches():  # a stream that can be read once, counting what is read
        for chunk in images.split(5):
            reads.append(len(chunk))
            yield chunk

    toy_ref = compute_reference_stats(_images(12, seed=6), toy, keep_features=12)
    dino_ref = compute_reference_stats(_images(12, seed=6), extractor, keep_features=0)
    toy.calls = 0
    toy_result, dino_result = evaluate_many(
        batches(),
        [
            MetricJob(toy, toy_ref, inception_score_splits=2, precision_recall_k=3),
            MetricJob(extractor, dino_ref),
        ],
        batch_size=5,
    )
    assert reads == [5, 5, 2] and toy.calls == 3  # images read once; each network saw each batch once
    toy_alone = score_images(
        images, toy_ref, toy, inception_score_splits=2, precision_recall_k=3, batch_size=5
    )
    assert toy_result == toy_alone  # same batches, same numbers
    alone = score_images(
        images, dino_ref, extractor, inception_score_splits=None, precision_recall_k=None, batch_size=5
    )
    assert dino_result.fid == alone.fid and dino_result.metric_name == f"FD_{DINOV2_NAME}"
