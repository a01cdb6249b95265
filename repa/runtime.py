"""Process-group set-up under torchrun (and the Kubeflow operator's ``PET_*`` variables).

torchrun (elastic agent) exports ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and
``MASTER_PORT`` to every worker, after a c10d rendezvous configured from ``PET_*`` variables
(the Kubeflow Training Operator sets ``PET_NNODES=min:max``, ``PET_RDZV_ENDPOINT``, ...). Without
them we run as a single process. The only module that reads those variables.
"""

from __future__ import annotations

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
    if requested == "auto":
        requested = "cuda" if torch.cuda.is_available() else "cpu"
    if requested == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("train.device: 'cuda' requested but CUDA is not available on this machine")
        return torch.device("cuda", local_rank)
    return torch.device(requested)


def init_distributed(device: str = "auto", timeout_seconds: float = 300.0) -> DistInfo:
    """Join the process group if launched by torchrun, else return a single-process DistInfo.

    The timeout is short on purpose (default 5 min, not torch's 30): after a peer dies, survivors
    must fail out of their collective quickly so torchrun can restart the group from the last
    checkpoint (KUBEFLOW.md: "survivors hang in NCCL collectives until the default 30-min timeout").
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
