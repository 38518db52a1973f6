"""Frozen torch layers as the families build them: no random init (the weights come from the shard, and
normal_ on the meta device imports torch._dynamo: 1.1 s of a 2 s load), no gradients."""
from __future__ import annotations

import torch
from torch import nn


def layer_norm(dim: int, eps: float) -> nn.LayerNorm:
    return nn.LayerNorm(dim, eps=eps).requires_grad_(False)


def embedding(num: int, dim: int) -> nn.Embedding:
    return nn.Embedding(num, dim, _weight=torch.empty(num, dim)).requires_grad_(False)


def dense(d_in: int, d_out: int, bias: bool = True) -> nn.Linear:
    """A replicated linear layer (task heads, poolers, projections)."""
    return nn.Linear(d_in, d_out, bias=bias).requires_grad_(False)


def patch_embedding(dim: int, patch: int) -> nn.Conv2d:
    return nn.Conv2d(3, dim, kernel_size=patch, stride=patch).requires_grad_(False)
