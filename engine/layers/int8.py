"""W8A8 linear layers: int8 weights per output channel, int8 activations per token, int32 accumulation.

y = (s_x ⊗ s_w) ⊙ (q_x q_wᵀ) + b, with q_w = round(W / s_w) per output row (s_w = max|W_row| / 127) and
q_x = round(x / s_x) per token (s_x = max|x_token| / 127), both symmetric in [-127, 127]. The integer product
is exact (int32 cannot overflow: K · 127² < 2³¹ up to K = 133 000); all the rounding is in the two
quantisations. The scaling, bias and GELU run after the GEMM in fp32.

Two kernels compute the same integers, and which is faster depends on the CPU and the GEMM shape, so the
loader times both on each shape (`choose_kernels`), as engine.layers.kernels does for fp32:
- `int_mm`: torch._int_mm (oneDNN/ATen on the CPU, cuBLASLt on CUDA) with the weight stored [in, out];
  the int32 product is converted, then scaled per token, then per channel with the bias.
- `onednn`: oneDNN's int8 linear (torch.ops.onednn.qlinear_pointwise, the op torch's x86 inductor backend
  uses) on a pre-packed weight, with the per-channel scales fused; it takes per-tensor activation scales
  only, so the activation goes in as exact integers (unsigned, zero point 128, scale 1) and the per-token
  scale and bias follow in one pass.
torch.ops.quantized.linear_dynamic is not a candidate: its activations are quantised per tensor, and it
needs the quantised tensor types torch has deprecated.
"""
from __future__ import annotations

import functools
from typing import Dict, Iterable, Optional, Tuple

import torch
from torch import nn

from .kernels import Agree, alone, best_seconds, fastest_seconds

INT_MM, ONEDNN = "int_mm", "onednn"
QMAX = 127
ONEDNN_ZERO_POINT = 128
# torch._int_mm on CUDA wants more than 16 rows and K, N multiples of 8.
CUDA_MIN_ROWS, CUDA_ALIGN = 17, 8
# Keys of the kernel choice: (out, in) of the weight.
Shape = Tuple[int, int]


def quantize_weight(weight: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """(int8 [out, in], fp32 scale [out]) of a float weight [out, in], symmetric per output channel."""
    w = weight.detach().float()
    scale = w.abs().amax(dim=1).clamp_min(torch.finfo(torch.float32).tiny) / QMAX
    return torch.round(w / scale[:, None]).clamp_(-QMAX, QMAX).to(torch.int8), scale


def quantize_tokens(x: torch.Tensor, zero_point: int = 0) -> Tuple[torch.Tensor, torch.Tensor]:
    """(int8 [M, K], fp32 scale [M, 1]) of x [M, K], symmetric per row (token); an all-zero row stays zero.
    zero_point 128: the same integers shifted into uint8 (oneDNN's activation type)."""
    # Few passes, each one op: with several threads every op is a parallel region, and on a busy machine each
    # region can stall on a descheduled thread. max|x| as max(amax, −amin): torch's vector_norm(inf) and
    # aminmax take 20-30× longer on the CPU. |x / scale| ≤ 127 by construction, so no clamp is needed.
    x = x.float()
    scale = torch.maximum(x.amax(-1, keepdim=True), x.amin(-1, keepdim=True).neg_())
    scale.clamp_min_(torch.finfo(torch.float32).tiny)
    q = torch.mul(x, QMAX / scale).round_()
    return (q.add_(zero_point).to(torch.uint8) if zero_point else q.to(torch.int8)), scale.div_(QMAX)


@functools.lru_cache(maxsize=None)
def onednn_int8() -> bool:
    """Whether this torch and CPU run oneDNN's int8 linear (tried on a tiny weight)."""
    ops = torch.ops.onednn
    if not (torch.backends.mkldnn.is_available() and hasattr(ops, "qlinear_prepack")
            and hasattr(ops, "qlinear_pointwise")):
        return False
    try:
        Int8Linear(torch.ones(8, 16), ONEDNN)(torch.ones(2, 16))
    except RuntimeError:
        return False
    return True


def kernels_for(device: torch.device) -> Tuple[str, ...]:
    """The int8 kernels that can run on `device`; an error naming the device where there is none."""
    if device.type == "cpu":
        return (INT_MM, ONEDNN) if onednn_int8() else (INT_MM,)
    if device.type == "cuda":
        return (INT_MM,)
    raise ValueError(f"--dtype int8 runs on CPUs and CUDA GPUs only, not on {device.type}")


class Int8Linear(nn.Module):
    """A float weight [out, in] quantised to W8A8; `forward(x, bias, gelu)` returns fp32.

    The bias and GELU come with each call: a row-parallel layer adds its bias only after the all-reduce.
    """

    def __init__(self, weight: torch.Tensor, kernel: str = INT_MM) -> None:
        super().__init__()
        q, scale = quantize_weight(weight)
        self.kernel = kernel
        self.out_features, self.in_features = q.shape
        self.register_buffer("scale", scale)
        if kernel == ONEDNN:
            self.register_buffer("qweight", torch.ops.onednn.qlinear_prepack(q, None))
            self.register_buffer("zero_points", torch.zeros(self.out_features, dtype=torch.long))
        elif kernel == INT_MM:
            self.register_buffer("qweight", q.t().contiguous())  # [in, out]: _int_mm's fast layout
        else:
            raise ValueError(f"unknown int8 kernel {kernel!r}")

    # It stands where a linear's weight tensor does: callers cast activations to `weight.dtype`, and
    # engine.bench records GEMM shapes from `weight.shape`.
    @property
    def dtype(self) -> torch.dtype:
        return torch.float32

    @property
    def shape(self) -> torch.Size:
        return torch.Size((self.out_features, self.in_features))

    def forward(self, x: torch.Tensor, bias: Optional[torch.Tensor] = None, gelu: bool = False) -> torch.Tensor:
        lead = x.shape[:-1]
        x = x.reshape(-1, self.in_features)
        if self.kernel == ONEDNN:
            # exact: the integers shifted into uint8 with zero point 128, scale 1; the weight scales fused
            q, row_scale = quantize_tokens(x, ONEDNN_ZERO_POINT)
            out = torch.ops.onednn.qlinear_pointwise(q, 1.0, ONEDNN_ZERO_POINT, self.qweight, self.scale,
                                                     self.zero_points, None, 1.0, 0, torch.float32, "none", [], "")
            out = out.mul_(row_scale) if bias is None else torch.addcmul(bias, out, row_scale, out=out)
        else:
            q, row_scale = quantize_tokens(x)
            out = _int_mm(q, self.qweight).float().mul_(row_scale)  # int32 × fp32 in one op is 2× slower
            out = out.mul_(self.scale) if bias is None else torch.addcmul(bias, out, self.scale, out=out)
        if gelu:
            out = torch.ops.aten.gelu_(out)  # in place: a fresh [tokens, 4D] output costs twice the time (page faults)
        return out.view(*lead, self.out_features)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, kernel={self.kernel}"


def _int_mm(q: torch.Tensor, qweight: torch.Tensor) -> torch.Tensor:
    rows = q.shape[0]
    if q.is_cuda and rows < CUDA_MIN_ROWS:  # cuBLASLt's int8 GEMM refuses so few rows: pad with zeros
        q = torch.cat((q, q.new_zeros(CUDA_MIN_ROWS - rows, q.shape[1])))
        return torch._int_mm(q, qweight)[:rows]
    return torch._int_mm(q, qweight)


def time_kernels(weight: torch.Tensor, tokens: int, kernels: Iterable[str], bias: bool = True,
                 gelu: bool = False) -> Dict[str, float]:
    """Seconds of one `tokens`-row call of each kernel for this weight (quantisation of x included)."""
    x = torch.randn(tokens, weight.shape[1], device=weight.device)
    b = torch.zeros(weight.shape[0], device=weight.device) if bias else None
    layers = {kernel: Int8Linear(weight, kernel) for kernel in kernels}
    return fastest_seconds({kernel: lambda layer=layer: _synced(layer(x, b, gelu)) for kernel, layer in layers.items()})


def _synced(out: torch.Tensor) -> torch.Tensor:
    if out.is_cuda:
        torch.cuda.synchronize(out.device)
    return out


def choose_kernels(weights: Iterable[torch.Tensor], tokens: int, agree: Agree = alone) -> Dict[Shape, str]:
    """The fastest kernel for each distinct weight shape, timed at `tokens` rows on one weight of it."""
    seconds: Dict[Shape, Dict[str, float]] = {}
    for weight in weights:
        shape = tuple(weight.shape)
        if shape not in seconds:
            kernels = kernels_for(weight.device)
            if weight.is_cuda and (shape[0] % CUDA_ALIGN or shape[1] % CUDA_ALIGN):
                raise ValueError(f"--dtype int8 on CUDA needs linear sizes that are multiples of {CUDA_ALIGN}, "
                                 f"not {shape[0]}x{shape[1]}")
            seconds[shape] = time_kernels(weight, tokens, kernels) if len(kernels) > 1 else {kernels[0]: 0.0}
    return {shape: min(times, key=times.get) for shape, times in agree(seconds).items()}


def gemm_peak_gops(shapes: Iterable[Tuple[int, int, int]], device: torch.device, repeats: int = 5) -> float:
    """Best W8A8 rate (2·M·K·N per second, quantisation of x and scaling included) over (M, K, N) GEMMs."""
    best = 0.0
    for m, k, n in shapes:
        weight = torch.randn(n, k, device=device)
        x = torch.randn(m, k, device=device)
        for kernel in kernels_for(device):
            layer = Int8Linear(weight, kernel)
            best = max(best, 2 * m * k * n / best_seconds(lambda: _synced(layer(x)), repeats) / 1e9)
    return best
