"""Click helpers shared by every command line of the engine (entry points, engine.data, tools)."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, List, Optional, Sequence, Type

import click

from .atomic import OutputPathError, writable_folder


def option_group(options: Sequence[Callable[[Callable], Callable]]) -> Callable[[Callable], Callable]:
    """One decorator applying click options in the order listed (the order --help shows)."""

    def decorate(command: Callable) -> Callable:
        for option in reversed(options):
            command = option(command)
        return command

    return decorate


class NumberList(click.ParamType):
    """A space-separated list of numbers of one type, each within [low, high] ("1 2 4")."""

    name = "numbers"

    def __init__(self, kind: Type, low: Optional[float] = None, high: Optional[float] = None) -> None:
        self.kind, self.low, self.high = kind, low, high

    def convert(self, value: Any, param: Optional[click.Parameter], ctx: Optional[click.Context]) -> List[Any]:
        if isinstance(value, list):
            return value
        try:
            numbers = [self.kind(v) for v in str(value).split()]
        except ValueError:
            self.fail(f"expected space-separated {self.kind.__name__}s, got {value!r}", param, ctx)
        bad = [n for n in numbers
               if (self.low is not None and n < self.low) or (self.high is not None and n > self.high)]
        if not numbers or bad:
            self.fail(f"expected {self.kind.__name__}s in [{self.low}, {self.high if self.high is not None else 'inf'}]"
                      f", got {value!r}", param, ctx)
        return numbers


def checked_folders(**folders: Path) -> None:
    """Refuse, in one line before any work, an output folder (given as option_name=path) that cannot be written."""
    for name, folder in folders.items():
        try:
            writable_folder(folder, f"--{name.replace('_', '-')}")
        except OutputPathError as exc:
            raise click.ClickException(str(exc)) from None
