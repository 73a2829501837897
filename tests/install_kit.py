"""Installing fediblog as a newcomer does, and running its servers as real processes.

For tests/test_packaging.py (the wheel in a fresh virtual environment) and
tests/test_readme.py (every README command). Nothing here touches the working tree:
builds and installs run on a copy of the sources in a temporary folder.

``wheelhouse()`` asks the index once per test run: `pip wheel`, with the configuration
pip already has (index, find-links, cache), puts fediblog's wheel and one wheel per
dependency in a folder. Every install after it reads that folder only (``offline``),
so two fresh venvs cost one resolution against the index, not two.
"""

from __future__ import annotations

import atexit
import functools
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

import httpx

from tests.processes import stop

ROOT = Path(__file__).resolve().parent.parent
# What a checkout holds that a build or a user needs: the sources, not the caches.
SOURCES = ("pyproject.toml", "README.md", "fediblog", "tests")
_CACHES = shutil.ignore_patterns(
    "__pycache__",
    "*.pyc",
    ".mypy_cache",
    ".ruff_cache",
    ".pytest_cache",
    ".hypothesis",
    "node_modules",
)
INSTALL_TIMEOUT = 600  # seconds: a cold pip cache downloads every dependency


def source_copy(target: Path, names: tuple[str, ...] = SOURCES) -> Path:
    """A copy of the repository's sources in ``target``, as a fresh checkout has them."""
    target.mkdir(parents=True, exist_ok=True)
    for name in names:
        source = ROOT / name
        if source.is_dir():
            shutil.copytree(source, target / name, ignore=_CACHES)
        else:
            shutil.copy2(source, target / name)
    return target


@functools.cache
def wheelhouse() -> Path:
    """fediblog's wheel, built from a copy of the sources, and the wheels of all it needs
    to build (setuptools, for an editable install) and to run."""
    folder = Path(tempfile.mkdtemp(prefix="fediblog-wheels-"))
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    source = source_copy(folder / "source", ("pyproject.toml", "README.md", "fediblog"))
    house = folder / "wheels"
    command = [sys.executable, "-m", "pip", "wheel", "-q", "-w", str(house), str(source)]
    check_run([*command, "setuptools>=68"], folder, clean_env(), timeout=INSTALL_TIMEOUT)
    return house


def offline(env: Mapping[str, str]) -> dict[str, str]:
    """``env`` for a pip that installs from ``wheelhouse()`` only."""
    return {**env, "PIP_NO_INDEX": "1", "PIP_FIND_LINKS": str(wheelhouse())}


def clean_env(venv: Path | None = None) -> dict[str, str]:
    """The environment of a new shell: no FEDIBLOG_*, not inside this test run's venv;
    inside ``venv`` when given, as `. venv/bin/activate` would leave it."""
    ours = Path(sys.prefix)
    env = {k: v for k, v in os.environ.items() if not k.startswith("FEDIBLOG_")}
    env.pop("VIRTUAL_ENV", None)
    env.pop("PYTHONPATH", None)
    path = [p for p in env.get("PATH", "").split(os.pathsep) if p and not _inside(Path(p), ours)]
    if venv is not None:
        env["VIRTUAL_ENV"] = str(venv)
        path.insert(0, str(venv / "bin"))
    env["PATH"] = os.pathsep.join(path)
    return env


def _inside(path: Path, folder: Path) -> bool:
    try:
        return path.resolve().is_relative_to(folder.resolve())
    except OSError:
        return False


def check_run(
    command: list[str] | str,
    cwd: Path,
    env: Mapping[str, str],
    timeout: float = 120,
    stdin: str = "",
) -> str:
    """Run to completion; its output, or a failure that shows the output. A new session,
    without a terminal: what would ask on one (getpass) reads ``stdin`` instead."""
    result = subprocess.run(
        command if isinstance(command, list) else ["bash", "-c", command],
        cwd=cwd,
        env=dict(env),
        input=stdin,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=timeout,
        check=False,
        start_new_session=True,
    )
    assert result.returncode == 0, f"{command!r} exited {result.returncode}:\n{result.stdout}"
    return result.stdout


@contextmanager
def serving(
    command: str, port: int, cwd: Path, env: Mapping[str, str], timeout: float = 60
) -> Iterator[str]:
    """A long-running command (bash ``command``) until it answers on 127.0.0.1:``port``:
    yields its base URL, then stops it with Ctrl-C and checks that it exited cleanly."""
    log = cwd / f".server-{port}.log"
    with log.open("wb") as output:
        # exec: Ctrl-C reaches the server itself, not the shell that started it.
        server = subprocess.Popen(
            ["bash", "-c", f"exec {command}"], cwd=cwd, env=dict(env), stdout=output, stderr=output
        )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout
        while True:  # wait until it listens (bounded)
            try:
                httpx.get(base + "/", timeout=2)
                break
            except httpx.TransportError:
                assert server.poll() is None, f"{command!r} stopped:\n{log.read_text()}"
                assert time.monotonic() < deadline, (
                    f"{command!r} did not listen:\n{log.read_text()}"
                )
                time.sleep(0.1)
        yield base
    finally:
        stop(server, timeout=20)
    assert server.returncode == 0, f"{command!r} exited {server.returncode}:\n{log.read_text()}"
    log.unlink()
