"""Where the shared golden data lives, found without a conftest: ../shared next to the repository."""
from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
GOLDEN = SHARED / "golden"


def needs(path: Path) -> pytest.MarkDecorator:
    """Skip a test, saying why, when shared data it reads is absent."""
    return pytest.mark.skipif(not path.exists(), reason=f"shared test data {path} is not present")
