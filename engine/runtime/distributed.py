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
import time
from dataclasses import dataclass, field
from typing import Dict, Hashable, List, Optional, TypeVar

import torch
import torch.distributed as dist

from .health import Health
from .launch import Launch, this_launch
from .shm_allreduce import SharedMemoryAllReduce, shared_memory_all_reduce

K = TypeVar("K", bound=Hashable)
BACKENDS = {"npu": "hccl", "cuda": "nccl", "cpu": "gloo"}


class LaunchError(RuntimeError):
    """The launch does not fit the shards or the machine."""


@dataclass
class ParallelContext:
    """The one object every collective goes through: where this rank sits (tensor × data parallel), its device
    and backend, the tensor-parallel all-reduce and broadcast, the object collectives, their host-time counters
    per purpose, and the health guard that turns a failed or stuck wait into a line naming the rank at fault.

    `layout(tp_size, tp_rank)` makes one without a process group, for building a rank's module tree on the
    meta device (the sharder and the shard checks read shapes from it); its collectives must not be called.
    """
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
    shared: Optional[SharedMemoryAllReduce] = None  # CPU ranks on one host sum through shared memory
    # host seconds and calls of the tensor-parallel all-reduces, per purpose ("activations", "subln", ...)
    comm_seconds: Dict[str, float] = field(default_factory=dict)
    comm_calls: Dict[str, int] = field(default_factory=dict)
    # while a list: every all-reduce's host seconds, in call order (engine.bench: which rank waited for which)
    comm_log: Optional[List[float]] = None

    # where this rank sits: its place in its tensor-parallel group, and its group's among the model copies
    tp_rank: int = field(init=False)
    dp_rank: int = field(init=False)
    dp_size: int = field(init=False)

    def __post_init__(self) -> None:
        self.tp_rank, self.dp_rank = self.rank % self.tp_size, self.rank // self.tp_size
        self.dp_size = self.world_size // self.tp_size
        if self.health is None:
            self.health = Health(self.rank, self.world_size, self.timeout_s)

    @classmethod
    def layout(cls, tp_size: int, tp_rank: int = 0) -> "ParallelContext":
        """Rank `tp_rank` of `tp_size` with no process group: shapes only (the meta device)."""
        return cls(rank=tp_rank, world_size=tp_size, tp_size=tp_size, device=torch.device("meta"), backend=None,
                   health=Health(tp_rank, 1, None, beat=False))

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def leads_tp_group(self) -> bool:
        """One rank per model copy reports that copy's results."""
        return self.tp_rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    # --- the tensor-parallel group ------------------------------------------------------------
    def all_reduce_(self, tensor: torch.Tensor, purpose: str = "activations") -> torch.Tensor:
        """Sum `tensor` in place over the tensor-parallel group (nothing at tp 1), counting the host time under
        `purpose`. On the CPU a call returns when the sum is done; on accelerators the time is the launch's."""
        if self.tp_size == 1:
            return tensor
        start = time.perf_counter()
        if self.shared is None or not self.shared(tensor):
            with self.health.guard("all-reduce"):
                dist.all_reduce(tensor, group=self.tp_group)
        seconds = time.perf_counter() - start
        self.comm_seconds[purpose] = self.comm_seconds.get(purpose, 0.0) + seconds
        self.comm_calls[purpose] = self.comm_calls.get(purpose, 0) + 1
        if self.comm_log is not None:
            self.comm_log.append(seconds)
        return tensor

    def broadcast_(self, tensor: torch.Tensor) -> torch.Tensor:
        """The tensor-parallel group leader's `tensor`, in place on every rank of the group."""
        if self.tp_size > 1:
            with self.health.guard("a broadcast in the tensor-parallel group"):
                dist.broadcast(tensor, src=self.rank - self.tp_rank, group=self.tp_group)
        return tensor

    # --- the whole world --------------------------------------------------------------------------
    def barrier(self) -> None:
        if self.distributed:
            with self.health.guard("a barrier"):
                dist.barrier(group=self.object_group)

    def gather_objects(self, obj: object) -> List[object]:
        """Every rank's `obj` on rank 0 (others get an empty list)."""
        if not self.distributed:
            return [obj]
        gathered: List[object] = [None] * self.world_size if self.is_main else []
        with self.health.guard("gathering results"):
            dist.gather_object(obj, gathered if self.is_main else None, dst=0, group=self.object_group)
        return gathered

    def summed_over_ranks(self, seconds: Dict[K, Dict[str, float]]) -> Dict[K, Dict[str, float]]:
        """Every rank's timings of the same candidates ({key: {candidate: seconds}}), summed over the world.

        A choice made from the sums is the same on every rank, and ranks must agree: one on a slower kernel
        keeps its peers waiting at every all-reduce. Each rank times its own shard with the others running, as
        in a forward, so the sum also rests on every rank's measurement rather than on one."""
        if not self.distributed:
            return seconds
        gathered: List[Dict[K, Dict[str, float]]] = [{} for _ in range(self.world_size)]
        with self.health.guard("agreeing on the kernels' timings"):
            dist.all_gather_object(gathered, seconds, group=self.object_group)
        # a candidate some rank could not run (another machine's CPU) is left out
        return {key: {c: sum(rank[key][c] for rank in gathered) for c in times
                      if all(c in rank[key] for rank in gathered)}
                for key, times in seconds.items()}

    def broadcast_object(self, obj: object) -> object:
        """Rank 0's `obj` on every rank (the argument is ignored elsewhere)."""
        if not self.distributed:
            return obj
        box = [obj if self.is_main else None]
        with self.health.guard("a broadcast from rank 0"):
            dist.broadcast_object_list(box, src=0, group=self.object_group)
        return box[0]

    def synchronize(self) -> None:
        """Wait for the device so that host timers measure device work."""
        if self.device.type not in ("cpu", "meta"):
            getattr(torch, self.device.type).synchronize(self.device)


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
                  threads: Optional[int] = None, launch: Optional[Launch] = None) -> ParallelContext:
    """Join the launcher's world (or run alone when not launched by torchrun) and form the TP groups."""
    launch = launch or this_launch()
    world_size, rank, local_rank = launch.world_size, launch.rank, launch.local_rank
    if world_size % tp_size:
        raise LaunchError(f"the shards are cut for tp={tp_size} but {world_size} processes were launched; "
                          f"launch a multiple of {tp_size} (torchrun --nproc-per-node {tp_size} ...)")
    device_type = resolve_device_type(device)
    if device_type == "cpu":
        torch.set_num_threads(threads or default_threads(launch.local_world_size))
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
    if tp_size > 1 and device_type == "cpu":
        ctx.shared = shared_memory_all_reduce(ctx.tp_group, ctx.tp_rank, tp_size, ctx.health)
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


def shutdown() -> None:
    """Leave the process group together: a rank that tears down gloo while a peer still talks aborts it."""
    if dist.is_initialized():
        with Health(dist.get_rank(), dist.get_world_size(), None, beat=False).guard("the final barrier"):
            dist.barrier()
        dist.destroy_process_group()
