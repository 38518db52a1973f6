"""How a published tensor is cut among the ranks of a tensor-parallel group.

A parameter carries a Split when its rank holds only part of the published tensor. The full tensor's
dimension `dim` is seen as `groups` equal blocks and rank r of t keeps chunk r of every block: one block for
plain column-/row-parallel layers, three for a fused q/k/v weight (its heads of q, of k and of v), one per layer
for a table whose columns are (layer, head). Everything without a Split is replicated.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence, Tuple

import torch

Shape = Tuple[int, ...]


@dataclass(frozen=True)
class Split:
    dim: int
    groups: int = 1
    why: str = ""

    def _blocked(self, shape: Shape) -> Shape:
        # shape with `dim` seen as (groups, per-group)
        return shape[:self.dim] + (self.groups, shape[self.dim] // self.groups) + shape[self.dim + 1:]

    def local_shape(self, full: Shape, tp: int) -> Shape:
        return full[:self.dim] + (full[self.dim] // tp,) + full[self.dim + 1:]

    def full_shape(self, local: Shape, tp: int) -> Shape:
        return local[:self.dim] + (local[self.dim] * tp,) + local[self.dim + 1:]

    def divides(self, full: Shape, tp: int) -> bool:
        return full[self.dim] % (self.groups * tp) == 0

    def shard(self, full: torch.Tensor, tp: int, rank: int) -> torch.Tensor:
        """Rank `rank`'s piece, contiguous."""
        blocked = full.reshape(self._blocked(tuple(full.shape)))
        piece = blocked.chunk(tp, dim=self.dim + 1)[rank]
        return piece.reshape(self.local_shape(tuple(full.shape), tp)).contiguous()

    def merge(self, pieces: Sequence[torch.Tensor]) -> torch.Tensor:
        """The full tensor from every rank's piece, in rank order (tests and tools)."""
        blocked = [p.reshape(self._blocked(tuple(p.shape))) for p in pieces]
        return torch.cat(blocked, dim=self.dim + 1).reshape(self.full_shape(tuple(pieces[0].shape), len(pieces)))

    def describe(self) -> str:
        kind = ("row" if self.dim == 0 else "column") + " chunk r" + (" of each block" if self.groups > 1 else "")
        return f"{kind} ({self.why})" if self.why else kind


@dataclass(frozen=True)
class TensorSpec:
    """A published tensor: its full shape and how tensor parallelism cuts it (None: replicated)."""
    shape: Shape
    split: Optional[Split] = None

    def local_shape(self, tp: int) -> Shape:
        return self.shape if self.split is None else self.split.local_shape(self.shape, tp)
