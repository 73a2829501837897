"""The PostgreSQL test infrastructure: tests/pgcluster.py starts a real throwaway cluster
for a command and always removes it; conftest gives each test folder a fresh database
there (only in a run against PostgreSQL, ``python -m tests.pgcluster pytest``).

The cluster tests run the real server binaries, on every run, and are skipped only
where no PostgreSQL server is installed.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import pytest

from tests import pgcluster
from tests.conftest import BACKEND, database_for, make_settings
from tests.pgcluster import POSTGRES, TEST_POSTGRES, PostgresDatabases

pytestmark = pytest.mark.postgresql  # -m postgresql: where backends differ

ROOT = Path(__file__).resolve().parent.parent
NO_SERVER = pytest.mark.skipif(
    pgcluster.find_server() is None,
    reason="no PostgreSQL server binaries (initdb, pg_ctl, postgres): apt-get install postgresql",
)
ON_POSTGRES = pytest.mark.skipif(
    BACKEND != "postgresql",
    reason="checks the per-test databases: only when FEDIBLOG_TEST_POSTGRES is set",
)

# What COMMAND does in the cluster tests: reach the server named by FEDIBLOG_TEST_POSTGRES
# as its superuser, create and use a database, then exit with argv[1].
CLIENT = """
import asyncio, os, sys
import asyncpg

async def main():
    url = os.environ["FEDIBLOG_TEST_POSTGRES"]
    admin = await asyncpg.connect(url)
    assert await admin.fetchval("SELECT rolsuper FROM pg_roles WHERE rolname = current_user")
    await admin.execute("CREATE DATABASE scratch")
    scratch = await asyncpg.connect(url.rsplit("/", 1)[0] + "/scratch")
    await scratch.execute("CREATE TABLE t (n int); INSERT INTO t VALUES (41)")
    print("got", await scratch.fetchval("SELECT n + 1 FROM t"), "from", url, flush=True)
    await scratch.close()
    await admin.close()

asyncio.run(main())
sys.exit(int(sys.argv[1]))
"""


def run_cluster(*command: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tests.pgcluster", *command],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def cluster_of(stderr: str) -> tuple[Path, int]:
    """The cluster's folder and port, from the line pgcluster prints when it started."""
    found = re.search(r" in (\S+) on postgresql://postgres@127\.0\.0\.1:(\d+)/postgres", stderr)
    assert found, stderr
    return Path(found[1]), int(found[2])


def listening(port: int) -> bool:
    with socket.socket() as probe:
        probe.settimeout(1)
        return probe.connect_ex(("127.0.0.1", port)) == 0


def assert_removed(folder: Path, port: int) -> None:
    assert not folder.exists(), f"{folder} was left behind"
    assert not listening(port), f"a server still listens on {port}"


# ---- python -m tests.pgcluster, for real ---------------------------------------------------


@NO_SERVER
@pytest.mark.parametrize("status", [0, 3])
def test_a_command_runs_against_a_real_cluster_and_its_status_is_kept(status: int) -> None:
    done = run_cluster(sys.executable, "-c", CLIENT, str(status))

    assert done.returncode == status, done.stdout + done.stderr
    folder, port = cluster_of(done.stderr)
    assert f"got 42 from postgresql://postgres@127.0.0.1:{port}/postgres" in done.stdout
    assert_removed(folder, port)


@NO_SERVER
def test_sigterm_stops_the_command_and_removes_the_cluster() -> None:
    waiting = "import time; print('ready', flush=True); time.sleep(120)"
    process = subprocess.Popen(
        [sys.executable, "-m", "tests.pgcluster", sys.executable, "-c", waiting],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout is not None
        assert process.stdout.readline() == "ready\n"
        assert process.stderr is not None
        started = process.stderr.readline()
        process.send_signal(signal.SIGTERM)
        stopped_at = time.monotonic()
        assert process.wait(timeout=30) == 128 + signal.SIGTERM
        assert time.monotonic() - stopped_at < 15  # not the child's 120 s sleep
    finally:
        process.kill()
        process.communicate()
    assert_removed(*cluster_of(started))


@NO_SERVER
def test_a_server_that_does_not_start_is_explained_with_its_log() -> None:
    broken = "import sys, tests.pgcluster as p; p.MAX_CONNECTIONS = 0; sys.exit(p.run(['true']))"
    # A temporary folder of its own, to see that nothing is left in it; open to all, as
    # /tmp is, for the `postgres` user the server runs as under root (tmp_path is 0700).
    temp = Path(tempfile.mkdtemp(prefix="pgcluster-test-"))
    try:
        temp.chmod(0o755)
        done = subprocess.run(
            [sys.executable, "-c", broken],
            cwd=ROOT,
            env={**os.environ, "TMPDIR": str(temp)},
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )

        assert done.returncode == 2, done.stdout + done.stderr
        assert "the PostgreSQL server did not start" in done.stderr
        assert "max_connections" in done.stderr  # the FATAL line of the server's log
        assert list(temp.iterdir()) == []
    finally:
        shutil.rmtree(temp)


def test_without_a_command_it_says_how_to_use_it() -> None:
    done = run_cluster(timeout=30)

    assert done.returncode == 2
    assert "usage: python -m tests.pgcluster COMMAND" in done.stderr


def test_without_a_server_it_says_what_to_install(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(pgcluster, "find_server", lambda: None)

    assert pgcluster.run(["true"]) == 2
    assert capsys.readouterr().err.strip() == pgcluster.NOT_INSTALLED


def make_server(folder: Path) -> Path:
    folder.mkdir(parents=True)
    for name in pgcluster.SERVER_PROGRAMS:
        (folder / name).write_text("#!/bin/sh\n")
        (folder / name).chmod(stat.S_IRWXU)
    return folder


def test_the_newest_debian_server_is_found_when_path_has_none(tmp_path: Path) -> None:
    debian = tmp_path / "usr-lib-postgresql"
    for version in ("9.6", "15", "16"):
        make_server(debian / version / "bin")
    (debian / "17" / "bin").mkdir(parents=True)  # only the client: no server there
    empty = tmp_path / "empty"
    empty.mkdir()

    assert pgcluster.find_server(str(empty), debian) == debian / "16" / "bin"
    assert pgcluster.find_server(str(empty), tmp_path / "nothing") is None


def test_the_server_on_path_comes_first_through_its_symlinks(tmp_path: Path) -> None:
    debian = tmp_path / "usr-lib-postgresql"
    make_server(debian / "16" / "bin")
    real = make_server(tmp_path / "opt" / "pg" / "bin")
    on_path = tmp_path / "local-bin"
    on_path.mkdir()
    (on_path / "initdb").symlink_to(real / "initdb")  # pg_ctl and postgres are beside it

    assert pgcluster.find_server(str(on_path), debian) == real


# ---- the tests' databases (conftest) -------------------------------------------------------


def test_the_backend_follows_fediblog_test_postgres(backend: str) -> None:
    assert backend == BACKEND == ("postgresql" if TEST_POSTGRES else "sqlite")
    if BACKEND == "sqlite":
        assert POSTGRES is None


@pytest.mark.skipif(BACKEND != "sqlite", reason="the SQLite layout of a test's folder")
def test_on_sqlite_a_test_database_is_a_file_in_its_folder(tmp_path: Path) -> None:
    settings = make_settings(tmp_path)

    assert settings.database == database_for(tmp_path) == tmp_path / "data" / "test.db"


async def tables_of(url: str) -> list[str]:
    """The tables of the database at ``url`` that hold rows, besides fediblog's
    bookkeeping (its schema version, and the meta rows a new blog starts with); then
    one row written into it, so a second look finds that database used."""
    import asyncpg

    connection = await asyncpg.connect(url)
    try:
        tables = await connection.fetch(
            "SELECT c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace"
            " WHERE n.nspname = 'public' AND c.relkind = 'r'"
            " AND c.relname NOT IN ('fediblog_schema', 'meta')"
        )
        used = [
            row["relname"]
            for row in tables
            if await connection.fetchval(f"SELECT count(*) FROM {row['relname']}")  # noqa: S608
        ]
        await connection.execute("INSERT INTO blocks (target, kind, created_at)"
                                 " VALUES ('x.example', 'domain', 'now')")  # fmt: skip
        return used
    finally:
        await connection.close()


@ON_POSTGRES
@pytest.mark.anyio
async def test_each_test_folder_gets_a_fresh_empty_database(tmp_path: Path) -> None:
    first = make_settings(tmp_path / "one")
    second = make_settings(tmp_path / "two")
    urls: list[Any] = [first.store_location, second.store_location]

    assert all(isinstance(url, str) and url.startswith("postgresql://") for url in urls)
    assert urls[0] != urls[1]
    assert await tables_of(urls[0]) == []  # fediblog's schema, no rows (one row now)
    assert await tables_of(urls[1]) == []  # not the same database as the first
    assert make_settings(tmp_path / "one").store_location == urls[0]  # as one SQLite file


@ON_POSTGRES
def test_blog_dir_names_its_database_for_the_cli(blog_dir: Path) -> None:
    url = os.environ["FEDIBLOG_DATABASE"]

    assert url == database_for(blog_dir)
    assert asyncio.run(tables_of(url)) == []


async def use(url: str, *statements: str) -> tuple[int, list[str], Any]:
    """Use the database at ``url`` as a test might: a block (its id is returned), its
    meta rows' keys (returned, sorted), then ``statements``; the connection (returned)
    is left open in a transaction holding locks, as a store a test forgot would be."""
    import asyncpg

    connection = await asyncpg.connect(url)
    block_id = await connection.fetchval(
        "INSERT INTO blocks (target, kind, created_at) VALUES ('y.example', 'domain', 'now')"
        " RETURNING id"
    )
    keys = sorted(await connection.fetchval("SELECT array_agg(key) FROM meta"))
    for statement in statements:
        await connection.execute(statement)
    await connection.execute("BEGIN; DELETE FROM blocks")  # a lock held, never committed
    return block_id, keys, connection


async def meta_bytes(url: str) -> int:
    """The size of the meta table's file in the database at ``url``."""
    import asyncpg

    connection = await asyncpg.connect(url)
    try:
        return int(await connection.fetchval("SELECT pg_relation_size('meta')"))
    finally:
        await connection.close()


# 1.8 MB of rows in one table: past the size a database is emptied with TRUNCATE at.
FILL_META = (
    "INSERT INTO meta (key, value)"
    " SELECT 'filler' || n, repeat('x', 100) FROM generate_series(1, 15000) AS n"
)


@ON_POSTGRES
@pytest.mark.anyio
@pytest.mark.parametrize("fill", [(), (FILL_META,)], ids=["small", "past-1-MB"])
async def test_a_test_s_databases_are_emptied_for_the_next_tests(
    tmp_path: Path, fill: tuple[str, ...]
) -> None:
    """After a test, its databases are as the template left them (no rows of its, its
    meta rows back, ids from 1 again) and go to the next tests, even with a connection
    the test left open holding a lock; the databases of earlier tests are untouched.
    A table the test filled is truncated, not deleted from: its file is small again."""
    databases = PostgresDatabases(TEST_POSTGRES)
    forgotten = []
    try:
        kept = databases.for_folder(tmp_path / "kept")
        used = databases.for_folder(tmp_path / "used")
        first_id, seeded, connection = await use(used, "DELETE FROM meta", *fill,
            "INSERT INTO posts (uid, slug, title, body_md, body_html, published_at, updated_at)"
            " VALUES ('u', 's', 't', 'b', 'b', 'now', 'now')")  # fmt: skip
        forgotten.append(connection)
        filled = await meta_bytes(used)
        databases.take_back_since(1)
        assert (filled > 1_048_576) == bool(fill)
        assert await meta_bytes(used) < 1_048_576  # TRUNCATE when filled: DELETE keeps it

        again = databases.for_folder(tmp_path / "next")
        assert again == used  # reused, not made again
        assert await tables_of(again) == []  # no row of the last test's
        second_id, reseeded, connection = await use(again)
        forgotten.append(connection)
        assert (first_id, second_id) == (1, 2)  # ids from 1 again (tables_of's row took 1)
        assert reseeded == seeded == ["created_at", "proxy_secret"]  # the meta rows back
        assert await existing(kept) == [kept.rsplit("/", 1)[1]]
    finally:
        for connection in forgotten:
            connection.terminate()
        databases.close()
    assert await existing(kept, used) == []  # all dropped at the end


@ON_POSTGRES
@pytest.mark.parametrize(
    "change",
    [
        "ALTER TABLE comments ADD COLUMN extra integer",
        "ALTER TABLE comments ALTER COLUMN summary SET DEFAULT 'x'",
        "ALTER TABLE blocks ADD CONSTRAINT short CHECK (length(target) < 100)",
        "CREATE INDEX comments_extra ON comments (content_html)",
        "CREATE TRIGGER refuse BEFORE INSERT ON comments FOR EACH ROW"
        " EXECUTE FUNCTION suppress_redundant_updates_trigger()",  # a built-in function
        "CREATE FUNCTION refuse() RETURNS integer LANGUAGE sql AS 'SELECT 1'",
        "ALTER DATABASE {database} SET statement_timeout = 100000",
    ],
)
def test_a_database_whose_schema_a_test_changed_is_dropped_not_reused(
    tmp_path: Path, change: str
) -> None:
    databases = PostgresDatabases(TEST_POSTGRES)
    try:
        changed = databases.for_folder(tmp_path / "changed")
        import asyncpg

        async def apply() -> None:
            connection = await asyncpg.connect(changed)
            await connection.execute(change.format(database=changed.rsplit("/", 1)[1]))
            await connection.close()

        asyncio.run(apply())
        databases.take_back_since(0)

        assert asyncio.run(existing(changed)) == []
        assert databases.for_folder(tmp_path / "next") != changed
    finally:
        databases.close()


async def existing(*urls: str) -> list[str]:
    import asyncpg

    names = [url.rsplit("/", 1)[1] for url in urls]
    connection = await asyncpg.connect(TEST_POSTGRES)
    try:
        rows = await connection.fetch(
            "SELECT datname FROM pg_database WHERE datname = ANY($1::text[]) ORDER BY 1", names
        )
        return [row["datname"] for row in rows]
    finally:
        await connection.close()


@pytest.mark.sqlite_only("checks the marker itself")
def test_sqlite_only_runs_on_sqlite_only() -> None:
    assert BACKEND == "sqlite"  # on PostgreSQL, the marker skipped this test
