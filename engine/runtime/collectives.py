"""The tensor-parallel group's all-reduce and the time spent in it, owned by the process group's context.

CPU ranks on one host sum through shared memory (engine.runtime.shm_allreduce);
everywhere else the backend's all-reduce (gloo, NCCL, HCCL) does it. Either way a
peer that fails or stops answering ends the wait within the job's --timeout with
a PeerFailure that names it.
"""
from __future__ import annotations

import time
from typing import Optional

import torch
import torch.distributed as dist

from .health import Health
from .shm_allreduce import SharedMemoryAllReduce


class TensorParallelComm:
    """Sums a tensor in place over the tensor-parallel group; `seconds` and `calls` count the host time in it.

    On the CPU (gloo or shared memory) a call returns when the sum is done; on accelerators the time is the
    launch time only.
    """

    def __init__(self, group: Optional[dist.ProcessGroup], size: int, health: Health,
                 shared: Optional[SharedMemoryAllReduce] = None) -> None:
        self.group, self.size, self.health, self.shared = group, size, health, shared
        self.seconds = 0.0
        self.calls = 0

    def all_reduce_(self, tensor: torch.Tensor) -> torch.Tensor:
        start = time.perf_counter()
        if self.shared is None or not self.shared(tensor):
            with self.health.guard("all-reduce"):
                dist.all_reduce(tensor, group=self.group)
        self.seconds += time.perf_counter() - start
        self.calls += 1
        return tensor
