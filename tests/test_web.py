"""The web page: in a real browser (headless Debian Chromium driven by Playwright), plus
its session, redirect and header rules through the Flask test client.

Browser tests run against a real ``bulkrunner serve`` process. The browser is never
downloaded: Playwright launches ``/usr/bin/chromium`` (apt package ``chromium``), and those
tests skip with a reason when it or Playwright is missing.

Two tests take the README's screenshots (``job.png``, ``jobs.png``). They go to a temp dir,
so a test run never changes a tracked file; to refresh the README's images on purpose, name
the folder (relative to the repository root) in ``BULKRUNNER_SCREENSHOTS``::

    BULKRUNNER_SCREENSHOTS=docs/screenshots pytest tests/test_web.py
"""

from __future__ import annotations

import csv
import json
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

from bulkrunner.server.web.auth import COOKIE, SESSION_SECONDS, Sessions
from bulkrunner.server.web.fields import form_fields
from tests.browser import TIMEOUT_MS, Page, Session, expect, state_badge
from tests.conftest import LOG_TASKS, ROOT, ServerProcess, wait_for

LOG_POLL_MS = 1000         # how often the log panel polls a running item (job.js LOG_MS)
TOKEN = "web-test-token-1f2e3d4c5b6a"

Serve = Callable[..., ServerProcess]


def _job_id(page: Page) -> str:
    page.wait_for_url(re.compile(r"/jobs/[0-9a-f]{32}$"))
    return page.url.rsplit("/", 1)[1]


@pytest.fixture
def shots(tmp_path: Path) -> Path:
    """Where screenshots go: a temp dir, or $BULKRUNNER_SCREENSHOTS (relative to the
    repository root), e.g. ``BULKRUNNER_SCREENSHOTS=docs/screenshots`` to refresh the
    README's images on purpose."""
    chosen = os.environ.get("BULKRUNNER_SCREENSHOTS")
    folder = ROOT / chosen if chosen else tmp_path / "screenshots"
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def _screenshot(page: Page, folder: Path, name: str) -> None:
    path = folder / name
    page.screenshot(path=str(path), full_page=False)
    assert path.stat().st_size > 0, f"the screenshot {path} is empty"


# ---------------------------------------------------------------------------- tests
def test_form_submit_and_watch_the_job_succeed(session: Callable[..., Session]) -> None:
    s = session()
    page = s.open("/")
    expect(page.get_by_role("heading", name="Jobs")).to_be_visible()
    page.get_by_role("link", name="New job").click()
    page.get_by_role("link", name="tally").click()
    expect(page.locator("#task-doc")).to_contain_text("Count to n")
    expect(page.get_by_label("n required")).to_have_attribute("aria-required", "true")
    expect(page.get_by_label("delay")).to_have_value("0.25")
    page.get_by_label("n required").fill("8")
    page.get_by_label("loud").check()
    page.get_by_label("delay").fill("0.3")
    page.get_by_role("button", name="Start job").click()

    job_id = _job_id(page)
    page.evaluate("window.__sameDocument = true")
    expect(state_badge(page)).to_have_text(re.compile("queued|running"))
    expect(page.locator("[data-field=message]")).to_contain_text(re.compile(r"counted \d of 8"))
    expect(state_badge(page)).to_have_text("succeeded", timeout=30_000)
    assert page.evaluate("window.__sameDocument") is True, "the job page reloaded itself"
    result = page.locator("#outcome pre.result")
    expect(result).to_contain_text('"sum": 36')
    expect(result).to_contain_text('"loud": true')
    expect(page.locator("[data-count=succeeded]")).to_have_text("1")
    expect(page.locator("#cancel")).to_be_disabled()
    with s.client() as c:
        assert c.job(job_id)["params"] == {"n": 8, "loud": True, "delay": 0.3}


def test_typed_form_shows_a_422_beside_its_field(session: Callable[..., Session]) -> None:
    s = session()
    page = s.open("/tasks/typed")
    # Every control has a label, and each kind of param gets its own widget.
    for control in page.locator("form input, form select, form textarea").all():
        cid = control.get_attribute("id")
        assert cid and page.locator(f"label[for={cid}]").count() == 1, f"no label for {cid}"
    expect(page.get_by_label("n required")).to_have_attribute("step", "1")
    expect(page.get_by_label("ratio required")).to_have_attribute("step", "any")
    expect(page.get_by_label("flag required")).to_have_attribute("type", "checkbox")
    expect(page.get_by_label("mode")).to_have_value('"fast"')
    expect(page.get_by_label("name")).to_have_value("x")

    page.get_by_label("n required").fill("2.5")
    page.get_by_label("ratio required").fill("0.5")
    page.get_by_role("button", name="Start job").click()
    err = page.locator("#err-p-n")
    expect(err).to_be_visible()
    expect(err).to_contain_text("must be an integer")
    expect(page.get_by_label("n required")).to_have_attribute("aria-invalid", "true")
    expect(page.locator("#form-error")).to_contain_text("not started")
    expect(page.locator("#err-p-ratio")).to_be_hidden()

    page.get_by_label("n required").fill("4")
    page.get_by_label("flag required").check()
    page.get_by_label("mode").select_option(label="slow")
    page.get_by_label("color").select_option(label="green")
    page.get_by_label("tags").fill('["a", "b"]')
    page.get_by_role("button", name="Start job").click()
    _job_id(page)
    expect(state_badge(page)).to_have_text("succeeded")
    result = json.loads(page.locator("#outcome pre.result").inner_text())
    assert result == {"n": 4, "ratio": 0.5, "flag": True, "name": "x", "mode": "slow",
                      "color": "green", "tags": ["a", "b"]}


def test_free_form_params_for_a_kwargs_task(session: Callable[..., Session]) -> None:
    s = session()
    page = s.open("/tasks/echo")
    page.get_by_text("Job options", exact=True).click()
    page.get_by_label("More params (JSON object)").fill("[1, 2]")
    page.get_by_role("button", name="Start job").click()
    expect(page.locator("#err-opt-extra")).to_contain_text("must be a JSON object")
    page.get_by_label("More params (JSON object)").fill('{"city": "Oslo", "n": 3}')
    page.get_by_label("Priority").fill("5")
    page.get_by_role("button", name="Start job").click()
    job_id = _job_id(page)
    expect(state_badge(page)).to_have_text("succeeded")
    assert json.loads(page.locator("#outcome pre.result").inner_text()) == {"city": "Oslo",
                                                                            "n": 3}
    with s.client() as c:
        assert c.job(job_id)["priority"] == 5


def test_upload_errors_show_by_the_upload(session: Callable[..., Session],
                                          tmp_path: Path) -> None:
    s = session()
    bad = tmp_path / "bad.csv"
    bad.write_text("x\n1\nnot-a-number\n3\n")
    page = s.open("/tasks/square")
    page.get_by_label("CSV or JSON Lines file, one item per row").set_input_files(bad)
    page.get_by_role("button", name="Start job").click()
    err = page.locator("#err-items")
    expect(err).to_be_visible()
    expect(err).to_contain_text("row 3")
    expect(page.locator("#items-file")).to_have_attribute("aria-invalid", "true")
    assert "/tasks/square" in page.url


def test_upload_csv_and_download_results(session: Callable[..., Session],
                                         tmp_path: Path, shots: Path) -> None:
    """Also saves the README's job.png into ``shots`` (a temp dir unless
    $BULKRUNNER_SCREENSHOTS is set, e.g. to docs/screenshots)."""
    s = session(max_workers=4)
    items = tmp_path / "numbers.csv"
    items.write_text("x\n" + "".join(f"{i}\n" for i in range(50)))
    page = s.open("/tasks/square")
    page.get_by_label("CSV or JSON Lines file, one item per row").set_input_files(items)
    page.get_by_role("button", name="Start job").click()
    job_id = _job_id(page)
    expect(state_badge(page)).to_have_text("succeeded", timeout=30_000)
    expect(page.locator("[data-count=total]")).to_have_text("50")
    expect(page.locator("[data-count=succeeded]")).to_have_text("50")
    expect(page.locator(".items-table tbody tr")).to_have_count(50)
    expect(page.locator(".items-table tbody tr").nth(7)).to_contain_text("49")
    _screenshot(page, shots, "job.png")

    with page.expect_download() as info:
        page.get_by_role("link", name="Results CSV").click()
    download = info.value
    assert download.suggested_filename == f"{job_id}.csv"
    with open(download.path(), newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 50
    assert [(int(r["x"]), int(r["result"]), r["state"]) for r in rows] == [
        (i, i * i, "succeeded") for i in range(50)]

    with page.expect_download() as info:
        page.get_by_role("link", name="Results JSON Lines").click()
    lines = Path(info.value.path()).read_text().splitlines()
    assert len(lines) == 50 and json.loads(lines[3])["result"] == 9


def test_failing_job_shows_its_traceback_and_retries(session: Callable[..., Session]) -> None:
    s = session()
    page = s.open("/tasks/square")
    page.get_by_label("x required").fill("-3")
    page.get_by_role("button", name="Start job").click()
    _job_id(page)
    expect(state_badge(page)).to_have_text("failed")
    box = page.locator("#outcome .error-box")
    expect(box).to_contain_text("ValueError: negative: -3")
    trace = box.locator("details.traceback pre")
    expect(trace).to_be_hidden()
    box.locator("summary", has_text="Traceback").click()
    expect(trace).to_be_visible()
    expect(trace).to_contain_text("Traceback (most recent call last)")
    expect(trace).to_contain_text('raise ValueError(f"negative: {x}")')
    expect(page.locator(".items-table tbody tr").first).to_contain_text("ValueError")

    page.get_by_role("button", name="Retry failed items").click()
    expect(page.locator("#action-status")).to_contain_text("queued again")
    expect(state_badge(page)).to_have_text("failed")


def test_cancel_a_queued_job_and_the_jobs_list(session: Callable[..., Session],
                                               shots: Path) -> None:
    """Also saves the README's jobs.png into ``shots`` (a temp dir unless
    $BULKRUNNER_SCREENSHOTS is set, e.g. to docs/screenshots)."""
    s = session(max_workers=1)
    page = s.open("/")
    expect(page.locator(".empty")).to_be_visible()
    with s.client() as c:
        done = c.submit("add", {"a": 2, "b": 3})
        c.wait(done["id"], timeout=30)
        # The list updates by itself: jobs submitted now appear without a reload.
        expect(page.locator("tbody tr")).to_have_count(1)
        failed = c.submit("square", {"x": -1})
        c.wait(failed["id"], timeout=30)
        busy = c.submit("tally", {"n": 80, "delay": 0.25})
        wait_for(lambda: c.job(busy["id"])["state"] == "running", 30,
                 "the tally job did not start")
        victim = c.submit("square", {"x": 2})
        c.submit("progress", {"steps": 3})
    expect(page.locator("tbody tr")).to_have_count(5)
    expect(page.locator("tbody tr").first).to_contain_text("progress")

    page.get_by_role("link", name=victim["id"][:8]).click()
    expect(state_badge(page)).to_have_text("queued")
    page.once("dialog", lambda d: d.accept())  # "Cancel this job? 1 item has not finished…"
    page.get_by_role("button", name="Cancel job").click()
    expect(state_badge(page)).to_have_text("cancelled")
    expect(page.locator("#action-status")).to_have_text("Cancelled.")
    expect(page.get_by_role("button", name="Cancel job")).to_be_disabled()
    expect(page.get_by_role("button", name="Retry cancelled items")).to_be_enabled()
    with s.client() as c:
        assert c.job(victim["id"])["state"] == "cancelled"
        assert c.job(busy["id"])["state"] == "running"

    page.get_by_role("link", name="Jobs").click()
    expect(page.locator("tbody tr").nth(1)).to_contain_text("cancelled")
    expect(page.locator("tbody tr").nth(2)).to_contain_text("running")
    expect(page.locator("tbody tr").nth(2).locator("progress")).to_have_count(1)
    page.wait_for_function("() => document.querySelector('tbody tr:nth-child(3) progress')"
                           ".value >= 0.1")
    _screenshot(page, shots, "jobs.png")

    page.get_by_label("State").select_option("cancelled")
    page.wait_for_url(re.compile(r"state=cancelled"))
    expect(page.locator("tbody tr")).to_have_count(1)
    expect(page.locator("tbody tr")).to_contain_text(victim["id"][:8])
    page.get_by_label("Task").select_option("add")
    expect(page.locator(".empty")).to_contain_text("match these filters")
    with s.client() as c:
        c.cancel(busy["id"])


def test_jobs_list_pages_with_the_next_cursor(session: Callable[..., Session]) -> None:
    s = session()
    with s.client() as c:
        ids = [c.submit("noop")["id"] for _ in range(23)]
    page = s.open("/")
    rows = page.locator("tbody tr")
    expect(rows).to_have_count(20)
    expect(rows.first).to_contain_text(ids[-1][:8])
    page.get_by_role("link", name="Older →").click()
    expect(rows).to_have_count(3)
    expect(rows.last).to_contain_text(ids[0][:8])
    expect(page.get_by_role("link", name="Older →")).to_be_hidden()
    page.get_by_role("link", name="← Newest").click()
    expect(rows).to_have_count(20)


def test_token_login_session_and_csrf(session: Callable[..., Session]) -> None:
    s = session(server=f'token = "{TOKEN}"')
    page = s.open("/tasks/tally")
    page.wait_for_url(re.compile(r"/login\?next="))
    page.get_by_label("API token").fill("not-the-token")
    page.get_by_role("button", name="Log in").click()
    expect(page.get_by_role("alert")).to_contain_text("not right")
    page.get_by_label("API token").fill(TOKEN)
    page.get_by_role("button", name="Log in").click()
    page.wait_for_url(re.compile(r"/tasks/tally$"))

    cookie = next(c for c in s.context.cookies() if c["name"] == "bulkrunner_session")
    assert cookie["httpOnly"] and cookie["sameSite"] == "Strict"
    assert TOKEN not in page.content()
    assert TOKEN not in cookie["value"]

    page.get_by_label("n required").fill("2")
    page.get_by_label("delay").fill("0.05")
    page.get_by_role("button", name="Start job").click()
    job_id = _job_id(page)
    expect(state_badge(page)).to_have_text("succeeded")
    assert TOKEN not in page.content()

    # The cookie alone reads the API, but a state-changing call also needs the CSRF token.
    api = page.request
    assert api.get(f"{s.server.url}/api/v1/jobs/{job_id}").status == 200
    assert api.post(f"{s.server.url}/api/v1/jobs/{job_id}/retry").status == 401
    csrf = page.locator("meta[name=csrf-token]").get_attribute("content")
    assert csrf
    assert api.post(f"{s.server.url}/api/v1/jobs", data={"task": "noop"},
                    headers={"X-CSRF-Token": csrf}).status == 202
    assert api.post(f"{s.server.url}/api/v1/jobs", data={"task": "noop"},
                    headers={"X-CSRF-Token": csrf[::-1]}).status == 401

    page.get_by_role("button", name="Log out").click()
    page.wait_for_url(re.compile(r"/login"))
    page.goto(s.server.url + "/")
    page.wait_for_url(re.compile(r"/login\?next=/"))
    assert api.get(f"{s.server.url}/api/v1/jobs").status == 401


def test_phone_width_is_readable(session: Callable[..., Session]) -> None:
    s = session()
    with s.client() as c:
        job = c.submit("square", {"x": 5})
        c.wait(job["id"], timeout=30)
    page = s.open("/")
    page.set_viewport_size({"width": 390, "height": 800})
    expect(page.locator("tbody tr")).to_have_count(1)
    overflow = page.evaluate("document.documentElement.scrollWidth - window.innerWidth")
    assert overflow <= 0, f"the jobs list is {overflow} px wider than a phone screen"
    page.goto(f"{s.server.url}/jobs/{job['id']}")
    expect(state_badge(page)).to_have_text("succeeded")
    overflow = page.evaluate("document.documentElement.scrollWidth - window.innerWidth")
    assert overflow <= 0, f"the job page is {overflow} px wider than a phone screen"


# ---------------------------------------------------------------------------- no browser
def test_session_cookie_is_signed_bound_to_the_token_and_expires() -> None:
    sessions = Sessions()
    cookie = sessions.issue("tok", now=1000)
    nonce = sessions.check(cookie, "tok", now=1001)
    assert nonce and "tok" not in cookie
    assert sessions.check(cookie, "other-token", now=1001) is None
    assert sessions.check(cookie[:-1] + ("0" if cookie[-1] != "0" else "1"), "tok",
                          now=1001) is None
    assert sessions.check(cookie, "tok", now=1000 + SESSION_SECONDS + 1) is None
    assert Sessions().check(cookie, "tok", now=1001) is None  # another process's secret
    for junk in ("", "a.b", "a..c", "a.12x.c", "..."):
        assert sessions.check(junk, "tok") is None
    assert sessions.csrf(nonce) != sessions.csrf(nonce + "x")


def test_login_redirects_only_within_this_site(app_factory: Callable[..., Any]) -> None:
    client = app_factory(server=f'token = "{TOKEN}"').test_client()
    for target in ("//evil.example/x", "https://evil.example/", "/\\evil.example", "jobs"):
        resp = client.post("/login", data={"token": TOKEN, "next": target})
        assert resp.status_code == 302 and resp.headers["Location"] == "/", target
        client.delete_cookie(COOKIE)
    resp = client.post("/login", data={"token": TOKEN, "next": "/tasks?x=1"})
    assert resp.headers["Location"] == "/tasks?x=1"


def test_pages_redirect_to_login_and_api_wants_a_token(app_factory: Callable[..., Any]) -> None:
    client = app_factory(server=f'token = "{TOKEN}"').test_client()
    resp = client.get("/jobs/abc?state=failed")
    assert resp.status_code == 302
    assert resp.headers["Location"] == "/login?next=/jobs/abc?state%3Dfailed"
    assert client.get("/api/v1/jobs").status_code == 401
    with client.get("/assets/style.css") as css:
        assert css.status_code == 200  # the login page needs its style
    login = client.get("/login")
    assert login.status_code == 200 and TOKEN not in login.get_data(as_text=True)


def test_pages_send_a_strict_content_security_policy(app_factory: Callable[..., Any]) -> None:
    client = app_factory().test_client()
    resp = client.get("/")
    assert resp.status_code == 200
    assert "script-src 'self'" in resp.headers["Content-Security-Policy"]
    assert resp.headers["Cache-Control"] == "no-store"
    for path in ("/jobs/0123456789abcdef", "/tasks/no-such-task"):
        page = client.get(path)
        assert page.status_code == 404 and page.mimetype == "text/html", path


def test_form_fields_follow_the_param_types() -> None:
    fields = {f.name: f for f in form_fields([
        {"name": "n", "type": "int", "required": True, "default": None},
        {"name": "ratio", "type": "float", "required": False, "default": 0.5},
        {"name": "flag", "type": "bool", "required": False, "default": True},
        {"name": "mode", "type": "str", "required": False, "default": "fast",
         "choices": ["fast", "slow"]},
        {"name": "level", "type": "int", "required": True, "default": None, "choices": [1, 2]},
        {"name": "tags", "type": "list", "required": False, "default": None,
         "item_type": "str", "nullable": True},
        {"name": "name", "type": "str", "required": False, "default": "x"},
    ])}
    assert (fields["n"].kind, fields["n"].step, fields["n"].value) == ("number", "1", "")
    assert (fields["ratio"].step, fields["ratio"].value) == ("any", "0.5")
    assert fields["flag"].kind == "checkbox" and fields["flag"].checked
    assert [(o.value, o.selected) for o in fields["mode"].options] == [
        ('"fast"', True), ('"slow"', False)]
    assert [o.value for o in fields["level"].options] == ["", "1", "2"]
    assert fields["tags"].kind == "json" and "JSON list of text" in fields["tags"].help
    assert (fields["name"].kind, fields["name"].value) == ("text", "x")


# ---------------------------------------------------------------------------- item logs
WORKER = re.compile(r"^\S+:\d+$")  # host:pid on the thread and process executors


def _log_requests(page: Page) -> list[tuple[str, int]]:
    """(url, status) of every answer the page gets from an item-log endpoint, as they come."""
    seen: list[tuple[str, int]] = []

    def record(resp: Any) -> None:
        if re.search(r"/items/\d+/log$", urlsplit(resp.url).path):
            seen.append((resp.url, resp.status))

    page.on("response", record)
    return seen


# Counts the page's fetches of item logs (an init script is not bound by the page's CSP).
COUNT_LOG_FETCHES = r"""(() => {
  const realFetch = window.fetch;
  window.__logFetches = 0;
  window.fetch = function (input, init) {
    if (/\/items\/\d+\/log(\?|$)/.test(String(input))) window.__logFetches += 1;
    return realFetch.apply(this, arguments);
  };
})();"""


def _item_row(page: Page, index: int) -> Any:
    return page.locator(f'.items-table tbody tr[data-key="{index}"]')


def test_item_log_panel_follows_what_the_item_prints(session: Callable[..., Session],
                                                     tmp_path: Path) -> None:
    s = session(tasks=LOG_TASKS)
    gate = tmp_path / "gate"
    with s.client() as c:
        job = c.submit("print_until", {"path": str(gate)},
                       items=[{"name": "first"}, {"name": "second"}])
    # The page's timers run on Playwright's clock (in real time until told otherwise), so
    # the test can later run them ahead instead of sleeping through a polling interval.
    s.page.clock.install()
    s.page.add_init_script(COUNT_LOG_FETCHES)
    page = s.open(f"/jobs/{job['id']}")
    answers = _log_requests(page)

    # Open item 0's log while it runs: the line printed so far shows, and the panel follows.
    page.get_by_role("button", name="Log of item 0").click()
    dialog = page.get_by_role("dialog", name="Log of item 0")
    expect(dialog, "the log dialog did not open").to_be_visible(timeout=TIMEOUT_MS)
    text = dialog.locator("pre")
    status = dialog.get_by_role("status")
    expect(text, "the line printed before opening is not shown").to_contain_text(
        "first before", timeout=TIMEOUT_MS)
    expect(status, "the panel does not say it follows the running item").to_contain_text(
        "Following", timeout=TIMEOUT_MS)
    expect(text, "the second line showed before the task printed it").not_to_contain_text(
        "first after", timeout=TIMEOUT_MS)
    asked = len(answers)

    gate.touch()  # the task now prints its second line, while the panel is open
    expect(text, "a line printed while watching did not appear").to_contain_text(
        "first after", timeout=TIMEOUT_MS)
    expect(status, "the panel did not notice the item finished").to_contain_text(
        "Item succeeded", timeout=TIMEOUT_MS)
    assert text.text_content() == "first before\nfirst after\n", "text repeated or lost"
    assert text.locator("*").count() == 0, "the log was inserted as HTML"
    assert len(answers) > asked, "the panel did not poll after it opened"
    assert all(code == 200 for _, code in answers), answers
    assert any(re.search(r"[?&]after=[1-9]\d*", url) for url, _ in answers), (
        f"the panel never asked for only the new text: {answers}")
    settled = len(answers)
    fetched = page.evaluate("window.__logFetches")
    assert fetched >= settled, f"the fetch counter missed log requests: {fetched}, {answers}"
    # Fire every timer due in the next two polling intervals now: a panel that still
    # polled the finished item would fetch its log again (fetch is called synchronously
    # from the timer, so the count is up before run_for returns).
    page.clock.run_for(2 * LOG_POLL_MS + 100)
    assert page.evaluate("window.__logFetches") == fetched, (
        f"the panel kept polling a finished item: {answers}")
    assert len(answers) == settled, f"the panel kept polling a finished item: {answers}"

    # Closing gives the focus back to the row's button (the row was redrawn meanwhile).
    dialog.get_by_role("button", name="Close").click()
    expect(dialog, "the log dialog did not close").to_be_hidden(timeout=TIMEOUT_MS)
    expect(page.get_by_role("button", name="Log of item 0"),
           "focus did not return to the Log button").to_be_focused(timeout=TIMEOUT_MS)

    # Each item has its own log; Escape closes the dialog too.
    page.get_by_role("button", name="Log of item 1").click()
    other = page.get_by_role("dialog", name="Log of item 1")
    expect(other.locator("pre"), "item 1's log is wrong").to_have_text(
        re.compile(r"^second before\nsecond after\n$"), timeout=TIMEOUT_MS)
    page.keyboard.press("Escape")
    expect(other, "Escape did not close the log dialog").to_be_hidden(timeout=TIMEOUT_MS)

    # The worker column names the worker that ran each finished item.
    expect(state_badge(page), "the job did not finish").to_have_text(
        "succeeded", timeout=TIMEOUT_MS)
    with s.client() as c:
        workers = {it["index"]: it["worker"] for it in c.items(job["id"])["items"]}
    for index in (0, 1):
        cell = _item_row(page, index).locator("td[data-label=Worker]")
        expect(cell, f"item {index} shows no worker").to_have_text(WORKER, timeout=TIMEOUT_MS)
        assert cell.inner_text().strip() == workers[index]
    expect(page.locator(".items-table thead"), "no Worker heading").to_contain_text(
        "Worker", timeout=TIMEOUT_MS)


def test_item_log_with_a_token_uses_the_session(session: Callable[..., Session]) -> None:
    s = session(server=f'token = "{TOKEN}"', tasks=LOG_TASKS)
    name = "<b>bold</b>"
    with s.client(TOKEN) as c:
        job = c.submit("chatter", {"name": name, "lines": 2, "delay": 0})
        odd = c.submit("odd_text")
        c.wait(job["id"], timeout=30)
        c.wait(odd["id"], timeout=30)
    page = s.open(f"/jobs/{job['id']}")
    page.wait_for_url(re.compile(r"/login\?next="), timeout=TIMEOUT_MS)
    page.get_by_label("API token").fill(TOKEN)
    page.get_by_role("button", name="Log in").click()
    page.wait_for_url(re.compile(rf"/jobs/{job['id']}$"), timeout=TIMEOUT_MS)
    answers = _log_requests(page)

    expect(_item_row(page, 0).locator("td[data-label=Worker]"),
           "the finished item shows no worker").to_have_text(WORKER, timeout=TIMEOUT_MS)
    page.get_by_role("button", name="Log of item 0").click()
    dialog = page.get_by_role("dialog", name="Log of item 0")
    text = dialog.locator("pre")
    for line in (f"{name} out 0", f"{name} err 1", f"INFO tests.log_tasks: {name} log 1"):
        expect(text, f"{line!r} is not in the log panel").to_contain_text(
            line, timeout=TIMEOUT_MS)
    expect(dialog.get_by_role("status"), "the panel does not say the item finished"
           ).to_contain_text("Item succeeded", timeout=TIMEOUT_MS)
    assert text.locator("*").count() == 0, "the printed markup became HTML"

    # Non-ASCII output arrives as UTF-8 bytes and shows as the characters printed.
    page.goto(f"{s.server.url}/jobs/{odd['id']}")
    page.get_by_role("button", name="Log of item 0").click()
    expect(page.get_by_role("dialog", name="Log of item 0").locator("pre"),
           "non-ASCII output is garbled").to_have_text(
        re.compile(r"^naïve ✓\nhalf \\ud800 pair\n$"), timeout=TIMEOUT_MS)
    assert answers and all(code == 200 for _, code in answers), answers
    assert TOKEN not in page.content()
