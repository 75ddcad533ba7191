"""The Flask app: ``create_app(config)`` is the factory and the test seam.

It wires the concerns, each with its own ``init_app``: the API (:mod:`.api`), the web page
(:mod:`.web`), errors (:mod:`.http`), the host, origin and token guards (:mod:`.auth`),
metrics, and the security headers of every response (set here, once). The running
:class:`Service` lives in ``app.extensions["bulkrunner"]``.
"""

from __future__ import annotations

from flask import Blueprint, Flask, Response, request

from bulkrunner.config import Config, load_config
from bulkrunner.server import api, auth, http, web
from bulkrunner.server.metrics import Metrics
from bulkrunner.server.service import Service
from bulkrunner.server.web.views import bp as web_bp

#: The web page's Content-Security-Policy: nothing but its own scripts and styles.
CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
       "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'; "
       "object-src 'none'")


def create_app(config: Config | None = None, *, service: Service | None = None,
               start: bool = True) -> Flask:
    """Build the app around a new (or the given) service; start its dispatcher."""
    cfg = config or (service.cfg if service else load_config())
    svc = service or Service(cfg)
    app = Flask(__name__)
    app.config["MAX_CONTENT_LENGTH"] = cfg.server.max_body_size
    app.json.sort_keys = False  # type: ignore[attr-defined]
    app.extensions["bulkrunner"] = svc
    api.init_app(app)
    web.register(app)
    # Before the service starts, so its first events are counted.
    app.extensions["bulkrunner_metrics"] = Metrics(svc)
    http.init_app(app)
    auth.init_app(app)
    app.after_request(_security_headers)
    if start and not svc.started:
        svc.start()
    return app


def mount(app: Flask, cfg: Config, url_prefix: str) -> Blueprint:
    """Mount the server's routes in an embedding app (:mod:`bulkrunner.flask`): the API,
    ``/healthz``, ``/metrics``, ``/openapi.json`` and the web page, in one blueprint named
    ``bulkrunner`` under ``url_prefix``. The same blueprints as :func:`create_app`'s, with
    their error answers, guards, body limit and headers applied to these routes only."""
    bp = Blueprint(http.MOUNT, __name__)

    @bp.before_request
    def _limit_body() -> None:
        request.max_content_length = cfg.server.max_body_size

    api.init_app(bp)
    bp.register_blueprint(web_bp)
    http.init_app(bp)
    auth.init_app(app, bp)
    bp.after_request(_security_headers)
    app.register_blueprint(bp, url_prefix=url_prefix or None)
    return bp


_ALWAYS = (("X-Content-Type-Options", "nosniff"), ("X-Frame-Options", "DENY"))
_API = (*_ALWAYS, ("Referrer-Policy", "no-referrer"))
_PAGE = (*_ALWAYS, ("Content-Security-Policy", CSP), ("Referrer-Policy", "same-origin"))


def _security_headers(resp: Response) -> Response:
    h = resp.headers
    web = http.page_request()
    for name, value in _PAGE if web else _API:
        if name not in h:
            h.add(name, value)
    if web and http.local_name(request.endpoint) != "web.static" and "Cache-Control" not in h:
        h.add("Cache-Control", "no-store")  # pages carry the CSRF token
    return resp
