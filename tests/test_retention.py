"""Retention: old finished jobs go with their items and logs, recent ones and unfinished
ones stay; by the server on its own, through the API and through `bulkrunner prune`."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest
from flask import Flask

from bulkrunner.config import RetentionConfig, config_from_dict
from bulkrunner.errors import ConfigError, NotFound
from bulkrunner.models import STATES, State
from bulkrunner.server.retention import Pruner
from bulkrunner.store import Finish, NewJob, Store, jobs
from tests.conftest import JOBS, ServerProcess, run_cli, toml_config, wait_for

DAY = 86400.0


def make_job(store: Store, outcome: str, n: int = 1, task: str = "t",
             age: float = 0.0) -> str:
    """A job whose ``n`` items ended ``outcome``, each with a log; finished ``age`` ago."""
    ident = uuid.uuid4().hex
    items = [None] if n == 1 else [json.dumps({"i": i}) for i in range(n)]
    store.insert_job(NewJob(id=ident, task=task, params={}, items=items))
    if outcome == "cancelled":
        store.cancel_job(ident)
    elif outcome != "queued":
        claimed = [c for c in store.claim(n) if c.job_id == ident]
        assert len(claimed) == n
        store.append_logs({(c.job_seq, c.index, c.claim): f"log of {c.index}\n"
                           for c in claimed})
        if outcome != "running":
            store.finish([Finish(c.job_seq, c.index, c.claim, ok=outcome == "succeeded",
                                 result="1", error={"type": "E", "message": "x"})
                          for c in claimed])
    if age:
        seq = store.resolve_id(ident)
        store.write(lambda tx: tx.conn.execute(
            "UPDATE jobs SET finished_at = finished_at - ? WHERE seq = ?", (age, seq)))
    return ident


def rows(store: Store, table: str) -> int:
    conn = sqlite3.connect(store.path)
    try:
        return int(conn.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0])
    finally:
        conn.close()


def exists(store: Store, ident: str) -> bool:
    try:
        store.get_job(ident)
    except Exception:
        return False
    return True


def test_old_jobs_go_and_recent_ones_stay(store: Store) -> None:
    cfg = RetentionConfig(succeeded=7 * DAY, failed=30 * DAY, cancelled=7 * DAY)
    old_ok = make_job(store, "succeeded", n=3, age=8 * DAY)
    new_ok = make_job(store, "succeeded", age=6 * DAY)
    old_failed = make_job(store, "failed", n=2, age=31 * DAY)
    kept_failed = make_job(store, "failed", age=8 * DAY)  # failed ones are kept longer
    old_cancelled = make_job(store, "cancelled", age=8 * DAY)
    running = make_job(store, "running")
    queued = make_job(store, "queued")
    assert rows(store, "logs") == 3 + 1 + 2 + 1 + 1

    before = store.counts_by_task()["t"]
    pruner = Pruner(store, cfg)
    preview = pruner.run(dry_run=True)
    assert preview == {"dry_run": True, "jobs": {"succeeded": 1, "failed": 1, "cancelled": 1},
                       "items": {"succeeded": 3, "failed": 2, "cancelled": 1}}
    assert rows(store, "jobs") == 7  # a dry run deletes nothing

    done = pruner.run()
    assert done == {**preview, "dry_run": False}
    for ident in (old_ok, old_failed, old_cancelled):
        assert not exists(store, ident)
    for ident in (new_ok, kept_failed, queued, running):
        assert exists(store, ident)
    assert rows(store, "items") == 4 and rows(store, "logs") == 3
    after = store.counts_by_task()["t"]  # the metrics' counts follow
    assert after == {**before, "succeeded": before["succeeded"] - 3,
                     "failed": before["failed"] - 2, "cancelled": before["cancelled"] - 1}
    assert pruner.run()["jobs"] == {"succeeded": 0, "failed": 0, "cancelled": 0}


def test_zero_keeps_a_state_forever(store: Store) -> None:
    old = make_job(store, "failed", age=1000 * DAY)
    gone = make_job(store, "succeeded", age=2 * DAY)
    out = Pruner(store, RetentionConfig(succeeded=DAY, failed=0)).run()
    assert out["jobs"] == {"succeeded": 1, "failed": 0, "cancelled": 0}
    assert exists(store, old) and not exists(store, gone)


def test_a_big_job_goes_in_small_steps(store: Store) -> None:
    big = make_job(store, "succeeded", n=250, age=2 * DAY)
    small = make_job(store, "succeeded", n=2, age=3 * DAY)
    before = time.time() - DAY
    # The older, small job first; then the big one is taken away at once, and its 500
    # rows (250 items, 250 logs) follow a budget at a time.
    assert store.prune_step("succeeded", before, budget=100) == (1, 2, True)
    assert store.prune_step("succeeded", before, budget=100) == (1, 250, True)
    assert not exists(store, big) and rows(store, "items") == 250
    steps = []
    while True:
        step = store.prune_step("succeeded", before, budget=100)
        steps.append(step)
        if not step[2]:
            break
    assert steps == [(0, 0, True)] * 5 + [(0, 0, False)]
    assert not exists(store, big) and not exists(store, small)
    assert rows(store, "items") == 0 and rows(store, "logs") == 0


def test_logs_of_a_deleted_job_are_dropped(store: Store) -> None:
    ident = make_job(store, "succeeded", age=2 * DAY)
    seq = store.resolve_id(ident)
    Pruner(store, RetentionConfig(succeeded=DAY)).run()
    store.append_logs({(seq, 0, 1): "late output\n"})  # from a straggling worker
    assert rows(store, "logs") == 0


@pytest.mark.parametrize("text, seconds", [
    ('"45s"', 45), ('"30m"', 1800), ('"12h"', 43200), ('"7d"', 604800), ('"2w"', 1209600),
    ('"1.5h"', 5400), ("90", 90), ("2.5", 2.5), ('"0"', 0)])
def test_retention_ages_in_the_config(text: str, seconds: float, tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text(f"[retention]\nsucceeded = {text}\n")
    from bulkrunner.config import load_config
    assert load_config(path).retention.succeeded == seconds


@pytest.mark.parametrize("table, key, words", [
    ({"succeeded": "7x"}, "retention.succeeded", 'an age like "7d"'),
    ({"failed": -1}, "retention.failed", "0 (keep forever)"),
    ({"cancelled": True}, "retention.cancelled", "must be a number"),
    ({"interval": "0s"}, "retention.interval", "at least 1 second"),
    ({"kept": "1d"}, "retention.kept", "unknown key"),
])
def test_retention_config_errors(table: dict[str, object], key: str, words: str) -> None:
    with pytest.raises(ConfigError) as e:
        config_from_dict({"retention": table}, source="x.toml")
    assert e.value.key == key and words in e.value.message


# --------------------------------------------------------------------------- the server
def test_the_server_prunes_on_its_own(app_factory: Callable[..., Flask]) -> None:
    app = app_factory(extra='[retention]\nsucceeded = 1\nfailed = 0\ninterval = 1')
    client = app.test_client()
    ok = client.post(JOBS, json={"task": "add", "params": {"a": 1}}).get_json()["id"]
    bad = client.post(JOBS, json={"task": "square", "params": {"x": -1}}).get_json()["id"]
    wait_for(lambda: client.get(f"{JOBS}/{ok}").status_code == 404, 15,
             "the succeeded job is deleted a second after it finished")
    assert client.get(f"{JOBS}/{bad}").get_json()["state"] == "failed"  # kept forever


def test_prune_route(app_factory: Callable[..., Flask]) -> None:
    app = app_factory(extra='[retention]\nsucceeded = "1h"')
    svc = app.extensions["bulkrunner"]
    old = make_job(svc.store, "succeeded", n=2, task="add", age=2 * 3600)
    recent = make_job(svc.store, "succeeded", task="add")
    client = app.test_client()
    r = client.post("/api/v1/prune?dry_run=1")
    assert r.status_code == 200
    assert r.get_json() == {"dry_run": True,
                            "jobs": {"succeeded": 1, "failed": 0, "cancelled": 0},
                            "items": {"succeeded": 2, "failed": 0, "cancelled": 0}}
    assert client.get(f"{JOBS}/{old}").status_code == 200
    r = client.post("/api/v1/prune")
    assert r.status_code == 200 and r.get_json()["jobs"]["succeeded"] == 1
    assert client.get(f"{JOBS}/{old}").status_code == 404
    assert client.get(f"{JOBS}/{recent}").get_json()["state"] == State.SUCCEEDED
    r = client.post("/api/v1/prune?dry_run=maybe")
    assert r.status_code == 400 and r.get_json()["error"]["code"] == "invalid_request"
    assert client.get("/api/v1/prune").status_code == 405


def test_prune_command(serve: Callable[..., ServerProcess], tmp_path: Path) -> None:
    server = serve(toml_config(tmp_path, extra='[retention]\nsucceeded = "1h"'))
    store = Store(str(tmp_path / "test.db"))  # a second writer, as another process would be
    try:
        old = make_job(store, "succeeded", n=3, task="add", age=2 * 3600)
    finally:
        store.close()

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return run_cli(*args, url=server.url)

    out = cli("prune", "--dry-run")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == ("would delete 1 job(s) with 3 item(s) (1 succeeded, "
                                  "0 failed, 0 cancelled)")
    assert cli("status", old).returncode == 0
    out = cli("prune", "--json")
    assert out.returncode == 0 and json.loads(out.stdout)["jobs"]["succeeded"] == 1
    assert cli("status", old).returncode == 2  # 404: gone


# --------------------------------------------------------------------------- prune vs. readers
def test_a_job_being_pruned_is_gone_at_once_and_its_counts_with_it(store: Store) -> None:
    # The reviewer's repro: one budget of a 3,000-item job deleted, then a retry. The job
    # used to stay with all its counts and a retry re-queued what was left of it.
    ident = make_job(store, "failed", n=3000, age=40 * DAY)
    seq = store.resolve_id(ident)
    store.prune_step("failed", time.time() - 30 * DAY, budget=2000)
    assert rows(store, "items") > 0  # its rows go later, in steps
    for act in (store.get_job, store.retry_job, store.cancel_job, store.list_items,
                store.export_rows):
        with pytest.raises(NotFound):
            act(ident)
    with pytest.raises(NotFound):
        jobs.items_page(store._read(), seq, limit=10, after=None)
    assert store.list_jobs()[0] == []
    assert store.stats() == dict.fromkeys(STATES, 0)
    assert store.counts_by_task().get("t", dict.fromkeys(STATES, 0)) == dict.fromkeys(STATES, 0)
    store.append_logs({(seq, 0, 1): "late output\n"})  # a straggler's log is dropped
    assert store.prunable("failed", time.time() - 30 * DAY) == (0, 0)
    while store.prune_step("failed", time.time() - 30 * DAY, budget=2000)[2]:
        pass
    assert rows(store, "jobs") == rows(store, "items") == rows(store, "logs") == 0
    assert store.stats() == dict.fromkeys(STATES, 0)


def test_a_prune_cut_short_is_finished_after_a_restart(tmp_path: Path) -> None:
    path = str(tmp_path / "t.db")
    store = Store(path)
    ident = make_job(store, "succeeded", n=2500, age=2 * DAY)
    kept = make_job(store, "failed", n=2)
    store.prune_step("succeeded", time.time() - DAY, budget=1000)  # taken away
    store.prune_step("succeeded", time.time() - DAY, budget=1000)  # a first slice deleted
    store.close()  # the server stops mid-prune
    store = Store(path)
    try:
        assert not exists(store, ident) and exists(store, kept)
        assert store.stats() == {**dict.fromkeys(STATES, 0), "failed": 2}
        assert rows(store, "items") > 2
        # Even with nothing left to prune by age, the job's leftovers go.
        Pruner(store, RetentionConfig(succeeded=0, failed=0, cancelled=0)).run()
        assert rows(store, "items") == 2 and rows(store, "logs") == 2
        assert rows(store, "jobs") == 1
    finally:
        store.close()


def test_the_pruner_thread_reaps_leftovers_with_retention_off(tmp_path: Path) -> None:
    path = str(tmp_path / "t.db")
    store = Store(path)
    make_job(store, "succeeded", n=300, age=2 * DAY)
    store.prune_step("succeeded", time.time() - DAY, budget=100)
    assert rows(store, "items") == 300  # taken away, nothing deleted yet
    pruner = Pruner(store, RetentionConfig(succeeded=0, failed=0, cancelled=0))
    pruner.start()
    try:
        wait_for(lambda: rows(store, "jobs") == 0, 15, "the leftovers were not reaped")
        assert rows(store, "items") == rows(store, "logs") == 0
    finally:
        pruner.stop()
        store.close()


def test_an_export_started_before_a_prune_is_whole(store: Store) -> None:
    ident = make_job(store, "succeeded", n=2500, age=2 * DAY)
    items = store.export_rows(ident)  # the snapshot is taken now
    while store.prune_step("succeeded", time.time() - DAY, budget=500)[2]:
        pass
    assert rows(store, "items") == 0
    assert [r[0] for chunk in items for r in chunk] == list(range(2500))


def test_reads_racing_a_prune_get_404_or_everything(store: Store) -> None:
    ident = make_job(store, "succeeded", n=3000, age=2 * DAY)
    seq = store.resolve_id(ident)
    outcomes: list[str] = []
    problems: list[BaseException] = []
    done = threading.Event()

    def read() -> None:
        while not done.is_set():
            try:
                job = store.get_job(ident)
                assert job.counts["succeeded"] == job.total == 3000
                assert len(jobs.items_page(store._read(), seq, limit=5000, after=None)) == 3000
                assert sum(map(len, store.export_rows(ident))) == 3000
                assert len(store.list_items(ident, limit=5000)[0]) == 3000
                outcomes.append("whole")
            except NotFound:
                outcomes.append("404")
            except BaseException as e:
                problems.append(e)
                return

    readers = [threading.Thread(target=read) for _ in range(3)]
    for t in readers:
        t.start()
    try:
        wait_for(lambda: outcomes, 15, "no read finished before the prune")
        while True:
            reads = len(outcomes)
            if not store.prune_step("succeeded", time.time() - DAY, budget=100)[2]:
                break
            # Let the readers in between steps: one more read ends before the next step.
            wait_for(lambda n=reads: len(outcomes) > n or problems, 15,
                     "no read ended between two prune steps", interval=0.001)
        wait_for(lambda: outcomes[-1:] == ["404"], 15, "reads did not see the job gone")
    finally:
        done.set()
        for t in readers:
            t.join(timeout=30)
    assert not problems, problems
    assert set(outcomes) == {"whole", "404"}


def test_the_api_answers_404_for_a_job_being_pruned(app_factory: Callable[..., Flask]) -> None:
    app = app_factory(extra='[retention]\nsucceeded = "1h"')
    svc = app.extensions["bulkrunner"]
    ident = make_job(svc.store, "succeeded", n=300, task="add", age=2 * 3600)
    client = app.test_client()
    export = client.get(f"{JOBS}/{ident}/results?format=csv")  # streamed, not read yet
    svc.store.prune_step("succeeded", time.time() - 3600, budget=100)  # taken away
    for r in (client.get(f"{JOBS}/{ident}"), client.get(f"{JOBS}/{ident}/items"),
              client.get(f"{JOBS}/{ident}/results"), client.post(f"{JOBS}/{ident}/retry"),
              client.post(f"{JOBS}/{ident}/cancel"), client.get(f"{JOBS}/{ident}/items/0/log")):
        assert r.status_code == 404, (r.request.path, r.get_data(as_text=True))
    assert ident not in {j["id"] for j in client.get(JOBS).get_json()["jobs"]}
    while svc.store.prune_step("succeeded", time.time() - 3600, budget=100)[2]:
        pass
    assert len(export.get_data(as_text=True).splitlines()) == 301  # header and every item
