"""What `serve` checks before it listens, and how a database failure is told to a person.

Each problem found here would otherwise show up later and worse: a traceback from the
app's start-up, a server that logs "startup complete" and then answers 503 to every
write, private keys other users can read, or an empty blog created where the real one
was expected. Each check raises one line that names the file and what to do:
``ConfigError`` for what `fediblog init`, a chmod or a setting fixes, ``StorageError``
for a database that cannot be written.

Permissions are judged by stat bits and by really opening files, never by
``os.access``: run as root, access() says yes to everything.
"""

from __future__ import annotations

import asyncio
import os
import shlex
import sqlite3
import stat
from pathlib import Path

from fediblog.config import Settings
from fediblog.errors import ConfigError, StorageError
from fediblog.keys import KEY_NAMES, load_key
from fediblog.netguard import trusted_context
from fediblog.store import Store

LOCK_WAIT = 5.0  # seconds to wait for another process's write transaction at start


def check_before_serving(settings: Settings) -> None:
    """Raise ConfigError or StorageError, with one line, if the blog cannot be served."""
    check_keys(settings.keys_dir)
    if settings.database_url:
        asyncio.run(_open_and_close(settings.database_url))  # reachable, schema current
    else:
        check_database(settings.database)
    trusted_context()  # SSL_CERT_FILE / SSL_CERT_DIR naming nothing: one line, not a traceback


def check_keys(keys_dir: Path) -> None:
    """The key folder is private and each key is a readable, private RSA key."""
    found = _stat(keys_dir, missing=f"no keys in {keys_dir}: run `fediblog init` first")
    if not stat.S_ISDIR(found.st_mode):
        raise ConfigError(f"{keys_dir} is not a folder: check FEDIBLOG_KEYS_DIR")
    _refuse_shared(keys_dir, found.st_mode, 0o700)
    for name in KEY_NAMES:
        path = keys_dir / f"{name}.pem"
        found = _stat(path, missing=f"no key at {path}: run `fediblog init` first")
        if not stat.S_ISREG(found.st_mode):
            raise ConfigError(f"{path} is not a file")
        _refuse_shared(path, found.st_mode, 0o600)
        load_key(keys_dir, name)  # a real read: empty, truncated or unreadable is found here


def check_database(database: Path) -> None:
    """The data folder and the database exist, and the database takes a write."""
    folder = database.parent
    found = _stat(
        folder,
        missing=f"no data folder {folder}: run `fediblog init` first (or fix FEDIBLOG_DATABASE)",
    )
    if not stat.S_ISDIR(found.st_mode):
        raise ConfigError(f"{folder} is not a folder: check FEDIBLOG_DATABASE")
    # `serve` never creates the database: a missing file is a wrong path or a lost
    # file, and an empty blog in its place would answer as if every post were gone.
    found = _stat(
        database,
        missing=f"no database at {database}: run `fediblog init` first"
        " (or `fediblog restore` a backup)",
    )
    if not stat.S_ISREG(found.st_mode):
        raise ConfigError(f"{database} is not a file: check FEDIBLOG_DATABASE")
    if found.st_size == 0:
        raise StorageError(
            f"the database {database} is empty: `fediblog restore` a backup"
            " (or remove it and run `fediblog init` for a new blog)"
        )
    _check_writable(database)
    # What the app does first, done here so a newer schema or a failing migration is
    # one line now rather than a traceback from the server's start-up.
    asyncio.run(_open_and_close(database))


def database_problem(database: Path, error: sqlite3.Error) -> str:
    """One line for an SQLite failure on ``database``: what failed and what to do."""
    name = getattr(error, "sqlite_errorname", "")
    verb = "write" if name.startswith(("SQLITE_READONLY", "SQLITE_FULL", "SQLITE_IOERR")) else "use"
    return f"cannot {verb} the database {database}: {error} ({database_hint(error)})"


def database_hint(error: sqlite3.Error) -> str:
    """What a person can do about an SQLite failure."""
    name = getattr(error, "sqlite_errorname", "")
    if name.startswith(("SQLITE_BUSY", "SQLITE_LOCKED")):
        return "another process is writing to it: try again when it is done"
    if name.startswith(("SQLITE_CORRUPT", "SQLITE_NOTADB")):
        return "it is damaged: `fediblog restore` a backup"
    if name.startswith(("SQLITE_READONLY", "SQLITE_CANTOPEN", "SQLITE_PERM", "SQLITE_AUTH")):
        return "check that the user running fediblog owns the file and its folder"
    return "check its permissions and free disk space"


def _stat(path: Path, *, missing: str) -> os.stat_result:
    try:
        return os.stat(path)
    except FileNotFoundError:
        raise ConfigError(missing) from None
    except OSError as error:
        raise ConfigError(
            f"cannot reach {path}: {error.strerror or error} (it and the folders above it"
            " must be open to the user that runs fediblog)"
        ) from None


def _refuse_shared(path: Path, mode: int, wanted: int) -> None:
    """Private keys, and the folder that holds them, are for their owner alone."""
    bits = stat.S_IMODE(mode)
    if bits & 0o077:
        raise ConfigError(
            f"other users can reach {path} (mode {bits:04o}): run"
            f" `chmod {wanted:o} {shlex.quote(str(path))}`"
        )


def _check_writable(database: Path) -> None:
    """Write a page and roll it back: what every POST will need.

    A read-only file, a read-only folder (WAL needs to create files beside the
    database) and a database locked for longer than LOCK_WAIT all fail here.
    """
    uri = database.resolve().as_uri() + "?mode=rw"  # rw: never create it
    try:
        connection = sqlite3.connect(uri, uri=True, timeout=LOCK_WAIT, isolation_level=None)
    except sqlite3.Error as error:
        raise StorageError(database_problem(database, error)) from None
    try:
        (version,) = connection.execute("PRAGMA user_version").fetchone()
        connection.execute("BEGIN IMMEDIATE")
        try:
            # A read-only file still grants the write lock; the first page written
            # fails. This one is rolled back, and would not change anything anyway.
            connection.execute(f"PRAGMA user_version = {int(version)}")
        finally:
            connection.execute("ROLLBACK")
    except sqlite3.Error as error:
        raise StorageError(database_problem(database, error)) from None
    finally:
        connection.close()


async def _open_and_close(database: Path | str) -> None:
    store = await Store.open(database)
    await store.close()
