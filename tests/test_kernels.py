"""CPU kernels chosen per GEMM shape by timing them (engine.layers.kernels), and the GEMM shapes that
engine.bench's peak is measured on."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from engine.models import build_model
from engine.runtime.distributed import ParallelContext
from engine.layers import kernels
from engine.tasks.benchmark import gemm_shapes, recorded_forward
from engine.models.vlmo.config import ARCH_PRESETS, VLMoConfig
from engine.layers.linear import ColumnParallelLinear, RowParallelLinear, pack_where_faster


def _layers() -> nn.Module:
    torch.manual_seed(0)
    ctx = ParallelContext.layout(1)
    model = nn.ModuleDict({"fc1": ColumnParallelLinear(16, 32, ctx, gelu=True), "fc2": RowParallelLinear(32, 16, ctx),
                           "qkv": ColumnParallelLinear(16, 48, ctx)})
    for p in model.parameters():
        p.data = torch.randn(p.shape) * 0.3
    return model


@pytest.mark.skipif(not kernels.onednn_packs(torch.float32), reason="this torch has no oneDNN packed linear")
def test_packs_exactly_the_shapes_where_onednn_measures_faster(monkeypatch: pytest.MonkeyPatch) -> None:
    onednn_wins = {(32, 16)}  # fc1's shape only
    monkeypatch.setattr(kernels, "time_linear", lambda tokens, weight, bias, gelu: {
        kernels.ATEN: 1.0, kernels.ONEDNN: 0.5 if tuple(weight.shape) in onednn_wins else 2.0})
    model = _layers()
    x = torch.randn(5, 16)
    want = {"fc1": model["fc1"](x), "qkv": model["qkv"](x), "fc2": model["fc2"](torch.randn(5, 32))}
    choice = pack_where_faster(model, tokens=7)
    assert choice == {"32x16 +bias +gelu": "onednn", "16x32": "aten", "48x16 +bias": "aten"}
    assert [name for name, m in model.items() if m.weight.is_mkldnn] == ["fc1"]
    torch.testing.assert_close(model["fc1"](x), want["fc1"])  # bias and GELU fused, same result
    torch.testing.assert_close(model["qkv"](x), want["qkv"])


def test_unpackable_dtype_is_timed_with_the_plain_kernel_only(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(kernels, "onednn_packs", lambda dtype: False)  # as oneDNN without bf16 on AVX2
    times = kernels.time_linear(4, torch.randn(8, 16).bfloat16(), bias=True, gelu=True)
    assert set(times) == {kernels.ATEN}
    model = _layers().to(torch.bfloat16)
    pack_where_faster(model, tokens=4)
    assert not any(m.weight.is_mkldnn for m in model.values())


def test_gemm_shapes_of_vlmo_base_480_vqa_at_tp2(monkeypatch: pytest.MonkeyPatch) -> None:
    """The shapes engine.bench records from a forward of rank 0 of 2 (uninitialised weights: shapes only)."""
    cfg = VLMoConfig(image_size=480, vqa_labels=3129, **ARCH_PRESETS["vlmo_base_patch16"])
    ctx = ParallelContext.layout(2)
    monkeypatch.setattr(ctx, "all_reduce_", lambda tensor, purpose="activations": tensor)  # no peer: shapes only
    model = build_model(cfg, ctx).eval()
    joint, text, image = 40 + 901, 40, 901  # T + n, T, n = (480/16)² + 1
    want = set()
    for m in (joint,):  # attention runs on the joint sequence
        want |= {(m, 768, 3 * 768 // 2), (m, 768 // 2, 768)}
    for m in (joint, text, image):  # VL experts on the joint sequence (layers 10-11), text and image experts apart
        want |= {(m, 768, 3072 // 2), (m, 3072 // 2, 768)}
    with torch.inference_mode():
        gemms = recorded_forward(model, "vqa", _inputs(1))[0]
        assert gemm_shapes(gemms) == sorted(want)
        assert not any(int8 for *_, int8 in gemms)  # fp32: no int8 GEMM
        # each layer runs qkv and the attention output once on the joint sequence
        assert gemms[(joint, 768, 3 * 768 // 2, False)] == gemms[(joint, 768 // 2, 768, False)] == cfg.depth
        assert max(m for m, *_ in gemm_shapes(recorded_forward(model, "vqa", _inputs(2))[0])) == 2 * joint


def _inputs(batch: int) -> dict:
    return {"text_ids": torch.zeros(batch, 40, dtype=torch.long), "text_masks": torch.ones(batch, 40, dtype=torch.long),
            "image": torch.zeros(batch, 3, 480, 480)}


def test_candidates_are_timed_interleaved_and_each_keeps_its_fastest_call(monkeypatch: pytest.MonkeyPatch) -> None:
    """A burst of load must fall on every candidate alike: their timed calls alternate."""
    calls, clock = [], iter(range(1000))
    monkeypatch.setattr(kernels.time, "perf_counter", lambda: next(clock))
    # each call takes one tick of the fake clock, except "slow"'s, which take two (it reads the clock once more)
    runs = {"fast": lambda: calls.append("fast"), "slow": lambda: (calls.append("slow"), next(clock))}
    times = kernels.fastest_seconds(runs, repeats=3)
    assert calls == ["fast", "slow"] + ["fast", "slow"] * 3  # one untimed call each, then the timed ones alternate
    assert times == {"fast": 1, "slow": 2}
