"""Turn a loaded fp32 model's tensor-parallel linears into W8A8 ones (`--dtype int8`), smoothing them first.

Quantised at load, not when sharding: every shard (any tp, any source) runs in int8 unchanged, the smoothing
can use data the user brings at run time, and the kernel layout (oneDNN's packing or _int_mm's [in, out]) is
chosen on the machine that runs it. Rank r quantises only its own slices, so per-output-channel scales of a
column-parallel layer and per-input-channel smoothing of a row-parallel one are the same at every tp.

Smoothing pairs each linear with the LayerNorm whose output it reads: in VLMo the qkv projection (norm1) and
each expert's fc1 (its norm2); in BEiT-3 also out_proj and fc2, whose inputs are the Sub-LNs `inner_attn_ln`
and `ffn_layernorm`. VLMo's proj (attention output) and fc2 (GELU output) have no LayerNorm to fold into and
are quantised as they are.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Optional, Tuple

import torch
from torch import nn

from engine.runtime.distributed import ParallelContext
from engine.runtime.loading import load_model
from engine.runtime.parallel import ColumnParallelLinear, RowParallelLinear
from engine.runtime.shards import Manifest

from .int8 import Int8Linear, choose_kernels, kernels_for
from .smoothing import ActivationRanges, smooth

# A LayerNorm and the linears that read its output.
Group = Tuple[nn.Module, List[nn.Module]]


def parallel_linears(model: nn.Module) -> List[nn.Module]:
    return [m for m in model.modules() if isinstance(m, (ColumnParallelLinear, RowParallelLinear))]


def unpack_linears(model: nn.Module) -> List[nn.Module]:
    """The parallel linears, each weight back in its plain [out, in] layout (the fp32 loader may have packed
    it for oneDNN)."""
    linears = parallel_linears(model)
    for layer in linears:
        if layer.weight.is_mkldnn:
            layer.weight = nn.Parameter(layer.weight.to_dense(), requires_grad=False)
    return linears


def smoothing_groups(model: nn.Module) -> List[Group]:
    """Every (LayerNorm, linears reading it) pair of a VLMo or BEiT-3 rank."""
    groups: List[Group] = []
    if hasattr(model, "transformer"):  # VLMo
        for block in model.transformer.blocks:
            groups.append((block.norm1, [block.attn.qkv]))
            for expert in ("text", "imag", "vl"):
                if hasattr(block, f"mlp_{expert}"):
                    groups.append((getattr(block, f"norm2_{expert}"), [getattr(block, f"mlp_{expert}").fc1]))
    else:  # BEiT-3: each step has an image expert A and a text expert B
        for layer in model.beit3.encoder.layers:
            attn = layer.self_attn
            for e in ("A", "B"):
                ffn = getattr(layer.ffn, e)
                groups += [(getattr(layer.self_attn_layer_norm, e), [getattr(attn.qkv, e)]),
                           (getattr(attn.inner_attn_ln, e), [getattr(attn.out_proj, e)]),
                           (getattr(layer.final_layer_norm, e), [ffn.fc1]),
                           (ffn.ffn_layernorm, [ffn.fc2])]
    return groups


def calibrate(model: nn.Module, run: Callable[[object], object], batches: Iterable[object]) -> Dict[int, torch.Tensor]:
    """Channel ranges of the smoothable linears' inputs over `run(batch)` for each batch (fp32 model), keyed by
    id(layer). Layers no batch reaches are left out (experts the task does not use, and BEiT-3's row-parallel
    layers, which run as one fused call of both experts rather than as modules): they keep the factors from
    the weights."""
    readers = [linears[0] for _, linears in smoothing_groups(model)]
    with ActivationRanges(readers) as ranges, torch.inference_mode():
        for batch in batches:
            run(batch)
    return {id(m): ranges[m] for m in readers if m in ranges}


def quantize_model(model: nn.Module, tokens: int, smoothing: bool = True,
                   ranges: Optional[Dict[int, torch.Tensor]] = None) -> Dict[str, str]:
    """In place: smooth (factors from the LayerNorm weights, or from calibrated `ranges`), then replace every
    parallel linear's weight by an Int8Linear of the kernel that is fastest here at `tokens` rows. Returns
    {"out x in": kernel}, as model.linear_kernels reports it."""
    linears = unpack_linears(model)
    if smoothing:
        for norm, readers in smoothing_groups(model):
            smooth(norm, [m.weight for m in readers], (ranges or {}).get(id(readers[0])))
    choice = choose_kernels((m.weight for m in linears), tokens)
    for layer in linears:
        weight = layer.weight
        del layer.weight  # a Parameter slot cannot hold a module
        layer.weight = Int8Linear(weight, choice[tuple(weight.shape)])
    return {f"{out}x{inp}": kernel for (out, inp), kernel in sorted(choice.items())}



def load_quantized(shard_dir: Path, ctx: ParallelContext, manifest: Optional[Manifest] = None) -> nn.Module:
    """This rank's model with W8A8 linears: loaded in fp32, smoothed (unless VLMO_INT8_SMOOTHING=0), quantised."""
    kernels_for(ctx.device)  # refuses devices without int8 kernels before anything loads
    model = load_model(shard_dir, ctx, "fp32", manifest)
    cfg = model.cfg
    smoothing = os.environ.get("VLMO_INT8_SMOOTHING", "1") != "0"
    model.linear_kernels = quantize_model(model, cfg.max_text_len + cfg.num_image_tokens, smoothing)
    return model


def load_model_as(shard_dir: Path, ctx: ParallelContext, dtype: str, manifest: Optional[Manifest] = None) -> nn.Module:
    """engine.runtime.loading.load_model for a float dtype, load_quantized for int8."""
    return load_quantized(shard_dir, ctx, manifest) if dtype == "int8" else load_model(shard_dir, ctx, dtype, manifest)
