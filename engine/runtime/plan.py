"""The tensor-parallel sharding plan (DESIGN.md §5), read off the module tree (engine.models.checkpoint_layout).

Each parallel layer says how its published tensors are cut (engine.layers.split); the sharder cuts with this,
the loader and `sharding.verify` check shard shapes with it.
"""
from __future__ import annotations

import re
from typing import Dict, List, Tuple

import torch

from ..layers.split import Shape, TensorSpec
from ..models import FAMILIES, ModelConfig, checkpoint_layout


def check_degree(cfg: ModelConfig, tp: int) -> None:
    """Refuse a tensor-parallel degree the model cannot be cut into."""
    if tp < 1:
        raise ValueError(f"the tensor-parallel degree must be at least 1, got {tp}")
    if cfg.num_heads % tp or cfg.ffn_dim % tp:
        works = [d for d in range(1, cfg.num_heads + 1) if cfg.num_heads % d == 0 and cfg.ffn_dim % d == 0]
        raise ValueError(f"tp={tp} does not divide the model: it has {cfg.num_heads} attention heads and an FFN "
                         f"width of {cfg.ffn_dim}; choose a tp that divides both (e.g. {', '.join(map(str, works))})")


def full_shapes(cfg: ModelConfig) -> Dict[str, Shape]:
    """Every tensor the engine needs from a checkpoint of this config, with its published shape."""
    return {name: spec.shape for name, spec in checkpoint_layout(cfg).items()}


def local_shapes(cfg: ModelConfig, tp: int) -> Dict[str, Shape]:
    """The shape of each tensor in one rank's shard."""
    return {name: spec.local_shape(tp) for name, spec in checkpoint_layout(cfg).items()}


def shard_tensor(spec: TensorSpec, full: torch.Tensor, tp: int, rank: int) -> torch.Tensor:
    """Rank `rank`'s piece of a published tensor, contiguous."""
    return full.contiguous() if spec.split is None else spec.split.shard(full, tp, rank)


def plan_table() -> List[Tuple[str, str]]:
    """The plan as (tensor pattern, how a rank's piece is cut) rows for documentation and `--help`: every
    family's split tensors (layer and expert numbers as *), then everything else replicated."""
    suffixes: Dict[Tuple[str, str], List[str]] = {}
    for family in FAMILIES.values():
        for name, spec in checkpoint_layout(family.example).items():
            if spec.split is not None:
                pattern = re.sub(r"\.\d+\.", ".*.", name)  # layers, then experts, folded
                pattern = re.sub(r"mlp_(text|imag|vl)", "mlp_*", re.sub(r"\.[AB]\.", ".{A,B}.", pattern))
                module, _, tensor = pattern.rpartition(".")
                found = suffixes.setdefault((module, spec.split.describe()), [])
                if tensor not in found:
                    found.append(tensor)
    rows = [((f"{module}." if module else "") + (tensors[0] if len(tensors) == 1 else f"{{{','.join(tensors)}}}"), how)
            for (module, how), tensors in suffixes.items()]
    return rows + [("everything else", "replicated")]
