"""A full disk: a real ``bulkrunner serve`` with its database on a small tmpfs that the test
fills to the last byte, then frees.

While the disk is full, submissions answer 503 with Retry-After and the error shape and
store nothing; /healthz is 503 ``database_full``; outcomes of items that finish meanwhile
wait in memory and are recorded once space is freed; the server never exits and comes back
by itself. Mounting needs root (CI runs as root); elsewhere the test skips and says why.

The last test needs no root: SQLite's own page limit (``max_page_count``) makes a real
``SQLITE_FULL`` for an in-process app.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import JOBS, ServerProcess, wait_app_job
from tests.unwritable import Scenario, assert_error_shape, config

#: Size of the tmpfs holding the database.
DISK = "3M"
#: Characters in each gate item's result: the two do not fit in what a full disk leaves.
RESULT_SIZE = 200_000


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A fresh tmpfs of :data:`DISK` mounted in ``tmp_path``, unmounted after."""
    if os.geteuid() != 0:
        pytest.skip("a full disk is made by mounting a small tmpfs, which needs root "
                    "(CI runs as root)")
    if shutil.which("mount") is None or shutil.which("umount") is None:
        pytest.skip("the mount and umount commands are not installed")
    disk = tmp_path / "disk"
    disk.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={DISK},mode=0700", "tmpfs",
                        str(disk)], capture_output=True, text=True, timeout=30)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {(r.stderr or r.stdout).strip()}")
    try:
        yield disk
    finally:
        subprocess.run(["umount", "-l", str(disk)], capture_output=True, timeout=30)


def fill(disk: Path) -> Path:
    """Write a file on ``disk`` until not one more byte fits; returns its path."""
    path = disk / "filler"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        chunk = 1 << 20
        while chunk:
            try:
                os.write(fd, b"\0" * chunk)
            except OSError as e:
                if e.errno != errno.ENOSPC:
                    raise
                chunk //= 4
    finally:
        os.close(fd)
    st = os.statvfs(disk)
    assert st.f_bavail == 0, f"{st.f_bavail} blocks still free on {disk}"
    return path


@pytest.mark.slow
def test_full_disk_refuses_submissions_keeps_outcomes_and_recovers(
        small_disk: Path, tmp_path: Path) -> None:
    """Fill the disk under a running server, then free it."""
    db = small_disk / "jobs.db"
    with ServerProcess(config(tmp_path), args=["--db", str(db)]) as srv, \
            Scenario(srv, tmp_path, RESULT_SIZE) as s:
        s.prepare()
        filler = fill(small_disk)

        status, headers, body = s.refused("database_full")
        print(f"\nwhile the disk was full a submission got {status}, Retry-After "
              f"{headers['retry-after']}: {json.dumps(body)}")
        health = s.unhealthy("database_full")
        print(f"/healthz: 503 {json.dumps(health)}")
        s.finish_gated_while_unwritable()
        # Still full: every try to record the outcomes failed, and said so once.
        s.refused("database_full")
        s.unhealthy("database_full")

        filler.unlink()
        s.recovered()
        s.whole()


def test_a_full_database_stores_nothing_of_a_refused_submission(
        app_factory: Callable[..., Any]) -> None:
    """Without root: SQLite's page limit stands in for the disk (the same SQLITE_FULL)."""
    app = app_factory(max_workers=1)
    svc = app.extensions["bulkrunner"]
    client = app.test_client()
    r = client.post(JOBS, json={"task": "add", "params": {"a": 1}})
    assert r.status_code == 202, r.get_json()
    wait_app_job(client, r.get_json()["id"])
    pages = svc.store.write(lambda tx: tx.conn.execute("PRAGMA page_count").fetchone()[0])
    svc.store.write(lambda tx: tx.conn.execute(f"PRAGMA max_page_count = {pages + 1}"))
    queued = svc.store.queued

    big = {"task": "add", "items": [{"a": n, "b": n} for n in range(5000)]}
    for body in (big, {**big, "key": "k"}):
        r = client.post(JOBS, json=body)
        err = assert_error_shape(r.status_code, r.get_json(), "a submission to a full disk")
        assert r.status_code == 503 and err["code"] == "database_full", r.get_json()
        assert int(r.headers["Retry-After"]) > 0
    assert svc.store.queued == queued
    jobs = client.get(JOBS).get_json()["jobs"]
    assert len(jobs) == 1, jobs

    svc.store.write(lambda tx: tx.conn.execute("PRAGMA max_page_count = 1073741823"))
    r = client.post(JOBS, json=big)
    assert r.status_code == 202, r.get_json()
    assert wait_app_job(client, r.get_json()["id"], 60)["state"] == "succeeded"
    assert svc.store.unwritable() is None
    assert client.get("/healthz").status_code == 200
