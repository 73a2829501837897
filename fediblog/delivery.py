"""The durable delivery queue: POST each stored activity to each inbox, until it lands.

Deliveries are rows (see ``Store._publish``), not memory, so a restart loses
nothing. Each row moves through explicit states:

    queued --2xx--> sent
    queued --410--> failed (the follower is gone and removed)
    queued --other 4xx except 401/408/429--> failed (final: the server refuses it)
    queued --5xx, 401/408/429, network error--> queued again after a back-off
    queued --after 16 attempts--> dead

``deliver_once()`` runs one pass (tests call it; nothing sleeps); ``run()`` loops
over it, woken by ``wake()`` after a publish in this process and polling once a
second for rows another process (the CLI) queued. Every attempt is signed afresh.
At most ``concurrency`` POSTs are in flight.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import Callable
from datetime import datetime, timedelta
from email.utils import parsedate_to_datetime

import httpx

from fediblog.errors import FediblogError
from fediblog.httpsig import sign_request
from fediblog.keys import KeyPair
from fediblog.models import DeliveryJob, DeliveryOutcome, utcnow
from fediblog.store import Store

log = logging.getLogger("fediblog.delivery")

# Waits after attempt 1, 2, …: 16 attempts over about two days, then "dead".
BACKOFF = tuple(
    timedelta(minutes=m) for m in (0.5, 1, 2, 5, 10, 20, 40, 60, 120, 180, 240, 360, 480, 600, 720)
)
MAX_ATTEMPTS = len(BACKOFF) + 1
RETRYABLE_4XX = frozenset({401, 408, 429})
GONE = "410 Gone"  # the error of a delivery whose recipient no longer exists
MAX_RETRY_AFTER = timedelta(hours=12)
CONTENT_TYPE = "application/activity+json"
USER_AGENT = "fediblog/0.1 (+https://pypi.org/project/fediblog/)"


class Deliverer:
    """Sends queued deliveries, signed with the blog actor's key."""

    def __init__(
        self,
        store: Store,
        client: httpx.AsyncClient,
        key: KeyPair,
        key_id: str,
        *,
        concurrency: int = 64,
        timeout: float = 20.0,
        clock: Callable[[], datetime] = utcnow,
    ) -> None:
        self._store = store
        self._client = client
        self._key = key
        self._key_id = key_id
        self._limit = asyncio.Semaphore(concurrency)
        self._batch = concurrency * 8
        self._timeout = timeout
        self._clock = clock
        self._wake = asyncio.Event()
        self._in_flight: set[int] = set()

    def wake(self) -> None:
        """Something was queued in this process: deliver now, not at the next poll."""
        self._wake.set()

    async def deliver_once(self, max_rounds: int = 1_000) -> int:
        """Send every delivery that is due now; return how many were attempted.

        Bounded: a round takes a batch of due rows; a short batch means none are left.
        """
        attempted = 0
        for _ in range(max_rounds):
            jobs = await self._store.list_due_deliveries(
                self._clock(), self._batch, exclude=self._in_flight
            )
            if not jobs:
                break
            self._in_flight.update(job.id for job in jobs)
            try:
                outcomes = await asyncio.gather(*(self._attempt(job) for job in jobs))
                await self._store.save_delivery_outcomes(outcomes)
                for job, outcome in zip(jobs, outcomes, strict=True):
                    if outcome.error == GONE:
                        await self._store.delete_followers_at_inbox(job.inbox)
            finally:
                self._in_flight.difference_update(job.id for job in jobs)
            attempted += len(jobs)
            if len(jobs) < self._batch:
                break
        return attempted

    async def run(self, poll_seconds: float = 1.0) -> None:
        """Deliver forever: after every wake-up, and at least every ``poll_seconds``."""
        while True:
            try:
                await self.deliver_once()
            except Exception:  # the worker outlives any one bad pass; the rows stay queued
                log.exception("delivery pass failed")
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), poll_seconds)

    async def _attempt(self, job: DeliveryJob) -> DeliveryOutcome:
        async with self._limit:
            attempts = job.attempts + 1
            now = self._clock()
            headers = {"Content-Type": CONTENT_TYPE, "User-Agent": USER_AGENT}
            try:
                headers.update(
                    sign_request(
                        "POST",
                        job.inbox,
                        body=job.payload,
                        key_id=self._key_id,
                        private_key=self._key.private_key,
                        now=now,
                    )
                )
                response = await self._client.post(
                    job.inbox, content=job.payload, headers=headers, timeout=self._timeout
                )
                await response.aclose()
            except (httpx.HTTPError, OSError, FediblogError, ValueError) as error:
                return self._retry(job, attempts, now, f"{type(error).__name__}: {error}"[:300])
            status = response.status_code
            if 200 <= status < 300:
                return DeliveryOutcome(job.id, "sent", attempts, now)
            if status == 410:
                return DeliveryOutcome(job.id, "failed", attempts, now, GONE)
            if 400 <= status < 500 and status not in RETRYABLE_4XX:
                return DeliveryOutcome(job.id, "failed", attempts, now, f"HTTP {status}")
            return self._retry(job, attempts, now, f"HTTP {status}", _retry_after(response, now))

    def _retry(
        self,
        job: DeliveryJob,
        attempts: int,
        now: datetime,
        error: str,
        retry_after: timedelta | None = None,
    ) -> DeliveryOutcome:
        if attempts >= MAX_ATTEMPTS:
            return DeliveryOutcome(job.id, "dead", attempts, now, error)
        wait = BACKOFF[attempts - 1]
        # ±20% jitter, so a server that comes back is not hit by every sender at once.
        wait = wait * random.uniform(0.8, 1.2)
        if retry_after is not None:
            wait = max(wait, min(retry_after, MAX_RETRY_AFTER))
        return DeliveryOutcome(job.id, "queued", attempts, now + wait, error)


def _retry_after(response: httpx.Response, now: datetime) -> timedelta | None:
    """Retry-After as seconds or as an HTTP date (RFC 9110 10.2.3)."""
    value = response.headers.get("retry-after", "").strip()
    if not value:
        return None
    if value.isdigit():
        return timedelta(seconds=int(value))
    try:
        return parsedate_to_datetime(value) - now
    except (TypeError, ValueError):
        return None
