"""Reading (and, for a test's set-up, writing) the blog's database directly, on SQLite
or PostgreSQL alike: what was committed, through a connection of its own, whatever the
app caches. SQL is written as the store writes it (SQLite's ``?`` placeholders).

Synchronous, for tests that check what an activity stored or left alone: on SQLite a
plain ``sqlite3`` connection (read-only unless asked), on PostgreSQL one asyncpg
connection per call on the test databases' helper thread (tests.pgcluster).
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from contextlib import closing
from pathlib import Path
from typing import Any

from fediblog.config import Settings
from fediblog.store import _pg_args, _pg_query
from tests.pgcluster import HARNESS_APPLICATION, POSTGRES

Row = tuple[Any, ...]


def where(target: Settings | Path | str) -> Path | str:
    """The database of settings, a SQLite file, or a PostgreSQL URL."""
    return target.store_location if isinstance(target, Settings) else target


def rows(target: Settings | Path | str, sql: str, params: Sequence[Any] = ()) -> list[Row]:
    """The rows ``sql`` reads."""
    return _run(where(target), [(sql, params)], write=False)[0]


def many(target: Settings | Path | str, *queries: tuple[str, Sequence[Any]]) -> list[list[Row]]:
    """The rows of each query, read in one transaction (and one trip, on PostgreSQL)."""
    return _run(where(target), list(queries), write=False)


def row(target: Settings | Path | str, sql: str, params: Sequence[Any] = ()) -> Row | None:
    found = rows(target, sql, params)
    return found[0] if found else None


def execute(target: Settings | Path | str, *statements: tuple[str, Sequence[Any]]) -> None:
    """Run statements that write, in one transaction."""
    _run(where(target), list(statements), write=True)


def _run(
    location: Path | str, statements: list[tuple[str, Sequence[Any]]], *, write: bool
) -> list[list[Row]]:
    if isinstance(location, Path):
        mode = "rw" if write else "ro"
        with closing(sqlite3.connect(f"file:{location}?mode={mode}", uri=True)) as db, db:
            return [[tuple(r) for r in db.execute(sql, params)] for sql, params in statements]
    assert POSTGRES is not None, "a PostgreSQL URL outside the PostgreSQL run"

    async def run() -> list[list[Row]]:
        connection = await _connection(location)
        async with connection.transaction():
            found = []
            for sql, params in statements:
                query, order = _pg_query(sql)
                records = await connection.fetch(query, *_pg_args(order, params))
                found.append([tuple(record) for record in records])
            return found

    return POSTGRES.call(run())


# One connection per database, kept (on the helper thread's loop, its only user): a
# new one costs PostgreSQL a process, and some tests read after every request. An
# emptied database keeps it for its next test (HARNESS_APPLICATION); a dropped one takes
# it with it.
_CONNECTIONS: dict[str, Any] = {}


async def _connection(url: str) -> Any:
    import asyncpg

    connection = _CONNECTIONS.get(url)
    if connection is None or connection.is_closed():
        connection = _CONNECTIONS[url] = await asyncpg.connect(
            url, server_settings={"application_name": HARNESS_APPLICATION}
        )
    return connection
