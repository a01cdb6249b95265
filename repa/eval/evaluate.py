"""`repa eval`: sample a checkpoint, then FID / sFID / IS / precision-recall (and FD-DINOv2 when asked)
against reference statistics.

One evaluation = ``repa sample`` (chunked, resumable, reused if already there) + one read of the samples
feeding each feature network once (``repa.eval.metrics.evaluate_many``: Inception, and DINOv2 with
``fd_dinov2`` in eval.metrics) + a result JSON with its provenance
(``repa.eval.provenance``) + TensorBoard scalars (``repa.eval.report``). An :class:`EvalProtocol`
(:func:`plan_evaluation`) says what decides the numbers and where everything goes, before anything
is loaded:

    {run_url}/samples/step-NNNNNNN-<sampling digest>/    the samples (as `repa sample` writes them)
    {run_url}/eval/step-NNNNNNN/result-<eval digest>.json the numbers, the protocol and the provenance
    {run_url}/tensorboard/eval/ (eval.tensorboard_run)   eval/fid, eval/best_fid, eval/sfid, eval/is,
                                                         eval/precision, eval/recall, eval/fd_dinov2,
                                                         eval/samples, eval/result (text)

The result is not written inside the checkpoint folder because checkpoint retention deletes those
folders recursively; results must outlive them. The digest covers everything that decides the
numbers (checkpoint, sampler, steps, guidance, samples, seed, VAE, reference statistics, feature
extractor, metrics), so ``repa watch`` knows from the file name alone whether a checkpoint is done.
TensorBoard scalars go to the ``eval`` sub-folder (its own TensorBoard run): TensorBoard polls only
the newest event file of a folder, so an event file of ours beside the trainer's active one would
hide the training curves until TensorBoard restarts.

The command line (``repa eval`` and its actions ref-stats, compare, sweep) is ``repa.eval.commands``.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import logging
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

import repa
from repa import checkpoint as ckpt
from repa import runtime, storage
from repa.config import VAE_DOWNSAMPLE, RunConfig
from repa.eval import sample as S
from repa.eval.dinov2 import dinov2_identity
from repa.eval.errors import EvalError
from repa.eval.features import build_extractor, extractor_identity
from repa.runtime import DistInfo, broadcast_object

log = logging.getLogger(__name__)

__all__ = [
    "EvalError",
    "EvalOutcome",
    "EvalProtocol",
    "evaluate_checkpoint",
    "plan_evaluation",
]

IS_SPLITS = 10  # ADM / torch-fidelity: 10 splits
PR_K = 3  # ADM's ManifestEstimator k


# ----------------------------------------------------------------------------------------------
# Planning: digests and locations (cheap; what `repa watch` needs without loading anything)
# ----------------------------------------------------------------------------------------------


def _identity(
    sampling: dict[str, Any],
    reference_stats_url: str,
    extractor: dict[str, Any],
    metrics: tuple[str, ...],
    dinov2: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """What decides an evaluation's numbers, hashed into its result's file name (unchanged since v1;
    FD-DINOv2's network and reference are added only when asked for, so other digests stay as they were)."""
    out = {
        "sampling": sampling,
        "reference_stats_url": reference_stats_url,
        "feature_extractor": extractor,
        "metrics": sorted(metrics),
    }
    if dinov2 is not None:
        out["fd_dinov2"] = dinov2
    return out


@dataclass(frozen=True)
class EvalProtocol:
    """One evaluation, planned: what decides its numbers (the digest) and where its files go.

    ``sampling`` is the sample set's identity (spec, checkpoint, VAE); :attr:`identity` adds the
    reference statistics, the feature extractor, the metrics and FD-DINOv2's network and reference
    (``dinov2``, when eval.metrics has fd_dinov2). Both are hashed into file names.
    """

    source: ckpt.CheckpointSource
    spec: S.SampleSpec
    sampling: dict[str, Any]
    reference_stats_url: str
    feature_extractor: dict[str, Any]
    metrics: tuple[str, ...]
    samples: storage.Location
    result: storage.Location
    dinov2: dict[str, Any] | None = None

    @property
    def identity(self) -> dict[str, Any]:
        return _identity(
            self.sampling, self.reference_stats_url, self.feature_extractor, self.metrics, self.dinov2
        )

    @property
    def digest(self) -> str:
        return S.identity_digest(self.identity)

    @property
    def samples_url(self) -> str:
        return self.samples.url

    @property
    def result_url(self) -> str:
        return self.result.url


def plan_evaluation(cfg: RunConfig, source: ckpt.CheckpointSource) -> EvalProtocol:
    """The :class:`EvalProtocol` of ``source`` under ``cfg`` (reads nothing)."""
    cfg.require("eval.reference_stats_url", purpose="`repa eval`").require_fd_dinov2_inputs()
    spec = S.SampleSpec.from_config(cfg)
    sampling = S.sampling_identity(
        spec, source.describe(cfg.sample.checkpoint_weights), S.decoder_vae_identity(cfg)
    )
    reference, extractor, metrics = (
        cfg.eval.reference_stats_url,
        extractor_identity(cfg),
        tuple(cfg.eval.metrics),
    )
    dinov2 = dinov2_identity(cfg)
    samples_url = S.default_output_url(cfg, source, S.identity_digest(sampling))
    name = f"result-{S.identity_digest(_identity(sampling, reference, extractor, metrics, dinov2))[:12]}.json"
    if source.kind == "run" and source.run_url and source.step is not None:
        result_url = storage.join(source.run_url, "eval", ckpt.step_dir_name(source.step), name)
    else:
        result_url = storage.join(samples_url, name)
    locate = cfg.storage.locate
    return EvalProtocol(
        source, spec, sampling, reference, extractor, metrics, locate(samples_url), locate(result_url), dinov2
    )


# ----------------------------------------------------------------------------------------------
# Evaluation
# ----------------------------------------------------------------------------------------------


@dataclass
class EvalOutcome:
    """What rank 0 wrote (``result`` is the JSON payload)."""

    result_url: str
    result: dict[str, Any]
    skipped: bool = False  # True when the result already existed


def _reference_and_extractor(
    cfg: RunConfig, device: torch.device, cache: dict[Any, Any] | None
) -> tuple[Any, Any]:
    """Load (or take from ``cache``) the reference statistics and the feature network."""
    from repa.eval.refstats import load_reference_stats

    cache = {} if cache is None else cache
    with_pr = "precision_recall" in cfg.eval.metrics
    ref_key = ("reference", cfg.eval.reference_stats_url, with_pr)
    ext_key = ("extractor", json.dumps(extractor_identity(cfg), sort_keys=True), str(device))
    if ext_key not in cache:
        cache[ext_key] = build_extractor(cfg, device)
    extractor = cache[ext_key]
    if ref_key not in cache:
        cache[ref_key] = load_reference_stats(
            cfg.storage.locate(cfg.eval.reference_stats_url), load_images=with_pr
        )
    # ADM's files carry reference images, not features: repa.eval.metrics extracts them once per network
    # into the (cached) ReferenceStats, so every later checkpoint reuses them.
    return cache[ref_key], extractor


def _dinov2_reference_and_network(
    cfg: RunConfig, device: torch.device, cache: dict[Any, Any]
) -> tuple[Any, Any]:
    """FD-DINOv2's reference statistics and network (``eval.dinov2_*``), loaded once per ``cache``."""
    from repa.eval.dinov2 import build_dinov2_from_config
    from repa.eval.refstats import load_reference_stats

    url = cfg.eval.dinov2_reference_stats_url
    ref_key, net_key = ("dinov2-reference", url), ("dinov2", cfg.eval.dinov2_weights_url, str(device))
    if not storage.exists(cfg.storage.locate(url)):
        raise EvalError(
            f"eval.dinov2_reference_stats_url: {url} not found; compute DINOv2 statistics of the reference "
            "images with `repa eval ref-stats --dinov2 --data-url ... --out ...`"
        )
    if net_key not in cache:
        cache[net_key] = build_dinov2_from_config(cfg, device)
    if ref_key not in cache:
        cache[ref_key] = load_reference_stats(cfg.storage.locate(url), load_images=False)
    return cache[ref_key], cache[net_key]


def _metric_jobs(cfg: RunConfig, device: torch.device, cache: dict[Any, Any] | None) -> list[Any]:
    """The networks and references one evaluation scores with: Inception (or the configured network)
    first, then DINOv2 when eval.metrics has fd_dinov2 (``repa.eval.metrics.MetricJob``: one read of the
    samples feeds them all). Everything that can refuse them (files, names, sizes) runs here, before
    any sample is drawn."""
    from repa.eval.metrics import MetricJob, check_metric_jobs

    cache = {} if cache is None else cache
    metrics = cfg.eval.metrics
    reference, extractor = _reference_and_extractor(cfg, device, cache)
    with_logits = "is" in metrics and hasattr(extractor, "features_and_logits")
    if "is" in metrics and not with_logits:
        log.warning("feature extractor %r has no logits: no Inception Score", getattr(extractor, "name", "?"))
    jobs = [
        MetricJob(
            extractor,
            reference,
            inception_score_splits=IS_SPLITS if with_logits else None,
            precision_recall_k=PR_K if "precision_recall" in metrics else None,
        )
    ]
    if "fd_dinov2" in metrics:
        dinov2_reference, dinov2 = _dinov2_reference_and_network(cfg, device, cache)
        jobs.append(MetricJob(dinov2, dinov2_reference))
    check_metric_jobs(jobs, cfg.sample.num_samples, (cfg.data.resolution, cfg.data.resolution))
    return jobs


def _prepare(
    cfg: RunConfig, plan: EvalProtocol, info: DistInfo, force: bool, cache: dict[Any, Any] | None
) -> tuple[list[Any] | None, dict[str, Any] | None]:
    """Rank 0 checks the cheap things and loads references + networks; every rank learns the verdict.

    Returns ``(metric jobs or None, existing result or None)`` (the jobs on rank 0 only).
    """
    ref_url = cfg.eval.reference_stats_url
    status: tuple[str, str | None] = ("go", None)
    jobs = existing = None
    failure: BaseException | None = None
    if info.is_main:
        try:
            if not force and storage.exists(plan.result):
                existing = _read_result(plan)
                status = ("done", None)
            else:
                if not storage.exists(cfg.storage.locate(ref_url)):
                    raise EvalError(
                        f"eval.reference_stats_url: {ref_url} not found; compute statistics with "
                        "`repa eval ref-stats --data-url ... --out ...` or copy ADM's "
                        "VIRTUAL_imagenet256_labeled.npz there"
                    )
                jobs = _metric_jobs(cfg, info.device, cache)
        except Exception as e:
            failure, status = e, ("error", f"{type(e).__name__}: {e}")
    status = broadcast_object(info, status)  # type: ignore[assignment]
    if failure is not None:
        raise failure
    if status[0] == "error":
        raise EvalError(f"rank 0 could not prepare the evaluation: {status[1]}")
    return jobs, existing if status[0] == "done" else None


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
    share: tuple[int, int] | None = None,
    sweep_cell: bool = False,
) -> EvalOutcome | None:
    """Sample ``source`` and compute its metrics; every rank calls this, rank 0 returns the outcome.

    ``cache`` (a dict kept by the caller, e.g. ``repa watch``) keeps the reference statistics, the
    feature network and the reference's features between evaluations (ADM's reference batch is
    1.6 GB, and its 10,000 images would otherwise go through Inception for every checkpoint).

    ``sweep_cell``: a guidance sweep's cell (recorded in the result's protocol, so listings such as
    ``repa status`` tell its small-sample score from the checkpoint's evaluation).
    ``share=(part, parts)``: sample only that share of the chunks (``repa.eval.sample.generate_samples``;
    other processes make the rest) and score only when the set is then complete; else return None.

    Idempotent: an existing result for the same protocol is returned as is (``force`` recomputes),
    and samples already made are reused. Inputs that can fail cheaply (reference statistics, their
    image size, the extractor, the model) fail before any sample is drawn.
    """
    info = info or DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    plan = plan_evaluation(cfg, source)
    jobs, existing = _prepare(cfg, plan, info, force, cache)
    if existing is not None:
        log.info("%s already evaluated: %s", source.url, plan.result_url)
        return EvalOutcome(plan.result_url, existing, skipped=True) if info.is_main else None

    loaded = ckpt.load_model(cfg, source, device=info.device, check_config=check_config)
    produced = int(loaded.model.input_size) * VAE_DOWNSAMPLE[S.decoder_vae_identity(cfg)["name"]]
    if produced != cfg.data.resolution:
        raise EvalError(
            f"checkpoint {source.url} makes {produced}x{produced} images but data.resolution is "
            f"{cfg.data.resolution}"
        )
    runtime.enable_tf32(info.device, cfg.train.allow_tf32)
    vae, vae_identity = S.build_decoder_vae(cfg, info.device)
    precision = runtime.resolve_precision(cfg.sample_precision(), info.device)
    started = time.perf_counter()
    sample_set = S.generate_samples(
        loaded.model,
        plan.spec,
        out=plan.samples,
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
        share=share,
    )
    sampling_seconds = time.perf_counter() - started
    if share is not None and info.is_main:
        if sample_set.missing_chunks():
            log.info(
                "%s: this share's chunks are done; the set is scored once the others' are", plan.samples_url
            )
            return None
        if storage.exists(plan.result):  # another process of the sweep completed and scored it meanwhile
            return EvalOutcome(plan.result_url, _read_result(plan), skipped=True)
    model_args, vae_sha256 = loaded.model_args, getattr(vae, "weights_sha256", None)
    file_sha256 = loaded.file_sha256
    uint8_conversion = vae.uint8_conversion
    del loaded, vae
    if not info.is_main:
        return None

    from repa.eval.metrics import evaluate_many, write_result_json
    from repa.eval.provenance import build_provenance, checkpoint_sha256
    from repa.eval.report import (
        dinov2_summary,
        metric_tags,
        result_text,
        sample_grid,
        score_label,
        score_line,
        write_tensorboard,
    )
    from repa.eval.stats import class_balance

    started = time.perf_counter()
    labels: list[np.ndarray] = []
    try:
        result, *others = evaluate_many(
            _images_keeping_labels(sample_set, labels), jobs, batch_size=cfg.sample.batch_size_per_device
        )
    except FileNotFoundError:
        # Sample shares (a sweep's --sample-parts): two processes that finish a set's last chunks together
        # both score it; if the other one's result is there, its work stands (same samples, same numbers).
        if share is not None and storage.exists(plan.result):
            return EvalOutcome(plan.result_url, _read_result(plan), skipped=True)
        raise
    metrics_seconds = time.perf_counter() - started
    all_labels = np.concatenate(labels) if labels else np.zeros(0, np.int64)
    if model_args.get("num_classes"):  # class-conditional: are the labels the protocol's uniform draw?
        balance = class_balance(all_labels, int(model_args["num_classes"]))
        result = dataclasses.replace(result, class_balance=balance)
        if balance["problem"]:
            log.warning(
                "%s: class balance of the %d samples: %s", source.url, len(all_labels), balance["problem"]
            )
    protocol = {
        "digest": plan.digest,
        "checkpoint": {**plan.sampling["checkpoint"], "model_args": _jsonable(model_args)},
        "sampling": plan.sampling["spec"],
        "seed_rule": "sample i: torch.Generator(sample_seed(seed, i)) draws its label, z and SDE noise",
        "vae": vae_identity,
        "samples_url": plan.samples_url,
        "samples_kept": cfg.eval.keep_samples,
        "reference_stats": {"url": cfg.eval.reference_stats_url, "sha256": result.reference_sha256},
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
        **({"sweep_cell": True} if sweep_cell else {}),
    }
    payload = result.to_dict()
    extra: dict[str, Any] = {"score_label": score_label(payload)}
    if others:  # FD-DINOv2 (the second MetricJob)
        (dinov2,) = others
        extra["fd_dinov2"] = dinov2.fid
        extra["dinov2"] = dinov2_summary(dinov2, jobs[1].extractor)
        protocol["fd_dinov2"] = {**(plan.dinov2 or {}), "sha256": dinov2.feature_extractor_sha256}
    extra["provenance"] = build_provenance(
        cfg,
        plan,
        weights_sha256=checkpoint_sha256(source, plan.sampling["checkpoint"]["weights"], cfg, file_sha256),
        vae_sha256=vae_sha256,
        uint8_conversion=uint8_conversion,
        precision=precision,
        tf32=bool(cfg.train.allow_tf32) and info.device.type == "cuda",
        labels=all_labels,
        result=payload,
        extractors=[jobs[0].extractor],
        dinov2=(jobs[1].extractor, extra["dinov2"]) if others else None,
    )
    payload = {**payload, **extra, "protocol": protocol}
    # TensorBoard first, the result JSON last: the JSON marks the checkpoint as done.
    if source.run_url and source.step is not None and cfg.log.tensorboard:
        scalars = metric_tags(payload)
        grid = sample_grid(sample_set)  # the images this evaluation scored, at the checkpoint's step
        best_of = next(iter(scalars))
        run_at = cfg.storage.locate(source.run_url)
        write_tensorboard(
            run_at,
            source.step,
            scalars,
            best_of=best_of,
            grid=grid,
            text=result_text(payload),
            cfg=cfg,
            provenance=payload["provenance"],
            tensorboard_run=cfg.eval.tensorboard_run,
        )
    written = write_result_json(plan.result, result, protocol, extra=extra)
    log.info("%s step %s: %s -> %s", source.url, source.step, score_line(payload), plan.result_url)
    if not cfg.eval.keep_samples and share is None:  # shares: the sweep deletes once all cells are scored
        sample_set.delete()  # the samples only: a weights file's result lives in the same folder
    return EvalOutcome(plan.result_url, written)


def _read_result(plan: EvalProtocol) -> dict[str, Any]:
    return json.loads(storage.read_bytes(plan.result))


def _images_keeping_labels(sample_set: Any, labels: list[np.ndarray]) -> Iterator[np.ndarray]:
    """The set's images chunk by chunk, appending each chunk's class labels to ``labels`` (one read)."""
    missing = sample_set.missing_chunks()
    if missing:
        raise S.SamplingError(f"{sample_set.url}: {len(missing)} chunk(s) missing (first {missing[:5]})")
    for c in range(sample_set.spec.num_chunks):
        chunk = sample_set.read_chunk(c)
        labels.append(chunk["labels"])
        yield chunk["arr_0"]


# ----------------------------------------------------------------------------------------------
# Provenance
# ----------------------------------------------------------------------------------------------


def _code_version() -> dict[str, Any]:
    return {
        "repa_version": repa.__version__,
        "git_commit": os.environ.get("REPA_GIT_COMMIT"),
        "torch": torch.__version__,
    }


def _jsonable(obj: Any) -> Any:
    return json.loads(json.dumps(obj, default=str))
