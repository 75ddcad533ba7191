"""What the browser tests share: Debian's Chromium launched through Playwright (never
downloaded), and :class:`Session`, one page on one real server that records what went wrong
in it. Kept out of conftest.py so tests that use no browser never import Playwright; the
``browser`` fixture in conftest.py launches it from here.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

from bulkrunner.client import Client
from tests.conftest import ServerProcess

try:
    from playwright.sync_api import (
        Browser,
        BrowserContext,
        ConsoleMessage,
        Dialog,
        Page,
        Route,
        expect,
        sync_playwright,
    )
except ImportError:  # pragma: no cover - depends on the machine
    # Names the test modules import still exist, so they collect and their browser tests
    # skip (through the browser fixture) instead of failing to import.
    sync_playwright = None  # type: ignore[assignment]
    Browser = BrowserContext = ConsoleMessage = Dialog = Page = Route = Any  # type: ignore
    expect = None  # type: ignore[assignment]

CHROMIUM = Path("/usr/bin/chromium")
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]
TIMEOUT_MS = 20_000  # any one wait for the page

def launch() -> Iterator[Browser]:
    """Chromium for a module of tests (skips with a reason when it or Playwright is missing)."""
    if sync_playwright is None:
        pytest.skip("playwright is not installed (pip install playwright; never run "
                    "`playwright install`: the tests use /usr/bin/chromium)")
    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} is missing; install Debian's chromium package "
                    "(apt-get install chromium)")
    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=str(CHROMIUM), args=ARGS, timeout=60_000)
        yield b
        b.close()


class Session:
    """One browser context on one server: its page, and what went wrong inside it."""

    def __init__(self, context: BrowserContext, server: ServerProcess) -> None:
        self.context = context
        self.server = server
        self.page: Page = context.new_page()
        self.page.set_default_timeout(TIMEOUT_MS)
        expect.set_options(timeout=TIMEOUT_MS)
        self.js_errors: list[str] = []
        self.outside: list[str] = []
        self.page.on("pageerror", lambda e: self.js_errors.append(str(e)))
        self.page.on("console", self._console)
        context.route("**/*", self._only_our_server)

    def _console(self, msg: ConsoleMessage) -> None:
        # Chromium logs every 4xx as "Failed to load resource"; the tests cause some on purpose.
        if msg.type == "error" and not msg.text.startswith("Failed to load resource"):
            self.js_errors.append(msg.text)

    def _only_our_server(self, route: Route) -> None:
        # The page must work offline: anything not on our server is refused and recorded.
        url = route.request.url
        if urlsplit(url).netloc == urlsplit(self.server.url).netloc:
            route.continue_()
        else:
            self.outside.append(url)
            route.abort()

    def open(self, path: str) -> Page:
        self.page.goto(self.server.url + path)
        return self.page

    def client(self, token: str | None = None) -> Client:
        return Client(self.server.url, token)

    def check_clean(self) -> None:
        assert not self.outside, f"the page fetched from outside its server: {self.outside}"
        assert not self.js_errors, f"errors in the browser console: {self.js_errors}"


def state_badge(page: Page) -> Any:
    """The job page's state badge."""
    return page.locator("[data-field=state] .badge")


def session_factory(browser: Browser, serve: Any, tmp_path: Path
                    ) -> Iterator[Any]:
    """``session(**config)``: start a server with that config and open a page on it; every
    page is checked clean (no console errors, nothing fetched from outside) at the end."""
    from tests.conftest import toml_config

    made: list[Session] = []

    def make(**config: Any) -> Session:
        server = serve(toml_config(tmp_path, **config))
        s = Session(browser.new_context(viewport={"width": 1280, "height": 860},
                                        accept_downloads=True), server)
        made.append(s)
        return s

    yield make
    for s in made:
        s.context.close()
    for s in made:
        s.check_clean()


__all__ = ["ARGS", "CHROMIUM", "TIMEOUT_MS", "Browser", "BrowserContext", "Dialog", "Page",
           "Session", "expect", "launch", "session_factory",
           "state_badge"]
