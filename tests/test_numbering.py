"""One way to number items everywhere: an item's index, from 0, as the API, `logs --item`,
`items`, failures and the page show it; where a file's row or line meets an item, both
(``row 3 (item 1), x: …``), worded the same by the CLI and by the page.

The CLI runs as a real subprocess against a real ``bulkrunner serve``; the page is driven in
Chromium (skipped like the other browser tests when it is missing).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from bulkrunner.client import Client
from bulkrunner.errors import ApiError
from tests.browser import Session, expect, state_badge
from tests.conftest import ServerProcess, run_cli, toml_config, wait_job

Serve = Callable[..., ServerProcess]

# Row 3 is blank (it makes no item), so row 4 is item 1, and row 6 is item 3.
BAD_CSV = "x\n1\n\nnope\n3\n4.5\n"
BAD_LINES = {"row 4 (item 1), x: must be an integer, not 'nope'",
             "row 6 (item 3), x: must be an integer, not '4.5'"}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    with ServerProcess(toml_config(tmp_path_factory.mktemp("numbering"))) as s:
        yield s


def _refused(r: Any) -> list[str]:
    """The problems a refused submission printed, one a line, without the CLI's framing."""
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    lines = r.stderr.rstrip("\n").splitlines()
    assert lines[0].startswith("error: "), r.stderr
    if lines[0] == "error: the server refused the submission:":
        return [line.strip() for line in lines[1:] if not line.startswith("hint: ")]
    return [lines[0].removeprefix("error: ")]


@pytest.mark.parametrize(("name", "data", "want"), [
    ("bad.csv", BAD_CSV, BAD_LINES),
    ("bad.tsv", "x\n1\n\nnope\n", {"row 4 (item 1), x: must be an integer, not 'nope'"}),
    ("bad.csv", "x,y\n1,2\n", {"row 1, y: unknown param; square takes x"}),
    ("bad.csv", "x\n1\n2,3\n", {"row 3 (item 1): has 2 cells; the header has 1"}),
    ("bad.jsonl", '{"x": 1}\n\n{"x": "two"}\n',
     {"line 3 (item 1), x: must be an integer, not a string"}),
    ("bad.jsonl", '{"x": 1}\n{"x": \n', None),  # the JSON error's own words vary
    ("bad.json", '[{"x": 1}, {"x": 2}, {"x": "three"}]',
     {"item 2, x: must be an integer, not a string"}),
])
def test_the_cli_names_the_row_and_the_item(server: ServerProcess, tmp_path: Path, name: str,
                                            data: str, want: set[str] | None) -> None:
    path = tmp_path / name
    path.write_text(data)
    got = _refused(run_cli("submit", "square", "--items", str(path), url=server.url))
    if want is None:
        assert len(got) == 1 and got[0].startswith("line 2 (item 1): is not valid JSON"), got
    else:
        assert set(got) == want, got
    with Client(server.url) as c:
        assert c.jobs(task="square", limit=5)["jobs"] == []  # nothing of it was stored


def test_the_api_details_give_the_row_and_the_index(server: ServerProcess) -> None:
    with Client(server.url) as c, pytest.raises(ApiError) as e:
        c.submit_file(BAD_CSV.encode(), "bad.csv", "square")
    assert e.value.status == 422
    details = e.value.details
    assert details["row"] == 4 and details["index"] == 1, details
    assert set(f"{k}: {v}" for k, v in details["fields"].items()) == BAD_LINES


def test_a_json_submission_names_its_items_by_their_paths(server: ServerProcess) -> None:
    with Client(server.url) as c, pytest.raises(ApiError) as e:
        c.submit("square", items=[{"x": 1}, {"x": 2}, {"x": "three"}])
    assert e.value.details["fields"] == {"items[2].x": "must be an integer, not a string"}
    assert e.value.details["index"] == 2 and "row" not in e.value.details


def test_a_missing_column_hints_how_to_give_it(server: ServerProcess, tmp_path: Path) -> None:
    path = tmp_path / "no-a.csv"
    path.write_text("b\n1\n2\n")
    r = run_cli("submit", "add", "--items", str(path), url=server.url)
    assert set(_refused(r)) == {"row 2 (item 0), a: required param is missing",
                                "row 3 (item 1), a: required param is missing"}, r.stderr
    hints = [line for line in r.stderr.splitlines() if line.startswith("hint: ")]
    assert hints == ["hint: give a in a column (or key) of the items file, or to every item "
                     "with --param a=<int>"], r.stderr


def test_an_item_index_is_the_same_everywhere(server: ServerProcess, tmp_path: Path) -> None:
    # The file's row 4 is item 1: the item the failure, `items`, `logs --item` and the
    # results name, as the upload error would have.
    path = tmp_path / "numbers.csv"
    path.write_text("x\n1\n\n-2\n3\n")
    r = run_cli("submit", "square", "--items", str(path), "--wait", url=server.url)
    assert r.returncode == 1, (r.stdout, r.stderr)
    ident = r.stdout.split()[0]
    assert "1 × ValueError: negative: -2 (first: item 1)" in r.stderr, r.stderr

    table = run_cli("items", ident, "--state", "failed", url=server.url)
    assert table.returncode == 0, table.stderr
    rows = table.stdout.splitlines()[1:]
    assert len(rows) == 1 and re.match(r"^\s*1\s+failed\s+1\s+\{\"x\":-2\}", rows[0]), rows

    log = run_cli("logs", ident, "--item", "1", url=server.url)
    assert log.returncode == 0 and "ValueError" not in log.stderr, log.stderr
    missing = run_cli("logs", ident, "--item", "3", url=server.url)
    assert missing.returncode == 2 and "item 3" in missing.stderr, missing.stderr

    with Client(server.url) as c:
        job = wait_job(c, ident, 30)
        assert job["failures"][0]["first_index"] == 1
        items = c.items(ident)["items"]
    assert [(i["index"], i["params"]) for i in items] == [(0, {"x": 1}), (1, {"x": -2}),
                                                          (2, {"x": 3})]


# ---------------------------------------------------------------------------- the page
def test_the_page_words_upload_errors_as_the_cli_does(
        session: Callable[..., Session], tmp_path: Path) -> None:
    s = session()
    bad = tmp_path / "bad.csv"
    bad.write_text(BAD_CSV)
    cli_lines = set(_refused(run_cli("submit", "square", "--items", str(bad),
                                     url=s.server.url)))
    assert cli_lines == BAD_LINES
    page = s.open("/tasks/square")
    page.get_by_label("CSV or JSON Lines file, one item per row").set_input_files(bad)
    page.get_by_role("button", name="Start job").click()
    problems = page.locator("#err-items li")
    expect(problems).to_have_count(len(BAD_LINES))
    assert set(problems.all_inner_texts()) == cli_lines

    # A JSON array's element is named by its item index alone, the same on both.
    array = tmp_path / "bad.json"
    array.write_text('[{"x": 1}, {"x": "two"}]')
    cli_array = _refused(run_cli("submit", "square", "--items", str(array),
                                 url=s.server.url))
    assert cli_array == ["item 1, x: must be an integer, not a string"]
    page.get_by_label("CSV or JSON Lines file, one item per row").set_input_files(array)
    page.get_by_role("button", name="Start job").click()
    expect(problems).to_have_count(1)
    expect(problems).to_have_text(cli_array[0])


def test_the_page_numbers_items_as_the_cli_does(session: Callable[..., Session],
                                                tmp_path: Path) -> None:
    s = session()
    path = tmp_path / "numbers.csv"
    path.write_text("x\n1\n\n-2\n3\n")
    page = s.open("/tasks/square")
    page.get_by_label("CSV or JSON Lines file, one item per row").set_input_files(path)
    page.get_by_role("button", name="Start job").click()
    page.wait_for_url(re.compile(r"/jobs/[0-9a-f]{32}$"))
    expect(state_badge(page)).to_have_text("failed")
    expect(page.locator("#failures li")).to_contain_text("(first: item 1)")
    page.locator("#failed-link").click()
    rows = page.locator(".items-table tbody tr")
    expect(rows).to_have_count(1)
    expect(rows.locator('td[data-label="#"]')).to_have_text("1")
    page.get_by_role("button", name="Log of item 1").click()
    expect(page.get_by_role("dialog", name="Log of item 1")).to_be_visible()
