import sys
from pathlib import Path

import pytest

# tests import their small helpers (_paths, _run) by name
sys.path.insert(0, str(Path(__file__).resolve().parent))


@pytest.fixture(scope="session")
def golden_runs(tmp_path_factory):
    """tp -> every golden case's shards and outputs at that tp (tests/_golden_runs.py), one launch per tp for the
    whole session."""
    from _golden_runs import golden_runs as runs

    return runs(tmp_path_factory.mktemp)


@pytest.fixture(scope="session")
def head_servers(tmp_path_factory):
    """A tp-1 server per head (VQA, NLVR2, retrieval with an index) and their shards (tests/_head_servers.py),
    shared by the modules that talk to them."""
    from _head_servers import head_servers as start

    yield from start(tmp_path_factory.mktemp)
