"""Completion webhooks: when a job with a notify URL ends, POST its notice there.

The notice is queued in the store's outbox in the transaction that ends the job, so it
survives a kill; this module delivers it. One thread takes due deliveries from the outbox
(and records how the last attempts went, in the same write), and a few sender threads make
the HTTP requests, so a slow or dead receiver holds up neither the dispatcher nor a request
thread, nor (up to ``SENDERS`` of them) the other receivers.

Each delivery POSTs ``{"event": "job.finished", "job": <the job as GET shows it>}`` with
``X-Bulkrunner-Delivery`` (a unique id: receivers deduplicate by it, as delivery is at
least once) and, with ``[notify] secret``, ``X-Bulkrunner-Signature: sha256=<hex HMAC-SHA256
of the body bytes>``. The body is fixed at the first attempt, so a retry is the same bytes
with the same signature. A non-2xx answer, a timeout or a refused connection is tried again
after an exponential backoff (1 s doubling to 10 min, with jitter) until ``[notify]
max_attempts`` attempts; then the delivery is ``failed``. The job's own state never depends
on it. Redirects are not followed (the URL is the one that was allowed).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import queue
import random
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import urllib3

from bulkrunner import __version__
from bulkrunner.config import Config
from bulkrunner.errors import ConfigError, NotFound
from bulkrunner.models import FINISHED_STATES
from bulkrunner.server.events import EventBus, JobChanged, Notified
from bulkrunner.store import Store
from bulkrunner.store.outbox import Attempt, Delivery

log = logging.getLogger("bulkrunner.notify")

EVENT = "job.finished"
DELIVERY_HEADER = "X-Bulkrunner-Delivery"
SIGNATURE_HEADER = "X-Bulkrunner-Signature"
#: Seconds before the first retry, and the most between two attempts.
FIRST_BACKOFF = 1.0
MAX_BACKOFF = 600.0
#: Deliveries in flight at once (each on a sender thread).
SENDERS = 4
#: Seconds a claimed delivery stays leased past its timeout (a process that died mid-attempt
#: leaves it to be tried again after that).
_LEASE_MARGIN = 30.0
#: Seconds between looks at the outbox when nothing wakes the notifier (another process
#: sharing the database may have queued a delivery).
_IDLE_POLL = 5.0
#: Bytes of a receiver's answer read (the rest is dropped with its connection).
_MAX_ANSWER = 64 * 1024
_MAX_URL = 2048


def sign(secret: bytes, body: bytes) -> str:
    """The ``X-Bulkrunner-Signature`` value of ``body``: ``sha256=<hex HMAC-SHA256>``."""
    return "sha256=" + hmac.new(secret, body, hashlib.sha256).hexdigest()


def backoff_delay(failed: int, rand: Callable[[], float] = random.random) -> float:
    """Seconds to wait after ``failed`` attempts in a row: 1 s doubling up to 10 min, each
    stretched by up to half at random, so deliveries that failed together (a receiver that
    was down) do not all come back at the same moment."""
    base = min(MAX_BACKOFF, FIRST_BACKOFF * 2.0 ** min(max(failed - 1, 0), 30))
    return min(MAX_BACKOFF, base * (1.0 + rand() / 2))


def url_problem(url: Any) -> str | None:
    """What is wrong with ``url`` as a webhook address, or None: it must be an http or
    https URL with a host, without credentials or spaces, of at most 2048 characters."""
    if not isinstance(url, str) or not url:
        return 'must be an http(s) URL in quotes, like "https://hooks.example.com/bulk"'
    if len(url) > _MAX_URL:
        return f"must be at most {_MAX_URL} characters"
    if any(ch.isspace() or ord(ch) < 32 or ord(ch) == 127 for ch in url):
        return "must not hold spaces or control characters"
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 (raises ValueError for a port that is not a number)
    except ValueError:
        return "is not a URL (check the host and the port)"
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return 'must be an http or https URL with a host, like "https://hooks.example.com/x"'
    if parts.username is not None or parts.password is not None:
        return "must not carry a user name or password; put a token in the path or query"
    return None


def under_prefix(url: str, prefixes: Sequence[str]) -> bool:
    """True when ``url`` starts with one of ``prefixes`` at a boundary: a prefix that does
    not end in ``/`` must be followed by ``/``, ``?``, ``#`` or nothing, so the prefix
    ``https://hooks.example.com`` does not admit ``https://hooks.example.com.evil.org``."""
    for p in prefixes:
        if url.startswith(p) and (p.endswith("/") or len(url) == len(p)
                                  or url[len(p)] in "/?#"):
            return True
    return False


def notify_url_problem(url: Any, allowed: Sequence[str]) -> str | None:
    """What is wrong with a submission's ``notify_url``, or None when it may be used."""
    if not allowed:
        return ("this server takes no per-job webhook URLs ([notify] allowed is empty); "
                "leave notify_url out, or ask its admin to allow a prefix")
    problem = url_problem(url)
    if problem is not None:
        return problem
    if not under_prefix(url, allowed):
        return (f"must start with one of the allowed prefixes ([notify] allowed): "
                f"{', '.join(allowed)}")
    return None


def task_notify_url(cfg: Config, task: str) -> str | None:
    """The task's own webhook URL (``notify`` in its config table), or None."""
    t = cfg.task(task)
    return t.notify if t is not None and t.notify else None


def read_secret(cfg: Config) -> bytes:
    """``[notify] secret``, else the contents of ``secret_file`` (stripped); b"" for none.

    Raises:
        ConfigError: the secret file cannot be read.
    """
    n = cfg.notify
    if n.secret:
        return n.secret.encode()
    if not n.secret_file:
        return b""
    try:
        return Path(n.secret_file).read_text().strip().encode()
    except (OSError, UnicodeDecodeError) as e:
        reason = getattr(e, "strerror", None) or "it is not UTF-8 text"
        raise ConfigError(f"cannot read the secret file {n.secret_file} ({reason})",
                          file=cfg.source, key="notify.secret_file") from None


class Notifier:
    """Delivers the outbox: one thread claims due deliveries and records attempts, the
    sender threads POST. ``start`` and ``stop`` with the service."""

    def __init__(self, cfg: Config, store: Store, events: EventBus) -> None:
        for t in cfg.tasks:
            problem = url_problem(t.notify) if t.notify else None
            if problem:
                raise ConfigError(problem, file=cfg.source, key=f"tasks.{t.name}.notify")
        self.store = store
        self.events = events
        self.secret = read_secret(cfg)
        self.max_attempts = cfg.notify.max_attempts
        self.timeout = cfg.notify.timeout
        self._http: Any = None  # the urllib3 PoolManager, made at start
        self._todo: queue.SimpleQueue[Delivery | None] = queue.SimpleQueue()
        self._done: queue.SimpleQueue[tuple[Attempt, Delivery, str]] = queue.SimpleQueue()
        self._inflight = 0  # claimed and not yet recorded (touched by the main thread only)
        #: Ended attempts whose write failed, for the next turn.
        self._unrecorded: list[tuple[Attempt, Delivery, str]] = []
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._grace = 2.0
        #: Whether jobs can get webhooks under this config (a task's notify, or prefixes
        #: for per-job URLs). A server that cannot is not woken by every job's end.
        self.possible = bool(cfg.notify.allowed) or any(t.notify for t in cfg.tasks)
        if self.possible:
            events.subscribe(JobChanged, self._job_changed)

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        """Start the notifier thread and the senders (pending deliveries of a previous run
        are due as they were). Nothing starts on a server that can have no webhooks and
        has none pending."""
        if not self.possible and self.store.deliveries_due_at() is None:
            return
        self._http = urllib3.PoolManager(num_pools=64, maxsize=SENDERS, block=False,
                                         retries=False, timeout=urllib3.Timeout(
                                             total=self.timeout),
                                         headers={"User-Agent": f"bulkrunner/{__version__}"})
        self._threads = [threading.Thread(target=self._run, name="bulkrunner-notify",
                                          daemon=True)]
        self._threads += [threading.Thread(target=self._send_loop, daemon=True,
                                           name=f"bulkrunner-notify-send-{i}")
                          for i in range(SENDERS)]
        for t in self._threads:
            t.start()

    def stop(self, timeout: float = 2.0) -> None:
        """Stop claiming; give attempts in flight up to ``timeout`` seconds to end and be
        recorded. One still in flight then stays leased in the outbox and is tried again
        when its lease ends (delivery is at least once)."""
        if not self._threads:
            return
        self._grace = timeout
        self._stop.set()
        self._wake.set()
        main, senders = self._threads[0], self._threads[1:]
        for _ in senders:
            self._todo.put(None)
        main.join(timeout + 1.0)
        self._threads = []
        if self._http is not None:
            self._http.clear()

    def _job_changed(self, e: JobChanged) -> None:
        # On the dispatcher's (or a request's) thread: only a flag, never the work.
        if e.new in FINISHED_STATES:
            self._wake.set()

    # ------------------------------------------------------------------ the main thread
    def _run(self) -> None:
        deadline: float | None = None
        while True:
            if self._stop.is_set():
                deadline = deadline or time.monotonic() + self._grace
                if not self._inflight or time.monotonic() >= deadline:
                    self._turn(claim=False)
                    return
            try:
                wait = self._turn(claim=not self._stop.is_set())
            except Exception:  # background code logs and carries on
                log.exception("webhook notifier error; retrying in a moment")
                wait = 1.0
            self._wake.wait(wait if not self._stop.is_set() else 0.05)
            self._wake.clear()

    def _turn(self, claim: bool = True) -> float:
        """Record the attempts that ended and claim what the senders can take, in one write;
        return how long to wait before looking again."""
        ended, self._unrecorded = self._unrecorded, []
        while True:
            try:
                ended.append(self._done.get_nowait())
            except queue.Empty:
                break
        free = SENDERS - (self._inflight - len(ended)) if claim else 0
        now = time.time()
        due = self.store.deliveries_due_at() if free > 0 else None
        if not ended and (due is None or due > now):
            return _IDLE_POLL if due is None else min(_IDLE_POLL, due - now)
        n = free if due is not None and due <= now else 0
        try:
            claimed = self.store.delivery_turn([a for a, _, _ in ended], n,
                                               self.timeout + _LEASE_MARGIN)
        except BaseException:
            self._unrecorded = ended  # recorded at the next turn
            raise
        self._inflight += len(claimed) - len(ended)
        for a, d, job_id in ended:
            self.events.emit(Notified(job_id, d.url, _OUTCOME[a.state], d.attempts + 1,
                                      a.status))
        for d in claimed:
            self._todo.put(d)
        return 0.0  # look again at once: the next turn works out how long to wait

    # ------------------------------------------------------------------ the senders
    def _send_loop(self) -> None:
        while True:
            d = self._todo.get()
            if d is None or self._stop.is_set():  # a delivery left here stays leased
                return
            try:
                attempt, job_id = self._attempt(d)
            except Exception as e:  # never lose the delivery: it is tried again
                if self._stop.is_set():
                    return
                log.exception("webhook delivery %s failed unexpectedly", d.delivery)
                attempt, job_id = self._outcome(d, d.body or b"", None, repr(e)), ""
            self._done.put((attempt, d, job_id))
            self._wake.set()

    def _attempt(self, d: Delivery) -> tuple[Attempt, str]:
        """One POST of delivery ``d``; how it went, and the job's id."""
        body = d.body
        job_id = ""
        if body is None:
            try:
                job = self.store.job_by_seq(d.job_seq)
            except NotFound:
                return Attempt(d.row, "failed", b"", error="the job was deleted before its "
                               "notice could be sent"), ""
            job_id = job.id
            shown = job.to_dict()
            # As GET showed it when the notice was first sent: pending, no attempt yet.
            shown["notify"] = {"url": d.url, "state": "pending", "attempts": d.attempts}
            body = json.dumps({"event": EVENT, "job": shown}, separators=(",", ":")).encode()
        else:
            job_id = _job_id(body)
        headers = {"Content-Type": "application/json", "X-Bulkrunner-Event": EVENT,
                   DELIVERY_HEADER: d.delivery}
        if self.secret:
            headers[SIGNATURE_HEADER] = sign(self.secret, body)
        try:
            resp = self._http.request("POST", d.url, body=body, headers=headers,
                                      redirect=False, retries=False, preload_content=False)
        except (urllib3.exceptions.HTTPError, OSError, ValueError) as e:
            return self._outcome(d, body, None, _reason(e)), job_id
        whole = False
        try:
            answer = resp.read(_MAX_ANSWER)
            whole = resp.read(1) == b""
        except (urllib3.exceptions.HTTPError, OSError):
            answer = b""
        finally:
            # A connection goes back to the pool only with its answer read to the end.
            resp.release_conn() if whole else resp.close()
        if 200 <= resp.status < 300:
            log.debug("webhook for job %s delivered to %s (attempt %d)", job_id, d.url,
                      d.attempts + 1, extra={"job_id": job_id})
            return Attempt(d.row, "delivered", body, status=resp.status), job_id
        text = answer[:200].decode("utf-8", "replace").strip()
        return self._outcome(d, body, resp.status, f"HTTP {resp.status}"
                             + (f": {text}" if text else "")), job_id

    def _outcome(self, d: Delivery, body: bytes, status: int | None, error: str) -> Attempt:
        """A failed attempt: tried again after the backoff, or failed for good."""
        attempts = d.attempts + 1
        if attempts >= self.max_attempts:
            log.warning("webhook %s to %s failed after %d attempt(s), the last with %s; "
                        "not tried again", d.delivery, d.url, attempts, error)
            return Attempt(d.row, "failed", body, status=status, error=error[:1000])
        delay = backoff_delay(attempts)
        log.info("webhook %s to %s: attempt %d of %d failed (%s); trying again in %.1f s",
                 d.delivery, d.url, attempts, self.max_attempts, error, delay)
        return Attempt(d.row, "pending", body, status=status, error=error[:1000],
                       next_at=time.time() + delay)


_OUTCOME = {"delivered": "delivered", "pending": "retrying", "failed": "failed"}


def _job_id(body: bytes) -> str:
    """The job id inside a stored notice (for the log and the event)."""
    try:
        return str(json.loads(body)["job"]["id"])
    except (ValueError, KeyError, TypeError):
        return ""


def _reason(e: BaseException) -> str:
    """A short sentence for a request that got no answer."""
    text = str(getattr(e, "reason", None) or e) or type(e).__name__
    return f"{type(e).__name__}: {text}"[:500]


__all__ = ["DELIVERY_HEADER", "EVENT", "SIGNATURE_HEADER", "Notifier", "backoff_delay",
           "notify_url_problem", "read_secret", "sign", "task_notify_url", "under_prefix",
           "url_problem"]
