"""TensorBoard event files on a local folder or any fsspec URL: the writer, the dashboards, a reader.

Event files are written locally by ``torch.utils.tensorboard.SummaryWriter``; for remote URLs
(s3://, gs://) the local folder is uploaded whole every ``flush_every_steps`` and at close. Object
stores have no append, so every upload rewrites the file: flush sparingly. Doing the upload
through ``repa.storage`` gives every fsspec protocol one code path (TensorBoard's own S3 layer
covers only S3 and reads its endpoint only at import). TensorBoard itself reads s3:// log dirs.

What a run writes (docs/tensorboard.md): the training loop's ``train/*``, ``perf/*`` and
``progress/*`` scalars (``progress/step_of_max``, ``progress/eta_hours``), the config as text, a
custom-scalars layout (:data:`LAYOUT`: loss and FID side by side, then progress, throughput and
gradient norm). The evaluator's ``eval`` sub-run holds the ``eval/*`` scalars, the grid of the
samples each evaluation scored and an HParams session (:func:`run_hparams`: the run's key config
values, and :func:`provenance_hparams`: how its scores were made -> its last and best FID), so runs
under one parent folder compare in the HParams tab. TensorBoard keeps a run's first session record
(first metadata of a tag wins), so the values shown are the first evaluation's. (The
session lives in the sub-run that holds the FIDs: the HParams plugin looks a metric up in
``os.path.join(session, group)``, which for a session at the logdir root is ``./eval``, no run.)
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from collections.abc import Sequence
from typing import Any

import torch

from repa import storage

log = logging.getLogger(__name__)

EVAL_RUN = "eval"  # the evaluator's sub-run: {run_url}/tensorboard/eval

# Custom Scalars tab (tensorboard.plugins.custom_scalar, layout_pb2.Layout as torch's
# SummaryWriter.add_custom_scalars takes it): {category: {chart title: ["Multiline", [tag regexes]]}}.
# Regexes match tags of every run, so a chart shows the trainer's and the evaluator's curves together.
LAYOUT: dict[str, dict[str, list[Any]]] = {
    "repa: is it working?": {
        "loss (train/loss = denoising + proj_coeff x projection)": [
            "Multiline",
            [r"^train/(loss|denoising_loss|projection_loss)$"],
        ],
        "FID of each checkpoint (eval/fid, eval/best_fid; *_unpublished_inception: not comparable)": [
            "Multiline",
            [r"^eval/(best_)?(fid|fd_)"],
        ],
    },
    "repa: progress": {
        "step / train.max_steps": ["Multiline", [r"^progress/step_of_max$"]],
        "ETA (hours)": ["Multiline", [r"^progress/eta_hours$"]],
        "throughput (images/s)": ["Multiline", [r"^perf/images_per_second$"]],
        "gradient norm (before clipping)": ["Multiline", [r"^train/grad_norm$"]],
    },
}

# HParams tab: the config values that tell runs apart, and the metrics compared across them.
HPARAM_KEYS = (
    "model.name",
    "model.encoder_depth",
    "encoder.names",
    "objective.proj_coeff",
    "objective.path_type",
    "train.global_batch_size",
    "train.lr",
    "train.max_steps",
    "train.precision",
    "sample.sampler",
    "sample.num_steps",
    "sample.cfg_scale",
    "sample.guidance_high",
    "sample.num_samples",
)
PROVENANCE_PREFIX = "provenance/"  # HParams keys of an evaluation's provenance: provenance/sampler.name
SHA256_SHORT = 12  # characters of a sha256 digest shown as an HParams value
HPARAM_METRICS = (  # tags of the eval sub-run (the session's own run)
    "eval/fid",
    "eval/best_fid",
    "eval/is",
    "eval/fd_unpublished_inception",
    "eval/best_fd_unpublished_inception",
)


def run_hparams(cfg: Any) -> dict[str, str | float | bool]:
    """``HPARAM_KEYS`` of a RunConfig as HParams values (lists joined by commas, None as "null")."""
    tree = cfg.to_dict()
    out: dict[str, str | float | bool] = {}
    for key in HPARAM_KEYS:
        section, name = key.split(".")
        value = tree[section][name]
        if isinstance(value, (list, tuple)):
            value = ",".join(map(str, value)) or "none"
        out[key] = "null" if value is None else value
    return out


def provenance_hparams(record: dict[str, Any], fields: Sequence[str]) -> dict[str, str | float | bool]:
    """``fields`` of a result's provenance record (``repa.eval.provenance``) as HParams values, keyed
    ``provenance/<field>`` so they never collide with :data:`HPARAM_KEYS`: numbers and booleans as they
    are, None as "null", sha256 digests cut to :data:`SHA256_SHORT` characters, lists and dicts as short
    strings (an extractor as ``name (sha256 6726825d0b5a)``). Fields the record lacks are skipped."""
    return {PROVENANCE_PREFIX + key: _hparam_value(key, record[key]) for key in fields if key in record}


def _hparam_value(key: str, value: Any) -> str | float | bool:
    if isinstance(value, (bool, int, float)):
        return value
    return _short_text(key, value)


def _short_text(key: str, value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, str):
        return value[:SHA256_SHORT] if key.endswith("sha256") else value
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_short_text(key, v) for v in value) + "]"
    if isinstance(value, dict) and "name" in value:  # a network (extractors): its name and weights
        return f"{value['name']} (sha256 {_short_text('sha256', value.get('weights_sha256'))})"
    if isinstance(value, dict):
        return ", ".join(f"{k}={_short_text(k, v)}" for k, v in value.items())
    return str(value)


def _hparams_summaries(hparams: dict[str, str | float | bool]) -> list[Any]:
    """The HParams plugin's experiment + session-start summaries, with :data:`HPARAM_METRICS` declared
    whether or not a value exists yet. Built here rather than by torch's ``summary.hparams``, which
    records a bool as a number (it tests ``int`` first, and bool is an int) and declares metrics only
    with values."""
    from tensorboard.compat.proto.summary_pb2 import Summary, SummaryMetadata
    from tensorboard.plugins.hparams.api_pb2 import DataType, Experiment, HParamInfo, MetricInfo, MetricName
    from tensorboard.plugins.hparams.metadata import (
        EXPERIMENT_TAG,
        PLUGIN_DATA_VERSION,
        PLUGIN_NAME,
        SESSION_START_INFO_TAG,
    )
    from tensorboard.plugins.hparams.plugin_data_pb2 import HParamsPluginData, SessionStartInfo

    start, infos = SessionStartInfo(), []
    for key, value in hparams.items():
        if isinstance(value, bool):
            start.hparams[key].bool_value, kind = value, "DATA_TYPE_BOOL"
        elif isinstance(value, (int, float)):
            start.hparams[key].number_value, kind = value, "DATA_TYPE_FLOAT64"
        else:
            start.hparams[key].string_value, kind = str(value), "DATA_TYPE_STRING"
        infos.append(HParamInfo(name=key, type=DataType.Value(kind)))
    experiment = Experiment(
        hparam_infos=infos,
        metric_infos=[MetricInfo(name=MetricName(tag=t), display_name=t) for t in HPARAM_METRICS],
    )

    def summary(tag: str, data: HParamsPluginData) -> Summary:
        plugin = SummaryMetadata.PluginData(plugin_name=PLUGIN_NAME, content=data.SerializeToString())
        return Summary(value=[Summary.Value(tag=tag, metadata=SummaryMetadata(plugin_data=plugin))])

    return [
        summary(EXPERIMENT_TAG, HParamsPluginData(experiment=experiment, version=PLUGIN_DATA_VERSION)),
        summary(
            SESSION_START_INFO_TAG, HParamsPluginData(session_start_info=start, version=PLUGIN_DATA_VERSION)
        ),
    ]


class TensorBoardLogger:
    """Scalars and images for one process (rank 0 of training, or one evaluator).

    ``purge_step``: on a restart from a checkpoint at step S, TensorBoard discards events with
    step >= S from earlier files of the run (written after that checkpoint and lost with it), so
    the curve stays continuous.
    """

    def __init__(self, log_url: str | storage.Location, *, purge_step: int | None = None):
        from torch.utils.tensorboard import SummaryWriter

        self.log_url = log_url  # a URL or a Location (its fsspec options reach the uploads)
        local = storage.local_path(log_url)
        self._staging = None if local is not None else tempfile.mkdtemp(prefix="repa-tb-")
        self.local_dir = local if local is not None else self._staging
        os.makedirs(self.local_dir, exist_ok=True)
        self.writer = SummaryWriter(log_dir=self.local_dir, purge_step=purge_step, flush_secs=3600)

    def scalars(self, values: dict[str, float], step: int) -> None:
        for tag, value in values.items():
            if value is not None:
                self.writer.add_scalar(tag, float(value), step)

    def image(self, tag: str, image_chw_uint8: torch.Tensor, step: int) -> None:
        self.writer.add_image(tag, image_chw_uint8, step, dataformats="CHW")

    def text(self, tag: str, text: str, step: int) -> None:
        self.writer.add_text(tag, text, step)

    def run_started(self, cfg: Any, step: int) -> None:
        """A training run's dashboards: its config as text and the custom-scalars layout."""
        self.text("config", "```\n" + cfg.to_yaml() + "\n```", step)
        self.writer.add_custom_scalars(LAYOUT)

    def hparams(self, cfg: Any, step: int, extra: dict[str, str | float | bool] | None = None) -> None:
        """An HParams session of ``cfg``'s key values (:func:`run_hparams`) and ``extra`` values (an
        evaluation's :func:`provenance_hparams`) in this run."""
        for summary in _hparams_summaries({**run_hparams(cfg), **(extra or {})}):
            self.writer.file_writer.add_summary(summary, step)

    def flush(self) -> None:
        """Write pending events; for remote URLs upload the event files (one PUT each)."""
        self.writer.flush()
        if self._staging is not None:
            for name in os.listdir(self._staging):
                with open(os.path.join(self._staging, name), "rb") as f:
                    storage.write_bytes_atomic(storage.join(self.log_url, name), f.read())

    def close(self, *, upload: bool = True) -> None:
        """Flush and close; ``upload=False`` skips the upload (the store is known to be down)."""
        if upload:
            self.flush()
        self.writer.close()
        if self._staging is not None:
            shutil.rmtree(self._staging, ignore_errors=True)


def read_scalars(log_url: str | storage.Location) -> dict[str, list[tuple[int, float]]]:
    """All scalars under a log URL or Location as ``{tag: [(step, value), ...]}`` (sorted by step; {} if
    none).

    Follows TensorBoard's semantics for restarts (purge_step), because it uses its loader.
    """
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    local = storage.local_path(log_url)
    tmp = None
    if local is not None and not os.path.isdir(local):
        return {}  # nothing logged yet
    if local is None:
        tmp = tempfile.mkdtemp(prefix="repa-tb-read-")
        for name in storage.listdir(log_url):
            if "tfevents" in name:
                with open(os.path.join(tmp, name), "wb") as f:
                    f.write(storage.read_bytes(storage.join(log_url, name)))
        local = tmp
    try:
        acc = EventAccumulator(local, size_guidance={"scalars": 0})
        acc.Reload()
        out: dict[str, list[tuple[int, float]]] = {}
        for tag in acc.Tags().get("scalars", []):
            by_step = {e.step: e.value for e in acc.Scalars(tag)}
            out[tag] = sorted(by_step.items())
        return out
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
