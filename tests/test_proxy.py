"""Behind a reverse proxy: with ``server.trusted_proxies`` the scheme and host come from the
proxy's ``X-Forwarded-*`` headers, so the session cookie is Secure when the browser used
HTTPS and the Host check sees the public name; without it those headers change nothing.

Real ``bulkrunner serve`` processes (waitress deletes ``X-Forwarded-*`` headers it was not
told to keep, so only a real server shows the whole path), spoken to with ``http.client``
acting as the proxy: it connects from loopback and sends the headers a proxy would.
"""

from __future__ import annotations

import http.client
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlencode, urlsplit

import pytest

from bulkrunner.server.web.auth import COOKIE
from tests.conftest import ServerProcess, toml_config

TOKEN = "proxy-test-token-4e7a1c"
PUBLIC = "jobs.example.com"
Serve = Callable[..., ServerProcess]


def _server(serve: Serve, tmp_path: Path, hops: int) -> ServerProcess:
    home = tmp_path / f"hops-{hops}"
    home.mkdir()
    return serve(toml_config(home, server=f'token = "{TOKEN}"\ntrusted_proxies = {hops}\n'
                                          f'allowed_hosts = ["{PUBLIC}"]'))


def _send(server: ServerProcess, method: str, path: str, headers: dict[str, str],
          body: str | None = None) -> http.client.HTTPResponse:
    url = urlsplit(server.url)
    conn = http.client.HTTPConnection(url.hostname or "", url.port, timeout=30)
    conn.request(method, path, body=body, headers=headers)
    resp = conn.getresponse()
    resp.read()
    conn.close()
    return resp


def _login(server: ServerProcess, forwarded: dict[str, str]) -> http.client.HTTPResponse:
    body = urlencode({"token": TOKEN, "next": "/"})
    return _send(server, "POST", "/login", {
        "Content-Type": "application/x-www-form-urlencoded",
        "Origin": f"https://{PUBLIC}", **forwarded}, body)


def _cookie_attributes(resp: http.client.HTTPResponse) -> list[str]:
    assert resp.status == 302, resp.status
    header = next(v for k, v in resp.getheaders()
                  if k.lower() == "set-cookie" and v.startswith(COOKIE + "="))
    return [part.strip().lower() for part in header.split(";")[1:]]


TLS_PROXY = {"X-Forwarded-Proto": "https", "X-Forwarded-Host": PUBLIC,
             "X-Forwarded-For": "203.0.113.7"}


def test_the_session_cookie_is_secure_behind_one_trusted_tls_proxy(
        serve: Serve, tmp_path: Path) -> None:
    server = _server(serve, tmp_path, 1)
    assert "secure" in _cookie_attributes(_login(server, TLS_PROXY))
    # The same proxy forwarding plain http: no Secure flag (the cookie must come back).
    plain = {**TLS_PROXY, "X-Forwarded-Proto": "http"}
    assert "secure" not in _cookie_attributes(_login(server, plain))
    # One hop is trusted: the proxy's own (last) value counts, not what a client put first.
    forged = {**TLS_PROXY, "X-Forwarded-Proto": "https, http"}
    assert "secure" not in _cookie_attributes(_login(server, forged))


def test_without_trusted_proxies_forwarded_headers_change_nothing(
        serve: Serve, tmp_path: Path) -> None:
    server = _server(serve, tmp_path, 0)
    assert "secure" not in _cookie_attributes(_login(server, TLS_PROXY))
    # A forwarded host is not believed either: the Host check reads the Host header.
    r = _send(server, "GET", "/healthz", {"X-Forwarded-Host": "evil.example"})
    assert r.status == 200


@pytest.mark.parametrize(("forwarded_host", "status"), [
    (PUBLIC, 200),
    (f"{PUBLIC}:443", 200),
    ("evil.example", 403),
    (f"evil.example, {PUBLIC}", 200),   # the proxy appended the public name: that one counts
    (f"{PUBLIC}, evil.example", 403),
])
def test_the_host_check_uses_the_public_name_behind_the_proxy(
        serve: Serve, tmp_path: Path, forwarded_host: str, status: int) -> None:
    server = _server(serve, tmp_path, 1)
    # Host is what the proxy connected to (loopback); the public name is forwarded.
    r = _send(server, "GET", "/api/v1/tasks", {"X-Forwarded-Host": forwarded_host,
                                               "X-Forwarded-Proto": "https",
                                               "Authorization": f"Bearer {TOKEN}"})
    assert r.status == status, forwarded_host
    if status == 403:
        assert r.getheader("Content-Type") == "application/json"


def test_a_post_from_the_public_page_passes_the_origin_check(serve: Serve,
                                                             tmp_path: Path) -> None:
    server = _server(serve, tmp_path, 1)
    r = _send(server, "POST", "/api/v1/jobs", {
        **TLS_PROXY, "Origin": f"https://{PUBLIC}", "Content-Type": "application/json",
        "Authorization": f"Bearer {TOKEN}"}, '{"task": "noop"}')
    assert r.status == 202
    r = _send(server, "POST", "/api/v1/jobs", {
        **TLS_PROXY, "Origin": "https://evil.example", "Content-Type": "application/json",
        "Authorization": f"Bearer {TOKEN}"}, '{"task": "noop"}')
    assert r.status == 403
