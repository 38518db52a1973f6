"""Write per-rank safetensors shard files and their manifest (the format is engine.runtime.shards).

Layout of a shard directory:
    manifest.json               format version, model config, tp, source sha256, per-file sha256 + tensor specs
    rank-00-of-02.safetensors   rank 0's tensors, named as in the published checkpoint
    rank-01-of-02.safetensors
"""
from __future__ import annotations

import fcntl
import json
import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Mapping

import torch
from safetensors.torch import save_file

from engine.atomic import atomic_directory
from engine.models import ModelConfig, checkpoint_layout
from engine.runtime.errors import ShardingError
from engine.runtime.plan import check_degree, shard_tensor
from engine.runtime.shards import FORMAT, FORMAT_VERSION, MANIFEST, Manifest, dtype_name, sha256_file, shard_file_name


def write_shards(weights: Mapping[str, torch.Tensor], cfg: ModelConfig, tp: int, out_dir: Path,
                 source: Dict[str, Any], overwrite: bool = False,
                 report: Callable[[str], None] = lambda line: None) -> Manifest:
    """Cut `weights` into tp shard files under out_dir, atomically: a failure leaves out_dir untouched.

    Staging directories that an interrupted run left beside out_dir are removed first (and `report`ed).
    """
    check_degree(cfg, tp)
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        raise ShardingError(out_dir, "the output directory is not empty; pass --overwrite to replace it")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with _only_writer(out_dir, report):
        with atomic_directory(out_dir) as staging:
            files = [_write_rank(weights, cfg, tp, rank, staging) for rank in range(tp)]
            with open(staging / MANIFEST, "w") as handle:
                json.dump({"format": FORMAT, "format_version": FORMAT_VERSION, "tp": tp,
                           "config": cfg.to_dict(), "source": source, "files": files}, handle, indent=1)
                handle.write("\n")
    return Manifest(config=cfg, tp=tp, source=source, files=files)


def _write_rank(weights: Mapping[str, torch.Tensor], cfg: ModelConfig, tp: int, rank: int,
                staging: Path) -> Dict[str, Any]:
    name = shard_file_name(rank, tp)
    layout = checkpoint_layout(cfg)
    pieces = {k: shard_tensor(layout[k], v, tp, rank) for k, v in weights.items()}
    save_file(pieces, str(staging / name), metadata={"format": FORMAT, "rank": str(rank), "tp": str(tp)})
    os.chmod(staging / name, 0o666 & ~_umask())
    return {"rank": rank, "file": name, "sha256": sha256_file(staging / name),
            "tensors": {k: {"shape": list(v.shape), "dtype": dtype_name(v.dtype)} for k, v in sorted(pieces.items())}}


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


def stale_staging(out_dir: Path) -> List[Path]:
    """The hidden directories a killed run writing out_dir leaves beside it (staged or retired copies)."""
    prefixes = (f".{out_dir.name}.partial-", f".{out_dir.name}.old-")
    return sorted(p for p in out_dir.parent.iterdir() if p.name.startswith(prefixes) and p.is_dir())


@contextmanager
def _only_writer(out_dir: Path, report: Callable[[str], None]) -> Iterator[None]:
    """Hold a lock on out_dir's parent while writing; with it, staging directories of out_dir are stale.

    Without it (another sharding run writes into the same parent now) they may be that run's: they are only
    reported.
    """
    fd = None
    try:
        try:
            fd = os.open(out_dir.parent, os.O_RDONLY)
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            locked = True
        except OSError:  # busy, or a file system without locks: leave the staging directories be
            locked = False
        for stale in stale_staging(out_dir):
            if locked:
                shutil.rmtree(stale, ignore_errors=True)
                report(f"removed {stale}, left by an interrupted run")
            else:
                report(f"left {stale}: it may belong to another sharding run writing into {out_dir.parent} now")
        yield
    finally:
        if fd is not None:
            os.close(fd)  # releases the lock
