"""Throughput and memory bookkeeping of the training loop (images/s over a logging window)."""

from __future__ import annotations

import time
from collections import defaultdict
from typing import Any

import torch


class Throughput:
    """Images/s over the last logging window, and running means of step metrics."""

    def __init__(self) -> None:
        self._start = time.perf_counter()
        self._images = 0
        self._sums: dict[str, float] = defaultdict(float)
        self._count = 0

    def update(self, images: int, metrics: dict[str, float]) -> None:
        self._images += images
        self._count += 1
        for key, value in metrics.items():
            self._sums[key] += value

    def summary(self) -> dict[str, Any]:
        elapsed = max(time.perf_counter() - self._start, 1e-9)
        means = {key: value / max(self._count, 1) for key, value in self._sums.items()}
        means["images_per_second"] = self._images / elapsed
        self.__init__()
        return means


def gpu_memory_gib(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    return torch.cuda.max_memory_allocated(device) / 2**30
