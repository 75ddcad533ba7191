"""Prometheus metrics of one server, served at ``GET /metrics``.

Each app gets its own :class:`~prometheus_client.CollectorRegistry` (several apps live in
one test process, and the global registry would mix them). Counters are fed as things
happen, from the event bus (submissions, and attempts with their run time). Gauges of the
queue and the workers are read at scrape time from the store's counters, which are kept
in memory, so a scrape costs two index lookups however many jobs are stored.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import generate_latest
from prometheus_client.registry import Collector

from bulkrunner.models import STATES
from bulkrunner.server.events import Finished, Notified, Submitted
from bulkrunner.server.service import Service

#: Run-duration buckets, seconds: tasks run from milliseconds to hours.
DURATION_BUCKETS = (0.005, 0.025, 0.1, 0.25, 1.0, 2.5, 10.0, 30.0, 60.0, 300.0, 900.0,
                    3600.0, 4 * 3600.0)


class Metrics:
    """The registry of one app and the hooks that feed it."""

    def __init__(self, service: Service) -> None:
        self.service = service
        self.registry = CollectorRegistry()
        r = self.registry
        self.jobs_submitted = Counter(
            "bulkrunner_jobs_submitted", "Jobs accepted (202), by task", ["task"], registry=r)
        self.items_submitted = Counter(
            "bulkrunner_items_submitted", "Items of accepted jobs, by task", ["task"],
            registry=r)
        self.attempts = Counter(
            "bulkrunner_attempts", "Attempts that ended, by task and outcome (succeeded or "
            "failed: raised, timed out or its worker died)", ["task", "outcome"], registry=r)
        self.retries = Counter(
            "bulkrunner_retries", "Failed attempts whose item was queued to run again",
            ["task"], registry=r)
        self.failures = Counter(
            "bulkrunner_item_failures", "Items that ended failed (no attempts left)",
            ["task"], registry=r)
        self.timeouts = Counter(
            "bulkrunner_timeouts", "Attempts failed at their timeout", ["task"], registry=r)
        self.worker_deaths = Counter(
            "bulkrunner_worker_deaths", "Attempts whose worker process died", ["task"],
            registry=r)
        self.duration = Histogram(
            "bulkrunner_item_duration_seconds", "Run time of attempts that ended, from "
            "claim to outcome, by task", ["task"], buckets=DURATION_BUCKETS, registry=r)
        r.register(_StateCollector(service))
        self.webhooks = Counter(
            "bulkrunner_webhook_attempts", "Webhook delivery attempts that ended, by outcome: "
            "delivered (a 2xx answer), retrying (tried again later) or failed (no attempts "
            "left)", ["outcome"], registry=r)
        #: Each task's duration and attempt series, looked up once: ``labels()`` checks
        #: and locks on every call, and every ended item counts in them.
        self._per_task: dict[str, tuple[Histogram, Counter, Counter]] = {}
        #: Each task's submission series, the same way (every 202 counts in them).
        self._submits: dict[str, tuple[Counter, Counter]] = {}
        service.events.subscribe(Submitted, self._submitted)
        service.events.subscribe_all(Finished, self._finished)
        service.events.subscribe(Notified, self._notified)

    def render(self) -> tuple[bytes, str]:
        """The text exposition format and its content type."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST

    # ------------------------------------------------------------------ listeners
    def _submitted(self, e: Submitted) -> None:
        job = e.job
        series = self._submits.get(job.task)
        if series is None:
            series = self._submits[job.task] = (self.jobs_submitted.labels(job.task),
                                                 self.items_submitted.labels(job.task))
        series[0].inc()
        series[1].inc(job.total)

    def _notified(self, e: Notified) -> None:
        self.webhooks.labels(e.outcome).inc()

    def _finished(self, events: Sequence[Finished]) -> None:
        # A turn ends hundreds of short items: each series is counted up once a turn.
        ended: dict[tuple[str, bool], int] = {}
        for e in events:
            if e.cause == "timeout":
                self.timeouts.labels(e.task).inc()
            elif e.cause == "worker_died":
                self.worker_deaths.labels(e.task).inc()
            if e.state == "stale" or not e.charged:
                continue  # ignored by the store, or an innocent re-queued without an attempt
            self._series(e.task)[0].observe(e.duration)
            key = (e.task, e.ok)
            ended[key] = ended.get(key, 0) + 1
            if not e.ok and e.state == "queued":
                self.retries.labels(e.task).inc()
            elif e.state == "failed":
                self.failures.labels(e.task).inc()
        for (task, ok), n in ended.items():
            _, succeeded, failed = self._per_task[task]
            (succeeded if ok else failed).inc(n)

    def _series(self, task: str) -> tuple[Histogram, Counter, Counter]:
        children = self._per_task.get(task)
        if children is None:
            children = self._per_task[task] = (
                self.duration.labels(task), self.attempts.labels(task, "succeeded"),
                self.attempts.labels(task, "failed"))
        return children


class _StateCollector(Collector):
    """What the server holds now, read at scrape time."""

    def __init__(self, service: Service) -> None:
        self.service = service

    def collect(self) -> Iterator[Metric]:
        svc = self.service
        store, disp = svc.store, svc.dispatcher
        items = GaugeMetricFamily("bulkrunner_items", "Stored items by task and state",
                                  labels=["task", "state"])
        for task, counts in sorted(store.counts_by_task().items()):
            for state in STATES:
                items.add_metric([task, state], counts.get(state, 0))
        yield items
        yield GaugeMetricFamily("bulkrunner_queue_depth", "Items waiting to run (including "
                                "retries waiting out their backoff)", value=store.queued)
        oldest = store.oldest_queued_at()
        yield GaugeMetricFamily(
            "bulkrunner_oldest_queued_age_seconds", "Age of the oldest waiting item (since "
            "its job was submitted); 0 when none waits",
            value=max(0.0, time.time() - oldest) if oldest is not None else 0.0)
        yield GaugeMetricFamily("bulkrunner_inflight_items", "Items on a worker now",
                                value=disp.inflight)
        yield GaugeMetricFamily("bulkrunner_max_workers", "Items that may run at once "
                                "(executor.max_workers)", value=disp.max_workers)
        ex = disp.executor
        ok = ex.health()[0] if ex is not None else False
        yield GaugeMetricFamily("bulkrunner_executor_up", "1 while the executor can take "
                                "items", value=1.0 if ok else 0.0)
        yield GaugeMetricFamily("bulkrunner_draining", "1 once the server is shutting "
                                "down", value=1.0 if svc.draining else 0.0)
        yield CounterMetricFamily("bulkrunner_pool_rebuilds", "Worker processes replaced "
                                  "after they died or were killed (cancel, timeout)",
                                  value=getattr(ex, "rebuilds", 0))
        yield from _pacing(svc)
        interrupted = CounterMetricFamily(
            "bulkrunner_interrupted_items", "Items found running at start-up (the server "
            "had stopped under them): re-queued, or failed after too many interruptions",
            labels=["outcome"])
        for outcome in ("requeued", "failed"):
            interrupted.add_metric([outcome], disp.recovered.get(outcome, 0))
        yield interrupted
        yield GaugeMetricFamily("bulkrunner_webhooks_pending", "Webhook deliveries waiting "
                                "for an attempt (or in flight)",
                                value=store.deliveries_pending())


def _pacing(svc: Service) -> Iterator[Metric]:
    """Paused tasks, and why each held-back task's items wait (from the claim policy)."""
    paused = svc.store.paused_tasks()
    names = [t.name for t in svc.registry]
    gauge = GaugeMetricFamily("bulkrunner_task_paused", "1 while a user has paused the "
                              "task (none of its items starts)", labels=["task"])
    for name in names:
        gauge.add_metric([name], 1.0 if name in paused else 0.0)
    yield gauge
    pacer = svc.dispatcher.pacer
    held = GaugeMetricFamily("bulkrunner_task_waiting", "1 while a task's queued items are "
                             "held back, by why: task_paused, concurrency or rate_limit",
                             labels=["task", "reason"])
    for task, reason in sorted(pacer.task_reasons(time.time()).items()):
        held.add_metric([task, reason], 1.0)
    yield held
    running = GaugeMetricFamily("bulkrunner_task_running", "Items of a task on a worker now "
                                "(what its concurrency limit counts)", labels=["task"])
    for name in names:
        running.add_metric([name], pacer.running_of(name))
    yield running
