"""Who may ask: the Host and Origin guards, and the token check of the API.

Bound to loopback, the server answers only requests addressed to a loopback name (or a
reverse proxy's name in ``server.allowed_hosts``); state-changing requests from another
origin are refused; and with a token configured, every route but ``/healthz`` needs it
(the web page's own session stands in for it there).
"""

from __future__ import annotations

import hmac

from flask import Flask, Response, current_app, request

from bulkrunner.config import host_is_loopback
from bulkrunner.server import web
from bulkrunner.server.http import error_response
from bulkrunner.server.service import Service


def init_app(app: Flask) -> None:
    """Check every request of ``app``: host and origin first, then the token."""
    app.before_request(_guard_host_and_origin)
    app.before_request(_authenticate)


def _service() -> Service:
    svc: Service = current_app.extensions["bulkrunner"]
    return svc


_UNSAFE_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})


def _guard_host_and_origin() -> Response | None:
    """Refuse DNS-rebinding and cross-site requests.

    Bound to loopback, the server answers only requests addressed to a loopback name: a
    foreign page whose host name was re-pointed at 127.0.0.1 still sends its own Host. And a
    state-changing request from another origin (a foreign page posting a form, which needs
    no CORS preflight) is refused by its Origin / Sec-Fetch-Site headers, which browsers set
    and pages cannot forge.
    """
    server = _service().cfg.server
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


def _authenticate() -> Response | None:
    token = _service().cfg.server.token
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
