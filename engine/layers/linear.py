"""Tensor-parallel linear layers (Megatron style): constructed with the full sizes, they keep their rank's part.

ColumnParallelLinear keeps a slice of the output features: its output stays sharded and needs no communication.
RowParallelLinear keeps the matching slice of the input features: each rank computes a partial product, the
group's all-reduce adds them, and the (replicated) bias is added once, after the sum. `reduce_parts` lets
several row-parallel layers — the experts of a multiway layer, each on its own tokens — share one all-reduce.

On the CPU, `pack_where_faster` re-lays out a weight once for oneDNN (which then also fuses the bias and the
FFN's GELU) for the GEMM shapes where that measures faster on this machine (engine.layers.kernels).
"""
from __future__ import annotations

from typing import Dict, Iterator, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from ..runtime.distributed import ParallelContext
from .checkpoint import parameter
from .kernels import ONEDNN, Agree, LinearKey, alone, choose_kernels, linear, pack
from .split import Split


def _divide(features: int, tp: int, what: str) -> int:
    if features % tp:
        raise ValueError(f"{what} of {features} is not divisible by the tensor-parallel degree {tp}")
    return features // tp


class ColumnParallelLinear(nn.Module):
    """y = x Wᵀ + b for this rank's `out_features / tp` outputs. `groups`: the outputs are that many equal blocks
    (q, k, v), each cut tp ways."""

    def __init__(self, in_features: int, out_features: int, ctx: ParallelContext, bias: bool = True,
                 gelu: bool = False, groups: int = 1) -> None:
        super().__init__()
        local = _divide(out_features, ctx.tp_size * groups, "an output width") * groups
        split = Split(0, groups, "column-parallel" + (": its heads of q, k and v" if groups == 3 else ""))
        self.weight = parameter(local, in_features, split=split)
        self.bias = parameter(local, split=split) if bias else None
        self.gelu = gelu

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x.to(self.weight.dtype), self.weight, self.bias, self.gelu)


class RowParallelLinear(nn.Module):
    """y = Σ_ranks x_r W_rᵀ + b over this rank's `in_features / tp` inputs: one all-reduce."""

    def __init__(self, in_features: int, out_features: int, ctx: ParallelContext) -> None:
        super().__init__()
        split = Split(1, why="row-parallel; the bias added once, after the all-reduce")
        self.weight = parameter(out_features, _divide(in_features, ctx.tp_size, "an input width"), split=split)
        self.bias = parameter(out_features)
        self.ctx = ctx
        self.gelu = False

    def partial(self, x: torch.Tensor) -> torch.Tensor:
        """This rank's term of the sum, without the bias (it joins after the sum, once)."""
        return linear(x.to(self.weight.dtype), self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return reduce_parts([(x, self)])


def reduce_parts(parts: Sequence[Tuple[torch.Tensor, RowParallelLinear]],
                 into: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Row-parallel products of consecutive token spans (x_i [B, n_i, in/tp], layer_i), summed over the ranks
    in one all-reduce, each span's bias added once: [B, Σ n_i, out] in fp32 or the layers' dtype — or, given
    `into` (the residual stream, [B, Σ n_i, out]), added to it in place."""
    if into is not None and parts[0][1].ctx.tp_size == 1:  # nothing to reduce: each span straight into its tokens
        start = 0
        for x, layer in parts:
            into[:, start:start + x.shape[1]] += layer.partial(x).add_(layer.bias)
            start += x.shape[1]
        return into
    partials = [layer.partial(x) for x, layer in parts]
    out = partials[0] if len(partials) == 1 else torch.cat(partials, dim=1)
    parts[0][1].ctx.all_reduce_(out)
    if len(parts) == 1:
        out.add_(parts[0][1].bias)
    else:
        start = 0
        for x, layer in parts:
            out[:, start:start + x.shape[1]] += layer.bias
            start += x.shape[1]
    return out if into is None else into.add_(out)


ParallelLinear = Union[ColumnParallelLinear, RowParallelLinear]


def parallel_linears(model: nn.Module) -> Iterator[ParallelLinear]:
    for module in model.modules():
        if isinstance(module, (ColumnParallelLinear, RowParallelLinear)):
            yield module


def _kernel_key(layer: ParallelLinear) -> LinearKey:
    # A row-parallel layer's bias is added after the all-reduce, so its GEMM has none.
    bias = isinstance(layer, ColumnParallelLinear) and layer.bias is not None
    return tuple(layer.weight.shape), bias, layer.gelu


def _packable(model: nn.Module) -> Iterator[ParallelLinear]:
    for layer in parallel_linears(model):
        weight = layer.weight  # an int8 layer's is a module (engine.layers.int8)
        if (isinstance(weight, torch.Tensor) and weight.device.type == "cpu"
                and weight.dtype in (torch.float32, torch.bfloat16) and not weight.is_mkldnn):
            yield layer


def pack_where_faster(model: nn.Module, tokens: int, agree: Agree = alone) -> Dict[str, str]:
    """Pack, in place, the CPU weights of every GEMM shape where oneDNN's packed kernel is the faster at
    `tokens` rows (do it last: packed weights do not move or change dtype). Returns the choice per shape,
    as "out x in [+bias] [+gelu]" -> kernel."""
    layers = list(_packable(model))
    choice = choose_kernels(((_kernel_key(m), m.weight) for m in layers), tokens, agree)
    for layer in layers:
        if choice[_kernel_key(layer)] == ONEDNN:
            layer.weight = nn.Parameter(pack(layer.weight), requires_grad=False)
    return {f"{shape[0]}x{shape[1]}{' +bias' if bias else ''}{' +gelu' if gelu else ''}": kernel
            for (shape, bias, gelu), kernel in sorted(choice.items())}
