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
values -> its last and best FID), so runs under one parent folder compare in the HParams tab. (The
session lives in the sub-run that holds the FIDs: the HParams plugin looks a metric up in
``os.path.join(session, group)``, which for a session at the logdir root is ``./eval``, no run.)
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
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


def _hparams_summaries(hparams: dict[str, Any]) -> list[Any]:
    """The HParams plugin's experiment + session-start summaries (torch's ``summary.hparams``, with
    :data:`HPARAM_METRICS` declared whether or not a value exists yet)."""
    from tensorboard.compat.proto.summary_pb2 import Summary, SummaryMetadata
    from tensorboard.plugins.hparams.api_pb2 import Experiment, MetricInfo, MetricName
    from tensorboard.plugins.hparams.metadata import EXPERIMENT_TAG, PLUGIN_DATA_VERSION, PLUGIN_NAME
    from tensorboard.plugins.hparams.plugin_data_pb2 import HParamsPluginData
    from torch.utils.tensorboard.summary import hparams as torch_hparams

    torch_experiment, session_start, _ = torch_hparams(hparams, {})
    hparam_infos = HParamsPluginData.FromString(
        torch_experiment.value[0].metadata.plugin_data.content
    ).experiment.hparam_infos
    experiment = Experiment(
        hparam_infos=hparam_infos,
        metric_infos=[MetricInfo(name=MetricName(tag=t), display_name=t) for t in HPARAM_METRICS],
    )
    content = HParamsPluginData(experiment=experiment, version=PLUGIN_DATA_VERSION).SerializeToString()
    meta = SummaryMetadata(plugin_data=SummaryMetadata.PluginData(plugin_name=PLUGIN_NAME, content=content))
    return [Summary(value=[Summary.Value(tag=EXPERIMENT_TAG, metadata=meta)]), session_start]


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

    def hparams(self, cfg: Any, step: int) -> None:
        """An HParams session of ``cfg``'s key values (:func:`run_hparams`) in this run."""
        for summary in _hparams_summaries(run_hparams(cfg)):
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
