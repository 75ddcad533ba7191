"""The dispatcher lease: one of the processes sharing a database dispatches, the others
stand by and take over when it stops; the store claims and re-queues only under the lease.

Real SQLite files; several services or lease holders in one test process stand for several
processes (each has a holder id of its own), and a real child process for a dead holder.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from bulkrunner.config import load_config
from bulkrunner.server.lease import Leadership, holder_id, holder_is_dead
from bulkrunner.server.service import Service
from bulkrunner.store import NewJob, Store
from bulkrunner.store.leases import Leases
from tests.conftest import toml_config, wait_for


def new_job(n: int = 1) -> NewJob:
    items = [None] if n == 1 else [json.dumps({"i": i}) for i in range(n)]
    return NewJob(id=uuid.uuid4().hex, task="t", params={}, items=items)


@pytest.fixture
def db(tmp_path: Path) -> Iterator[str]:
    path = str(tmp_path / "t.db")
    Store(path).close()  # the schema, with its leases table
    yield path


def dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait(10)
    return child.pid


def test_a_lease_is_held_renewed_run_out_and_given_up(db: str) -> None:
    a, b = Leases(db), Leases(db)
    try:
        assert a.acquire("d", "A", ttl=0.3) == (True, "A")
        assert b.acquire("d", "B", ttl=0.3) == (False, "A")
        assert a.acquire("d", "A", ttl=0.3) == (True, "A")  # renewed
        wait_for(lambda: b.acquire("d", "B", ttl=30)[0], 5, "B takes the run-out lease")
        assert a.acquire("d", "A", ttl=30) == (False, "B")
        assert b.release("d", "B") and not b.release("d", "B")
        assert a.read("d") is None
        assert a.acquire("d", "A", ttl=30) == (True, "A")
        # A holder known to be dead is replaced before its lease runs out.
        assert b.acquire("d", "B", ttl=30, is_dead=lambda h: h == "A") == (True, "B")
    finally:
        a.close()
        b.close()


def test_a_holder_is_dead_only_when_its_process_is_gone_from_this_machine() -> None:
    me = holder_id()
    host, _pid, namespace, _ = me.split(":")
    assert not holder_is_dead(me)
    assert not holder_is_dead(holder_id())  # another service of this process
    assert holder_is_dead(f"{host}:{dead_pid()}:{namespace}:beef")
    assert not holder_is_dead(f"elsewhere:{dead_pid()}:{namespace}:beef")
    assert not holder_is_dead(f"{host}:{dead_pid()}:other-namespace:beef")
    assert not holder_is_dead("garbage")


def test_the_store_claims_and_requeues_only_under_its_lease(db: str) -> None:
    store, leases = Store(db), Leases(db)
    try:
        store.insert_job(new_job(3))
        store.lease = ("dispatcher", "me")
        assert store.claim(3) == [], "claimed without holding the lease"
        assert leases.acquire("dispatcher", "me", ttl=30)[0]
        claimed = store.claim(2)
        assert len(claimed) == 2
        # Taken over: the new holder's running items are not this process's to re-queue.
        assert leases.acquire("dispatcher", "other", ttl=30, is_dead=lambda h: True)[0]
        assert store.claim(1) == []
        assert store.requeue_running(interrupted=False)[0] == {"requeued": 0, "failed": 0}
        assert store.stats()["running"] == 2
        store.lease = ("dispatcher", "other")
        assert store.requeue_running(interrupted=True)[0]["requeued"] == 2
    finally:
        leases.close()
        store.close()


def test_the_queue_count_follows_what_other_processes_submit(db: str) -> None:
    mine, theirs = Store(db), Store(db)
    try:
        theirs.insert_job(new_job(5))
        assert mine.queued == 0  # counted in memory, as this process commits
        assert mine.recount() and mine.queued == 5
        assert not mine.recount()
        assert mine.counts_by_task()["t"]["queued"] == 5
        assert len(mine.claim(2)) == 2 and mine.queued == 3
        assert theirs.recount() and theirs.queued == 3
    finally:
        mine.close()
        theirs.close()


class Roles:
    """Records what a Leadership says, in order."""

    def __init__(self) -> None:
        self.said: list[str] = []

    def gain(self) -> None:
        self.said.append("gain")

    def loss(self) -> None:
        self.said.append("loss")


def leader(db: str, roles: Roles, **kw: Any) -> Leadership:
    return Leadership(db, on_gain=roles.gain, on_loss=roles.loss, ttl=1.0, every=0.05, **kw)


def test_a_standby_takes_over_when_the_holder_gives_up_or_runs_out(db: str) -> None:
    one, two = Roles(), Roles()
    first, second = leader(db, one), leader(db, two)
    assert first.start() and one.said == ["gain"]
    assert not second.start() and second.current == first.holder
    first.stop()  # gives the lease up
    wait_for(lambda: two.said == ["gain"], 5, "the standby takes over after a stop")
    # A holder whose lease was taken over (it could not renew it in time) is told at its
    # next renewal, and stands by.
    thief = Leases(db)
    try:
        assert thief.acquire("dispatcher", "thief", ttl=30, is_dead=lambda h: True)[0]
        wait_for(lambda: two.said == ["gain", "loss"], 5, "the old holder learns it lost")
        assert not second.leading
        assert thief.release("dispatcher", "thief")
        wait_for(lambda: two.said == ["gain", "loss", "gain"], 5, "and takes it again")
    finally:
        thief.close()
        second.stop()


def test_no_lease_is_taken_while_not_wanted(db: str) -> None:
    roles = Roles()
    wanted = False
    ship = leader(db, roles, wanted=lambda: wanted)
    try:
        assert not ship.start()
        time.sleep(0.2)  # several tries of the lease thread, none of which may take it
        assert roles.said == [] and Leases(db).read("dispatcher") is None
        wanted = True
        wait_for(lambda: roles.said == ["gain"], 5, "taken once wanted")
    finally:
        ship.stop()


# ------------------------------------------------------------------ services
@pytest.fixture
def services(tmp_path: Path) -> Iterator[Callable[[], Service]]:
    """Services over one database, as several processes of one app would have."""
    cfg = load_config(toml_config(tmp_path, max_workers=2))
    made: list[Service] = []

    def make() -> Service:
        svc = Service(cfg)
        svc.start()
        made.append(svc)
        return svc

    yield make
    for svc in made:
        svc.close(grace=0)


def wait_done(svc: Service, ident: str, timeout: float = 20) -> str:
    def state() -> str | None:
        s = svc.get(ident).state.value
        return s if s in ("succeeded", "failed", "cancelled") else None
    found: str = wait_for(state, timeout, f"job {ident} finishes")
    return found


def test_one_service_dispatches_and_another_takes_over(
        services: Callable[[], Service]) -> None:
    active, standby = services(), services()
    assert active.dispatching and not standby.dispatching
    health = standby.health()
    assert health["status"] == "ok" and health["dispatching"] is False
    assert "standing by" in health["executor"]["detail"]
    # Submitted through the standby, run by the dispatching one.
    job, _ = standby.submit({"task": "add", "params": {"a": 1}})
    assert wait_done(standby, job.id) == "succeeded"
    assert active.store.stats()["succeeded"] == 1
    active.close(grace=5)
    wait_for(lambda: standby.dispatching, 10, "the standby takes over")
    job, _ = standby.submit({"task": "add", "params": {"a": 2}})
    assert wait_done(standby, job.id) == "succeeded"
    assert standby.get(job.id).result == 3


def test_a_service_that_lost_the_lease_leaves_its_items_to_the_new_holder(
        services: Callable[[], Service], tmp_path: Path) -> None:
    active, standby = services(), services()
    job, _ = active.submit({"task": "slow", "params": {"seconds": 1.0}})
    wait_for(lambda: active.get(job.id).state.value == "running", 10, "the item starts")
    thief = Leases(active.store.path)
    try:
        # Another process takes the lease over (this one was thought dead).
        assert thief.acquire("dispatcher", "thief", ttl=30, is_dead=lambda h: True)[0]
        wait_for(lambda: not active.dispatching, 10, "the old holder stops dispatching")
        # What it had running is not re-queued by it: it is the new holder's to recover.
        assert active.get(job.id).counts["running"] == 1
        assert thief.release("dispatcher", "thief")
    finally:
        thief.close()
    wait_for(lambda: active.dispatching or standby.dispatching, 10, "a service takes over")
    assert wait_done(standby, job.id) == "succeeded"
    assert not (active.dispatching and standby.dispatching)
