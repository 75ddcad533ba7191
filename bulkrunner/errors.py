"""One exception tree for bulkrunner.

Every error carries a stable snake_case ``code`` that the HTTP layer maps to a status and
the client maps back to an exception. Nothing here knows about HTTP or click.
"""

from __future__ import annotations

from typing import Any


def error_body(code: str, message: str, details: dict[str, Any] | None = None
               ) -> dict[str, Any]:
    """The one shape of every error the API answers:
    ``{"error": {"code": <stable snake_case>, "message": <a sentence>, "details": {...}}}``."""
    return {"error": {"code": code, "message": message, "details": details or {}}}


class BulkrunnerError(Exception):
    """Base of every error bulkrunner raises on purpose."""

    code = "error"

    def __init__(self, message: str, details: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.details: dict[str, Any] = details or {}

    def to_dict(self) -> dict[str, Any]:
        """The API's error body for this error."""
        return error_body(self.code, self.message, self.details)


class ConfigError(BulkrunnerError):
    """The configuration cannot be used; the message names the file, the key and the fix."""

    code = "config_error"

    def __init__(self, message: str, *, file: str | None = None, key: str | None = None) -> None:
        where = ", ".join(p for p in (file and f"file {file}", key and f"key {key}") if p)
        super().__init__(f"{where}: {message}" if where else message,
                         {"file": file, "key": key})
        self.file = file
        self.key = key


class StoreUnavailable(BulkrunnerError):
    """The database file cannot be opened or is not a bulkrunner database."""

    code = "store_unavailable"


class InvalidRequest(BulkrunnerError):
    """The request body could not be parsed (HTTP 400)."""

    code = "invalid_request"


class InvalidSubmission(BulkrunnerError):
    """A submission names an unknown task, or its params or items are wrong (HTTP 422).

    ``details["fields"]`` maps each offending field (``params.n``, ``items[3].n``) to what is
    wrong with it.
    """

    code = "invalid_submission"

    def __init__(self, fields: dict[str, str], message: str | None = None,
                 **extra: Any) -> None:
        if message is None:
            message = "; ".join(f"{k}: {v}" for k, v in list(fields.items())[:5])
            if len(fields) > 5:
                message += f"; and {len(fields) - 5} more"
        super().__init__(message, {"fields": fields, **extra})
        self.fields = fields


class NotFound(BulkrunnerError):
    """An id or a task named in the path does not exist (HTTP 404)."""

    code = "not_found"


class AmbiguousId(BulkrunnerError):
    """An id prefix matches more than one job (HTTP 409)."""

    code = "ambiguous_id"


class Conflict(BulkrunnerError):
    """The request conflicts with the job's state or an earlier request (HTTP 409)."""

    code = "conflict"


class JobFinished(Conflict):
    """Cancel of a job that has already finished."""

    code = "job_finished"


class NothingToRetry(Conflict):
    """Retry of a job with no failed or cancelled items."""

    code = "nothing_to_retry"


class NotPaused(Conflict):
    """Resume of a job that is not paused."""

    code = "not_paused"


class KeyConflict(Conflict):
    """An idempotency key reused with a different body."""

    code = "key_conflict"


class Unavailable(BulkrunnerError):
    """The server cannot take the request now (HTTP 503); try again after ``retry_after``."""

    code = "unavailable"

    def __init__(self, message: str, retry_after: int = 5,
                 details: dict[str, Any] | None = None) -> None:
        super().__init__(message, details)
        self.retry_after = retry_after


class QueueFull(Unavailable):
    """Accepting the submission would pass ``jobs.max_queued`` waiting items."""

    code = "queue_full"


class ShuttingDown(Unavailable):
    """The server is draining and accepts no new work."""

    code = "shutting_down"


class StoreUnwritable(Unavailable):
    """The database cannot be written now (an I/O error, a read-only file); nothing of the
    request was stored. The server goes on and recovers by itself once it can write."""

    code = "database_unwritable"


class DatabaseFull(StoreUnwritable):
    """The disk holding the database is full (or has no space left for its files)."""

    code = "database_full"


class DatabaseLocked(StoreUnwritable):
    """Another program holds the database's write lock for longer than the store waits."""

    code = "database_locked"


class ServerUnreachable(BulkrunnerError):
    """The client could not connect to the server."""

    code = "unreachable"


class ApiError(BulkrunnerError):
    """The server answered with an error body; raised by the client."""

    def __init__(self, status: int, code: str, message: str,
                 details: dict[str, Any] | None = None) -> None:
        super().__init__(message, details)
        self.status = status
        self.code = code


# Raised through an executor's futures; internal to the server, never sent to a client as is.
class WorkerDied(Exception):
    """The worker running an item died; the item is at fault and spends an attempt."""


class ExecutorLost(Exception):
    """An item was lost with its executor through no fault of its own (re-queued free)."""
