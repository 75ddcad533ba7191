"""Hostile text never stops the server: text a task reports that has no UTF-8 form (lone
surrogates) is stored escaped and never holds up other items; params holding it are 422."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from flask import Flask

from tests.conftest import JOBS, wait_app_job, wait_for

TASKS = {
    "surrogate_progress": "tests.hostile_tasks:surrogate_progress",
    "surrogate_result": "tests.hostile_tasks:surrogate_result",
    "surrogate_error": "tests.hostile_tasks:surrogate_error",
    "quick": "tests.hostile_tasks:quick",
}


def _post(client: Any, body: bytes) -> Any:
    return client.post(JOBS, data=body, content_type="application/json")


@pytest.mark.parametrize("executor", ["thread", "process"])
def test_surrogate_progress_holds_up_no_other_job(
        app_factory: Callable[..., Flask], executor: str,
        caplog: pytest.LogCaptureFixture) -> None:
    app = app_factory(executor=executor, max_workers=2, tasks=TASKS)
    client = app.test_client()
    hostile = _post(client, b'{"task": "surrogate_progress", "params": {"steps": 400}}')
    assert hostile.status_code == 202, hostile.get_data(as_text=True)
    hid = hostile.get_json()["id"]
    wait_for(lambda: client.get(f"{JOBS}/{hid}").get_json()["message"], 20,
             "the hostile item's progress message to be stored")
    # While it runs and keeps reporting, five other jobs must all finish.
    others = [_post(client, b'{"task": "quick"}').get_json()["id"] for _ in range(5)]
    for ident in others:
        job = wait_app_job(client, ident, timeout=20)
        assert job["state"] == "succeeded", job
    assert client.get(f"{JOBS}/{hid}").get_json()["state"] == "running"
    message = client.get(f"{JOBS}/{hid}").get_json()["message"]
    assert message.startswith("processing \\ud800"), message  # escaped, readable
    assert not [r for r in caplog.records if "dispatcher error" in r.getMessage()]
    client.post(f"{JOBS}/{hid}/cancel")


def test_surrogate_result_and_error_are_stored_and_served(
        app_factory: Callable[..., Flask]) -> None:
    client = app_factory(tasks=TASKS).test_client()
    ok = _post(client, b'{"task": "surrogate_result"}').get_json()["id"]
    bad = _post(client, b'{"task": "surrogate_error"}').get_json()["id"]
    assert wait_app_job(client, ok)["state"] == "succeeded"
    failed = wait_app_job(client, bad)
    assert failed["state"] == "failed"
    assert failed["error"]["message"] == "bad \\ud800 input"
    assert "\\ud800" in failed["error"]["traceback"]
    for fmt in ("jsonl", "csv"):
        out = client.get(f"{JOBS}/{ok}/results?format={fmt}")
        assert out.status_code == 200
        text = out.get_data().decode("utf-8")
        assert "a\\ud800b" in text and ("é" in text or "\\u00e9" in text)
    # The web page shows both without a 500.
    for ident in (ok, bad):
        assert client.get(f"/jobs/{ident}").status_code == 200


@pytest.mark.parametrize("body, field", [
    (b'{"task": "quick", "params": {"s": "a\\ud800b"}}', "params.s"),
    (b'{"task": "quick", "params": {"\\udfff": 1}}', "params.\\udfff"),
    (b'{"task": "quick", "params": {"deep": {"list": ["x", "\\ud834"]}}}', "params.deep"),
    (b'{"task": "quick", "items": [{}, {"s": "\\ud800"}]}', "items[1]: s"),
])
def test_surrogates_in_params_or_items_are_422_naming_the_field(
        app_factory: Callable[..., Flask], body: bytes, field: str) -> None:
    client = app_factory(tasks={**TASKS, "quick": "bulkrunner.builtin:echo"}).test_client()
    r = _post(client, body)
    assert r.status_code == 422, r.get_data(as_text=True)
    fields = r.get_json()["error"]["details"]["fields"]
    assert any(k.encode("utf-8", "backslashreplace").decode() == field
               or json.dumps(k)[1:-1] == field for k in fields), fields
    assert "unpaired surrogate" in next(iter(fields.values()))
    assert client.get(JOBS).get_json()["jobs"] == []  # nothing stored


def test_paired_surrogates_are_real_text(app_factory: Callable[..., Flask],
                                         tmp_path: Path) -> None:
    # "\ud83d\ude00" is one emoji in JSON: valid text, accepted.
    client = app_factory(tasks={"quick": "bulkrunner.builtin:echo"}).test_client()
    r = _post(client, b'{"task": "quick", "params": {"s": "\\ud83d\\ude00"}}')
    assert r.status_code == 202, r.get_data(as_text=True)
    job = wait_app_job(client, r.get_json()["id"])
    assert job["result"] == {"s": "\U0001F600"}
