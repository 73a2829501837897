"""Every shell command in README.md runs, in order, as a newcomer types it.

The commands are read from README.md's ``sh`` code blocks, and each must be in HOW,
which says how this test runs it: to completion (``Run``), or as a server (``Serve``:
started on a free port on 127.0.0.1, asked for a page over HTTP, then stopped with
Ctrl-C), or not at all (``Skip``, with the reason). A command added to the README and
not to HOW fails the test, and so does an entry of HOW the README no longer has.

They run in a copy of the sources in a temporary folder (the README's commands are
typed in the repository's folder), in a shell without FEDIBLOG_* variables and outside
this test run's virtual environment: `pip install -e .` installs into the venv the
README's own commands make, its dependencies from the wheels tests/install_kit.py
fetched once (PIP_NO_INDEX and PIP_FIND_LINKS: pip's settings, not the command's).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.install_kit import (
    INSTALL_TIMEOUT,
    ROOT,
    check_run,
    clean_env,
    offline,
    serving,
    source_copy,
)
from tests.processes import free_port

pytestmark = pytest.mark.database_free  # the PostgreSQL run skips it (conftest)

SHELL = {"sh", "bash", "shell", "console"}
NOT_SHELL = {"markdown", "json", "python", "text"}


@dataclass(frozen=True)
class Run:
    """Run to completion, given ``stdin``; it must exit 0 and print ``expect``."""

    expect: str = ""
    stdin: str = ""


@dataclass(frozen=True)
class Serve:
    """A server: what runs before it (`a && b && server`) runs first; then the server,
    with ``--port P`` added, must answer ``path`` with ``expect`` in the page;
    ``meanwhile`` does more while it runs."""

    path: str
    expect: str
    meanwhile: Callable[[str], None] | None = None


@dataclass(frozen=True)
class Skip:
    reason: str


def leave_a_comment(base: str) -> None:
    """What the README says next: a comment from a post's form waits for approval."""
    answer = httpx.post(
        base + "/posts/hello-fediverse/comment",
        data={"name": "Newcomer", "email": "new@example.org", "comment": "Held for you"},
        timeout=10,
    )
    assert answer.status_code in (200, 303), answer.text


POST = "---\ntitle: Hello\n---\nMy first post.\n"  # the hello.md the README publishes

HOW: dict[str, Run | Serve | Skip] = {
    "sudo apt-get install -y python3-venv": Skip(
        "installs a system package as root; the next command, `python3 -m venv`, is what"
        " needs it, and runs here"
    ),
    "python3 -m venv .venv && . .venv/bin/activate": Run(),
    "pip install -e . && fediblog demo": Serve(
        "/posts/hello-fediverse", "Hello, fediverse", meanwhile=leave_a_comment
    ),
    "pip install -e '.[test]' && pytest": Skip(
        "this is .ci/run, which is running this very test: it cannot run itself"
    ),
    "FEDIBLOG_DATABASE=data/demo.db FEDIBLOG_ALLOW_HTTP=1 fediblog comments --pending": Run(
        "Newcomer: Held for you"
    ),
    'fediblog init --base-url https://blog.example.com --title "My blog" --author "Me"': Run(
        "the blog is @blog@blog.example.com at https://blog.example.com"
    ),
    "fediblog post new hello.md": Run("published https://blog.example.com/posts/hello"),
    "fediblog serve": Serve("/posts/hello", "My first post."),
    "pip install -e '.[test]' && pytest && python -m tests.pgcluster pytest": Skip(
        "this is .ci/run's last line, which is running this very test"
    ),
    "pytest": Skip("the suite this test is part of: it cannot run itself"),
    "python -m tests.pgcluster pytest": Skip(
        "the same suite again, on PostgreSQL: .ci/run runs it after this one"
    ),
    "python -m tests.pgcluster pytest -m postgresql": Skip(
        "a part of the PostgreSQL run .ci/run makes after this one"
    ),
    "ruff format fediblog tests": Run("files"),  # on the copy: the checkout is left alone
    "pytest -m browser": Skip("the browser tests are part of the suite this test is in"),
}


def readme_commands(text: str) -> list[str]:
    """The commands of the shell code blocks, in order: one a line (a trailing ``\\``
    continues it), without comments. A code block must say its language."""
    commands: list[str] = []
    for language, body in re.findall(r"^```(\w*)\n(.*?)^```", text, re.S | re.M):
        assert language, "README.md: give every code block a language (sh for commands)"
        assert language in SHELL | NOT_SHELL, f"README.md: what language is ```{language}?"
        if language not in SHELL:
            continue
        for line in body.replace("\\\n", " ").splitlines():
            command = re.sub(r"\s+#\s.*$", "", line).strip()
            if command and not command.startswith("#"):
                commands.append(command)
    return commands


def test_every_readme_command_says_how_it_is_tested() -> None:
    commands = readme_commands((ROOT / "README.md").read_text())

    untested = [c for c in commands if c not in HOW]
    assert not untested, f"README commands with no entry in HOW: {untested}"
    gone = [c for c in HOW if c not in commands]
    assert not gone, f"entries of HOW that README.md no longer has: {gone}"


def test_ci_runs_the_test_command_the_readme_gives() -> None:
    script = (ROOT / ".ci" / "run").read_text().splitlines()
    last = [line for line in script if line.strip() and not line.startswith("#")][-1]

    assert "python -m tests.pgcluster pytest" in last  # both backends
    assert last in readme_commands((ROOT / "README.md").read_text())


def test_the_reader_of_readme_commands_finds_them_all() -> None:
    text = (
        "```sh\nfediblog init   # the first\n\n# a comment line\npip install \\\n  x\n```\n"
        "```json\n{}\n```\n```sh\nfediblog serve\n```\n"
    )
    assert readme_commands(text) == ["fediblog init", "pip install    x", "fediblog serve"]


def test_every_readme_command_runs_on_a_fresh_install(tmp_path: Path) -> None:
    folder = source_copy(tmp_path / "fediblog")
    (folder / "hello.md").write_text(POST)
    env = offline(clean_env())  # pip's own settings: the command lines stay the README's
    ran: list[str] = []
    for command in readme_commands((ROOT / "README.md").read_text()):
        how = HOW[command]
        if isinstance(how, Skip):
            continue
        if (folder / ".venv" / "bin" / "activate").exists():  # `. .venv/bin/activate` ran
            env = offline(clean_env(folder / ".venv"))
        if isinstance(how, Run):
            output = check_run(command, folder, env, timeout=INSTALL_TIMEOUT, stdin=how.stdin)
            assert how.expect in output, f"{command!r} printed:\n{output}"
        else:
            *before, server = command.split(" && ")
            if before:
                check_run(" && ".join(before), folder, env, timeout=INSTALL_TIMEOUT)
            port = free_port()
            with serving(f"{server} --port {port}", port, folder, env) as base:
                page = httpx.get(base + how.path, timeout=10)
                assert page.status_code == 200, f"{command!r}: {how.path} answered {page}"
                assert how.expect in page.text
                if how.meanwhile is not None:
                    how.meanwhile(base)
        ran.append(command)
    assert len(ran) == sum(not isinstance(how, Skip) for how in HOW.values())
    # The commands ran in the venv the README made, on the copy: nothing else was used.
    assert (folder / ".venv" / "bin" / "fediblog").exists()
