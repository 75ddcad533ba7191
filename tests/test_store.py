"""The store on a real SQLite file: the queue, transitions, counts and recovery."""

from __future__ import annotations

import json
import sqlite3
import threading
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from bulkrunner.errors import (
    AmbiguousId,
    JobFinished,
    KeyConflict,
    NotFound,
    NothingToRetry,
    QueueFull,
)
from bulkrunner.models import State
from bulkrunner.store import MIGRATIONS, Finish, NewJob, Store
from bulkrunner.store.records import Tx
from tests.conftest import wait_for


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    s = Store(str(tmp_path / "t.db"))
    yield s
    s.close()


def new(n: int = 1, priority: int = 0, key: str | None = None, attempts: int = 1,
        **params: object) -> NewJob:
    items = [None] if n == 1 else [json.dumps({"i": i}) for i in range(n)]
    return NewJob(id=uuid.uuid4().hex, task="t", params=dict(params), items=items,
                  priority=priority, max_attempts=attempts, key=key, body_hash=str(params))


def test_schema_version_and_wal(store: Store, tmp_path: Path) -> None:
    conn = sqlite3.connect(tmp_path / "t.db")
    assert conn.execute("PRAGMA user_version").fetchone()[0] == len(MIGRATIONS)
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    conn.close()


def test_insert_is_committed_and_counted(store: Store, tmp_path: Path) -> None:
    job, created = store.insert_job(new(3))
    assert created and job.state is State.QUEUED and job.total == 3
    other = sqlite3.connect(tmp_path / "t.db")  # another connection sees it at once
    assert other.execute("SELECT COUNT(*) FROM items").fetchone()[0] == 3
    other.close()
    assert store.queued == 3


def test_claim_order_is_priority_then_fifo(store: Store) -> None:
    low, _ = store.insert_job(new(2))
    high, _ = store.insert_job(new(1, priority=5))
    claimed = store.claim(10)
    assert [(c.job_id, c.index) for c in claimed] == [(high.id, 0), (low.id, 0), (low.id, 1)]
    assert claimed[1].params == {"i": 0}
    assert store.claim(10) == []
    assert store.get_job(low.id).state is State.RUNNING
    assert store.queued == 0


def test_finish_success_and_failure(store: Store) -> None:
    job, _ = store.insert_job(new(2))
    a, b = store.claim(2)
    store.finish([Finish(a.job_seq, a.index, a.claim, ok=True, result="42"),
                  Finish(b.job_seq, b.index, b.claim, error={"type": "E", "message": "x"})])
    j = store.get_job(job.id)
    assert j.state is State.FAILED and j.counts["succeeded"] == 1 and j.counts["failed"] == 1
    assert j.finished_at is not None and j.progress == 1.0
    items, _ = store.list_items(job.id)
    assert items[0].result == 42 and items[1].error == {"type": "E", "message": "x",
                                                         "attempt": 1}


def test_failed_attempt_is_retried_until_attempts_run_out(store: Store) -> None:
    job, _ = store.insert_job(new(1, attempts=2))
    (c,) = store.claim(1)
    store.finish([Finish(c.job_seq, 0, c.claim, error={"type": "E", "message": "1"})])
    assert store.get_job(job.id).state is State.QUEUED
    (c,) = store.claim(1)
    store.finish([Finish(c.job_seq, 0, c.claim, error={"type": "E", "message": "2"})])
    (item,), _ = store.list_items(job.id)
    assert item.state is State.FAILED and item.attempts == 2
    assert [e["message"] for e in item.errors] == ["1", "2"]


def test_backoff_delays_the_next_claim(store: Store) -> None:
    store.insert_job(new(1, attempts=2))
    (c,) = store.claim(1)
    store.finish([Finish(c.job_seq, 0, c.claim, error={"type": "E", "message": "x"})],
                 backoff=lambda attempt: 60.0)
    assert store.claim(1) == []


def test_stale_outcomes_are_ignored(store: Store) -> None:
    job, _ = store.insert_job(new(1, attempts=3))
    (c,) = store.claim(1)
    store.finish([Finish(c.job_seq, 0, c.claim, error={"type": "TimeoutError",
                                                         "message": "late"})])
    (c2,) = store.claim(1)
    assert c2.claim == c.claim + 1
    # The first attempt's late result arrives now: it must not touch the new attempt.
    assert store.finish([Finish(c.job_seq, 0, c.claim, ok=True, result="1")]).states == ["stale"]
    assert store.get_job(job.id).state is State.RUNNING


def test_uncharged_finish_requeues_without_spending_an_attempt(store: Store) -> None:
    job, _ = store.insert_job(new(1))
    (c,) = store.claim(1)
    store.finish([Finish(c.job_seq, 0, c.claim, charge=False)])
    (item,), _ = store.list_items(job.id)
    assert item.state is State.QUEUED and item.attempts == 0


def test_cancel_and_retry(store: Store) -> None:
    job, _ = store.insert_job(new(3))
    running = store.claim(1)
    j, keys, changes = store.cancel_job(job.id)
    assert [(ch.old, ch.new) for ch in changes] == [("running", "cancelled")]
    assert keys == [(running[0].job_seq, 0, running[0].claim)]
    assert j.state is State.CANCELLED and j.counts["cancelled"] == 3
    assert store.queued == 0
    with pytest.raises(JobFinished):
        store.cancel_job(job.id)
    j, changes = store.retry_job(job.id)
    assert [(ch.old, ch.new) for ch in changes] == [("cancelled", "queued")]
    assert j.state is State.QUEUED and j.counts["queued"] == 3 and j.finished_at is None
    for c in store.claim(3):
        store.finish([Finish(c.job_seq, c.index, c.claim, ok=True, result="null")])
    assert store.get_job(job.id).state is State.SUCCEEDED
    with pytest.raises(NothingToRetry):
        store.retry_job(job.id)


def test_recovery_requeues_running_and_fails_after_three_interruptions(store: Store) -> None:
    job, _ = store.insert_job(new(1))
    for _ in range(2):
        store.claim(1)
        assert store.requeue_running(interrupted=True)[0] == {"requeued": 1, "failed": 0}
    store.claim(1)
    counts, per_job, changes = store.requeue_running(interrupted=True)
    assert counts == {"requeued": 0, "failed": 1}
    assert per_job == {job.id: {"requeued": 0, "failed": 1}}
    assert [(ch.old, ch.new) for ch in changes] == [("running", "failed")]
    (item,), _ = store.list_items(job.id)
    assert item.state is State.FAILED and item.attempts == 0
    assert item.error is not None and item.error["type"] == "Interrupted"


def test_graceful_requeue_counts_no_interruption(store: Store) -> None:
    store.insert_job(new(1))
    for _ in range(5):
        store.claim(1)
        assert store.requeue_running(interrupted=False)[0]["requeued"] == 1


def test_ids_resolve_by_unique_prefix(store: Store) -> None:
    jobs = [store.insert_job(new())[0] for _ in range(40)]
    j = jobs[0]
    assert store.get_job(j.id[:10]).id == j.id
    assert store.get_job(j.id.upper()).id == j.id
    by_first: dict[str, list[str]] = {}
    for x in jobs:
        by_first.setdefault(x.id[0], []).append(x.id)
    shared = next(k for k, v in by_first.items() if len(v) > 1)
    with pytest.raises(AmbiguousId):
        store.get_job(shared)
    for bad in ("", "zz", "../etc", "a" * 40, "%00"):
        with pytest.raises(NotFound):
            store.get_job(bad)


def test_idempotency_key(store: Store) -> None:
    a, created = store.insert_job(new(key="k", x=1))
    b, created2 = store.insert_job(new(key="k", x=1))
    assert created and not created2 and a.id == b.id
    with pytest.raises(KeyConflict):
        store.insert_job(new(key="k", x=2))


def test_backpressure_is_checked_in_the_transaction(store: Store) -> None:
    store.insert_job(new(5), max_queued=8)
    with pytest.raises(QueueFull, match="max_queued = 8"):
        store.insert_job(new(5), max_queued=8)
    with pytest.raises(QueueFull):  # the keyed path checks the same limit
        store.insert_job(new(5, key="k"), max_queued=8)
    assert store.queued == 5
    assert len(store.list_jobs()[0]) == 1
    store.insert_job(new(3), max_queued=8)  # exactly full is allowed
    assert store.queued == 8


def in_threads(n: int, fn: Callable[[], object]) -> None:
    """Run ``fn`` in ``n`` threads at once; raise the first error one of them raised."""
    errors: list[BaseException] = []

    def run() -> None:
        try:
            fn()
        except BaseException as e:  # surfaced below
            errors.append(e)

    threads = [threading.Thread(target=run) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not any(t.is_alive() for t in threads), "a writer thread did not end within 60 s"
    if errors:
        raise errors[0]


def test_concurrent_writers_share_commits(store: Store) -> None:
    def submit() -> None:
        for _ in range(50):
            store.insert_job(new())

    in_threads(8, submit)
    assert store.queued == 400
    jobs, nxt = store.list_jobs(limit=1000)
    assert len(jobs) == 400 and nxt is None


def test_a_leader_commits_no_batch_without_its_own_write(store: Store) -> None:
    # A leader that went on committing while anything was pending kept its own caller
    # waiting as long as others kept writing (a tenth of a second and more at the p99
    # of eight busy clients). Each batch must hold an operation of the thread that led it.
    seen: list[tuple[int, int, float]] = []  # (thread that ran it, thread that asked, batch)
    lock = threading.Lock()

    def write() -> None:
        me = threading.get_ident()
        for _ in range(100):
            def op(tx: Tx, asked: int = me) -> None:
                with lock:
                    seen.append((threading.get_ident(), asked, tx.now))
            store._writer.write(op)

    in_threads(6, write)
    assert len(seen) == 600
    batches: dict[tuple[int, float], set[int]] = {}
    for ran, asked, batch in seen:
        batches.setdefault((ran, batch), set()).add(asked)
    assert all(leader in asked for (leader, _), asked in batches.items()), batches
    assert any(len(asked) > 1 for asked in batches.values()), "no batch was shared"


def test_a_writer_interrupted_while_it_waits_leaves_nobody_stuck(tmp_path: Path) -> None:
    # Ctrl-C in a script that embeds the store stops a waiting writer mid-wait. Its write
    # must be withdrawn, and the lock must not be handed to its thread, which is gone:
    # every later write would wait for ever. (Not the fixture's store: a failure here
    # would hang its close.)
    import ctypes

    store = Store(str(tmp_path / "t.db"))

    in_commit, go_on = threading.Event(), threading.Event()
    ran: list[str] = []

    def hold(tx: Tx) -> None:  # the leader, inside its transaction until told to go on
        in_commit.set()
        assert go_on.wait(30)
        ran.append("leader")

    def waiter(tx: Tx) -> None:
        ran.append("withdrawn write")

    class Interrupted(Exception):
        pass

    leader = threading.Thread(target=store._writer.write, args=(hold,), daemon=True)
    leader.start()
    assert in_commit.wait(30)
    outcome: list[BaseException] = []

    def wait_in_line() -> None:
        try:
            store._writer.write(waiter)
        except Interrupted as e:
            outcome.append(e)

    waiting = threading.Thread(target=wait_in_line, daemon=True)
    waiting.start()
    wait_for(lambda: len(store._writer._pending) == 1, 10, "the second write never queued")
    assert waiting.ident is not None
    ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(waiting.ident),
                                               ctypes.py_object(Interrupted))
    waiting.join(10)
    assert not waiting.is_alive() and len(outcome) == 1, "the waiting writer was not stopped"
    go_on.set()
    leader.join(10)
    later = threading.Thread(target=store._writer.write, args=(lambda tx: ran.append("later"),),
                             daemon=True)  # daemons: a failure must not hang the run
    later.start()
    later.join(10)
    assert not later.is_alive(), "a write after the interrupted one never got the lock"
    assert ran == ["leader", "later"]
    store.close()


def test_list_pages_newest_first(store: Store) -> None:
    ids = [store.insert_job(new())[0].id for _ in range(5)]
    page, cursor = store.list_jobs(limit=2)
    assert [j.id for j in page] == ids[::-1][:2] and cursor is not None
    page2, _ = store.list_jobs(limit=2, before=cursor)
    assert [j.id for j in page2] == ids[::-1][2:4]


def test_export_reads_in_chunks(store: Store) -> None:
    job, _ = store.insert_job(new(2500))
    chunks = list(store.export_rows(job.id))
    assert [len(c) for c in chunks] == [1000, 1000, 500]
    assert [r[0] for c in chunks for r in c] == list(range(2500))


def test_progress_is_recorded(store: Store) -> None:
    job, _ = store.insert_job(new(2))
    a, _b = store.claim(2)
    store.record_progress({(a.job_seq, 0): (0.5, "half")})
    j = store.get_job(job.id)
    assert j.progress == 0.25 and j.message == "half"


def test_a_paused_job_cancelled_then_retried_runs(store: Store) -> None:
    job, _ = store.insert_job(new(3))
    store.pause_job(job.id)
    store.cancel_job(job.id)
    assert store.get_job(job.id).state.value == "cancelled"
    store.retry_job(job.id)
    again = store.get_job(job.id)
    assert again.state.value == "queued", again.state
    assert len([c for c in store.claim(10) if c.job_id == job.id]) == 3


def test_a_paused_job_whose_running_items_fail_then_retried_runs(store: Store) -> None:
    job, _ = store.insert_job(new(2))
    claimed = [c for c in store.claim(10) if c.job_id == job.id]
    store.pause_job(job.id)  # its items are running: they finish
    store.finish([Finish(c.job_seq, c.index, c.claim, error={"type": "E", "message": "x"},
                         retryable=False) for c in claimed])
    assert store.get_job(job.id).state.value == "failed"
    store.retry_job(job.id)
    again = store.get_job(job.id)
    assert again.state.value == "queued", again.state
    assert len([c for c in store.claim(10) if c.job_id == job.id]) == 2
