"""A throwaway PostgreSQL cluster for one command: `python -m tests.pgcluster COMMAND...`.

It makes a cluster in a temporary folder (initdb), starts it on a free port of
127.0.0.1, runs COMMAND with ``FEDIBLOG_TEST_POSTGRES`` naming its superuser
(``postgresql://postgres@127.0.0.1:PORT/postgres``), then stops the cluster and deletes
the folder, whatever happened (COMMAND's success or failure, Ctrl-C, SIGTERM), and
exits with COMMAND's status (128 + N when a signal N ended it). It exits 2 without
running COMMAND when it cannot make the cluster: no PostgreSQL server installed, no
``postgres`` user to run it as root, or a server that did not start (its log's tail is
printed). tests/conftest.py then gives every test a database of its own there.

The server's programs are found on PATH (``initdb``), else in the newest
``/usr/lib/postgresql/*/bin`` (where Debian's ``postgresql`` package puts them).
initdb and the server refuse to run as root: as root, they run as the unprivileged
``postgres`` user Debian's package creates, in a folder handed to that user.

The second half is the other side, in the test run: ``BACKEND`` and ``database_for``,
which tests/conftest.py uses to give each test folder an empty database on the server
``FEDIBLOG_TEST_POSTGRES`` names, emptied after the test for a later one
(``PostgresDatabases``).
It lives here, not in conftest, because pytest imports conftest.py as ``conftest``
while the tests import it as ``tests.conftest``: two modules, one set of databases.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import pwd
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Coroutine, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any, Literal, TypeVar
from urllib.parse import urlsplit

from fediblog.store import _TABLES, Store

NOT_INSTALLED = "PostgreSQL's server is not installed: apt-get install postgresql"
SERVER_PROGRAMS = ("initdb", "pg_ctl", "postgres")
# Each fediblog Store may hold a few connections, and xdist runs a test per core, each
# with its app, its CLI processes and conftest's helper: far more than the default 100.
MAX_CONNECTIONS = 400
START_TIMEOUT = 60  # seconds pg_ctl waits for the server to accept connections


class ClusterError(Exception):
    """The cluster could not be made or started; the message says why, in one line
    (with the server log's tail when there is one)."""


def _version_key(folder: Path) -> tuple[int, ...]:
    """/usr/lib/postgresql/15/bin -> (15,): the newest version sorts last (16 > 9.6)."""
    name = folder.parent.name
    return tuple(int(part) for part in name.split(".") if part.isdigit()) or (0,)


def find_server(
    path: str | None = None, debian_root: Path = Path("/usr/lib/postgresql")
) -> Path | None:
    """The folder holding initdb, pg_ctl and postgres: initdb's on PATH (a symlink is
    followed to the real folder, where the other two are), else the newest of Debian's
    versioned folders; None when there is no server."""
    on_path = shutil.which("initdb", path=path)
    candidates: list[Path] = []
    if on_path:
        candidates += [Path(on_path).resolve().parent, Path(on_path).parent]
    candidates += sorted(debian_root.glob("*/bin"), key=_version_key, reverse=True)
    for folder in candidates:
        if all(os.access(folder / name, os.X_OK) for name in SERVER_PROGRAMS):
            return folder
    return None


@dataclass(frozen=True)
class RunAs:
    """Whom the server's programs run as: the current user (``uid`` None), or, as root,
    the ``postgres`` user."""

    uid: int | None = None
    gid: int | None = None

    @staticmethod
    def for_this_process() -> RunAs:
        if os.geteuid() != 0:
            return RunAs()
        try:
            user = pwd.getpwnam("postgres")
        except KeyError:
            raise ClusterError(
                "initdb refuses to run as root and there is no `postgres` user to run it"
                " as: apt-get install postgresql makes one (or run this as another user)"
            ) from None
        return RunAs(user.pw_uid, user.pw_gid)

    def options(self) -> dict[str, Any]:
        """subprocess options running a program as this user (no shell, no runuser)."""
        if self.uid is None:
            return {}
        return {"user": self.uid, "group": self.gid, "extra_groups": []}


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _log_tail(log: Path, lines: int = 20) -> str:
    try:
        return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no server log)"


@dataclass
class Cluster:
    """A cluster in ``folder``: ``data/`` (the cluster), ``socket/``, ``server.log``."""

    bin: Path
    folder: Path
    run_as: RunAs
    port: int = 0

    @property
    def data(self) -> Path:
        return self.folder / "data"

    @property
    def log(self) -> Path:
        return self.folder / "server.log"

    @property
    def url(self) -> str:
        """The superuser's URL: what FEDIBLOG_TEST_POSTGRES holds."""
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def _run(self, *args: str, timeout: float) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(self.bin / args[0]), *args[1:]],
            cwd=self.folder,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
            # The server's own locale and time zone, whatever the caller's environment.
            env={**os.environ, "LC_ALL": "C", "TZ": "UTC"},
            **self.run_as.options(),
        )

    def init(self) -> None:
        socket_dir = self.folder / "socket"
        socket_dir.mkdir()
        if self.run_as.uid is not None:
            for path in (self.folder, socket_dir):
                os.chown(path, self.run_as.uid, self.run_as.gid or 0)
        done = self._run(
            "initdb", "-D", str(self.data), "-U", "postgres", "--auth=trust",
            "--encoding=UTF8", "--locale=C", "--no-sync", timeout=120,
        )  # fmt: skip
        if done.returncode != 0:
            raise ClusterError(f"initdb failed:\n{done.stdout}{done.stderr}".rstrip())
        settings = {
            "listen_addresses": "'127.0.0.1'",
            "unix_socket_directories": f"'{socket_dir}'",
            "max_connections": str(MAX_CONNECTIONS),
            # A throwaway cluster for tests: a crash loses it anyway, so nothing waits
            # for the disk. Durability is SQLite's and production's concern, not this.
            "fsync": "off",
            "synchronous_commit": "off",
            "full_page_writes": "off",
        }
        with (self.data / "postgresql.conf").open("a") as conf:
            conf.write("\n# tests/pgcluster.py\n")
            conf.writelines(f"{name} = {value}\n" for name, value in settings.items())

    def start(self, attempts: int = 3) -> None:
        """Start on a free port; another attempt on another port if one was taken
        between choosing it and the server binding it."""
        for attempt in range(1, attempts + 1):
            self.port = _free_port()
            done = self._run(
                "pg_ctl", "start", "-D", str(self.data), "-l", str(self.log), "-w",
                "-t", str(START_TIMEOUT), "-o", f"-p {self.port}", timeout=START_TIMEOUT + 10,
            )  # fmt: skip
            if done.returncode == 0:
                return
            in_use = "already in use" in _log_tail(self.log)
            if not in_use or attempt == attempts:
                raise ClusterError(
                    f"the PostgreSQL server did not start ({done.stdout}{done.stderr}".rstrip()
                    + f"); the end of its log:\n{_log_tail(self.log)}"
                )

    def stop(self) -> None:
        """Stop at once (-m immediate: nothing in it is worth a checkpoint)."""
        if (self.data / "postmaster.pid").exists():
            self._run("pg_ctl", "stop", "-D", str(self.data), "-m", "immediate", "-w", timeout=60)


@contextlib.contextmanager
def throwaway_cluster(bin_folder: Path) -> Iterator[Cluster]:
    """A started cluster, stopped and deleted on the way out, however it is left."""
    run_as = RunAs.for_this_process()
    folder = Path(tempfile.mkdtemp(prefix="fediblog-pg-"))
    cluster = Cluster(bin_folder, folder, run_as)
    try:
        cluster.init()
        cluster.start()
        yield cluster
    finally:
        try:
            cluster.stop()
        finally:
            shutil.rmtree(folder, ignore_errors=True)


class _Interrupted(BaseException):
    """SIGINT or SIGTERM before COMMAND started: leave, cleaning up on the way."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


def run(command: Sequence[str]) -> int:
    """Run ``command`` against a throwaway cluster; its exit status."""
    if not command:
        print("usage: python -m tests.pgcluster COMMAND [ARG...]", file=sys.stderr)
        return 2
    bin_folder = find_server()
    if bin_folder is None:
        print(NOT_INSTALLED, file=sys.stderr)
        return 2
    child: subprocess.Popen[bytes] | None = None

    def on_signal(signum: int, frame: FrameType | None) -> None:
        # COMMAND running: it is told (Ctrl-C in a terminal told it already; a second
        # SIGINT does no harm), and its own exit ends this run with the cleanup.
        if child is not None:
            with contextlib.suppress(ProcessLookupError):
                child.send_signal(signum)
            return
        for sig in (signal.SIGINT, signal.SIGTERM):  # once: the cleanup runs uninterrupted
            signal.signal(sig, signal.SIG_IGN)
        raise _Interrupted(signum)

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        started = time.monotonic()
        with throwaway_cluster(bin_folder) as cluster:
            print(
                f"tests.pgcluster: PostgreSQL ({bin_folder}) in {cluster.folder} on"
                f" {cluster.url}, started in {time.monotonic() - started:.1f} s",
                file=sys.stderr,
            )
            env = {**os.environ, "FEDIBLOG_TEST_POSTGRES": cluster.url}
            try:
                child = subprocess.Popen(list(command), env=env)
            except OSError as error:
                print(f"tests.pgcluster: cannot run {command[0]}: {error}", file=sys.stderr)
                return 127
            status = child.wait()
            # The cleanup (in the with's exit) is not interrupted by another signal.
            for sig in previous:
                signal.signal(sig, signal.SIG_IGN)
        return 128 - status if status < 0 else status
    except ClusterError as error:
        print(f"tests.pgcluster: {error}", file=sys.stderr)
        return 2
    except _Interrupted as interrupted:
        return 128 + interrupted.signum
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


# ---- the tests' databases (tests/conftest.py) --------------------------------------------

# Read once, at import: blog_dir takes every FEDIBLOG_* out of a test's environment.
TEST_POSTGRES = os.environ.get("FEDIBLOG_TEST_POSTGRES", "")
BACKEND: Literal["sqlite", "postgresql"] = "postgresql" if TEST_POSTGRES else "sqlite"

T = TypeVar("T")


# The test harness's own connections are named so (tests/dbpeek.py keeps one per
# database, and this module one to empty each): emptying a database for the next test
# cuts every other connection to it, not these.
HARNESS_APPLICATION = "fediblog-tests"

# What a test could have changed in a database's schema: its version, its relations,
# their columns (types, defaults, NOT NULL), constraints and indexes, triggers and
# functions, and the database's own settings. Seen different, the database is dropped.
_FINGERPRINT = """
    SELECT (SELECT max(version) FROM fediblog_schema),
           (SELECT string_agg(relname || ':' || relkind::text, ',' ORDER BY relname)
              FROM pg_class WHERE relnamespace = 'public'::regnamespace),
           (SELECT md5(string_agg(c.relname || '.' || a.attname || ':'
                                  || format_type(a.atttypid, a.atttypmod) || ':'
                                  || a.attnotnull::text || ':'
                                  || coalesce(pg_get_expr(d.adbin, d.adrelid), ''),
                                  ',' ORDER BY c.relname, a.attnum))
              FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid
              LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
             WHERE c.relnamespace = 'public'::regnamespace AND a.attnum > 0
               AND NOT a.attisdropped),
           (SELECT md5(string_agg(conname || ':' || pg_get_constraintdef(oid), ','
                                  ORDER BY conname))
              FROM pg_constraint WHERE connamespace = 'public'::regnamespace),
           (SELECT md5(string_agg(indexdef, ',' ORDER BY indexname))
              FROM pg_indexes WHERE schemaname = 'public'),
           (SELECT count(*) FROM pg_trigger t JOIN pg_class c ON c.oid = t.tgrelid
             WHERE c.relnamespace = 'public'::regnamespace AND NOT t.tgisinternal),
           (SELECT count(*) FROM pg_proc WHERE pronamespace = 'public'::regnamespace),
           (SELECT count(*) FROM pg_db_role_setting s JOIN pg_database d
                ON d.oid = s.setdatabase WHERE d.datname = current_database())
"""
# Each other connection is cut, and waited for (up to 5 s) until its process is gone:
# a commit of its in flight must land before the tables are emptied, not after.
_OTHER_CONNECTIONS = """
    SELECT pg_terminate_backend(pid, 5000) FROM pg_stat_activity
     WHERE datname = current_database() AND pid <> pg_backend_pid()
       AND application_name IS DISTINCT FROM $1
"""
# Tables a test filled (past 1 MB on disk, dead rows included): emptied with TRUNCATE.
_BIG_TABLES = """
    SELECT relname FROM pg_class
     WHERE relkind = 'r' AND relnamespace = 'public'::regnamespace
       AND relname <> 'fediblog_schema' AND pg_relation_size(oid) > 1048576
"""
_RESTART_SEQUENCES = """
    SELECT setval(oid, 1, false) FROM pg_class
     WHERE relkind = 'S' AND relnamespace = 'public'::regnamespace
"""


class PostgresDatabases:
    """Gives each test folder an empty database on the server at ``admin_url``, and
    takes it back after the test.

    make_settings is synchronous and is called from async tests, inside their running
    event loop: the SQL runs on a private loop in a helper thread, on asyncpg
    connections kept for the whole session (connecting costs a server process), and
    the caller waits for its result.

    Every database starts as a copy of one made once with fediblog's schema (its
    migrations, on this server, by the code under test). Making a copy costs 0.2-0.5 s
    on a busy cluster (CREATE DATABASE copies files and checkpoints); emptying a used
    one costs a few ms. So the databases of a test are emptied after it, as the
    template left them (its rows, its sequences), and handed to the next tests; one
    whose schema the test changed is dropped instead.
    """

    def __init__(self, admin_url: str) -> None:
        self.admin_url = admin_url
        # Unique across xdist workers and across runs sharing a server: the worker,
        # the process and a random part.
        worker = os.environ.get("PYTEST_XDIST_WORKER", "main")
        self.prefix = f"fediblog_{worker}_{os.getpid()}_{secrets.token_hex(2)}_"
        self.counter = itertools.count(1)
        self.by_folder: dict[Path, str] = {}  # test folder -> its database's URL
        self.live: list[str] = []  # databases in use by the running test, oldest first
        self.spare: list[str] = []  # emptied databases, for the next tests
        self.lock = threading.Lock()
        self.loop: asyncio.AbstractEventLoop | None = None
        self.thread: threading.Thread | None = None
        self.connection: Any = None  # asyncpg.Connection (asyncpg has no type hints)
        self.emptiers: dict[str, Any] = {}  # database -> the connection that empties it
        self.create_sql = ""
        self.template = ""
        self.fingerprint: tuple[Any, ...] = ()  # the template's (_FINGERPRINT)
        self.empty_sql = ""  # deletes every row but the schema version
        self.seeds: list[tuple[str, list[str], list[tuple[Any, ...]]]] = []  # the template's rows

    def call(self, work: Coroutine[Any, Any, T]) -> T:
        """Run ``work`` on the helper thread's event loop and wait for its result (for
        synchronous test code: tests/dbpeek.py)."""
        return self._call(work)

    def _call(self, work: Coroutine[Any, Any, T]) -> T:
        if self.loop is None:
            self.loop = asyncio.new_event_loop()
            self.thread = threading.Thread(
                target=self.loop.run_forever, name="test-databases", daemon=True
            )
            self.thread.start()
        return asyncio.run_coroutine_threadsafe(work, self.loop).result(timeout=120)

    async def _connection(self) -> Any:
        import asyncpg  # only in PostgreSQL runs: the SQLite suite does not need it

        if self.connection is None or self.connection.is_closed():
            self.connection = await asyncpg.connect(self.admin_url)
            # From template0, which is always pristine (template1 may have been changed
            # on a shared server, and refuses to be copied while anyone is connected to
            # it). FILE_COPY (PostgreSQL 15+) copies the files instead of writing the
            # whole template into the WAL as WAL_LOG, the default, does.
            version = self.connection.get_server_version().major
            strategy = " STRATEGY FILE_COPY" if version >= 15 else ""
            template = f"{self.prefix}template"
            await self.connection.execute(
                f"CREATE DATABASE {template} TEMPLATE template0" + strategy
            )
            self.template = template  # dropped last (close), never with a test's
            store = await Store.open(self.url_of(template))
            await store.close()
            await self._read_template(template)
            self.create_sql = f"CREATE DATABASE {{}} TEMPLATE {template}" + strategy
        return self.connection

    async def _read_template(self, template: str) -> None:
        """What emptying a used database must give back: the template's schema (to
        compare), its tables (to empty, each before those it refers to) and rows."""
        import asyncpg

        connection = await asyncpg.connect(self.url_of(template))
        try:
            self.fingerprint = tuple(await connection.fetchrow(_FINGERPRINT))
            rows = await connection.fetch(
                "SELECT relname FROM pg_class WHERE relkind = 'r'"
                " AND relnamespace = 'public'::regnamespace AND relname <> 'fediblog_schema'"
            )
            tables = {row["relname"] for row in rows}
            ordered = [name for name in _TABLES if name in tables]
            unknown = sorted(tables - set(ordered))  # referred to by none we know: first
            self.empty_sql = "; ".join(
                f"DELETE FROM {name}"  # noqa: S608
                for name in [*unknown, *reversed(ordered)]
            )
            self.seeds = []
            for name in ordered:
                records = await connection.fetch(f"SELECT * FROM {name}")  # noqa: S608
                if records:
                    columns = list(records[0].keys())
                    self.seeds.append((name, columns, [tuple(r) for r in records]))
        finally:
            await connection.close()

    async def _create(self, name: str) -> None:
        connection = await self._connection()
        await connection.execute(self.create_sql.format(name))

    async def _empty(self, name: str) -> bool:
        """Make the database ``name`` as the template left it, if its schema is still
        the template's (True); otherwise leave it (False: drop it)."""
        import asyncpg

        connection = self.emptiers.get(name)
        if connection is None or connection.is_closed():
            connection = self.emptiers[name] = await asyncpg.connect(
                self.url_of(name), server_settings={"application_name": HARNESS_APPLICATION}
            )
        # A store the test left open, or a process of its not gone yet, must not write
        # into the next test's rows (nor hold a lock the deletes would wait for).
        await connection.fetch(_OTHER_CONNECTIONS, HARNESS_APPLICATION)
        if tuple(await connection.fetchrow(_FINGERPRINT)) != self.fingerprint:
            return False
        async with connection.transaction():
            big = [row["relname"] for row in await connection.fetch(_BIG_TABLES)]
            if big:
                # DELETE checks the foreign keys row by row, with the plans this session
                # made while the tables were small: a scan of the table per row (50,000
                # comments took 20 s). TRUNCATE checks none, but costs ~25 ms a test more
                # than DELETE, so only for these (CASCADE: with the tables that refer to them).
                await connection.execute(f"TRUNCATE {', '.join(big)} CASCADE")
            await connection.execute(self.empty_sql)
            for table, columns, records in self.seeds:
                await connection.copy_records_to_table(table, records=records, columns=columns)
            await connection.fetch(_RESTART_SEQUENCES)
        return True

    async def _drop(self, names: list[str]) -> None:
        connection = await self._connection()
        for name in names:
            emptier = self.emptiers.pop(name, None)
            if emptier is not None:
                with contextlib.suppress(Exception):
                    await emptier.close(timeout=5)
            # FORCE: a connection a test left open must not keep its database alive.
            await connection.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")

    async def _take_back(self, names: list[str]) -> list[str]:
        """Empty each of ``names`` for the next tests, or drop it: those emptied."""
        emptied, dropping = [], []
        for name in names:
            try:
                (emptied if await self._empty(name) else dropping).append(name)
            except Exception:  # whatever the test did to it, it is not used again
                dropping.append(name)
        await self._drop(dropping)
        return emptied

    def url_of(self, name: str) -> str:
        """The admin URL with its database swapped for ``name`` (options kept)."""
        return urlsplit(self.admin_url)._replace(path="/" + name).geturl()

    def for_folder(self, folder: Path) -> str:
        """The database of a test folder, empty at first use: one folder, one database,
        as SQLite has one file under it (two calls on the same folder give the same
        database, as a restart in a test expects)."""
        key = folder.resolve()
        with self.lock:
            if key not in self.by_folder:
                if self.spare:
                    name = self.spare.pop()
                else:
                    name = f"{self.prefix}{next(self.counter)}"
                    self._call(self._create(name))
                self.live.append(name)
                self.by_folder[key] = self.url_of(name)
            return self.by_folder[key]

    def take_back_since(self, count: int) -> None:
        """Take back the databases given out after the first ``count`` (those of one
        test): emptied for the next tests, or dropped."""
        with self.lock:
            taking = self.live[count:]
            if not taking:
                return
            gone = {self.url_of(name) for name in taking}
            self.by_folder = {k: v for k, v in self.by_folder.items() if v not in gone}
            # Should this fail (the server gone, a time-out), they stay in ``live``:
            # never given out again, dropped by ``close``.
            emptied = self._call(self._take_back(taking))
            del self.live[count:]
            self.spare.extend(emptied)

    def close(self) -> None:
        """Drop every database and close the connections: best effort, at session end."""
        if self.loop is None:
            return
        try:
            with self.lock:
                names = [*self.live, *self.spare]
                self.live, self.spare, self.by_folder = [], [], {}
            self._call(self._drop(names))
            if self.template:
                self._call(self._drop([self.template]))
        except Exception as error:  # a server gone already must not fail the run
            print(f"\ntests.pgcluster: could not drop the test databases: {error}")
        if self.connection is not None:
            with contextlib.suppress(Exception):
                self._call(self.connection.close(timeout=5))
        self.loop.call_soon_threadsafe(self.loop.stop)
        if self.thread is not None:
            self.thread.join(timeout=10)


POSTGRES = PostgresDatabases(TEST_POSTGRES) if TEST_POSTGRES else None


def database_for(folder: Path, sqlite_name: str = "test.db") -> Path | str:
    """The database of a test's folder: ``folder/data/SQLITE_NAME``, or, against
    PostgreSQL, the URL of an empty database of that folder's own."""
    if POSTGRES is None:
        return folder / "data" / sqlite_name
    return POSTGRES.for_folder(folder)


def main() -> None:
    sys.exit(run(sys.argv[1:]))


if __name__ == "__main__":
    main()
