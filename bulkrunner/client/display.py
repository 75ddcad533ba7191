"""How the CLI shows jobs: a summary, a table, and a progress line. Pure formatting.

Everything here that comes from the server (ids, names, messages, errors, tracebacks,
results, params) goes through :func:`clean`, so what a task or a submitter put in a job
cannot drive the terminal of whoever looks at it.
"""

from __future__ import annotations

import json
import re
import shutil
import time
from datetime import datetime
from typing import Any

from bulkrunner.models import FINISHED, attempts_text

STATE_MARK = {"queued": "…", "running": "▸", "succeeded": "✓", "failed": "✗",
              "cancelled": "⊘", "paused": "‖"}
#: Why a job's queued items wait, in words.
WAITING = {"paused": "the job is paused (bulkrunner resume ID)",
           "task_paused": "its task is paused (bulkrunner resume --task NAME)",
           "run_after": "its start time has not come",
           "concurrency": "its task's concurrency limit is reached",
           "rate_limit": "its task's rate limit is reached"}


# Unicode category Cc (C0 controls, DEL, C1 controls) except tab and newline.
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def _escape(m: re.Match[str]) -> str:
    return f"\\x{ord(m.group()):02x}"


def clean(text: str) -> str:
    """``text`` made safe to print on a terminal (or into a file someone will ``cat``).

    Every control character (Unicode category Cc: the C0 range with ESC, BEL, BS and CR,
    DEL, and the C1 range with its one-character CSI ``\\x9b``) becomes a visible
    ``\\x1b``-style escape, except newline and tab, which are kept. So a job error such as
    ``"\\x1b]0;PWNED\\x07\\x1b[31mRED"`` prints as ``\\x1b]0;PWNED\\x07\\x1b[31mRED``
    instead of retitling the window and turning the rest of the screen red; the readable text
    stays. Carriage return is escaped too: it would let one line overwrite another. Other
    characters, backslashes included, are left as they are, so ``clean`` is idempotent (and
    a literal ``\\x1b`` in the text looks like an escaped one: this is for reading, not a
    reversible encoding).
    """
    return _CONTROL.sub(_escape, text)


def _when(ts: str | None) -> str:
    if not ts:
        return "-"
    try:
        d = datetime.fromisoformat(ts.replace("Z", "+00:00")).astimezone()
    except ValueError:
        return ts
    return d.strftime("%Y-%m-%d %H:%M:%S")


def _short(value: Any, width: int) -> str:
    text = clean(value if isinstance(value, str) else json.dumps(value))
    return text if len(text) <= width else text[: width - 1] + "…"


def summary(job: dict[str, Any], pace: dict[str, Any] | None = None) -> str:
    """A readable multi-line summary of one job (with ``pace``, from the job's pace
    route: its current rate against its limit, and the time left)."""
    c = job["items"]
    lines = [
        f"job       {job['id']}",
        f"task      {job['task']}",
        f"state     {job['state']}",
        f"items     {c['total']} total: {c['succeeded']} succeeded, {c['failed']} failed, "
        f"{c['running']} running, {c['queued']} queued, {c['cancelled']} cancelled",
        f"progress  {job['progress'] * 100:.0f}%",
    ]
    if job.get("params"):
        lines.append(f"params    {_short(job['params'], 200)}")
    if job.get("message"):
        lines.append(f"message   {job['message']}")
    if job.get("submitted_by"):
        lines.append(f"by        {job['submitted_by']}")
    lines.append(f"created   {_when(job.get('created_at'))}")
    if job.get("run_after") and job["state"] not in FINISHED:
        lines.append(f"runs at   {_when(job['run_after'])}")
    if job.get("waiting"):
        lines.append(f"waiting   {WAITING.get(job['waiting'], job['waiting'])}")
    if pace is not None and job["state"] not in FINISHED:
        lines.append(f"rate      {pace_line(pace)}")
    if job.get("started_at"):
        lines.append(f"started   {_when(job['started_at'])}")
    if job.get("finished_at"):
        lines.append(f"finished  {_when(job['finished_at'])}")
    if job.get("result") is not None:
        lines.append(f"result    {_short(job['result'], 2000)}")
    lines += failure_lines(job)
    err = job.get("error")
    if err:
        lines.append(f"error     {err.get('type')}: {err.get('message')}")
        # Cleaned before it is split, so a control character in it is shown, not a line break.
        tb = clean(err.get("traceback") or "").rstrip()
        if tb:
            lines.append("traceback\n" + "\n".join("  " + ln for ln in tb.split("\n")))
    return clean("\n".join(lines))


def pace_line(pace: dict[str, Any]) -> str:
    """``3.2 items/s (limit 5/s), about 12 s left`` from a job's pace."""
    rate = pace.get("rate")
    text = "none measured yet" if rate is None else f"{rate:.3g} items/s"
    if pace.get("rate_limit"):
        text += f" (limit {pace['rate_limit']})"
    eta = pace.get("eta_seconds")
    if eta is not None and pace.get("left"):
        text += f", {_duration(eta)} left" if eta < 1 else f", about {_duration(eta)} left"
    return text


def _duration(seconds: float) -> str:
    s = round(seconds)
    if s < 1:
        return "under a second"
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60} s"
    return f"{s // 3600} h {s % 3600 // 60} min"


def failure(group: dict[str, Any]) -> str:
    """One group of a job's ``failures``: ``3 × ValueError: bad input (first: item 7)``, on
    one line (a newline in the message is shown as ``\\n``)."""
    message = str(group.get("message", "")).replace("\r\n", "\n").replace("\n", "\\n")
    return clean(f"{group.get('count')} × {group.get('type')}: {message} "
                 f"(first: item {group.get('first_index')})")


def failure_lines(job: dict[str, Any], label: str = "failures  ") -> list[str]:
    """The lines of :func:`summary` that say why items failed: one per group of the job's
    ``failures`` (none when no item failed, or from a server that does not group them), and
    how many failed items the groups shown leave out."""
    groups = job.get("failures") or []
    if not groups:
        return []
    pad = " " * len(label)
    lines = [(label if i == 0 else pad) + failure(g) for i, g in enumerate(groups)]
    rest = job["items"]["failed"] - sum(int(g.get("count", 0)) for g in groups)
    if rest > 0:
        lines.append(f"{pad}… and {rest} more failed item(s) with other errors")
    return lines


def _compact(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def _cut(text: str, width: int) -> str:
    return text if len(text) <= width else text[: max(width - 1, 0)] + "…"


def _outcome(item: dict[str, Any]) -> str:
    err = item.get("error")
    if err:
        return f"{err.get('type')}: {err.get('message')}"
    if item.get("state") == "succeeded":
        return _compact(item.get("result"))
    return ""


def items_table(items: list[dict[str, Any]], width: int | None = None) -> str:
    """Items (as the API shows them) as a table: index, state, attempts (as
    :func:`~bulkrunner.models.attempts_text` words them), params, and the result or error,
    params and result as compact JSON, cut to fit ``width`` columns (by default the
    terminal's)."""
    if not items:
        return "no items"
    cols = width or shutil.get_terminal_size((100, 20)).columns
    rows = [(str(i.get("index")), clean(str(i.get("state"))), attempts_text(i),
             clean(_compact(i.get("params"))),
             clean(_outcome(i)).replace("\n", "\\n").replace("\t", " ")) for i in items]
    head = ("INDEX", "STATE", "ATTEMPTS", "PARAMS", "RESULT / ERROR")
    fixed = [max(len(r[k]) for r in [head, *rows]) for k in range(3)]
    room = max(cols - sum(fixed) - 2 * 4 - 1, 20)  # the last column is never padded
    need_p = max(len(r[3]) for r in [head, *rows])
    need_o = max(len(r[4]) for r in [head, *rows])
    if need_p + need_o <= room:
        wp = need_p
    else:  # params get up to half of the room, more when the outcomes are short
        wp = max(min(need_p, max(room // 2, room - need_o)), len(head[3]))
    wo = max(room - wp, len(head[4]))
    out = []
    for r in [head, *rows]:
        cells = [r[0].rjust(fixed[0]), r[1].ljust(fixed[1]), r[2].rjust(fixed[2]),
                 _cut(r[3], wp).ljust(wp), _cut(r[4], wo)]
        out.append("  ".join(cells).rstrip())
    return "\n".join(out)


def table(jobs: list[dict[str, Any]]) -> str:
    """Recent jobs as a fixed-width table."""
    if not jobs:
        return "no jobs"
    by = any(j.get("submitted_by") for j in jobs)  # a column only where tokens have names
    rows = [("ID", "TASK", "STATE", "ITEMS", "PROGRESS", "CREATED", *(["BY"] if by else []))]
    for j in jobs:
        c = j["items"]
        rows.append((clean(j["id"][:12]), _short(j["task"], 20), clean(j["state"]),
                     f"{c['succeeded'] + c['failed'] + c['cancelled']}/{c['total']}",
                     f"{j['progress'] * 100:.0f}%", clean(_when(j["created_at"])),
                     *([_short(j.get("submitted_by") or "-", 20)] if by else [])))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)).rstrip()
                     for r in rows)


class ProgressLine:
    """A one-line progress bar with counts, rate and ETA, redrawn in place on a terminal;
    on anything else a plain line whenever the counts change (at most once a second)."""

    def __init__(self, tty: bool) -> None:
        self.tty = tty
        self.start = time.monotonic()
        self.first_done: int | None = None
        self._last_plain = ""
        self._last_plain_at = 0.0

    def render(self, job: dict[str, Any]) -> str:
        """The line to show for ``job`` (a job dict from the API)."""
        c = job["items"]
        done = c["succeeded"] + c["failed"] + c["cancelled"]
        if self.first_done is None:
            self.first_done = done
        elapsed = max(time.monotonic() - self.start, 1e-6)
        rate = (done - self.first_done) / elapsed
        left = c["total"] - done
        eta = f"ETA {_dur(left / rate)}" if rate > 0 and left else ""
        frac = job["progress"]
        width = max(10, min(30, shutil.get_terminal_size((80, 20)).columns - 70))
        bar = "█" * int(frac * width) + "░" * (width - int(frac * width))
        parts = [f"{clean(job['state']):<9}", f"{bar} {frac * 100:3.0f}%",
                 f"{done}/{c['total']}"]
        if c["failed"]:
            parts.append(f"{c['failed']} failed")
        if rate > 0:
            parts.append(f"{rate:.1f}/s")
        if eta:
            parts.append(eta)
        if job.get("message"):
            parts.append(_short(job["message"], 40))
        return "  ".join(parts)

    def update(self, job: dict[str, Any]) -> str | None:
        """The text to write for this update, or None when nothing should be written."""
        text = self.render(job)
        if self.tty:
            cols = shutil.get_terminal_size((80, 20)).columns
            return "\r" + text[: cols - 1].ljust(cols - 1)
        c = job["items"]
        key = f"{job['state']} {c['succeeded']} {c['failed']} {c['cancelled']}"
        now = time.monotonic()
        finished = job["state"] in FINISHED
        if key != self._last_plain and (finished or now - self._last_plain_at >= 1.0):
            self._last_plain, self._last_plain_at = key, now
            return text + "\n"
        return None


def _dur(seconds: float) -> str:
    s = int(seconds)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}" if s >= 3600 else \
        f"{s // 60}:{s % 60:02d}"
