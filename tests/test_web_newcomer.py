"""What a newcomer's first walk through the page found: cancel asks first and says what ran,
retry says what it re-queues, failures are grouped on the job page, a stopped server is
shown, params and results read as key/value lines, and docstrings show `code` spans.

Browser tests drive ``/usr/bin/chromium`` through Playwright against a real ``bulkrunner
serve`` (as tests/test_web.py does, and skip the same way); the HTML ones use the Flask
test client.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bulkrunner.client import Client
from bulkrunner.server.web.views import code_spans
from tests.browser import Dialog, Session, expect, state_badge
from tests.conftest import JOBS, ServerProcess, wait_app_job, wait_for

Serve = Callable[..., ServerProcess]


def _counts_reach(c: Client, job_id: str, **want: int) -> None:
    def reached() -> dict[str, int] | None:
        counts: dict[str, int] = c.job(job_id)["items"]
        return counts if all(counts[k] == v for k, v in want.items()) else None
    wait_for(reached, 30, f"job {job_id} to reach {want}")


# ---------------------------------------------------------------------------- browser
def test_cancel_asks_first_and_the_cancelled_job_says_what_ran(
        session: Callable[..., Session], tmp_path: Path) -> None:
    s = session(max_workers=1)
    folder = tmp_path / "a-folder"  # writing to a folder fails: IsADirectoryError
    folder.mkdir()
    out = str(tmp_path / "out.txt")
    items = [{"path": str(folder), "i": 0}, {"path": out, "i": 1}, {"path": str(folder), "i": 2}]
    items += [{"path": out, "i": i, "delay": 20} for i in range(3, 8)]
    with s.client() as c:
        job = c.submit("record", items=items)
        _counts_reach(c, job["id"], failed=2, succeeded=1, running=1)
    page = s.open(f"/jobs/{job['id']}")
    expect(state_badge(page)).to_have_text("running")

    # The failures, grouped, and the FAILED count links to the failed items.
    failures = page.locator("#failures")
    expect(failures).to_be_visible()
    expect(failures.locator("li")).to_have_count(1)
    expect(failures.locator("li")).to_contain_text(
        re.compile(r"^2 × IsADirectoryError: .*Is a directory.* \(first: item 0\)$"))

    # Dismissing the question leaves the job running.
    asked: list[str] = []

    def dismiss(d: Dialog) -> None:
        asked.append(d.message)
        d.dismiss()

    page.once("dialog", dismiss)
    page.get_by_role("button", name="Cancel job").click()
    expect(page.locator("#action-status")).to_have_text("Not cancelled.")
    assert len(asked) == 1 and "5 items have not finished yet (of 8)" in asked[0], asked
    with s.client() as c:
        assert c.job(job["id"])["state"] == "running"

    def accept(d: Dialog) -> None:
        asked.append(d.message)
        d.accept()

    page.once("dialog", accept)
    page.get_by_role("button", name="Cancel job").click()
    expect(state_badge(page)).to_have_text("cancelled")
    assert len(asked) == 2, asked
    expect(page.locator("[data-field=progress] .progress-text")).to_have_text("3 of 8 ran")
    expect(page.locator("#retry")).to_have_text("Retry failed and cancelled items")
    expect(page.locator("#retry")).to_be_enabled()

    # Reloaded, the server-rendered page says the same.
    page.reload()
    expect(page.locator("[data-field=progress] .progress-text")).to_have_text("3 of 8 ran")
    expect(page.locator("#retry")).to_have_text("Retry failed and cancelled items")
    expect(page.locator("#failures li")).to_contain_text("2 × IsADirectoryError")

    page.locator("#failed-link").click()
    page.wait_for_url(re.compile(r"state=failed"))
    rows = page.locator(".items-table tbody tr")
    expect(rows).to_have_count(2)
    expect(rows.first.locator("td[data-label='#']")).to_have_text("0")
    expect(rows.nth(1).locator("td[data-label='#']")).to_have_text("2")

    # The jobs list shows what ran too.
    page.goto(s.server.url + "/")
    expect(page.locator("tbody tr").first.locator(".progress-text")).to_have_text("3 of 8 ran")


def test_retry_names_what_it_queues_again(session: Callable[..., Session]) -> None:
    s = session(max_workers=1)
    with s.client() as c:
        job = c.submit("slow", items=[{"seconds": 0.01}] * 2 + [{"seconds": 30}] * 3)
        _counts_reach(c, job["id"], succeeded=2, running=1)
    page = s.open(f"/jobs/{job['id']}")
    expect(state_badge(page)).to_have_text("running")
    asked: list[str] = []

    def accept(d: Dialog) -> None:
        asked.append(d.message)
        d.accept()

    page.once("dialog", accept)
    page.get_by_role("button", name="Cancel job").click()
    expect(page.locator("#action-status")).to_have_text("Cancelled.")
    assert asked and "3 items have not finished yet (of 5)" in asked[0], asked
    expect(page.locator("[data-field=progress] .progress-text")).to_have_text("2 of 5 ran")
    expect(page.locator("#failures")).to_be_hidden()
    retry = page.get_by_role("button", name="Retry cancelled items")
    expect(retry).to_be_enabled()
    retry.click()
    expect(page.locator("#action-status")).to_have_text("Cancelled items queued again.")
    with s.client() as c:
        _counts_reach(c, job["id"], cancelled=0)
        c.cancel(job["id"])


def test_a_stopped_server_is_shown_and_the_notice_goes_when_it_answers(
        session: Callable[..., Session]) -> None:
    s = session(max_workers=1)
    with s.client() as c:
        job = c.submit("slow", {"seconds": 30})
    page = s.open(f"/jobs/{job['id']}")
    notice = page.locator("#unreachable")
    expect(state_badge(page)).to_have_text(re.compile("queued|running"))
    expect(notice).to_be_hidden()

    page.route("**/api/v1/**", lambda route: route.abort())  # as if the server had stopped
    expect(notice).to_be_visible()
    expect(notice).to_contain_text("cannot be reached")
    expect(notice).to_contain_text("retrying")
    page.unroute("**/api/v1/**")
    expect(notice).to_be_hidden()
    with s.client() as c:
        c.cancel(job["id"])
    expect(state_badge(page)).to_have_text("cancelled")


def test_a_really_stopped_server_shows_the_notice_on_the_jobs_list(
        session: Callable[..., Session]) -> None:
    s = session()
    page = s.open("/")
    expect(page.locator("#unreachable")).to_be_hidden()
    s.server.stop()
    expect(page.locator("#unreachable")).to_be_visible()


def test_params_and_results_read_as_key_value_lines(session: Callable[..., Session]) -> None:
    s = session()
    page = s.open("/")
    # The page's own renderer (used while a job runs): keys and values stay text.
    html = page.evaluate("""() => window.bulkrunner.keyValues(
        {"<b>k</b>": "<img src=x>", n: 3, tags: ["a", {"z": 1}]}).outerHTML""")
    assert html == ('<dl class="kv"><div><dt>&lt;b&gt;k&lt;/b&gt;:</dt> <dd><code class="cell">'
                    '&lt;img src=x&gt;</code></dd></div><div><dt>n:</dt> <dd><code class="cell">'
                    '3</code></dd></div><div><dt>tags:</dt> <dd><code class="cell">'
                    '["a",{"z":1}]</code></dd></div></dl>'), html
    scalar = page.evaluate("() => window.bulkrunner.keyValues(42).outerHTML")
    assert scalar == '<code class="cell">42</code>'


# ---------------------------------------------------------------------------- no browser
def test_item_params_and_result_objects_render_as_key_value_lines(
        app_factory: Callable[..., Any]) -> None:
    client = app_factory().test_client()
    resp = client.post(JOBS, json={"task": "typed", "params": {
        "n": 2, "ratio": 0.5, "flag": True, "tags": ["<script>x</script>", "b"]}})
    assert resp.status_code == 202, resp.get_data(as_text=True)
    job = wait_app_job(client, resp.get_json()["id"])
    assert job["state"] == "succeeded"
    page = client.get(f"/jobs/{job['id']}").get_data(as_text=True)
    row = page[page.index('<tr data-key="0">'):]
    row = row[:row.index("</tr>")]
    params = row[row.index('data-label="Params"'):row.index('data-label="Result"')]
    assert '<dl class="kv">' in params
    assert '<dt>n:</dt> <dd><code class="cell">2</code></dd>' in params
    assert '<dt>flag:</dt> <dd><code class="cell">true</code></dd>' in params
    result = row[row.index('data-label="Result"'):]
    assert '<dt>mode:</dt> <dd><code class="cell">fast</code></dd>' in result
    assert ('<dt>tags:</dt> <dd><code class="cell">[&#34;&lt;script&gt;x&lt;/script&gt;&#34;,'
            '&#34;b&#34;]</code></dd>') in result
    assert "<script>x" not in page


def test_failures_are_grouped_on_the_job_page(app_factory: Callable[..., Any]) -> None:
    client = app_factory().test_client()
    items = [{"x": 2}, {"x": -1}, {"x": 3}, {"x": -1}, {"x": -5}]
    resp = client.post(JOBS, json={"task": "square", "items": items})
    assert resp.status_code == 202, resp.get_data(as_text=True)
    job = wait_app_job(client, resp.get_json()["id"])
    assert job["items"]["failed"] == 3
    page = client.get(f"/jobs/{job['id']}").get_data(as_text=True)
    box = page[page.index('<section id="failures"'):]
    box = box[:box.index("</section>")]
    assert " hidden" not in box[:box.index(">")]
    lines = [re.sub(r"<[^>]+>", "", li).strip() for li in re.findall(r"<li>(.*?)</li>", box)]
    assert lines == ["2 × ValueError: negative: -1 (first: item 1)",
                     "1 × ValueError: negative: -5 (first: item 4)"], lines
    link = re.search(r'<a href="([^"]+)" id="failed-link" data-count="failed"[^>]*>3</a>', page)
    assert link and link.group(1) == f"/jobs/{job['id']}?state=failed", page
    assert "Retry failed items</button>" in page
    filtered = client.get(link.group(1)).get_data(as_text=True)
    assert len(re.findall(r'<tr data-key="\d+">', filtered)) == 3


def test_no_failures_no_failures_box(app_factory: Callable[..., Any]) -> None:
    client = app_factory().test_client()
    resp = client.post(JOBS, json={"task": "square", "params": {"x": 2}})
    job = wait_app_job(client, resp.get_json()["id"])
    page = client.get(f"/jobs/{job['id']}").get_data(as_text=True)
    assert re.search(r'<section id="failures"[^>]* hidden>', page)


def test_docstrings_show_backticks_as_code() -> None:
    assert str(code_spans("Fail the first `fail_times` calls")) == (
        "Fail the first <code>fail_times</code> calls")
    hostile = 'use `<img src=x onerror="alert(1)">` & <b>bold</b> `a'
    assert str(code_spans(hostile)) == (
        "use <code>&lt;img src=x onerror=&#34;alert(1)&#34;&gt;</code> &amp; "
        "&lt;b&gt;bold&lt;/b&gt; `a")
    assert str(code_spans("``")) == "``"
    assert str(code_spans(None)) == ""


def test_task_pages_render_docstring_code_spans(app_factory: Callable[..., Any]) -> None:
    client = app_factory().test_client()
    form = client.get("/tasks/flaky").get_data(as_text=True)
    assert ('<div class="doc" id="task-doc">Fail the first <code>fail_times</code> calls'
            in form), form
    listing = client.get("/tasks").get_data(as_text=True)
    assert "<p>Fail the first <code>fail_times</code> calls (counted in a file)" in listing


def test_key_value_lines_and_failures_escape_hostile_text(
        app_factory: Callable[..., Any]) -> None:
    app = app_factory()
    with app.test_request_context("/"):
        template = app.jinja_env.from_string(
            '{% from "macros.html" import kv, failure_list %}{{ kv(v) }}|{{ failure_list(f) }}')
        out = template.render(
            v={"a\ud800": "b\udfff", "<x>": [1, {"y": "<z>"}]},
            f=[{"type": "T\ud800<", "message": "<m>", "count": 2, "first_index": 3}])
    out.encode("utf-8")  # a lone surrogate a task returned is shown escaped, not a 500
    assert "<dt>a\\ud800:</dt> <dd><code class=\"cell\">b\\udfff</code></dd>" in out
    assert "<dt>&lt;x&gt;:</dt>" in out and "&lt;z&gt;" in out and "<z>" not in out
    assert "<strong>T\\ud800&lt;</strong>: <bdi>&lt;m&gt;</bdi>" in out and "<m>" not in out
