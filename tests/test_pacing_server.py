"""Pacing against a real server: fair share between jobs, priority, per-task concurrency
and rate limits, pause and resume of jobs and tasks, delay and run_after, across restarts
and on every executor."""

from __future__ import annotations

import importlib.util
import json
import signal
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest

from bulkrunner.client import Client
from bulkrunner.errors import ApiError
from tests.conftest import (
    SAMPLE_TASKS,
    all_items,
    run_cli,
    toml_config,
    wait_for,
    wait_job,
)

pytestmark = pytest.mark.slow

HAVE_DASK = importlib.util.find_spec("distributed") is not None
LIMITED = """
[tasks.limited]
path = "tests.sample_tasks:slow"
concurrency = 2
[tasks.rated]
path = "tests.sample_tasks:add"
rate_limit = "5/s"
[tasks.held]
path = "tests.sample_tasks:slow"
"""


def _ts(text: str | None) -> float:
    assert text is not None
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def _config(tmp: Path, *, max_workers: int = 1, executor: str = "thread",
            fair_share: bool = True) -> Path:
    path = toml_config(tmp, executor=executor, max_workers=max_workers, extra=LIMITED)
    text = path.read_text().replace(f"max_workers = {max_workers}\n",
                                    f"max_workers = {max_workers}\n"
                                    f"fair_share = {str(fair_share).lower()}\n", 1)
    path.write_text(text)
    return path


def _bulk(c: Client, task: str, n: int, **params: Any) -> dict[str, Any]:
    return c.submit(task, params, items=[{} for _ in range(n)])


def _max_overlap(intervals: list[tuple[float, float]]) -> int:
    """Most intervals open at once; an end at the same moment as a start comes first (the
    slot was handed over in one transaction)."""
    events = sorted([(s, 1) for s, _ in intervals] + [(e, -1) for _, e in intervals])
    now = best = 0
    for _, d in events:
        now += d
        best = max(best, now)
    return best


def _intervals(c: Client, job_id: str) -> list[tuple[float, float]]:
    return [(_ts(i["started_at"]), _ts(i["finished_at"])) for i in all_items(c, job_id)]


# ------------------------------------------------------------------ fair share and priority
def test_a_small_job_behind_a_bulk_takes_its_turn(tmp_path: Path, serve: Any) -> None:
    srv = serve(_config(tmp_path))
    with Client(srv.url) as c:
        bulk = _bulk(c, "slow", 40, seconds=0.05)
        wait_for(lambda: c.job(bulk["id"])["items"]["succeeded"] >= 1, 20,
                 "the bulk to start")
        small = c.submit("add", {"a": 1})
        small = wait_job(c, small["id"], 20)
        assert small["state"] == "succeeded"
        started_before = [i for i in all_items(c, bulk["id"])
                          if i["started_at"] and _ts(i["started_at"]) <= _ts(small["finished_at"])]
        # With one worker, it ran after at most the bulk's running item and one more turn.
        assert len(started_before) <= 5, len(started_before)
        assert wait_job(c, bulk["id"], 30)["state"] == "succeeded"


def test_without_fair_share_the_small_job_waits_for_the_bulk(tmp_path: Path,
                                                             serve: Any) -> None:
    srv = serve(_config(tmp_path, fair_share=False))
    with Client(srv.url) as c:
        bulk = _bulk(c, "slow", 40, seconds=0.02)
        wait_for(lambda: c.job(bulk["id"])["items"]["succeeded"] >= 1, 20,
                 "the bulk to start")
        small = wait_job(c, c.submit("add", {"a": 1})["id"], 30)
        assert c.job(bulk["id"])["state"] == "succeeded"
        # Claimed after every item of the bulk (an item claimed ahead may still wait in the
        # pool behind the bulk's last one, so this is the order of claims, not of runs).
        last_claim = max(_ts(i["started_at"]) for i in all_items(c, bulk["id"]))
        assert _ts(small["started_at"]) >= last_claim - 0.001


def test_priority_comes_before_fair_share(tmp_path: Path, serve: Any) -> None:
    srv = serve(_config(tmp_path))
    with Client(srv.url) as c:
        low = _bulk(c, "slow", 30, seconds=0.05)
        wait_for(lambda: c.job(low["id"])["items"]["succeeded"] >= 1, 20, "the bulk to start")
        high = c.submit("slow", {"seconds": 0.05}, items=[{} for _ in range(6)], priority=5)
        high = wait_job(c, high["id"], 20)
        low_started = [i for i in all_items(c, low["id"])
                       if i["started_at"] and _ts(i["started_at"]) < _ts(high["finished_at"])]
        taken_turns = [i for i in low_started if _ts(i["started_at"]) > _ts(high["created_at"])]
        # Fair share alone would have given the bulk every other slot (about 6 here).
        assert len(taken_turns) <= 1, len(taken_turns)


# ------------------------------------------------------------------ limits
EXECUTORS = ["thread", "process",
             pytest.param("dask", marks=pytest.mark.skipif(
                 not HAVE_DASK, reason='needs the dask extra: pip install "bulkrunner[dask]"'))]


@pytest.mark.parametrize("executor", EXECUTORS)
def test_concurrency_holds_one_task_while_others_use_the_free_slots(
        tmp_path: Path, serve: Any, executor: str) -> None:
    srv = serve(_config(tmp_path, max_workers=4, executor=executor))
    with Client(srv.url) as c:
        limited = _bulk(c, "limited", 8, seconds=0.3)
        free = _bulk(c, "slow", 8, seconds=0.3)
        for job in (limited, free):
            assert wait_job(c, job["id"], 90)["state"] == "succeeded"
        lim = _intervals(c, limited["id"])
        assert _max_overlap(lim) == 2
        # The other task's items ran beside the limited ones: more than 2 at once overall.
        assert _max_overlap(lim + _intervals(c, free["id"])) > 2
        assert all(i["attempts"] == 1 for i in all_items(c, limited["id"]))


def test_rate_limit_paces_starts_and_spends_no_attempt(tmp_path: Path, serve: Any) -> None:
    srv = serve(_config(tmp_path, max_workers=4))
    with Client(srv.url) as c:
        job = c.submit("rated", {"a": 1}, items=[{"b": i} for i in range(16)])
        seen = wait_for(lambda: c.job(job["id"]) if c.job(job["id"])["waiting"] else None,
                        10, "the job to wait on its rate limit")
        assert seen["waiting"] == "rate_limit"
        pace = c.pace(job["id"])
        assert pace["rate_limit"] == "5/s" and pace["limit_per_second"] == 5
        job = wait_job(c, job["id"], 30)
        assert job["state"] == "succeeded"
        items = all_items(c, job["id"])
        starts = sorted(_ts(i["started_at"]) for i in items)
        # At most 5 starts in any one-second window (times are shown to the millisecond).
        for a, b in zip(starts, starts[5:], strict=False):
            assert b - a >= 0.999, starts
        assert all(i["attempts"] == 1 for i in items)


# ------------------------------------------------------------------ pause and resume
def test_pause_and_resume_a_job_across_a_restart(tmp_path: Path, serve: Any) -> None:
    cfg = _config(tmp_path)
    srv = serve(cfg)
    with Client(srv.url) as c:
        job = _bulk(c, "slow", 30, seconds=0.1)
        wait_for(lambda: c.job(job["id"])["items"]["succeeded"] >= 2, 20, "two items done")
        out = run_cli("pause", job["id"][:8], url=srv.url)
        assert out.returncode == 0, out.stderr
        assert "paused" in out.stdout
        paused = wait_for(lambda: (j := c.job(job["id"]))["items"]["running"] == 0 and j,
                          10, "its running item to finish")
        assert paused["state"] == "paused" and paused["waiting"] == "paused"
        assert [j["id"] for j in c.jobs(state="paused")["jobs"]] == [job["id"]]
        # The worker is free for others meanwhile, and the paused job does not move.
        assert wait_job(c, c.submit("add", {"a": 1})["id"], 10)["state"] == "succeeded"
        assert c.job(job["id"])["items"] == paused["items"]
        # A second pause answers the job as it is; a finished job cannot be paused.
        assert c.pause(job["id"])["state"] == "paused"
    srv.signal(signal.SIGKILL)
    srv.wait()
    srv = serve(cfg)
    with Client(srv.url) as c:
        assert c.job(job["id"])["state"] == "paused"
        assert wait_job(c, c.submit("add", {"a": 2})["id"], 10)["state"] == "succeeded"
        assert c.job(job["id"])["items"]["queued"] == paused["items"]["queued"]
        resumed = c.resume(job["id"])
        assert resumed["state"] in ("queued", "running")
        done = wait_job(c, job["id"], 30)
        assert done["state"] == "succeeded"
        assert all(i["attempts"] == 1 for i in all_items(c, job["id"]))
        again = run_cli("resume", job["id"], url=srv.url)
        assert again.returncode == 2 and "finished" in again.stderr
        again = run_cli("pause", job["id"], url=srv.url)
        assert again.returncode == 2 and "finished" in again.stderr


def test_resume_of_a_job_not_paused_is_409(tmp_path: Path, serve: Any) -> None:
    srv = serve(_config(tmp_path))
    with Client(srv.url) as c:
        job = _bulk(c, "slow", 3, seconds=5)
        with pytest.raises(ApiError) as e:
            c.resume(job["id"])
        assert e.value.status == 409 and e.value.code == "not_paused"
        c.cancel(job["id"])
        with pytest.raises(ApiError) as e:
            c.pause(job["id"])
        assert e.value.status == 409 and e.value.code == "job_finished"


def test_a_paused_job_that_is_cancelled_ends_cancelled(tmp_path: Path, serve: Any) -> None:
    srv = serve(_config(tmp_path))
    with Client(srv.url) as c:
        job = _bulk(c, "slow", 5, seconds=0.05)
        c.pause(job["id"])
        assert c.cancel(job["id"])["state"] == "cancelled"


def test_pause_and_resume_a_task_across_a_restart(tmp_path: Path, serve: Any) -> None:
    cfg = _config(tmp_path)
    srv = serve(cfg)
    with Client(srv.url) as c:
        out = run_cli("pause", "--task", "held", url=srv.url)
        assert out.returncode == 0 and "task held paused" in out.stdout, out.stderr
        tasks = {t["name"]: t for t in c.tasks()["tasks"]}
        assert tasks["held"]["paused"] is True and tasks["slow"]["paused"] is False
        assert tasks["limited"]["concurrency"] == 2 and tasks["rated"]["rate_limit"] == "5/s"
        job = c.submit("held", {"seconds": 0.01})
        assert wait_job(c, c.submit("add", {"a": 1})["id"], 10)["state"] == "succeeded"
        held = c.job(job["id"])
        assert held["state"] == "queued" and held["waiting"] == "task_paused"
    srv.signal(signal.SIGKILL)
    srv.wait()
    srv = serve(cfg)
    with Client(srv.url) as c:
        assert {t["name"]: t for t in c.tasks()["tasks"]}["held"]["paused"] is True
        assert wait_job(c, c.submit("add", {"a": 1})["id"], 10)["state"] == "succeeded"
        assert c.job(job["id"])["state"] == "queued"
        assert c.resume_task("held")["paused"] is False
        assert wait_job(c, job["id"], 10)["state"] == "succeeded"
        with pytest.raises(ApiError) as e:
            c.pause_task("nope")
        assert e.value.status == 404 and "known tasks" in e.value.message
    out = run_cli("pause", url=srv.url)
    assert out.returncode == 2 and "--task" in out.stderr


# ------------------------------------------------------------------ delay and run_after
def test_delay_and_run_after_hold_a_job_across_a_restart(tmp_path: Path, serve: Any) -> None:
    cfg = _config(tmp_path, max_workers=2)
    srv = serve(cfg)
    out = run_cli("submit", "add", "-p", "a=1", "--delay", "2s", url=srv.url)
    assert out.returncode == 0, out.stderr
    delayed = out.stdout.strip()
    at = (datetime.now(UTC) + timedelta(seconds=2)).astimezone(
        datetime.now().astimezone().tzinfo).replace(tzinfo=None).isoformat(timespec="seconds")
    out = run_cli("submit", "add", "-p", "a=2", "--at", at, url=srv.url)  # local, no zone
    assert out.returncode == 0, out.stderr
    local = out.stdout.strip()
    with Client(srv.url) as c:
        zoned = (datetime.now(UTC) + timedelta(seconds=2)).astimezone(
            timezone(timedelta(hours=1))).isoformat()
        by_api = c.submit("add", {"a": 3}, run_after=zoned)["id"]
        for ident in (delayed, local, by_api):
            job = c.job(ident)
            assert job["state"] == "queued" and job["run_after"], job
            assert job["waiting"] == "run_after"
        shown = run_cli("status", delayed, url=srv.url)
        assert "runs at" in shown.stdout and "start time has not come" in shown.stdout
    srv.signal(signal.SIGKILL)
    srv.wait()
    srv = serve(cfg)
    with Client(srv.url) as c:
        for ident in (delayed, local, by_api):
            job = wait_job(c, ident, 20)
            assert job["state"] == "succeeded"
            assert _ts(job["started_at"]) >= _ts(job["run_after"]) - 0.001, job


@pytest.mark.parametrize("body, field, words", [
    ({"delay": 5, "run_after": "2030-01-01T00:00:00Z"}, "delay", "not both"),
    ({"delay": -1}, "delay", "from 0"),
    ({"delay": "soon"}, "delay", "number of seconds"),
    ({"run_after": "2030-01-01T00:00:00"}, "run_after", "no time zone"),
    ({"run_after": "tomorrow"}, "run_after", "ISO 8601"),
    ({"run_after": 5}, "run_after", "ISO 8601"),
    ({"run_after": "2099-01-01T00:00:00Z"}, "run_after", "more than a year"),
])
def test_bad_start_times_are_422_naming_the_field(tmp_path: Path, serve: Any,
                                                 body: dict[str, Any], field: str,
                                                 words: str) -> None:
    srv = serve(_config(tmp_path))
    with Client(srv.url) as c:
        with pytest.raises(ApiError) as e:
            c.request("POST", "/api/v1/jobs", body=json.dumps(
                {"task": "add", "params": {"a": 1}, **body}).encode(),
                content_type="application/json")
        assert e.value.status == 422, e.value
        assert words in e.value.details["fields"][field], e.value.details
        assert c.jobs()["jobs"] == []  # nothing stored


def test_cli_start_options_are_checked_before_sending(tmp_path: Path, serve: Any) -> None:
    srv = serve(_config(tmp_path))
    for args, words in ((["--delay", "soon"], "not a duration"),
                        (["--at", "someday"], "not a time"),
                        (["--delay", "1m", "--at", "03:00"], "not both")):
        out = run_cli("submit", "add", "-p", "a=1", *args, url=srv.url)
        assert out.returncode == 2 and words in out.stderr, out.stderr


def test_config_rejects_bad_limits(tmp_path: Path) -> None:
    for extra, key in (('[tasks.x]\npath = "a:b"\nrate_limit = "fast"\n',
                        "tasks.x.rate_limit"),
                       ('[tasks.x]\npath = "a:b"\nconcurrency = -1\n', "tasks.x.concurrency"),
                       ('[tasks.x]\npath = "a:b"\nrate_limit = "0/s"\n', "tasks.x.rate_limit")):
        cfg = toml_config(tmp_path, tasks=SAMPLE_TASKS, extra=extra)
        out = run_cli("--config", str(cfg), "serve")
        assert out.returncode == 2, out.stderr
        assert key in out.stderr, out.stderr
