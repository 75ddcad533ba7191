"""Retention: finished jobs older than their state's configured age are deleted, with
their items and logs, so the database does not grow without bound.

:class:`Pruner` does it every ``retention.interval`` on a thread of its own, and on demand
(``POST /api/v1/prune``, ``bulkrunner prune``). Deletion goes in small steps through the
store's writer (:meth:`~bulkrunner.store.Store.prune_step`), so submissions and the
dispatcher's bookkeeping wait a few milliseconds at most. A big job is taken away in the
first step (no read finds it from then on) and its rows follow; a job left half-deleted by a
stop is finished at the next start, even with every age set to 0. SQLite reuses the freed
pages for new rows; the file does not shrink, and no VACUUM is run (it would lock the
database for as long as it copies the whole file).
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

from bulkrunner.config import RetentionConfig
from bulkrunner.errors import StoreUnwritable
from bulkrunner.models import FINISHED_STATES
from bulkrunner.store import Store

log = logging.getLogger("bulkrunner.server.retention")

PRUNED_STATES = FINISHED_STATES


def cutoffs(cfg: RetentionConfig, now: float) -> dict[str, float]:
    """For each final state kept for a limited time: jobs finished before this go."""
    return {s: now - getattr(cfg, s) for s in PRUNED_STATES if getattr(cfg, s) > 0}


class Pruner:
    """Deletes old finished jobs now (:meth:`run`) and periodically (:meth:`start`)."""

    def __init__(self, store: Store, cfg: RetentionConfig) -> None:
        self.store = store
        self.cfg = cfg
        self._stop = threading.Event()
        self._lock = threading.Lock()  # one prune at a time (the thread or a request)
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Prune at once, then every ``retention.interval`` seconds, until :meth:`stop`."""
        if not cutoffs(self.cfg, time.time()) and not self.store.reaping():
            return  # everything is kept forever, and no deletion was left half done
        self._thread = threading.Thread(target=self._loop, name="bulkrunner-retention",
                                        daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop the periodic pruning (waits up to 10 s for the thread)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def run(self, *, dry_run: bool = False) -> dict[str, Any]:
        """Delete (or with ``dry_run`` only count) the jobs past their age.

        Returns ``{"dry_run": bool, "jobs": {state: n}, "items": {state: n}}`` with every
        final state (0 for those kept forever).
        """
        out: dict[str, Any] = {"dry_run": dry_run, "jobs": dict.fromkeys(PRUNED_STATES, 0),
                               "items": dict.fromkeys(PRUNED_STATES, 0)}
        with self._lock:
            # First what a stopped server left half-deleted (it no longer counts anywhere).
            while not dry_run and not self._stop.is_set() and self.store.reap_step():
                pass
            for state, before in cutoffs(self.cfg, time.time()).items():
                if dry_run:
                    out["jobs"][state], out["items"][state] = self.store.prunable(state, before)
                    continue
                while not self._stop.is_set():
                    jobs, items, more = self.store.prune_step(state, before)
                    out["jobs"][state] += jobs
                    out["items"][state] += items
                    if not more:
                        break
        if not dry_run and any(out["jobs"].values()):
            log.info("retention: deleted %d finished job(s) with %d item(s) (%s)",
                     sum(out["jobs"].values()), sum(out["items"].values()),
                     ", ".join(f"{n} {s}" for s, n in out["jobs"].items() if n))
        return out

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.run()
            except StoreUnwritable as e:  # disk full or locked: no traceback for it
                log.warning("retention: pruning failed (%s); trying again later", e.message)
            except Exception:  # background code logs and carries on
                log.exception("retention: pruning failed; trying again later")
            else:
                if not cutoffs(self.cfg, time.time()):
                    return  # it ran only to finish a deletion left half done
            self._stop.wait(self.cfg.interval)
