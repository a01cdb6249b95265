"""`repa eval compare`: scores side by side, every differing provenance field named, exit 0/1.

A result's provenance (repa.eval.provenance) records how its number was made. Changing any one
protocol field must make the comparison refuse, naming exactly that field; the checkpoint itself (what
is compared) and code versions may differ. Score names say what they are (repa.eval.report).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

from repa.eval.features import INCEPTION_NAME, INCEPTION_SHA256_PREFIX
from repa.eval.provenance import (
    ALL_FIELDS,
    DINOV2_FIELDS,
    INFO_FIELDS,
    PROTOCOL_FIELDS,
    SUBJECT_FIELDS,
    Comparison,
)
from repa.eval.report import metric_tags, score_label, score_line

PUBLISHED_SHA = INCEPTION_SHA256_PREFIX + "0" * 56


def result(**provenance_changes) -> dict:
    provenance = {
        "checkpoint.url": "s3://b/run/checkpoints/step-0400000",
        "checkpoint.step": 400000,
        "checkpoint.weights_sha256": "a" * 64,
        "checkpoint.weights": "ema",
        "sampler.name": "sde",
        "sampler.num_steps": 250,
        "sampler.nfe": 250,
        "guidance.scale": 1.8,
        "guidance.interval": [0.0, 0.7],
        "precision": "fp32",
        "tf32": True,
        "vae.name": "sd-vae-ft-ema",
        "vae.weights_sha256": "b" * 64,
        "uint8_conversion": "clamp(255 * (x + 1) / 2, 0, 255), truncated",
        "samples.count": 50000,
        "samples.seed": 0,
        "samples.index_range": [0, 50000],
        "labels.distribution": {"class_balanced": False, "num_classes": 1000, "classes_present": 1000},
        "reference.url": "s3://b/VIRTUAL_imagenet256_labeled.npz",
        "reference.sha256": "c" * 64,
        "reference.count": 10000,
        "extractors": [{"name": INCEPTION_NAME, "weights_sha256": PUBLISHED_SHA, "resize": "tf1 bilinear"}],
        "dinov2.extractor": {"name": "dinov2-vit-l-14", "weights_sha256": "d" * 64, "resize": "PIL bicubic"},
        "dinov2.reference.url": "s3://b/dinov2_imagenet256.npz",
        "dinov2.reference.sha256": "e" * 64,
        "dinov2.reference.count": 50000,
        "versions.repa": "0.1.0",
        "versions.torch": "2.5.1",
        "versions.torch_fidelity": "0.4.0",
    }
    provenance.update(provenance_changes)
    return {
        "fid": 1.42,
        "inception_score_mean": 305.7,
        "precision": 0.8,
        "recall": 0.65,
        "num_samples": 50000,
        "feature_extractor": INCEPTION_NAME,
        "feature_extractor_sha256": PUBLISHED_SHA,
        "fd_dinov2": 80.12,
        "dinov2": {"label": "FD-DINOv2 (ViT-L/14)", "standard": True},
        "provenance": provenance,
    }


def without_dinov2(payload: dict) -> dict:
    """The same result as an evaluation without fd_dinov2 in eval.metrics records it."""
    out = copy.deepcopy(payload)
    del out["fd_dinov2"], out["dinov2"]
    out["provenance"].update(dict.fromkeys(DINOV2_FIELDS))
    return out


def changed(value):
    if isinstance(value, bool):
        return not value
    if isinstance(value, (int, float)):
        return value + 1
    if isinstance(value, str):
        return value + "-other"
    if isinstance(value, list):
        return [*value, "other"]
    return {**value, "other": 1}


def compare(tmp_path: Path, *payloads: dict) -> tuple[int, str]:
    from repa.cli import main

    paths = []
    for i, payload in enumerate(payloads):
        path = tmp_path / f"r{i}.json"
        path.write_text(json.dumps(payload))
        paths.append(str(path))
    import contextlib
    import io

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main(["eval", "compare", *paths])
    return code, out.getvalue()


def test_the_provenance_fields_are_documented():
    doc = (Path(__file__).parents[2] / "docs" / "evaluation.md").read_text()
    for key in ALL_FIELDS:
        assert f"`{key}`" in doc, key


def test_identical_protocols_are_comparable(tmp_path):
    code, out = compare(tmp_path, result(), result())
    assert code == 0, out
    assert "FID (50000 samples) 1.4200" in out and out.strip().endswith("same protocol")


@pytest.mark.parametrize("field", PROTOCOL_FIELDS)
def test_changing_one_protocol_field_is_refused_naming_exactly_it(tmp_path, field):
    base = result()
    other = copy.deepcopy(base)
    other["provenance"][field] = changed(base["provenance"][field])
    assert Comparison([base, other]).protocol == [field]
    code, out = compare(tmp_path, base, other)
    assert code == 1
    assert out.strip().splitlines()[-1] == f"NOT comparable: {field} differ"


@pytest.mark.parametrize("field", SUBJECT_FIELDS + INFO_FIELDS)
def test_the_checkpoint_and_code_versions_may_differ(tmp_path, field):
    base = result()
    other = copy.deepcopy(base)
    other["provenance"][field] = changed(base["provenance"][field])
    code, out = compare(tmp_path, base, other)
    assert code == 0 and f": {field}: " in out


def test_fd_dinov2_in_only_one_result_leaves_the_other_scores_comparable(tmp_path):
    code, out = compare(tmp_path, result(), without_dinov2(result()))
    assert code == 0, out
    assert "FD-DINOv2 only in " in out and "not compared" in out
    assert "FD-DINOv2 (ViT-L/14) 80.1200" in out.splitlines()[0]
    # ... but a protocol field that differs is still named
    other = without_dinov2(result(**{"sampler.name": "ode_euler"}))
    code, out = compare(tmp_path, result(), other)
    assert code == 1 and out.strip().splitlines()[-1] == "NOT comparable: sampler.name differ"


def test_a_consequence_is_not_named_as_a_cause_unless_it_differs_in_a_setting_of_its_own():
    base = result()
    seed = copy.deepcopy(base)
    seed["provenance"]["samples.seed"] = 1
    seed["provenance"]["labels.distribution"] = {
        **base["provenance"]["labels.distribution"],
        "classes_present": 999,
    }
    comparison = Comparison([base, seed])
    assert comparison.protocol == ["samples.seed"] and comparison.consequences == {
        "labels.distribution": ["samples.seed"]
    }
    balanced = copy.deepcopy(seed)
    balanced["provenance"]["labels.distribution"]["class_balanced"] = True  # a setting, not a count
    assert Comparison([base, balanced]).protocol == ["samples.seed", "labels.distribution"]


def test_a_result_without_provenance_is_not_comparable(tmp_path):
    old = result()
    del old["provenance"]
    code, out = compare(tmp_path, result(), old)
    assert code == 1 and "no provenance recorded" in out


def test_compare_names_a_missing_file_in_one_line(tmp_path, capsys):
    from repa.cli import main

    assert main(["eval", "compare", str(tmp_path / "nope.json"), str(tmp_path / "nope2.json")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"repa eval compare: error: {tmp_path / 'nope.json'}: not found"]


@pytest.mark.parametrize(
    ("payload", "named"),
    [
        ([1, 2], "a JSON list, not an object"),
        ({"fid": None}, "fid is None, not a number"),
        ({"fid": "1.0"}, "fid is '1.0', not a number"),
        ({"fid": 1.0, "precision": "high"}, "precision is 'high', not a number"),
        ({"fid": 1.0, "provenance": "x"}, "provenance is not an object"),
        ({"fid": 1.0, "fd_dinov2": 3.0}, "fd_dinov2 without its dinov2 record"),
        (
            {"fid": 1.0, "fd_dinov2": 3.0, "dinov2": {}},
            "its dinov2 record lacks a label (text) or standard (true/false)",
        ),
    ],
)
def test_a_malformed_result_is_exit_2_in_one_line(tmp_path, capsys, payload, named):
    from repa.cli import main

    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(payload))
    good = tmp_path / "good.json"
    good.write_text(json.dumps(result()))
    assert main(["eval", "compare", str(good), str(bad)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"repa eval compare: error: {bad}: not a `repa eval` result ({named})"]


def test_scores_say_what_they_are():
    real = result()
    assert score_label(real) == "FID (50000 samples)"
    assert set(metric_tags(real)) == {
        "eval/fid",
        "eval/sfid",
        "eval/is",
        "eval/precision",
        "eval/recall",
        "eval/fd_dinov2",
    }
    assert set(metric_tags(without_dinov2(real))) == {
        "eval/fid",
        "eval/sfid",
        "eval/is",
        "eval/precision",
        "eval/recall",
    }
    tiny = {**real, "dinov2": {"label": "FD (DINOv2 code path, not ViT-L/14: ...)", "standard": False}}
    assert "eval/fd_dinov2" not in metric_tags(tiny) and "eval/fd_dinov2_not_vit_l14" in metric_tags(tiny)
    assert "FD (DINOv2 code path, not ViT-L/14: ...) 80.1200" in score_line(tiny)
    random = {**result(), "num_samples": 30, "feature_extractor_sha256": "deadbeef" * 8}
    assert score_label(random) == "FD (unpublished Inception weights, 30 samples)"
    assert score_line(random).startswith("FD (unpublished Inception weights, 30 samples) 1.4200, IS (unpub")
    assert "eval/fid" not in metric_tags(random) and "eval/fd_unpublished_inception" in metric_tags(random)
    other = {**result(), "feature_extractor": "dinov2-vit-l14", "feature_extractor_sha256": None}
    assert score_label(other) == "FD_dinov2-vit-l14 (50000 samples)"


def test_the_tensorboard_hint_opens_time_series_without_smoothing():
    from urllib.parse import parse_qs, urlparse

    from repa.eval.report import TENSORBOARD_UNSMOOTHED, tensorboard_hint

    url = urlparse(TENSORBOARD_UNSMOOTHED)
    # TensorBoard 2.x's Time Series deep link: `smoothing` query parameter, default 0.6 otherwise
    assert parse_qs(url.query) == {"smoothing": ["0"]} and url.fragment == "timeseries"
    assert TENSORBOARD_UNSMOOTHED in tensorboard_hint()
