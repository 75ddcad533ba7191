"""The job service: what the API, the web page and an embedding app call (submit, get,
list, cancel, retry, items, export, tasks, health).

The only module that knows both the store and the dispatcher. Submissions are checked
(:mod:`bulkrunner.server.submission`) before anything is written, so a bad one stores
nothing; what happens is told on the event bus.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from bulkrunner.config import Config
from bulkrunner.errors import ConfigError, InvalidSubmission, ShuttingDown, StoreUnavailable
from bulkrunner.executors import make_executor
from bulkrunner.models import Item, Job, iso
from bulkrunner.runtime import ItemContext
from bulkrunner.server import export, joblog, memory, submission
from bulkrunner.server.dispatcher import Dispatcher
from bulkrunner.server.events import EventBus, Submitted
from bulkrunner.server.itemfiles import detect_format, parse_items
from bulkrunner.server.lease import Leadership
from bulkrunner.server.notify import Notifier
from bulkrunner.server.retention import Pruner
from bulkrunner.server.scheduler import Scheduler
from bulkrunner.server.tasks import Registry
from bulkrunner.server.throughput import Throughput
from bulkrunner.store import Store
from bulkrunner.store.inserts import SLICE_ITEMS


class Service:
    """The job service over one store, one registry and one dispatcher."""

    def __init__(self, cfg: Config, registry: Registry | None = None,
                 store: Store | None = None, *, item_context: ItemContext | None = None
                 ) -> None:
        """``item_context`` is entered around each item run in this process (an embedding
        Flask app's ``app.app_context``); items on worker processes run without it."""
        self.cfg = cfg
        self._item_context = item_context
        self.registry = registry or Registry.from_config(cfg)
        try:
            self.store = store or Store(cfg.store.path)
        except StoreUnavailable as e:
            raise ConfigError(f"{e.message}; point it at a writable file in an existing "
                              "directory (a new file is created)", file=cfg.source,
                              key="store.path") from None
        #: What happens to jobs and items; metrics and the server log subscribe.
        self.events = EventBus()
        joblog.subscribe(self.events)
        #: Finished items per job lately, for the job's rate, chart and ETA.
        self.throughput = Throughput()
        self.throughput.subscribe(self.events)
        self.dispatcher = self._new_dispatcher()
        #: Which process of those sharing the database dispatches (None before start).
        self.lease: Leadership | None = None
        self._draining = False
        self.started = False
        self.pruner = Pruner(self.store, cfg.retention)
        try:  # each checks its part of the config (webhook URLs, the schedules' params)
            #: Completion webhooks, delivered from the outbox; the schedules.
            self.notifier = Notifier(cfg, self.store, self.events)
            self.scheduler = Scheduler(cfg, self)
        except ConfigError:
            self.store.close()
            raise

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        """Start the periodic pruning, and dispatching: at once when this process takes
        the dispatcher lease, else standing by to take it over when its holder stops
        (other processes may share the database: see :mod:`bulkrunner.server.lease`)."""
        if self.store.path in ("", ":memory:"):  # no other process can open it
            self.dispatcher.start()
        else:
            self.lease = Leadership(self.store.path, on_gain=self._lead,
                                    on_loss=self._stand_by, wanted=lambda: not self.draining,
                                    on_tick=self.store.recount)
            self.store.lease = (self.lease.name, self.lease.holder)
            self.lease.start()
        self.pruner.start()
        self.notifier.start()
        self.scheduler.start()  # catches up what it missed while the server was down
        self.started = True

    def stop_background(self) -> None:
        """Stop the schedules, the pruning and the webhook deliveries (what is pending stays
        in the outbox for the next start)."""
        self.scheduler.stop()
        self.pruner.stop()
        self.notifier.stop()

    def _new_dispatcher(self) -> Dispatcher:
        factory = functools.partial(make_executor, item_context=self._item_context)
        return Dispatcher(self.cfg, self.store, self.registry, self.events, factory)

    def _lead(self) -> None:
        """This process took the dispatcher lease: dispatch (with a new dispatcher when
        an earlier one was stopped, so its view of the queue starts afresh)."""
        if self.draining:
            return
        if self.dispatcher.executor is not None:
            self.dispatcher = self._new_dispatcher()
        self.dispatcher.start()

    def _stand_by(self) -> None:
        """Another process took the dispatcher lease over: stop this dispatcher and stand
        by. The new holder re-queues what ran here; the store refuses this one's claims and
        its re-queue at the stop."""
        old, self.dispatcher = self.dispatcher, self._new_dispatcher()
        old.drain(0)

    @property
    def dispatching(self) -> bool:
        """Whether this process dispatches (holds the dispatcher lease, or needs none)."""
        return self.dispatcher.executor is not None and (
            self.lease is None or self.lease.leading)

    @property
    def draining(self) -> bool:
        """True once shutdown began: no new work is accepted."""
        return self._draining or self.dispatcher.draining

    def begin_drain(self) -> None:
        """Refuse new work from now on (the HTTP layer answers 503)."""
        self._draining = True
        self.dispatcher.draining = True

    def close(self, grace: float | None = None) -> None:
        """Drain the dispatcher (``grace`` seconds for running items) and close the store."""
        self.stop_background()
        if self.started:
            self.dispatcher.drain(self.cfg.server.shutdown_grace if grace is None else grace)
            self.started = False
        if self.lease is not None:  # given up: a standby takes over at its next try
            self.lease.stop()
            self.lease = None
        self.store.close()

    # ------------------------------------------------------------------ submit
    def submit(self, body: Any, *, items: Sequence[Mapping[str, Any]] | None = None,
               rows: Sequence[int] | None = None, unit: str = "row",
               submitted_by: str | None = None, schedule: str | None = None
               ) -> tuple[Job, bool]:
        """Check and commit a submission. Returns (job, created). ``submitted_by`` is the
        name of the token that submitted it (None on an open server); ``schedule`` the
        name of the schedule that did.

        ``items`` (with where they are in the file, ``rows`` numbered in ``unit``s, for
        messages) come from an uploaded file, and replace ``body["items"]``.
        """
        if self.draining:
            raise ShuttingDown("the server is shutting down; submit again once it is back",
                               retry_after=10)
        new = submission.new_job(self.cfg, self.registry, body, items=items, rows=rows,
                                 unit=unit, submitted_by=submitted_by)
        new.schedule = schedule
        job, created = self.store.insert_job(new, max_queued=self.cfg.jobs.max_queued)
        if created:
            self.events.emit(Submitted(job))
            if len(new.items) > SLICE_ITEMS:
                # Written in slices, it got its number before jobs submitted meanwhile:
                # the dispatcher reads all waiting jobs again, not only newer ones.
                self.dispatcher.refresh()
                memory.trim_soon()  # what parsing it took goes back to the system
            else:
                self.dispatcher.wake()
        return job, created

    def submit_upload(self, form: Mapping[str, str], data: bytes, filename: str | None,
                      content_type: str | None, *, submitted_by: str | None = None
                      ) -> tuple[Job, bool]:
        """Submit with items from an uploaded CSV, TSV, JSON Lines or JSON array file."""
        body = submission.form_to_body(form)
        task = self.registry.get(body.get("task"))
        fmt = detect_format(filename, content_type, data)
        parsed = parse_items(data, fmt, task)
        if not parsed.items:
            raise InvalidSubmission({"items": "the file holds no items" if fmt.startswith(
                "json") else "the file has no rows after the header"})
        return self.submit(body, items=parsed.items, rows=parsed.rows, unit=parsed.unit,
                           submitted_by=submitted_by)

    # ------------------------------------------------------------------ read and act
    def get(self, ident: str) -> Job:
        """One job by id or unique prefix; NotFound when unknown."""
        return self._paced(self.store.get_job(ident))

    def list_jobs(self, *, state: str | None = None, task: str | None = None, limit: int = 20,
             before: int | None = None, submitted_by: str | None = None
             ) -> tuple[list[Job], int | None]:
        """A page of jobs, newest first, and the cursor of the next page (or None);
        ``submitted_by`` keeps the jobs of that token's name."""
        return self.store.list_jobs(state=state, task=task, limit=limit, before=before,
                                    submitted_by=submitted_by)

    def cancel(self, ident: str) -> Job:
        """Cancel a job's unfinished items and stop the running ones; returns the job."""
        job, running, changes = self.store.cancel_job(ident)
        if running:
            self.dispatcher.abort(running)
        self.events.job_changes(changes)
        return job

    def retry(self, ident: str) -> Job:
        """Re-queue a job's failed and cancelled items; ShuttingDown while draining."""
        if self.draining:
            raise ShuttingDown("the server is shutting down; retry once it is back",
                               retry_after=10)
        job, changes = self.store.retry_job(ident)
        self.events.job_changes(changes)
        self.dispatcher.refresh()
        return job

    def pause(self, ident: str) -> Job:
        """Pause a job: its queued items wait, running ones finish. JobFinished when it
        has finished; pausing a paused job answers it as it is."""
        job, changes = self.store.pause_job(ident, True)
        self.events.job_changes(changes)
        self.dispatcher.refresh()
        return self._paced(job)

    def resume(self, ident: str) -> Job:
        """Resume a paused job; NotPaused when it is not paused."""
        job, changes = self.store.pause_job(ident, False)
        self.events.job_changes(changes)
        self.dispatcher.refresh()
        return self._paced(job)

    def pause_task(self, name: str, paused: bool = True) -> dict[str, Any]:
        """Pause (or resume) a task: none of its items starts until it is resumed; kept
        across restarts. NotFound for a task that is not registered."""
        task = self.registry.lookup(name)
        self.store.set_task_paused(task.name, paused)
        self.dispatcher.pacer.set_task_paused(task.name, paused)
        self.dispatcher.refresh()
        return self._task_dict(task.name)

    def pace(self, ident: str) -> dict[str, Any]:
        """How a job is going: items finished per interval lately (``history`` of
        ``{"t", "finished"}``), the current ``rate`` in items per second, the task's
        ``rate_limit`` and the rate it allows, why its items wait, and ``eta_seconds``
        (the items left at the current rate; None when it cannot be told)."""
        job = self.get(ident)
        now = time.time()
        seen = self.throughput.of(job.id, now)
        t = self.cfg.task(job.task)
        limit = t.rate_limit if t is not None else None
        left = job.counts["queued"] + job.counts["running"]
        rate = seen["rate"]
        eta: float | None = None
        if left == 0:
            eta = 0.0
        elif rate:
            eta = round(left / rate, 1)
        elif job.run_after is not None and job.run_after > now:
            eta = None
        return {"id": job.id, "state": job.state.value, "left": left,
                "interval": seen["interval"],
                "history": [{"t": iso(start), "finished": int(n)}
                            for start, n in seen["history"]],
                "rate": None if rate is None else round(rate, 3),
                "rate_limit": str(limit) if limit else "",
                "limit_per_second": round(limit.count / limit.per, 6) if limit else None,
                "waiting": job.waiting, "run_after": iso(job.run_after),
                "eta_seconds": eta}

    def _paced(self, job: Job) -> Job:
        """The job with why its queued items wait, when something holds them."""
        if job.counts["queued"] and not job.state.finished:
            job.waiting = self.dispatcher.pacer.waiting_reason(
                job.seq, job.task, time.time()) if job.seq else None
        return job

    def items(self, ident: str, *, state: str | None = None, limit: int = 100,
              after: int | None = None) -> tuple[list[Item], int | None]:
        """A page of a job's items in index order, and the cursor of the next page."""
        return self.store.list_items(ident, state=state, limit=limit, after=after)

    def export(self, ident: str, fmt: str, *, state: str | None = None
               ) -> tuple[Job, Iterator[str]]:
        """The job, and its items (or only those in ``state``) as JSON lines or CSV rows
        produced a chunk at a time. NotFound comes here, before the stream starts."""
        job = self.store.get_job(ident)
        rows = self.store.export_rows(job.id, state=state)
        if fmt == "jsonl":
            return job, export.jsonl_lines(rows)
        params = list(self.registry.get(job.task).params) if job.task in self.registry else []
        return job, export.csv_rows(rows, params)

    def item_log(self, ident: str, index: int, after: int = 0) -> tuple[bytes, int, str]:
        """What item ``index`` printed and logged, as UTF-8 from byte offset ``after``.

        Returns (the bytes, the offset to ask from next time, the item's state). Each run
        after the first (a retry, or a re-run after a restart) starts with a
        ``--- run N ---`` line. Chunks are only ever appended, so offsets stay valid.
        """
        chunks, state = self.store.read_log(ident, index)
        parts: list[str] = []
        prev: int | None = None
        for claim, text in chunks:
            if prev is not None and claim != prev:
                sep = "" if parts[-1].endswith("\n") else "\n"
                parts.append(f"{sep}--- run {claim} ---\n")
            parts.append(text)
            prev = claim
        data = "".join(parts).encode("utf-8", "backslashreplace")
        return data[after:], len(data), state

    def prune(self, *, dry_run: bool = False) -> dict[str, Any]:
        """Delete (or count) finished jobs past their retention age; counts per state."""
        return self.pruner.run(dry_run=dry_run)

    def schedules(self) -> list[dict[str, Any]]:
        """The configured schedules as the API shows them (next and latest runs)."""
        return self.scheduler.listing()

    def tasks(self) -> list[dict[str, Any]]:
        """The registered tasks as the API shows them, with their limits and pause."""
        paused = self.store.paused_tasks()
        return [self._task_dict(t.name, paused) for t in self.registry]

    def _task_dict(self, name: str, paused: set[str] | None = None) -> dict[str, Any]:
        paused = self.store.paused_tasks() if paused is None else paused
        t = self.cfg.task(name)
        return {**self.registry.get(name).to_dict(),
                "concurrency": t.concurrency if t is not None else 0,
                "rate_limit": str(t.rate_limit) if t is not None and t.rate_limit else "",
                "paused": name in paused}

    def health(self) -> dict[str, Any]:
        """What GET /healthz answers: status, executor, store, queue and worker counts. The
        status names why the server is unhealthy: draining, the database cannot be written
        (``database_full``, ``database_locked``), or the executor is unusable."""
        ex = self.dispatcher.executor
        standby = ex is None and self.lease is not None
        ok, detail = ex.health() if ex is not None else (False, "not started")
        if standby:
            detail = (f"standing by: {self._holder()} dispatches; this process takes over "
                      "if it stops")
        fault = self.store.unwritable()
        status = "draining" if self.draining else (
            fault.code if fault is not None else "ok" if ok or standby
            else "executor_unavailable")
        return {"status": status, "executor": {"type": self.cfg.executor.type, "ok": ok,
                                               "detail": detail},
                "store": {"ok": fault is None,
                          "detail": fault.message if fault is not None else "writable"},
                "queued": self.store.queued, "inflight": self.dispatcher.inflight,
                "max_workers": self.dispatcher.max_workers, "dispatching": self.dispatching,
                "workers": _workers(ex) if ok else 0}

    def _holder(self) -> str:
        return (self.lease.current if self.lease is not None else None) or "another process"


def service_of(found: Any) -> Service:
    """The Service an app keeps in ``app.extensions["bulkrunner"]``: the service itself, or
    an embedding app's mount (``bulkrunner.flask``), whose ``service`` is started in each
    process on first use."""
    svc: Service = found if isinstance(found, Service) else found.service
    return svc


def _workers(ex: Any) -> int:
    """Workers ready to run items: live worker processes, Dask worker threads, or the
    thread pool's size (an executor says with a ``workers()`` method)."""
    count = getattr(ex, "workers", None)
    return int(count()) if callable(count) else int(ex.max_workers)


__all__ = ["Service", "service_of"]
