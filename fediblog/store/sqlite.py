"""``Store``: the SQLite store, every aggregate's storage over ``StoreCore``."""

from __future__ import annotations

import asyncio
import contextlib
import os
import sqlite3
from pathlib import Path

import aiosqlite

from fediblog.errors import StorageError
from fediblog.store.actors import ActorStorage
from fediblog.store.comments import CommentStorage
from fediblog.store.core import _BUSY_TIMEOUT_MS, StoreCore, _identity
from fediblog.store.crawl import CrawlStorage
from fediblog.store.deliveries import DeliveryStorage
from fediblog.store.desk import DeskStorage
from fediblog.store.followers import FollowerStorage
from fediblog.store.inbox import InboxStorage
from fediblog.store.media import MediaStorage
from fediblog.store.notifications import NotificationStorage
from fediblog.store.posts import PostStorage

_PRAGMAS = (
    "journal_mode = WAL",
    "synchronous = FULL",
    "foreign_keys = ON",
    f"busy_timeout = {_BUSY_TIMEOUT_MS}",
    "mmap_size = 268435456",
)


async def _set_pragma(connection: aiosqlite.Connection, pragma: str) -> None:
    # Two processes opening a new database at once (`serve --web-only` and `worker`)
    # both switch it to WAL, and SQLite may answer the second "locked" at once, without
    # the busy timeout: a switch that needs an exclusive lock while another connection
    # reads. It is tried again for a few seconds, as the busy timeout would.
    for attempt in range(100):
        try:
            await connection.execute(f"PRAGMA {pragma}")
            return
        except sqlite3.OperationalError as error:
            if attempt == 99 or error.sqlite_errorcode != sqlite3.SQLITE_BUSY:
                raise
            await asyncio.sleep(0.05)


class Store(
    PostStorage,
    CommentStorage,
    ActorStorage,
    FollowerStorage,
    InboxStorage,
    CrawlStorage,
    NotificationStorage,
    DeskStorage,
    MediaStorage,
    DeliveryStorage,
    StoreCore,
):
    """One SQLite database. Open with ``await Store.open(path)``; close when done.

    Each aggregate's queries are a class of their own (posts.py, comments.py, ...) over
    ``StoreCore`` (core.py), which holds the connections and transactions.
    """

    @classmethod
    async def open(cls, path: Path | str, *, create: bool = True) -> Store:
        """Open and migrate the database at ``path``; create it only if ``create``.
        A ``postgresql://`` URL opens a PostgresStore instead (``create`` is moot: the
        server's database exists, and its schema is made on first use)."""
        if isinstance(path, str):
            # Imported here: postgres.py builds PostgresStore on this class.
            from fediblog.store.postgres import PostgresStore

            return await PostgresStore.connect(path)
        if not create and _identity(path) is None:
            raise StorageError(f"no database at {path}: run `fediblog init` first")
        connections: list[aiosqlite.Connection] = []
        try:
            if _identity(path) is None:
                # It holds commenters' emails: mode 0600 from its first byte (SQLite gives
                # the -wal and -shm files the database's mode), in a folder 0700 if new.
                path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
                with contextlib.suppress(FileExistsError):  # another process was first
                    os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
            for _ in range(2):
                connection = await aiosqlite.connect(path, isolation_level=None)
                connections.append(connection)
                connection.row_factory = sqlite3.Row
                for pragma in _PRAGMAS:
                    await _set_pragma(connection, pragma)
            db, reader = connections
            store = cls(db, reader, path)
            await store.migrate()
        except (OSError, sqlite3.Error) as error:
            for connection in connections:
                await connection.close()
            raise StorageError(f"cannot use the database {path}: {error}") from None
        except BaseException:
            for connection in connections:
                await connection.close()
            raise
        return store
