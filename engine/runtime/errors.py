"""One exception type for everything the sharding tools refuse; the CLI prints it as one line."""
from __future__ import annotations

from pathlib import Path
from typing import Union


class ShardingError(Exception):
    """A refusal that names the file it is about: `PATH: problem`."""

    def __init__(self, path: Union[str, Path], problem: str) -> None:
        super().__init__(f"{path}: {problem}")
