"""Schedules: jobs that a ``[schedules.NAME]`` table submits at set times.

One thread in the server. A schedule fires at its cron times (five fields, read in its
``timezone``, so "0 3 * * *" in Europe/Paris is 03:00 in Paris in summer and in winter) or
``every`` so many seconds, on a fixed grid counted from the Unix epoch (``every = "1h"`` fires
on the hour, UTC). Each firing submits one job through the service, with the idempotency
key ``schedule:<name>:<fire time, ISO 8601 UTC>`` and ``schedule`` set to the name.

Once per fire time, across restarts: the database keeps the latest fire time each schedule
submitted, written after its job is committed. A server killed between the two submits the
same fire time again at its next start, and the key makes that a replay of the same job.
Firings missed while the server was down are caught up with one job, for the latest of
them, as soon as the server starts (before it listens). A schedule with ``enabled = false``
never fires, and the times it was disabled are not caught up when it is enabled again.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any
from zoneinfo import ZoneInfo

from bulkrunner.config import Config, ScheduleConfig
from bulkrunner.errors import (
    BulkrunnerError,
    ConfigError,
    InvalidSubmission,
    KeyConflict,
    ShuttingDown,
)
from bulkrunner.models import iso
from bulkrunner.server.tasks import Registry

if TYPE_CHECKING:
    from bulkrunner.server.service import Service

log = logging.getLogger("bulkrunner.scheduler")

#: The longest the thread sleeps before it looks at the clock again (a clock that jumped,
#: a laptop that slept).
_MAX_SLEEP = 30.0
#: Seconds before a firing that could not be submitted (database busy, queue full) is
#: tried again.
_RETRY = 5.0
#: Missed fire times counted for the catch-up's log line, at most.
_COUNT_MISSED = 10_000


def fire_key(name: str, fire: float) -> str:
    """The idempotency key of schedule ``name``'s job for fire time ``fire``."""
    return f"schedule:{name}:{fire_text(fire)}"


def fire_text(fire: float) -> str:
    """A fire time (whole seconds) as ISO 8601 UTC: ``2026-12-02T03:00:00Z``."""
    return datetime.fromtimestamp(int(fire), UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class Rule:
    """When a schedule fires: :meth:`latest` and :meth:`after` a time (Unix seconds)."""

    def __init__(self, s: ScheduleConfig) -> None:
        self.every = int(s.every)
        self.cron = s.cron
        self.zone = ZoneInfo(s.timezone)

    def latest(self, t: float) -> float:
        """The latest fire time at or before ``t``."""
        if self.every:
            return float(math.floor(t / self.every) * self.every)
        from croniter import croniter

        prev = float(croniter(self.cron, self._local(t)).get_prev(float))
        while self._local(prev).fold:
            prev = float(croniter(self.cron, self._local(prev)).get_prev(float))
        nxt = self.after(prev)
        return nxt if nxt <= t else prev

    def after(self, t: float) -> float:
        """The first fire time after ``t``.

        A cron expression names wall-clock times: one that happens twice when the clocks go
        back fires once, at its first occurrence (croniter would give both); one that never
        happens when they go forward fires at the first moment after it (croniter's rule).
        """
        if self.every:
            return float((math.floor(t / self.every) + 1) * self.every)
        from croniter import croniter

        nxt = float(croniter(self.cron, self._local(t)).get_next(float))
        while self._local(nxt).fold:  # the second occurrence of a repeated time
            nxt = float(croniter(self.cron, self._local(nxt)).get_next(float))
        return nxt

    def count_between(self, start: float, end: float) -> int:
        """Fire times strictly between ``start`` and ``end`` (at most ``_COUNT_MISSED``)."""
        if self.every:
            return max(0, min(_COUNT_MISSED, math.ceil(end / self.every)
                              - math.floor(start / self.every) - 1))
        n, t = 0, self.after(start)
        while t < end and n < _COUNT_MISSED:
            n, t = n + 1, self.after(t)
        return n

    def _local(self, t: float) -> datetime:
        # croniter reads the fields in the zone of the time it starts from.
        return datetime.fromtimestamp(t, self.zone)


@dataclass
class _Entry:
    """A schedule, its rule, and what is known of its firings."""

    cfg: ScheduleConfig
    rule: Rule
    #: Fire times before this are never caught up (first seen, or enabled again).
    since: float = 0.0
    last_fire: float | None = None
    last_job: str | None = None
    #: The next firing to look at (0: at once; it was not worked out yet).
    next: float = 0.0
    retry_at: float = 0.0
    body: dict[str, Any] = field(default_factory=dict)


class Scheduler:
    """Fires the configured schedules by submitting jobs through the service."""

    def __init__(self, cfg: Config, service: Service) -> None:
        self.service = service
        self._entries = [_Entry(s, Rule(s)) for s in cfg.schedules]
        for e in self._entries:
            _check_params(e.cfg, service.registry, cfg.source)
            e.body = {"task": e.cfg.task, "params": dict(e.cfg.params),
                      "priority": e.cfg.priority}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._loaded = False

    @property
    def enabled(self) -> list[_Entry]:
        """The schedules that fire."""
        return [e for e in self._entries if e.cfg.enabled]

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        """Catch up what was missed while the server was down (one job per schedule at
        most), then fire on time from a thread of its own."""
        if not self._entries:
            return
        try:
            self._load()
            for e in self.enabled:
                self._fire_due(e, time.time())
        except Exception:  # the database cannot be used now: the thread tries again
            log.exception("schedules: could not catch up at start; trying again shortly")
        if not self.enabled:
            return
        self._thread = threading.Thread(target=self._run, name="bulkrunner-scheduler",
                                        daemon=True)
        self._thread.start()

    def _load(self) -> None:
        """Read what the database knows of each schedule (once), noting those seen now."""
        if self._loaded:
            return
        now = time.time()
        runs = self.service.store.schedule_runs(
            [e.cfg.name for e in self.enabled],
            [e.cfg.name for e in self._entries if not e.cfg.enabled])
        for e in self._entries:
            run = runs.get(e.cfg.name)
            if run is not None:
                e.since, e.last_fire, e.last_job = run.first_seen, run.last_fire, run.last_job
            else:
                e.since = now
        self._loaded = True

    def stop(self) -> None:
        """Stop firing (a firing being submitted is finished first)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None

    # ------------------------------------------------------------------ the thread
    def _run(self) -> None:
        while not self._stop.is_set():
            if self.service.draining:
                return
            now = time.time()
            try:
                self._load()
                for e in self.enabled:
                    if e.next <= now and e.retry_at <= now:
                        self._fire_due(e, now)
                        if self._stop.is_set() or self.service.draining:
                            return
            except Exception:  # background code logs and carries on
                log.exception("scheduler error; retrying in a moment")
                self._stop.wait(1.0)
                continue
            soonest = min(max(e.next, e.retry_at) for e in self.enabled)
            self._stop.wait(min(_MAX_SLEEP, max(0.01, soonest - time.time())))

    def _fire_due(self, e: _Entry, now: float) -> None:
        """Submit the job of ``e``'s latest fire time at or before ``now``, if it has none
        yet (one job for any number of missed times), then plan the next firing."""
        due = e.rule.latest(now)
        pending = due >= e.since and (e.last_fire is None or due > e.last_fire)
        if pending and not self._submit(e, due, now):
            return  # to be tried again at e.retry_at
        e.next = e.rule.after(max(now, due))

    def _submit(self, e: _Entry, due: float, now: float) -> bool:
        """Submit ``e``'s job for fire time ``due``; False to try again later."""
        name = e.cfg.name
        key = fire_key(name, due)
        # Fire times before this one that got no job (for the log): since the last one
        # that did, or since the schedule was first seen (a fire time right then counts).
        floor = e.last_fire if e.last_fire is not None else e.since - 1e-6
        missed = e.rule.count_between(max(floor, e.since - 1e-6), due)
        job_id: str | None = None
        try:
            job, created = self.service.submit({**e.body, "key": key}, schedule=name)
            job_id = job.id
        except ShuttingDown:
            self._stop.set()
            return False
        except KeyConflict:
            # The key was used with another body: a job for this fire time exists (the
            # schedule's params changed since a server killed after submitting it).
            log.warning("schedule %s: a job for %s exists already with other params; "
                        "not submitted again", name, fire_text(due))
            created = False
        except InvalidSubmission as e2:
            log.error("schedule %s: its job for %s was refused (%s); skipping this time",
                      name, fire_text(due), e2.details or e2.message)
            created = False
        except BulkrunnerError as e2:  # queue full, database busy: not the schedule's fault
            log.warning("schedule %s: could not submit its job for %s (%s); trying again "
                        "in %g s", name, fire_text(due), e2.message, _RETRY)
            e.retry_at = now + _RETRY
            return False
        if created and (missed or now - due > 1.0):
            log.info("schedule %s missed %d firing(s) while the server was down: one job "
                     "catches up, for the latest (%s): job %s", name, missed + 1,
                     fire_text(due), job_id, extra={"job_id": job_id})
        elif created:
            log.info("schedule %s fired for %s: job %s", name, fire_text(due), job_id,
                     extra={"job_id": job_id})
        e.last_fire, e.last_job = due, job_id or e.last_job
        e.retry_at = 0.0
        try:
            self.service.store.record_fire(name, due, job_id)
        except Exception as e2:  # the key still guards the fire time
            log.warning("schedule %s: could not record its firing for %s (%s)", name,
                        fire_text(due), e2)
        return True

    # ------------------------------------------------------------------ the API
    def listing(self) -> list[dict[str, Any]]:
        """Every schedule as ``GET /api/v1/schedules`` shows it: its rule, whether it is
        enabled, its next fire time (None when disabled) and its latest one, with its job."""
        runs = self.service.store.schedule_runs() if self._entries else {}
        now = time.time()
        out = []
        for e in self._entries:
            s, run = e.cfg, runs.get(e.cfg.name)
            nxt: float | None = None
            if s.enabled:
                nxt = e.next if e.next else e.rule.after(now)
            out.append({"name": s.name, "task": s.task, "cron": s.cron or None,
                        "every": int(s.every) if s.every else None,
                        "timezone": s.timezone, "enabled": s.enabled,
                        "next_run": iso(nxt),
                        "last_run": iso(run.last_fire) if run is not None else None,
                        "last_job": run.last_job if run is not None else None})
        return out


def _check_params(s: ScheduleConfig, registry: Registry, source: str | None) -> None:
    """A schedule's params must fit its task's signature (else every firing is refused)."""
    if s.task not in registry:
        return  # validated with the config; the registry says why it is missing
    problems = registry.get(s.task).check(s.params)
    if problems:
        said = "; ".join(f"{k.removeprefix('params.')}: {v}" for k, v in problems.items())
        raise ConfigError(f"do not fit the task {s.task!r} ({said}); every firing would be "
                          "refused", file=source, key=f"schedules.{s.name}.params")


__all__ = ["Rule", "Scheduler", "fire_key", "fire_text"]
