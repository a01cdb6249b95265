"""TensorBoard event files on a local folder or any fsspec URL: the writer and a scalar reader.

Event files are written locally by ``torch.utils.tensorboard.SummaryWriter``; for remote URLs
(s3://, gs://) the local folder is uploaded whole every ``flush_every_steps`` and at close. Object
stores have no append, so every upload rewrites the file: flush sparingly. Doing the upload
through ``repa.storage`` gives every fsspec protocol one code path (TensorBoard's own S3 layer
covers only S3 and reads its endpoint only at import). TensorBoard itself reads s3:// log dirs.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile

import torch

from repa import storage

log = logging.getLogger(__name__)


class TensorBoardLogger:
    """Scalars and images for one process (rank 0 of training, or one evaluator).

    ``purge_step``: on a restart from a checkpoint at step S, TensorBoard discards events with
    step >= S from earlier files of the run (written after that checkpoint and lost with it), so
    the curve stays continuous.
    """

    def __init__(self, log_url: str, *, purge_step: int | None = None, storage_options: dict | None = None):
        from torch.utils.tensorboard import SummaryWriter

        self.log_url = log_url
        self.storage_options = storage_options
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

    def flush(self) -> None:
        """Write pending events; for remote URLs upload the event files (one PUT each)."""
        self.writer.flush()
        if self._staging is not None:
            for name in os.listdir(self._staging):
                with open(os.path.join(self._staging, name), "rb") as f:
                    storage.write_bytes_atomic(
                        storage.join(self.log_url, name), f.read(), self.storage_options
                    )

    def close(self, *, upload: bool = True) -> None:
        """Flush and close; ``upload=False`` skips the upload (the store is known to be down)."""
        if upload:
            self.flush()
        self.writer.close()
        if self._staging is not None:
            shutil.rmtree(self._staging, ignore_errors=True)


def read_scalars(log_url: str, storage_options: dict | None = None) -> dict[str, list[tuple[int, float]]]:
    """All scalars under a log URL as ``{tag: [(step, value), ...]}`` (sorted by step).

    Follows TensorBoard's semantics for restarts (purge_step), because it uses its loader.
    """
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    local = storage.local_path(log_url)
    tmp = None
    if local is None:
        tmp = tempfile.mkdtemp(prefix="repa-tb-read-")
        for name in storage.listdir(log_url, storage_options):
            if "tfevents" in name:
                with open(os.path.join(tmp, name), "wb") as f:
                    f.write(storage.read_bytes(storage.join(log_url, name), storage_options))
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
