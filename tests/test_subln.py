"""Sub-LN over a tensor-parallel-split dimension: merging per-rank chunk statistics gives the full row's."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from engine.layers.subln import chunk_statistics, merge_statistics


@pytest.mark.parametrize("tp", [2, 3, 4])
@pytest.mark.parametrize("offset", [0.0, 1e3])
def test_merged_statistics_equal_the_full_rows(tp: int, offset: float) -> None:
    gen = torch.Generator().manual_seed(tp)
    # a large common offset with a small spread is where Σx² − (Σx)²/n would cancel
    x = torch.randn(3, 5, 12 * tp, generator=gen, dtype=torch.float64).mul(0.01).add(offset).float()
    weight, bias = torch.rand(x.shape[-1], generator=gen) + 0.5, torch.randn(x.shape[-1], generator=gen)
    chunks = x.chunk(tp, dim=-1)
    stats = torch.stack([chunk_statistics(c) for c in chunks])  # what the all-reduce leaves on every rank
    mean, rstd = merge_statistics(stats, chunks[0].shape[-1], 1e-5)
    normed = torch.cat([(c - mean[..., None]) * rstd[..., None] for c in chunks], dim=-1) * weight + bias
    want = F.layer_norm(x.double(), (x.shape[-1],), weight.double(), bias.double(), 1e-5)
    # as close as torch's own fp32 LayerNorm over the unsplit rows gets
    single_device = F.layer_norm(x, (x.shape[-1],), weight, bias, 1e-5)
    budget = 2 * (single_device.double() - want).abs().max().item() + 1e-5
    assert (normed.double() - want).abs().max().item() <= budget


def test_sum_of_squares_would_fail_where_the_merge_does_not() -> None:
    x = torch.full((1, 64), 1e3) + torch.linspace(-0.01, 0.01, 64)
    naive_var = (x.square().mean(-1) - x.mean(-1).square()).item()
    stats = torch.stack([chunk_statistics(c) for c in x.chunk(2, dim=-1)])
    _, rstd = merge_statistics(stats, 32, 0.0)
    true_var = x.double().var(-1, unbiased=False).item()
    assert abs(rstd.item() ** -2 - true_var) / true_var < 1e-2
    assert abs(naive_var - true_var) / true_var > 1  # the one-pass formula is useless here
