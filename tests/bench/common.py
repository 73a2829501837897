"""Shared pieces of the benchmarks: a blog in a temp folder, a server process, wrk,
and the memory of a server and its helper processes."""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from fediblog.config import Settings, load_settings
from fediblog.keys import ensure_keys
from tests.bench.sysstat import COMPANIONS, process_tree
from tests.processes import stop, wait_until_up


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


SPLIT = "FEDIBLOG_BENCH_SPLIT"  # "1": `serve --web-only` and one `fediblog worker` process


WEB_PROCESSES = "FEDIBLOG_BENCH_WORKERS"  # N > 1: `serve --workers N` (N web + a worker)


def split_processes() -> bool:
    return os.environ.get(SPLIT) == "1"


def web_processes() -> int:
    return int(os.environ.get(WEB_PROCESSES) or 1)


def worker_of(pid: int) -> int | None:
    """The `fediblog worker` process beside the web process ``pid`` (split runs)."""
    found = COMPANIONS.get(pid)
    return found[0] if found else None


@contextlib.contextmanager
def running_server(settings: Settings, port: int, **env: str) -> Iterator[subprocess.Popen[bytes]]:
    """`fediblog serve` (one uvicorn worker) on 127.0.0.1:port until the block ends.

    With FEDIBLOG_BENCH_WORKERS=N (``--workers N``): `serve --workers N`, whose children
    (N web processes and a worker) count as the server's. With FEDIBLOG_BENCH_SPLIT=1
    (``python -m tests.bench --split``): `serve --web-only` and one `fediblog worker`
    process; the worker counts as part of the server in every
    CPU and RSS figure (sysstat.COMPANIONS), and ``worker_of`` names it.
    """
    command = [sys.executable, "-m", "fediblog"]
    split = split_processes()
    workers = ["--workers", str(web_processes())] if web_processes() > 1 else []
    process = subprocess.Popen(
        [*command, "serve", "--port", str(port), *(["--web-only"] if split else []), *workers],
        env=server_env(settings, **env),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    worker = None
    try:
        if split:
            worker = subprocess.Popen(
                [*command, "worker"],
                env=server_env(settings, **env),
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            COMPANIONS[process.pid] = [worker.pid]
        wait_until_up(f"http://127.0.0.1:{port}/about", process, "the server")
        yield process
    finally:
        stop(process, timeout=20)
        if worker is not None:
            stop(worker, timeout=20)
            COMPANIONS.pop(process.pid, None)


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def peak_rss_mb(pid: int) -> float:
    """The most memory the process ever held resident (VmHWM), in MB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM")


def tree_rss_mb(pid: int) -> float:
    """RSS of the process and its descendants, added up (shared pages count twice)."""
    total = 0.0
    for member in process_tree(pid):
        try:
            total += rss_mb(member)
        except (OSError, RuntimeError):
            continue  # ended meanwhile
    return total


class RssSampler:
    """The largest tree RSS seen while the block runs, sampled every ``interval`` s."""

    def __init__(self, pid: int, interval: float = 0.1) -> None:
        self.pid = pid
        self.interval = interval
        self.peak = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            with contextlib.suppress(OSError, RuntimeError):
                self.peak = max(self.peak, tree_rss_mb(self.pid))
            self._stop.wait(self.interval)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


@dataclass(frozen=True, slots=True)
class WrkResult:
    rps: float
    p50_ms: float
    p99_ms: float
    requests: int
    output: str


_UNITS_MS = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60_000.0}


def parse_wrk(output: str) -> WrkResult:
    """Requests/s and the latency percentiles of wrk's ``--latency`` output."""
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", output)
    if errors:
        raise RuntimeError(f"{errors.group(1)} error responses:\n{output}")
    rate = re.search(r"Requests/sec:\s+([\d.]+)", output)
    total = re.search(r"(\d+) requests in", output)
    if not rate or not total:
        raise RuntimeError(output)

    def percentile(p: int) -> float:
        match = re.search(rf"^\s*{p}%\s+([\d.]+)(us|ms|s|m)\s*$", output, re.MULTILINE)
        return float(match.group(1)) * _UNITS_MS[match.group(2)] if match else float("nan")

    return WrkResult(
        float(rate.group(1)), percentile(50), percentile(99), int(total.group(1)), output
    )


def wrk_run(
    url: str, *, seconds: float = 10, connections: int = 32, headers: dict[str, str] | None = None
) -> WrkResult:
    """One wrk run (one thread) against url: rate and latency; any 4xx/5xx is an error."""
    command = ["wrk", "-t1", f"-c{connections}", f"-d{max(1, round(seconds))}s", "--latency"]
    for name, value in (headers or {}).items():
        command += ["-H", f"{name}: {value}"]
    output = subprocess.run([*command, url], capture_output=True, text=True, check=True).stdout
    return parse_wrk(output)


def wrk(
    url: str, *, seconds: int = 10, connections: int = 32, headers: dict[str, str] | None = None
) -> float:
    """Requests per second that wrk (one thread) reached against url."""
    result = wrk_run(url, seconds=seconds, connections=connections, headers=headers)
    print(result.output)
    return result.rps
