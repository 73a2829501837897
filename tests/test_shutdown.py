"""`fediblog serve` as a process on 127.0.0.1, against clients that are slow or silent.

Raw sockets play the clients: three uploads that trickle while the server is told to
stop, a connection that sends nothing, half a request head, a body that never ends,
an idle keep-alive connection. Timeouts are set small through FEDIBLOG_* settings so
each test takes a few seconds; every wait is bounded.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from fediblog.config import Settings
from tests import processes
from tests.processes import free_port

ROOT = Path(__file__).resolve().parent.parent


@dataclass
class Served:
    process: subprocess.Popen[bytes]
    port: int
    log: Path

    def connect(self) -> socket.socket:
        return socket.create_connection(("127.0.0.1", self.port), timeout=10)


def start(folder: Path, **timeouts: int) -> Served:
    """`fediblog init`, then `fediblog serve` with these FEDIBLOG_*_TIMEOUT values."""
    folder.mkdir(exist_ok=True)
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("FEDIBLOG_")}
    env.update(
        FEDIBLOG_CONFIG=str(folder / "absent.toml"),
        FEDIBLOG_BASE_URL=f"http://127.0.0.1:{port}",
        FEDIBLOG_ALLOW_HTTP="1",
        **{f"FEDIBLOG_{name.upper()}_TIMEOUT": str(value) for name, value in timeouts.items()},
    )
    command = [sys.executable, "-m", "fediblog"]
    subprocess.run([*command, "init"], cwd=folder, env=env, check=True, capture_output=True)
    log = folder / "server.log"
    with log.open("wb") as sink:
        process = subprocess.Popen(
            [*command, "serve", "--port", str(port)],
            cwd=folder,
            env=env,
            stdout=sink,
            stderr=subprocess.STDOUT,
        )
    served = Served(process, port, log)
    deadline = time.monotonic() + 20
    while True:  # until it answers (bounded)
        try:
            httpx.get(f"http://127.0.0.1:{port}/about", timeout=1, trust_env=False)
            return served
        except httpx.TransportError:
            if process.poll() is not None or time.monotonic() > deadline:
                stop(served)
                raise AssertionError(f"the server did not start:\n{log.read_text()}") from None
            time.sleep(0.05)


def stop(served: Served) -> None:
    processes.stop(served.process)


def closed_after(sock: socket.socket, limit: float) -> tuple[float, bytes]:
    """Seconds until the server closed ``sock`` (and what it sent first), at most ``limit``."""
    started = time.monotonic()
    received = b""
    sock.settimeout(limit)
    try:
        while chunk := sock.recv(4096):
            received += chunk
    except TimeoutError:
        raise AssertionError(f"still open after {limit} s") from None
    except ConnectionResetError:
        pass
    return time.monotonic() - started, received


# ---- stopping with slow uploads in flight ------------------------------------------------


def upload_head(port: int, length: int) -> bytes:
    return (
        f"POST /inbox HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
        f"Content-Type: application/activity+json\r\nContent-Length: {length}\r\n\r\n"
    ).encode()


def test_sigterm_with_slow_uploads_exits_within_the_grace_period(tmp_path: Path) -> None:
    # Bodies may take a minute and heads too: only the shutdown grace period (2 s) can
    # end these requests. Before it existed, the process waited for the clients.
    served = start(tmp_path / "blog", shutdown=2, body=60, header=60)
    stop_trickling = threading.Event()
    uploads = [served.connect() for _ in range(3)]

    def trickle(sock: socket.socket) -> None:
        try:
            while not stop_trickling.wait(0.2):
                sock.sendall(b" ")
        except OSError:
            pass  # the server closed it: that is the point

    try:
        for sock in uploads:
            sock.sendall(upload_head(served.port, 500_000) + b"{")
        threads = [threading.Thread(target=trickle, args=(sock,), daemon=True) for sock in uploads]
        for thread in threads:
            thread.start()
        time.sleep(0.5)  # the three requests are inside the app, reading their bodies

        started = time.monotonic()
        served.process.send_signal(signal.SIGTERM)
        try:
            served.process.wait(timeout=2 + 4)
        except subprocess.TimeoutExpired:
            raise AssertionError("still running 4 s after the 2 s grace period") from None
        took = time.monotonic() - started
    finally:
        stop_trickling.set()
        for sock in uploads:
            sock.close()
        stop(served)
    print(f"stopped {took:.1f} s after SIGTERM with three slow uploads")
    assert took >= 1.5  # it did give the requests their grace period
    assert served.process.returncode == 0  # a clean stop, as on Ctrl-C: not "killed"
    log = served.log.read_text()
    assert "Traceback" not in log
    assert "the shutdown grace period ended" in log


# ---- client deadlines -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def quick(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    """A server with 2 s head, 2 s body and 1 s keep-alive deadlines (keep-alive the
    shortest, so the idle test can tell which one closed the connection)."""
    served = start(tmp_path_factory.mktemp("quick"), header=2, body=2, keep_alive=1, shutdown=2)
    yield served
    stop(served)
    assert "Traceback" not in served.log.read_text()


def test_a_connection_that_sends_nothing_is_closed(quick: Served) -> None:
    with quick.connect() as silent:
        took, received = closed_after(silent, 2 + 3)
    assert took >= 1.8
    assert received == b""  # nothing asked, nothing answered


def test_half_a_request_head_is_answered_408_and_closed(quick: Served) -> None:
    with quick.connect() as slow:
        slow.sendall(b"GET /about HTTP/1.1\r\nHost: 127.0.0.1\r\nUser-Agent: slo")
        took, received = closed_after(slow, 2 + 3)
    assert took >= 1.8
    assert received.startswith(b"HTTP/1.1 408 ")


def test_a_head_sent_slowly_within_the_deadline_is_served(quick: Served) -> None:
    with quick.connect() as sock:
        for part in (b"GET /about HTTP/1.1\r\n", b"Host: 127.0.0.1\r\n", b"\r\n"):
            sock.sendall(part)
            time.sleep(0.25)
        sock.settimeout(5)
        assert sock.recv(4096).startswith(b"HTTP/1.1 200 ")


def test_a_body_that_trickles_is_cut_with_408(quick: Served) -> None:
    with quick.connect() as sock:
        sock.sendall(upload_head(quick.port, 10_000) + b"{")
        started = time.monotonic()
        sock.settimeout(0.3)
        received = b""
        while time.monotonic() - started < 2 + 3:  # a byte now and then, never enough
            try:
                sock.sendall(b" ")
                chunk = sock.recv(4096)
            except TimeoutError:
                continue
            except (BrokenPipeError, ConnectionResetError):
                break
            if not chunk:
                break
            received += chunk
        took = time.monotonic() - started
    assert received.startswith(b"HTTP/1.1 408 "), received
    assert b"connection: close" in received.lower()
    assert 1.8 <= took < 2 + 3


def test_an_idle_keep_alive_connection_is_closed(quick: Served) -> None:
    with quick.connect() as sock:
        for _ in range(2):  # the second request proves the connection was kept alive
            sock.sendall(b"GET /about HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            head = b""
            sock.settimeout(5)
            while b"\r\n\r\n" not in head:
                head += sock.recv(65536)
            assert head.startswith(b"HTTP/1.1 200 ")
            match = re.search(rb"content-length: (\d+)", head.lower())
            assert match, head
            body = head.split(b"\r\n\r\n", 1)[1]
            while len(body) < int(match.group(1)):
                body += sock.recv(65536)
            time.sleep(0.3)
        took, _ = closed_after(sock, 1 + 3)
    # About 1 s after the response, minus the 0.3 s already waited; the 2 s head
    # deadline would have closed it only at 1.7 s.
    assert 0.4 <= took < 1.5


def test_systemd_waits_longer_than_the_grace_period() -> None:
    unit = (ROOT / "deploy" / "fediblog.service").read_text()
    match = re.search(r"^TimeoutStopSec=(\d+)$", unit, re.MULTILINE)
    assert match
    assert int(match.group(1)) >= Settings().shutdown_timeout + 10
