"""The store's batched paths: many successes in one statement, a job's claim in one ranged
UPDATE, and claims that go job by job. Each must record exactly what the one-by-one path
would, including the cases that break a batch (a stale outcome, a gap in a job's queue)."""

from __future__ import annotations

import json
import logging
import sqlite3
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from bulkrunner.models import State
from bulkrunner.server.pacing import Pacer
from bulkrunner.store import Finish, NewJob, Store


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    s = Store(str(tmp_path / "t.db"))
    yield s
    s.close()


def _job(n: int, attempts: int = 1, priority: int = 0) -> NewJob:
    return NewJob(id=uuid.uuid4().hex, task="t", params={"base": 1},
                  items=[json.dumps({"i": i}) for i in range(n)], priority=priority,
                  max_attempts=attempts)


def _planned(store: Store, n: int) -> list[tuple[int, int, int]]:
    p = Pacer()
    p.load(store.waiting_jobs(), store.paused_tasks(), 0)
    return [(c.job_seq, c.index, c.claim) for c in store.turn([], n, planner=p).claimed]


def test_many_successes_are_recorded_together(store: Store) -> None:
    job, _ = store.insert_job(_job(40))
    claimed = store.claim(40)
    turn = store.finish([Finish(c.job_seq, c.index, c.claim, ok=True, result=str(c.index))
                         for c in claimed])
    assert turn.states == ["succeeded"] * 40
    done = store.get_job(job.id)
    assert done.state is State.SUCCEEDED and done.counts["succeeded"] == 40
    items, _ = store.list_items(job.id, limit=100)
    assert [it.result for it in items] == list(range(40))
    assert all(it.attempts == 1 and it.finished_at is not None for it in items)


def test_one_stale_success_among_many_is_told_apart(store: Store) -> None:
    job, _ = store.insert_job(_job(20, attempts=3))
    claimed = store.claim(20)
    # Item 7's attempt timed out and was claimed again: its late success is stale.
    late = claimed[7]
    store.finish([Finish(late.job_seq, 7, late.claim, error={"type": "TimeoutError",
                                                               "message": "late"})])
    (again,) = store.claim(1)
    assert (again.index, again.claim) == (7, late.claim + 1)
    finishes = [Finish(c.job_seq, c.index, c.claim, ok=True, result="1") for c in claimed]
    finishes.append(Finish(again.job_seq, 7, again.claim, ok=True, result="2"))
    states = store.finish(finishes).states
    assert states == ["succeeded"] * 7 + ["stale"] + ["succeeded"] * 12 + ["succeeded"]
    done = store.get_job(job.id)
    assert done.state is State.SUCCEEDED and done.counts["succeeded"] == 20
    items, _ = store.list_items(job.id, limit=100)
    assert items[7].result == 2 and items[7].attempts == 2


def test_a_duplicate_success_in_one_turn_counts_once(store: Store) -> None:
    job, _ = store.insert_job(_job(10))
    claimed = store.claim(10)
    finishes = [Finish(c.job_seq, c.index, c.claim, ok=True) for c in claimed]
    states = store.finish([*finishes, finishes[3]]).states
    assert states == ["succeeded"] * 10 + ["stale"]
    assert store.get_job(job.id).counts["succeeded"] == 10


def test_a_planned_claim_skips_items_that_are_not_claimable(store: Store,
                                                            tmp_path: Path) -> None:
    job, _ = store.insert_job(_job(10, attempts=2))
    first = _planned(store, 4)
    assert [i for _, i, _ in first] == [0, 1, 2, 3]
    seq = first[0][0]
    # Item 1 fails and waits a minute for its retry; item 2 is still running.
    store.finish([Finish(seq, 1, first[1][2], error={"type": "E", "message": "x"}),
                  Finish(seq, 0, first[0][2], ok=True),
                  Finish(seq, 3, first[3][2], ok=True)], backoff=lambda attempt: 60.0)
    second = _planned(store, 3)
    assert [(i, c) for _, i, c in second] == [(4, 1), (5, 1), (6, 1)]
    conn = sqlite3.connect(tmp_path / "t.db")
    rows = dict(conn.execute("SELECT idx, state FROM items WHERE job_seq = ? ORDER BY idx",
                             (seq,)).fetchall())
    conn.close()
    assert rows == {0: "succeeded", 1: "queued", 2: "running", 3: "succeeded",
                    4: "running", 5: "running", 6: "running", 7: "queued", 8: "queued",
                    9: "queued"}
    counts = store.get_job(job.id).counts
    assert (counts["queued"], counts["running"], counts["succeeded"]) == (4, 4, 2)


def test_planned_claims_carry_each_items_params(store: Store) -> None:
    store.insert_job(_job(3))
    p = Pacer()
    p.load(store.waiting_jobs(), store.paused_tasks(), 0)
    claimed = store.turn([], 3, planner=p).claimed
    assert [c.params for c in claimed] == [{"base": 1, "i": i} for i in range(3)]


def test_claims_without_a_planner_go_by_priority_then_job_then_index(store: Store) -> None:
    low, _ = store.insert_job(_job(3))
    high, _ = store.insert_job(_job(2, priority=5))
    mid, _ = store.insert_job(_job(1, priority=1))
    order = [(c.job_id, c.index) for c in store.claim(10)]
    assert order == [(high.id, 0), (high.id, 1), (mid.id, 0), (low.id, 0), (low.id, 1),
                     (low.id, 2)]


def test_an_old_database_loses_the_unused_queue_index(tmp_path: Path) -> None:
    from bulkrunner.store import MIGRATIONS
    from bulkrunner.store.schema import migrate
    path = tmp_path / "old.db"
    conn = sqlite3.connect(path, isolation_level=None)
    for step in MIGRATIONS[:6]:
        conn.execute("BEGIN")
        step(conn)
        conn.execute("COMMIT")
    conn.execute("PRAGMA user_version = 6")
    assert conn.execute("SELECT 1 FROM sqlite_master WHERE name = 'items_queue'").fetchone()
    migrate(conn)
    assert conn.execute("SELECT 1 FROM sqlite_master WHERE name = 'items_queue'"
                        ).fetchone() is None
    conn.close()


def _index_names(path: Path) -> set[str]:
    conn = sqlite3.connect(path)
    try:
        return {r[0] for r in conn.execute(
            "SELECT name FROM sqlite_master WHERE type = 'index' AND tbl_name = 'items' "
            "AND sql IS NOT NULL")}
    finally:
        conn.close()


def test_an_old_database_gets_partial_indexes_of_states_and_keeps_its_items(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "old.db"
    s = Store(str(path))
    job, _ = s.insert_job(_job(8))
    other, _ = s.insert_job(_job(3))
    c = s.claim(5)  # job: 0-4 running, 5-7 queued
    s.finish([Finish(c[0].job_seq, 0, c[0].claim, ok=True, result="0"),
              Finish(c[1].job_seq, 1, c[1].claim, error={"type": "E", "message": "no"}),
              Finish(c[2].job_seq, 2, c[2].claim, ok=True, result="2")])
    s.cancel_job(other.id)
    s.close()
    # What a database of the version before looked like: one index of every item by state.
    conn = sqlite3.connect(path, isolation_level=None)
    conn.executescript("DROP INDEX items_queued; DROP INDEX items_failed; "
                       "DROP INDEX items_cancelled; "
                       "CREATE INDEX items_by_state ON items(job_seq, state, idx); "
                       "PRAGMA user_version = 7;")
    conn.close()
    with caplog.at_level(logging.INFO, logger="bulkrunner.store"):
        s = Store(str(path))
    try:
        said = [r.getMessage() for r in caplog.records if r.name == "bulkrunner.store"]
        assert said[0].startswith("upgrading the database from schema version 7 to 8")
        assert said[1].startswith("database upgraded to schema version 8 in ")
        assert _index_names(path) == {"items_running", "items_queued", "items_failed",
                                      "items_cancelled"}
        by_state = {st: [it.index for it in s.list_items(job.id, state=st, limit=100)[0]]
                    for st in ("queued", "running", "succeeded", "failed", "cancelled")}
        assert by_state == {"queued": [5, 6, 7], "running": [3, 4], "succeeded": [0, 2],
                            "failed": [1], "cancelled": []}
        assert [it.index for it in s.list_items(other.id, state="cancelled", limit=100)[0]
                ] == [0, 1, 2]
        assert [(x.job_id, x.index) for x in s.claim(10)] == [(job.id, 5), (job.id, 6),
                                                                (job.id, 7)]
        assert s.get_job(job.id).failures[0]["count"] == 1  # read through items_failed
        s.retry_job(other.id)
        assert [it.index for it in s.list_items(other.id, state="queued", limit=100)[0]
                ] == [0, 1, 2]
    finally:
        s.close()


def test_a_state_that_is_not_one_never_reaches_a_statement(store: Store) -> None:
    job, _ = store.insert_job(_job(2))
    for bad in ("done", "queued' OR 1=1 --"):
        with pytest.raises(ValueError, match=r"unknown state .*one of queued, running"):
            store.list_items(job.id, state=bad)
        with pytest.raises(ValueError, match="unknown state"):
            store.export_rows(job.id, state=bad)
    assert [it.index for it in store.list_items(job.id, state="queued")[0]] == [0, 1]
