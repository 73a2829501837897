"""`fediblog serve --workers N`: N web processes on one port, and a worker process.

The parent binds the port, then forks each child: the web processes each listen on a
socket of their own bound to it, among which Linux spreads new connections evenly
(``server.socket_of_its_own``; elsewhere they all serve the parent's socket), and one
``fediblog worker`` process runs the background work, as `serve --web-only` beside
`fediblog worker` would. (`serve --worker-process`, one web process and a worker
forked from it, is ``Companion``, at the end.) The parent only watches:

* a child that exits on its own (a crash, an out-of-memory kill) is started again
  after a second; more than ``RESTARTS`` such exits within ``RESTART_WINDOW`` seconds
  stop them all, and `serve` exits 1 (systemd restarts the unit);
* SIGTERM or SIGINT is passed on to every child as SIGTERM; each stops as it would on
  its own (requests get the shutdown grace period, the worker records what it did);
  a child still running ``grace`` + 5 seconds later is killed;
* if the parent itself is killed outright, each child gets SIGTERM from the kernel
  (``die_with``) rather than serving on with nobody watching.

Nothing is lost when a child dies: what the worker had claimed comes back once its
lease ends, and a reply is answered 202 only once its row is committed.

Fork, not spawn: the children start from the parent's settings, with nothing to pickle,
and the parent runs no event loop and holds no database connection when it forks (what
it checked and synced before, it closed). Each child runs in a process group of its own,
so a terminal's Ctrl-C reaches the parent, which passes one SIGTERM on.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import logging
import multiprocessing
import multiprocessing.process
import os
import signal
import subprocess
import sys
import threading
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


def die_with(parent: int) -> None:
    """SIGTERM this process when ``parent`` dies, even by SIGKILL: children left behind
    would go on serving the port with nobody to stop them (Linux's PR_SET_PDEATHSIG;
    elsewhere systemd's control group still stops them all)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != parent:  # it died before that took effect
        os.kill(os.getpid(), signal.SIGTERM)


_PR_SET_PDEATHSIG = 1
_STOP_SIGNALS = {signal.SIGTERM, signal.SIGINT}


def _child_main(name: str, run: Callable[[], None], parent: int) -> None:
    # Started with the stop signals blocked (Supervisor._start): the parent's handlers,
    # inherited, would only set its flag here. Each child stops on its own terms, once.
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    # Its own process group: Ctrl-C in a terminal reaches the parent alone, which passes
    # one SIGTERM on (a second signal would make uvicorn cut its requests short).
    os.setpgid(0, 0)
    die_with(parent)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, _STOP_SIGNALS)
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


def _say(line: str) -> None:
    print(f"fediblog: {line}", file=sys.stderr, flush=True)


class Supervisor:
    """Runs ``children`` until SIGTERM or SIGINT (``run``), starting again any that exits."""

    def __init__(self, children: list[Child], *, grace: float) -> None:
        self.children = children
        self.grace = grace
        self._context = multiprocessing.get_context("fork")
        self._stopping_since: float | None = None
        self._exits: deque[float] = deque()
        self._due: dict[str, float] = {child.name: 0.0 for child in children}  # next start
        self._killed: set[int] = set()
        self.failed = False  # one unexpected exit too many: everything was stopped

    def run(self) -> int:
        """0 once stopped by a signal; 1 when children kept exiting on their own."""

        def on_signal(signum: int, frame: FrameType | None) -> None:
            self._stop()

        previous = {signum: signal.signal(signum, on_signal) for signum in _STOP_SIGNALS}
        try:
            while self._supervise():
                pass
        finally:
            self._stop()  # a no-op after a signal; after an error, nobody is left behind
            self._reap_all()
            for signum, handler in previous.items():
                signal.signal(signum, handler)
        return 1 if self.failed else 0

    def _supervise(self) -> bool:
        """One look: start what is due, reap what exited; False once all have stopped."""
        now = time.monotonic()
        if self._stopping_since is None:
            for child in self.children:
                if child.process is None and now >= self._due[child.name]:
                    self._start(child)
        running = [child.process for child in self.children if child.process is not None]
        if self._stopping_since is not None and not running:
            return False
        due = [self._due[child.name] for child in self.children if child.process is None]
        timeout = min([1.0, *(max(0.0, at - now) for at in due)])
        if running:
            wait([process.sentinel for process in running], timeout=timeout)
        else:
            time.sleep(timeout)
        for child in self.children:
            self._look_at(child)
        stopping = self._stopping_since
        if stopping is not None and time.monotonic() - stopping > self.grace + KILL_AFTER:
            for process in running:
                if process.is_alive() and process.pid not in self._killed:
                    log.warning("the %s did not stop in time: killing it", process.name)
                    self._killed.add(process.pid or 0)
                    process.kill()
        return True

    def _start(self, child: Child) -> None:
        process = self._context.Process(
            target=_child_main,
            args=(child.name, child.run, os.getpid()),
            name=child.name,
            daemon=False,
        )
        # Blocked until the child is known: a stop signal arriving meanwhile then reaches
        # it (``_stop``), and the child cannot take the parent's handler for its own.
        blocked = signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS)
        try:
            if self._stopping_since is not None:  # a stop came while the others started
                return
            process.start()
            child.process = process
            if self._stopping_since is not None and process.pid is not None:
                os.kill(process.pid, signal.SIGTERM)  # it came just before the block
        except OSError as error:  # no fork: no memory, too many processes
            why = error.strerror or error
            _say(f"cannot start the {child.name}: {why}{self._count_exit(child)}")
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, blocked)

    def _stop(self) -> None:
        if self._stopping_since is None:
            self._stopping_since = time.monotonic()
        for child in self.children:
            if child.process is not None and child.process.pid is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(child.process.pid, signal.SIGTERM)

    def _reap_all(self) -> None:
        deadline = (self._stopping_since or time.monotonic()) + self.grace + KILL_AFTER
        for child in self.children:
            if child.process is not None:
                child.process.join(max(0.0, deadline - time.monotonic()))
                if child.process.is_alive():
                    child.process.kill()
                    child.process.join()
                child.process = None

    def _look_at(self, child: Child) -> None:
        """Reap ``child`` if it exited, and have it started again unless stopping."""
        process = child.process
        if process is None or process.is_alive():
            return
        process.join()
        child.process = None
        if self._stopping_since is None:
            what = _described(process.exitcode)
            _say(f"the {child.name} exited ({what}){self._count_exit(child)}")

    def _count_exit(self, child: Child) -> str:
        """Count an unexpected exit (or a start that failed); say what comes next."""
        if _too_many(self._exits):
            self.failed = True
            self._stop()
            return f": {len(self._exits)} unexpected exits in {RESTART_WINDOW:g} s, stopping"
        self._due[child.name] = time.monotonic() + RESTART_PAUSE
        return ": starting it again"


def give_back_freed_memory() -> None:
    """Return the C heap's free pages to the system (glibc's ``malloc_trim(0)``): glibc
    keeps what a process freed, to reuse it, and a start-up frees much. Elsewhere than
    glibc (musl, macOS) there is no such call, and nothing is done."""
    try:
        trim = ctypes.CDLL(None).malloc_trim
    except (AttributeError, OSError):
        return
    trim(0)


def _too_many(exits: deque[float]) -> bool:
    """Count one more unexpected exit in ``exits``: True once there were more than
    RESTARTS within RESTART_WINDOW seconds."""
    now = time.monotonic()
    exits.append(now)
    while exits and now - exits[0] > RESTART_WINDOW:
        exits.popleft()
    return len(exits) > RESTARTS


@dataclass(frozen=True, slots=True)
class _Running:
    pid: int
    wait: Callable[[], int]  # until it exits: its exit code, or minus the signal's number


def _fork(name: str, run: Callable[[], None], parent: int) -> _Running:
    """``run`` in a forked child (as ``_child_main`` runs a Supervisor's children)."""
    pid = os.fork()
    if pid == 0:  # the child: it never returns into the parent's code
        code = 1
        try:
            _child_main(name, run, parent)
            code = 0
        except SystemExit as exit:
            code = exit.code if isinstance(exit.code, int) else 1
        except BaseException:
            log.exception("the %s failed", name)
        finally:
            with contextlib.suppress(Exception):
                sys.stdout.flush()
                sys.stderr.flush()
            os._exit(code)
    return _Running(pid, lambda: os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]))


class Companion:
    """`serve --worker-process`: this process serves the web, and ``run`` (the worker)
    runs in a child of it, started again whenever it exits on its own.

    The first child is forked while this process holds no database connection, no
    other thread and no running event loop (what it ran before, it has closed): the
    two then share the pages of everything loaded (copy-on-write), and hold less memory
    between them than `serve --web-only` beside a `fediblog worker` started on its own
    (tests/bench/README.md). One started again is such a process
    (``respawn(parent pid)`` is its command): a fork of a process that runs threads
    and an event loop could inherit a lock some thread held, or the database's
    connections. It is told to stop with this one, even one killed outright.

    The policy is the Supervisor's: a pause of RESTART_PAUSE before each start, and
    more than RESTARTS unexpected exits within RESTART_WINDOW stop the web process too
    (SIGTERM to itself: requests get their grace period), which then exits 1.
    """

    def __init__(
        self,
        name: str,
        run: Callable[[], None],
        respawn: Callable[[int], list[str]],
        *,
        grace: float,
    ) -> None:
        self.name = name
        self.failed = False  # it kept exiting: the web process was asked to stop
        self._run = run
        self._respawn = respawn
        self._grace = grace
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._exits: deque[float] = deque()
        self._running: _Running | None = None
        self._watcher = threading.Thread(target=self._watch, name=f"{name} watcher", daemon=True)

    def start(self) -> None:
        """Fork the child; call while no other thread and no event loop runs."""
        # What is loaded now stays out of both processes' garbage collections (the
        # permanent generation): a full collection writes to every object it visits,
        # and each page it writes to would be one more the two no longer share.
        gc.collect()
        gc.freeze()
        # What the start-up freed goes back to the system rather than into both
        # processes, where the first to reuse a page of it would copy that page.
        give_back_freed_memory()
        self._running = _fork(self.name, self._run, os.getpid())
        self._watcher.start()

    def stop(self) -> None:
        """SIGTERM to the child; killed if it still runs ``grace`` + 5 seconds later."""
        with self._lock:
            self._stopping.set()
            running = self._running
            if running is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(running.pid, signal.SIGTERM)
        self._watcher.join(self._grace + KILL_AFTER)
        with self._lock:
            running = self._running
        if self._watcher.is_alive() and running is not None:
            log.warning("the %s did not stop in time: killing it", self.name)
            with contextlib.suppress(ProcessLookupError):
                os.kill(running.pid, signal.SIGKILL)
            self._watcher.join()

    def _watch(self) -> None:
        while (running := self._running) is not None:
            code = running.wait()
            with self._lock:
                self._running = None
                if self._stopping.is_set():
                    return
                if not self._exited(f"the {self.name} exited ({_described(code)})"):
                    return
            self._start_again()

    def _exited(self, what: str) -> bool:
        """Say ``what`` happened (an exit, a start that failed) and what comes next;
        False once it is one too many."""
        if _too_many(self._exits):
            self.failed = True
            many = f"{len(self._exits)} unexpected exits in {RESTART_WINDOW:g} s"
            _say(f"{what}: {many}, stopping")
            os.kill(os.getpid(), signal.SIGTERM)  # the web process stops as on a signal
            return False
        _say(f"{what}: starting it again")
        return True

    def _start_again(self) -> None:
        while not self._stopping.wait(RESTART_PAUSE):
            with self._lock:
                if self._stopping.is_set():
                    return
                try:
                    command = self._respawn(os.getpid())  # our own: sys.executable -m fediblog
                    child = subprocess.Popen(command, process_group=0)  # noqa: S603
                except OSError as error:
                    what = f"cannot start the {self.name}: {error.strerror or error}"
                    if not self._exited(what):
                        return
                    continue
                self._running = _Running(child.pid, child.wait)
                return
