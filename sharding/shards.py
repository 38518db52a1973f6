"""Write per-rank safetensors shard files and their manifest (the format is engine.runtime.shards).

Layout of a shard directory:
    manifest.json               format version, model config, tp, source sha256, per-file sha256 + tensor specs
    rank-00-of-02.safetensors   rank 0's tensors, named as in the published checkpoint
    rank-01-of-02.safetensors
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Dict, Mapping

import torch
from safetensors.torch import save_file

from engine.runtime.config import VLMoConfig
from engine.runtime.errors import ShardingError
from engine.runtime.plan import check_degree, shard_tensor
from engine.runtime.shards import FORMAT, FORMAT_VERSION, MANIFEST, Manifest, sha256_file, shard_file_name


def write_shards(weights: Mapping[str, torch.Tensor], cfg: VLMoConfig, tp: int, out_dir: Path,
                 source: Dict[str, Any], overwrite: bool = False) -> Manifest:
    """Cut `weights` into tp shard files under out_dir, atomically: a failure leaves out_dir untouched."""
    check_degree(cfg, tp)
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        raise ShardingError(out_dir, "the output directory is not empty; pass --overwrite to replace it")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.partial-", dir=out_dir.parent))
    umask = os.umask(0)
    os.umask(umask)
    try:
        os.chmod(staging, 0o777 & ~umask)  # mkdtemp's 0700 would otherwise stick to the result
        files = []
        for rank in range(tp):
            name = shard_file_name(rank, tp)
            pieces = {k: shard_tensor(k, v, cfg, tp, rank) for k, v in weights.items()}
            save_file(pieces, str(staging / name), metadata={"format": FORMAT, "rank": str(rank), "tp": str(tp)})
            os.chmod(staging / name, 0o666 & ~umask)
            files.append({
                "rank": rank, "file": name, "sha256": sha256_file(staging / name),
                "tensors": {k: {"shape": list(v.shape), "dtype": str(v.dtype).replace("torch.", "")}
                            for k, v in sorted(pieces.items())},
            })
            del pieces
        manifest = Manifest(config=cfg, tp=tp, source=source, files=files)
        _write_json(staging / MANIFEST, {
            "format": FORMAT, "format_version": FORMAT_VERSION, "tp": tp,
            "config": cfg.to_dict(), "source": source, "files": files,
        })
        _swap_into_place(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return manifest


def _write_json(path: Path, obj: Any) -> None:
    with open(path, "w") as handle:
        json.dump(obj, handle, indent=1)
        handle.write("\n")
        handle.flush()
        os.fsync(handle.fileno())


def _swap_into_place(staging: Path, out_dir: Path) -> None:
    if out_dir.exists():
        retired = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
        os.replace(out_dir, retired)
        os.replace(staging, out_dir)
        shutil.rmtree(retired, ignore_errors=True)
    else:
        os.replace(staging, out_dir)


def merge_shards(shard_dir: Path) -> Dict[str, torch.Tensor]:
    """Rebuild the full state dict from every rank's shard (undoes write_shards)."""
    manifest = verify_shards(shard_dir)
    per_rank = [load_file(str(Path(shard_dir) / f["file"])) for f in manifest.files]
    return {name: merge_tensor(name, [r[name] for r in per_rank], manifest.config) for name in per_rank[0]}
