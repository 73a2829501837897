"""The machinery every part of the store shares: ``StoreCore``.

The SQLite connections (one writer, one reader) and their write transactions
(``_transaction``, ``shared_transaction``, the inter-process ``_WriterLock``), reads
(``_fetchall``), change tracking (``version``, the data version), the meta table and the
worker processes' heartbeats; and the SQL fragments and row-to-record helpers that
several aggregates use. Each aggregate's module subclasses ``StoreCore``.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import os
import re
import sqlite3
import time
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from contextlib import asynccontextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field, fields
from datetime import datetime
from pathlib import Path
from typing import Any, TypeVar

import aiosqlite

from fediblog.errors import StorageConflict, StorageError, StorageUnavailable
from fediblog.models import format_ts, parse_ts, utcnow
from fediblog.store.schema import MIGRATIONS, _statements
from fediblog.worker import Outcome


def _identity(path: Path) -> tuple[int, int] | None:
    """Which file ``path`` names now (device, inode), or None if it is gone."""
    try:
        found = os.stat(path)
    except OSError:
        return None
    return (found.st_dev, found.st_ino)


# Comments a reader may see: published ones, plus deleted ones kept as placeholders
# for the replies under them. Never followers-only or direct ones.
# Blocked actors and domains are hidden without touching their rows, so unblock restores them.
_NOT_BLOCKED = (
    "NOT EXISTS (SELECT 1 FROM blocks b JOIN actors ba ON ba.id = c.actor_id"
    " WHERE b.target IN (ba.ap_id, ba.domain) OR ba.domain LIKE '%.' || b.target)"
)
_VISIBLE = (
    "c.status IN ('published', 'deleted') AND c.visibility IN ('public', 'unlisted')"
    f" AND {_NOT_BLOCKED}"
)
_COUNTED = f"c.status = 'published' AND c.visibility IN ('public', 'unlisted') AND {_NOT_BLOCKED}"


# The parameters of a queue's _RECORD_* statement (inbox.py, deliveries.py, posts.py,
# notifications.py) for each claimed job and its Outcome (worker.py).
def _outcome_rows(results: Iterable[tuple[Any, Outcome]]) -> list[dict[str, Any]]:
    now = format_ts(utcnow())
    return [
        {
            "id": job.id,
            "status": outcome.status,
            "error": outcome.error,
            "retry_at": format_ts(outcome.retry_at) if outcome.retry_at else None,
            "gave_up": outcome.gave_up,
            "now": now,
        }
        for job, outcome in results
    ]


def _moment(value: str | None) -> datetime | None:
    return parse_ts(value) if value else None


_R = TypeVar("_R")
# Per record type and row shape: (field, column, conversion or None).
_PLANS: dict[tuple[type[Any], tuple[str, ...]], list[tuple[str, str, Any]]] = {}


def _record(cls: type[_R], row: sqlite3.Row) -> _R:
    """The record ``cls`` (a dataclass of models.py) from a row: each field from the
    column of its name, or from ``<field>_at`` for a time. Times are parsed (NULL stays
    None), booleans made bool. The plan is worked out once per record and row shape."""
    keys = tuple(row.keys())
    plan = _PLANS.get((cls, keys))
    if plan is None:
        plan = _PLANS[(cls, keys)] = []
        for field_ in fields(cls):  # type: ignore[arg-type]
            column = field_.name if field_.name in keys else f"{field_.name}_at"
            kind = str(field_.type)
            convert = _moment if "datetime" in kind else bool if kind == "bool" else None
            plan.append((field_.name, column, convert))
    return cls(
        **{
            name: row[column] if convert is None else convert(row[column])
            for name, column, convert in plan
        }
    )


async def _returning(db: aiosqlite.Connection, sql: str, params: Sequence[Any]) -> int:
    """Run an INSERT … RETURNING id and give the id."""
    async with db.execute(sql, params) as cursor:
        row = await cursor.fetchone()
    assert row is not None
    return int(row[0])


_BUSY_TIMEOUT_MS = 5000  # how long a writer waits for another one
# A writer waiting for another process's write lock tries again after this at most
# (_WriterLock); a writer that goes on to its next transaction in the same trip first
# lets the lock rest a little longer, so that a process waiting for it takes it first;
# and it goes on for so long at most, before the other writes of its own process
# (waiting for the connection) get their turn (StoreCore._one_trip).
_LONGEST_PAUSE = 0.001
HANDOFF = 0.0015
TRIP_LONGEST = 0.1

# The task inside a write transaction: its reads go to the writer connection (they must
# see its own uncommitted rows); every other read goes to the reader. The task, not a
# flag: a task started inside the transaction inherits the variable, and must not read
# rows that may yet roll back.
_writing: ContextVar[asyncio.Task[Any] | None] = ContextVar("fediblog_store_writing", default=None)


@dataclass(slots=True)
class SharedTransaction:
    """One write transaction that many writes join (``Store.shared_transaction``).

    Rows kept for later (``Store.save_comment_later``, ``save_proxied_later``) are
    written, one executemany per statement, by whatever comes next on the writer
    connection: a write that joins, a read in the transaction, or its commit. A kept row
    that fails to write therefore fails *there*: in the handler of a later reply, or at
    the commit, not in the reply that kept it. Either way the transaction is marked
    broken and rolls back, and the inbox (``Inbox._shared``) redoes the run: the later
    reply alone, the others together, until the commit fails and they run one per
    transaction, where nothing is kept and the culprit fails on its own. Only a failure
    of the database itself (locked, full, an I/O error: transient) is expected there,
    since everything else a kept row could break on was settled before it was kept:
    its content was checked (valid Unicode, sizes) when its reply was drafted, its
    duplicates, parent and post were looked up before, its id is the next rowid
    (read again after every other write that joins: ``next_comment_id``; when read
    before the transaction began, checked again when the rows are written, and the
    run redone if another writer took it: ``unchecked_comment_id``), and a proxied row
    that is known already is ignored. On
    PostgreSQL the id comes from the sequence (``reserved_comment_ids``), and another
    process may commit the same reply (its ap_id) after this transaction looked for
    it: that unique key fails there too, and the run is redone one reply per
    transaction, where the duplicate is found and skipped. Slower, never wrong.
    """

    task: asyncio.Task[Any] | None
    owner: object  # the store it belongs to: another store's writes never join it
    writes: int = 0  # writes that joined it: a failure after none left it intact
    shown: bool = False
    broken: bool = False  # a write that joined it failed: it must not commit
    # Rows kept for one executemany per statement, in the order they were kept.
    later: dict[str, list[tuple[Any, ...]]] = field(default_factory=dict)
    # The id the next kept comment takes (0: read it first). Only save_comment_later
    # chooses it; a write that joins may insert a comment, so it clears it.
    next_comment_id: int = 0
    # PostgreSQL: ids taken from the comments' sequence for kept comments, smallest
    # last. No other writer is ever given them, so a write that joins leaves them.
    reserved_comment_ids: list[int] = field(default_factory=list)
    # The write transaction is begun by the first write that joins, or a read that must
    # see kept rows; until then it holds no lock (see Store.shared_transaction).
    begun: bool = False
    stack: contextlib.AsyncExitStack | None = None  # what ends it, once begun
    # SQLite: the first id counted before the transaction began (read outside it), so
    # checked when the kept rows are written: another writer may have taken it.
    unchecked_comment_id: int = 0


_shared: ContextVar[SharedTransaction | None] = ContextVar("fediblog_store_shared", default=None)


def _due(null_is_due: bool, mark: str) -> str:
    """A queue row due at the time ``mark`` stands for (a row never tried too, if
    ``null_is_due``)."""
    due = f"next_attempt_at <= {mark}"
    return f"(next_attempt_at IS NULL OR {due})" if null_is_due else due


def _check_kept_ids(connection: sqlite3.Connection, expected: int) -> None:
    """Raise if the comment id counted on outside the transaction (``expected``, 0:
    none) is no longer the next one: another writer took it meanwhile. The run is then
    done again (inbox.py), slower, never wrong."""
    if expected:
        [[following]] = connection.execute("SELECT coalesce(max(id), 0) + 1 FROM comments")
        if following != expected:
            raise StorageConflict(
                f"comment ids from {expected} were taken by another writer ({following})"
            )


# An INSERT of one row of positional parameters: "<head> VALUES (?, …, ?)<tail>".
_ONE_ROW = re.compile(r"(?s)(.*\bVALUES\s*)(\(\s*\?(?:\s*,\s*\?)*\s*\))(.*)")


def _insert_rows(connection: sqlite3.Connection, sql: str, rows: Sequence[Sequence[Any]]) -> None:
    """``connection.executemany(sql, rows)`` for an INSERT of one row of ``?``s, as a few
    statements of many rows each (``VALUES (…), (…), …``).

    An executemany takes the GIL back after each row; while the process's event loop is
    busy, each row then waits for it, with the write lock held and every other process
    that writes waiting too. A statement of many rows runs in one step, without the GIL,
    and binds no JSON to parse again (the inbox's batch of 30 rows, which was one
    statement over a JSON array: 1.05 ms to 0.77 ms, lock and commit included). Its
    sizes are powers of two up to 64, so every batch is made of at most 7 statements
    that the connection's cache keeps prepared. Rows are inserted in order, each as
    the one-row statement would (OR IGNORE and ON CONFLICT apply row by row).
    """
    shape = _ONE_ROW.fullmatch(sql)
    if shape is None:
        raise ValueError(f"not an INSERT of one row of positional parameters: {sql[:60]}")
    head, row, tail = shape.groups()
    start = 0
    while start < len(rows):
        size = min(64, 1 << ((len(rows) - start).bit_length() - 1))
        chunk = rows[start : start + size]
        connection.execute(
            head + ", ".join([row] * size) + tail, [value for one in chunk for value in one]
        )
        start += size


# An UPDATE of one row by id, its other values named: "UPDATE … WHERE id = :id".
_BY_ID = re.compile(r"(?s)(\s*UPDATE\b.*\bWHERE\s+)id = :id\s*")


def _update_rows(
    connection: sqlite3.Connection, sql: str, rows: Sequence[Mapping[str, Any]]
) -> None:
    """``connection.executemany(sql, rows)``; for an UPDATE of one row by ``:id`` (the
    queues' records of what became of their jobs), one statement per set of rows whose
    other values are the same: the 500 jobs of a worker's batch, all done at the same
    moment, are one UPDATE, run in one step without the GIL (see ``_insert_rows``), not
    500 steps that each wait for it while the worker's event loop is busy."""
    shape = _BY_ID.fullmatch(sql)
    ids = [row["id"] for row in rows] if shape is not None else []
    if shape is None or len(set(ids)) != len(ids):  # a row updated twice: in order, then
        connection.executemany(sql, rows)
        return
    alike: dict[tuple[tuple[str, Any], ...], list[Any]] = {}
    for row in rows:
        alike.setdefault(tuple((k, v) for k, v in row.items() if k != "id"), []).append(row["id"])
    where_ids = shape.group(1) + "id IN (SELECT value FROM json_each(:ids))"
    for values, same in alike.items():
        connection.execute(where_ids, {**dict(values), "ids": json.dumps(same)})


class _WriterLock:
    """A lock on ``<database>-lock`` that every process writing the database takes
    before its write transaction and lets go of after it, on the writer connection's
    own thread.

    SQLite alone has one writer wait for another by sleeping and trying again, in steps
    that grow to 100 ms: two busy processes (``serve --web-only`` and ``worker``) then
    spend much of their time asleep while the machine idles. This lock is tried again
    every millisecond at most, so a waiting writer starts about as soon as the other
    has committed. It is advisory, an addition to SQLite's own lock, which still keeps
    out a writer that does not take it (the sqlite3 shell); it dies with its process,
    kill -9 included; where its file cannot be opened (a read-only folder) the writer
    goes without it.
    """

    def __init__(self, database: Path, timeout: float) -> None:
        self._path = database.with_name(database.name + "-lock")
        self.timeout = timeout  # as SQLite's busy_timeout: then "database is locked"
        self._held: int | None = None

    def acquire(self) -> None:
        """Wait for the lock, at most ``timeout`` seconds (on the writer's thread)."""
        try:
            fd = os.open(self._path, os.O_RDONLY | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError:
            return  # SQLite's lock alone, as without this one
        try:
            pause, deadline = 0.00005, time.monotonic() + self.timeout
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() >= deadline:
                        raise sqlite3.OperationalError(
                            f"database is locked: another process has held its write lock"
                            f" for {self.timeout:g} s"
                        ) from None
                    time.sleep(pause)
                    pause = min(pause * 2, _LONGEST_PAUSE)
        except BaseException:
            os.close(fd)
            raise
        self._held = fd

    def release(self) -> None:
        if self._held is not None:
            os.close(self._held)  # which lets go of its flock
            self._held = None


def _unavailable(path: Path, error: sqlite3.Error) -> StorageUnavailable:
    return StorageUnavailable(f"the database {path} cannot be used now: {error}")


def _marks(values: Sequence[object]) -> str:
    return ", ".join("?" * len(values))


class StoreCore:
    """One SQLite database's connections, transactions, reads and change tracking.

    Two connections: one writer, whose transactions ``_lock`` serializes, and one
    reader. In WAL mode the reader sees only committed data, so no coroutine can read
    a row another one is about to roll back.
    """

    # What differs between the dialects, overridden by PostgresStore (the aggregates'
    # modules have more: _POST_COLUMNS, _INBOX_HOST, _REPLY_CONTEXT, ...).
    # The rows a claim takes, chosen by its subquery {}: SQLite runs the subquery once,
    # and other processes' claims wait for the one writer.
    _CLAIMED_IDS = "id IN ({})"
    # A column's value is in a list of ids, the one parameter ({1}) ``_id_lists`` makes of
    # the list: ``_ID_IN_LIST.format("c.id", ":ids")``.
    _ID_IN_LIST = "{0} IN (SELECT value FROM json_each({1}))"

    def __init__(self, db: aiosqlite.Connection, reader: aiosqlite.Connection, path: Path) -> None:
        self._db = db
        self._reader = reader
        self._path = path
        self._identity = _identity(path)
        self._lock = asyncio.Lock()  # one write transaction at a time on this connection
        self._writes = 0
        self._data_version: int | None = None  # PRAGMA data_version when last asked
        self._shown_generation = 0  # _SHOWN_GENERATION as last read
        self._checked_at = 0.0
        self.version_max_age = 1.0  # seconds another process's commit may go unnoticed
        self._peeker: sqlite3.Connection | None = None  # peek_data_version's, once asked
        self._writer_lock = _WriterLock(path, _BUSY_TIMEOUT_MS / 1000)

    @property
    def path(self) -> Path:
        return self._path

    async def close(self) -> None:
        if self._peeker is not None:
            self._peeker.close()
        await self._reader.close()
        await self._db.close()

    async def migrate(self) -> int:
        """Run the migrations this database has not seen; return the schema version.

        All that are due run in one write transaction with the version bump, so a crash
        leaves either the old schema or the new one, and a new database costs one commit
        (one fsync), not one per migration. The version is read again once the write
        lock is held, so two processes starting together (``serve --web-only`` and
        ``worker``) never both run one (the second would fail on a column that already
        exists).
        """
        if await self._user_version() == len(MIGRATIONS):
            return len(MIGRATIONS)
        await self._db.execute("BEGIN IMMEDIATE")
        try:
            # Statement by statement: executescript would commit first.
            for migration in MIGRATIONS[await self._user_version() :]:
                for statement in _statements(migration):
                    await self._db.execute(statement)
            await self._db.execute(f"PRAGMA user_version = {len(MIGRATIONS)}")
            await self._db.execute("COMMIT")
        except BaseException:
            with contextlib.suppress(sqlite3.Error):
                await self._db.execute("ROLLBACK")
            raise
        return len(MIGRATIONS)

    async def _user_version(self) -> int:
        [[current]] = await self._db.execute_fetchall("PRAGMA user_version")
        if current > len(MIGRATIONS):
            raise StorageError(
                f"the database is at schema {current}, newer than this fediblog knows"
                f" ({len(MIGRATIONS)}): upgrade fediblog"
            )
        return int(current)

    # ---- change tracking --------------------------------------------------------

    async def version(self) -> tuple[int, int]:
        """A value that changes after every commit of something a page shows, ours or
        another process's.

        Our own writes count immediately. Another process's are noticed at most
        ``version_max_age`` seconds late, so a hot page costs no query per request:
        ``PRAGMA data_version`` on the writer connection (whose own commits do not
        change it) says that some other connection committed, and only then is the
        shown generation read, which only writes a page shows move (``_transaction``).
        A worker process's bookkeeping (claims, leases, heartbeats) thus changes no
        version: it commits many times a second, and the pages stay cached.
        """
        now = time.monotonic()
        if now - self._checked_at >= self.version_max_age:
            self._checked_at = now
            try:
                data_version = await self.get_data_version()
                if data_version != self._data_version:
                    # On the reader: committed rows only, never a transaction in progress
                    # on the writer connection, which might yet roll back.
                    rows = await self._reader.execute_fetchall(
                        "SELECT value FROM meta WHERE key = ?", (self._SHOWN_GENERATION,)
                    )
                    self._shown_generation = next((int(row[0]) for row in rows), 0)
                    self._data_version = data_version
            except StorageUnavailable:
                self._checked_at = 0.0  # ask again next time
                raise
            except sqlite3.OperationalError as error:
                self._checked_at = 0.0
                raise _unavailable(self._path, error) from error
        return (self._writes, self._shown_generation)

    # Moved by every committed write a page shows (``shown``), from any process.
    _SHOWN_GENERATION = "shown_generation"

    _BUMP_SHOWN = (
        "INSERT INTO meta (key, value) VALUES ('shown_generation', '1') ON CONFLICT (key)"
        " DO UPDATE SET value = CAST(CAST(meta.value AS INTEGER) + 1 AS TEXT)"
    )

    @asynccontextmanager
    async def _transaction(self, *, shown: bool = True) -> AsyncIterator[aiosqlite.Connection]:
        """A write transaction: all of it commits, or none of it.

        ``shown=False`` is for bookkeeping no page shows (the inbox queue, delivery
        states), so a storm of inbound activities does not invalidate cached pages.
        A locked, busy, full or read-only database raises StorageUnavailable, and so
        does a database file removed or replaced under the running server: a commit
        into an unlinked file would be lost at the next restart.
        """
        shared = self._shared_here()
        if shared is not None:
            # Inside shared_transaction (its own task only): joins it, commits with it.
            await self._begin_shared(shared)
            shared.writes += 1
            try:
                if shared.later:
                    await self._write_later(shared)  # in the order they were asked
                shared.next_comment_id = 0  # this write may take that rowid: read it again
                yield self._db
            except BaseException:
                shared.broken = True  # even if the caller swallows it: no half a write
                raise
            shared.shown = shared.shown or shown
            return
        async with self._own_transaction(shown=shown) as db:
            yield db

    @asynccontextmanager
    async def _own_transaction(self, *, shown: bool) -> AsyncIterator[aiosqlite.Connection]:
        """``_transaction`` when it joins no shared transaction: BEGIN here, COMMIT at
        the end of the block."""
        async with self._lock:
            token = _writing.set(asyncio.current_task())
            try:
                try:
                    await self._start_writing()
                    yield self._db
                    if shown:  # other processes' page caches see it (``version``)
                        await self._db.execute(self._BUMP_SHOWN)
                    await self._finish_writing(shown=shown)
                except BaseException as error:
                    await self._abort_writing()
                    failure = self._storage_failure(error)
                    if failure is not None:
                        raise failure from error
                    raise
            finally:
                _writing.reset(token)
            if shown:
                self._writes += 1

    # How a write transaction starts, ends and fails, per backend.
    async def _start_writing(self) -> None:
        await self._on_writer(self._begin)

    async def _finish_writing(self, *, shown: bool) -> None:
        self._check_identity()
        await self._on_writer(self._commit)

    async def _abort_writing(self) -> None:
        # Always, and never on in_transaction: a BEGIN cancelled while it waited (a
        # /healthz deadline, a shutdown) still runs on aiosqlite's thread, after which
        # in_transaction turns true with nobody to end it, and every later write would
        # fail. The thread runs in order, so this ROLLBACK comes after that BEGIN; with
        # none open it fails (and lets go of the writer lock all the same).
        with contextlib.suppress(sqlite3.Error):
            await self._on_writer(self._rollback)

    def _storage_failure(self, error: BaseException) -> StorageError | None:
        """The StorageError to raise for ``error`` from the database, or None to let it
        through: a locked, busy, full or read-only database is unavailable for now."""
        if isinstance(error, sqlite3.OperationalError):
            return _unavailable(self._path, error)
        if isinstance(error, sqlite3.IntegrityError):
            return StorageConflict(f"the database {self._path} refused a write: {error}")
        return None

    async def _write_at_once(
        self,
        work: Callable[[sqlite3.Connection], _R],
        again: Callable[[], bool] | None = None,
    ) -> _R:
        """Run ``work`` in a write transaction of its own, in one trip to the writer's
        thread: the writer lock, BEGIN, ``work``, COMMIT, and letting go all happen
        there, so the lock is held only as long as the database works, never while
        the event loop is busy elsewhere. For hot bookkeeping no page shows (the
        inbox's group commit), which must not wait for a loop turn between each step
        while another process waits for the lock. ``work`` must not block otherwise.

        ``again``, if given, is called on the writer's thread after each commit; while
        it answers yes, ``work`` runs again, in a transaction of its own, in the same
        trip (``_one_trip``). Joins the caller's transaction when there is one, and then
        runs ``work`` once and never calls ``again``.
        """
        if self._shared_here() is not None:
            async with self._transaction(shown=False):  # joins it (and writes what it kept)
                return await self._on_writer(work)
        writing = _writing.get()
        if writing is not None and writing is asyncio.current_task():
            return await self._on_writer(work)  # inside this task's transaction: part of it

        return await self._one_trip(work, again)

    async def _one_trip(
        self, work: Callable[[sqlite3.Connection], _R], again: Callable[[], bool] | None = None
    ) -> _R:
        """``work`` in a write transaction of its own, all of it on the writer's thread;
        then, while ``again()`` answers yes (and for ``TRIP_LONGEST`` at most), again in
        a transaction of its own, and the last one's result.

        The inbox's group commit needs that: once a commit is done, the next batch was
        taken only after the event loop had run the commit's callback, behind every
        request it had ready, ~15 ms of each ~22 ms cycle during a flood, with the lock
        free and the writer idle. Between two of these transactions the writer lets
        the lock rest a little longer (``HANDOFF``) than another process waiting for it
        sleeps between tries (``_WriterLock``), so that one takes it first.
        """

        def transactions(connection: sqlite3.Connection) -> _R:
            started = time.monotonic()
            result = transaction(connection)
            while again is not None and again():
                if time.monotonic() - started >= TRIP_LONGEST:
                    break
                time.sleep(HANDOFF)
                result = transaction(connection)
            return result

        def transaction(connection: sqlite3.Connection) -> _R:
            self._begin(connection)
            try:
                result = work(connection)
                self._check_identity()
                self._commit(connection)
            except BaseException:
                with contextlib.suppress(sqlite3.Error):
                    self._rollback(connection)
                raise
            return result

        async with self._lock:
            try:
                return await self._on_writer(transactions)
            except sqlite3.OperationalError as error:
                raise _unavailable(self._path, error) from error

    async def _write_one(self, sql: str, params: Any = (), *, many: bool = False) -> list[Any]:
        """One statement (``many``: one executemany) in a write transaction of its own,
        and the rows it returns. On SQLite that is one trip (``_write_at_once``): the
        workers claim and record while their batch runs beside, and a transaction taken
        a step per trip held the write lock through the batch's busy turns of the event
        loop (~5 ms a claim, the web processes waiting for it)."""

        if many:
            await self._write_many(sql, params)
            return []
        return await self._write_all([(sql, params)])

    async def _write_many(self, sql: str, rows: Sequence[Any]) -> None:
        """One executemany in a write transaction of its own (on SQLite one trip, and an
        UPDATE by id one statement per set of alike rows: ``_update_rows``)."""
        await self._write_at_once(lambda connection: _update_rows(connection, sql, rows))

    async def _write_all(self, statements: Sequence[tuple[str, Any]]) -> list[Any]:
        """Statements, each ``(sql, params)``, in a write transaction of their own, and the
        rows the last one returns. On SQLite that is one trip (``_write_at_once``), as
        ``_write_one``."""

        def work(connection: sqlite3.Connection) -> list[Any]:
            rows: list[Any] = []
            for sql, params in statements:
                rows = connection.execute(sql, params).fetchall()
            return rows

        return await self._write_at_once(work)

    @staticmethod
    def _id_lists(*lists: Sequence[str | int]) -> tuple[Any, ...]:
        """Lists of ids or keys as a statement takes each for one parameter, without
        duplicates: JSON text for SQLite's json_each (PostgresStore: arrays)."""
        return tuple(json.dumps(list(dict.fromkeys(values))) for values in lists)

    async def _on_writer(self, work: Callable[[sqlite3.Connection], _R]) -> _R:
        """Run ``work`` with the writer connection on its own thread, after whatever
        was asked of it before (aiosqlite runs one queue of calls, in order)."""
        db: Any = self._db  # aiosqlite's own way to run a call there, untyped
        result: _R = await db._execute(work, db._conn)
        return result

    # On the writer's thread, in the order they were asked for.
    def _begin(self, connection: sqlite3.Connection) -> None:
        self._writer_lock.acquire()
        try:
            connection.execute("BEGIN IMMEDIATE")
        except BaseException:
            self._writer_lock.release()
            raise

    def _commit(self, connection: sqlite3.Connection) -> None:
        connection.execute("COMMIT")  # if it fails, the ROLLBACK that follows lets go
        self._writer_lock.release()

    def _rollback(self, connection: sqlite3.Connection) -> None:
        try:
            connection.execute("ROLLBACK")
        finally:
            self._writer_lock.release()

    def _check_identity(self) -> None:
        if _identity(self._path) != self._identity:
            raise StorageUnavailable(
                f"the database file {self._path} was removed or replaced while"
                " the server runs: restore it, then restart fediblog"
            )

    # One trip to aiosqlite's thread per read (execute, fetch and close there): each
    # trip costs about 0.1 ms, three per query were most of a reply's processing.
    async def _fetchall(self, sql: str, params: Sequence[Any] = ()) -> list[sqlite3.Row]:
        await self._before_read()  # a read sees every write before it
        writing = _writing.get()
        db = self._db if writing is not None and writing is asyncio.current_task() else self._reader
        try:
            return list(await db.execute_fetchall(sql, params))
        except sqlite3.OperationalError as error:
            raise _unavailable(self._path, error) from error

    async def _fetchone(self, sql: str, params: Sequence[Any] = ()) -> sqlite3.Row | None:
        return next(iter(await self._fetchall(sql, params)), None)

    # ---- meta -------------------------------------------------------------------

    async def get_created_at(self) -> datetime:
        row = await self._fetchone("SELECT value FROM meta WHERE key = 'created_at'")
        return parse_ts(row["value"]) if row else utcnow()

    def _claim_sql(
        self, table: str, returning: str, *, lease_also: str = "", null_is_due: bool = False
    ) -> str:
        """The claim of a queue's due rows, as every worker takes its jobs: count an
        attempt on each, lease it until ?1 (its next attempt; ``lease_also``: columns
        set to it as well), due at ?2, at most ?3 of them, in order. ``null_is_due``:
        a row never tried (no next attempt) is due too, and the order is arrival."""
        due = _due(null_is_due, "?2")
        order = "id" if null_is_due else "next_attempt_at, id"
        also = "".join(f", {column} = ?1" for column in lease_also.split())
        return (
            f"UPDATE {table} SET attempts = attempts + 1, next_attempt_at = ?1{also}"
            " WHERE "
            + self._CLAIMED_IDS.format(
                f"SELECT id FROM {table} WHERE status = 'queued' AND {due}"
                f" ORDER BY {order} LIMIT ?3"
            )
            + f" RETURNING {returning}"
        )

    async def _claim(
        self, table: str, returning: str, now: datetime, lease_until: datetime, limit: int
    ) -> list[Any]:
        """``_claim_sql``'s rows, claimed in a write of their own (one trip on SQLite)."""
        sql = self._claim_sql(table, returning)
        return await self._write_one(sql, (format_ts(lease_until), format_ts(now), limit))

    async def _any_due(self, table: str, now: datetime, *, null_is_due: bool = False) -> bool:
        """Whether a queue (``table``: inbox, deliveries, crawls) holds a row due at
        ``now``: a look on the reader before a claim. Workers are woken by every commit
        of another process (runtime.py's watcher), and most of those find nothing due;
        an empty claim would still take the write lock the inbox is waiting for."""
        found = await self._fetchone(
            f"SELECT 1 FROM {table} WHERE status = 'queued' AND {_due(null_is_due, '?')} LIMIT 1",
            (format_ts(now),),
        )
        return found is not None

    # The private feed's token, and other facts kept in the meta table.

    async def get_meta_value(self, key: str) -> str | None:
        row = await self._fetchone("SELECT value FROM meta WHERE key = ?", (key,))
        return str(row["value"]) if row else None

    async def save_meta_value(self, key: str, value: str) -> None:
        async with self._transaction(shown=False) as db:
            await db.execute(
                "INSERT INTO meta (key, value) VALUES (?, ?)"
                " ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                (key, value),
            )

    async def save_meta_value_once(self, key: str, value: str) -> str:
        """Store ``value`` unless ``key`` has one already; return the value kept."""
        async with self._transaction(shown=False) as db:
            await db.execute(
                "INSERT INTO meta (key, value) VALUES (?, ?) ON CONFLICT DO NOTHING", (key, value)
            )
            found = await db.execute_fetchall("SELECT value FROM meta WHERE key = ?", (key,))
        return str(next(iter(found))["value"])

    # ---- replies processed in batches (inbox.py) --------------------------------
    # The inbox turns a claimed batch of replies into comments in one transaction, and
    # reads what they need in a few queries, not a few per reply (inbox.py, responses.py):
    # their senders before the transaction (get_cached_actors, actors.py); the rest in it
    # (comments.py, "rows kept for one executemany"), which also keeps the rows they
    # write: _later and _write_later below write those.

    @asynccontextmanager
    async def shared_transaction(self) -> AsyncIterator[SharedTransaction]:
        """One write transaction that every write of this task joins until the block
        ends (then all of it commits, or none of it). Reads in it see its writes.

        It begins only when a write joins it or a read must see the rows kept for
        later; until then reads see what is committed, and no lock is held. A block
        that only keeps rows (a batch of replies) commits them at its end in one go
        (``_commit_kept``), so the write lock is held only while they are written.

        A write that fails inside marks it broken: it then rolls back even if the caller
        went on. ``writes`` counts the writes that joined, so a caller can tell that a
        failure came before any of its own writes (the transaction is still whole).
        """
        state = SharedTransaction(asyncio.current_task(), self)
        token = _shared.set(state)
        try:
            async with contextlib.AsyncExitStack() as stack:
                state.stack = stack
                yield state
                if state.broken:
                    raise StorageError("a write in the shared transaction failed")
                if state.begun:
                    await self._finish_shared(state)
                elif state.later or state.shown:
                    await self._commit_kept(state)
        finally:
            _shared.reset(token)
            state.task = None  # a task it started must not join it later
            state.stack = None
        if state.shown:
            self._writes += 1

    async def _finish_shared(self, shared: SharedTransaction) -> None:
        """The last writes of a begun shared transaction, before its COMMIT."""
        if shared.later:
            await self._write_later(shared)  # the rows kept for one executemany
        if shared.shown:  # as _transaction does for a shown write
            await self._db.execute(self._BUMP_SHOWN)

    async def _begin_shared(self, shared: SharedTransaction) -> None:
        """Begin the write transaction ``shared_transaction`` put off, if not yet."""
        if shared.begun:
            return
        if shared.stack is None:
            raise RuntimeError("the shared transaction has ended")
        try:
            await shared.stack.enter_async_context(self._own_transaction(shown=False))
        except BaseException:
            shared.broken = True
            raise
        shared.begun = True

    async def _before_read(self) -> None:
        """A read by a shared transaction's own task sees the rows it kept: they are
        written first, in the transaction, begun for them if it was put off."""
        shared = self._shared_here()
        if shared is not None and shared.later:
            await self._begin_shared(shared)
            await self._write_later(shared)

    async def _commit_kept(self, shared: SharedTransaction) -> None:
        """Commit a shared transaction whose writes were all kept for later: on SQLite
        in one trip to the writer's thread (BEGIN, the rows, COMMIT), so the write lock
        is held only while the database writes them, not while the replies are acted
        on, nor across the turns of a busy event loop between trips."""
        later, shared.later = shared.later, {}
        expected, shown = shared.unchecked_comment_id, shared.shown

        def work(connection: sqlite3.Connection) -> None:
            _check_kept_ids(connection, expected)
            for sql, rows in later.items():
                _insert_rows(connection, sql, rows)
            if shown:
                connection.execute(self._BUMP_SHOWN)

        try:
            await self._one_trip(work)
        except BaseException as error:
            shared.broken = True
            failure = self._storage_failure(error)  # _one_trip maps only a busy database
            if failure is not None:
                raise failure from error
            raise

    def _shared_here(self) -> SharedTransaction | None:
        """The shared transaction of this store that this task is in, if any."""
        shared = _shared.get()
        if shared is None or shared.task is not asyncio.current_task() or shared.owner is not self:
            return None
        return shared

    @staticmethod
    def _later(shared: SharedTransaction, sql: str, row: tuple[Any, ...], *, shown: bool) -> None:
        # One statement per table, each an insert that depends on no other table's
        # rows kept with it: writing them statement by statement keeps every order that
        # matters (a reply after the comment it answers).
        shared.writes += 1  # a write of this transaction from now on, as any other
        shared.shown = shared.shown or shown
        shared.later.setdefault(sql, []).append(row)

    async def _write_later(self, shared: SharedTransaction) -> None:
        # The kept comments took the ids next_comment_id counted: it stays right until
        # a write joins (Store._transaction clears it there).
        later, shared.later = shared.later, {}
        try:
            if shared.unchecked_comment_id:
                expected, shared.unchecked_comment_id = shared.unchecked_comment_id, 0
                await self._on_writer(lambda connection: _check_kept_ids(connection, expected))
            for sql, rows in later.items():
                await self._db.executemany(sql, rows)
        except BaseException as error:
            shared.broken = True  # rows it holds are lost: it must not commit
            failure = self._storage_failure(error)
            if failure is not None:
                raise failure from error
            raise

    # ---- worker processes: data version, heartbeats, counts (runtime.py) ----

    async def get_data_version(self) -> int:
        """SQLite's ``PRAGMA data_version`` on the writer connection: it changes when
        another process (or connection) commits, never for this store's own commits,
        and reads no table (runtime.py's watcher asks it up to 20 times a second, in
        one trip to aiosqlite's thread)."""
        try:
            [[version]] = await self._db.execute_fetchall("PRAGMA data_version")
        except sqlite3.OperationalError as error:
            raise _unavailable(self._path, error) from error
        return int(version)

    def peek_data_version(self) -> int | None:
        """``PRAGMA data_version`` on a connection of its own, asked right here on the
        event loop's thread: about 7 us of CPU, where a trip to aiosqlite's thread
        costs about 0.2 ms (a watcher asking 20 times a second would spend half a
        percent of a core doing nothing). It changes with every commit, this store's
        own included (``get_data_version`` then tells whose). Never waits: None when
        the database is busy or unusable (ask again later)."""
        try:
            if self._peeker is None:
                self._peeker = sqlite3.connect(self._path, timeout=0, isolation_level=None)
            [[version]] = self._peeker.execute("PRAGMA data_version").fetchall()
        except sqlite3.Error:
            return None
        return int(version)

    # A worker process's heartbeat: one meta row per role, when it was last seen running,
    # and one per process with its outcome counts since it started (/metrics adds them).
    _HEARTBEAT_KEY = "worker_seen."

    _COUNTS_KEY = "worker_counts."

    async def save_worker_heartbeats(
        self,
        roles: Sequence[str],
        now: datetime,
        *,
        process: str | None = None,
        counts: Mapping[str, Mapping[str, int]] | None = None,
    ) -> None:
        """Record that ``roles`` ran at ``now`` and, for ``process``, its ``counts``
        (worker name -> outcome -> jobs since the process started)."""
        rows = [(self._HEARTBEAT_KEY + role, format_ts(now)) for role in roles]
        if process is not None:
            value = json.dumps({"at": format_ts(now), "counts": counts or {}})
            rows.append((self._COUNTS_KEY + process, value))
        # One trip on SQLite (_write_one): a worker's heartbeat held the write lock across
        # the turns of its busy event loop, ~30 ms during an inbox flood.
        await self._write_one(
            "INSERT INTO meta (key, value) VALUES (?, ?)"
            " ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            rows,
            many=True,
        )

    async def delete_worker_heartbeats(
        self, written: Mapping[str, datetime], *, process: str | None = None
    ) -> None:
        """A worker process stopped: forget its rows. ``written`` is the heartbeat it
        wrote last for each role; a row holding another one is kept (another worker
        process runs that role too)."""
        async with self._transaction(shown=False) as db:
            await db.executemany(
                "DELETE FROM meta WHERE key = ? AND value = ?",
                [(self._HEARTBEAT_KEY + role, format_ts(at)) for role, at in written.items()],
            )
            if process is not None:
                await db.execute("DELETE FROM meta WHERE key = ?", (self._COUNTS_KEY + process,))

    async def list_worker_heartbeats(self) -> dict[str, datetime]:
        """Each role a worker process reported, and when it last did."""
        return {
            key: parse_ts(value) for key, value in (await self._meta_rows(self._HEARTBEAT_KEY))
        }

    async def get_worker_counts(self, since: datetime) -> dict[str, dict[str, int]]:
        """The outcome counts of the worker processes heard from since ``since``,
        added up: worker name -> outcome -> jobs."""
        total: dict[str, dict[str, int]] = {}
        for _, value in await self._meta_rows(self._COUNTS_KEY):
            found = json.loads(value)
            if parse_ts(found["at"]) < since:
                continue  # a process killed long ago: its counts went with it
            for name, outcomes in found["counts"].items():
                mine = total.setdefault(name, {})
                for outcome, count in outcomes.items():
                    mine[outcome] = mine.get(outcome, 0) + int(count)
        return total

    async def _meta_rows(self, prefix: str) -> list[tuple[str, str]]:
        """The meta rows whose key starts with ``prefix`` (which ends with '.'), on the
        primary key's index; the prefix taken off."""
        rows = await self._fetchall(
            "SELECT key, value FROM meta WHERE key >= ? AND key < ?",
            (prefix, prefix[:-1] + "/"),  # "/" sorts right after "."
        )
        return [(row["key"].removeprefix(prefix), row["value"]) for row in rows]
