"""How a number was produced, and whether two numbers may be compared (`repa eval compare`).

Every result JSON carries ``provenance``: a flat ``{field: value}`` record of everything that moves a
sample-quality score (docs/evaluation.md explains each field with the "my FID does not match the
paper" mismatch it prevents). Fields come in three kinds:

- ``PROTOCOL_FIELDS``: how the samples were made and scored. Two scores are comparable only when
  these are equal; ``repa eval compare`` exits 1 naming each one that differs.
- ``SUBJECT_FIELDS``: what is being scored (the checkpoint): expected to differ, shown.
- ``INFO_FIELDS``: code versions: shown when they differ, never a reason to refuse.

``extractors`` holds one entry per feature network (name, weights sha256, the resize path into it);
new extractors (DINOv2, ...) add theirs through :func:`extractor_record`.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

__all__ = [
    "INFO_FIELDS",
    "PROTOCOL_FIELDS",
    "SUBJECT_FIELDS",
    "Comparison",
    "compare_results",
    "extractor_record",
    "provenance_rows",
]

SUBJECT_FIELDS = ("checkpoint.url", "checkpoint.step", "checkpoint.weights_sha256")
PROTOCOL_FIELDS = (
    "checkpoint.weights",  # ema | raw
    "sampler.name",
    "sampler.num_steps",
    "sampler.nfe",
    "guidance.scale",
    "guidance.interval",
    "precision",
    "tf32",
    "vae.name",
    "vae.weights_sha256",
    "uint8_conversion",
    "samples.count",
    "samples.seed",
    "samples.index_range",
    "labels.distribution",
    "reference.url",
    "reference.sha256",
    "reference.count",
    "extractors",
)
INFO_FIELDS = ("versions.repa", "versions.torch", "versions.torch_fidelity")
ALL_FIELDS = SUBJECT_FIELDS + PROTOCOL_FIELDS + INFO_FIELDS

# The resize into each network, as it happens (torch-fidelity's port of TF1's graph resizes inside).
INCEPTION_RESIZE = "uint8 HxW -> float32, TF1-compatible bilinear resize to 299x299 inside the network"


def extractor_record(extractor: Any) -> dict[str, Any]:
    """``{name, weights_sha256, resize}`` of one feature network (its ``resize`` attribute when it
    has one, else Inception's path for Inception and "the extractor's own" otherwise)."""
    from repa.eval.features import INCEPTION_NAME

    name = getattr(extractor, "name", type(extractor).__name__)
    default = INCEPTION_RESIZE if name == INCEPTION_NAME else "the extractor's own (not recorded)"
    return {
        "name": name,
        "weights_sha256": getattr(extractor, "weights_sha256", None),
        "resize": getattr(extractor, "resize", default),
    }


def label_distribution(labels: Sequence[int], num_classes: int) -> dict[str, Any]:
    """Summary of the class labels of a sample set: how many classes appear and the count range."""
    counts = [0] * num_classes
    for y in labels:
        counts[int(y)] += 1
    present = [c for c in counts if c]
    return {
        "num_classes": num_classes,
        "classes_present": len(present),
        "min_per_class": min(counts) if counts else 0,
        "max_per_class": max(counts) if counts else 0,
    }


def provenance_rows(payload: dict[str, Any]) -> list[tuple[str, Any]]:
    """``[(field, value)]`` of a result's provenance in the documented order (missing: None)."""
    record = payload.get("provenance") or {}
    return [(key, _canonical(record.get(key))) for key in ALL_FIELDS]


def _canonical(value: Any) -> Any:
    return json.dumps(value, sort_keys=True) if isinstance(value, (dict, list)) else value


class Comparison:
    """Provenance differences between results: ``protocol`` (not comparable), ``subject``, ``info``."""

    def __init__(self, payloads: Sequence[dict[str, Any]]) -> None:
        self.payloads = list(payloads)
        rows = [dict(provenance_rows(p)) for p in self.payloads]
        differing = [k for k in ALL_FIELDS if len({json.dumps(r[k], sort_keys=True) for r in rows}) > 1]
        self.protocol = [k for k in differing if k in PROTOCOL_FIELDS]
        self.subject = [k for k in differing if k in SUBJECT_FIELDS]
        self.info = [k for k in differing if k in INFO_FIELDS]
        self.without = [i for i, p in enumerate(self.payloads) if not p.get("provenance")]
        self.rows = rows

    @property
    def comparable(self) -> bool:
        return not self.protocol and not self.without


def compare_results(payloads: Sequence[dict[str, Any]]) -> Comparison:
    return Comparison(payloads)
