"""Crash safety of the real server: kill -9 during a reply flood and during a fan-out.

    python -m tests.bench.bench_faults [--flood-runs 5] [--fanout-runs 3]
                                       [--per-run 10000] [--connections 64]
                                       [--lease-wait]

Everything runs on 127.0.0.1; the server is the real ``fediblog serve`` (workers on),
started in a session of its own so that SIGKILL reaches its whole process group.

A. Reply flood + kill -9, ``--flood-runs`` times. A fresh blog with one post and 100
   remote actors whose keys are in the database (as in bench_inbox); ``--per-run``
   distinct signed ``Create{Note}`` replies, signed before the server starts. An
   httpx load generator (``--connections`` connections, each request sent once)
   POSTs them to /inbox and records which activity ids got 202. At a random moment
   1-3 s into the flood the server's process group is SIGKILLed; the requests then in
   flight fail with connection errors and are counted apart (never acknowledged).
   The database is read right after the kill; the server restarts on it and runs
   until every queued row is processed except those the killed process had claimed
   (attempt counted, lease in the future, outcome not recorded): the inbox lease is
   1 min, so they wait that long; ``--lease-wait`` waits for them too. Checked: every
   202 has its row, every row is one we sent, no row failed, no answer was a 500, and
   every accepted reply became exactly one comment, except (without --lease-wait)
   those still leased by the killed process, reported as deferred.

B. Fan-out + kill -9, ``--fanout-runs`` times. A fresh blog with 10,000 followers on
   1,000 shared inboxes, all paths of ONE local receiver process (bench_delivery's,
   which checks every signature and counts POSTs per path) that answers each POST
   after a random 0-``--delay-ms`` ms. ``fediblog post new`` publishes a post; once the
   receiver has seen a random 20-70% of the inboxes the server is SIGKILLed, and the
   database is read at once: deliveries still queued with an attempt counted and a
   lease in the future are those claimed by the dead process and not recorded (in
   flight, or claimed and waiting their turn). The server restarts; those rows are due
   again when their lease ends (about 30 s after the kill), so the wait is longer.
   Checked: every inbox reached, no invalid signature, and the inboxes reached twice
   (duplicates) are at most the in-flight rows, and all among them.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import random
import signal
import sqlite3
import ssl
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from fediblog.config import Settings
from fediblog.models import format_ts, utcnow
from tests.bench import bench_delivery, bench_inbox
from tests.bench.common import POSTGRES, bench_settings, postgres_admin, server_env
from tests.bench.sysstat import wait_for_quiet
from tests.processes import free_port

INBOX_LEASE = 60.0  # fediblog/inbox.py: Worker(lease=timedelta(minutes=1))
DELIVERY_LEASE = 30.0  # fediblog/delivery.py: lease = timeout (20 s) + 10 s
ENV = {"FEDIBLOG_ALLOW_PRIVATE_ADDRESSES": "1"}
QUEUED = "SELECT id FROM inbox WHERE status = 'queued'"


# ---- the server, in a process group of its own ----------------------------------------


def group_members(pgid: int) -> list[int]:
    """Live processes whose process group is ``pgid`` (from /proc)."""
    members = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            members.append(int(entry.name))
    return sorted(members)


class Server:
    """``fediblog serve`` started with start_new_session, so its pid is its group id."""

    def __init__(self, settings: Settings, port: int, log: Path) -> None:
        self.settings = settings
        self.port = port
        self.log = log
        self.process: subprocess.Popen[bytes] | None = None
        self.members: list[int] = []

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def start(self) -> float:
        """Start and wait (at most 60 s) until it answers; return the seconds it took."""
        started = time.monotonic()
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "fediblog", "serve", "--port", str(self.port)],
                env=server_env(self.settings, **ENV),
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = started + 60
        while True:
            try:
                httpx.get(f"http://127.0.0.1:{self.port}/about", timeout=2)
                break
            except httpx.TransportError:
                if time.monotonic() > deadline or self.process.poll() is not None:
                    raise RuntimeError(
                        f"the server did not start; its log:\n{self.log_tail()}"
                    ) from None
                time.sleep(0.1)
        self.members = group_members(self.pid)
        return time.monotonic() - started

    def kill(self) -> None:
        """SIGKILL the whole process group (no wait: call ``reap`` after)."""
        os.killpg(self.pid, signal.SIGKILL)

    def reap(self) -> None:
        assert self.process is not None
        self.process.wait(timeout=10)
        deadline = time.monotonic() + 10
        while group_members(self.pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        left = group_members(self.pid)
        if left:
            raise RuntimeError(f"processes of the killed server are still alive: {left}")

    def stop(self) -> None:
        """A clean stop (SIGINT); SIGKILL after 30 s."""
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGINT)
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            print("  WARNING: the server did not stop in 30 s after SIGINT: killed")
            self.kill()
            self.reap()

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def log_problems(self) -> list[str]:
        try:
            text = self.log.read_text(errors="replace")
        except OSError:
            return []
        return [
            line
            for line in text.splitlines()
            if "Traceback" in line or " ERROR" in line or line.startswith("ERROR")
        ]


def query(database: Path, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """One read with a short-lived connection (the server may be writing: WAL)."""
    db = sqlite3.connect(database, timeout=30, isolation_level=None)
    try:
        return db.execute(sql, params).fetchall()
    finally:
        db.close()


def one(database: Path, sql: str, params: tuple[Any, ...] = ()) -> Any:
    return query(database, sql, params)[0][0]


def clock() -> str:
    """Now in the database's text form (second precision, UTC), as leases are written."""
    return format_ts(utcnow())


# ---- A: reply flood --------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Signed:
    activity_id: str
    body: bytes
    headers: dict[str, str]


@dataclass
class Flood:
    kill_after: float
    sent: int = 0
    statuses: Counter[int] = field(default_factory=Counter)
    accepted: set[str] = field(default_factory=set)
    cut: set[str] = field(default_factory=set)  # connection errors after the kill
    early: list[str] = field(default_factory=list)  # connection errors before it
    samples: list[str] = field(default_factory=list)  # a few non-202 answers
    seconds: float = 0.0


@dataclass
class FloodRun:
    name: str
    flood: Flood
    requests: int
    members: list[int]
    at_kill: dict[str, int]
    leased_at_kill: int
    leased_commented_at_kill: int
    restart_seconds: float
    drain_seconds: float
    processed_after_restart: int
    drained: bool
    stored: int
    missing: list[str]
    unexpected: list[str]
    stored_unacknowledged: int
    statuses: dict[str, int]
    failed: dict[str, int]
    comments_for_accepted: int
    deferred: int  # accepted, no comment yet, row still leased by the dead process
    uncommented: list[tuple[Any, ...]]  # accepted, no comment, and no lease explains it
    duplicate_comments: int
    log_problems: list[str]

    @property
    def rate(self) -> float:
        if math.isnan(self.drain_seconds) or self.drain_seconds <= 0:
            return float("nan")
        return self.processed_after_restart / self.drain_seconds

    @property
    def ok(self) -> bool:
        return (
            not self.missing
            and not self.unexpected
            and not self.uncommented
            and not self.flood.early
            and self.flood.statuses.get(500, 0) == 0
            and set(self.flood.statuses) <= {202}
            and not self.failed
            and self.duplicate_comments == 0
            and self.drained
        )


def load_signed(tsv: Path) -> list[Signed]:
    requests = []
    for line in tsv.read_text().splitlines():
        date, digest, signature, body = line.split("\t")
        requests.append(
            Signed(
                json.loads(body)["id"],
                body.encode(),
                {
                    "Date": date,
                    "Digest": digest,
                    "Signature": signature,
                    "Content-Type": "application/activity+json",
                },
            )
        )
    return requests


async def flood(
    url: str, requests: list[Signed], connections: int, kill_after: float, server: Server
) -> Flood:
    """POST each request once over ``connections`` connections; SIGKILL the server
    ``kill_after`` seconds in and stop sending."""
    result = Flood(kill_after)
    position = 0
    killed = False

    async def connection(client: httpx.AsyncClient) -> None:
        nonlocal position
        while not killed and position < len(requests):
            request = requests[position]
            position += 1
            result.sent += 1
            try:
                response = await client.post(url, content=request.body, headers=request.headers)
            except httpx.TransportError as error:
                if killed:
                    result.cut.add(request.activity_id)
                else:
                    result.early.append(f"{request.activity_id}: {error!r}")
                continue
            result.statuses[response.status_code] += 1
            if response.status_code == 202:
                result.accepted.add(request.activity_id)
            elif len(result.samples) < 5:
                result.samples.append(f"{response.status_code}: {response.text[:200]}")

    async def killer() -> None:
        nonlocal killed
        await asyncio.sleep(kill_after)
        server.kill()
        killed = True

    # A client per connection: one client's pool shared by 64 requests costs ~4 ms of
    # CPU per request in httpx (encode/httpx#3215), and the load generator, not the
    # server, would set the pace. All made before the clock starts, with one TLS
    # context: each client would otherwise load the CA bundle (~30 ms), a second or
    # more before the first POST.
    tls = ssl.create_default_context()
    limits = httpx.Limits(max_connections=1, max_keepalive_connections=1)
    clients = [
        httpx.AsyncClient(limits=limits, timeout=httpx.Timeout(30.0), verify=tls)
        for _ in range(connections)
    ]
    try:
        started = time.monotonic()
        await asyncio.wait_for(
            asyncio.gather(killer(), *(connection(client) for client in clients)),
            timeout=kill_after + 60,
        )
    finally:
        for client in clients:
            await client.aclose()
    result.seconds = time.monotonic() - started
    return result


def inbox_counts(database: Path) -> dict[str, int]:
    """Inbox rows by status, the queued ones split into due and leased (in the future)."""
    now = clock()
    counts = dict(query(database, "SELECT status, count(*) FROM inbox GROUP BY status"))
    counts["due"] = one(
        database,
        "SELECT count(*) FROM inbox WHERE status = 'queued'"
        " AND (next_attempt_at IS NULL OR next_attempt_at <= ?)",
        (now,),
    )
    counts["leased"] = one(
        database,
        "SELECT count(*) FROM inbox WHERE status = 'queued' AND attempts > 0"
        " AND next_attempt_at > ?",
        (now,),
    )
    counts["comments"] = one(database, "SELECT count(*) FROM comments")
    return counts


def run_flood(number: int, args: argparse.Namespace, root: Path, pems: list[bytes]) -> FloodRun:
    name = f"flood{number}"
    folder = root / name
    folder.mkdir()
    port = free_port()
    settings = bench_settings(folder, port, allow_private_addresses=True)
    in_reply_to, blog_actor = asyncio.run(bench_inbox.seed(settings, pems))
    job = {
        "inbox": f"http://127.0.0.1:{port}/inbox",
        "in_reply_to": in_reply_to,
        "blog_actor": blog_actor,
    }
    prefixes = bench_inbox.generate(folder, {name: args.per_run}, 1, pems, job)
    requests = load_signed(Path(prefixes[name] + "0.tsv"))
    database = settings.database
    server = Server(settings, port, folder / "server.log")
    if args.quiet_wait > 0:
        print(
            f"{name}: other processes used {wait_for_quiet(args.quiet_wait):.2f} cores "
            "just before it",
            flush=True,
        )
    server.start()
    print(f"{name}: server pid {server.pid}, its process group: {server.members}", flush=True)
    # One request by hand first: the set-up must give 202, not 401.
    probe, requests = requests[0], requests[1:]
    answer = httpx.post(job["inbox"], content=probe.body, headers=probe.headers, timeout=10)
    if answer.status_code != 202:
        server.stop()
        raise RuntimeError(f"the first signed request got {answer.status_code}: {answer.text}")
    kill_after = random.uniform(1.0, 3.0)
    result = asyncio.run(flood(job["inbox"], requests, args.connections, kill_after, server))
    result.sent += 1
    result.statuses[202] += 1
    result.accepted.add(probe.activity_id)
    server.reap()
    # The database as the dead process left it. Its leased rows (claimed, attempt
    # counted, not recorded) wait for the lease; rows the restarted server claims look
    # the same, so the dead process's are told apart by id.
    at_kill = inbox_counts(database)
    now = clock()
    dead_leases = {
        row_id
        for (row_id,) in query(
            database,
            "SELECT id FROM inbox WHERE status = 'queued' AND attempts > 0 AND next_attempt_at > ?",
            (now,),
        )
    }
    leased_commented = one(
        database,
        "SELECT count(*) FROM inbox i JOIN inbox_payloads p USING (id) JOIN comments c"
        " ON c.ap_id = json_extract(p.payload, '$.object.id')"
        " WHERE i.status = 'queued' AND i.attempts > 0 AND i.next_attempt_at > ?",
        (now,),
    )
    print(
        f"{name}: SIGKILL {kill_after:.2f} s into the flood: {result.sent:,} sent, "
        f"{len(result.accepted):,} got 202, {len(result.cut)} cut by the kill, "
        f"{len(result.early)} failed before it; rows at the kill: {at_kill}",
        flush=True,
    )
    launched = time.monotonic()
    restart = server.start()
    limit = args.drain_timeout + (INBOX_LEASE if args.lease_wait else 0.0)
    if args.lease_wait:
        print(
            f"{name}: waiting for the inbox lease of the killed process too "
            f"(up to {INBOX_LEASE / 60:.0f} min)",
            flush=True,
        )

    def waiting() -> tuple[int, int, int]:
        """(queued rows not leased by the dead process, queued rows it leased, finished)"""
        queued = {row_id for (row_id,) in query(database, QUEUED)}
        finished = one(database, "SELECT count(*) FROM inbox WHERE status != 'queued'")
        return len(queued - dead_leases), len(queued & dead_leases), finished

    # The rate: rows finished from the restart's launch (start-up included) until only
    # the dead process's leased rows were left.
    pending, stranded, finished = waiting()
    finished_at_kill = at_kill.get("done", 0) + at_kill.get("failed", 0)
    drain, processed = float("nan"), 0
    polls = 0
    while time.monotonic() - launched < limit and polls < 100_000:
        if math.isnan(drain) and pending == 0:
            drain = time.monotonic() - launched
            processed = finished - finished_at_kill
        if pending == 0 and (stranded == 0 or not args.lease_wait):
            break
        time.sleep(0.2)
        polls += 1
        pending, stranded, finished = waiting()
        if polls % 50 == 0:
            print(
                f"  {name}: queued {pending:,}, still leased by the killed process "
                f"{stranded:,}, finished {finished:,}",
                flush=True,
            )
    drained = pending == 0 and (stranded == 0 or not args.lease_wait)
    server.stop()

    # What is on disk, the server stopped.
    rows = query(
        database,
        "SELECT dedup_key, status, attempts, next_attempt_at, error,"
        " json_extract(payload, '$.object.id'), id FROM inbox JOIN inbox_payloads USING (id)",
    )
    comments = Counter(ap_id for (ap_id,) in query(database, "SELECT ap_id FROM comments"))
    sent_ids = {r.activity_id for r in requests} | {probe.activity_id}
    by_id = {str(row[0]).split(" ", 1)[1]: row for row in rows}
    stored_ids = set(by_id)
    missing = sorted(result.accepted - stored_ids)
    unexpected = sorted(stored_ids - sent_ids)
    unacknowledged = stored_ids - result.accepted
    statuses = dict(Counter(str(row[1]) for row in rows))
    failed = dict(Counter(str(row[4]) for row in rows if row[1] == "failed"))
    with_comment = deferred = 0
    uncommented: list[tuple[Any, ...]] = []
    for activity_id in result.accepted & stored_ids:
        row = by_id[activity_id]
        if comments.get(row[5] or activity_id.removesuffix("/activity")):
            with_comment += 1
        elif row[1] == "queued" and row[6] in dead_leases:
            deferred += 1
        else:
            uncommented.append(row[:5])
    return FloodRun(
        name=name,
        flood=result,
        requests=len(requests) + 1,
        members=server.members,
        at_kill=at_kill,
        leased_at_kill=len(dead_leases),
        leased_commented_at_kill=leased_commented,
        restart_seconds=restart,
        drain_seconds=drain,
        processed_after_restart=processed,
        drained=drained,
        stored=len(rows),
        missing=missing,
        unexpected=unexpected,
        stored_unacknowledged=len(unacknowledged),
        statuses=statuses,
        failed=failed,
        comments_for_accepted=with_comment,
        deferred=deferred,
        uncommented=uncommented,
        duplicate_comments=sum(1 for n in comments.values() if n > 1),
        log_problems=server.log_problems(),
    )


# ---- B: fan-out ------------------------------------------------------------------------


def delayed(app: Any, max_delay: float) -> Any:
    """The receiver app, answering each POST after a random 0-max_delay s: the POST is
    counted (and its signature checked) at once, the answer comes later."""

    async def wrapped(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["method"] != "POST" or max_delay <= 0:
            await app(scope, receive, send)
            return

        async def send_later(message: Any) -> None:
            if message["type"] == "http.response.start":
                await asyncio.sleep(random.uniform(0, max_delay))
            await send(message)

        await app(scope, receive, send_later)

    return wrapped


def run_receiver(port: int, keys_dir: Path, key_id: str, max_delay: float) -> None:
    import uvicorn

    from fediblog.keys import load_key

    public_pem = load_key(keys_dir, "blog").public_pem
    uvicorn.run(
        delayed(bench_delivery.receiver_app(port, public_pem, key_id), max_delay),
        host="127.0.0.1",
        port=port,
        log_level="warning",
        access_log=False,
    )


@dataclass
class FanoutRun:
    name: str
    servers: int
    members: list[int]
    kill_target: int
    reached_at_kill: int
    rows_at_kill: dict[str, int]
    in_flight: int  # queued, attempt counted, lease in the future: claimed by the dead one
    received_unrecorded: int  # reached at the kill, row not 'sent': these come again
    unexplained_at_kill: list[str]  # reached at the kill, row neither sent nor leased
    restart_seconds: float
    seconds_to_all: float  # from the restart until every inbox had it (nan if never)
    drained: bool
    reached: int
    posts: int
    duplicates: int
    duplicated_not_leased: list[str]
    invalid: list[str]
    signatures: int
    rows: dict[str, int]
    attempts: dict[int, int]
    log_problems: list[str]

    @property
    def ok(self) -> bool:
        return (
            self.reached == self.servers
            and self.duplicates <= self.in_flight
            and not self.duplicated_not_leased
            and not self.unexplained_at_kill
            and not self.invalid
            and self.rows.get("sent", 0) == self.servers
            and self.drained
        )


def start_receiver(
    port: int, settings: Settings, key_id: str, delay_ms: int
) -> subprocess.Popen[bytes]:
    receiver = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tests.bench.bench_faults",
            "--receiver",
            "--port",
            str(port),
            "--keys",
            str(settings.keys_dir),
            "--key-id",
            key_id,
            "--delay-ms",
            str(delay_ms),
        ],
        cwd=Path(__file__).resolve().parents[2],
    )
    deadline = time.monotonic() + 30
    while True:
        try:
            bench_delivery.stats(port)
            return receiver
        except httpx.TransportError:
            if time.monotonic() > deadline or receiver.poll() is not None:
                receiver.kill()
                raise RuntimeError("the receiver did not start") from None
            time.sleep(0.1)


def delivery_counts(database: Path) -> dict[str, int]:
    now = clock()
    counts = dict(query(database, "SELECT status, count(*) FROM deliveries GROUP BY status"))
    counts["leased"] = one(
        database,
        "SELECT count(*) FROM deliveries WHERE status = 'queued' AND attempts > 0"
        " AND next_attempt_at > ?",
        (now,),
    )
    counts["unclaimed"] = one(
        database, "SELECT count(*) FROM deliveries WHERE status = 'queued' AND attempts = 0"
    )
    return counts


def run_fanout(number: int, args: argparse.Namespace, root: Path) -> FanoutRun:
    name = f"fanout{number}"
    folder = root / name
    folder.mkdir()
    port, receiver_port = free_port(), free_port()
    settings = bench_settings(folder, port, allow_private_addresses=True)
    database = settings.database
    started = time.monotonic()
    asyncio.run(bench_delivery.seed(settings, receiver_port, args.servers, args.per_server))
    print(
        f"{name}: seeded {args.servers * args.per_server:,} followers on {args.servers:,} "
        f"inboxes in {time.monotonic() - started:.1f} s",
        flush=True,
    )
    key_id = f"{settings.base_url}/users/{settings.handle}#main-key"
    receiver = start_receiver(receiver_port, settings, key_id, args.delay_ms)
    server = Server(settings, port, folder / "server.log")
    try:
        post_file = folder / "post.md"
        post_file.write_text(
            "---\ntitle: News for everyone\ntags: [bench]\n---\n"
            + "A paragraph that ten thousand people will read. " * 40
        )
        if args.quiet_wait > 0:
            print(
                f"{name}: other processes used {wait_for_quiet(args.quiet_wait):.2f} cores "
                "just before it",
                flush=True,
            )
        server.start()
        print(f"{name}: server pid {server.pid}, its process group: {server.members}", flush=True)
        target = int(args.servers * random.uniform(0.2, 0.7))
        cli = subprocess.run(
            [sys.executable, "-m", "fediblog", "post", "new", str(post_file)],
            env=server_env(settings, **ENV),
            capture_output=True,
            text=True,
            timeout=60,
        )
        if cli.returncode != 0:
            raise RuntimeError(f"fediblog post new failed: {cli.stderr}")
        seen = bench_delivery.stats(receiver_port)
        give_up = time.monotonic() + 120
        while len(seen["paths"]) < target and time.monotonic() < give_up:
            time.sleep(0.02)
            seen = bench_delivery.stats(receiver_port)
        if len(seen["paths"]) < target:
            raise RuntimeError(f"only {len(seen['paths'])} inboxes reached in 120 s")
        server.kill()
        server.reap()
        now = clock()
        rows_at_kill = delivery_counts(database)
        leased = {
            urlsplit(inbox).path
            for (inbox,) in query(
                database,
                "SELECT inbox FROM deliveries WHERE status = 'queued' AND attempts > 0"
                " AND next_attempt_at > ?",
                (now,),
            )
        }
        sent_at_kill = {
            urlsplit(inbox).path
            for (inbox,) in query(database, "SELECT inbox FROM deliveries WHERE status = 'sent'")
        }
        time.sleep(0.5)  # a request the kernel had already passed on is counted now
        at_kill = bench_delivery.stats(receiver_port)
        reached_at_kill = set(at_kill["paths"])
        unrecorded = reached_at_kill - sent_at_kill
        print(
            f"{name}: SIGKILL after {len(seen['paths']):,} inboxes (target {target:,}); "
            f"rows at the kill: {rows_at_kill}; reached at the kill {len(reached_at_kill):,}, "
            f"of which not recorded as sent: {len(unrecorded)}",
            flush=True,
        )
        restart = server.start()
        ready = time.monotonic()
        print(
            f"{name}: restarted; the {len(leased)} rows the killed process had claimed are due "
            f"again when their lease ends, about {DELIVERY_LEASE:.0f} s after the kill",
            flush=True,
        )
        counts = delivery_counts(database)
        all_reached_at = float("nan")
        polls = 0
        while (
            counts.get("queued", 0) > 0
            and time.monotonic() - ready < args.drain_timeout
            and polls < 100_000
        ):
            time.sleep(0.25)
            polls += 1
            counts = delivery_counts(database)
            if (
                math.isnan(all_reached_at)
                and polls % 4 == 0
                and len(bench_delivery.stats(receiver_port)["paths"]) >= args.servers
            ):
                all_reached_at = time.monotonic() - ready
            if polls % 40 == 0:
                print(f"  {name}: {counts}", flush=True)
        drained = counts.get("queued", 0) == 0
        time.sleep(2.0)  # anything sent twice arrives now
        final = bench_delivery.stats(receiver_port)
        if math.isnan(all_reached_at) and len(final["paths"]) >= args.servers:
            all_reached_at = time.monotonic() - ready
        server.stop()
    finally:
        server.stop()
        receiver.terminate()
        try:
            receiver.wait(timeout=20)
        except subprocess.TimeoutExpired:
            receiver.kill()
    rows = dict(query(database, "SELECT status, count(*) FROM deliveries GROUP BY status"))
    attempts = dict(query(database, "SELECT attempts, count(*) FROM deliveries GROUP BY attempts"))
    twice = sorted(path for path, count in final["paths"].items() if count > 1)
    return FanoutRun(
        name=name,
        servers=args.servers,
        members=server.members,
        kill_target=target,
        reached_at_kill=len(reached_at_kill),
        rows_at_kill=rows_at_kill,
        in_flight=len(leased),
        received_unrecorded=len(unrecorded),
        unexplained_at_kill=sorted(unrecorded - leased),
        restart_seconds=restart,
        seconds_to_all=all_reached_at,
        drained=drained,
        reached=len(final["paths"]),
        posts=final["posts"],
        duplicates=len(twice),
        duplicated_not_leased=[p for p in twice if p not in leased],
        invalid=final["invalid"],
        signatures=final["signatures"],
        rows=rows,
        attempts=attempts,
        log_problems=server.log_problems(),
    )


# ---- report ----------------------------------------------------------------------------


def print_floods(runs: list[FloodRun]) -> None:
    print()
    print("A. Reply flood, SIGKILL, restart")
    print(
        "| run | kill at | sent | 202 (per s) | cut by kill | other answers | 500s | rows stored "
        "| 202s missing | stored, not 202 | done | failed | comments for 202s "
        "| leased at kill (had comment) | deferred by lease | rate after restart |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in runs:
        f = r.flood
        other = {s: n for s, n in sorted(f.statuses.items()) if s != 202}
        print(
            f"| {r.name} | {f.kill_after:.2f} s | {f.sent:,} | {len(f.accepted):,} "
            f"({len(f.accepted) / f.kill_after:,.0f}) | "
            f"{len(f.cut)} | {other or 0} | {f.statuses.get(500, 0)} | {r.stored:,} | "
            f"{len(r.missing)} | {r.stored_unacknowledged} | {r.statuses.get('done', 0):,} | "
            f"{r.statuses.get('failed', 0)} | {r.comments_for_accepted:,} | "
            f"{r.leased_at_kill} ({r.leased_commented_at_kill}) | {r.deferred} | "
            f"{r.rate:,.0f}/s ({r.processed_after_restart:,} in {r.drain_seconds:.1f} s) |"
        )
    for r in runs:
        notes = []
        if r.missing:
            notes.append(f"202s with no row: {r.missing[:10]}")
        if r.unexpected:
            notes.append(f"rows nobody sent: {r.unexpected[:10]}")
        if r.uncommented:
            notes.append(f"accepted, no comment, not leased: {r.uncommented[:10]}")
        if r.failed:
            notes.append(f"failed rows by reason: {r.failed}")
        if r.flood.early:
            notes.append(f"connection errors before the kill: {r.flood.early[:5]}")
        if r.flood.sent >= r.requests:
            notes.append("every signed request was sent before the kill: raise --per-run")
        if r.flood.samples:
            notes.append(f"non-202 answers: {r.flood.samples}")
        if r.duplicate_comments:
            notes.append(f"{r.duplicate_comments} replies became more than one comment")
        if not r.drained:
            notes.append("the queue did not drain in time")
        if r.log_problems:
            notes.append(f"{len(r.log_problems)} error lines in the log: {r.log_problems[:3]}")
        if len(r.members) != 1:
            notes.append(f"the server's process group had {len(r.members)} processes")
        if notes:
            print(f"  {r.name}: " + "; ".join(notes))


def print_fanouts(runs: list[FanoutRun]) -> None:
    print()
    print("B. Fan-out, SIGKILL, restart")
    print(
        "| run | killed after | rows at kill: sent / in flight (leased) / unclaimed "
        "| reached, not recorded | reached | POSTs | duplicates | duplicates <= in flight "
        "| invalid | rows after | attempts | restart → all reached |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in runs:
        print(
            f"| {r.name} | {r.reached_at_kill:,} inboxes | "
            f"{r.rows_at_kill.get('sent', 0):,} / {r.in_flight} / "
            f"{r.rows_at_kill.get('unclaimed', 0):,} | {r.received_unrecorded} | "
            f"{r.reached:,}/{r.servers:,} | {r.posts:,} | {r.duplicates} | "
            f"{'yes' if r.duplicates <= r.in_flight and not r.duplicated_not_leased else 'NO'} | "
            f"{len(r.invalid)} | {r.rows} | {dict(sorted(r.attempts.items()))} | "
            f"{r.seconds_to_all:.1f} s |"
        )
    for r in runs:
        notes = []
        if r.duplicated_not_leased:
            notes.append(f"reached twice, not leased at the kill: {r.duplicated_not_leased[:10]}")
        if r.unexplained_at_kill:
            notes.append(
                f"reached at the kill, neither sent nor leased: {r.unexplained_at_kill[:10]}"
            )
        if r.duplicates != r.received_unrecorded:
            notes.append(
                f"{r.duplicates} duplicates, but {r.received_unrecorded} inboxes had the POST"
                " at the kill without its row being recorded as sent"
            )
        if r.invalid:
            notes.append(f"invalid: {r.invalid[:5]}")
        if not r.drained:
            notes.append("the queue did not drain in time")
        if r.log_problems:
            notes.append(f"{len(r.log_problems)} error lines in the log: {r.log_problems[:3]}")
        if len(r.members) != 1:
            notes.append(f"the server's process group had {len(r.members)} processes")
        if notes:
            print(f"  {r.name}: " + "; ".join(notes))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--flood-runs", type=int, default=5)
    parser.add_argument("--fanout-runs", type=int, default=3)
    parser.add_argument("--per-run", type=int, default=10_000, help="signed replies per flood")
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--servers", type=int, default=1000, help="shared inboxes (fan-out)")
    parser.add_argument("--per-server", type=int, default=10, help="followers per inbox")
    parser.add_argument("--delay-ms", type=int, default=200, help="receiver answers in 0..this")
    parser.add_argument(
        "--drain-timeout",
        type=float,
        default=240.0,
        help="after the restart, wait at most this long for the queue to empty (s)",
    )
    parser.add_argument(
        "--lease-wait",
        action="store_true",
        help="flood: also wait out the inbox lease (10 min) of the rows the killed process"
        " had claimed, and require a comment for every 202",
    )
    parser.add_argument("--quiet-wait", type=float, default=30.0)
    parser.add_argument("--seed", type=int, help="random seed (kill moments)")
    parser.add_argument("--receiver", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--keys", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--key-id", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.receiver:
        run_receiver(args.port, args.keys, args.key_id, args.delay_ms / 1000)
        return
    if postgres_admin():  # its checks read the SQLite file: json_extract, leases as text
        parser.error(f"SQLite only: unset {POSTGRES}")
    if not (0 <= args.flood_runs <= 20 and 0 <= args.fanout_runs <= 20):
        parser.error("at most 20 runs of each")
    if not 100 <= args.per_run <= 100_000:
        parser.error("--per-run between 100 and 100,000")
    if not 1 <= args.servers * args.per_server <= 100_000:
        parser.error("between 1 and 100,000 followers")
    if args.seed is not None:
        random.seed(args.seed)

    started = time.monotonic()
    floods: list[FloodRun] = []
    fanouts: list[FanoutRun] = []
    with tempfile.TemporaryDirectory(prefix="bench-faults-") as tmp:
        root = Path(tmp)
        if args.flood_runs:
            keys = [
                rsa.generate_private_key(public_exponent=65537, key_size=2048)
                for _ in range(bench_inbox.ACTORS)
            ]
            pems = [
                k.private_bytes(
                    serialization.Encoding.PEM,
                    serialization.PrivateFormat.PKCS8,
                    serialization.NoEncryption(),
                )
                for k in keys
            ]
            for number in range(1, args.flood_runs + 1):
                floods.append(run_flood(number, args, root, pems))
        for number in range(1, args.fanout_runs + 1):
            fanouts.append(run_fanout(number, args, root))
    wall = time.monotonic() - started

    if floods:
        print_floods(floods)
    if fanouts:
        print_fanouts(fanouts)
    print()
    parts = []
    if floods:
        accepted = sum(len(r.flood.accepted) for r in floods)
        parts.append(
            f"flood runs={len(floods)} accepted={accepted:,} "
            f"lost={sum(len(r.missing) for r in floods)} "
            f"uncommented={sum(len(r.uncommented) for r in floods)} "
            f"deferred_by_lease={sum(r.deferred for r in floods)} "
            f"failed={sum(r.statuses.get('failed', 0) for r in floods)} "
            f"http500={sum(r.flood.statuses.get(500, 0) for r in floods)} "
            f"cut_by_kill={sum(len(r.flood.cut) for r in floods)}"
        )
    if fanouts:
        parts.append(
            f"fanout runs={len(fanouts)} "
            f"reached={sum(r.reached for r in fanouts):,}/{sum(r.servers for r in fanouts):,} "
            f"duplicates={sum(r.duplicates for r in fanouts)} "
            f"in_flight={sum(r.in_flight for r in fanouts)} "
            f"invalid={sum(len(r.invalid) for r in fanouts)}"
        )
    ok = all(r.ok for r in floods) and all(r.ok for r in fanouts)
    print(f"RESULT faults {' '.join(parts)} wall={wall:.0f} s {'SAFE' if ok else 'NOT SAFE'}")
    if not ok:
        sys.exit(1)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
