"""repa.eval.features: Inception weights from a path or fsspec URL (never downloaded), refused
weights, and clear errors when none are given.

Inception runs with random weights (tests/support/fidelity_weights.py); only built here, never run.
"""

from __future__ import annotations

import os

import pytest
import torch

from repa import storage
from repa.eval import INCEPTION_WEIGHTS_FILENAME, MetricsError, build_inception
from tests.support.eval_helpers import ToyClassifier

pytestmark = pytest.mark.usefixtures("eval_single_thread")


def test_inception_weights_load_from_an_fsspec_url_through_a_local_copy(
    weights_path, inception, tmp_path, monkeypatch
):
    monkeypatch.setenv("REPA_CACHE_DIR", str(tmp_path))  # the one cache root (repa.storage.cache_dir)
    url = "memory://weights/random-inception.pth"
    with open(weights_path, "rb") as f:
        storage.write_bytes_atomic(url, f.read())
    try:
        remote = build_inception(url, device="cpu")
    finally:
        storage.remove(url)
    assert remote.weights_sha256 == inception.weights_sha256
    copies = os.listdir(tmp_path / "inception")
    assert copies and copies[0].endswith("random-inception.pth")


def test_missing_inception_weights_explain_how_to_supply_them(tmp_path):
    with pytest.raises(MetricsError, match=f"never downloads.*{INCEPTION_WEIGHTS_FILENAME}"):
        build_inception(None)
    missing = str(tmp_path / "nope.pth")
    with pytest.raises(MetricsError, match=r"nope\.pth' not found"):
        build_inception(missing)


def test_weights_with_pickled_code_are_refused(tmp_path):
    path = str(tmp_path / "evil.pth")
    torch.save({"net": ToyClassifier()}, path)  # a pickled module, not a state dict of tensors
    with pytest.raises(MetricsError, match="weights_only=True"):
        build_inception(path)
    torch.save({"conv.weight": torch.zeros(1)}, path)
    with pytest.raises(MetricsError, match="do not fit torch-fidelity's InceptionV3"):
        build_inception(path)
