"""Real-browser fixtures: Debian's Chromium via Playwright against the session's live server
(tests/live_server.py: a database built by `saescope build` over tiny-llama, a real uvicorn).

The database also holds hostile text: a label, and a second SAE written through the store's
writer whose vocabulary contains an HTML-injection token, so every page can be checked for it.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.live_server import REPO, Server

ARTIFACTS = REPO / "test-artifacts"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


@pytest.fixture(scope="session")
def server(live_server: Server) -> Server:
    return live_server


@pytest.fixture(scope="session")
def browser() -> Iterator[object]:
    from playwright.sync_api import sync_playwright

    executable = shutil.which("chromium")
    if executable is None:
        pytest.skip("Debian's chromium is not installed (make browser-deps)")
    with sync_playwright() as pw:
        chromium = pw.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


@dataclass
class PageGuard:
    """Collects what a page must never do: open a dialog, throw, or log a console error."""

    dialogs: list[str]
    errors: list[str]


@pytest.fixture
def page(browser, server: Server) -> Iterator[object]:
    context = browser.new_context(viewport={"width": 1400, "height": 900}, base_url=server.url)
    pg = context.new_page()
    guard = PageGuard(dialogs=[], errors=[])

    def on_dialog(dialog) -> None:  # noqa: ANN001
        guard.dialogs.append(dialog.message)
        dialog.dismiss()

    pg.on("dialog", on_dialog)
    pg.on("pageerror", lambda exc: guard.errors.append(f"pageerror: {exc}"))
    pg.on("console", lambda msg: guard.errors.append(f"console: {msg.text}")
          if msg.type == "error" and "404" not in msg.text else None)
    pg.guard = guard
    pg.set_default_timeout(20_000)
    yield pg
    context.close()
    assert guard.dialogs == [], f"a dialog opened: {guard.dialogs}"
    assert guard.errors == [], f"the page reported errors: {guard.errors}"


@pytest.fixture
def shot(page):  # noqa: ANN001, ANN201
    """shot(name): a full-page screenshot under test-artifacts/ (look at them)."""

    def take(name: str) -> Path:
        ARTIFACTS.mkdir(exist_ok=True)
        path = ARTIFACTS / f"{name}.png"
        page.mouse.move(0, 0)
        page.evaluate("window.scrollTo(0, 0)")
        page.screenshot(path=str(path), full_page=True)
        return path

    return take
