"""The system Chromium driven through Playwright, for the tests of the server's pages.

Playwright launches Debian's /usr/bin/chromium (.ci/run installs it); it never downloads a browser of its own.
A test skips, saying why, when either is missing.
"""
from __future__ import annotations

import shutil
from contextlib import contextmanager
from typing import Any, Iterator

import pytest


@contextmanager
def chromium_page() -> Iterator[Any]:
    """A new page (playwright.sync_api.Page) of a headless system Chromium, closed with the browser after."""
    sync_api = pytest.importorskip("playwright.sync_api", reason="Playwright is in the test extra (make install)")
    executable = shutil.which("chromium")
    if executable is None:
        pytest.skip("no chromium on this machine (.ci/run installs Debian's `chromium` package)")
    with sync_api.sync_playwright() as playwright:
        # --no-sandbox: Chromium refuses to run as root with its sandbox (CI runs as root)
        browser = playwright.chromium.launch(executable_path=executable, args=["--no-sandbox"])
        try:
            yield browser.new_page()
        finally:
            browser.close()
