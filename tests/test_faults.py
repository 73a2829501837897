"""Faults are normal: a poison activity, a locked or full or vanished database, a crash
or a hanging inbox mid-delivery, a read racing a rollback. Each test reproduces one
fault through the real app or the real module, and shows nothing accepted is lost,
nothing is sent twice, and nothing wedges.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import sqlite3
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest

from fediblog.delivery import Deliverer
from fediblog.errors import ActivityError, FetchStatus, FetchTimeout, StorageUnavailable
from fediblog.inbox import BatchWriter
from fediblog.keys import load_key
from fediblog.models import InboxItem, OutgoingActivity, utcnow
from fediblog.remote import FetchPolicy, build_transport
from fediblog.store import PostgresStore, Store
from fediblog.web.deps import Services
from fediblog.worker import Outcome, TableQueue, Worker, is_transient
from tests import dbpeek
from tests.conftest import BASE_URL, database_for, deliver
from tests.fediverse import Fediverse, signed_headers
from tests.helpers import publish, run
from tests.test_federation_e2e import Clock, World

pytestmark = pytest.mark.anyio


def like(actor_id: str, number: int, target: str, kind: str = "Like") -> dict[str, Any]:
    return {
        "@context": "https://www.w3.org/ns/activitystreams",
        "id": f"{actor_id}/likes/{number}",
        "type": kind,
        "actor": actor_id,
        "object": target,
    }


async def post_signed(web: httpx.AsyncClient, actor: Any, activity: dict[str, Any]) -> int:
    body = json.dumps(activity).encode()  # a lone surrogate stays a "\ud800" escape
    headers = signed_headers(actor.key_id, actor.key, BASE_URL + "/inbox", body)
    return (await web.post("/inbox", content=body, headers=headers)).status_code


# ---- 2. one bad activity refuses everyone's ------------------------------------------


async def test_an_unstorable_activity_is_refused_alone_not_its_batch(
    web: httpx.AsyncClient, ctx: Services, fediverse: Fediverse
) -> None:
    post = await publish(ctx, "Popular")
    target = ctx.blog.object_id(post.uid)
    alice = fediverse.add("social.example", "alice")
    await post_signed(web, alice, like(alice.id, 0, target))  # her key is known from here on
    poison = [
        like(alice.id, 1000, target, kind="Like\ud800"),
        {**like(alice.id, 1001, target), "id": f"{alice.id}/likes/\ud800"},
    ]
    honest = [like(alice.id, n, target) for n in range(1, 151)]

    statuses = await asyncio.gather(*(post_signed(web, alice, a) for a in [*poison, *honest]))

    assert statuses[:2] == [400, 400]
    assert statuses[2:] == [202] * 150
    assert (await ctx.store.count_inbox())["queued"] == 151


async def test_a_batch_that_fails_is_stored_one_by_one(tmp_path: Path) -> None:
    store = await Store.open(database_for(tmp_path, "inbox.db"))
    writer = BatchWriter(store)
    running = asyncio.create_task(writer.run())
    try:
        items = [InboxItem(f"k{n}", "https://a.example/u", "Like", "{}") for n in range(20)]
        items[7] = InboxItem("k7", "https://a.example/u", "Like\ud800", "{}")  # unstorable

        results = await asyncio.gather(*(writer.submit(i) for i in items), return_exceptions=True)

        assert isinstance(results[7], ActivityError)
        assert [r for n, r in enumerate(results) if n != 7] == [None] * 19
        assert (await store.count_inbox()) == {"queued": 19}
    finally:
        running.cancel()
        await store.close()


# ---- 4. a transient database error drops an accepted reply forever ------------------------


@contextmanager
def write_lock(database: Path) -> Iterator[None]:
    """Another process holds the database's write lock for the duration."""
    other = sqlite3.connect(database, isolation_level=None)
    other.execute("BEGIN IMMEDIATE")
    try:
        yield
    finally:
        other.execute("ROLLBACK")
        other.close()


@pytest.mark.sqlite_only("another process's write lock, taken with sqlite3, and busy_timeout")
async def test_a_locked_database_delays_a_reply_and_loses_nothing(
    web: httpx.AsyncClient,
    ctx: Services,
    fediverse: Fediverse,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    post = await publish(ctx, "Under lock")
    ann = fediverse.add("social.example", "ann")
    note = ann.note(1, ctx.blog.object_id(post.uid), "patience")
    assert (await deliver(web, ctx, ann, ann.create(note), process=False)).status_code == 202
    await ctx.store._db.execute("PRAGMA busy_timeout = 50")  # not 5 s: a test waits for it
    locked = ExitStackHandler()

    async def lock_then_continue(activity: dict[str, Any]) -> None:
        # Another process takes the write lock mid-processing, and keeps it a while.
        locked.enter(write_lock(ctx.settings.database))
        asyncio.get_running_loop().call_later(0.3, locked.close)

    ctx.inbox.handlers["Create"].insert(0, lock_then_continue)
    assert await ctx.inbox.process_once() == 1
    ctx.inbox.handlers["Create"].remove(lock_then_continue)

    row = inbox_row(ctx.settings.database)
    assert row["status"] == "queued"
    assert row["attempts"] == 1
    assert "locked" in row["error"]
    assert await ctx.store.get_comment_by_ap_id(note["id"]) is None
    assert await ctx.inbox.process_once() == 0  # not due yet: it backs off

    later = utcnow() + timedelta(minutes=5)
    monkeypatch.setattr(ctx.inbox.worker, "clock", lambda: later)
    assert await ctx.inbox.process_once() == 1
    assert inbox_row(ctx.settings.database)["status"] == "done"
    assert await ctx.store.get_comment_by_ap_id(note["id"]) is not None


class ExitStackHandler:
    def __init__(self) -> None:
        self._open: list[Any] = []

    def enter(self, manager: Any) -> None:
        manager.__enter__()
        self._open.append(manager)

    def close(self) -> None:
        while self._open:
            self._open.pop().__exit__(None, None, None)


def inbox_row(database: Path) -> sqlite3.Row:
    with sqlite3.connect(database) as db:
        db.row_factory = sqlite3.Row
        row = db.execute("SELECT status, attempts, error FROM inbox ORDER BY id DESC").fetchone()
    assert row is not None
    return row


async def test_the_cli_shows_why_an_activity_waits_or_failed(
    web: httpx.AsyncClient,
    ctx: Services,
    fediverse: Fediverse,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    post = await publish(ctx, "Reasons")
    ann = fediverse.add("social.example", "ann")
    mallory = fediverse.add("evil.example", "mallory", key_index=1)
    forged = mallory.note(1, ctx.blog.object_id(post.uid), "x", id=f"{ann.id}/statuses/9")
    await deliver(web, ctx, mallory, mallory.create(forged))

    async def disk_full(activity: dict[str, Any]) -> None:
        raise StorageUnavailable("the database cannot be used now: database or disk is full")

    ctx.inbox.handlers["Create"].insert(0, disk_full)
    await deliver(web, ctx, ann, ann.create(ann.note(2, ctx.blog.object_id(post.uid), "y")))
    monkeypatch.setenv("FEDIBLOG_BASE_URL", BASE_URL)
    monkeypatch.setenv("FEDIBLOG_DATABASE", str(ctx.settings.store_location))
    monkeypatch.setenv("FEDIBLOG_CONFIG", str(tmp_path / "none.toml"))

    code, out, _ = await asyncio.to_thread(run, capsys, "inbox")  # the CLI runs its own loop

    assert code == 0
    assert out.splitlines()[0] == "inbox: 1 queued, 0 done, 1 failed"
    (retrying,) = [line for line in out.splitlines() if " retry " in line]
    assert "attempts=1" in retrying
    assert "disk is full" in retrying
    (failed,) = [line for line in out.splitlines() if " failed " in line]
    assert "the object is on another host than its actor" in failed


def test_transient_and_permanent_errors() -> None:
    locked = sqlite3.OperationalError("database is locked")
    wrapped = ActivityError("cannot fetch the actor")
    wrapped.__context__ = FetchTimeout("host.example did not answer")
    refused = ActivityError("cannot fetch the actor")
    refused.__context__ = FetchStatus("HTTP 404", 404)
    assert is_transient(locked)
    assert is_transient(StorageUnavailable("disk full"))
    assert is_transient(wrapped)
    assert is_transient(FetchStatus("HTTP 503", 503))
    assert not is_transient(refused)
    assert not is_transient(ActivityError("the object is on another host"))
    assert not is_transient(RuntimeError("a bug"))


# ---- 5. a crash during delivery re-sends to every healthy inbox -------------------------


class Hanging:
    """An inbox that accepts the request and never answers (until released)."""

    def __init__(self) -> None:
        self.arrived = 0
        self.release = asyncio.Event()

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        self.arrived += 1
        await self.release.wait()
        await send({"type": "http.response.start", "status": 202, "headers": []})
        await send({"type": "http.response.body", "body": b""})


@pytest.fixture
async def world(tmp_path: Path) -> AsyncIterator[World]:
    world = World(tmp_path)
    async with world.client, world.blog():
        yield world


async def until(check: Any, seconds: float = 10.0) -> None:
    """Wait for ``check()`` to hold, polling the database as another process would."""
    async with asyncio.timeout(seconds):
        while not check():  # noqa: ASYNC110 - the state is in SQLite, no event to wait on
            await asyncio.sleep(0.01)


async def test_each_delivery_is_recorded_when_its_inbox_answers(world: World) -> None:
    healthy = [world.fake(f"ok{n}.test") for n in range(30)]
    for fake in healthy:
        await world.follow(fake.add_account("reader"))
    hanging = Hanging()
    world.internet.hosts["hang.test"] = hanging
    await world.services.store.save_follower(
        actor_id=await world.services.store.save_actor(
            ap_id="https://hang.test/users/h",
            username="h",
            domain="hang.test",
            name="H",
            url=None,
            icon_url=None,
            inbox="https://hang.test/users/h/inbox",
            shared_inbox="https://hang.test/inbox",
            key_id=None,
            public_key_pem=None,
            fetched=utcnow(),
        ),
        follow_id="https://hang.test/follows/1",
        inbox="https://hang.test/users/h/inbox",
        shared_inbox="https://hang.test/inbox",
        status="accepted",
    )
    deliverer = world.services.deliverer
    assert await deliverer.deliver_once() == 30  # the Accepts
    for fake in healthy:
        fake.forget_traffic()

    await publish(world.services, "First")
    run = asyncio.create_task(deliverer.deliver_once())
    await until(lambda: hanging.arrived == 1 and all(f.deliveries for f in healthy))
    # The healthy inboxes are recorded while one inbox still hangs: a crash now
    # would re-send only the hanging request.
    await until(lambda: count_rows(world, "sent") == 60)
    assert count_rows(world, "queued") == 1

    # Another post is delivered at once, not after the hanging request gives up.
    await publish(world.services, "Second")
    world.services.deliverer.wake()
    await until(lambda: all(len(f.deliveries) == 2 for f in healthy))
    await until(lambda: count_rows(world, "sent") == 90 and hanging.arrived == 2)

    # Shutdown: the hanging request is cut off, counted, and due again.
    run.cancel()
    with pytest.raises(asyncio.CancelledError):
        await run
    stuck = delivery_rows(world, "https://hang.test/inbox")
    assert [(r["status"], r["attempts"]) for r in stuck] == [("queued", 1), ("queued", 1)]
    assert all("interrupted" in r["last_error"] for r in stuck)

    hanging.release.set()
    assert await deliverer.deliver_once() == 2
    assert [r["status"] for r in delivery_rows(world, "https://hang.test/inbox")] == ["sent"] * 2
    assert all(len(f.deliveries) == 2 for f in healthy)  # nobody got anything twice


async def test_a_crashed_worker_resends_only_what_was_in_flight(world: World) -> None:
    fakes = [world.fake(f"f{n}.test") for n in range(5)]
    for fake in fakes:
        await world.follow(fake.add_account("reader"))
    assert await world.services.deliverer.deliver_once() == 5
    await publish(world.services, "Crash course")
    store = world.services.store
    # A worker claims two deliveries and dies (kill -9) before any answer is recorded.
    now = utcnow()
    lost = await store.claim_deliveries(now, now + timedelta(seconds=50), 2)
    assert len(lost) == 2

    clock = Clock(now)
    deliverer = world.deliverer_at(clock)
    assert await deliverer.deliver_once() == 3  # the others go now; the lost two wait
    clock.now += timedelta(seconds=51)  # their lease is over
    assert await deliverer.deliver_once() == 2

    creates = [len(f.received("Create")) for f in fakes]
    assert creates == [1] * 5
    rows = [r for r in await world.rows("Create")]
    by_inbox = {r.inbox: r.attempts for r in rows}
    assert sorted(by_inbox.values()) == [1, 1, 1, 2, 2]  # the crashed attempt counts


def count_rows(world: World, status: str) -> int:
    found = dbpeek.row(
        world.settings, "SELECT count(*) FROM deliveries WHERE status = ?", (status,)
    )
    assert found is not None
    return int(found[0])


def delivery_rows(world: World, inbox: str) -> list[dict[str, Any]]:
    columns = ("status", "attempts", "last_error")
    found = dbpeek.rows(
        world.settings,
        "SELECT status, attempts, last_error FROM deliveries WHERE inbox = ? ORDER BY id",
        (inbox,),
    )
    return [dict(zip(columns, values, strict=True)) for values in found]


# ---- 6. reads can see uncommitted writes -------------------------------------------------


async def test_a_read_never_sees_a_write_that_rolls_back(services: Services) -> None:
    store = services.store
    inside = asyncio.Event()
    seen: list[object] = []

    async def write_then_fail() -> None:
        async with store._transaction() as db:
            await db.execute(
                "INSERT INTO posts (uid, slug, title, body_md, body_html, published_at)"
                " VALUES ('u1', 'ghost', 'Ghost', '', '', '2026-01-01T00:00:00Z')"
            )
            inside.set()
            await asyncio.sleep(0.05)  # another coroutine reads meanwhile
            raise RuntimeError("rolled back")

    async def doomed_write() -> None:
        with pytest.raises(RuntimeError):
            await write_then_fail()

    async def reader() -> None:
        await inside.wait()
        seen.append(await store.get_post_by_slug("ghost"))

    await asyncio.gather(doomed_write(), reader())
    assert seen == [None]
    assert await store.get_post_by_slug("ghost") is None


async def test_a_task_started_inside_a_transaction_reads_only_committed_rows(
    services: Services,
) -> None:
    # A task created inside a transaction inherits its context: it must not take the
    # transaction's reads (through the writer) for its own.
    store = services.store
    seen: list[object] = []

    async def write_then_fail() -> None:
        async with store._transaction() as db:
            await db.execute(
                "INSERT INTO posts (uid, slug, title, body_md, body_html, published_at)"
                " VALUES ('u1', 'ghost', 'Ghost', '', '', '2026-01-01T00:00:00Z')"
            )
            seen.append(await store.get_post_by_slug("ghost"))  # its own write
            seen.append(await asyncio.create_task(store.get_post_by_slug("ghost")))
            raise RuntimeError("rolled back")

    with pytest.raises(RuntimeError):
        await write_then_fail()
    assert seen[0] is not None
    assert seen[1] is None
    assert await store.get_post_by_slug("ghost") is None


async def test_a_write_cancelled_while_it_begins_leaves_no_transaction_open(
    services: Services,
) -> None:
    # A write cancelled at any moment (a /healthz probe's deadline, a worker stopped at
    # shutdown), even while its BEGIN waits on the database's thread, must leave the
    # writer connection outside any transaction: else every later write fails with
    # "cannot start a transaction within a transaction" until a restart.
    store = services.store
    for ticks in range(12):  # cancelled after 0, 1, … turns of the event loop
        write = asyncio.ensure_future(store.probe_write(utcnow()))
        for _ in range(ticks):
            await asyncio.sleep(0)
        write.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await write
        await store.probe_write(utcnow())  # the next write works
        in_transaction = (  # the writer connection's own word, on either backend
            store._pg.connection.is_in_transaction()
            if isinstance(store, PostgresStore)
            else store._db.in_transaction
        )
        assert not in_transaction, f"left open when cancelled after {ticks} ticks"


# ---- 7. the database vanishes, or fills up, under a running server ------------------------


@pytest.mark.sqlite_only("the database file unlinked under the server")
async def test_a_removed_database_refuses_instead_of_accepting(
    web: httpx.AsyncClient, ctx: Services, fediverse: Fediverse
) -> None:
    post = await publish(ctx, "Vanishing")
    ann = fediverse.add("social.example", "ann")
    first = ann.note(1, ctx.blog.object_id(post.uid), "before")
    assert (await deliver(web, ctx, ann, ann.create(first), process=False)).status_code == 202

    ctx.settings.database.unlink()  # an operator's mistake while serving
    second = ann.note(2, ctx.blog.object_id(post.uid), "after")
    response = await deliver(web, ctx, ann, ann.create(second), process=False)

    assert response.status_code == 503  # the sender retries; nothing was lost in an unlinked file
    assert "retry-after" in response.headers


@pytest.mark.sqlite_only("a full disk made with PRAGMA max_page_count")
async def test_a_full_disk_is_logged_once_not_per_request(
    web: httpx.AsyncClient,
    ctx: Services,
    fediverse: Fediverse,
    caplog: pytest.LogCaptureFixture,
) -> None:
    post = await publish(ctx, "Full")
    target = ctx.blog.object_id(post.uid)
    alice = fediverse.add("social.example", "alice")
    assert await post_signed(web, alice, like(alice.id, 0, target)) == 202
    # The disk is full from here on: the writer may not grow the file by one page.
    (pages,) = await (await ctx.store._db.execute("PRAGMA page_count")).fetchone()  # type: ignore[misc]
    await ctx.store._db.execute(f"PRAGMA max_page_count = {pages}")

    with caplog.at_level(logging.ERROR, logger="fediblog"):
        statuses = [await post_signed(web, alice, like(alice.id, n, target)) for n in range(1, 80)]

    assert set(statuses) <= {202, 503}
    # Some fit in the free space of the last pages (the inbox's, its payloads', their
    # indexes'): about 20 Likes.
    assert statuses.count(503) >= 50
    failures = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(failures) == 1
    assert "full" in failures[0].message
    assert not any(r.exc_info for r in caplog.records)


# ---- retention -----------------------------------------------------------------------


async def test_old_finished_work_is_pruned_and_the_queue_kept(
    web: httpx.AsyncClient, ctx: Services, fediverse: Fediverse
) -> None:
    post = await publish(ctx, "Old news")
    ann = fediverse.add("social.example", "ann")
    await deliver(web, ctx, ann, ann.create(ann.note(1, ctx.blog.object_id(post.uid), "old")))
    await deliver(
        web, ctx, ann, ann.create(ann.note(2, ctx.blog.object_id(post.uid), "new")), process=False
    )
    assert await ctx.store.count_inbox() == {"done": 1, "queued": 1}

    assert await ctx.store.prune(utcnow() - timedelta(days=30)) == (0, 0)  # nothing old yet
    assert await ctx.store.prune(utcnow() + timedelta(seconds=1)) == (1, 0)

    assert await ctx.store.count_inbox() == {"queued": 1}
    assert await ctx.inbox.process_once() == 1
    assert len(await ctx.store.list_visible_comments(post.id)) == 2


@pytest.mark.sqlite_only("a full disk made with PRAGMA max_page_count")
async def test_a_full_disk_answers_a_reader_503_not_a_traceback(
    client: httpx.AsyncClient, services: Services, caplog: pytest.LogCaptureFixture
) -> None:
    post = await publish(services, "Comment here")
    db = services.store._db
    (pages,) = await (await db.execute("PRAGMA page_count")).fetchone()  # type: ignore[misc]
    await db.execute(f"PRAGMA max_page_count = {pages}")
    form = {"name": "Ann", "email": "ann@example.org", "comment": "x" * 9_000}

    with caplog.at_level(logging.ERROR, logger="fediblog"):
        responses = [await client.post(f"/posts/{post.slug}/comment", data=form) for _ in range(3)]

    assert [r.status_code for r in responses] == [503] * 3
    assert "try again in a minute" in responses[0].text
    assert responses[0].headers["retry-after"] == "60"
    assert len([r for r in caplog.records if r.levelno >= logging.ERROR]) == 1
    assert not any(r.exc_info for r in caplog.records)
    assert (await client.get(f"/posts/{post.slug}")).status_code == 200  # reading still works


async def test_a_trickling_inbox_is_cut_off_at_the_delivery_deadline(
    tmp_path: Path, services: Services
) -> None:
    """An inbox that answers a byte at a time for ever: the attempt ends at its deadline
    (through the real guarded transport, on loopback) and is retried later."""

    async def trickle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 202 Accepted\r\nContent-Length: 1000000\r\n\r\n")
        with contextlib.suppress(ConnectionError):
            for _ in range(600):  # bounded: a minute at most
                writer.write(b".")
                await writer.drain()
                await asyncio.sleep(0.1)
        writer.close()

    server = await asyncio.start_server(trickle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    inbox = f"http://127.0.0.1:{port}/inbox"
    key = load_key(services.settings.keys_dir, "blog")
    transport = build_transport(FetchPolicy(allow_http=True, allow_private_addresses=True))
    async with server, httpx.AsyncClient(transport=transport) as client:
        deliverer = Deliverer(services.store, client, key, services.urls.key_id, timeout=1.0)
        await services.store.save_activity_for(
            OutgoingActivity("https://blog.example/a/1", "Accept", "{}", public=False), inbox
        )
        started = time.monotonic()
        assert await deliverer.deliver_once() == 1
        took = time.monotonic() - started

    (row,) = await services.store.list_deliveries(["queued"])
    assert row.attempts == 1
    assert "Timeout" in row.last_error
    assert took < 5  # the deadline, not the server, ended it


# ---- a worker stops when told to, even woken at that moment ---------------------------


@pytest.mark.anyio
async def test_a_worker_woken_as_it_is_cancelled_still_stops() -> None:
    """A wake() in the same turn as the cancel of the shutdown: asyncio.wait_for (3.11)
    returned the wake and swallowed the CancelledError, so the worker ran on and the
    shutdown, which waits for it, waited forever (a hang seen in the suite)."""

    async def claim(now: object, lease_until: object, limit: int) -> list[Any]:
        return []

    async def record(results: object) -> None:
        return None

    async def run(job: object) -> Outcome:
        return Outcome.done()

    worker: Worker[Any] = Worker("test", TableQueue(claim, record), run, poll_seconds=3600)
    task = asyncio.create_task(worker.run_forever())
    for _ in range(100):  # until its first pass is over and it waits for a wake-up
        await asyncio.sleep(0)
    assert not task.done()

    worker.wake()
    task.cancel()

    done, _ = await asyncio.wait([task], timeout=5)
    assert task in done, "the worker ran on after it was cancelled"
    assert task.cancelled()
