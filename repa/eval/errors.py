"""The one error type of the metrics stack (images, features, statistics, evaluation, reference files)."""

from __future__ import annotations

__all__ = ["MetricsError"]


class MetricsError(ValueError):
    """Bad input to an evaluation (images, statistics, weights); the message names the culprit."""
