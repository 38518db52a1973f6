"""`engine.index build|add`: embed every image of a source with the image-only pass and write the index.

Three passes, each shared out among the data-parallel groups by the evaluation loop (engine.tasks.evaluation):

1. hash: every file is read once, hashed (sha256) and its format identified from its header (Pillow), in the
   DataLoader workers; files Pillow does not recognise are listed, not embedded. Rank 0 keeps the hashes in the
   work folder, so a rerun hashes only files that changed.
2. embed: one image per distinct content (same bytes: embedded once, the other paths are its duplicates), not
   already embedded by an interrupted run or, for `add`, in the index. Rank 0 appends the embeddings to chunk
   files in the work folder as they arrive (every --chunk-size images, and at least every minute), each written
   whole (engine.atomic): a run that is killed loses at most one chunk's work, and a rerun continues.
3. write: rank 0 puts the vectors into the FAISS index of --kind (measuring an approximate kind's recall against
   exact search), writes the index folder at once (engine.index.store) and removes the work folder.
"""
from __future__ import annotations

import hashlib
import io
import json
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import click
import numpy as np
import pyarrow as pa
import torch
from PIL import Image, UnidentifiedImageError
from safetensors import safe_open
from torch.utils.data import Dataset

from ..atomic import write_atomic, write_json, write_safetensors
from ..data.arrow_io import read_table
from ..data.image import ImageDecodeError, decode_image, square_transform
from ..models.tasks import IMAGE_EMBEDDING, TASKS
from ..tasks.cli import Engine, UsageError
from ..tasks.evaluation import Record, evaluate
from ..tasks.frontend import per_sample_step
from .sources import ArrowSource, Entry, FolderSource, Skipped
from .store import (Store, all_vectors, checkpoint_identity, new_faiss, not_indexed, recall_vs_exact, search_params,
                    work_dir, write_store)

Source = Union[FolderSource, ArrowSource]
STATE, HASHES = "state.json", "hashes.arrow"
CHUNK_EVERY_S = 60.0
HASH_SCHEMA = pa.schema([("name", pa.string()), ("size", pa.int64()), ("mtime_ns", pa.int64()),
                         ("sha256", pa.string()), ("format", pa.string()), ("error", pa.string())])


@dataclass(frozen=True)
class Planned:
    """An image to embed: its entry and what the hash pass found."""
    name: str
    locator: Union[str, int]
    size: int
    mtime_ns: int
    sha256: str
    format: str


class HashDataset(Dataset):
    """Read each entry's bytes: its sha256 and image format, or why it cannot be an image."""

    def __init__(self, source: Source, entries: Sequence[Entry]) -> None:
        self.source, self.entries = source, entries

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, i: int) -> dict:
        entry = self.entries[i]
        out = {"entry": i, "sha256": None, "format": None, "error": None}
        try:
            data = self.source.read(entry.locator)
        except OSError as exc:
            return {**out, "error": f"cannot read: {exc.strerror or exc}"}
        out["sha256"] = hashlib.sha256(data).hexdigest()
        try:
            with Image.open(io.BytesIO(data)) as image:  # the header only
                out["format"] = image.format or "unknown"
        except UnidentifiedImageError:
            out["error"] = "not an image (Pillow does not recognise the format)"
        except Exception as exc:  # Pillow raises many types on hostile headers; all mean "not an image"
            out["error"] = f"not an image ({type(exc).__name__}: {exc})"
        return out


class EmbedDataset(Dataset):
    """The planned images, decoded and transformed as evaluation does; files that changed since they were hashed
    or that do not decode (truncated, corrupt) keep their place with the reason."""

    def __init__(self, source: Source, plan: Sequence[Planned], image_size: int) -> None:
        self.source, self.plan, self.image_size = source, plan, image_size
        # Photos are shown upright (EXIF orientation); the benchmark splits are read as the published code reads them.
        self.upright = isinstance(source, FolderSource)

    def __len__(self) -> int:
        return len(self.plan)

    def __getitem__(self, i: int) -> dict:
        item = self.plan[i]
        error = None
        try:
            data = self.source.read(item.locator)
            if hashlib.sha256(data).hexdigest() != item.sha256:
                error = "changed while it was being indexed"
            else:
                image = square_transform(decode_image(data, upright=self.upright), self.image_size)
        except OSError as exc:
            error = f"cannot read: {exc.strerror or exc}"
        except ImageDecodeError as exc:
            error = str(exc)
        except Exception as exc:  # Pillow raises many types on hostile data (EXIF too); none may end the build
            error = f"cannot decode image ({type(exc).__name__}: {exc})"
        if error:
            image = torch.zeros(3, self.image_size, self.image_size)
        return {"item": i, "path": item.name, "image": image, "image_ok": error is None, "image_error": error}


class Chunks:
    """The work folder's embedding chunks: every finished image (its embedding, or why it failed), in files."""

    def __init__(self, folder: Path, chunk_size: int) -> None:
        self.folder, self.chunk_size = folder, chunk_size
        self.files = sorted(folder.glob("chunk-*.safetensors"))
        self._pending: List[Record] = []
        self._last = time.monotonic()
        self.embedded = 0  # images embedded by this run

    def read(self) -> Tuple[List[Dict[str, Any]], np.ndarray]:
        """Every record so far, and the embeddings of those that have one, in record order."""
        records: List[Dict[str, Any]] = []
        embeddings: List[np.ndarray] = []
        for file in self.files:
            with safe_open(str(file), framework="numpy") as handle:
                records += json.loads(handle.metadata()["records"])
                embeddings.append(handle.get_tensor("embeddings"))
        vectors = [e for e in embeddings if e.size]
        return records, (np.concatenate(vectors) if vectors else np.zeros((0, 0), np.float32))

    def add(self, records: List[Record]) -> None:
        self._pending += records
        self.embedded += sum("embedding" in r for r in records)
        if len(self._pending) >= self.chunk_size or time.monotonic() - self._last > CHUNK_EVERY_S:
            self.flush()

    def flush(self) -> None:
        if not self._pending:
            return
        rows = [r.pop("embedding") for r in self._pending if "embedding" in r]
        file = self.folder / f"chunk-{len(self.files):06d}.safetensors"
        embeddings = np.stack(rows).astype(np.float32) if rows else np.zeros((0, 0), np.float32)
        write_safetensors(file, {"embeddings": torch.from_numpy(embeddings)},
                          {"records": json.dumps(self._pending, ensure_ascii=False)})
        self.files.append(file)
        self._pending, self._last = [], time.monotonic()


def prepare_work(out: Path, op: str, identity: Dict[str, Any], source: Source) -> Path:
    """Rank 0, before loading: the work folder of `out`, refusing one an interrupted run left with other settings."""
    folder = work_dir(out)
    state = {"op": op, "checkpoint": identity, "source": source.describe()}
    started = any(folder.glob("chunk-*")) or (folder / HASHES).exists()  # else nothing to lose: start afresh
    if started and (folder / STATE).is_file():
        before = json.loads((folder / STATE).read_text())
        if before != state:
            raise UsageError(f"{folder} holds an interrupted {before.get('op')} of {out} from "
                             f"{_describe(before.get('source', {}))} with checkpoint sha256 "
                             f"{str(before.get('checkpoint', {}).get('sha256'))[:12]}…; rerun that command to "
                             f"finish it, or remove {folder} to start again")
        click.echo(f"continuing the interrupted {op} in {folder}", err=True)
    else:
        folder.mkdir(parents=True, exist_ok=True)
        write_json(folder / STATE, state, indent=1)
    return folder


def _describe(source: Dict[str, str]) -> str:
    return source.get("images") or f"{source.get('data')} ({source.get('dataset')} {source.get('split')})"


def hash_entries(engine: Engine, source: Source, entries: List[Entry], folder: Optional[Path], *,
                 existing: Optional[Store], batch_size: int, num_workers: int) -> List[Dict[str, Any]]:
    """Rank 0: per entry {sha256, format, error}. Entries that an interrupted run hashed, or that the index being
    added to holds, with the same size and modification time are not read again."""
    ctx = engine.ctx
    cached: Dict[Tuple[str, int, int], Dict[str, Any]] = {}
    if ctx.is_main and existing is not None:
        cached = {(r["path"], r["size"], r["mtime_ns"]): {"name": r["path"], "size": r["size"], "mtime_ns": r["mtime_ns"],
                                                          "sha256": r["sha256"], "format": r["format"], "error": None}
                  for r in existing.items.to_pylist()}
    if ctx.is_main and folder is not None and (folder / HASHES).is_file():
        cached.update({(r["name"], r["size"], r["mtime_ns"]): r for r in read_table(folder / HASHES).to_pylist()})
    known = [cached.get((e.name, e.size, e.mtime_ns)) for e in entries] if ctx.is_main else []
    todo = ctx.broadcast_object([i for i, r in enumerate(known) if r is None] if ctx.is_main else None)
    found: List[Record] = []
    evaluate(ctx, HashDataset(source, entries), todo, _rows, batch_size=batch_size,
             num_workers=num_workers, on_records=found.extend, label="hashing", unit="files")
    if not ctx.is_main:
        return []
    for record in found:
        entry = entries[record["entry"]]
        known[record["entry"]] = {"name": entry.name, "size": entry.size, "mtime_ns": entry.mtime_ns,
                                  **{k: record[k] for k in ("sha256", "format", "error")}}
    if folder is not None and found:
        write_table(folder / HASHES, known, HASH_SCHEMA)
    return known


def _rows(batch: Dict[str, Any]) -> List[Record]:
    """A collated batch of plain values back into one record per item."""
    keys = list(batch)
    return [dict(zip(keys, values)) for values in zip(*(batch[k] for k in keys))]


def write_table(path: Path, rows: Sequence[Dict[str, Any]], schema: pa.Schema) -> None:
    def write(tmp: Path) -> None:
        with pa.ipc.new_file(str(tmp), schema) as writer:
            writer.write_table(pa.Table.from_pylist(list(rows), schema=schema))

    write_atomic(path, write)


@dataclass
class Outcome:
    """What a build or an add did, for the final lines: this run's embeddings, the index's totals."""
    embedded: int
    images: int
    duplicates: int
    skipped: List[Dict[str, str]]
    embed_s: float
    recall: Optional[Dict[str, Any]]


def run_build(engine: Engine, source: Source, out: Path, folder: Path, *, kind: str, existing: Optional[Store],
              chunk_size: int, batch_size: int, num_workers: int) -> Optional[Outcome]:
    """Hash, embed and write the index (every rank calls this; rank 0 returns the outcome)."""
    ctx = engine.ctx
    if ctx.is_main:
        entries, walk_skipped = source.entries()
    else:
        entries, walk_skipped = [], []
    entries = ctx.broadcast_object(entries)
    hashes = hash_entries(engine, source, entries, folder if ctx.is_main else None, existing=existing,
                          batch_size=max(batch_size, 64), num_workers=num_workers)
    chunks = Chunks(folder, chunk_size) if ctx.is_main else None
    plan: List[Planned] = []
    if ctx.is_main:
        done, _ = chunks.read()
        indexed = set(existing.items.column("sha256").to_pylist()) if existing else set()
        plan = _plan(entries, hashes, indexed | {r["sha256"] for r in done})
    plan = ctx.broadcast_object(plan)
    step = per_sample_step(lambda t: TASKS[IMAGE_EMBEDDING].first_output(engine.model, t, ctx.device), ("path",),
                           lambda batch, i: asdict(plan[batch["item"][i]]),
                           lambda batch, i, row: {"embedding": row.numpy()})
    stats = evaluate(ctx, EmbedDataset(source, plan, engine.manifest.config.image_size), range(len(plan)), step,
                     batch_size=batch_size, num_workers=num_workers, on_records=chunks.add if chunks else None,
                     label="embedding", unit="images")
    if not ctx.is_main:
        return None
    chunks.flush()
    return _write(out, source, engine, kind, existing, entries, hashes, walk_skipped, chunks, stats.wall_s)


def _plan(entries: Sequence[Entry], hashes: Sequence[Dict[str, Any]], embedded: set) -> List[Planned]:
    """The first entry of each content that is an image and not embedded yet."""
    plan, seen = [], set(embedded)
    for entry, found in zip(entries, hashes):
        if found["error"] is None and found["sha256"] not in seen:
            seen.add(found["sha256"])
            plan.append(Planned(entry.name, entry.locator, entry.size, entry.mtime_ns, found["sha256"],
                                found["format"]))
    return plan


def _write(out: Path, source: Source, engine: Engine, kind: str, existing: Optional[Store], entries: Sequence[Entry],
           hashes: Sequence[Dict[str, Any]], walk_skipped: Sequence[Skipped], chunks: Chunks,
           embed_s: float) -> Outcome:
    """Rank 0: the index from the chunks (and, for add, the existing index), written whole; the work folder goes."""
    items: List[Dict[str, Any]] = existing.items.to_pylist() if existing else []
    by_sha = {item["sha256"]: item for item in items}
    new_items, failed = _new_items(chunks, source, entries, hashes, by_sha)
    skipped = _sort_out(entries, hashes, walk_skipped, items, by_sha, failed)
    if existing:  # the earlier list, less what is indexed now, updated by this walk
        indexed = {item["path"] for item, _ in new_items}
        merged = {s["path"]: s for s in not_indexed(existing.path) + skipped}
        skipped = [s for path, s in merged.items() if path not in indexed]
    skipped.sort(key=lambda s: s["path"])
    fresh = np.stack([v for _, v in new_items]).astype(np.float32) if new_items else None
    index = _vectors(kind, existing, fresh)
    recall = ({**recall_vs_exact(index, all_vectors(index)), "params": search_params(index)}
              if kind != "flat" else None)
    meta = {"kind": kind, "metric": "inner_product", "dim": int(index.d), "search": search_params(index),
            "recall_vs_exact": recall, "checkpoint": checkpoint_identity(engine.manifest),
            "sources": (existing.meta["sources"] if existing else []) + [source.describe()],
            "duplicates": sum(len(item["duplicates"]) for item in by_sha.values()), "not_indexed": len(skipped),
            "updated": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    write_store(out, meta, index, items + [item for item, _ in new_items], skipped)
    shutil.rmtree(chunks.folder, ignore_errors=True)
    return Outcome(embedded=chunks.embedded, images=int(index.ntotal), duplicates=meta["duplicates"], skipped=skipped,
                   embed_s=embed_s, recall=recall)


def _new_items(chunks: Chunks, source: Source, entries: Sequence[Entry], hashes: Sequence[Dict[str, Any]],
               by_sha: Dict[str, Dict[str, Any]]) -> Tuple[List[Tuple[Dict[str, Any], np.ndarray]], Dict[str, str]]:
    """The chunks' embedded images still in the source and not in the index (in path order, each with its vector;
    added to `by_sha`), and the reason of each content that failed to decode."""
    records, vectors = chunks.read()
    first: Dict[str, Entry] = {}  # each content's first entry in this walk
    for entry, found in zip(entries, hashes):
        first.setdefault(found["sha256"], entry)
    names = {entry.name for entry in entries}
    new_items, failed, position = [], {}, 0
    for record in records:
        vector = None
        if "image_error" not in record:
            vector, position = vectors[position], position + 1
        sha = record["sha256"]
        if sha in by_sha or sha not in first:
            continue  # in the index already, or gone from the source since it was embedded
        if vector is None:
            failed[sha] = record["image_error"]
            continue
        # an image renamed since an interrupted run embedded it is listed under its name now
        entry = first[sha] if record["name"] not in names else None
        item = {"path": entry.name if entry else record["name"],
                **source.where(entry.locator if entry else record["locator"]),
                "size": record["size"], "mtime_ns": entry.mtime_ns if entry else record["mtime_ns"], "sha256": sha,
                "format": record["format"], "duplicates": []}
        by_sha[sha] = item
        new_items.append((item, vector))
    new_items.sort(key=lambda pair: pair[0]["path"])
    return new_items, failed


def _sort_out(entries: Sequence[Entry], hashes: Sequence[Dict[str, Any]], walk_skipped: Sequence[Skipped],
              items: Sequence[Dict[str, Any]], by_sha: Dict[str, Dict[str, Any]],
              failed: Dict[str, str]) -> List[Dict[str, str]]:
    """The files not indexed, with why; each other path of an indexed content is recorded as its duplicate."""
    skipped = [{"path": s.name, "reason": s.reason} for s in walk_skipped]
    known_paths = {item["path"] for item in items} | {p for item in items for p in item["duplicates"]}
    for entry, found in zip(entries, hashes):
        item = by_sha.get(found["sha256"])
        if found["error"] is not None or found["sha256"] in failed:
            skipped.append({"path": entry.name, "reason": found["error"] or failed[found["sha256"]]})
        elif item is not None and entry.name not in known_paths and item["path"] != entry.name:
            item["duplicates"].append(entry.name)
    return skipped


def _vectors(kind: str, existing: Optional[Store], fresh: Optional[np.ndarray]) -> Any:
    if existing is not None:
        if fresh is not None:
            existing.index.add(fresh)
        return existing.index
    if fresh is None:
        raise UsageError("no image to index: every file was skipped (see the list above)")
    return new_faiss(kind, fresh)
