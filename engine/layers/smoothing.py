"""SmoothQuant-style smoothing of a LayerNorm and the linears that read its output, before int8 quantisation.

Per-token int8 activations lose the small channels of a token when one channel is far larger (fine-tuned
transformers have such outlier channels). For y = LN(x) Wᵀ an exact rewrite moves that range into the weight,
which is quantised per output channel and has room for it: with a factor s_j per input channel,
LN(x)_j / s_j · (s_j W_{:,j}) is the same product, and 1/s_j folds into the LayerNorm's γ_j and β_j.
s_j = a_j^α / w_j^(1-α) (Xiao et al., SmoothQuant, 2023) balances the activation range a_j of channel j and
the weight range w_j = max_i |W_ij|.

a_j comes from the weights alone by default: LN(x)_j = x̂_j γ_j + β_j with x̂ normalised per token, so its
range is about c·|γ_j| + |β_j|. That sees outliers that the LayerNorm's own γ or β makes (the usual kind), not a
residual-stream channel that dominates x̂ itself; `ActivationRanges` measures a_j on a few batches instead.
"""
from __future__ import annotations

from typing import Dict, Iterable, List, Optional, Sequence

import torch
from torch import nn

ALPHA = 0.5
# |x̂_j| of a normalised token stays within a few units: the typical range of a LayerNorm output channel.
XHAT_RANGE = 4.0
# Factors are kept within this span of each other so that neither side's quantisation collapses.
MAX_SPAN = 1e4


def layer_norm_ranges(weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """Predicted max |LN(x)_j| per channel from γ and β alone."""
    amax = weight.detach().float().abs() * XHAT_RANGE
    return amax if bias is None else amax + bias.detach().float().abs()


def weight_ranges(weights: Sequence[torch.Tensor]) -> torch.Tensor:
    """max_i |W_ij| per input channel j over every weight [out, in] that reads the same input."""
    return torch.stack([w.detach().float().abs().amax(dim=0) for w in weights]).amax(dim=0)


def smoothing_factors(act_ranges: torch.Tensor, w_ranges: torch.Tensor, alpha: float = ALPHA) -> torch.Tensor:
    """s_j = a_j^α / w_j^(1-α), bounded to a span of MAX_SPAN and scaled to geometric mean 1."""
    tiny = torch.finfo(torch.float32).tiny
    s = act_ranges.clamp_min(tiny).pow(alpha) / w_ranges.clamp_min(tiny).pow(1 - alpha)
    s = s.clamp(min=float(s.max()) / MAX_SPAN)
    return s / s.log().mean().exp()


def fold(norm: nn.Module, weights: Sequence[torch.Tensor], s: torch.Tensor) -> None:
    """In place: γ, β ← γ / s, β / s and every W[:, j] ← W[:, j] · s_j; LN(x) Wᵀ is unchanged."""
    norm.weight.data.div_(s)
    if getattr(norm, "bias", None) is not None:
        norm.bias.data.div_(s)
    for w in weights:
        w.data.mul_(s)


def smooth(norm: nn.Module, weights: Sequence[torch.Tensor], act_ranges: Optional[torch.Tensor] = None,
           alpha: float = ALPHA) -> torch.Tensor:
    """Smooth one LayerNorm and the weights [out, in] that read it; act_ranges None: predicted from γ, β.
    Returns the factors."""
    if act_ranges is None:
        act_ranges = layer_norm_ranges(norm.weight, getattr(norm, "bias", None))
    s = smoothing_factors(act_ranges.to(norm.weight.device), weight_ranges(weights), alpha)
    fold(norm, weights, s)
    return s


class ActivationRanges:
    """Records max |x_j| per input channel of the given modules' inputs while the model runs (calibration).

    with ActivationRanges(modules) as ranges: run a few batches; then ranges[module] is the channel range.
    """

    def __init__(self, modules: Iterable[nn.Module]) -> None:
        self.modules: List[nn.Module] = list(modules)
        self.ranges: Dict[int, torch.Tensor] = {}
        self._hooks: list = []

    def _record(self, module: nn.Module, inputs: tuple) -> None:
        x = inputs[0].detach()
        amax = x.reshape(-1, x.shape[-1]).abs().amax(dim=0).float()
        seen = self.ranges.get(id(module))
        self.ranges[id(module)] = amax if seen is None else torch.maximum(seen, amax)

    def __enter__(self) -> "ActivationRanges":
        self._hooks = [m.register_forward_pre_hook(self._record) for m in self.modules]
        return self

    def __exit__(self, *exc: object) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks = []

    def __contains__(self, module: nn.Module) -> bool:
        return id(module) in self.ranges

    def __getitem__(self, module: nn.Module) -> torch.Tensor:
        if id(module) not in self.ranges:
            raise KeyError("no calibration batch reached this layer")
        return self.ranges[id(module)]
