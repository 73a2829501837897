"""Faults an operator meets, through the real command: each is one line and an exit code.

Read-only, full or locked databases under `post new`; keys and databases `serve` must
refuse before it listens; impossible `published` dates; `backup` and `restore`. Commands
run as a user runs them, in a subprocess (or in-process through ``tests.helpers.run``).

The suite may run as root, which ignores file modes. Tests that need a permission to be
denied run the command without the two capabilities that let root ignore them
(CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH), so the file's mode bits decide, as they do for
the ``fediblog`` user of the systemd unit. A full disk is the kernel's file size limit
(RLIMIT_FSIZE) on the command: a real EFBIG from write(), as an almost-full disk gives.
"""

from __future__ import annotations

import asyncio
import ctypes
import hashlib
import json
import os
import resource
import shutil
import sqlite3
import stat
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
import pytest

from fediblog.config import Settings, load_settings
from fediblog.errors import ConfigError
from fediblog.store import Store
from tests.helpers import comment_tree, publish, remote_actor, remote_comment, run, running, soup
from tests.processes import free_port, run_cli

BASE_URL = "https://blog.example"
PR_CAPBSET_DROP = 24
CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH = 1, 2


def blog_env(folder: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FEDIBLOG_")}
    env.update(FEDIBLOG_CONFIG=str(folder / "absent.toml"), FEDIBLOG_BASE_URL=BASE_URL)
    return env


def cli(
    folder: Path,
    *args: str,
    preexec_fn: Callable[[], None] | None = None,
    timeout: float = 30,
    **env: str,
) -> tuple[int, str, str]:
    """`python -m fediblog ARGS` in ``folder``: (exit code, stdout, stderr)."""
    result = run_cli(
        folder, {**blog_env(folder), **env}, *args, timeout=timeout, preexec_fn=preexec_fn
    )
    return result.returncode, result.stdout, result.stderr


def one_line_error(err: str) -> str:
    """The single stderr line of a failed command (and that it is single, no traceback)."""
    assert "Traceback" not in err
    assert err.count("\n") == 1, err
    return err.strip()


# ---- a blog made once per session, copied per test ---------------------------------------


@pytest.fixture(scope="session")
def initialised(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("initialised")
    code, _, err = cli(folder, "init")
    assert code == 0, err
    return folder


@pytest.fixture
def blog(initialised: Path, tmp_path: Path) -> Path:
    """A folder where `fediblog init` ran: data/fediblog.db, keys/ (modes kept)."""
    folder = tmp_path / "blog"
    shutil.copytree(initialised, folder)
    return folder


def _drop_root_override() -> None:  # runs in the child, between fork and exec
    libc = ctypes.CDLL(None, use_errno=True)
    for capability in (CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH):
        if libc.prctl(PR_CAPBSET_DROP, capability, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP)")


@pytest.fixture
def modes_apply(tmp_path: Path) -> Callable[[], None] | None:
    """A preexec_fn under which file modes bind the command (None: they already do).
    Skips the test where that cannot be arranged."""
    preexec = _drop_root_override if os.geteuid() == 0 else None
    probe = tmp_path / "probe"
    probe.write_text("secret")
    probe.chmod(0)
    try:
        result = subprocess.run(
            ["cat", str(probe)], preexec_fn=preexec, capture_output=True, timeout=10, check=False
        )
    except subprocess.SubprocessError:
        pytest.skip("cannot drop root's CAP_DAC_OVERRIDE here")
    if result.returncode == 0:
        pytest.skip("file modes do not bind this user")
    return preexec


POST = "---\ntitle: A post\n---\nHello.\n"


# ---- `post new` on a database that cannot take the write ---------------------------------


@pytest.mark.parametrize("what", ["database file", "data folder"])
def test_post_new_on_a_read_only_database_is_one_line(
    blog: Path, modes_apply: Callable[[], None] | None, what: str
) -> None:
    (blog / "post.md").write_text(POST)
    target = blog / "data" / ("fediblog.db" if what == "database file" else "")
    target.chmod(0o444 if what == "database file" else 0o555)
    try:
        code, out, err = cli(blog, "post", "new", "post.md", preexec_fn=modes_apply)
    finally:
        target.chmod(0o644 if what == "database file" else 0o755)

    assert code == 1, err
    line = one_line_error(err)
    assert line.startswith("fediblog: error:")
    assert "data/fediblog.db" in line
    assert "owns the file and its folder" in line or "permissions" in line
    assert out == ""
    assert cli(blog, "post", "list")[1].strip() == "no posts yet"


def test_post_new_on_a_full_disk_is_one_line(blog: Path) -> None:
    # A post bigger than the room left: the file size limit stops SQLite's log mid-write.
    paragraph = "lorem ipsum dolor sit amet " * 40 + "\n\n"
    (blog / "big.md").write_text("---\ntitle: Big\n---\n" + paragraph * 900)
    room = (blog / "data" / "fediblog.db").stat().st_size + 64 * 1024

    def small_disk() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (room, room))

    code, _, err = cli(blog, "post", "new", "big.md", preexec_fn=small_disk)

    assert code == 1, err
    line = one_line_error(err)
    assert line.startswith("fediblog: error:")
    assert "data/fediblog.db" in line
    assert "free disk space" in line
    assert cli(blog, "post", "list")[1].strip() == "no posts yet"
    assert cli(blog, "post", "new", "big.md")[0] == 0  # with room, the same file goes in


# ---- `published` dates datetime cannot hold ----------------------------------------------


@pytest.mark.parametrize(
    "published",
    [
        "0001-01-01T00:00:00+01:00",  # before year 1 in UTC: OverflowError before the fix
        "9999-12-31T23:00:00-05:00",  # after 9999 in UTC: OverflowError before the fix
        "0001-01-01",  # stored as '1-01-01…', which then cannot be read back
        "1899-12-31",
    ],
)
def test_published_out_of_range_is_a_post_error(
    blog_dir: Path, capsys: pytest.CaptureFixture[str], published: str
) -> None:
    run(capsys, "init")
    path = blog_dir / "dated.md"
    path.write_text(f"---\ntitle: Dated\npublished: {published}\n---\nx\n")

    code, _, err = run(capsys, "post", "new", str(path))

    assert code == 1
    line = one_line_error(err)
    assert str(path) in line
    assert "published must be between the years 1900 and 9999" in line
    assert run(capsys, "post", "list")[1].strip() == "no posts yet"


def test_published_at_the_edges_of_the_range_is_accepted(
    blog_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run(capsys, "init")
    for slug, published in (("first", "1900-01-01"), ("last", "9999-12-31T23:59:59Z")):
        path = blog_dir / f"{slug}.md"
        path.write_text(f"---\ntitle: {slug}\npublished: {published}\n---\nx\n")
        assert run(capsys, "post", "new", str(path))[0] == 0
    listing = run(capsys, "post", "list")[1]
    assert "9999-12-31" in listing
    assert "1900-01-01" in listing


# ---- what `serve` refuses before it listens ----------------------------------------------


def serve(blog: Path, preexec_fn: Callable[[], None] | None = None) -> tuple[int, str]:
    """`fediblog serve` that must refuse to start: (exit code, its one stderr line).
    A server that starts instead runs into the timeout, which fails the test."""
    code, _, err = cli(blog, "serve", "--port", str(free_port()), preexec_fn=preexec_fn, timeout=20)
    return code, one_line_error(err)


@pytest.mark.parametrize(
    ("path", "mode", "command"),
    [
        ("keys/blog.pem", 0o644, "`chmod 600 keys/blog.pem`"),
        ("keys/instance.pem", 0o640, "`chmod 600 keys/instance.pem`"),
        ("keys", 0o755, "`chmod 700 keys`"),
    ],
)
def test_serve_refuses_keys_other_users_can_read(
    blog: Path, path: str, mode: int, command: str
) -> None:
    (blog / path).chmod(mode)

    code, line = serve(blog)

    assert code == 2
    assert line.startswith("fediblog: configuration error:")
    assert f"mode {mode:04o}" in line
    assert command in line
    (blog / path).chmod(0o700 if path == "keys" else 0o600)
    assert stat.S_IMODE((blog / "keys").stat().st_mode) == 0o700


def test_init_makes_the_keys_folder_private_even_a_checkouts(
    blog_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # A git checkout has keys/ (for its README) with the umask's 0755: `demo` and
    # `init` there must leave a folder that `serve` accepts.
    (blog_dir / "keys").mkdir(mode=0o755)
    (blog_dir / "keys").chmod(0o755)
    (blog_dir / "keys" / "README.md").write_text("checked in\n")

    assert run(capsys, "init")[0] == 0

    assert mode(blog_dir / "keys") == 0o700
    assert mode(blog_dir / "keys" / "blog.pem") == 0o600
    assert mode(blog_dir / "keys" / "instance.pem") == 0o600
    assert (blog_dir / "keys" / "README.md").read_text() == "checked in\n"


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda key: key.write_bytes(b""), "keys/blog.pem is empty"),
        (
            lambda key: key.write_bytes(key.read_bytes()[:700]),
            "keys/blog.pem is not an unencrypted PEM private key",
        ),
    ],
    ids=["empty", "truncated"],
)
def test_serve_refuses_an_empty_or_truncated_key(
    blog: Path, damage: Callable[[Path], Any], message: str
) -> None:
    damage(blog / "keys" / "blog.pem")

    code, line = serve(blog)

    assert code == 2
    assert message in line
    assert "restore it from your backup" in line


@pytest.mark.parametrize("unreadable", ["keys/blog.pem", "keys"])
def test_serve_refuses_keys_it_cannot_read(
    blog: Path, modes_apply: Callable[[], None] | None, unreadable: str
) -> None:
    (blog / unreadable).chmod(0)
    try:
        code, line = serve(blog, modes_apply)
    finally:
        (blog / unreadable).chmod(0o700 if unreadable == "keys" else 0o600)

    assert code == 2
    assert "keys/blog.pem" in line
    assert "ermission denied" in line


@pytest.mark.parametrize("what", ["database file", "data folder"])
def test_serve_refuses_a_read_only_database(
    blog: Path, modes_apply: Callable[[], None] | None, what: str
) -> None:
    target = blog / "data" / ("fediblog.db" if what == "database file" else "")
    target.chmod(0o444 if what == "database file" else 0o555)
    try:
        code, line = serve(blog, modes_apply)
    finally:
        target.chmod(0o644 if what == "database file" else 0o755)

    assert code == 1
    assert line.startswith("fediblog: error: cannot ")
    assert "the database data/fediblog.db" in line


@pytest.mark.parametrize("missing", ["data", "data/fediblog.db"])
def test_serve_refuses_a_missing_database_instead_of_starting_an_empty_blog(
    blog: Path, missing: str
) -> None:
    if missing == "data":
        shutil.rmtree(blog / missing)
    else:
        (blog / missing).unlink()

    code, line = serve(blog)

    assert code == 2
    assert "run `fediblog init` first" in line
    assert missing in line
    assert not (blog / missing).exists()


def test_serve_waits_for_a_locked_database_then_says_who_holds_it(blog: Path) -> None:
    holder = sqlite3.connect(blog / "data" / "fediblog.db", isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")  # another process's long write transaction
    try:
        started = time.monotonic()
        code, line = serve(blog)
        waited = time.monotonic() - started
    finally:
        holder.execute("ROLLBACK")
        holder.close()

    assert code == 1
    assert "database is locked" in line
    assert "another process is writing to it" in line
    assert waited >= 4.5  # it waited (LOCK_WAIT, 5 s) before giving up


# ---- settings --------------------------------------------------------------------------------


def test_retention_days_has_its_own_range(tmp_path: Path, blog: Path) -> None:
    base = {"FEDIBLOG_CONFIG": str(tmp_path / "absent.toml"), "FEDIBLOG_BASE_URL": BASE_URL}
    assert load_settings(base).retention_days == 30
    assert load_settings({**base, "FEDIBLOG_RETENTION_DAYS": "3650"}).retention_days == 3650
    assert load_settings({**base, "FEDIBLOG_RETENTION_DAYS": "365"}).retention_days == 365
    for wrong in ("0", "3651", "a month"):
        with pytest.raises(ConfigError, match="FEDIBLOG_RETENTION_DAYS"):
            load_settings({**base, "FEDIBLOG_RETENTION_DAYS": wrong})
    assert load_settings({**base, "FEDIBLOG_BODY_TIMEOUT": "600"}).body_timeout == 600
    with pytest.raises(ConfigError, match="FEDIBLOG_HEADER_TIMEOUT must be between 1 and 300"):
        load_settings({**base, "FEDIBLOG_HEADER_TIMEOUT": "0"})

    code, _, err = cli(blog, "post", "list", FEDIBLOG_RETENTION_DAYS="5000")
    assert code == 2
    assert "FEDIBLOG_RETENTION_DAYS must be between 1 and 3650" in one_line_error(err)


# ---- backup and restore ----------------------------------------------------------------------


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.mark.sqlite_only("fediblog backup/restore copy the SQLite file")
def test_backup_is_private_and_describes_itself(
    blog_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run(capsys, "init")
    (blog_dir / "p.md").write_text(POST)
    run(capsys, "post", "new", "p.md")

    code, out, err = run(capsys, "backup", "backups/first")

    assert code == 0, err
    assert "backups/first" in out
    folder = blog_dir / "backups" / "first"
    assert mode(folder) == 0o700
    assert mode(folder / "keys") == 0o700
    files = [p for p in folder.rglob("*") if p.is_file()]
    assert sorted(p.relative_to(folder).as_posix() for p in files) == [
        "fediblog.db",
        "keys/blog.pem",
        "keys/instance.pem",
        "manifest.json",
    ]
    assert all(mode(p) == 0o600 for p in files)
    for name in ("blog.pem", "instance.pem"):
        assert (folder / "keys" / name).read_bytes() == (blog_dir / "keys" / name).read_bytes()
    manifest = json.loads((folder / "manifest.json").read_text())
    live = sqlite3.connect(blog_dir / "data" / "fediblog.db")
    assert manifest["schema_version"] == live.execute("PRAGMA user_version").fetchone()[0] > 0
    live.close()
    assert manifest["fediblog_version"]
    assert manifest["created_at"].startswith("20")
    for relative, entry in manifest["files"].items():
        assert entry["sha256"] == sha256(folder / relative)
    copy = sqlite3.connect(folder / "fediblog.db")
    assert copy.execute("SELECT title FROM posts").fetchall() == [("A post",)]
    copy.close()

    # A second backup into the same folder would mix two; it is refused.
    code, _, err = run(capsys, "backup", "backups/first")
    assert code == 1
    assert "is not empty" in one_line_error(err)


@pytest.mark.sqlite_only("fediblog backup/restore copy the SQLite file")
def test_backup_under_a_write_flood_finishes_in_seconds_and_restores(
    blog_dir: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    run(capsys, "init")
    settings = load_settings()
    body = "A paragraph long enough to make pages. " * 2_000  # ~80 kB per post

    async def seed() -> tuple[Any, int]:
        async with running(settings, run_workers=False) as app:
            services = app.state.services
            posts = [await publish(services, f"Post {n}", body) for n in range(40)]
            actor = await remote_actor(services, "ann", "ann.example")
            return posts[0], actor

    post, actor = asyncio.run(seed())
    written = [0]
    stop = threading.Event()
    failures: list[BaseException] = []

    async def flood() -> None:  # a reply storm: one commit after another, no pause
        store = await Store.open(settings.store_location)
        shim = SimpleNamespace(store=store)
        try:
            while not stop.is_set():
                n = written[0]
                await remote_comment(
                    shim, post, actor, f"reply {n}", minutes=n % 50_000, ap_id=f"https://x/{n}"
                )
                written[0] += 1
        finally:
            await store.close()

    def flood_thread() -> None:
        try:
            asyncio.run(flood())
        except BaseException as error:  # reported by the test below
            failures.append(error)

    writer = threading.Thread(target=flood_thread, daemon=True)
    writer.start()
    try:
        deadline = time.monotonic() + 10
        while written[0] < 50:  # the flood is running before the backup starts
            assert not failures, failures
            assert time.monotonic() < deadline, "the flood did not start"
            time.sleep(0.01)
        before = written[0]
        started = time.monotonic()
        code, _, err = run(capsys, "backup", "bk")
        took = time.monotonic() - started
        after = written[0]
        time.sleep(0.2)
        assert written[0] > after  # still writing: the backup blocked nobody
    finally:
        stop.set()
        writer.join(timeout=10)
    assert not failures, failures
    assert code == 0, err
    assert took < 10

    restored = blog_dir / "restored"
    monkeypatch.setenv("FEDIBLOG_DATABASE", str(restored / "data" / "fediblog.db"))
    monkeypatch.setenv("FEDIBLOG_KEYS_DIR", str(restored / "keys"))
    code, _, err = run(capsys, "restore", "bk")
    assert code == 0, err
    database = sqlite3.connect(restored / "data" / "fediblog.db")
    assert database.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    (comments,) = database.execute("SELECT count(*) FROM comments").fetchone()
    database.close()
    assert before <= comments <= after  # one moment's state, between start and end
    assert mode(restored / "data" / "fediblog.db") == 0o600
    assert mode(restored / "keys") == 0o700
    for name in ("blog.pem", "instance.pem"):
        assert mode(restored / "keys" / name) == 0o600
        assert sha256(restored / "keys" / name) == sha256(blog_dir / "keys" / name)


@pytest.mark.sqlite_only("fediblog backup/restore copy the SQLite file")
def test_restored_blog_serves_the_same_posts_and_comments(
    blog_dir: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    run(capsys, "init")

    async def write_and_read(settings: Settings) -> tuple[str, list[Any], str, str]:
        async with running(settings, run_workers=False) as app:
            services = app.state.services
            first = await publish(services, "First", "One.", tags="[a]")
            await publish(services, "Second", "Two.")
            ann = await remote_actor(services, "ann", "ann.example", "Ann")
            bob = await remote_actor(services, "bob", "bob.example", "Bob")
            top = await remote_comment(services, first, ann, "Nice post", minutes=1)
            await remote_comment(services, first, bob, "Agreed", parent=top, minutes=2)
            await remote_comment(services, first, bob, "Held", minutes=3, status="pending")
        return await read(settings, first.slug)

    async def read(settings: Settings, slug: str) -> tuple[str, list[Any], str, str]:
        async with (
            running(settings, run_workers=False) as app,
            httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url=BASE_URL) as web,
        ):
            index = await web.get("/")
            page = await web.get(f"/posts/{slug}")
            assert page.status_code == 200
            titles = [h.get_text(strip=True) for h in soup(index.text).select("h2")]
            key = app.state.services.blog_public_pem
            return slug, comment_tree(soup(page.text)), " | ".join(titles), key

    slug, tree, titles, public_key = asyncio.run(write_and_read(load_settings()))
    assert tree == [("Nice post", [("Agreed", [])])]
    assert run(capsys, "backup", "bk")[0] == 0

    restored = blog_dir / "elsewhere"
    monkeypatch.setenv("FEDIBLOG_DATABASE", str(restored / "data" / "fediblog.db"))
    monkeypatch.setenv("FEDIBLOG_KEYS_DIR", str(restored / "keys"))
    code, out, err = run(capsys, "restore", "bk")
    assert code == 0, err
    assert "restored" in out

    again = asyncio.run(read(load_settings(), slug))
    assert again == (slug, tree, titles, public_key)
    assert "First" in titles
    assert "Second" in titles


@pytest.fixture
def backed_up(blog_dir: Path, capsys: pytest.CaptureFixture[str]) -> Path:
    run(capsys, "init")
    (blog_dir / "p.md").write_text(POST)
    run(capsys, "post", "new", "p.md")
    assert run(capsys, "backup", "bk")[0] == 0
    return blog_dir / "bk"


@pytest.mark.sqlite_only("fediblog backup/restore copy the SQLite file")
def test_restore_replaces_nothing_unless_forced(
    blog_dir: Path, capsys: pytest.CaptureFixture[str], backed_up: Path
) -> None:
    (blog_dir / "q.md").write_text("---\ntitle: After the backup\n---\nx\n")
    run(capsys, "post", "new", "q.md")
    database = blog_dir / "data" / "fediblog.db"
    before = sha256(database)

    code, _, err = run(capsys, "restore", "bk")

    assert code == 1
    line = one_line_error(err)
    assert "data/fediblog.db exists" in line
    assert "--force" in line
    assert sha256(database) == before

    # The log of the database being replaced must not be replayed into the restored one:
    # leave one behind, as a crashed server would.
    stale = sqlite3.connect(database, isolation_level=None)
    stale.execute("PRAGMA wal_autocheckpoint=0")
    stale.execute("CREATE TABLE stale(x)")
    shutil.copy(database.with_name("fediblog.db-wal"), blog_dir / "stale-wal")
    stale.close()  # checkpoints and removes the log: put the copy back
    shutil.copy(blog_dir / "stale-wal", database.with_name("fediblog.db-wal"))

    code, _, err = run(capsys, "restore", "bk", "--force")

    assert code == 0, err
    assert "After the backup" not in run(capsys, "post", "list")[1]
    check = sqlite3.connect(database)
    assert check.execute("SELECT name FROM sqlite_schema WHERE name = 'stale'").fetchall() == []
    check.close()
    assert "a-post" in run(capsys, "post", "list")[1]
    assert mode(database) == 0o600


@pytest.mark.sqlite_only("fediblog backup/restore copy the SQLite file")
@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda bk: (bk / "manifest.json").unlink(), "manifest.json is missing"),
        (lambda bk: (bk / "manifest.json").write_text("{"), "cannot read"),
        (lambda bk: (bk / "keys" / "blog.pem").unlink(), "the backup is incomplete"),
        (
            lambda bk: (bk / "fediblog.db").write_bytes(
                (bk / "fediblog.db").read_bytes()[:-1] + b"!"
            ),
            "does not match its checksum",
        ),
        (lambda bk: shutil.rmtree(bk), "no backup folder"),
    ],
    ids=["no-manifest", "corrupt-manifest", "missing-key", "changed-database", "no-folder"],
)
def test_restore_refuses_a_damaged_backup_and_writes_nothing(
    blog_dir: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    backed_up: Path,
    damage: Callable[[Path], Any],
    message: str,
) -> None:
    damage(backed_up)
    fresh = blog_dir / "fresh"
    monkeypatch.setenv("FEDIBLOG_DATABASE", str(fresh / "data" / "fediblog.db"))
    monkeypatch.setenv("FEDIBLOG_KEYS_DIR", str(fresh / "keys"))

    code, _, err = run(capsys, "restore", "bk")

    assert code == 1
    assert message in one_line_error(err)
    assert not fresh.exists()
