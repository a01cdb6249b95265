"""Statistics of feature arrays: Fréchet distance, Inception Score and precision/recall, as ADM computes them.

The quantities of ADM's evaluator (openai/guided-diffusion ``evaluations/evaluator.py``), on features
that are already extracted (numpy/torch only; no network, no storage):

- FID (Heusel et al. 2017): Fréchet distance between Gaussians fitted to the pool features,
  ``|mu1 - mu2|^2 + tr(S1 + S2 - 2 (S1 S2)^{1/2})`` (Dowson & Landau 1982) — :func:`frechet_distance`,
  the only implementation in repa; the Gaussians come from :class:`RunningFeatureStats`, a streaming,
  mergeable mean/covariance in float64;
- IS (Salimans et al. 2016): ``exp(E_x KL(p(y|x) || p(y)))`` over 10 contiguous splits —
  :func:`inception_score`;
- precision/recall (Kynkäänniemi et al. 2019): k-NN (k=3) manifolds of the pool features —
  :func:`precision_recall`;

and the checks that refuse a score rather than write a meaningless one (:func:`check_gaussian`,
:func:`check_sample_count`: non-finite, constant or collapsed features, too few samples) and name a
class-conditional sample set whose labels are not the uniform draw the protocol makes
(:func:`class_balance`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from repa.eval.errors import MetricsError

__all__ = [
    "MIN_SAMPLES",
    "FeatureStats",
    "RunningFeatureStats",
    "check_gaussian",
    "check_sample_count",
    "checked_frechet_distance",
    "class_balance",
    "frechet_distance",
    "inception_score",
    "precision_recall",
]

# ----------------------------------------------------------------------------------------------------------
# Fréchet distance and Gaussian statistics
# ----------------------------------------------------------------------------------------------------------


def _rank_tolerance(eigenvalues: np.ndarray) -> float:
    """Eigenvalues below this are rounding noise (numpy.linalg.matrix_rank's rule: max|w| * n * eps)."""
    if eigenvalues.size == 0:
        return 0.0
    return float(np.abs(eigenvalues).max() * eigenvalues.size * np.finfo(np.float64).eps)


def _check_psd(eigenvalues: np.ndarray, name: str) -> None:
    if eigenvalues.size and eigenvalues[0] < -1e-6 * max(abs(eigenvalues[-1]), 1e-300):
        raise MetricsError(f"{name} is not positive semi-definite (smallest eigenvalue {eigenvalues[0]:.3g})")


def frechet_distance(
    mu1: Any,
    sigma1: Any,
    mu2: Any,
    sigma2: Any,
    checks: Callable[[np.ndarray, np.ndarray], None] | None = None,
) -> float:
    """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2) (FID when the stats are Inception's).

    d^2 = |mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^{1/2})   (Dowson & Landau 1982).

    Write S1 = A A^T with A = V_r diag(sqrt(w_r)) from S1's eigendecomposition, keeping its r
    numerically non-zero eigenvalues. S1 S2 = A (A^T S2) and (A^T S2) A share their non-zero
    eigenvalues, and A^T S2 A (r x r) is symmetric PSD, so tr((S1 S2)^{1/2}) = sum sqrt(eig(A^T S2 A)).
    Two symmetric eigendecompositions in float64; eigenvalues at rounding level are zeroed rather
    than square-rooted, which matters when there are fewer samples than dimensions: there the
    2000-odd null eigenvalues of a 2048 x 2048 product each add ~sqrt(eps) of noise, which is why
    ADM's ``scipy.linalg.sqrtm(S1 @ S2)`` (with its eps-offset fallback) and torch-fidelity's
    ``eigvals(S1 @ S2)`` drift by ~1e-8 to ~1e-5 relative on such statistics, while this stays at
    ~1e-12 of the exact value (tests/unit/test_stats.py). With full-rank statistics (FID-50K) all
    three agree to ~1e-8.
    """
    m1 = np.asarray(mu1, dtype=np.float64)
    m2 = np.asarray(mu2, dtype=np.float64)
    s1 = np.asarray(sigma1, dtype=np.float64)
    s2 = np.asarray(sigma2, dtype=np.float64)
    if m1.ndim != 1 or m2.ndim != 1:
        raise MetricsError(f"mu1 and mu2 must be 1-D, got shapes {m1.shape} and {m2.shape}")
    if m1.shape != m2.shape:
        raise MetricsError(f"feature dimensions differ: mu1 has {m1.shape[0]}, mu2 has {m2.shape[0]}")
    d = m1.shape[0]
    for name, s in (("sigma1", s1), ("sigma2", s2)):
        if s.shape != (d, d):
            raise MetricsError(f"{name} has shape {s.shape}, expected ({d}, {d}) to match mu ({d} features)")
    for name, a in (("mu1", m1), ("sigma1", s1), ("mu2", m2), ("sigma2", s2)):
        if not np.isfinite(a).all():
            raise MetricsError(f"{name} contains NaN or inf")
    s1 = (s1 + s1.T) / 2  # stored covariances can be asymmetric at rounding level
    s2 = (s2 + s2.T) / 2
    w1, v1 = np.linalg.eigh(s1)  # ascending
    w2 = np.linalg.eigvalsh(s2)
    if checks is not None:  # checked_frechet_distance: the sanity checks reuse the eigenvalues
        checks(w1, w2)
    _check_psd(w1, "sigma1")
    _check_psd(w2, "sigma2")
    keep = w1 > _rank_tolerance(w1)
    a = v1[:, keep] * np.sqrt(w1[keep])  # (D, r), S1 = A A^T
    tr_covmean = 0.0
    if a.shape[1]:
        m = a.T @ s2 @ a  # (r, r)
        eig = np.linalg.eigvalsh((m + m.T) / 2)
        eig = np.where(eig > _rank_tolerance(eig), eig, 0.0)
        tr_covmean = float(np.sqrt(eig).sum())
    diff = m1 - m2
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * tr_covmean)


@dataclass(frozen=True)
class FeatureStats:
    """Mean and covariance (ddof=1, as ``np.cov``) of N feature vectors, in float64."""

    mu: np.ndarray  # (D,)
    sigma: np.ndarray  # (D, D)
    num_samples: int

    def __post_init__(self) -> None:
        mu = np.asarray(self.mu, dtype=np.float64)
        sigma = np.asarray(self.sigma, dtype=np.float64)
        if mu.ndim != 1:
            raise MetricsError(f"mu must be 1-D, got shape {mu.shape}")
        if sigma.shape != (mu.shape[0], mu.shape[0]):
            raise MetricsError(
                f"sigma has shape {sigma.shape} but mu has {mu.shape[0]} features; expected "
                f"({mu.shape[0]}, {mu.shape[0]})"
            )
        object.__setattr__(self, "mu", mu)
        object.__setattr__(self, "sigma", sigma)

    @property
    def dim(self) -> int:
        return int(self.mu.shape[0])

    @classmethod
    def from_features(cls, features: torch.Tensor | np.ndarray) -> FeatureStats:
        running = RunningFeatureStats()
        running.update(features)
        return running.finalize()


class RunningFeatureStats:
    """Streaming mean/covariance in float64, mergeable across batches and ranks.

    Uses the pairwise update of Chan, Golub & LeVeque (1979): for sets A, B with means mA, mB and
    scatter matrices MA, MB, M = MA + MB + (mB - mA)(mB - mA)^T nA nB / (nA + nB). Unlike
    accumulating sum(x x^T) it does not cancel catastrophically when |mean| >> spread, so
    1.28M ImageNet features give the same sigma as ``np.cov`` on all of them.
    """

    def __init__(self) -> None:
        self.n = 0
        self.mean: np.ndarray | None = None  # (D,)
        self.scatter: np.ndarray | None = None  # (D, D) = sum (x - mean)(x - mean)^T

    def update(self, features: torch.Tensor | np.ndarray) -> None:
        x = features.detach().cpu().double().numpy() if torch.is_tensor(features) else np.asarray(features)
        x = x.astype(np.float64, copy=False)
        if x.ndim != 2:
            raise MetricsError(f"features must be (N, D), got shape {x.shape}")
        if x.shape[0] == 0:
            return
        if self.mean is not None and x.shape[1] != self.mean.shape[0]:
            raise MetricsError(f"feature dimension changed from {self.mean.shape[0]} to {x.shape[1]}")
        if not np.isfinite(x).all():
            bad = int((~np.isfinite(x).all(axis=1)).sum())
            raise MetricsError(
                f"{bad} of {x.shape[0]} feature vectors in a batch contain NaN or inf: the images or the "
                "feature extractor's weights are broken (refusing to score)"
            )
        mean_b = x.mean(axis=0)
        centered = x - mean_b
        self._merge(x.shape[0], mean_b, centered.T @ centered)

    def merge(self, other: RunningFeatureStats) -> None:
        """Fold in statistics gathered elsewhere (another rank or shard)."""
        if other.n:
            self._merge(other.n, other.mean, other.scatter)

    def _merge(self, n_b: int, mean_b: np.ndarray, scatter_b: np.ndarray) -> None:
        if self.n == 0:
            self.n, self.mean, self.scatter = n_b, mean_b.copy(), scatter_b.copy()
            return
        if mean_b.shape != self.mean.shape:
            raise MetricsError(f"feature dimension changed from {self.mean.shape[0]} to {mean_b.shape[0]}")
        n_a, n = self.n, self.n + n_b
        delta = mean_b - self.mean
        self.mean = self.mean + delta * (n_b / n)
        self.scatter = self.scatter + scatter_b + np.outer(delta, delta) * (n_a * n_b / n)
        self.n = n

    def finalize(self) -> FeatureStats:
        check_sample_count(self.n, "feature statistics")  # a covariance needs 2 samples
        return FeatureStats(mu=self.mean.copy(), sigma=self.scatter / (self.n - 1), num_samples=self.n)


# ----------------------------------------------------------------------------------------------------------
# Sanity: refuse degenerate statistics (issue 22, item 5)
# ----------------------------------------------------------------------------------------------------------

MIN_SAMPLES = {"fd": 2, "is": 10, "pr": 4}
"""Fewest samples each metric is defined for: a covariance needs 2; IS's 10 splits one sample each;
precision/recall with k=3 a 4th point (k-th neighbour besides itself). ``check_sample_count``
scales IS/PR with their ``splits``/``k``. Small N is legal above these but biased (FID falls with N,
Chong & Forsyth 2020): the result records N and ``repa eval compare`` tells numbers of different N apart."""


def check_sample_count(
    n: int, what: str, fd: bool = True, is_splits: int | None = None, pr_k: int | None = None
) -> None:
    """Refuse ``n`` samples of ``what`` that are too few for a requested metric (one line, names both)."""
    needs = []
    if fd:
        needs.append(("a Fréchet distance (FID/sFID/FD)", MIN_SAMPLES["fd"]))
    if is_splits:
        needs.append((f"an Inception Score over {is_splits} splits", max(MIN_SAMPLES["is"], is_splits)))
    if pr_k:
        needs.append((f"precision/recall with k={pr_k}", pr_k + 1))
    for metric, minimum in needs:
        if n < minimum:
            raise MetricsError(
                f"{what}: {n} samples are too few for {metric}, which needs at least {minimum}"
            )


def checked_frechet_distance(
    generated: FeatureStats, reference: FeatureStats, gen_what: str, ref_what: str
) -> float:
    """:func:`frechet_distance` after :func:`check_gaussian` on both sides (sharing the eigenvalues)."""
    check_gaussian(generated, gen_what, eigenvalues=False)
    check_gaussian(reference, ref_what, eigenvalues=False)

    def collapse_checks(w_gen: np.ndarray, w_ref: np.ndarray) -> None:
        check_gaussian(generated, gen_what, eigenvalues=w_gen)
        check_gaussian(reference, ref_what, eigenvalues=w_ref)

    return frechet_distance(
        generated.mu, generated.sigma, reference.mu, reference.sigma, checks=collapse_checks
    )


def check_gaussian(stats: FeatureStats, what: str, eigenvalues: np.ndarray | bool | None = None) -> None:
    """Refuse degenerate statistics before a Fréchet distance is computed from them.

    - non-finite mu/sigma (a NaN feature anywhere poisons both);
    - constant features: sigma == 0, every sample gave the same vector (identical images, a network
      that ignores its input, a broken decode);
    - collapsed features: the covariance's numerical rank is at most a tenth of what ``N`` samples in
      ``D`` dimensions span (min(N - 1, D)), e.g. 50,000 samples that are a few hundred distinct images
      (mode collapse, a sampler returning the same batch). A Fréchet distance is computable then, but
      it does not measure what the protocol means.

    ``eigenvalues``: sigma's, when already computed; ``False`` skips the (eigenvalue) collapse check.
    """
    mu, sigma, n = stats.mu, stats.sigma, stats.num_samples
    if not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
        raise MetricsError(f"{what}: feature statistics contain NaN or inf (refusing to score)")
    total = float(np.trace(sigma))
    if total <= 1e-12 * max(1.0, float(mu @ mu)):
        raise MetricsError(
            f"{what}: features are constant over all {n} samples (variance {total:.3g}): the images are "
            "identical or the network ignores its input"
        )
    if n >= 3 and eigenvalues is not False:
        w = np.linalg.eigvalsh((sigma + sigma.T) / 2) if eigenvalues is None else np.asarray(eigenvalues)
        rank = int((w > _rank_tolerance(w)).sum())
        span = min(n - 1, stats.dim)
        if rank < span and rank <= max(1, span // 10):
            raise MetricsError(
                f"{what}: features collapsed: the covariance of {n} samples has rank {rank} of a possible "
                f"{span} (few distinct images: mode collapse or a repeated batch)"
            )


def class_balance(labels: Any, num_classes: int, p_threshold: float = 1e-6) -> dict[str, Any]:
    """Counts of a class-conditional sample set's labels and whether they fit the protocol's uniform draw.

    Samples draw their label uniformly at random (ADM/REPA ``sample_ddp.py``); the counts are then
    multinomial, and Pearson's chi-square test against uniform gives ``p_value``. ``problem`` names a
    set that is not such a draw (p below ``p_threshold``: e.g. one class, half the classes, labels
    out of range); it is recorded in the result, the score is still computed.
    """
    y = np.asarray(labels).astype(np.int64).ravel()
    out: dict[str, Any] = {"num_classes": int(num_classes), "num_samples": int(y.size), "problem": None}
    if y.size == 0:
        out["problem"] = "no labels"
        return out
    outside = int(((y < 0) | (y >= num_classes)).sum())
    counts = np.bincount(y[(y >= 0) & (y < num_classes)], minlength=num_classes)
    expected = y.size / num_classes
    stat = float(((counts - expected) ** 2).sum() / expected)
    # chi-square survival function = regularized upper incomplete gamma Q(k/2, x/2) (torch, not scipy:
    # scipy is a test-only dependency of repa)
    dof = torch.tensor((num_classes - 1) / 2, dtype=torch.float64)
    p = (
        float(torch.special.gammaincc(dof, torch.tensor(stat / 2, dtype=torch.float64)))
        if num_classes > 1
        else 1.0
    )
    out.update(
        min_count=int(counts.min()),
        max_count=int(counts.max()),
        classes_present=int((counts > 0).sum()),
        chi2=stat,
        p_value=p,
    )
    if outside:
        out["problem"] = f"{outside} labels outside [0, {num_classes})"
    elif p < p_threshold:
        out["problem"] = (
            f"labels are not a uniform draw over {num_classes} classes (chi-square p={p:.2g}; "
            f"{out['classes_present']} classes present, counts {out['min_count']}..{out['max_count']})"
        )
    return out


# ----------------------------------------------------------------------------------------------------------
# Inception Score and precision/recall
# ----------------------------------------------------------------------------------------------------------


def inception_score(
    logits: torch.Tensor | np.ndarray, splits: int = 10, shuffle_seed: int | None = None
) -> tuple[float, float]:
    """Inception Score mean and std over ``splits`` contiguous chunks (Salimans et al. 2016).

    IS = exp(E_x KL(p(y|x) || p(y))), p(y) the mean prediction within a chunk, computed in float64
    from the bias-free logits (what ADM's softmax graph and torch-fidelity's ``logits_unbiased`` use).
    Chunks are ``[i N / splits, (i+1) N / splits)``; for N = 50,000 this is ADM's 10 chunks of
    5,000. ``shuffle_seed`` permutes first with ``np.random.RandomState(seed)``, which is
    torch-fidelity's default (``samples_shuffle=True, rng_seed=2020``); ADM does not shuffle.
    """
    x = torch.as_tensor(logits).detach().cpu().double()
    if x.ndim != 2:
        raise MetricsError(f"logits must be (N, classes), got shape {tuple(x.shape)}")
    n = x.shape[0]
    if splits < 1 or n < splits:
        raise MetricsError(f"inception score needs at least splits={splits} samples, got {n}")
    if shuffle_seed is not None:
        x = x[torch.from_numpy(np.random.RandomState(shuffle_seed).permutation(n))]
    p = x.softmax(dim=1)
    log_p = x.log_softmax(dim=1)
    scores = []
    for i in range(splits):
        lo, hi = i * n // splits, (i + 1) * n // splits
        p_chunk, log_p_chunk = p[lo:hi], log_p[lo:hi]
        log_q = p_chunk.mean(dim=0, keepdim=True).log()
        kl = (p_chunk * (log_p_chunk - log_q)).sum(dim=1).mean()
        scores.append(kl.exp().item())
    return float(np.mean(scores)), float(np.std(scores))


def _knn_radii(features: torch.Tensor, k: int, batch_size: int) -> torch.Tensor:
    """Distance from each point to its k-th nearest neighbour in the same set (self excluded)."""
    return torch.cat(
        [torch.cdist(chunk, features).kthvalue(k + 1, dim=1).values for chunk in features.split(batch_size)]
    )


def _coverage(query: torch.Tensor, support: torch.Tensor, radii: torch.Tensor, batch_size: int) -> float:
    """Fraction of ``query`` points inside at least one ball B(support_j, radii_j)."""
    inside = [(torch.cdist(chunk, support) <= radii[None, :]).any(dim=1) for chunk in query.split(batch_size)]
    return torch.cat(inside).float().mean().item()


def precision_recall(
    generated: torch.Tensor | np.ndarray,
    reference: torch.Tensor | np.ndarray,
    k: int = 3,
    batch_size: int = 10000,
) -> tuple[float, float]:
    """Improved precision and recall (Kynkäänniemi et al. 2019), as ADM's ``ManifoldEstimator``.

    Each set's manifold is the union of balls around its points with radius = distance to the k-th
    nearest neighbour (k = 3 in ADM and torch-fidelity). Precision: fraction of generated points
    inside the reference manifold; recall: fraction of reference points inside the generated one.
    Runs on the features' device; peak memory is about ``batch_size x max(N_gen, N_ref) x 4`` bytes.
    """
    gen = torch.as_tensor(generated).float()
    ref = torch.as_tensor(reference).float().to(gen.device)
    if gen.ndim != 2 or ref.ndim != 2:
        raise MetricsError(f"features must be (N, D), got {tuple(gen.shape)} and {tuple(ref.shape)}")
    if gen.shape[1] != ref.shape[1]:
        raise MetricsError(f"feature dimensions differ: generated {gen.shape[1]}, reference {ref.shape[1]}")
    for name, f in (("generated", gen), ("reference", ref)):
        if f.shape[0] <= k:
            raise MetricsError(
                f"precision/recall with k={k} needs more than {k} {name} samples, got {f.shape[0]}"
            )
    radii_gen = _knn_radii(gen, k, batch_size)
    radii_ref = _knn_radii(ref, k, batch_size)
    precision = _coverage(gen, ref, radii_ref, batch_size)
    recall = _coverage(ref, gen, radii_gen, batch_size)
    return precision, recall
