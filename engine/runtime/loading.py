"""Build this rank's model from its own shard file: read, check, convert, assign — correct by construction."""
from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any, Dict, Iterable, Optional, Tuple

import torch

from ..layers.attention import key_masking_for
from ..layers.attention_choice import choose_attention
from ..layers.int8 import kernels_for
from ..layers.quantize import FLOAT_LAYERS, calibrate, quantize_model
from ..layers.checkpoint import convert_checkpoint
from ..layers.kernels import bf16_matmul_units
from ..layers.linear import pack_where_faster
from ..models import MultiwayModel, build_model
from ..models.tasks import TASKS, Inputs
from .distributed import ParallelContext
from .shards import Manifest, load_rank_shard, read_manifest

DTYPES: Dict[str, torch.dtype] = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# int8 quantises the parallel linears of an fp32 model (engine.layers.quantize); the rest computes in fp32
INT8 = "int8"
# int8's calibration batches: (task, model inputs) per forward, the same on every rank
CalibrationBatches = Iterable[Tuple[str, Inputs]]
# VLMO_INT8_SMOOTHING=0: int8 without smoothing, to measure what it does (a calibration, which only sets the
# smoothing factors, is then refused: it would do nothing)
SMOOTHING_ENV = "VLMO_INT8_SMOOTHING"


# VLMO_INT8_FLOAT_LAYERS=N: the first N encoder layers stay fp32 (default FLOAT_LAYERS), to measure what it does
FLOAT_LAYERS_ENV = "VLMO_INT8_FLOAT_LAYERS"


def int8_smoothing() -> bool:
    """Whether int8 smooths its LayerNorm-fed linears (engine.layers.smoothing): unless VLMO_INT8_SMOOTHING=0."""
    return os.environ.get(SMOOTHING_ENV, "1") != "0"


def int8_float_layers() -> int:
    value = os.environ.get(FLOAT_LAYERS_ENV, str(FLOAT_LAYERS))
    if not value.isdigit():
        raise ValueError(f"{FLOAT_LAYERS_ENV}={value!r}: it takes a number of layers (0 or more)")
    return int(value)


def int8_variant() -> Dict[str, Any]:
    """int8's measurement settings where they are not the defaults ({} when they are): a results file records
    them, so that a run of another variant does not continue it."""
    variant: Dict[str, Any] = {}
    if not int8_smoothing():
        variant["smoothing"] = False
    float_layers = int8_float_layers()
    if float_layers != FLOAT_LAYERS:
        variant["float_layers"] = float_layers
    return variant


def default_dtype(device: torch.device) -> str:
    """fp16 on accelerators, fp32 on the CPU (DESIGN.md §9)."""
    return "fp32" if device.type == "cpu" else "fp16"


def load_model(shard_dir: Path, ctx: ParallelContext, dtype: str, manifest: Optional[Manifest] = None,
               key_masking: Optional[str] = None,
               calibration: Optional[CalibrationBatches] = None) -> MultiwayModel:
    """This rank's model (the family the manifest says), weights checked against the manifest and converted
    into what the model computes with, in `dtype` (or int8: W8A8 linears) on ctx.device, ready for inference.

    key_masking: how attention leaves padded keys out (engine.layers.attention) [default: the device's choice].
    calibration (int8 only): batches the fp32 model runs before quantising; the activation ranges they reach set
    the smoothing factors instead of the LayerNorm weights (engine.layers.quantize.calibrate).
    """
    if calibration is not None and dtype != INT8:
        raise ValueError(f"calibration batches are for int8 only, not {dtype}")
    if calibration is not None and not int8_smoothing():
        raise ValueError(f"calibration batches set int8's smoothing factors, and {SMOOTHING_ENV}=0 turns smoothing off")
    if dtype == INT8:
        kernels_for(ctx.device)  # a one-line refusal where there is no int8 kernel, before anything loads
    manifest = manifest or read_manifest(shard_dir)
    published = load_rank_shard(shard_dir, ctx.tp_rank, ctx.tp_size, manifest)
    with torch.device("meta"):
        model = build_model(manifest.config, ctx)
    tensors = convert_checkpoint(model, {k: v.float() for k, v in published.items()})
    del published  # the conversion's outputs are the model's from here on
    model.load_state_dict(tensors, strict=True, assign=True)
    del tensors  # the model holds them now: casting and packing below can free each original as they go
    compute = torch.float32 if dtype == INT8 else DTYPES[dtype]
    model = model.to(device=ctx.device).set_compute_dtype(compute).eval()
    model.attention_options.key_masking = key_masking or key_masking_for(ctx.device)
    if dtype == INT8:
        smoothing, float_layers = int8_smoothing(), int8_float_layers()
        ranges = None
        if calibration is not None:
            ranges = calibrate(model, lambda batch: TASKS[batch[0]].first_output(model, batch[1], ctx.device),
                               calibration)
        tokens = model.cfg.joint_tokens
        model.linear_kernels = quantize_model(model, tokens, smoothing, ranges, float_layers, ctx.summed_over_ranks)
        if ctx.device.type == "cpu":  # the layers int8 leaves in fp32
            fp32 = pack_where_faster(model, tokens, ctx.summed_over_ranks)
            model.linear_kernels.update({f"fp32 {shape}": kernel for shape, kernel in fp32.items()})
    elif ctx.device.type == "cpu":
        use_cpu_kernels(model, compute, announce=ctx.is_main)
    if ctx.device.type == "cpu":  # int8 attends in fp32
        model.attention_kernel = choose_attention(model, compute, ctx.summed_over_ranks)
    return model


def use_cpu_kernels(model: MultiwayModel, dtype: torch.dtype, announce: bool = False) -> None:
    """Pick this CPU's faster linear kernels: packed oneDNN or plain linears per GEMM shape, timed on one
    sample's joint pass."""
    model.linear_kernels = pack_where_faster(model, model.cfg.joint_tokens, model.ctx.summed_over_ranks)
    if dtype == torch.bfloat16:
        if not bf16_matmul_units() and announce:
            print("note: oneDNN has no bf16 matmul on this CPU (it needs AVX-512 BW/VL/DQ or AVX-NE-CONVERT; "
                  "AVX512-BF16 or AMX to be fast): bf16 runs on torch's generic kernels, slower than fp32",
                  file=sys.stderr)
