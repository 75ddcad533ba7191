"""Safe by default: a token when exposed, loopback-only Host names, no cross-site writes,
limits on bodies and results, and only registered tasks run."""

from __future__ import annotations

from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
from click.testing import CliRunner

from bulkrunner.client.cli import cli
from tests.conftest import JOBS, ROOT, run_cli, toml_config, wait_app_job

TOKEN = "s3cret-token-value"


@pytest.fixture
def secured(app_factory: Any) -> Any:
    return app_factory(server=f'token = "{TOKEN}"')


def _routes(app: Any) -> list[tuple[str, str]]:
    out = []
    for rule in app.url_map.iter_rules():
        if rule.endpoint == "static" or rule.endpoint.startswith("web."):
            continue
        path = rule.rule.replace("<ident>", "abc").replace("<index>", "0")
        for m in rule.methods - {"HEAD", "OPTIONS"}:
            out.append((m, path))
    return out


def test_every_route_but_healthz_needs_the_token(secured: Any) -> None:
    client = secured.test_client()
    routes = _routes(secured)
    assert ("GET", "/healthz") in routes and len(routes) >= 9
    for method, path in routes:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN}):
            r = client.open(path, method=method, headers=headers)
            if path == "/healthz":
                assert r.status_code == 200
                continue
            assert r.status_code == 401, (method, path, headers, r.status_code)
            assert r.json["error"]["code"] == "unauthorized"
            assert TOKEN not in r.get_data(as_text=True)
    ok = client.get("/api/v1/tasks", headers={"Authorization": f"Bearer {TOKEN}"})
    assert ok.status_code == 200


def test_foreign_host_is_refused_on_loopback(app_factory: Any) -> None:
    client = app_factory().test_client()
    r = client.get("/api/v1/tasks", headers={"Host": "evil.example:8470"})
    assert r.status_code == 403 and r.json["error"]["code"] == "forbidden_host"
    for host in ("localhost:8470", "127.0.0.1:1", "[::1]:8470", "127.9.9.9"):
        assert client.get("/api/v1/tasks", headers={"Host": host}).status_code == 200, host


def test_cross_site_form_post_is_refused(app_factory: Any) -> None:
    client = app_factory().test_client()
    # What a foreign page can send without a CORS preflight.
    r = client.post("/api/v1/jobs", data={"task": "echo"},
                    headers={"Origin": "http://evil.example"})
    assert r.status_code == 403 and r.json["error"]["code"] == "cross_origin"
    r = client.post("/api/v1/jobs", data=b'{"task": "echo"}', content_type="text/plain")
    assert r.status_code == 415
    r = client.post("/api/v1/jobs", json={"task": "echo"},
                    headers={"Sec-Fetch-Site": "cross-site"})
    assert r.status_code == 403
    r = client.post("/api/v1/jobs", json={"task": "echo"},
                    headers={"Origin": "http://localhost"})
    assert r.status_code == 202
    assert "Access-Control-Allow-Origin" not in r.headers


def test_body_limit_gives_413(app_factory: Any) -> None:
    client = app_factory(server="max_body_size = 4096").test_client()
    r = client.post("/api/v1/jobs", json={"task": "echo", "params": {"x": "y" * 10000}})
    assert r.status_code == 413 and r.json["error"]["code"] == "body_too_large"


def test_item_and_param_limits(app_factory: Any) -> None:
    client = app_factory(jobs="max_items = 5\nmax_param_size = 100").test_client()
    r = client.post("/api/v1/jobs", json={"task": "echo", "items": [{}] * 6})
    assert r.status_code == 422 and "max_items" in r.json["error"]["message"]
    r = client.post("/api/v1/jobs", json={"task": "echo", "params": {"x": "y" * 200}})
    assert r.status_code == 422 and "max_param_size" in r.json["error"]["message"]


def test_oversized_result_fails_its_item_cleanly(app_factory: Any) -> None:
    client = app_factory(jobs="max_result_size = 1000").test_client()
    r = client.post(JOBS, json={"task": "big", "params": {"n": 5000}})
    job = wait_app_job(client, r.json["id"], 30)
    assert job["state"] == "failed"
    assert job["error"]["type"] == "ResultTooLarge"
    assert job["result"] is None


@pytest.mark.parametrize("task", ["os:system", "subprocess:run", "builtins:eval",
                                  "tests.sample_tasks:add"])
def test_import_paths_are_never_run(app_factory: Any, task: str) -> None:
    client = app_factory().test_client()
    r = client.post("/api/v1/jobs", json={"task": task, "params": {"command": "touch x"}})
    assert r.status_code == 422
    assert r.json["error"]["details"]["fields"]["task"].startswith("unknown task")


def test_refuses_public_host_without_token(tmp_path: Path) -> None:
    cfg = toml_config(tmp_path)
    env = {"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"}
    out = run_cli("--config", str(cfg), "serve", "--host", "0.0.0.0", cwd=tmp_path, env=env,
                  timeout=60)
    assert out.returncode == 2
    assert "refusing to serve on 0.0.0.0 without a token" in out.stderr
    assert "server.token" in out.stderr and "Traceback" not in out.stderr


def test_cli_sends_the_token_from_the_environment(serve: Any, tmp_path: Path,
                                                  isolated_cwd: Path) -> None:
    # The CLI runs in tmp_path (isolated_cwd); the server's config stays out of it, or the
    # CLI would read the token from ./bulkrunner.toml.
    home = tmp_path / "server"
    home.mkdir()
    server = serve(toml_config(home, server=f'token = "{TOKEN}"'))
    runner = CliRunner()
    denied = runner.invoke(cli, ["--url", server.url, "tasks"], env={"BULKRUNNER_TOKEN": ""})
    assert denied.exit_code == 2 and "token" in denied.output
    ok = runner.invoke(cli, ["--url", server.url, "submit", "add", "--param", "a=1", "--wait"],
                       env={"BULKRUNNER_TOKEN": TOKEN})
    assert ok.exit_code == 0, ok.output
    assert TOKEN not in server.log()


@pytest.mark.parametrize("target", ["/\t/evil.example", "/\n/evil.example", "//evil.example",
                                    "https://evil.example/", "/\\evil.example",
                                    "/%0a/evil.example", "javascript:alert(1)"])
def test_login_never_redirects_off_site(secured: Any, target: str) -> None:
    client = secured.test_client()
    for resp in (client.get("/login", query_string={"next": target}),
                 client.post("/login", data={"token": TOKEN, "next": target},
                             headers={"Origin": "http://localhost"})):
        assert resp.status_code in (200, 302), resp.status_code
        location = resp.headers.get("Location", "")
        # What a browser makes of it (it drops tabs and newlines first): this site only.
        cleaned = "".join(ch for ch in location if ch not in "\t\r\n")
        parts = urlsplit(cleaned)
        assert not parts.scheme and not parts.netloc, location
        assert not cleaned.startswith("//") and "\\" not in cleaned, location


def test_allowed_hosts_let_a_reverse_proxy_through(app_factory: Any) -> None:
    client = app_factory(server='allowed_hosts = ["Jobs.Example.com"]').test_client()
    assert client.get("/api/v1/tasks", headers={"Host": "jobs.example.com"}).status_code == 200
    # The proxy keeps the public Host, or rewrites it to loopback: the page's Origin passes.
    for host in ("jobs.example.com", "127.0.0.1:8470"):
        r = client.post("/api/v1/jobs", json={"task": "echo"},
                        headers={"Host": host, "Origin": "https://jobs.example.com"})
        assert r.status_code == 202, (host, r.json)
    r = client.get("/api/v1/tasks", headers={"Host": "evil.example"})
    assert r.status_code == 403 and "server.allowed_hosts" in r.json["error"]["message"]
    r = client.post("/api/v1/jobs", json={"task": "echo"},
                    headers={"Origin": "https://evil.example"})
    assert r.status_code == 403
