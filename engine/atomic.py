"""All-or-nothing writes: a reader sees the old file (or directory) or the complete new one, never a part.

Every writer of the engine, its tools and the sharding tool goes through here: the data goes to a hidden
temporary name beside the target, is fsync'ed, and is renamed into place; on any failure the temporary is
removed and the target is left as it was. `writable_file` and `writable_folder` check an output path before any
work, so that a command never does its work only to fail at the write.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, Optional, Union

PathLike = Union[str, "os.PathLike[str]"]


class OutputPathError(ValueError):
    """An output path that cannot be written; the message names the option and the path."""


def writable_file(path: PathLike, option: str) -> Path:
    """`path` after checking that a file can be written there (atomically: a temporary beside it, then a rename).

    Refused in one line: a folder, a read-only file, a path under a file, a folder that cannot be written.
    """
    target = Path(os.path.abspath(path))
    if target.is_dir():
        raise OutputPathError(f"{option} {path}: is a directory; name a file")
    if target.exists() and not os.access(target, os.W_OK):
        raise OutputPathError(f"{option} {path}: the file is not writable")
    _probe(_nearest_folder(target.parent, option, path), option, path)
    return Path(path)


def writable_folder(path: PathLike, option: str, replaced: bool = False) -> Path:
    """`path` after checking that files can be written into it (created if missing); `replaced`: the folder is
    written whole beside itself and renamed into place (`atomic_directory`), so its parent must be writable."""
    target = Path(os.path.abspath(path))
    if target.exists() and not target.is_dir():
        raise OutputPathError(f"{option} {path}: is a file, not a folder")
    if target.is_dir() and not replaced:
        _probe(target, option, path)
    else:
        _probe(_nearest_folder(target.parent, option, path), option, path)
    return Path(path)


def _nearest_folder(folder: Path, option: str, path: PathLike) -> Path:
    """The closest existing ancestor, which must be a folder (mkdir creates the rest)."""
    while not folder.exists() and not folder.is_symlink():
        folder = folder.parent
    if not folder.is_dir():
        raise OutputPathError(f"{option} {path}: {folder} is a file, not a folder")
    return folder


def _probe(folder: Path, option: str, path: PathLike) -> None:
    # Creating a file is the only sure test: permission bits miss ACLs, read-only mounts and root-less users.
    try:
        fd, probe = tempfile.mkstemp(dir=folder, prefix=".write-check-")
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise OutputPathError(f"{option} {path}: cannot write in {folder} ({exc.strerror})") from None


@contextmanager
def atomic_path(path: PathLike) -> Iterator[Path]:
    """A temporary path beside `path` to write; renamed onto `path` when the block ends without error."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # The hidden name keeps the final suffix off, so a partial file never looks like a finished one.
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".partial")
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        _fsync_file(tmp)
        # mkstemp's 0600 would otherwise stick to the result.
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def write_atomic(path: PathLike, write: Callable[[Path], None]) -> None:
    """Call `write(tmp)` on a temporary path, then rename it onto `path`."""
    with atomic_path(path) as tmp:
        write(tmp)


def write_text(path: PathLike, text: str) -> None:
    """Write a UTF-8 text file atomically."""
    write_atomic(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def write_json(path: PathLike, obj: Any, indent: Optional[int] = None) -> None:
    """Write `obj` as JSON (one trailing newline) atomically; numpy values and tensors become lists/numbers."""
    text = json.dumps(obj, indent=indent, ensure_ascii=False, default=to_builtin)
    write_text(path, text + "\n")


def to_builtin(value: Any) -> Any:
    """json's `default` for numpy scalars/arrays and tensors (they reach the writers from model outputs)."""
    if hasattr(value, "tolist"):
        return value.tolist()
    raise TypeError(f"cannot write {type(value).__name__} as JSON")


def write_safetensors(path: PathLike, tensors: Dict[str, Any], metadata: Optional[Dict[str, str]] = None) -> None:
    """safetensors' save_file, atomically."""
    from safetensors.torch import save_file

    write_atomic(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))


def write_torch(path: PathLike, obj: Any) -> None:
    """torch.save, atomically."""
    import torch

    write_atomic(path, lambda tmp: torch.save(obj, tmp))


@contextmanager
def atomic_directory(path: PathLike) -> Iterator[Path]:
    """A fresh staging directory beside `path`; it replaces `path` (whole) when the block ends without error."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.partial-", dir=path.parent))
    try:
        os.chmod(staging, 0o777 & ~_umask())  # mkdtemp's 0700 would otherwise stick to the result
        yield staging
        for child in staging.rglob("*"):
            if child.is_file():
                _fsync_file(child)
        _swap_into_place(staging, path)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    fsync_dir(path.parent)


def _swap_into_place(staging: Path, target: Path) -> None:
    # A directory cannot be renamed onto a non-empty one: retire the old one first, then remove it.
    if target.exists():
        retired = target.with_name(f".{target.name}.old-{os.getpid()}")
        os.replace(target, retired)
        os.replace(staging, target)
        shutil.rmtree(retired, ignore_errors=True)
    else:
        os.replace(staging, target)


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def fsync_dir(directory: PathLike) -> None:
    """Make a new directory entry durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
