"""bulkrunner: durable bulk jobs for plain Python functions, over HTTP.

Light on purpose: importing ``bulkrunner`` loads no Flask, waitress or Dask, so the CLI and
:class:`Client` start fast. ``create_app`` is imported from :mod:`bulkrunner.server.app`.
"""

from __future__ import annotations

__version__ = "0.1.0"

from bulkrunner.runtime import Cancelled, Context, context

__all__ = ["Cancelled", "Context", "__version__", "context"]
