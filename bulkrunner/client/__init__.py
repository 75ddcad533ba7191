"""The client side: the HTTP :class:`Client`, the ``bulkrunner`` command and its display.

Loads no server code and no Flask, waitress, Dask or sqlite3, so ``bulkrunner status``
starts fast and ``from bulkrunner.client import Client`` is cheap.
"""

from __future__ import annotations

from bulkrunner.client.api import Client, Download, LogChunk

__all__ = ["Client", "Download", "LogChunk"]
