"""``PostgresStore``: the same store on a PostgreSQL server, through asyncpg.

Also the asyncpg adapters that let the queries of every aggregate run unchanged, and
``copy_blog`` (``fediblog migrate``), which moves a blog from SQLite to PostgreSQL.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import heapq
import re
import time
from collections.abc import Callable, Coroutine, Generator, Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from fediblog.config import without_password
from fediblog.errors import StorageConflict, StorageError, StorageUnavailable
from fediblog.models import InboxItem, format_ts, utcnow
from fediblog.store.core import _VISIBLE, SharedTransaction, _returning, _writing
from fediblog.store.posts import _post_columns
from fediblog.store.schema import _IDENTITY_TABLES, _SEEDED, _TABLES, MIGRATIONS, _postgres_ddl
from fediblog.store.sqlite import Store

# The same Store on a PostgreSQL server, through asyncpg (``pip install
# 'fediblog[postgresql]'``). Every query of the aggregates' modules is written once, for
# both: the few spellings that differ are the class attributes PostgresStore overrides,
# and SQLite's placeholders (?, ?N, :name) become PostgreSQL's ($N) on the way (``_pg_query``).
# What PostgreSQL adds: several processes may write at once (claims skip the rows
# another worker holds: FOR UPDATE SKIP LOCKED), and commits are told to every process
# at once (LISTEN/NOTIFY), which is how page caches and sleeping workers hear of them.

# A string, a quoted name or a comment (passed over), a cast (::), or a placeholder.
_PG_TOKENS = re.compile(r"""'(?:[^']|'')*'|"(?:[^"]|"")*"|--[^\n]*|::|\?(\d*)|:([A-Za-z_]\w*)""")


@functools.lru_cache(maxsize=4096)
def _pg_query(sql: str) -> tuple[str, tuple[int | str, ...]]:
    """``sql`` with PostgreSQL's placeholders, and for each $N the parameter it takes:
    an index into a sequence of parameters, or a name in a mapping of them."""
    order: list[int | str] = []
    numbers: dict[int | str, int] = {}
    positional = 0

    def placeholder(match: re.Match[str]) -> str:
        nonlocal positional
        text = match.group(0)
        key: int | str
        if text.startswith("?"):
            if match.group(1):
                key = int(match.group(1)) - 1
            else:
                key, positional = positional, positional + 1
        elif text.startswith(":") and match.group(2):
            key = match.group(2)
        else:
            return text
        if key not in numbers:
            order.append(key)
            numbers[key] = len(order)
        return f"${numbers[key]}"

    return _PG_TOKENS.sub(placeholder, sql), tuple(order)


def _asyncpg() -> Any:
    """asyncpg, imported on first use: only a blog on PostgreSQL needs it."""
    try:
        import asyncpg
    except ImportError:
        raise StorageError(
            "FEDIBLOG_DATABASE is a PostgreSQL URL, but asyncpg is not installed:"
            " pip install 'fediblog[postgresql]'"
        ) from None
    return asyncpg


def _pg_args(order: tuple[int | str, ...], parameters: Any) -> list[Any]:
    return [_pg_value(parameters[key]) for key in order]


def _pg_value(value: Any) -> Any:
    """A parameter as PostgreSQL can hold it. Its text cannot hold a NUL, which SQLite
    stores: the inbox refuses one where it matters (``is_unicode``), and anywhere else
    (a remote actor's name, say) it becomes U+FFFD, as an HTML parser makes it."""
    if type(value) is str and "\x00" in value:
        return value.replace("\x00", "\ufffd")
    if type(value) is list:
        return [_pg_value(item) for item in value]
    return value


def _pg_count(status: bytes | str | None) -> int:
    """The rows a statement touched, from its status ("UPDATE 3", "INSERT 0 1")."""
    text = status.decode() if isinstance(status, bytes) else status or ""
    last = text.rpartition(" ")[2]
    return int(last) if last.isdigit() else -1


@dataclass(slots=True)
class _PgCursor:
    """What a statement gave: its rows and how many rows it touched."""

    rows: list[Any]
    rowcount: int

    async def fetchone(self) -> Any:
        return self.rows[0] if self.rows else None

    async def fetchall(self) -> list[Any]:
        return self.rows


class _PgRun:
    """A statement under way: awaited, or used as ``async with``, as aiosqlite's."""

    def __init__(self, run: Coroutine[Any, Any, _PgCursor]) -> None:
        self._run = run

    def __await__(self) -> Generator[Any, None, _PgCursor]:
        return self._run.__await__()

    async def __aenter__(self) -> _PgCursor:
        return await self._run

    async def __aexit__(self, *exc: object) -> None:
        return None


class _PgConnection:
    """An asyncpg connection with the calls the store makes of aiosqlite's."""

    def __init__(self, connection: Any) -> None:
        self.connection = connection

    def execute(self, sql: str, parameters: Any = ()) -> _PgRun:
        return _PgRun(_pg_run(self.connection, sql, parameters))

    async def execute_fetchall(self, sql: str, parameters: Any = ()) -> list[Any]:
        return (await _pg_run(self.connection, sql, parameters)).rows

    async def executemany(self, sql: str, rows: Iterable[Any]) -> None:
        query, order = _pg_query(sql)
        many = [_pg_args(order, row) for row in rows]
        if many:
            await self.connection.executemany(query, many)

    async def close(self) -> None:
        await self.connection.close()


async def _pg_run(connection: Any, sql: str, parameters: Any) -> _PgCursor:
    query, order = _pg_query(sql)
    # asyncpg's own fetch, with the statement's status too (fetch drops it): one
    # round trip for rows and count alike, through its statement cache.
    rows, status, _ = await connection._execute(
        query, _pg_args(order, parameters), 0, None, return_status=True
    )
    return _PgCursor(rows, _pg_count(status))


_PG_CHANNEL = "fediblog"  # NOTIFY: "shown" after a commit a page shows, "work" after others

_PG_READERS = 4  # connections for reads outside a write transaction, per process

_PG_CONNECT_TIMEOUT = 5.0  # seconds: an unreachable server is "unavailable", not a hang

_PG_CLOSE_TIMEOUT = 5.0  # seconds: a connection not closed by then is cut

_COMMENT_ID_BLOCK = 50  # ids a shared transaction takes at once (a batch is 200 replies)
_PG_MIGRATION_LOCK = 0x66656469  # pg_advisory_xact_lock: one process migrates at a time


def _walk_in_memory(
    rows: Iterable[Any], limit: int, max_depth: int
) -> list[tuple[int, str, str, bool]]:
    """``Store._WALK`` over the rows (id, parent id, published_at, deleted) of a post's
    visible comments, in id order: the same entries in the same order. A comment is a
    root unless its parent is a visible comment before it; the first ``limit`` roots
    by (time, id) start a queue that always yields the smallest path next."""
    seen: set[int] = set()
    children: dict[int, list[tuple[int, str, bool]]] = {}
    roots: list[tuple[str, int, bool]] = []
    for comment_id, parent_id, moment, deleted in rows:
        if parent_id is not None and parent_id in seen:
            children.setdefault(parent_id, []).append((comment_id, moment, bool(deleted)))
        else:
            roots.append((moment, comment_id, bool(deleted)))
        seen.add(comment_id)
    # (path, id, depth, list, moment, deleted), smallest path first.
    queue = [
        (f"{moment}{comment_id:012d}", comment_id, 1, "", moment, deleted)
        for moment, comment_id, deleted in heapq.nsmallest(limit, roots)
    ]
    heapq.heapify(queue)
    walked: list[tuple[int, str, str, bool]] = []
    while queue and len(walked) < limit:
        path, comment_id, depth, listed, moment, deleted = heapq.heappop(queue)
        walked.append((comment_id, listed, path, deleted))
        for child, published, child_deleted in children.get(comment_id, ()):
            if depth < max_depth:
                entry = (f"{path}{published}{child:012d}", child, depth + 1, path, published)
            else:  # flattened into this level: never before the comment it answers
                later = max(published, moment)
                entry = (f"{listed}{later}{child:012d}", child, max_depth, listed, later)
            heapq.heappush(queue, (*entry, child_deleted))
    return walked


class PostgresStore(Store):
    """A blog on a PostgreSQL server: ``await Store.open("postgresql://…")``.

    One connection for write transactions (one at a time per process, as on SQLite:
    the aggregates' code reads and then writes in them), a few for reads, and one that
    listens for other processes' commits. Other processes write at once beside this
    one; what must not happen twice is kept so by the tables' unique keys and by
    claims that skip locked rows.
    """

    _POST_COLUMNS = _post_columns("string_agg(t.tag, chr(31))")
    # Other workers' claimed rows are skipped, not waited for. ARRAY() runs the subquery
    # once, before the UPDATE; under ``id IN (…)`` the planner may run it again for each
    # row of the queue, each run skipping the rows just claimed, and take them all.
    _CLAIMED_IDS = "id = ANY(ARRAY({} FOR UPDATE SKIP LOCKED))"
    _INBOX_HOST = Store._INBOX_HOST.replace("instr(", "strpos(")
    # The bump tells every process at once (``version``).
    _BUMP_SHOWN = (
        f"WITH bump AS ({Store._BUMP_SHOWN} RETURNING 1)"
        f" SELECT pg_notify('{_PG_CHANNEL}', 'shown') FROM bump"
    )
    # Store._INSERT_COMMENT without its id: an identity column takes no NULL.
    _INSERT_NEW_COMMENT = (
        Store._INSERT_COMMENT.replace("(id, ", "(", 1).replace("(?, ", "(", 1) + " RETURNING id"
    )

    def __init__(self, writer: Any, pool: Any, url: str) -> None:
        self._pg = _PgConnection(writer)
        self._db = self._pg  # type: ignore[assignment]  # what the aggregates' queries use
        self._pool = pool
        self._url = url
        self._where = without_password(url)
        self._path = Path(self._where)  # for messages only: no file
        self._lock = asyncio.Lock()
        self._writes = 0
        self._stored_generation = 0  # the shown generation as last read from meta
        self._checked_at = 0.0
        self.version_max_age = 1.0
        self._listener: Any = None
        self._listen_again_at = 0.0  # monotonic: when a lost listener is tried again
        self._closed = False  # close() began: no connection is made again
        self._writer_pid = int(writer.get_server_pid())
        self._notices = 0  # commits heard of, ours included (peek_data_version)
        self._foreign = 0  # commits of other connections heard of (get_data_version)

    @classmethod
    async def connect(cls, url: str) -> PostgresStore:
        """Connect to ``url``, make or upgrade the schema, and listen for commits."""
        asyncpg = _asyncpg()
        where = without_password(url)
        writer = pool = None
        try:
            writer = await asyncpg.connect(url, timeout=_PG_CONNECT_TIMEOUT)
            pool = await asyncpg.create_pool(
                url, min_size=1, max_size=_PG_READERS, timeout=_PG_CONNECT_TIMEOUT
            )
            store = cls(writer, pool, url)
            await store.migrate()
            await store._listen()
        except (
            OSError,
            ValueError,  # a malformed URL
            OverflowError,  # a port past 65535
            asyncpg.PostgresError,
            asyncpg.InterfaceError,
        ) as error:
            if pool is not None:
                await pool.close()
            if writer is not None:
                await writer.close()
            raise StorageError(f"cannot use the database {where}: {error}") from None
        except BaseException:
            if pool is not None:
                pool.terminate()
            if writer is not None:
                writer.terminate()
            raise
        return store

    @property
    def url(self) -> str:
        return self._url

    @property
    def where(self) -> str:
        """The database's URL without its password, as messages name it."""
        return self._where

    async def close(self) -> None:
        """Close every connection; one that does not close in time (a reader still
        busy, a server that stopped answering) is cut, so closing never hangs."""
        self._closed = True  # a caller still running must not listen or connect again
        failures = (TimeoutError, OSError, _asyncpg().InterfaceError)
        try:
            if self._listener is not None:
                with contextlib.suppress(*failures):
                    await self._listener.close(timeout=_PG_CLOSE_TIMEOUT)
            with contextlib.suppress(*failures):  # the pool cuts its connections itself
                await asyncio.wait_for(self._pool.close(), _PG_CLOSE_TIMEOUT)
            with contextlib.suppress(*failures):
                await self._pg.connection.close(timeout=_PG_CLOSE_TIMEOUT)
        finally:  # cancelled meanwhile: cut what is still open
            for connection in (self._listener, self._pg.connection):
                if connection is not None and not connection.is_closed():
                    connection.terminate()
            self._pool.terminate()

    async def migrate(self) -> int:
        """As ``Store.migrate``: the due migrations in one transaction, under a lock
        that a second process starting at once waits for (then finds them done)."""
        connection = self._pg.connection
        async with self._lock, connection.transaction():
            await connection.execute(f"SELECT pg_advisory_xact_lock({_PG_MIGRATION_LOCK})")
            await connection.execute(
                "CREATE TABLE IF NOT EXISTS fediblog_schema (version INTEGER NOT NULL)"
            )
            current = await connection.fetchval("SELECT max(version) FROM fediblog_schema")
            if current is None:
                await connection.execute("INSERT INTO fediblog_schema (version) VALUES (0)")
                current = 0
            if current > len(MIGRATIONS):
                raise StorageError(
                    f"the database is at schema {current}, newer than this fediblog knows"
                    f" ({len(MIGRATIONS)}): upgrade fediblog"
                )
            for migration in MIGRATIONS[current:]:
                await connection.execute(_postgres_ddl(migration))
            await connection.execute("UPDATE fediblog_schema SET version = $1", len(MIGRATIONS))
        return len(MIGRATIONS)

    async def _user_version(self) -> int:
        value = await self._pg.connection.fetchval("SELECT max(version) FROM fediblog_schema")
        return int(value or 0)

    # ---- commits heard of ----

    async def _listen(self) -> None:
        """A connection of its own that hears every commit's NOTIFY."""
        listener = await _asyncpg().connect(self._url, timeout=_PG_CONNECT_TIMEOUT)
        try:
            await listener.add_listener(_PG_CHANNEL, self._heard)
            if self._closed:  # closed while this connected: nothing would close it
                raise StorageUnavailable(f"the database {self._where} was closed")
        except BaseException:
            listener.terminate()
            raise
        self._listener = listener

    def _heard(self, connection: Any, pid: int, channel: str, payload: str) -> None:
        self._notices += 1
        if pid != self._writer_pid:
            self._foreign += 1
        if payload == "shown":
            self._checked_at = 0.0  # version reads the shown generation at its next call

    async def _listening(self) -> bool:
        """Listen again if the listening connection was lost (tried every few seconds
        at most, never holding a caller up for long); False if it cannot now."""
        if self._listener is not None and not self._listener.is_closed():
            return True
        if self._closed:
            return False
        now = time.monotonic()
        if now < self._listen_again_at:
            return False
        self._listen_again_at = now + _PG_CONNECT_TIMEOUT
        try:
            await self._listen()
        except Exception:  # the server away: a later look tries again
            return False
        # Commits were missed meanwhile: count them as seen once more.
        self._notices += 1
        self._foreign += 1
        self._checked_at = 0.0
        return True

    async def version(self) -> tuple[int, int]:
        """As ``Store.version``: the shown generation is read every ``version_max_age``
        seconds, as on SQLite, and at once after a commit a page shows was heard of
        (NOTIFY), so another process's change shows on the next request; a notice
        lost with the listening connection is waited for no longer than the age."""
        now = time.monotonic()
        if now - self._checked_at >= self.version_max_age:
            self._checked_at = now
            try:
                await self._listening()
                rows = await self._fetchall(
                    "SELECT value FROM meta WHERE key = ?", (self._SHOWN_GENERATION,)
                )
            except StorageUnavailable:
                self._checked_at = 0.0  # ask again next time
                raise
            self._stored_generation = next((int(row[0]) for row in rows), 0)
        return (self._writes, self._stored_generation)

    async def get_data_version(self) -> int:
        await self._listening()
        return self._foreign

    def peek_data_version(self) -> int | None:
        return self._notices

    # ---- transactions ----

    async def _start_writing(self) -> None:
        if self._pg.connection.is_closed():  # lost, or ended by _abort_writing
            await self._reconnect()
        await self._pg.connection.execute("BEGIN")

    async def _finish_writing(self, *, shown: bool) -> None:
        connection = self._pg.connection
        # Sleeping workers in other processes wake (``get_data_version``); a commit a
        # page shows has told them already (``_BUMP_SHOWN``).
        await connection.execute(f"SELECT pg_notify('{_PG_CHANNEL}', 'work')")
        await connection.execute("COMMIT")

    async def _abort_writing(self) -> None:
        connection = self._pg.connection
        if connection.is_closed():
            return
        try:
            if connection.is_in_transaction():
                await connection.execute("ROLLBACK")
        except Exception:
            # A statement cancelled mid-way leaves the connection unusable: start over
            # on a new one (the server rolls the old one's transaction back).
            connection.terminate()

    async def _commit_kept(self, shared: SharedTransaction) -> None:
        # Statements travel one by one to the server: the transaction begins here and
        # ends as a begun one does.
        await self._begin_shared(shared)
        await self._finish_shared(shared)

    # Statements travel alone to the server; no thread holds a lock between trips.
    async def _write_many(self, sql: str, rows: Sequence[Any]) -> None:
        async with self._transaction(shown=False) as db:
            await db.executemany(sql, rows)

    async def _write_all(self, statements: Sequence[tuple[str, Any]]) -> list[Any]:
        async with self._transaction(shown=False) as db:
            rows: list[Any] = []
            for sql, params in statements:
                rows = list(await db.execute_fetchall(sql, params))
            return rows

    def _storage_failure(self, error: BaseException) -> StorageError | None:
        return _pg_failure(self._where, error)

    async def _reconnect(self) -> None:
        """A new writer connection for the one lost (the server restarted, say)."""
        if self._closed:
            raise StorageUnavailable(f"the database {self._where} was closed")
        self._pg = _PgConnection(await _asyncpg().connect(self._url, timeout=_PG_CONNECT_TIMEOUT))
        self._db = self._pg  # type: ignore[assignment]
        self._writer_pid = int(self._pg.connection.get_server_pid())

    async def _fetchall(self, sql: str, params: Sequence[Any] = ()) -> list[Any]:
        await self._before_read()  # a read sees every write before it
        writing = _writing.get()
        try:
            if writing is not None and writing is asyncio.current_task():
                return await self._pg.execute_fetchall(sql, params)
            async with self._pool.acquire() as connection:
                return (await _pg_run(connection, sql, params)).rows
        except StorageError:
            raise
        except Exception as error:
            failure = _pg_failure(self._where, error)
            if failure is None:
                raise
            raise failure from error

    async def count_rows_in_use(self) -> int:
        """Posts, comments, actors and queued work: 0 for a database no blog used yet."""
        row = await self._fetchone(
            "SELECT (SELECT count(*) FROM posts) + (SELECT count(*) FROM comments)"
            " + (SELECT count(*) FROM actors) + (SELECT count(*) FROM activities)"
            " + (SELECT count(*) FROM inbox)"
        )
        return int(row[0]) if row else 0

    # ---- what SQLite does its own way ----

    async def save_inbox_waiting(
        self,
        take: Callable[[], Sequence[InboxItem]],
        committed: Callable[[], bool] | None = None,
    ) -> None:
        """As ``Store.save_inbox_waiting``: one statement for the batch, in arrival order.
        ``take`` runs at once: no lock of the database's is waited for first. One
        commit: ``committed`` is not called (the caller's loop commits what is left)."""
        items = take()
        if not items:
            return
        rows = ((i.dedup_key, i.actor, i.type, i.payload) for i in items)
        columns = [list(column) for column in zip(*rows, strict=True)]
        async with self._transaction(shown=False) as db:
            await db.execute(self._INSERT_INBOX, (format_ts(utcnow()), *columns))

    # The rows and their payloads in one statement: a duplicate key (of a row kept
    # before, or earlier in the batch) inserts no row, so its payload is not returned.
    _INSERT_INBOX = (
        "WITH u AS (SELECT * FROM unnest(CAST(?2 AS TEXT[]), CAST(?3 AS TEXT[]),"
        " CAST(?4 AS TEXT[]), CAST(?5 AS TEXT[])) WITH ORDINALITY AS u(k, a, t, p, n)),"
        " kept AS (INSERT INTO inbox (dedup_key, actor_ap_id, type, received_at)"
        " SELECT k, a, t, ?1 FROM u ORDER BY n ON CONFLICT DO NOTHING RETURNING id, dedup_key)"
        " INSERT INTO inbox_payloads (id, payload)"
        " SELECT DISTINCT ON (kept.id) kept.id, u.p FROM kept JOIN u ON u.k = kept.dedup_key"
        " ORDER BY kept.id, u.n"
    )

    async def _insert_comment(self, values: tuple[Any, ...]) -> int:
        async with self._transaction() as db:
            return await _returning(db, self._INSERT_NEW_COMMENT, values[1:])

    async def _kept_comment_id(self, shared: SharedTransaction, parent_id: int | None) -> int:
        """As ``Store._kept_comment_id``: an id from the comments' sequence, taken
        ``_COMMENT_ID_BLOCK`` at a time (one trip for them, not one INSERT per reply).

        Another process may commit comments meanwhile, with ids above those taken. A
        reply to one of them must still get an id above its parent's (the response
        walk follows replies to larger ids only), so a parent at or above the next id
        taken has the ids taken again: the sequence gives only ids above it now."""
        reserved = shared.reserved_comment_ids
        if not reserved or (parent_id is not None and parent_id >= reserved[-1]):
            rows = await self._fetchall(self._TAKE_COMMENT_IDS, (_COMMENT_ID_BLOCK,))
            reserved[:] = sorted((int(row[0]) for row in rows), reverse=True)
        return reserved.pop()

    _TAKE_COMMENT_IDS = (
        "SELECT nextval(pg_get_serial_sequence('comments', 'id')) FROM generate_series(1, ?)"
    )

    async def save_seed_comments(
        self,
        post_id: int,
        comments: Sequence[tuple[int | None, int | None, str, str, datetime]],
    ) -> int:
        first = await super().save_seed_comments(post_id, comments)
        async with self._transaction(shown=False) as db:  # setval is never rolled back
            await _pg_follow_ids(db, "comments")
        return first

    async def list_response_walk(
        self, post_id: int, limit: int, *, max_depth: int
    ) -> list[tuple[int, str, str, bool]]:
        """As ``Store.list_response_walk``. PostgreSQL's recursive queries allow no
        ORDER BY or LIMIT in their recursive part, so SQLite's walk would reach every
        comment, one query step per level (a chain of 50,000 took minutes): the post's
        visible comments are read in one query instead (ids, parents and times only),
        and walked here in the same order (``_walk_in_memory``)."""
        rows = await self._fetchall(self._THREAD_ROWS, (post_id,))
        return _walk_in_memory(rows, limit, max_depth)

    # What _walk_in_memory walks: a post's visible comments (portable SQL).
    _THREAD_ROWS = (
        "SELECT c.id, c.parent_id, c.published_at, c.status = 'deleted' FROM comments c"
        f" WHERE c.post_id = ? AND {_VISIBLE} ORDER BY c.id"
    )

    _ID_IN_LIST = "{0} = ANY(CAST({1} AS BIGINT[]))"

    _REPLY_CONTEXT = (
        "SELECT 't', ap_id, actor_ap_id, NULL FROM tombstones"
        " WHERE ap_id = ANY(CAST(?1 AS TEXT[]))"
        " UNION ALL SELECT 'c', ap_id, CAST(id AS TEXT), CAST(post_id AS TEXT)"
        " FROM comments WHERE ap_id = ANY(CAST(?1 AS TEXT[]))"
        " UNION ALL SELECT 'a', NULL, CAST(j.value AS TEXT), NULL"
        " FROM unnest(CAST(?2 AS BIGINT[])) AS j(value)"
        f" WHERE {Store._HAS_PUBLISHED.format('j.value')}"
    )

    @staticmethod
    def _id_lists(*lists: Sequence[str | int]) -> tuple[Any, ...]:
        return tuple(list(dict.fromkeys(values)) for values in lists)


async def _pg_follow_ids(db: Any, table: str) -> None:
    """Rows given ids of their own (a copy, a seed): the table's next id follows them."""
    await db.execute(
        f"SELECT setval(pg_get_serial_sequence('{table}', 'id'),"
        f" greatest((SELECT max(id) FROM {table}), 1))"
    )


def _pg_failure(where: str, error: BaseException) -> StorageError | None:
    """The StorageError for an error of asyncpg's, or None to let it through."""
    asyncpg = _asyncpg()
    unavailable = (
        OSError,
        asyncpg.InterfaceError,  # the connection was lost or closed
        asyncpg.PostgresConnectionError,
        asyncpg.InsufficientResourcesError,  # disk full, out of memory, connections
        asyncpg.OperatorInterventionError,  # shut down, cancelled
        asyncpg.ReadOnlySQLTransactionError,  # a standby
        asyncpg.TransactionRollbackError,  # serialization failure, deadlock
        asyncpg.LockNotAvailableError,
        # A schema this version does not know (a newer one migrated it while this one
        # still serves): a retry after the restart succeeds, as with SQLite's "no such
        # column". Never the sender's fault, so never a refusal (400) of what it sent.
        asyncpg.UndefinedTableError,
        asyncpg.UndefinedColumnError,
    )
    if isinstance(error, unavailable):
        return StorageUnavailable(f"the database {where} cannot be used now: {error}")
    if isinstance(error, asyncpg.IntegrityConstraintViolationError):
        return StorageConflict(f"the database {where} refused a write: {error}")
    return None


# ---- moving a blog from SQLite to PostgreSQL (`fediblog migrate`) ---------------------

_COPY_BATCH = 5000


async def copy_blog(
    source: Store, target: PostgresStore, *, report: Callable[[str, int], None] | None = None
) -> dict[str, int]:
    """Copy every row of ``source`` (SQLite) into ``target`` (an empty PostgreSQL
    database), ids and all, in one transaction of the target's: a copy that fails
    leaves it empty. ``source`` is read in one read transaction (a consistent snapshot,
    but stop the server first: what it writes meanwhile would not be copied). Returns
    the rows copied per table; ``report`` hears of each table as it is done."""
    if type(source) is not Store:
        raise StorageError("the database to copy from must be an SQLite file")
    if await target.count_rows_in_use():
        raise StorageError(
            f"{target.where} already holds a blog: copy into a new, empty database"
        )
    copied: dict[str, int] = {}
    reader = source._reader
    await reader.execute("BEGIN")  # one snapshot of every table
    try:
        async with target._transaction(shown=True) as db:
            connection = target._pg.connection
            for table in _TABLES:
                for key in _SEEDED.get(table, ()):
                    await connection.execute(f"DELETE FROM {table} WHERE key = $1", key)
                order = "ORDER BY id" if table in _IDENTITY_TABLES else ""
                cursor = await reader.execute(f"SELECT * FROM {table} {order}")
                columns = [column[0] for column in cursor.description]
                count = 0
                while rows := await cursor.fetchmany(_COPY_BATCH):
                    batch = [tuple(map(_pg_value, row)) for row in rows]
                    await connection.copy_records_to_table(
                        table, records=batch, columns=columns
                    )
                    count += len(batch)
                await cursor.close()
                if table in _IDENTITY_TABLES:
                    await _pg_follow_ids(db, table)
                if table == "meta":  # the worker processes of the old database are gone
                    await connection.execute("DELETE FROM meta WHERE starts_with(key, 'worker_')")
                copied[table] = count
                if report is not None:
                    report(table, count)
    finally:
        await reader.execute("ROLLBACK")
    # The planner's statistics still describe empty tables (autovacuum gets to them
    # within minutes): without them, the first queries on a big blog may scan.
    await target._pg.connection.execute("ANALYZE")
    return copied
