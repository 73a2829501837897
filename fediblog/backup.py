"""`fediblog backup DIR` and `fediblog restore DIR`: the database and the keys, together.

A backup folder (mode 0700, every file 0600) holds::

    fediblog.db      a consistent copy of the database, taken while the server runs
    keys/blog.pem    the key pairs: followers' servers cache the public keys, so a blog
    keys/instance.pem  restored without its old keys loses them
    manifest.json    written last: fediblog version, schema version, time, sha256s

The copy is ``VACUUM INTO``: one read transaction, so writers never wait for it and
never restart it. (The sqlite3 shell's ``.backup`` copies a few pages per step and
starts again whenever another connection writes: under a reply flood it never ends.)

``restore`` checks every checksum before it writes anything, refuses to replace an
existing database or key without ``force``, and replaces the database by renaming a
complete copy over it, after removing the old database's -wal and -shm files: SQLite
would otherwise replay the old log into the restored file.
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from fediblog import __version__
from fediblog.config import Settings
from fediblog.errors import StorageError
from fediblog.keys import KEY_NAMES, load_key

MANIFEST = "manifest.json"
DATABASE = "fediblog.db"
FORMAT = 1
LOCK_WAIT = 5.0  # seconds; a read transaction waits only while a crashed writer's log is recovered
_CHUNK = 1 << 20


@dataclass(frozen=True, slots=True)
class Summary:
    """What a backup holds, as its manifest says."""

    folder: Path
    schema_version: int
    database_bytes: int
    created_at: str
    seconds: float


def _key_files() -> list[str]:
    return [f"keys/{name}.pem" for name in KEY_NAMES]


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_private(path: Path, data: bytes) -> None:
    """A new file with mode 0600 from the start, on disk when this returns."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())


def _empty(folder: Path) -> None:
    for path in sorted(folder.rglob("*"), reverse=True):  # files before their folders
        if path.is_dir() and not path.is_symlink():
            path.rmdir()
        else:
            path.unlink(missing_ok=True)


def _private_folder(path: Path) -> None:
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    path.chmod(0o700)


# ---- backup ------------------------------------------------------------------------


def _refuse_postgresql(settings: Settings, command: str) -> None:
    if settings.database_url:
        raise StorageError(
            f"`fediblog {command}` is for an SQLite file; this blog is on PostgreSQL"
            f" ({settings.database_location_shown}): back its database up with"
            " PostgreSQL's own tools (pg_dump, pg_restore), and the keys folder with it"
        )


def backup(settings: Settings, folder: Path) -> Summary:
    """Copy the live database and the keys into ``folder`` (new or empty)."""
    started = time.monotonic()
    _refuse_postgresql(settings, "backup")
    database = settings.database
    if not database.is_file():
        raise StorageError(f"no database at {database}: nothing to back up")
    for name in KEY_NAMES:
        load_key(settings.keys_dir, name)  # a damaged key is worth knowing about now
    try:
        if folder.exists() and (not folder.is_dir() or any(folder.iterdir())):
            raise StorageError(f"{folder} exists and is not empty: choose a new folder")
        _private_folder(folder)
        _private_folder(folder / "keys")
    except OSError as error:
        raise StorageError(f"cannot write the backup in {folder}: {error.strerror}") from None

    try:
        return _fill(settings, folder, started)
    except BaseException:
        _empty(folder)  # half a backup would be refused as a target and useless as a source
        raise


def _fill(settings: Settings, folder: Path, started: float) -> Summary:
    database = settings.database
    copy = folder / DATABASE
    # Empty and 0600 before VACUUM INTO fills it (it takes an empty file as new): the
    # copy holds commenters' emails, and is never readable by others, not for a moment.
    try:
        _write_private(copy, b"")
    except OSError as error:
        raise StorageError(f"cannot write the backup in {folder}: {error.strerror}") from None
    schema = _copy_database(database, copy)
    files: dict[str, dict[str, Any]] = {}
    try:
        _fsync(copy)
        for relative in _key_files():
            source = settings.keys_dir / relative.removeprefix("keys/")
            _write_private(folder / relative, source.read_bytes())
        for relative in (DATABASE, *_key_files()):
            path = folder / relative
            files[relative] = {"sha256": _sha256(path), "bytes": path.stat().st_size}
        created = datetime.now(UTC).replace(microsecond=0).isoformat()
        manifest = {
            "format": FORMAT,
            "fediblog_version": __version__,
            "schema_version": schema,
            "created_at": created,
            "database": str(database),
            "files": files,
        }
        # Written last, and renamed into place: a folder without it is no backup.
        partial = folder / (MANIFEST + ".tmp")
        _write_private(partial, (json.dumps(manifest, indent=2) + "\n").encode())
        partial.rename(folder / MANIFEST)
        _fsync(folder)
    except OSError as error:
        raise StorageError(f"cannot write the backup in {folder}: {error.strerror}") from None
    return Summary(folder, schema, files[DATABASE]["bytes"], created, time.monotonic() - started)


def _copy_database(database: Path, copy: Path) -> int:
    """``VACUUM INTO`` copy, checked; returns its schema version."""
    # Read-only: a backup never changes the blog, and never creates a database.
    uri = database.resolve().as_uri() + "?mode=ro"
    try:
        source = sqlite3.connect(uri, uri=True, timeout=LOCK_WAIT, isolation_level=None)
        try:
            # An absolute path: never read as a "file:" URI.
            source.execute("VACUUM INTO ?", (str(copy.resolve()),))
        finally:
            source.close()
    except sqlite3.Error as error:
        raise StorageError(f"cannot copy the database {database}: {error}") from None
    return _check_copy(copy)


def _check_copy(path: Path) -> int:
    """Its schema version, after SQLite's own consistency check."""
    # immutable: read the file as it is, creating no -wal or -shm beside it.
    uri = path.resolve().as_uri() + "?mode=ro&immutable=1"
    try:
        connection = sqlite3.connect(uri, uri=True, isolation_level=None)
        try:
            verdict = connection.execute("PRAGMA quick_check").fetchone()
            version = connection.execute("PRAGMA user_version").fetchone()
        finally:
            connection.close()
    except sqlite3.Error as error:
        raise StorageError(f"{path} is not a usable database: {error}") from None
    if not verdict or verdict[0] != "ok":
        raise StorageError(f"{path} failed SQLite's check: {verdict[0] if verdict else '?'}")
    return int(version[0]) if version else 0


# ---- restore -----------------------------------------------------------------------


def read_manifest(folder: Path) -> dict[str, Any]:
    """The manifest, after checking that every file it lists is there, unchanged."""
    if not folder.is_dir():
        raise StorageError(f"no backup folder {folder}")
    path = folder / MANIFEST
    try:
        found = json.loads(path.read_text())
    except FileNotFoundError:
        raise StorageError(
            f"{folder} is not a complete backup: {MANIFEST} is missing"
            " (it is written last; the backup may have been interrupted)"
        ) from None
    except (OSError, UnicodeDecodeError, ValueError) as error:
        raise StorageError(f"cannot read {path}: {error}") from None
    if not isinstance(found, dict):
        raise StorageError(f"{path} is damaged or not a fediblog backup manifest")
    manifest: dict[str, Any] = found
    expected = {DATABASE, *_key_files()}
    files = manifest.get("files")
    if (
        not isinstance(files, dict)
        or set(files) != expected
        or manifest.get("format") != FORMAT
        or not all(isinstance(entry, dict) and "sha256" in entry for entry in files.values())
    ):
        raise StorageError(f"{path} is damaged or not a fediblog backup manifest")
    for relative in sorted(expected):
        file = folder / relative
        try:
            digest = _sha256(file)
        except FileNotFoundError:
            raise StorageError(f"the backup is incomplete: {file} is missing") from None
        except OSError as error:
            raise StorageError(f"cannot read {file}: {error.strerror}") from None
        if digest != files[relative]["sha256"]:
            raise StorageError(f"{file} does not match its checksum: the backup is damaged")
    return manifest


def restore(settings: Settings, folder: Path, *, force: bool = False) -> dict[str, Any]:
    """Put a backup's database and keys in place; return its manifest."""
    _refuse_postgresql(settings, "restore")
    manifest = read_manifest(folder)
    _check_copy(folder / DATABASE)
    database = settings.database
    keys = [settings.keys_dir / f"{name}.pem" for name in KEY_NAMES]
    if not force:
        for existing in (database, *keys):
            if existing.exists():
                raise StorageError(
                    f"{existing} exists: restore replaces nothing unless told to"
                    " (stop the server, then add --force)"
                )
    try:
        _replace_database(folder / DATABASE, database, manifest["files"][DATABASE]["sha256"])
        _private_folder(settings.keys_dir)
        for name, target in zip(KEY_NAMES, keys, strict=True):
            data = (folder / "keys" / f"{name}.pem").read_bytes()
            _replace_file(target, data)
    except OSError as error:
        raise StorageError(
            f"cannot restore into {database.parent} and {settings.keys_dir}:"
            f" {error.strerror or error}"
        ) from None
    return manifest


def _replace_database(backup_copy: Path, database: Path, sha256: str) -> None:
    database.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    partial = database.with_name(f".{database.name}.restoring")
    partial.unlink(missing_ok=True)
    digest = hashlib.sha256()
    fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as out, backup_copy.open("rb") as source:
        while chunk := source.read(_CHUNK):
            digest.update(chunk)
            out.write(chunk)
        out.flush()
        os.fsync(out.fileno())
    if digest.hexdigest() != sha256:
        partial.unlink()
        raise StorageError(f"{backup_copy} changed while it was copied: try again")
    # The old database's log must go first: SQLite replays a -wal it finds beside a
    # database into it, and these pages belong to another file.
    for suffix in ("-wal", "-shm", "-journal"):
        database.with_name(database.name + suffix).unlink(missing_ok=True)
    partial.replace(database)
    _fsync(database.parent)


def _replace_file(target: Path, data: bytes) -> None:
    partial = target.with_name(f".{target.name}.restoring")
    partial.unlink(missing_ok=True)
    _write_private(partial, data)
    partial.replace(target)
    _fsync(target.parent)
