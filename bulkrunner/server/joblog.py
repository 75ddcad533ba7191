"""The server log's lines about jobs: one when a job is submitted, starts, is retried,
cancelled or finishes. A listener of the event bus, like metrics."""

from __future__ import annotations

import logging

from bulkrunner.models import FINISHED
from bulkrunner.server.events import EventBus, JobChanged, Submitted

log = logging.getLogger("bulkrunner.server.service")


def subscribe(events: EventBus) -> None:
    """Log job lines for the events of ``events``."""
    events.subscribe(Submitted, _submitted)
    events.subscribe(JobChanged, _changed)


def _submitted(e: Submitted) -> None:
    job = e.job
    by = f", by {job.submitted_by}" if job.submitted_by else ""  # the token's name, never it
    log.info("job %s submitted: task %s, %d item(s)%s", job.id, job.task, job.total, by,
             extra={"job_id": job.id})


def _changed(ch: JobChanged) -> None:
    extra = {"job_id": ch.job_id}
    if ch.old in FINISHED and ch.new not in FINISHED:
        log.info("job %s retried: %d item(s) queued again", ch.job_id, ch.counts["queued"],
                 extra=extra)
    elif ch.new == "running" and ch.old == "queued":
        log.info("job %s started: task %s", ch.job_id, ch.task, extra=extra)
    if ch.new in FINISHED:
        c = ch.counts
        if ch.new == "cancelled":
            log.info("job %s cancelled", ch.job_id, extra=extra)
        log.log(logging.WARNING if ch.new == "failed" else logging.INFO,
                "job %s finished: %s (%d succeeded, %d failed, %d cancelled; task %s)",
                ch.job_id, ch.new, c["succeeded"], c["failed"], c["cancelled"], ch.task,
                extra=extra)
