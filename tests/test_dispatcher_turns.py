"""The dispatcher driven turn by turn on the inline executor: no threads, no sleeps. What
one turn records, claims and tells on the event bus."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import pytest

from bulkrunner.config import config_from_dict
from bulkrunner.executors.inline import InlineExecutor
from bulkrunner.server.dispatcher import Dispatcher
from bulkrunner.server.events import EventBus, Finished, JobChanged, Started
from bulkrunner.server.submission import new_job
from bulkrunner.server.tasks import Registry
from bulkrunner.store import NewJob, Store


@pytest.fixture
def world(tmp_path: Path) -> Any:
    cfg = config_from_dict({"executor": {"max_workers": 2}, "jobs": {"retry_backoff": 0},
                            "store": {"path": str(tmp_path / "t.db")},
                            "tasks": {"add": "tests.sample_tasks:add",
                                      "flaky": "tests.sample_tasks:flaky"}})
    registry = Registry.from_config(cfg)
    store = Store(cfg.store.path)
    events = EventBus()
    seen: list[Any] = []
    for kind in (Started, Finished, JobChanged):
        events.subscribe(kind, seen.append)
    disp = Dispatcher(cfg, store, registry, events,
                      executor_factory=lambda c, rep, mods: InlineExecutor(2, rep))
    disp.executor = InlineExecutor(2, None)

    def submit(body: dict[str, Any]) -> str:
        job, _ = store.insert_job(new_job(cfg, registry, body))
        return job.id

    yield disp, store, submit, seen
    store.close()


def test_a_turn_claims_at_most_max_workers_and_the_next_records_them(world: Any) -> None:
    disp, store, submit, seen = world
    ident = submit({"task": "add", "items": [{"a": i} for i in range(5)]})
    disp._turn()
    assert len(disp.executor.submitted) == 2  # two slots: two items handed over
    assert [type(e) for e in seen] == [JobChanged, Started, Started]
    disp._turn()  # records both outcomes and claims the next two, in one transaction
    finished = [e for e in seen if isinstance(e, Finished)]
    assert [(e.index, e.state, e.ok) for e in finished] == [(0, "succeeded", True),
                                                              (1, "succeeded", True)]
    assert all(e.duration >= 0 and e.task == "add" for e in finished)
    for _ in range(3):
        disp._turn()
    job = store.get_job(ident)
    assert job.state.value == "succeeded" and job.counts["succeeded"] == 5
    changes = [(e.old, e.new) for e in seen if isinstance(e, JobChanged)]
    assert changes == [("queued", "running"), ("running", "succeeded")]


def test_a_failed_attempt_is_retried_on_the_next_turn(world: Any, tmp_path: Path) -> None:
    disp, store, submit, seen = world
    ident = submit({"task": "flaky", "params": {"path": str(tmp_path / "count")},
                    "max_attempts": 2})
    disp._turn()  # claims and runs the first attempt: it raises
    disp._turn()  # records the failure (retry due at once: no backoff) and claims again
    assert [e.state for e in seen if isinstance(e, Finished)] == ["queued"]
    assert disp._retry_due is not None  # the loop would wake for it, not after a poll
    disp._turn()
    job = store.get_job(ident)
    assert job.state.value == "succeeded", job
    (item,), _ = store.list_items(ident)
    assert item.attempts == 2 and [e["attempt"] for e in item.errors] == [1]


def test_progress_and_output_of_a_turn_are_stored_with_its_outcomes(world: Any) -> None:
    disp, store, submit, _seen = world
    ident = submit({"task": "add", "params": {"a": 1}})
    disp._turn()
    (unit,) = disp.executor.submitted
    disp.reports(unit.key, 0.5, "half \ud800 way")  # hostile text is escaped on entry
    disp.reports.log(unit.key, unit.claim, "printed\n")
    disp._turn()
    (item,), _ = store.list_items(ident)
    assert item.state.value == "succeeded"
    assert store.read_log(ident, 0) == ([(unit.claim, "printed\n")], "succeeded")
    assert store.get_job(ident).message == "half \\ud800 way"


def test_an_item_whose_task_left_the_config_fails_and_the_others_run(world: Any) -> None:
    disp, store, submit, seen = world
    # Submitted while the task was in the config; the config was changed since.
    gone, _ = store.insert_job(NewJob(id=uuid.uuid4().hex, task="removed", params={},
                                      items=["{}"]))
    ok = submit({"task": "add", "items": [{"a": 1}]})
    for _ in range(3):
        disp._turn()
    failed = store.get_job(gone.id)
    assert failed.state.value == "failed" and failed.counts["failed"] == 1
    assert failed.error is not None and failed.error["type"] == "UnknownTask"
    assert "no longer in the config" in failed.error["message"]
    assert store.get_job(ok).state.value == "succeeded"
    assert [e.task for e in seen if isinstance(e, Started)] == ["add"]  # never handed over
