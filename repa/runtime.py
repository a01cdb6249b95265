"""Where and how a process computes: device, process group, precision (autocast, TF32).

Shared by training and evaluation. torchrun (elastic agent) exports ``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT`` to every worker, after a c10d rendezvous
configured from ``PET_*`` variables (the Kubeflow Training Operator sets ``PET_NNODES=min:max``,
``PET_RDZV_ENDPOINT``, ...; docs/kubernetes.md). Without them we run as a single process. The only
module that reads those variables, and the one place that turns a precision name into autocast.
"""

from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def resolve_device(requested: str = "auto", local_rank: int = 0) -> torch.device:
    """``auto`` -> this process's GPU when CUDA is available, else CPU."""
    from repa.config import ConfigError

    if requested == "auto":
        requested = "cuda" if torch.cuda.is_available() else "cpu"
    if requested.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError(
                "train.device", f"{requested!r} requested but CUDA is not available on this machine"
            )
        device = torch.device("cuda", local_rank) if requested == "cuda" else torch.device(requested)
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise ConfigError(
                "train.device", f"{requested!r} (index {device.index}): this machine has {count} GPU(s)"
            )
        return device
    if requested == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        raise ConfigError("train.device", "'mps' requested but MPS is not available on this machine")
    return torch.device(requested)


def init_distributed(device: str = "auto", timeout_seconds: float = 300.0) -> DistInfo:
    """Join the process group if launched by torchrun, else return a single-process DistInfo.

    The timeout is short on purpose (default 5 min, not torch's 30): after a peer dies, survivors
    must fail out of their collective quickly so torchrun can restart the group from the last
    checkpoint, instead of hanging in NCCL collectives for torch's default 30 minutes.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = resolve_device(device, local_rank)
    if world_size > 1 and not dist.is_initialized():
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
            # Surface NCCL errors as exceptions instead of hanging (torch reads this at init).
            os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")
        backend = "nccl" if dev.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, timeout=timedelta(seconds=timeout_seconds))
        log.info("joined process group: rank %d/%d (%s, backend %s)", rank, world_size, dev, backend)
    return DistInfo(rank=rank, world_size=world_size, local_rank=local_rank, device=dev)


def barrier(info: DistInfo) -> None:
    if info.distributed:
        dist.barrier()


def broadcast_object(info: DistInfo, obj: object) -> object:
    """Rank 0's ``obj`` on every rank (e.g. the checkpoint to resume from)."""
    if not info.distributed:
        return obj
    holder = [obj]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]


def any_rank(info: DistInfo, flag: bool) -> bool:
    """True on every rank if ``flag`` is true on any rank (used to agree on a preemption stop)."""
    if not info.distributed:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=info.device if info.device.type == "cuda" else "cpu")
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def all_reduce_mean(info: DistInfo, values: torch.Tensor) -> torch.Tensor:
    """Mean over ranks of a small tensor of metrics (for logging only)."""
    if not info.distributed:
        return values
    values = values.clone()
    dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values / info.world_size


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


# ----------------------------------------------------------------------------------------------
# Precision: one decision for training and sampling
# ----------------------------------------------------------------------------------------------

DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_precision(name: str, device: torch.device | str) -> str:
    """``auto`` -> ``bf16`` on CUDA, ``fp32`` elsewhere; any other name must be a key of ``DTYPES``."""
    if name == "auto":
        name = "bf16" if torch.device(device).type == "cuda" else "fp32"
    if name not in DTYPES:
        raise ValueError(f"precision {name!r}: choose auto, {', '.join(DTYPES)}")
    return name


def autocast(device: torch.device | str, precision: str) -> contextlib.AbstractContextManager:
    """Autocast for ``precision`` on ``device``; fp32 is no autocast at all (``nullcontext``)."""
    device = torch.device(device)
    name = resolve_precision(precision, device)
    if name == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=DTYPES[name])


def enable_tf32(device: torch.device | str, allow: bool) -> None:
    """TF32 matmuls and convolutions on CUDA when ``allow`` (the reference's ``--allow-tf32``)."""
    if torch.device(device).type == "cuda" and allow:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
