"""Checks before serving: secret files other users may read, and the open-file limit."""

from __future__ import annotations

import os
import stat

#: Files the process needs besides its connections (database, logs, pipes, item files).
FD_HEADROOM = 256


def file_mode_warnings(*, token_file: str = "", database: str = "") -> list[str]:
    """A sentence for each secret file that other users on this machine may read or change:
    the token file, and the database with its ``-wal`` and ``-shm`` files (the params,
    results and logs of every job). Files that do not exist are not checked.

    The store creates a new database 0600 (its -wal and -shm take its mode); an older one,
    or one whose mode was changed, keeps its mode: it may be shared on purpose, so it is
    named here rather than changed.
    """
    out = []
    if token_file:
        exposed = _exposure(token_file)
        if exposed:
            said, readable = exposed
            harm = ("read the token and use the server as you" if readable
                    else "replace the token")
            out.append(f"the token file {token_file} {said}, so they can {harm}; fix: "
                       f"chmod 600 {token_file}")
    if database and database != ":memory:":
        found = [(f, e) for f in (database, f"{database}-wal", f"{database}-shm")
                 if (e := _exposure(f))]
        if found:
            (first, (said, _)), rest = found[0], [f[len(database):] for f, _ in found[1:]]
            also = (f" (its {' and '.join(rest)} file{'s' if len(rest) > 1 else ''} too)"
                    if rest else "")
            harm = ("read the params, results and logs of every job"
                    if any(readable for _, (_, readable) in found) else "change the jobs")
            out.append(f"the database file {first} {said}{also}, so they can {harm}; fix: "
                       f"chmod 600 {' '.join(f for f, _ in found)}")
    return out


def _exposure(path: str) -> tuple[str, bool] | None:
    """How other users may get at ``path`` ("has mode 0640: its group can read it") and
    whether they can read it; None when only its owner can (or it does not exist)."""
    try:
        mode = stat.S_IMODE(os.stat(path).st_mode)
    except OSError:
        return None
    def can(shift: int) -> str:
        return " and ".join(c for c, bit in (("read", 4), ("change", 2)) if mode >> shift & bit)

    group, others = can(3), can(0)
    if not group and not others:  # no one else, or execute bits only
        return None
    if group == others:
        said = f"its group and everyone can {group} it"
    else:
        said = " and ".join(f"{who} can {what} it" for who, what in
                            (("its group", group), ("everyone", others)) if what)
    return f"has mode {mode:04o}: {said}", bool(mode & 0o044)


def raise_file_limit(connection_limit: int) -> str | None:
    """Raise this process's open-file limit (``ulimit -n``) to what ``connection_limit``
    connections need, as far as the hard limit allows; a warning when it stays too low."""
    try:
        import resource
    except ImportError:  # not on this platform
        return None
    need = connection_limit + FD_HEADROOM
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft >= need:
        return None
    new = need if hard == resource.RLIM_INFINITY else min(need, hard)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))
    except (ValueError, OSError):
        new = soft
    if new >= need:
        return None
    return (f"server.connection_limit is {connection_limit} but this process may open only "
            f"{new} files (ulimit -n); past about {max(new - FD_HEADROOM, 0)} connections "
            f"accepting fails: raise the limit to {need} or more (ulimit -n, LimitNOFILE= "
            "in a systemd unit) or lower server.connection_limit")


__all__ = ["FD_HEADROOM", "file_mode_warnings", "raise_file_limit"]
