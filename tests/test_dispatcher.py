"""The dispatcher's bounds: never more than max_workers running while items take time;
a short claim-ahead only while items are very short; cancel reaches items claimed ahead;
a drain waits for what a turn claimed."""

from __future__ import annotations

import threading
from typing import Any

from bulkrunner.server.events import JobChanged
from tests.conftest import wait_for


def _job(client: Any, job_id: str) -> dict[str, Any]:
    return client.get(f"/api/v1/jobs/{job_id}").json  # type: ignore[no-any-return]


def test_running_never_exceeds_max_workers_for_items_that_take_time(app_factory: Any) -> None:
    app = app_factory(max_workers=2)
    client = app.test_client()
    job_id = client.post("/api/v1/jobs", json={
        "task": "stubborn", "items": [{"seconds": 0.2}] * 8}).json["id"]
    seen = []

    def done() -> bool:
        j = _job(client, job_id)
        seen.append(j["items"]["running"])
        return j["state"] == "succeeded"

    wait_for(done, 30, "8 items of 0.2 s on 2 workers did not finish", interval=0.02)
    assert max(seen) == 2, seen


def test_short_items_are_claimed_ahead_and_all_succeed(app_factory: Any) -> None:
    app = app_factory(max_workers=2)
    client = app.test_client()
    job_id = client.post("/api/v1/jobs", json={
        "task": "noop", "items": [{}] * 3000}).json["id"]
    wait_for(lambda: _job(client, job_id)["state"] == "succeeded", 60,
             "3,000 no-op items did not drain")
    j = _job(client, job_id)
    assert j["items"]["succeeded"] == 3000 and j["items"]["failed"] == 0
    disp = app.extensions["bulkrunner"].dispatcher
    # Short items: claim-ahead is on, each item taking a share of a worker.
    assert disp.executor.paces.cost("noop") < 1


def test_cancel_reaches_items_claimed_ahead(app_factory: Any) -> None:
    app = app_factory(max_workers=1)
    client = app.test_client()
    # Warm up with short items so claim-ahead is on, then a bulk that is cancelled at once.
    warm = client.post("/api/v1/jobs", json={"task": "noop", "items": [{}] * 200}).json["id"]
    wait_for(lambda: _job(client, warm)["state"] == "succeeded", 30, "warm-up did not finish")
    job_id = client.post("/api/v1/jobs", json={
        "task": "record", "items": [{"path": "/dev/null", "i": i, "delay": 0.05}
                                    for i in range(50)]}).json["id"]
    wait_for(lambda: _job(client, job_id)["items"]["running"] > 0, 30, "nothing started")
    assert client.post(f"/api/v1/jobs/{job_id}/cancel").status_code == 200
    j = _job(client, job_id)
    assert j["state"] == "cancelled" and j["items"]["running"] == 0
    assert j["items"]["succeeded"] + j["items"]["cancelled"] == 50
    # What the executor still held comes back as cancelled, and is never recorded.
    disp = app.extensions["bulkrunner"].dispatcher
    wait_for(lambda: disp.inflight == 0, 30, "claimed-ahead items did not come back")
    assert _job(client, job_id)["items"]["cancelled"] == j["items"]["cancelled"]


def test_items_claimed_ahead_go_back_when_a_long_item_holds_the_thread(
        app_factory: Any) -> None:
    app = app_factory(max_workers=1)
    client = app.test_client()
    warm = client.post("/api/v1/jobs", json={"task": "noop", "items": [{}] * 200}).json["id"]
    wait_for(lambda: _job(client, warm)["state"] == "succeeded", 30, "warm-up did not finish")
    disp = app.extensions["bulkrunner"].dispatcher
    assert disp.executor.paces.cost("noop") < 1, "claim-ahead should be on after short items"
    long_id = client.post("/api/v1/jobs", json={"task": "stubborn",
                                                "params": {"seconds": 1.5}}).json["id"]
    after = client.post("/api/v1/jobs", json={"task": "noop", "items": [{}] * 5}).json["id"]
    wait_for(lambda: _job(client, long_id)["state"] == "running", 10, "long item not started")
    # Whatever was claimed ahead behind the long item goes back within a few turns.
    wait_for(lambda: _job(client, after)["items"]["running"] == 0, 1.0,
             "items claimed ahead stayed 'running' behind a long item")
    assert _job(client, long_id)["state"] == "running"
    wait_for(lambda: _job(client, after)["state"] == "succeeded", 30, "later items never ran")
    items = client.get(f"/api/v1/jobs/{after}/items").json["items"]
    assert all(it["attempts"] == 1 for it in items)


def test_items_claimed_ahead_behind_a_long_one_are_given_back(app_factory: Any,
                                                               tmp_path: Any) -> None:
    app = app_factory(max_workers=1)
    client = app.test_client()
    runs = tmp_path / "runs.txt"
    # Short items first, so the next ones are claimed ahead in one batch on the thread.
    warm = client.post("/api/v1/jobs", json={
        "task": "record", "items": [{"path": str(runs), "i": -1}] * 200}).json["id"]
    wait_for(lambda: _job(client, warm)["state"] == "succeeded", 30, "warm-up did not finish")
    runs.write_text("")
    job_id = client.post("/api/v1/jobs", json={"task": "record", "items": [
        {"path": str(runs), "i": i, "delay": 1.5 if i == 0 else 0} for i in range(20)]}).json["id"]
    # Item 0 holds the only thread; those claimed with it wait, and go back to the queue
    # (free of charge) instead of waiting for it.
    wait_for(lambda: _job(client, job_id)["items"] == {
        "total": 20, "queued": 19, "running": 1, "succeeded": 0, "failed": 0,
        "cancelled": 0}, 10,
        "the items behind the long one were not given back while it ran")
    wait_for(lambda: _job(client, job_id)["state"] == "succeeded", 30, "the job did not finish")
    items = client.get(f"/api/v1/jobs/{job_id}/items?limit=100").json["items"]
    assert sorted(int(x) for x in runs.read_text().split()) == list(range(20))  # once each
    assert {it["attempts"] for it in items} == {1}


def _drain_during_a_held_turn(app_factory: Any, grace: float
                              ) -> tuple[Any, str, threading.Event, threading.Thread]:
    """A one-item job whose turn is held between its commit (the item is running in the
    store) and its hand-over to the executor, and a drain of ``grace`` seconds begun
    meanwhile: (service, job id, the event that lets the turn go on, the drain's thread)."""
    app = app_factory(max_workers=1)
    svc = app.extensions["bulkrunner"]
    blocked, release = threading.Event(), threading.Event()

    def hold(e: JobChanged) -> None:
        if e.new == "running" and not blocked.is_set():
            blocked.set()
            release.wait(30)

    svc.events.subscribe(JobChanged, hold)
    job_id = app.test_client().post("/api/v1/jobs", json={
        "task": "slow", "params": {"seconds": 0.3}}).json["id"]
    assert blocked.wait(10), "the job never became running"
    drain = threading.Thread(target=svc.dispatcher.drain, args=(grace,))
    drain.start()
    return svc, job_id, release, drain


def test_a_drain_waits_for_items_a_turn_claimed_and_has_not_handed_over(
        app_factory: Any) -> None:
    # The drain must wait for the held turn's item as for any running one, not stop at
    # once and leave it to be re-queued.
    svc, job_id, release, drain = _drain_during_a_held_turn(app_factory, 10)
    wait_for(lambda: svc.dispatcher.draining, 10, "the drain did not begin")
    release.set()
    drain.join(30)
    assert not drain.is_alive(), "the drain did not end"
    job = svc.store.get_job(job_id)
    assert job.state.value == "succeeded", (job.state, job.counts)


def test_a_drain_waits_for_a_turn_only_within_its_grace(app_factory: Any) -> None:
    # A turn that does not end (a database locked by another program, an executor that
    # hangs) must not hold a drain past its grace, nor a second Ctrl-C.
    svc, job_id, release, drain = _drain_during_a_held_turn(app_factory, 0.2)
    try:
        wait_for(svc.dispatcher._stop.is_set, 10,
                 "the drain waited past its grace for the turn under way")
    finally:
        release.set()
    drain.join(30)
    assert not drain.is_alive(), "the drain did not end"
    job = svc.store.get_job(job_id)
    assert job.state.value in ("queued", "succeeded"), (job.state, job.counts)
