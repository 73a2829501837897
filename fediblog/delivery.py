"""The durable delivery queue: POST each stored activity to each inbox, until it lands.

Deliveries are rows (see ``Store._publish``), not memory, so a restart loses
nothing. They run on the common worker (``worker.py``): claimed in batches, sent at
most ``concurrency`` at a time (``PER_HOST`` of them to one server, through the
delivery pool the app builds), each recorded the moment its inbox answers, so a
crash re-sends at most what was in flight and one slow inbox holds up no other.
Each row moves through explicit states:

    queued --2xx--> sent
    queued --410--> failed (the follower is gone and removed)
    queued --other 4xx except 401/408/429--> failed (final: the server refuses it)
    queued --5xx, 401/408/429, network error--> queued again after a back-off
    queued --after 16 attempts--> dead
    failed, dead, queued after an error --retry--> queued, due now, attempts 0

``deliver_once()`` runs one pass (tests call it; nothing sleeps); ``run()`` loops
over it, woken by ``wake()`` after a publish in this process and polling once a
second for rows another process (the CLI) queued. Every attempt is signed afresh.

``list_delivery_hosts`` and ``retry_deliveries`` are what the author sees and does, the
same for ``fediblog deliveries hosts|retry`` and the desk's Health page.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import datetime, timedelta
from email.utils import parsedate_to_datetime

import httpx

from fediblog.errors import FediblogError
from fediblog.httpsig import sign_request
from fediblog.keys import KeyPair
from fediblog.models import DeliveryJob, HostDeliveries, utcnow
from fediblog.netguard import deadline
from fediblog.store import Store
from fediblog.worker import Outcome, RetryPolicy, TableQueue, Worker, describe

log = logging.getLogger("fediblog.delivery")

# Waits after attempt 1, 2, …: 16 attempts over about two days, then "dead".
RETRY = RetryPolicy(
    tuple(
        timedelta(minutes=m)
        for m in (0.5, 1, 2, 5, 10, 20, 40, 60, 120, 180, 240, 360, 480, 600, 720)
    )
)
MAX_ATTEMPTS = RETRY.max_attempts
RETRYABLE_4XX = frozenset({401, 408, 429})
GONE = "410 Gone"  # the error of a delivery whose recipient no longer exists
MAX_RETRY_AFTER = timedelta(hours=12)
CONTENT_TYPE = "application/activity+json"
USER_AGENT = "fediblog/0.1 (+https://pypi.org/project/fediblog/)"
# Requests at once to one server (origin): polite to it, and httpcore's pool looks at
# every connection it holds for each request, so a few kept-alive connections taken in
# turn cost less CPU per delivery than one per running delivery (netguard.py).
PER_HOST = 8
MAX_ANSWER_BYTES = 65_536  # of an inbox's answer, read so the connection can be reused


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
        self._timeout = timeout
        self._timeouts = httpx.Timeout(timeout).as_dict()
        self.worker = Worker(
            "delivery",
            TableQueue(store.claim_deliveries, store.record_deliveries),
            self._attempt,
            concurrency=concurrency,
            # Claimed rows a crash strands until their lease ends: about one round.
            batch=concurrency,
            # Longer than any one attempt can take (its deadline is ``timeout``), so a
            # live worker never loses a lease; a dead one's rows are due again this long
            # after it died.
            lease=timedelta(seconds=timeout + 10),
            clock=clock,
        )

    def wake(self) -> None:
        """Something was queued in this process: deliver now, not at the next poll."""
        self.worker.wake()

    async def deliver_once(self) -> int:
        """Send every delivery that is due now; return how many were attempted."""
        return await self.worker.run_once()

    async def run(self) -> None:
        """Deliver forever: after every wake-up, and at least once a second."""
        await self.worker.run_forever()

    async def _attempt(self, job: DeliveryJob) -> Outcome:
        now = self.worker.clock()
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
            # Built here rather than by client.post, which would merge the client's
            # defaults, cookies and params into each request: nothing a delivery wants.
            request = httpx.Request(
                "POST",
                job.inbox,
                content=job.payload,
                headers=headers,
                extensions={"timeout": self._timeouts},
            )
            # One deadline for the whole request, so a trickling answer cannot outlive
            # the lease; it ends as a timeout inside httpcore, never a cancellation.
            with deadline(self._timeout):
                response = await self._client.send(request, stream=True)
                try:
                    read = 0
                    async for chunk in response.aiter_raw():
                        read += len(chunk)
                        if read > MAX_ANSWER_BYTES:
                            break  # nobody reads it; the connection is closed instead
                finally:
                    await response.aclose()
        except (httpx.HTTPError, OSError, FediblogError, ValueError) as error:
            return RETRY.after_error(job, describe(error)[:300], now, transient=True)
        status = response.status_code
        if 200 <= status < 300:
            return Outcome.done()
        if status == 410:
            await self._store.delete_followers_at_inbox(job.inbox)
            return Outcome.failed(GONE)
        if 400 <= status < 500 and status not in RETRYABLE_4XX:
            return Outcome.failed(f"HTTP {status}")
        outcome = RETRY.after_error(job, f"HTTP {status}", now, transient=True)
        retry_after = _retry_after(response, now)
        if outcome.retry_at is not None and retry_after is not None:
            wait = min(retry_after, MAX_RETRY_AFTER)
            outcome = Outcome.retry(max(outcome.retry_at, now + wait), f"HTTP {status}")
        return outcome


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


# ---- what the author sees and does: the CLI's `deliveries` and the desk's Health --------


async def list_delivery_hosts(store: Store, limit: int = 100) -> list[HostDeliveries]:
    """Per host, its deliveries not sent (``HostDeliveries``): the troubled hosts first."""
    return await store.list_delivery_hosts(limit)


async def retry_deliveries(
    store: Store,
    *,
    host: str | None = None,
    delivery_id: int | None = None,
    now: datetime | None = None,
) -> int:
    """Make the failing, failed and dead deliveries (to ``host``, or the one numbered
    ``delivery_id``, or all) due now, with a new round of attempts; returns how many.

    The server's worker sends them at its next pass (``Deliverer.wake`` in the server
    itself; within a second when another process, the CLI, queued them).
    """
    return await store.save_deliveries_due(
        now or utcnow(), host=host.strip() if host else None, delivery_id=delivery_id
    )
