"""Which compute dtype runs, measured on this device: `--dtype auto`, and a note when the chosen one is slow.

A CPU's flags do not say whether bf16 is fast: oneDNN runs bf16 on every AVX-512 CPU, natively with AVX512-BF16
or AMX, by conversion otherwise (3.7× slower than fp32 on an Ice Lake Xeon), and int8 needs VNNI to pay. So
each candidate dtype is timed, its calls interleaved with the others', on the model's widest linear (this rank's
fc1, one sample's tokens) with the kernels the loader may pick, every rank at once; rank 0's timings decide.
"""
from __future__ import annotations

import functools
import sys
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from ..layers.int8 import Int8Linear, kernels_for
from ..layers.kernels import bf16_matmul_units, fastest_seconds, linear, onednn_packs, pack
from .distributed import ParallelContext

CHOICES = ("auto", "fp32", "fp16", "bf16", "int8")
# What auto picks from: never int8 (it changes results), which must be asked for.
AUTO = {"cpu": ("fp32", "bf16")}
AUTO_ACCELERATOR = ("fp16", "bf16")
# A dtype slower than another by more than this fraction gets a note (the timings jitter on a busy machine).
NOTE_MARGIN = 0.15
REPEATS = 5
TORCH = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def _runners(dtype: str, shape: Tuple[int, int], tokens: int, device: torch.device) -> List[Callable[[], object]]:
    """One call each of a `tokens`-row [out, in] linear (bias, GELU) in `dtype` with every kernel the loader may
    pick for it, synchronised on accelerators."""
    weight = torch.randn(*shape, device=device)
    bias = torch.zeros(shape[0], device=device)
    x = torch.randn(tokens, shape[1], device=device)
    if dtype == "int8":
        layers = [Int8Linear(weight, kernel) for kernel in kernels_for(device)]
        return [functools.partial(_synced, layer, x, bias) for layer in layers]
    w, b, xd = weight.to(TORCH[dtype]), bias.to(TORCH[dtype]), x.to(TORCH[dtype])
    weights = [w] + ([pack(w)] if device.type == "cpu" and onednn_packs(TORCH[dtype]) else [])
    return [functools.partial(_synced, functools.partial(linear, weight=v, bias=b, gelu=True), xd) for v in weights]


def _synced(call: Callable[..., torch.Tensor], *args: torch.Tensor) -> None:
    out = call(*args)
    if out.device.type != "cpu":
        getattr(torch, out.device.type).synchronize(out.device)


def linear_seconds(dtypes: Sequence[str], shape: Tuple[int, int], tokens: int, device: torch.device,
                   repeats: int = REPEATS) -> Dict[str, float]:
    """Per dtype, the fastest call of its fastest kernel; the dtypes' calls interleaved, so that a burst of load
    on a busy machine falls on all of them alike."""
    runs = {(d, i): run for d in dtypes for i, run in enumerate(_runners(d, shape, tokens, device))}
    seconds = fastest_seconds(runs, repeats)
    return {d: min(s for (of, _), s in seconds.items() if of == d) for d in dtypes}


def measure(ctx: ParallelContext, dtypes: Tuple[str, ...], shape: Tuple[int, int], tokens: int) -> Dict[str, float]:
    """Seconds per dtype, measured on every rank at once (they share the machine as in a forward), summed over
    the ranks: every rank then picks the same dtype."""
    return ctx.summed_over_ranks({"dtype": linear_seconds(dtypes, shape, tokens, ctx.device)})["dtype"]


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
