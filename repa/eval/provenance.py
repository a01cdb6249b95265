"""How a number was produced, and whether two numbers may be compared (`repa eval compare`).

Every result JSON carries ``provenance``: a flat ``{field: value}`` record of everything that moves a
sample-quality score (docs/evaluation.md explains each field with the "my FID does not match the
paper" mismatch it prevents). Fields come in three kinds:

- ``PROTOCOL_FIELDS``: how the samples were made and scored. Two scores are comparable only when
  these are equal; ``repa eval compare`` exits 1 naming each one that differs.
- ``SUBJECT_FIELDS``: what is being scored (the checkpoint): expected to differ, shown.
- ``INFO_FIELDS``: code versions: shown when they differ, never a reason to refuse.

``extractors`` holds the entry of the network behind FID, sFID, IS and precision/recall (name, weights
sha256, the resize path into it; :func:`extractor_record`). FD-DINOv2's network and reference are the
``dinov2.*`` fields (None without FD-DINOv2): they are compared only between results that both have
FD-DINOv2, so adding FD-DINOv2 to an evaluation leaves its FID comparable with earlier ones.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import torch

import repa
from repa import checkpoint as ckpt
from repa.eval.sample import run_sampler
from repa.eval.sample_set import SampleSpec

__all__ = [
    "DERIVED_FIELDS",
    "DINOV2_FIELDS",
    "INFO_FIELDS",
    "PROTOCOL_FIELDS",
    "SUBJECT_FIELDS",
    "Comparison",
    "build_provenance",
    "checkpoint_sha256",
    "compare_results",
    "count_nfe",
    "extractor_record",
    "provenance_rows",
]

DINOV2_FIELDS = (
    "dinov2.extractor",
    "dinov2.reference.url",
    "dinov2.reference.sha256",
    "dinov2.reference.count",
)
"""FD-DINOv2's network and reference (None in a result without FD-DINOv2)."""
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
    *DINOV2_FIELDS,
)
INFO_FIELDS = ("versions.repa", "versions.torch", "versions.torch_fidelity")
DERIVED_FIELDS: dict[str, tuple[str, ...]] = {
    "sampler.nfe": ("sampler.name", "sampler.num_steps"),
    "samples.index_range": ("samples.count",),
    "labels.distribution": ("samples.seed", "samples.count"),
    "vae.weights_sha256": ("vae.name",),
    "reference.sha256": ("reference.url",),
    "reference.count": ("reference.url", "reference.sha256"),
    "dinov2.reference.sha256": ("dinov2.reference.url",),
    "dinov2.reference.count": ("dinov2.reference.url", "dinov2.reference.sha256"),
}
"""Fields that follow from others: when one of its causes differs too, a derived field is shown as a
consequence (``sampler.nfe`` of another ``sampler.name``), not named as a cause of its own; alone, it
is a cause (the same sampler and steps at another NFE is a real difference)."""
ALL_FIELDS = SUBJECT_FIELDS + PROTOCOL_FIELDS + INFO_FIELDS


def extractor_record(extractor: Any) -> dict[str, Any]:
    """``{name, weights_sha256, resize}`` of one feature network, as the extractor itself says
    (``repa.eval.features.extractor_provenance``); a custom network that does not say is recorded so."""
    from repa.eval.features import extractor_provenance

    record = extractor_provenance(extractor)
    return {**record, "resize": record["resize"] or "the extractor's own (not recorded)"}


def label_distribution(labels: Any, num_classes: int, class_balanced: bool) -> dict[str, Any]:
    """Summary of the class labels of a sample set: how many classes appear and the count range (from
    ``repa.eval.stats.class_balance``, the one place labels are counted; labels out of range count in
    none of the classes)."""
    from repa.eval.stats import class_balance

    balance = class_balance(labels, num_classes) if num_classes > 0 and len(labels) else {}
    return {
        "class_balanced": class_balanced,
        "num_classes": num_classes,
        "classes_present": balance.get("classes_present", 0),
        "min_per_class": balance.get("min_count", 0),
        "max_per_class": balance.get("max_count", 0),
    }


def provenance_rows(payload: dict[str, Any]) -> list[tuple[str, Any]]:
    """``[(field, value)]`` of a result's provenance in the documented order (missing: None)."""
    record = payload.get("provenance") or {}
    return [(key, _canonical(record.get(key))) for key in ALL_FIELDS]


def _canonical(value: Any) -> Any:
    return json.dumps(value, sort_keys=True) if isinstance(value, (dict, list)) else value


class Comparison:
    """Provenance differences between results: ``protocol`` (not comparable: the causes), ``consequences``
    (derived fields that differ because a cause does, :data:`DERIVED_FIELDS`), ``subject``, ``info``.

    ``dinov2_only_in``: indices of the results with FD-DINOv2 when only some have it; its ``dinov2.*``
    fields are then not compared (FD-DINOv2 is not compared; the other scores still are).
    """

    def __init__(self, payloads: Sequence[dict[str, Any]]) -> None:
        self.payloads = list(payloads)
        rows = [dict(provenance_rows(p)) for p in self.payloads]
        with_dinov2 = [i for i, r in enumerate(rows) if r["dinov2.extractor"] is not None]
        partial = 0 < len(with_dinov2) < len(rows)
        self.dinov2_only_in = with_dinov2 if partial else []
        skipped = set(DINOV2_FIELDS) if partial else set()
        differing = [
            k
            for k in ALL_FIELDS
            if k not in skipped and len({json.dumps(r[k], sort_keys=True) for r in rows}) > 1
        ]
        protocol = [k for k in differing if k in PROTOCOL_FIELDS]
        self.consequences = {
            k: [c for c in DERIVED_FIELDS[k] if c in protocol]
            for k in protocol
            if any(c in protocol for c in DERIVED_FIELDS.get(k, ())) and not _own_cause(k, rows)
        }
        self.protocol = [k for k in protocol if k not in self.consequences]
        self.subject = [k for k in differing if k in SUBJECT_FIELDS]
        self.info = [k for k in differing if k in INFO_FIELDS]
        self.without = [i for i, p in enumerate(self.payloads) if not p.get("provenance")]
        self.rows = rows

    @property
    def comparable(self) -> bool:
        return not self.protocol and not self.without


def _own_cause(field: str, rows: list[dict[str, Any]]) -> bool:
    """True when ``field`` differs in a part no cause explains: ``labels.distribution``'s
    ``class_balanced`` and ``num_classes`` are settings of their own, only its counts follow the seed."""
    if field != "labels.distribution":
        return False
    settings = {
        json.dumps({k: (json.loads(r[field]) or {}).get(k) for k in ("class_balanced", "num_classes")})
        for r in rows
        if isinstance(r[field], str)
    }
    return len(settings) > 1


def compare_results(payloads: Sequence[dict[str, Any]]) -> Comparison:
    return Comparison(payloads)


# How a result's record is built (repa.eval.evaluate.evaluate_checkpoint)


def checkpoint_sha256(
    source: ckpt.CheckpointSource, weights: str, cfg: Any, file_sha256: str | None
) -> str | None:
    """sha256 of the weights file scored: from the step folder's ``COMMITTED`` record, or
    ``file_sha256``, as ``load_model`` hashed a plain weights file while reading it (no second read)."""
    if source.kind != "run":
        return file_sha256
    files = ckpt.read_marker(cfg.storage.locate(source.url)).get("files") or {}
    ema = files.get(ckpt.EMA_FILE) if weights == "ema" else None
    record = ema or files.get(ckpt.STATE_FILE) or {}
    return record.get("sha256")


def count_nfe(spec: SampleSpec) -> int:
    """Model calls one sample costs under ``spec``, counted by running the sampler on a stub model
    (a CFG-doubled call counts once, as ``repa.sampling.SamplerTrace``)."""
    from repa.sampling import SamplerTrace

    def stub(x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor]:
        return (torch.zeros_like(x),)

    trace = SamplerTrace()
    z, y = torch.zeros(1, 1, 1, 1), torch.zeros(1, dtype=torch.int64)
    noise = torch.zeros(spec.num_steps - 1, 1, 1, 1, 1) if spec.sampler == "sde" else None
    run_sampler(stub, spec, z, y, noise, null_class=spec.num_classes, trace=trace)
    return trace.nfe


def build_provenance(
    cfg: Any,
    plan: Any,
    *,
    weights_sha256: str | None,
    vae_sha256: str | None,
    uint8_conversion: str,  # the decoder's (repa.vae.VAE.uint8_conversion)
    precision: str,
    tf32: bool,  # TF32 matmuls in effect (allowed and on a CUDA device)
    labels: Any,  # (N,) int class labels of the samples scored
    result: dict[str, Any],
    extractors: list[Any],
    dinov2: tuple[Any, dict[str, Any]] | None = None,  # (network, report.dinov2_summary) with FD-DINOv2
) -> dict[str, Any]:
    """The result's provenance record (fields: ``repa.eval.provenance``; docs/evaluation.md)."""
    from importlib.metadata import version

    spec, checkpoint = plan.spec, plan.sampling["checkpoint"]
    network, summary = dinov2 if dinov2 is not None else (None, {})
    return {
        "checkpoint.url": checkpoint["url"],
        "checkpoint.step": checkpoint["step"],
        "checkpoint.weights_sha256": weights_sha256,
        "checkpoint.weights": checkpoint["weights"],
        "sampler.name": spec.sampler,
        "sampler.num_steps": spec.num_steps,
        "sampler.nfe": count_nfe(spec),
        "guidance.scale": spec.cfg_scale,
        "guidance.interval": [spec.guidance_low, spec.guidance_high],
        "precision": precision,
        "tf32": tf32,
        "vae.name": plan.sampling["vae"]["name"],
        "vae.weights_sha256": vae_sha256,
        "uint8_conversion": uint8_conversion,
        "samples.count": result["num_samples"],
        "samples.seed": spec.seed,
        "samples.index_range": [0, spec.num_samples],
        "labels.distribution": label_distribution(labels, spec.num_classes, spec.class_balanced),
        "reference.url": cfg.eval.reference_stats_url,
        "reference.sha256": result.get("reference_sha256"),
        "reference.count": result.get("num_reference_samples"),
        "extractors": [extractor_record(e) for e in extractors],
        "dinov2.extractor": (
            {**extractor_record(network), "standard": summary["standard"]} if network is not None else None
        ),
        "dinov2.reference.url": summary.get("reference_url"),
        "dinov2.reference.sha256": summary.get("reference_sha256"),
        "dinov2.reference.count": summary.get("num_reference_samples"),
        "versions.repa": repa.__version__,
        "versions.torch": torch.__version__,
        "versions.torch_fidelity": version("torch-fidelity"),
    }
