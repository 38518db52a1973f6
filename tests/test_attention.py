"""Attention with padded keys left out (engine.runtime.attention) against a plain masked softmax, written out here."""
from __future__ import annotations

import pytest
import torch

from engine.runtime.attention import attend, select_keys


def _reference(q, k, v, bias, key_mask, scale):
    scores = scale * q.double() @ k.double().transpose(-1, -2) + bias.double()
    scores = scores.masked_fill(key_mask[:, None, None, :] == 0, float("-inf"))
    return scores.softmax(-1) @ v.double()


def _compacted(q, k, v, bias, key_mask, scale, shift, per_head_bmm):
    """What Attention.forward does: roll keys (and the stored bias) left by `shift`, keep each sample's keys."""
    keys = select_keys(key_mask, shift)
    k, v, bias = k.roll(-shift, 2), v.roll(-shift, 2), bias.roll(-shift, -1)
    if keys.per_sample is None:
        return attend(q, k, v, bias, scale, per_head_bmm)
    return torch.cat([attend(q[b:b + 1], k[b:b + 1, :, kept], v[b:b + 1, :, kept], bias[..., kept], scale,
                             per_head_bmm) for b, kept in enumerate(keys.per_sample)])


@pytest.mark.parametrize("per_head_bmm", [False, True])
@pytest.mark.parametrize("dtype,tolerance", [(torch.float32, 1e-5), (torch.bfloat16, 3e-2)])
@pytest.mark.parametrize("pattern", ["prefix", "holes", "none"])
def test_left_out_keys_equal_masked_softmax(dtype, tolerance, pattern, per_head_bmm) -> None:
    gen = torch.Generator().manual_seed(0)
    B, h, T, n, d = 3, 2, 6, 9, 8  # a joint pass: T text tokens (maskable), then n image tokens
    N = T + n
    q, k, v = (torch.randn(B, h, N, d, generator=gen) for _ in range(3))
    bias = torch.randn(1, h, N, N, generator=gen)
    key_mask = torch.ones(B, N, dtype=torch.long)
    if pattern == "prefix":  # what a tokenizer gives: [CLS] question [SEP], then padding
        for b, length in enumerate((2, 6, 4)):
            key_mask[b, length:T] = 0
    elif pattern == "holes":  # any other pattern must still be right (a gather instead of a view)
        key_mask[0, 1] = key_mask[1, 3:5] = key_mask[2, 0] = 0
    want = _reference(q, k, v, bias, key_mask, d ** -0.5)
    got = _compacted(*(t.to(dtype) for t in (q, k, v, bias)), key_mask, d ** -0.5, shift=T,
                     per_head_bmm=per_head_bmm)
    assert got.dtype == dtype
    assert (got.double() - want).abs().max().item() < tolerance


def test_prefix_masks_select_views() -> None:
    key_mask = torch.tensor([[1, 1, 0, 0, 1, 1, 1], [1, 1, 1, 0, 1, 1, 1]])
    keys = select_keys(key_mask, shift=4)  # rolled: [1, 1, 1, 1, 1, 0, 0] and [1, 1, 1, 1, 1, 1, 0]
    assert keys.per_sample == [slice(0, 5), slice(0, 6)]
    assert select_keys(torch.ones(2, 7, dtype=torch.long), shift=4).per_sample is None
