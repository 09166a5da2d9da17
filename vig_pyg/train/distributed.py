"""Distributed data parallel set-up from torchrun's environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from vig_pyg.torchrun import torchrun_env

__all__ = [
    "DistInfo",
    "all_gather_objects",
    "all_reduce_sum",
    "barrier",
    "cleanup",
    "is_peer_failure",
    "pick_device",
    "setup_distributed",
]

log = logging.getLogger(__name__)


_CPU = torch.device("cpu")


@dataclass(frozen=True)
class DistInfo:
    """This process's place in the job: ``world_size`` 1 means no distributed training."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    device: torch.device = _CPU

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def pick_device(device: str = "auto", local_rank: int = 0) -> torch.device:
    """The training device.

    Args:
        device: ``"auto"`` (the GPU ``local_rank`` when there is one, else the CPU), ``"cpu"``, ``"cuda"``
            or a full device string such as ``"cuda:1"``.
        local_rank: this process's index on its node.
    """
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("--device cuda was asked for but no GPU is visible; use --device cpu")
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    try:
        return torch.device(device)
    except RuntimeError:
        raise ValueError(f"unknown device {device!r}; use auto, cpu or cuda") from None


# What the process-group back-ends say when a peer went away (gloo raises a plain RuntimeError).
_PEER_MARKERS = ("closed by peer", "reset by peer", "gloo", "nccl", "processgroup", "broken pipe")


def is_peer_failure(err: BaseException) -> bool:
    """Whether ``err``, raised in a distributed run, is a collective that lost another process."""
    if isinstance(err, dist.DistError):
        return True
    return isinstance(err, RuntimeError) and any(m in str(err).lower() for m in _PEER_MARKERS)


def setup_distributed(device: str = "auto") -> DistInfo:
    """Join the process group when started by torchrun (gloo on CPU, nccl on GPU); else a single process.

    Args:
        device: ``"auto"``, ``"cpu"`` or ``"cuda"``; under torchrun each process takes the GPU
            ``LOCAL_RANK``.

    Raises:
        ValueError: a malformed torchrun environment (``RANK`` without ``WORLD_SIZE``, not a number, ...)
            or an unknown device.
    """
    rank, local_rank, world_size = torchrun_env()
    dev = pick_device(device, local_rank)
    if world_size <= 1:
        return DistInfo(device=dev)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    backend = "nccl" if dev.type == "cuda" else "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, device_id=dev if dev.type == "cuda" else None)
    log.debug("rank %d/%d joined the %s process group on %s", rank, world_size, backend, dev)
    return DistInfo(rank, local_rank, world_size, dev)


def cleanup() -> None:
    """Leave the process group (if any)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def all_reduce_sum(values: list[float], info: DistInfo) -> list[float]:
    """Element-wise sum of ``values`` over all processes (float64, so counts stay exact)."""
    if not info.enabled:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=info.device)
    dist.all_reduce(t)
    return t.tolist()


def all_gather_objects(obj: Any, info: DistInfo) -> list[Any]:
    """``obj`` of every process, by rank."""
    if not info.enabled:
        return [obj]
    out: list[Any] = [None] * info.world_size
    dist.all_gather_object(out, obj)
    return out
