"""Background saves: the trainer copies its state to CPU and a thread serializes, uploads and commits it
while training continues.

``torch.distributed.checkpoint.async_save`` was considered and not used: it writes its own sharded
layout (``.distcp`` files + ``.metadata``), not the one-file ``state.pt`` + reference-layout ``ema.pt``
that ``repa sample`` and REPA's ``generate.py`` read, so it would need a conversion pass
(``dcp_to_torch_save``) over the whole state after every save; our state is replicated (DDP), so there
is nothing to shard either.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Callable
from typing import Any

import torch


def cpu_snapshot(obj: Any, pool: dict[tuple, torch.Tensor] | None = None, _path: tuple = ()) -> Any:
    """A copy of a (nested) state whose tensors live on the CPU and share nothing with ``obj``.

    ``pool`` keeps the CPU buffers between calls (pinned when the source is on CUDA, so the copy is a
    fast DMA): the next snapshot of the same state reuses them, so a save allocates nothing. The
    caller must not snapshot again while a previous snapshot from the same pool is still being saved.
    """
    if isinstance(obj, torch.Tensor):
        t = obj.detach()
        buf = pool.get(_path) if pool is not None else None
        if buf is None or buf.shape != t.shape or buf.dtype != t.dtype:
            buf = torch.empty(t.shape, dtype=t.dtype, device="cpu", pin_memory=t.is_cuda)
            if pool is not None:
                pool[_path] = buf
        buf.copy_(t, non_blocking=t.is_cuda)
        return buf
    if isinstance(obj, dict):
        return {k: cpu_snapshot(v, pool, (*_path, k)) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(cpu_snapshot(v, pool, (*_path, i)) for i, v in enumerate(obj))
    return obj


class BackgroundSaver:
    """Runs one save at a time in a daemon thread; :meth:`wait` joins it and re-raises its error.

    The trainer submits a closure over a CPU snapshot (serialize, upload, commit, retention) and keeps
    stepping; a later save, the end of the run and SIGTERM call :meth:`wait` first. :meth:`failed`
    lets the loop notice a failed upload at the next step rather than at the next save.
    """

    def __init__(self) -> None:
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._result: Any = None
        self.step: int | None = None

    @property
    def busy(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def submit(self, step: int, fn: Callable[[], Any]) -> None:
        if self.busy:
            raise RuntimeError("BackgroundSaver.submit while a save is in flight; call wait() first")
        self._error, self._result, self.step = None, None, step

        def run() -> None:
            # Lower this thread's CPU priority (Linux nice is per thread): where cores are scarce the
            # training thread and the data loader win, and the upload just takes longer.
            with contextlib.suppress(AttributeError, OSError):
                os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 10)
            try:
                self._result = fn()
            except BaseException as e:
                self._error = e

        self._thread = threading.Thread(target=run, name=f"repa-save-{step}", daemon=True)
        self._thread.start()

    def failed(self) -> bool:
        """True once the save in flight (or the last one) has ended with an error."""
        return self._error is not None and not self.busy

    def wait(self) -> Any:
        """Block until the save in flight is done; its result, or its exception re-raised (once)."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        error, self._error = self._error, None
        if error is not None:
            raise error
        return self._result
