"""Undo the sharding plan: the full state dict rebuilt from every rank's shard (round-trip tests)."""
from __future__ import annotations

from pathlib import Path
from typing import Dict

import torch
from safetensors.torch import load_file

from engine.runtime.plan import merge_tensor
from engine.runtime.shards import verify_shards


def merge_shards(shard_dir: Path) -> Dict[str, torch.Tensor]:
    manifest = verify_shards(shard_dir)
    per_rank = [load_file(str(Path(shard_dir) / f["file"])) for f in manifest.files]
    return {name: merge_tensor(name, [r[name] for r in per_rank], manifest.config) for name in per_rank[0]}
