"""Big bulks are written in slices, each its own commit, so other writes wait for a slice
and not for the whole bulk; the job stays hidden until its last slice commits (a 202 still
means the job and all its items are committed), and what a crash leaves half-written is
deleted later, never shown."""

from __future__ import annotations

import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from bulkrunner.errors import KeyConflict, NotFound
from bulkrunner.store import NewJob, Store
from bulkrunner.store.inserts import SLICE_ITEMS


def _bulk(n: int, **kw: Any) -> NewJob:
    return NewJob(id=kw.pop("id", None) or f"{time.monotonic_ns():032x}"[-32:], task="t",
                  params={}, items=[f'{{"i": {i}}}' for i in range(n)], **kw)


def test_a_small_job_commits_between_the_slices_of_a_big_one(store: Store) -> None:
    n = 3 * SLICE_ITEMS + 7
    big = _bulk(n)
    writer = store._writer
    real = writer.write
    calls = 0
    seen: dict[str, Any] = {}

    def write(fn: Any, *, durable: bool = False) -> Any:
        nonlocal calls
        value = real(fn, durable=durable)
        if threading.current_thread().name == "big":
            calls += 1
            if calls == 2:  # two slices are in: a one-item job goes in now, in between
                small = threading.Thread(target=lambda: seen.update(
                    small=store.insert_job(_bulk(1))[0]))
                small.start()
                small.join(30)
                assert not small.is_alive(), "the one-item job waited for the whole bulk"
                with pytest.raises(NotFound):
                    store.get_job(big.id)  # half-written: hidden
                seen["queued"] = store.queued
        return value

    writer.write = write  # type: ignore[method-assign]
    t = threading.Thread(target=lambda: seen.update(big=store.insert_job(big)[0]), name="big")
    t.start()
    t.join(60)
    assert not t.is_alive()
    writer.write = real  # type: ignore[method-assign]
    assert seen["queued"] == 1, "the half-written bulk counted as queued"
    job = store.get_job(big.id)
    assert job.counts["queued"] == n and job.state.value == "queued"
    items, _ = store.list_items(big.id, limit=10)
    assert [it.index for it in items] == list(range(10))
    last, _ = store.list_items(big.id, after=n - 3, limit=10)
    assert [it.index for it in last] == [n - 2, n - 1] and last[-1].params == {"i": n - 1}
    assert store.queued == n + 1
    assert seen["small"].counts["queued"] == 1


def test_readers_see_a_big_bulk_whole_or_not_at_all(store: Store) -> None:
    n = 5 * SLICE_ITEMS
    big = _bulk(n)
    done = threading.Event()
    looks: list[int | None] = []

    def look() -> None:
        while not done.is_set():
            try:
                looks.append(store.get_job(big.id).counts["queued"])
            except NotFound:
                looks.append(None)
            looks.append(sum(j.counts["queued"] for j in store.list_jobs(limit=5)[0]))

    reader = threading.Thread(target=look)
    reader.start()
    store.insert_job(big)
    done.set()
    reader.join(30)
    assert set(looks) <= {None, 0, n}, sorted(set(map(str, looks)))
    assert store.get_job(big.id).counts["queued"] == n


def test_a_failed_bulk_leaves_nothing_visible(store: Store,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    import bulkrunner.store.inserts as inserts

    real = inserts.insert_items

    def fail_third(tx: Any, seq: int, new: NewJob, start: int) -> None:
        if start >= 2 * SLICE_ITEMS:
            raise sqlite3.OperationalError("disk I/O error (from the test)")
        real(tx, seq, new, start)

    monkeypatch.setattr(inserts, "insert_items", fail_third)
    big = _bulk(4 * SLICE_ITEMS)
    with pytest.raises(sqlite3.OperationalError):
        store.insert_job(big)
    monkeypatch.setattr(inserts, "insert_items", real)
    with pytest.raises(NotFound):
        store.get_job(big.id)
    assert store.queued == 0 and store.list_jobs()[0] == []
    while store.reap_step():  # retention's deleter takes its rows away
        pass
    conn = sqlite3.connect(store.path)
    assert conn.execute("SELECT COUNT(*) FROM items").fetchone()[0] == 0
    assert conn.execute("SELECT COUNT(*) FROM jobs").fetchone()[0] == 0
    conn.close()


def test_what_a_crash_left_half_written_is_deleted_at_the_next_start(tmp_path: Path) -> None:
    path = str(tmp_path / "t.db")
    Store(path).close()
    conn = sqlite3.connect(path)  # as a server killed in the middle of a bulk leaves it
    conn.execute("INSERT INTO jobs (id, task, params, state, created_at, doomed) VALUES "
                 "('0123456789abcdef0123456789abcdef', 't', '{}', 'inserting', ?, 2)",
                 (time.time() - 3600,))
    conn.executemany("INSERT INTO items (job_seq, idx, state) VALUES (1, ?, 'queued')",
                     ((i,) for i in range(500)))
    conn.commit()
    conn.close()
    store = Store(path)
    try:
        assert store.queued == 0
        with pytest.raises(NotFound):
            store.get_job("0123456789abcdef0123456789abcdef")
        assert store.claim(10) == []
        while store.reap_step():
            pass
        assert store.reaping() == 0
    finally:
        store.close()


def test_a_big_keyed_bulk_replays_and_conflicts_like_a_small_one(store: Store) -> None:
    n = 2 * SLICE_ITEMS + 1
    first, created = store.insert_job(_bulk(n, key="k", body_hash="h"))
    assert created
    again, created = store.insert_job(_bulk(n, key="k", body_hash="h"))
    assert not created and again.id == first.id
    with pytest.raises(KeyConflict):
        store.insert_job(_bulk(n, key="k", body_hash="other"))
    assert store.queued == n
