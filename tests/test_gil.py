"""Short turns at the interpreter while a big submission is handled, and only then."""

from __future__ import annotations

import json
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from flask import Flask

from bulkrunner.server import bodies, gil, submission
from tests.conftest import JOBS, SAMPLE_TASKS, run_cli, toml_config


@pytest.fixture
def enabled(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setattr(gil, "_enabled", True)
    before = sys.getswitchinterval()
    yield
    assert sys.getswitchinterval() == before, "the interval was not given back"


def test_turns_are_short_while_any_thread_is_inside(enabled: None) -> None:
    normal = sys.getswitchinterval()
    inside, leave = threading.Event(), threading.Event()

    def other() -> None:
        with gil.short_turns():
            inside.set()
            leave.wait(10)

    t = threading.Thread(target=other)
    with gil.short_turns():
        assert sys.getswitchinterval() == gil.SHORT
        t.start()
        assert inside.wait(10), "the other thread did not get in"
    assert sys.getswitchinterval() == gil.SHORT  # the other thread is still inside
    leave.set()
    t.join(10)
    assert sys.getswitchinterval() == normal


def test_nothing_changes_unless_enabled(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(gil, "_enabled", False)  # as in an app that embeds bulkrunner
    normal = sys.getswitchinterval()
    with gil.short_turns():
        assert sys.getswitchinterval() == normal


def test_a_big_submission_is_checked_with_short_turns_and_a_small_one_not(
        enabled: None, app_factory: Callable[..., Flask],
        monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[float] = []
    check = submission.new_job

    def spy(*args: Any, **kwargs: Any) -> Any:
        seen.append(sys.getswitchinterval())
        return check(*args, **kwargs)

    monkeypatch.setattr(submission, "new_job", spy)
    client = app_factory().test_client()
    big = json.dumps({"task": "add", "items": [{"a": i} for i in range(30_000)]}).encode()
    assert len(big) >= bodies.STREAM_BODY
    for data in (big, json.dumps({"task": "add", "params": {"a": 1}}).encode()):
        r = client.post(JOBS, data=data, content_type="application/json")
        assert r.status_code == 202, r.get_data(as_text=True)
    assert seen == [gil.SHORT, sys.getswitchinterval()]


def test_a_served_task_runs_with_the_normal_interval(serve: Any, tmp_path: Path) -> None:
    # The short turns end with the big submission: tasks and requests run as Python would
    # have them the rest of the time.
    server = serve(toml_config(tmp_path, tasks={**SAMPLE_TASKS,
                                                "interval": "sys:getswitchinterval"}))
    sub = run_cli("submit", "interval", "--wait", "--json", url=server.url, timeout=60)
    assert sub.returncode == 0, sub.stderr
    assert json.loads(sub.stdout)["result"] == 0.005
