"""Build this rank's model from its own shard file."""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Dict, Optional, Union

import torch

from .beit3 import BEiT3
from .beit3_config import BEiT3Config
from .distributed import ParallelContext
from .kernels import bf16_matmul_units
from .model import VLMo
from .parallel import pack_where_faster
from .shards import Manifest, load_rank_shard, read_manifest

DTYPES: Dict[str, torch.dtype] = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def default_dtype(device: torch.device) -> str:
    """fp16 on accelerators, fp32 on the CPU (DESIGN.md §9)."""
    return "fp32" if device.type == "cpu" else "fp16"


def load_model(shard_dir: Path, ctx: ParallelContext, dtype: str,
               manifest: Optional[Manifest] = None) -> Union[VLMo, BEiT3]:
    """This rank's VLMo or BEiT-3 (as the manifest says), weights checked against the manifest, in `dtype` on
    ctx.device, ready for inference."""
    manifest = manifest or read_manifest(shard_dir)
    tensors = load_rank_shard(shard_dir, ctx.tp_rank, ctx.tp_size, manifest)
    with torch.device("meta"):
        family = BEiT3 if isinstance(manifest.config, BEiT3Config) else VLMo
        model = family(manifest.config, ctx.comm)
    model.load_state_dict(tensors, strict=True, assign=True)
    del tensors  # the model holds them now: casting and packing below can free each original as they go
    model = model.to(device=ctx.device, dtype=torch.float32).fold_scales().set_compute_dtype(DTYPES[dtype]).eval()
    # "out x in [+bias] [+gelu]" -> the CPU kernel chosen for that linear shape (engine.bench reports it)
    model.linear_kernels = {}
    if ctx.device.type == "cpu":
        use_cpu_kernels(model, DTYPES[dtype], announce=ctx.is_main)
    return model


def use_cpu_kernels(model: Union[VLMo, BEiT3], dtype: torch.dtype, announce: bool = False) -> None:
    """Pick this CPU's faster kernels: packed oneDNN or plain linears per GEMM shape, timed on one sample's
    joint pass; bf16 attention as per-head matmuls where oneDNN has bf16 matmuls."""
    cfg = model.cfg
    choice = pack_where_faster(model, tokens=cfg.max_text_len + cfg.num_image_tokens)
    model.linear_kernels = {f"{shape[0]}x{shape[1]}{' +bias' if bias else ''}{' +gelu' if gelu else ''}": kernel
                            for (shape, bias, gelu), kernel in sorted(choice.items())}
    if dtype == torch.bfloat16:
        units = bf16_matmul_units()
        for module in model.modules():
            if hasattr(module, "per_head_bmm"):
                module.per_head_bmm = units
        if not units and announce:
            print("note: oneDNN has no bf16 matmul on this CPU (it needs AVX-512 BW/VL/DQ or AVX-NE-CONVERT; "
                  "AVX512-BF16 or AMX to be fast): bf16 runs on torch's generic kernels, slower than fp32",
                  file=sys.stderr)
