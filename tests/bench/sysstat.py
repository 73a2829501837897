"""CPU accounting for the benchmarks: the server's own CPU time, and how busy the
whole machine was, so that a run disturbed by something else (a test suite running
alongside on these 2 cores) shows as such instead of as a slow server."""

from __future__ import annotations

import os
import resource
from dataclasses import dataclass
from pathlib import Path

TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (all its threads) so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


# A server's processes that are not its children (`fediblog worker` beside `serve
# --web-only`, started by tests/bench/common.py): measured with it, as one server.
COMPANIONS: dict[int, list[int]] = {}


def process_tree(pid: int) -> list[int]:
    """``pid`` and its live descendants: a server that starts helper processes (a
    delivery or verification process) is measured whole, and so are its COMPANIONS."""
    parents: dict[int, list[int]] = {pid: list(COMPANIONS.get(pid, []))}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            parents.setdefault(ppid, []).append(int(entry.name))
    tree, todo = [], [pid]
    while todo:
        current = todo.pop()
        tree.append(current)
        todo.extend(parents.get(current, []))
    return tree


def tree_cpu_seconds(pid: int) -> float:
    """CPU time of a process and its live descendants, and of the children it reaped."""
    total = 0.0
    for member in process_tree(pid):
        try:
            fields = Path(f"/proc/{member}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # ended meanwhile
        total += sum(int(value) for value in fields[11:15]) / TICK  # utime stime cutime cstime
    return total


def machine_busy_seconds() -> float:
    """CPU seconds all cores spent not idle since boot (user, nice, system, irq, steal)."""
    values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = values[3] + values[4]  # idle + iowait
    return (sum(values[:8]) - idle) / TICK


def children_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


@dataclass
class CpuWindow:
    """CPU spent between start() and stop(): server (with any helper processes it
    started), our children (wrk), everything else."""

    pid: int
    children_label: str = "load generator"
    helper_pid: int | None = None  # another process of ours (the delivery receiver)
    helper_label: str = "receiver"
    server: float = 0.0
    helper: float = 0.0
    children: float = 0.0
    machine: float = 0.0
    wall: float = 0.0

    def start(self) -> CpuWindow:
        import time

        self._t = time.monotonic()
        self._s, self._c, self._m = (
            tree_cpu_seconds(self.pid),
            children_cpu_seconds(),
            machine_busy_seconds(),
        )
        self._h = cpu_seconds(self.helper_pid) if self.helper_pid else 0.0
        return self

    def stop(self) -> CpuWindow:
        import time

        self.wall = time.monotonic() - self._t
        self.server = tree_cpu_seconds(self.pid) - self._s
        self.children = children_cpu_seconds() - self._c
        self.machine = machine_busy_seconds() - self._m
        if self.helper_pid:
            self.helper = cpu_seconds(self.helper_pid) - self._h
        return self

    @property
    def others(self) -> float:
        """CPU seconds used by processes other than the server and wrk (noise)."""
        return max(0.0, self.machine - self.server - self.children - self.helper)

    def describe(self) -> str:
        cores = os.cpu_count() or 1
        parts = [
            f"server {self.server / self.wall * 100:.0f}% of a core",
            f"{self.children_label} {self.children / self.wall * 100:.0f}%",
        ]
        if self.helper_pid:
            parts.append(f"{self.helper_label} {self.helper / self.wall * 100:.0f}%")
        parts.append(f"other processes {self.others / self.wall * 100:.0f}%")
        return ", ".join(parts) + (
            f" (machine {self.machine / self.wall / cores * 100:.0f}% busy of {cores} cores)"
        )


def background_load(seconds: float = 1.0) -> float:
    """Cores kept busy by everything on the machine over ``seconds`` (call while idle)."""
    import time

    before, started = machine_busy_seconds(), time.monotonic()
    time.sleep(seconds)
    return (machine_busy_seconds() - before) / (time.monotonic() - started)


def wait_for_quiet(max_wait: float, threshold: float = 0.3) -> float:
    """Wait (at most ``max_wait`` s) until other processes use < ``threshold`` of a core
    for 2 s in a row; return the load last seen. Benchmarks on a shared 2-core machine
    call this before each measured run and print what they found."""
    import time

    deadline = time.monotonic() + max_wait
    load = background_load(2.0)
    while load >= threshold and time.monotonic() < deadline:
        load = background_load(2.0)
    return load
