"""`fediblog serve --workers N`: N web processes on one socket, and a worker process.

The parent binds the socket, then forks each child: the web processes serve the socket
it bound (the kernel hands each new connection to one of them), and one ``fediblog
worker`` process runs the background work, as `serve --web-only` beside `fediblog
worker` would. The parent only watches:

* a child that exits on its own (a crash, an out-of-memory kill) is started again
  after a second; more than ``RESTARTS`` such exits within ``RESTART_WINDOW`` seconds
  stop them all, and `serve` exits 1 (systemd restarts the unit);
* SIGTERM or SIGINT is passed on to every child as SIGTERM; each stops as it would on
  its own (requests get the shutdown grace period, the worker records what it did);
  a child still running ``grace`` + 5 seconds later is killed;
* if the parent itself is killed outright, each child gets SIGTERM from the kernel
  (``_die_with``) rather than serving on with nobody watching.

Nothing is lost when a child dies: what the worker had claimed comes back once its
lease ends, and a reply is answered 202 only once its row is committed.

Fork, not spawn: the children start from the parent's settings, with nothing to pickle,
and the parent has no thread and no event loop when it forks.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import logging
import multiprocessing
import multiprocessing.process
import os
import signal
import sys
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import wait
from types import FrameType

from fediblog.errors import FediblogError

log = logging.getLogger("fediblog.supervisor")

RESTARTS = 5  # unexpected exits allowed within RESTART_WINDOW; one more stops everything
RESTART_WINDOW = 60.0
RESTART_PAUSE = 1.0  # seconds before a child that exited is started again
KILL_AFTER = 5.0  # seconds past the grace period before a stopping child is killed


@dataclass
class Child:
    """One process to keep running: ``run`` is what it does, in the child."""

    name: str
    run: Callable[[], None]
    process: multiprocessing.process.BaseProcess | None = None


def _die_with(parent: int) -> None:
    """SIGTERM this process when ``parent`` dies, even by SIGKILL: children left behind
    would go on serving the port with nobody to stop them (Linux's PR_SET_PDEATHSIG;
    elsewhere systemd's control group still stops them all)."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != parent:  # it died before that took effect
        os.kill(os.getpid(), signal.SIGTERM)


_PR_SET_PDEATHSIG = 1


def _child_main(name: str, run: Callable[[], None], parent: int) -> None:
    # The parent's handlers only set a flag there: each child stops on its own terms.
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    _die_with(parent)
    try:
        run()
    except KeyboardInterrupt:
        pass
    except FediblogError as error:
        print(f"fediblog: {name}: {error}", file=sys.stderr, flush=True)
        sys.exit(1)


def _described(code: int | None) -> str:
    if code is not None and code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit status {code}"


class Supervisor:
    """Runs ``children`` until SIGTERM or SIGINT (``run``), starting again any that exits."""

    def __init__(self, children: list[Child], *, grace: float) -> None:
        self.children = children
        self.grace = grace
        self._context = multiprocessing.get_context("fork")
        self._stopping_since: float | None = None
        self._exits: deque[float] = deque()

    def _start(self, child: Child) -> None:
        process = self._context.Process(
            target=_child_main,
            args=(child.name, child.run, os.getpid()),
            name=child.name,
            daemon=False,
        )
        process.start()
        child.process = process

    def _stop(self) -> None:
        if self._stopping_since is None:
            self._stopping_since = time.monotonic()
        for child in self.children:
            if child.process is not None and child.process.pid is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(child.process.pid, signal.SIGTERM)

    def run(self) -> int:
        """0 once stopped by a signal; 1 when children kept exiting on their own."""
        failed = False

        def on_signal(signum: int, frame: FrameType | None) -> None:
            self._stop()

        previous = {
            signum: signal.signal(signum, on_signal) for signum in (signal.SIGTERM, signal.SIGINT)
        }
        try:
            for child in self.children:
                self._start(child)
            while running := [child for child in self.children if child.process is not None]:
                wait([child.process.sentinel for child in running if child.process], timeout=1.0)
                for child in running:
                    failed = self._look_at(child) or failed
                if self._stopping_since is not None:
                    late = time.monotonic() - self._stopping_since > self.grace + KILL_AFTER
                    for child in running:
                        if late and child.process is not None and child.process.is_alive():
                            log.warning("the %s did not stop in time: killing it", child.name)
                            child.process.kill()
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)
        return 1 if failed else 0

    def _look_at(self, child: Child) -> bool:
        """Reap ``child`` if it exited; start it again unless stopping. True if that
        was one exit too many."""
        process = child.process
        if process is None or process.is_alive():
            return False
        process.join()
        child.process = None
        if self._stopping_since is not None:
            return False
        now = time.monotonic()
        self._exits.append(now)
        while self._exits and now - self._exits[0] > RESTART_WINDOW:
            self._exits.popleft()
        what = _described(process.exitcode)
        if len(self._exits) > RESTARTS:
            print(
                f"fediblog: the {child.name} exited ({what}): {len(self._exits)} unexpected"
                f" exits in {RESTART_WINDOW:g} s, stopping",
                file=sys.stderr,
                flush=True,
            )
            self._stop()
            return True
        print(
            f"fediblog: the {child.name} exited ({what}): starting it again",
            file=sys.stderr,
            flush=True,
        )
        time.sleep(RESTART_PAUSE)
        if self._stopping_since is None:  # a signal may have come meanwhile
            self._start(child)
        return False
