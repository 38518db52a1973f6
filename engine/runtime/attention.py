"""Attention kernels and key masking without a [B, h, N, N] mask per layer.

Padded text keys get no weight. Adding a −inf key mask to the (shared) position
bias would write a fresh [B, h, N, N] tensor in every layer (16 ms of a 100 ms
VLMo-base layer on a 2-core CPU); instead each sample attends to its real keys
only. Keys are first rolled left by `shift` (the joint pass puts its image keys
before its text keys, and the position bias is stored in that key order), so
that padding is a suffix: a sample's keys, and the bias columns they need, are
then a prefix — views, not copies.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Union

import torch
import torch.nn.functional as F

KeyIndex = Union[slice, torch.Tensor]


@dataclass(frozen=True)
class KeySelection:
    """The keys each sample attends to, in rolled key order; `per_sample` None: all keys, whole batch at once."""
    shift: int = 0
    per_sample: Optional[List[KeyIndex]] = None


def select_keys(key_mask: Optional[torch.Tensor], shift: int = 0) -> KeySelection:
    """KeySelection for key_mask [B, N] (1 = real token) once keys are rolled left by `shift`."""
    if key_mask is None or bool(key_mask.all()):
        return KeySelection(shift)
    rolled = key_mask.roll(-shift, dims=1).bool()
    per_sample: List[KeyIndex] = []
    for row in rolled:
        kept = row.nonzero().flatten()
        # Tokenizer masks are a prefix of ones; any other pattern still works, with a gather.
        per_sample.append(slice(0, len(kept)) if bool(row[:len(kept)].all()) else kept)
    return KeySelection(shift, per_sample)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: Optional[torch.Tensor],
           scale: float, per_head_bmm: bool = False) -> torch.Tensor:
    """softmax(scale · q kᵀ + bias) v for q [B, h, N, d], k and v [B, h, M, d], bias broadcastable to [B, h, N, M].

    per_head_bmm: per-head matmuls instead of the fused kernel (the loader picks it for bf16 on CPUs whose
    oneDNN has bf16 matmuls, where it is the faster).
    """
    if per_head_bmm:
        return _attend_bmm(q, k, v, bias, scale)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=scale)


def _attend_bmm(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: Optional[torch.Tensor],
                scale: float) -> torch.Tensor:
    # oneDNN's bf16 bmm + softmax, one head at a time so that its scores stay in L2, beat the fused flash
    # kernel on CPUs with bf16 matmul units; in fp32, or without such units, the fused kernel wins.
    out = torch.empty_like(q)
    for j in range(q.shape[1]):
        kt = k[:, j].transpose(1, 2)
        if bias is None:
            scores = torch.bmm(q[:, j], kt).mul_(scale)
        else:
            scores = torch.baddbmm(bias[:, j], q[:, j], kt, alpha=scale)
        torch.bmm(scores.softmax(-1), v[:, j], out=out[:, j])
    return out
