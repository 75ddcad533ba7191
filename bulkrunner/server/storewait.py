"""How the dispatcher waits out a database it cannot write (disk full, locked by another
program): the outcomes of a failed turn stay in memory and are written by a later turn.

While they wait, nothing new is claimed, so what is held is bounded by what was running when
writes began to fail; the turn is tried again after a delay that doubles up to a few
seconds; and the log gets one warning when it begins, a reminder a minute while it lasts
and a line when it ends, never a traceback a turn.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from bulkrunner.errors import StoreUnwritable

#: Seconds before the first retry of a failed turn, and the longest wait between two.
FIRST_RETRY = 0.25
LONGEST_RETRY = 4.0
#: Seconds between two warnings while writes keep failing.
WARN_EVERY = 60.0


class StoreWait:
    """The dispatcher's state while its writes fail: since when, the next delay, the log."""

    def __init__(self, log: logging.Logger, path: str,
                 fault: Callable[[], StoreUnwritable | None]) -> None:
        self._log = log
        self._path = path
        self._fault = fault  # the store's: why it cannot be written now, or None
        self._since: float | None = None
        self._delay = FIRST_RETRY
        self._warned_at = 0.0
        self._failures = 0

    @property
    def failing(self) -> bool:
        """True from a failed write until a turn succeeds."""
        return self._since is not None

    def holds(self, held: int) -> bool:
        """True when nothing should be claimed: ``held`` outcomes of a failed write wait."""
        return self._since is not None and held > 0

    def failed(self, e: StoreUnwritable, held: int) -> float:
        """A turn failed with ``e``, ``held`` outcomes now wait in memory: log (rate-limited)
        and return the seconds to wait before the next try."""
        now = time.monotonic()
        self._failures += 1
        if self._since is None:
            self._since, self._delay = now, FIRST_RETRY
            self._warned_at = now
            self._log.warning("cannot write the database %s (%s): %s. %d finished item(s) "
                              "wait in memory and nothing new starts until it can be "
                              "written; trying again every few seconds", self._path, e.code,
                              e.message, held)
        elif now - self._warned_at >= WARN_EVERY:
            self._warned_at = now
            self._log.warning("still cannot write the database %s (%s) after %.0f s and %d "
                              "tries; %d finished item(s) wait in memory", self._path, e.code,
                              now - self._since, self._failures, held)
        delay = self._delay
        self._delay = min(LONGEST_RETRY, self._delay * 2)
        return delay

    def succeeded(self) -> None:
        """A turn went through: once the store can be written again, say so."""
        if self._since is None or self._fault() is not None:
            return
        self._log.info("the database %s can be written again after %.0f s (%d failed "
                          "tries); what waited in memory is recorded",
                          self._path, time.monotonic() - self._since, self._failures)
        self._since, self._failures = None, 0


__all__ = ["StoreWait"]
