"""Cutting BEiT-3 golden checkpoints into shards in-process (`python -m sharding` through click's runner: no
interpreter start-up per cut)."""
from __future__ import annotations

from pathlib import Path

from _paths import GOLDEN
from _run import shard_here
from engine.models.beit3.config import BEiT3Config
from engine.runtime.shards import read_manifest

BEIT3 = GOLDEN / "beit3"
TINY_HEADS = 4  # not in the weights (golden/README.md §BEiT-3)


def cut(case: str, tp: int, out: Path) -> BEiT3Config:
    """Shard golden/beit3/CASE at tp into `out`, as `python -m sharding ... --num-heads 4` does; its config."""
    shard_here(BEIT3 / case / "checkpoint.pth", tp, out, "--num-heads", TINY_HEADS)
    return read_manifest(out).config
