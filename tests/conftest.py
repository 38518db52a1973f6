import sys
from pathlib import Path

import pytest

# tests import their small helpers (_paths, _run) by name
sys.path.insert(0, str(Path(__file__).resolve().parent))


@pytest.fixture(autouse=True)
def _launch_read_per_test():
    """engine.runtime.launch reads RANK/WORLD_SIZE once per process; tests that set them (monkeypatch) run
    commands in-process, so each test reads them afresh."""
    from engine.runtime.launch import this_launch

    this_launch.cache_clear()
    yield
    this_launch.cache_clear()
