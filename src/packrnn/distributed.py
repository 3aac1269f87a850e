"""torch.distributed set-up for training under ``torchrun``: gloo on CPU, NCCL on GPU.

``train()`` calls ``setup()`` once. Without the ``torchrun`` environment (``WORLD_SIZE`` unset
or 1) it returns a single-process context and touches nothing, so the same code path serves
both. Only the main process (rank 0) writes files; every helper here is a no-op for one process.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Any, Sequence

import torch
import torch.distributed as dist

__all__ = ["DistContext", "setup", "teardown", "all_reduce_sum", "all_gather_objects",
           "broadcast_object", "barrier", "resolve_device"]


@dataclass(frozen=True)
class DistContext:
    """Where this process stands in a (possibly single-process) run."""

    rank: int  # global rank, 0 for a single process
    world_size: int  # number of processes, 1 for a single process
    local_rank: int  # rank on this machine; picks the GPU
    device: torch.device  # where this process computes
    backend: str | None  # "gloo", "nccl", or None for a single process
    owns_group: bool  # True when setup() created the process group (teardown destroys it)

    @property
    def is_main(self) -> bool:
        """True on the process that writes files and prints (rank 0)."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def resolve_device(device: str, local_rank: int = 0) -> torch.device:
    """Turn a config's ``"auto" | "cpu" | "cuda" | "cuda:N"`` into a device for this process."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("device: expected a machine with CUDA for 'cuda', got none available")
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    return torch.device(device)


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"{name}: expected an integer environment variable, got {value!r}") from None


def setup(device: str = "auto", timeout_s: float = 300.0) -> DistContext:
    """Join the process group described by torchrun's environment, if any.

    Reads ``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK`` (and torchrun's ``MASTER_ADDR`` /
    ``MASTER_PORT``). Backend: NCCL when this process computes on CUDA, gloo otherwise. A
    process group that already exists (e.g. created by a test harness) is used as it is.

    Args:
        device: ``"auto"`` (CUDA when available), ``"cpu"``, ``"cuda"`` or ``"cuda:N"``.
        timeout_s: how long collective operations wait for the other ranks.
    """
    if dist.is_available() and dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
        local_rank = _env_int("LOCAL_RANK", rank)
        dev = resolve_device(device, local_rank)
        return DistContext(rank, world, local_rank, dev, dist.get_backend(), owns_group=False)
    world = _env_int("WORLD_SIZE", 1)
    if world <= 1:
        return DistContext(0, 1, 0, resolve_device(device), None, owns_group=False)
    if not dist.is_available():
        raise RuntimeError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
    rank = _env_int("RANK", 0)
    local_rank = _env_int("LOCAL_RANK", 0)
    dev = resolve_device(device, local_rank)
    backend = "nccl" if dev.type == "cuda" else "gloo"
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    dist.init_process_group(backend=backend, rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=timeout_s))
    return DistContext(rank, world, local_rank, dev, backend, owns_group=True)


def teardown(ctx: DistContext) -> None:
    """Destroy the process group if ``setup`` created it."""
    if ctx.owns_group and dist.is_initialized():
        dist.destroy_process_group()


def barrier(ctx: DistContext) -> None:
    """Wait for every rank (no-op for one process)."""
    if ctx.distributed:
        if ctx.backend == "nccl":
            dist.barrier(device_ids=[ctx.device.index])
        else:
            dist.barrier()


def all_reduce_sum(ctx: DistContext, values: Sequence[float]) -> list[float]:
    """Sum each number over all ranks; returns the sums (the input for one process).

    float64 on the wire so that counts and sums of losses stay exact enough to match a
    single-process run.
    """
    if not ctx.distributed:
        return [float(v) for v in values]
    t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=ctx.device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.cpu().tolist()


def all_gather_objects(ctx: DistContext, obj: Any) -> list[Any]:
    """Every rank's ``obj``, in rank order (``[obj]`` for one process)."""
    if not ctx.distributed:
        return [obj]
    out: list[Any] = [None] * ctx.world_size
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(ctx: DistContext, obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s ``obj`` on every rank (``obj`` itself for one process)."""
    if not ctx.distributed:
        return obj
    box = [obj if ctx.rank == src else None]
    dist.broadcast_object_list(box, src=src)
    return box[0]
