"""The JSON API under ``/api/v1``: a blueprint of thin routes over the service, plus
``/healthz``, ``/metrics`` and ``/openapi.json``."""

from __future__ import annotations

import contextlib

from flask import Blueprint, Flask, Response, current_app, request

from bulkrunner import errors
from bulkrunner.models import JOB_STATES, STATES, Job
from bulkrunner.server import gil
from bulkrunner.server.auth import submitter
from bulkrunner.server.bodies import STREAM_BODY, parse_json_body
from bulkrunner.server.http import error_response
from bulkrunner.server.http import json_response as _json
from bulkrunner.server.openapi import openapi_document
from bulkrunner.server.service import Service, service_of

api = Blueprint("api", __name__, url_prefix="/api/v1")


def init_app(app: Flask | Blueprint) -> None:
    """Mount the API and the health, metrics and OpenAPI routes on ``app`` (or on an
    embedding app's blueprint of the server's routes)."""
    app.register_blueprint(api)
    app.add_url_rule("/healthz", "healthz", healthz)
    app.add_url_rule("/openapi.json", "openapi", openapi)
    app.add_url_rule("/metrics", "metrics", metrics)


def service() -> Service:
    """The Service of the current app."""
    return service_of(current_app.extensions["bulkrunner"])


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


def _state_arg(states: tuple[str, ...] = STATES) -> str | None:
    state = request.args.get("state") or None
    if state is not None and state not in states:
        raise errors.InvalidRequest(f"state must be one of {', '.join(states)}",
                                    {"field": "state"})
    return state


# ------------------------------------------------------------------ routes
@api.post("/jobs")
def submit() -> Response:
    """POST /api/v1/jobs: submit a job as JSON or a multipart upload (202 new, 200 known key)."""
    ctype = (request.mimetype or "").lower()
    json_body = ctype == "application/json" or ctype.endswith("+json")
    if ctype != "multipart/form-data" and not json_body:
        return error_response("unsupported_media_type", "send the submission as "
                               "application/json, or multipart/form-data with an items file",
                               415, {"content_type": request.mimetype or None})
    # A big bulk is read and checked with short turns at the interpreter, so that the
    # requests served meanwhile are not held up by it (see gil).
    big = (request.content_length or 0) >= STREAM_BODY
    with gil.short_turns() if big else contextlib.nullcontext():
        job, created = _submit(service(), json_body)
    return _json(job.to_dict(), 202 if created else 200,
                 {"Location": f"/api/v1/jobs/{job.id}"})


def _submit(svc: Service, json_body: bool) -> tuple[Job, bool]:
    """The submission of this request (a JSON body or a multipart upload), committed."""
    if not json_body:
        upload = request.files.get("items")
        if upload is None:
            raise errors.InvalidSubmission({"items": "a multipart submission needs the file "
                                                     "field 'items' (CSV or JSON Lines)"})
        return svc.submit_upload(request.form.to_dict(), upload.read(), upload.filename,
                                 upload.mimetype, submitted_by=submitter())
    try:
        body = parse_json_body(request.get_data(cache=False))
    except (ValueError, RecursionError) as e:
        raise errors.InvalidRequest(f"the body is not valid JSON ({str(e)[:200]})") from None
    return svc.submit(body, submitted_by=submitter())


@api.get("/jobs")
def list_jobs() -> Response:
    """GET /api/v1/jobs: a page of jobs, newest first, and the cursor of the next one.

    A job's error comes without its traceback here (GET /api/v1/jobs/<id> has it)."""
    limit = _int_arg("limit", 20, 1, 1000)
    before = _int_arg("before", None, 0, 2**62)
    task = request.args.get("task") or None
    jobs, nxt = service().list_jobs(state=_state_arg(JOB_STATES), task=task,
                                    limit=limit or 20, before=before,
                                    submitted_by=request.args.get("submitted_by") or None)
    return _json({"jobs": [j.to_dict(traceback=False) for j in jobs],
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


@api.post("/jobs/<ident>/pause")
def pause_job(ident: str) -> Response:
    """POST /api/v1/jobs/<id>/pause: its queued items wait, running ones finish (409
    when finished)."""
    return _json(service().pause(ident).to_dict())


@api.post("/jobs/<ident>/resume")
def resume_job(ident: str) -> Response:
    """POST /api/v1/jobs/<id>/resume: its queued items may start again (409 when not
    paused)."""
    return _json(service().resume(ident).to_dict())


@api.get("/jobs/<ident>/pace")
def job_pace(ident: str) -> Response:
    """GET /api/v1/jobs/<id>/pace: items finished per interval lately, the current rate
    against the task's limit, why items wait, and an estimate of the time left."""
    return _json(service().pace(ident))


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
    """GET /api/v1/jobs/<id>/results: every item (or those in ``state``) as a JSON Lines or
    CSV download."""
    fmt = request.args.get("format", "jsonl")
    if fmt not in ("jsonl", "csv"):
        raise errors.InvalidRequest("format must be jsonl or csv", {"field": "format"})
    state = _state_arg()
    job, rows = service().export(ident, fmt, state=state)
    mimetype = "application/x-ndjson" if fmt == "jsonl" else "text/csv"
    headers = {"Content-Disposition": f'attachment; filename="{job.id}.{fmt}"'}
    if job.submitted_by:  # job-wide, so not repeated in every row
        headers["X-Submitted-By"] = job.submitted_by
    return Response(rows, mimetype=mimetype, headers=headers)


@api.get("/jobs/<ident>/items/<index>/log")
def item_log(ident: str, index: str) -> Response:
    """GET /api/v1/jobs/<id>/items/<index>/log: the item's output from byte ``after`` on.

    The index is read here, not by Werkzeug's int converter, which takes digits of any
    length (past 4300 of them ``int()`` raises, a 500): one that is not 0 to 2**63 - 1
    (SQLite's largest integer) names no item, 404.
    """
    number = int(index) if index.isascii() and index.isdigit() and len(index) <= 19 else -1
    if not 0 <= number < 2**63:
        raise errors.NotFound(f"the job has no item {index[:32]!r}", {"index": index[:32]})
    after = _int_arg("after", 0, 0, 2**62) or 0
    data, size, state = service().item_log(ident, number, after)
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


@api.get("/schedules")
def list_schedules() -> Response:
    """GET /api/v1/schedules: the configured schedules with their next and latest runs."""
    return _json({"schedules": service().schedules()})


@api.post("/tasks/<name>/pause")
def pause_task(name: str) -> Response:
    """POST /api/v1/tasks/<name>/pause: no item of the task starts (404 unknown task)."""
    return _json(service().pause_task(name, True))


@api.post("/tasks/<name>/resume")
def resume_task(name: str) -> Response:
    """POST /api/v1/tasks/<name>/resume: its items may start again."""
    return _json(service().pause_task(name, False))


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
    # An embedding app's mount keeps its metrics (as its service) itself.
    found = current_app.extensions.get("bulkrunner_metrics") or \
        current_app.extensions["bulkrunner"].metrics
    data, ctype = found.render()
    return Response(data, content_type=ctype)
