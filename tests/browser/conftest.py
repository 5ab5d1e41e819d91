"""Browser tests: the real pages in Debian's headless Chromium, driven by Playwright.

Playwright never downloads a browser here: it launches /usr/bin/chromium (the `chromium`
package). Screenshots of each page are kept under tests/browser/artifacts/ (gitignored).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from django.db import connections

from tests.support.cluster import Cluster

CHROMIUM = os.environ.get("SWITCHYARD_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
]
ARTIFACTS = Path(__file__).resolve().parent / "artifacts"


@pytest.fixture
def cluster(transactional_db, tmp_path, ledger):
    harness = Cluster(tmp_path, ledger)
    try:
        yield harness
    finally:
        harness.stop_all()


@pytest.fixture
def browser(monkeypatch):
    # Playwright's sync API keeps an event loop running in this thread; the test's own ORM
    # calls between page actions are still sequential, which is what Django's guard is for.
    monkeypatch.setenv("DJANGO_ALLOW_ASYNC_UNSAFE", "true")
    if not Path(CHROMIUM).exists():
        pytest.fail(f"{CHROMIUM} is missing: install Debian's chromium (apt-get install chromium)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield chromium
        finally:
            chromium.close()
            # The test's ORM calls ran while Playwright's loop was running, on a connection
            # of that context: close it here, or it outlives the test database.
            connections.close_all()


@pytest.fixture
def screenshot():
    """`screenshot(page, name)` saves a full-page PNG as tests/browser/artifacts/<name>.png."""
    ARTIFACTS.mkdir(exist_ok=True)

    def take(page, name: str) -> Path:
        path = ARTIFACTS / f"{name}.png"
        page.screenshot(path=str(path), full_page=True)
        return path

    return take
