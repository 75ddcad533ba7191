"""An item's attempts as people see them: a running item is on its attempt N (``attempts``
+ 1), and where retries make the total differ from the current try's count, the total too
(``2 (running; 4 in all)``), the same in ``bulkrunner items`` and on the job page (drawn by
the server and by the page's script). The API's ``attempts`` keeps counting the current
try only, so ``max_attempts`` applies anew after a retry.

Real server, the real CLI as a subprocess, Chromium for the page (skipped like the other
browser tests when it is missing).
"""

from __future__ import annotations

import re
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from bulkrunner.client import Client
from bulkrunner.models import attempts_in_all, attempts_text
from tests.browser import Session, expect
from tests.conftest import SAMPLE_TASKS, run_cli, wait_for, wait_job

TASKS = {**SAMPLE_TASKS, "gate": "tests.attempt_tasks:gate"}


def _errors(*attempts: int) -> list[dict[str, Any]]:
    return [{"type": "RuntimeError", "message": "x", "attempt": n} for n in attempts]


@pytest.mark.parametrize(("item", "total", "text"), [
    ({"state": "queued", "attempts": 0, "errors": []}, 0, "0"),
    ({"state": "running", "attempts": 0, "errors": []}, 1, "1 (running)"),
    ({"state": "running", "attempts": 2, "errors": _errors(1, 2)}, 3, "3 (running)"),
    ({"state": "succeeded", "attempts": 1, "errors": []}, 1, "1"),
    ({"state": "failed", "attempts": 3, "errors": _errors(1, 2, 3)}, 3, "3"),
    # Retried after 3 failed attempts: queued afresh, then on its first attempt again.
    ({"state": "queued", "attempts": 0, "errors": _errors(1, 2, 3)}, 3, "0 (3 in all)"),
    ({"state": "running", "attempts": 0, "errors": _errors(1, 2, 3)}, 4,
     "1 (running; 4 in all)"),
    ({"state": "running", "attempts": 1, "errors": _errors(1, 2, 1)}, 4,
     "2 (running; 4 in all)"),
    ({"state": "succeeded", "attempts": 2, "errors": _errors(1, 2, 1)}, 4, "2 (4 in all)"),
    # Three tries: 2 failed, then 1 failed and cancelled while queued, then 1 that succeeded.
    ({"state": "succeeded", "attempts": 1, "errors": _errors(1, 2, 1)}, 4, "1 (4 in all)"),
    # A history cut to its last entries still counts what it kept; foreign entries are skipped.
    ({"state": "failed", "attempts": 2, "errors": [{"attempt": 5}, {"x": 1}, *_errors(1, 2)]},
     7, "2 (7 in all)"),
    ({"state": "failed", "attempts": 30, "errors": _errors(*range(11, 31))}, 30, "30"),
])
def test_attempts_in_words(item: dict[str, Any], total: int, text: str) -> None:
    assert attempts_in_all(item) == total
    assert attempts_text(item) == text


def _cell(html: str, index: int) -> str:
    """The Attempts cell of item ``index`` in the job page's HTML, as text."""
    row = html[html.index(f'<tr data-key="{index}">'):]
    row = row[:row.index("</tr>")]
    m = re.search(r'<td data-label="Attempts">([^<]*)</td>', row)
    assert m, row
    return m.group(1)


def _cli_attempts(url: str, ident: str) -> dict[int, str]:
    """Index -> the ATTEMPTS cell of ``bulkrunner items`` (the real CLI)."""
    r = run_cli("items", ident, url=url)
    assert r.returncode == 0, r.stderr
    head, *rows = r.stdout.splitlines()
    params_at = head.index("PARAMS")  # the columns before it hold no JSON
    out = {}
    for row in rows:
        index, _state, attempts = row[:params_at].split(None, 2)
        out[int(index)] = attempts.strip()
    return out


def _reach(c: Client, ident: str, index: int, state: str, attempts: int, errors: int
           ) -> dict[str, Any]:
    def reached() -> dict[str, Any] | None:
        it = c.items(ident)["items"][index]
        ok = (it["state"], it["attempts"], len(it["errors"])) == (state, attempts, errors)
        return it if ok else None
    got: dict[str, Any] = wait_for(
        reached, 30, f"item {index} of {ident} to be {state} with {attempts} attempt(s) and "
                     f"{errors} error(s)")
    return got


def test_a_retried_item_shows_its_attempt_and_the_total(
        session: Callable[..., Session], tmp_path: Path) -> None:
    s = session(tasks=TASKS)
    url = s.server.url
    first, second = str(tmp_path / "first"), str(tmp_path / "second")
    with s.client() as c:
        job = c.submit("gate", items=[{"path": first, "fail_times": 3}, {"path": second}],
                       max_attempts=2)
        ident = job["id"]
        # Item 1 holds on its first attempt; item 0 fails both of its attempts.
        _reach(c, ident, 1, "running", 0, 0)
        _reach(c, ident, 0, "failed", 2, 2)
        assert _cli_attempts(url, ident) == {0: "2", 1: "1 (running)"}
        Path(second + ".go").touch()
        _reach(c, ident, 1, "succeeded", 1, 0)
        wait_job(c, ident, 30)

        # Retried: item 0's attempt 1 fails (its third call), attempt 2 holds.
        c.retry(ident)
        item = _reach(c, ident, 0, "running", 1, 3)
        assert item["attempts"] == 1  # the API counts the current try only
        assert _cli_attempts(url, ident) == {0: "2 (running; 4 in all)", 1: "1"}
        with urllib.request.urlopen(f"{url}/jobs/{ident}", timeout=10) as resp:
            html = resp.read().decode()
        assert _cell(html, 0) == "2 (running; 4 in all)" and _cell(html, 1) == "1"

        page = s.open(f"/jobs/{ident}")
        drawn = page.locator('.items-table tbody tr[data-key="0"][data-sig]')  # by the script
        expect(drawn.locator('td[data-label="Attempts"]')).to_have_text("2 (running; 4 in all)")

        Path(first + ".go").touch()
        _reach(c, ident, 0, "succeeded", 2, 3)
        expect(drawn.locator('td[data-label="Attempts"]')).to_have_text("2 (4 in all)")
        expect(page.locator('.items-table tbody tr[data-key="1"] td[data-label="Attempts"]')
               ).to_have_text("1")
        assert _cli_attempts(url, ident) == {0: "2 (4 in all)", 1: "1"}
        assert c.job(ident)["state"] == "succeeded"
