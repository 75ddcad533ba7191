"""The web page at ``GET /``: a form for every task, live progress, results to download.

``register(app)`` adds the blueprint named ``"web"`` (pages, plus static files under
``/assets``) to the app. ``session_auth(request)`` lets the API accept the page's session
cookie in place of a Bearer token (see :mod:`bulkrunner.server.web.auth`).
"""

from __future__ import annotations

from flask import Flask

from bulkrunner.server.web.auth import install, session_auth
from bulkrunner.server.web.views import bp


def register(app: Flask) -> None:
    """Serve the web page from ``app``, with a session table of its own."""
    install(app)
    app.register_blueprint(bp)


__all__ = ["register", "session_auth"]
