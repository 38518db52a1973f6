"""Tensor-parallel linear layers (Megatron style) over one process group.

ColumnParallelLinear holds a slice of the output features: its output stays
sharded and needs no communication. RowParallelLinear holds the matching slice
of the input features: each rank computes a partial sum, one all-reduce adds
them, and the bias (replicated) is added once, after the reduction.

On the CPU their weights can be re-laid out once for oneDNN (`pack_for_onednn`):
its linear kernel then skips re-packing the weight on every call and fuses the
bias and the FFN's GELU (VLMo-base 480: −9% time in fp32 and in bf16).
"""
from __future__ import annotations

import time
from typing import Callable, Dict, Optional, Tuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn


class CommTimer:
    """Host time this process spends in all-reduce, and the number of calls (engine.bench reports them).

    On the CPU (gloo or shared memory) the call returns when the sum is done; on accelerators it is the
    launch time only.
    """
    seconds = 0.0
    calls = 0

    @classmethod
    def total(cls) -> Tuple[float, int]:
        return cls.seconds, cls.calls


# group -> its faster all-reduce (engine.runtime.shm_allreduce for CPU ranks on one host), set up by the loader
FAST_ALL_REDUCE: Dict[Optional[dist.ProcessGroup], Callable[[torch.Tensor], bool]] = {}


def all_reduce_(tensor: torch.Tensor, group: Optional[dist.ProcessGroup]) -> torch.Tensor:
    """Sum `tensor` in place over the group."""
    start = time.perf_counter()
    fast = FAST_ALL_REDUCE.get(group)
    if fast is None or not fast(tensor):
        dist.all_reduce(tensor, group=group)
    CommTimer.seconds += time.perf_counter() - start
    CommTimer.calls += 1
    return tensor


def linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
           gelu: bool = False) -> torch.Tensor:
    """x Wᵀ + b, then exact GELU if asked: one fused oneDNN call for a packed weight, else F.linear."""
    if weight.is_mkldnn:
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "gelu" if gelu else "none", [],
                                                  "none" if gelu else "")
    out = F.linear(x, weight, bias)
    return F.gelu(out) if gelu else out


def pack_for_onednn(model: nn.Module) -> bool:
    """Pack every parallel linear's fp32/bf16 CPU weight for oneDNN, in place (do it last: packed tensors
    do not move or change dtype). Returns False, changing nothing, where this torch has no oneDNN linear.
    """
    ops = torch.ops.mkldnn
    if not (torch.backends.mkldnn.is_available() and hasattr(ops, "_linear_pointwise")
            and hasattr(ops, "_reorder_linear_weight")):
        return False
    for module in model.modules():
        if (isinstance(module, (ColumnParallelLinear, RowParallelLinear)) and module.weight.device.type == "cpu"
                and module.weight.dtype in (torch.float32, torch.bfloat16)):
            module.weight = nn.Parameter(ops._reorder_linear_weight(module.weight.detach()), requires_grad=False)
    return True


class ColumnParallelLinear(nn.Module):
    def __init__(self, in_features: int, local_out_features: int, bias: bool = True) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(local_out_features, in_features), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(local_out_features), requires_grad=False) if bias else None

    def forward(self, x: torch.Tensor, gelu: bool = False) -> torch.Tensor:
        return linear(x, self.weight, self.bias, gelu)


class RowParallelLinear(nn.Module):
    def __init__(self, local_in_features: int, out_features: int, group: Optional[dist.ProcessGroup],
                 tp_size: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_features, local_in_features), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(out_features), requires_grad=False)
        self.group = group
        self.tp_size = tp_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        partial = linear(x, self.weight)
        if self.tp_size > 1:
            all_reduce_(partial, self.group)
        return partial.add_(self.bias)
