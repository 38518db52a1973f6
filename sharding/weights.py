"""Which of a checkpoint's tensors the engine takes, checked against the module tree of the inferred config.

Every tensor the config implies must be there with its shape. A tensor left over is skipped (pre-training
heads, `logit_scale`) unless it sits inside a module the engine builds: the engine uses every tensor of its
modules (bar the few a family lists), so a leftover there means the structure was misread — a layer that has
some of an expert's tensors but not all, or an override that would drop weights — and is an error.
"""
from __future__ import annotations

from typing import Dict, List, Mapping, Tuple

import torch

from engine.models import ModelConfig, checkpoint_layout, family_of
from engine.models.inference import OVERRIDE_FLAGS, ConfigError

_SHOWN = 8


def _listed(names: List[str]) -> str:
    return ", ".join(names[:_SHOWN]) + (f" and {len(names) - _SHOWN} more" if len(names) > _SHOWN else "")


def select_weights(sd: Mapping[str, torch.Tensor], cfg: ModelConfig) -> Tuple[Dict[str, torch.Tensor], List[str]]:
    """The tensors the engine needs, in the published order, and the names it skips; ConfigError naming every
    missing, misshapen or misplaced tensor."""
    layout = checkpoint_layout(cfg)
    missing = [k for k in layout if k not in sd]
    if missing:
        raise ConfigError(f"missing weights: {_listed(missing)}")
    wrong = [f"{k} is {tuple(sd[k].shape)}, expected {spec.shape}" for k, spec in layout.items()
             if tuple(sd[k].shape) != spec.shape]
    if wrong:
        raise ConfigError("weights do not match the inferred config: " + "; ".join(wrong[:4]) +
                          f" (if the image size or head count was guessed wrong, pass {OVERRIDE_FLAGS['image_size']}"
                          f" or {OVERRIDE_FLAGS['num_heads']})")
    modules = {name.rsplit(".", i)[0] for name in layout for i in range(1, name.count(".") + 1)}
    unused = sorted(set(sd) - set(layout))
    misplaced = [k for k in unused if k not in family_of(cfg).unused_tensors and
                 any(k.rsplit(".", i)[0] in modules for i in range(1, k.count(".") + 1))]
    if misplaced:
        raise ConfigError(f"tensors inside the model's modules that its inferred structure does not use: "
                          f"{_listed(misplaced)}; the checkpoint is incomplete or an override contradicts it "
                          f"(a layer holds only part of an expert's weights)")
    return {k: sd[k] for k in layout}, unused
