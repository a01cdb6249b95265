"""The error types of the metrics stack (images, features, statistics, evaluation, reference files)."""

from __future__ import annotations

__all__ = ["EvalError", "MetricsError"]


class MetricsError(ValueError):
    """Bad input to an evaluation (images, statistics, weights); the message names the culprit."""


class EvalError(ValueError):
    """Bad evaluation input (reference statistics, extractor, image size, result files); the message
    names it."""
