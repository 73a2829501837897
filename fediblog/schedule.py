"""The scheduler: publishes each scheduled post when its time comes, on the common worker.

A post dated in the future is stored ``scheduled`` (blog.py) with one row in
``post_schedule``, due at its date. The worker (worker.py) claims due rows, and each
job publishes its post and queues the Create to every follower in one commit
(``Blog.publish_due``). The row is in the database, so a restart loses nothing: the
next pass after start-up publishes whatever came due while the server was down. An
edit that moves the date moves the row; a job that finds its post not yet due puts
the row back for then, and one whose post is a draft again, published by hand or
deleted, is done. The worker polls every ``poll_seconds`` (30), so a post goes out
within a minute of its time, even when the CLI scheduled it.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime, timedelta

from fediblog.blog import Blog
from fediblog.models import ScheduleJob, utcnow
from fediblog.worker import Outcome, TableQueue, Worker


class Scheduler:
    """Runs the schedule: ``run_once()`` publishes what is due (tests pass ``clock``)."""

    def __init__(
        self,
        blog: Blog,
        *,
        clock: Callable[[], datetime] = utcnow,
        on_published: Callable[[], None] | None = None,
        poll_seconds: float = 30.0,
    ) -> None:
        self._blog = blog
        self._on_published = on_published
        self.worker = Worker(
            "schedule",
            TableQueue(blog.store.claim_schedules, blog.store.record_schedules),
            self._publish,
            batch=20,
            lease=timedelta(minutes=1),
            poll_seconds=poll_seconds,
            clock=clock,
        )

    async def run_once(self) -> int:
        """Publish every scheduled post due now; return how many rows were claimed."""
        return await self.worker.run_once()

    async def run(self) -> None:
        await self.worker.run_forever()

    async def _publish(self, job: ScheduleJob) -> Outcome:
        now = self.worker.clock()
        again = await self._blog.publish_due(job.post_id, now)
        if again is not None:
            return Outcome.release(again)  # not due (moved, or changed meanwhile)
        if self._on_published is not None:
            self._on_published()  # the delivery worker: send the Create now
        return Outcome.done()
