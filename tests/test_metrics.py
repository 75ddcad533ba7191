"""GET /metrics after a known mix of jobs, read back with prometheus_client's own parser;
and /healthz."""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from flask import Flask
from prometheus_client.parser import text_string_to_metric_families

from bulkrunner.store import NewJob, Store
from tests.conftest import wait_for

JOBS = "/api/v1/jobs"
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(app: Flask, headers: dict[str, str] | None = None) -> Samples:
    """Every sample of /metrics as {(name, sorted labels): value}."""
    r = app.test_client().get("/metrics", headers=headers)
    assert r.status_code == 200, r.get_data(as_text=True)
    assert r.mimetype == "text/plain"
    out: Samples = {}
    for family in text_string_to_metric_families(r.get_data(as_text=True)):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def submit(app: Flask, body: dict[str, Any]) -> str:
    r = app.test_client().post(JOBS, json=body)
    assert r.status_code == 202, r.get_json()
    return str(r.get_json()["id"])


def job(app: Flask, ident: str) -> dict[str, Any]:
    return app.test_client().get(f"{JOBS}/{ident}").get_json()  # type: ignore[no-any-return]


def finished(app: Flask, *ids: str) -> bool:
    return all(job(app, i)["state"] in ("succeeded", "failed", "cancelled") for i in ids)


def test_counts_after_a_known_mix_of_jobs(app_factory: Callable[..., Flask]) -> None:
    app = app_factory(max_workers=2)
    ok = submit(app, {"task": "add", "items": [{"a": 1}, {"a": 2}, {"a": 3}]})
    bad = submit(app, {"task": "square", "params": {"x": -1}, "max_attempts": 2})
    late = submit(app, {"task": "slow", "params": {"seconds": 5}, "timeout": 0.3})
    wait_for(lambda: finished(app, ok, bad, late), 20, "the first three jobs finish")
    gone = submit(app, {"task": "slow", "params": {"seconds": 10}})
    wait_for(lambda: job(app, gone)["state"] == "running", 10, "the slow job starts")
    assert app.test_client().post(f"{JOBS}/{gone}/cancel").status_code == 200
    svc = app.extensions["bulkrunner"]
    wait_for(lambda: svc.dispatcher.inflight == 0, 10, "the cancelled item lets go")

    m = scrape(app)
    for task, jobs, items in (("add", 1, 3), ("square", 1, 1), ("slow", 2, 2)):
        assert value(m, "bulkrunner_jobs_submitted_total", task=task) == jobs, task
        assert value(m, "bulkrunner_items_submitted_total", task=task) == items, task
    assert value(m, "bulkrunner_attempts_total", task="add", outcome="succeeded") == 3
    assert value(m, "bulkrunner_attempts_total", task="add", outcome="failed") == 0
    assert value(m, "bulkrunner_attempts_total", task="square", outcome="failed") == 2
    # The cancelled attempt has no outcome: only the timed-out one counts.
    assert value(m, "bulkrunner_attempts_total", task="slow", outcome="failed") == 1
    assert value(m, "bulkrunner_retries_total", task="square") == 1
    assert value(m, "bulkrunner_item_failures_total", task="square") == 1
    assert value(m, "bulkrunner_item_failures_total", task="slow") == 1
    assert value(m, "bulkrunner_timeouts_total", task="slow") == 1
    assert value(m, "bulkrunner_timeouts_total", task="add") == 0
    assert value(m, "bulkrunner_worker_deaths_total", task="slow") == 0
    assert value(m, "bulkrunner_item_duration_seconds_count", task="add") == 3
    assert value(m, "bulkrunner_item_duration_seconds_count", task="square") == 2
    assert value(m, "bulkrunner_item_duration_seconds_count", task="slow") == 1
    assert value(m, "bulkrunner_item_duration_seconds_bucket", task="slow", le="0.25") == 0
    assert value(m, "bulkrunner_item_duration_seconds_bucket", task="slow", le="+Inf") == 1
    expected = {("add", "succeeded"): 3, ("square", "failed"): 1, ("slow", "failed"): 1,
                ("slow", "cancelled"): 1}
    for task in ("add", "square", "slow"):
        for state in ("queued", "running", "succeeded", "failed", "cancelled"):
            assert value(m, "bulkrunner_items", task=task, state=state) == \
                expected.get((task, state), 0), (task, state)
    assert value(m, "bulkrunner_queue_depth") == 0
    assert value(m, "bulkrunner_oldest_queued_age_seconds") == 0
    assert value(m, "bulkrunner_inflight_items") == 0
    assert value(m, "bulkrunner_max_workers") == 2
    assert value(m, "bulkrunner_executor_up") == 1
    assert value(m, "bulkrunner_draining") == 0
    assert value(m, "bulkrunner_pool_rebuilds_total") == 0
    assert value(m, "bulkrunner_interrupted_items_total", outcome="requeued") == 0


def test_queue_depth_oldest_age_and_inflight(app_factory: Callable[..., Flask]) -> None:
    app = app_factory(max_workers=1)
    busy = submit(app, {"task": "slow", "params": {"seconds": 10}})
    wait_for(lambda: job(app, busy)["state"] == "running", 10, "the slow job starts")
    waiting = submit(app, {"task": "add", "items": [{"a": 1}, {"a": 2}]})
    m = wait_for(lambda: (m := scrape(app)) and value(
        m, "bulkrunner_oldest_queued_age_seconds") >= 0.3 and m, 10,
        "the queued items' age never reached 0.3 s")
    assert value(m, "bulkrunner_queue_depth") == 2
    assert value(m, "bulkrunner_items", task="add", state="queued") == 2
    assert value(m, "bulkrunner_items", task="slow", state="running") == 1
    assert value(m, "bulkrunner_inflight_items") == 1
    assert 0.3 <= value(m, "bulkrunner_oldest_queued_age_seconds") < 30
    client = app.test_client()
    client.post(f"{JOBS}/{waiting}/cancel")
    client.post(f"{JOBS}/{busy}/cancel")
    m = scrape(app)
    assert value(m, "bulkrunner_queue_depth") == 0
    assert value(m, "bulkrunner_oldest_queued_age_seconds") == 0
    assert value(m, "bulkrunner_items", task="add", state="cancelled") == 2


def test_each_app_has_its_own_registry(app_factory: Callable[..., Flask],
                                       tmp_path: Path) -> None:
    one = app_factory()
    (tmp_path / "two").mkdir()
    two = app_factory_in(tmp_path / "two")
    try:
        for app in (one, two):
            ident = submit(app, {"task": "add", "params": {"a": 1}})
            wait_for(lambda app=app, ident=ident: finished(app, ident), 10, "the job ends")
        for app in (one, two):
            m = scrape(app)
            assert value(m, "bulkrunner_jobs_submitted_total", task="add") == 1
            assert value(m, "bulkrunner_items", task="add", state="succeeded") == 1
    finally:
        two.extensions["bulkrunner"].close(grace=0)


def app_factory_in(directory: Path) -> Flask:
    from bulkrunner.config import load_config
    from bulkrunner.server.app import create_app
    from tests.conftest import toml_config

    return create_app(load_config(toml_config(directory)))


def test_metrics_need_the_token(app_factory: Callable[..., Flask]) -> None:
    app = app_factory(server='token = "metrics-token"')
    client = app.test_client()
    r = client.get("/metrics")
    assert r.status_code == 401 and r.get_json()["error"]["code"] == "unauthorized"
    scrape(app, {"Authorization": "Bearer metrics-token"})
    assert client.get("/healthz").status_code == 200  # the one open route


def test_worker_deaths_and_pool_rebuilds(app_factory: Callable[..., Flask]) -> None:
    app = app_factory(executor="process", max_workers=1)
    ident = submit(app, {"task": "die"})
    wait_for(lambda: finished(app, ident), 60, "the job whose worker dies ends")
    ok = submit(app, {"task": "add", "params": {"a": 1}})
    wait_for(lambda: finished(app, ok), 60, "the next job runs on a new worker")
    m = scrape(app)
    assert value(m, "bulkrunner_worker_deaths_total", task="die") == 1
    assert value(m, "bulkrunner_attempts_total", task="die", outcome="failed") == 1
    assert value(m, "bulkrunner_item_failures_total", task="die") == 1
    assert value(m, "bulkrunner_pool_rebuilds_total") == 1
    assert value(m, "bulkrunner_attempts_total", task="add", outcome="succeeded") == 1


def test_interrupted_items_at_start_are_counted_and_logged(
        app_factory: Callable[..., Flask], tmp_path: Path,
        caplog: pytest.LogCaptureFixture) -> None:
    # A server died with two items running: the next start re-queues them.
    store = Store(str(tmp_path / "test.db"))
    ident = uuid.uuid4().hex
    store.insert_job(NewJob(id=ident, task="add", params={}, items=[
        json.dumps({"a": 1}), json.dumps({"a": 2}), json.dumps({"a": 3})]))
    assert len(store.claim(2)) == 2
    store.close()
    caplog.set_level("INFO", logger="bulkrunner")
    app = app_factory()
    wait_for(lambda: finished(app, ident), 10, "the recovered job runs")
    m = scrape(app)
    assert value(m, "bulkrunner_interrupted_items_total", outcome="requeued") == 2
    assert value(m, "bulkrunner_interrupted_items_total", outcome="failed") == 0
    assert value(m, "bulkrunner_items", task="add", state="succeeded") == 3
    lines = [r for r in caplog.records if "recovered" in r.getMessage()]
    assert any(getattr(r, "job_id", None) == ident for r in lines), caplog.text


# --------------------------------------------------------------------------- /healthz
def test_healthz_reports_workers(app_factory: Callable[..., Flask]) -> None:
    app = app_factory(max_workers=3)
    body = app.test_client().get("/healthz").get_json()
    assert body["status"] == "ok" and body["workers"] == 3 and body["max_workers"] == 3
    assert body["queued"] == 0 and body["inflight"] == 0


def test_healthz_counts_live_worker_processes(app_factory: Callable[..., Flask]) -> None:
    app = app_factory(executor="process", max_workers=2)
    client = app.test_client()
    body = wait_for(lambda: (b := client.get("/healthz").get_json())["workers"] == 2 and b,
                    30, "two worker processes are up")
    assert body["executor"]["ok"] is True


def test_healthz_is_503_when_the_executor_is_unusable(app_factory: Callable[..., Flask],
                                                       monkeypatch: pytest.MonkeyPatch
                                                       ) -> None:
    app = app_factory()
    ex = app.extensions["bulkrunner"].dispatcher.executor
    monkeypatch.setattr(ex, "health", lambda: (False, "the pool is gone"))
    r = app.test_client().get("/healthz")
    assert r.status_code == 503 and r.headers["Retry-After"]
    body = r.get_json()
    assert body["status"] == "executor_unavailable" and body["workers"] == 0
    assert body["executor"]["detail"] == "the pool is gone"
    assert value(scrape(app), "bulkrunner_executor_up") == 0


def test_healthz_is_503_while_draining(app_factory: Callable[..., Flask]) -> None:
    app = app_factory()
    app.extensions["bulkrunner"].begin_drain()
    r = app.test_client().get("/healthz")
    assert r.status_code == 503 and r.get_json()["status"] == "draining"
    assert value(scrape(app), "bulkrunner_draining") == 1
