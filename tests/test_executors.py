"""The thread executor and the crash-isolated process pool, on their own."""

from __future__ import annotations

import errno
import itertools
import time
from collections.abc import Iterator
from concurrent.futures import wait
from typing import Any

import pytest

from bulkrunner.executors import ExecutorLost, ThreadExecutor, WorkerDied
from bulkrunner.executors.process import ProcessExecutor, describe_exit
from bulkrunner.runtime import WorkUnit
from tests.conftest import wait_for, work_unit


def unit(target: str, index: int = 0, timeout: float = 0, **params: object) -> WorkUnit:
    return work_unit(f"tests.sample_tasks:{target}", params, index=index, timeout=timeout,
                     deadline=time.time() + timeout if timeout else None,
                     context_param="ctx" if target in ("slow", "progress") else None)


@pytest.fixture
def pool() -> Iterator[ProcessExecutor]:
    p = ProcessExecutor(3, preload=["tests.sample_tasks"])
    yield p
    p.shutdown()


def test_a_dead_worker_fails_only_its_own_item(pool: ProcessExecutor) -> None:
    good = [pool.submit(unit("add", i, a=i)) for i in range(1, 3)]
    bad = pool.submit(unit("die", 9, code=7))
    _, pending = wait([*good, bad], timeout=60)
    assert not pending, "pool did not finish"
    assert [f.result().result for f in good] == ["2", "3"]
    with pytest.raises(WorkerDied, match="exit code 7"):
        bad.result()
    # The pool replaced the worker and goes on.
    more = [pool.submit(unit("add", i, a=i)) for i in range(6)]
    assert [f.result(timeout=60).ok for f in more] == [True] * 6
    assert pool.rebuilds == 1


def test_sigkill_is_named(pool: ProcessExecutor) -> None:
    f = pool.submit(unit("sigkill_self"))
    with pytest.raises(WorkerDied, match="signal SIGKILL"):
        f.result(timeout=60)


def test_abort_kills_only_that_worker(pool: ProcessExecutor) -> None:
    long = unit("stubborn", 0, seconds=30)
    f = pool.submit(long)
    other = pool.submit(unit("stubborn", 1, seconds=0.5))
    # Abort only once a worker holds the item: before that, abort takes the "never
    # started" path and kills nothing, which is not what this test is about.
    wait_for(lambda: any(w.unit is long for w in list(pool._workers)), 30,
             "the long item did not start on a worker process")
    t0 = time.monotonic()
    pool.abort(long)
    with pytest.raises(ExecutorLost, match="worker was stopped"):
        f.result(timeout=10)
    assert time.monotonic() - t0 < 5
    assert other.result(timeout=30).ok
    assert pool.rebuilds == 1  # the killed worker, and no other


def test_progress_travels_over_the_pipe() -> None:
    seen: list[tuple[object, ...]] = []
    p = ProcessExecutor(1, lambda *a: seen.append(a), preload=["tests.sample_tasks"])
    try:
        assert p.submit(unit("progress", steps=3, delay=0)).result(timeout=60).ok
        wait_for(lambda: len(seen) >= 3, 10, "the 3 progress reports did not arrive",
                 interval=0.01)
        assert [s[2] for s in seen] == ["step 1 of 3", "step 2 of 3", "step 3 of 3"]
    finally:
        p.shutdown()


def test_describe_exit() -> None:
    assert describe_exit(3) == "exit code 3"
    assert describe_exit(-9).startswith("signal SIGKILL")
    assert describe_exit(-11) == "signal SIGSEGV"


def test_thread_abort_sets_the_cooperative_flag() -> None:
    ex = ThreadExecutor(2)
    try:
        u = unit("slow", seconds=30)
        f = ex.submit(u)
        wait_for(f.running, 10, "the slow item did not start on a thread", interval=0.01)
        ex.abort(u)
        out = f.result(timeout=10)
        assert out.error is not None and out.error["type"] == "Cancelled"
    finally:
        ex.shutdown()


def test_a_pool_that_cannot_start_workers_backs_off_and_says_so(
        monkeypatch: pytest.MonkeyPatch) -> None:
    real_spawn = ProcessExecutor._spawn
    calls: list[float] = []
    broken = True

    def spawn(self: ProcessExecutor) -> Any:
        calls.append(time.monotonic())
        if broken:
            raise OSError(errno.EMFILE, "Too many open files")
        return real_spawn(self)

    monkeypatch.setattr(ProcessExecutor, "_spawn", spawn)
    p = ProcessExecutor(2, preload=["tests.sample_tasks"])
    try:
        f = p.submit(unit("add", a=1))
        wait_for(lambda: calls, 10, "the pool never tried to start a worker")
        # Backing off from 0.1 s, doubling: tries at about 0, 0.1, 0.3 and 0.7 s. Once one
        # comes more than 0.5 s after the first, the tries of that first 0.5 s are all in.
        wait_for(lambda: calls[-1] - calls[0] > 0.5, 10,
                 "the pool did not try again after backing off")
        in_window = [t for t in calls if t - calls[0] <= 0.5]
        # A handful of tries, not a spinning core.
        assert 1 <= len(in_window) <= 6, f"{len(in_window)} tries to start a worker in 0.5 s"
        gaps = [b - a for a, b in itertools.pairwise(calls[:4])]
        assert all(gap >= 0.1 * 2**i * 0.95 for i, gap in enumerate(gaps)), (
            f"the pool did not back off from 0.1 s, doubling: gaps {gaps}")
        ok, detail = p.health()
        assert not ok and detail.startswith("cannot start worker processes: ")
        assert "Too many open files" in detail
        assert not f.done()  # waits for a worker rather than failing
        broken = False
        assert f.result(timeout=30).result == "2"  # runs once workers start again
        wait_for(lambda: p.workers() == 2, 30, "the pool did not fill up once starts worked")
        assert p.health() == (True, "2 of 2 worker processes")
    finally:
        p.shutdown()
