"""Sample-quality metrics of one sample set against one reference: FID, IS, precision/recall and the result.

REPA reports FID-50K, sFID, IS, precision and recall from ADM's TensorFlow evaluation suite
(openai/guided-diffusion ``evaluations/evaluator.py``) against ``VIRTUAL_imagenet256_labeled.npz``
(docs/reproducing.md, "Evaluate with the paper's protocol"). :func:`score_images` computes the same
quantities in PyTorch in one pass: images (:mod:`repa.eval.images`) through the feature extractor
(:mod:`repa.eval.features`), then the statistics (:mod:`repa.eval.stats`) against reference
statistics (:mod:`repa.eval.refstats`), after checking that both come from the same network, weights
and image size. :func:`write_result_json` records the :class:`EvalResult` with how the samples were
made.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from repa import storage
from repa.eval.errors import MetricsError
from repa.eval.features import (
    INCEPTION_NAME,
    ExtractedFeatures,
    FeatureExtractor,
    FeaturePass,
    extract_features,
    extract_features_many,
    extractor_device,
    frechet_name,
)
from repa.eval.images import ImageSource
from repa.eval.refstats import ReferenceStats
from repa.eval.stats import (
    check_sample_count,
    checked_frechet_distance,
    class_balance,
    inception_score,
    precision_recall,
)

__all__ = [
    "EvalResult",
    "MetricJob",
    "check_metric_jobs",
    "evaluate_features",
    "evaluate_many",
    "score_images",
    "write_result_json",
]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class EvalResult:
    """Metrics of one sample set against one reference.

    ``fid`` is the Fréchet distance in the extractor's feature space: FID only for ``inception-v3-compat``
    with the published weights, ``FD`` for other Inception weights, ``FD_<name>`` for other networks
    (see :attr:`metric_name`; ``repa.eval.report`` names it for people).
    """

    fid: float
    inception_score_mean: float | None
    inception_score_std: float | None
    precision: float | None
    recall: float | None
    num_samples: int
    num_reference_samples: int | None  # images behind the reference mu/sigma, when recorded
    feature_extractor: str
    feature_extractor_sha256: str | None
    reference_sha256: str | None
    reference_url: str | None
    image_size: tuple[int, int]
    sfid: float | None = None  # ADM's sFID (mixed_6/conv statistics), when the reference has mu_s/sigma_s
    class_balance: dict[str, Any] | None = (
        None  # stats.class_balance of the labels; its "problem" names a bad set
    )

    @property
    def metric_name(self) -> str:
        return frechet_name(self.feature_extractor, self.feature_extractor_sha256)

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["image_size"] = list(self.image_size)
        out["metric_name"] = self.metric_name
        return out

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent, sort_keys=True)


def _describe(reference: ReferenceStats) -> str:
    return f"reference statistics {reference.source!r}" if reference.source else "reference statistics"


def _check_same_extractor(reference: ReferenceStats, name: str, sha256: str | None) -> None:
    if reference.feature_extractor is None and name != INCEPTION_NAME:
        # ADM's files name no network: their statistics are Inception's, whatever their dimension.
        raise MetricsError(
            f"{_describe(reference)} record no feature extractor (ADM's files: Inception's features), so "
            f"they cannot be compared with {name!r} features; compute statistics with that network "
            "(`repa eval ref-stats --feature-extractor ...`)"
        )
    if reference.feature_extractor is not None and reference.feature_extractor != name:
        raise MetricsError(
            f"{_describe(reference)} were computed with feature extractor {reference.feature_extractor!r}, "
            f"not {name!r}"
        )
    if reference.feature_extractor_sha256 and sha256 and reference.feature_extractor_sha256 != sha256:
        raise MetricsError(
            f"{_describe(reference)} were computed with different {name} weights "
            f"(sha256 {reference.feature_extractor_sha256[:12]}..., these are {sha256[:12]}...)"
        )


def _check_precision_recall_possible(reference: ReferenceStats, name: str) -> None:
    has_features = reference.features is not None and reference.feature_extractor == name
    if not has_features and reference.images is None:
        raise MetricsError(
            f"precision/recall need reference images (ADM's arr_0) or stored {name} features, and "
            f"{_describe(reference)} have neither; compute them with keep_features/keep_images or "
            "disable precision/recall"
        )


def evaluate_features(
    generated: ExtractedFeatures,
    reference: ReferenceStats,
    extractor: FeatureExtractor | None = None,
    inception_score_splits: int | None = 10,
    precision_recall_k: int | None = 3,
    batch_size: int = 64,
    pr_batch_size: int = 10000,
    labels: Any = None,
    num_classes: int | None = None,
) -> EvalResult:
    """Metrics from already-extracted generated features (e.g. gathered from all ranks).

    Degenerate statistics are refused before any number is made (:func:`repa.eval.stats.check_gaussian`,
    :func:`~repa.eval.stats.check_sample_count`). ``labels``/``num_classes`` (class-conditional
    samples) add :func:`~repa.eval.stats.class_balance` to the result.

    FID/FD always; IS when ``inception_score_splits`` is set (needs logits); precision/recall when
    ``precision_recall_k`` is set: against ``reference.features`` if stored with the same extractor,
    else against features of ``reference.images`` (then ``extractor`` is required).
    """
    _check_same_extractor(reference, generated.extractor_name, generated.extractor_sha256)
    ref_stats = reference.stats
    if ref_stats.dim != generated.stats.dim:
        raise MetricsError(
            f"{_describe(reference)} have {ref_stats.dim} features, "
            f"{generated.extractor_name} gives {generated.stats.dim}"
        )
    if reference.image_size is not None and tuple(reference.image_size) != tuple(generated.image_size):
        raise MetricsError(
            f"generated images are {tuple(generated.image_size)} but {_describe(reference)} are of "
            f"{tuple(reference.image_size)} images; evaluate at the reference resolution"
        )
    name = generated.extractor_name
    if labels is not None and not num_classes:
        raise MetricsError("class labels were given without num_classes; pass the model's number of classes")
    check_sample_count(
        generated.num_samples, "generated samples", is_splits=inception_score_splits, pr_k=precision_recall_k
    )
    if reference.num_images is not None:
        check_sample_count(reference.num_images, _describe(reference))
    fd = checked_frechet_distance(
        generated.stats, ref_stats, f"generated samples ({name} features)", f"{_describe(reference)} ({name})"
    )
    sfid = None
    if generated.spatial_stats is not None and reference.spatial_stats is not None:
        gs, rs = generated.spatial_stats, reference.spatial_stats
        if gs.dim != rs.dim:
            raise MetricsError(
                f"{_describe(reference)} have {rs.dim} sFID features (mu_s), Inception gives {gs.dim}"
            )
        sfid = checked_frechet_distance(
            gs,
            rs,
            "generated samples (sFID's mixed_6/conv features)",
            f"{_describe(reference)} (sFID's mu_s/sigma_s)",
        )

    is_mean = is_std = None
    if inception_score_splits:
        if generated.logits is None:
            raise MetricsError(
                f"inception score needs logits; {generated.extractor_name} features were extracted "
                "without them"
            )
        is_mean, is_std = inception_score(generated.logits, splits=inception_score_splits)

    precision = recall = None
    if precision_recall_k:
        if generated.features is None:
            raise MetricsError(
                "precision/recall need the generated features (extract with keep_features=True)"
            )
        ref_features = _reference_features(reference, extractor, generated.extractor_name, batch_size)
        device = extractor_device(extractor) if extractor is not None else torch.device("cpu")
        precision, recall = precision_recall(
            generated.features.to(device),
            ref_features.to(device),
            k=precision_recall_k,
            batch_size=pr_batch_size,
        )
    return EvalResult(
        fid=fd,
        inception_score_mean=is_mean,
        inception_score_std=is_std,
        precision=precision,
        recall=recall,
        num_samples=generated.num_samples,
        num_reference_samples=reference.num_images,
        feature_extractor=generated.extractor_name,
        feature_extractor_sha256=generated.extractor_sha256,
        reference_sha256=reference.sha256,
        reference_url=reference.source,
        image_size=tuple(generated.image_size),
        sfid=sfid,
        class_balance=None if labels is None else class_balance(labels, num_classes),
    )


def _reference_features(
    reference: ReferenceStats, extractor: FeatureExtractor | None, name: str, batch_size: int
) -> torch.Tensor:
    """Stored features if made by this extractor, else features of ``reference.images``, computed once
    per extractor and kept in ``reference.feature_cache`` (an eval loop over checkpoints reuses them)."""
    if reference.features is not None and reference.feature_extractor == name:
        return torch.from_numpy(np.asarray(reference.features, dtype=np.float32))
    _check_precision_recall_possible(reference, name)
    key = (name, getattr(extractor, "weights_sha256", None))
    if key not in reference.feature_cache:
        if extractor is None:
            raise MetricsError("precision/recall against reference images need the feature extractor")
        logger.info("extracting %s features of %d reference images", name, len(reference.images))
        reference.feature_cache[key] = extract_features(
            extractor, reference.images, batch_size=batch_size
        ).features
    return reference.feature_cache[key]


@dataclass
class MetricJob:
    """One network's metrics in a pass: ``extractor`` against ``reference``, IS / PR when set."""

    extractor: FeatureExtractor
    reference: ReferenceStats
    inception_score_splits: int | None = None
    precision_recall_k: int | None = None


def _plan_pass(job: MetricJob) -> FeaturePass:
    """Everything that can be refused before the (long) pass over the samples, and that job's pass."""
    extractor, reference = job.extractor, job.reference
    name = getattr(extractor, "name", type(extractor).__name__)
    with_logits = bool(job.inception_score_splits)
    if with_logits and not hasattr(extractor, "features_and_logits"):
        raise MetricsError(
            f"feature extractor {name!r} has no classifier logits; pass inception_score_splits=None"
        )
    _check_same_extractor(reference, name, getattr(extractor, "weights_sha256", None))
    if job.precision_recall_k:
        _check_precision_recall_possible(reference, name)
    # sFID whenever the reference has mu_s/sigma_s and the extractor is Inception: same pass, no extra cost.
    with_spatial = reference.mu_s is not None and hasattr(extractor, "features_logits_spatial")
    return FeaturePass(
        extractor,
        with_logits=with_logits,
        with_spatial=with_spatial,
        keep_features=bool(job.precision_recall_k),
        expected_size=reference.image_size,
        expected_size_label=f"the image size of {_describe(reference)}",
    )


def check_metric_jobs(jobs: list[MetricJob], num_samples: int, image_size: tuple[int, int]) -> None:
    """What :func:`evaluate_many` would refuse, refused before the samples are drawn: an extractor
    without logits asked for IS, a reference of another network or feature count, precision/recall
    without reference features or images, ``num_samples`` too few for a requested metric."""
    for job in jobs:
        reference, name = job.reference, getattr(job.extractor, "name", type(job.extractor).__name__)
        if reference.image_size is not None and tuple(reference.image_size) != tuple(image_size):
            (h, w), (rh, rw) = image_size, reference.image_size
            raise MetricsError(
                f"generated images will be {h}x{w} but {_describe(reference)} are for {rh}x{rw} images; "
                "use reference statistics of that resolution (`repa eval ref-stats`) or sample at the "
                "reference resolution"
            )
        if reference.mu_s is None and hasattr(job.extractor, "features_logits_spatial"):
            logger.info("no sFID: %s hold no mu_s/sigma_s", _describe(reference))
        _plan_pass(job)
        dim = feature_dim(job.extractor, reference.image_size or image_size)
        if dim is not None and dim != reference.stats.dim:
            raise MetricsError(
                f"{_describe(reference)} have {reference.stats.dim} features, {name} gives {dim}"
            )
        check_sample_count(
            num_samples,
            "sample.num_samples",
            is_splits=job.inception_score_splits,
            pr_k=job.precision_recall_k,
        )


def feature_dim(extractor: FeatureExtractor, image_size: Any = None) -> int | None:
    """The extractor's feature count: its ``feature_dim``, else from one forward of a blank image at
    ``image_size`` (a custom network; cheap beside any real pass), else None (size unknown)."""
    dim = getattr(extractor, "feature_dim", None)
    if dim:
        return int(dim)
    if image_size is None:
        return None
    h, w = image_size
    blank = torch.zeros(1, 3, int(h), int(w), dtype=torch.uint8, device=extractor_device(extractor))
    with torch.no_grad():
        return int(extractor(blank).reshape(1, -1).shape[1])


def evaluate_many(
    images: ImageSource,
    jobs: list[MetricJob],
    batch_size: int = 64,
    pr_batch_size: int = 10000,
    labels: Any = None,
    num_classes: int | None = None,
) -> list[EvalResult]:
    """Every job's metrics from ONE read of ``images``: each network sees each image once.

    E.g. Inception against ADM's batch (FID, sFID, IS, precision/recall) and DINOv2 against its own
    reference statistics (FD-DINOv2). All jobs are checked before the first image is read.
    """
    passes = [_plan_pass(job) for job in jobs]
    extracted = extract_features_many(passes, images, batch_size)
    return [
        evaluate_features(
            generated,
            job.reference,
            job.extractor,
            inception_score_splits=job.inception_score_splits,
            precision_recall_k=job.precision_recall_k,
            batch_size=batch_size,
            pr_batch_size=pr_batch_size,
            labels=labels,
            num_classes=num_classes,
        )
        for generated, job in zip(extracted, jobs, strict=True)
    ]


def score_images(
    images: ImageSource,
    reference: ReferenceStats,
    extractor: FeatureExtractor,
    inception_score_splits: int | None = 10,
    precision_recall_k: int | None = 3,
    batch_size: int = 64,
    pr_batch_size: int = 10000,
    labels: Any = None,
    num_classes: int | None = None,
) -> EvalResult:
    """FID (or FD_<name>), sFID, IS and precision/recall of ``images`` against ``reference`` in one pass.

    sFID is computed when ``reference`` has ``mu_s``/``sigma_s`` (ADM's batches, repa's Inception
    statistics) and the extractor gives spatial features (Inception).

    Pass ``inception_score_splits=None`` / ``precision_recall_k=None`` to skip IS / PR (e.g. for an
    extractor without logits, or a reference with mu/sigma only). Images must match the reference
    image size when it is known (ADM's reference batch is 256x256); this is checked before any
    feature is computed.
    """
    job = MetricJob(extractor, reference, inception_score_splits, precision_recall_k)
    return evaluate_many(images, [job], batch_size, pr_batch_size, labels, num_classes)[0]


def write_result_json(
    url: str | storage.Location,
    result: EvalResult,
    protocol: dict[str, Any],
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Write ``{...result fields, **extra, "protocol": protocol}`` as JSON, atomically (readers never see
    half a file).

    ``protocol`` records how the samples were made (checkpoint, sampler, steps, cfg, seed, ...), so a
    number can be traced back; ``extra`` adds top-level fields (``score_label``, ``provenance``). All
    must be JSON-serialisable. Returns the payload as a reader of the file gets it.
    """
    payload = {**result.to_dict(), **(extra or {})}
    payload["protocol"] = protocol
    try:
        text = json.dumps(payload, indent=2, sort_keys=True, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise MetricsError(f"evaluation result for {url} is not JSON-serialisable: {e}") from e
    storage.write_bytes_atomic(url, (text + "\n").encode())
    return json.loads(text)  # what a reader of the file gets
