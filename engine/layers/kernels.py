"""Which CPU kernel runs each linear layer, chosen by trying and timing on this machine at load.

oneDNN can hold a weight pre-packed for its own GEMM and fuse the bias and GELU into it; that wins on
some CPUs and shapes and loses on others (AVX2 hosts, narrow shards), and oneDNN has no bf16 GEMM at
all on CPUs without AVX-512 (BW/VL/DQ) or AVX-NE-CONVERT. So rather than guess from the ISA, the loader
asks oneDNN whether it can pack this dtype here, then times both kernels on each of the model's GEMM
shapes and packs only the shapes where the packed kernel is faster (by every rank's timings summed: all
ranks must run the same kernels, or the slower keeps the others waiting at each all-reduce).
`ONEDNN_MAX_CPU_ISA=AVX2` makes an AVX-512 machine behave as an AVX2 one for oneDNN (tests use it to take
the path of CPUs without bf16).
"""
from __future__ import annotations

import collections
import contextlib
import functools
import time
from typing import Any, Callable, Dict, Iterable, Iterator, Optional, Tuple, Union

import torch
import torch.nn.functional as F

ONEDNN, ATEN = "onednn", "aten"
REPEATS = 3
# The plain kernel must beat the packed one by this fraction to be chosen: timings on a busy machine jitter,
# and packing also fuses the bias and GELU, which a single GEMM's timing undercounts.
PLAIN_MARGIN = 0.1
# Keys: the weight shape, whether the layer has a bias, whether GELU follows.
LinearKey = Tuple[Tuple[int, int], bool, bool]
# What a rank does with its timings {key: {kernel: seconds}} before choosing: the loader passes
# ParallelContext.summed_over_ranks, so that every rank of a job runs the same kernels.
Agree = Callable[[Dict[Any, Dict[str, float]]], Dict[Any, Dict[str, float]]]


def alone(seconds: Dict[Any, Dict[str, float]]) -> Dict[Any, Dict[str, float]]:
    """One process's own timings, as they are."""
    return seconds


# Every linear() call while record_gemms is active, counted by (M, K, N, int8): engine.bench reads the forward's
# own GEMMs (their shapes for the peak, the int8 ones' FLOPs for int8's roofline)
Gemm = Tuple[int, int, int, bool]
_recorded: Optional["collections.Counter[Gemm]"] = None


@contextlib.contextmanager
def record_gemms() -> Iterator["collections.Counter[Gemm]"]:
    """Count the GEMMs the linears run inside the block."""
    global _recorded
    _recorded = gemms = collections.Counter()
    try:
        yield gemms
    finally:
        _recorded = None


def linear(x: torch.Tensor, weight: Union[torch.Tensor, torch.nn.Module], bias: torch.Tensor = None,
           gelu: bool = False) -> torch.Tensor:
    """x Wᵀ + b, then exact GELU if asked: one fused oneDNN call for a packed weight, else F.linear.

    A weight that is a module (engine.layers.int8.Int8Linear) computes the whole step itself."""
    if _recorded is not None:
        # a weight that is a module is an int8 layer's
        int8 = isinstance(weight, torch.nn.Module)
        _recorded[(x.numel() // x.shape[-1], weight.shape[1], weight.shape[0], int8)] += 1
    if isinstance(weight, torch.nn.Module):
        return weight(x, bias, gelu)
    if weight.is_mkldnn:
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "gelu" if gelu else "none", [],
                                                  "none" if gelu else "")
    out = F.linear(x, weight, bias)
    return torch.ops.aten.gelu_(out) if gelu else out  # in place: a fresh output would cost page faults


def onednn_matmul(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x weightᵀ through oneDNN's linear on a weight that is not packed (any strides): attention's per-head
    products, whose "weights" are a sample's keys and values."""
    return torch.ops.mkldnn._linear_pointwise(x, weight, None, "none", [], "")


@functools.lru_cache(maxsize=None)
def onednn_matmuls(dtype: torch.dtype) -> bool:
    """Whether this torch and CPU run `onednn_matmul` in `dtype` (tried on a tiny strided weight)."""
    if not (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")):
        return False
    try:
        onednn_matmul(torch.ones(2, 16, dtype=dtype), torch.ones(16, 8, dtype=dtype).t())
    except RuntimeError:
        return False
    return True


def pack(weight: torch.Tensor) -> torch.Tensor:
    """The weight re-laid out for oneDNN's linear (a CPU tensor that no longer moves or changes dtype)."""
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach())


@functools.lru_cache(maxsize=None)
def onednn_packs(dtype: torch.dtype) -> bool:
    """Whether this torch and CPU run oneDNN's packed linear in `dtype` (tried on a tiny weight)."""
    ops = torch.ops.mkldnn
    if not (torch.backends.mkldnn.is_available() and hasattr(ops, "_linear_pointwise")
            and hasattr(ops, "_reorder_linear_weight")):
        return False
    try:
        linear(torch.ones(2, 16, dtype=dtype), pack(torch.ones(8, 16, dtype=dtype)), gelu=True)
    except RuntimeError:  # e.g. "bf16 path needs the cpu support avx_ne_convert or avx512bw, ..."
        return False
    return True


def bf16_matmul_units() -> bool:
    """Whether bf16 matmuls here go through oneDNN's bf16 kernels rather than torch's generic fallback."""
    return onednn_packs(torch.bfloat16)


def best_seconds(run: Callable[[], object], repeats: int = REPEATS) -> float:
    """Fastest of `repeats` timed calls after one untimed (the first call may allocate or pack)."""
    return fastest_seconds({"": run}, repeats)[""]


def fastest_seconds(runs: Dict[Any, Callable[[], object]], repeats: int = REPEATS) -> Dict[Any, float]:
    """best_seconds of each candidate, their timed calls interleaved: a burst of load on a busy machine then falls
    on all of them alike instead of on the one being timed (which made the choice flip between runs)."""
    for run in runs.values():
        run()
    best = {name: float("inf") for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            start = time.perf_counter()
            run()
            best[name] = min(best[name], time.perf_counter() - start)
    return best


def time_linear(tokens: int, weight: torch.Tensor, bias: bool, gelu: bool) -> Dict[str, float]:
    """Seconds of one `tokens`-row call of each kernel that runs here, for this weight."""
    x = torch.randn(tokens, weight.shape[1]).to(weight.dtype)
    b = torch.zeros(weight.shape[0], dtype=weight.dtype) if bias else None
    runs = {ATEN: lambda: linear(x, weight, b, gelu)}
    if onednn_packs(weight.dtype):
        packed = pack(weight)
        runs[ONEDNN] = lambda: linear(x, packed, b, gelu)
    return fastest_seconds(runs)


def choose_kernels(layers: Iterable[Tuple[LinearKey, torch.Tensor]], tokens: int,
                   agree: Agree = alone) -> Dict[LinearKey, str]:
    """The faster kernel for each distinct (shape, bias, gelu), timed at `tokens` rows on one of its weights."""
    seconds: Dict[LinearKey, Dict[str, float]] = {}
    for key, weight in layers:
        if key not in seconds:
            seconds[key] = time_linear(tokens, weight, key[1], key[2])
    return {key: ONEDNN if ONEDNN in times and times[ONEDNN] * (1 - PLAIN_MARGIN) <= times[ATEN] else ATEN
            for key, times in agree(seconds).items()}


def gemm_peak_gflops(shapes: Iterable[Tuple[int, int, int]], dtype: torch.dtype, repeats: int = 5) -> float:
    """Best GEMM rate over (M, K, N) shapes in `dtype` on this process's threads, by any kernel that runs here:
    torch.mm with the weight [N, K] as the model keeps it (x Wᵀ) or [K, N], and oneDNN's linear on the
    weight packed (the loader's choice where it is faster; on an AMD EPYC in fp32 twice torch.mm's rate)."""
    best = 0.0
    for m, k, n in shapes:
        x = torch.randn(m, k).to(dtype)
        w = torch.randn(n, k).to(dtype)
        runs = [lambda rhs=rhs: torch.mm(x, rhs) for rhs in (w.t(), w.t().contiguous())]
        if onednn_packs(dtype):
            packed = pack(w)
            runs.append(lambda: linear(x, packed))
        for run in runs:
            best = max(best, 2 * m * k * n / best_seconds(run, repeats) / 1e9)
    return best
