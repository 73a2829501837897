"""Every benchmark of issue 12 in one run: one JSON report and one table.

    python -m tests.bench [--quick] [--only page,inbox,processing,delivery,memory]
                          [--out FILE] [--quiet-wait SECONDS] [--postgres ADMIN_URL]
                          [--workers N | --worker-process | --split [--worker-processes M]]

First the hello-world ceiling (tests/bench/hello.py: a trivial starlette endpoint behind
``fediblog serve``'s own uvicorn settings, driven by wrk identity and gzip), then each
benchmark; a benchmark that fails is reported as such and the others still run. The
report goes to ``--out`` (default ``tests/bench/results/<UTC time>-<commit>[-quick].json``,
git-ignored) and the table (tests/bench/report.py) to stdout. ``--quick`` runs smaller
sizes and shorter windows (about 2 minutes in all): a smoke run, not a measurement to
compare with the targets. Before each benchmark the run notes how busy the machine was
and, after it, how much CPU other processes took meanwhile (``others_cores``).

``--postgres`` puts each benchmark's blog in a fresh database on that PostgreSQL server
(dropped afterwards); ``--workers N`` serves with N web processes; ``--worker-process``
with one web process and a worker forked from it; ``--split`` runs the
background work in ``--worker-processes M`` `fediblog worker` processes. The report
records the backend and both process counts, so runs of each shape compare in one table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from fediblog.config import without_password
from tests.bench import report
from tests.bench.common import (
    FORKED,
    POSTGRES,
    SPLIT,
    WEB_PROCESSES,
    WORKER_PROCESSES,
    backend,
    forked_worker,
    run_async,
    split_processes,
    web_processes,
    worker_processes,
)
from tests.bench.sysstat import background_load, machine_busy_seconds, wait_for_quiet

ROOT = Path(__file__).resolve().parents[2]
ALIASES = {"pages": "page", "acceptance": "inbox", "fanout": "delivery", "fan-out": "delivery"}

# Sizes and durations: (full, quick).
SETTINGS: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    "ceiling": ({"seconds": 8}, {"seconds": 2}),
    "page": ({"sizes": (1000, 50_000), "seconds": 8}, {"sizes": (1000, 50_000), "seconds": 2}),
    "inbox": (
        {"connections": (64, 256), "seconds": 10, "per_run": 60_000, "warmup": 3_000},
        {"connections": (256,), "seconds": 3, "per_run": 8_000, "warmup": 1_000},
    ),
    "processing": (
        {"sizes": (0, 50_000), "backlog": 30_000, "window": 10, "flood_seconds": 10,
         "flood_rate": 5_000, "drain": 60},
        {"sizes": (0, 50_000), "backlog": 8_000, "window": 4, "flood_seconds": 3,
         "flood_rate": 3_000, "drain": 20},
    ),
    "delivery": ({"servers": 10_000, "per_server": 10}, {"servers": 1_000, "per_server": 10}),
    "memory": ({}, {}),
}  # fmt: skip


def runner(name: str) -> Callable[..., dict[str, Any]]:
    # Imported when needed: each module pulls in what only it uses.
    if name == "page":
        from tests.bench.bench_page import measure
    elif name == "inbox":
        from tests.bench.bench_inbox import measure
    elif name == "processing":
        from tests.bench.bench_processing import measure
    elif name == "delivery":
        from tests.bench.bench_delivery import measure
    elif name == "memory":
        from tests.bench.bench_memory import measure
    else:
        from tests.bench.hello import measure
    return measure


def own_cpu_seconds() -> float:
    """CPU of this process and of every child it has reaped (servers, wrk, signers)."""
    total = 0.0
    for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN):
        usage = resource.getrusage(who)
        total += usage.ru_utime + usage.ru_stime
    return total


def git(*args: str) -> str:
    try:
        done = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return done.stdout.strip() if done.returncode == 0 else ""


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def meta(args: argparse.Namespace, names: list[str]) -> dict[str, Any]:
    import uvicorn

    return {
        "started": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "commit": git("rev-parse", "--short", "HEAD") or None,
        "dirty": bool(git("status", "--porcelain", "--untracked-files=no")),
        "quick": args.quick,
        "backend": backend(),
        "split": split_processes(),
        "web_processes": web_processes(),
        # `fediblog worker` processes beside the web ones: M with --split; else 0 (the
        # work runs in the one web process) or, with --workers N or --worker-process,
        # serve's own worker: 1.
        "worker_processes": worker_processes() or int(web_processes() > 1 or forked_worker()),
        "worker_forked": forked_worker(),  # `serve --worker-process`
        "only": names,
        "machine": {
            "cpus": os.cpu_count(),
            "cpu": cpu_model(),
            "python": platform.python_version(),
            "uvicorn": uvicorn.__version__,
            "loadavg_at_start": list(os.getloadavg()),
        },
    }


def run_one(
    name: str, kwargs: dict[str, Any], quiet_wait: float
) -> tuple[dict[str, Any] | None, str | None]:
    """Run one benchmark; return (its figures with the machine's load added, or an error)."""
    before = wait_for_quiet(quiet_wait) if quiet_wait > 0 else background_load(1.0)
    print(f"\n==== {name} (the machine was using {before:.2f} cores before it) ====", flush=True)
    started, busy, ours = time.monotonic(), machine_busy_seconds(), own_cpu_seconds()
    try:
        figures = runner(name)(**kwargs)
    except Exception as error:  # one failed benchmark does not stop the others
        traceback.print_exc()
        return None, f"{type(error).__name__}: {error}"
    wall = time.monotonic() - started
    others = max(0.0, (machine_busy_seconds() - busy) - (own_cpu_seconds() - ours))
    figures["load"] = {
        "cores_busy_before": before,
        "others_cores": others / wall if wall > 0 else None,
        "seconds": wall,
    }
    print(f"---- {name}: {wall:.0f} s; other processes used {others / wall:.2f} cores meanwhile")
    return figures, None


async def postgres_version(url: str) -> str:
    import asyncpg

    connection = await asyncpg.connect(url)
    try:
        return str(await connection.fetchval("SHOW server_version"))
    finally:
        await connection.close()


def parse_only(text: str | None) -> list[str]:
    if not text:
        return list(report.BENCHMARKS)
    names = []
    for part in filter(None, (p.strip().lower() for p in text.split(","))):
        name = ALIASES.get(part, part)
        if name not in report.BENCHMARKS:
            raise SystemExit(
                f"tests.bench: no benchmark {part!r} (choose from {', '.join(report.BENCHMARKS)})"
            )
        if name not in names:
            names.append(name)
    return names


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m tests.bench", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="small sizes, short runs (~2 min)")
    parser.add_argument("--only", help="comma-separated: " + ",".join(report.BENCHMARKS))
    parser.add_argument("--out", type=Path, help="the JSON report (default tests/bench/results/…)")
    parser.add_argument(
        "--quiet-wait",
        type=float,
        help="before each benchmark, wait up to this long for the machine to go quiet"
        " (default 60 s, 0 with --quick)",
    )
    parser.add_argument(
        "--split",
        action="store_true",
        help="run the server as `serve --web-only` plus `fediblog worker` processes"
        " (--worker-processes; CPU and RSS figures cover all; sets FEDIBLOG_BENCH_SPLIT=1)",
    )
    parser.add_argument(
        "--worker-processes",
        type=int,
        default=int(os.environ.get(WORKER_PROCESSES) or 1),
        metavar="M",
        help="with --split: M `fediblog worker` processes (1; meant for PostgreSQL, where"
        " they claim jobs side by side; sets FEDIBLOG_BENCH_WORKER_PROCESSES=M)",
    )
    parser.add_argument(
        "--postgres",
        default=os.environ.get(POSTGRES) or None,
        metavar="ADMIN_URL",
        help="each benchmark's blog in a fresh database on this PostgreSQL server, made"
        " (CREATE DATABASE) and dropped by the run (sets FEDIBLOG_BENCH_POSTGRES)",
    )
    parser.add_argument(
        "--worker-process",
        action="store_true",
        help="run the server as `serve --worker-process`: a web process and a worker forked"
        " from it (sets FEDIBLOG_BENCH_WORKER_PROCESS=1)",
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=1,
        metavar="N",
        help="run the server as `serve --workers N`: N web processes and a worker process"
        " (their CPU and RSS count as the server's; sets FEDIBLOG_BENCH_WORKERS=N)",
    )
    args = parser.parse_args()
    if args.worker_processes < 1 or args.workers < 1:
        parser.error("--workers and --worker-processes take 1 or more")
    # Read by common (bench_settings, running_server), in this process.
    if args.split:
        os.environ[SPLIT] = "1"
    if args.worker_process and (args.split or args.workers > 1):
        parser.error(
            "--worker-process is one web process and its worker: not with --split or --workers"
        )
    if args.worker_process:
        os.environ[FORKED] = "1"
    else:
        os.environ.pop(FORKED, None)
    if args.worker_processes > 1 and not split_processes():
        parser.error("--worker-processes needs --split (`serve` runs its own worker otherwise)")
    if args.postgres and not args.postgres.startswith(("postgresql://", "postgres://")):
        parser.error("--postgres takes a postgresql:// URL")
    os.environ[WORKER_PROCESSES] = str(args.worker_processes)
    os.environ[WEB_PROCESSES] = str(args.workers)
    if args.postgres:
        os.environ[POSTGRES] = args.postgres
    else:
        os.environ.pop(POSTGRES, None)
    names = parse_only(args.only)
    quick = 1 if args.quick else 0
    quiet_wait = args.quiet_wait if args.quiet_wait is not None else (0.0 if quick else 60.0)
    info = meta(args, names)
    if args.postgres:
        try:  # fail now, not in every benchmark; and say which server it was
            info["postgresql"] = run_async(postgres_version(args.postgres))
        except Exception as problem:
            parser.error(f"--postgres: cannot use {without_password(args.postgres)}: {problem}")
    out = args.out or ROOT / "tests" / "bench" / "results" / (
        f"{info['started'].replace(':', '')}-{info['commit'] or 'nocommit'}"
        f"{'-dirty' if info['dirty'] else ''}{'-quick' if quick else ''}"
        f"{'-postgresql' if args.postgres else ''}"
        f"{f'-split{args.worker_processes}' if info['split'] else ''}"
        f"{f'-workers{args.workers}' if args.workers > 1 else ''}"
        f"{'-forked' if args.worker_process else ''}.json"
    )

    ceiling, error = run_one("ceiling", dict(SETTINGS["ceiling"][quick]), quiet_wait)
    errors: dict[str, str] = {"ceiling": error} if error else {}
    results: dict[str, dict[str, Any]] = {}
    for name in names:
        kwargs = dict(SETTINGS[name][quick])
        if name in ("inbox", "processing", "delivery"):
            kwargs["quiet_wait"] = quiet_wait
        figures, error = run_one(name, kwargs, quiet_wait)
        if figures is not None:
            results[name] = figures
        else:
            errors[name] = error or "failed"
    info["machine"]["loadavg_at_end"] = list(os.getloadavg())
    document = report.clean(report.build(results=results, errors=errors, ceiling=ceiling,
                                         meta=info))  # fmt: skip
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(document, indent=2) + "\n")
    print()
    print(report.table(document))
    print(f"\nreport: {out}")
    if errors:
        sys.exit(1)


if __name__ == "__main__":
    main()
