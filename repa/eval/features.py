"""Feature extraction: the Inception network FID/IS are defined on, and one streaming pass over images.

- :class:`InceptionFeatureExtractor`: torch-fidelity's ``inception-v3-compat`` network (the TF
  2015-12-05 InceptionV3 that ADM's evaluator uses, ported bit-faithfully, including TF1's bilinear
  resize to 299x299): pool_3 features (2048) and the bias-free logits (1008) that ADM's softmax
  graph uses. :func:`build_inception` loads it from a local path or fsspec URL and never downloads
  (clusters often lack network); the weights must be a plain state dict of tensors.
  The same pass also gives sFID's spatial features (``mixed_6/conv``, :mod:`repa.eval.inception`).
- :class:`FeaturePass` / :func:`extract_features`: one pass of any :class:`FeatureExtractor` over an
  :data:`~repa.eval.images.ImageSource`, giving features, logits, sFID's spatial features and running
  statistics at once.

Why not hand torch-fidelity a Dataset and call ``calculate_metrics``: its datasets must be held
whole (50K x 256^2 x 3 = 9.8 GB), each metric would re-run Inception, and ADM's precomputed
reference ``mu``/``sigma`` have no loader there. Here one streaming pass gives features, logits and
running statistics, and ranks can merge statistics. The tests check that the numbers equal
torch-fidelity's ``calculate_metrics`` on the same images and weights
(tests/integration/test_metrics_parity.py).

Any other network can stand in for Inception through the :class:`FeatureExtractor` protocol; the
Fréchet distance is then reported as ``FD_<name>`` (e.g. a toy classifier's penultimate features).
"""

from __future__ import annotations

import hashlib
import importlib
import logging
import re
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import torch
from torch import nn

from repa import storage
from repa.eval.errors import EvalError, MetricsError
from repa.eval.images import ImageSource, iter_image_batches
from repa.eval.inception import SpatialTap
from repa.eval.stats import FeatureStats, RunningFeatureStats

if TYPE_CHECKING:
    from repa.config import RunConfig

__all__ = [
    "INCEPTION_NAME",
    "INCEPTION_WEIGHTS_FILENAME",
    "INCEPTION_WEIGHTS_SOURCE_URL",
    "ExtractedFeatures",
    "FeatureBatch",
    "FeatureExtractor",
    "FeaturePass",
    "InceptionFeatureExtractor",
    "build_extractor",
    "build_inception",
    "compute_feature_stats",
    "extract_features",
    "extract_features_many",
    "extractor_device",
    "extractor_identity",
    "extractor_provenance",
    "frechet_name",
    "is_published_inception",
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


def frechet_name(name: str | None, weights_sha256: str | None) -> str:
    """What a Fréchet distance in ``name``'s feature space is called: ``FID`` (Inception, published
    weights), ``FD`` (any other Inception file) or ``FD_<name>`` (another network)."""
    if name == INCEPTION_NAME:
        return "FID" if is_published_inception(name, weights_sha256) else "FD"
    return f"FD_{name}"


# ----------------------------------------------------------------------------------------------------------
# Feature extractors
# ----------------------------------------------------------------------------------------------------------


@runtime_checkable
class FeatureExtractor(Protocol):
    """Anything mapping uint8 images (B, 3, H, W) to features (B, D).

    ``name`` labels the metric (``FD_<name>``; Inception's gives ``FID``) and is checked against the
    name stored with reference statistics. Optional members used when present:
    ``features_and_logits(images) -> ((B, D), (B, C))`` enables the Inception Score,
    ``features_logits_spatial(images) -> ((B, D), (B, C), (B, 2023))`` enables sFID,
    ``weights_sha256: str`` is recorded and checked against references, ``device`` (or, for an
    ``nn.Module``, its first parameter's device) is where batches are sent.
    """

    name: str

    def __call__(self, images: torch.Tensor) -> torch.Tensor: ...


class InceptionFeatureExtractor(nn.Module):
    """torch-fidelity's TF-compatible InceptionV3: pool_3 features (2048), bias-free logits (1008) and,
    from a hook in the same pass, sFID's ``mixed_6/conv`` features (2023; :mod:`repa.eval.inception`)."""

    name = INCEPTION_NAME
    feature_dim = 2048
    resize = "torch-fidelity interpolate_bilinear_2d_like_tensorflow1x to 299x299 (TF1 bilinear, as ADM)"

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
        self._spatial = SpatialTap(self.net)

    @property
    def device(self) -> torch.device:
        return next(self.net.parameters()).device

    def features_and_logits(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features, logits = self.net(images)  # (B, 2048), (B, 1008); resized to 299x299 inside
        return features, logits

    def features_logits_spatial(
        self, images: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        features, logits = self.net(images)
        return features, logits, self._spatial.take()

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


def extractor_provenance(extractor: Any) -> dict[str, str | None]:
    """What a result records about a feature network: ``name``, ``weights_sha256`` (of the file it was
    built from) and ``resize`` (the resize path into it, as text); None where the extractor does not say."""
    return {
        "name": getattr(extractor, "name", type(extractor).__name__),
        "weights_sha256": getattr(extractor, "weights_sha256", None),
        "resize": getattr(extractor, "resize", None),
    }


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
    spatial_stats: FeatureStats | None = None  # sFID's mixed_6/conv statistics (2023), when asked for

    @property
    def num_samples(self) -> int:
        return self.stats.num_samples


@dataclass
class FeatureBatch:
    """What one batch of images gives in the one pass (all float32 on the CPU but ``images``)."""

    images: torch.Tensor  # (B, 3, H, W) uint8, CPU
    features: torch.Tensor  # (B, D)
    logits: torch.Tensor | None  # (B, C) when asked for
    spatial: torch.Tensor | None  # (B, 2023) sFID features when asked for


class FeaturePass:
    """One extractor's share of a pass over images: checks, runs it on each batch, accumulates.

    :func:`extract_features` drives one; :func:`extract_features_many` drives several over the same
    batches, so images are read once however many networks score them (Inception for FID, sFID, IS
    and precision/recall; DINOv2 for FD-DINOv2), and each network sees each image once.
    """

    def __init__(
        self,
        extractor: FeatureExtractor,
        with_logits: bool = False,
        with_spatial: bool = False,
        keep_features: bool = True,
        expected_size: tuple[int, int] | None = None,
        expected_size_label: str = "the expected size",
    ) -> None:
        self.extractor = extractor
        self.name = getattr(extractor, "name", type(extractor).__name__)
        if with_logits and not hasattr(extractor, "features_and_logits"):
            raise MetricsError(
                f"feature extractor {self.name!r} has no features_and_logits(); cannot compute an IS"
            )
        if with_spatial and not hasattr(extractor, "features_logits_spatial"):
            raise MetricsError(
                f"feature extractor {self.name!r} has no spatial features; sFID needs Inception's"
            )
        if isinstance(extractor, nn.Module) and extractor.training:
            logger.warning(
                "feature extractor %r is in training mode (dropout/batch norm on): call .eval()", self.name
            )
        self.with_logits, self.with_spatial, self.keep_features = with_logits, with_spatial, keep_features
        self.expected_size, self.expected_size_label = expected_size, expected_size_label
        self.device = extractor_device(extractor)
        self.running = RunningFeatureStats()
        self.running_spatial = RunningFeatureStats() if with_spatial else None
        self.features: list[torch.Tensor] = []
        self.logits: list[torch.Tensor] = []
        self.size: tuple[int, int] | None = None
        self.seconds = 0.0

    def run(self, batch: torch.Tensor) -> FeatureBatch:
        """Features of one uint8 CPU batch (B, 3, H, W) (under ``torch.inference_mode`` by the caller)."""
        if self.expected_size is not None and tuple(batch.shape[2:]) != tuple(self.expected_size):
            raise MetricsError(
                f"image size {tuple(batch.shape[2:])} does not match {self.expected_size_label} "
                f"{tuple(self.expected_size)}"
            )
        x = batch.to(self.device, non_blocking=True)
        spatial = None
        if self.with_spatial:
            feats, logits, spatial = self.extractor.features_logits_spatial(x)
            logits = logits if self.with_logits else None
        elif self.with_logits:
            feats, logits = self.extractor.features_and_logits(x)
        else:
            feats, logits = self.extractor(x), None
        if not torch.is_tensor(feats) or feats.ndim != 2 or feats.shape[0] != batch.shape[0]:
            shape = tuple(feats.shape) if torch.is_tensor(feats) else type(feats).__name__
            raise MetricsError(
                f"feature extractor {self.name!r} returned {shape}, expected ({batch.shape[0]}, D)"
            )
        return FeatureBatch(
            images=batch,
            features=feats.float().cpu(),
            logits=None if logits is None else logits.float().cpu(),
            spatial=None if spatial is None else spatial.float().cpu(),
        )

    def add(self, batch: torch.Tensor) -> FeatureBatch:
        """:meth:`run` and accumulate: running statistics, and the features/logits kept."""
        start = time.perf_counter()
        b = self.run(batch)
        self.size = (int(batch.shape[2]), int(batch.shape[3]))
        self.running.update(b.features)
        if self.running_spatial is not None:
            self.running_spatial.update(b.spatial)
        if self.keep_features:
            self.features.append(b.features)
        if b.logits is not None:
            self.logits.append(b.logits)
        self.seconds += time.perf_counter() - start
        return b

    def result(self) -> ExtractedFeatures:
        if self.size is None:
            raise MetricsError("no images were given")
        logger.info(
            "extracted %s features of %d images (%dx%d) in %.1f s",
            self.name,
            self.running.n,
            self.size[0],
            self.size[1],
            self.seconds,
        )
        return ExtractedFeatures(
            stats=self.running.finalize(),
            features=torch.cat(self.features) if self.keep_features else None,
            logits=torch.cat(self.logits) if self.logits else None,
            image_size=self.size,
            extractor_name=self.name,
            extractor_sha256=getattr(self.extractor, "weights_sha256", None),
            spatial_stats=None if self.running_spatial is None else self.running_spatial.finalize(),
        )


def extract_features_many(
    passes: list[FeaturePass], images: ImageSource, batch_size: int = 64
) -> list[ExtractedFeatures]:
    """Read ``images`` once and give every batch to each pass in turn; one result per pass."""
    with torch.inference_mode():
        for batch in iter_image_batches(images, batch_size):
            for one in passes:
                one.add(batch)
    return [one.result() for one in passes]


def extract_features(
    extractor: FeatureExtractor,
    images: ImageSource,
    batch_size: int = 64,
    with_logits: bool = False,
    keep_features: bool = True,
    expected_size: tuple[int, int] | None = None,
    expected_size_label: str = "the expected size",
    with_spatial: bool = False,
) -> ExtractedFeatures:
    """Run ``extractor`` over all images: running stats, and (optionally) all features and logits.

    ``with_spatial`` adds sFID's statistics (Inception only) from the same pass. ``expected_size``
    (H, W) rejects images of another size before they are processed.
    """
    one = FeaturePass(extractor, with_logits, with_spatial, keep_features, expected_size, expected_size_label)
    return extract_features_many([one], images, batch_size)[0]


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
        if not cfg.eval.inception_weights_url:
            raise MetricsError(
                "eval.inception_weights_url is null: FID/IS need torch-fidelity's TF-ported InceptionV3 "
                f"({INCEPTION_WEIGHTS_FILENAME}) and repa never downloads it; `repa weights fetch DEST "
                "--only inception` stages it and prints the --set line (or set eval.feature_extractor)"
            )
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
