"""The attention every family runs: softmax(q kᵀ + B + key mask) v over this rank's heads, padded keys left out.

Padded text keys get no weight, by one of two exact means, chosen per device (AttentionOptions, set at load):

- per-sample prefixes (the CPU's): adding a −inf key mask to a shared position bias writes a fresh
  [B, h, N, N] tensor in every layer (16 ms of a 100 ms VLMo-base layer on a 2-core CPU); instead each sample
  attends to its real keys only. Keys are first rolled left by `shift` (VLMo's joint pass puts its image keys
  after its text keys in the bias's order), so that padding is a suffix: a sample's keys, and the bias columns
  they need, are then a prefix — views, not copies. One kernel call per sample per layer.
- one batched call with an additive key mask (accelerators): a launch per sample per layer (384 at batch 32
  for VLMo-base) costs more there than the mask's memory traffic.

Both give masked keys exactly zero weight (exp(−inf) = 0), so they agree to rounding.

Three kernels compute softmax(q kᵀ + B) v itself, and which is fastest depends on the CPU, its BLAS, the dtype
and the thread count, so the loader times them (engine.layers.attention_choice): torch's fused SDPA, and two
per-head loops whose scores [N, M] stay near the cache: torch.bmm (oneDNN's matmul in bf16, the BLAS's in fp32)
and oneDNN's linear on the head's keys and values as they lie (on an AMD EPYC in fp32, 1.8× the fused kernel:
there the BLAS's small-K GEMMs reach half of oneDNN's rate).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Union

import torch
import torch.nn.functional as F

from .kernels import onednn_matmul

KeyIndex = Union[slice, torch.Tensor]
PER_SAMPLE, BATCHED = "per-sample", "batched"
SDPA, PER_HEAD_BMM, PER_HEAD_ONEDNN = "sdpa", "per_head_bmm", "per_head_onednn"


@dataclass
class AttentionOptions:
    """How a model's attention layers run; one object shared by all of them, set by the loader."""
    key_masking: str = PER_SAMPLE  # PER_SAMPLE or BATCHED
    kernel: str = SDPA  # SDPA, PER_HEAD_BMM or PER_HEAD_ONEDNN


def key_masking_for(device: torch.device) -> str:
    """Per-sample prefixes on the CPU (measured faster there); one batched call on accelerators."""
    return PER_SAMPLE if device.type == "cpu" else BATCHED


@dataclass(frozen=True)
class KeySelection:
    """The keys each sample attends to, in rolled key order. Neither field set: every key, whole batch at once."""
    shift: int = 0
    per_sample: Optional[List[KeyIndex]] = None
    additive_mask: Optional[torch.Tensor] = None  # [B, 1, 1, N]: 0 on real keys, −inf on padding


def select_keys(key_mask: Optional[torch.Tensor], shift: int, options: AttentionOptions,
                dtype: torch.dtype = torch.float32) -> KeySelection:
    """KeySelection for key_mask [B, N] (1 = real token) once keys are rolled left by `shift`.

    The batched mask is built without reading the mask on the host (no device sync: CUDA graphs can capture it).
    """
    if key_mask is None:
        return KeySelection(shift)
    rolled = key_mask.roll(-shift, dims=1).bool()
    if options.key_masking == BATCHED:
        mask = torch.zeros(rolled.shape, dtype=dtype, device=rolled.device).masked_fill_(~rolled, float("-inf"))
        return KeySelection(shift, additive_mask=mask[:, None, None, :])
    if bool(rolled.all()):
        return KeySelection(shift)
    per_sample: List[KeyIndex] = []
    for row in rolled:
        kept = row.nonzero().flatten()
        # Tokenizer masks are a prefix of ones; any other pattern still works, with a gather.
        per_sample.append(slice(0, len(kept)) if bool(row[:len(kept)].all()) else kept)
    return KeySelection(shift, per_sample)


def attention(qkv: torch.Tensor, heads: int, bias: Optional[torch.Tensor], keys: KeySelection,
              options: AttentionOptions) -> torch.Tensor:
    """Multi-head attention of qkv [B, N, 3·heads·d] (q already scaled by 1/√d) → [B, N, heads·d].

    bias: [1, heads, N, N] in rolled key order, or None.
    """
    B, N, width = qkv.shape
    head_dim = width // (3 * heads)
    q, k, v = qkv.view(B, N, 3, heads, head_dim).permute(2, 0, 3, 1, 4)
    if keys.shift:  # the key order the position bias is stored in
        k, v = k.roll(-keys.shift, dims=2), v.roll(-keys.shift, dims=2)
    if keys.per_sample is not None:
        parts = [_attend(q[b:b + 1], k[b:b + 1, :, kept], v[b:b + 1, :, kept],
                         None if bias is None else bias[..., kept], options)
                 for b, kept in enumerate(keys.per_sample)]
        out = parts[0] if len(parts) == 1 else torch.cat(parts)
    else:
        mask = keys.additive_mask
        if mask is not None:
            mask = mask.to(q.dtype) if bias is None else bias + mask.to(bias.dtype)
        else:
            mask = bias
        out = _attend(q, k, v, mask, options)
    return out.transpose(1, 2).reshape(B, N, heads * head_dim)


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: Optional[torch.Tensor],
            options: AttentionOptions) -> torch.Tensor:
    """softmax(q kᵀ + bias) v for q [B, h, N, d], k and v [B, h, M, d], bias broadcastable to [B, h, N, M]."""
    return KERNELS[options.kernel](q, k, v, bias)


def _attend_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=1.0)


def _attend_bmm(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    out = torch.empty_like(q)
    for j in range(q.shape[1]):
        kt = k[:, j].transpose(1, 2)
        if bias is None:
            scores = torch.bmm(q[:, j], kt)
        else:
            scores = torch.baddbmm(bias[:, min(j, bias.shape[1] - 1)].expand(q.shape[0], -1, -1), q[:, j], kt)
        torch.bmm(torch.softmax(scores, -1, out=scores), v[:, j], out=out[:, j])
    return out


def _attend_onednn(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    # q kᵀ is a linear with the keys as its weight [M, d], p v one with vᵀ [d, M] (a view). Views of qkv, whose
    # rows are 3·h·d apart, take oneDNN's reference path (1000× slower): each is made contiguous once.
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    B, h, N, M = q.shape[0], q.shape[1], q.shape[2], k.shape[2]
    if bias is not None:
        bias = bias.expand(B, h, N, M)
    out = torch.empty_like(q)
    for b in range(B):
        for j in range(h):
            scores = onednn_matmul(q[b, j], k[b, j])
            if bias is not None:
                scores.add_(bias[b, j])
            # the softmax in place: a fresh [N, M] output per head costs the page faults of writing new memory
            out[b, j] = onednn_matmul(torch.softmax(scores, -1, out=scores), v[b, j].t())
    return out


KERNELS = {SDPA: _attend_sdpa, PER_HEAD_BMM: _attend_bmm, PER_HEAD_ONEDNN: _attend_onednn}
