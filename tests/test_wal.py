"""The write-ahead log stays bounded: a long read (an export) keeps it from being copied
back into the database while it lasts, and once the read ends the log is cut back to its
limit."""

from __future__ import annotations

import json
import os
import sqlite3
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from bulkrunner.store import NewJob, Store
from bulkrunner.store.faults import WAL_SIZE_LIMIT
from tests.conftest import wait_for


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    s = Store(str(tmp_path / "t.db"))
    yield s
    s.close()


def _bulk(n: int) -> NewJob:
    return NewJob(id=uuid.uuid4().hex, task="t", params={},
                  items=[json.dumps({"i": i, "pad": "x" * 200}) for i in range(n)])


def _wal(tmp_path: Path) -> int:
    try:
        return os.path.getsize(tmp_path / "t.db-wal")
    except FileNotFoundError:
        return 0


def test_the_log_shrinks_back_after_a_long_read(store: Store, tmp_path: Path) -> None:
    reader = sqlite3.connect(tmp_path / "t.db", isolation_level=None)
    reader.execute("BEGIN")
    reader.execute("SELECT COUNT(*) FROM items").fetchone()  # holds its snapshot open
    for _ in range(25):
        store.insert_job(_bulk(2000))
    grown = _wal(tmp_path)
    assert grown > WAL_SIZE_LIMIT, f"the log did not grow past its limit ({grown} bytes)"
    reader.execute("COMMIT")
    reader.close()

    def cut_back() -> bool:
        store.insert_job(_bulk(1))  # a commit after a full checkpoint starts the log over
        return _wal(tmp_path) <= WAL_SIZE_LIMIT

    wait_for(cut_back, 20, f"the log stayed at {_wal(tmp_path)} bytes after the read ended",
             interval=0.2)
