"""The model families the engine runs, by name: the one place that maps a family to its declaration.

Adding a family: a package beside vlmo/ and beit3/ that declares a `Family` (engine/models/base.py), and one
entry in FAMILIES below.
"""
from __future__ import annotations

import functools
from typing import Any, Dict, Mapping

import torch

from ..layers.checkpoint import checkpoint_specs
from ..layers.split import TensorSpec
from ..runtime.distributed import ParallelContext
from . import beit3, vlmo
from .base import Family, ModelConfigBase, MultiwayModel
from .inference import ConfigError

ModelConfig = ModelConfigBase
# Checked in this order when recognising a checkpoint.
FAMILIES: Dict[str, Family] = {f.name: f for f in (beit3.FAMILY, vlmo.FAMILY)}
DEFAULT_FAMILY = "vlmo"  # manifests written before BEiT-3 was supported carry no family


def family_of(cfg: ModelConfig) -> Family:
    return FAMILIES[cfg.family]


def recognise(state_dict: Mapping[str, torch.Tensor]) -> Family:
    """The family whose published layout a state dict has; ConfigError when none."""
    for family in FAMILIES.values():
        if family.recognises(state_dict):
            return family
    titles = ", ".join(f.title for f in FAMILIES.values())
    raise ConfigError(f"not a checkpoint of a family this engine runs ({titles})")


def config_from_dict(data: Dict[str, Any]) -> ModelConfig:
    """The config a manifest describes; ValueError for an unknown family or unknown fields."""
    name = data.get("family", DEFAULT_FAMILY)
    if name not in FAMILIES:
        raise ValueError(f"unknown model family {name!r} (this engine runs {', '.join(sorted(FAMILIES))})")
    return FAMILIES[name].config.from_dict({k: v for k, v in data.items() if k != "family"})


def build_model(cfg: ModelConfig, ctx: ParallelContext) -> MultiwayModel:
    """This rank's module tree, uninitialised (build it under `torch.device("meta")` to load into it)."""
    return family_of(cfg).model(cfg, ctx)


@functools.lru_cache(maxsize=32)
def checkpoint_layout(cfg: ModelConfig, tp: int = 1) -> Dict[str, TensorSpec]:
    """Every published tensor a checkpoint of this config holds for the engine, in the published order, with its
    full shape and split: read off rank 0's module tree at degree tp, built on the meta device."""
    with torch.device("meta"):
        model = build_model(cfg, ParallelContext.layout(tp))
    return checkpoint_specs(model, tp)
