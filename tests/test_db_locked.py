"""The database locked by another program: another connection holds a write transaction
open (as an operator's sqlite3 shell after ``BEGIN``, or a backup tool) for longer than the
server's busy timeout, then lets go.

Meanwhile submissions answer 503 ``database_locked`` with Retry-After and store nothing;
reads go on (WAL); /healthz is 503 naming the lock; outcomes of items that finish wait in
memory and are recorded once the lock is released; the server never exits and comes back
by itself.
"""

from __future__ import annotations

import json
import shutil
import sqlite3
import subprocess
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from bulkrunner.errors import DatabaseLocked
from tests.conftest import ServerProcess, wait_for, wait_job
from tests.unwritable import Scenario, config, request


@contextmanager
def write_lock(db: Path, begin: str = "BEGIN EXCLUSIVE") -> Iterator[sqlite3.Connection]:
    """Hold the database's write lock from another connection until the block ends."""
    conn = sqlite3.connect(db, isolation_level=None, timeout=30)
    try:
        conn.execute(begin)
        yield conn
        conn.execute("ROLLBACK")
    finally:
        conn.close()


@pytest.mark.slow
def test_locked_database_refuses_submissions_keeps_outcomes_and_recovers(
        tmp_path: Path) -> None:
    """Hold the write lock under a running server, then release it."""
    cfg = config(tmp_path)
    with ServerProcess(cfg) as srv, Scenario(srv, tmp_path, 1000) as s:
        s.prepare()
        with write_lock(tmp_path / "test.db"):
            status, headers, body = s.refused("database_locked")
            print(f"\nwhile the database was locked a submission got {status}, Retry-After "
                  f"{headers['retry-after']}: {json.dumps(body)}")
            health = s.unhealthy("database_locked")
            print(f"/healthz: 503 {json.dumps(health)}")
            # Reads do not need the write lock.
            assert s.client.job(s.gated)["state"] == "running"
            s.finish_gated_while_unwritable()
            s.unhealthy("database_locked")
        s.recovered()
        s.whole()


@pytest.mark.slow
def test_a_sqlite3_shell_holding_a_transaction(tmp_path: Path) -> None:
    """An operator's sqlite3 shell left in a transaction, then ended with ROLLBACK."""
    shell = shutil.which("sqlite3")
    if shell is None:
        pytest.skip("the sqlite3 shell is not installed (Debian package sqlite3)")
    with ServerProcess(config(tmp_path)) as srv, Scenario(srv, tmp_path, 10) as s:
        status, _, data = s.submit({"task": "add", "params": {"a": 1}})
        assert status == 202, data
        wait_job(s.client, data["id"], 30)
        with subprocess.Popen([shell, str(tmp_path / "test.db")], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True) as proc:
            assert proc.stdin is not None and proc.stdout is not None
            try:
                proc.stdin.write("BEGIN IMMEDIATE;\nSELECT 'locked';\n")
                proc.stdin.flush()
                assert proc.stdout.readline().strip() == "locked"
                s.refused("database_locked")
                s.unhealthy("database_locked")
                out, _ = proc.communicate("ROLLBACK;\n.quit\n", timeout=30)
                assert proc.returncode == 0, out
            finally:
                if proc.poll() is None:
                    proc.kill()
        wait_for(lambda: request(srv.url, "GET", "/healthz")[0] == 200, 30,
                 "/healthz to answer 200 once the shell ended its transaction")
        status, _, data = s.submit({"task": "add", "params": {"a": 2}})
        assert status == 202, data
        assert wait_job(s.client, data["id"], 30)["result"] == 3
        s.whole(warned=False)


def test_every_write_waiting_on_the_lock_fails_with_it(app_factory: Callable[..., Any],
                                                      tmp_path: Path) -> None:
    """Submissions of several threads at once while the lock is held: each is refused with
    DatabaseLocked (none waits for another's timeout and then its own), nothing is stored;
    once the lock is released they all go in."""
    svc = app_factory(max_workers=1).extensions["bulkrunner"]
    body = {"task": "add", "params": {"a": 1}}
    outcomes: list[object] = []

    def submit() -> None:
        try:
            outcomes.append(svc.submit(dict(body))[0].id)
        except Exception as e:
            outcomes.append(e)

    with write_lock(tmp_path / "test.db", "BEGIN IMMEDIATE"):
        threads = [threading.Thread(target=submit) for _ in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert not any(t.is_alive() for t in threads), "a submission hung on the lock"
        assert len(outcomes) == 6 and all(isinstance(o, DatabaseLocked) for o in outcomes), \
            outcomes
        assert svc.store.queued == 0
        assert svc.list_jobs()[0] == []
        assert isinstance(svc.store.unwritable(), DatabaseLocked)
    wait_for(lambda: svc.store.unwritable() is None, 30, "the lock fault to clear")
    outcomes.clear()
    threads = [threading.Thread(target=submit) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert len(outcomes) == 6 and all(isinstance(o, str) for o in outcomes), outcomes
    assert len(svc.list_jobs()[0]) == 6
