"""The fediblog command, run as a user runs it."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import run


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_init_creates_database_and_private_keys_once(
    blog_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = run(capsys, "init")

    assert code == 0
    assert "@blog@blog.example" in out
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
