"""The page's sessions live on the server: logout ends them, a copied cookie dies with
them, and they expire, are bounded, and are bound to the configured token.

Everything here goes through the Flask test client (or the :class:`Sessions` table
directly) with an injected clock: nothing sleeps, and nothing needs a browser.
"""

from __future__ import annotations

import dataclasses
import logging
import re
import secrets
from collections.abc import Callable
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient
from werkzeug.test import TestResponse

from bulkrunner.server.web.auth import (
    COOKIE,
    CSRF_HEADER,
    EXTENSION,
    IDLE_SECONDS,
    SESSION_SECONDS,
    Sessions,
)
from tests.conftest import JOBS

TOKEN = "sessions-test-token-9a8b7c6d"
CSRF_META = re.compile(r'<meta name="csrf-token" content="([^"]*)">')


class FakeClock:
    """A clock the test moves by hand."""

    def __init__(self, start: float = 1_000_000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def secured(app_factory: Callable[..., Any]) -> Flask:
    app: Flask = app_factory(server=f'token = "{TOKEN}"')
    return app


def _login(client: FlaskClient, token: str = TOKEN) -> TestResponse:
    resp = client.post("/login", data={"token": token, "next": "/"})
    assert resp.status_code == 302 and resp.headers["Location"] == "/", resp.status_code
    return resp


def _cookie(client: FlaskClient) -> str:
    found = client.get_cookie(COOKIE)
    assert found is not None, "no session cookie was set"
    return found.value


def _csrf(client: FlaskClient) -> str:
    """The CSRF token, read from the page as its JavaScript and logout form do."""
    page = client.get("/")
    assert page.status_code == 200, page.status_code
    found = CSRF_META.search(page.get_data(as_text=True))
    assert found and found.group(1), "the page carries no CSRF token"
    return found.group(1)


def _with_cookie(app: Flask, value: str) -> FlaskClient:
    """Another client (say, another program that read the cookie) holding ``value``."""
    other = app.test_client()
    other.set_cookie(COOKIE, value)
    return other


def _refused(client: FlaskClient, csrf: str = "") -> None:
    """``client``'s cookie neither reads nor writes: API 401, pages back to the login."""
    assert client.get(JOBS).status_code == 401
    headers = {CSRF_HEADER: csrf} if csrf else {}
    submit = client.post(JOBS, json={"task": "noop"}, headers=headers)
    assert submit.status_code == 401, submit.status_code
    page = client.get("/tasks")
    assert page.status_code == 302
    assert page.headers["Location"].startswith("/login?next=/tasks")


# ---------------------------------------------------------------------------- (1) logout
def test_logout_ends_the_session_on_the_server(secured: Flask) -> None:
    # On the old stateless design the cookie was "<nonce>.<expiry>.<mac>", checked only by
    # its MAC and expiry: logout merely asked the browser to forget it, so a copy (read by
    # another program on the machine) kept answering 200 until the expiry a week later.
    # Now the session's row is deleted at logout and the copy names nothing.
    user = secured.test_client()
    _login(user)
    copied = _cookie(user)
    csrf = _csrf(user)
    thief = _with_cookie(secured, copied)
    # While the session lives, the copy is as good as the user's own browser.
    assert thief.get(JOBS).status_code == 200
    job = thief.post(JOBS, json={"task": "slow", "params": {"seconds": 30}},
                     headers={CSRF_HEADER: csrf})
    assert job.status_code == 202, job.get_json()
    job_id = job.get_json()["id"]

    out = user.post("/logout", data={"csrf_token": csrf})
    assert out.status_code == 302 and out.headers["Location"] == "/login"
    assert user.get_cookie(COOKIE) is None, "logout did not drop the cookie"

    _refused(thief, csrf)
    cancel = thief.post(f"{JOBS}/{job_id}/cancel", headers={CSRF_HEADER: csrf})
    assert cancel.status_code == 401
    # The user's browser, had it kept the cookie, is logged out too.
    _refused(_with_cookie(secured, copied))
    login = _with_cookie(secured, copied).get("/login")
    assert login.status_code == 200, "the login page should ask again, not redirect"
    # Cleanup through the token, so the service closes at once.
    secured.test_client().post(f"{JOBS}/{job_id}/cancel",
                               headers={"Authorization": f"Bearer {TOKEN}"})


def test_logout_needs_the_csrf_token_and_ends_only_its_own_session(secured: Flask) -> None:
    first, second = secured.test_client(), secured.test_client()
    _login(first)
    _login(second)
    assert _cookie(first) != _cookie(second)
    # A logout without the form's CSRF token (a forced logout) changes nothing.
    assert first.post("/logout", data={"csrf_token": "nope"}).status_code == 302
    assert first.get(JOBS).status_code == 200
    assert first.post("/logout", data={"csrf_token": _csrf(first)}).status_code == 302
    assert first.get(JOBS).status_code == 401
    assert second.get(JOBS).status_code == 200
    assert len(secured.extensions[EXTENSION]) == 1


# ---------------------------------------------------------------------------- (2) forgeries
def test_a_forged_or_random_cookie_is_refused(secured: Flask,
                                              app_factory: Callable[..., Any]) -> None:
    user = secured.test_client()
    _login(user)
    real = _cookie(user)
    flipped = real[:-1] + ("A" if real[-1] != "A" else "B")
    other_app = app_factory(server=f'token = "{TOKEN}"')
    elsewhere = other_app.test_client()
    _login(elsewhere)
    for forged in (secrets.token_urlsafe(32), flipped, real + "x", real[:-1],
                   f"{secrets.token_urlsafe(18)}.9999999999.{'0' * 64}",  # the old format
                   _cookie(elsewhere),  # another server's session
                   "x" * 3000, "ñ" * 43, TOKEN):
        _refused(_with_cookie(secured, forged))
    assert user.get(JOBS).status_code == 200, "a forgery hurt the real session"


def test_session_ids_are_not_logged(secured: Flask, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    user = secured.test_client()
    _login(user)
    cookie = _cookie(user)
    user.get(JOBS)
    _refused(_with_cookie(secured, cookie + "x"))
    user.post("/logout", data={"csrf_token": _csrf(user)})
    _refused(_with_cookie(secured, cookie))
    assert cookie not in caplog.text and TOKEN not in caplog.text


# ---------------------------------------------------------------------------- (3) expiry
def test_a_session_expires_past_its_lifetime(secured: Flask) -> None:
    clock = FakeClock()
    secured.extensions[EXTENSION] = Sessions(clock=clock)
    user = secured.test_client()
    _login(user)
    start = clock.now
    # Used every few hours (as an open page would be), it lives for the whole lifetime...
    while clock.now + IDLE_SECONDS / 2 < start + SESSION_SECONDS:
        clock.now += IDLE_SECONDS / 2
        assert user.get(JOBS).status_code == 200, clock.now - start
    # ...and not a second longer.
    clock.now = start + SESSION_SECONDS + 1
    _refused(user)
    assert len(secured.extensions[EXTENSION]) == 0, "the expired session was kept"


def test_an_unused_session_expires_after_the_idle_timeout(secured: Flask) -> None:
    clock = FakeClock()
    secured.extensions[EXTENSION] = Sessions(clock=clock)
    user = secured.test_client()
    _login(user)
    clock.now += IDLE_SECONDS - 1
    assert user.get(JOBS).status_code == 200
    clock.now += IDLE_SECONDS + 1
    _refused(user)


def test_the_table_is_bounded_and_drops_the_least_recently_used() -> None:
    table = Sessions(limit=3)
    ids = [table.issue("tok", now=100 + i) for i in range(3)]
    assert table.check(ids[0], "tok", now=110)  # the first is used again
    newest = table.issue("tok", now=111)
    assert len(table) == 3
    assert table.check(ids[1], "tok", now=112) is None  # least recently used: dropped
    for sid in (ids[0], ids[2], newest):
        assert table.check(sid, "tok", now=112), sid
    # Dead sessions go first, before any live one is dropped.
    later = 112 + IDLE_SECONDS + 1
    fresh = table.issue("tok", now=later)
    assert len(table) == 1 and table.check(fresh, "tok", now=later)


def test_sessions_use_the_clock_given() -> None:
    clock = FakeClock(50.0)
    table = Sessions(clock=clock)
    sid = table.issue("tok")
    assert table.check(sid, "tok") and table.check(sid, "tok", now=51.0)
    clock.now += SESSION_SECONDS + 1
    assert table.check(sid, "tok") is None
    assert table.end(sid) is False  # already gone


# ---------------------------------------------------------------------------- (4) the token
def test_changing_the_token_ends_every_session(secured: Flask,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    user = secured.test_client()
    _login(user)
    csrf = _csrf(user)
    svc = secured.extensions["bulkrunner"]
    old = svc.cfg
    monkeypatch.setattr(svc, "cfg", dataclasses.replace(
        old, server=dataclasses.replace(old.server, token="a-brand-new-token")))
    _refused(user, csrf)
    # Not merely hidden while the token differs: the session is gone for good.
    monkeypatch.setattr(svc, "cfg", old)
    _refused(user, csrf)
    assert len(secured.extensions[EXTENSION]) == 0
    _login(user)
    assert user.get(JOBS).status_code == 200


def test_a_session_is_bound_to_its_token() -> None:
    table = Sessions()
    sid = table.issue("tok", now=10)
    assert TOKEN not in sid and "tok" not in sid and len(sid) >= 43
    assert table.check(sid, "other", now=11) is None
    assert table.check(sid, "tok", now=11) is None


# ---------------------------------------------------------------------------- (5) the cookie
def _set_cookie(resp: TestResponse) -> list[str]:
    header = next(v for v in resp.headers.getlist("Set-Cookie") if v.startswith(COOKIE + "="))
    return [part.strip() for part in header.split(";")]


def test_the_cookie_is_httponly_strict_and_carries_only_the_id(secured: Flask) -> None:
    client = secured.test_client()
    parts = _set_cookie(_login(client))
    value = parts[0].partition("=")[2]
    assert re.fullmatch(r"[A-Za-z0-9_-]{43}", value), value  # token_urlsafe(32), nothing else
    assert TOKEN not in value
    attrs = {p.partition("=")[0].lower(): p.partition("=")[2] for p in parts[1:]}
    assert "httponly" in attrs
    assert attrs["samesite"] == "Strict"
    assert attrs["path"] == "/"
    assert "domain" not in attrs
    assert attrs["max-age"] == str(SESSION_SECONDS)
    assert "secure" not in attrs  # plain http: a Secure cookie would never come back

    https = secured.test_client()
    resp = https.post("/login", data={"token": TOKEN, "next": "/"},
                      base_url="https://localhost")
    assert resp.status_code == 302
    assert "Secure" in _set_cookie(resp)
    # Without server.trusted_proxies a forwarded scheme is not believed (tests/test_proxy.py
    # has the server behind a proxy).
    resp = secured.test_client().post("/login", data={"token": TOKEN, "next": "/"},
                                      headers={"X-Forwarded-Proto": "https"})
    assert resp.status_code == 302
    assert "Secure" not in _set_cookie(resp)

    out = client.post("/logout", data={"csrf_token": _csrf(client)})
    gone = _set_cookie(out)
    assert gone[0] == f"{COOKIE}=" and "Path=/" in gone
    assert any(p.startswith("Expires=Thu, 01 Jan 1970") for p in gone), gone
