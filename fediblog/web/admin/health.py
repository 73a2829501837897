"""The desk's Health section: is the blog reaching the fediverse, and is it being reached?

* ``GET /admin/health``: the deliveries waiting, failing, failed and dead per host with
  their last error, and the latest of them one by one (delivery.py's
  ``list_delivery_hosts``, as ``fediblog deliveries hosts``); the inbox's backlog and lag
  (metrics.py's ``backlog``, as /metrics); the inbox's recent refusals by reason (the
  ring ``InboxStats`` keeps in this process); the background tasks (as /healthz), and
  for a web-only process the roles left to worker processes, each with when a worker
  last reported it; the public handle, the blog key's fingerprint and the version.
* ``POST /admin/health/retry``: ``host`` or ``id`` (or neither: all) made due now with a
  new round of attempts: ``delivery.retry_deliveries``, as ``fediblog deliveries retry``.
* ``POST /admin/health/check``: the self-test of ``fediblog check`` (check.py), one line
  per check. It runs in a thread with its own event loop, so none of it (the trust store,
  the keys, TLS) holds up the server's loop, which is busy answering the very requests
  the check makes; under a total deadline (``CHECK_DEADLINE``); one at a time; and it
  asks only the blog's own public URL: the form names no URL, and no ``peer`` is taken
  from it, so the button cannot make the blog fetch anything else.
"""

from __future__ import annotations

import asyncio
import threading
from dataclasses import dataclass
from datetime import datetime
from urllib.parse import urlsplit

from starlette.requests import Request
from starlette.responses import PlainTextResponse, RedirectResponse, Response
from starlette.routing import Route

from fediblog import __version__
from fediblog.check import Result, iter_checks
from fediblog.config import Settings
from fediblog.delivery import list_delivery_hosts, retry_deliveries
from fediblog.keys import fingerprint
from fediblog.metrics import backlog
from fediblog.models import utcnow
from fediblog.web.admin.page import read_form, render
from fediblog.web.deps import services
from fediblog.web.health import task_states, worker_roles

CHECK_DEADLINE = 25.0  # seconds for all the checks: under a proxy's usual 60 s read timeout
CHECK_WAIT = 5.0  # seconds for each request of a check
SHOWN_DELIVERIES = 50
SHOWN_HOSTS = 50
_checking = threading.Lock()  # one self-test at a time, whichever event loop asks


@dataclass(frozen=True, slots=True)
class DeliveryLine:
    """One delivery not sent, as the page lists it."""

    id: int
    type: str
    inbox: str
    host: str
    state: str  # waiting, failing, failed or dead
    attempts: int
    when: datetime | None  # the next try (queued), or when it ended (failed, dead)
    last_error: str | None

    @property
    def retryable(self) -> bool:
        return self.state != "waiting"


def _state(status: str, attempts: int, error: str | None) -> str:
    if status == "queued":
        return "failing" if attempts > 0 and error else "waiting"
    return status


def duration(seconds: float) -> str:
    """A lag for people: 0 s, 42 s, 3 min, 2 h 5 min, 3 d 4 h."""
    whole = int(seconds)
    if whole < 60:
        return f"{whole} s"
    if whole < 3600:
        return f"{whole // 60} min"
    if whole < 86400:
        return f"{whole // 3600} h {whole % 3600 // 60} min"
    return f"{whole // 86400} d {whole % 86400 // 3600} h"


async def _page(request: Request, *, checks: list[Result] | None = None) -> Response:
    ctx = services(request)
    now = utcnow()
    roles = await worker_roles(request, now)  # those left to worker processes, if any
    rows = await ctx.store.list_deliveries(("queued", "failed", "dead"), SHOWN_DELIVERIES)
    deliveries = [
        DeliveryLine(
            id=row.id,
            type=row.type,
            inbox=row.inbox,
            host=urlsplit(row.inbox).netloc.lower(),
            state=_state(row.status, row.attempts, row.last_error),
            attempts=row.attempts,
            when=row.next_attempt if row.status == "queued" else row.finished,
            last_error=row.last_error,
        )
        for row in rows
    ]
    hosts = await list_delivery_hosts(ctx.store, SHOWN_HOSTS)
    retried = request.query_params.get("retried", "")[:9]
    return render(
        request,
        "admin/health.html",
        title="Health",
        counts=await ctx.store.count_deliveries(),
        hosts=hosts,
        retryable=sum(host.retryable for host in hosts),
        deliveries=deliveries,
        now=now,
        backlog=backlog(await ctx.store.get_queue_stats(), now),
        duration=duration,
        refusals=ctx.inbox.stats.recent_by_reason(),
        workers=task_states(request) | {seen.name: seen.state for seen in roles},
        last_seen={seen.name: seen.last_seen for seen in roles},
        fingerprint=fingerprint(ctx.blog_public_pem),
        version=__version__,
        retried=int(retried) if retried.isascii() and retried.isdigit() else None,
        checks=checks,
        check_deadline=CHECK_DEADLINE,
    )


async def health(request: Request) -> Response:
    return await _page(request)


async def retry(request: Request) -> Response:
    ctx = services(request)
    form = await read_form(request)
    host, number = form.get("host"), form.get("id")
    host = host.strip() if isinstance(host, str) else ""
    number = number.strip() if isinstance(number, str) else ""
    if number and not (number.isascii() and number.isdigit() and len(number) < 19):
        return PlainTextResponse("400: id must be a delivery's number", 400)
    if len(host) > 300:
        return PlainTextResponse("400: that is not a host", 400)
    count = await retry_deliveries(
        ctx.store, host=host or None, delivery_id=int(number) if number else None
    )
    if count:
        ctx.deliverer.wake()
    return RedirectResponse(f"/admin/health?retried={count}#deliveries", status_code=303)


async def _checks_until_deadline(settings: Settings) -> list[Result]:
    results: list[Result] = []
    try:
        async with asyncio.timeout(CHECK_DEADLINE):
            async for result in iter_checks(settings, wait=CHECK_WAIT):
                results.append(result)
    except TimeoutError:
        results.append(
            Result(
                "deadline",
                "FAIL",
                f"stopped after {CHECK_DEADLINE:g} s: the checks after the last line did not"
                " run (is the blog's public URL answering?)",
            )
        )
    return results


def _run_checks(settings: Settings) -> list[Result]:
    """In a thread of its own: a loop of its own (see the module docstring). Holds
    ``_checking`` until the checks are over, even if the request has gone."""
    try:
        return asyncio.run(_checks_until_deadline(settings))
    finally:
        _checking.release()


async def check(request: Request) -> Response:
    ctx = services(request)
    if not _checking.acquire(blocking=False):
        return PlainTextResponse(
            "429: a federation check is already running; try again in a minute",
            429,
            headers={"Retry-After": str(int(CHECK_DEADLINE))},
        )
    results = await asyncio.to_thread(_run_checks, ctx.settings)
    return await _page(request, checks=results)


routes = [
    Route("/admin/health", health, methods=["GET"]),
    Route("/admin/health/retry", retry, methods=["POST"]),
    Route("/admin/health/check", check, methods=["POST"]),
]
