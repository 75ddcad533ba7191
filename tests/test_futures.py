"""The executors' unit futures: a shared condition, and callbacks added to many at once."""

from __future__ import annotations

import threading
from concurrent.futures import Future, wait

from bulkrunner.executors.futures import add_done_callbacks, unit_futures
from bulkrunner.runtime import Outcome


def test_callbacks_added_at_once_run_once_each_as_their_futures_settle() -> None:
    first, second = unit_futures(3), unit_futures(2)  # two hand-overs, two conditions
    plain: Future[Outcome] = Future()
    first[1].set_running_or_notify_cancel()
    first[1].set_result(Outcome(ok=True, result="1"))  # done before the callback is added
    called: list[Future[Outcome]] = []
    futs = [*first, plain, *second]
    add_done_callbacks(futs, called.append)
    assert called == [first[1]]  # a future already done: at once
    for f in (first[0], first[2], plain, *second):
        f.set_running_or_notify_cancel()
        f.set_result(Outcome(ok=True, result="2"))
    assert sorted(map(id, called)) == sorted(map(id, futs))  # each once
    assert wait(futs, timeout=5).not_done == set()


def test_a_callback_that_raises_does_not_stop_the_others() -> None:
    futs = unit_futures(2)
    futs[0].set_running_or_notify_cancel()
    futs[0].set_result(Outcome(ok=True))
    seen: list[Future[Outcome]] = []

    def fussy(f: Future[Outcome]) -> None:
        seen.append(f)
        raise RuntimeError("callback bug")

    add_done_callbacks(futs, fussy)  # the done one's error is logged by the stdlib
    futs[1].set_running_or_notify_cancel()
    futs[1].set_result(Outcome(ok=True))
    assert seen == futs


def test_settling_from_other_threads_while_callbacks_are_added() -> None:
    futs = unit_futures(200)
    called: list[Future[Outcome]] = []
    lock = threading.Lock()

    def note(f: Future[Outcome]) -> None:
        with lock:
            called.append(f)

    def settle() -> None:
        for f in futs:
            f.set_running_or_notify_cancel()
            f.set_result(Outcome(ok=True))

    t = threading.Thread(target=settle)
    t.start()
    add_done_callbacks(futs, note)
    t.join(timeout=10)
    assert not t.is_alive(), "the settling thread did not finish"
    assert len(called) == len(futs) and len(set(map(id, called))) == len(futs)
