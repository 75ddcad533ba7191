"""What the web app calls: submit, get, list, cancel, retry, items, export, tasks, health.

The only module that knows both the store and the dispatcher. It validates submissions
against the task registry before anything is written, so a bad submission stores nothing.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import math
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

from bulkrunner.config import Config
from bulkrunner.errors import (
    ConfigError,
    InvalidSubmission,
    QueueFull,
    ShuttingDown,
    StoreUnavailable,
)
from bulkrunner.models import Item, Job
from bulkrunner.server.dispatcher import Dispatcher
from bulkrunner.server.itemfiles import detect_format, parse_items
from bulkrunner.server.retention import Pruner
from bulkrunner.server.tasks import Registry, Task
from bulkrunner.store import JobChange, NewJob, Store

log = logging.getLogger("bulkrunner.server.service")

SUBMIT_KEYS = ("task", "params", "items", "priority", "max_attempts", "timeout", "key")
MAX_PRIORITY = 1_000_000
MAX_ATTEMPTS = 100
_MAX_ITEM_ERRORS = 20


class Service:
    """The job service over one store, one registry and one dispatcher."""

    def __init__(self, cfg: Config, registry: Registry | None = None,
                 store: Store | None = None) -> None:
        self.cfg = cfg
        self.registry = registry or Registry.from_config(cfg)
        try:
            self.store = store or Store(cfg.store.path)
        except StoreUnavailable as e:
            raise ConfigError(f"{e.message}; point it at a writable file in an existing "
                              "directory (a new file is created)", file=cfg.source,
                              key="store.path") from None
        self.dispatcher = Dispatcher(cfg, self.store, self.registry)
        self.started = False
        self.pruner = Pruner(self.store, cfg.retention)
        #: Called with each newly accepted job, on the request's thread (metrics).
        self.submit_hooks: list[Callable[[Job], None]] = []
        self.store.on_job_change = _log_job_changes

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        """Start the dispatcher and the periodic pruning."""
        self.dispatcher.start()
        self.pruner.start()
        self.started = True

    @property
    def draining(self) -> bool:
        """True once shutdown began: no new work is accepted."""
        return self.dispatcher.draining

    def begin_drain(self) -> None:
        """Refuse new work from now on (the HTTP layer answers 503)."""
        self.dispatcher.draining = True

    def close(self, grace: float | None = None) -> None:
        """Drain the dispatcher (``grace`` seconds for running items) and close the store."""
        self.pruner.stop()
        if self.started:
            self.dispatcher.drain(self.cfg.server.shutdown_grace if grace is None else grace)
            self.started = False
        self.store.close()

    # ------------------------------------------------------------------ submit
    def submit(self, body: Any, *, items: Sequence[Mapping[str, Any]] | None = None,
               rows: Sequence[int] | None = None, unit: str = "row") -> tuple[Job, bool]:
        """Validate and commit a submission. Returns (job, created).

        ``items`` (with where they are in the file, ``rows`` numbered in ``unit``s, for
        messages) come from an uploaded file, and replace ``body["items"]``.
        """
        if self.draining:
            raise ShuttingDown("the server is shutting down; submit again once it is back",
                               retry_after=10)
        if not isinstance(body, dict):
            raise InvalidSubmission({"body": "must be a JSON object like "
                                             '{"task": "echo", "params": {}}'})
        unknown = [k for k in body if k not in SUBMIT_KEYS]
        if unknown:
            raise InvalidSubmission({k: f"unknown field; a submission takes "
                                        f"{', '.join(SUBMIT_KEYS)}" for k in unknown[:10]})
        task = self.registry.get(body.get("task"))
        fields: dict[str, str] = {}
        params = body.get("params", {})
        if params is None:
            params = {}
        if not isinstance(params, dict):
            raise InvalidSubmission({"params": "must be an object of param names to values"})
        priority = _int_field(body, "priority", 0, -MAX_PRIORITY, MAX_PRIORITY, fields)
        attempts_default = task.max_attempts or self.cfg.jobs.max_attempts
        max_attempts = _int_field(body, "max_attempts", attempts_default, 1, MAX_ATTEMPTS,
                                  fields)
        timeout = _timeout_field(body, task.timeout if task.timeout is not None
                                 else self.cfg.jobs.timeout, fields)
        key = body.get("key")
        if key is not None and (not isinstance(key, str) or not 0 < len(key) <= 200):
            fields["key"] = "must be a string of 1 to 200 characters"
        elif key is not None and not _is_unicode(key):
            # JSON's "\ud800" escape decodes to a lone surrogate, which SQLite cannot store.
            fields["key"] = "must be valid Unicode text (it holds an unpaired surrogate)"
        if items is None:
            raw_items = body.get("items")
            if raw_items is not None and not isinstance(raw_items, list):
                fields["items"] = "must be a list of objects, one per item"
                raw_items = None
            items = raw_items
        if fields:
            raise InvalidSubmission(fields)

        encoded_items = self._check_params(task, params, items, rows, unit)
        body_hash = None
        if key is not None:
            canon = dict(body, items=list(items) if items is not None else None)
            body_hash = hashlib.sha256(json.dumps(canon, sort_keys=True, default=str)
                                       .encode()).hexdigest()
        new = NewJob(id=uuid.uuid4().hex, task=task.name, params=params, items=encoded_items,
                     priority=priority, max_attempts=max_attempts, timeout=timeout, key=key,
                     body_hash=body_hash)
        job, created = self.store.insert_job(new, check=self._check_room(len(encoded_items)))
        if created:
            log.info("job %s submitted: task %s, %d item(s)", job.id, job.task, job.total,
                     extra={"job_id": job.id})
            self.dispatcher.wake()
            for hook in self.submit_hooks:
                hook(job)
        return job, created

    def _check_room(self, n: int) -> Any:
        limit = self.cfg.jobs.max_queued

        def check(queued: int) -> None:
            if queued + n > limit:
                raise QueueFull(f"the queue is full ({queued} items waiting, the limit is "
                                f"jobs.max_queued = {limit}); try again later",
                                retry_after=5, details={"queued": queued, "limit": limit})
        return check

    def _check_params(self, task: Task, params: dict[str, Any],
                      items: Sequence[Any] | None,
                      rows: Sequence[int] | None, unit: str = "row") -> list[str | None]:
        """Check job params and every item; return the items' JSON overlays."""
        max_size = self.cfg.jobs.max_param_size
        text = _strict_dumps(params)
        if text is not None and len(text) > max_size:
            raise InvalidSubmission({"params": f"more than jobs.max_param_size ({max_size} "
                                               "bytes) of JSON"})
        if items is not None and not items:
            raise InvalidSubmission({"items": "is empty; give at least one item, or "
                                              "leave items out for a single call"})
        if items and len(items) > self.cfg.jobs.max_items:
            raise InvalidSubmission({"items": f"{len(items)} items is more than "
                                              f"jobs.max_items ({self.cfg.jobs.max_items})"})
        # Job-level params of a bulk may leave required params to the items.
        problems = task.check(params, complete=not items)
        if problems:
            raise InvalidSubmission(problems)
        if text is None:
            raise InvalidSubmission({"params": _NOT_FINITE})
        if not items:
            return [None]
        out: list[str | None] = []
        bad: dict[str, str] = {}
        first_row: int | None = None
        for i, item in enumerate(items):
            label = f"items[{i}]" if rows is None else f"{unit} {rows[i]}"
            if not isinstance(item, dict):
                bad[label] = "must be an object of param names to values"
            else:
                bad.update(task.check(item, prefix=label, given=params))
                if not bad:
                    text = _strict_dumps(item) if item else None
                    if item and text is None:
                        bad[label] = _NOT_FINITE
                    elif text is not None and len(text) > max_size:
                        bad[label] = f"more than jobs.max_param_size ({max_size} bytes) of JSON"
                    out.append(text)
            if bad and first_row is None:
                first_row = rows[i] if rows is not None else i
            if len(bad) >= _MAX_ITEM_ERRORS:
                break
        if bad:
            if rows is not None and unit == "item":
                raise InvalidSubmission(bad, item=first_row)
            if rows is not None:
                raise InvalidSubmission(bad, row=first_row)
            raise InvalidSubmission(bad, index=first_row)
        return out

    def submit_upload(self, form: Mapping[str, str], data: bytes, filename: str | None,
                      content_type: str | None) -> tuple[Job, bool]:
        """Submit with items from an uploaded CSV, TSV, JSON Lines or JSON array file."""
        body = form_to_body(form)
        task = self.registry.get(body.get("task"))
        fmt = detect_format(filename, content_type, data)
        parsed = parse_items(data, fmt, task)
        if not parsed.items:
            raise InvalidSubmission({"items": "the file holds no items" if fmt.startswith(
                "json") else "the file has no rows after the header"})
        return self.submit(body, items=parsed.items, rows=parsed.rows, unit=parsed.unit)

    # ------------------------------------------------------------------ read and act
    def get(self, ident: str) -> Job:
        """One job by id or unique prefix; NotFound when unknown."""
        return self.store.get_job(ident)

    def list_jobs(self, *, state: str | None = None, task: str | None = None, limit: int = 20,
             before: int | None = None) -> tuple[list[Job], int | None]:
        """A page of jobs, newest first, and the cursor of the next page (or None)."""
        return self.store.list_jobs(state=state, task=task, limit=limit, before=before)

    def cancel(self, ident: str) -> Job:
        """Cancel a job's unfinished items and stop the running ones; returns the job."""
        job, running = self.store.cancel_job(ident)
        if running:
            self.dispatcher.abort(running)
        log.info("job %s cancelled", job.id, extra={"job_id": job.id})
        return job

    def retry(self, ident: str) -> Job:
        """Re-queue a job's failed and cancelled items; ShuttingDown while draining."""
        if self.draining:
            raise ShuttingDown("the server is shutting down; retry once it is back",
                               retry_after=10)
        job = self.store.retry_job(ident)
        log.info("job %s retried: %d item(s) queued again", job.id, job.counts["queued"],
                 extra={"job_id": job.id})
        self.dispatcher.wake()
        return job

    def items(self, ident: str, *, state: str | None = None, limit: int = 100,
              after: int | None = None) -> tuple[list[Item], int | None]:
        """A page of a job's items in index order, and the cursor of the next page."""
        return self.store.list_items(ident, state=state, limit=limit, after=after)

    def export(self, ident: str, fmt: str) -> Iterator[str]:
        """The job's items, one JSON line or CSV row each, produced a chunk at a time."""
        job = self.store.get_job(ident)  # 404 before the stream starts
        items = self.store.iter_items(job.id)
        if fmt == "jsonl":
            return (json.dumps({"index": it.index, "params": it.params, "state": it.state.value,
                                "attempts": it.attempts, "result": it.result,
                                "error": it.error}) + "\n" for it in items)
        names = [p.name for p in self.registry.get(job.task).params] \
            if job.task in self.registry else []
        return _csv_rows(items, names)

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

    def tasks(self) -> list[dict[str, Any]]:
        """The registered tasks as the API shows them."""
        return [t.to_dict() for t in self.registry]

    def health(self) -> dict[str, Any]:
        """What GET /healthz answers: status, executor, queue and worker counts."""
        ex = self.dispatcher.executor
        ok, detail = ex.health() if ex is not None else (False, "not started")
        status = "draining" if self.draining else ("ok" if ok else "executor_unavailable")
        return {"status": status, "executor": {"type": self.cfg.executor.type, "ok": ok,
                                               "detail": detail},
                "queued": self.store.queued, "inflight": self.dispatcher.inflight,
                "max_workers": self.dispatcher.max_workers,
                "workers": _workers(ex) if ok else 0}


def _workers(ex: Any) -> int:
    """Workers ready to run items: live worker processes, Dask worker threads, or the
    thread pool's size (an executor says with a ``workers()`` method)."""
    count = getattr(ex, "workers", None)
    return int(count()) if callable(count) else int(ex.max_workers)


def _log_job_changes(changes: list[JobChange]) -> None:
    # Runs on the store's writer thread after each commit: one line per start or end.
    for ch in changes:
        extra = {"job_id": ch.id}
        if ch.new == "running" and ch.old == "queued":
            log.info("job %s started: task %s", ch.id, ch.task, extra=extra)
        elif ch.new in ("succeeded", "failed", "cancelled"):
            c = ch.counts
            log.log(logging.WARNING if ch.new == "failed" else logging.INFO,
                    "job %s finished: %s (%d succeeded, %d failed, %d cancelled; task %s)",
                    ch.id, ch.new, c["succeeded"], c["failed"], c["cancelled"], ch.task,
                    extra=extra)


_NOT_FINITE = "holds NaN or Infinity, which JSON cannot carry; send finite numbers"


def _strict_dumps(value: Any) -> str | None:
    """``value`` as JSON text, or None when it holds NaN or Infinity (which Python's json
    reads from a request but which no JSON answer could carry back)."""
    try:
        return json.dumps(value, allow_nan=False)
    except ValueError:
        return None


def _is_unicode(text: str) -> bool:
    """False when ``text`` holds an unpaired surrogate (it has no UTF-8 form)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _int_field(body: dict[str, Any], name: str, default: int, lo: int, hi: int,
               fields: dict[str, str]) -> int:
    v = body.get(name, default)
    if v is None:
        return default
    if not isinstance(v, int) or isinstance(v, bool) or not lo <= v <= hi:
        fields[name] = f"must be a whole number from {lo} to {hi}"
        return default
    return v


def _timeout_field(body: dict[str, Any], default: float, fields: dict[str, str]) -> float:
    v = body.get("timeout", default)
    if v is None:
        return default
    if (not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v)
            or not 0 <= v <= 366 * 86400):
        fields["timeout"] = "must be a number of seconds, 0 for none"
        return default
    return float(v)


def _csv_cell(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, str):
        return v
    return json.dumps(v)


def _csv_rows(items: Iterator[Item], names: list[str]) -> Iterator[str]:
    """CSV text of ``items``, a chunk at a time: a column for each declared param
    (``names``), then one ``params`` column holding every other param as a JSON object.

    The header comes from the task's signature, never from the items: a task taking
    ``**kwargs`` gets different params in each item, and a job may hold params its task no
    longer declares; none of them is dropped.
    """
    extra = "params"
    while extra in names:  # a task may declare a param called "params"
        extra = "_" + extra
    declared = set(names)
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["index", "state", "attempts", *names, extra, "result", "error"])
    for it in items:
        err = it.error
        others = {k: v for k, v in it.params.items() if k not in declared}
        w.writerow([it.index, it.state.value, it.attempts,
                    *(_csv_cell(it.params.get(n)) for n in names),
                    json.dumps(others) if others else "", _csv_cell(it.result),
                    f"{err.get('type')}: {err.get('message')}" if err else ""])
        if buf.tell() > 64 * 1024:
            yield _encodable(buf.getvalue())
            buf.seek(0)
            buf.truncate()
    yield _encodable(buf.getvalue())


def _encodable(text: str) -> str:
    """``text`` with unpaired surrogates (legal in JSON strings as ``\\ud800``, but not
    encodable as UTF-8) written as backslash escapes, so the response can be encoded."""
    return text if text.isascii() else text.encode("utf-8", "backslashreplace").decode()


__all__ = ["Service"]


def form_to_body(form: Mapping[str, str]) -> dict[str, Any]:
    """A submission body from multipart form fields (``params`` is JSON text)."""
    body: dict[str, Any] = {}
    fields: dict[str, str] = {}
    for name, value in form.items():
        if name not in SUBMIT_KEYS or name == "items":
            takes = ", ".join(k for k in SUBMIT_KEYS if k != "items")
            fields[name] = ("unknown form field; a multipart submission takes the file "
                            f"'items' and the fields {takes}")
            continue
        if value == "":
            continue
        if name == "params":
            try:
                body[name] = json.loads(value)
            except (ValueError, RecursionError):
                fields[name] = "must be a JSON object"
        elif name in ("priority", "max_attempts"):
            try:
                body[name] = int(value)
            except ValueError:
                fields[name] = "must be a whole number"
        elif name == "timeout":
            try:
                body[name] = float(value)
            except ValueError:
                fields[name] = "must be a number of seconds"
        else:
            body[name] = value
    if fields:
        raise InvalidSubmission(fields)
    return body
