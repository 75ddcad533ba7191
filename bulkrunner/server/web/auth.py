"""The page's login session: a signed cookie, and a CSRF token derived from it.

The API token is typed once at ``/login``. The browser then holds only a session cookie,
``<nonce>.<expiry>.<mac>``, signed with a random secret made when the app is built, so the
token never reaches the HTML or JavaScript and a restart ends every session. The CSRF token
is a second MAC over the nonce: the page gets it in a ``<meta>`` tag and sends it back in
``X-CSRF-Token`` on every state-changing request.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time

from flask import Flask, Request, current_app

COOKIE = "bulkrunner_session"
CSRF_HEADER = "X-CSRF-Token"
SESSION_SECONDS = 7 * 24 * 3600
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
EXTENSION = "bulkrunner.server.web"


class Sessions:
    """Issues and checks session cookies and CSRF tokens with one secret."""

    def __init__(self, secret: bytes | None = None) -> None:
        self._secret = secret or secrets.token_bytes(32)

    def _mac(self, purpose: str, text: str) -> str:
        return hmac.new(self._secret, f"{purpose}:{text}".encode(), hashlib.sha256).hexdigest()

    def issue(self, token: str, now: float | None = None) -> str:
        """A new cookie value for a user who gave ``token``."""
        expires = int(now if now is not None else time.time()) + SESSION_SECONDS
        payload = f"{secrets.token_urlsafe(18)}.{expires}"
        return f"{payload}.{self._mac('session', payload + '.' + _digest(token))}"

    def check(self, cookie: str, token: str, now: float | None = None) -> str | None:
        """The session's nonce when ``cookie`` is genuine, unexpired and made for ``token``."""
        nonce, _, rest = cookie.partition(".")
        expiry, _, mac = rest.partition(".")
        if not (nonce and expiry.isdigit() and mac):
            return None
        want = self._mac("session", f"{nonce}.{expiry}.{_digest(token)}")
        if not hmac.compare_digest(mac.encode(), want.encode()):
            return None
        if int(expiry) < (now if now is not None else time.time()):
            return None
        return nonce

    def csrf(self, nonce: str) -> str:
        """The CSRF token that goes with the session ``nonce``."""
        return self._mac("csrf", nonce)


def _digest(token: str) -> str:
    # The MAC covers the token's hash, so a session made for one token dies with it.
    return hashlib.sha256(token.encode()).hexdigest()


def configured_token() -> str:
    """The API token of the running app ("" when none is configured)."""
    token: str = current_app.extensions["bulkrunner"].cfg.server.token
    return token


def sessions() -> Sessions | None:
    """The current app's :class:`Sessions` (None when the page is not registered)."""
    found: Sessions | None = current_app.extensions.get(EXTENSION)
    return found


def session_nonce(request: Request) -> str | None:
    """The nonce of the request's valid session cookie, else None."""
    token, store = configured_token(), sessions()
    cookie = request.cookies.get(COOKIE)
    if not token or store is None or not cookie:
        return None
    return store.check(cookie, token)


def session_auth(request: Request) -> bool:
    """True when ``request`` is authenticated by a page session cookie.

    A safe method (GET, HEAD, OPTIONS) needs only the cookie; any other method also needs
    the session's CSRF token in the ``X-CSRF-Token`` header.
    """
    nonce = session_nonce(request)
    if nonce is None:
        return False
    if request.method in SAFE_METHODS:
        return True
    store = sessions()
    assert store is not None  # session_nonce found it
    given = request.headers.get(CSRF_HEADER, "")
    return hmac.compare_digest(given.encode(), store.csrf(nonce).encode())


def install(app: Flask) -> None:
    """Give ``app`` a fresh session secret."""
    app.extensions[EXTENSION] = Sessions()
