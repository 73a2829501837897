"""Shared pieces of the benchmarks: a blog in a temp folder (its database a SQLite file
there, or a fresh database on a PostgreSQL server), a server process, wrk, reading the
blog's database from the benchmark, and the memory of a server and its helper processes.
"""

from __future__ import annotations

import asyncio
import atexit
import concurrent.futures
import contextlib
import os
import re
import signal
import sqlite3
import struct
import subprocess
import sys
import tempfile
import threading
import uuid
from collections.abc import Coroutine, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

from fediblog.config import Settings, load_settings
from fediblog.keys import ensure_keys
from tests.bench.sysstat import COMPANIONS, process_tree
from tests.processes import stop, wait_until_up

SPLIT = "FEDIBLOG_BENCH_SPLIT"  # "1": `serve --web-only` and `fediblog worker` processes
WEB_PROCESSES = "FEDIBLOG_BENCH_WORKERS"  # N > 1: `serve --workers N` (N web + a worker)
WORKER_PROCESSES = "FEDIBLOG_BENCH_WORKER_PROCESSES"  # M: `fediblog worker`s in a split run
POSTGRES = "FEDIBLOG_BENCH_POSTGRES"  # an admin URL: each blog a fresh database there
FORKED = "FEDIBLOG_BENCH_WORKER_PROCESS"  # "1": `serve --worker-process` (web + forked worker)

T = TypeVar("T")


def split_processes() -> bool:
    return os.environ.get(SPLIT) == "1"


def forked_worker() -> bool:
    return os.environ.get(FORKED) == "1"


def web_processes() -> int:
    return int(os.environ.get(WEB_PROCESSES) or 1)


def worker_processes() -> int:
    """`fediblog worker` processes beside the web process(es): M in a split run, else 0
    (`serve` runs the background work itself, or in the one worker of --workers N)."""
    return max(1, int(os.environ.get(WORKER_PROCESSES) or 1)) if split_processes() else 0


def postgres_admin() -> str | None:
    """The PostgreSQL server the benchmarks' blogs live on (``--postgres``), or None."""
    return os.environ.get(POSTGRES) or None


def backend() -> str:
    return "postgresql" if postgres_admin() else "sqlite"


def run_async(coroutine: Coroutine[Any, Any, T]) -> T:
    """Run ``coroutine`` to its end on an event loop of its own, in a thread: callable
    from anywhere, inside a running event loop too (bench_settings is)."""
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, coroutine).result()


def database_url(admin: str, name: str) -> str:
    """``admin`` (a PostgreSQL URL) with its database replaced by ``name``."""
    return urlsplit(admin)._replace(path=f"/{name}").geturl()


async def _admin_statement(admin: str, statement: str) -> None:
    import asyncpg

    connection = await asyncpg.connect(admin)
    try:
        await connection.execute(statement)
    finally:
        await connection.close()


# folder -> the database made for it: a benchmark that calls bench_settings twice for one
# folder (bench_page: to seed, then to serve) gets the same blog both times.
_DATABASES: dict[Path, str] = {}


def _database_for(folder: Path, admin: str) -> str:
    if folder not in _DATABASES:
        name = f"fediblog_bench_{uuid.uuid4().hex[:12]}"
        run_async(_admin_statement(admin, f'CREATE DATABASE "{name}"'))
        _DATABASES[folder] = name
    return database_url(admin, _DATABASES[folder])


def drop_database(folder: Path) -> None:
    """Drop the database made for ``folder``, if any (best effort: a failure is printed)."""
    name = _DATABASES.pop(folder, None)
    admin = postgres_admin()
    if name is None or admin is None:
        return
    try:  # FORCE: a connection left over from a killed process does not keep it alive
        run_async(_admin_statement(admin, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    except Exception as error:  # the benchmark's figures matter more than the clean-up
        print(f"could not drop the benchmark database {name}: {error}", file=sys.stderr)


@atexit.register
def _drop_all() -> None:
    for folder in list(_DATABASES):
        drop_database(folder)


@contextlib.contextmanager
def bench_folder(prefix: str) -> Iterator[str]:
    """A temporary folder for one blog, as tempfile.TemporaryDirectory; on PostgreSQL the
    database bench_settings made for it is dropped with it."""
    with tempfile.TemporaryDirectory(prefix=prefix) as tmp:
        try:
            yield tmp
        finally:
            drop_database(Path(tmp))


def bench_settings(folder: Path, port: int, **extra: object) -> Settings:
    """A blog in ``folder`` (its keys there), served on 127.0.0.1:port; its database is
    ``folder/bench.db``, or with ``--postgres`` a fresh database on that server, the same
    one for every call with this folder."""
    admin = postgres_admin()
    database: object = _database_for(folder, admin) if admin else folder / "bench.db"
    settings = load_settings(
        {"FEDIBLOG_CONFIG": str(folder / "absent.toml")},
        base_url=f"http://127.0.0.1:{port}",
        allow_http=True,
        database=database,
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
        FEDIBLOG_DATABASE=str(settings.store_location),
        FEDIBLOG_KEYS_DIR=str(settings.keys_dir),
        **extra,
    )
    return env


_PLACEHOLDER = re.compile(r"\?")


class Reader:
    """The blog's database read from the benchmark itself (counting rows, polling for
    new ones) while the server writes it: sqlite3 on the file (WAL: never in the
    writer's way), or on PostgreSQL an asyncpg connection on an event loop of its own.
    Queries are written once, with SQLite's ``?`` placeholders (PostgreSQL's $N made
    here): plain SQL both databases read alike. Use it from one thread at a time."""

    def __init__(self, settings: Settings) -> None:
        self._sqlite: sqlite3.Connection | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._pg: Any = None
        if settings.database_url:
            import asyncpg

            self._loop = asyncio.new_event_loop()
            self._pg = self._loop.run_until_complete(asyncpg.connect(settings.database_url))
        else:
            self._sqlite = sqlite3.connect(settings.database, timeout=30, isolation_level=None)

    def rows(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        if self._sqlite is not None:
            return self._sqlite.execute(sql, tuple(params)).fetchall()
        assert self._loop is not None
        numbers = iter(range(1, len(params) + 1))
        query = _PLACEHOLDER.sub(lambda _: f"${next(numbers)}", sql)
        found = self._loop.run_until_complete(self._pg.fetch(query, *params))
        return [tuple(row) for row in found]

    def one(self, sql: str, params: Sequence[Any] = ()) -> Any:
        """The first column of the first row."""
        return self.rows(sql, params)[0][0]

    def close(self) -> None:
        if self._sqlite is not None:
            self._sqlite.close()
        if self._loop is not None:
            self._loop.run_until_complete(self._pg.close())
            self._loop.close()

    def __enter__(self) -> Reader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def workers_of(pid: int) -> list[int]:
    """The `fediblog worker` processes beside the web process ``pid`` (split runs)."""
    return list(COMPANIONS.get(pid, []))


@contextlib.contextmanager
def running_server(settings: Settings, port: int, **env: str) -> Iterator[subprocess.Popen[bytes]]:
    """`fediblog serve` (one uvicorn worker) on 127.0.0.1:port until the block ends.

    With FEDIBLOG_BENCH_WORKERS=N (``--workers N``): `serve --workers N`, whose children
    (N web processes and a worker) count as the server's. With FEDIBLOG_BENCH_SPLIT=1
    (``python -m tests.bench --split``): `serve --web-only` (with --workers N: N web
    processes and no worker) and FEDIBLOG_BENCH_WORKER_PROCESSES=M (``--worker-processes
    M``, default 1) `fediblog worker` processes; they count as part of the server in
    every CPU and RSS figure (sysstat.COMPANIONS), and ``workers_of`` names them.
    """
    command = [sys.executable, "-m", "fediblog"]
    split = split_processes()
    workers = ["--workers", str(web_processes())] if web_processes() > 1 else []
    workers += ["--worker-process"] if forked_worker() else []
    process = subprocess.Popen(
        [*command, "serve", "--port", str(port), *(["--web-only"] if split else []), *workers],
        env=server_env(settings, **env),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    companions: list[subprocess.Popen[bytes]] = []
    try:
        for _ in range(worker_processes()):
            companions.append(
                subprocess.Popen(
                    [*command, "worker"],
                    env=server_env(settings, **env),
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
            )
            COMPANIONS[process.pid] = [worker.pid for worker in companions]
        wait_until_up(f"http://127.0.0.1:{port}/about", process, "the server")
        for worker in companions:
            if worker.poll() is not None:
                raise RuntimeError(f"a `fediblog worker` exited at start ({worker.returncode})")
        yield process
    finally:
        stop(process, timeout=20)
        for worker in companions:  # all asked at once, then each waited for
            if worker.poll() is None:
                worker.send_signal(signal.SIGINT)
        for worker in companions:
            try:
                worker.wait(timeout=20)
            except subprocess.TimeoutExpired:
                worker.kill()
                worker.wait()
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


_PAGE = os.sysconf("SC_PAGE_SIZE")
_PRESENT = 1 << 63
_PFN = (1 << 55) - 1


def _frames(pid: int) -> set[int] | None:
    """The physical frames of ``pid``'s resident pages (/proc/PID/pagemap), or None
    where the kernel hides them (not root: every frame number reads 0)."""
    frames: set[int] = set()
    with open(f"/proc/{pid}/pagemap", "rb") as pagemap:
        for line in Path(f"/proc/{pid}/maps").read_text().splitlines():
            start, end = (int(part, 16) for part in line.split()[0].split("-"))
            try:
                pagemap.seek(start // _PAGE * 8)
                entries = pagemap.read((end - start) // _PAGE * 8)
            except OSError:  # [vsyscall]
                continue
            frames.update(
                entry & _PFN for (entry,) in struct.iter_unpack("<Q", entries) if entry & _PRESENT
            )
    return None if frames == {0} else frames


def tree_memory_mb(pid: int) -> float:
    """The memory the process and its descendants hold resident, each page counted
    once: one process's VmRSS; for processes forked from one another, less than their
    RSS added up, by the pages they still share. Without access to the frame numbers
    (not root), their RSS added up."""
    frames: set[int] = set()
    for member in process_tree(pid):
        try:
            mine = _frames(member)
        except OSError:
            continue  # ended meanwhile
        if mine is None:
            return tree_rss_mb(pid)
        frames |= mine
    return len(frames) * _PAGE / 2**20


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
