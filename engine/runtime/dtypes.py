"""Which compute dtype runs, measured on this device: `--dtype auto`, and a note when the chosen one is slow.

A CPU's flags do not say whether bf16 is fast: oneDNN runs bf16 on every AVX-512 CPU, natively with AVX512-BF16
or AMX, by conversion otherwise (3.7× slower than fp32 on an Ice Lake Xeon), and int8 needs VNNI to pay. So
each candidate dtype is timed on the model's widest linear (this rank's fc1, one sample's tokens) with the
kernel the loader would pick, every rank at once, and rank 0's timings decide for all.
"""
from __future__ import annotations

import sys
from typing import Dict, Optional, Tuple

import torch

from ..layers.int8 import kernels_for, time_kernels
from ..layers.kernels import best_seconds, bf16_matmul_units, time_linear
from .distributed import ParallelContext

CHOICES = ("auto", "fp32", "fp16", "bf16", "int8")
# What auto picks from: never int8 (it changes results), which must be asked for.
AUTO = {"cpu": ("fp32", "bf16")}
AUTO_ACCELERATOR = ("fp16", "bf16")
# A dtype slower than another by more than this fraction gets a note (the timings jitter on a busy machine).
NOTE_MARGIN = 0.15
TORCH = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def linear_seconds(dtype: str, shape: Tuple[int, int], tokens: int, device: torch.device) -> float:
    """One `tokens`-row call of a [out, in] linear (bias, GELU) in `dtype` with the kernel the loader picks."""
    weight = torch.randn(*shape, device=device)
    if dtype == "int8":
        kernels = kernels_for(device)
        return min(time_kernels(weight, tokens, kernels, bias=True, gelu=True).values())
    if device.type == "cpu":
        return min(time_linear(tokens, weight.to(TORCH[dtype]), bias=True, gelu=True).values())
    # accelerators: one kernel; synchronise around the timed call
    x = torch.randn(tokens, shape[1], device=device, dtype=TORCH[dtype])
    w = weight.to(TORCH[dtype])

    def run() -> None:
        torch.nn.functional.linear(x, w)
        getattr(torch, device.type).synchronize(device)

    return best_seconds(run)


def measure(ctx: ParallelContext, dtypes: Tuple[str, ...], shape: Tuple[int, int], tokens: int) -> Dict[str, float]:
    """Seconds per dtype, measured on every rank at once (they share the machine as in a forward); rank 0's."""
    times = {d: linear_seconds(d, shape, tokens, ctx.device) for d in dtypes}
    return ctx.broadcast_object(times)


def candidates(device: torch.device) -> Tuple[str, ...]:
    return AUTO.get(device.type, AUTO_ACCELERATOR)


def choose(ctx: ParallelContext, requested: str, shape: Tuple[int, int], tokens: int) -> Tuple[str, Optional[str]]:
    """(dtype to run, a note or None). auto: the fastest candidate; otherwise `requested`, with a note naming
    a candidate that is faster here by more than NOTE_MARGIN, and the measured ratio."""
    floats = candidates(ctx.device)
    dtypes = floats if requested == "auto" else tuple(dict.fromkeys(floats + (requested,)))
    times = measure(ctx, dtypes, shape, tokens)
    fastest = min(floats, key=times.get)
    if requested == "auto":
        return fastest, None
    # (bf16 on a CPU whose oneDNN has no bf16 matmul at all gets the loader's own note instead)
    said = requested == "bf16" and ctx.device.type == "cpu" and not bf16_matmul_units()
    if requested != fastest and times[requested] > times[fastest] * (1 + NOTE_MARGIN) and not said:
        what = "CPU" if ctx.device.type == "cpu" else ctx.device.type
        return requested, (f"note: --dtype {requested} is {times[requested] / times[fastest]:.1f}x slower than "
                           f"{fastest} on this {what} (a {shape[0]}x{shape[1]} linear at {tokens} tokens: "
                           f"{1e3 * times[requested]:.3g} ms against {1e3 * times[fastest]:.3g} ms); "
                           f"--dtype {fastest} or auto runs faster")
    return requested, None


def announce(ctx: ParallelContext, note: Optional[str]) -> None:
    if note and ctx.is_main:
        print(note, file=sys.stderr)
