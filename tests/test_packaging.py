"""The wheel, installed in a fresh virtual environment, runs: `--help` and the demo.

An editable install reads the package from the checkout, so a file the wheel leaves
out (templates, static files, the demo's posts: package-data) goes unnoticed until a
user installs it. Here the wheel is built from a copy of the sources, installed with
its dependencies (resolved from the index pip already uses, tests/install_kit.py) into
a new venv, and run from a folder that is not the checkout.
"""

from __future__ import annotations

import sys
from pathlib import Path

import httpx
import pytest

from tests.helpers import soup
from tests.install_kit import (
    INSTALL_TIMEOUT,
    check_run,
    clean_env,
    offline,
    serving,
    wheelhouse,
)
from tests.processes import free_port

pytestmark = pytest.mark.database_free  # the PostgreSQL run skips it (conftest)


def test_the_wheel_runs_help_and_the_demo_from_a_fresh_venv(tmp_path: Path) -> None:
    (wheel,) = wheelhouse().glob("fediblog-*.whl")  # `pip wheel` of a copy of the sources
    venv = tmp_path / "venv"
    check_run([sys.executable, "-m", "venv", str(venv)], tmp_path, clean_env())
    env = clean_env(venv)
    pip = [str(venv / "bin" / "pip"), "install", "-q", str(wheel)]
    check_run(pip, tmp_path, offline(env), timeout=INSTALL_TIMEOUT)  # its dependencies too

    where = tmp_path / "elsewhere"  # neither the checkout nor the copy: only the wheel
    where.mkdir()
    located = check_run(
        [str(venv / "bin" / "python"), "-c", "import fediblog; print(fediblog.__file__)"],
        where,
        env,
    )
    assert Path(located.strip()).is_relative_to(venv)
    usage = check_run(["fediblog", "--help"], where, env)
    for command in ("init", "serve", "demo", "post", "comments", "backup"):
        assert f"    {command} " in usage

    port = free_port()
    with serving(f"fediblog demo --port {port}", port, where, env) as base:
        index = httpx.get(base + "/", timeout=10)
        assert index.status_code == 200
        titles = [h.get_text(strip=True) for h in soup(index.text).select("li.post-summary h2")]
        assert "Hello, fediverse" in titles  # the demo's posts are in the wheel
        page = httpx.get(base + "/posts/hello-fediverse", timeout=10)
        assert page.status_code == 200
        style = httpx.get(base + "/static/style.css", timeout=10)  # static files too
        assert (style.status_code, style.headers["content-type"][:8]) == (200, "text/css")
    assert (where / "data" / "demo.db").is_file()
