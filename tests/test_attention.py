"""Attention with padded keys left out (engine.layers.attention), both ways of leaving them out, against a plain
masked softmax written out here."""
from __future__ import annotations

import pytest
import torch

from engine.layers.attention import BATCHED, KERNELS, PER_SAMPLE, AttentionOptions, attention, select_keys


def _reference(q, k, v, bias, key_mask, scale):
    scores = scale * q.double() @ k.double().transpose(-1, -2) + bias.double()
    scores = scores.masked_fill(key_mask[:, None, None, :] == 0, float("-inf"))
    return scores.softmax(-1) @ v.double()


def _attention(q, k, v, bias, key_mask, scale, shift, options):
    """What a model's attention layer does: qkv with q pre-scaled, the bias stored in rolled key order."""
    B, h, N, d = q.shape
    qkv = torch.stack((q * scale, k, v), dim=2).permute(0, 3, 2, 1, 4).reshape(B, N, 3 * h * d)
    keys = select_keys(key_mask, shift, options)
    out = attention(qkv, h, bias.roll(-shift, -1), keys, options)
    return out.view(B, N, h, d).transpose(1, 2)


@pytest.mark.parametrize("masking", [PER_SAMPLE, BATCHED])
@pytest.mark.parametrize("kernel", sorted(KERNELS))
@pytest.mark.parametrize("dtype,tolerance", [(torch.float32, 1e-5), (torch.bfloat16, 3e-2)])
@pytest.mark.parametrize("pattern", ["prefix", "holes", "none"])
def test_left_out_keys_equal_masked_softmax(dtype, tolerance, pattern, kernel, masking) -> None:
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
    got = _attention(*(t.to(dtype) for t in (q, k, v, bias)), key_mask, d ** -0.5, shift=T,
                     options=AttentionOptions(masking, kernel))
    assert got.dtype == dtype
    assert (got.double() - want).abs().max().item() < tolerance


def test_prefix_masks_select_views() -> None:
    key_mask = torch.tensor([[1, 1, 0, 0, 1, 1, 1], [1, 1, 1, 0, 1, 1, 1]])
    keys = select_keys(key_mask, 4, AttentionOptions())  # rolled: [1, 1, 1, 1, 1, 0, 0] and [1, 1, 1, 1, 1, 1, 0]
    assert keys.per_sample == [slice(0, 5), slice(0, 6)]
    assert select_keys(torch.ones(2, 7, dtype=torch.long), 4, AttentionOptions()).per_sample is None


def test_batched_masking_gives_padded_keys_no_weight() -> None:
    key_mask = torch.tensor([[1, 1, 0, 0, 1, 1, 1]])
    keys = select_keys(key_mask, 4, AttentionOptions(BATCHED))  # rolled: [1, 1, 1, 1, 1, 0, 0]
    assert keys.per_sample is None
    assert keys.additive_mask.flatten().tolist() == [0, 0, 0, 0, 0, float("-inf"), float("-inf")]


@pytest.mark.parametrize("times,chosen", [
    ({"sdpa": 35.0, "per_head_bmm": 34.0, "per_head_onednn": 20.0}, "per_head_onednn"),  # this AMD host, fp32
    ({"sdpa": 35.0, "per_head_bmm": 14.0, "per_head_onednn": 14.2}, "per_head_bmm"),  # bf16 with bf16 units
    ({"sdpa": 10.0, "per_head_bmm": 9.5, "per_head_onednn": 12.0}, "sdpa"),  # within the 10 % margin: kept
])
def test_attention_kernel_choice_takes_the_fastest_clear_winner(monkeypatch, times, chosen) -> None:
    from types import SimpleNamespace

    from engine.layers import attention_choice

    asked = {}

    def fake_times(heads, tokens, head_dim, bias, dtype, repeats):
        asked.update(heads=heads, tokens=tokens, bias=bias, dtype=dtype)
        return times

    monkeypatch.setattr(attention_choice, "time_attention", fake_times)
    cfg = SimpleNamespace(num_heads=12, joint_tokens=40 + 901, head_dim=64)
    model = SimpleNamespace(cfg=cfg, ctx=SimpleNamespace(tp_size=2), has_position_bias=True,
                            attention_options=AttentionOptions())
    assert attention_choice.choose_attention(model, torch.bfloat16) == chosen
    assert model.attention_options.kernel == chosen
    assert asked == {"heads": 6, "tokens": 941, "bias": True, "dtype": torch.bfloat16}  # this rank's heads


def test_every_kernel_that_runs_here_is_timed() -> None:
    from engine.layers.attention_choice import kernels_here, time_attention

    times = time_attention(2, 12, 8, bias=True, repeats=1)
    assert set(times) == set(kernels_here(torch.float32)) and all(t > 0 for t in times.values())
