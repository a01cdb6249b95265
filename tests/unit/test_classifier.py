"""repa.classifier: the independent judge of the demo's samples (smoke size: 3 classes, seconds)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from repa import fashion_mnist
from repa.classifier import SampleClassifier, accuracy, standardise, train_classifier

CLASSES = (1, 7, 8)  # trouser, sneaker, bag: shapes a tiny CNN tells apart after a few epochs


def _pick(split: str, per_class: int) -> tuple[np.ndarray, np.ndarray]:
    images, labels = fashion_mnist.load_split(fashion_mnist.find(prefer_subset=True).folder, split)
    keep = np.concatenate([np.flatnonzero(labels == c)[:per_class] for c in CLASSES])
    return images[keep], np.searchsorted(CLASSES, labels[keep])  # labels 0..2


@pytest.fixture(scope="module")
def judge() -> SampleClassifier:
    torch.set_num_threads(1)
    images, labels = _pick("t10k", 100)  # held out: the test split
    model, report = train_classifier(images, labels, len(CLASSES), epochs=4)
    assert report.train_images == 300
    return model


def test_the_judge_is_its_own_small_cnn_not_the_repa_encoder(judge):
    from repa.config import load_config
    from repa.encoders import build_encoder

    cfg = load_config("toy-cpu")  # the demo's REPA target: a tiny timm ViT
    encoders = [
        build_encoder(name, None, cfg.data.resolution, kwargs)
        for name, kwargs in zip(cfg.encoder.names, cfg.encoder.model_kwargs)
    ]
    encoder_params = {id(p) for e in encoders for p in e.parameters()}
    assert not encoder_params & {id(p) for p in judge.parameters()}
    assert type(judge) is SampleClassifier and not any(type(e) is SampleClassifier for e in encoders)
    assert sum(p.numel() for p in judge.parameters()) < 50_000


def test_it_sees_shape_not_colour_or_brightness():
    gray = np.random.default_rng(0).integers(0, 256, (2, 32, 32), dtype=np.uint8)
    rgb = np.repeat(gray[..., None], 3, axis=-1)
    tinted = (rgb * np.array([1.0, 0.5, 0.25])).astype(np.uint8)  # the same shape, red-brown and darker
    torch.testing.assert_close(standardise(rgb), standardise(tinted), atol=0.05, rtol=0)
    assert standardise(rgb).shape == (2, 1, 16, 16)


def test_real_training_images_score_high_and_a_one_class_generator_scores_near_chance(judge):
    images, labels = _pick("train", 60)  # images neither the judge nor anything else trained on here
    assert accuracy(judge, images, labels) > 0.8
    # A generator that learned only class 0 draws class-0 images whatever label it is asked for: the
    # judge credits the class-0 column only, so the score is ~1/3 (chance), not its realism.
    only_zero = images[labels == 0][:60]
    asked = np.arange(len(only_zero)) % len(CLASSES)
    score = accuracy(judge, only_zero, asked)
    assert abs(score - 1 / len(CLASSES)) < 0.1
    assert accuracy(judge, only_zero[asked != 0], asked[asked != 0]) < 0.1  # the other classes: none


def test_accuracy_of_nothing_is_an_error(judge):
    with pytest.raises(ValueError, match="no images"):
        accuracy(judge, np.zeros((0, 28, 28), np.uint8), [])
