"""A module tree's published tensors: their names, full shapes and splits, and the conversion into parameters.

By default a module's published tensors are its parameters, at their full size (a parameter's `tp_split` says
how a rank's piece relates to it), and its children's under their names. A module whose published tensors
differ from what it computes with — q, k and v fused into one projection, 1/√d or a layer scale folded into a
weight — is a CheckpointModule: it lists its published tensors itself and converts them, as a pure function of
tensors, into its parameters. The loader applies the conversion before any weight is assigned, so a loaded
model is correct by construction; the sharder, the shard checks and the random published-format checkpoints of
the demo and the benchmarks all read the same list.
"""
from __future__ import annotations

from typing import Dict, Optional

import torch
from torch import nn

from .split import Split, TensorSpec

Tensors = Dict[str, torch.Tensor]


def parameter(*shape: int, split: Optional[Split] = None) -> nn.Parameter:
    """An uninitialised frozen parameter of this rank's `shape` (the weights come from the shard)."""
    param = nn.Parameter(torch.empty(*shape), requires_grad=False)
    param.tp_split = split
    return param


def split_of(param: nn.Parameter) -> Optional[Split]:
    return getattr(param, "tp_split", None)  # torch's own modules (LayerNorm, Embedding, ...) are replicated


class CheckpointModule(nn.Module):
    """A module that lists and converts its published tensors itself (see the module docstring)."""

    def checkpoint_specs(self, tp: int) -> Dict[str, TensorSpec]:
        return default_specs(self, tp)

    def from_checkpoint(self, tensors: Tensors) -> Tensors:
        return default_convert(self, tensors)


def checkpoint_specs(module: nn.Module, tp: int) -> Dict[str, TensorSpec]:
    """Every published tensor of `module`'s subtree, in registration order, with its full shape at degree tp."""
    if isinstance(module, CheckpointModule):
        return module.checkpoint_specs(tp)
    return default_specs(module, tp)


def convert_checkpoint(module: nn.Module, tensors: Tensors) -> Tensors:
    """`module`'s parameters (names relative to it) from its published tensors (this rank's pieces)."""
    if isinstance(module, CheckpointModule):
        return module.from_checkpoint(tensors)
    return default_convert(module, tensors)


def default_specs(module: nn.Module, tp: int) -> Dict[str, TensorSpec]:
    specs: Dict[str, TensorSpec] = {}
    for name, param in module.named_parameters(recurse=False):
        split = split_of(param)
        shape = tuple(param.shape) if split is None else split.full_shape(tuple(param.shape), tp)
        specs[name] = TensorSpec(shape, split)
    for name, child in module.named_children():
        specs.update({f"{name}.{key}": spec for key, spec in checkpoint_specs(child, tp).items()})
    return specs


def default_convert(module: nn.Module, tensors: Tensors) -> Tensors:
    out = {name: tensors[name] for name, _ in module.named_parameters(recurse=False)}
    for name, child in module.named_children():
        converted = convert_checkpoint(child, subtree(tensors, name))
        out.update({f"{name}.{key}": value for key, value in converted.items()})
    return out


def subtree(tensors: Tensors, name: str) -> Tensors:
    """The tensors under `name.`, with that prefix removed."""
    prefix = name + "."
    return {key[len(prefix):]: value for key, value in tensors.items() if key.startswith(prefix)}
