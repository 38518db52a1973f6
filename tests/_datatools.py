"""Helpers shared by the data tests: images, raw files, arrow tables, CLI failures."""
from __future__ import annotations

import io
import subprocess
from pathlib import Path

import pyarrow as pa
from PIL import Image


def image_bytes(color: tuple, size: tuple = (24, 16), fmt: str = "JPEG") -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format=fmt)
    return buffer.getvalue()


def write_file(path: Path, data) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(data, bytes):
        path.write_bytes(data)
    else:
        path.write_text(data, encoding="utf-8")
    return path


def read_arrow(path: Path) -> pa.Table:
    return pa.ipc.open_file(pa.memory_map(str(path), "r")).read_all()


def rows_by(table: pa.Table, key: str) -> dict:
    return {row[key]: row for row in table.to_pylist()}


def assert_one_line_error(result: subprocess.CompletedProcess, *fragments: str) -> None:
    """A failed CLI run: non-zero exit and one error line (no traceback) naming `fragments`."""
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1, result.stderr
    assert "Traceback" not in result.stderr
    for fragment in fragments:
        assert fragment in errors[0], errors[0]
