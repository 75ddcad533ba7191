"""run_item and the task context, in this process."""

from __future__ import annotations

import json
import multiprocessing
import os
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

from bulkrunner.runtime import Context, context, run_item, worker_name
from tests.conftest import work_unit


def test_success_is_json_text() -> None:
    out = run_item(work_unit("tests.sample_tasks:add", {"a": 2, "b": 3}))
    assert out.ok and out.result == "5" and out.worker


def test_exception_becomes_data_with_traceback() -> None:
    out = run_item(work_unit("tests.sample_tasks:square", {"x": -1}))
    assert not out.ok and out.retryable
    assert out.error is not None
    assert out.error["type"] == "ValueError" and out.error["message"] == "negative: -1"
    assert "sample_tasks.py" in out.error["traceback"]


def test_non_json_result_fails_the_item() -> None:
    out = run_item(work_unit("builtins:object"))
    assert not out.ok and out.error is not None
    assert out.error["type"] == "ResultNotSerializable"


def test_oversized_result_fails_cleanly() -> None:
    out = run_item(work_unit("tests.sample_tasks:big", {"n": 5000}, max_result_size=1000))
    assert not out.ok and out.error is not None and out.error["type"] == "ResultTooLarge"
    assert "jobs.max_result_size" in out.error["message"]


def test_context_reports_progress_and_is_found_by_context() -> None:
    seen: list[tuple[object, ...]] = []
    u = work_unit("tests.sample_tasks:progress", {"steps": 3, "delay": 0}, context_param="ctx")
    out = run_item(u, lambda *a: seen.append(a))
    assert out.ok and json.loads(out.result or "") == 3
    assert [s[1] for s in seen] == [1 / 3, 2 / 3, 1.0]
    assert seen[-1][2] == "step 3 of 3"
    assert context().job_id is None  # outside an item: the no-op context


def test_cancel_flag_and_deadline_stop_a_cooperative_task() -> None:
    flag = threading.Event()
    u = work_unit("tests.sample_tasks:slow", {"seconds": 10}, context_param="ctx")
    threading.Timer(0.1, flag.set).start()
    t0 = time.monotonic()
    out = run_item(u, None, flag)
    assert time.monotonic() - t0 < 2
    assert out.error is not None and out.error["type"] == "Cancelled" and not out.retryable
    u = work_unit("tests.sample_tasks:slow", {"seconds": 10}, context_param="ctx", timeout=0.1,
             deadline=time.time() + 0.1)
    out = run_item(u)
    assert out.error is not None and out.error["type"] == "TimeoutError"


def test_null_context_is_harmless() -> None:
    ctx = Context()
    ctx.progress(1, 2, "x")
    ctx.check()
    assert not ctx.cancelled


def _name_in_child(q: multiprocessing.Queue[tuple[str, int]]) -> None:
    q.put((worker_name(), os.getpid()))


def _in_forked_child(target: Callable[[multiprocessing.Queue[Any]], None]) -> Any:
    """What ``target`` puts on its queue, run in a forked child."""
    ctx = multiprocessing.get_context("fork")
    q: multiprocessing.Queue[Any] = ctx.Queue()
    child = ctx.Process(target=target, args=(q,))
    child.start()
    try:
        return q.get(timeout=30)
    finally:
        child.join(timeout=30)


def test_worker_name_is_host_and_pid_also_in_a_forked_child() -> None:
    # The name is kept once made: a forked child must not report its parent's pid.
    assert worker_name() == f"{socket.gethostname()}:{os.getpid()}"
    name, pid = _in_forked_child(_name_in_child)
    assert pid != os.getpid()
    assert name == f"{socket.gethostname()}:{pid}"


def _flusher_in_child(q: multiprocessing.Queue[tuple[bool, bool]]) -> None:
    from bulkrunner.runtime import capture

    forgot = capture._flusher is None  # the parent's thread does not exist here
    capture.install()
    flusher = capture._flusher
    q.put((forgot, flusher is not None and flusher.is_alive()))


def test_a_forked_child_starts_its_own_output_flusher() -> None:
    from bulkrunner.runtime import capture

    capture.install()
    assert capture._flusher is not None and capture._flusher.is_alive()
    forgot, running = _in_forked_child(_flusher_in_child)
    assert forgot and running
