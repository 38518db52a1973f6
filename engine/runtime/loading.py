"""Build this rank's model from its own shard file."""
from __future__ import annotations

from pathlib import Path
from typing import Dict, Union

import torch

from .beit3_config import BEiT3Config
from .shards import Manifest, load_rank_shard, read_manifest

from .distributed import ParallelContext
from .beit3 import BEiT3
from .model import VLMo
from .parallel import FAST_ALL_REDUCE, pack_for_onednn
from .shm_allreduce import shared_memory_all_reduce

DTYPES: Dict[str, torch.dtype] = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def default_dtype(device: torch.device) -> str:
    """fp16 on accelerators, fp32 on the CPU (DESIGN.md §9)."""
    return "fp32" if device.type == "cpu" else "fp16"


def _empty_model(manifest: Manifest, ctx: ParallelContext) -> Union[VLMo, BEiT3]:
    """The manifest's model family, this rank's slice of it, on the meta device."""
    with torch.device("meta"):
        if isinstance(manifest.config, BEiT3Config):
            return BEiT3(manifest.config, ctx.tp_size, ctx.tp_group, ctx.tp_rank)
        return VLMo(manifest.config, ctx.tp_size, ctx.tp_group)


def load_model(shard_dir: Path, ctx: ParallelContext, dtype: str, manifest: Manifest = None) -> Union[VLMo, BEiT3]:
    """This rank's VLMo or BEiT-3 (as the manifest says), weights checked against the manifest, in `dtype` on
    ctx.device, ready for inference."""
    manifest = manifest or read_manifest(shard_dir)
    tensors = load_rank_shard(shard_dir, ctx.tp_rank, ctx.tp_size, manifest)
    model = _empty_model(manifest, ctx)
    model.load_state_dict(tensors, strict=True, assign=True)
    del tensors  # the model holds them now: casting and packing below can free each original as they go
    model = model.to(device=ctx.device, dtype=torch.float32).fold_scales().set_compute_dtype(DTYPES[dtype]).eval()
    pack_for_onednn(model)
    if ctx.device.type == "cpu" and ctx.tp_size > 1 and ctx.tp_group not in FAST_ALL_REDUCE:
        fast = shared_memory_all_reduce(ctx.tp_group, ctx.tp_rank, ctx.tp_size)
        if fast is not None:
            FAST_ALL_REDUCE[ctx.tp_group] = fast
    return model
