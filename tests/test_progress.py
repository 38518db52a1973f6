"""The progress bar of long passes: done of total, the rate and the time left, redrawn on a terminal, a line now
and then in a log."""
from __future__ import annotations

import io

import pytest

from engine.tasks import progress
from engine.tasks.progress import Progress, duration


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    fake = Clock()
    monkeypatch.setattr(progress.time, "perf_counter", fake)
    return fake


def test_rate_and_time_left_on_a_terminal(clock: Clock) -> None:
    out = Terminal()
    bar = Progress(100, "embedding", "images", stream=out)
    clock.now += 10
    bar.update(25)  # 2.5 images/s, 75 left: 30 s
    assert out.getvalue().endswith("25/100 images, 2.50 images/s, ETA 0:30")
    assert out.getvalue().startswith("\r\x1b[K") and "[" + "#" * 6 + "-" * 18 + "]" in out.getvalue()
    clock.now += 30
    bar.update(75)
    bar.close()
    assert out.getvalue().endswith("100/100 images, 2.50 images/s, in 0:40\n")


def test_a_log_gets_a_line_at_most_every_30_s_and_where_it_stopped(clock: Clock) -> None:
    out = io.StringIO()
    bar = Progress(1000, "hashing", "files", stream=out)
    for _ in range(10):
        clock.now += 1
        bar.update(10)
    assert out.getvalue().count("\n") == 1  # the first update only
    clock.now += 30
    bar.update(10)
    bar.close()
    lines = out.getvalue().splitlines()
    assert len(lines) == 2 and lines[-1].startswith("hashing [") and "110/1000 files" in lines[-1]
    assert "2.75 files/s, ETA 5:24" in lines[-1]  # 110 in 40 s; 890 more at that rate take 323.6 s


def test_nothing_to_do_prints_nothing_and_durations_read_as_clocks(clock: Clock) -> None:
    out = Terminal()
    Progress(0, "embedding", stream=out).close()
    assert out.getvalue() == ""
    assert (duration(59.6), duration(61), duration(3600 * 2 + 61)) == ("1:00", "1:01", "2:01:01")
