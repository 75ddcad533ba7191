"""Who may do what: named tokens with the roles read, submit and admin, checked on every
route; submit tokens act only on their own jobs; who submitted a job is recorded and shown.

The route test is driven by the OpenAPI document: every route it lists is tried with every
kind of token, against the product's table of roles written out here, so a route added
without a role (or with the wrong one) fails it.
"""

from __future__ import annotations

import io
import os
import re
import stat
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient

from bulkrunner.client import Client
from bulkrunner.config import load_config
from bulkrunner.errors import ConfigError
from bulkrunner.server import auth
from tests.conftest import JOBS, ServerProcess, run_cli, toml_config, wait_for, wait_job

ADMIN_TOKEN = "admin-token-5b1f0c7e9d"
CI_TOKEN = "ci-token-7a2d4e6f81"
OTHER_TOKEN = "other-token-3c9e1b5a70"
VIEWER_TOKEN = "viewer-token-8f6a2c4d19"
ALL_TOKENS = (ADMIN_TOKEN, CI_TOKEN, OTHER_TOKEN, VIEWER_TOKEN)
#: Each kind of caller: its token, and (name, role) as the server should see it.
CALLERS = {"admin": ADMIN_TOKEN, "ci": CI_TOKEN, "other": OTHER_TOKEN, "viewer": VIEWER_TOKEN}
ROLE_OF = {"admin": "admin", "ci": "submit", "other": "submit", "viewer": "read"}
RANK = {"read": 0, "submit": 1, "admin": 2}
TOKENS_TOML = f'''token = "{ADMIN_TOKEN}"
[[server.tokens]]
name = "ci"
token = "{CI_TOKEN}"
role = "submit"
[[server.tokens]]
name = "other"
token = "{OTHER_TOKEN}"
role = "submit"
[[server.tokens]]
name = "viewer"
token_file = "viewer.token"
role = "read"
'''


def _bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


@pytest.fixture
def roles_app(app_factory: Callable[..., Flask], tmp_path: Path) -> Flask:
    token_file = tmp_path / "viewer.token"  # relative to the config file, read at load
    token_file.write_text(VIEWER_TOKEN + "\n")
    token_file.chmod(0o600)
    return app_factory(server=TOKENS_TOML)


def _submit(client: FlaskClient, token: str, task: str = "slow", **body: Any) -> dict[str, Any]:
    r = client.post(JOBS, json={"task": task, **({"params": {"seconds": 30}}
                                                  if task == "slow" else {}), **body},
                    headers=_bearer(token))
    assert r.status_code == 202, r.get_json()
    job: dict[str, Any] = r.get_json()
    return job


# ---------------------------------------------------------------------------- the roles table
def needed(method: str, path: str) -> tuple[str | None, bool]:
    """The role a route needs, as the product's roles table says, and whether a submit
    token may use it only on the jobs it submitted: read may every GET; submit may also
    submit, and cancel, retry, pause and resume its own jobs; the rest is admin's."""
    if path == "/healthz":
        return None, False
    if method == "GET":
        return "read", False
    if method == "POST" and path == "/api/v1/jobs":
        return "submit", False
    if method == "POST" and re.fullmatch(r"/api/v1/jobs/\{id\}/(cancel|retry|pause|resume)",
                                         path):
        return "submit", True
    return "admin", False


def _operations(client: FlaskClient) -> list[tuple[str, str]]:
    doc = client.get("/openapi.json", headers=_bearer(VIEWER_TOKEN)).get_json()
    return sorted((method.upper(), path) for path, ops in doc["paths"].items()
                  for method in ops if method in ("get", "post", "put", "patch", "delete"))


def _flask_rule(path: str) -> str:
    return re.sub(r"\{(\w+)\}", lambda m: "<" + {"id": "ident"}.get(m[1], m[1]) + ">", path)


def test_every_route_has_a_declared_role_that_matches_the_table(roles_app: Flask) -> None:
    client = roles_app.test_client()
    ops = _operations(client)
    rules = {(m, r.rule): r.endpoint for r in roles_app.url_map.iter_rules()
             for m in r.methods - {"HEAD", "OPTIONS"}}
    undeclared = sorted(e for e in set(rules.values()) if e not in auth.ROUTE_ROLES)
    assert not undeclared, f"routes without a role in server/auth.py ROUTE_ROLES: {undeclared}"
    assert len(ops) >= 12, ops
    for method, path in ops:
        endpoint = rules.get((method, _flask_rule(path)))
        assert endpoint is not None, f"{method} {path} is in the OpenAPI document, not the app"
        need = auth.need_of(endpoint)
        assert (need.role, need.own_job) == needed(method, path), (method, path, need)
    # Every API route the app serves is in the document (the page's routes are not API).
    api = {(m, rule) for (m, rule), e in rules.items()
           if e != "static" and not e.startswith("web.")}
    documented = {(m, _flask_rule(p)) for m, p in ops}
    assert api <= documented, sorted(api - documented)


def test_every_route_by_every_role(roles_app: Flask) -> None:
    """Each route of the OpenAPI document, with each token: refused (403
    insufficient_role, the role held and needed) exactly when the table says so."""
    client = roles_app.test_client()
    shared = _submit(client, CI_TOKEN)
    tried = 0
    for method, path in _operations(client):
        role, own = needed(method, path)
        for caller, token in [*CALLERS.items(), ("nobody", ""), ("wrong", "not-a-token")]:
            # Jobs acted on get a fresh job of ci's each, so that one caller's cancel does
            # not leave the next one a finished job.
            job = _submit(client, CI_TOKEN) if own else shared
            url = path.replace("{id}", job["id"]).replace("{index}", "0").replace(
                "{name}", "slow")
            body = {"json": {"task": "noop"}} if method == "POST" and path == JOBS else {}
            headers = _bearer(token) if token else {}
            r = client.open(url, method=method, headers=headers, **body)
            what = (method, path, caller, r.status_code, r.get_data(as_text=True)[:300])
            tried += 1
            if role is None:
                assert r.status_code == 200, what
                continue
            if caller in ("nobody", "wrong"):
                assert r.status_code == 401, what
                assert r.get_json()["error"]["code"] == "unauthorized", what
                continue
            held = ROLE_OF[caller]
            allowed = RANK[held] >= RANK[role] and not (own and held == "submit"
                                                        and caller != "ci")
            if allowed:
                assert r.status_code not in (401, 403), what
                continue
            assert r.status_code == 403, what
            error = r.get_json()["error"]
            assert error["code"] == "insufficient_role", what
            want = "admin" if own and held == "submit" else role
            assert error["details"] == {"role": held, "needed": want}, what
            assert not any(t in r.get_data(as_text=True) for t in ALL_TOKENS)
    assert tried >= 12 * 6


def test_a_route_without_a_declared_role_is_admins_only(roles_app: Flask) -> None:
    roles_app.add_url_rule("/api/v1/undeclared", "api.undeclared", lambda: {"ok": True})
    client = roles_app.test_client()
    for token, role in ((VIEWER_TOKEN, "read"), (CI_TOKEN, "submit")):
        r = client.get("/api/v1/undeclared", headers=_bearer(token))
        assert r.status_code == 403, r.get_data(as_text=True)
        assert r.get_json()["error"]["details"] == {"role": role, "needed": "admin"}
    assert client.get("/api/v1/undeclared", headers=_bearer(ADMIN_TOKEN)).status_code == 200


def test_a_submit_token_cannot_cancel_another_tokens_job(roles_app: Flask) -> None:
    client = roles_app.test_client()
    job = _submit(client, CI_TOKEN)
    r = client.post(f"{JOBS}/{job['id']}/cancel", headers=_bearer(OTHER_TOKEN))
    assert r.status_code == 403
    error = r.get_json()["error"]
    assert error["code"] == "insufficient_role"
    assert error["details"] == {"role": "submit", "needed": "admin"}
    assert "'ci'" in error["message"] and "submitted" in error["message"]
    # Nothing happened to it; its owner and an admin may.
    assert client.get(f"{JOBS}/{job['id']}", headers=_bearer(OTHER_TOKEN)).get_json()[
        "state"] in ("queued", "running")
    mine = client.post(f"{JOBS}/{job['id'][:10]}/cancel", headers=_bearer(CI_TOKEN))
    assert mine.status_code == 200 and mine.get_json()["state"] == "cancelled"
    second = _submit(client, CI_TOKEN)
    r = client.post(f"{JOBS}/{second['id']}/cancel", headers=_bearer(ADMIN_TOKEN))
    assert r.status_code == 200, r.get_json()
    # A job of an open server's time (submitted by no token) is admin's only.
    unknown = client.post(f"{JOBS}/{'f' * 32}/cancel", headers=_bearer(OTHER_TOKEN))
    assert unknown.status_code == 404


def test_the_page_session_acts_with_its_tokens_role(roles_app: Flask) -> None:
    client = roles_app.test_client()
    theirs = _submit(client, CI_TOKEN)
    page = roles_app.test_client()
    login = page.post("/login", data={"token": OTHER_TOKEN, "next": "/"})
    assert login.status_code == 302
    html = page.get(f"/jobs/{theirs['id']}").get_data(as_text=True)
    csrf = re.search(r'<meta name="csrf-token" content="([^"]+)">', html)
    assert csrf is not None
    r = page.post(f"{JOBS}/{theirs['id']}/cancel", headers={"X-CSRF-Token": csrf[1]})
    assert r.status_code == 403 and r.get_json()["error"]["details"]["needed"] == "admin"
    mine = page.post(JOBS, json={"task": "noop"}, headers={"X-CSRF-Token": csrf[1]})
    assert mine.status_code == 202 and mine.get_json()["submitted_by"] == "other"


# ---------------------------------------------------------------------------- the page
_BUTTON = r'<button type="button" id="{}"[^>]*>'


def _button(html: str, name: str) -> str:
    found = re.search(_BUTTON.format(name), html)
    assert found is not None, f"no {name} button"
    return found[0]


def test_the_page_shows_who_is_logged_in_and_only_their_buttons(roles_app: Flask) -> None:
    api = roles_app.test_client()
    ci_job = _submit(api, CI_TOKEN)
    for caller, token in CALLERS.items():
        page = roles_app.test_client()
        assert page.post("/login", data={"token": token, "next": "/"}).status_code == 302
        home = page.get("/").get_data(as_text=True)
        who = re.search(r'<span class="whoami" id="whoami">(.*?) <span class="role">(\w+)'
                        r"</span>", home)
        assert who is not None and who.groups() == (caller, ROLE_OF[caller]), caller
        assert ("Start a job</a>" in home) == (ROLE_OF[caller] != "read"), caller
        html = page.get(f"/jobs/{ci_job['id']}").get_data(as_text=True)
        may_act = caller in ("ci", "admin")
        for name in ("cancel", "pause", "retry"):
            assert ("hidden" not in _button(html, name)) == may_act, (caller, name)
        assert re.search(r"<dt>Submitted by</dt><dd[^>]*>ci</dd>", html), caller
        form = page.get("/tasks/noop").get_data(as_text=True)
        assert ('id="no-submit"' in form) == (ROLE_OF[caller] == "read"), caller


def test_an_open_server_shows_every_button_and_records_nobody(
        app_factory: Callable[..., Flask]) -> None:
    client = app_factory().test_client()
    r = client.post(JOBS, json={"task": "slow", "params": {"seconds": 30}})
    assert r.status_code == 202 and r.get_json()["submitted_by"] is None
    html = client.get(f"/jobs/{r.get_json()['id']}").get_data(as_text=True)
    assert "hidden" not in _button(html, "cancel")
    assert "Submitted by" not in html and 'id="whoami"' not in html


# ---------------------------------------------------------------------------- submitted_by
def test_submitted_by_is_the_tokens_name_and_filters_the_list(roles_app: Flask,
                                                              tmp_path: Path) -> None:
    client = roles_app.test_client()
    by_ci = _submit(client, CI_TOKEN, task="noop")
    by_admin = _submit(client, ADMIN_TOKEN, task="noop")
    upload = client.post(JOBS, data={"task": "echo", "items": (
        io.BytesIO(b"x\n1\n2\n"), "items.csv")}, headers=_bearer(OTHER_TOKEN))
    assert upload.status_code == 202, upload.get_json()
    assert by_ci["submitted_by"] == "ci" and by_admin["submitted_by"] == "admin"
    assert upload.get_json()["submitted_by"] == "other"
    got = client.get(f"{JOBS}/{by_ci['id']}", headers=_bearer(VIEWER_TOKEN)).get_json()
    assert got["submitted_by"] == "ci"

    def ids(query: str) -> list[str]:
        r = client.get(f"{JOBS}?{query}", headers=_bearer(VIEWER_TOKEN))
        assert r.status_code == 200, r.get_json()
        return [j["id"] for j in r.get_json()["jobs"]]
    assert ids("submitted_by=ci") == [by_ci["id"]]
    assert ids("submitted_by=admin") == [by_admin["id"]]
    assert ids("submitted_by=nobody-at-all") == []
    assert len(ids("")) == 3
    # The export is the items' rows; who submitted the job comes once, in a header.
    r = client.get(f"{JOBS}/{by_ci['id']}/results?format=csv", headers=_bearer(VIEWER_TOKEN))
    assert r.status_code == 200 and r.headers["X-Submitted-By"] == "ci"
    # An idempotent replay by another token is the original job, still ci's.
    keyed = _submit(client, CI_TOKEN, task="noop", key="k-1")
    replay = client.post(JOBS, json={"task": "noop", "key": "k-1"},
                         headers=_bearer(OTHER_TOKEN))
    assert replay.status_code == 200
    assert replay.get_json()["id"] == keyed["id"]
    assert replay.get_json()["submitted_by"] == "ci"


# ---------------------------------------------------------------------------- config
def _config(tmp_path: Path, server: str) -> Any:
    return load_config(toml_config(tmp_path, server=server))


def test_named_token_files_are_read_at_load(tmp_path: Path) -> None:
    (tmp_path / "ci.token").write_text(f"  {CI_TOKEN}\n")
    cfg = _config(tmp_path, '[[server.tokens]]\nname = "ci"\ntoken_file = "ci.token"\n'
                            'role = "submit"')
    (tok,) = cfg.server.tokens
    assert (tok.name, tok.token, tok.role) == ("ci", CI_TOKEN, "submit")
    assert tok.token_file == str(tmp_path / "ci.token")


@pytest.mark.parametrize(("server", "files", "says"), [
    ('[[server.tokens]]\nname = "ci"\ntoken_file = "missing.token"',
     {}, "cannot read the token file"),
    ('[[server.tokens]]\nname = "ci"\ntoken_file = "empty.token"',
     {"empty.token": "\n"}, "is empty"),
    (f'token = "{ADMIN_TOKEN}"\n[[server.tokens]]\nname = "admin"\ntoken = "x-{CI_TOKEN}"',
     {}, "the name server.token goes by"),
    (f'token = "{CI_TOKEN}"\n[[server.tokens]]\nname = "ci"\ntoken = "{CI_TOKEN}"',
     {}, "also another token's"),
    ('[[server.tokens]]\nname = "a\\u001b[31mb"\ntoken = "t1"', {}, "not a usable name"),
    ('[[server.tokens]]\nname = "ci"\ntoken = "t1"\nrole = "owner"', {}, "must be one of"),
    ('[[server.tokens]]\nname = "ci"\ntoken = "t1"\ntoken_file = "f"', {}, "exactly one"),
])
def test_token_config_mistakes_name_the_key(tmp_path: Path, server: str,
                                            files: dict[str, str], says: str) -> None:
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    with pytest.raises(ConfigError) as e:
        _config(tmp_path, server)
    assert says in e.value.message and "server.tokens" in e.value.message


# ---------------------------------------------------------------------------- a real server
@pytest.fixture(scope="module")
def real_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    home = tmp_path_factory.mktemp("roles-server")
    token_file = home / "viewer.token"
    token_file.write_text(VIEWER_TOKEN)
    token_file.chmod(0o644)  # readable by everyone: a warning at start
    with ServerProcess(toml_config(home, server=TOKENS_TOML)) as srv:
        yield srv


def test_a_world_readable_token_file_is_a_warning_at_start(real_server: ServerProcess) -> None:
    path = real_server.config.parent / "viewer.token"
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o644
    log = real_server.log()
    assert f"the token file {path} has mode 0644" in log
    assert f"chmod 600 {path}" in log


def test_the_cli_with_a_read_token_exits_2_with_the_servers_message(
        real_server: ServerProcess) -> None:
    out = run_cli("--token", VIEWER_TOKEN, "submit", "noop", url=real_server.url)
    assert out.returncode == 2, (out.stdout, out.stderr)
    assert "needs a token with the submit role" in out.stderr
    assert "'viewer' has the read role" in out.stderr and "Traceback" not in out.stderr
    ok = run_cli("--token", VIEWER_TOKEN, "status", url=real_server.url)
    assert ok.returncode == 0, ok.stderr


def test_who_submitted_is_in_the_cli_and_the_server_log(real_server: ServerProcess) -> None:
    sub = run_cli("--token", CI_TOKEN, "submit", "noop", url=real_server.url)
    assert sub.returncode == 0, sub.stderr
    job_id = sub.stdout.strip()
    with Client(real_server.url, VIEWER_TOKEN) as c:
        wait_job(c, job_id, 30)
    status = run_cli("--token", VIEWER_TOKEN, "status", job_id, url=real_server.url)
    assert status.returncode == 0, status.stderr
    assert re.search(r"^by\s+ci$", status.stdout, re.M), status.stdout
    table = run_cli("--token", VIEWER_TOKEN, "status", url=real_server.url)
    head, *rows = table.stdout.splitlines()
    assert head.split()[-1] == "BY"
    assert any(r.startswith(job_id[:12]) and r.split()[-1] == "ci" for r in rows), table.stdout
    wait_for(lambda: f"job {job_id} submitted: task noop, 1 item(s), by ci" in
             real_server.log(), 10, "the submit line in the server log")
    cancel = run_cli("--token", OTHER_TOKEN, "cancel", job_id, url=real_server.url)
    assert cancel.returncode == 2 and "submitted by 'ci'" in cancel.stderr


def test_no_token_is_ever_logged(real_server: ServerProcess) -> None:
    for token in (*ALL_TOKENS, "a-wrong-token-value"):
        run_cli("--token", token, "tasks", url=real_server.url)
    log = real_server.log()
    assert "serving on" in log
    for token in (*ALL_TOKENS, "a-wrong-token-value"):
        assert token not in log


# ---------------------------------------------------------------------------- in a browser
def test_the_page_in_a_browser_shows_only_the_roles_buttons(session: Callable[..., Any],
                                                            tmp_path: Path) -> None:
    from tests.browser import expect, state_badge

    (tmp_path / "viewer.token").write_text(VIEWER_TOKEN)
    (tmp_path / "viewer.token").chmod(0o600)
    s = session(max_workers=1, server=TOKENS_TOML)
    with s.client(CI_TOKEN) as c:
        job = c.submit("slow", {"seconds": 60})
    page = s.page
    for caller in ("viewer", "other", "ci"):
        page.goto(f"{s.server.url}/login?next=/jobs/{job['id']}")
        page.get_by_label("API token").fill(CALLERS[caller])
        page.get_by_role("button", name="Log in").click()
        expect(state_badge(page)).to_have_text("running")
        expect(page.locator("#whoami")).to_have_text(f"{caller} {ROLE_OF[caller]}")
        cancel = page.get_by_role("button", name="Cancel job")
        if caller == "ci":
            expect(cancel).to_be_visible()
        else:
            expect(cancel).to_be_hidden()
        page.get_by_role("button", name="Log out").click()
        page.wait_for_url(re.compile(r"/login"))
    with s.client(CI_TOKEN) as c:
        c.cancel(job["id"])
