"""The claim policy: which queued items start next, and which wait.

Priority comes first; among jobs of equal priority, with fair share, the next slot goes to
the job served least recently (round robin by job; a job never served goes first), else to
the oldest job; within a job, items start in index order. An item waits, staying queued
and holding no worker slot, while its job is paused or before its ``run_after``, while its
task is paused, has ``concurrency`` items running, or has had ``rate_limit`` starts in the
last window.

The policy works on a view of the waiting jobs kept in memory (a few fields each, never the
items) and rebuilt from the store at start, when told that something changed (a pause, a
resume, a retry), and every few seconds (changes made by another process). Each task has
a heap of its runnable jobs ordered by (priority, last served, job), so a pick looks at the
top of each task's heap only: its cost follows the number of tasks, not of jobs or items.
"""

from __future__ import annotations

import heapq
import itertools
import math
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

from bulkrunner.config import Rate
from bulkrunner.store.claims import Waiting

#: Starts closer than this to a window's edge count as inside it: the start times shown
#: to users are rounded to milliseconds, and "N in any window" must hold in what they see.
_EDGE = 0.002

#: Why an item waits, as metrics and the job page show it.
PAUSED = "paused"
RUN_AFTER = "run_after"
TASK_PAUSED = "task_paused"
CONCURRENCY = "concurrency"
RATE_LIMIT = "rate_limit"


@dataclass(slots=True)
class _Job:
    seq: int
    priority: int
    task: str
    run_after: float | None
    paused: bool
    #: The tick at which the job last had an item started (0: never).
    served: int = 0
    #: No claimable item now (all waiting for a retry's backoff, or none left).
    dry: bool = False
    #: Its queued items as far as the view knows (None: not known): read with the job,
    #: less what claims took, plus what went back to the queue.
    left: int | None = None
    #: In its task's heap (runnable as far as the job itself goes).
    listed: bool = False
    #: Which of its heap entries is the live one (older entries are stale).
    ver: int = 0


@dataclass(slots=True)
class _Task:
    name: str
    concurrency: int = 0
    rate: Rate | None = None
    paused: bool = False
    running: int = 0
    starts: deque[float] = field(default_factory=deque)
    #: Runnable jobs as (-priority, last served or 0, seq, entry version).
    heap: list[tuple[int, int, int, int]] = field(default_factory=list)

    def room(self, now: float) -> int:
        """Items of this task that may start now (a large number when unlimited)."""
        if self.paused:
            return 0
        room = 1 << 30
        if self.concurrency:
            room = self.concurrency - self.running
        if self.rate is not None:
            window = self.rate.per + _EDGE
            while self.starts and now - self.starts[0] >= window:
                self.starts.popleft()
            room = min(room, self.rate.count - len(self.starts))
        return max(room, 0)

    def why_not(self, now: float) -> str | None:
        """Why no item of this task may start now (None when one may). Reads only, so
        request threads may ask while the dispatcher plans."""
        if self.paused:
            return TASK_PAUSED
        if self.concurrency and self.running >= self.concurrency:
            return CONCURRENCY
        if self.rate is not None:
            starts = self.starts
            try:
                # Full, and the oldest start still inside the window (entries past it are
                # dropped by the dispatcher; reading them here would race with it).
                inside = [t for t in list(starts) if now - t < self.rate.per + _EDGE]
            except RuntimeError:  # changed while copied: say nothing rather than guess
                return None
            if len(inside) >= self.rate.count:
                return RATE_LIMIT
        return None


#: Free worker slots this small or less are none (what float sums leave over).
_NO_SLOT = 1e-9


class Pacer:
    """Decides the claims. Used by the dispatcher thread (and inside the store's write on
    its behalf), one caller at a time."""

    def __init__(self, *, fair_share: bool = True,
                 limits: Mapping[str, tuple[int, Rate | None]] | None = None) -> None:
        self.fair_share = fair_share
        #: What the executor says of each task (set by the dispatcher; the defaults
        #: treat every item as long). ``cost(task)``: the share of one worker an item
        #: takes in flight, against ``slots``, the workers free for this claim.
        #: ``quantum(task)``: items
        #: a job takes in one fair-share turn while other jobs wait theirs, the task's
        #: batch: short items are shared out a message at a time (a few milliseconds of
        #: work) rather than one by one, which would cost a query and an update per job
        #: for each item.
        self.cost: Callable[[str], float] = lambda task: 1.0
        self.quantum: Callable[[str], int] = lambda task: 1
        self.slots = math.inf
        #: Each task's ``cost``, read once a claim: a plan's picks ask for it many times,
        #: and it moves only as items end, between claims.
        self._costs: dict[str, float] = {}
        self._limits = dict(limits or {})
        self._jobs: dict[int, _Job] = {}
        self._tasks: dict[str, _Task] = {}
        self._sleeping: list[tuple[float, int]] = []  # (run_after, seq)
        self._tick = itertools.count(1)
        #: The newest job sequence number seen (new jobs are read after it).
        self.max_seq = 0
        #: What the current plan reserved: (seq, task, n) in order.
        self._reserved: list[tuple[int, str, int]] = []
        #: The jobs told :meth:`requeued` in the current transaction, one entry an item:
        #: counted back out if it fails, for the same finishes come again in a later turn.
        self._requeued: list[int] = []
        self._budget = 0
        self._now = 0.0

    # ------------------------------------------------------------------ the view
    def task(self, name: str) -> _Task:
        """The state kept for task ``name`` (created on first use)."""
        t = self._tasks.get(name)
        if t is None:
            conc, rate = self._limits.get(name, (0, None))
            t = self._tasks[name] = _Task(name, conc, rate)
        return t

    def load(self, waiting: Iterable[Waiting], paused_tasks: set[str], now: float) -> None:
        """Rebuild the view from the store: the jobs with queued items and the paused
        tasks. What each job was last served is kept, so a reload keeps the turns fair."""
        old = self._jobs
        self._jobs = {}
        for t in self._tasks.values():
            t.heap.clear()
            t.paused = t.name in paused_tasks
        for name in paused_tasks:
            self.task(name).paused = True
        self._sleeping.clear()
        for w in waiting:
            prev = old.get(w.seq)
            self._add(w, prev.served if prev else 0, now)
        self.max_seq = max([self.max_seq, *self._jobs])

    def add(self, waiting: Iterable[Waiting], now: float) -> None:
        """Jobs that are new, or that have queued items again."""
        for w in waiting:
            prev = self._jobs.get(w.seq)
            if prev is not None and not prev.dry and prev.paused == w.paused:
                continue
            self._add(w, prev.served if prev else 0, now)
            self.max_seq = max(self.max_seq, w.seq)

    def _add(self, w: Waiting, served: int, now: float) -> None:
        j = self._jobs[w.seq] = _Job(w.seq, w.priority, w.task, w.run_after, w.paused,
                                     served, left=w.queued)
        self.task(w.task)
        if w.paused:
            return
        if w.run_after is not None and w.run_after > now:
            heapq.heappush(self._sleeping, (w.run_after, w.seq))
            return
        self._list(j)

    def _list(self, j: _Job) -> None:
        j.listed = True
        j.ver += 1
        order = j.served if self.fair_share else 0
        heapq.heappush(self._tasks[j.task].heap, (-j.priority, order, j.seq, j.ver))

    def requeued(self, seq: int) -> None:
        """An item of job ``seq`` went back to the queue claimable at once (in the current
        transaction: :meth:`abandon_plan` counts it out again)."""
        self._requeued.append(seq)
        self._restore(seq, 1)

    def _restore(self, seq: int, n: int) -> None:
        """``n`` items of job ``seq`` are queued again: it is planned again."""
        j = self._jobs.get(seq)
        if j is None:
            return
        if j.left is not None:
            j.left += n
        if j.dry:
            j.dry = False
            if not j.paused and not j.listed:
                self._list(j)

    def set_task_paused(self, task: str, paused: bool) -> None:
        """A user paused or resumed a task."""
        self.task(task).paused = paused

    def ended(self, task: str, n: int = 1) -> None:
        """``n`` items of ``task`` left their workers."""
        t = self.task(task)
        t.running = max(0, t.running - n)

    # ------------------------------------------------------------------ planning
    def begin(self, n: int, now: float) -> None:
        """Start planning a claim of up to ``n`` items at time ``now``."""
        self._budget = n
        self._now = now
        self._costs.clear()
        self._wake_sleepers(now)

    def plan(self) -> list[tuple[int, int]]:
        """The next claims as ``(job_seq, n)``, reserving their starts (see :meth:`took`)."""
        steps: dict[int, int] = {}
        now = self._now
        while self._budget > 0 and self.slots > _NO_SLOT:
            best = self._pick(now)
            if best is None:
                break
            t, j = best
            room = min(self._budget, self._room(t, now))
            # With fair share each pick is one quantum; only a job with no rival of its
            # priority takes all it may at once.
            n = room if not self.fair_share or not self._rival(j, t, now) else min(
                room, self.quantum(t.name))
            self._budget -= n
            self.slots -= n * self._cost(t.name)
            steps[j.seq] = steps.get(j.seq, 0) + n
            self._reserve(t, n, now)
            self._reserved.append((j.seq, t.name, n))
            self._served(j, t)
        return list(steps.items())

    def took(self, seq: int, asked: int, got: int) -> None:
        """What a planned step gave: a job that gave fewer than asked has no claimable item
        left now; its unused reservations are given back. A job whose last queued item was
        taken leaves the plans too: kept there, it would be asked again for nothing and,
        with fair share, hold every other job to a turn at a time as their rival."""
        j = self._jobs.get(seq)
        if j is not None and j.left is not None:
            j.left -= got
        if got >= asked:
            if j is not None and j.left is not None and j.left <= 0:
                j.dry = True
                j.listed = False  # its heap entry goes stale and is dropped when reached
            return
        if j is not None:
            self._release(j.task, asked - got)
            self.slots += (asked - got) * self._cost(j.task)
            self._reserved.append((seq, j.task, got - asked))
            j.dry = True
            j.listed = False  # its heap entry goes stale and is dropped when reached
        self._budget += asked - got

    def _release(self, task: str, n: int) -> None:
        t = self.task(task)
        t.running = max(0, t.running - n)
        for _ in range(n):
            if t.starts:
                t.starts.pop()

    def _room(self, t: _Task, now: float) -> int:
        """Items of task ``t`` that may start in this claim: its limits, and what fits the
        free slots."""
        room = t.room(now)
        if room <= 0 or self.slots == math.inf:
            return room
        if self.slots <= _NO_SLOT:
            return 0
        # Some worker is free: at least one item may start, even of a task whose items
        # take more than is left (else a task of unmeasured items would wait for ever
        # behind one whose short items keep part of every worker).
        return min(room, max(1, int(self.slots / self._cost(t.name) + _NO_SLOT)))

    def busy(self) -> float:
        """Workers taken by the items claimed and not ended, at each task's ``cost``: the
        start of a claim, so each cost is read again."""
        self._costs.clear()
        return sum(t.running * self._cost(t.name) for t in self._tasks.values() if t.running)

    def _cost(self, task: str) -> float:
        c = self._costs.get(task)
        if c is None:
            c = self._costs[task] = self.cost(task)
        return c

    def has_work(self, now: float) -> bool:
        """Whether some queued item may start now (else a claim would find nothing)."""
        self._wake_sleepers(now)
        return self._pick(now) is not None

    def _reserve(self, t: _Task, n: int, now: float) -> None:
        t.running += n
        if t.rate is not None:
            t.starts.extend(itertools.repeat(now, n))

    def _served(self, j: _Job, t: _Task) -> None:
        if not self.fair_share:
            return
        j.served = next(self._tick)
        j.ver += 1
        entry = (-j.priority, j.served, j.seq, j.ver)
        heap = t.heap
        if heap and heap[0][2] == j.seq:
            heapq.heapreplace(heap, entry)
        else:
            heapq.heappush(heap, entry)

    def _top(self, t: _Task) -> _Job | None:
        """The valid head of a task's heap (stale entries are dropped on the way)."""
        heap = t.heap
        while heap:
            seq, ver = heap[0][2], heap[0][3]
            j = self._jobs.get(seq)
            if j is not None and j.listed and j.ver == ver:
                return j
            heapq.heappop(heap)
        return None

    def _pick(self, now: float) -> tuple[_Task, _Job] | None:
        best: tuple[tuple[int, float, int, int], _Task, _Job] | None = None
        for t in self._tasks.values():
            if not t.heap or self._room(t, now) <= 0:
                continue
            j = self._top(t)
            if j is None:
                continue
            # With fair share, among equal priorities the task holding the fewest workers
            # goes first (so a task of long items does not take every worker from one of
            # short items: turns by job alone would give the long job each worker its
            # items free last), then the job served least recently.
            key = (-j.priority, t.running * self._cost(t.name), j.served, j.seq) \
                if self.fair_share else (-j.priority, 0.0, 0, j.seq)
            if best is None or key < best[0]:
                best = (key, t, j)
        return None if best is None else (best[1], best[2])

    def _rival(self, j: _Job, t: _Task, now: float) -> bool:
        """Whether another runnable job of the same priority would take turns with ``j``."""
        for other in self._tasks.values():
            if not other.heap or (other is not t and self._room(other, now) <= 0):
                continue
            for entry in (other.heap[:3] if other is t else other.heap[:1]):
                if entry[2] != j.seq and -entry[0] == j.priority:
                    cand = self._jobs.get(entry[2])
                    if cand is not None and cand.listed and cand.ver == entry[3]:
                        return True
        return False

    def _wake_sleepers(self, now: float) -> None:
        while self._sleeping and self._sleeping[0][0] <= now:
            _, seq = heapq.heappop(self._sleeping)
            j = self._jobs.get(seq)
            if j is not None and not j.paused and not j.listed:
                self._list(j)

    def end_plan(self) -> None:
        """The turn is committed: its reservations and requeued items stand."""
        self._reserved.clear()
        self._requeued.clear()

    def abandon_plan(self) -> None:
        """The turn's transaction failed: give back what it reserved, and count out the
        items it requeued (they are still running as far as the store knows)."""
        for seq in self._requeued:
            j = self._jobs.get(seq)
            if j is not None and j.left is not None:
                j.left -= 1
        self._requeued.clear()
        net: dict[tuple[int, str], int] = {}
        for seq, task, n in self._reserved:
            net[seq, task] = net.get((seq, task), 0) + n
        self._reserved.clear()
        for (seq, task), n in net.items():
            if n > 0:
                self._release(task, n)
            self._restore(seq, max(n, 0))  # what its steps took is queued again

    # ------------------------------------------------------------------ telling
    def next_due(self, now: float) -> float | None:
        """When a waiting item may next become startable by time alone (a ``run_after``
        passing, a rate window moving on), or None."""
        due: list[float] = []
        if self._sleeping:
            due.append(self._sleeping[0][0])
        for t in self._tasks.values():
            if (t.rate is not None and t.starts and t.heap and not t.paused
                    and t.room(now) <= 0):
                due.append(t.starts[0] + t.rate.per + _EDGE)
        return min(due) if due else None

    def waiting_reason(self, seq: int, task: str, now: float) -> str | None:
        """Why job ``seq``'s queued items do not start now (None: nothing holds them but
        free workers and their turn)."""
        j = self._jobs.get(seq)
        if j is not None:
            if j.paused:
                return PAUSED
            if j.run_after is not None and j.run_after > now:
                return RUN_AFTER
        t = self._tasks.get(task)
        return t.why_not(now) if t is not None else None

    def task_reasons(self, now: float) -> dict[str, str]:
        """For each task with waiting jobs that is held back, why."""
        out = {}
        for t in list(self._tasks.values()):  # a copy: the dispatcher may add tasks
            why = t.why_not(now)
            if why is not None and (t.heap or t.paused):
                out[t.name] = why
        return out

    def running_of(self, task: str) -> int:
        """Items of ``task`` on a worker now (as its concurrency limit counts them)."""
        t = self._tasks.get(task)
        return t.running if t is not None else 0

    def jobs(self) -> int:
        """Jobs in the view (those with queued items, as last known)."""
        return len(self._jobs)

    def rate_of(self, task: str) -> Rate | None:
        """The rate limit of ``task``, if it has one."""
        return self._limits.get(task, (0, None))[1]


__all__ = ["CONCURRENCY", "PAUSED", "RATE_LIMIT", "RUN_AFTER", "TASK_PAUSED", "Pacer"]
