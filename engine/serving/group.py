"""Rank 0 → every rank of the tensor-parallel group: one step at a time, all ranks running the same forward.

A step is a small header (what to do, the kind, each tensor's shape and dtype) broadcast as an object, then the
batch's tensors broadcast on the group's own backend (gloo, NCCL or HCCL). Besides batches there are two steps:
`ping`, sent when the server is idle, so that waiting ranks never reach the collective timeout and a rank that
died or hangs is noticed while no request is running (its all-reduce does not complete); and `stop`.
"""
from __future__ import annotations

from typing import Dict, Optional

import torch
import torch.distributed as dist

from ..runtime.distributed import ParallelContext, broadcast_object
from .tasks import ServedModel

RUN, PING, STOP = "run", "ping", "stop"
Batch = Dict[str, torch.Tensor]


class GroupChannel:
    """The step protocol; rank 0 calls `step`, the other ranks `follow` until rank 0 sends `stop`."""

    def __init__(self, ctx: ParallelContext, served: ServedModel) -> None:
        self.ctx = ctx
        self.served = served

    @property
    def distributed(self) -> bool:
        return self.ctx.world_size > 1

    def step(self, op: str, kind: Optional[str] = None, batch: Optional[Batch] = None) -> Optional[torch.Tensor]:
        """Rank 0: run one step on every rank; returns the outputs of a `run` step."""
        if self.distributed:
            header = (op, kind, {k: (tuple(v.shape), v.dtype) for k, v in (batch or {}).items()})
            broadcast_object(self.ctx, header)
            if batch:
                batch = {name: self._broadcast(tensor) for name, tensor in batch.items()}
        return self._execute(op, kind, batch)

    def follow(self) -> None:
        """Ranks other than 0: execute rank 0's steps until it says stop."""
        while True:
            op, kind, specs = broadcast_object(self.ctx, None)
            batch = {name: self._broadcast(torch.empty(shape, dtype=dtype, device=self.ctx.device))
                     for name, (shape, dtype) in specs.items()}
            self._execute(op, kind, batch)
            if op == STOP:
                return

    def _broadcast(self, tensor: torch.Tensor) -> torch.Tensor:
        tensor = tensor.to(self.ctx.device).contiguous()
        dist.broadcast(tensor, src=0, group=self.ctx.tp_group)
        return tensor

    def _execute(self, op: str, kind: Optional[str], batch: Optional[Batch]) -> Optional[torch.Tensor]:
        if op == RUN:
            return self.served.run(kind, batch)
        if op == PING and self.distributed:
            # completes only when every rank took part: a dead or stopped peer keeps it from returning
            dist.all_reduce(torch.ones(1, device=self.ctx.device), group=self.ctx.tp_group)
        return None

