"""What operators see over HTTP: ``/healthz``, ``/metrics`` and the optional access log.

``/healthz`` is public and says nothing secret: 200 when a small write to the database
commits and every background task (``app.state.tasks``) still runs, else 503 with a
short reason. A web-only process (``serve --web-only``) runs no background task: it
reads instead the heartbeats ``fediblog worker`` processes write (runtime.py), and a
role no worker has reported for ``WORKER_SILENCE`` seconds counts as stopped.
It echoes the scheme and host the request arrived with as the app saw
them, after the proxy headers, and, for a request signed with one of this blog's own
keys, whether that signature verifies here as an inbound one would: ``fediblog check``
(check.py) uses both to test the reverse proxy from outside.

``/metrics`` is the Prometheus text format (metrics.py), for a client on this machine
that reached the server directly, or for anyone sending ``FEDIBLOG_METRICS_TOKEN`` as a
bearer token; everyone else gets the 404 of a page that does not exist. Its counts of
activities processed and deliveries add those of the worker processes heard from in
the last ``WORKER_SILENCE`` seconds (their heartbeats carry them): a web-only process
counts none itself.
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import json
import logging
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from fediblog.errors import SignatureError, StorageError
from fediblog.httpsig import parse_signature, verify_signature
from fediblog.metrics import Family, backlog, exposition
from fediblog.models import format_ts, utcnow
from fediblog.web.deps import Services, services

PROBE_TIMEOUT = 5.0  # a database that takes longer to commit one row is not healthy
PROBE_FRESH = 1.0  # seconds one probe's answer serves every /healthz request
METRICS_TYPE = "text/plain; version=0.0.4; charset=utf-8"
# Set by a proxy: a request carrying one came from elsewhere, whatever its address.
FORWARDING_HEADERS = (b"x-forwarded-for", b"x-forwarded-host", b"forwarded", b"x-real-ip")
NO_STORE = {"Cache-Control": "no-store"}


def _tasks(request: Request) -> Sequence[asyncio.Task[None]]:
    found: Sequence[asyncio.Task[None]] = getattr(request.app.state, "tasks", ())
    return found


class WriteProbe:
    """The database's answer to one small write, shared: /healthz is public, so
    concurrent requests wait for the same probe, and its answer serves every request
    for PROBE_FRESH seconds; a flood of /healthz costs one write a second, not one a
    request, on the write lock the inbox's group commit needs."""

    def __init__(self) -> None:
        self._probe: asyncio.Task[str] | None = None
        self._started = 0.0

    async def state(self, ctx: Services) -> str:
        """"writable", "slow" or "not writable"."""
        now = time.monotonic()
        if self._probe is None or (self._probe.done() and now - self._started >= PROBE_FRESH):
            self._probe = asyncio.create_task(self._run(ctx), name="healthz-probe")
            self._started = now
        return await asyncio.shield(self._probe)  # a client that leaves stops no probe

    @staticmethod
    async def _run(ctx: Services) -> str:
        try:
            async with asyncio.timeout(PROBE_TIMEOUT):
                await ctx.store.probe_write(utcnow())
        except TimeoutError:
            return "slow"
        except StorageError:
            return "not writable"
        return "writable"


def _write_probe(request: Request) -> WriteProbe:
    probe: WriteProbe | None = getattr(request.app.state, "write_probe", None)
    if probe is None:
        probe = request.app.state.write_probe = WriteProbe()
    return probe


def task_states(request: Request) -> dict[str, str]:
    """Each background task's name: "running", or "stopped" (then /healthz says 503)."""
    return {task.get_name(): "stopped" if task.done() else "running" for task in _tasks(request)}


# ---- roles left to worker processes (`serve --web-only` beside `fediblog worker`) -------

WORKER_SILENCE = 60.0  # seconds without a heartbeat before a worker process's role is stopped


@dataclass(frozen=True, slots=True)
class Elsewhere:
    """The background roles this process leaves to ``fediblog worker`` processes, and
    when it started waiting for them: a role never seen counts as "starting" for the
    first WORKER_SILENCE seconds, so a web process started first is not unhealthy."""

    roles: tuple[str, ...]
    since: datetime


@dataclass(frozen=True, slots=True)
class RoleSeen:
    """One role a worker process should run, as its heartbeats show it."""

    role: str
    last_seen: datetime | None
    state: str  # "running", "starting" or "stopped" (then /healthz says 503)

    @property
    def name(self) -> str:
        return f"{self.role} (worker process)"

    def problem(self, now: datetime) -> str | None:
        if self.state != "stopped":
            return None
        if self.last_seen is None:  # never, or its worker stopped cleanly
            return f"no worker process runs {self.role}"
        silent = (now - self.last_seen).total_seconds()
        return f"no worker process has run {self.role} for {silent:.0f} s"


async def worker_roles(request: Request, now: datetime) -> list[RoleSeen]:
    """The roles this process expects worker processes to run (none unless web-only)."""
    elsewhere: Elsewhere | None = getattr(request.app.state, "elsewhere", None)
    if elsewhere is None or not elsewhere.roles:
        return []
    # Read at most once per PROBE_FRESH seconds: /healthz is public.
    cached: tuple[float, dict[str, datetime]] | None = getattr(
        request.app.state, "heartbeats", None
    )
    if cached is None or time.monotonic() - cached[0] >= PROBE_FRESH:
        beats = await services(request).store.list_worker_heartbeats()
        request.app.state.heartbeats = cached = (time.monotonic(), beats)
    waiting = (now - elsewhere.since).total_seconds() <= WORKER_SILENCE
    found = []
    for role in elsewhere.roles:
        seen = cached[1].get(role)
        if seen is not None and (now - seen).total_seconds() <= WORKER_SILENCE:
            state = "running"
        else:
            state = "starting" if waiting else "stopped"
        found.append(RoleSeen(role, seen, state))
    return found


async def healthz(request: Request) -> Response:
    ctx = services(request)
    now = utcnow()
    workers = task_states(request)
    problems = [f"the {name} task has stopped" for name, up in workers.items() if up != "running"]
    try:
        roles = await worker_roles(request, now)
    except StorageError:  # the error's text may name paths: the logs have it
        roles = []
        problems.append("the worker processes' heartbeats cannot be read")
    workers.update((seen.name, seen.state) for seen in roles)
    problems += [problem for seen in roles if (problem := seen.problem(now))]
    database = await _write_probe(request).state(ctx)
    if database == "slow":
        problems.append(f"the database did not commit within {PROBE_TIMEOUT:g} s")
    elif database != "writable":  # the error's text may name paths: the logs have it
        problems.append("the database is not writable")
    body: dict[str, object] = {
        "status": "unavailable" if problems else "ok",
        "reason": "; ".join(problems) if problems else None,
        "database": database,
        "workers": workers,
        # When a worker process last reported each role this one leaves to it.
        "worker_processes": {
            seen.role: {
                "state": seen.state,
                "last_seen": format_ts(seen.last_seen) if seen.last_seen else None,
            }
            for seen in roles
        },
        # As the app saw the request: what inbound signatures are checked against.
        "request": {"scheme": request.url.scheme, "host": request.headers.get("host", "")},
        "expected": {"scheme": ctx.settings.scheme, "host": ctx.settings.host},
    }
    if "signature" in request.headers or "signature-input" in request.headers:
        body["signature"] = _own_signature(request, ctx)
    return Response(
        json.dumps(body, indent=1),
        status_code=503 if problems else 200,
        media_type="application/json",
        headers=NO_STORE,
    )


def _own_signature(request: Request, ctx: Services) -> str:
    """Verify a signature made with one of this blog's keys, as the inbox would (the
    configured host and scheme, the raw request target); other signers are not
    looked up, so nobody can make the health check fetch anything."""
    target = request.scope["raw_path"].decode("latin-1")
    if request.scope.get("query_string"):
        target += "?" + request.scope["query_string"].decode("latin-1")
    ours = {ctx.urls.key_id: ctx.blog_public_pem, ctx.urls.instance_key_id: ctx.instance_public_pem}
    try:
        signed = parse_signature(
            request.method,
            target,
            request.headers,
            b"",
            expected_host=ctx.settings.host,
            now=utcnow(),
            scheme=ctx.settings.scheme,
        )
        if signed.key_id not in ours:
            return "not checked: not signed with this blog's keys"
        verify_signature(signed, ours[signed.key_id])
    except SignatureError as error:
        return f"refused: {error}"
    return "verified"


# ---- /metrics -------------------------------------------------------------------------


def _is_local(scope: Scope) -> bool:
    """A client on this machine that reached the server directly: a loopback address
    (after the proxy headers uvicorn trusts), no forwarding header at all, and a Host
    that names a loopback address. A proxy that forwards public requests without
    X-Forwarded-For still sends the public Host, which fails the last test."""
    client = scope.get("client")
    if not client or not _is_loopback(client[0]):
        return False
    host = b""
    for name, value in scope["headers"]:
        if name in FORWARDING_HEADERS:
            return False
        if name == b"host":
            host = value
    hostname = host.decode("latin-1").rsplit(":", 1)[0] if host.count(b":") <= 1 else ""
    if host.startswith(b"["):  # [::1]:8000
        hostname = host.decode("latin-1")[1:].split("]", 1)[0]
    return hostname == "localhost" or _is_loopback(hostname)


def _is_loopback(address: str) -> bool:
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:
        return False


def _has_token(request: Request, token: str) -> bool:
    given = request.headers.get("authorization", "")
    scheme, _, value = given.partition(" ")
    return (
        bool(token)
        and scheme.lower() == "bearer"
        and hmac.compare_digest(value.strip().encode(), token.encode())
    )


async def metrics(request: Request) -> Response:
    ctx = services(request)
    if not (_is_local(request.scope) or _has_token(request, ctx.settings.metrics_token)):
        raise HTTPException(404)
    return Response(
        exposition(await collect(ctx, utcnow())), media_type=METRICS_TYPE, headers=NO_STORE
    )


DELIVERY_OUTCOMES = {"done": "sent", "retry": "retry", "failed": "failed", "gave_up": "dead"}


def _added(*counts: Mapping[str, int]) -> dict[str, int]:
    total: dict[str, int] = {}
    for each in counts:
        for key, count in each.items():
            total[key] = total.get(key, 0) + count
    return total


async def collect(ctx: Services, now: datetime) -> list[Family]:
    """Every family /metrics shows: the counters since start and the queues now."""
    stats = ctx.inbox.stats
    queues = backlog(await ctx.store.get_queue_stats(), now)
    # This process's counts, and those of the worker processes heard from lately
    # (`fediblog worker` writes them with its heartbeat): all of the blog's work.
    elsewhere = await ctx.store.get_worker_counts(now - timedelta(seconds=WORKER_SILENCE))
    delivered = _added(ctx.deliverer.worker.outcomes, elsewhere.get("delivery", {}))
    processed = _added(ctx.inbox.worker.outcomes, elsewhere.get("inbox", {}))
    return [
        Family(
            "fediblog_inbox_accepted_total",
            "counter",
            "Inbox POSTs accepted (202) since the server started.",
            (({}, stats.accepted),),
        ),
        Family(
            "fediblog_inbox_refused_total",
            "counter",
            "Inbox POSTs refused since the server started, by status and reason.",
            tuple(
                ({"status": str(status), "reason": kind}, count)
                for (status, kind), count in sorted(stats.refused.items())
            ),
        ),
        Family(
            "fediblog_inbox_processed_total",
            "counter",
            "Stored activities processed since the server (and each worker process) started,"
            " by outcome.",
            tuple(({"outcome": k}, processed.get(k, 0)) for k in ("done", "retry", "failed")),
        ),
        Family(
            "fediblog_deliveries_total",
            "counter",
            "Delivery attempts since the server (and each worker process) started, by outcome"
            " (dead: gave up).",
            tuple(
                ({"outcome": label}, delivered.get(status, 0))
                for status, label in DELIVERY_OUTCOMES.items()
            ),
        ),
        Family(
            "fediblog_queue_depth",
            "gauge",
            "Rows waiting in a queue (inbox: activities to process; deliveries: to send).",
            (
                ({"queue": "inbox"}, queues.inbox_queued),
                ({"queue": "deliveries"}, queues.deliveries_queued),
            ),
        ),
        Family(
            "fediblog_inbox_lag_seconds",
            "gauge",
            "How long the oldest activity not yet processed has waited since it was accepted.",
            (({}, queues.lag),),
        ),
        Family(
            "fediblog_inbox_last_lag_seconds",
            "gauge",
            "Accepted to processed, for the activity processed last.",
            (({}, queues.last_lag),),
        ),
    ]


# ---- the access log ------------------------------------------------------------------

access_log = logging.getLogger("fediblog.access")


class AccessLog:
    """One line per request (FEDIBLOG_ACCESS_LOG): client, request line (path without
    the query, which may carry tokens), status, milliseconds. Not installed when off,
    so it costs nothing then."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        if not access_log.handlers and not logging.getLogger().handlers:
            # uvicorn configures only its own loggers; without this the lines go nowhere.
            handler = logging.StreamHandler(sys.stderr)
            handler.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
            access_log.addHandler(handler)
        access_log.setLevel(logging.INFO)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 0

        async def send_noting_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_noting_status)
        finally:
            client = scope.get("client")
            access_log.info(
                '%s "%s %s HTTP/%s" %d %.1fms',
                client[0] if client else "-",
                scope["method"],
                json.dumps(scope["path"])[1:-1],  # escaped: no forged lines
                scope.get("http_version", "1.1"),
                status,
                (time.perf_counter() - started) * 1000,
            )


routes = [
    Route("/healthz", healthz, methods=["GET", "HEAD"]),
    Route("/metrics", metrics),
]
