"""Click helpers shared by every command line of the engine (entry points, engine.data, tools)."""
from __future__ import annotations

from typing import Callable, Sequence


def option_group(options: Sequence[Callable[[Callable], Callable]]) -> Callable[[Callable], Callable]:
    """One decorator applying click options in the order listed (the order --help shows)."""

    def decorate(command: Callable) -> Callable:
        for option in reversed(options):
            command = option(command)
        return command

    return decorate
