"""Shared by the eval unit tests (test_stats, test_images, test_features, test_refstats, test_metrics).

Independent reference formulas (ADM's scipy Fréchet distance, an exact cross-Gram FID), synthetic
images a conv net sees structure in, two tiny non-Inception extractors, and a one-thread context
for torch and BLAS/LAPACK.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator

import numpy as np
import scipy.linalg
import torch
import torch.nn.functional as F
from torch import nn

SIZE = 64


@contextlib.contextmanager
def one_thread_everywhere() -> Iterator[None]:
    """One thread for torch and BLAS/LAPACK while the context is open.

    On 2 CPU cores shared with other jobs, 2-thread Inception runs ~3x slower and a 2-thread
    OpenBLAS eigh of a 2048x2048 matrix ~15x slower (spin-waiting) than one thread.
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # optional: only speeds the numpy/scipy linear algebra up
        limits = contextlib.nullcontext()
    else:
        limits = threadpool_limits(1)
    with limits:
        yield
    torch.set_num_threads(previous)


# ----------------------------------------------------------------------------------------------------------
# Independent reference: ADM's evaluator formula (openai/guided-diffusion evaluations/evaluator.py,
# FIDStatistics.frechet_distance), written here from its description, not imported from the library.
# ----------------------------------------------------------------------------------------------------------


def adm_frechet_distance(mu1, sigma1, mu2, sigma2, eps=1e-6):
    mu1, mu2 = np.atleast_1d(mu1), np.atleast_1d(mu2)
    sigma1, sigma2 = np.atleast_2d(sigma1), np.atleast_2d(sigma2)
    diff = mu1 - mu2
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # LinAlgWarning (singular) / DeprecationWarning (disp, SciPy 1.17)
        out = scipy.linalg.sqrtm(sigma1.dot(sigma2), disp=False)  # (sqrtm, errest); SciPy 1.17 1x1: sqrtm
        covmean = out[0] if isinstance(out, tuple) else out
        if not np.isfinite(covmean).all():
            offset = np.eye(sigma1.shape[0]) * eps
            covmean = scipy.linalg.sqrtm((sigma1 + offset).dot(sigma2 + offset))
    if np.iscomplexobj(covmean):
        assert np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3)
        covmean = covmean.real
    return float(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def exact_fid_from_features(x: np.ndarray, y: np.ndarray) -> float:
    """FID of two feature sets through their cross-Gram matrix, exact when N < D.

    With centred X (n1, D), Y (n2, D): S1 = X^T X / (n1-1), S2 = Y^T Y / (n2-1), and the non-zero
    eigenvalues of S1 S2 are those of X Y^T Y X^T / ((n1-1)(n2-1)), so tr((S1 S2)^{1/2}) is the nuclear
    norm of X Y^T over sqrt((n1-1)(n2-1)): one SVD of an n1 x n2 matrix, no square root of a singular
    D x D matrix.
    """
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    mx, my = x.mean(axis=0), y.mean(axis=0)
    xc, yc = x - mx, y - my
    n1, n2 = len(x), len(y)
    nuclear = np.linalg.svd(xc @ yc.T, compute_uv=False).sum()
    trace1, trace2 = (xc * xc).sum() / (n1 - 1), (yc * yc).sum() / (n2 - 1)
    return float((mx - my) @ (mx - my) + trace1 + trace2 - 2 * nuclear / np.sqrt((n1 - 1) * (n2 - 1)))


def rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-300)


def smooth_images(n: int, seed: int, contrast: float = 1.0, size: int = SIZE) -> torch.Tensor:
    """uint8 (n, 3, size, size): upsampled 8x8 noise, so a conv net sees structure, not white noise."""
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(n, 3, 8, 8, generator=g)
    x = F.interpolate(low, size=(size, size), mode="bilinear", align_corners=False)
    x = 0.5 + contrast * (x - 0.5)
    return (x * 255).round().clamp(0, 255).to(torch.uint8)


def mixed_images(n: int, seed: int, contrast: float = 1.0) -> torch.Tensor:
    """Half coarse (4x4), half fine (16x16) noise with random brightness: a random Inception's features
    collapse for look-alike inputs, this spread gives non-trivial FID, IS and precision/recall."""
    g = torch.Generator().manual_seed(seed)
    halves = []
    for res, count in ((4, n // 2), (16, n - n // 2)):
        low = torch.rand(count, 3, res, res, generator=g)
        x = F.interpolate(low, size=(SIZE, SIZE), mode="bilinear", align_corners=False)
        x = 0.5 + contrast * (x - 0.5) + 0.6 * (torch.rand(count, 1, 1, 1, generator=g) - 0.5)
        halves.append((x * 255).round().clamp(0, 255).to(torch.uint8))
    return torch.cat(halves)


class ToyClassifier(nn.Module):
    """A non-Inception extractor: penultimate features (8) and logits (10) of a tiny random CNN."""

    name = "toy"

    def __init__(self) -> None:
        super().__init__()
        with torch.random.fork_rng():  # fixed weights without touching the global RNG
            torch.manual_seed(0)
            self.conv = nn.Conv2d(3, 8, kernel_size=4, stride=4)
            self.head = nn.Linear(8, 10)
        self.eval()
        self.calls = 0

    def features_and_logits(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.calls += 1
        x = images.float() / 127.5 - 1  # (B, 3, H, W)
        h = F.relu(self.conv(x)).mean(dim=(2, 3))  # (B, 8)
        return h, self.head(h)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.features_and_logits(images)[0]


class FeaturesOnly:
    """A plain callable extractor (no nn.Module, no logits): the minimum the protocol asks for."""

    name = "flat"

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return images.float().mean(dim=(2, 3))  # (B, 3)
