"""LayerNorm over a feature dimension that tensor parallelism splits (BEiT-3's Sub-LN).

BEiT-3 normalises the attention output over all heads (`inner_attn_ln`) and the FFN's hidden layer over its
whole width (`ffn_layernorm`); each rank holds one contiguous chunk of those features. The mean and variance
must be those of the full row, so each rank contributes its chunk's statistics and the ranks combine them.

Scheme: one all-reduce per Sub-LN, carrying each rank's per-token (chunk mean, chunk sum of squared deviations)
in that rank's slot of a [tp, tokens, 2] zero buffer — an all-gather through the all-reduce every backend has.
Every rank then merges the tp pairs exactly with Chan et al.'s parallel-variance formula:

    mean = avg_r(m_r),   M2 = Σ_r M2_r + n · Σ_r (m_r − mean)²,   var = M2 / (tp · n)

Why not one all-reduce of [Σx, Σx²]: var = E[x²] − mean² cancels catastrophically when |mean| ≫ std (fp32
keeps ~7 digits: a row with mean 100 and std 0.01 loses its variance entirely). Why not two passes (reduce
the mean, then the centred squares): exact too, but two latency-bound collectives per Sub-LN instead of one.
Both Multiway experts' tokens share the one all-reduce. Statistics are always fp32, whatever the compute dtype.
"""
from __future__ import annotations

from typing import Callable, List, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ..runtime.distributed import ParallelContext
from .checkpoint import parameter
from .split import Split


def chunk_statistics(x: torch.Tensor) -> torch.Tensor:
    """[..., 2]: per row of x [..., n], the mean and the sum of squared deviations from it (fp32)."""
    var, mean = torch.var_mean(x.float(), dim=-1, correction=0)
    return torch.stack((mean, var * x.shape[-1]), dim=-1)


def merge_statistics(stats: torch.Tensor, chunk: int, eps: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """(mean, 1/√(var + eps)) of full rows from stats [tp, ..., 2] of tp equal chunks of `chunk` features."""
    means, m2 = stats[..., 0], stats[..., 1]
    mean = means.mean(dim=0)
    total_m2 = m2.sum(dim=0) + chunk * (means - mean).square().sum(dim=0)
    var = total_m2 / (chunk * stats.shape[0])
    return mean, torch.rsqrt(var + eps)


def split_layer_norm(parts: Sequence[Tuple[torch.Tensor, torch.Tensor, torch.Tensor]], eps: float,
                     tp_rank: int, tp_size: int, all_reduce: Callable[[torch.Tensor], object]) -> List[torch.Tensor]:
    """LayerNorm each (x [B, N_i, n], local weight [n], local bias [n]) over the full tp·n features, in fp32;
    `all_reduce` sums a tensor in place over the group.

    Every rank of the group must call this with the same token counts (they hold the same tokens).
    """
    if tp_size == 1:
        return [F.layer_norm(x.float(), (x.shape[-1],), w, b, eps) for x, w, b in parts]
    local = [chunk_statistics(x).reshape(-1, 2) for x, _, _ in parts]
    counts = [s.shape[0] for s in local]
    buffer = torch.zeros(tp_size, sum(counts), 2, dtype=torch.float32, device=local[0].device)
    buffer[tp_rank].copy_(torch.cat(local))
    all_reduce(buffer)
    out = []
    for (x, w, b), stats in zip(parts, buffer.split(counts, dim=1)):
        mean, rstd = merge_statistics(stats, x.shape[-1], eps)
        shape = x.shape[:-1] + (1,)
        normed = (x.float() - mean.view(shape)).mul_(rstd.view(shape))
        out.append(torch.addcmul(b, normed, w))
    return out


class SplitLayerNorm(nn.Module):
    """This rank's chunk of a LayerNorm's weight and bias over split features; `split_layer_norm` normalises."""

    def __init__(self, features: int, ctx: ParallelContext) -> None:
        super().__init__()
        local = features // ctx.tp_size
        split = Split(0, why="its features; the statistics reduced across ranks")
        self.weight, self.bias = parameter(local, split=split), parameter(local, split=split)
