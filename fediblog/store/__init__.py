"""All SQL lives here: the schema, its numbered migrations, and every query.

The rest of fediblog talks to ``Store`` in terms of the records in ``models``;
nothing outside this package writes SQL. ``Store`` is SQLite (aiosqlite), the embedded
default; ``PostgresStore`` (postgres.py, through asyncpg) is the same class on a
PostgreSQL server, for a blog run by several processes or machines. Each query is
written once for both: the few spellings that differ are class attributes the
PostgreSQL class overrides, and the migrations are SQLite's DDL, which
``_postgres_ddl`` turns into PostgreSQL's.

Where each part lives: schema.py (the migrations and their PostgreSQL spelling);
core.py (``StoreCore``: connections, transactions, reads, change tracking, meta, the
worker processes' heartbeats, and the SQL fragments and row helpers several aggregates
share); one module per aggregate, each a class over ``StoreCore`` holding its queries:
posts.py, comments.py, actors.py, followers.py, inbox.py, deliveries.py, media.py,
crawl.py, notifications.py, desk.py; sqlite.py (``Store``, which composes them all, and
``Store.open``); postgres.py (``PostgresStore``, the asyncpg adapters, ``copy_blog``).

SQLite runs in WAL mode so readers never wait for the writer, with
``synchronous=FULL`` so that a commit that returned survives a power cut. Processes
writing one database take turns through a lock file (``_WriterLock``), which hands the
write lock on within a millisecond instead of SQLite's sleeps of up to 100 ms.
``Store.version()`` changes whenever anything a page shows was committed, by this
process or by another one (the CLI writing while the server runs, a worker process):
page caches key on it. Bookkeeping no page shows (``shown=False``: queues, leases,
heartbeats) moves it in no process, so a busy worker process leaves the pages cached.
"""

from fediblog.store.core import SharedTransaction, _writing
from fediblog.store.media import PROXY_PATH
from fediblog.store.postgres import PostgresStore, _pg_args, _pg_query, _walk_in_memory, copy_blog
from fediblog.store.schema import _TABLES, MIGRATIONS
from fediblog.store.sqlite import Store

__all__ = [
    "MIGRATIONS",
    "PROXY_PATH",
    "_TABLES",
    "PostgresStore",
    "SharedTransaction",
    "Store",
    "_pg_args",
    "_pg_query",
    "_walk_in_memory",
    "_writing",
    "copy_blog",
]
