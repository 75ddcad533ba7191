"""The dispatcher lease: of the processes that share one database (gunicorn workers of one
app, an active and a standby ``bulkrunner serve``), exactly one dispatches at a time.

Every process may submit, read and cancel; only the holder of the ``dispatcher`` lease
claims items and re-queues what was left running. :class:`Leadership` keeps a thread that
renews the lease every :data:`RENEW_EVERY` seconds while this process holds it, and tries
to take it as often while another does. The lease runs out :data:`TTL` seconds after its
last renewal; a standby takes it then, or at its next try when the holder's process is
gone from this machine (its pid no longer exists), so a killed holder is replaced within
about a second and a frozen or unreachable one within ``TTL``.

The store itself checks the lease in the transaction of every claim and of every re-queue
of running items (:attr:`bulkrunner.store.Store.lease`): a holder whose renewals fail (the
database locked, the process stalled) claims nothing from the moment its lease runs out,
and one that was taken over cannot re-queue the new holder's items. Items a holder had
running when it lost the lease are re-queued by the new holder, as after a crash: they run
again, and those are the only ones.
"""

from __future__ import annotations

import logging
import os
import queue
import secrets
import socket
import threading
import time
from collections.abc import Callable

from bulkrunner.errors import StoreUnwritable
from bulkrunner.store.leases import Leases

log = logging.getLogger("bulkrunner.lease")

#: The lease that says which process dispatches.
NAME = "dispatcher"
#: Seconds between two renewals by the holder (and two tries by a standby).
RENEW_EVERY = 1.0
#: Seconds a lease lasts after its last renewal.
TTL = 4.0
#: Most one warning line a minute about renewals that fail.
_WARN_EVERY = 60.0


def _pid_namespace() -> str:
    """An id of this process's pid namespace (a container has its own), or "" when the
    platform does not say."""
    try:
        return str(os.stat("/proc/self/ns/pid").st_ino)
    except OSError:
        return ""


def holder_id() -> str:
    """A name for one holder: ``host:pid:namespace:random`` (unique per process and per
    service, readable by a person)."""
    return f"{socket.gethostname()}:{os.getpid()}:{_pid_namespace()}:{secrets.token_hex(4)}"


def holder_is_dead(holder: str) -> bool:
    """True when ``holder`` names a process of this machine and pid namespace that no longer
    exists. False when it may be alive, or lives elsewhere (then only its lease's expiry
    says it is gone)."""
    host, _, rest = holder.partition(":")
    pid_text, _, rest = rest.partition(":")
    namespace = rest.partition(":")[0]
    mine = _pid_namespace()
    if host != socket.gethostname() or not mine or namespace != mine:
        return False
    try:
        pid = int(pid_text)
    except ValueError:
        return False
    if pid == os.getpid() or pid <= 0:
        return False  # another service of this process: alive
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:  # exists, as another user's process
        return False
    return False  # alive, or a zombie not yet reaped: wait for the lease to run out


class Leadership:
    """Holds the dispatcher lease for this process when it can, and says when that changes.

    ``on_gain`` is called when this process takes the lease, ``on_loss`` when another
    process took it over; both run on a thread of their own, one at a time and in order,
    so a slow start of the dispatcher never delays a renewal. ``wanted()`` is asked before
    taking a lease this process does not hold (False while the server shuts down).
    """

    def __init__(self, path: str, *, on_gain: Callable[[], None],
                 on_loss: Callable[[], None], wanted: Callable[[], bool] = lambda: True,
                 name: str = NAME, ttl: float = TTL, every: float = RENEW_EVERY,
                 on_tick: Callable[[], object] | None = None) -> None:
        self.name = name
        self.holder = holder_id()
        self.ttl = ttl
        self.every = every
        self._leases = Leases(path)
        self._on_gain = on_gain
        self._on_loss = on_loss
        self._wanted = wanted
        self._on_tick = on_tick
        self._leading = False
        self._stop = threading.Event()
        self._changes: queue.SimpleQueue[Callable[[], None] | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._roles: threading.Thread | None = None
        self._warned = -_WARN_EVERY
        self._renewed = time.monotonic()  # the last renewal or try that reached the table
        #: Who held the lease at the last look (this process's holder id when it leads).
        self.current: str | None = None

    @property
    def leading(self) -> bool:
        """Whether this process holds the lease (as of its last renewal)."""
        return self._leading

    def start(self) -> bool:
        """Try to take the lease now, then keep renewing or trying on a thread. When it is
        taken here, ``on_gain`` has run (in the caller's thread) by the time this returns
        True."""
        gained = self._try() if self._wanted() else False
        self._roles = threading.Thread(target=self._run_roles, name="bulkrunner-lease-role",
                                       daemon=True)
        self._roles.start()
        self._thread = threading.Thread(target=self._run, name="bulkrunner-lease",
                                        daemon=True)
        self._thread.start()
        if gained:
            self._on_gain()
        else:
            log.info("standing by: %s dispatches; this process takes over if it stops",
                     self.current or "another process")
        return gained

    def stop(self) -> None:
        """Stop renewing and trying, and give the lease up if this process holds it (a
        standby takes it at its next try)."""
        self._stop.set()
        self._changes.put(None)
        for t in (self._thread, self._roles):
            if t is not None and t is not threading.current_thread():
                t.join(timeout=10)
        if self._leading:
            self._leading = False
            self._leases.release(self.name, self.holder)
        self._leases.close()

    # ------------------------------------------------------------------ the thread
    def _try(self) -> bool:
        """One renewal or try; True when this process took the lease now."""
        try:
            held, current = self._leases.acquire(self.name, self.holder, self.ttl,
                                                 holder_is_dead)
        except StoreUnwritable as e:
            now = time.monotonic()
            # One renewal that waited out its busy timeout behind a long commit is no news
            # while the lease has most of its time to run; one that keeps failing is.
            if now - self._renewed < self.ttl / 2:
                log.debug("%s; trying again", e.message)
                return False
            if now - self._warned >= _WARN_EVERY:
                self._warned = now
                log.warning("%s; %s", e.message, "claims stop once the lease runs out, until "
                            "it is renewed" if self._leading else "trying again")
            return False
        self._renewed = time.monotonic()
        self.current = current
        if held and not self._leading:
            self._leading = True
            return True
        if not held and self._leading:
            self._leading = False
            log.warning("the dispatcher lease was taken over by %s (this process could not "
                        "renew it in time); this process stops dispatching and stands by",
                        current)
            self._changes.put(self._on_loss)
        return False

    def _run(self) -> None:
        while not self._stop.wait(self.every):
            try:
                if (self._leading or self._wanted()) and self._try():
                    log.info("took over the dispatcher lease (held by nobody, run out, or "
                             "its process is gone)")
                    self._changes.put(self._on_gain)
                if self._on_tick is not None:
                    self._on_tick()
            except StoreUnwritable:
                pass  # said once by the dispatcher and /healthz; the next tick tries again
            except Exception:  # background code logs and carries on
                log.exception("dispatcher lease: unexpected error; trying again")

    def _run_roles(self) -> None:
        while True:
            change = self._changes.get()
            if change is None or self._stop.is_set():
                return
            try:
                change()
            except Exception:  # background code logs and carries on
                log.exception("dispatcher lease: changing role failed")


__all__ = ["NAME", "RENEW_EVERY", "TTL", "Leadership", "holder_id", "holder_is_dead"]
