"""Tensor-parallel linear layers (Megatron style) over one process group.

ColumnParallelLinear holds a slice of the output features: its output stays
sharded and needs no communication. RowParallelLinear holds the matching slice
of the input features: each rank computes a partial sum, one all-reduce adds
them, and the bias (replicated) is added once, after the reduction.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn


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
            dist.all_reduce(partial, group=self.group)
        return partial.add_(self.bias)
