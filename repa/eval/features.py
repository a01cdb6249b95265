"""Feature extraction: the Inception network FID/IS are defined on, and one streaming pass over images.

- :class:`InceptionFeatureExtractor`: torch-fidelity's ``inception-v3-compat`` network (the TF
  2015-12-05 InceptionV3 that ADM's evaluator uses, ported bit-faithfully, including TF1's bilinear
  resize to 299x299): pool_3 features (2048) and the bias-free logits (1008) that ADM's softmax
  graph uses. :func:`build_inception` loads it from a local path or fsspec URL and never downloads
  (clusters often lack network); the weights must be a plain state dict of tensors.
- :func:`iter_features` / :func:`extract_features`: one pass of any :class:`FeatureExtractor` over an
  :data:`~repa.eval.images.ImageSource`, giving features, logits and running statistics at once.

Why not hand torch-fidelity a Dataset and call ``calculate_metrics``: its datasets must be held
whole (50K x 256^2 x 3 = 9.8 GB), each metric would re-run Inception, and ADM's precomputed
reference ``mu``/``sigma`` have no loader there. Here one streaming pass gives features, logits and
running statistics, and ranks can merge statistics. The tests check that the numbers equal
torch-fidelity's ``calculate_metrics`` on the same images and weights (tests/unit/test_metrics.py).

Any other network can stand in for Inception through the :class:`FeatureExtractor` protocol; the
Fréchet distance is then reported as ``FD_<name>`` (e.g. a toy classifier's penultimate features).
"""

from __future__ import annotations

import hashlib
import importlib
import logging
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import torch
from torch import nn

from repa import storage
from repa.eval.errors import EvalError, MetricsError
from repa.eval.images import ImageSource, iter_image_batches
from repa.eval.stats import FeatureStats, RunningFeatureStats

if TYPE_CHECKING:
    from repa.config import RunConfig

__all__ = [
    "INCEPTION_NAME",
    "INCEPTION_WEIGHTS_FILENAME",
    "INCEPTION_WEIGHTS_SOURCE_URL",
    "ExtractedFeatures",
    "FeatureExtractor",
    "InceptionFeatureExtractor",
    "build_extractor",
    "build_inception",
    "compute_feature_stats",
    "extract_features",
    "extractor_device",
    "extractor_identity",
    "is_published_inception",
    "iter_features",
    "sha256_file",
]

logger = logging.getLogger(__name__)

INCEPTION_NAME = "inception-v3-compat"
"""torch-fidelity's name for the TF-compatible InceptionV3; FID is only comparable with this network."""
INCEPTION_WEIGHTS_FILENAME = "weights-inception-2015-12-05-6726825d.pth"
INCEPTION_WEIGHTS_SOURCE_URL = (
    "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/" + INCEPTION_WEIGHTS_FILENAME
)
# torch.hub's convention: the published file's name carries its sha256 prefix.
INCEPTION_SHA256_PREFIX = re.search(r"-([0-9a-f]{8})\.pth$", INCEPTION_WEIGHTS_FILENAME).group(1)


def is_published_inception(name: str | None, weights_sha256: str | None) -> bool:
    """True for the Inception network FID is defined on, with the published weights (by sha256 prefix).

    Anything else (the random weights of ``repa demo`` and the tests, another network) gives a Fréchet
    distance that compares only with itself, never with a paper's FID.
    """
    return name == INCEPTION_NAME and (weights_sha256 or "").startswith(INCEPTION_SHA256_PREFIX)


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


def build_inception(
    weights_url: str | storage.Location | None, device: str | torch.device | None = None
) -> InceptionFeatureExtractor:
    """The FID/IS network from a local path or fsspec URL; never downloads (clusters often lack network).

    ``device`` defaults to CUDA when available; remote weights are read from a local copy under
    ``repa.storage.cache_dir()/inception`` (torch-fidelity only reads paths).
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
        path = storage.local_copy(weights_url, kind="inception")
    except FileNotFoundError as e:
        raise MetricsError(f"Inception weights {str(weights_url)!r} not found") from e
    extractor = InceptionFeatureExtractor(path)
    device = torch.device(device) if device is not None else _default_device()
    return extractor.to(device)


def _default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def extractor_device(extractor: Any) -> torch.device:
    """Where ``extractor`` takes input: its ``device``, else an nn.Module's first parameter's, else CPU."""
    device = getattr(extractor, "device", None)
    if isinstance(device, (torch.device, str)):
        return torch.device(device)
    if isinstance(extractor, nn.Module):
        for p in extractor.parameters():
            return p.device
    return torch.device("cpu")


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


def iter_features(
    extractor: FeatureExtractor,
    images: ImageSource,
    batch_size: int,
    with_logits: bool,
    expected_size: tuple[int, int] | None = None,
    expected_size_label: str = "",
) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]]:
    """Yield (images uint8 CPU (B,3,H,W), features (B,D) float32 CPU, logits (B,C) or None) per batch.

    The one pass over images behind :func:`extract_features` and reference statistics
    (:func:`repa.eval.refstats.compute_reference_stats`). ``expected_size`` (H, W) rejects images of
    another size before they are processed, naming ``expected_size_label`` in the error.
    """
    name = getattr(extractor, "name", type(extractor).__name__)
    if with_logits and not hasattr(extractor, "features_and_logits"):
        raise MetricsError(f"feature extractor {name!r} has no features_and_logits(); cannot compute an IS")
    device = extractor_device(extractor)
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
    for batch, f, lg in iter_features(
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
# The extractor a config names
# ----------------------------------------------------------------------------------------------------------


def extractor_identity(cfg: RunConfig) -> dict[str, Any]:
    """What names the feature network before it is built (its weights sha256 is added to results)."""
    factory = cfg.eval.feature_extractor
    if factory:
        return {"factory": factory}
    return {"name": INCEPTION_NAME, "weights_url": cfg.eval.inception_weights_url}


def build_extractor(cfg: RunConfig, device: torch.device | str = "cpu") -> Any:
    """Inception (``eval.inception_weights_url``) or ``eval.feature_extractor`` = ``"module:callable"``
    returning any FeatureExtractor (its Fréchet distance is reported as ``FD_<name>``).

    The factory is imported by name (``importlib``) because it lives in the user's code, not repa's.
    """
    factory = cfg.eval.feature_extractor
    if not factory:
        return build_inception(cfg.storage.locate(cfg.eval.inception_weights_url), device=device)
    module_name, _, attr = factory.partition(":")
    if not module_name or not attr:
        raise EvalError(
            f"eval.feature_extractor {factory!r}: expected MODULE:CALLABLE, e.g. mypkg.feats:build"
        )
    try:
        fn = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as e:
        raise EvalError(f"eval.feature_extractor {factory!r}: cannot import it ({e})") from e
    extractor = fn()
    if not callable(extractor) or not isinstance(getattr(extractor, "name", None), str):
        raise EvalError(
            f"eval.feature_extractor {factory!r} returned {type(extractor).__name__}, which is not a "
            "FeatureExtractor (a callable with a `name` attribute)"
        )
    if isinstance(extractor, torch.nn.Module):
        extractor = extractor.to(device).eval()
    return extractor
