"""The Flask app: the JSON API of contract section 4, error mapping and auth.

``create_app(config)`` is the factory and the test seam; the running :class:`Service`
lives in ``app.extensions["bulkrunner"]``.
"""

from __future__ import annotations

import hmac
import json
import logging
from typing import Any

from flask import Blueprint, Flask, Response, current_app, request
from werkzeug.exceptions import HTTPException

from bulkrunner import errors
from bulkrunner.config import Config, host_is_loopback, load_config
from bulkrunner.models import STATES
from bulkrunner.server import web
from bulkrunner.server.metrics import Metrics
from bulkrunner.server.openapi import openapi_document
from bulkrunner.server.service import Service

log = logging.getLogger("bulkrunner.server.app")
api = Blueprint("api", __name__, url_prefix="/api/v1")

STATUS = {
    errors.InvalidRequest: 400, errors.InvalidSubmission: 422, errors.NotFound: 404,
    errors.AmbiguousId: 409, errors.Conflict: 409, errors.Unavailable: 503,
}
_HTTP_CODES = {400: "invalid_request", 401: "unauthorized", 403: "forbidden",
               404: "not_found", 405: "method_not_allowed", 413: "body_too_large",
               415: "unsupported_media_type", 429: "too_many_requests"}


def create_app(config: Config | None = None, *, service: Service | None = None,
               start: bool = True) -> Flask:
    """Build the app around a new (or the given) service; start its dispatcher."""
    cfg = config or (service.cfg if service else load_config())
    svc = service or Service(cfg)
    app = Flask(__name__)
    app.config["MAX_CONTENT_LENGTH"] = cfg.server.max_body_size
    app.json.sort_keys = False  # type: ignore[attr-defined]
    app.extensions["bulkrunner"] = svc
    app.register_blueprint(api)
    web.register(app)
    app.add_url_rule("/healthz", "healthz", healthz)
    app.add_url_rule("/openapi.json", "openapi", openapi)
    app.add_url_rule("/metrics", "metrics", metrics)
    # Before the service starts, so its first events are counted.
    app.extensions["bulkrunner_metrics"] = Metrics(svc)
    app.register_error_handler(errors.BulkrunnerError, _bulkrunner_error)
    app.register_error_handler(HTTPException, _http_error)
    app.register_error_handler(Exception, _unexpected_error)
    app.before_request(_guard_host_and_origin)
    app.before_request(_authenticate)
    app.after_request(_security_headers)
    if start and not svc.started:
        svc.start()
    return app


def service() -> Service:
    """The Service of the current app."""
    svc: Service = current_app.extensions["bulkrunner"]
    return svc


def _json(data: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(json.dumps(data), status=status, headers=headers,
                    mimetype="application/json")


def error_response(code: str, message: str, status: int,
                   details: dict[str, Any] | None = None,
                   headers: dict[str, str] | None = None) -> Response:
    """A JSON error in the contract's shape: ``{"error": {code, message, details}}``."""
    return _json({"error": {"code": code, "message": message, "details": details or {}}},
                 status, headers)


# ------------------------------------------------------------------ errors and auth
def _bulkrunner_error(e: errors.BulkrunnerError) -> Response:
    status = next((s for cls, s in STATUS.items() if isinstance(e, cls)), 500)
    headers = {"Retry-After": str(e.retry_after)} if isinstance(e, errors.Unavailable) else None
    return error_response(e.code, e.message, status, e.details, headers)


def _http_error(e: HTTPException) -> Response:
    status = e.code or 500
    msg = {404: "no such route; see /openapi.json for the API",
           405: f"{request.method} is not allowed on {request.path}",
           413: f"the request body is larger than server.max_body_size "
                f"({current_app.config['MAX_CONTENT_LENGTH']} bytes)"}.get(
        status, e.description or e.name)
    headers = {}
    if status == 405 and e.valid_methods:  # type: ignore[attr-defined]
        headers["Allow"] = ", ".join(e.valid_methods)  # type: ignore[attr-defined]
    return error_response(_HTTP_CODES.get(status, "http_error"), msg, status, headers=headers)


def _unexpected_error(e: Exception) -> Response:
    log.exception("unexpected error on %s %s", request.method, request.path)
    return error_response("internal_error", "the server failed on this request; the server "
                          "log has the details", 500)


_UNSAFE_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})


def _guard_host_and_origin() -> Response | None:
    """Refuse DNS-rebinding and cross-site requests.

    Bound to loopback, the server answers only requests addressed to a loopback name: a
    foreign page whose host name was re-pointed at 127.0.0.1 still sends its own Host. And a
    state-changing request from another origin (a foreign page posting a form, which needs
    no CORS preflight) is refused by its Origin / Sec-Fetch-Site headers, which browsers set
    and pages cannot forge.
    """
    server = service().cfg.server
    if server.is_loopback:
        host = _hostname(request.host)
        if not host_is_loopback(host) and host.lower() not in server.allowed_hosts:
            return error_response("forbidden_host", f"this server listens on loopback and "
                                  f"answers only requests for localhost or 127.0.0.1, not "
                                  f"{host[:100]!r} (a guard against DNS rebinding; a "
                                  "reverse proxy's name goes in server.allowed_hosts)", 403)
    if request.method in _UNSAFE_METHODS:
        site = request.headers.get("Sec-Fetch-Site")
        origin = request.headers.get("Origin")
        origin_host = (origin or "").partition("://")[2]
        if site in ("cross-site", "same-site") or (
                origin is not None and origin_host != request.host
                and _hostname(origin_host).lower() not in server.allowed_hosts):
            return error_response("cross_origin", "requests from another web site are "
                                  "refused; use the CLI, the API with a token, or this "
                                  "server's own page", 403)
    return None


def _hostname(host: str) -> str:
    if host.startswith("["):
        return host[1:].partition("]")[0]
    return host.rpartition(":")[0] if host.count(":") == 1 else host


def _security_headers(resp: Response) -> Response:
    resp.headers.setdefault("X-Content-Type-Options", "nosniff")
    resp.headers.setdefault("X-Frame-Options", "DENY")
    resp.headers.setdefault("Referrer-Policy", "no-referrer")
    return resp


def _authenticate() -> Response | None:
    token = service().cfg.server.token
    if not token or request.path == "/healthz" or request.blueprint == "web":
        return None  # web pages check the page session themselves (bulkrunner.server.web)
    given = request.headers.get("Authorization", "")
    if not given and web.session_auth(request):
        return None
    scheme, _, value = given.partition(" ")
    if scheme.lower() == "bearer" and hmac.compare_digest(value.strip().encode(), token.encode()):
        return None
    return error_response("unauthorized", "missing or wrong token: send "
                          "'Authorization: Bearer <token>' (the CLI reads --token or "
                          "$BULKRUNNER_TOKEN)", 401, headers={"WWW-Authenticate": "Bearer"})


# ------------------------------------------------------------------ request helpers
def _int_arg(name: str, default: int | None, lo: int, hi: int) -> int | None:
    raw = request.args.get(name)
    if raw is None or raw == "":
        return default
    try:
        v = int(raw)
    except ValueError:
        raise errors.InvalidRequest(f"query parameter {name} must be a whole number",
                                    {"field": name}) from None
    if not lo <= v <= hi:
        raise errors.InvalidRequest(f"query parameter {name} must be from {lo} to {hi}",
                                    {"field": name})
    return v


def _state_arg() -> str | None:
    state = request.args.get("state") or None
    if state is not None and state not in STATES:
        raise errors.InvalidRequest(f"state must be one of {', '.join(STATES)}",
                                    {"field": "state"})
    return state


# ------------------------------------------------------------------ routes
@api.post("/jobs")
def submit() -> Response:
    """POST /api/v1/jobs: submit a job as JSON or a multipart upload (202 new, 200 known key)."""
    svc = service()
    ctype = (request.mimetype or "").lower()
    if ctype == "multipart/form-data":
        upload = request.files.get("items")
        if upload is None:
            raise errors.InvalidSubmission({"items": "a multipart submission needs the file "
                                                     "field 'items' (CSV or JSON Lines)"})
        job, created = svc.submit_upload(request.form.to_dict(), upload.read(),
                                         upload.filename, upload.mimetype)
    elif ctype == "application/json" or ctype.endswith("+json"):
        try:
            body = json.loads(request.get_data(cache=False))
        except (ValueError, RecursionError) as e:
            raise errors.InvalidRequest(f"the body is not valid JSON ({str(e)[:200]})") from None
        job, created = svc.submit(body)
    else:
        return error_response("unsupported_media_type", "send the submission as "
                               "application/json, or multipart/form-data with an items file",
                               415, {"content_type": request.mimetype or None})
    return _json(job.to_dict(), 202 if created else 200,
                 {"Location": f"/api/v1/jobs/{job.id}"})


@api.get("/jobs")
def list_jobs() -> Response:
    """GET /api/v1/jobs: a page of jobs, newest first, and the cursor of the next one."""
    limit = _int_arg("limit", 20, 1, 1000)
    before = _int_arg("before", None, 0, 2**62)
    task = request.args.get("task") or None
    jobs, nxt = service().list_jobs(state=_state_arg(), task=task, limit=limit or 20, before=before)
    return _json({"jobs": [j.to_dict() for j in jobs],
                  "next": str(nxt) if nxt is not None else None})


@api.get("/jobs/<ident>")
def get_job(ident: str) -> Response:
    """GET /api/v1/jobs/<id>: one job (404 when unknown)."""
    return _json(service().get(ident).to_dict())


@api.post("/jobs/<ident>/cancel")
def cancel_job(ident: str) -> Response:
    """POST /api/v1/jobs/<id>/cancel: cancel its unfinished items (409 when finished)."""
    return _json(service().cancel(ident).to_dict())


@api.post("/jobs/<ident>/retry")
def retry_job(ident: str) -> Response:
    """POST /api/v1/jobs/<id>/retry: re-queue failed and cancelled items (409 if none)."""
    return _json(service().retry(ident).to_dict())


@api.get("/jobs/<ident>/items")
def list_items(ident: str) -> Response:
    """GET /api/v1/jobs/<id>/items: a page of the job's items and the next cursor."""
    limit = _int_arg("limit", 100, 1, 10000)
    after = _int_arg("after", None, -1, 2**62)
    items, nxt = service().items(ident, state=_state_arg(), limit=limit or 100, after=after)
    return _json({"items": [i.to_dict() for i in items],
                  "next": str(nxt) if nxt is not None else None})


@api.get("/jobs/<ident>/results")
def results(ident: str) -> Response:
    """GET /api/v1/jobs/<id>/results: every item as a JSON Lines or CSV download."""
    fmt = request.args.get("format", "jsonl")
    if fmt not in ("jsonl", "csv"):
        raise errors.InvalidRequest("format must be jsonl or csv", {"field": "format"})
    svc = service()
    job = svc.get(ident)
    mimetype = "application/x-ndjson" if fmt == "jsonl" else "text/csv"
    return Response(svc.export(job.id, fmt), mimetype=mimetype, headers={
        "Content-Disposition": f'attachment; filename="{job.id}.{fmt}"'})


@api.get("/jobs/<ident>/items/<int:index>/log")
def item_log(ident: str, index: int) -> Response:
    """GET /api/v1/jobs/<id>/items/<index>/log: the item's output from byte ``after`` on."""
    after = _int_arg("after", 0, 0, 2**62) or 0
    data, size, state = service().item_log(ident, index, after)
    return Response(data, mimetype="text/plain", headers={
        "X-Log-Size": str(size), "X-Item-State": state, "Cache-Control": "no-store"})


@api.post("/prune")
def prune() -> Response:
    """POST /api/v1/prune: delete (or with ``dry_run`` count) jobs past their retention."""
    raw = request.args.get("dry_run", "0").lower()
    if raw not in ("0", "1", "true", "false", ""):
        raise errors.InvalidRequest("query parameter dry_run must be 1 or 0",
                                    {"field": "dry_run"})
    return _json(service().prune(dry_run=raw in ("1", "true")))


@api.get("/tasks")
def list_tasks() -> Response:
    """GET /api/v1/tasks: the registered tasks and the default one."""
    svc = service()
    return _json({"tasks": svc.tasks(), "default": svc.registry.default})


def healthz() -> Response:
    """GET /healthz: the server's health (503 with Retry-After unless ok)."""
    h = service().health()
    if h["status"] == "ok":
        return _json(h)
    return _json(h, 503, {"Retry-After": "5"})


def openapi() -> Response:
    """GET /openapi.json: the API's OpenAPI document."""
    return _json(openapi_document())


def metrics() -> Response:
    """GET /metrics: the Prometheus metrics."""
    data, ctype = current_app.extensions["bulkrunner_metrics"].render()
    return Response(data, content_type=ctype)
