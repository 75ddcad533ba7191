"""Adaptive batching: short items travel to process workers and Dask in batches, and the
guarantees hold item by item. A batch whose worker dies fails only the item that killed
it; a timed-out item in a batch fails alone; a kill -9 of the server mid-batch loses
nothing; long items still go one per message, with their progress."""

from __future__ import annotations

import signal
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import Future, wait
from pathlib import Path
from typing import Any

import pytest

from bulkrunner.client import Client
from bulkrunner.executors import WorkerDied
from bulkrunner.executors.batching import BatchPolicy, Paces
from bulkrunner.executors.process import ProcessExecutor
from bulkrunner.runtime import Outcome, WorkUnit
from tests.conftest import (
    SAMPLE_TASKS,
    ServerProcess,
    all_items,
    toml_config,
    wait_for,
    wait_job,
    work_unit,
)
from tests.test_dask import healthz, needs_dask

TASKS = {**SAMPLE_TASKS, "maybe_die": "tests.batch_tasks:maybe_die",
         "maybe_hang": "tests.batch_tasks:maybe_hang"}
Serve = Callable[..., ServerProcess]


def _runs(path: Path) -> Counter[int]:
    """How many times each item ran (the tasks append one line per run)."""
    if not path.exists():
        return Counter()
    return Counter(int(x) for x in path.read_text().split())


def _unit(fn: str, i: int, **params: Any) -> WorkUnit:
    return work_unit(f"tests.batch_tasks:{fn}", {"i": i, **params}, index=i)


def _settled(futs: list[Future[Outcome]], timeout: float = 60) -> None:
    _, pending = wait(futs, timeout=timeout)
    assert not pending, f"{len(pending)} of {len(futs)} units did not end within {timeout} s"


def _warm(pool: ProcessExecutor) -> None:
    """Short items measured: from now on the pool hands them over in batches."""
    futs = pool.submit_batch([_unit("maybe_die", i) for i in range(300)])
    _settled(futs)
    assert all(f.result().ok for f in futs)
    assert pool.paces.batch("t") > 1, "the pool did not switch to batches for short items"
    assert pool.paces.cost("t") < 1


@pytest.fixture
def pool() -> Iterator[ProcessExecutor]:
    p = ProcessExecutor(2, preload=["tests.batch_tasks"])
    yield p
    p.shutdown()


# ---------------------------------------------------------------------- the process pool
def test_a_batch_whose_worker_dies_fails_only_the_culprit(pool: ProcessExecutor,
                                                           tmp_path: Path) -> None:
    _warm(pool)
    runs = tmp_path / "runs.txt"
    futs = pool.submit_batch([_unit("maybe_die", i, die_at=37, path=str(runs))
                              for i in range(100)])
    _settled(futs)
    for i, f in enumerate(futs):
        if i == 37:
            with pytest.raises(WorkerDied, match="SIGKILL"):
                f.result()
        else:
            out = f.result()
            assert out.ok and out.result == str(i), (i, out)
    # Those after the culprit in its batch never started there: each ran once, elsewhere.
    assert _runs(runs) == Counter(range(100))
    assert pool.rebuilds == 1


def test_units_not_started_can_be_taken_back_and_never_run(tmp_path: Path) -> None:
    p = ProcessExecutor(1, preload=["tests.batch_tasks"])
    try:
        _warm(p)
        runs = tmp_path / "runs.txt"
        futs = p.submit_batch([_unit("maybe_hang", i, hang_at=0, seconds=3, path=str(runs))
                               for i in range(10)])
        wait_for(lambda: _runs(runs)[0] == 1, 30, "the first unit did not start")
        wait_for(futs[0].running, 10, "the unit that started was not marked running")
        assert not futs[0].cancel(), "a unit a worker has started cannot be taken back"
        # The others wait behind it (on the worker, or given back to the pool's queue when
        # it ran too long): not started, so they can still be taken back.
        assert futs[5].cancel() and futs[5].cancelled()
        _settled([f for i, f in enumerate(futs) if i != 5])
        assert [f.result().result for i, f in enumerate(futs) if i != 5] == [
            str(i) for i in range(10) if i != 5]
        assert _runs(runs) == Counter(i for i in range(10) if i != 5)
    finally:
        p.shutdown()


def test_long_items_go_one_per_message() -> None:
    seen: list[tuple[Any, ...]] = []
    p = ProcessExecutor(2, lambda *a: seen.append(a),
                        preload=["tests.batch_tasks", "tests.sample_tasks"])
    try:
        _warm(p)
        # 0.2 s items: over 100 ms, so not even a second one queued behind each.
        long = [work_unit("tests.sample_tasks:progress", {"steps": 2, "delay": 0.1},
                          index=i, context_param="ctx") for i in range(4)]
        for u in long[:2]:  # measured as long: no batches, no more than one per worker
            assert p.submit(u).result(timeout=60).ok
        assert p.paces.batch("t") == 1
        assert p.paces.cost("t") == 1
        futs = p.submit_batch(long[2:])
        _settled(futs)
        assert all(f.result().ok for f in futs)
        # Progress travels per item, as each one runs.
        assert {(s[0][1], s[2]) for s in seen} >= {(i, f"step {k} of 2") for i in range(4)
                                                    for k in (1, 2)}
    finally:
        p.shutdown()


# ---------------------------------------------------------------------- through a server
def _short_warm_up(c: Client, n: int = 500, task: str = "maybe_die") -> None:
    """Items of ``task`` measured as short: from now on its items travel in batches (each
    task is batched by its own run times)."""
    job = c.submit(task, items=[{"i": i} for i in range(n)])
    assert wait_job(c, job["id"], 120)["state"] == "succeeded"


@pytest.mark.slow
def test_a_timed_out_item_in_a_batch_fails_alone(serve: Serve, tmp_path: Path) -> None:
    server = serve(toml_config(tmp_path, executor="process", max_workers=2, tasks=TASKS))
    runs = tmp_path / "runs.txt"
    with Client(server.url, timeout=30) as c:
        _short_warm_up(c, task="maybe_hang")
        job = c.submit("maybe_hang", {"hang_at": 50, "seconds": 60, "path": str(runs)},
                       items=[{"i": i} for i in range(300)], timeout=3)
        done = wait_job(c, job["id"], 90)
        items = all_items(c, job["id"])
    assert done["state"] == "failed", done["items"]
    assert items[50]["state"] == "failed", items[50]
    assert items[50]["error"]["type"] == "TimeoutError", items[50]["error"]
    others = [it for it in items if it["index"] != 50]
    assert all(it["state"] == "succeeded" and it["attempts"] == 1 for it in others), [
        (it["index"], it["state"], it["attempts"]) for it in others
        if it["state"] != "succeeded" or it["attempts"] != 1][:10]
    counts = _runs(runs)
    assert all(counts[i] == 1 for i in range(300)), {i: n for i, n in counts.items() if n != 1}


@pytest.mark.slow
@pytest.mark.parametrize("executor", ["process", "thread"])
def test_kill9_mid_batch_loses_nothing(serve: Serve, tmp_path: Path, executor: str) -> None:
    n = 20_000
    cfg = toml_config(tmp_path, executor=executor, max_workers=2, tasks=TASKS)
    runs = tmp_path / "runs.txt"
    first = serve(cfg)
    with Client(first.url, timeout=30) as c:
        job = c.submit("maybe_die", {"path": str(runs)}, items=[{"i": i} for i in range(n)])
    wait_for(lambda: sum(_runs(runs).values()) >= n // 4, 120,
             "a quarter of the items to run before the kill")
    first.signal(signal.SIGKILL)
    assert first.wait(10) == -signal.SIGKILL
    # A worker process may finish what it holds (then finds the server gone): settle.
    settled: list[int] = []

    def stable() -> bool:
        settled.append(sum(_runs(runs).values()))
        return len(settled) >= 4 and settled[-4] == settled[-1]

    wait_for(stable, 20, "the run file to stop growing after the kill", interval=0.1)
    assert len(_runs(runs)) < n, "the kill came too late: nothing was left to run"
    second = serve(cfg)
    with Client(second.url, timeout=30) as c:
        done = wait_job(c, job["id"], 180)
        items = all_items(c, job["id"])
    assert done["state"] == "succeeded" and done["items"]["succeeded"] == n, done["items"]
    # Interrupted items went back to the queue without spending an attempt.
    assert len(items) == n and all(it["attempts"] == 1 for it in items)
    assert set(_runs(runs)) == set(range(n)), "an item never ran"


# ---------------------------------------------------------------------- Dask
def _dask_config(tmp: Path, max_workers: int = 2) -> Path:
    path = toml_config(tmp, executor="dask", max_workers=max_workers, tasks=TASKS)
    path.write_text(path.read_text().replace(
        f"max_workers = {max_workers}\n", f'max_workers = {max_workers}\naddress = ""\n'))
    return path


def _dask_server(serve: Serve, tmp: Path) -> ServerProcess:
    # Dask gives up on a task that kills its worker after 1 re-run instead of 3.
    server = serve(_dask_config(tmp), env={"DASK_DISTRIBUTED__SCHEDULER__ALLOWED_FAILURES": "1"})
    with Client(server.url, timeout=30) as c:
        wait_for(lambda: healthz(c)["status"] == "ok", 90, "the local cluster never came up")
    return server


@needs_dask
@pytest.mark.slow
def test_dask_batch_whose_worker_dies_fails_only_the_culprit(serve: Serve,
                                                              tmp_path: Path) -> None:
    server = _dask_server(serve, tmp_path)
    runs = tmp_path / "runs.txt"
    with Client(server.url, timeout=30) as c:
        _short_warm_up(c, 2000)
        job = c.submit("maybe_die", {"die_at": 37, "path": str(runs)},
                       items=[{"i": i} for i in range(200)])
        done = wait_job(c, job["id"], 240)
        items = all_items(c, job["id"])
        log = server.log()
    assert "running them one per task" in log, "the item did not die inside a batch"
    assert done["state"] == "failed", done["items"]
    assert items[37]["state"] == "failed", items[37]
    assert items[37]["error"]["type"] == "WorkerDied", items[37]["error"]
    assert all(it["state"] == "succeeded" and it["attempts"] == 1
               for it in items if it["index"] != 37), [
        (it["index"], it["state"], it["attempts"], it["error"]) for it in items
        if it["index"] != 37 and (it["state"] != "succeeded" or it["attempts"] != 1)][:10]
    assert set(_runs(runs)) == set(range(200))


@needs_dask
@pytest.mark.slow
def test_dask_items_behind_a_stuck_one_run_elsewhere(serve: Serve, tmp_path: Path) -> None:
    server = _dask_server(serve, tmp_path)
    runs = tmp_path / "runs.txt"
    with Client(server.url, timeout=30) as c:
        _short_warm_up(c, 2000, "maybe_hang")
        job = c.submit("maybe_hang", {"hang_at": 3, "seconds": 120, "path": str(runs)},
                       items=[{"i": i} for i in range(400)])
        wait_for(lambda: c.job(job["id"])["items"]["succeeded"] == 399, 60,
                 "the items queued behind the stuck one did not run elsewhere")
        items = all_items(c, job["id"])
        c.cancel(job["id"])
    assert "took" in server.log() and "back from a Dask batch" in server.log()
    counts = _runs(runs)
    assert all(counts[i] == 1 for i in range(400)), {i: n for i, n in counts.items() if n != 1}
    assert [it["state"] for it in items].count("succeeded") == 399


def test_each_task_is_batched_by_its_own_run_times() -> None:
    # The soak's finding: with one average per executor, a task of long items next to one
    # of no-op items turned the no-op items' batching off.
    paces = Paces(4, BatchPolicy(window=0.004, max_batch=256, short=0.005))
    assert paces.cost("short") == 1 and paces.batch("short") == 1  # nothing measured yet
    paces.observe("short", 0.01, 100)  # 0.1 ms an item
    paces.observe("long", 1.5)
    assert paces.batch("short") == 40 and paces.cost("short") == 1 / 80
    assert paces.batch("long") == 1 and paces.cost("long") == 1
    paces.reset("short")  # an item claimed ahead waited too long: alone until measured
    assert paces.cost("short") == 1 and paces.cost("long") == 1


@needs_dask
def test_dask_batches_stay_whole_as_workers_free_up() -> None:
    # What held 50 ms CPU items on Dask to about one item a task: every hand-over was
    # spread over all the workers, so the four items that follow a batch of four went as
    # two tasks, whose successors went as four, and so on down to one.
    from bulkrunner.executors.dask_tasks import POLICY, Inflight, plan

    def units(n: int, task: str = "t", timeout: float = 0.0) -> list[Inflight]:
        return [Inflight(work_unit("tests.sample_tasks:add", index=i, task=task,
                                   timeout=timeout), Future(), None, None)
                for i in range(n)]

    paces = Paces(2, POLICY)
    alone, batches = plan(units(3), paces, idle=2)  # nothing measured: one per task
    assert len(alone) == 3 and batches == []
    paces.observe("t", 0.05 * 20, 20)  # 50 ms an item: a batch holds 5
    assert paces.batch("t") == 5
    # Nothing running yet: spread over both workers, then whole batches.
    assert [len(b) for b in plan(units(4), paces, idle=2)[1]] == [2, 2]
    assert [len(b) for b in plan(units(20), paces, idle=2)[1]] == [5, 5, 5, 5]
    # One batch ended, the other worker still busy: its successors go as one batch.
    assert [len(b) for b in plan(units(5), paces, idle=1)[1]] == [5]
    assert [len(b) for b in plan(units(5), paces, idle=-2)[1]] == [5]
    # Short timeouts and an explicit single go one per task; tasks are batched apart.
    alone, batches = plan(units(3, timeout=5.0) + units(5, task="u"), paces, idle=1)
    assert len(alone) == 8 and batches == []  # "u" is not measured yet: alone too
    alone, batches = plan(units(5), paces, idle=1, single=True)
    assert len(alone) == 5 and batches == []
