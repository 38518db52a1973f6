"""Which attention kernel runs in fp32 on this CPU (fp32 and int8 models), chosen by timing at load.

torch's fused SDPA kernel and per-head matmuls (oneDNN's bmm with the softmax between, each head's scores
small enough for L2; engine.runtime.attention) trade places with the CPU, the thread count and the token count,
so each rank times both on one layer's attention of its own heads at one sample's tokens, with the
relative-position bias where the model has one, and every attention module of the model takes the faster.
"""
from __future__ import annotations

from typing import Dict, List

import torch
from torch import nn

from engine.runtime.attention import attend
from engine.runtime.kernels import best_seconds

SDPA, PER_HEAD = "sdpa", "per_head_bmm"


def attention_modules(model: nn.Module) -> List[nn.Module]:
    return [m for m in model.modules() if hasattr(m, "per_head_bmm")]


def time_attention(heads: int, tokens: int, head_dim: int, bias: bool) -> Dict[str, float]:
    """Seconds of one fp32 attention over [1, heads, tokens, head_dim] with each kernel."""
    q, k, v = (torch.randn(1, heads, tokens, head_dim) for _ in range(3))
    b = torch.randn(1, heads, tokens, tokens) if bias else None
    return {name: best_seconds(lambda: attend(q, k, v, b, 1.0, per_head))
            for name, per_head in ((SDPA, False), (PER_HEAD, True))}


def choose_attention(model: nn.Module) -> str:
    """Time both kernels for this model's attention shape and set it on every attention module; its name."""
    modules = attention_modules(model)
    cfg = model.cfg
    tokens = cfg.max_text_len + cfg.num_image_tokens
    times = time_attention(modules[0].heads, tokens, modules[0].head_dim,
                           bool(getattr(cfg, "relative_position_bias", False)))
    best = min(times, key=times.get)
    for module in modules:
        module.per_head_bmm = best == PER_HEAD
    return best
