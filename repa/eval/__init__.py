"""Evaluation: FID / Inception Score / precision-recall (ADM's protocol), reference statistics, provenance.

Modules, each with one job: ``stats`` (Fréchet distance, IS, precision/recall on feature arrays),
``images`` (uint8 image batches from tensors, ``.npz`` files and folders), ``features`` (the feature
networks: Inception, the extractor a config names, the feature pass), ``refstats`` (reference statistics
files and the statistics of a prepared dataset), ``metrics`` (all metrics of one sample set against one
reference, and the result JSON), ``provenance`` (how a number was made; `repa eval compare`),
``report`` (score names, TensorBoard), ``args`` (the CLI glue of sample/eval/watch), the work of the
verbs: ``sample``, ``evaluate`` (``EvalProtocol``, ``plan_evaluation``, ``evaluate_checkpoint``),
``sweep`` (a guidance sweep of one checkpoint) and ``watch``, and ``commands`` (`repa eval`'s command line).

Typical use::

    from repa.eval.metrics import score_images

    extractor = build_inception("s3://bucket/weights/weights-inception-2015-12-05-6726825d.pth")
    reference = load_reference_stats("s3://bucket/ref/VIRTUAL_imagenet256_labeled.npz")
    result = score_images(samples, reference, extractor)     # samples: uint8 (N, 3, H, W) batches
    write_result_json("s3://bucket/run/eval/step-400000.json", result, protocol={...})
"""

from repa.eval.errors import MetricsError
from repa.eval.features import (
    INCEPTION_NAME,
    INCEPTION_WEIGHTS_FILENAME,
    INCEPTION_WEIGHTS_SOURCE_URL,
    ExtractedFeatures,
    FeatureExtractor,
    InceptionFeatureExtractor,
    build_inception,
    compute_feature_stats,
    extract_features,
    sha256_file,
)
from repa.eval.images import ImageSource, UInt8ImageDataset, iter_image_batches
from repa.eval.metrics import EvalResult, evaluate_features, write_result_json
from repa.eval.refstats import (
    ReferenceStats,
    ReferenceStatsError,
    compute_reference_stats,
    load_reference_stats,
    save_reference_stats,
)
from repa.eval.stats import (
    FeatureStats,
    RunningFeatureStats,
    frechet_distance,
    inception_score,
    precision_recall,
)

__all__ = [
    "INCEPTION_NAME",
    "INCEPTION_WEIGHTS_FILENAME",
    "INCEPTION_WEIGHTS_SOURCE_URL",
    "EvalResult",
    "ExtractedFeatures",
    "FeatureExtractor",
    "FeatureStats",
    "ImageSource",
    "InceptionFeatureExtractor",
    "MetricsError",
    "ReferenceStats",
    "ReferenceStatsError",
    "RunningFeatureStats",
    "UInt8ImageDataset",
    "build_inception",
    "compute_feature_stats",
    "compute_reference_stats",
    "evaluate_features",
    "extract_features",
    "frechet_distance",
    "inception_score",
    "iter_image_batches",
    "load_reference_stats",
    "precision_recall",
    "save_reference_stats",
    "sha256_file",
    "write_result_json",
]
