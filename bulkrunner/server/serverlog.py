"""The server's own log: lines on stderr, plain or JSON, written by a thread of their own.

A request or a commit never waits for stderr: records go to a queue, and a listener
thread writes what came in the last few milliseconds together.
"""

from __future__ import annotations

import json
import logging
import queue
import sys
import time
from logging.handlers import QueueHandler, QueueListener
from typing import Any

import bulkrunner.runtime.capture as capture
from bulkrunner.models import iso


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, message, and job_id when the line is
    about a job (``extra={"job_id": ...}``), exc with the traceback of an exception."""

    def format(self, record: logging.LogRecord) -> str:
        """The record as one line of JSON."""
        out: dict[str, Any] = {"ts": iso(record.created), "level": record.levelname,
                               "logger": record.name, "message": record.getMessage()}
        job_id = getattr(record, "job_id", None)
        if job_id is not None:
            out["job_id"] = job_id
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        elif record.exc_text:  # formatted already by the QueueHandler
            out["exc"] = record.exc_text
        return json.dumps(out, ensure_ascii=False, default=str)


class _InProcessQueueHandler(QueueHandler):
    """A QueueHandler for a listener in the same process: records go as they are.

    The stock ``prepare`` formats every record on the logging thread so it can be pickled,
    and the listener's handler formats it again; for one job line per submission that
    first formatting was the largest cost of the request after the commit. Records with
    an exception are still prepared (their traceback is rendered while it exists).
    """

    def prepare(self, record: logging.LogRecord) -> logging.LogRecord:
        """The record itself, unless it carries an exception."""
        if record.exc_info or record.stack_info:
            prepared: logging.LogRecord = super().prepare(record)
            return prepared
        return record


class _BatchingListener(QueueListener):
    """A QueueListener that writes what came in the last few milliseconds together.

    Waking the writer thread for every record (one per submission) costs two hand-offs of
    the GIL per request under load; gathering records for ``_LOG_GATHER`` seconds after
    the first one costs a log line that much delay and saves those hand-offs.
    """

    def __init__(self, q: queue.SimpleQueue[Any], handler: logging.Handler) -> None:
        super().__init__(q, handler)
        self._records = q

    def _monitor(self) -> None:
        q = self._records
        while True:
            record = self.dequeue(True)
            done = record is None  # stop() puts None, the end of the queue
            batch = [] if done else [record]
            if not done:
                time.sleep(_LOG_GATHER)  # let the next records arrive
                while True:
                    try:
                        record = q.get_nowait()
                    except queue.Empty:
                        break
                    if record is None:
                        done = True
                        break
                    batch.append(record)
            for r in batch:
                self.handle(r)
            if done:
                return


_LOG_GATHER = 0.02


def setup_logging(level: str = "info", fmt: str = "text") -> QueueListener:
    """Lines on stderr, plain or JSON (``fmt="json"``); waitress's queue-depth warnings
    are rate-limited away. A task's own log records go to its item's log, not here.

    Records are written by a listener thread, so a slow or unread stderr delays log lines,
    never a request or a commit. Stop the returned listener to flush it.
    """
    handler = logging.StreamHandler(capture.real_stream(sys.stderr))
    handler.setFormatter(JsonFormatter() if fmt == "json" else
                         logging.Formatter(capture.LOG_FORMAT))
    records: queue.SimpleQueue[Any] = queue.SimpleQueue()
    queued = _InProcessQueueHandler(records)
    queued.addFilter(capture.outside_items)  # decided on the thread that logs
    queued.setLevel(level.upper())
    listener = _BatchingListener(records, handler)
    listener.start()
    root = logging.getLogger()
    root.handlers[:] = [queued]
    handler.setLevel(queued.level)
    # The root level gates what tasks log too: let INFO through to their item logs even
    # when the server's own log is quieter (the handler's level filters that).
    root.setLevel(min(logging.INFO, handler.level))
    logging.captureWarnings(True)
    # Under load it writes thousands of lines a second; an unread stderr then blocks us.
    logging.getLogger("waitress.queue").setLevel(logging.ERROR)
    return listener


__all__ = ["JsonFormatter", "setup_logging"]
