"""Which attention kernel runs in fp32 on this CPU (fp32 and int8 models), chosen by timing at load.

torch's fused SDPA kernel and per-head matmuls (oneDNN's bmm with the softmax between, each head's scores
small enough for L2; engine.layers.attention) trade places with the CPU, the thread count and the token count,
so each rank times both on one layer's attention of its own heads at one sample's tokens, with a
relative-position bias where the model has one, and the model's attention options take the faster.
"""
from __future__ import annotations

from typing import Dict

import torch

from .attention import AttentionOptions, _attend
from .kernels import best_seconds

SDPA, PER_HEAD = "sdpa", "per_head_bmm"
SWITCH_MARGIN = 0.1


def time_attention(heads: int, tokens: int, head_dim: int, bias: bool) -> Dict[str, float]:
    """Seconds of one fp32 attention over [1, heads, tokens, head_dim] with each kernel."""
    q, k, v = (torch.randn(1, heads, tokens, head_dim) for _ in range(3))
    b = torch.randn(1, heads, tokens, tokens) if bias else None
    return {name: best_seconds(lambda: _attend(q, k, v, b, AttentionOptions(per_head_bmm=per_head)))
            for name, per_head in ((SDPA, False), (PER_HEAD, True))}


def choose_attention(model: torch.nn.Module) -> str:
    """Time both kernels for this model's attention shape, set the faster in its options; its name."""
    cfg = model.cfg
    times = time_attention(cfg.num_heads // model.ctx.tp_size, cfg.max_text_len + cfg.num_image_tokens,
                           cfg.head_dim, model.has_position_bias)
    # the fused kernel stays unless the per-head one wins clearly: single timings on a busy machine jitter
    best = PER_HEAD if times[PER_HEAD] * (1 + SWITCH_MARGIN) <= times[SDPA] else SDPA
    model.attention_options.per_head_bmm = best == PER_HEAD
    return best
