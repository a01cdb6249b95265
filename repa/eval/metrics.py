"""Sample-quality metrics: FID, Inception Score and precision/recall, as ADM's evaluator defines them.

REPA reports FID-50K, sFID, IS, precision and recall from ADM's TensorFlow evaluation suite
(openai/guided-diffusion ``evaluations/evaluator.py``) against ``VIRTUAL_imagenet256_labeled.npz``
(REPA.md §8). repa computes the same quantities in PyTorch:

- features: torch-fidelity's ``inception-v3-compat`` network (the TF 2015-12-05 InceptionV3 ported
  bit-faithfully, including TF1's bilinear resize to 299x299), pool_3 features (2048) and the
  bias-free logits (1008) that ADM's softmax graph uses;
- FID (Heusel et al. 2017): Fréchet distance between Gaussians fitted to the pool features,
  ``|mu1 - mu2|^2 + tr(S1 + S2 - 2 (S1 S2)^{1/2})`` (Dowson & Landau 1982) — :func:`frechet_distance`,
  the only implementation in repa;
- IS (Salimans et al. 2016): ``exp(E_x KL(p(y|x) || p(y)))`` over 10 contiguous splits —
  :func:`inception_score`;
- precision/recall (Kynkäänniemi et al. 2019): k-NN (k=3) manifolds of the pool features —
  :func:`precision_recall`.

Why not hand torch-fidelity a Dataset and call ``calculate_metrics``: its datasets must be held
whole (50K x 256^2 x 3 = 9.8 GB), each metric would re-run Inception, and ADM's precomputed
reference ``mu``/``sigma`` have no loader there. Here one streaming pass gives features, logits and
running statistics, and ranks can merge statistics. The tests check that the numbers equal
torch-fidelity's ``calculate_metrics`` on the same images and weights.

Any other network can stand in for Inception through the :class:`FeatureExtractor` protocol; the
Fréchet distance is then reported as ``FD_<name>`` (e.g. a toy classifier's penultimate features).
Inception weights are never downloaded: pass a local path or fsspec URL (see :func:`build_inception`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import logging
import os
import tempfile
import time
import zipfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from repa import storage

if TYPE_CHECKING:
    from repa.eval.refstats import ReferenceStats

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
    "RunningFeatureStats",
    "UInt8ImageDataset",
    "build_inception",
    "compute_feature_stats",
    "evaluate",
    "evaluate_features",
    "extract_features",
    "frechet_distance",
    "inception_score",
    "iter_image_batches",
    "local_copy",
    "precision_recall",
    "sha256_file",
    "write_result_json",
]

logger = logging.getLogger(__name__)

INCEPTION_NAME = "inception-v3-compat"
"""torch-fidelity's name for the TF-compatible InceptionV3; FID is only comparable with this network."""
INCEPTION_WEIGHTS_FILENAME = "weights-inception-2015-12-05-6726825d.pth"
INCEPTION_WEIGHTS_SOURCE_URL = (
    "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/" + INCEPTION_WEIGHTS_FILENAME
)
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")


class MetricsError(ValueError):
    """Bad input to an evaluation (images, statistics, weights); the message names the culprit."""


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


def frechet_distance(mu1: Any, sigma1: Any, mu2: Any, sigma2: Any) -> float:
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
    ~1e-12 of the exact value (tests/unit/test_metrics.py). With full-rank statistics (FID-50K) all
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
    _check_psd(w1, "sigma1")
    _check_psd(np.linalg.eigvalsh(s2), "sigma2")
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
        if self.n < 2:
            raise MetricsError(f"need at least 2 samples for a covariance, got {self.n}")
        return FeatureStats(mu=self.mean.copy(), sigma=self.scatter / (self.n - 1), num_samples=self.n)


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


# ----------------------------------------------------------------------------------------------------------
# Feature extractors
# ----------------------------------------------------------------------------------------------------------


@runtime_checkable
class FeatureExtractor(Protocol):
    """Anything mapping uint8 images (B, 3, H, W) to features (B, D).

    ``name`` labels the metric (``FD_<name>``; Inception's gives ``FID``) and is checked against the
    name stored with reference statistics. Optional members used when present:
    ``features_and_logits(images) -> ((B, D), (B, C))`` enables the Inception Score,
    ``weights_sha256: str`` is recorded and checked against references, ``device`` (or, for an
    ``nn.Module``, its first parameter's device) is where batches are sent.
    """

    name: str

    def __call__(self, images: torch.Tensor) -> torch.Tensor: ...


class InceptionFeatureExtractor(nn.Module):
    """torch-fidelity's TF-compatible InceptionV3: pool_3 features (2048) and bias-free logits (1008)."""

    name = INCEPTION_NAME
    feature_dim = 2048

    def __init__(self, weights_path: str, weights_sha256: str | None = None) -> None:
        super().__init__()
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

        _check_state_dict_file(weights_path)
        try:
            self.net = FeatureExtractorInceptionV3(
                INCEPTION_NAME, ["2048", "logits_unbiased"], feature_extractor_weights_path=weights_path
            )
        except RuntimeError as e:  # load_state_dict: missing/unexpected keys, shape mismatches
            raise MetricsError(
                f"Inception weights {weights_path!r} do not fit torch-fidelity's InceptionV3: "
                f"{str(e).splitlines()[0]}"
            ) from e
        self.weights_sha256 = weights_sha256 or sha256_file(weights_path)
        self.requires_grad_(False).eval()

    @property
    def device(self) -> torch.device:
        return next(self.net.parameters()).device

    def features_and_logits(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features, logits = self.net(images)  # (B, 2048), (B, 1008); resized to 299x299 inside
        return features, logits

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.features_and_logits(images)[0]


def _check_state_dict_file(path: str) -> None:
    # torch-fidelity reads the file with weights_only=False; refuse anything that is not plain tensors first.
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError as e:
        raise MetricsError(f"Inception weights {path!r} not found") from e
    except Exception as e:
        raise MetricsError(
            f"Inception weights {path!r} are not a plain state dict loadable with weights_only=True: "
            f"{str(e).splitlines()[0]}"
        ) from e
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        raise MetricsError(f"Inception weights {path!r} are not a state dict of tensors")


def sha256_file(path: str, chunk_bytes: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk_bytes):
            digest.update(block)
    return digest.hexdigest()


def local_copy(url: str, cache_dir: str | None = None, storage_options: dict[str, Any] | None = None) -> str:
    """Local path for ``url``: a local path as is, a remote object copied once into ``cache_dir``.

    Libraries that only take paths (torch-fidelity, ``np.load``) read the copy. The cache file name
    includes a hash of the URL; a copy whose size differs from the remote object is refreshed.
    Default cache dir: ``$TMPDIR/repa-cache`` (writable even with a read-only root filesystem when
    /tmp is an emptyDir).
    """
    fs, path = storage.filesystem(url, storage_options)
    protocols = fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)
    if "file" in protocols or "local" in protocols:
        if not os.path.exists(path):
            raise FileNotFoundError(f"{url}: not found")
        return path
    try:
        remote_size = fs.size(path)
    except FileNotFoundError as e:
        raise FileNotFoundError(f"{url}: not found") from e
    cache_dir = cache_dir or os.path.join(tempfile.gettempdir(), "repa-cache")
    key = hashlib.sha256(url.encode()).hexdigest()[:16]
    local = os.path.join(cache_dir, f"{key}-{os.path.basename(path.rstrip('/')) or 'file'}")
    if not (os.path.exists(local) and os.path.getsize(local) == remote_size):
        logger.info("copying %s to %s", url, local)
        storage.write_bytes_atomic(local, storage.read_bytes(url, storage_options))
    return local


def build_inception(
    weights_url: str | None,
    device: str | torch.device | None = None,
    cache_dir: str | None = None,
    storage_options: dict[str, Any] | None = None,
) -> InceptionFeatureExtractor:
    """The FID/IS network from a local path or fsspec URL; never downloads (clusters often lack network).

    ``device`` defaults to CUDA when available; remote weights are copied to ``cache_dir`` first.
    """
    if not weights_url:
        raise MetricsError(
            "no Inception weights given: FID/IS need torch-fidelity's TF-ported InceptionV3 "
            f"({INCEPTION_WEIGHTS_FILENAME}), and repa never downloads them. Fetch the file once where there "
            f"is network ({INCEPTION_WEIGHTS_SOURCE_URL}), copy it to storage you can read "
            "(a local path or s3://, gs://, ... URL) and pass that location as the Inception weights "
            "(weights_url)."
        )
    try:
        path = local_copy(weights_url, cache_dir, storage_options)
    except FileNotFoundError as e:
        raise MetricsError(f"Inception weights {weights_url!r} not found") from e
    extractor = InceptionFeatureExtractor(path)
    device = torch.device(device) if device is not None else _default_device()
    return extractor.to(device)


def _default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _extractor_device(extractor: Any) -> torch.device:
    device = getattr(extractor, "device", None)
    if isinstance(device, (torch.device, str)):
        return torch.device(device)
    if isinstance(extractor, nn.Module):
        for p in extractor.parameters():
            return p.device
    return torch.device("cpu")


# ----------------------------------------------------------------------------------------------------------
# Image inputs
# ----------------------------------------------------------------------------------------------------------

ImageSource = torch.Tensor | np.ndarray | str | os.PathLike | Iterable[torch.Tensor | np.ndarray]
"""uint8 images: a tensor (N, 3, H, W); an array (N, H, W, 3) (ADM's ``arr_0`` layout); an iterable
of such batches; or a path/URL of an ``.npz`` (key ``arr_0``), of a folder of ``.npz`` chunks, or of a
folder of .png/.jpg files."""


def _as_nchw_uint8(batch: Any, where: str) -> torch.Tensor:
    """Validate one batch and return it as a uint8 tensor (B, 3, H, W)."""
    if isinstance(batch, np.ndarray):
        if batch.ndim != 4 or batch.shape[-1] != 3:
            raise MetricsError(
                f"{where}: numpy images must be (N, H, W, 3) uint8 (ADM's arr_0 layout), got shape "
                f"{batch.shape}; pass NCHW images as a torch tensor"
            )
        if batch.dtype != np.uint8:
            raise MetricsError(f"{where}: images must be uint8 in [0, 255], got dtype {batch.dtype}")
        return torch.from_numpy(np.ascontiguousarray(batch)).permute(0, 3, 1, 2)
    if not torch.is_tensor(batch):
        raise MetricsError(
            f"{where}: expected a uint8 torch tensor or numpy array, got {type(batch).__name__}"
        )
    if batch.dtype != torch.uint8:
        raise MetricsError(
            f"{where}: images must be uint8 in [0, 255], got dtype {batch.dtype} "
            "(convert with (x.clamp(-1, 1) + 1) * 127.5 -> uint8, or as the sampler does)"
        )
    if batch.ndim != 4 or batch.shape[1] != 3:
        raise MetricsError(
            f"{where}: images must be (N, 3, H, W) with 3 channels, got shape {tuple(batch.shape)}"
        )
    return batch


def _iter_npz_array(url: str, key: str, batch_size: int) -> Iterator[np.ndarray]:
    """Stream rows of one array of an .npz without loading it whole (a 50K x 256^2 arr_0 is 9.8 GB)."""
    if not storage.exists(url):
        raise MetricsError(f"{url}: not found")
    with storage.open_url(url) as f, zipfile.ZipFile(f) as zf:
        names = [n[:-4] for n in zf.namelist() if n.endswith(".npy")]
        if key not in names:
            raise MetricsError(f"{url}: no array {key!r} in the npz; found keys {sorted(names)}")
        with zf.open(key + ".npy") as member:
            version = np.lib.format.read_magic(member)
            if version == (1, 0):
                shape, fortran_order, dtype = np.lib.format.read_array_header_1_0(member)
            else:
                shape, fortran_order, dtype = np.lib.format.read_array_header_2_0(member)
            if fortran_order or len(shape) == 0 or dtype.hasobject:
                raise MetricsError(
                    f"{url}: array {key!r} must be a C-ordered numeric array, got {shape} {dtype}"
                )
            row_bytes = int(np.prod(shape[1:], dtype=np.int64)) * dtype.itemsize
            for start in range(0, shape[0], batch_size):
                rows = min(batch_size, shape[0] - start)
                buf = member.read(rows * row_bytes)
                yield np.frombuffer(bytearray(buf), dtype=dtype).reshape((rows, *shape[1:]))  # writable


def _iter_folder(url: str, batch_size: int) -> Iterator[np.ndarray]:
    """A folder of ``.npz`` chunks (``arr_0`` each, name order; what ``repa sample`` writes under
    ``chunks/``) or else of .png/.jpg images (name order)."""
    from PIL import Image

    entries = storage.listdir(url)
    chunks = [n for n in entries if n.endswith(".npz")]
    if chunks:
        for name in chunks:
            yield from _iter_npz_array(storage.join(url, name), "arr_0", batch_size)
        return
    names = [n for n in entries if n.lower().endswith(IMAGE_EXTENSIONS)]
    if not names:
        raise MetricsError(f"{url}: no .npz files and no {'/'.join(IMAGE_EXTENSIONS)} images found")
    for start in range(0, len(names), batch_size):
        batch = []
        for name in names[start : start + batch_size]:
            with Image.open(io.BytesIO(storage.read_bytes(storage.join(url, name)))) as img:
                batch.append(np.asarray(img.convert("RGB")))
        shapes = {b.shape for b in batch}
        if len(shapes) > 1:
            raise MetricsError(f"{url}: images of different sizes {sorted(shapes)}")
        yield np.stack(batch)


def iter_image_batches(images: ImageSource, batch_size: int = 64) -> Iterator[torch.Tensor]:
    """Yield validated uint8 (B<=batch_size, 3, H, W) CPU tensors from any :data:`ImageSource`.

    Raises :class:`MetricsError` naming the batch for a wrong dtype, layout or channel count, or when
    batches disagree in image size.
    """
    if batch_size < 1:
        raise MetricsError(f"batch_size must be >= 1, got {batch_size}")
    if isinstance(images, os.PathLike):
        images = os.fspath(images)
    if isinstance(images, str):
        source = _iter_npz_array(images, "arr_0", batch_size) if images.endswith(".npz") else None
        if source is None:
            source = _iter_folder(images, batch_size)
        label = images
    elif torch.is_tensor(images) or isinstance(images, np.ndarray):
        source = iter([images])
        label = "images"
    else:
        source = iter(images)
        label = "images"
    size: tuple[int, int] | None = None
    for i, raw in enumerate(source):
        batch = _as_nchw_uint8(raw, f"{label} (batch {i})")
        if size is None:
            size = (batch.shape[2], batch.shape[3])
        elif (batch.shape[2], batch.shape[3]) != size:
            raise MetricsError(
                f"{label} (batch {i}): image size {tuple(batch.shape[2:])} differs from earlier "
                f"batches {size}"
            )
        yield from batch.split(batch_size)


class UInt8ImageDataset(Dataset):
    """uint8 images as the ``Dataset`` torch-fidelity's ``calculate_metrics`` accepts (items (3, H, W))."""

    def __init__(self, images: torch.Tensor | np.ndarray) -> None:
        self.images = _as_nchw_uint8(images, "UInt8ImageDataset")

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.images[i]


# ----------------------------------------------------------------------------------------------------------
# Feature extraction
# ----------------------------------------------------------------------------------------------------------


@dataclass
class ExtractedFeatures:
    """One pass of an extractor over a set of images."""

    stats: FeatureStats
    features: torch.Tensor | None  # (N, D) float32, CPU; None when not kept
    logits: torch.Tensor | None  # (N, C) float32, CPU; None without a classifier head
    image_size: tuple[int, int]  # (H, W) of the inputs
    extractor_name: str
    extractor_sha256: str | None

    @property
    def num_samples(self) -> int:
        return self.stats.num_samples


def _iter_features(
    extractor: FeatureExtractor,
    images: ImageSource,
    batch_size: int,
    with_logits: bool,
    expected_size: tuple[int, int] | None = None,
    expected_size_label: str = "",
) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]]:
    """Yield (images uint8 CPU (B,3,H,W), features (B,D) float32 CPU, logits (B,C) or None)."""
    name = getattr(extractor, "name", type(extractor).__name__)
    if with_logits and not hasattr(extractor, "features_and_logits"):
        raise MetricsError(f"feature extractor {name!r} has no features_and_logits(); cannot compute an IS")
    device = _extractor_device(extractor)
    if isinstance(extractor, nn.Module) and extractor.training:
        logger.warning("feature extractor %r is in training mode (dropout/batch norm on): call .eval()", name)
    with torch.inference_mode():
        for batch in iter_image_batches(images, batch_size):
            if expected_size is not None and tuple(batch.shape[2:]) != tuple(expected_size):
                raise MetricsError(
                    f"image size {tuple(batch.shape[2:])} does not match {expected_size_label} "
                    f"{tuple(expected_size)}"
                )
            x = batch.to(device, non_blocking=True)
            if with_logits:
                feats, logits = extractor.features_and_logits(x)
            else:
                feats, logits = extractor(x), None
            if not torch.is_tensor(feats) or feats.ndim != 2 or feats.shape[0] != batch.shape[0]:
                shape = tuple(feats.shape) if torch.is_tensor(feats) else type(feats).__name__
                raise MetricsError(
                    f"feature extractor {name!r} returned {shape}, expected ({batch.shape[0]}, D)"
                )
            yield batch, feats.float().cpu(), None if logits is None else logits.float().cpu()


def extract_features(
    extractor: FeatureExtractor,
    images: ImageSource,
    batch_size: int = 64,
    with_logits: bool = False,
    keep_features: bool = True,
    expected_size: tuple[int, int] | None = None,
    expected_size_label: str = "the expected size",
) -> ExtractedFeatures:
    """Run ``extractor`` over all images: running stats, and (optionally) all features and logits.

    ``expected_size`` (H, W) rejects images of another size before they are processed.
    """
    running = RunningFeatureStats()
    feats, logits = [], []
    size: tuple[int, int] | None = None
    start = time.perf_counter()
    for batch, f, lg in _iter_features(
        extractor, images, batch_size, with_logits, expected_size, expected_size_label
    ):
        size = (batch.shape[2], batch.shape[3])
        running.update(f)
        if keep_features:
            feats.append(f)
        if lg is not None:
            logits.append(lg)
    if size is None:
        raise MetricsError("no images were given")
    name = getattr(extractor, "name", type(extractor).__name__)
    logger.info(
        "extracted %s features of %d images (%dx%d) in %.1f s",
        name,
        running.n,
        size[0],
        size[1],
        time.perf_counter() - start,
    )
    return ExtractedFeatures(
        stats=running.finalize(),
        features=torch.cat(feats) if keep_features else None,
        logits=torch.cat(logits) if logits else None,
        image_size=size,
        extractor_name=name,
        extractor_sha256=getattr(extractor, "weights_sha256", None),
    )


def compute_feature_stats(
    extractor: FeatureExtractor, images: ImageSource, batch_size: int = 64
) -> FeatureStats:
    """mu/sigma of ``extractor``'s features over ``images`` (streaming; nothing but the stats is kept)."""
    return extract_features(extractor, images, batch_size=batch_size, keep_features=False).stats


# ----------------------------------------------------------------------------------------------------------
# Evaluation
# ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class EvalResult:
    """Metrics of one sample set against one reference.

    ``fid`` is the Fréchet distance in the extractor's feature space: FID for ``inception-v3-compat``,
    ``FD_<name>`` otherwise (see :attr:`metric_name`).
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

    @property
    def metric_name(self) -> str:
        return "FID" if self.feature_extractor == INCEPTION_NAME else f"FD_{self.feature_extractor}"

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
) -> EvalResult:
    """Metrics from already-extracted generated features (e.g. gathered from all ranks).

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
    fd = frechet_distance(generated.stats.mu, generated.stats.sigma, ref_stats.mu, ref_stats.sigma)

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
        device = _extractor_device(extractor) if extractor is not None else torch.device("cpu")
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


def evaluate(
    images: ImageSource,
    reference: ReferenceStats,
    extractor: FeatureExtractor,
    inception_score_splits: int | None = 10,
    precision_recall_k: int | None = 3,
    batch_size: int = 64,
    pr_batch_size: int = 10000,
) -> EvalResult:
    """FID (or FD_<name>), IS and precision/recall of ``images`` against ``reference`` in one pass.

    Pass ``inception_score_splits=None`` / ``precision_recall_k=None`` to skip IS / PR (e.g. for an
    extractor without logits, or a reference with mu/sigma only). Images must match the reference
    image size when it is known (ADM's reference batch is 256x256); this is checked before any
    feature is computed.
    """
    name = getattr(extractor, "name", type(extractor).__name__)
    with_logits = bool(inception_score_splits)
    if with_logits and not hasattr(extractor, "features_and_logits"):
        raise MetricsError(
            f"feature extractor {name!r} has no classifier logits; pass inception_score_splits=None"
        )
    _check_same_extractor(reference, name, getattr(extractor, "weights_sha256", None))
    if precision_recall_k:
        _check_precision_recall_possible(reference, name)  # before the (long) pass over the samples
    generated = extract_features(
        extractor,
        images,
        batch_size=batch_size,
        with_logits=with_logits,
        expected_size=reference.image_size,
        expected_size_label=f"the image size of {_describe(reference)}",
    )
    return evaluate_features(
        generated,
        reference,
        extractor,
        inception_score_splits=inception_score_splits,
        precision_recall_k=precision_recall_k,
        batch_size=batch_size,
        pr_batch_size=pr_batch_size,
    )


def write_result_json(
    url: str, result: EvalResult, protocol: dict[str, Any], storage_options: dict[str, Any] | None = None
) -> None:
    """Write ``{...result fields, "protocol": protocol}`` as JSON, atomically (readers never see half a file).

    ``protocol`` records how the samples were made (checkpoint, sampler, steps, cfg, seed, ...), so a
    number can be traced back; it must be JSON-serialisable.
    """
    payload = result.to_dict()
    payload["protocol"] = protocol
    try:
        text = json.dumps(payload, indent=2, sort_keys=True, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise MetricsError(f"evaluation result for {url} is not JSON-serialisable: {e}") from e
    storage.write_bytes_atomic(url, (text + "\n").encode(), storage_options)
