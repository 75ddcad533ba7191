"""The OpenAPI 3 description of the HTTP API (served at ``/openapi.json``).

Written by hand, kept true by a test that compares it with the app's routes.
"""

from __future__ import annotations

from typing import Any

from bulkrunner import __version__
from bulkrunner.models import FAILURE_MESSAGE_CHARS, JOB_STATES, MAX_FAILURE_GROUPS, STATES

_ERR = {"$ref": "#/components/responses/Error"}
_ID = {"name": "id", "in": "path", "required": True,
       "description": "A job id or a unique prefix of one.",
       "schema": {"type": "string", "minLength": 1, "maxLength": 64}}
_STATE = {"name": "state", "in": "query", "required": False,
          "schema": {"type": "string", "enum": list(STATES)}}
_JOB_STATE = {"name": "state", "in": "query", "required": False,
              "schema": {"type": "string", "enum": list(JOB_STATES)}}
_TASK = {"name": "name", "in": "path", "required": True, "description": "A task name.",
         "schema": {"type": "string", "minLength": 1, "maxLength": 200}}


def _ok(schema: str, description: str) -> dict[str, Any]:
    return {"description": description, "content": {
        "application/json": {"schema": {"$ref": f"#/components/schemas/{schema}"}}}}


def openapi_document() -> dict[str, Any]:
    """The whole document, as a dict."""
    errors = {"400": _ERR, "401": _ERR, "403": _ERR, "404": _ERR, "409": _ERR, "413": _ERR,
              "415": _ERR, "422": _ERR, "503": _ERR}
    return {
        "openapi": "3.0.3",
        "info": {"title": "bulkrunner", "version": __version__,
                 "description": "Durable bulk jobs over HTTP. With a token configured, every "
                                "route but /healthz needs 'Authorization: Bearer <token>', "
                                "and a token whose role (read: every GET; submit: also "
                                "submit, and cancel, retry, pause or resume its own jobs; "
                                "admin: everything) does not allow the request gets 403 "
                                "insufficient_role."},
        "paths": {
            "/api/v1/jobs": {
                "post": {
                    "operationId": "submitJob", "summary": "Submit a job",
                    "requestBody": {"required": True, "content": {
                        "application/json": {"schema": {"$ref": "#/components/schemas/Submit"}},
                        "multipart/form-data": {"schema": {
                            "type": "object", "required": ["items"], "properties": {
                                "items": {"type": "string", "format": "binary",
                                          "description": "CSV (header row = param names) or "
                                                         "JSON Lines"},
                                "task": {"type": "string"},
                                "params": {"type": "string", "description": "JSON object"},
                                "priority": {"type": "integer"},
                                "max_attempts": {"type": "integer"},
                                "timeout": {"type": "number"},
                                "key": {"type": "string"},
                                "delay": {"type": "number"},
                                "run_after": {"type": "string"},
                                "notify_url": {"type": "string"}}}}}},
                    "responses": {
                        "202": {**_ok("Job", "Accepted: the job and its items are committed"),
                                "headers": {"Location": {"schema": {"type": "string"}}}},
                        "200": _ok("Job", "An idempotent replay: the original job"),
                        **errors}},
                "get": {
                    "operationId": "listJobs", "summary": "List jobs, newest first",
                    "parameters": [
                        _JOB_STATE,
                        {"name": "task", "in": "query", "schema": {"type": "string"}},
                        {"name": "submitted_by", "in": "query", "description": "only the "
                         "jobs the token of this name submitted", "schema": {"type": "string"}},
                        {"name": "limit", "in": "query",
                         "schema": {"type": "integer", "minimum": 1, "maximum": 1000}},
                        {"name": "before", "in": "query", "description": "the `next` cursor",
                         "schema": {"type": "string"}}],
                    "responses": {"200": _ok("JobList", "A page of jobs"), **errors}}},
            "/api/v1/jobs/{id}": {"get": {
                "operationId": "getJob", "summary": "One job", "parameters": [_ID],
                "responses": {"200": _ok("Job", "The job"), **errors}}},
            "/api/v1/jobs/{id}/cancel": {"post": {
                "operationId": "cancelJob", "summary": "Cancel every unfinished item",
                "parameters": [_ID],
                "responses": {"200": _ok("Job", "The cancelled job"), **errors}}},
            "/api/v1/jobs/{id}/retry": {"post": {
                "operationId": "retryJob", "summary": "Re-queue failed and cancelled items",
                "parameters": [_ID],
                "responses": {"200": _ok("Job", "The job, re-queued"), **errors}}},
            "/api/v1/jobs/{id}/pause": {"post": {
                "operationId": "pauseJob",
                "summary": "Pause: queued items wait, running ones finish",
                "parameters": [_ID],
                "responses": {"200": _ok("Job", "The paused job"), **errors}}},
            "/api/v1/jobs/{id}/resume": {"post": {
                "operationId": "resumeJob", "summary": "Resume a paused job",
                "parameters": [_ID],
                "responses": {"200": _ok("Job", "The job, resumed"), **errors}}},
            "/api/v1/jobs/{id}/pace": {"get": {
                "operationId": "jobPace",
                "summary": "Items finished per interval lately, rate, limit and ETA",
                "parameters": [_ID],
                "responses": {"200": _ok("Pace", "How the job is going"), **errors}}},
            "/api/v1/jobs/{id}/items": {"get": {
                "operationId": "listItems", "summary": "The job's items",
                "parameters": [
                    _ID, _STATE,
                    {"name": "limit", "in": "query",
                     "schema": {"type": "integer", "minimum": 1, "maximum": 10000}},
                    {"name": "after", "in": "query", "description": "the `next` cursor",
                     "schema": {"type": "string"}}],
                "responses": {"200": _ok("ItemList", "A page of items"), **errors}}},
            "/api/v1/jobs/{id}/results": {"get": {
                "operationId": "exportResults", "summary": "Every item, streamed",
                "parameters": [_ID, {"name": "format", "in": "query", "schema": {
                    "type": "string", "enum": ["jsonl", "csv"], "default": "jsonl"}},
                    {**_STATE, "description": "Only the items in this state (for example "
                                              "failed); every item when left out"}],
                "responses": {"200": {"description": "One line or row per item", "headers": {
                    "X-Submitted-By": {"description": "The name of the token that submitted "
                                       "the job (absent when none did)",
                                       "schema": {"type": "string"}}}, "content": {
                    "application/x-ndjson": {"schema": {"type": "string"}},
                    "text/csv": {"schema": {"type": "string"}}}}, **errors}}},
            "/api/v1/jobs/{id}/items/{index}/log": {"get": {
                "operationId": "itemLog",
                "summary": "What an item printed and logged (text; follow with ?after=)",
                "parameters": [
                    _ID,
                    {"name": "index", "in": "path", "required": True,
                     "schema": {"type": "integer", "minimum": 0}},
                    {"name": "after", "in": "query", "description": "Byte offset to start "
                     "from: the X-Log-Size of the previous answer",
                     "schema": {"type": "integer", "minimum": 0}}],
                "responses": {"200": {
                    "description": "UTF-8 text from the offset on; each run after the first "
                                   "starts with a '--- run N ---' line",
                    "headers": {
                        "X-Log-Size": {"description": "Bytes of log so far: the next offset",
                                       "schema": {"type": "integer"}},
                        "X-Item-State": {"description": "The item's state; stop following "
                                         "once it is finished",
                                         "schema": {"type": "string", "enum": list(STATES)}}},
                    "content": {"text/plain": {"schema": {"type": "string"}}}}, **errors}}},
            "/api/v1/prune": {"post": {
                "operationId": "prune",
                "summary": "Delete finished jobs older than the [retention] ages",
                "parameters": [{"name": "dry_run", "in": "query", "description": "1: only "
                                "count what would be deleted",
                                "schema": {"type": "string", "enum": ["0", "1"]}}],
                "responses": {"200": _ok("Prune", "Jobs and items deleted (or that would "
                                                  "be), by state"), **errors}}},
            "/api/v1/tasks": {"get": {
                "operationId": "listTasks", "summary": "Registered tasks and their params",
                "responses": {"200": _ok("TaskList", "The tasks"), **errors}}},
            "/api/v1/schedules": {"get": {
                "operationId": "listSchedules",
                "summary": "The configured schedules, with their next and latest runs",
                "responses": {"200": _ok("ScheduleList", "The schedules"), **errors}}},
            "/api/v1/tasks/{name}/pause": {"post": {
                "operationId": "pauseTask", "summary": "Pause a task: none of its items starts",
                "parameters": [_TASK],
                "responses": {"200": _ok("Task", "The task"), **errors}}},
            "/api/v1/tasks/{name}/resume": {"post": {
                "operationId": "resumeTask", "summary": "Resume a paused task",
                "parameters": [_TASK],
                "responses": {"200": _ok("Task", "The task"), **errors}}},
            "/healthz": {"get": {
                "operationId": "health", "summary": "Liveness, queue depth, executor health",
                "responses": {"200": _ok("Health", "Serving"),
                              "503": _ok("Health", "Draining, the database cannot be "
                                         "written (disk full, locked), or the executor is "
                                         "unusable")}}},
            "/metrics": {"get": {
                "operationId": "metrics", "summary": "Prometheus metrics (text format)",
                "responses": {"200": {"description": "Prometheus text exposition format",
                                      "content": {"text/plain": {"schema": {
                                          "type": "string"}}}}, "401": _ERR}}},
            "/openapi.json": {"get": {
                "operationId": "openapi", "summary": "This document",
                "responses": {"200": {"description": "OpenAPI 3 document", "content": {
                    "application/json": {"schema": {"type": "object"}}}}}}},
        },
        "components": {
            "responses": {"Error": {"description": "An error", "content": {
                "application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}},
            "schemas": _schemas(),
        },
    }


def _schemas() -> dict[str, Any]:
    nullable_time = {"type": "string", "format": "date-time", "nullable": True}
    error_obj = {"type": "object", "nullable": True, "properties": {
        "type": {"type": "string"}, "message": {"type": "string"},
        "traceback": {"type": "string"}}}
    counts = {"type": "object", "required": ["total", *STATES], "properties": {
        k: {"type": "integer"} for k in ("total", *STATES)}}
    return {
        "Error": {"type": "object", "required": ["error"], "properties": {"error": {
            "type": "object", "required": ["code", "message", "details"], "properties": {
                "code": {"type": "string"}, "message": {"type": "string"},
                "details": {"type": "object"}}}}},
        "Submit": {"type": "object", "additionalProperties": False, "properties": {
            "task": {"type": "string"},
            "params": {"type": "object"},
            "items": {"type": "array", "items": {"type": "object"}},
            "priority": {"type": "integer"},
            "max_attempts": {"type": "integer", "minimum": 1},
            "timeout": {"type": "number", "minimum": 0},
            "key": {"type": "string", "minLength": 1, "maxLength": 200},
            "delay": {"type": "number", "minimum": 0,
                      "description": "seconds from now before any item starts"},
            "run_after": {"type": "string", "format": "date-time",
                          "description": "no item starts before this time (with a zone)"},
            "notify_url": {"type": "string",
                           "description": "POST the finished job here; must start with a "
                                          "[notify] allowed prefix"}}},
        "Job": {"type": "object", "required": [
            "id", "task", "params", "state", "priority", "created_at", "items", "progress",
            "failures"],
            "properties": {
                "id": {"type": "string"}, "task": {"type": "string"},
                "params": {"type": "object"},
                "state": {"type": "string", "enum": list(JOB_STATES)},
                "priority": {"type": "integer"}, "max_attempts": {"type": "integer"},
                "run_after": nullable_time,
                "schedule": {"type": "string", "nullable": True},
                "notify": {"type": "object", "nullable": True, "properties": {
                    "url": {"type": "string"},
                    "state": {"type": "string", "enum": ["pending", "delivered", "failed"]},
                    "attempts": {"type": "integer"}}},
                "waiting": {"type": "string", "nullable": True, "enum": [
                    "paused", "run_after", "task_paused", "concurrency", "rate_limit", None],
                    "description": "why its queued items do not start now"},
                "timeout": {"type": "number"}, "key": {"type": "string", "nullable": True},
                "submitted_by": {"type": "string", "nullable": True,
                                 "description": "the name of the token that submitted it "
                                                "(admin for server.token; null with no "
                                                "token configured)"},
                "created_at": {"type": "string", "format": "date-time"},
                "started_at": nullable_time, "finished_at": nullable_time,
                "items": counts, "progress": {"type": "number"},
                "message": {"type": "string", "nullable": True},
                "result": {"nullable": True}, "error": error_obj,
                "failures": {
                    "type": "array", "maxItems": MAX_FAILURE_GROUPS,
                    "description": "The failed items grouped by error type and message "
                                   f"(cut to {FAILURE_MESSAGE_CHARS} characters, then …), "
                                   "most frequent first, then by first item; at most "
                                   f"{MAX_FAILURE_GROUPS} groups, empty when no item failed",
                    "items": {"type": "object",
                              "required": ["type", "message", "count", "first_index"],
                              "properties": {
                                  "type": {"type": "string"},
                                  "message": {"type": "string"},
                                  "count": {"type": "integer", "minimum": 1},
                                  "first_index": {"type": "integer", "minimum": 0,
                                                  "description": "the lowest index of "
                                                                 "the group's items"}}}}}},
        "JobList": {"type": "object", "required": ["jobs", "next"], "properties": {
            "jobs": {"type": "array", "items": {"$ref": "#/components/schemas/Job"}},
            "next": {"type": "string", "nullable": True}}},
        "Item": {"type": "object", "required": ["index", "params", "state", "attempts"],
                 "properties": {
                     "index": {"type": "integer"}, "params": {"type": "object"},
                     "state": {"type": "string", "enum": list(STATES)},
                     "attempts": {"type": "integer"}, "result": {"nullable": True},
                     "error": error_obj, "started_at": nullable_time,
                     "finished_at": nullable_time,
                     "progress": {"type": "number", "nullable": True},
                     "message": {"type": "string", "nullable": True},
                     "worker": {"type": "string", "nullable": True},
                     "errors": {"type": "array", "items": {"type": "object"}}}},
        "ItemList": {"type": "object", "required": ["items", "next"], "properties": {
            "items": {"type": "array", "items": {"$ref": "#/components/schemas/Item"}},
            "next": {"type": "string", "nullable": True}}},
        "Task": {"type": "object", "required": ["name", "doc", "params", "concurrency",
                                                "rate_limit", "paused"], "properties": {
            "name": {"type": "string"}, "doc": {"type": "string"},
            "params": {"type": "array", "items": {
                "type": "object", "required": ["name", "type", "required", "default"],
                "properties": {"name": {"type": "string"}, "type": {"type": "string"},
                               "required": {"type": "boolean"}, "default": {}}}},
            "concurrency": {"type": "integer", "description": "0 = no limit of its own"},
            "rate_limit": {"type": "string", "description": '"N/s", "N/m", "N/h" or ""'},
            "paused": {"type": "boolean"}}},
        "ScheduleList": {"type": "object", "required": ["schedules"], "properties": {
            "schedules": {"type": "array", "items": {
                "type": "object",
                "required": ["name", "task", "cron", "every", "timezone", "enabled",
                             "next_run", "last_run", "last_job"],
                "properties": {
                    "name": {"type": "string"}, "task": {"type": "string"},
                    "cron": {"type": "string", "nullable": True,
                             "description": "five-field cron, read in timezone"},
                    "every": {"type": "integer", "nullable": True,
                              "description": "seconds between firings (on a grid from "
                                             "the Unix epoch)"},
                    "timezone": {"type": "string"}, "enabled": {"type": "boolean"},
                    "next_run": {**nullable_time, "description": "null when disabled"},
                    "last_run": {**nullable_time,
                                 "description": "the latest fire time a job was "
                                                "submitted for"},
                    "last_job": {"type": "string", "nullable": True}}}}}},
        "TaskList": {"type": "object", "required": ["tasks"], "properties": {"tasks": {
            "type": "array", "items": {"$ref": "#/components/schemas/Task"}}}},
        "Pace": {"type": "object", "required": ["id", "state", "history", "rate"],
                 "properties": {
            "id": {"type": "string"}, "state": {"type": "string"},
            "left": {"type": "integer", "description": "items queued or running"},
            "interval": {"type": "number", "description": "seconds per history entry"},
            "history": {"type": "array", "items": {"type": "object", "properties": {
                "t": {"type": "string", "format": "date-time"},
                "finished": {"type": "integer"}}}},
            "rate": {"type": "number", "nullable": True,
                     "description": "items per second lately"},
            "rate_limit": {"type": "string"},
            "limit_per_second": {"type": "number", "nullable": True},
            "waiting": {"type": "string", "nullable": True},
            "run_after": nullable_time,
            "eta_seconds": {"type": "number", "nullable": True}}},
        "Health": {"type": "object", "required": ["status"], "properties": {
            "status": {"type": "string"}, "executor": {"type": "object"},
            "store": {"type": "object", "description": "whether the database can be written"},
            "queued": {"type": "integer"}, "inflight": {"type": "integer"},
            "max_workers": {"type": "integer"},
            "dispatching": {"type": "boolean", "description": "whether this process runs "
                            "items: false for a standby while another process sharing the "
                            "database holds the dispatcher lease"},
            "workers": {"type": "integer", "description": "workers ready to run items"}}},
        "Prune": {"type": "object", "required": ["dry_run", "jobs", "items"], "properties": {
            "dry_run": {"type": "boolean"},
            "jobs": {"type": "object", "additionalProperties": {"type": "integer"}},
            "items": {"type": "object", "additionalProperties": {"type": "integer"}}}},
    }
