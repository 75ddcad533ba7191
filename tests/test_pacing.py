"""The claim policy on its own (no store, no threads): the order of claims and what holds
them back. Time is passed in, so nothing sleeps."""

from __future__ import annotations

from pathlib import Path

from bulkrunner.config import Rate
from bulkrunner.server.pacing import CONCURRENCY, PAUSED, RATE_LIMIT, RUN_AFTER, Pacer
from bulkrunner.store import Store, Tx
from bulkrunner.store.claims import Waiting, claim_planned
from bulkrunner.store.records import NewJob


def _w(seq: int, task: str = "t", priority: int = 0, run_after: float | None = None,
       paused: bool = False, queued: int | None = None) -> Waiting:
    return Waiting(seq, priority, task, run_after, paused, queued)


def _plan(p: Pacer, n: int, now: float = 100.0) -> list[tuple[int, int]]:
    p.begin(n, now)
    steps = p.plan()
    p.end_plan()
    return steps


def test_fair_share_takes_turns_by_job_and_a_new_job_goes_first() -> None:
    p = Pacer()
    p.load([_w(1), _w(2)], set(), 0)
    assert _plan(p, 4) == [(1, 2), (2, 2)]  # one each in turn: 1, 2, 1, 2
    p.add([_w(3)], 0)
    assert _plan(p, 1) == [(3, 1)]  # never served: before the two served ones
    assert _plan(p, 3) == [(1, 1), (2, 1), (3, 1)]


def test_a_job_whose_last_item_was_claimed_leaves_the_plans() -> None:
    # Hundreds of finished one-item jobs left in the view were each asked again for
    # nothing, and as rivals held a new bulk to one item a turn: 40 items of 25 ms on 4
    # workers took 2.8 s instead of 0.27.
    p = Pacer()
    p.load([_w(1, queued=1), _w(2, queued=10)], set(), 0)
    p.begin(2, 100.0)
    assert p.plan() == [(1, 1), (2, 1)]
    p.took(1, 1, 1)  # its only item
    p.took(2, 1, 1)
    p.end_plan()
    assert _plan(p, 4) == [(2, 4)]  # no rival left: the whole claim at once
    p.requeued(1)  # its item failed and goes back to the queue: it is planned again
    assert _plan(p, 2) == [(1, 1), (2, 1)]


def test_a_claim_rolled_back_gives_its_jobs_their_items_back() -> None:
    p = Pacer()
    p.load([_w(1, queued=2)], set(), 0)
    p.begin(4, 100.0)
    assert p.plan() == [(1, 4)]
    p.took(1, 4, 2)  # both of its items: none left
    p.abandon_plan()  # the transaction failed: nothing was claimed, both are queued
    p.begin(1, 100.0)
    assert p.plan() == [(1, 1)]
    p.took(1, 1, 1)
    p.end_plan()
    assert _plan(p, 4) == [(1, 4)]  # one item is still left: the job is still planned


def test_short_items_take_turns_a_batch_at_a_time() -> None:
    p = Pacer()
    p.quantum = lambda task: 4  # the executor's batch while items are short
    p.load([_w(1), _w(2), _w(3)], set(), 0)
    assert _plan(p, 10) == [(1, 4), (2, 4), (3, 2)]
    p.add([_w(4)], 0)
    # The new job still goes first, a batch of it; then the job served longest ago.
    assert _plan(p, 5) == [(4, 4), (1, 1)]
    p.quantum = lambda task: 1  # long items again: one each in turn
    assert _plan(p, 3) == [(2, 1), (3, 1), (4, 1)]


def test_claims_fill_the_free_workers_at_each_tasks_cost() -> None:
    p = Pacer()
    # Long items take a whole worker each; short ones go 50 to a message, 2 messages to a
    # worker, so an item takes a hundredth of one.
    p.cost = lambda task: 1.0 if task == "long" else 0.01
    p.quantum = lambda task: 1 if task == "long" else 50
    p.load([_w(1, "long"), _w(2, "short")], set(), 0)
    p.slots = 1.5
    assert _plan(p, 10_000) == [(1, 1), (2, 50)]  # a worker for one, half of one for 50
    p.ended("long")
    p.slots = 1.0
    assert _plan(p, 10_000) == [(1, 1)]  # its turn again: the free worker is long's
    p.slots = 0.5
    assert _plan(p, 10_000) == [(2, 50)]
    # What is in flight, at each task's cost: a worker's worth of each.
    assert p.busy() == 1.0 + 100 * 0.01


def test_the_task_holding_fewer_workers_goes_first() -> None:
    p = Pacer()
    p.load([_w(1, "long"), _w(2, "other")], set(), 0)
    p.slots = 2.0
    assert _plan(p, 2) == [(1, 1), (2, 1)]  # one each in turn
    p.ended("other")
    # Job 1 was served longer ago, but its task holds a worker and job 2's holds none.
    p.slots = 1.0
    assert _plan(p, 1) == [(2, 1)]
    p.ended("long")
    p.slots = 1.0
    assert _plan(p, 1) == [(1, 1)]  # now task "long" holds none: its turn


def test_an_item_that_takes_more_than_is_free_still_starts_when_a_worker_is_free() -> None:
    p = Pacer()
    p.cost = lambda task: 1.0 if task == "new" else 0.25
    p.load([_w(1, "new"), _w(2, "short")], set(), 0)
    p.slots = 0.25  # never a whole worker free: short items keep part of each
    assert _plan(p, 100) == [(1, 1)]  # else the unmeasured task would wait for ever
    p.slots = 0.0
    assert _plan(p, 100) == []


def test_a_job_alone_takes_every_slot_in_one_step() -> None:
    p = Pacer()
    p.load([_w(1)], set(), 0)
    assert _plan(p, 16) == [(1, 16)]


def test_without_fair_share_the_oldest_job_takes_all() -> None:
    p = Pacer(fair_share=False)
    p.load([_w(1), _w(2)], set(), 0)
    assert _plan(p, 5) == [(1, 5)]


def test_an_item_requeued_in_a_failed_turn_is_counted_once() -> None:
    # The finish of a failed turn comes again in the next one: counted twice, a job whose
    # items were all claimed looked as if one were left, and was asked again for nothing
    # while holding every other job to a turn at a time as their rival.
    p = Pacer()
    p.load([_w(1, queued=1), _w(2, queued=10)], set(), 0)
    p.begin(2, 100.0)
    assert p.plan() == [(1, 1), (2, 1)]
    p.took(1, 1, 1)
    p.took(2, 1, 1)
    p.end_plan()
    for committed in (False, True):  # the same finish: rolled back, then committed
        p.requeued(1)
        p.begin(2, 100.0)
        steps = p.plan()
        assert steps == [(1, 1), (2, 1)]
        for seq, n in steps:
            p.took(seq, n, n)
        if committed:
            p.end_plan()
        else:
            p.abandon_plan()
    assert _plan(p, 4) == [(2, 4)]  # job 1 has nothing queued: no rival left


def test_priority_first_then_turns() -> None:
    p = Pacer()
    p.load([_w(1), _w(2, priority=5), _w(3, task="u", priority=5)], set(), 0)
    assert _plan(p, 4) == [(2, 2), (3, 2)]


def test_a_job_that_gives_fewer_is_dry_until_requeued() -> None:
    p = Pacer()
    p.load([_w(1), _w(2)], set(), 0)
    p.begin(4, 100)
    steps = p.plan()
    assert steps == [(1, 2), (2, 2)]
    p.took(1, 2, 0)  # job 1 had nothing claimable: its slots go back
    assert p.plan() == [(2, 2)]
    p.end_plan()
    assert _plan(p, 2) == [(2, 2)]
    p.requeued(1)
    assert dict(_plan(p, 2)) == {1: 1, 2: 1}


def test_concurrency_counts_what_runs_and_frees_on_end() -> None:
    p = Pacer(limits={"t": (2, None)})
    p.load([_w(1), _w(2, task="u")], set(), 0)
    assert dict(_plan(p, 4)) == {1: 2, 2: 2}
    assert p.waiting_reason(1, "t", 100) == CONCURRENCY
    assert _plan(p, 4) == [(2, 4)]  # the other task uses the free slots
    p.ended("t")
    assert _plan(p, 4) == [(1, 1), (2, 3)]  # one slot of t freed: one item of t


def test_rate_limit_allows_n_per_window() -> None:
    p = Pacer(limits={"t": (0, Rate(3, 1.0, "3/s"))})
    p.load([_w(1)], set(), 0)
    assert _plan(p, 10, now=100.0) == [(1, 3)]
    assert _plan(p, 10, now=100.5) == []
    assert p.waiting_reason(1, "t", 100.5) == RATE_LIMIT
    assert p.next_due(100.5) is not None and 101.0 <= p.next_due(100.5) <= 101.01
    for _ in range(3):
        p.ended("t")
    assert _plan(p, 10, now=101.01) == [(1, 3)]


def test_an_abandoned_plan_gives_its_reservations_back() -> None:
    p = Pacer(limits={"t": (2, Rate(2, 60.0, "2/m"))})
    p.load([_w(1)], set(), 0)
    p.begin(5, 100)
    assert p.plan() == [(1, 2)]
    p.abandon_plan()  # the transaction failed: nothing was claimed
    assert p.running_of("t") == 0
    assert _plan(p, 5, now=100) == [(1, 2)]


def test_pauses_and_run_after_hold_jobs() -> None:
    p = Pacer()
    p.load([_w(1, paused=True), _w(2, run_after=200.0), _w(3, task="held")], {"held"}, 0)
    assert _plan(p, 5, now=100) == []
    assert p.waiting_reason(1, "t", 100) == PAUSED
    assert p.waiting_reason(2, "t", 100) == RUN_AFTER
    assert p.task_reasons(100) == {"held": "task_paused"}
    assert p.next_due(100) == 200.0
    assert _plan(p, 5, now=200) == [(2, 5)]
    p.set_task_paused("held", False)
    assert _plan(p, 1, now=200) == [(3, 1)]


def test_reload_keeps_the_turns(tmp_path: Path) -> None:
    p = Pacer()
    p.load([_w(1), _w(2)], set(), 0)
    assert _plan(p, 1) == [(1, 1)]
    p.load([_w(1), _w(2)], set(), 0)
    assert _plan(p, 1) == [(2, 1)]  # job 1 was served last: still job 2's turn


def test_claims_from_the_store_follow_the_plan(tmp_path: Path) -> None:
    store = Store(str(tmp_path / "t.db"))
    try:
        for i in range(2):
            store.insert_job(NewJob(id=f"{i:032x}", task="t", params={},
                                    items=[None, None, None]))
        p = Pacer()
        p.load(store.waiting_jobs(), store.paused_tasks(), 0)
        turn = store.turn([], 4, planner=p)
        assert [(c.job_seq, c.index) for c in turn.claimed] == [(1, 0), (1, 1), (2, 0), (2, 1)]
        turn = store.turn([], 4, planner=p)  # 1 and 2 have one item each left
        assert sorted((c.job_seq, c.index) for c in turn.claimed) == [(1, 2), (2, 2)]
        assert store.turn([], 4, planner=p).claimed == []

        def nothing(tx: Tx) -> None:
            assert claim_planned(tx, lambda: [], lambda s, a, g: None, tx.now) == []
        store.write(nothing)
    finally:
        store.close()


def test_a_short_plan_planned_again_never_claims_an_item_twice(tmp_path: Path) -> None:
    store = Store(str(tmp_path / "t.db"))
    try:
        store.insert_job(NewJob(id="1" * 32, task="t", params={}, items=[None]))
        store.insert_job(NewJob(id="2" * 32, task="t", params={}, items=[None] * 5))
        p = Pacer()
        p.load(store.waiting_jobs(), store.paused_tasks(), 0)
        turn = store.turn([], 4, planner=p)  # job 1 gives 1 of 2: job 2 is asked again
        keys = [(c.job_seq, c.index) for c in turn.claimed]
        assert len(keys) == len(set(keys)) == 4, keys
        job = store.get_job("2" * 32)
        assert job.counts["queued"] + job.counts["running"] == 5
        assert job.counts["running"] == sum(1 for s, _ in keys if s == 2)
    finally:
        store.close()
