"""A progress bar for long passes on rank 0's stderr: done of total, the rate, and the time left.

On a terminal it redraws one line in place; into a file or a pipe (logs, CI) it writes a line now and then, so
a log shows the rate without thousands of redraws.
"""
from __future__ import annotations

import sys
import time
from typing import Optional, TextIO

_WIDTH = 24  # characters of the bar itself


def duration(seconds: float) -> str:
    """H:MM:SS or M:SS."""
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


class Progress:
    """`update(n)` after each step; `close()` ends the line. The rate counts from construction."""

    def __init__(self, total: int, label: str, unit: str = "samples", stream: Optional[TextIO] = None,
                 every_s: Optional[float] = None) -> None:
        self.total, self.label, self.unit = total, label, unit
        self.stream = stream or sys.stderr
        self.live = bool(getattr(self.stream, "isatty", lambda: False)())
        self.every_s = every_s if every_s is not None else (0.2 if self.live else 30.0)
        self.done = 0
        self.began = time.perf_counter()
        self._shown = -self.every_s  # the first update is drawn
        self._written = -1  # `done` when last written

    def line(self) -> str:
        elapsed = max(time.perf_counter() - self.began, 1e-9)
        rate = self.done / elapsed
        filled = int(_WIDTH * self.done / self.total) if self.total else _WIDTH
        left = f"ETA {duration((self.total - self.done) / rate)}" if rate and self.done < self.total else \
            f"in {duration(elapsed)}"
        return (f"{self.label} [{'#' * filled}{'-' * (_WIDTH - filled)}] {self.done}/{self.total} {self.unit}, "
                f"{rate:.2f} {self.unit}/s, {left}")

    def update(self, n: int) -> None:
        self.done += n
        now = time.perf_counter() - self.began
        if self.total and (now - self._shown >= self.every_s or self.done >= self.total):
            self._shown = now
            self._write()

    def _write(self) -> None:
        self._written = self.done
        self.stream.write(("\r\x1b[K" if self.live else "") + self.line() + ("" if self.live else "\n"))
        self.stream.flush()

    def close(self) -> None:
        if not self.total:
            return  # nothing was to be done: no line
        if self._written != self.done:
            self._write()  # where it ended, also for a pass that had nothing to do
        if self.live:
            self.stream.write("\n")
        self.stream.flush()
