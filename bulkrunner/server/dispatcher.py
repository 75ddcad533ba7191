"""The dispatcher: moves items from the store's queue onto the executor and back.

One thread. Each turn it collects the outcomes that came back, fails attempts that passed
their deadline, and in one transaction records those outcomes with the progress and output
reported meanwhile and claims as many queued items as the executor has free slots
(``max_workers``), so the queue stays in SQLite and memory stays flat however many items
wait. At start it re-queues what a crashed server left running; at stop it drains. What
happens is told on the event bus (:mod:`bulkrunner.server.events`).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future

from bulkrunner.config import Config
from bulkrunner.errors import StoreUnwritable
from bulkrunner.executors import Executor, make_executor
from bulkrunner.executors.futures import add_done_callbacks
from bulkrunner.runtime import Outcome, WorkUnit
from bulkrunner.server import endings
from bulkrunner.server.endings import Ended
from bulkrunner.server.events import EventBus, Finished, Recovered, Started
from bulkrunner.server.pacing import Pacer
from bulkrunner.server.policy import INTERRUPTIONS_ALLOWED, backoff_delay
from bulkrunner.server.reports import Reports
from bulkrunner.server.storewait import StoreWait
from bulkrunner.server.tasks import Registry, Task
from bulkrunner.store import Claimed, Store

log = logging.getLogger("bulkrunner.dispatcher")

_PROGRESS_FLUSH = 0.5      # seconds between progress writes while no item ends
# Items claimed ahead (the executor keeps more in flight than it has workers while items
# are short, so that a worker never waits for the dispatcher's next turn) show as running
# while they wait. One that has not found a worker within _GIVE_BACK seconds (a long item
# came along) goes back to the queue without spending an attempt. Claim-ahead stops while
# items take 100 ms or more, so twice that is as long as one should ever wait.
_GIVE_BACK = 0.2
_IDLE_POLL = 0.5           # seconds between looks at the queue when nothing wakes us
# The claim policy's view of the waiting jobs is read whole from the store this often (and
# when told of a pause, resume or retry), for what other processes sharing the database
# changed; new jobs are looked for at every wake-up and poll.
_RELOAD_EVERY = 5.0


class Dispatcher:
    """Keeps the executor busy with queued items and records how each attempt ended."""

    def __init__(self, cfg: Config, store: Store, registry: Registry, events: EventBus,
                 executor_factory: Callable[..., Executor] = make_executor) -> None:
        self.cfg = cfg
        self.store = store
        self.registry = registry
        self.events = events
        self._factory = executor_factory
        self._executor: Executor | None = None
        self.max_workers = cfg.executor.max_workers
        self._inflight: dict[Future[Outcome], WorkUnit] = {}
        self._submitted: dict[Future[Outcome], float] = {}
        #: Workers not taken by what is in flight, as of the last turn (see _free_slots).
        self._slots_free: float = float(self.max_workers)
        self._timed_out: set[Future[Outcome]] = set()
        self._done: queue.SimpleQueue[Future[Outcome]] = queue.SimpleQueue()
        self._aborts: queue.SimpleQueue[tuple[int, int, int]] = queue.SimpleQueue()
        #: Ends not yet recorded; kept until the store has them (a failed write retries).
        self._unrecorded: list[Ended] = []
        #: While the database cannot be written: retry delays, rate-limited warnings.
        self._store_wait = StoreWait(log, store.path, store.unwritable)
        #: Progress and captured output reported since the last turn (the executor's
        #: reporter).
        self.reports = Reports()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self.draining = False
        self._drain_lock = threading.Lock()
        self._turn_lock = threading.Lock()  # held by the loop through each turn
        self._hurry = threading.Event()
        self._drained = False
        self._thread: threading.Thread | None = None
        self._backoff = backoff_delay(cfg.jobs.retry_backoff, cfg.jobs.retry_backoff_max)
        #: time.time() when the earliest retry we scheduled is due (its backoff has passed).
        self._retry_due: float | None = None
        self.recovered: dict[str, int] = {}
        #: The claim policy: priority, fair share, pauses, run_after, task limits.
        self.pacer = Pacer(fair_share=cfg.executor.fair_share,
                           limits={t.name: (t.concurrency, t.rate_limit) for t in cfg.tasks})
        self._reload = True       # read the whole view of waiting jobs on the next turn
        self._look_new = True     # look for new jobs on the next turn
        self._last_reload = 0.0

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        """Re-queue what a previous server left running, build the executor, start."""
        t0 = time.monotonic()
        self.recovered, jobs, changes = self.store.requeue_running(
            interrupted=True, max_interruptions=INTERRUPTIONS_ALLOWED)
        self.events.job_changes(changes)
        if any(self.recovered.values()):
            log.info("recovery: re-queued %(requeued)d interrupted items, failed %(failed)d "
                     "interrupted too often", self.recovered)
            for job_id, n in jobs.items():
                log.info("job %s recovered: %d interrupted item(s) re-queued, %d failed",
                         job_id, n["requeued"], n["failed"], extra={"job_id": job_id})
            self.events.emit(Recovered(self.recovered["requeued"], self.recovered["failed"],
                                       time.monotonic() - t0))
        self.executor = self._factory(self.cfg, self.reports,
                                      self.registry.modules())
        self._thread = threading.Thread(target=self._run, name="bulkrunner-dispatcher",
                                        daemon=True)
        if self.store.queued:
            # Items wait from before (a restart): claim them at once, not after a poll.
            self._wake.set()
        self._thread.start()

    @property
    def executor(self) -> Executor | None:
        """What runs the items (None until started)."""
        return self._executor

    @executor.setter
    def executor(self, executor: Executor | None) -> None:
        self._executor = executor
        if executor is not None:
            # Claims fill the free workers by what the executor measures of each task.
            self.pacer.cost, self.pacer.quantum = executor.paces.cost, executor.paces.batch

    def wake(self) -> None:
        """Look at the queue now (new items were committed)."""
        self._look_new = True
        # With every slot busy the next finished item wakes us anyway; a turn now would
        # only cost the request thread's GIL time.
        if self._slots_free > 0:
            self._wake.set()

    def refresh(self) -> None:
        """Read the waiting jobs and paused tasks again (a pause, resume or retry was
        committed), and look at the queue now."""
        self._reload = True
        self._wake.set()

    def abort(self, keys: list[tuple[int, int, int]]) -> None:
        """Stop these running attempts, named (job_seq, index, claim): their state is
        already recorded. The claim keeps a later attempt of the same item safe."""
        for k in keys:
            self._aborts.put(k)
        self._wake.set()

    @property
    def inflight(self) -> int:
        """Attempts handed to the executor and not yet finished."""
        return len(self._inflight)

    def drain(self, grace: float) -> None:
        """Stop claiming, give running items ``grace`` seconds, then stop the executor and
        put what is still running back in the queue for the next start.

        Safe to call twice: a second call (a second Ctrl-C) cuts the first one's grace short
        and returns once it is done.
        """
        self.draining = True
        self._wake.set()
        if not self._drain_lock.acquire(blocking=False):
            self._hurry.set()
            with self._drain_lock:
                return
        try:
            if self._drained:
                return
            deadline = time.monotonic() + grace
            # A turn under way may have claimed items it has not handed over yet (they are
            # running in the store, not in flight here): they are waited for like the rest,
            # within the same grace. The lock is read first: a turn hands its items over
            # before it lets go, and one that takes the lock later sees the drain and
            # claims nothing.
            while ((self._turn_lock.locked() or self._inflight)
                   and time.monotonic() < deadline and not self._hurry.is_set()):
                self._hurry.wait(0.05)
            self._shut_down()
            self._drained = True
        finally:
            self._drain_lock.release()

    def _shut_down(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        if self.executor is not None:
            self.executor.shutdown()
        try:
            left, _, changes = self.store.requeue_running(interrupted=False)
        except StoreUnwritable as e:
            log.warning("shutdown: %s; running items are re-queued at the next start instead",
                        e.message)
            return
        self.events.job_changes(changes)
        if left["requeued"]:
            log.info("shutdown: %d running items go back to the queue for the next start",
                     left["requeued"])

    # ------------------------------------------------------------------ the loop
    def _run(self) -> None:
        last_flush = 0.0
        while not self._stop.is_set():
            if not self._wake.wait(self._next_wait()):
                self._look_new = True  # a poll: another process may have submitted
            self._wake.clear()
            try:
                now = time.monotonic()
                flush = now - last_flush >= _PROGRESS_FLUSH
                with self._turn_lock:
                    turned = self._turn(flush=flush)
                if turned or flush:
                    last_flush = now
                self._store_wait.succeeded()
            except StoreUnwritable as e:  # disk full or locked: the ends wait in memory
                self._stop.wait(self._store_wait.failed(e, len(self._unrecorded)))
            except Exception:  # background code logs and carries on
                log.exception("dispatcher error; retrying in a moment")
                self._stop.wait(0.5)
        try:
            self._turn(claim=False, flush=True)
        except StoreUnwritable as e:
            log.warning("stopping: %d finished item(s) could not be recorded (%s); they run "
                        "again at the next start", len(self._unrecorded), e.code)

    def _next_wait(self) -> float:
        now = time.time()
        due = [u.deadline for f, u in self._inflight.items()
               if u.deadline is not None and f not in self._timed_out]
        if self._retry_due is not None:
            due.append(self._retry_due)
        paced = self.pacer.next_due(now)
        if paced is not None:
            due.append(paced)
        if len(self._inflight) > self.max_workers:  # some claimed ahead: see _give_back
            due.append(now + _GIVE_BACK)
        if due:
            return max(0.0, min(min(due) - now, _IDLE_POLL))
        return _IDLE_POLL

    def _give_back(self) -> None:
        """Return items claimed ahead that still wait for a thread after _GIVE_BACK."""
        if len(self._inflight) <= self.max_workers:
            return
        now = time.monotonic()
        # Handed over in order, so the first is the oldest: while it is younger than
        # _GIVE_BACK none can have waited that long, and the items need no look.
        if now - next(iter(self._submitted.values()), now) <= _GIVE_BACK:
            return
        waiting = [f for f in self._inflight if not f.running() and not f.done()]
        if any(now - self._submitted.get(f, now) > _GIVE_BACK for f in waiting):
            for f in waiting:
                unit = self._inflight.get(f)
                if unit is not None and self.executor is not None:
                    # No more claim-ahead for its task until its items are short again.
                    self.executor.paces.reset(unit.task)
                f.cancel()  # its callback re-queues the item, free of charge

    def _turn(self, claim: bool = True, flush: bool = False) -> bool:
        """One turn; True when it wrote progress and output (so the flush timer restarts)."""
        self._give_back()
        ended, self._unrecorded = self._unrecorded, []
        now = time.monotonic()  # once a turn: its ends are read within microseconds
        left: dict[str, int] = {}  # items that left their workers, by task
        while True:
            try:
                fut = self._done.get_nowait()
            except queue.Empty:
                break
            unit = self._inflight.pop(fut, None)
            if unit is None:
                continue
            left[unit.task] = left.get(unit.task, 0) + 1
            took = now - self._submitted.pop(fut, now)
            if fut in self._timed_out:
                self._timed_out.discard(fut)
                continue
            ended.append(endings.from_future(unit, fut, took))
        for name, n in left.items():
            self.pacer.ended(name, n)
        self._handle_aborts()
        ended += self._expire()
        if self._retry_due is not None and time.time() >= self._retry_due:
            self._retry_due = None
            self._reload = True  # the jobs whose retries are due become claimable
        free = 0
        if claim and not self.draining and self.executor is not None:
            slots = self._free_slots()
            free = self.executor.paces.policy.cap - len(self._inflight) if slots > 0 else 0
            if free > 0 and (not self.executor.health()[0]
                             or self._store_wait.holds(len(ended))):
                free = 0
            if free > 0:
                self._refresh_view()
                self.pacer.slots = slots
                if not ended and not self.pacer.has_work(time.time()):
                    free = 0  # everything waiting is held back: no empty claim
        # An item's progress and output are complete once its end is recorded: they go in
        # the same transaction as the ends (and the next claim), one commit for all three.
        flush = flush or bool(ended)
        progress, logs = self.reports.take() if flush else ({}, {})
        if not ended and free <= 0 and not progress and not logs:
            return flush
        try:
            turn = self.store.turn([e.finish for e in ended], free, self._backoff,
                                   progress=progress, logs=logs, planner=self.pacer)
        except BaseException:
            self._unrecorded = ended + self._unrecorded  # recorded on the next turn
            self.reports.give_back(progress, logs)
            self._wake.set()
            raise
        if turn.dropped:
            log.warning("some progress or output could not be stored and was dropped (the "
                        "items themselves go on): %s", turn.dropped)
        if turn.retry_due is not None and (self._retry_due is None
                                           or turn.retry_due < self._retry_due):
            self._retry_due = turn.retry_due
        finished = []
        for e, state in zip(ended, turn.states, strict=True):
            f = e.finish
            finished.append(Finished(e.job_id, f.job_seq, f.index, f.claim, e.task, f.ok,
                                     state, f.charge, e.duration, e.cause))
        self.events.emit_all(Finished, finished)  # one call a listener for the whole turn
        self.events.job_changes(turn.changes)
        # The turn's claims go to the executor in one call (it batches short items).
        batch: list[tuple[Claimed, WorkUnit]] = []
        limits = self.cfg.jobs
        wall = time.time()
        tasks: dict[str, Task] = {}  # each task looked up once a turn
        for c in turn.claimed:
            try:
                task = tasks.get(c.task)
                if task is None:
                    if c.task not in self.registry:  # it left the config: the item fails
                        self._not_run(c, endings.unknown_task(c))
                        continue
                    task = tasks[c.task] = self.registry.get(c.task)
                batch.append((c, WorkUnit(
                    job_id=c.job_id, job_seq=c.job_seq, index=c.index, claim=c.claim,
                    task=c.task, target=task.target, params=c.params, timeout=c.timeout,
                    deadline=wall + c.timeout if c.timeout > 0 else None,
                    context_param=task.context_param,
                    max_result_size=limits.max_result_size,
                    max_log_size=limits.max_log_size,
                    max_error_size=limits.max_error_size)))
            except Exception:  # one item's trouble must not strand the rest of the claim
                log.exception("could not start item %s of job %s; it goes back to the queue",
                              c.index, c.job_id)
                self._not_run(c, endings.not_started(c))
        if batch and self.executor is not None:
            try:
                futs = self.executor.submit_batch([u for _, u in batch])
            except Exception as e:
                log.warning("executor refused %d item(s): %s", len(batch), e)
                for c, _ in batch:
                    self._not_run(c, endings.not_started(c))
                futs = []
            now = time.monotonic()
            tell = self.events.wants(Started)  # nobody may listen: then build no events
            for (c, unit), fut in zip(batch, futs, strict=False):
                self._inflight[fut] = unit
                self._submitted[fut] = now
                if tell:
                    self.events.emit(Started(c.job_id, c.job_seq, c.index, c.claim, c.task))
            add_done_callbacks(futs, self._on_done)
        if self.executor is not None:
            self._slots_free = self._free_slots()
        return flush

    def _refresh_view(self) -> None:
        """Bring the claim policy's view of waiting jobs up to date with the store."""
        now = time.time()
        if self._reload or time.monotonic() - self._last_reload >= _RELOAD_EVERY:
            self._reload = self._look_new = False
            self._last_reload = time.monotonic()
            self.pacer.load(self.store.waiting_jobs(), self.store.paused_tasks(), now)
        elif self._look_new:
            self._look_new = False
            self.pacer.add(self.store.new_waiting_jobs(self.pacer.max_seq), now)

    def _not_run(self, c: Claimed, end: Ended) -> None:
        """A claimed item that was not handed over: its end goes to the next turn."""
        self.pacer.ended(c.task)
        self._unrecorded.append(end)
        self._wake.set()

    def _on_done(self, fut: Future[Outcome]) -> None:
        # Runs on a worker or executor thread: only hand over, never block.
        self._done.put(fut)
        if not self._wake.is_set():  # set() takes a lock and wakes waiters: once will do
            self._wake.set()

    def _free_slots(self) -> float:
        """Workers not taken by the items in flight, each item counted at its task's cost:
        a whole worker for a long item, a share of one for short items (a worker holds
        batches of them, one queued behind another). The claim fills what is free, with
        each task's items at their own cost, so a task of long items next to one of short
        items takes whole workers and leaves the rest to the short one's batches."""
        assert self.executor is not None
        return self.executor.max_workers - self.pacer.busy()

    def _expire(self) -> list[Ended]:
        now = time.time()
        out = []
        for fut, unit in list(self._inflight.items()):
            if unit.deadline is None or now < unit.deadline or fut in self._timed_out:
                continue
            if fut.done():
                continue  # it finished in time; its outcome is being collected
            self._timed_out.add(fut)
            took = time.monotonic() - self._submitted.get(fut, time.monotonic())
            out.append(endings.timed_out(unit, took))
            assert self.executor is not None
            self.executor.abort(unit)
        return out

    def _handle_aborts(self) -> None:
        keys = set()
        while True:
            try:
                keys.add(self._aborts.get_nowait())
            except queue.Empty:
                break
        if not keys or self.executor is None:
            return
        for fut, unit in list(self._inflight.items()):
            if (unit.job_seq, unit.index, unit.claim) in keys:
                # The item is already recorded as cancelled; drop whatever comes back.
                self._timed_out.add(fut)
                self.executor.abort(unit)


__all__ = ["Dispatcher"]
