"""Tensor-parallel linear layers (Megatron style) over one process group.

ColumnParallelLinear holds a slice of the output features: its output stays
sharded and needs no communication. RowParallelLinear holds the matching slice
of the input features: each rank computes a partial sum, one all-reduce adds
them, and the bias (replicated) is added once, after the reduction.
"""
from __future__ import annotations

import time
from typing import Optional, Tuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn


class CommTimer:
    """Host time this process spends in all-reduce, and the number of calls (engine.bench reports them).

    On the CPU (gloo) the call returns when the sum is done; on accelerators it is the launch time only.
    """
    seconds = 0.0
    calls = 0

    @classmethod
    def total(cls) -> Tuple[float, int]:
        return cls.seconds, cls.calls


def all_reduce_(tensor: torch.Tensor, group: Optional[dist.ProcessGroup]) -> torch.Tensor:
    """Sum `tensor` in place over the group."""
    start = time.perf_counter()
    dist.all_reduce(tensor, group=group)
    CommTimer.seconds += time.perf_counter() - start
    CommTimer.calls += 1
    return tensor


class ColumnParallelLinear(nn.Module):
    def __init__(self, in_features: int, local_out_features: int, bias: bool = True) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(local_out_features, in_features), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(local_out_features), requires_grad=False) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


class RowParallelLinear(nn.Module):
    def __init__(self, local_in_features: int, out_features: int, group: Optional[dist.ProcessGroup],
                 tp_size: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_features, local_in_features), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(out_features), requires_grad=False)
        self.group = group
        self.tp_size = tp_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        partial = F.linear(x, self.weight)
        if self.tp_size > 1:
            all_reduce_(partial, self.group)
        return partial.add_(self.bias)
