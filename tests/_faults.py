"""Faulty inputs built from good ones, for the tests of what the engine refuses."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch

from _run import shard_here

# Finite (so no weight check can object) but large enough that the head's outputs overflow to Inf/NaN.
HUGE = 1e38


def overflowing_shards(checkpoint: Path, weights: Sequence[str], folder: Path) -> Path:
    """tp-1 shards of `checkpoint` with every value of `weights` set to HUGE."""
    data = torch.load(checkpoint, map_location="cpu", weights_only=True)
    for name in weights:
        data["state_dict"][name].fill_(HUGE)
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(data, folder / "checkpoint.pt")
    shard_here(folder / "checkpoint.pt", 1, folder / "shards")
    return folder / "shards"
