"""`--dtype int8`: a loaded fp32 model's tensor-parallel linears turned into W8A8 ones, smoothed first.

Quantised at load, not when sharding: every shard (any tp, any source) runs in int8 unchanged, smoothing can
use data a user brings at run time, and the kernel layout (oneDNN's packing or _int_mm's [in, out]) is chosen
on the machine that runs it. Rank r quantises only its own slices: the per-output-channel scales of a
column-parallel layer are those of the whole layer, a row-parallel layer's are over its own input columns.

The first encoder layer keeps fp32 (FLOAT_LAYERS): on BEiT-3 base it alone gave 40 % of int8's logit error
(its update is large against the embeddings it adds to; later layers add small updates to a large stream), so
keeping it costs 1/12 of the linears' speed-up for that share of the accuracy.

Smoothing pairs each linear with the LayerNorm whose output it reads (the family's `smoothing_groups`); linears
reading something else (VLMo's proj and fc2: attention and GELU outputs) are quantised as they are.
"""
from __future__ import annotations

from typing import Callable, Dict, Iterable, List, Optional

import torch
from torch import nn

from .int8 import Int8Linear, choose_kernels
from .kernels import Agree, alone
from .linear import ParallelLinear, parallel_linears
from .smoothing import ActivationRanges, smooth

FLOAT_LAYERS = 1


def unpack_linears(model: nn.Module) -> List[ParallelLinear]:
    """The parallel linears, each weight back in its plain [out, in] layout (the fp32 loader may have packed
    it for oneDNN)."""
    linears = list(parallel_linears(model))
    for layer in linears:
        if layer.weight.is_mkldnn:
            layer.weight = nn.Parameter(layer.weight.to_dense(), requires_grad=False)
    return linears


def calibrate(model: nn.Module, run: Callable[[object], object], batches: Iterable[object]) -> Dict[int, torch.Tensor]:
    """Channel ranges of the smoothable linears' inputs over `run(batch)` for each batch (fp32 model), keyed by
    id(layer). Layers no batch reaches are left out (experts the task does not use, and row-parallel layers,
    which the multiway step calls for their partial product rather than as modules): they keep the factors
    from the weights."""
    readers = [linears[0] for _, linears in model.smoothing_groups()]
    with ActivationRanges(readers) as ranges, torch.inference_mode():
        for batch in batches:
            run(batch)
    return {id(m): ranges[m] for m in readers if m in ranges}


def quantize_model(model: nn.Module, tokens: int, smoothing: bool = True,
                   ranges: Optional[Dict[int, torch.Tensor]] = None,
                   float_layers: int = FLOAT_LAYERS, agree: Agree = alone) -> Dict[str, str]:
    """In place: smooth (factors from the LayerNorm weights, or from calibrated `ranges`), then replace every
    parallel linear's weight by an Int8Linear of the kernel that is fastest here at `tokens` rows, except those
    of the first `float_layers` encoder layers, which keep fp32 (the caller picks their kernels). Returns
    {"out x in": kernel}, as model.linear_kernels reports it. `agree`: what the timings go through before
    the choice (engine.layers.kernels.Agree)."""
    kept = {id(m) for block in model.encoder_layers()[:float_layers] for m in parallel_linears(block)}
    linears = [m for m in unpack_linears(model) if id(m) not in kept]
    if smoothing:
        for norm, readers in model.smoothing_groups():
            if id(readers[0]) not in kept:
                smooth(norm, [m.weight for m in readers], (ranges or {}).get(id(readers[0])))
    choice = choose_kernels((m.weight for m in linears), tokens, agree)
    for layer in linears:
        weight = layer.weight
        del layer.weight  # a Parameter slot cannot hold a module
        layer.weight = Int8Linear(weight, choice[tuple(weight.shape)])
    return {f"{out}x{inp}": kernel for (out, inp), kernel in sorted(choice.items())}
