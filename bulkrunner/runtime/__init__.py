"""What runs on a worker: the work unit, the task's context and :func:`run_item`.

Imported by worker processes and Dask workers, so everything here uses the standard library
only (and :mod:`bulkrunner.errors` / :mod:`bulkrunner.models`), never server code.
"""

from __future__ import annotations

from bulkrunner.runtime.context import Cancelled, Context, Reporter, context, safe_text
from bulkrunner.runtime.run import (
    ItemContext,
    Outcome,
    WorkUnit,
    error_dict,
    resolve,
    run_batch,
    run_item,
    worker_name,
)

__all__ = ["Cancelled", "Context", "ItemContext", "Outcome", "Reporter", "WorkUnit", "context",
           "error_dict", "resolve", "run_batch", "run_item", "safe_text", "worker_name"]
