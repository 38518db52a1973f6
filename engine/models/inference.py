"""What the families' config inference shares: reading shapes off a published state dict, counting layers,
and the error that says which `python -m sharding` option to pass when the checkpoint cannot tell."""
from __future__ import annotations

import re
from typing import Mapping, Tuple

import torch

# The option that overrides each inferable config field.
OVERRIDE_FLAGS = {
    "num_heads": "--num-heads",
    "image_size": "--image-size",
    "max_text_len": "--max-text-len",
    "vlffn_start_layer_index": "--vl-start-layer",
}


class ConfigError(ValueError):
    """The checkpoint does not say enough, or contradicts itself."""


def weight_shape(sd: Mapping[str, torch.Tensor], key: str, family: str) -> Tuple[int, ...]:
    if key not in sd:
        raise ConfigError(f"missing weight {key}: this does not look like a {family} checkpoint")
    return tuple(sd[key].shape)


def layer_count(sd: Mapping[str, torch.Tensor], layer: "re.Pattern[str]", keys: str, noun: str, family: str) -> int:
    """How many layers `layer` (a regex capturing the index) numbers, refusing gaps."""
    layers = {int(m.group(1)) for k in sd if (m := layer.match(k))}
    if not layers:
        raise ConfigError(f"no {keys} weights: this does not look like a {family} checkpoint")
    if layers != set(range(len(layers))):
        missing = sorted(set(range(max(layers) + 1)) - layers)
        raise ConfigError(f"{noun} {missing} are missing")
    return len(layers)


def check_heads(embed_dim: int, num_heads: int) -> None:
    if num_heads < 1 or embed_dim % num_heads:
        raise ConfigError(f"{num_heads} heads do not divide the width {embed_dim}; check {OVERRIDE_FLAGS['num_heads']}")
