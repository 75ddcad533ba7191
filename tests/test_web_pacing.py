"""The web page and pacing, in Chromium against a real server: the pause and resume button,
why a job waits, its pace drawn as an inline SVG chart against the rate limit, and the
form's start time."""

from __future__ import annotations

import re
from collections.abc import Callable

import pytest

from tests.browser import Session, expect, state_badge
from tests.conftest import wait_for

pytestmark = pytest.mark.slow

RATED = """
[tasks.rated]
path = "tests.sample_tasks:add"
rate_limit = "4/s"
"""


def test_pause_resume_and_pace_on_the_job_page(session: Callable[..., Session]) -> None:
    s = session(max_workers=2, extra=RATED)
    with s.client() as c:
        job = c.submit("rated", {"a": 1}, items=[{"b": i} for i in range(40)])
        wait_for(lambda: c.job(job["id"])["items"]["succeeded"] >= 4, 20, "items to finish")
    page = s.open(f"/jobs/{job['id']}")
    expect(page.locator("[data-field=waiting]")).to_have_text(
        "Waiting: its task's rate limit is reached.")
    line = page.locator("[data-pace=line]")
    expect(line).to_contain_text(re.compile(r"items/s \(limit 4/s\)"))
    expect(line).to_contain_text("left")
    chart = page.locator("svg[data-pace=chart]")
    expect(chart.locator("rect.pace-bar").first).to_be_attached()
    expect(chart.locator("line.pace-limit")).to_have_count(1)
    # Nothing drawn leaves the chart's box.
    box = chart.bounding_box()
    assert box is not None and box["height"] == 80

    page.get_by_role("button", name="Pause job").click()
    expect(state_badge(page)).to_have_text("paused")
    expect(page.locator("#action-status")).to_contain_text("Paused")
    expect(page.locator("[data-field=waiting]")).to_contain_text("Paused")
    with s.client() as c:
        assert c.job(job["id"])["state"] == "paused"
    page.get_by_role("button", name="Resume job").click()
    expect(page.locator("#action-status")).to_have_text("Resumed.")
    expect(state_badge(page)).to_have_text(re.compile("running|succeeded"))
    expect(state_badge(page)).to_have_text("succeeded", timeout=30_000)
    expect(page.locator("#pause")).to_be_disabled()
    expect(page.locator("#pace")).to_be_hidden()


def test_the_form_starts_a_job_later(session: Callable[..., Session]) -> None:
    s = session(max_workers=1)
    page = s.open("/tasks/add")
    page.locator("#p-a").fill("2")
    page.locator("#advanced summary").click()
    page.locator("#opt-delay").fill("60")
    page.get_by_role("button", name=re.compile("Start|Submit")).click()
    page.wait_for_url(re.compile(r"/jobs/[0-9a-f]{32}$"))
    expect(state_badge(page)).to_have_text("queued")
    expect(page.locator("[data-field=waiting]")).to_contain_text("Waiting for its start time")
    expect(page.locator("[data-field=waiting]")).to_contain_text("runs at")
    ident = page.url.rsplit("/", 1)[1]
    with s.client() as c:
        job = c.job(ident)
        assert job["run_after"] is not None and job["state"] == "queued"
        c.cancel(ident)
