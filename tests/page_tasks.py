"""Tasks that hand back what they were given, everywhere a task can put text, for the page's
hostile-content test (tests/test_web_hostile.py): the page must show all of it as text."""

from __future__ import annotations

import logging

from bulkrunner.runtime import Context


def parrot(text: str, ctx: Context | None = None) -> dict[str, str]:
    """Print, log and report ``text`` as progress, and return it as a result."""
    print(text)
    logging.getLogger("tests.page_tasks").warning("%s", text)
    if ctx is not None:
        ctx.progress(1, 2, text)
    return {"text": text, "link": text}


def shout(text: str) -> None:
    """Fail with ``text`` as the error message."""
    raise ValueError(text)
