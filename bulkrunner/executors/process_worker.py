"""The worker process of the process executor, and the framing of what it sends.

A worker reads batches of units from its pipe and runs them in order. Before each unit it
counts it started, under a lock shared with the server's supervisor, unless the unit is in
the range the supervisor took back; after each it sends the outcome at once, so a worker
that dies loses no finished outcome and the supervisor knows which unit it was running.
"""

from __future__ import annotations

import logging
import pickle
import signal
import struct
import threading
from multiprocessing.connection import Connection
from typing import Any

import bulkrunner.runtime.capture as capture
from bulkrunner.runtime import Outcome, run_batch

#: The numbers a worker shares with the supervisor: units started, and the range
#: [LO, HI) of units taken back.
STARTED, LO, HI = 0, 1, 2
#: Plain pickle: ForkingPickler's reducers (for descriptors) cost more than a message.
PROTOCOL = pickle.HIGHEST_PROTOCOL


def worker_main(conn: Connection, ctl: Any, lock: Any) -> None:
    """The worker process: run the batches that come down ``conn`` until it closes.
    ``ctl`` holds the shared numbers (:data:`STARTED`, :data:`LO`, :data:`HI`), guarded by
    ``lock``."""
    # Ctrl-C reaches the whole process group; the server decides what stops, not the worker.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    report = _PipeReporter(conn)
    # One item at a time here: whatever any thread prints or logs belongs to it.
    capture.install(process_wide=True)
    logging.getLogger().setLevel(logging.INFO)
    send_lock = report.lock

    while True:
        try:
            msg = conn.recv()
        except (EOFError, OSError):
            return
        if msg is None:
            return
        first, units = msg

        def begin(i: int, first: int = first) -> bool:
            o = first + i
            with lock:
                if ctl[LO] <= o < ctl[HI]:
                    return False  # taken back: it runs elsewhere
                ctl[STARTED] = o + 1
            return True

        def done(i: int, outcome: Outcome, seconds: float, first: int = first) -> None:
            data = pickle.dumps(("done", first + i, outcome, seconds), PROTOCOL)
            with send_lock:
                conn.send_bytes(data)

        try:
            run_batch(units, report, begin=begin, done=done)
        except (OSError, EOFError):
            return  # the server went away


class _PipeReporter:
    """Sends progress and captured output of the running item up the pipe, in order."""

    def __init__(self, conn: Connection) -> None:
        self.conn = conn
        self.lock = threading.Lock()

    def __call__(self, key: tuple[int, int], frac: float | None, msg: str | None) -> None:
        with self.lock:
            self.conn.send(("progress", key, frac, msg))

    def log(self, key: tuple[int, int], claim: int, text: str) -> None:
        with self.lock:
            self.conn.send(("log", key, claim, text))


def read_frames(buf: bytearray) -> list[Any]:
    """The complete messages at the start of ``buf`` (in ``Connection.send``'s framing: a
    4-byte big-endian length, or -1 and an 8-byte one), removed from it."""
    out: list[Any] = []
    pos, end = 0, len(buf)
    view = memoryview(buf)
    try:
        while end - pos >= 4:
            (n,) = struct.unpack_from("!i", buf, pos)
            head = 4
            if n == -1:
                if end - pos < 12:
                    break
                (n,) = struct.unpack_from("!Q", buf, pos + 4)
                head = 12
            if end - pos < head + n:
                break
            out.append(pickle.loads(view[pos + head:pos + head + n]))
            pos += head + n
    finally:
        view.release()
    if pos:
        del buf[:pos]
    return out


__all__ = ["HI", "LO", "PROTOCOL", "STARTED", "read_frames", "worker_main"]
