"""A thin HTTP client for the bulkrunner API (used by the CLI, public for Python users).

Standard library only (``http.client``) so that ``bulkrunner status`` starts in a few tens
of milliseconds. Server errors come back as :class:`~bulkrunner.errors.ApiError` with the
server's stable code; a server that cannot be reached is
:class:`~bulkrunner.errors.ServerUnreachable`.

    with Client("http://127.0.0.1:8470") as c:
        job = c.submit("echo", {"msg": "hi"})
        done = c.wait(job["id"])
"""

from __future__ import annotations

import http.client
import json
import os
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, urlencode, urlsplit

from bulkrunner.errors import ApiError, ServerUnreachable
from bulkrunner.models import FINISHED


class Client:
    """One keep-alive connection to a bulkrunner server."""

    def __init__(self, url: str = "http://127.0.0.1:8470", token: str | None = None,
                 timeout: float = 60.0) -> None:
        parts = urlsplit(url if "://" in url else f"http://{url}")
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"not an http(s) URL: {url!r}")
        self.url = f"{parts.scheme}://{parts.netloc}{parts.path.rstrip('/')}"
        self._prefix = parts.path.rstrip("/")
        self._scheme = parts.scheme
        self._host = parts.hostname
        self._port = parts.port
        self.token = token
        self.timeout = timeout
        self._conn: http.client.HTTPConnection | None = None

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the connection to the server."""
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    # ------------------------------------------------------------------ transport
    def _connection(self) -> http.client.HTTPConnection:
        if self._conn is None:
            cls = (http.client.HTTPSConnection if self._scheme == "https"
                   else http.client.HTTPConnection)
            self._conn = cls(self._host, self._port, timeout=self.timeout)
        return self._conn

    def request(self, method: str, path: str, *, body: bytes | None = None,
                content_type: str | None = None, stream: bool = False,
                accept: tuple[int, ...] = ()) -> Any:
        """Send a request; return the decoded JSON (or the response when ``stream``).

        Statuses in ``accept`` are returned like a success instead of raising.
        """
        headers = {"Accept": "application/json"}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        if content_type:
            headers["Content-Type"] = content_type
        for attempt in (1, 2):
            conn = self._connection()
            sent = False
            try:
                conn.request(method, self._prefix + path, body=body, headers=headers)
                sent = True
                resp = conn.getresponse()
                break
            except (ConnectionRefusedError, OSError, http.client.HTTPException) as e:
                self.close()
                # A kept-alive connection the server has since closed: try once more. A POST
                # that was sent may have been acted on, so it is never sent twice.
                if (attempt == 2 or isinstance(e, (ConnectionRefusedError, TimeoutError))
                        or (sent and method not in ("GET", "HEAD"))):
                    reason = getattr(e, "strerror", None) or str(e) or type(e).__name__
                    raise ServerUnreachable(
                        f"cannot reach the bulkrunner server at {self.url} ({reason}); "
                        "start it with 'bulkrunner serve', or point --url or "
                        "$BULKRUNNER_URL at it", {"url": self.url}) from None
        if resp.status >= 400 and resp.status not in accept:
            data = resp.read()
            raise _api_error(resp.status, data)
        if stream:
            return resp
        data = resp.read()
        return json.loads(data) if data else None

    def _json(self, method: str, path: str, payload: Any = None) -> Any:
        body = None if payload is None else json.dumps(payload).encode()
        return self.request(method, path, body=body,
                            content_type="application/json" if body is not None else None)

    # ------------------------------------------------------------------ API
    def submit(self, task: str | None = None, params: dict[str, Any] | None = None, *,
               items: list[dict[str, Any]] | None = None, priority: int | None = None,
               max_attempts: int | None = None, timeout: float | None = None,
               key: str | None = None, **options: Any) -> dict[str, Any]:
        """Submit a job; returns the job. ``options`` are the submit body's other fields
        (``delay``, ``run_after``, ``notify_url``); None values are left out."""
        body: dict[str, Any] = {"task": task, "params": params or {}, "items": items,
                                "priority": priority, "max_attempts": max_attempts,
                                "timeout": timeout, "key": key, **options}
        return self._json("POST", "/api/v1/jobs",  # type: ignore[no-any-return]
                          {k: v for k, v in body.items() if v is not None})

    def submit_file(self, data: bytes, filename: str, task: str | None = None,
                    params: dict[str, Any] | None = None, *, priority: int | None = None,
                    max_attempts: int | None = None, timeout: float | None = None,
                    key: str | None = None, **options: Any) -> dict[str, Any]:
        """Submit a job whose items come from a CSV or JSON Lines file (``options`` as
        for :meth:`submit`)."""
        fields = {"task": task, "params": json.dumps(params) if params else None,
                  "priority": priority, "max_attempts": max_attempts, "timeout": timeout,
                  "key": key, **options}
        boundary = uuid.uuid4().hex
        parts = []
        for name, value in fields.items():
            if value is not None:
                parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"'
                             f"\r\n\r\n{value}\r\n".encode())
        ctype = "text/csv" if filename.lower().endswith(".csv") else "application/x-ndjson"
        safe = os.path.basename(filename).replace('"', "")
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="items"; '
                     f'filename="{safe}"\r\nContent-Type: {ctype}\r\n\r\n'.encode() + data
                     + b"\r\n")
        parts.append(f"--{boundary}--\r\n".encode())
        return self.request("POST", "/api/v1/jobs",  # type: ignore[no-any-return]
                            body=b"".join(parts),
                            content_type=f"multipart/form-data; boundary={boundary}")

    def job(self, ident: str) -> dict[str, Any]:
        """One job by id or unique prefix."""
        return self._json("GET", f"/api/v1/jobs/{quote(ident, safe='')}")  # type: ignore[no-any-return]

    def jobs(self, *, state: str | None = None, task: str | None = None, limit: int = 20,
             before: str | None = None) -> dict[str, Any]:
        """A page of jobs, newest first; ``next`` is the ``before`` of the next page."""
        q = {k: v for k, v in {"state": state, "task": task, "limit": limit,
                               "before": before}.items() if v is not None}
        return self._json("GET", f"/api/v1/jobs?{urlencode(q)}")  # type: ignore[no-any-return]

    def cancel(self, ident: str) -> dict[str, Any]:
        """Cancel a job's unfinished items; returns the job."""
        return self._json("POST", f"/api/v1/jobs/{quote(ident, safe='')}/cancel")  # type: ignore[no-any-return]

    def retry(self, ident: str) -> dict[str, Any]:
        """Re-queue a job's failed and cancelled items; returns the job."""
        return self._json("POST", f"/api/v1/jobs/{quote(ident, safe='')}/retry")  # type: ignore[no-any-return]

    def pause(self, ident: str) -> dict[str, Any]:
        """Pause a job: its queued items wait; returns the job."""
        return self._json("POST", f"/api/v1/jobs/{quote(ident, safe='')}/pause")  # type: ignore[no-any-return]

    def resume(self, ident: str) -> dict[str, Any]:
        """Resume a paused job; returns the job."""
        return self._json("POST", f"/api/v1/jobs/{quote(ident, safe='')}/resume")  # type: ignore[no-any-return]

    def pause_task(self, name: str) -> dict[str, Any]:
        """Pause a task: none of its items starts; returns the task."""
        return self._json("POST", f"/api/v1/tasks/{quote(name, safe='')}/pause")  # type: ignore[no-any-return]

    def resume_task(self, name: str) -> dict[str, Any]:
        """Resume a paused task; returns the task."""
        return self._json("POST", f"/api/v1/tasks/{quote(name, safe='')}/resume")  # type: ignore[no-any-return]

    def pace(self, ident: str) -> dict[str, Any]:
        """How a job is going: recent items per interval, rate, limit, ETA."""
        return self._json("GET", f"/api/v1/jobs/{quote(ident, safe='')}/pace")  # type: ignore[no-any-return]

    def items(self, ident: str, *, state: str | None = None, limit: int = 100,
              after: str | None = None) -> dict[str, Any]:
        """A page of a job's items; ``next`` is the ``after`` of the next page."""
        q = {k: v for k, v in {"state": state, "limit": limit, "after": after}.items()
             if v is not None}
        return self._json("GET", f"/api/v1/jobs/{quote(ident, safe='')}/items?"  # type: ignore[no-any-return]
                                 f"{urlencode(q)}")

    def results(self, ident: str, fmt: str = "jsonl", *,
                state: str | None = None) -> Download:
        """The export (of every item, or of those in ``state``), streamed: iterate over the
        returned :class:`Download` for chunks.

        The request is sent at once, so an unknown id or an unreachable server raises here
        rather than at the first chunk (a caller can then open its output file safely).
        """
        q = {"format": fmt, **({"state": state} if state is not None else {})}
        resp = self.request("GET", f"/api/v1/jobs/{quote(ident, safe='')}/results?"
                                   f"{urlencode(q)}", stream=True)
        return Download(resp)

    def tasks(self) -> dict[str, Any]:
        """The registered tasks and the default one."""
        return self._json("GET", "/api/v1/tasks")  # type: ignore[no-any-return]

    def schedules(self) -> dict[str, Any]:
        """The server's schedules, with their next and latest runs."""
        return self._json("GET", "/api/v1/schedules")  # type: ignore[no-any-return]

    def item_log(self, ident: str, index: int = 0, *, after: int = 0) -> LogChunk:
        """What item ``index`` printed and logged, from byte offset ``after`` on.

        To follow, ask again with ``after=chunk.size`` until ``chunk.state`` is finished.
        """
        resp = self.request("GET", f"/api/v1/jobs/{quote(ident, safe='')}/items/{index}/log"
                                   f"?{urlencode({'after': after})}", stream=True)
        try:
            data = resp.read()
        finally:
            resp.close()
        return LogChunk(data, int(resp.headers.get("X-Log-Size", after + len(data))),
                        resp.headers.get("X-Item-State", ""))

    def prune(self, *, dry_run: bool = False) -> dict[str, Any]:
        """Delete finished jobs past the server's retention ages; counts per state."""
        return self._json("POST", f"/api/v1/prune?dry_run={int(dry_run)}")  # type: ignore[no-any-return]

    def health(self) -> dict[str, Any]:
        """The health report; its ``status`` is "ok", "draining", "database_full",
        "database_locked", "database_unwritable" or "executor_unavailable" (the server
        answers 503 for all but "ok", which is not an error here)."""
        return self.request("GET", "/healthz", accept=(503,))  # type: ignore[no-any-return]

    def wait(self, ident: str, *, timeout: float | None = None, poll: float = 0.25,
             on_update: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
        """Poll until the job finishes; returns it. Raises TimeoutError past ``timeout``."""
        deadline = None if timeout is None else time.monotonic() + timeout
        delay = min(poll, 0.05)
        while True:
            job = self.job(ident)
            if on_update is not None:
                on_update(job)
            if job["state"] in FINISHED:
                return job
            if deadline is not None and time.monotonic() >= deadline:
                raise TimeoutError(f"job {job['id']} is still {job['state']} after "
                                   f"{timeout:g} s")
            time.sleep(delay if deadline is None else
                       max(0.0, min(delay, deadline - time.monotonic())))
            delay = min(delay * 2, poll)


class Download:
    """A streamed response body, read in chunks. Reading it to the end closes it; close it
    (or use ``with``) when you stop early."""

    def __init__(self, resp: http.client.HTTPResponse, chunk_size: int = 64 * 1024) -> None:
        self._resp = resp
        self._chunk_size = chunk_size

    def __iter__(self) -> Iterator[bytes]:
        got = 0
        try:
            while chunk := self._resp.read(self._chunk_size):
                got += len(chunk)
                yield chunk
        except (OSError, http.client.HTTPException) as e:
            raise ServerUnreachable(f"the download was cut off after {got} bytes ({e!r}); "
                                    "run it again") from None
        finally:
            self._resp.close()

    def close(self) -> None:
        """Close the response (the download stops)."""
        self._resp.close()

    def __enter__(self) -> Download:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@dataclass(frozen=True)
class LogChunk:
    """Part of an item's log: the bytes, the offset to ask from next, the item's state."""

    data: bytes
    size: int
    state: str


def _api_error(status: int, data: bytes) -> ApiError:
    try:
        err = json.loads(data)["error"]
        return ApiError(status, err["code"], err["message"], err.get("details") or {})
    except (ValueError, KeyError, TypeError):
        text = data.decode("utf-8", "replace").strip()[:300]
        return ApiError(status, "http_error", f"HTTP {status}: {text or 'no body'}")
