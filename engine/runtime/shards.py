"""The shard format: per-rank safetensors files and the manifest that describes them; reading and checking.

Layout of a shard directory:
    manifest.json               format version, model config, tp, source sha256, per-file sha256 + tensor specs
    rank-00-of-02.safetensors   rank 0's tensors, named as in the published checkpoint
    rank-01-of-02.safetensors
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from ..models import ModelConfig, config_from_dict
from .errors import ShardingError
from .plan import check_degree, local_shapes

MANIFEST = "manifest.json"
FORMAT = "vlmo-tp-shards"
FORMAT_VERSION = 1


def sha256_file(path: Path, chunk: int = 1 << 24) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def dtype_name(dtype: torch.dtype) -> str:
    """A dtype as the manifest spells it: float32, bfloat16, ..."""
    return str(dtype).replace("torch.", "")


def non_finite(tensor: torch.Tensor) -> Optional[str]:
    """What is non-finite in a floating tensor ("holds 1 NaN and 0 infinite values of 4096"), or None."""
    if not tensor.is_floating_point():
        return None
    finite = torch.isfinite(tensor)
    if bool(finite.all()):
        return None
    nans = int(torch.isnan(tensor).sum())
    return f"holds {nans} NaN and {tensor.numel() - int(finite.sum()) - nans} infinite values of {tensor.numel()}"


def shard_file_name(rank: int, tp: int) -> str:
    return f"rank-{rank:02d}-of-{tp:02d}.safetensors"


@dataclass(frozen=True)
class Manifest:
    config: ModelConfig
    tp: int
    source: Dict[str, Any]
    files: List[Dict[str, Any]]

    def file_for(self, rank: int) -> Dict[str, Any]:
        return self.files[rank]


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
        manifest = Manifest(config=config_from_dict(data["config"]), tp=int(data["tp"]),
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
    try:
        listed = {k: tuple(v["shape"]) for k, v in entry["tensors"].items()}
    except (KeyError, TypeError, AttributeError) as exc:
        raise ShardingError(Path(shard_dir) / MANIFEST, f"malformed tensor list for rank {rank} ({exc!r})") from None
    _check_tensors(Path(shard_dir) / MANIFEST, listed, local_shapes(manifest.config, manifest.tp),
                   f"rank {rank}'s entry ")
    return path


def _check_tensors(path: Path, shapes: Mapping[str, Any], expected: Mapping[str, tuple], where: str = "") -> None:
    """Names and shapes (of a file, or of the manifest's list for it) against the plan, naming the first mismatch."""
    missing = sorted(set(expected) - set(shapes))
    extra = sorted(set(shapes) - set(expected))
    if missing or extra:
        raise ShardingError(path, f"{where}tensor names differ from the sharding plan of its config "
                                  f"(missing {missing[:4]}, unexpected {extra[:4]})")
    for name, shape in expected.items():
        if tuple(shapes[name]) != tuple(shape):
            raise ShardingError(path, f"{where}{name} has shape {tuple(shapes[name])}, "
                                      f"the sharding plan says {tuple(shape)}")


def _check_dtypes(path: Path, dtypes: Mapping[str, str], entry: Mapping[str, Any]) -> None:
    """Each tensor's dtype in the file against the one the manifest lists for it."""
    for name, spec in entry["tensors"].items():
        listed = spec.get("dtype")
        if dtypes[name] != listed:
            raise ShardingError(path, f"{name} is {dtypes[name]} in the file but {listed} in the manifest")


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
    _check_dtypes(path, {k: dtype_name(v.dtype) for k, v in tensors.items()}, manifest.file_for(rank))
    return tensors


def verify_shards(shard_dir: Path) -> Manifest:
    """Check a shard directory without running the model: every file present, hashed, typed and shaped as
    planned, and every weight finite."""
    manifest = read_manifest(shard_dir)
    check_degree(manifest.config, manifest.tp)
    for rank in range(manifest.tp):
        path = _check_file(shard_dir, manifest, rank)
        with safe_open(str(path), framework="pt") as handle:
            shapes = {k: tuple(handle.get_slice(k).get_shape()) for k in handle.keys()}
            _check_tensors(path, shapes, local_shapes(manifest.config, manifest.tp))
            # One tensor at a time: a rank's whole shard need not fit in memory twice.
            dtypes = {}
            for name in handle.keys():
                tensor = handle.get_tensor(name)
                dtypes[name] = dtype_name(tensor.dtype)
                problem = non_finite(tensor)
                if problem:
                    raise ShardingError(path, f"{name} {problem}; the checkpoint it was cut from is broken")
        _check_dtypes(path, dtypes, manifest.file_for(rank))
    return manifest