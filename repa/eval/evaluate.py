"""`repa eval`: sample a checkpoint, then FID / IS / precision-recall against reference statistics.

One evaluation = ``repa sample`` (chunked, resumable, reused if already there) + one pass of the
feature extractor over the samples (``repa.eval.metrics``) + a result JSON + TensorBoard scalars.

Where things go, for a checkpoint ``{run_url}/checkpoints/step-NNNNNNN``:

    {run_url}/samples/step-NNNNNNN-<sampling digest>/    the samples (as `repa sample` writes them)
    {run_url}/eval/step-NNNNNNN/result-<eval digest>.json the numbers and the full protocol
    {run_url}/tensorboard/eval/                          eval/fid, eval/best_fid, eval/is, eval/precision,
                                                         eval/recall, eval/samples (a grid of the samples)

The result is not written inside the checkpoint folder because checkpoint retention deletes those
folders recursively; results must outlive them. The digest covers everything that decides the
numbers (checkpoint, sampler, steps, guidance, samples, seed, VAE, reference statistics, feature
extractor, metrics), so ``repa watch`` knows from the file name alone whether a checkpoint is done.
TensorBoard scalars go to the ``eval`` sub-folder (its own TensorBoard run): TensorBoard polls only
the newest event file of a folder, so an event file of ours beside the trainer's active one would
hide the training curves until TensorBoard restarts.

``repa eval ref-stats`` computes reference statistics from a prepared dataset (``repa prepare``
shards) with the same feature extractor; ADM's ``VIRTUAL_imagenet256_labeled.npz`` works as is.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import importlib
import io
import json
import logging
import os
import re
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

import repa
from repa import checkpoint as ckpt
from repa import runtime, storage
from repa.config import VAE_DOWNSAMPLE, ConfigError, RunConfig
from repa.eval import sample as S
from repa.eval.features import INCEPTION_NAME, INCEPTION_WEIGHTS_FILENAME
from repa.runtime import DistInfo, broadcast_object
from repa.tensorboard import EVAL_RUN

log = logging.getLogger(__name__)

__all__ = [
    "EVAL_LOG_SUBDIR",
    "EvalError",
    "EvalOutcome",
    "EvalPlan",
    "add_arguments",
    "build_extractor",
    "compute_dataset_reference_stats",
    "evaluate_checkpoint",
    "extractor_identity",
    "plan_evaluation",
    "run",
]

EVAL_LOG_SUBDIR = EVAL_RUN  # {run_url}/tensorboard/eval
GRID_IMAGES = 16  # samples shown per evaluation in TensorBoard (eval/samples)
# torch.hub's convention: the published file's name carries its sha256 prefix (features.py's filename).
INCEPTION_SHA256_PREFIX = re.search(r"-([0-9a-f]{8})\.pth$", INCEPTION_WEIGHTS_FILENAME).group(1)
IS_SPLITS = 10  # ADM / torch-fidelity: 10 splits
PR_K = 3  # ADM's ManifestEstimator k


class EvalError(ValueError):
    """Bad evaluation input (reference statistics, extractor, image size); the message names it."""


# ----------------------------------------------------------------------------------------------
# Feature extractor
# ----------------------------------------------------------------------------------------------


def extractor_identity(cfg: RunConfig) -> dict[str, Any]:
    """What names the feature network before it is built (its weights sha256 is added to results)."""
    factory = cfg.eval.feature_extractor
    if factory:
        return {"factory": factory}
    from repa.eval.features import INCEPTION_NAME

    return {"name": INCEPTION_NAME, "weights_url": cfg.eval.inception_weights_url}


def build_extractor(cfg: RunConfig, device: torch.device | str = "cpu") -> Any:
    """Inception (``eval.inception_weights_url``) or ``eval.feature_extractor`` = ``"module:callable"``
    returning any FeatureExtractor (its Fréchet distance is reported as ``FD_<name>``)."""
    factory = cfg.eval.feature_extractor
    if factory:
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
    from repa.eval.features import build_inception

    return build_inception(cfg.eval.inception_weights_url, device=device)


# ----------------------------------------------------------------------------------------------
# Planning: digests and locations (cheap; what `repa watch` needs without loading anything)
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class EvalPlan:
    """Where one evaluation's samples and result go, and the identities behind the names."""

    source: ckpt.CheckpointSource
    spec: S.SampleSpec
    sampling: dict[str, Any]  # sampling identity (spec, checkpoint, vae)
    protocol: dict[str, Any]  # evaluation identity (sampling + reference + extractor + metrics)
    samples_url: str
    result_url: str

    @property
    def digest(self) -> str:
        return S.identity_digest(self.protocol)


def plan_evaluation(cfg: RunConfig, source: ckpt.CheckpointSource) -> EvalPlan:
    """Digests and URLs of the evaluation of ``source`` under ``cfg`` (reads nothing)."""
    cfg.require("eval.reference_stats_url", purpose="`repa eval`")
    spec = S.SampleSpec.from_config(cfg)
    sampling = S.sampling_identity(
        spec, source.describe(cfg.sample.checkpoint_weights), S.decoder_vae_identity(cfg)
    )
    protocol = {
        "sampling": sampling,
        "reference_stats_url": cfg.eval.reference_stats_url,
        "feature_extractor": extractor_identity(cfg),
        "metrics": sorted(cfg.eval.metrics),
    }
    samples_url = S.default_output_url(cfg, source, S.identity_digest(sampling))
    digest = S.identity_digest(protocol)
    if source.kind == "run" and source.run_url and source.step is not None:
        result_url = storage.join(
            source.run_url, "eval", ckpt.step_dir_name(source.step), f"result-{digest[:12]}.json"
        )
    else:
        result_url = storage.join(samples_url, f"result-{digest[:12]}.json")
    return EvalPlan(source, spec, sampling, protocol, samples_url, result_url)


# ----------------------------------------------------------------------------------------------
# Evaluation
# ----------------------------------------------------------------------------------------------


@dataclass
class EvalOutcome:
    """What rank 0 wrote (``result`` is the JSON payload)."""

    result_url: str
    result: dict[str, Any]
    skipped: bool = False  # True when the result already existed


def _check_reference(ref: Any, url: str, image_size: int, metrics: list[str]) -> None:
    if ref.image_size is not None and tuple(ref.image_size) != (image_size, image_size):
        raise EvalError(
            f"generated images will be {image_size}x{image_size} but the reference statistics {url} are for "
            f"{ref.image_size[0]}x{ref.image_size[1]} images; use reference statistics of data.resolution="
            f"{image_size} (`repa eval ref-stats`) or sample at the reference resolution"
        )
    if "precision_recall" in metrics and ref.features is None and ref.images is None:
        raise EvalError(
            f"eval.metrics has precision_recall but the reference statistics {url} hold neither images "
            "(arr_0) nor features; drop precision_recall from eval.metrics or recompute the statistics "
            "with --keep-features"
        )


def _reference_and_extractor(
    cfg: RunConfig, device: torch.device, cache: dict[Any, Any] | None
) -> tuple[Any, Any]:
    """Load (or take from ``cache``) the reference statistics and the feature network."""
    from repa.eval.refstats import load_reference_stats

    cache = {} if cache is None else cache
    so = cfg.storage.storage_options or None
    with_pr = "precision_recall" in cfg.eval.metrics
    ref_key = ("reference", cfg.eval.reference_stats_url, with_pr)
    ext_key = ("extractor", json.dumps(extractor_identity(cfg), sort_keys=True), str(device))
    if ext_key not in cache:
        cache[ext_key] = build_extractor(cfg, device)
    extractor = cache[ext_key]
    if ref_key not in cache:
        cache[ref_key] = load_reference_stats(
            cfg.eval.reference_stats_url, load_images=with_pr, storage_options=so
        )
    reference = cache[ref_key]
    name = getattr(extractor, "name", type(extractor).__name__)
    if with_pr and reference.features is None and reference.images is not None:
        # Extract the reference images' features once (ADM files carry images, not features); the
        # metrics then use them for every later checkpoint. ADM's statistics are Inception's.
        from repa.eval.features import extract_features

        if reference.feature_extractor in (None, name):
            reference.features = extract_features(extractor, reference.images).features.numpy()
            reference.feature_extractor = name
    return reference, extractor


def _code_version() -> dict[str, Any]:
    return {
        "repa_version": repa.__version__,
        "git_commit": os.environ.get("REPA_GIT_COMMIT"),
        "torch": torch.__version__,
    }


def metric_tags(result: Any) -> dict[str, float | None]:
    """The TensorBoard scalars of one result: ``eval/fid`` (``eval/fd_<name>`` for other networks),
    ``eval/is``, ``eval/precision``, ``eval/recall``. With Inception weights that are not the published
    file (sha256 not starting with its name's prefix, e.g. the random weights of ``repa demo`` and the
    tests) every tag ends in ``_random_inception``: such numbers only compare with the same file."""
    suffix = ""
    if result.feature_extractor == INCEPTION_NAME and not (result.feature_extractor_sha256 or "").startswith(
        INCEPTION_SHA256_PREFIX
    ):
        suffix = "_random_inception"
    return {
        f"eval/{result.metric_name.lower()}{suffix}": result.fid,
        f"eval/is{suffix}": result.inception_score_mean,
        f"eval/precision{suffix}": result.precision,
        f"eval/recall{suffix}": result.recall,
    }


def sample_grid(sample_set: Any, n: int = GRID_IMAGES) -> torch.Tensor:
    """uint8 (3, H', W') grid of the first ``n`` samples of a set (the first chunk), ``sqrt(n)`` per row."""
    import math

    from torchvision.utils import make_grid

    images = torch.from_numpy(next(iter(sample_set.iter_images()))[:n]).permute(0, 3, 1, 2)
    return make_grid(images, nrow=math.ceil(math.sqrt(len(images))), padding=2)


def write_tensorboard(
    run_url: str,
    step: int,
    scalars: dict[str, float | None],
    storage_options: Any,
    *,
    best_of: str | None = None,
    grid: torch.Tensor | None = None,
    cfg: RunConfig | None = None,
) -> str:
    """One event file in ``{run_url}/tensorboard/eval`` holding ``scalars`` (and the sample ``grid`` as
    ``eval/samples``) at ``step``, flushed once. ``best_of``: a lower-is-better tag (``eval/fid``) whose
    minimum over the run's evaluations so far is also written, as ``eval/best_fid``; ``cfg``: the
    HParams session (its key values -> these FIDs, see ``repa.tensorboard.run_hparams``)."""
    from repa.tensorboard import TensorBoardLogger, read_scalars

    log_url = storage.join(run_url, "tensorboard", EVAL_LOG_SUBDIR)
    scalars = {k: v for k, v in scalars.items() if v is not None}
    if best_of in scalars:
        earlier = [v for s, v in read_scalars(log_url, storage_options).get(best_of, []) if s != step]
        scalars[best_of.replace("eval/", "eval/best_", 1)] = min([*earlier, scalars[best_of]])
    tb = TensorBoardLogger(log_url, storage_options=storage_options)
    try:
        tb.scalars(scalars, step)
        if cfg is not None:
            tb.hparams(cfg, step)
        if grid is not None:
            tb.image("eval/samples", grid, step)
    finally:
        tb.close()
    return log_url


def evaluate_checkpoint(
    cfg: RunConfig,
    source: ckpt.CheckpointSource,
    *,
    info: DistInfo | None = None,
    check_config: bool = True,
    force: bool = False,
    progress: bool = True,
    should_stop: Callable[[], bool] | None = None,
    cache: dict[Any, Any] | None = None,
) -> EvalOutcome | None:
    """Sample ``source`` and compute its metrics; every rank calls this, rank 0 returns the outcome.

    ``cache`` (a dict kept by the caller, e.g. ``repa watch``) keeps the reference statistics, the
    feature network and the reference's features between evaluations (ADM's reference batch is
    1.6 GB, and its 10,000 images would otherwise go through Inception for every checkpoint).

    Idempotent: an existing result for the same protocol is returned as is (``force`` recomputes),
    and samples already made are reused. Inputs that can fail cheaply (reference statistics, their
    image size, the extractor, the model) fail before any sample is drawn.
    """
    info = info or DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    so = cfg.storage.storage_options or None
    plan = plan_evaluation(cfg, source)
    ref_url = cfg.eval.reference_stats_url
    image_size = cfg.data.resolution

    # Rank 0 checks the cheap things and loads reference + extractor; all ranks learn the verdict.
    status: tuple[str, str | None] = ("go", None)
    reference = extractor = existing = None
    failure: BaseException | None = None
    if info.is_main:
        try:
            if not force and storage.exists(plan.result_url, so):
                existing = json.loads(storage.read_bytes(plan.result_url, so))
                status = ("done", None)
            else:
                if not storage.exists(ref_url, so):
                    raise EvalError(
                        f"eval.reference_stats_url: {ref_url} not found; compute statistics with "
                        "`repa eval ref-stats --data-url ... --out ...` or copy ADM's "
                        "VIRTUAL_imagenet256_labeled.npz there"
                    )
                reference, extractor = _reference_and_extractor(cfg, info.device, cache)
                _check_reference(reference, ref_url, image_size, cfg.eval.metrics)
        except Exception as e:
            failure, status = e, ("error", f"{type(e).__name__}: {e}")
    status = broadcast_object(info, status)  # type: ignore[assignment]
    if failure is not None:
        raise failure
    if status[0] == "error":
        raise EvalError(f"rank 0 could not prepare the evaluation: {status[1]}")
    if status[0] == "done":
        log.info("%s already evaluated: %s", source.url, plan.result_url)
        return EvalOutcome(plan.result_url, existing, skipped=True) if info.is_main else None

    loaded = ckpt.load_model(cfg, source, device=info.device, check_config=check_config, storage_options=so)
    produced = int(loaded.model.input_size) * VAE_DOWNSAMPLE[S.decoder_vae_identity(cfg)["name"]]
    if produced != image_size:
        raise EvalError(
            f"checkpoint {source.url} makes {produced}x{produced} images but data.resolution is {image_size}"
        )
    runtime.enable_tf32(info.device, cfg.train.allow_tf32)
    vae, vae_identity = S.build_decoder_vae(cfg, info.device)
    precision = runtime.resolve_precision(cfg.sample_precision(), info.device)
    started = time.perf_counter()
    sample_set = S.generate_samples(
        loaded.model,
        plan.spec,
        out_url=plan.samples_url,
        vae=vae,
        batch_size=cfg.sample.batch_size_per_device,
        dist=info,
        precision=precision,
        latents_scale=cfg.vae.latents_scale,
        latents_bias=cfg.vae.latents_bias,
        save_npz=cfg.sample.save_npz,
        checkpoint=plan.sampling["checkpoint"],
        vae_identity=vae_identity,
        progress=progress,
        should_stop=should_stop,
        storage_options=so,
    )
    sampling_seconds = time.perf_counter() - started
    model_args = loaded.model_args
    del loaded, vae
    if not info.is_main:
        return None

    from repa.eval.metrics import evaluate

    started = time.perf_counter()
    with_logits = "is" in cfg.eval.metrics and hasattr(extractor, "features_and_logits")
    if "is" in cfg.eval.metrics and not with_logits:
        log.warning("feature extractor %r has no logits: no Inception Score", getattr(extractor, "name", "?"))
    result = evaluate(
        sample_set.iter_images(),
        reference,
        extractor,
        inception_score_splits=IS_SPLITS if with_logits else None,
        precision_recall_k=PR_K if "precision_recall" in cfg.eval.metrics else None,
        batch_size=cfg.sample.batch_size_per_device,
    )
    metrics_seconds = time.perf_counter() - started
    protocol = {
        "digest": plan.digest,
        "checkpoint": {**plan.sampling["checkpoint"], "model_args": _jsonable(model_args)},
        "sampling": plan.sampling["spec"],
        "seed_rule": "sample i: torch.Generator(sample_seed(seed, i)) draws its label, z and SDE noise",
        "vae": vae_identity,
        "samples_url": plan.samples_url,
        "samples_kept": cfg.eval.keep_samples,
        "reference_stats": {"url": ref_url, "sha256": reference.sha256},
        "feature_extractor": {
            **extractor_identity(cfg),
            "name": result.feature_extractor,
            "sha256": result.feature_extractor_sha256,
        },
        "metrics": sorted(cfg.eval.metrics),
        "allow_random_weights": cfg.model.allow_random_weights,  # model.allow_random_weights (issue 20)
        "batch_size_per_device": cfg.sample.batch_size_per_device,
        "world_size": info.world_size,
        "device": str(info.device),
        "precision": precision,
        "allow_tf32": cfg.train.allow_tf32,
        "code": _code_version(),
        "timing_seconds": {"sampling": round(sampling_seconds, 3), "metrics": round(metrics_seconds, 3)},
        "created_at": datetime.datetime.now(datetime.timezone.utc).isoformat(),
    }
    # TensorBoard first, the result JSON last: the JSON marks the checkpoint as done.
    if source.run_url and source.step is not None and cfg.log.tensorboard:
        scalars = metric_tags(result)
        grid = sample_grid(sample_set)  # the images this evaluation scored, at the checkpoint's step
        best_of = next(iter(scalars))
        write_tensorboard(source.run_url, source.step, scalars, so, best_of=best_of, grid=grid, cfg=cfg)
    from repa.eval.metrics import write_result_json

    write_result_json(plan.result_url, result, protocol, so)
    log.info(
        "%s step %s: %s %.4f%s -> %s",
        source.url,
        source.step,
        result.metric_name,
        result.fid,
        "" if result.inception_score_mean is None else f", IS {result.inception_score_mean:.3f}",
        plan.result_url,
    )
    if not cfg.eval.keep_samples:
        storage.remove(plan.samples_url, recursive=True, storage_options=so)
    payload = json.loads(storage.read_bytes(plan.result_url, so))
    return EvalOutcome(plan.result_url, payload)


def _jsonable(obj: Any) -> Any:
    return json.loads(json.dumps(obj, default=str))


# ----------------------------------------------------------------------------------------------
# Reference statistics from a prepared dataset
# ----------------------------------------------------------------------------------------------


def iter_dataset_images(
    data_url: str,
    batch_size: int = 64,
    max_images: int | None = None,
    storage_options: dict[str, Any] | None = None,
) -> Iterator[torch.Tensor]:
    """uint8 (B, 3, H, W) batches of the images of a prepared dataset, in shard order."""
    from repa.data import format as fmt
    from repa.data.format import read_manifest

    manifest = read_manifest(data_url, storage_options)
    batch: list[torch.Tensor] = []
    seen = 0
    for info in manifest.shards:
        url = storage.join(data_url, info.name)
        data = storage.read_bytes(url, storage_options)
        fmt.check_shard_bytes(data, info)
        for sample in fmt.iter_shard(io.BytesIO(data), name=url, expected_keys=info.keys()):
            batch.append(torch.from_numpy(fmt.decode_png(sample["png"])))
            seen += 1
            if len(batch) == batch_size:
                yield torch.stack(batch)
                batch = []
            if max_images is not None and seen >= max_images:
                break
        if max_images is not None and seen >= max_images:
            break
    if batch:
        yield torch.stack(batch)


def compute_dataset_reference_stats(
    data_url: str,
    out_url: str,
    extractor: Any,
    *,
    batch_size: int = 64,
    keep_features: int = 10_000,
    keep_images: int = 0,
    max_images: int | None = None,
    seed: int = 0,
    storage_options: dict[str, Any] | None = None,
) -> str:
    """Statistics of ``extractor`` over a prepared dataset, saved to ``out_url``; returns its sha256."""
    from repa.eval.refstats import compute_reference_stats, save_reference_stats

    images = iter_dataset_images(data_url, batch_size, max_images, storage_options)
    ref = compute_reference_stats(
        images,
        extractor,
        batch_size=batch_size,
        keep_features=keep_features,
        keep_images=keep_images,
        seed=seed,
    )
    digest = save_reference_stats(out_url, ref, storage_options)
    log.info(
        "reference statistics of %d images of %s -> %s (sha256 %s)", ref.num_images, data_url, out_url, digest
    )
    return digest


# ----------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------


def add_eval_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of `repa eval` also used by `repa watch`."""
    parser.add_argument(
        "--feature-extractor",
        metavar="MODULE:CALLABLE",
        help="custom feature network, reported as FD_<name> (sets eval.feature_extractor). "
        "Default: Inception-v3 from eval.inception_weights_url (FID, IS)",
    )
    parser.add_argument(
        "--delete-samples",
        dest="keep_samples",
        action="store_false",
        default=None,
        help="delete the samples once the result is written (sets eval.keep_samples=false)",
    )


# `repa eval` / `repa watch` flags that are shorthands for config keys (see repa.eval.sample).
EVAL_FLAG_KEYS = {"feature_extractor": "eval.feature_extractor", "keep_samples": "eval.keep_samples"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    S.add_sampling_arguments(parser)
    parser.add_argument(
        "--checkpoint",
        "--reference-checkpoint",
        dest="checkpoint",
        metavar="URL",
        help="step folder or weights file (see `repa sample`); default: the latest committed checkpoint",
    )
    add_eval_arguments(parser)
    parser.add_argument("--force", action="store_true", help="recompute even if the result file exists")
    sub = parser.add_subparsers(dest="eval_command", metavar="[ref-stats]", title="optional action")
    p = sub.add_parser(
        "ref-stats",
        help="reference statistics (mu, sigma, features) of a prepared dataset",
        description="Compute FID reference statistics of a `repa prepare` dataset with the feature "
        "extractor. Options go after `ref-stats`.",
    )
    from repa.config import add_config_arguments

    add_config_arguments(p)
    p.add_argument("--data-url", metavar="URL", help="prepared dataset (default: data.url)")
    p.add_argument("--out", required=True, metavar="URL", help="where to write the .npz")
    p.add_argument("--feature-extractor", metavar="MODULE:CALLABLE", help="as for `repa eval`")
    p.add_argument("--keep-features", type=int, default=10_000, help="features kept for precision/recall")
    p.add_argument(
        "--keep-images", type=int, default=0, help="images kept as arr_0 (ADM evaluator compatible)"
    )
    p.add_argument("--max-images", type=int, help="use only the first N images (tests, quick looks)")
    p.add_argument("--batch-size", type=int, default=64)


def _run_ref_stats(args: argparse.Namespace) -> int:
    from repa.config import load_config

    cfg = load_config(args.config, args.overrides + S.flag_overrides(args, EVAL_FLAG_KEYS))
    data_url = args.data_url or cfg.data.url
    if not data_url:
        raise ConfigError("data.url", "required by `repa eval ref-stats` (or pass --data-url)")
    from repa.runtime import resolve_device

    device = resolve_device(cfg.train.device)
    extractor = build_extractor(cfg, device)
    digest = compute_dataset_reference_stats(
        data_url,
        args.out,
        extractor,
        batch_size=args.batch_size,
        keep_features=args.keep_features,
        keep_images=args.keep_images,
        max_images=args.max_images,
        storage_options=cfg.data.storage_options or None,
    )
    print(f"{args.out} sha256 {digest}")
    return 0


def run(args: argparse.Namespace) -> int:
    from repa import runtime as D
    from repa.eval.errors import MetricsError
    from repa.weights import WeightsError

    user_errors = (
        S.SamplingError,
        ckpt.CheckpointError,
        EvalError,
        MetricsError,
        WeightsError,
        FileNotFoundError,
    )
    if args.eval_command == "ref-stats":
        try:
            return _run_ref_stats(args)
        except ConfigError:
            raise
        except (*user_errors, ValueError) as e:
            return S.cli_error("eval ref-stats", e)
    cfg, explicit = S.resolve_config(args, EVAL_FLAG_KEYS)
    cfg.require_for("eval")
    info = D.init_distributed(cfg.train.device, cfg.train.process_group_timeout_seconds)
    try:
        so = cfg.storage.storage_options or None
        source = ckpt.resolve_checkpoint(
            args.checkpoint or cfg.sample.checkpoint_url, cfg.storage.run_url, so
        )
        outcome = evaluate_checkpoint(
            cfg,
            source,
            info=info,
            check_config=explicit,
            force=args.force,
            progress=not args.no_progress,
        )
    except ConfigError:
        raise
    except user_errors as e:
        return S.cli_error("eval", e)
    finally:
        D.shutdown()
    if outcome is not None:
        r = outcome.result
        names = [("metric_name", "fid"), ("IS", "inception_score_mean"), ("precision", "precision")]
        parts = [f"{r.get('metric_name', 'FID')} {r['fid']:.4f}"]
        parts += [f"{label} {r[key]:.4f}" for label, key in names[1:] if r.get(key) is not None]
        if r.get("recall") is not None:
            parts.append(f"recall {r['recall']:.4f}")
        print(
            f"{', '.join(parts)}{' (already evaluated)' if outcome.skipped else ''} -> {outcome.result_url}"
        )
    return 0


if __name__ == "__main__":  # pragma: no cover
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(importlib.import_module("repa.cli").main(["eval", *sys.argv[1:]]))
