"""The page's login sessions: kept on the server, named by a random id in a cookie.

An API token (``server.token`` or any named token) is typed once at ``/login``. The server
then makes a session, a random id (``secrets.token_urlsafe(32)``) in a table in memory, and
the browser holds only that id in an HttpOnly, SameSite=Strict cookie, so the token never
reaches the HTML or JavaScript. The session acts as its token: the same name and role. It
ends at logout (its row is deleted: the old cookie is refused from then on), after
:data:`SESSION_SECONDS` from login, after :data:`IDLE_SECONDS` without a request, when its
token is no longer configured (changed or removed), or when the server restarts (the table
is not saved: everyone logs in again). The table holds at most :data:`MAX_SESSIONS`; past
that the least recently used session is dropped.

The CSRF token is a MAC over a random nonce of the session: the page gets it in a
``<meta>`` tag and sends it back in ``X-CSRF-Token`` on every state-changing request.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TypeVar

from flask import Flask, Request, current_app

from bulkrunner.config import ServerConfig, TokenConfig
from bulkrunner.config.tokens import digest, token_digests, token_required

COOKIE = "bulkrunner_session"
CSRF_HEADER = "X-CSRF-Token"
SESSION_SECONDS = 7 * 24 * 3600  # absolute lifetime, counted from login
IDLE_SECONDS = 12 * 3600         # a session unused this long ends (an open page polls)
MAX_SESSIONS = 10_000
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
EXTENSION = "bulkrunner.server.web"
_MAX_COOKIE = 200  # an id is 43 characters; anything much longer is not one of ours
T = TypeVar("T")


@dataclass
class _Session:
    created: float
    last_seen: float
    nonce: str    # random; the CSRF token is a MAC over it
    token: bytes  # SHA-256 of the token it was made for


class Sessions:
    """The server-side table of page sessions (one per app), and their CSRF tokens.

    ``clock`` gives the current time in seconds (monotonic by default; tests pass a fake
    one), and every method also takes an explicit ``now``. Safe to use from many threads.
    """

    def __init__(self, *, clock: Callable[[], float] = time.monotonic,
                 lifetime: float = SESSION_SECONDS, idle: float = IDLE_SECONDS,
                 limit: int = MAX_SESSIONS, secret: bytes | None = None) -> None:
        self._clock = clock
        self._lifetime = lifetime
        self._idle = idle
        self._limit = max(1, limit)
        self._secret = secret or secrets.token_bytes(32)
        self._lock = threading.Lock()
        # Keyed by the SHA-256 of the id (the table never holds an id a cookie could carry),
        # least recently used first.
        self._table: OrderedDict[bytes, _Session] = OrderedDict()

    def __len__(self) -> int:
        with self._lock:
            return len(self._table)

    def issue(self, token: str, now: float | None = None) -> str:
        """Start a session for a user who gave ``token``; return its id (the cookie value)."""
        now = self._now(now)
        sid = secrets.token_urlsafe(32)
        entry = _Session(created=now, last_seen=now, nonce=secrets.token_urlsafe(18),
                         token=_digest(token))
        with self._lock:
            while self._table and (len(self._table) >= self._limit
                                   or self._expired(next(iter(self._table.values())), now)):
                self._table.popitem(last=False)  # the least recently used, or a dead one
            self._table[_key(sid)] = entry
        return sid

    def check(self, cookie: str, token: str, now: float | None = None) -> str | None:
        """The session's nonce when ``cookie`` names a live session made for ``token``.

        A session that has expired, or was made for another token, is deleted. A live one
        counts as used now (for the idle timeout).
        """
        found = self.lookup(cookie, {_digest(token): None}, now)
        return found[0] if found is not None else None

    def lookup(self, cookie: str, known: Mapping[bytes, T], now: float | None = None
               ) -> tuple[str, T] | None:
        """The nonce of the live session ``cookie`` names and what ``known`` (the SHA-256
        of each configured token, to anything) holds for the session's token.

        A session that has expired, or whose token is not in ``known`` (no longer
        configured), is deleted. A live one counts as used now (for the idle timeout).
        """
        key = _cookie_key(cookie)
        if key is None:
            return None
        now = self._now(now)
        with self._lock:
            entry = self._table.get(key)
            if entry is None:
                return None
            if self._expired(entry, now) or entry.token not in known:
                del self._table[key]
                return None
            entry.last_seen = max(entry.last_seen, now)
            self._table.move_to_end(key)
            return entry.nonce, known[entry.token]

    def end(self, cookie: str) -> bool:
        """Delete the session ``cookie`` names (logout); False when there was none."""
        key = _cookie_key(cookie)
        if key is None:
            return False
        with self._lock:
            return self._table.pop(key, None) is not None

    def csrf(self, nonce: str) -> str:
        """The CSRF token that goes with the session ``nonce``."""
        return hmac.new(self._secret, f"csrf:{nonce}".encode(), hashlib.sha256).hexdigest()

    def _now(self, now: float | None) -> float:
        return self._clock() if now is None else now

    def _expired(self, entry: _Session, now: float) -> bool:
        return now - entry.created > self._lifetime or now - entry.last_seen > self._idle


def _key(sid: str) -> bytes:
    return hashlib.sha256(sid.encode()).digest()


def _cookie_key(cookie: str) -> bytes | None:
    if not cookie or len(cookie) > _MAX_COOKIE or not cookie.isascii():
        return None
    return _key(cookie)


def _digest(token: str) -> bytes:
    # A session remembers its token's hash, so a session made for one token dies with it.
    return digest(token)


def _server() -> ServerConfig:
    server: ServerConfig = current_app.extensions["bulkrunner"].cfg.server
    return server


def configured_token() -> str:
    """The admin token (``server.token``) of the running app ("" when none is set)."""
    return _server().token


def auth_required() -> bool:
    """True when the running app has any token configured (then the page needs a login)."""
    return token_required(_server())


def find_token(given: str) -> TokenConfig | None:
    """The configured token ``given`` is, or None: compared in constant time with every
    token (by their SHA-256), so how long it takes tells nothing of which one matched."""
    given_digest = digest(given)
    found = None
    for known, token in token_digests(_server()):
        if hmac.compare_digest(known, given_digest):  # no break: the same work for all
            found = token
    return found


def sessions() -> Sessions | None:
    """The current app's :class:`Sessions` (None when the page is not registered)."""
    found: Sessions | None = current_app.extensions.get(EXTENSION)
    if found is None:  # an embedding app's mount keeps its sessions itself
        found = getattr(current_app.extensions.get("bulkrunner"), "sessions", None)
    return found


def session_nonce(request: Request) -> str | None:
    """The nonce of the request's live session, else None."""
    found = _session(request)
    return found[0] if found is not None else None


def session_token(request: Request) -> TokenConfig | None:
    """The token (name and role) the request's live session was made with, else None."""
    found = _session(request)
    return found[1] if found is not None else None


def _session(request: Request) -> tuple[str, TokenConfig] | None:
    store, cookie = sessions(), request.cookies.get(COOKIE)
    if store is None or not cookie or not auth_required():
        return None
    return store.lookup(cookie, dict(token_digests(_server())))


def end_session(request: Request) -> None:
    """Delete the session of the request's cookie, if any (logout)."""
    store, cookie = sessions(), request.cookies.get(COOKIE)
    if store is not None and cookie:
        store.end(cookie)


def session_auth(request: Request, *, form: bool = False) -> TokenConfig | None:
    """The token a page session cookie authenticates ``request`` as, else None.

    A safe method (GET, HEAD, OPTIONS) needs only the cookie; any other method also needs
    the session's CSRF token, in the ``X-CSRF-Token`` header (the page's JavaScript) or,
    with ``form``, in a ``csrf_token`` form field (the page's own forms).
    """
    found = _session(request)
    if found is None:
        return None
    nonce, token = found
    if request.method in SAFE_METHODS:
        return token
    store = sessions()
    assert store is not None  # _session found it
    given = request.headers.get(CSRF_HEADER, "")
    if not given and form:
        given = request.form.get("csrf_token", "")
    expected = store.csrf(nonce)
    return token if hmac.compare_digest(given.encode(), expected.encode()) else None


def install(app: Flask, store: Sessions | None = None) -> None:
    """Give ``app`` its own session table (a fresh, empty one unless ``store`` is given)."""
    app.extensions[EXTENSION] = store if store is not None else Sessions()
