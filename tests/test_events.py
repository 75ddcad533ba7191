"""The event bus: events one by one and a turn's ends all at once, to both kinds of
listener; and the counting listeners (metrics, throughput) fed a turn's ends together."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

import pytest
from flask import Flask

from bulkrunner.server.events import EventBus, Finished, Started
from bulkrunner.server.throughput import Throughput
from tests.test_metrics import scrape, value


def ended(job: str, index: int, *, ok: bool = True, state: str = "succeeded",
          charged: bool = True, cause: str | None = None, task: str = "t") -> Finished:
    return Finished(job, 1, index, 1, task, ok, state, charged, 0.01 * (index + 1), cause)


def test_each_listener_gets_what_it_subscribed_to() -> None:
    bus = EventBus()
    one: list[Finished] = []
    lists: list[list[Finished]] = []
    bus.subscribe(Finished, one.append)
    bus.subscribe_all(Finished, lambda es: lists.append(list(es)))
    a, b, c = ended("j", 0), ended("j", 1), ended("j", 2)
    bus.emit(a)
    bus.emit_all(Finished, [b, c])
    bus.emit_all(Finished, [])  # nothing ended: nobody is called
    assert one == [a, b, c]
    assert lists == [[a], [b, c]]
    assert bus.wants(Finished) and not bus.wants(Started)


def test_a_failing_listener_is_logged_and_the_others_still_run(
        caplog: pytest.LogCaptureFixture) -> None:
    bus = EventBus()
    got: list[Any] = []

    def broken(_: Any) -> None:
        raise ValueError("listener bug")

    bus.subscribe_all(Finished, broken)
    bus.subscribe(Finished, broken)
    bus.subscribe(Finished, got.append)
    bus.subscribe_all(Finished, got.append)
    with caplog.at_level(logging.ERROR, logger="bulkrunner.events"):
        bus.emit_all(Finished, [ended("j", 0), ended("j", 1)])
    assert len(got) == 3  # two events one by one, then the list of both
    assert sum("listener bug" in r.exc_text for r in caplog.records if r.exc_text) >= 3


def test_throughput_counts_a_turns_ends_by_job() -> None:
    t = Throughput()
    bus = EventBus()
    t.subscribe(bus)
    bus.emit_all(Finished, [ended("a", 0), ended("a", 1), ended("b", 0, ok=False, state="failed"),
                            ended("a", 2, ok=False, state="queued"),  # retried: not ended
                            ended("b", 1, state="stale")])
    bus.emit(ended("a", 3))
    assert sum(n for _, n in t.of("a")["history"]) == 3
    assert sum(n for _, n in t.of("b")["history"]) == 1
    assert t.of("c")["history"] == []


def test_metrics_count_a_turns_ends_as_one_by_one(app_factory: Callable[..., Flask]) -> None:
    app = app_factory(tasks={"t": "tests.sample_tasks:add"})
    events = app.extensions["bulkrunner"].events
    turn: Sequence[Finished] = [
        ended("a", 0), ended("a", 1), ended("a", 2, ok=False, state="failed"),
        ended("a", 3, ok=False, state="queued"),                    # a retry
        ended("a", 4, ok=False, state="failed", cause="timeout"),
        ended("a", 5, ok=False, state="queued", charged=False, cause="worker_died"),
        ended("a", 6, state="stale")]                               # ignored by the store
    events.emit_all(Finished, turn)
    s = scrape(app)
    assert value(s, "bulkrunner_attempts_total", task="t", outcome="succeeded") == 2
    assert value(s, "bulkrunner_attempts_total", task="t", outcome="failed") == 3
    assert value(s, "bulkrunner_retries_total", task="t") == 1
    assert value(s, "bulkrunner_item_failures_total", task="t") == 2
    assert value(s, "bulkrunner_timeouts_total", task="t") == 1
    assert value(s, "bulkrunner_worker_deaths_total", task="t") == 1
    assert value(s, "bulkrunner_item_duration_seconds_count", task="t") == 5
    assert value(s, "bulkrunner_item_duration_seconds_sum", task="t") == pytest.approx(
        0.01 + 0.02 + 0.03 + 0.04 + 0.05)
