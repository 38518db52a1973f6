"""Which attention kernel runs on this CPU, chosen by timing at load, as the linears' kernels are.

The fused SDPA kernel and the per-head loops (engine.layers.attention) trade places with the CPU, its BLAS,
the dtype, the thread count and the token count, so each rank times every kernel that runs here on one
layer's attention of its own heads at one sample's tokens, in the model's compute dtype, with a
relative-position bias where the model has one, and the model's attention options take the fastest by the
timings summed over the ranks (the loader's `agree`), so that every rank runs the same kernel.
"""
from __future__ import annotations

import functools
from typing import Dict, Optional, Sequence, Tuple

import torch

from .attention import PER_HEAD_BMM, PER_HEAD_ONEDNN, SDPA, AttentionOptions, _attend
from .kernels import Agree, alone, fastest_seconds, onednn_matmuls

# The fused kernel stays unless another wins by this fraction: single timings on a busy machine jitter.
SWITCH_MARGIN = 0.1
# Best of 5 (0.5 s at VLMo-base's shape on one thread): best of 3 on a loaded machine picked SDPA on one rank of two.
CHOICE_REPEATS = 5


def kernels_here(dtype: torch.dtype) -> Tuple[str, ...]:
    return (SDPA, PER_HEAD_BMM, PER_HEAD_ONEDNN) if onednn_matmuls(dtype) else (SDPA, PER_HEAD_BMM)


def time_attention(heads: int, tokens: int, head_dim: int, bias: bool, dtype: torch.dtype = torch.float32,
                   kernels: Optional[Sequence[str]] = None, repeats: int = 3) -> Dict[str, float]:
    """Seconds of one attention over [1, heads, tokens, head_dim] with each of `kernels` [default: every kernel
    that runs here]. q, k and v are views of one qkv tensor, as the model's are."""
    qkv = torch.randn(1, tokens, 3, heads, head_dim).to(dtype)
    q, k, v = qkv.permute(2, 0, 3, 1, 4)
    b = torch.randn(1, heads, tokens, tokens).to(dtype) if bias else None
    return fastest_seconds({kernel: functools.partial(_attend, q, k, v, b, AttentionOptions(kernel=kernel))
                            for kernel in kernels or kernels_here(dtype)}, repeats)


def choose_attention(model: torch.nn.Module, dtype: torch.dtype, agree: Agree = alone) -> str:
    """Time the kernels for this model's attention shape in `dtype`, set the fastest in its options; its name."""
    cfg = model.cfg
    times = time_attention(cfg.num_heads // model.ctx.tp_size, cfg.joint_tokens, cfg.head_dim, model.has_position_bias,
                           dtype, repeats=CHOICE_REPEATS)
    times = agree({"attention": times})["attention"]
    fastest = min(times, key=times.get)
    best = fastest if times[fastest] * (1 + SWITCH_MARGIN) <= times[SDPA] else SDPA
    model.attention_options.kernel = best
    return best
