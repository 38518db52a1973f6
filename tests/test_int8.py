"""engine.layers.int8 and engine.layers.smoothing against float references and hand-derived error bounds."""
import pytest
import torch
import torch.nn.functional as F

from engine.layers.int8 import (INT_MM, ONEDNN, QMAX, Int8Linear, choose_kernels, kernels_for, quantize_tokens,
                                quantize_weight)
from engine.layers.smoothing import ActivationRanges, smooth

KERNELS = kernels_for(torch.device("cpu"))


def _w8a8_bound(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Worst-case |y - x Wᵀ| of symmetric round-to-nearest quantisation: with x = s_x (q_x + e_x),
    W = s_w (q_w + e_w), |e| ≤ 1/2, the error per term is at most |x_k| s_w/2 + |w_k| s_x/2 + s_x s_w/4."""
    sx = x.abs().amax(1, keepdim=True) / QMAX
    sw = w.abs().amax(1) / QMAX
    return (x.abs() @ torch.ones_like(w).t() * sw / 2 + sx / 2 * w.abs().sum(1) + sx * sw / 4 * w.shape[1])


def test_weight_quantisation_rounds_each_output_channel_to_its_own_step():
    torch.manual_seed(0)
    w = torch.randn(16, 40) * torch.logspace(-3, 2, 16)[:, None]
    w[3] = 0
    q, scale = quantize_weight(w)
    assert q.dtype == torch.int8 and int(q.abs().max()) == QMAX
    assert torch.equal(q[3], torch.zeros(40, dtype=torch.int8))
    assert torch.allclose(scale[torch.arange(16) != 3], w.abs().amax(1)[torch.arange(16) != 3] / QMAX)
    assert bool(((q.float() * scale[:, None] - w).abs() <= scale[:, None] / 2 * (1 + 1e-6)).all())


def test_token_quantisation_is_per_row():
    x = torch.tensor([[1.0, -2.0, 0.5], [1000.0, 3.0, -254.0], [0.0, 0.0, 0.0]])
    q, scale = quantize_tokens(x)
    assert q.tolist()[0] == [64, -127, 32] and q.tolist()[1] == [127, 0, -32]  # 63.5 rounds to even
    assert torch.equal(q[2], torch.zeros(3, dtype=torch.int8))
    assert scale[:2, 0].tolist() == pytest.approx([2 / 127, 1000 / 127])


@pytest.mark.parametrize("kernel", KERNELS)
def test_exactly_representable_inputs_give_the_exact_product(kernel):
    # integer weights whose rows reach ±127 and integer tokens reaching ±127: both scales are 1, nothing rounds
    torch.manual_seed(1)
    w = torch.randint(-127, 128, (24, 32)).float()
    w[:, 0] = 127
    x = torch.randint(-127, 128, (5, 32)).float()
    x[:, 1] = -127
    bias = torch.randn(24)
    y = Int8Linear(w, kernel)(x, bias)
    assert torch.allclose(y, x.double().mm(w.double().t()).float() + bias, rtol=0, atol=1e-3)


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("seed", range(3))
def test_error_stays_within_the_rounding_bound(kernel, seed):
    torch.manual_seed(seed)
    m, k, n = 7 + seed * 50, 64 * (seed + 1), 48
    x = torch.randn(m, k) * torch.rand(m, 1) * 10
    w = torch.randn(n, k) * torch.rand(n, 1)
    bias = torch.randn(n)
    y = Int8Linear(w, kernel)(x, bias)
    err = (y - F.linear(x.double(), w.double(), bias.double()).float()).abs()
    assert bool((err <= _w8a8_bound(x, w) * (1 + 1e-4) + 1e-5).all())
    cos = F.cosine_similarity(y.flatten(), F.linear(x, w, bias).flatten(), dim=0)
    assert cos > 0.999  # gaussian data: about 1 % relative error


def test_the_kernels_agree_and_fuse_gelu_after_the_scaling():
    if ONEDNN not in KERNELS:
        pytest.skip("oneDNN's int8 linear does not run here")
    torch.manual_seed(2)
    w, x, bias = torch.randn(96, 128), torch.randn(3, 11, 128), torch.randn(96)
    a = Int8Linear(w, INT_MM)(x, bias, gelu=True)
    b = Int8Linear(w, ONEDNN)(x, bias, gelu=True)
    assert a.shape == (3, 11, 96)
    assert torch.allclose(a, b, rtol=1e-5, atol=1e-5)
    assert torch.allclose(a, F.gelu(Int8Linear(w, INT_MM)(x) + bias), rtol=1e-5, atol=1e-5)


def test_kernel_choice_covers_every_shape_with_a_kernel_that_runs_here():
    choice = choose_kernels([torch.randn(64, 32), torch.randn(32, 64), torch.randn(64, 32)], tokens=20)
    assert set(choice) == {(64, 32), (32, 64)} and set(choice.values()) <= set(KERNELS)


def test_devices_without_int8_kernels_are_refused_in_one_line():
    with pytest.raises(ValueError, match="CPUs and CUDA GPUs only, not on meta"):
        kernels_for(torch.device("meta"))


def _planted_outliers(dim: int = 256, outliers=(5, 77, 200), factor: float = 100.0):
    """A LayerNorm whose γ makes a few channels `factor` times the others, and a linear reading it whose
    columns for them are `factor` times smaller: the float product is as without outliers."""
    torch.manual_seed(3)
    norm = torch.nn.LayerNorm(dim).requires_grad_(False)
    norm.weight.data = 1 + 0.1 * torch.randn(dim)
    norm.bias.data = 0.1 * torch.randn(dim)
    norm.weight.data[list(outliers)] *= factor
    w = torch.randn(3 * dim, dim) / dim ** 0.5
    w[:, list(outliers)] /= factor
    return norm, w, torch.randn(64, dim)


def _int8_error(norm, w, x) -> float:
    h = norm(x)
    ref = F.linear(h, w)
    return float((Int8Linear(w)(h) - ref).norm() / ref.norm())


def test_smoothing_is_exact_in_float_and_removes_the_planted_outliers_error():
    norm, w, x = _planted_outliers()
    before = _int8_error(norm, w, x)
    ref = F.linear(norm(x), w)
    s = smooth(norm, [w])
    assert torch.allclose(F.linear(norm(x), w), ref, rtol=1e-4, atol=1e-4)  # the float function is unchanged
    assert float(s[[5, 77, 200]].min()) > 5 * float(s.median())  # the outlier channels got the big factors
    after = _int8_error(norm, w, x)
    assert before > 0.2 and after < 0.02, (before, after)  # measured: 0.35 and 0.010


def test_calibration_measures_the_channel_ranges_a_pass_sees():
    norm, w, x = _planted_outliers()
    layer = torch.nn.Linear(256, 8)
    with ActivationRanges([layer]) as ranges:
        layer(x[:32])
        layer(x[32:] * 2)
    assert torch.equal(ranges[layer], torch.maximum(x[:32].abs().amax(0), (x[32:] * 2).abs().amax(0)))
    layer(x * 10)  # after the block: no longer recorded
    assert torch.equal(ranges[layer], torch.maximum(x[:32].abs().amax(0), (x[32:] * 2).abs().amax(0)))
    with pytest.raises(KeyError, match="no calibration batch"):
        ActivationRanges([torch.nn.Linear(2, 2)])[layer]


@pytest.mark.parametrize("kernel", KERNELS)
def test_a_token_gets_the_same_output_alone_or_in_any_batch(kernel):
    # per-token scales and an exact integer product: batching (the server's) cannot change an answer
    torch.manual_seed(4)
    w, x, bias = torch.randn(80, 96), torch.randn(37, 96), torch.randn(80)
    layer = Int8Linear(w, kernel)
    together = layer(x, bias, gelu=True)
    assert all(torch.equal(layer(x[i:i + 1], bias, gelu=True)[0], together[i]) for i in range(37))
    assert torch.equal(layer(x[5:20], bias, gelu=True), together[5:20])
