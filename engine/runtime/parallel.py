"""Tensor-parallel linear layers (Megatron style) over one tensor-parallel group.

ColumnParallelLinear holds a slice of the output features: its output stays
sharded and needs no communication. RowParallelLinear holds the matching slice
of the input features: each rank computes a partial sum, the group's all-reduce
adds them, and the bias (replicated) is added once, after the reduction.

On the CPU, `pack_where_faster` re-lays out a weight once for oneDNN (which then
also fuses the bias and the FFN's GELU) for the GEMM shapes where that measures
faster on this machine (engine.runtime.kernels).
"""
from __future__ import annotations

from typing import Dict, Iterator, Optional

import torch
from torch import nn

from .collectives import TensorParallelComm
from .kernels import ONEDNN, LinearKey, choose_kernels, linear, pack


class ColumnParallelLinear(nn.Module):
    def __init__(self, in_features: int, local_out_features: int, bias: bool = True, gelu: bool = False) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(local_out_features, in_features), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(local_out_features), requires_grad=False) if bias else None
        self.gelu = gelu

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias, self.gelu)


class RowParallelLinear(nn.Module):
    def __init__(self, local_in_features: int, out_features: int, comm: Optional[TensorParallelComm]) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_features, local_in_features), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(out_features), requires_grad=False)
        self.comm = comm
        self.gelu = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        partial = linear(x, self.weight)  # the bias joins after the sum, once
        if self.comm is not None:
            self.comm.all_reduce_(partial)
        return partial.add_(self.bias)


def _kernel_key(layer: nn.Module) -> LinearKey:
    # A row-parallel layer's bias is added after the all-reduce, so its GEMM has none.
    bias = isinstance(layer, ColumnParallelLinear) and layer.bias is not None
    return tuple(layer.weight.shape), bias, layer.gelu


def _packable(model: nn.Module) -> Iterator[nn.Module]:
    for module in model.modules():
        if (isinstance(module, (ColumnParallelLinear, RowParallelLinear)) and module.weight.device.type == "cpu"
                and module.weight.dtype in (torch.float32, torch.bfloat16) and not module.weight.is_mkldnn):
            yield module


def pack_where_faster(model: nn.Module, tokens: int) -> Dict[LinearKey, str]:
    """Pack, in place, the CPU weights of every GEMM shape where oneDNN's packed kernel is the faster at
    `tokens` rows (do it last: packed weights do not move or change dtype). Returns the choice per shape."""
    layers = list(_packable(model))
    choice = choose_kernels(((_kernel_key(m), m.weight) for m in layers), tokens)
    for module in layers:
        if choice[_kernel_key(module)] == ONEDNN:
            module.weight = nn.Parameter(pack(module.weight), requires_grad=False)
    return choice
