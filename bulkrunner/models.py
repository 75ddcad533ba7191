"""States, the Job and Item records, and the param schema shared by server and client.

Pure data: no I/O, no third-party imports, so the CLI can load it in a few milliseconds.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any


class State(StrEnum):
    """The state of a job or of an item."""

    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"
    #: A job's only: paused by a user (its items stay queued or running).
    PAUSED = "paused"

    @property
    def finished(self) -> bool:
        """True for succeeded, failed and cancelled."""
        return self in FINISHED


#: The final states, the one definition (in the order states are shown); a State is also its string.
FINISHED_STATES = ("succeeded", "failed", "cancelled")
FINISHED = frozenset(State(s) for s in FINISHED_STATES)
#: The states of an item, which a job counts its items by.
STATES = ("queued", "running", "succeeded", "failed", "cancelled")
#: The states of a job: an item's, and ``paused``.
JOB_STATES = (*STATES, "paused")
#: How many groups of failures a job shows (the most frequent ones), and how much of an
#: error message tells one group from another.
MAX_FAILURE_GROUPS = 10
FAILURE_MESSAGE_CHARS = 500


def derive_state(counts: dict[str, int], paused: bool = False) -> State:
    """A job's state from its item counts: queued until an item starts, running until all
    have finished, then cancelled (if any item was), failed (if any failed), or succeeded.
    A paused job is ``paused`` until all its items have finished."""
    done = counts["succeeded"] + counts["failed"] + counts["cancelled"]
    if counts["queued"] or counts["running"]:
        if paused:
            return State.PAUSED
        return State.RUNNING if counts["running"] or done else State.QUEUED
    if counts["cancelled"]:
        return State.CANCELLED
    if counts["failed"]:
        return State.FAILED
    return State.SUCCEEDED


def iso(ts: float | None) -> str | None:
    """Unix seconds as UTC ISO 8601 with milliseconds and a ``Z``."""
    if ts is None:
        return None
    # isoformat is C code; strftime was a tenth of a submission's time.
    return datetime.fromtimestamp(ts, tz=UTC).isoformat(timespec="milliseconds")[:-6] + "Z"


@dataclass
class Item:
    """One call of the task function."""

    index: int
    params: dict[str, Any]
    state: State
    attempts: int = 0
    result: Any = None
    error: dict[str, Any] | None = None
    started_at: float | None = None
    finished_at: float | None = None
    progress: float | None = None
    message: str | None = None
    worker: str | None = None
    errors: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """The item as the API shows it."""
        return {
            "index": self.index, "params": self.params, "state": self.state.value,
            "attempts": self.attempts, "result": self.result, "error": self.error,
            "started_at": iso(self.started_at), "finished_at": iso(self.finished_at),
            "progress": self.progress, "message": self.message, "worker": self.worker,
            "errors": self.errors,
        }


def attempts_in_all(item: dict[str, Any]) -> int:
    """The attempts an item (as the API shows it) has made across retries, its running one
    included.

    ``attempts`` counts the attempts of the current try only (a retry starts it again, so
    ``max_attempts`` applies anew); ``errors`` keeps every failed attempt's error across
    retries (the last 20), each with its ``attempt`` number in its own try. The current
    try's failures are the last of them; before those, each try's count is the ``attempt``
    of its last error. Tries whose errors fell out of the kept history are not counted.
    """
    attempts = int(item.get("attempts") or 0)
    state = item.get("state")
    errors = item.get("errors") or []
    mine = attempts - (1 if state == "succeeded" else 0)  # this try's failed attempts
    earlier = errors[:max(len(errors) - mine, 0)]
    total, last = 0, 0
    for e in earlier:
        n = e.get("attempt") if isinstance(e, dict) else None
        if not isinstance(n, int):
            continue
        if n <= last:  # a new try began: the one before made `last` attempts
            total += last
        last = n
    return total + last + attempts + (1 if state == "running" else 0)


def attempts_text(item: dict[str, Any]) -> str:
    """An item's attempts as the CLI and the page show them: ``2``; a running item as on
    its next attempt, ``2 (running)``; with the total across retries where it differs,
    ``1 (3 in all)``, ``2 (running; 4 in all)``."""
    running = item.get("state") == "running"
    n = int(item.get("attempts") or 0) + (1 if running else 0)
    total = attempts_in_all(item)
    notes = (["running"] if running else []) + ([f"{total} in all"] if total != n else [])
    return f"{n} ({'; '.join(notes)})" if notes else str(n)


@dataclass
class Job:
    """One submission of a task, with the counts of its items."""

    id: str
    task: str
    params: dict[str, Any]
    state: State
    priority: int
    created_at: float
    counts: dict[str, int]
    max_attempts: int = 1
    timeout: float = 0.0
    key: str | None = None
    started_at: float | None = None
    finished_at: float | None = None
    message: str | None = None
    progress: float = 0.0
    result: Any = None
    error: dict[str, Any] | None = None
    #: The failed items grouped by error type and message, most frequent first (at most
    #: :data:`MAX_FAILURE_GROUPS`): ``{"type", "message", "count", "first_index"}`` each.
    failures: list[dict[str, Any]] = field(default_factory=list)
    #: No item starts before this time (Unix seconds), or None.
    run_after: float | None = None
    #: The name of the token that submitted the job (None with no token configured).
    submitted_by: str | None = None
    #: The name of the schedule that submitted it, or None.
    schedule: str | None = None
    #: The webhook: ``{"url", "state", "attempts"}``, or None when the job has none.
    notify: dict[str, Any] | None = None
    #: Why its queued items wait (``paused``, ``run_after``, ``task_paused``,
    #: ``concurrency``, ``rate_limit``), or None when only free workers and their turn do.
    waiting: str | None = None
    #: The store's sequence number (internal; 0 when not known).
    seq: int = 0

    @property
    def total(self) -> int:
        """Items in every state."""
        return sum(self.counts[s] for s in STATES)

    def to_dict(self, *, traceback: bool = True) -> dict[str, Any]:
        """The job as the API shows it; ``traceback=False`` (the job list) leaves the
        traceback out of ``error``."""
        error = self.error
        if not traceback and error is not None and "traceback" in error:
            error = {k: v for k, v in error.items() if k != "traceback"}
        return {
            "id": self.id, "task": self.task, "params": self.params,
            "state": self.state.value, "priority": self.priority,
            "max_attempts": self.max_attempts, "timeout": self.timeout, "key": self.key,
            "created_at": iso(self.created_at), "started_at": iso(self.started_at),
            "finished_at": iso(self.finished_at), "run_after": iso(self.run_after),
            "submitted_by": self.submitted_by, "schedule": self.schedule,
            "items": {"total": self.total, **{s: self.counts[s] for s in STATES}},
            "progress": self.progress, "message": self.message, "notify": self.notify,
            "waiting": self.waiting,
            "result": self.result, "error": error, "failures": self.failures,
        }


# ---------------------------------------------------------------------------------------
# Param schema. The server derives it from a function's signature (tasks.py); the client
# reads it back from GET /api/v1/tasks to coerce ``--param k=v`` text by the type hint.

TYPES = ("str", "int", "float", "bool", "list", "dict", "any")
_TRUE = {"1", "true", "yes", "y", "on", "t"}
_FALSE = {"0", "false", "no", "n", "off", "f", ""}


@dataclass(frozen=True)
class ParamSpec:
    """What one parameter of a task accepts.

    ``type`` is one of ``TYPES``; ``choices`` limits the value (``Literal`` or ``Enum``);
    ``item_type`` is the element type of a ``list[...]``; ``nullable`` admits ``None``.
    """

    name: str
    type: str = "any"
    required: bool = True
    default: Any = None
    choices: tuple[Any, ...] | None = None
    item_type: str | None = None
    nullable: bool = False

    def to_dict(self) -> dict[str, Any]:
        """The param as the API shows it."""
        d: dict[str, Any] = {"name": self.name, "type": self.type,
                             "required": self.required, "default": self.default}
        if self.choices is not None:
            d["choices"] = list(self.choices)
        if self.item_type:
            d["item_type"] = self.item_type
        if self.nullable:
            d["nullable"] = True
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ParamSpec:
        """The param from its API form (the inverse of :meth:`to_dict`)."""
        ch = d.get("choices")
        return cls(name=d["name"], type=d.get("type", "any"),
                   required=bool(d.get("required", True)), default=d.get("default"),
                   choices=tuple(ch) if ch is not None else None,
                   item_type=d.get("item_type"), nullable=bool(d.get("nullable", False)))

    def check(self, value: Any) -> str | None:
        """Return what is wrong with a JSON value for this param, or None when it fits."""
        if value is None:
            return None if self.nullable or self.type == "any" else f"must be {self.type}, not null"
        problem = _check_type(self.type, value)
        if problem:
            return problem
        if isinstance(value, float) and not math.isfinite(value):
            # Python's json reads NaN and Infinity, but they cannot be written back as JSON.
            return f"must be a finite number, not {value}"
        if self.type == "list" and self.item_type and self.item_type != "any":
            for i, v in enumerate(value):
                p = _check_type(self.item_type, v)
                if p:
                    return f"[{i}] {p}"
        if self.choices is not None and value not in self.choices:
            return f"must be one of {', '.join(json.dumps(c) for c in self.choices)}"
        return None

    def from_text(self, text: str) -> Any:
        """Coerce a command-line or CSV string by this param's type.

        Raises:
            ValueError: with a sentence saying what was expected.
        """
        if self.nullable and text.lower() in ("null", "none"):
            return None
        t = self.type
        if self.choices is not None:
            for c in self.choices:
                if str(c) == text:
                    return c
            raise ValueError(f"must be one of {', '.join(str(c) for c in self.choices)}, "
                             f"not {text!r}")
        if t == "str":
            return text
        if t == "int":
            try:
                return int(text.strip())
            except ValueError:
                raise ValueError(f"must be an integer, not {text!r}") from None
        if t == "float":
            try:
                v = float(text.strip())
            except ValueError:
                raise ValueError(f"must be a number, not {text!r}") from None
            if not math.isfinite(v):
                raise ValueError(f"must be a finite number, not {text!r}")
            return v
        if t == "bool":
            low = text.strip().lower()
            if low in _TRUE:
                return True
            if low in _FALSE:
                return False
            raise ValueError(f"must be true or false, not {text!r}")
        if t in ("list", "dict"):
            try:
                v = json.loads(text)
            except ValueError:
                raise ValueError(f"must be a JSON {'array' if t == 'list' else 'object'}, "
                                 f"not {text!r}") from None
            problem = self.check(v)
            if problem:
                raise ValueError(problem)
            return v
        # "any": a JSON literal when it parses as one, else the text itself.
        try:
            return json.loads(text)
        except ValueError:
            return text


def _check_type(t: str, value: Any) -> str | None:
    ok = {
        "str": lambda v: isinstance(v, str),
        "int": lambda v: isinstance(v, int) and not isinstance(v, bool),
        "float": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
        "bool": lambda v: isinstance(v, bool),
        "list": lambda v: isinstance(v, list),
        "dict": lambda v: isinstance(v, dict),
    }.get(t)
    if ok is None or ok(value):
        return None
    return f"must be {_ARTICLE.get(t, t)}, not {_json_type(value)}"


_ARTICLE = {"str": "a string", "int": "an integer", "float": "a number", "bool": "a boolean",
            "list": "a list", "dict": "an object"}


def _json_type(v: Any) -> str:
    if isinstance(v, bool):
        return "a boolean"
    if isinstance(v, int):
        return "an integer"
    if isinstance(v, float):
        return "a number"
    if isinstance(v, str):
        return "a string"
    if isinstance(v, list):
        return "a list"
    if isinstance(v, dict):
        return "an object"
    return type(v).__name__
