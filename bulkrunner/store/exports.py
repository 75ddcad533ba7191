"""The rows an export streams: a job's items as their stored JSON text, every read from one
snapshot of the database."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Collection, Iterator
from typing import Any

from bulkrunner.errors import NotFound
from bulkrunner.store.jobs import resolve_id, state_literal

#: One item: index, its own params, state, attempts, result, error (JSON text or None).
Row = tuple[int, "str | None", str, int, "str | None", "str | None"]
#: Rows fetched at a time.
FETCH = 1000
#: Above the number of JSON nodes of any one result: first appearances are ordered by
#: ``idx * NODES + node id``, the item first, then the key's place in its result.
NODES = 1 << 32


class ExportRows:
    """A job's items (or only those in ``state``) in index order, as stored, and what an
    export's header needs to know of them.

    Every read comes from the one snapshot taken when this is made, on a connection of its
    own: an export is whole even if retention deletes the job meanwhile, and a header
    worked out first matches the rows read after. NotFound is raised here, before any row.
    The snapshot ends, and the connection closes, when the rows are read to their end or
    :meth:`close` is called.
    """

    def __init__(self, conn: sqlite3.Connection, ident: str, state: str | None) -> None:
        self._conn = conn
        try:
            # The state as a literal in the statements (checked), or None for every item.
            self._state = state_literal(state) if state else None
            conn.execute("BEGIN")
            self.seq = resolve_id(conn, ident)
            row = conn.execute("SELECT params FROM jobs WHERE seq = ? AND doomed = 0",
                               (self.seq,)).fetchone()
            if row is None:  # deleted by retention since its id was resolved
                raise NotFound(f"no job with id {ident!r}", {"id": ident})
        except BaseException:
            conn.close()
            raise
        #: The job's params, as text and decoded: each item's own params go over them.
        self.params_text: str = row[0]
        self.params: dict[str, Any] = json.loads(row[0])

    def _where(self, t: str = "items") -> str:
        """The condition on table ``t`` (a name or an alias) that picks the rows."""
        return f"{t}.job_seq = ?" + (f" AND {t}.state = {self._state}" if self._state else "")

    def result_keys(self) -> list[str] | None:
        """The keys of the results, in the order they first appear (by index, then by
        place in the result), when every result is a JSON object; None when some result
        is another value. A result of null counts as none."""
        w = self._where("i")
        other = self._conn.execute(
            f"SELECT 1 FROM items i WHERE {w} AND i.result IS NOT NULL "
            "AND i.result <> 'null' AND json_type(i.result) <> 'object' LIMIT 1",
            (self.seq,)).fetchone()
        if other is not None:
            return None
        return [r[0] for r in self._conn.execute(
            f"SELECT j.key FROM items i, json_each(i.result) j WHERE {w} "
            "AND i.result IS NOT NULL AND json_type(i.result) = 'object' "
            f"GROUP BY j.key ORDER BY MIN(i.idx * {NODES} + j.id)", (self.seq,))]

    def undeclared(self, names: Collection[str]) -> bool:
        """Whether some item's params, its own or the job's, hold a name not in ``names``."""
        if any(k not in names for k in self.params):
            return True
        w = self._where("i")
        return self._conn.execute(
            f"SELECT 1 FROM items i, json_each(i.params) j WHERE {w} "
            "AND i.params IS NOT NULL AND j.key NOT IN (SELECT value FROM json_each(?)) "
            "LIMIT 1", (self.seq, json.dumps(sorted(names)))).fetchone() is not None

    def __iter__(self) -> Iterator[list[Row]]:
        """The rows, :data:`FETCH` at a time; the snapshot ends after the last."""
        try:
            cur = self._conn.execute(
                "SELECT idx, params, state, attempts, result, error FROM items "
                f"WHERE {self._where()} ORDER BY idx", (self.seq,))
            while rows := cur.fetchmany(FETCH):
                yield rows
        finally:
            self.close()

    def close(self) -> None:
        """End the snapshot and close its connection (again is a no-op)."""
        self._conn.close()
