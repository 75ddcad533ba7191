"""The page's routes: jobs list, task forms, job page, login.

Pages are rendered on the server from the service; the JavaScript in ``static/`` then keeps
them current by polling the JSON API, and submits, cancels and retries through it.
"""

from __future__ import annotations

import hmac
import json
import re
import weakref
from typing import Any
from urllib.parse import urlsplit

from flask import Blueprint, current_app, redirect, request, url_for
from jinja2 import Environment
from markupsafe import Markup, escape
from werkzeug.wrappers import Response as BaseResponse

from bulkrunner import __version__, errors
from bulkrunner.models import STATES, attempts_text
from bulkrunner.runtime import safe_text
from bulkrunner.server.http import local_name
from bulkrunner.server.service import Service, service_of
from bulkrunner.server.web.auth import (
    COOKIE,
    SESSION_SECONDS,
    auth_required,
    end_session,
    find_token,
    session_nonce,
    sessions,
)
from bulkrunner.server.web.fields import form_fields
from bulkrunner.server.web.schedules import rows as schedule_rows

bp = Blueprint("web", __name__, template_folder="templates", static_folder="static",
               static_url_path="/assets")

JOBS_PAGE = 20
ITEMS_PAGE = 50
#: Items a page on a phone's narrow screen (the page asks for these many there).
ITEMS_PAGE_NARROW = 20
_PUBLIC = frozenset({"web.login", "web.static"})


def _service() -> Service:
    return service_of(current_app.extensions["bulkrunner"])


#: For each app's Jinja environment, one that loads templates from this blueprint only.
_PAGE_ENVS: weakref.WeakKeyDictionary[Environment, Environment] = weakref.WeakKeyDictionary()


def render_template(name: str, **context: Any) -> str:
    """Render one of the page's templates, found in this blueprint's folder only: in an
    embedding app, the app's own templates of the same names (``base.html``) would come
    first, and Jinja would cache whichever it found first for both."""
    app = current_app._get_current_object()  # type: ignore[attr-defined]
    env = _PAGE_ENVS.get(app.jinja_env)
    if env is None:
        env = _PAGE_ENVS[app.jinja_env] = app.jinja_env.overlay(loader=bp.jinja_loader)
    app.update_template_context(context)
    return env.get_template(name).render(context)


# ------------------------------------------------------------------ session
@bp.before_request
def _require_session() -> BaseResponse | None:
    if local_name(request.endpoint) in _PUBLIC or not auth_required():
        return None
    if session_nonce(request) is not None:
        return None
    return redirect(url_for(".login", next=_local_path()))


@bp.app_template_global()
def csrf_token() -> str:
    """The CSRF token of the current session ("" without a token or a session)."""
    store = sessions()
    nonce = session_nonce(request) if store is not None else None
    return store.csrf(nonce) if store is not None and nonce is not None else ""


@bp.context_processor
def _globals() -> dict[str, Any]:
    # Templates name pages "web.jobs"; mounted in an embedding app they are
    # "bulkrunner.web.jobs", so names are taken relative to this blueprint. ``root`` is
    # where the page lives ("" standalone, "/bulkrunner" mounted), for its scripts.
    return {"token_required": auth_required(), "version": __version__,
            "states": STATES, "url_for": _page_url_for,
            "root": url_for(".jobs").rstrip("/")}


def _page_url_for(endpoint: str, **values: Any) -> str:
    return url_for("." + endpoint[4:] if endpoint.startswith("web.") else endpoint, **values)


def _local_path(raw: str | None = None) -> str:
    """A same-site path to return to after login (never another host)."""
    path = request.full_path.rstrip("?") if raw is None else raw
    # Browsers drop tabs and newlines from URLs ("/\t/evil.com" becomes "//evil.com"), and
    # a newline in a Location header is an error: refuse anything but a plain local path.
    parts = urlsplit(path)
    if (not path.startswith("/") or path.startswith("//") or "\\" in path
            or any(ch.isspace() or ord(ch) < 32 or ord(ch) == 127 for ch in path)
            or parts.scheme or parts.netloc):
        return url_for(".jobs")
    return path


# ------------------------------------------------------------------ login
@bp.route("/login", methods=["GET", "POST"])
def login() -> BaseResponse | str | tuple[str, int]:
    """Ask for an API token once; on a configured one, set the session cookie (the
    session then has that token's name and role)."""
    target = _local_path(request.values.get("next") or url_for(".jobs"))
    if not auth_required() or session_nonce(request) is not None:
        return redirect(target)
    if request.method == "GET":
        return render_template("login.html", next=target, error=None)
    given = request.form.get("token", "").strip()
    store = sessions()
    token = find_token(given) if given else None
    if store is None or token is None:
        return render_template("login.html", next=target,
                               error="That token is not right. Check it and try again."), 401
    # The cookie carries only the session's random id; the session itself is on the server.
    resp = redirect(target)
    resp.set_cookie(COOKIE, store.issue(token.token), max_age=SESSION_SECONDS, path="/",
                    httponly=True, samesite="Strict", secure=_https())
    return resp


@bp.post("/logout")
def logout() -> BaseResponse:
    """End the session on the server and drop its cookie (the form carries the CSRF token).

    The session's row is deleted, so a copy of the cookie is refused from then on.
    """
    resp = redirect(url_for(".login"))
    store, nonce = sessions(), session_nonce(request)
    given = request.form.get("csrf_token", "")
    if store is not None and nonce is not None and hmac.compare_digest(
            given.encode(), store.csrf(nonce).encode()):
        end_session(request)
        resp.delete_cookie(COOKIE, path="/", httponly=True, samesite="Strict",
                           secure=_https())
    return resp


def _https() -> bool:
    """True when the browser's request was https: directly, or through the TLS proxies of
    ``server.trusted_proxies``, whose ``X-Forwarded-Proto`` has set the request's scheme."""
    return request.is_secure


# ------------------------------------------------------------------ pages
@bp.get("/")
def jobs() -> str:
    """The jobs list, newest first, filtered by state and task."""
    svc = _service()
    state = request.args.get("state", "")
    state = state if state in STATES else ""
    task = request.args.get("task", "")[:200]
    before = _int(request.args.get("before"))
    found, nxt = svc.list_jobs(state=state or None, task=task or None, limit=JOBS_PAGE,
                               before=before)
    names = [t["name"] for t in svc.tasks()]
    return render_template("jobs.html", jobs=[j.to_dict() for j in found], next=nxt,
                           state=state, task=task, before=before, task_names=names,
                           page_size=JOBS_PAGE)


@bp.get("/tasks")
def tasks() -> str:
    """Every registered task, each linking to its form."""
    svc = _service()
    return render_template("tasks.html", tasks=svc.tasks(), default=svc.registry.default)


@bp.get("/schedules")
def schedules() -> str:
    """The schedules: when each fires (in words), its next and latest runs in its zone."""
    return render_template("schedules.html", schedules=schedule_rows(_service().schedules()))


@bp.get("/tasks/<name>")
def task(name: str) -> str | tuple[str, int]:
    """The form that starts a job of task ``name``."""
    spec = next((t for t in _service().tasks() if t["name"] == name), None)
    if spec is None:
        return _error_page(404, "No such task", f"There is no task called {name!r}.")
    return render_template("task.html", task=spec, fields=form_fields(spec["params"]),
                           columns=[p["name"] for p in spec["params"]])


@bp.get("/jobs/<ident>")
def job(ident: str) -> BaseResponse | str | tuple[str, int]:
    """One job: counts, progress, outcome and a page of its items."""
    svc = _service()
    try:
        found = svc.get(ident)
    except errors.NotFound:
        return _error_page(404, "No such job", f"There is no job with id {ident!r}.")
    except errors.AmbiguousId as e:
        return _error_page(409, "Ambiguous id", e.message)
    if found.id != ident:
        query = request.query_string.decode()
        return redirect(url_for(".job", ident=found.id) + (f"?{query}" if query else ""))
    state = request.args.get("state", "")
    state = state if state in STATES else ""
    after = _int(request.args.get("after"), lo=-1)
    items, nxt = svc.items(found.id, state=state or None, limit=ITEMS_PAGE, after=after)
    return render_template("job.html", job=found.to_dict(), items=[i.to_dict() for i in items],
                           next=nxt, state=state, after=after, page_size=ITEMS_PAGE,
                           narrow_page_size=ITEMS_PAGE_NARROW,
                           waiting_words=WAITING_WORDS)


#: Why a job's queued items wait, in words (the job's ``waiting`` field).
WAITING_WORDS = {
    "paused": "Paused: its queued items wait until it is resumed.",
    "task_paused": "Its task is paused: no item of it starts until the task is resumed.",
    "run_after": "Waiting for its start time.",
    "concurrency": "Waiting: its task's concurrency limit is reached.",
    "rate_limit": "Waiting: its task's rate limit is reached.",
}


def _error_page(status: int, title: str, message: str) -> tuple[str, int]:
    return render_template("error.html", title=title, message=message), status


def _int(raw: str | None, lo: int = 0) -> int | None:
    """A cursor from the query string; anything else means the first page."""
    try:
        v = int(raw or "")
    except ValueError:
        return None
    return v if lo <= v < 2**62 else None


# ------------------------------------------------------------------ template filters
@bp.app_template_filter("short_id")
def short_id(job_id: str) -> str:
    """The first 8 characters of an id, as the CLI shows it."""
    return job_id[:8]


@bp.app_template_filter("when")
def when(iso: str | None) -> str:
    """An API timestamp as ``2026-11-24 10:00:00 UTC`` (the page shows local time)."""
    if not iso:
        return "—"
    return iso[:19].replace("T", " ") + " UTC"


@bp.app_template_filter("json_text")
def json_text(value: Any, limit: int = 10_000, indent: int | None = 2) -> str:
    """A value as JSON (strings as they are), cut at ``limit`` characters; text with no
    UTF-8 form (lone surrogates a task returned) is shown escaped."""
    compact = (",", ":") if indent is None else None  # as the page's JSON.stringify does
    text = value if isinstance(value, str) else json.dumps(value, indent=indent,
                                                           separators=compact,
                                                           ensure_ascii=False)
    text = safe_text(text)
    return text if len(text) <= limit else text[:limit] + f"… ({len(text)} characters)"


bp.app_template_filter("attempts_text")(attempts_text)  # "2 (running; 4 in all)"


@bp.app_template_filter("percent")
def percent(fraction: float | None) -> str:
    """0.42 as ``42%``."""
    return f"{int((fraction or 0) * 100)}%"


_CODE_SPAN = re.compile(r"`([^`\n]+)`")


@bp.app_template_filter("code_spans")
def code_spans(text: str | None) -> Markup:
    """Docstring text, escaped, with each `` `x` `` shown as ``<code>x</code>`` (no other
    markup: the rest stays plain text)."""
    raw = safe_text(text or "")
    out: list[str] = []
    last = 0
    for m in _CODE_SPAN.finditer(raw):
        out.append(str(escape(raw[last:m.start()])))
        out.append(f"<code>{escape(m.group(1))}</code>")
        last = m.end()
    out.append(str(escape(raw[last:])))
    return Markup("".join(out))

