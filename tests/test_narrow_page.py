"""On a phone's narrow screen the job page shows 20 items a page instead of 50 (each item is
a card there, and 50 cards are a long scroll), for a finished job (drawn by the server, cut
by the page's script) and for a running one (whose refreshes ask for 20).

Chromium with a phone's viewport against a real server (skipped like the other browser tests
when Chromium or Playwright is missing).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest

from bulkrunner.server.web.views import ITEMS_PAGE, ITEMS_PAGE_NARROW
from tests.browser import Session, expect, state_badge
from tests.conftest import ServerProcess, toml_config, wait_job

PHONE = {"width": 390, "height": 844}


@pytest.fixture
def phone(browser: Any, serve: Callable[..., ServerProcess], tmp_path: Path
          ) -> Iterator[Callable[[dict[str, int]], Session]]:
    """Factory: one server, and a page on it with the given viewport; checked clean after."""
    server = serve(toml_config(tmp_path, max_workers=1))
    made: list[Session] = []

    def make(viewport: dict[str, int]) -> Session:
        s = Session(browser.new_context(viewport=viewport), server)
        made.append(s)
        return s

    yield make
    for s in made:
        s.context.close()
    for s in made:
        s.check_clean()


def _indexes(page: Any) -> list[int]:
    cells = page.locator('.items-table tbody tr td[data-label="#"]').all_inner_texts()
    return [int(c) for c in cells]


def test_a_phone_pages_a_finished_job_by_twenty(phone: Callable[..., Session]) -> None:
    assert (ITEMS_PAGE_NARROW, ITEMS_PAGE) == (20, 50)
    s = phone(PHONE)
    with s.client() as c:
        job = c.submit("add", items=[{"a": i} for i in range(45)])
        wait_job(c, job["id"], 30)
    page = s.open(f"/jobs/{job['id']}")
    expect(state_badge(page)).to_have_text("succeeded")
    rows = page.locator(".items-table tbody tr")
    expect(rows).to_have_count(20)
    assert _indexes(page) == list(range(20))
    nxt = page.get_by_role("link", name="Next items →")
    expect(nxt).to_be_visible()
    nxt.click()
    page.wait_for_url(re.compile(r"after=19$"))
    expect(rows).to_have_count(20)
    assert _indexes(page) == list(range(20, 40))
    nxt.click()
    page.wait_for_url(re.compile(r"after=39$"))
    expect(rows).to_have_count(5)
    assert _indexes(page) == list(range(40, 45))
    expect(nxt).to_be_hidden()

    # The state filter keeps to the short pages too.
    page = s.open(f"/jobs/{job['id']}?state=succeeded")
    expect(rows).to_have_count(20)
    expect(nxt).to_have_attribute("href", re.compile(r"state=succeeded&after=19$"))


def test_a_running_job_asks_for_twenty_on_a_phone_and_fifty_on_a_desk(
        phone: Callable[..., Session]) -> None:
    narrow, wide = phone(PHONE), phone({"width": 1280, "height": 860})
    with narrow.client() as c:
        # One worker: item 0 runs for a while, the other 59 wait, so the page keeps polling.
        job = c.submit("slow", items=[{"seconds": 20}] + [{"seconds": 0}] * 59)
    items_path = f"/jobs/{job['id']}/items"

    def items_request(request: Any) -> bool:
        return urlsplit(str(request.url)).path.endswith(items_path)

    for s, want in ((narrow, "20"), (wide, "50")):
        # The first refresh and the next one (a second later) ask for a page of `want`.
        for _ in range(2):
            with s.page.expect_request(items_request) as asked:
                if s.page.url == "about:blank":
                    s.open(f"/jobs/{job['id']}")
            query = parse_qs(urlsplit(asked.value.url).query)
            assert query.get("limit") == [want], asked.value.url
        expect(state_badge(s.page)).to_have_text("running")
        expect(s.page.locator(".items-table tbody tr")).to_have_count(int(want))
    with narrow.client() as c:
        c.cancel(job["id"])
