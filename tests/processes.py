"""Real processes for tests: the `fediblog` command as a user runs it, servers on a free
port on loopback, and a clean stop."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx


def run_cli(
    folder: Path,
    env: dict[str, str],
    *args: str,
    stdin: str = "",
    timeout: float = 60,
    **options: Any,
) -> subprocess.CompletedProcess[str]:
    """`python -m fediblog ARGS` in ``folder`` with exactly ``env``, as a user runs it;
    ``options`` go to subprocess.run (``preexec_fn``, say)."""
    return subprocess.run(
        [sys.executable, "-m", "fediblog", *args],
        cwd=folder,
        env=env,
        input=stdin,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        **options,
    )


def run_fediblog(folder: Path, env: dict[str, str], *args: str, stdin: str = "") -> str:
    """`python -m fediblog ARGS` that must succeed: its output."""
    done = run_cli(folder, env, *args, stdin=stdin)
    assert done.returncode == 0, f"fediblog {' '.join(args)}: {done.stdout}{done.stderr}"
    return done.stdout


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def wait_until_up(url: str, process: subprocess.Popen[bytes], what: str, limit: float = 30) -> None:
    """Poll ``url`` until the server answers; a RuntimeError naming ``what`` if it exits
    or stays silent for ``limit`` seconds."""
    deadline = time.monotonic() + limit
    while True:
        try:
            httpx.get(url, timeout=1)
            return
        except httpx.TransportError:
            if time.monotonic() > deadline or process.poll() is not None:
                raise RuntimeError(f"{what} did not start") from None
            time.sleep(0.1)


def stop(process: subprocess.Popen[bytes] | subprocess.Popen[str], timeout: float = 15) -> None:
    """Ask a server to stop as Ctrl-C would (SIGINT: a graceful shutdown); kill it if
    it has not stopped within ``timeout`` seconds."""
    if process.poll() is None:
        process.send_signal(signal.SIGINT)
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
