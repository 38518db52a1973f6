"""Undo the sharding plan: the full state dict rebuilt from every rank's shard (round-trip tests)."""
from __future__ import annotations

from pathlib import Path
from typing import Dict

import torch
from safetensors.torch import load_file

from engine.models import checkpoint_layout
from engine.runtime.shards import verify_shards


def merge_shards(shard_dir: Path) -> Dict[str, torch.Tensor]:
    manifest = verify_shards(shard_dir)
    per_rank = [load_file(str(Path(shard_dir) / f["file"])) for f in manifest.files]
    layout = checkpoint_layout(manifest.config)
    return {name: per_rank[0][name] if layout[name].split is None else layout[name].split.merge([r[name] for r in per_rank])
            for name in per_rank[0]}
