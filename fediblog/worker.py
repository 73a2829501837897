"""Background work, one mechanism for every queue: claim → run → record.

A queue is rows in the database (inbox activities to act on, deliveries to send).
``Worker`` drives any ``Queue``:

* **claim** takes a batch of due rows in one write transaction, counting the attempt
  and leasing each row until ``now + lease``: a process that dies mid-job leaves the
  row to be claimed again once the lease ends, and the attempt is already counted;
* **run** does one job, at most ``concurrency`` at once, each in its own task, so a
  slow job never holds up another; or, given ``run_batch``, every job the pass holds
  at once, in claim order (the inbox acts on many activities in one commit), the
  function reporting each job's outcome as soon as it is final;
* **record** writes each outcome as soon as it is known (outcomes that finish
  together share one commit): done, retry at a time, or failed with a reason.

Whether an error is worth retrying is decided here, in ``is_transient``, for every
queue alike: the network, a timeout, a busy or locked or full database, a remote
5xx are transient; a refused, malformed or forbidden thing is permanent.
``run_once()`` drains what is due and returns (tests call it; nothing sleeps);
``run_forever()`` repeats it after every ``wake()`` and at least every ``poll``
seconds. Cancelled (shutdown), a worker records the outcomes already reported and
the jobs still running as attempted and due again now: a batch cut off part-way
runs again only what it had not finished.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import sqlite3
import time
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Generic, Literal, Protocol, TypeVar

import httpx

from fediblog.errors import (
    BadDocument,
    BlockedAddress,
    FetchError,
    FetchStatus,
    FetchTooLarge,
    StorageUnavailable,
)
from fediblog.models import utcnow

log = logging.getLogger("fediblog.worker")

Status = Literal["done", "retry", "failed", "release"]


@dataclass(frozen=True, slots=True)
class Outcome:
    """What became of one job: its row's next state."""

    status: Status
    error: str | None = None
    retry_at: datetime | None = None
    gave_up: bool = False  # failed only because the attempts ran out

    @classmethod
    def done(cls) -> Outcome:
        return cls("done")

    @classmethod
    def failed(cls, error: str) -> Outcome:
        return cls("failed", error[:500])

    @classmethod
    def retry(cls, at: datetime, error: str) -> Outcome:
        return cls("retry", error[:500], at)

    @classmethod
    def release(cls, at: datetime) -> Outcome:
        """Claimed but never run: due again at ``at``, and the attempt not counted."""
        return cls("release", None, at)


class Job(Protocol):
    @property
    def id(self) -> int: ...

    @property
    def attempts(self) -> int:
        """Attempts so far, this one included (claiming counts it)."""


J = TypeVar("J", bound=Job)

# Given to a batch function: call it with each job's outcome once that is final (for
# work that commits, once committed), exactly once per job.
Report = Callable[[J, Outcome], None]


class Queue(Protocol[J]):
    def claim(self, now: datetime, lease_until: datetime, limit: int, /) -> Awaitable[list[J]]:
        """Take up to ``limit`` due jobs, count an attempt on each, lease them."""
        ...

    def record(self, results: Sequence[tuple[J, Outcome]], /) -> Awaitable[None]:
        """Write these outcomes, all in one commit."""
        ...


@dataclass(frozen=True, slots=True)
class TableQueue(Generic[J]):
    """A queue that is one table: the store's claim and record for it."""

    claim: Callable[[datetime, datetime, int], Awaitable[list[J]]]
    record: Callable[[Sequence[tuple[J, Outcome]]], Awaitable[None]]


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """Waits after attempt 1, 2, …; after the last one, a transient error is final."""

    backoff: tuple[timedelta, ...]
    jitter: float = 0.2  # ±20%, so a server that comes back is not hit by everyone at once

    @property
    def max_attempts(self) -> int:
        return len(self.backoff) + 1

    def next_try(self, attempts: int, now: datetime, at_least: timedelta | None = None) -> datetime:
        wait = self.backoff[min(attempts, len(self.backoff)) - 1]
        wait *= random.uniform(1 - self.jitter, 1 + self.jitter)
        if at_least is not None:
            wait = max(wait, at_least)
        return now + wait

    def after_error(self, job: Job, error: str, now: datetime, *, transient: bool) -> Outcome:
        if not transient:
            return Outcome.failed(error)
        if job.attempts >= self.max_attempts:
            return Outcome("failed", error[:500], gave_up=True)
        return Outcome.retry(self.next_try(job.attempts, now), error)


def is_transient(error: BaseException) -> bool:
    """Whether trying the same job again later may succeed.

    Follows the chain of causes (``raise … from``, and the context of ``from None``):
    an ``ActivityError`` that wraps a fetch timeout is as transient as the timeout.
    """
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, FetchStatus):
            return current.status >= 500 or current.status in (408, 429)
        if isinstance(current, BadDocument | BlockedAddress | FetchTooLarge):
            return False
        if isinstance(current, FetchError | StorageUnavailable):
            return True  # connection refused, timeout, busy: the other side may recover
        if isinstance(current, sqlite3.OperationalError):
            return True  # locked, busy, disk full, read-only: the operator can fix it
        if isinstance(current, httpx.TransportError | TimeoutError | ConnectionError):
            return True
        if isinstance(current, OSError):
            return True
        current = current.__cause__ or current.__context__
    return False


def describe(error: BaseException) -> str:
    """One line for the CLI: the error's own text, or its type for a bare one."""
    text = str(error).strip().splitlines()[0] if str(error).strip() else ""
    return f"{type(error).__name__}: {text}"[:500] if text else type(error).__name__


class ThrottledLog:
    """Logs one line per ``interval`` for a recurring fault, with how often it recurred.

    A full disk under a reply flood fails every request: one line a minute says as much
    as 286 tracebacks.
    """

    def __init__(self, logger: logging.Logger, interval: float = 60.0) -> None:
        self._log = logger
        self._interval = interval
        self._last: dict[str, float] = {}
        self._suppressed: dict[str, int] = {}

    def error(self, key: str, message: str) -> None:
        now = time.monotonic()
        if now - self._last.get(key, -self._interval) < self._interval:
            self._suppressed[key] = self._suppressed.get(key, 0) + 1
            return
        again = self._suppressed.pop(key, 0)
        self._last[key] = now
        self._log.error("%s%s", message, f" (and {again} more since the last report)" * bool(again))


class Worker(Generic[J]):
    """Runs one queue's jobs: claim in batches, run concurrently, record each outcome."""

    def __init__(
        self,
        name: str,
        queue: Queue[J],
        run: Callable[[J], Awaitable[Outcome]],
        *,
        run_batch: Callable[[list[J], Report[J]], Awaitable[None]] | None = None,
        concurrency: int = 1,
        batch: int = 200,
        lease: timedelta = timedelta(minutes=1),
        record_every: int = 1,
        poll_seconds: float = 1.0,
        clock: Callable[[], datetime] = utcnow,
    ) -> None:
        self.name = name
        self._queue = queue
        self._run = run
        self._run_batch = run_batch
        self._concurrency = concurrency
        self._batch = max(batch, concurrency)
        self._lease = lease
        self._record_every = record_every
        self._poll = poll_seconds
        self.clock = clock
        self._wake = asyncio.Event()
        self._trouble = ThrottledLog(log)
        # Outcomes recorded since start, by status ("failed" when the attempts ran out
        # counts as "gave_up"): /metrics reads them.
        self.outcomes: dict[str, int] = {}
        # The last claim took all it asked for (more was due): the queue is ahead of
        # this worker. ``_claimed`` wakes whoever waits for its next claim.
        self.behind = False
        self._claimed = asyncio.Event()

    async def until_caught_up(self, longest: float) -> None:
        """Return at once unless this worker is behind; then at its next claim (it has
        finished a batch), or after ``longest`` seconds, whichever comes first."""
        if self.behind:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(longest):
                    await self._claimed.wait()

    def _took(self, found: int, room: int) -> None:
        self.behind = found >= room
        self._claimed.set()  # each waiter is woken; the next ones wait again
        self._claimed.clear()

    def wake(self) -> None:
        """Something was queued: run now, not at the next poll. Called by this process
        when it queues work, and by runtime.py's watcher when another process commits."""
        self._wake.set()

    async def run_once(self, max_jobs: int = 1_000_000) -> int:
        """Run every job due now (bounded by ``max_jobs``); return how many were claimed.

        New work that arrives while jobs run (``wake()``, or found by polling) joins
        this pass: a job that hangs until its timeout delays nothing queued after it.
        """
        backlog: deque[J] = deque()
        # Each running task, with its jobs whose outcome it has not reported yet.
        running: dict[asyncio.Task[None], dict[int, J]] = {}
        held: set[int] = set()  # claimed by this pass: never run twice, even past a lease
        results: list[tuple[J, Outcome]] = []  # reported, not yet recorded
        full = asyncio.Event()  # enough results to record while the tasks run on
        claimed = 0
        exhausted = False
        woken: asyncio.Task[bool] | None = None
        filled: asyncio.Task[bool] | None = None

        def reporter(unreported: dict[int, J]) -> Report[J]:
            def report(job: J, outcome: Outcome) -> None:
                if unreported.pop(job.id, None) is None:
                    raise RuntimeError(f"{self.name}: job {job.id} reported twice or not run")
                results.append((job, outcome))
                if len(results) >= self._record_every:
                    full.set()

            return report

        try:
            while True:
                # Claiming costs a commit: claim when half the batch is free, not per job.
                if not exhausted and claimed < max_jobs and len(backlog) <= self._batch // 2:
                    now = self.clock()
                    room = min(self._batch - len(backlog), max_jobs - claimed)
                    try:
                        found = await self._queue.claim(now, now + self._lease, room)
                    except StorageUnavailable as error:
                        if not (claimed or running or backlog):
                            raise
                        # Busy now; finish what this pass holds and look again later.
                        self._trouble.error("claim", f"{self.name}: claiming jobs: {error}")
                        found = []
                    self._took(len(found), room)
                    jobs = [job for job in found if job.id not in held]
                    claimed += len(jobs)
                    held.update(job.id for job in jobs)
                    backlog.extend(jobs)
                    exhausted = not jobs
                while backlog and len(running) < self._concurrency:
                    group = [backlog.popleft()]
                    if self._run_batch is not None:
                        group.extend(backlog)
                        backlog.clear()
                    unreported = {job.id: job for job in group}
                    task = asyncio.ensure_future(self._run_group(group, reporter(unreported)))
                    running[task] = unreported
                if not running:
                    break
                if woken is None:
                    woken = asyncio.ensure_future(self._wake.wait())
                if filled is None:
                    filled = asyncio.ensure_future(full.wait())
                finished, _ = await asyncio.wait(
                    {*running, woken, filled},
                    timeout=self._poll,
                    return_when=asyncio.FIRST_COMPLETED,
                )
                if woken in finished or not finished:
                    self._wake.clear()  # new work, or time to look for some
                    exhausted = False
                    woken.cancel()  # a waiter that timed out must not pile up
                    woken = None
                if filled in finished:
                    full.clear()
                    filled = None
                for task in [t for t in running if t in finished]:
                    results.extend(self._outcomes(running.pop(task), task))
                if results and (len(results) >= self._record_every or not (running or backlog)):
                    recording, results = results, []
                    try:
                        await self._record(recording)
                    except BaseException:
                        results[:0] = recording  # for _stop to try again
                        raise
            return claimed
        finally:
            for waiter in (woken, filled):
                if waiter is not None:
                    waiter.cancel()
            self._took(0, 1)  # a pass that ends, or fails, is behind nobody
            await self._stop(running, backlog, results)

    async def _record(self, results: list[tuple[J, Outcome]]) -> None:
        """Record outcomes, waiting out a database that is busy for a while: work done
        and forgotten would be done again once its lease ends."""
        for wait in (0.1, 0.5, 1, 2, 5):
            try:
                await self._queue.record(results)
                break
            except StorageUnavailable as error:
                self._trouble.error("record", f"{self.name}: recording outcomes: {error}")
                await asyncio.sleep(wait)
        else:
            await self._queue.record(results)
        for _, outcome in results:
            status = "gave_up" if outcome.gave_up else outcome.status
            self.outcomes[status] = self.outcomes.get(status, 0) + 1

    async def _run_group(self, jobs: list[J], report: Report[J]) -> None:
        if self._run_batch is None:
            report(jobs[0], await self._run(jobs[0]))
        else:
            await self._run_batch(jobs, report)

    def _outcomes(
        self, unreported: dict[int, J], task: asyncio.Task[None]
    ) -> list[tuple[J, Outcome]]:
        """The outcomes of the jobs a finished task did not report."""
        jobs = list(unreported.values())
        error = task.exception()
        if error is None:
            if not jobs:
                return []
            error = RuntimeError(f"no outcome was reported for {len(jobs)} jobs")
        # A job function returns its outcomes; what escapes it is a fault of ours or
        # of the machine. Transient faults come back later; a bug fails these jobs (one,
        # or those a batch function had not finished when it failed).
        transient = is_transient(error)
        if transient:
            self._trouble.error(type(error).__name__, f"{self.name}: {describe(error)}")
        else:
            first = f"job {jobs[0].id}" if jobs else "a batch, after its last outcome,"
            log.error("%s: %s failed", self.name, first, exc_info=error)
        retry_at = self.clock() + timedelta(seconds=30)
        outcome = (
            Outcome.retry(retry_at, describe(error))
            if transient
            else Outcome.failed(f"internal error: {describe(error)}")
        )
        return [(job, outcome) for job in jobs]

    async def _stop(
        self,
        running: dict[asyncio.Task[None], dict[int, J]],
        backlog: deque[J],
        results: list[tuple[J, Outcome]],
    ) -> None:
        """Cancelled or failed mid-pass: what finished is recorded as it ended (a batch
        reports what it finished, even as it is cut off), the rest is due again."""
        for task in running:
            task.cancel()
        await asyncio.gather(*running, return_exceptions=True)  # reports land in results
        if not (running or backlog or results):
            return
        now = self.clock()
        for task, unreported in running.items():
            if task.cancelled():
                stopped = Outcome.retry(now, "interrupted (the worker stopped)")
                results.extend((job, stopped) for job in unreported.values())
            else:
                results.extend(self._outcomes(unreported, task))
        # Claimed but never started: due now, and the attempt given back.
        results.extend((job, Outcome.release(now)) for job in backlog)
        try:
            await self._queue.record(results)
        except Exception as error:  # the leases bring the rows back; say why they wait
            log.error("%s: recording at shutdown failed: %s", self.name, describe(error))

    async def run_forever(self) -> None:
        """Run due jobs after every ``wake()`` and at least every ``poll`` seconds."""
        while True:
            self._wake.clear()
            try:
                await self.run_once()
            except Exception as error:  # the worker outlives any one bad pass
                if is_transient(error):
                    self._trouble.error("pass", f"{self.name}: {describe(error)}")
                else:
                    log.exception("%s: a pass failed", self.name)
            # asyncio.timeout, not wait_for: on 3.11, a wake() at the moment of a
            # cancel made wait_for return and swallow the CancelledError, and the
            # worker ran on past its shutdown, which then waited for it forever.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._poll):
                    await self._wake.wait()


async def every(seconds: float, action: Callable[[], Awaitable[object]], name: str) -> None:
    """Run ``action`` now and then every ``seconds``, surviving its failures."""
    while True:
        try:
            await action()
        except Exception:
            log.exception("%s failed", name)
        await asyncio.sleep(seconds)
