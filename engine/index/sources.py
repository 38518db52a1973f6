"""Where the images of an index come from: a folder walked recursively, or a benchmark split's arrow file.

Both give a list of entries (the name an image is known by, its size, where its bytes are) and the things that
were found but cannot be indexed, each with its reason. The walk follows symbolic links to folders once: a link
back into a folder already walked (a loop, or a second way to the same folder) is listed, not followed, and a
link that cannot be resolved (dangling, or a link to itself) is listed too. Only regular files are read: a FIFO
or a device would block or never end.
"""
from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import pyarrow.compute as pc

from ..data.arrow_io import split_filename
from ..data.datasets import _LazyTable

Locator = Union[str, int]  # a file's absolute path, or a row of the arrow file


@dataclass(frozen=True)
class Entry:
    """One candidate image: `name` is what results call it (a file's path; an arrow row's image_id)."""

    name: str
    size: int
    mtime_ns: int
    locator: Locator


@dataclass(frozen=True)
class Skipped:
    name: str
    reason: str


class FolderSource:
    """Every regular file under `root`, except the folders in `exclude` (the index being written)."""

    kind = "images"

    def __init__(self, root: Path, exclude: Sequence[Path] = (), max_bytes: Optional[int] = None) -> None:
        self.root = Path(os.path.abspath(root))
        self.exclude = {os.path.abspath(p) for p in exclude}
        self.max_bytes = max_bytes

    def describe(self) -> Dict[str, str]:
        return {"images": str(self.root)}

    def read(self, locator: Locator) -> bytes:
        with open(locator, "rb") as handle:
            return handle.read()

    def where(self, locator: Locator) -> Dict[str, Any]:
        return {"file": str(locator), "row": -1}

    def entries(self) -> Tuple[List[Entry], List[Skipped]]:
        """Files in path order (each folder's entries sorted by name), and what was not indexed, with why."""
        found: List[Entry] = []
        skipped: List[Skipped] = []
        seen: Dict[Tuple[int, int], str] = {}
        top = os.stat(self.root)
        seen[(top.st_dev, top.st_ino)] = str(self.root)
        stack = [str(self.root)]
        while stack:
            folder = stack.pop()
            try:
                names = sorted(os.listdir(folder))
            except OSError as exc:
                skipped.append(Skipped(folder, f"cannot read the folder: {exc.strerror}"))
                continue
            below: List[str] = []
            for name in names:
                path = os.path.join(folder, name)
                if path in self.exclude:
                    continue
                reason = self._visit(path, seen, found, below)
                if reason:
                    skipped.append(Skipped(path, reason))
            stack.extend(reversed(below))  # depth first, in name order
        return found, skipped

    def _visit(self, path: str, seen: Dict[Tuple[int, int], str], found: List[Entry], below: List[str]) -> str:
        """Add `path` to `found` or `below` (a folder to walk); return why it is skipped, or ''."""
        try:
            info = os.stat(path)  # follows links
        except OSError as exc:
            if os.path.islink(path):
                target = os.readlink(path)
                return (f"symbolic link loop ({target!r}: {exc.strerror})" if exc.errno == 40
                        else f"broken symbolic link to {target!r} ({exc.strerror})")
            return f"cannot read: {exc.strerror}"
        if stat.S_ISDIR(info.st_mode):
            key = (info.st_dev, info.st_ino)
            if key in seen:
                first = seen[key]
                loop = (path + os.sep).startswith(first.rstrip(os.sep) + os.sep)
                return (f"symbolic link loop: leads back to {first}" if loop
                        else f"a second way to the folder {first} (walked there)")
            seen[key] = path
            below.append(path)
            return ""
        if not stat.S_ISREG(info.st_mode):
            return "not a regular file"
        if info.st_size == 0:
            return "empty file"
        if self.max_bytes is not None and info.st_size > self.max_bytes:
            return f"{info.st_size} bytes, larger than --max-image-bytes {self.max_bytes}"
        found.append(Entry(path, info.st_size, info.st_mtime_ns, path))
        return ""


class ArrowSource:
    """The images of a benchmark split's arrow file (python -m engine.data coco|f30k|...), named by image_id."""

    kind = "data"

    def __init__(self, arrow_dir: Path, dataset: str, split: str) -> None:
        self.arrow_dir, self.dataset, self.split = Path(arrow_dir), dataset, split
        self.file = self.arrow_dir / split_filename(dataset, split)
        self._table = _LazyTable(arrow_dir, dataset, split)  # a missing file fails here, with its name

    def describe(self) -> Dict[str, str]:
        return {"data": str(self.file), "dataset": self.dataset, "split": self.split}

    def read(self, locator: Locator) -> bytes:
        return self._table.value("image", int(locator))

    def where(self, locator: Locator) -> Dict[str, Any]:
        return {"file": str(self.file.resolve()), "row": int(locator)}

    def entries(self) -> Tuple[List[Entry], List[Skipped]]:
        table = self._table.table
        ids = [str(i) for i in table.column("image_id").to_pylist()]
        sizes = pc.binary_length(table.column("image")).fill_null(0).to_pylist() if table.num_rows else []
        found = [Entry(name, size, 0, row) for row, (name, size) in enumerate(zip(ids, sizes)) if size]
        return found, [Skipped(name, "empty image") for name, size in zip(ids, sizes) if not size]

