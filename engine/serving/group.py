"""Rank 0 → every rank of the tensor-parallel group: one step at a time, all ranks running the same forward.

A step is a small header (what to do, the kind, each tensor's shape and dtype) broadcast as an object, then the
batch's tensors broadcast on the group's own backend (gloo, NCCL or HCCL). Besides batches there are two steps:
`ping`, sent when the server is idle, so that waiting ranks never reach the collective timeout and a rank that
died or hangs is noticed while no request is running (its all-reduce does not complete); and `stop`. Every
collective goes through the group's context, inside its health guard.
"""
from __future__ import annotations

from typing import Dict, Optional

import torch

from ..runtime.distributed import ParallelContext
from .tasks import ServedModel

RUN, PING, STOP = "run", "ping", "stop"
Batch = Dict[str, torch.Tensor]


class GroupChannel:
    """The step protocol; rank 0 calls `step`, the other ranks `follow` until rank 0 sends `stop`."""

    def __init__(self, ctx: ParallelContext, served: ServedModel) -> None:
        self.ctx = ctx
        self.served = served

    def step(self, op: str, kind: Optional[str] = None, batch: Optional[Batch] = None) -> Optional[torch.Tensor]:
        """Rank 0: run one step on every rank; returns the outputs of a `run` step."""
        if self.ctx.distributed:
            header = (op, kind, {k: (tuple(v.shape), v.dtype) for k, v in (batch or {}).items()})
            self.ctx.broadcast_object(header)
            if batch:
                batch = {name: self.ctx.broadcast_(tensor.to(self.ctx.device).contiguous())
                         for name, tensor in batch.items()}
        return self._execute(op, kind, batch)

    def follow(self) -> None:
        """Ranks other than 0: execute rank 0's steps until it says stop."""
        while True:
            op, kind, specs = self.ctx.broadcast_object(None)
            batch = {name: self.ctx.broadcast_(torch.empty(shape, dtype=dtype, device=self.ctx.device))
                     for name, (shape, dtype) in specs.items()}
            self._execute(op, kind, batch)
            if op == STOP:
                return

    def _execute(self, op: str, kind: Optional[str], batch: Optional[Batch]) -> Optional[torch.Tensor]:
        if op == RUN:
            return self.served.run(kind, batch)
        if op == PING:
            # completes only when every rank took part: a dead or stopped peer keeps it from returning
            self.ctx.all_reduce_(torch.ones(1, device=self.ctx.device), "ping")
        return None
