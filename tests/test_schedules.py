"""Schedules against a real server: an ``every`` schedule fires once per fire time with its
name and key, a kill -9 and restart never fires a time twice, downtime is caught up with
one job, a disabled schedule never fires, a cron schedule's next run is right in its zone,
config errors stop ``serve`` with exit 2 naming the key, SIGTERM stops cleanly."""

from __future__ import annotations

import http.client
import re
import signal
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit
from zoneinfo import ZoneInfo

import pytest

from bulkrunner.client import Client
from tests.conftest import run_cli, toml_config, wait_for

pytestmark = pytest.mark.slow

KEY = re.compile(r"^schedule:(?P<name>[\w-]+):(?P<at>\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ)$")


def _ts(text: str) -> float:
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def _config(tmp: Path, schedules: str) -> Path:
    return toml_config(tmp, extra=schedules)


def _fires(c: Client, name: str) -> dict[float, list[dict[str, Any]]]:
    """The jobs of schedule ``name`` by fire time (read from each job's key)."""
    out: dict[float, list[dict[str, Any]]] = {}
    for job in c.jobs(limit=1000)["jobs"]:
        if job["schedule"] != name:
            continue
        m = KEY.match(job["key"] or "")
        assert m and m["name"] == name, f"job {job['id']} of {name} has the key {job['key']!r}"
        out.setdefault(_ts(m["at"]), []).append(job)
    return out


def _wait_fires(c: Client, name: str, n: int, after: float = 0.0,
                timeout: float = 15) -> dict[float, list[dict[str, Any]]]:
    """Wait until schedule ``name`` has ``n`` fire times later than ``after``."""
    def enough() -> dict[float, list[dict[str, Any]]] | None:
        fires = _fires(c, name)
        return fires if sum(1 for t in fires if t > after) >= n else None
    found: dict[float, list[dict[str, Any]]] = wait_for(
        enough, timeout, f"{n} firings of {name} after {after}", interval=0.2)
    return found


TICK = '[schedules.tick]\ntask = "noop"\nevery = "1s"\n'


def test_every_second_fires_about_once_a_second_with_its_name_and_key(
        serve: Any, tmp_path: Path) -> None:
    srv = serve(_config(tmp_path, TICK))
    with Client(srv.url) as c:
        fires = _wait_fires(c, "tick", 4)
        times = sorted(fires)
        for t, jobs in fires.items():
            assert len(jobs) == 1, f"fire time {t} has {len(jobs)} jobs"
            job = jobs[0]
            assert t == int(t), f"fire times are whole seconds: {t}"
            assert job["schedule"] == "tick" and job["task"] == "noop"
            assert _ts(job["created_at"]) >= t, f"job {job['id']} created before its time"
        # About once a second: one job per second of the span (a slow moment may make
        # the thread skip to the latest time, never fire one twice).
        span = int(times[-1] - times[0]) + 1
        assert len(times) >= span - 1, f"{len(times)} firings over {span} s: {times}"
        (tick,) = c.schedules()["schedules"]
        later = _fires(c, "tick")
    assert tick["name"] == "tick" and tick["every"] == 1 and tick["cron"] is None
    assert tick["enabled"] is True and tick["task"] == "noop"
    assert _ts(tick["last_run"]) >= times[-1]
    assert _ts(tick["next_run"]) > _ts(tick["last_run"])
    assert [j["id"] for j in later[_ts(tick["last_run"])]] == [tick["last_job"]]
    page = _page(srv.url, f"/jobs/{tick['last_job']}")
    assert "<dt>Schedule</dt>" in page and ">tick</a>" in page


def test_kill_9_and_restart_never_fires_a_time_twice(serve: Any, tmp_path: Path) -> None:
    cfg = _config(tmp_path, TICK)
    srv = serve(cfg)
    with Client(srv.url) as c:
        before = _wait_fires(c, "tick", 3)
    srv.stop()  # SIGKILL, whatever the scheduler was doing
    srv = serve(cfg)
    with Client(srv.url) as c:
        fires = _wait_fires(c, "tick", 3, after=max(before))
        srv.stop()
    twice = {t: [j["id"] for j in jobs] for t, jobs in fires.items() if len(jobs) > 1}
    assert not twice, f"fire times with two jobs: {twice}"
    assert set(before) <= set(fires), "a job of the first run went missing"


def test_four_seconds_down_are_caught_up_with_one_job(serve: Any, tmp_path: Path) -> None:
    cfg = _config(tmp_path, TICK)
    srv = serve(cfg)
    with Client(srv.url) as c:
        _wait_fires(c, "tick", 2)
    srv.stop()
    killed = time.time()
    wait_for(lambda: time.time() >= killed + 4, 10, "4 s of downtime")
    srv = serve(cfg)
    ready = time.time()
    with Client(srv.url) as c:
        fires = _wait_fires(c, "tick", 1, after=killed)
        srv.stop()
    last_before = max(t for t in fires if t <= killed)
    first_after = min(t for t in fires if t > last_before)
    assert first_after - last_before >= 4, (
        f"missed fire times got jobs of their own: {sorted(fires)}")
    assert first_after <= ready, (
        f"the first job after the restart is for {first_after}, a time after the server "
        f"was ready ({ready}): the missed firings were not caught up")
    caught = [t for t in fires if last_before < t <= first_after]
    assert caught == [first_after]
    line = wait_for(lambda: re.search(r"schedule tick missed (\d+) firing\(s\) while the "
                                      r"server was down: one job catches up, for the "
                                      r"latest \((\S+)\)", srv.log()), 5, "the catch-up line")
    assert int(line[1]) >= 4 and _ts(line[2]) == first_after, line[0]


def test_a_disabled_schedule_never_fires(serve: Any, tmp_path: Path) -> None:
    srv = serve(_config(tmp_path, TICK + '[schedules.off]\ntask = "noop"\nevery = "1s"\n'
                                          'enabled = false\n'))
    with Client(srv.url) as c:
        _wait_fires(c, "tick", 3)
        assert _fires(c, "off") == {}
        by_name = {s["name"]: s for s in c.schedules()["schedules"]}
    off = by_name["off"]
    assert off["enabled"] is False and off["next_run"] is None and off["last_run"] is None
    assert by_name["tick"]["enabled"] is True and by_name["tick"]["next_run"]


def _next_local(zone: str, hour: int, minute: int, now: datetime) -> datetime:
    """The next ``hour:minute`` wall-clock time in ``zone`` after ``now`` (a time that
    exists every day there), by plain datetime arithmetic, not a cron library."""
    tz = ZoneInfo(zone)
    local = now.astimezone(tz)
    at = datetime(local.year, local.month, local.day, hour, minute, tzinfo=tz)
    while at <= local:
        day = at + timedelta(days=1)
        at = datetime(day.year, day.month, day.day, hour, minute, tzinfo=tz)
    return at


def _page(url: str, path: str) -> str:
    u = urlsplit(url)
    conn = http.client.HTTPConnection(u.hostname or "127.0.0.1", u.port, timeout=30)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        assert resp.status == 200, resp.status
        return resp.read().decode()
    finally:
        conn.close()


def test_a_cron_schedules_next_run_is_right_in_its_zone(serve: Any, tmp_path: Path) -> None:
    srv = serve(_config(tmp_path, '[schedules.nightly]\ntask = "noop"\ncron = "0 3 * * *"\n'
                                  'timezone = "America/New_York"\n'
                                  '[schedules.kolkata]\ntask = "noop"\n'
                                  'cron = "30 2 * * mon-fri"\ntimezone = "Asia/Kolkata"\n'))
    now = datetime.now(UTC)
    with Client(srv.url) as c:
        by_name = {s["name"]: s for s in c.schedules()["schedules"]}
    nightly = by_name["nightly"]
    assert nightly["cron"] == "0 3 * * *" and nightly["timezone"] == "America/New_York"
    assert nightly["every"] is None and nightly["last_run"] is None
    expected = _next_local("America/New_York", 3, 0, now)
    assert _ts(nightly["next_run"]) == expected.timestamp(), (nightly, expected.isoformat())
    kolkata = _next_local("Asia/Kolkata", 2, 30, now)
    while kolkata.weekday() >= 5:  # mon-fri
        kolkata = _next_local("Asia/Kolkata", 2, 30, kolkata)
    assert _ts(by_name["kolkata"]["next_run"]) == kolkata.timestamp()
    # The CLI shows it in the schedule's own zone, the page too, with the cron in words.
    out = run_cli("schedules", url=srv.url)
    assert out.returncode == 0, out.stderr
    row = next(line for line in out.stdout.splitlines() if line.startswith("nightly"))
    assert "cron 0 3 * * * (America/New_York)" in row
    assert expected.strftime("%Y-%m-%d 03:00:00 %Z") in row, row
    page = _page(srv.url, "/schedules")
    assert "At 03:00" in page and "America/New_York" in page
    assert expected.strftime("%Y-%m-%d 03:00:00 %Z") in page
    js = run_cli("schedules", "--json", url=srv.url)
    assert js.returncode == 0 and '"next_run"' in js.stdout


SCHEDULE_ERRORS = [
    ('[schedules.x]\ntask = "noop"\ncron = "0 3 * *"\n', "schedules.x.cron", "five fields"),
    ('[schedules.x]\ntask = "noop"\ncron = "0 0 30 2 *"\n', "schedules.x.cron", "can fire"),
    ('[schedules.x]\ntask = "noop"\ncron = "0 25 * * *"\n', "schedules.x.cron", "cron"),
    ('[schedules.x]\ntask = "noop"\ncron = "0 3 * * *"\ntimezone = "Mars/Olympus"\n',
     "schedules.x.timezone", "IANA time zone"),
    ('[schedules.x]\ntask = "noop"\ncron = "0 3 * * *"\nevery = "1h"\n', "schedules.x",
     "exactly one of"),
    ('[schedules.x]\ntask = "noop"\n', "schedules.x", "exactly one of"),
    ('[schedules.x]\ntask = "nosuch"\nevery = "1h"\n', "schedules.x.task", "not in [tasks]"),
    ('[schedules.x]\ntask = "noop"\nevery = "0.5s"\n', "schedules.x.every", "whole number"),
    ('[schedules.x]\ntask = "noop"\nevery = "soon"\n', "schedules.x.every", "seconds"),
    ('[schedules.x]\ntask = "add"\nevery = "1h"\nparams = { b = 2 }\n',
     "schedules.x.params", "a: required param is missing"),
    ('[schedules.x]\ntask = "noop"\nevery = "1h"\ncolour = "red"\n', "schedules.x.colour",
     "unknown key"),
]


@pytest.mark.parametrize(("toml", "key", "says"), SCHEDULE_ERRORS,
                         ids=[f"{k}-{s.split()[0]}" for _, k, s in SCHEDULE_ERRORS])
def test_each_config_error_stops_serve_with_exit_2_naming_its_key(
        tmp_path: Path, toml: str, key: str, says: str) -> None:
    cfg = _config(tmp_path, toml)
    out = run_cli("--config", str(cfg), "serve", cwd=tmp_path)
    assert out.returncode == 2, (out.returncode, out.stdout, out.stderr)
    assert f"key {key}:" in out.stderr and says in out.stderr, out.stderr
    assert str(cfg) in out.stderr, "the message names the file"


def test_sigterm_stops_the_scheduler_cleanly(serve: Any, tmp_path: Path) -> None:
    srv = serve(_config(tmp_path, TICK))
    with Client(srv.url) as c:
        _wait_fires(c, "tick", 2)
    srv.signal(signal.SIGTERM)
    assert srv.wait(20) == 0
    log = srv.log()
    assert "bulkrunner stopped" in log and "Traceback" not in log, log


def test_a_firing_submitted_before_a_kill_is_replayed_not_doubled(tmp_path: Path) -> None:
    """A server killed after submitting a firing's job but before recording it submits the
    same fire time again at its next start: the key makes it the same job."""
    from bulkrunner.config import load_config
    from bulkrunner.server.app import create_app
    from bulkrunner.server.scheduler import Rule, fire_key

    cfg = load_config(_config(tmp_path, '[schedules.hourly]\ntask = "add"\nevery = "1h"\n'
                                         'params = { a = 1 }\n'))
    app = create_app(cfg, start=False)
    svc = app.extensions["bulkrunner"]
    due = Rule(cfg.schedules[0]).latest(time.time())
    # What the killed server left: its schedule seen long ago and fired an hour before
    # ``due``, and the job for ``due`` committed but not recorded.
    svc.store.schedule_runs(["hourly"])
    svc.store.record_fire("hourly", due - 3600, None)
    svc.store.write(lambda tx: tx.conn.execute(
        "UPDATE schedule_runs SET first_seen = ? WHERE name = 'hourly'", (due - 7200,)))
    body = {"task": "add", "params": {"a": 1}, "priority": 0, "key": fire_key("hourly", due)}
    first, created = svc.submit(body, schedule="hourly")
    assert created
    svc.close(grace=0)

    app = create_app(cfg)  # starts: the scheduler catches up ``due``
    try:
        client = app.test_client()
        jobs = [j for j in client.get("/api/v1/jobs?limit=100").get_json()["jobs"]
                if j["schedule"] == "hourly"]
        assert [j["id"] for j in jobs] == [first.id]
        (listed,) = client.get("/api/v1/schedules").get_json()["schedules"]
        assert listed["last_job"] == first.id and _ts(listed["last_run"]) == due
    finally:
        app.extensions["bulkrunner"].close(grace=0)


def test_cron_times_across_daylight_saving_changes_fire_once() -> None:
    """Read in its zone, a cron time repeated when the clocks go back fires once; one that
    never happens when they go forward fires at the first moment after it."""
    from bulkrunner.config import ScheduleConfig
    from bulkrunner.server.scheduler import Rule

    tz = ZoneInfo("America/New_York")

    def fires(cron: str, start: datetime, n: int = 3) -> list[str]:
        rule = Rule(ScheduleConfig(name="x", task="noop", cron=cron,
                                   timezone="America/New_York"))
        out, t = [], start.timestamp()
        for _ in range(n):
            t = rule.after(t)
            out.append(datetime.fromtimestamp(t, tz).isoformat())
        return out

    fall, spring = datetime(2026, 10, 31, 23, tzinfo=tz), datetime(2026, 3, 7, 23, tzinfo=tz)
    assert fires("30 1 * * *", fall) == ["2026-11-01T01:30:00-04:00",
                                         "2026-11-02T01:30:00-05:00",
                                         "2026-11-03T01:30:00-05:00"]
    assert fires("30 2 * * *", spring) == ["2026-03-08T03:00:00-04:00",
                                           "2026-03-09T02:30:00-04:00",
                                           "2026-03-10T02:30:00-04:00"]
    assert fires("0 3 * * *", spring) == ["2026-03-08T03:00:00-04:00",
                                          "2026-03-09T03:00:00-04:00",
                                          "2026-03-10T03:00:00-04:00"]
    rule = Rule(ScheduleConfig(name="x", task="noop", cron="30 1 * * *",
                               timezone="America/New_York"))
    second = datetime(2026, 11, 1, 1, 45, fold=1, tzinfo=tz).timestamp()  # 01:45 EST
    assert datetime.fromtimestamp(rule.latest(second), tz).isoformat() == \
        "2026-11-01T01:30:00-04:00"


def test_times_a_schedule_was_disabled_are_not_caught_up(tmp_path: Path) -> None:
    """Enabled again after a start with ``enabled = false``, a schedule does not catch up
    the fire times it missed while disabled; missed while the server was down, it does."""
    from bulkrunner.config import load_config
    from bulkrunner.server.app import create_app
    from bulkrunner.server.scheduler import Rule

    rule = '[schedules.h]\ntask = "noop"\nevery = "1h"\n'

    def run(where: Path, *, enabled: bool = True, ran_long_ago: bool = False
            ) -> list[dict[str, Any]]:
        where.mkdir(exist_ok=True)
        cfg = load_config(_config(where, rule + ("" if enabled else "enabled = false\n")))
        due = Rule(cfg.schedules[0]).latest(time.time())
        app = create_app(cfg, start=False)
        svc = app.extensions["bulkrunner"]
        if ran_long_ago:  # seen five hours before the latest fire time, fired at -3 h
            svc.store.schedule_runs(["h"])
            svc.store.record_fire("h", due - 3 * 3600, None)
            svc.store.write(lambda tx: tx.conn.execute(
                "UPDATE schedule_runs SET first_seen = ? WHERE name = 'h'",
                (due - 5 * 3600,)))
        svc.start()
        try:
            jobs = app.test_client().get("/api/v1/jobs?limit=100").get_json()["jobs"]
            return [j for j in jobs if j["schedule"] == "h"]
        finally:
            svc.close(grace=0)

    down = tmp_path / "down"
    assert len(run(down, ran_long_ago=True)) == 1, "missed while down: one catch-up job"
    disabled = tmp_path / "disabled"
    assert run(disabled, enabled=False, ran_long_ago=True) == []
    assert run(disabled) == [], "enabled again: the times it was disabled are not caught up"
