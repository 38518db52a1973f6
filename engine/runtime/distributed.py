"""Process-group bootstrap: device and backend choice, and the tensor × data parallel layout.

The world (torchrun's WORLD_SIZE processes) splits into consecutive groups of
tp ranks. Each group holds one copy of the model, cut tp ways; the groups
share the data between them (data parallel). The context owns every wait on
the other ranks: the tensor-parallel all-reduce and the object collectives
below all end within --timeout, naming the rank at fault (engine.runtime.health).
"""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import List, Optional

import torch
import torch.distributed as dist

from .collectives import TensorParallelComm
from .health import Health
from .shm_allreduce import shared_memory_all_reduce

BACKENDS = {"npu": "hccl", "cuda": "nccl", "cpu": "gloo"}


class LaunchError(RuntimeError):
    """The launch does not fit the shards or the machine."""


@dataclass
class ParallelContext:
    rank: int
    world_size: int
    tp_size: int
    device: torch.device
    backend: Optional[str]
    timeout_s: float = 600.0
    tp_group: Optional[dist.ProcessGroup] = None
    # Python objects (results, resume state) travel over gloo: HCCL has no gather, and
    # pickles need no trip through the accelerator. None: the default group (already gloo).
    object_group: Optional[dist.ProcessGroup] = None
    health: Optional[Health] = None  # made for the context when not given
    # The tensor-parallel group's all-reduce; None when the model is not cut (tp 1).
    comm: Optional[TensorParallelComm] = None

    def __post_init__(self) -> None:
        if self.health is None:
            self.health = Health(self.rank, self.world_size, self.timeout_s)

    @property
    def tp_rank(self) -> int:
        return self.rank % self.tp_size

    @property
    def dp_rank(self) -> int:
        return self.rank // self.tp_size

    @property
    def dp_size(self) -> int:
        return self.world_size // self.tp_size

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def leads_tp_group(self) -> bool:
        """One rank per model copy reports that copy's results."""
        return self.tp_rank == 0


def _npu_available() -> bool:
    try:
        import torch_npu  # noqa: F401  (registers torch.npu)
    except ImportError:
        return False
    return torch.npu.is_available()


def resolve_device_type(requested: str) -> str:
    """`auto` picks npu, then cuda, then cpu; an explicit choice must be available."""
    if requested == "auto":
        if _npu_available():
            return "npu"
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested == "npu" and not _npu_available():
        raise LaunchError("--device npu: torch_npu is not installed or no NPU is visible")
    if requested == "cuda" and not torch.cuda.is_available():
        raise LaunchError("--device cuda: no CUDA device is visible to torch")
    if requested not in BACKENDS:
        raise LaunchError(f"unknown device {requested!r}; choose auto, npu, cuda or cpu")
    return requested


def _bind_device(device_type: str, local_rank: int) -> torch.device:
    if device_type == "cpu":
        return torch.device("cpu")
    module = getattr(torch, device_type)
    if local_rank >= module.device_count():
        raise LaunchError(f"LOCAL_RANK {local_rank} but only {module.device_count()} {device_type} devices are visible")
    module.set_device(local_rank)
    return torch.device(device_type, local_rank)


def default_threads(local_world_size: int) -> int:
    """CPU threads per rank: the cores shared evenly among this node's ranks."""
    return max(1, (os.cpu_count() or 1) // max(1, local_world_size))


def init_parallel(device: str, tp_size: int, timeout_s: float = 600.0,
                  threads: Optional[int] = None) -> ParallelContext:
    """Join the torchrun world (or run alone when not launched by torchrun) and form the TP groups."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if world_size % tp_size:
        raise LaunchError(f"the shards are cut for tp={tp_size} but {world_size} processes were launched; "
                          f"launch a multiple of {tp_size} (torchrun --nproc-per-node {tp_size} ...)")
    device_type = resolve_device_type(device)
    if device_type == "cpu":
        torch.set_num_threads(threads or default_threads(int(os.environ.get("LOCAL_WORLD_SIZE", "1"))))
    device_obj = _bind_device(device_type, local_rank)
    backend = BACKENDS[device_type] if world_size > 1 else None
    timeout = datetime.timedelta(seconds=timeout_s)
    health = Health(rank, world_size, timeout_s)  # beats from now on where torchrun's store is there already
    if world_size > 1:
        with health.guard("joining the process group"):
            dist.init_process_group(backend, timeout=timeout)
        if health.store is None:
            health = Health(rank, world_size, timeout_s)  # in the process group's store
    ctx = ParallelContext(rank=rank, world_size=world_size, tp_size=tp_size, device=device_obj, backend=backend,
                          timeout_s=timeout_s, health=health)
    if world_size > 1:
        with ctx.health.guard("forming the process groups"):
            ctx.tp_group = _tp_group(ctx)
            if ctx.backend != "gloo":
                ctx.object_group = dist.new_group(backend="gloo", timeout=timeout)
    if tp_size > 1:
        shared = (shared_memory_all_reduce(ctx.tp_group, ctx.tp_rank, tp_size, ctx.health)
                  if device_type == "cpu" else None)
        ctx.comm = TensorParallelComm(ctx.tp_group, tp_size, ctx.health, shared)
    return ctx


def _tp_group(ctx: ParallelContext) -> Optional[dist.ProcessGroup]:
    if ctx.tp_size == ctx.world_size:
        return None  # the default group
    mine = None
    for first in range(0, ctx.world_size, ctx.tp_size):  # every rank must create every group
        group = dist.new_group(list(range(first, first + ctx.tp_size)))
        if first <= ctx.rank < first + ctx.tp_size:
            mine = group
    return mine


def synchronize(device: torch.device) -> None:
    """Wait for the device so that host timers measure device work."""
    if device.type != "cpu":
        getattr(torch, device.type).synchronize(device)


def barrier(ctx: ParallelContext) -> None:
    if ctx.world_size > 1:
        with ctx.health.guard("a barrier"):
            dist.barrier(group=ctx.object_group)


def shutdown() -> None:
    """Leave the process group together: a rank that tears down gloo while a peer still talks aborts it."""
    if dist.is_initialized():
        with Health(dist.get_rank(), dist.get_world_size(), None, beat=False).guard("the final barrier"):
            dist.barrier()
        dist.destroy_process_group()


def gather_objects(ctx: ParallelContext, obj: object) -> List[object]:
    """Every rank's `obj` on rank 0 (others get an empty list)."""
    if ctx.world_size == 1:
        return [obj]
    gathered: List[object] = [None] * ctx.world_size if ctx.is_main else []
    with ctx.health.guard("gathering results"):
        dist.gather_object(obj, gathered if ctx.is_main else None, dst=0, group=ctx.object_group)
    return gathered


def broadcast_object(ctx: ParallelContext, obj: object) -> object:
    """Rank 0's `obj` on every rank (the argument is ignored elsewhere)."""
    if ctx.world_size == 1:
        return obj
    box = [obj if ctx.is_main else None]
    with ctx.health.guard("a broadcast from rank 0"):
        dist.broadcast_object_list(box, src=0, group=ctx.object_group)
    return box[0]
