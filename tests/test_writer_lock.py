"""The writer lock: a process that wants to write while another one writes is woken the
moment the other commits, instead of sleeping in SQLite's busy handler.

Two Stores on one file stand for two processes: each has its own connections and its
own descriptor of the lock file, and a flock belongs to the open file, so they exclude
each other exactly as `serve --web-only` and `fediblog worker` do. The waiting Store's
busy timeout is set to 0: without the lock its BEGIN would fail at once instead of
waiting, so these tests fail on a Store that takes no writer lock.
"""

from __future__ import annotations

import asyncio
import fcntl
import os
import signal
import sqlite3
import sys
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from datetime import UTC, datetime, timedelta
from functools import partial
from pathlib import Path

import pytest

from fediblog.errors import StorageConflict, StorageUnavailable
from fediblog.inbox import BatchWriter
from fediblog.models import InboxItem, InboxJob
from fediblog.store import Store, core
from fediblog.store import crawl as crawl_storage
from fediblog.store.core import _insert_rows, _outcome_rows, _update_rows
from fediblog.store.inbox import _RECORD_INBOX
from fediblog.worker import Outcome
from tests import dbpeek
from tests.helpers import inbox_items
from tests.test_backends import batch_replies

pytestmark = [pytest.mark.anyio, pytest.mark.sqlite_only("the writer lock file")]


@asynccontextmanager
async def two_stores(tmp_path: Path) -> AsyncIterator[tuple[Store, Store]]:
    path = tmp_path / "blog.db"
    first = await Store.open(path)
    second = await Store.open(path)
    try:
        await second._db.execute("PRAGMA busy_timeout = 0")  # SQLite alone would not wait
        yield first, second
    finally:
        await second.close()
        await first.close()


@asynccontextmanager
async def holding(store: Store) -> AsyncIterator[asyncio.Event]:
    """``store`` holds a write transaction until the event is set."""
    held, release = asyncio.Event(), asyncio.Event()

    async def hold() -> None:
        async with store._transaction(shown=False) as db:
            await db.execute("INSERT INTO meta (key, value) VALUES ('held', '1')")
            held.set()
            await release.wait()

    task = asyncio.create_task(hold())
    await held.wait()
    try:
        yield release
    finally:
        release.set()
        await task


async def test_a_writer_waits_for_another_and_goes_on_once_it_commits(tmp_path: Path) -> None:
    async with two_stores(tmp_path) as (first, second):
        async with holding(first) as release:
            waiting = asyncio.create_task(second.save_meta_value("second", "written"))
            await asyncio.sleep(0.3)
            assert not waiting.done()  # neither failed (busy) nor wrote past the lock
            release.set()
            await asyncio.wait_for(waiting, 5)
        assert await first.get_meta_value("held") == "1"
        assert await first.get_meta_value("second") == "written"


async def test_a_wait_given_up_on_leaves_the_lock_to_the_others(tmp_path: Path) -> None:
    async with two_stores(tmp_path) as (first, second):
        second._writer_lock.timeout = 0.2
        async with holding(first):
            with pytest.raises(StorageUnavailable, match="write lock"):
                await second.save_meta_value("late", "never")
            cancelled = asyncio.create_task(second.save_meta_value("cancelled", "never"))
            await asyncio.sleep(0.05)
            cancelled.cancel()
            with pytest.raises(asyncio.CancelledError):
                await cancelled
        # The wait that timed out closed its lock file; the cancelled one still ran on the
        # writer's thread (BEGIN once the holder let go, then its ROLLBACK) and let go:
        # both Stores write, one after the other, and neither abandoned write was made.
        await asyncio.wait_for(second.save_meta_value("second", "after"), 5)
        await asyncio.wait_for(first.save_meta_value("first", "after"), 5)
        assert await first.get_meta_value("late") is None
        assert await first.get_meta_value("cancelled") is None
        assert await second.get_meta_value("first") == "after"


_HOLDER = """
import asyncio, sys
from pathlib import Path
from fediblog.store import Store

async def main() -> None:
    store = await Store.open(Path(sys.argv[1]))
    async with store._transaction(shown=False) as db:
        await db.execute("INSERT INTO meta (key, value) VALUES ('holder', '1')")
        print("held", flush=True)
        await asyncio.sleep(600)

asyncio.run(main())
"""


async def test_a_writer_killed_while_it_holds_the_lock_holds_nobody_up(tmp_path: Path) -> None:
    path = tmp_path / "blog.db"
    await (await Store.open(path)).close()  # created and migrated before the holder starts
    holder = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        _HOLDER,
        str(path),
        stdout=asyncio.subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])},
    )
    try:
        assert holder.stdout is not None
        assert (await asyncio.wait_for(holder.stdout.readline(), 30)).strip() == b"held"
        store = await Store.open(path)
        try:
            store._writer_lock.timeout = 30
            writing = asyncio.create_task(store.save_meta_value("after", "kill"))
            await asyncio.sleep(0.3)
            assert not writing.done()
            holder.send_signal(signal.SIGKILL)
            await asyncio.wait_for(writing, 10)
            assert await store.get_meta_value("after") == "kill"
            assert await store.get_meta_value("holder") is None  # its write died with it
        finally:
            await store.close()
    finally:
        if holder.returncode is None:
            holder.kill()
        await holder.wait()


async def test_the_group_commit_stores_every_text_exactly(tmp_path: Path) -> None:
    """The inbox's batch insert binds its rows in statements of many rows (no GIL per
    row): what it stores is exactly what it was given, NUL and all, and a duplicate is
    ignored, of a row stored before or of one earlier in the batch."""
    texts = [
        '{"content": "\\u0000 \\"quoted\\" é 🎉\\n", "x": "\\\\"}',
        "tab\there, a raw \x01 and \u2028 and a lone \\ud800 escape",
        "with a NUL \x00 in the middle",
        "{}",
    ]
    items = [
        InboxItem(f"key-{n}", f"https://example.com/users/é{n}", f"Create{n}", text)
        for n, text in enumerate(texts)
    ]
    async with two_stores(tmp_path) as (store, _):
        await store.save_inbox_items(items[:2])
        again = [InboxItem("key-0", "a", "b", "duplicate"), InboxItem("key-2", "c", "d", "twice")]
        await store.save_inbox_items([*items[2:], *again])
        rows = await store._fetchall(
            "SELECT dedup_key, actor_ap_id, type, payload FROM inbox"
            " JOIN inbox_payloads USING (id) ORDER BY id"
        )
    assert [tuple(row) for row in rows] == [
        (item.dedup_key, item.actor, item.type, item.payload) for item in items
    ]


async def test_a_claim_and_its_record_write_none_of_the_payloads(tmp_path: Path) -> None:
    """A claim and the record of its outcome rewrite inbox rows, with the write lock
    held: the payloads are kept apart, so the two write a few pages, not the ~1 MB of
    JSON a batch carries (measured as what they add to the write-ahead log)."""
    payload = '{"content": "' + "x" * 3000 + '"}'
    items = [InboxItem(f"key-{n}", "https://x.example/u", "Create", payload) for n in range(300)]
    async with two_stores(tmp_path) as (store, _):
        await store.save_inbox_items(items)
        await store._db.execute_fetchall("PRAGMA wal_checkpoint(TRUNCATE)")
        wal = tmp_path / "blog.db-wal"
        assert wal.stat().st_size == 0
        now = datetime.now(UTC)
        jobs = await store.claim_inbox(now, now + timedelta(minutes=1), 500)
        await store.record_inbox([(job, Outcome.done()) for job in jobs])
        written = wal.stat().st_size
    assert [job.payload for job in jobs] == [payload] * 300
    assert written < len(payload) * 300 / 5, written  # ~100 KB; with the payloads, ~2.4 MB


async def _commits_of(store: Store) -> list[str]:
    """A list that each COMMIT of ``store``'s writer connection is added to from now on."""
    committed: list[str] = []

    def count_commits(connection: sqlite3.Connection) -> None:
        connection.set_trace_callback(lambda sql: sql == "COMMIT" and committed.append(sql))

    await store._on_writer(count_commits)
    return committed


def _beginning(store: Store) -> threading.Event:
    """An event set as ``store``'s writer begins a transaction, before it takes the lock."""
    began, beginning = store._begin, threading.Event()

    def begin(connection: sqlite3.Connection) -> None:
        beginning.set()
        began(connection)

    store._begin = begin  # type: ignore[method-assign]
    return beginning


async def _until(event: threading.Event) -> None:
    """Turns of the loop until ``event`` is set, and none after (an asyncio.Event would
    let the loop turn once more)."""
    while not event.wait(0.001):  # noqa: ASYNC110
        await asyncio.sleep(0)


@contextmanager
def _another_process_writes(store: Store) -> Iterator[int]:
    """The writer lock of ``store``'s database, held as another process holds it, until
    the block ends or the descriptor given is unlocked."""
    other = os.open(f"{store._path}-lock", os.O_RDONLY | os.O_CREAT, 0o600)
    try:
        fcntl.flock(other, fcntl.LOCK_EX)
        yield other
    finally:
        os.close(other)


async def test_the_group_commit_takes_what_arrived_while_it_waited_for_the_lock(
    tmp_path: Path,
) -> None:
    """Another process holds the write lock when a reply arrives; two more arrive while
    the commit waits for it. All three ride in that commit, taken once the lock is held:
    a commit that took its batch before waiting left them for the next (in a flood with
    two web processes, ~4 ms of waiting a commit, and 20% fewer replies a second)."""
    async with two_stores(tmp_path) as (store, _):
        committed = await _commits_of(store)
        waiting = _beginning(store)
        writer = BatchWriter(store)
        running = asyncio.create_task(writer.run())
        try:
            with _another_process_writes(store) as other:
                first = asyncio.create_task(writer.submit(InboxItem("k1", "a", "Like", "{}")))
                await _until(waiting)  # the commit waits for the lock
                later = [
                    asyncio.create_task(writer.submit(InboxItem(f"k{n}", "a", "Like", "{}")))
                    for n in (2, 3)
                ]
                await asyncio.sleep(0.05)
                assert not first.done()
                fcntl.flock(other, fcntl.LOCK_UN)
                await asyncio.wait_for(asyncio.gather(first, *later), 10)
        finally:
            running.cancel()
            await asyncio.gather(running, return_exceptions=True)
        assert committed == ["COMMIT"]
        assert await store.count_inbox() == {"queued": 3}


def _inbox_rows(path: Path) -> int:
    """How many activities the inbox holds, as another process sees them."""
    return int(dbpeek.rows(path, "SELECT count(*) FROM inbox")[0][0])


async def test_the_group_commit_goes_on_while_activities_wait_and_its_loop_is_busy(
    tmp_path: Path,
) -> None:
    """In a flood the event loop is busy with requests; a commit that is done waited for
    a turn of it (~15 ms of each ~22 ms cycle) before the next batch was taken, the lock
    free and the writer idle. While activities wait, the next commit follows on the
    writer's thread at once: here all three batches are stored while the loop sleeps."""
    async with two_stores(tmp_path) as (store, _):
        committed = await _commits_of(store)
        waiting = _beginning(store)
        writer = BatchWriter(store, max_batch=2)
        submitted = [asyncio.create_task(writer.submit(item)) for item in inbox_items(6)]
        running = asyncio.create_task(writer.run())
        try:
            with _another_process_writes(store) as other:
                await _until(waiting)  # the first commit waits for the lock
                fcntl.flock(other, fcntl.LOCK_UN)
                deadline = time.monotonic() + 10
                while _inbox_rows(store._path) < 6 and time.monotonic() < deadline:
                    time.sleep(0.005)  # noqa: ASYNC251 (the loop's thread: no turn of it)
            assert _inbox_rows(store._path) == 6
            assert await asyncio.wait_for(asyncio.gather(*submitted), 10) == [None] * 6
        finally:
            running.cancel()
            await asyncio.gather(running, return_exceptions=True)
        assert committed == ["COMMIT"] * 3


async def test_a_process_waiting_for_the_lock_writes_between_commits_that_follow_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Commits that follow one another on the writer's thread let the lock rest between
    them a little longer than another process waiting for it sleeps between its tries:
    the worker's claim comes in between, not after the whole flood."""
    assert core.HANDOFF > core._LONGEST_PAUSE
    monkeypatch.setattr(core, "HANDOFF", 0.05)  # the same order, on a machine busy with tests
    monkeypatch.setattr(core, "TRIP_LONGEST", 10.0)
    async with two_stores(tmp_path) as (store, other):
        order: list[str] = []  # whose commits, in their order
        for name, one in (("inbox", store), ("other", other)):
            await one._on_writer(partial(_name_commits, order=order, name=name))
        began, holding = store._begin, threading.Event()

        def begin(connection: sqlite3.Connection) -> None:
            began(connection)
            if not holding.is_set():  # a slow first commit: the other starts waiting
                holding.set()
                time.sleep(0.1)

        store._begin = begin  # type: ignore[method-assign]
        writer = BatchWriter(store, max_batch=1)
        submitted = [asyncio.create_task(writer.submit(item)) for item in inbox_items(3)]
        running = asyncio.create_task(writer.run())
        try:
            await _until(holding)
            await other.save_meta_value("other", "written")
            await asyncio.wait_for(asyncio.gather(*submitted), 10)
        finally:
            running.cancel()
            await asyncio.gather(running, return_exceptions=True)
        assert order == ["inbox", "other", "inbox", "inbox"]


async def test_a_batch_that_fails_after_others_followed_on_is_stored_one_by_one_alone(
    tmp_path: Path,
) -> None:
    """Commits that followed one another in one trip to the writer's thread: the batches
    before the failing one are answered as stored, and only the failing batch is stored
    one activity at a time, its culprit refused."""
    async with two_stores(tmp_path) as (store, _):
        committed = await _commits_of(store)
        items = inbox_items(6)
        items[4] = InboxItem("k4", "https://a.example/u", "Like\ud800", "{}")  # unstorable
        writer = BatchWriter(store, max_batch=2)
        submitted = [asyncio.create_task(writer.submit(item)) for item in items]
        running = asyncio.create_task(writer.run())
        try:
            results = await asyncio.wait_for(asyncio.gather(*submitted, return_exceptions=True), 10)
        finally:
            running.cancel()
            await asyncio.gather(running, return_exceptions=True)
        assert [type(result).__name__ for result in results] == [
            *["NoneType"] * 4,
            "ActivityError",
            "NoneType",
        ]
        assert committed == ["COMMIT"] * 3  # two batches, then k5 alone (k4: rolled back)
        assert await store.count_inbox() == {"queued": 5}


def _name_commits(connection: sqlite3.Connection, *, order: list[str], name: str) -> None:
    def trace(sql: str) -> None:
        if sql == "COMMIT":
            order.append(name)

    connection.set_trace_callback(trace)


async def test_the_group_commit_inside_a_transaction_is_part_of_it(tmp_path: Path) -> None:
    """Called inside a write transaction (its own lock held), the one-trip write joins it
    instead of waiting for that lock forever, and rolls back with it."""
    item = InboxItem("key", "https://example.com/users/ann", "Create", "{}")

    async def write_then_change_mind() -> None:
        async with store._transaction(shown=False), asyncio.timeout(5):  # this very task
            await store.save_inbox_items([item])
            assert await store._fetchone("SELECT 1 FROM inbox WHERE dedup_key = 'key'")
            raise RuntimeError("changed my mind")

    async with two_stores(tmp_path) as (store, _):
        with pytest.raises(RuntimeError, match="changed my mind"):
            await write_then_change_mind()
        assert await store._fetchone("SELECT 1 FROM inbox") is None
        async with store._transaction(shown=False), asyncio.timeout(5):
            await store.save_inbox_items([item])
        assert await store._fetchone("SELECT 1 FROM inbox WHERE dedup_key = 'key'")


async def test_a_claim_with_nothing_due_never_waits_for_the_write_lock(tmp_path: Path) -> None:
    """Workers are woken by every commit of another process; most wake-ups find nothing
    due. Such a claim looks first, on the reader, and takes no write lock: it answers at
    once while another process holds the lock, where a write fails at once (busy 0)."""
    async with two_stores(tmp_path) as (_, store):
        now = datetime.now(UTC)
        later = now + timedelta(minutes=1)
        holder = sqlite3.connect(tmp_path / "blog.db", isolation_level=None)
        try:
            holder.execute("BEGIN IMMEDIATE")
            assert await store.claim_inbox(now, later, 10) == []
            assert await store.claim_deliveries(now, later, 10) == []
            assert await store.claim_crawls(now, later, 10) == []
            holder.execute("ROLLBACK")
            await store.save_inbox_items([InboxItem("key", "https://example.com/a", "Like", "{}")])
            holder.execute("BEGIN IMMEDIATE")
            with pytest.raises(StorageUnavailable, match="locked"):
                await store.claim_inbox(now, later, 10)  # something is due: it must write
        finally:
            holder.close()
        [job] = await store.claim_inbox(now, later, 10)
        assert job.attempts == 1


async def _lock_freed_under_a_busy_loop(store: Store, write: Awaitable[object]) -> bool:
    """Start ``write``; once it has taken the write lock, keep the event loop busy (as a
    worker's batch keeps it, drafting its replies) and see whether the lock is let go
    meanwhile: yes when the whole transaction ran in its one trip to the writer's thread,
    no when its next step waits for a turn of the loop."""
    began = threading.Event()
    take = store._begin

    def begin(connection: sqlite3.Connection) -> None:
        take(connection)
        began.set()

    store._begin = begin  # type: ignore[method-assign]
    task = asyncio.ensure_future(write)
    try:
        # Turns of the loop until the lock is taken (a read trip comes first: is anything
        # due?), and none after: an asyncio.Event would let the loop turn once more.
        while not began.wait(0.001):  # noqa: ASYNC110
            await asyncio.sleep(0)
        return _lock_freed(Path(f"{store._path}-lock"), within=5.0)
    finally:
        await task
        store._begin = take  # type: ignore[method-assign]


def _lock_freed(path: Path, *, within: float) -> bool:
    """Whether the writer lock at ``path`` is free, or becomes so ``within`` seconds,
    while this thread (the event loop's) waits for it."""
    lock = os.open(path, os.O_RDONLY)
    try:
        deadline = time.monotonic() + within
        while True:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    return False
                time.sleep(0.005)
                continue
            fcntl.flock(lock, fcntl.LOCK_UN)
            return True
    finally:
        os.close(lock)


async def test_a_worker_s_claim_and_record_let_go_of_the_lock_while_its_loop_is_busy(
    tmp_path: Path,
) -> None:
    """A worker claims and records while its batch runs beside them, and the batch keeps
    the event loop busy for tens of milliseconds at a time. A claim that took one trip
    per step (BEGIN, UPDATE, COMMIT) held the lock through those turns, ~5 ms a claim,
    and the web processes' group commits waited for it."""
    async with two_stores(tmp_path) as (store, _):
        now = datetime.now(UTC)
        await store.save_inbox_items(
            [InboxItem(f"key{n}", "https://example.com/a", "Like", "{}") for n in range(3)]
        )
        jobs: list[InboxJob] = []

        async def claim() -> None:
            jobs.extend(await store.claim_inbox(now, now + timedelta(minutes=1), 10))

        assert await _lock_freed_under_a_busy_loop(store, claim())
        assert [job.attempts for job in jobs] == [1, 1, 1]
        done = [(job, Outcome.done()) for job in jobs]
        assert await _lock_freed_under_a_busy_loop(store, store.record_inbox(done))
        assert await store.count_inbox() == {"done": 3}


async def test_a_worker_s_crawl_claim_and_heartbeat_let_go_of_the_lock_while_its_loop_is_busy(
    tmp_path: Path,
) -> None:
    """The crawler queues a crawl of each reply a batch made and claims due crawls in one
    transaction, and every worker records its heartbeat. Both were a trip per statement
    (and the crawls an executemany, a step per reply): during an inbox flood they held
    the write lock 30-190 ms across the worker's busy turns of the loop, and every web
    process's group commit waited, the p99 of its answers with them."""
    async with two_stores(tmp_path) as (store, _):
        _, reply = await batch_replies(store)
        comments = [await store.save_comment(**reply(n), source="fediverse") for n in range(3)]
        now = datetime.now(UTC)
        jobs: list[object] = []

        async def claim() -> None:
            new = [(comments[0], "delivery"), (comments[1], "crawl"), (comments[0], "crawl")]
            jobs.extend(await store.claim_crawls(now, now + timedelta(minutes=1), 10, new=new))

        assert await _lock_freed_under_a_busy_loop(store, claim())
        assert [(job.comment_id, job.found_by) for job in jobs] == [  # type: ignore[attr-defined]
            (comments[0], "delivery"),  # asked for twice: the first way stays
            (comments[1], "crawl"),
        ]
        beat = store.save_worker_heartbeats(["inbox", "crawl"], now, process="worker-1")
        assert await _lock_freed_under_a_busy_loop(store, beat)
        assert set(await store.list_worker_heartbeats()) >= {"inbox", "crawl"}


async def test_crawls_queued_by_the_thousand_are_commits_of_their_own(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """During a flood a worker's crawler had ~18,000 replies to queue at its next claim,
    and one INSERT of them held the write lock ~55 ms. A claim queues the last
    ``CRAWLS_A_COMMIT`` with it, the others in commits of their own before (here 2
    a commit: 5 new crawls are 3 commits), and claims them all."""
    monkeypatch.setattr(crawl_storage, "CRAWLS_A_COMMIT", 2, raising=False)
    async with two_stores(tmp_path) as (store, _):
        _, reply = await batch_replies(store)
        comments = [await store.save_comment(**reply(n), source="fediverse") for n in range(5)]
        committed = await _commits_of(store)
        now = datetime.now(UTC)
        new = [(comment, "delivery") for comment in comments]
        jobs = await store.claim_crawls(now, now + timedelta(minutes=1), 10, new=new)
        assert sorted(job.comment_id for job in jobs) == comments
        assert committed == ["COMMIT"] * 3


async def test_a_batch_of_replies_holds_the_write_lock_only_for_its_commit(
    tmp_path: Path,
) -> None:
    """The inbox acts on a batch of replies in a shared transaction. It held the write
    lock from its first statement to its commit: while every reply was drafted, and
    across the event loop's turns between its trips, so the web processes' group
    commits waited (~40% of their time with two of them beside a worker). Its rows are
    kept until the end, and now written in one trip with the BEGIN and the COMMIT."""
    async with two_stores(tmp_path) as (worker, web):
        _, reply = await batch_replies(worker)
        async with worker.shared_transaction():
            first = await worker.save_comment_later(**reply(1))
            second = await worker.save_comment_later(**reply(2))
            assert _lock_freed(Path(f"{worker._path}-lock"), within=0)
            # Another process writes meanwhile, without waiting (its busy timeout is 0).
            await web.save_inbox_items([InboxItem("key", "https://b.example/a", "Like", "{}")])
        assert second == first + 1
        rows = await web._fetchall("SELECT id, ap_id FROM comments ORDER BY id")
        assert [tuple(row) for row in rows] == [
            (first, "https://b.example/n/1"),
            (second, "https://b.example/n/2"),
        ]


async def test_comment_ids_another_writer_took_meanwhile_refuse_the_batch_whole(
    tmp_path: Path,
) -> None:
    """A kept comment's id is counted before the transaction begins; if another writer
    inserts a comment meanwhile, it has that id, and the batch is refused whole at its
    commit (the inbox does it again, one reply at a time) rather than losing either."""
    async with two_stores(tmp_path) as (worker, web):
        _, reply = await batch_replies(worker)

        async def batch_beside_another_writer() -> None:
            async with worker.shared_transaction():
                await worker.save_comment_later(**reply(1))
                await web.save_comment(**reply(2), source="fediverse")

        with pytest.raises(StorageConflict, match="taken by another writer"):
            await batch_beside_another_writer()
        rows = await web._fetchall("SELECT ap_id FROM comments")
        assert [row[0] for row in rows] == ["https://b.example/n/2"]
        async with worker.shared_transaction():  # again: the next id is read afresh
            again = await worker.save_comment_later(**reply(1))
        found = await web._fetchone("SELECT ap_id FROM comments WHERE id = ?", (again,))
        assert found is not None
        assert found[0] == "https://b.example/n/1"


# ---- statements of many rows: what an executemany writes, in a few steps -------------


def _statements_run(connection: sqlite3.Connection, write: Callable[[], None]) -> list[str]:
    run: list[str] = []
    connection.set_trace_callback(run.append)
    try:
        write()
    finally:
        connection.set_trace_callback(None)
    return run


def _table(connection: sqlite3.Connection) -> list[tuple[object, ...]]:
    return connection.execute("SELECT * FROM t ORDER BY id").fetchall()


@pytest.mark.parametrize("count", [0, 1, 2, 3, 63, 64, 65, 130, 501])
@pytest.mark.parametrize(
    "sql",
    [
        "INSERT OR IGNORE INTO t (key, value) VALUES (?, ?)",
        "INSERT INTO t (key, value) VALUES (?,?) ON CONFLICT DO NOTHING",
    ],
)
def test_rows_inserted_many_at_a_time_are_what_executemany_inserts(sql: str, count: int) -> None:
    """Duplicates within the batch and of rows already there are ignored row by row, and
    rowids follow the order of the rows; at most one statement per power of two up to
    64 runs, where an executemany runs one per row."""
    rows = [(f"k{n % max(1, count - count // 5)}", f"v{n} \x00 é") for n in range(count)]
    written = []
    for insert in (
        lambda c: c.executemany(sql, rows),
        lambda c: _insert_rows(c, sql, rows),
    ):
        connection = sqlite3.connect(":memory:", isolation_level=None)
        connection.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, key TEXT UNIQUE, value TEXT)")
        connection.execute("INSERT INTO t (key, value) VALUES ('k1', 'there before')")
        statements = _statements_run(connection, lambda: insert(connection))  # noqa: B023
        written.append((_table(connection), len(statements)))
        connection.close()
    (expected, per_row), (found, statements) = written
    assert found == expected
    assert per_row == count
    assert statements == count // 64 + bin(count % 64).count("1")


def test_an_insert_of_named_values_is_not_taken_for_one_of_positional_rows() -> None:
    connection = sqlite3.connect(":memory:")
    with pytest.raises(ValueError, match="positional"):
        _insert_rows(connection, "INSERT INTO t (a) VALUES (:a)", [{"a": 1}])


def test_records_of_a_batch_update_what_executemany_updates_in_one_statement_per_outcome() -> None:
    """A worker's batch records 500 outcomes; those alike (done, at the same moment)
    are one UPDATE by a list of ids, not 500 steps. Each record statement keeps its own
    meaning: the inbox's keeps an earlier error when the new one is none."""
    now, retry = "2026-12-02T10:00:00Z", "2026-12-02T11:00:00Z"
    outcomes = [Outcome.done()] * 500 + [
        Outcome.retry(datetime(2026, 12, 2, 11, tzinfo=UTC), "down"),
        Outcome.failed("refused"),
        Outcome.release(datetime(2026, 12, 2, 11, tzinfo=UTC)),
    ]
    rows = [
        {**row, "now": now}
        for row in _outcome_rows([(InboxJob(n + 1, "{}", 1), o) for n, o in enumerate(outcomes)])
    ]
    assert rows[500]["retry_at"] == retry
    written = []
    for update in (
        lambda c: c.executemany(_RECORD_INBOX, rows),
        lambda c: _update_rows(c, _RECORD_INBOX, rows),
    ):
        connection = sqlite3.connect(":memory:", isolation_level=None)
        connection.execute(
            "CREATE TABLE inbox (id INTEGER PRIMARY KEY, status TEXT, attempts INTEGER,"
            " next_attempt_at TEXT, error TEXT, processed_at TEXT)"
        )
        connection.executemany(
            "INSERT INTO inbox VALUES (?, 'queued', 1, ?, 'an earlier error', NULL)",
            [(n + 1, retry) for n in range(len(rows) + 2)],
        )
        statements = _statements_run(connection, lambda: update(connection))  # noqa: B023
        written.append(
            (connection.execute("SELECT * FROM inbox ORDER BY id").fetchall(), len(statements))
        )
        connection.close()
    (expected, per_row), (found, statements) = written
    assert found == expected
    assert expected[0] == (1, "done", 1, None, "an earlier error", now)
    assert expected[-1] == (len(rows) + 2, "queued", 1, retry, "an earlier error", None)
    assert (per_row, statements) == (503, 4)


def test_records_that_name_one_job_twice_are_written_in_their_order() -> None:
    connection = sqlite3.connect(":memory:", isolation_level=None)
    connection.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, status TEXT)")
    connection.execute("INSERT INTO t VALUES (1, 'queued')")
    sql = "UPDATE t SET status = :status WHERE id = :id"
    _update_rows(
        connection,
        sql,
        [{"id": 1, "status": "a"}, {"id": 1, "status": "b"}, {"id": 1, "status": "a"}],
    )
    assert connection.execute("SELECT status FROM t").fetchall() == [("a",)]
