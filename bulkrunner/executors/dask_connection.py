"""The Dask executor's connection to its cluster: the ``distributed.Client``, the local
cluster it starts when there is no scheduler to connect to, and the watch over both.

With ``executor.address`` the client connects to a running ``dask scheduler``; with an
empty address it starts a :class:`distributed.LocalCluster` of ``max_workers`` worker
processes (one thread each, on loopback), so Dask can be tried on one machine. Its
scheduler runs in a process of its own (:mod:`~bulkrunner.executors.dask_cluster`), not in
the server's.

A Dask scheduler, its workers and nannies run whatever a connected client sends, and
loopback is open to every user of the machine, so the local cluster speaks TLS with a key
and certificate made for this run (:meth:`distributed.security.Security.temporary`, kept in
memory and handed to the worker processes when they start): it listens on ``tls://``
addresses and requires every peer, this server's own client included, to present that
certificate. An external scheduler is secured by Dask's own configuration
(``distributed.comm.tls.*``, which ``Client`` reads): see docs/dask.md.

A background thread looks at the connection and the cluster's worker count every second
(:meth:`DaskConnection.health`, :meth:`DaskConnection.workers`) and, once the client has
given up reconnecting by itself, closes it, failing what was in flight on it with
:class:`ExecutorLost`, and connects a new one.
"""

# distributed ships partial type hints: many of its calls are untyped.
# mypy: disable-error-code="no-untyped-call"

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

from distributed import Client
from distributed.security import Security

from bulkrunner.config import Config
from bulkrunner.errors import ConfigError, ExecutorLost
from bulkrunner.executors.dask_cluster import LocalClusterProcess
from bulkrunner.executors.futures import settle
from bulkrunner.runtime import Outcome

log = logging.getLogger("bulkrunner.dask")

CONNECT_TIMEOUT = 10.0   # seconds for one attempt to reach the scheduler
CLOSE_TIMEOUT = 10.0     # seconds for closing the client or the local cluster
_WATCH_INTERVAL = 1.0    # seconds between looks at the connection and the worker count


class DaskConnection:
    """The executor's client of a Dask scheduler: the one at ``executor.address``, or that
    of a local cluster started here when the address is empty.

    ``lock`` is the executor's: it guards :attr:`client` and :attr:`stopping` together with
    the items in flight on that client. Events on ``topic`` go to ``on_event``.
    ``forget(client)``, called under ``lock`` when the client is closed, drops what the
    executor has in flight on it and returns their futures, which fail with ExecutorLost;
    ``upkeep`` is the executor's own work, done by the watcher after each look.
    """

    def __init__(self, cfg: Config, lock: threading.Lock, topic: str,
                 on_event: Callable[[tuple[float, Any]], None],
                 forget: Callable[[Client | None], list[Future[Outcome]]],
                 upkeep: Callable[[], None]) -> None:
        self.address = cfg.executor.address
        self._lock = lock
        self._topic = topic
        self._on_event = on_event
        self._forget = forget
        self._upkeep = upkeep
        self.client: Client | None = None
        self._cluster: LocalClusterProcess | None = None
        # The local cluster's TLS credentials; None for an external scheduler, where
        # Client takes them from Dask's config (distributed.comm.tls.*), if any.
        self._security: Security | None = None
        self._up = False               # client connected and subscribed, as last seen
        self._state = (False, "connecting to the Dask scheduler")
        self._threads = 0              # the cluster's threads, as last seen by the watcher
        self._logged = ""              # the last unhealthy detail logged, to log changes only
        #: Set by the executor, under ``lock``, when it shuts down: a client that connects
        #: after that is closed at once.
        self.stopping = False
        self._stop = threading.Event()
        if not self.address:
            # A local cluster failing to start is a setup error: let `serve` report it.
            # Worker processes, so CPU-bound items do not share the server's GIL, and the
            # scheduler in a process of its own for the same reason. TLS with this run's
            # own certificate (see the module docstring).
            n_workers = cfg.executor.max_workers
            self._security = _temporary_security(cfg)
            try:
                self._cluster = LocalClusterProcess(n_workers, self._security)
            except RuntimeError as e:  # a sentence (exit 2), not a traceback
                raise ConfigError(f"{e}; check that Dask is installed and works "
                                  '(pip install "bulkrunner[dask]")',
                                  file=cfg.source, key="executor.address") from None
            self.address = self._cluster.scheduler_address
            log.info("started a local Dask cluster of %d worker processes at %s, TLS with "
                     "a certificate of this run only (dashboard %s)", n_workers,
                     self.address, self._cluster.dashboard_link)
        self._watcher = threading.Thread(target=self._watch, name="bulkrunner-dask-watch",
                                         daemon=True)

    def start(self) -> None:
        """Connect, look at the cluster, and start the watcher."""
        # A remote scheduler that is down at start is not fatal: the server comes up,
        # /healthz says why, and the watcher keeps trying.
        self.connect()
        self.refresh()
        self._watcher.start()

    def stop(self) -> None:
        """Tell the watcher to end (it finishes the look it is at)."""
        self._stop.set()

    def close(self) -> None:
        """Wait for the watcher to end, then close the client and the local cluster."""
        self._watcher.join(timeout=CONNECT_TIMEOUT + CLOSE_TIMEOUT)
        self.close_client()
        if self._cluster is not None:
            try:
                self._cluster.close(timeout=CLOSE_TIMEOUT)
            except Exception as e:
                log.warning("closing the local Dask cluster failed: %r", e)

    def workers(self) -> int:
        """Threads the cluster offers for items, as last seen by the watcher."""
        return self._threads if self._state[0] else 0

    def health(self) -> tuple[bool, str]:
        """(ok, detail). Not ok while the scheduler is unreachable or has no workers."""
        client = self.client
        if client is not None and client.status != "running":
            return False, self.unreachable(f"connection lost, client {client.status}")
        return self._state

    def unreachable(self, why: str) -> str:
        """The detail of health while the scheduler cannot be reached, ``why``."""
        return f"scheduler unreachable at {self.address}: {why}; reconnecting"

    def connect(self) -> bool:
        """Make a client of the scheduler; False if it cannot (or shutdown began)."""
        try:
            client = Client(self.address, timeout=CONNECT_TIMEOUT, set_as_default=False,
                            security=self._security)
        except Exception as e:
            self._state = (False, self.unreachable(str(e) or type(e).__name__))
            return False
        with self._lock:
            if not self.stopping:
                self.client = client
        if self.stopping:  # shut down while we were connecting
            client.close(timeout=CLOSE_TIMEOUT)
            return False
        log.info("connected to the Dask scheduler at %s", self.address)
        return True

    def close_client(self) -> None:
        """Let go of the client, failing what was in flight on it, and close it."""
        with self._lock:
            client, self.client = self.client, None
            lost = self._forget(client)
        for fut in lost:
            settle(fut, ExecutorLost("lost with the Dask client"))
        if client is not None:
            try:
                client.close(timeout=CLOSE_TIMEOUT)
            except Exception as e:
                log.debug("closing the Dask client: %r", e)

    def _watch(self) -> None:
        """Each _WATCH_INTERVAL: reconnect if the client gave up, look, the upkeep."""
        while not self._stop.wait(_WATCH_INTERVAL):
            try:
                client = self.client
                if client is None or client.status in ("closing", "closed", "failed"):
                    # The client gave up reconnecting by itself (after CONNECT_TIMEOUT):
                    # start a new one. A failed attempt already took CONNECT_TIMEOUT
                    # retrying, so no further back-off is needed.
                    self.close_client()
                    if not self.connect():
                        continue
                self.refresh()
                self._upkeep()
            except Exception:  # background code logs and carries on
                log.exception("Dask watcher error")

    def refresh(self) -> None:
        """Look at the connection and the worker count; log changes of health."""
        client = self.client
        was_ok = self._state[0]
        if client is None:
            ok, detail = self._state
        elif client.status != "running":
            self._up = False
            ok, detail = False, self.unreachable(f"connection lost, client {client.status}")
        else:
            if not self._up:
                # Events are pushed only to subscribers; a reconnected client is new to
                # the scheduler, so subscribe (again).
                client.subscribe_topic(self._topic, self._on_event)
                self._up = True
            try:
                try:
                    info = client.scheduler_info(n_workers=0)  # totals only: cheap
                except TypeError:  # distributed < 2025.4 always sends every worker
                    info = client.scheduler_info()
                workers = info.get("workers") or {}
                n = int(info.get("n_workers", len(workers)))
                threads = int(info.get("total_threads",
                                       sum(w.get("nthreads", 0) for w in workers.values())))
                ok = n > 0
                self._threads = threads if ok else 0
                detail = (f"{n} Dask workers ({threads} threads) at {self.address}" if ok
                          else f"the Dask scheduler at {self.address} has no workers")
            except Exception as e:
                ok, detail = False, self.unreachable(str(e) or type(e).__name__)
        self._state = (ok, detail)
        if ok != was_ok or (not ok and detail != self._logged):
            self._logged = detail
            (log.info if ok else log.warning)("Dask executor %s: %s",
                                              "available" if ok else "unavailable", detail)


def _temporary_security(cfg: Config) -> Security:
    """A key and self-signed certificate for one run of the local cluster (in memory)."""
    try:
        security: Security = Security.temporary()
    except ImportError:  # it needs the cryptography package
        raise ConfigError('the local Dask cluster (executor.address = "") needs the '
                          '"cryptography" package for its TLS certificates: '
                          "pip install cryptography",
                          file=cfg.source, key="executor.address") from None
    return security


__all__ = ["CLOSE_TIMEOUT", "CONNECT_TIMEOUT", "DaskConnection"]
