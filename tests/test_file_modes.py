"""Secret files stay private: the database and its -wal and -shm files are created 0600
whatever the umask, and the server warns at start about a token file or a database that
other users on the machine can read."""

from __future__ import annotations

import json
import os
import sqlite3
import stat
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from bulkrunner.server.preflight import file_mode_warnings
from bulkrunner.store import NewJob, Store
from tests.conftest import ServerProcess, toml_config

SIDE_FILES = ("", "-wal", "-shm")


def mode(path: Path | str) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.fixture
def umask(request: pytest.FixtureRequest) -> Iterator[int]:
    old = os.umask(request.param)
    yield request.param
    os.umask(old)


def write_a_job(store: Store) -> None:
    store.insert_job(NewJob(id=uuid.uuid4().hex, task="t", params={"secret": "s"},
                            items=[json.dumps({"i": 1})], priority=0, max_attempts=1,
                            key=None, body_hash="h"))


@pytest.mark.parametrize("umask", [0o022, 0o002, 0o000], indirect=True,
                         ids=["umask022", "umask002", "umask000"])
def test_a_new_database_and_its_wal_and_shm_are_0600(tmp_path: Path, umask: int) -> None:
    path = tmp_path / "t.db"
    store = Store(str(path))
    try:
        write_a_job(store)  # the -wal and -shm exist while a connection is open
        for suffix in SIDE_FILES:
            assert mode(f"{path}{suffix}") == 0o600, (suffix, oct(umask))
    finally:
        store.close()
    assert file_mode_warnings(database=str(path)) == []


def test_an_existing_database_keeps_its_mode_and_the_warning_names_it(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    sqlite3.connect(path).close()
    path.chmod(0o644)  # as an older version (or a umask of 022) left it
    store = Store(str(path))
    try:
        write_a_job(store)
        assert [mode(f"{path}{s}") for s in SIDE_FILES] == [0o644] * 3  # they follow it
        (warning,) = file_mode_warnings(database=str(path))
    finally:
        store.close()
    names = " ".join(f"{path}{s}" for s in SIDE_FILES)
    assert warning.startswith(f"the database file {path} has mode 0644: its group and "
                              "everyone can read it (its -wal and -shm files too), so they "
                              "can read the params, results and logs of every job")
    assert warning.endswith(f"fix: chmod 600 {names}")


@pytest.mark.parametrize(("bits", "says"), [
    (0o644, "has mode 0644: its group and everyone can read it, so they can read the token"),
    (0o640, "has mode 0640: its group can read it, so they can read the token"),
    (0o604, "has mode 0604: everyone can read it, so they can read the token"),
    (0o664, "has mode 0664: its group can read and change it and everyone can read it, so "
            "they can read the token"),
    (0o620, "has mode 0620: its group can change it, so they can replace the token"),
])
def test_a_token_file_others_can_get_at_is_named_with_the_fix(tmp_path: Path, bits: int,
                                                              says: str) -> None:
    token = tmp_path / "token"
    token.write_text("s3cret\n")
    token.chmod(bits)
    (warning,) = file_mode_warnings(token_file=str(token))
    assert warning.startswith(f"the token file {token} {says}")
    assert warning.endswith(f"fix: chmod 600 {token}")


@pytest.mark.parametrize("bits", [0o600, 0o400, 0o700, 0o611])
def test_a_private_token_file_gives_no_warning(tmp_path: Path, bits: int) -> None:
    token = tmp_path / "token"
    token.write_text("s3cret\n")
    token.chmod(bits)
    assert file_mode_warnings(token_file=str(token), database=str(tmp_path / "none")) == []


def test_the_server_warns_at_start_about_a_0644_token_file(tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_text("s3cret-token-value\n")
    token.chmod(0o644)
    cfg = toml_config(tmp_path, server='token_file = "token"')
    with ServerProcess(cfg) as srv:
        log = srv.log()
        db = tmp_path / "test.db"
        files = [f"{db}{s}" for s in SIDE_FILES if os.path.exists(f"{db}{s}")]
        assert str(db) in files and {f: mode(f) for f in files} == dict.fromkeys(files, 0o600)
    line = next(ln for ln in log.splitlines() if "the token file" in ln)
    assert "WARNING" in line and f"chmod 600 {token}" in line and "s3cret" not in log
    assert "the database file" not in log
