"""A submission checked against its task and turned into a :class:`~bulkrunner.store.NewJob`.

Everything a client can get wrong is found here, before anything is written, and reported
as one :class:`~bulkrunner.errors.InvalidSubmission` naming each field. Params are encoded
to JSON once, here, and stored as that text.
"""

from __future__ import annotations

import hashlib
import json
import json.encoder
import math
import os
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from datetime import datetime
from typing import Any

from bulkrunner.config import Config
from bulkrunner.errors import InvalidSubmission
from bulkrunner.server.bodies import ItemsText
from bulkrunner.server.itemfiles import location
from bulkrunner.server.notify import notify_url_problem, task_notify_url
from bulkrunner.server.tasks import Registry, Task
from bulkrunner.store import NewJob

SUBMIT_KEYS = ("task", "params", "items", "priority", "max_attempts", "timeout", "key",
               "delay", "run_after", "notify_url")
#: The longest a job may be made to wait (``delay`` or ``run_after``): a year.
MAX_DELAY = 366 * 86400
MAX_PRIORITY = 1_000_000
MAX_ATTEMPTS = 100
_MAX_ITEM_ERRORS = 20
_NOT_FINITE = "holds NaN or Infinity, which JSON cannot carry; send finite numbers"
_SURROGATE = ("holds an unpaired surrogate (such as \\ud800), which is not text; send valid "
              "Unicode")


def new_job(cfg: Config, registry: Registry, body: Any, *,
            items: Collection[Mapping[str, Any]] | None = None,
            rows: Sequence[int] | None = None, unit: str = "row",
            submitted_by: str | None = None) -> NewJob:
    """Check a submission body and return the job to insert (``submitted_by``: the name of
    the token that submitted it).

    ``items`` (with where they are in their file, ``rows`` numbered in ``unit``s, for
    messages) come from an uploaded file, and replace ``body["items"]``. A bad item of a
    file is named both ways, ``row 3 (item 1), n``; one of the body, ``items[1].n``.
    """
    if not isinstance(body, dict):
        raise InvalidSubmission({"body": "must be a JSON object like "
                                         '{"task": "echo", "params": {}}'})
    unknown = [k for k in body if k not in SUBMIT_KEYS]
    if unknown:
        raise InvalidSubmission({k: f"unknown field; a submission takes "
                                    f"{', '.join(SUBMIT_KEYS)}" for k in unknown[:10]})
    task = registry.get(body.get("task"))
    fields: dict[str, str] = {}
    params = body.get("params", {})
    if params is None:
        params = {}
    if not isinstance(params, dict):
        raise InvalidSubmission({"params": "must be an object of param names to values"})
    priority = _int_field(body, "priority", 0, -MAX_PRIORITY, MAX_PRIORITY, fields)
    attempts_default = task.max_attempts or cfg.jobs.max_attempts
    max_attempts = _int_field(body, "max_attempts", attempts_default, 1, MAX_ATTEMPTS, fields)
    timeout = _timeout_field(body, task.timeout if task.timeout is not None
                             else cfg.jobs.timeout, fields)
    run_after = _run_after_field(body, fields)
    notify_url = body.get("notify_url")
    if notify_url is not None:
        problem = notify_url_problem(notify_url, cfg.notify.allowed)
        if problem:
            fields["notify_url"] = problem
    key = body.get("key")
    if key is not None and (not isinstance(key, str) or not 0 < len(key) <= 200):
        fields["key"] = "must be a string of 1 to 200 characters"
    elif key is not None and not is_unicode(key):
        fields["key"] = "must be valid Unicode text (it holds an unpaired surrogate)"
    if items is None:
        raw_items = body.get("items")
        if raw_items is not None and not isinstance(raw_items, (list, ItemsText)):
            fields["items"] = "must be a list of objects, one per item"
            raw_items = None
        items = raw_items
    if fields:
        raise InvalidSubmission(fields)

    params_text, encoded_items = _check_params(cfg, task, params, items, rows, unit)
    body_hash = None if key is None else _body_hash(body, items)
    return NewJob(id=os.urandom(16).hex(), task=task.name, params=params, items=encoded_items,
                  priority=priority, max_attempts=max_attempts, timeout=timeout, key=key,
                  body_hash=body_hash, params_text=params_text, run_after=run_after,
                  submitted_by=submitted_by,
                  notify_url=notify_url or task_notify_url(cfg, task.name))


def _body_hash(body: dict[str, Any], items: Collection[Any] | None) -> str:
    """What tells a replay of an idempotency key from another submission: the SHA-256 of
    the body (with ``items`` from a file in it) as JSON with sorted keys, written an item
    at a time (a big body's items are never all decoded at once)."""
    h = hashlib.sha256()
    canon = dict(body, items=None)
    for n, name in enumerate(sorted(canon)):
        h.update(b"{" if n == 0 else b", ")
        h.update(json.dumps(name).encode() + b": ")
        if name == "items" and items is not None:
            h.update(b"[")
            for k, item in enumerate(items):
                if k:
                    h.update(b", ")
                h.update(json.dumps(item, sort_keys=True, default=str).encode())
            h.update(b"]")
        else:
            h.update(json.dumps(canon[name], sort_keys=True, default=str).encode())
    h.update(b"}")
    return h.hexdigest()


def _check_params(cfg: Config, task: Task, params: dict[str, Any],
                  items: Collection[Any] | None, rows: Sequence[int] | None,
                  unit: str = "row") -> tuple[str, list[str | None]]:
    """Check job params and every item; return the params' JSON and the items' overlays."""
    max_size = cfg.jobs.max_param_size
    text = _strict_dumps(params)
    if text is not None and len(text) > max_size:
        raise InvalidSubmission({"params": f"more than jobs.max_param_size ({max_size} "
                                           "bytes) of JSON"})
    if items is not None and not items:
        raise InvalidSubmission({"items": "is empty; give at least one item, or "
                                          "leave items out for a single call"})
    if items and len(items) > cfg.jobs.max_items:
        raise InvalidSubmission({"items": f"{len(items)} items is more than "
                                          f"jobs.max_items ({cfg.jobs.max_items})"})
    # Job-level params of a bulk may leave required params to the items.
    problems = task.check(params, complete=not items)
    if problems:
        raise InvalidSubmission(problems)
    if text is None:
        raise InvalidSubmission({"params": _NOT_FINITE})
    bad_text = _surrogates(params, text, "params")
    if bad_text:
        raise InvalidSubmission(bad_text)
    if not items:
        return text, [None]
    out: list[str | None] = []
    bad: dict[str, str] = {}
    first: int | None = None
    # Fields of a body's items are JSON paths (items[1].n); a file's are where the item
    # is in the file and its index (row 3 (item 1), n), as itemfiles names them.
    sep = "." if rows is None else ", "
    for i, item in enumerate(items):
        label = f"items[{i}]" if rows is None else location(unit, rows[i], i)
        if not isinstance(item, dict):
            bad[label] = "must be an object of param names to values"
        else:
            bad.update(task.check(item, prefix=label, given=params, sep=sep))
            if not bad:
                item_text = _strict_dumps(item) if item else None
                if item and item_text is None:
                    bad[label] = _NOT_FINITE
                elif item_text is not None and len(item_text) > max_size:
                    bad[label] = f"more than jobs.max_param_size ({max_size} bytes) of JSON"
                elif item_text is not None:
                    bad.update(_surrogates(item, item_text, label,
                                           ": " if rows is None else sep))
                out.append(item_text)
        if bad and first is None:
            first = i
        if len(bad) >= _MAX_ITEM_ERRORS:
            break
    if bad:
        if rows is not None and unit != "item" and first is not None:
            raise InvalidSubmission(bad, row=rows[first], index=first)
        raise InvalidSubmission(bad, index=first)
    return text, out


def _not_json(value: Any) -> Any:
    raise TypeError(f"Object of type {type(value).__name__} is not JSON serializable")


#: json's C encoder, made once: ``json.dumps`` makes one for every call, which costs more
#: than encoding a small item. ASCII, json.dumps' separators, NaN and Infinity refused.
_C_ENCODER = getattr(json.encoder, "c_make_encoder", None)  # not in typeshed
_ENCODE: Callable[[Any, int], list[str]] | None = (
    _C_ENCODER(None, _not_json, json.encoder.encode_basestring_ascii, None, ": ", ", ",
               False, False, False) if _C_ENCODER is not None else None)


def _strict_dumps(value: Any) -> str | None:
    """``value`` as JSON text (as ``json.dumps`` writes it), or None when it holds NaN or
    Infinity (which Python's json reads from a request but which no JSON answer could
    carry back)."""
    try:
        if _ENCODE is not None:
            return "".join(_ENCODE(value, 0))
        return json.dumps(value, allow_nan=False)
    except ValueError:
        return None


def _surrogates(value: dict[str, Any], text: str, prefix: str,
                sep: str = ": ") -> dict[str, str]:
    """The fields of ``value`` whose names or strings hold an unpaired surrogate.

    ``text`` is ``value`` as ASCII JSON, where every surrogate shows as a ``\\udXXX``
    escape, so the common case costs one substring search.
    """
    if "\\ud" not in text:
        return {}
    return {f"{prefix}.{k}" if prefix == "params" else f"{prefix}{sep}{k}": _SURROGATE
            for k, v in value.items() if not is_unicode(k) or _holds_surrogate(v)}


def _holds_surrogate(v: Any) -> bool:
    if isinstance(v, str):
        return not is_unicode(v)
    if isinstance(v, dict):
        return any(not is_unicode(k) or _holds_surrogate(x) for k, x in v.items())
    if isinstance(v, list):
        return any(_holds_surrogate(x) for x in v)
    return False


def is_unicode(text: str) -> bool:
    """False when ``text`` holds an unpaired surrogate (it has no UTF-8 form)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _int_field(body: dict[str, Any], name: str, default: int, lo: int, hi: int,
               fields: dict[str, str]) -> int:
    v = body.get(name, default)
    if v is None:
        return default
    if not isinstance(v, int) or isinstance(v, bool) or not lo <= v <= hi:
        fields[name] = f"must be a whole number from {lo} to {hi}"
        return default
    return v


def _timeout_field(body: dict[str, Any], default: float, fields: dict[str, str]) -> float:
    v = body.get("timeout", default)
    if v is None:
        return default
    if (not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v)
            or not 0 <= v <= 366 * 86400):
        fields["timeout"] = "must be a number of seconds, 0 for none"
        return default
    return float(v)


def _run_after_field(body: dict[str, Any], fields: dict[str, str]) -> float | None:
    """When the job may start (Unix seconds) from ``delay`` (seconds from now) or
    ``run_after`` (ISO 8601 with a zone); None for at once."""
    delay, at = body.get("delay"), body.get("run_after")
    if delay is not None and at is not None:
        fields["delay"] = fields["run_after"] = "give delay or run_after, not both"
        return None
    if delay is not None:
        if (not isinstance(delay, (int, float)) or isinstance(delay, bool)
                or not math.isfinite(delay) or not 0 <= delay <= MAX_DELAY):
            fields["delay"] = f"must be a number of seconds from 0 to {MAX_DELAY} (a year)"
            return None
        return time.time() + float(delay) if delay else None
    if at is None:
        return None
    when = None
    if isinstance(at, str) and len(at) <= 64:
        try:
            when = datetime.fromisoformat(at.strip())
        except ValueError:
            pass
    if when is None:
        fields["run_after"] = ('must be an ISO 8601 time with a zone, like '
                               '"2026-12-02T03:00:00Z" or "2026-12-02T04:00:00+01:00"')
        return None
    if when.tzinfo is None or when.utcoffset() is None:
        fields["run_after"] = (f"{at!r} has no time zone; add one, like "
                               f'"{at.strip()}Z" for UTC or "{at.strip()}+01:00"')
        return None
    ts = when.timestamp()
    if ts > time.time() + MAX_DELAY:
        fields["run_after"] = "is more than a year away"
        return None
    return ts


def form_to_body(form: Mapping[str, str]) -> dict[str, Any]:
    """A submission body from multipart form fields (``params`` is JSON text)."""
    body: dict[str, Any] = {}
    fields: dict[str, str] = {}
    for name, value in form.items():
        if name not in SUBMIT_KEYS or name == "items":
            takes = ", ".join(k for k in SUBMIT_KEYS if k != "items")
            fields[name] = ("unknown form field; a multipart submission takes the file "
                            f"'items' and the fields {takes}")
            continue
        if value == "":
            continue
        if name == "params":
            try:
                body[name] = json.loads(value)
            except (ValueError, RecursionError):
                fields[name] = "must be a JSON object"
        elif name in ("priority", "max_attempts"):
            try:
                body[name] = int(value)
            except ValueError:
                fields[name] = "must be a whole number"
        elif name in ("timeout", "delay"):
            try:
                body[name] = float(value)
            except ValueError:
                fields[name] = "must be a number of seconds"
        else:
            body[name] = value
    if fields:
        raise InvalidSubmission(fields)
    return body
