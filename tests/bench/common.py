"""Shared pieces of the benchmarks: a blog in a temp folder, a server process, wrk."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx

from fediblog.config import Settings, load_settings
from fediblog.keys import ensure_keys


def bench_settings(folder: Path, port: int, **extra: object) -> Settings:
    settings = load_settings(
        {"FEDIBLOG_CONFIG": str(folder / "absent.toml")},
        base_url=f"http://127.0.0.1:{port}",
        allow_http=True,
        database=folder / "bench.db",
        keys_dir=folder / "keys",
        **extra,
    )
    ensure_keys(settings.keys_dir)
    return settings


def server_env(settings: Settings, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FEDIBLOG_")}
    env.update(
        FEDIBLOG_BASE_URL=settings.base_url,
        FEDIBLOG_ALLOW_HTTP="1",
        FEDIBLOG_DATABASE=str(settings.database),
        FEDIBLOG_KEYS_DIR=str(settings.keys_dir),
        **extra,
    )
    return env


@contextlib.contextmanager
def running_server(settings: Settings, port: int, **env: str) -> Iterator[subprocess.Popen[bytes]]:
    """`fediblog serve` (one uvicorn worker) on 127.0.0.1:port until the block ends."""
    process = subprocess.Popen(
        [sys.executable, "-m", "fediblog", "serve", "--port", str(port)],
        env=server_env(settings, **env),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                httpx.get(f"http://127.0.0.1:{port}/about", timeout=1)
                break
            except httpx.TransportError:
                if time.monotonic() > deadline or process.poll() is not None:
                    raise RuntimeError("the server did not start") from None
                time.sleep(0.1)
        yield process
    finally:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def wrk(
    url: str, *, seconds: int = 10, connections: int = 32, headers: dict[str, str] | None = None
) -> float:
    """Requests per second that wrk (one thread) reached against url."""
    command = ["wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "--latency"]
    for name, value in (headers or {}).items():
        command += ["-H", f"{name}: {value}"]
    output = subprocess.run([*command, url], capture_output=True, text=True, check=True).stdout
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", output)
    if errors:
        raise RuntimeError(f"{errors.group(1)} error responses:\n{output}")
    match = re.search(r"Requests/sec:\s+([\d.]+)", output)
    if not match:
        raise RuntimeError(output)
    print(output)
    return float(match.group(1))
