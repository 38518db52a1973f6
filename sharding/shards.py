"""Per-rank safetensors shard files and the manifest that describes them.

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
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from engine.config import VLMoConfig

from .checkpoint import sha256_file
from .errors import ShardingError
from .plan import check_degree, local_shapes, merge_tensor, shard_tensor

MANIFEST = "manifest.json"
FORMAT = "vlmo-tp-shards"
FORMAT_VERSION = 1


def shard_file_name(rank: int, tp: int) -> str:
    return f"rank-{rank:02d}-of-{tp:02d}.safetensors"


@dataclass(frozen=True)
class Manifest:
    config: VLMoConfig
    tp: int
    source: Dict[str, Any]
    files: List[Dict[str, Any]]

    def file_for(self, rank: int) -> Dict[str, Any]:
        return self.files[rank]


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


def read_manifest(shard_dir: Path) -> Manifest:
    path = Path(shard_dir) / MANIFEST
    if not path.is_file():
        raise ShardingError(path, "no manifest here: is this a directory written by `python -m sharding`?")
    try:
        data = json.loads(path.read_text())
        if data.get("format") != FORMAT:
            raise ShardingError(path, f"not a {FORMAT} manifest")
        if data.get("format_version") != FORMAT_VERSION:
            raise ShardingError(path, f"format version {data.get('format_version')} is not supported "
                                      f"(this engine reads version {FORMAT_VERSION}); re-shard the checkpoint")
        manifest = Manifest(config=VLMoConfig.from_dict(data["config"]), tp=int(data["tp"]),
                            source=data.get("source", {}), files=list(data["files"]))
    except ShardingError:
        raise
    except (ValueError, KeyError, TypeError) as exc:
        raise ShardingError(path, f"malformed manifest ({type(exc).__name__}: {exc})") from None
    if [f.get("rank") for f in manifest.files] != list(range(manifest.tp)):
        raise ShardingError(path, f"the manifest should list one file per rank 0..{manifest.tp - 1}")
    return manifest


def _check_file(shard_dir: Path, manifest: Manifest, rank: int, check_hash: bool = True) -> Path:
    entry = manifest.file_for(rank)
    path = Path(shard_dir) / entry["file"]
    if not path.is_file():
        raise ShardingError(path, f"rank {rank}'s shard file is missing")
    if check_hash and sha256_file(path) != entry["sha256"]:
        raise ShardingError(path, "sha256 does not match the manifest: the file was changed or damaged; re-shard")
    expected = local_shapes(manifest.config, manifest.tp)
    listed = {k: tuple(v["shape"]) for k, v in entry["tensors"].items()}
    if listed != expected:
        raise ShardingError(path, "the manifest's tensor list does not match the sharding plan for its config")
    return path


def _check_tensors(path: Path, tensors: Mapping[str, Any], expected: Mapping[str, tuple]) -> None:
    missing = sorted(set(expected) - set(tensors))
    extra = sorted(set(tensors) - set(expected))
    if missing or extra:
        raise ShardingError(path, f"tensor names differ from the plan (missing {missing[:4]}, unexpected {extra[:4]})")
    for name, shape in expected.items():
        if tuple(tensors[name]) != tuple(shape):
            raise ShardingError(path, f"{name} has shape {tuple(tensors[name])}, the plan says {tuple(shape)}")


def load_rank_shard(shard_dir: Path, rank: int, tp: int,
                    manifest: Optional[Manifest] = None) -> Dict[str, torch.Tensor]:
    """This rank's tensors, after checking the manifest's tp, the file's hash and every shape.

    Only this rank's own file is opened.
    """
    manifest = manifest or read_manifest(shard_dir)
    if manifest.tp != tp:
        raise ShardingError(Path(shard_dir) / MANIFEST,
                            f"the shards were cut for tp={manifest.tp} but the tensor-parallel group has {tp} "
                            f"ranks; launch with a multiple of {manifest.tp} processes or re-shard with --tp {tp}")
    path = _check_file(shard_dir, manifest, rank)
    tensors = load_file(str(path))
    _check_tensors(path, {k: v.shape for k, v in tensors.items()}, local_shapes(manifest.config, tp))
    return tensors


def verify_shards(shard_dir: Path) -> Manifest:
    """Check a shard directory without running the model: every file present, hashed and shaped as planned."""
    manifest = read_manifest(shard_dir)
    check_degree(manifest.config, manifest.tp)
    for rank in range(manifest.tp):
        path = _check_file(shard_dir, manifest, rank)
        with safe_open(str(path), framework="pt") as handle:
            shapes = {k: tuple(handle.get_slice(k).get_shape()) for k in handle.keys()}
        _check_tensors(path, shapes, local_shapes(manifest.config, manifest.tp))
    return manifest


def merge_shards(shard_dir: Path) -> Dict[str, torch.Tensor]:
    """Rebuild the full state dict from every rank's shard (undoes write_shards)."""
    manifest = verify_shards(shard_dir)
    per_rank = [load_file(str(Path(shard_dir) / f["file"])) for f in manifest.files]
    return {name: merge_tensor(name, [r[name] for r in per_rank], manifest.config) for name in per_rank[0]}
