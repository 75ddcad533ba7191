"""How the ``bulkrunner`` command fails: click exceptions that carry their exit code.

Exit codes: 0 success; 1 the job ended failed or cancelled; 2 usage or input error,
including a 4xx from the server; 3 the server cannot be reached or answered 5xx; 4
``wait --timeout`` elapsed. :class:`BulkrunnerGroup` is the one place where bulkrunner's
own errors become these.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import IO, TYPE_CHECKING, Any, NoReturn

import click

from bulkrunner.client import display
from bulkrunner.errors import ApiError, BulkrunnerError, ServerUnreachable

if TYPE_CHECKING:
    from bulkrunner.models import ParamSpec

EXIT_FAILED, EXIT_USAGE, EXIT_UNREACHABLE, EXIT_TIMEOUT = 1, 2, 3, 4


class CliError(click.ClickException):
    """An error the CLI reports as ``error: <message>`` on stderr, exiting with ``exit_code``.

    Raised as is, it is a usage or input error (exit 2), the server's 4xx refusals included;
    the subclasses carry the other exit codes. Unlike :class:`click.UsageError`
    it prints no usage line: the command line was well formed, what it asked for was not.
    """

    exit_code = EXIT_USAGE

    def format_message(self) -> str:
        """The message, its control characters escaped (it may quote the server)."""
        return display.clean(self.message)

    def show(self, file: IO[Any] | None = None) -> None:
        """Print ``error: <message>`` to ``file``, stderr by default."""
        click.echo(f"error: {self.format_message()}", file=file, err=file is None,
                   color=self.show_color)


class ServerError(CliError):
    """The server cannot be reached, or answered 5xx (busy, shutting down, broken): exit 3."""

    exit_code = EXIT_UNREACHABLE


class WaitTimeout(CliError):
    """``wait --timeout`` (or ``submit --wait``) gave up before the job finished: exit 4."""

    exit_code = EXIT_TIMEOUT


def translate(e: BulkrunnerError) -> CliError:
    """The :class:`CliError` that reports ``e``, with its exit code."""
    if isinstance(e, ServerUnreachable):
        return ServerError(e.message)
    if isinstance(e, ApiError):
        if e.status >= 500:
            # Busy, shutting down or broken: the server, not the input, is the problem.
            return ServerError(f"the server cannot take this now: {e.message}")
        fields = e.details.get("fields") if isinstance(e.details, dict) else None
        if isinstance(fields, dict) and len(fields) > 1:
            return CliError("the server refused the submission:\n" + "\n".join(
                f"  {k}: {v}" for k, v in fields.items()))
        return CliError(e.message)
    return CliError(e.message)  # ConfigError, and any other error bulkrunner raises on purpose


_PARAM_FIELD = re.compile(r"params\.(?P<name>[^.\[\]]+)")
#: A field of an uploaded file's item, as the server names it: ``row 3 (item 1), url``.
_FILE_FIELD = re.compile(r"(?:row|line|item) \d+(?: \(item \d+\))?, (?P<name>.+)")


def param_hints(e: ApiError, specs: Callable[[], dict[str, ParamSpec]]) -> list[str]:
    """For a 422 that says a job-level param is required or missing (``params.url:
    required param is missing``), the line that tells how to give it:
    ``hint: give it with --param url=<str>``, the type from the task's ``specs()``; for an
    item of an items file that lacks it (``row 2 (item 0), url: …``), once per param, how to
    give it there or to every item. No hint for a param the listing does not show, or when
    the listing cannot be had."""
    fields = e.details.get("fields") if isinstance(e.details, dict) else None
    if not isinstance(fields, dict):
        return []
    hints: list[str] = []
    seen: set[str] = set()
    for field, problem in fields.items():
        m = _PARAM_FIELD.fullmatch(str(field))
        in_file = m is None and (m := _FILE_FIELD.fullmatch(str(field))) is not None
        text = str(problem).lower()
        if m is None or ("required" not in text and "missing" not in text):
            continue
        name = m.group("name")
        if name in seen:
            continue
        seen.add(name)
        try:
            spec = specs().get(name)
        except Exception:  # the task listing is only for the hint: none, if it fails
            return []
        if spec is None:  # a param the task does not take (or whose type is unknown)
            continue
        if in_file:
            hints.append(f"hint: give {name} in a column (or key) of the items file, or to "
                         f"every item with --param {name}=<{spec.type}>")
        else:
            hints.append(f"hint: give it with --param {name}=<{spec.type}>")
    return hints


class BulkrunnerGroup(click.Group):
    """The command group; the one place where bulkrunner's errors become click's."""

    def invoke(self, ctx: click.Context) -> Any:
        """Run the command; a :class:`~bulkrunner.errors.BulkrunnerError` it raises comes
        out as the matching :class:`CliError`, which click prints and exits with."""
        try:
            return super().invoke(ctx)
        except BulkrunnerError as e:
            raise translate(e) from e


def exit_for(job: dict[str, Any]) -> NoReturn:
    """Exit 0 if the job succeeded, 1 if it failed or was cancelled."""
    click.get_current_context().exit(0 if job["state"] == "succeeded" else EXIT_FAILED)
