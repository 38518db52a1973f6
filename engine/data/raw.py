"""Reading raw downloads (JSON, JSON lines, image files) with errors that name the file."""
from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator


class DataError(Exception):
    """A missing, unreadable or malformed input; the message names the file."""


def read_json(path: Path) -> Any:
    """Parse one JSON document."""
    text = _read_text(path)
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise DataError(f"malformed JSON in {path}: {err}") from None


def read_json_lines(path: Path) -> list:
    """Parse a file holding one JSON document per line (blank lines are skipped)."""
    records = []
    for number, line in enumerate(_read_text(path).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as err:
            raise DataError(f"malformed JSON in {path} line {number}: {err}") from None
    return records


def read_bytes(path: Path, what: str) -> bytes:
    """The bytes of a file the inputs refer to; `what` says who refers to it."""
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise DataError(f"missing image file {path} ({what})") from None
    except OSError as err:
        raise DataError(f"cannot read {path} ({what}): {err.strerror}") from None


def require_files(paths: dict, what: str) -> None:
    """Fail before anything is written when a listed file is absent.

    `paths` maps each file to the entry that lists it (put in the message).
    """
    for path, entry in paths.items():
        if not path.is_file():
            raise DataError(f"missing image file {path} ({what} {entry})")


@contextmanager
def content_of(path: Path) -> Iterator[None]:
    """Turn a lookup failure while walking a parsed file into an error naming it."""
    try:
        yield
    except (KeyError, IndexError, TypeError, ValueError, AttributeError) as err:
        raise DataError(
            f"unexpected content in {path}: {type(err).__name__}: {err}"
        ) from None


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DataError(f"missing input file {path}") from None
    except (OSError, UnicodeDecodeError) as err:
        raise DataError(f"cannot read {path}: {err}") from None
