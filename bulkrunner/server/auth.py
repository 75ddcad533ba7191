"""Who may ask, and what: the Host and Origin guards, the token check, and the roles.

Bound to loopback, the server answers only requests addressed to a loopback name (or a
reverse proxy's name in ``server.allowed_hosts``); state-changing requests from another
origin are refused. With any token configured (``server.token``, the admin token named
``"admin"``, or ``[[server.tokens]]``), every route but ``/healthz`` needs one (the web
page's session stands in for it there), and the token's role must be the one
:data:`ROUTE_ROLES` gives the route:

- ``read``: every GET (jobs, items, logs, results, tasks, schedules, metrics, the page);
- ``submit``: read, submit, and cancel / retry / pause / resume the jobs it submitted;
- ``admin``: everything (other tokens' jobs, task pause and resume, prune).

A refusal is 403 ``insufficient_role`` with the role held and needed in ``details``. With
no token configured the server is open: every request may do everything and jobs are
submitted by nobody (``submitted_by`` null).

Behind a reverse proxy (``server.trusted_proxies = N``), werkzeug's ``ProxyFix`` takes the
client address, scheme and host from the last N hops of ``X-Forwarded-For``, ``-Proto`` and
``-Host``, so the Host check sees the public name and the session cookie is Secure when
the browser used HTTPS.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from flask import Blueprint, Flask, Response, current_app, g, request
from werkzeug.middleware.proxy_fix import ProxyFix

from bulkrunner.config import ROLES, host_is_loopback
from bulkrunner.config.tokens import token_required
from bulkrunner.server.http import error_response, local_name, page_request
from bulkrunner.server.service import Service, service_of
from bulkrunner.server.web.auth import find_token, session_auth

READ, SUBMIT, ADMIN = ROLES
_RANK = {role: i for i, role in enumerate(ROLES)}


@dataclass(frozen=True)
class Principal:
    """Who a request comes from: a token's ``name`` and ``role`` (``name`` None when no
    token is configured: the open server, where every request may do everything)."""

    name: str | None
    role: str

    def has(self, role: str) -> bool:
        """True when this role is ``role`` or above it."""
        return _RANK[self.role] >= _RANK[role]


OPEN = Principal(None, ADMIN)


@dataclass(frozen=True)
class Need:
    """What a route needs: a role, or nothing (``role`` None: public). ``own_job``: a
    ``submit`` token may do it to a job it submitted itself; other jobs need ``admin``."""

    role: str | None
    own_job: bool = False


PUBLIC = Need(None)
_OWN = Need(SUBMIT, own_job=True)

#: The role each route (by Flask endpoint) needs: the one place roles are decided. A
#: route missing here needs ``admin`` (refused to every other role) until it is added.
ROUTE_ROLES: dict[str, Need] = {
    # The JSON API.
    "api.submit": Need(SUBMIT),
    "api.list_jobs": Need(READ),
    "api.get_job": Need(READ),
    "api.cancel_job": _OWN,
    "api.retry_job": _OWN,
    "api.pause_job": _OWN,
    "api.resume_job": _OWN,
    "api.job_pace": Need(READ),
    "api.list_items": Need(READ),
    "api.results": Need(READ),
    "api.item_log": Need(READ),
    "api.list_tasks": Need(READ),
    "api.pause_task": Need(ADMIN),
    "api.resume_task": Need(ADMIN),
    "api.list_schedules": Need(READ),
    "api.prune": Need(ADMIN),
    "healthz": PUBLIC,
    "metrics": Need(READ),
    "openapi": Need(READ),
    "static": Need(READ),  # Flask's own static route (the app has no files there)
    # The web page (its own writes go through the API above).
    "web.static": PUBLIC,
    "web.login": PUBLIC,
    "web.logout": Need(READ),
    "web.jobs": Need(READ),
    "web.tasks": Need(READ),
    "web.task": Need(READ),
    "web.job": Need(READ),
    "web.schedules": Need(READ),
}
_UNDECLARED = Need(ADMIN)


def need_of(endpoint: str) -> Need:
    """What the route ``endpoint`` needs (``admin`` for one :data:`ROUTE_ROLES` lacks)."""
    return ROUTE_ROLES.get(local_name(endpoint) or endpoint, _UNDECLARED)


def init_app(app: Flask, mount: Blueprint | None = None) -> None:
    """Check every request of ``app``: host and origin first, then the token and its role;
    behind ``server.trusted_proxies`` proxies, read their ``X-Forwarded-*`` headers first.

    With ``mount`` (an embedding app's blueprint of the server's routes) only the requests
    of those routes are checked, for origin, token and role: the host names it answers
    and the proxies in front of it are the embedding app's to decide.
    """
    if mount is not None:
        mount.before_request(_guard_origin)
        mount.before_request(_authorize)
        mount.context_processor(lambda: {"principal": principal, "may": may})
        return
    hops = _service(app).cfg.server.trusted_proxies
    if hops:
        app.wsgi_app = ProxyFix(  # type: ignore[method-assign]
            app.wsgi_app, x_for=hops, x_proto=hops, x_host=hops)
    app.before_request(_guard_host_and_origin)
    app.before_request(_authorize)
    app.add_template_global(principal, "principal")
    app.add_template_global(may, "may")


def _service(app: Flask | None = None) -> Service:
    return service_of((app or current_app).extensions["bulkrunner"])


_UNSAFE_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})


def _guard_host_and_origin() -> Response | None:
    """Refuse DNS-rebinding and cross-site requests.

    Bound to loopback, the server answers only requests addressed to a loopback name: a
    foreign page whose host name was re-pointed at 127.0.0.1 still sends its own Host. And a
    state-changing request from another origin (a foreign page posting a form, which needs
    no CORS preflight) is refused by its Origin / Sec-Fetch-Site headers, which browsers set
    and pages cannot forge. Behind trusted proxies the host is the public one they forward.
    """
    server = _service().cfg.server
    if server.is_loopback:
        host = _hostname(request.host)
        if not host_is_loopback(host) and host.lower() not in server.allowed_hosts:
            return error_response("forbidden_host", f"this server listens on loopback and "
                                  f"answers only requests for localhost or 127.0.0.1, not "
                                  f"{host[:100]!r} (a guard against DNS rebinding; a "
                                  "reverse proxy's name goes in server.allowed_hosts)", 403)
    return _guard_origin()


def _guard_origin() -> Response | None:
    """Refuse a state-changing request from another origin (see above)."""
    server = _service().cfg.server
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


def principal() -> Principal | None:
    """Who the current request comes from (None: a page request not logged in yet, or a
    public route)."""
    found: Principal | None = g.get("bulkrunner_principal")
    return found


def submitter() -> str | None:
    """The name a job submitted by the current request is recorded under (None when the
    server is open)."""
    who = principal()
    return who.name if who is not None else None


def may(role: str, job: dict[str, Any] | None = None) -> bool:
    """True when the current request's token may do what needs ``role`` (to ``job``, a job
    as the API shows it: a ``submit`` token only to the jobs it submitted). For the page,
    which shows only the buttons its user may use; the routes check for themselves."""
    who = principal()
    if who is None or not who.has(role):
        return False
    if job is not None and role == SUBMIT and not who.has(ADMIN):
        return who.name is not None and job.get("submitted_by") == who.name
    return True


def _authorize() -> Response | None:
    """Find who the request comes from, then check the role its route needs."""
    if not token_required(_service().cfg.server):
        g.bulkrunner_principal = OPEN
        return None
    endpoint = request.endpoint
    need = need_of(endpoint) if endpoint is not None else None
    if need is not None and need.role is None:
        return None  # public: /healthz, the login page, static files
    who = _authenticate()
    if who is None:
        if page_request():
            return None  # the page sends whoever is not logged in to the login form
        return error_response("unauthorized", "missing or wrong token: send "
                              "'Authorization: Bearer <token>' (the CLI reads --token or "
                              "$BULKRUNNER_TOKEN)", 401, headers={"WWW-Authenticate": "Bearer"})
    g.bulkrunner_principal = who
    if need is None:
        return None  # no such route: Flask answers 404 or 405
    return _check_role(who, need)


def _authenticate() -> Principal | None:
    """The principal of the request's Bearer token, else of its page session, else None.
    Tokens are compared in constant time and never logged."""
    given = request.headers.get("Authorization", "")
    if given:
        scheme, _, value = given.partition(" ")
        token = find_token(value.strip()) if scheme.lower() == "bearer" else None
    else:
        token = session_auth(request, form=page_request())
    return Principal(token.name, token.role) if token is not None else None


def _check_role(who: Principal, need: Need) -> Response | None:
    assert need.role is not None
    if not who.has(need.role):
        return _refuse(who, need.role, f"this needs a token with the {need.role} role; "
                       f"the token {who.name!r} has the {who.role} role")
    if need.own_job and not who.has(ADMIN):
        ident = (request.view_args or {}).get("ident", "")
        job = _service().get(str(ident))  # NotFound and AmbiguousId answer as usual
        if job.submitted_by != who.name:
            by = repr(job.submitted_by) if job.submitted_by else "no token"
            return _refuse(who, ADMIN, f"a {who.role} token may act only on the jobs it "
                           f"submitted; job {job.id[:8]} was submitted by {by}, so this "
                           f"needs the {ADMIN} role")
    return None


def _refuse(who: Principal, needed: str, message: str) -> Response:
    return error_response("insufficient_role", message, 403,
                          {"role": who.role, "needed": needed})
