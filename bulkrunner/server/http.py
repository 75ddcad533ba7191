"""JSON responses and the mapping of every error to the API's error body.

Every error the server answers is built here (from :func:`bulkrunner.errors.error_body`),
whether it is one of ours, an HTTP error of Flask's, or an unexpected exception.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from flask import Blueprint, Flask, Response, request
from werkzeug.exceptions import HTTPException

from bulkrunner import errors

log = logging.getLogger("bulkrunner.server.app")

#: The blueprint an embedding Flask app mounts the server's routes in (``bulkrunner.flask``):
#: there the endpoint ``web.jobs`` is ``bulkrunner.web.jobs``, ``healthz`` is
#: ``bulkrunner.healthz``.
MOUNT = "bulkrunner"


def local_name(name: str | None) -> str | None:
    """An endpoint or blueprint name as the standalone server has it (``web.jobs``),
    also for a request to the routes an embedding app mounts (``bulkrunner.web.jobs``)."""
    if name is not None and name.startswith(MOUNT + "."):
        return name[len(MOUNT) + 1:]
    return name


def page_request() -> bool:
    """Whether the current request is for the web page (its pages and static files)."""
    return local_name(request.blueprint) == "web"

STATUS = {
    errors.InvalidRequest: 400, errors.InvalidSubmission: 422, errors.NotFound: 404,
    errors.AmbiguousId: 409, errors.Conflict: 409, errors.Unavailable: 503,
}
_HTTP_CODES = {400: "invalid_request", 401: "unauthorized", 403: "forbidden",
               404: "not_found", 405: "method_not_allowed", 413: "body_too_large",
               415: "unsupported_media_type", 429: "too_many_requests"}


def json_response(data: Any, status: int = 200,
                  headers: dict[str, str] | None = None) -> Response:
    """``data`` as a JSON response."""
    return Response(json.dumps(data), status=status, headers=headers,
                    mimetype="application/json")


def error_response(code: str, message: str, status: int,
                   details: dict[str, Any] | None = None,
                   headers: dict[str, str] | None = None) -> Response:
    """An error in the API's one shape: ``{"error": {code, message, details}}``."""
    return json_response(errors.error_body(code, message, details), status, headers)


def init_app(app: Flask | Blueprint) -> None:
    """Answer every error of ``app`` (of an embedding app's mount: of its routes only) in
    the API's error shape."""
    app.register_error_handler(errors.BulkrunnerError, _bulkrunner_error)
    app.register_error_handler(HTTPException, _http_error)
    app.register_error_handler(Exception, _unexpected_error)


def _bulkrunner_error(e: errors.BulkrunnerError) -> Response:
    status = next((s for cls, s in STATUS.items() if isinstance(e, cls)), 500)
    headers = {"Retry-After": str(e.retry_after)} if isinstance(e, errors.Unavailable) else None
    return error_response(e.code, e.message, status, e.details, headers)


def _http_error(e: HTTPException) -> Response:
    status = e.code or 500
    msg = {404: "no such route; see /openapi.json for the API",
           405: f"{request.method} is not allowed on {request.path}",
           413: f"the request body is larger than server.max_body_size "
                f"({request.max_content_length} bytes)"}.get(
        status, e.description or e.name)
    headers = {}
    if status == 405 and e.valid_methods:  # type: ignore[attr-defined]
        headers["Allow"] = ", ".join(e.valid_methods)  # type: ignore[attr-defined]
    return error_response(_HTTP_CODES.get(status, "http_error"), msg, status, headers=headers)


def _unexpected_error(e: Exception) -> Response:
    log.exception("unexpected error on %s %s", request.method, request.path)
    return error_response("internal_error", "the server failed on this request; the server "
                          "log has the details", 500)
