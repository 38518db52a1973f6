"""The on-disk image index: a folder holding the vectors in a FAISS index and, per vector, the image it came from.

| file | what |
| --- | --- |
| `index.json` | format and version, the kind of FAISS index and its search parameters, the vector width and count, the checkpoint's identity (source sha256, file, family, image size), where the images came from, counts, the measured recall of an approximate kind |
| `vectors.faiss` | the FAISS index (inner product of L2-normalised embeddings); vector i is image id i |
| `items.arrow` | one row per id: `path` (what results show: a file's absolute path, an arrow row's image_id), `file` and `row` (where the bytes are: the image file and -1, or the arrow file and its row), `size`, `mtime_ns`, `sha256`, `format` (Pillow's), `duplicates` (other paths with the same bytes, not embedded again) |
| `not_indexed.arrow` | `path`, `reason`: every file found that is not in the index (not an image, empty, truncated, a symbolic link loop, ...) |

The folder is written whole under a temporary name and renamed into place (engine.atomic): a reader sees the old
index or the new one. An unfinished build keeps its embeddings beside it, in `.NAME.work/` (engine.index.build).
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Sequence

import numpy as np
import pyarrow as pa

from ..atomic import atomic_directory
from ..data.arrow_io import read_table
from ..data.raw import DataError
from ..runtime.shards import Manifest
from ..tasks.cli import UsageError

FORMAT = "vlmo-tp-image-index"
FORMAT_VERSION = 1
META, VECTORS, ITEMS, NOT_INDEXED = "index.json", "vectors.faiss", "items.arrow", "not_indexed.arrow"
KINDS = ("flat", "ivf", "hnsw")
HNSW_M = 32  # neighbours per node: FAISS's usual choice for ~1M vectors of a few hundred dimensions
HNSW_EF_CONSTRUCTION = 80
HNSW_EF_SEARCH = 64
RECALL_K = 10
RECALL_SAMPLE = 1000

ITEM_SCHEMA = pa.schema([("path", pa.string()), ("file", pa.string()), ("row", pa.int64()), ("size", pa.int64()),
                         ("mtime_ns", pa.int64()), ("sha256", pa.string()), ("format", pa.string()),
                         ("duplicates", pa.list_(pa.string()))])
NOT_INDEXED_SCHEMA = pa.schema([("path", pa.string()), ("reason", pa.string())])


def work_dir(out: Path) -> Path:
    """Where a build of `out` keeps its embeddings until the index is written."""
    out = Path(os.path.abspath(out))
    return out.with_name(f".{out.name}.work")


def checkpoint_identity(manifest: Manifest) -> Dict[str, Any]:
    """What ties an index to the checkpoint that embedded it: the published file's sha256 (any tp)."""
    source = manifest.source
    return {"sha256": source.get("sha256"), "file": Path(str(source.get("file") or "")).name,
            "family": manifest.config.family, "image_size": manifest.config.image_size}


def check_checkpoint(built_with: Dict[str, Any], manifest: Manifest, index: Path, shards: Path) -> None:
    """Refuse to put a query (or new images) through another checkpoint than the index's."""
    ours = checkpoint_identity(manifest)
    if built_with.get("sha256") != ours["sha256"]:
        raise UsageError(f"{index} was built with checkpoint {built_with.get('file') or '?'} (sha256 "
                         f"{str(built_with.get('sha256'))[:12]}…), but {shards} holds {ours['file'] or '?'} (sha256 "
                         f"{str(ours['sha256'])[:12]}…): embeddings of different checkpoints cannot be compared; "
                         f"pass the shards of the index's checkpoint")


def faiss_module() -> Any:
    """FAISS, imported where an index is used, so that the rest of the engine runs without it."""
    try:
        import faiss
    except ImportError:
        raise UsageError("image search needs FAISS: pip install faiss-cpu (the `index` extra, which make install "
                         "installs)") from None
    return faiss


def new_faiss(kind: str, vectors: np.ndarray) -> Any:
    """A FAISS index of `kind` over `vectors` (float32 [N, D]): exact inner product, IVF or HNSW."""
    faiss = faiss_module()
    count, dim = vectors.shape
    if kind == "flat":
        index = faiss.IndexFlatIP(dim)
    elif kind == "hnsw":
        index = faiss.IndexHNSWFlat(dim, HNSW_M, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = HNSW_EF_CONSTRUCTION
        index.hnsw.efSearch = HNSW_EF_SEARCH
    elif kind == "ivf":
        # about 4·sqrt(N) lists, each trained on at least 39 points (FAISS warns below that)
        nlist = max(1, min(int(round(4 * count ** 0.5)), count // 39))
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, nlist, faiss.METRIC_INNER_PRODUCT)
        index.train(vectors)
        index.nprobe = max(1, min(nlist, max(8, nlist // 16)))
    else:
        raise ValueError(f"unknown index kind {kind!r}; choose one of {', '.join(KINDS)}")
    index.add(vectors)
    return index


def search_params(index: Any) -> Dict[str, int]:
    """The parameters of an approximate search, for index.json and the printed recall."""
    faiss = faiss_module()
    if isinstance(index, faiss.IndexIVF):
        return {"nlist": int(index.nlist), "nprobe": int(index.nprobe)}
    if isinstance(index, faiss.IndexHNSW):
        return {"M": HNSW_M, "ef_search": int(index.hnsw.efSearch)}
    return {}


def all_vectors(index: Any) -> np.ndarray:
    """Every stored vector, in id order (the flat kinds store them as they are)."""
    faiss = faiss_module()
    if isinstance(index, faiss.IndexIVF):
        index.make_direct_map()
    return index.reconstruct_n(0, index.ntotal)


def recall_vs_exact(index: Any, vectors: np.ndarray, sample: int = RECALL_SAMPLE, k: int = RECALL_K,
                    seed: int = 0) -> Dict[str, Any]:
    """recall@k of `index` against exact search, with `sample` stored vectors as the queries: the share of each
    query's exact top k that the index also returns."""
    faiss = faiss_module()
    count = len(vectors)
    k = min(k, count)
    queries = vectors[np.random.default_rng(seed).choice(count, size=min(sample, count), replace=False)]
    exact = faiss.IndexFlatIP(vectors.shape[1])
    exact.add(vectors)
    _, truth = exact.search(queries, k)
    _, found = index.search(queries, k)
    hits = sum(len(set(t) & set(f)) for t, f in zip(truth.tolist(), found.tolist()))
    return {"recall_at": k, "recall": hits / (k * len(queries)), "queries": len(queries)}


class ChangedImage(LookupError):
    """An indexed image whose file is gone or holds other bytes now."""


@dataclass
class Store:
    """An index opened for searching."""

    path: Path
    meta: Dict[str, Any]
    index: Any
    items: pa.Table

    def __len__(self) -> int:
        return self.items.num_rows

    def item(self, ident: int) -> Dict[str, Any]:
        return self.items.slice(ident, 1).to_pylist()[0]

    def image_bytes(self, ident: int) -> bytes:
        """The indexed bytes of image `ident`; ChangedImage when its file no longer holds them."""
        item = self.item(ident)
        try:
            if item["row"] < 0:
                data = Path(item["file"]).read_bytes()
            else:
                data = read_table(Path(item["file"])).column("image")[item["row"]].as_py()
        except (OSError, DataError, IndexError) as exc:
            raise ChangedImage(f"image {ident} ({item['path']}) cannot be read any more: "
                               f"{getattr(exc, 'strerror', None) or exc}") from None
        if hashlib.sha256(data).hexdigest() != item["sha256"]:
            raise ChangedImage(f"image {ident} ({item['path']}) changed since it was indexed")
        return data

    def search(self, queries: np.ndarray, k: int) -> List[List[Dict[str, Any]]]:
        """The top-k images of each query (float32 [Q, D]): id, path and score (inner product), best first."""
        k = min(k, len(self))
        if isinstance(self.index, faiss_module().IndexHNSW):
            self.index.hnsw.efSearch = max(self.index.hnsw.efSearch, k)
        scores, ids = self.index.search(np.ascontiguousarray(queries, dtype=np.float32), k)
        paths = self.items.column("path")
        return [[{"id": int(i), "path": paths[int(i)].as_py(), "score": float(s)}
                 for s, i in zip(row_scores, row_ids) if i >= 0]
                for row_scores, row_ids in zip(scores.tolist(), ids.tolist())]


def read_meta(path: Path) -> Dict[str, Any]:
    """index.json of the index at `path`; a one-line error when `path` is not an index."""
    file = Path(path) / META
    if not file.is_file():
        raise UsageError(f"{path}: not an index written by `engine.index build` (no {META})")
    try:
        meta = json.loads(file.read_text())
    except (OSError, ValueError) as exc:
        raise UsageError(f"{file}: unreadable ({exc})") from None
    if meta.get("format") != FORMAT or meta.get("format_version") != FORMAT_VERSION:
        raise UsageError(f"{file}: not a {FORMAT} version {FORMAT_VERSION} index")
    return meta


def open_store(path: Path) -> Store:
    """The index at `path` for searching; a one-line error when it is not one or is damaged."""
    faiss = faiss_module()
    meta = read_meta(path)
    try:
        index = faiss.read_index(str(Path(path) / VECTORS))
        items = read_table(Path(path) / ITEMS)
    except (RuntimeError, DataError) as exc:
        raise UsageError(f"{path}: damaged index ({str(exc).splitlines()[0]})") from None
    if index.ntotal != items.num_rows or index.ntotal != meta.get("count"):
        raise UsageError(f"{path}: damaged index ({index.ntotal} vectors, {items.num_rows} items, "
                         f"{meta.get('count')} in {META})")
    return Store(Path(path), meta, index, items)


def not_indexed(path: Path) -> List[Dict[str, str]]:
    return read_table(Path(path) / NOT_INDEXED).to_pylist()


def write_store(path: Path, meta: Dict[str, Any], index: Any, items: Sequence[Dict[str, Any]],
                skipped: Sequence[Dict[str, str]]) -> None:
    """Write (or replace) the whole index folder at once."""
    faiss = faiss_module()
    with atomic_directory(path) as staging:
        faiss.write_index(index, str(staging / VECTORS))
        _write_table(staging / ITEMS, items, ITEM_SCHEMA)
        _write_table(staging / NOT_INDEXED, skipped, NOT_INDEXED_SCHEMA)
        full = {"format": FORMAT, "format_version": FORMAT_VERSION, **meta, "count": int(index.ntotal)}
        (staging / META).write_text(json.dumps(full, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")


def _write_table(path: Path, rows: Sequence[Dict[str, Any]], schema: pa.Schema) -> None:
    with pa.ipc.new_file(str(path), schema) as writer:
        writer.write_table(pa.Table.from_pylist(list(rows), schema=schema))

