"""What running items report between two dispatcher turns: progress and captured output.

Executors call in from their own threads (a pool thread, a process pool's supervisor, a
Dask event handler); the dispatcher takes what came once a turn and writes it in the
turn's transaction. Text enters the server here, so it is made storable here: a report can
never fail a write.
"""

from __future__ import annotations

import threading

from bulkrunner.runtime import safe_text

#: (job_seq, index) -> (fraction done or None, message or None): the latest of each.
Progress = dict[tuple[int, int], tuple[float | None, str | None]]
#: (job_seq, index, claim) -> the output captured since the last turn.
Output = dict[tuple[int, int, int], str]


class Reports:
    """Progress and output waiting for the next turn; the reporter handed to executors.

    Called with ``(key, fraction, message)`` for progress; ``log(key, claim, text)`` takes
    captured output (:func:`bulkrunner.runtime.run_item` looks for that method).
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._progress: Progress = {}
        self._logs: dict[tuple[int, int, int], list[str]] = {}

    def __call__(self, key: tuple[int, int], frac: float | None, msg: str | None) -> None:
        """An item's progress: a fraction or a message keeps the other one as it was."""
        if msg is not None:
            msg = safe_text(msg)
        with self._lock:
            old = self._progress.get(key, (None, None))
            self._progress[key] = (frac if frac is not None else old[0],
                                   msg if msg is not None else old[1])

    def log(self, key: tuple[int, int], claim: int, text: str) -> None:
        """Output an attempt (``claim``) of an item printed or logged."""
        text = safe_text(text)
        with self._lock:
            self._logs.setdefault((key[0], key[1], claim), []).append(text)

    def take(self) -> tuple[Progress, Output]:
        """Everything reported since the last take, each attempt's output joined."""
        with self._lock:
            updates, self._progress = self._progress, {}
            chunks, self._logs = self._logs, {}
        return updates, {k: "".join(v) for k, v in chunks.items()}

    def give_back(self, progress: Progress, logs: Output) -> None:
        """Put what a failed write took back, under what was reported since, for the next
        turn: newer progress wins, older output goes first."""
        with self._lock:
            for key, (frac, msg) in progress.items():
                new = self._progress.get(key, (None, None))
                self._progress[key] = (new[0] if new[0] is not None else frac,
                                       new[1] if new[1] is not None else msg)
            for lkey, text in logs.items():
                self._logs.setdefault(lkey, []).insert(0, text)


__all__ = ["Output", "Progress", "Reports"]
