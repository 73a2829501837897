"""The fediblog command, run as a user runs it."""

from __future__ import annotations

import asyncio
import os
import shutil
import sqlite3
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from fediblog.cli import main
from tests.conftest import BACKEND
from tests.helpers import run

BASE = "https://blog.example"
AP_ACCEPT = "application/activity+json"


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_init_creates_database_and_private_keys_once(
    blog_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = run(capsys, "init")

    assert code == 0
    assert "@blog@blog.example" in out
    if BACKEND == "sqlite":  # on PostgreSQL, the server holds the database
        assert (blog_dir / "data" / "fediblog.db").exists()
    for name in ("blog.pem", "instance.pem"):
        key = blog_dir / "keys" / name
        assert stat.S_IMODE(key.stat().st_mode) == 0o600
        assert key.read_text().startswith("-----BEGIN PRIVATE KEY-----")
    assert (blog_dir / "keys" / "README.md").exists()
    assert "*" in (blog_dir / "keys" / ".gitignore").read_text()
    before = (blog_dir / "keys" / "blog.pem").read_bytes()

    code, out, _ = run(capsys, "init")

    assert code == 0
    assert "kept as they are" in out
    assert (blog_dir / "keys" / "blog.pem").read_bytes() == before


def test_post_new_list_edit_delete(blog_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run(capsys, "init")
    first = write(blog_dir / "a.md", "---\ntitle: First post\ntags: [x]\n---\nHello.\n")

    code, out, _ = run(capsys, "post", "new", str(first))
    assert (code, out.strip()) == (0, "published https://blog.example/posts/first-post")

    code, out, _ = run(capsys, "post", "list")
    assert code == 0
    assert "first-post" in out
    assert "First post" in out

    edited = write(blog_dir / "b.md", "---\ntitle: First post, edited\n---\nHello again.\n")
    code, out, _ = run(capsys, "post", "edit", "first-post", str(edited))
    assert (code, out.strip()) == (0, "updated https://blog.example/posts/first-post")
    assert "First post, edited" in run(capsys, "post", "list")[1]

    code, out, _ = run(capsys, "post", "delete", "first-post")
    assert code == 0
    assert "410" in out
    assert run(capsys, "post", "list")[1].strip() == "no posts yet"


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("---\nsummary: no title\n---\nBody\n", "needs a title"),
        (None, "cannot read"),
    ],
)
def test_bad_post_file_fails_with_one_line_and_writes_nothing(
    blog_dir: Path, capsys: pytest.CaptureFixture[str], content: str | None, message: str
) -> None:
    run(capsys, "init")
    path = blog_dir / "post.md"
    if content is not None:
        write(path, content)

    code, _, err = run(capsys, "post", "new", str(path))

    assert code == 1
    assert message in err
    assert err.count("\n") == 1
    assert "Traceback" not in err
    assert run(capsys, "post", "list")[1].strip() == "no posts yet"


def test_duplicate_and_unknown_slugs(blog_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run(capsys, "init")
    path = write(blog_dir / "p.md", "---\ntitle: Same\n---\nx\n")
    assert run(capsys, "post", "new", str(path))[0] == 0

    code, _, err = run(capsys, "post", "new", str(path))
    assert code == 1
    assert "already used" in err

    for args in (("post", "edit", "nope", str(path)), ("post", "delete", "nope")):
        code, _, err = run(capsys, *args)
        assert code == 1
        assert "no post has the slug 'nope'" in err
    assert run(capsys, "post", "list")[1].count("Same") == 1


def test_wrong_setting_is_one_line_and_exit_2(
    blog_dir: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FEDIBLOG_BASE_URL", "http://blog.example")

    code, _, err = run(capsys, "init")

    assert code == 2
    assert err.startswith("fediblog: configuration error: FEDIBLOG_BASE_URL is http")
    assert err.count("\n") == 1
    assert not (blog_dir / "keys").exists()


def test_serve_without_keys_says_run_init(
    blog_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = run(capsys, "serve", "--port", "1")
    assert code == 2
    assert "fediblog init" in err


def test_the_installed_command_runs_without_traceback(blog_dir: Path) -> None:
    env = {**os.environ, "FEDIBLOG_BASE_URL": "not a url"}
    result = subprocess.run(
        [sys.executable, "-m", "fediblog", "post", "list"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert "FEDIBLOG_BASE_URL" in result.stderr

    help_text = subprocess.run(
        [sys.executable, "-m", "fediblog", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    for command in ("init", "serve", "demo", "post"):
        assert command in help_text


def test_output_cut_short_by_a_pipe_is_no_traceback(blog_dir: Path) -> None:
    """`fediblog post list | head -0`: the reader is gone before the command writes."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("FEDIBLOG_")}
    env["FEDIBLOG_BASE_URL"] = "https://blog.example"
    command = [sys.executable, "-m", "fediblog"]
    subprocess.run([*command, "init"], cwd=blog_dir, env=env, check=True, capture_output=True)
    process = subprocess.Popen(
        [*command, "post", "list"],
        cwd=blog_dir,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert process.stdout is not None
    process.stdout.close()  # before the command has written anything
    _, errors = process.communicate(timeout=30)
    assert "Traceback" not in errors
    assert errors == ""


# ---- finding the blog ----------------------------------------------------------------

NEEDS_A_BLOG = [
    ("post", "list"),
    ("post", "new", "hello.md"),
    ("comments", "--pending"),
    ("comments", "approve", "1"),
    ("followers",),
    ("media",),
    ("deliveries",),
    ("inbox",),
    ("feeds",),
    ("blocks",),
    ("block", "spam.example"),
    ("backup", "saved"),
    ("serve", "--port", "1"),
]


@pytest.mark.sqlite_only("no blog: no data/fediblog.db file in the folder")
@pytest.mark.parametrize("base_url", ["set", "unset"])
@pytest.mark.parametrize("args", NEEDS_A_BLOG, ids=" ".join)
def test_a_folder_without_a_blog_is_one_line_and_nothing_is_created(
    blog_dir: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    args: tuple[str, ...],
    base_url: str,
) -> None:
    if base_url == "unset":  # the first thing a newcomer types, in a new folder
        monkeypatch.delenv("FEDIBLOG_BASE_URL")
    write(blog_dir / "hello.md", "---\ntitle: Hello\n---\nHi.\n")

    code, out, err = run(capsys, *args)

    assert code == 2
    assert out == ""
    assert err.count("\n") == 1
    assert err.startswith(
        "fediblog: configuration error: no blog in the current folder"
        " (no database data/fediblog.db): run `fediblog init` first"
    )
    assert "--base-url https://YOUR.DOMAIN" in err
    assert "--data DIR" in err
    assert sorted(p.name for p in blog_dir.iterdir()) == ["hello.md"]


@pytest.mark.sqlite_only("no blog: no database file in the --data folder")
def test_a_missing_data_folder_is_named_with_the_init_that_makes_it(
    tmp_path: Path, blog_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = tmp_path / "no such blog"

    code, _, err = run(capsys, "--data", str(missing), "post", "list")

    assert code == 2
    assert f"no blog in '{missing}'" in err
    assert f"`fediblog --data '{missing}' init --base-url https://YOUR.DOMAIN`" in err
    assert not missing.exists()


def test_init_writes_fediblog_toml_so_nothing_needs_exporting(
    blog_dir: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("FEDIBLOG_BASE_URL")
    code, out, _ = run(
        capsys, "init", "--base-url", "https://blog.example", "--handle", "notes", "--title", "N"
    )

    assert code == 0
    assert out.splitlines()[0] == "created fediblog.toml"
    assert "the blog is @notes@blog.example at https://blog.example" in out
    config = blog_dir / "fediblog.toml"
    assert stat.S_IMODE(config.stat().st_mode) == 0o600
    assert 'base_url = "https://blog.example"\nhandle = "notes"\ntitle = "N"\n' in (
        config.read_text()
    )
    write(blog_dir / "a.md", "---\ntitle: First\n---\nHello.\n")
    assert run(capsys, "post", "new", "a.md")[1] == "published https://blog.example/posts/first\n"

    # Again with the same values: nothing changes; with another address: refused.
    before = config.read_bytes()
    code, out, _ = run(capsys, "init", "--base-url", "https://blog.example/")
    assert code == 0
    assert "created fediblog.toml" not in out
    code, _, err = run(capsys, "init", "--base-url", "https://other.example", "--handle", "x")
    assert code == 2
    assert "fediblog.toml already exists and says base_url = 'https://blog.example'" in err
    assert config.read_bytes() == before
    assert "first" in run(capsys, "post", "list")[1]


def test_init_refuses_options_the_environment_would_overrule(
    blog_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = run(capsys, "init", "--base-url", "https://elsewhere.example")

    assert code == 2
    assert "FEDIBLOG_BASE_URL is set to 'https://blog.example', which would win" in err
    assert list(blog_dir.iterdir()) == []


def test_init_checks_every_value_before_writing_anything(
    blog_dir: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("FEDIBLOG_BASE_URL")

    code, _, err = run(capsys, "init", "--base-url", "https://ok.example", "--handle", "a b")

    assert code == 2
    assert "FEDIBLOG_HANDLE may use only" in err
    assert list(blog_dir.iterdir()) == []


def test_init_without_an_address_says_how_to_give_one(
    blog_dir: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("FEDIBLOG_BASE_URL")

    code, _, err = run(capsys, "init")

    assert code == 2
    assert err.startswith("fediblog: configuration error: the blog's address is not set")
    assert "is http" not in err
    assert "`fediblog init --base-url https://YOUR.DOMAIN`" in err
    assert list(blog_dir.iterdir()) == []


def test_a_blog_whose_address_was_never_saved_says_so(
    blog_dir: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """`export FEDIBLOG_BASE_URL=…; fediblog init`, then a new shell without the export."""
    assert run(capsys, "init")[0] == 0
    monkeypatch.delenv("FEDIBLOG_BASE_URL")

    code, _, err = run(capsys, "post", "list")

    assert code == 2
    assert "the blog's address is not set (fediblog.toml does not exist" in err


def test_data_flag_finds_the_blog_from_any_folder(
    tmp_path: Path,
    blog_dir: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("FEDIBLOG_BASE_URL")
    home = tmp_path / "srv" / "blog"
    code, _, _ = run(capsys, "--data", str(home), "init", "--base-url", "https://d.example")
    assert code == 0
    # data/ holds the SQLite database; on PostgreSQL, the server holds it.
    made = ["data"] * (BACKEND == "sqlite") + ["fediblog.toml", "keys"]
    assert sorted(p.name for p in home.iterdir()) == made
    assert stat.S_IMODE(home.stat().st_mode) == 0o700
    if BACKEND == "sqlite":
        assert stat.S_IMODE((home / "data").stat().st_mode) == 0o700

    elsewhere = tmp_path / "writing"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    write(elsewhere / "p.md", "---\ntitle: From here\n---\nx\n")  # relative to where we are
    code, out, _ = run(capsys, "--data", str(home), "post", "new", "p.md")
    assert (code, out) == (0, "published https://d.example/posts/from-here\n")
    monkeypatch.setenv("FEDIBLOG_CONFIG", str(home / "fediblog.toml"))
    assert "from-here" in run(capsys, "post", "list")[1]
    assert list(elsewhere.iterdir()) == [elsewhere / "p.md"]


# ---- files that hold commenters' emails --------------------------------------------------


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def usual_umask() -> Iterator[None]:
    """The usual umask, under which a file made without care is 0644."""
    before = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(before)


@pytest.mark.sqlite_only("the modes of the .db, -wal and -shm files, and backup/restore")
@pytest.mark.usefixtures("usual_umask")
def test_database_and_its_log_files_and_backups_are_private(
    blog_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run(capsys, "init")[0] == 0
    data = blog_dir / "data"
    assert mode(data) == 0o700
    assert mode(data / "fediblog.db") == 0o600

    # While a connection is open, SQLite's -wal and -shm files are there too.
    holder = sqlite3.connect(data / "fediblog.db")
    try:
        holder.execute("CREATE TABLE IF NOT EXISTS probe (x)")
        holder.commit()
        for suffix in ("-wal", "-shm"):
            assert mode(data / f"fediblog.db{suffix}") == 0o600
        assert run(capsys, "backup", "saved")[0] == 0
    finally:
        holder.close()
    saved = blog_dir / "saved"
    assert mode(saved) == 0o700
    assert {p.name: mode(p) for p in saved.rglob("*") if p.is_file()} == {
        "fediblog.db": 0o600,
        "manifest.json": 0o600,
        "blog.pem": 0o600,
        "instance.pem": 0o600,
    }

    shutil.rmtree(data)  # a new machine: restore makes the data folder
    shutil.rmtree(blog_dir / "keys")
    assert run(capsys, "restore", "saved")[0] == 0
    assert (mode(data), mode(data / "fediblog.db")) == (0o700, 0o600)


@pytest.mark.usefixtures("usual_umask")
def test_any_new_database_is_private(blog_dir: Path) -> None:
    from fediblog.config import load_settings
    from fediblog.store import Store

    settings = load_settings(database=Path("demo") / "demo.db")

    async def make() -> None:
        store = await Store.open(settings.store_location)
        await store.close()

    asyncio.run(make())
    assert (mode(blog_dir / "demo"), mode(blog_dir / "demo" / "demo.db")) == (0o700, 0o600)


# ---- spellings the README uses -------------------------------------------------------------


def held_comment(settings_dir: Path) -> None:
    """A post with one published and one held comment, in the blog at ``settings_dir``."""
    from fediblog.config import load_settings
    from tests.helpers import publish, remote_actor, remote_comment, running

    async def seed() -> None:
        async with running(load_settings()) as app:
            services = app.state.services
            post = await publish(services, "Held")
            ann = await remote_actor(services, "ann", "ann.example")
            await remote_comment(services, post, ann, "Shown at once")
            await remote_comment(services, post, ann, "Waiting for you", status="pending")

    asyncio.run(seed())


@pytest.mark.parametrize(
    "args",
    [
        ("comments", "--pending"),
        ("comments", "list", "--pending"),
        ("comments", "--pending", "--since", "1w"),
        ("comments", "list", "--since", "1w", "--pending"),
    ],
    ids=" ".join,
)
def test_comments_pending_works_with_or_without_list(
    blog_dir: Path, capsys: pytest.CaptureFixture[str], args: tuple[str, ...]
) -> None:
    run(capsys, "init")
    held_comment(blog_dir)

    code, out, err = run(capsys, *args)

    assert (code, err) == (0, "")
    assert len(out.splitlines()) == 1
    assert "pending" in out
    assert "Waiting for you" in out
    assert len(run(capsys, "comments")[1].splitlines()) == 2


def test_post_delete_help_and_readme_say_what_the_server_answers(
    blog_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from fediblog.config import load_settings
    from tests.helpers import running

    run(capsys, "init")
    write(blog_dir / "a.md", "---\ntitle: Gone\n---\nx\n")
    run(capsys, "post", "new", "a.md")
    code, out, _ = run(capsys, "post", "delete", "gone")
    assert code == 0
    object_id = out.split("(", 1)[1].split()[0]
    assert object_id.startswith("https://blog.example/p/")

    async def answers() -> tuple[int, int]:
        async with running(load_settings()) as app:
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url=BASE) as client:
                page = await client.get("/posts/gone")
                activity = await client.get(
                    object_id.removeprefix(BASE), headers={"Accept": AP_ACCEPT}
                )
                return page.status_code, activity.status_code

    assert asyncio.run(answers()) == (404, 410)
    with pytest.raises(SystemExit):
        main(["post", "--help"])
    assert "its page then answers 404, its id /p/UID 410" in capsys.readouterr().out
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    assert "Deletes a post. Its page then answers 404, and its id (`/p/UID`) answers 410" in readme
