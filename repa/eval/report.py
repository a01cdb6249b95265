"""What an evaluation shows: honest score names, TensorBoard tags, the sample grid, the printed line.

Numbers that say what they are (issue: a demo printed ``FID 1.47`` from a random-weights Inception on
30 samples, next to the paper's 1.42). Only the published Inception weights give an ``FID``; any other
Inception file gives ``FD (unpublished Inception weights, N samples)``, another network ``FD_<name>``,
and every printed score carries its sample count. The same names go to the result JSON
(``score_name``, ``score_label``) and to TensorBoard (``eval/fid`` only for the real thing).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from repa import storage
from repa.eval.features import INCEPTION_NAME, frechet_name, is_published_inception
from repa.tensorboard import EVAL_RUN

__all__ = [
    "EVAL_LOG_SUBDIR",
    "GRID_IMAGES",
    "TENSORBOARD_UNSMOOTHED",
    "UNPUBLISHED",
    "dinov2_summary",
    "format_comparison",
    "metric_labels",
    "metric_tags",
    "provenance_brief",
    "result_text",
    "sample_grid",
    "score_label",
    "score_line",
    "score_name",
    "tensorboard_hint",
    "write_tensorboard",
]

EVAL_LOG_SUBDIR = EVAL_RUN  # {run_url}/tensorboard/eval
GRID_IMAGES = 16  # samples shown per evaluation in TensorBoard (eval/samples)
UNPUBLISHED = "unpublished Inception weights"
_TAG_SUFFIX = "_unpublished_inception"  # tags of a non-published Inception: never eval/fid
# TensorBoard smooths scalar cards by default (0.6), so a sparse curve of eval points shows values never
# measured; event files cannot change that, but the Time Series dashboard reads the smoothing from the
# URL's `smoothing` query parameter (TensorBoard 2.x deep links), so this address shows the real points.
TENSORBOARD_UNSMOOTHED = "http://localhost:6006/?smoothing=0#timeseries"


def tensorboard_hint(url: str = TENSORBOARD_UNSMOOTHED) -> str:
    """The line printed under a ``tensorboard --logdir`` command: where eval scores read unsmoothed."""
    return f"then open {url} (smoothing 0: each eval point as measured; exact values: Text tab, eval/result)"


def _published(payload: dict[str, Any]) -> bool:
    return is_published_inception(payload.get("feature_extractor"), payload.get("feature_extractor_sha256"))


def score_name(payload: dict[str, Any]) -> str:
    """``FID`` (published Inception), ``FD`` (any other Inception file) or ``FD_<name>`` (another network)."""
    return frechet_name(payload.get("feature_extractor"), payload.get("feature_extractor_sha256"))


def score_label(payload: dict[str, Any]) -> str:
    """The score's full name: ``FID (50000 samples)``, ``FD (unpublished Inception weights, 30 samples)``."""
    qualifier = (
        "" if _published(payload) or payload.get("feature_extractor") != INCEPTION_NAME else UNPUBLISHED
    )
    count = f"{payload.get('num_samples')} samples"
    return f"{score_name(payload)} ({qualifier + ', ' if qualifier else ''}{count})"


def dinov2_summary(result: Any, extractor: Any) -> dict[str, Any]:
    """FD-DINOv2's side of a result JSON (``dinov2``): its label, network, reference and counts.

    ``FD-DINOv2 (ViT-L/14)`` only for a network of ViT-L/14's shape (``extractor.standard``); the
    same code path on another network (tests' tiny ViTs) says so: ``FD (DINOv2 code path, not
    ViT-L/14: ...)``. A network of the right shape with other weights cannot be told apart here: its
    weights sha256 is in the provenance (``dinov2.extractor``).
    """
    standard = bool(getattr(extractor, "standard", False))
    label = (
        "FD-DINOv2 (ViT-L/14)"
        if standard
        else f"FD (DINOv2 code path, not ViT-L/14: {getattr(extractor, 'architecture', '?')})"
    )
    return {
        "label": label,
        "standard": standard,
        "feature_extractor": result.feature_extractor,
        "feature_extractor_sha256": result.feature_extractor_sha256,
        "num_samples": result.num_samples,
        "reference_url": result.reference_url,
        "reference_sha256": result.reference_sha256,
        "num_reference_samples": result.num_reference_samples,
    }


def metric_labels(payload: dict[str, Any]) -> dict[str, str]:
    """What each score of a result is called where people read it, by result key: ``fid`` ->
    ``FID (50000 samples)``; ``sfid`` -> ``sFID`` (published Inception), ``sFD (unpublished Inception
    weights)``; ``inception_score_mean`` -> ``IS``, ``IS (unpublished Inception weights)`` or ``IS (<name>
    logits)``; ``precision``/``recall`` (``... (<name> features)`` for another network); ``fd_dinov2``
    -> the ``dinov2`` record's label. The printed line, the sweep's table and best cells use these."""
    extractor = payload.get("feature_extractor")
    inception = extractor == INCEPTION_NAME
    published = _published(payload)
    other = "" if inception else f" ({extractor} features)"
    labels = {
        "fid": score_label(payload),
        "sfid": "sFID" if published else "sFD (unpublished Inception weights)",
        "inception_score_mean": (
            "IS"
            if published
            else "IS (unpublished Inception weights)"
            if inception
            else f"IS ({extractor} logits)"
        ),
        "precision": f"precision{other}",
        "recall": f"recall{other}",
    }
    if isinstance(payload.get("dinov2"), dict):
        labels["fd_dinov2"] = payload["dinov2"]["label"]
    return labels


def score_line(payload: dict[str, Any]) -> str:
    """``FID (50000 samples) 2.0612, sFID 4.1000, IS 271.130, precision 0.7800, recall 0.6100,
    FD-DINOv2 (ViT-L/14) 80.1200``: one result, printed."""
    labels = metric_labels(payload)
    digits = {"inception_score_mean": 3}
    return ", ".join(
        f"{label} {payload[key]:.{digits.get(key, 4)}f}"
        for key, label in labels.items()
        if payload.get(key) is not None
    )


def provenance_brief(payload: dict[str, Any]) -> str:
    """``[sde 250 steps, 250 NFE, cfg 1.8 on [0, 0.7], ema, fp32, sd-vae-ft-ema, seed 0, ref ...npz]``:
    the fields that most often explain "my FID does not match" (all of them: ``repa eval compare``)."""
    p = payload.get("provenance")
    if not p:
        return "[no provenance recorded]"
    low, high = p["guidance.interval"]
    reference = str(p["reference.url"]).rstrip("/").rsplit("/", 1)[-1]
    return (
        f"[{p['sampler.name']} {p['sampler.num_steps']} steps, {p['sampler.nfe']} NFE, "
        f"cfg {p['guidance.scale']:g} on [{low:g}, {high:g}], {p['checkpoint.weights']}, {p['precision']}, "
        f"{p['vae.name']}, "
        f"seed {p['samples.seed']}, ref {reference}]"
    )


def metric_tags(payload: dict[str, Any]) -> dict[str, float | None]:
    """The TensorBoard scalars of one result: ``eval/fid``, ``eval/sfid`` (when the reference has sFID
    statistics), ``eval/is``, ``eval/precision``, ``eval/recall``, ``eval/fd_dinov2``
    (``eval/fd_dinov2_not_vit_l14`` for another network of the DINOv2 code path). Another network
    than Inception (``eval.feature_extractor``) gets ``eval/fd_<name>`` and every other tag ends in
    ``_<name>``, so its numbers never join Inception's curves. With Inception weights that are not the
    published file (sha256 not starting with its name's prefix, e.g. the random weights of ``repa demo``
    and the tests) the Fréchet tag is ``eval/fd_unpublished_inception`` and every other tag ends in
    ``_unpublished_inception``: such numbers only compare with the same file."""
    name = score_name(payload).lower()
    suffix = ""
    if payload.get("feature_extractor") == INCEPTION_NAME and not _published(payload):
        name, suffix = "fd", _TAG_SUFFIX
    elif payload.get("feature_extractor") != INCEPTION_NAME:  # another network: never Inception's tags
        name, suffix = "fd", f"_{payload.get('feature_extractor')}".lower()
    dinov2 = {}
    if payload.get("fd_dinov2") is not None:
        standard = payload["dinov2"]["standard"]
        dinov2 = {"eval/fd_dinov2" + ("" if standard else "_not_vit_l14"): payload["fd_dinov2"]}
    return {
        f"eval/{name}{suffix}": payload["fid"],
        f"eval/sfid{suffix}": payload.get("sfid"),  # None (not written) without mu_s/sigma_s in the reference
        f"eval/is{suffix}": payload.get("inception_score_mean"),
        f"eval/precision{suffix}": payload.get("precision"),
        f"eval/recall{suffix}": payload.get("recall"),
        **dinov2,
    }


def result_text(payload: dict[str, Any]) -> str:
    """Markdown for TensorBoard's Text tab: the exact numbers (no smoothing) and their provenance."""
    from repa.eval.provenance import provenance_rows

    rows = [f"**{score_line(payload)}**", "", "| field | value |", "|---|---|"]
    rows += [f"| {key} | `{value}` |" for key, value in provenance_rows(payload)]
    return "\n".join(rows)


def sample_grid(sample_set: Any, n: int = GRID_IMAGES) -> Any:
    """uint8 (3, H', W') grid of the first ``n`` samples of a set (the first chunk), ``sqrt(n)`` per row."""
    import torch
    from torchvision.utils import make_grid

    images = torch.from_numpy(next(iter(sample_set.iter_images()))[:n]).permute(0, 3, 1, 2)
    return make_grid(images, nrow=math.ceil(math.sqrt(len(images))), padding=2)


def write_tensorboard(
    run: storage.Location,
    step: int,
    scalars: dict[str, float | None],
    *,
    best_of: str | None = None,
    grid: Any = None,
    text: str | None = None,
    cfg: Any = None,
    provenance: dict[str, Any] | None = None,
    tensorboard_run: str = EVAL_LOG_SUBDIR,
) -> storage.Location:
    """One event file in ``{run}/tensorboard/<tensorboard_run>`` (``eval.tensorboard_run``) holding
    ``scalars`` (and the sample ``grid`` as ``eval/samples``, ``text`` as ``eval/result``) at ``step``,
    flushed once. ``best_of``: a lower-is-better tag (``eval/fid``) whose minimum over the run's
    evaluations so far is also written, as ``eval/best_fid``; ``cfg``: the HParams session (its key
    values -> these scores, see ``repa.tensorboard.run_hparams``), which also shows the ``provenance``
    record's protocol fields as ``provenance/<field>`` (``repa.tensorboard.provenance_hparams``; all
    fields: ``text``)."""
    from repa.eval.provenance import PROTOCOL_FIELDS
    from repa.tensorboard import TensorBoardLogger, provenance_hparams, read_scalars

    log_at = run.join("tensorboard", tensorboard_run)
    scalars = {k: v for k, v in scalars.items() if v is not None}
    if best_of in scalars:
        earlier = [v for s, v in read_scalars(log_at).get(best_of, []) if s != step]
        scalars[best_of.replace("eval/", "eval/best_", 1)] = min([*earlier, scalars[best_of]])
    tb = TensorBoardLogger(log_at)
    try:
        tb.scalars(scalars, step)
        if cfg is not None:
            tb.hparams(cfg, step, extra=provenance_hparams(provenance or {}, PROTOCOL_FIELDS))
        if grid is not None:
            tb.image("eval/samples", grid, step)
        if text is not None:
            tb.text("eval/result", text, step)
    finally:
        tb.close()
    return log_at


def format_comparison(names: Sequence[str], comparison: Any) -> str:
    """The report `repa eval compare` prints: scores side by side, differing fields, the verdict."""
    lines = [f"{name}: {score_line(p)}" for name, p in zip(names, comparison.payloads)]
    for title, keys in (
        ("differs (protocol: NOT comparable)", comparison.protocol),
        ("differs (what is compared)", comparison.subject),
        ("differs (code versions, informational)", comparison.info),
    ):
        for key in keys:
            values = " | ".join(str(r[key]) for r in comparison.rows)
            lines.append(f"  {title}: {key}: {values}")
    for key, causes in comparison.consequences.items():
        values = " | ".join(str(r[key]) for r in comparison.rows)
        lines.append(f"  differs (follows from {', '.join(causes)}): {key}: {values}")
    if comparison.dinov2_only_in:
        only = ", ".join(names[i] for i in comparison.dinov2_only_in)
        lines.append(f"  FD-DINOv2 only in {only}: not compared (the other scores are)")
    for i in comparison.without:
        lines.append(f"  {names[i]}: no provenance recorded (a result written before repa recorded it)")
    if comparison.comparable:
        lines.append("comparable: the scores were produced by the same protocol")
    else:
        bad = comparison.protocol + ["provenance"] * bool(comparison.without)
        lines.append(f"NOT comparable: {', '.join(bad)} differ")
    return "\n".join(lines)
