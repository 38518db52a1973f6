"""Crash-safe result files: a resumable JSONL log of per-item results.

Only rank 0 writes. Each appended batch is flushed and fsync'ed, so a killed run
loses at most the line being written; reopening drops that partial line and
resumes after the last complete one.

A file may record what it holds the results of (its *identity*: task, split,
dataset, checkpoint, dtype, ...) in its first line, `{"results_of": {...}}`; it is
then only ever continued by a run of that identity.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Set, Tuple, Union

from ..atomic import fsync_dir, to_builtin

PathLike = Union[str, os.PathLike]
PlainKey = Union[int, str]
# One field's value, or the tuple of several fields' values (a composite key).
ResultKey = Union[PlainKey, Tuple[PlainKey, ...]]


HEADER = "results_of"


class DuplicateKeyError(ValueError):
    """A result for this key was already recorded."""


class IdentityMismatch(ValueError):
    """The file holds the results of something else than the run that would continue it."""


class ResultsWriter:
    """Append-only JSONL file of records, one per key.

    The key is one field (`question_id`) or several (NLVR2: `("identifier",
    "question_index")`, as a pair's sentences share its identifier); a composite
    key is the tuple of the fields' values. `done_keys` holds the keys already on
    disk (treat it as read-only); a caller resuming a run skips those items.
    """

    def __init__(self, path: PathLike, key: Union[str, Sequence[str]] = "question_id",
                 identity: Optional[Mapping[str, Any]] = None) -> None:
        self.path = Path(path)
        self.key = key
        self.done_keys: Set[ResultKey] = set()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        created = not self.path.exists()
        if not created:
            header, records, complete_bytes = _read(self.path)
            if identity is not None:
                _same_identity(self.path, header, records, identity)
            if self.path.stat().st_size > complete_bytes:
                # A crash cut the last line short: drop it so appends start on a line boundary.
                with open(self.path, "r+b") as fh:
                    fh.truncate(complete_bytes)
                    os.fsync(fh.fileno())
            for lineno, record in enumerate(records, 2 if header else 1):
                self._claim(self._key_of(record, f"{self.path}:{lineno}"))
        self._fh = open(self.path, "ab")
        if identity is not None and self._fh.tell() == 0:
            self._write([{HEADER: dict(identity)}])
        if created:
            fsync_dir(self.path.parent)

    def append(self, records: Iterable[Mapping[str, Any]]) -> None:
        """Write records durably; refuses (writing none of them) if any key is already recorded."""
        records = list(records)
        keys = [self._key_of(r, "record") for r in records]
        seen: Set[ResultKey] = set()
        for k in keys:
            if k in self.done_keys or k in seen:
                raise DuplicateKeyError(f"{self.key}={k!r} is already recorded in {self.path}")
            seen.add(k)
        if not records:
            return
        self._write(records)
        self.done_keys.update(keys)

    def _write(self, records: Sequence[Mapping[str, Any]]) -> None:
        self._fh.write("".join(_dumps(r) + "\n" for r in records).encode("utf-8"))
        self._fh.flush()
        os.fsync(self._fh.fileno())

    def close(self) -> None:
        self._fh.close()

    def __enter__(self) -> "ResultsWriter":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _key_of(self, record: Mapping[str, Any], where: str) -> ResultKey:
        if not isinstance(record, Mapping):
            raise TypeError(f"{where}: a result must be a mapping, got {type(record).__name__}")
        fields = (self.key,) if isinstance(self.key, str) else tuple(self.key)
        missing = [f for f in fields if f not in record]
        if missing:
            raise KeyError(f"{where}: result has no {missing[0]!r} field")
        values = tuple(_plain_key(record[f], where) for f in fields)
        return values[0] if isinstance(self.key, str) else values

    def _claim(self, key: ResultKey) -> None:
        if key in self.done_keys:
            raise DuplicateKeyError(f"{self.key}={key!r} appears twice in {self.path}")
        self.done_keys.add(key)


def read_results(path: PathLike) -> List[Dict[str, Any]]:
    """All complete records of a results file (a partial last line is ignored, not removed; the identity line is
    not a record)."""
    return _read(Path(path))[1]


def read_identity(path: PathLike) -> Optional[Dict[str, Any]]:
    """What the file records it holds the results of, or None."""
    return _read(Path(path))[0]


def _read(path: Path) -> Tuple[Optional[Dict[str, Any]], List[Dict[str, Any]], int]:
    """(identity or None, records, length in bytes of the complete lines)."""
    records, complete = _scan(path)
    if records and set(records[0]) == {HEADER}:
        return records[0][HEADER], records[1:], complete
    return None, records, complete


def _same_identity(path: Path, recorded: Optional[Mapping[str, Any]], records: List[Dict[str, Any]],
                   identity: Mapping[str, Any]) -> None:
    if recorded is None:
        if records:
            raise IdentityMismatch(f"{path} does not record what it holds the results of (written by an older "
                                   f"version)")
        return
    differ = [f"{k}: {_short(recorded.get(k))} recorded, {_short(identity.get(k))} now"
              for k in sorted(set(recorded) | set(identity)) if recorded.get(k) != identity.get(k)]
    if differ:
        raise IdentityMismatch(f"{path} holds the results of another run ({'; '.join(differ)})")


def _short(value: Any) -> str:
    if isinstance(value, Mapping):
        return "{" + ", ".join(f"{k} {_short(v)}" for k, v in value.items()) + "}"
    text = str(value)
    return text[:12] + "…" if len(text) > 16 and " " not in text else text


def _scan(path: Path) -> Tuple[List[Dict[str, Any]], int]:
    """Parse the complete lines of a JSONL file; return them and their length in bytes."""
    data = path.read_bytes()
    complete = data[: data.rfind(b"\n") + 1]
    records = []
    for lineno, line in enumerate(complete.split(b"\n")[:-1], 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except ValueError as err:
            # A complete line cannot come from an interrupted append: the file is damaged.
            raise ValueError(f"{path}:{lineno}: not a JSON record ({err})") from None
    return records, len(complete)


def _dumps(record: Mapping[str, Any]) -> str:
    # json escapes newlines inside strings, so one record is always one line.
    return json.dumps(record, ensure_ascii=False, default=to_builtin)


def _plain_key(value: Any, where: str) -> PlainKey:
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise TypeError(f"{where}: key must be an int or a str, got {value!r}")
    return value
