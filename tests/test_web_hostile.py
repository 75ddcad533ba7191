"""The page in Chromium with hostile params, results, errors, logs and query strings: HTML,
script tags, event handlers, ``javascript:`` URLs, very long unbroken strings and
right-to-left controls. Nothing executes (a flag the payloads would set stays unset, no
dialog opens, the console shows no refused inline script), and the layout holds (no page is
wider than the window, text after a right-to-left override stays where it belongs).

Browser tests drive ``/usr/bin/chromium`` through Playwright against a real ``bulkrunner
serve`` and skip without it (see tests/browser.py).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any
from urllib.parse import quote

from tests.browser import Dialog, Page, Session, expect, state_badge
from tests.conftest import SAMPLE_TASKS, wait_job

FLAG = "__pwned"
PAYLOADS = [
    f'<script>window.{FLAG} = "script"</script>',
    f'<img src=x onerror="window.{FLAG} = \'img\'">',
    f'<svg><svg onload="window.{FLAG} = \'svg\'">',
    f'"><a href="javascript:window.{FLAG}=\'attr\'" id="hostile-link">x</a><b x="',
    f"javascript:window.{FLAG}='url'",
    f"');window.{FLAG}='js';('",
    "{{ 7 * 7 }} ${7*7} <!--",
    "\u202egnp.exe",                      # right-to-left override, never closed
    "abc\u200f\u2067isolate never closed",  # right-to-left mark, an open isolate
    "W" * 4000,                           # one long word
    "<b>" * 300,                           # deep markup
]
RLO = "\u202eevil"
TASKS = {**SAMPLE_TASKS, "parrot": "tests.page_tasks:parrot", "shout": "tests.page_tasks:shout",
         "echo": "bulkrunner.builtin:echo"}


def _watch(page: Page) -> list[str]:
    """Every dialog the page opens (none should)."""
    opened: list[str] = []

    def seen(d: Dialog) -> None:
        opened.append(d.message)
        d.dismiss()
    page.on("dialog", seen)
    return opened


def _check(page: Page, opened: list[str], where: str) -> None:
    """Nothing ran, and nothing is wider than the window."""
    assert page.evaluate(f"() => window.{FLAG} === undefined"), \
        f"{where}: a payload ran ({page.evaluate(f'() => window.{FLAG}')})"
    assert not opened, f"{where}: dialogs opened: {opened}"
    layout: dict[str, Any] = page.evaluate("""() => {
        const main = document.querySelector("main") || document.body;  // or a JSON 404
        const r = main.getBoundingClientRect();
        // The innermost element that reaches past the window, to name in a failure.
        let widest = "";
        const walk = document.createTreeWalker(main, NodeFilter.SHOW_TEXT);
        for (let t = walk.nextNode(); t; t = walk.nextNode()) {
            const range = document.createRange();
            range.selectNodeContents(t);
            if (range.getBoundingClientRect().right > window.innerWidth + 1) {
                const e = t.parentElement;
                widest = `text in ${e.tagName.toLowerCase()}.${e.className} in ` +
                         `${e.parentElement.tagName.toLowerCase()}.${e.parentElement.className}`;
                break;
            }
        }
        return {page: document.documentElement.scrollWidth - window.innerWidth,
                right: Math.ceil(r.right) - window.innerWidth,
                main: main.scrollWidth - main.clientWidth, widest};
    }""")
    assert layout["page"] <= 0 and layout["right"] <= 0 and layout["main"] <= 0, \
        f"{where}: wider than the window by {layout}"
    assert page.locator("#hostile-link").count() == 0, f"{where}: payload markup was parsed"


def test_hostile_content_is_text_and_the_layout_holds(session: Callable[..., Session]) -> None:
    s = session(max_workers=1, tasks=TASKS)
    page = s.page
    opened = _watch(page)
    with s.client() as c:
        blocker = c.submit("slow", {"seconds": 60})
        wait_job(c, blocker["id"], 30, ("running",))
        # Queued behind the blocker: the page first shows them waiting, then its scripts
        # draw what they report as they run.
        bulk = c.submit("parrot", items=[{"text": p} for p in PAYLOADS],
                        key=PAYLOADS[1][:100] + PAYLOADS[7])
        # RLO first: the job page shows the ten biggest groups of failures, then by item.
        failing = c.submit("shout", items=[{"text": p} for p in [RLO, *PAYLOADS]])
        single = c.submit("parrot", {"text": " ".join(PAYLOADS[:7]) + PAYLOADS[9]})
        single_error = c.submit("shout", {"text": PAYLOADS[0] + PAYLOADS[9]})
        keys = c.submit("echo", {p[:60]: p for p in PAYLOADS})

        page = s.open(f"/jobs/{bulk['id']}")
        expect(state_badge(page)).to_have_text("queued")
        _check(page, opened, "a queued job")
        c.cancel(blocker["id"])
        expect(state_badge(page)).to_have_text("succeeded")  # drawn by the page's script
        expect(page.locator(".items-table tbody tr")).to_have_count(len(PAYLOADS))
        for job in (failing, single, single_error, keys):
            wait_job(c, job["id"], 30)

    # What the page's script drew is the payloads, as text.
    cells = page.locator(".items-table tbody tr td[data-label=Params] code")
    assert cells.nth(0).inner_text() == PAYLOADS[0]
    assert cells.nth(3).inner_text() == PAYLOADS[3]
    _check(page, opened, "the job page after it ran")
    expect(page.locator("[data-field=message]")).to_be_visible()

    # The log of an item that printed markup.
    page.locator("button[data-log-item='1']").click()
    log = page.locator("[data-log=text]")
    expect(log).to_contain_text(PAYLOADS[1])
    _check(page, opened, "an item's log")
    page.keyboard.press("Escape")

    # The same jobs as the server renders them (reloaded: no script draws them now).
    for job in (bulk, failing, single, single_error, keys):
        page.goto(f"{s.server.url}/jobs/{job['id']}")
        expect(state_badge(page)).to_have_text("succeeded" if job is not failing
                                                and job is not single_error else "failed")
        _check(page, opened, f"job {job['task']}")
        page.goto(f"{s.server.url}/jobs/{job['id']}?state=failed&after=3")
        _check(page, opened, f"job {job['task']}, failed items")

    # Text after a right-to-left override stays after it: the failure group of RLO.
    page.goto(f"{s.server.url}/jobs/{failing['id']}")
    group = page.locator("#failures li", has_text="evil")
    expect(group).to_have_count(1)
    placed: dict[str, float] = group.evaluate("""li => {
        const text = [...li.childNodes].find(n => n.nodeType === 3 && n.data.includes("evil"))
            || [...li.querySelectorAll("*")].find(e => e.textContent.includes("evil")
                                                   && !e.querySelector("*"));
        const range = document.createRange();
        range.selectNodeContents(text);
        const note = li.querySelector(".muted").getBoundingClientRect();
        return {message: range.getBoundingClientRect().right, note: note.left};
    }""")
    # "(first: item 0)" comes after the message, not drawn inside the overridden run.
    assert placed["note"] >= placed["message"] - 1, \
        f"the override moved the text after it: {placed}"
    _check(page, opened, "the failures")

    # The jobs list, with hostile filters in the query string.
    query = "&".join(f"{k}={quote(PAYLOADS[i])}" for k, i in
                     (("state", 0), ("task", 1), ("before", 4)))
    for path in ("/", f"/?{query}", f"/?task={quote(PAYLOADS[3])}"):
        page.goto(s.server.url + path)
        expect(page.locator("h1")).to_have_text("Jobs")
        _check(page, opened, f"the jobs list at {path[:60]}")
    page.goto(s.server.url + "/")
    expect(page.locator("#jobs-list tbody tr")).to_have_count(6)
    _check(page, opened, "the jobs list")
    # Its script redraws each row once (the rows it draws carry their signature).
    expect(page.locator("#jobs-list tbody tr[data-sig]")).to_have_count(6)
    _check(page, opened, "the jobs list redrawn")

    # Unknown jobs and tasks named by hostile text, and a hostile return address.
    for path in (f"/jobs/{quote(PAYLOADS[0], safe='')}", f"/tasks/{quote(PAYLOADS[1], safe='')}",
                 f"/tasks/{quote(PAYLOADS[9], safe='')}",
                 f"/login?next={quote(PAYLOADS[4])}", "/tasks/parrot"):
        page.goto(s.server.url + path)
        _check(page, opened, path[:60])

    # The same pages on a phone.
    page.set_viewport_size({"width": 390, "height": 800})
    for job in (bulk, single, keys):
        page.goto(f"{s.server.url}/jobs/{job['id']}")
        expect(state_badge(page)).to_have_text("succeeded")
        _check(page, opened, f"job {job['task']} on a phone")
    page.goto(s.server.url + "/")
    _check(page, opened, "the jobs list on a phone")
