"""The HTTP server: uvicorn, configured so that no client can hold the process or a slot.

This module owns the listening socket, uvicorn's settings, and the client deadlines:

* a request head (request line and headers) must arrive within ``header`` seconds of
  the connection, or of the previous response: uvicorn has no such limit, so
  ``HeadDeadlineProtocol`` (its httptools protocol plus one timer) adds it;
* a request body must arrive within ``body`` seconds of its head, or the request
  is answered 408 and the connection closed (``BodyDeadline``, around the whole app);
  a signed-in author's request to the desk gets ``upload`` seconds (an image from a
  phone), which the desk's guard asks for once it has seen the session;
* an idle keep-alive connection is closed after ``keep_alive`` seconds (uvicorn's);
* on SIGTERM or SIGINT, requests get ``shutdown`` seconds to finish, then the
  process ends: the systemd unit's TimeoutStopSec must be longer.

Without them, three slow uploads kept a stopping server alive until systemd killed it,
and a client that connected and sent nothing held its connection forever.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import logging
import signal
import socket
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import uvicorn
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from fediblog.errors import ConfigError, FediblogError
from fediblog.web.admin.guard import UPLOAD_DEADLINE

log = logging.getLogger("fediblog.server")

_TIMEOUT_BODY = b"408: the request took too long to arrive\n"


@dataclass(frozen=True, slots=True)
class Timeouts:
    """Client deadlines and the shutdown grace period, in seconds."""

    header: int = 10
    body: int = 30
    upload: int = 300  # a body to the desk, from a signed-in author (web/admin/guard.py)
    keep_alive: int = 5
    shutdown: int = 10


class HeadDeadlineProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol, closing connections whose request head is late.

    The timer runs from connection_made, and again from the end of each response,
    until the head is complete (``on_headers_complete``). uvicorn's own keep-alive
    timer only starts after a response and stops at the first byte of the next
    request, so without this a client could connect, send half a head, and wait.
    """

    header_timeout: float = 10.0  # set per server by _protocol_class

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        self._head_timer: asyncio.TimerHandle | None = None
        self._head_bytes = False
        super().connection_made(transport)
        self._arm_head_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm_head_timer()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._head_timer is not None:
            self._head_bytes = True
        super().data_received(data)

    def on_headers_complete(self) -> None:
        self._disarm_head_timer()
        super().on_headers_complete()

    def on_response_complete(self) -> None:
        next_head_complete = bool(self.pipeline)  # a pipelined request already has its head
        super().on_response_complete()
        if not next_head_complete and not self.transport.is_closing():
            self._arm_head_timer()

    def _arm_head_timer(self) -> None:
        self._disarm_head_timer()
        self._head_bytes = False
        self._head_timer = self.loop.call_later(self.header_timeout, self._head_timed_out)

    def _disarm_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if self.transport.is_closing():
            return
        if self._head_bytes:  # a slow client deserves to know; a silent one gets nothing
            self.transport.write(
                b"HTTP/1.1 408 Request Timeout\r\ncontent-type: text/plain; charset=utf-8\r\n"
                b"content-length: %d\r\nconnection: close\r\n\r\n%s"
                % (len(_TIMEOUT_BODY), _TIMEOUT_BODY)
            )
        self.transport.close()


def _protocol_class(header_timeout: float) -> type[HeadDeadlineProtocol]:
    class Protocol(HeadDeadlineProtocol):
        pass

    Protocol.header_timeout = header_timeout
    return Protocol


class BodyDeadline:
    """Cuts a request whose body is not complete ``timeout`` seconds after its head.

    The app then reads an ``http.disconnect`` (as if the client had gone), whatever it
    answers is dropped, and the client gets 408 with ``connection: close``. Reads after
    the body (waiting for a disconnect while streaming) are not limited.

    The app may give a request the longer ``upload`` deadline, from the same head, by
    calling the scope's ``UPLOAD_DEADLINE`` entry before it reads the body.
    """

    def __init__(self, app: ASGIApp, timeout: float, upload: float = 0) -> None:
        self.app = app
        self.timeout = timeout
        self.upload = max(upload, timeout)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        loop = asyncio.get_running_loop()
        head = loop.time()
        deadline = head + self.timeout
        body_done = timed_out = started = False

        def allow_upload() -> None:
            nonlocal deadline
            deadline = head + self.upload

        scope[UPLOAD_DEADLINE] = allow_upload
        # uvicorn's receive, when what it would return has already arrived (a small body
        # comes with its head), answers without waiting: no timer is needed for it, and a
        # timer per request was ~5% of an inbox POST's CPU. Anything else: the timer.
        arrived = getattr(getattr(receive, "__self__", None), "message_event", None)
        if not isinstance(arrived, asyncio.Event):
            arrived = None

        async def receive_in_time() -> Message:
            nonlocal body_done, timed_out
            if body_done:
                return await receive()
            if not timed_out and arrived is not None and arrived.is_set():
                message = await receive()
                if message["type"] != "http.request" or not message.get("more_body"):
                    body_done = True
                return message
            if not timed_out and loop.time() < deadline:
                try:
                    async with asyncio.timeout_at(deadline):
                        message = await receive()
                except TimeoutError:
                    pass
                else:
                    if message["type"] != "http.request" or not message.get("more_body"):
                        body_done = True
                    return message
            timed_out = True
            return {"type": "http.disconnect"}

        async def send_unless_cut(message: Message) -> None:
            nonlocal started
            if timed_out:
                return  # the app's answer to a body it never got; 408 goes instead
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, receive_in_time, send_unless_cut)
        except Exception:
            if not timed_out:
                raise  # a disconnect the app did not expect is ours, not a bug to log
        if timed_out and not started:
            await send(
                {
                    "type": "http.response.start",
                    "status": 408,
                    "headers": [
                        (b"content-type", b"text/plain; charset=utf-8"),
                        (b"content-length", str(len(_TIMEOUT_BODY)).encode()),
                        (b"connection", b"close"),
                    ],
                }
            )
            await send({"type": "http.response.body", "body": _TIMEOUT_BODY})


class _QuietCancellation(logging.Filter):
    """One line, not a traceback, for requests cancelled when the grace period ends."""

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        if isinstance(error, asyncio.CancelledError):
            record.msg = "a request was cut short: the shutdown grace period ended"
            record.levelno, record.levelname = logging.WARNING, "WARNING"
            record.args = ()
            record.exc_info = None
            record.exc_text = None
        return True


# Linux spreads the new connections of a port evenly among the sockets listening on it
# with SO_REUSEPORT. Elsewhere SO_REUSEPORT does not, and the web processes share one.
SPREADS = sys.platform == "linux" and hasattr(socket, "SO_REUSEPORT")


def bind(host: str, port: int, *, spread: bool = False) -> socket.socket:
    """The listening socket, bound before the app starts, so a taken port is one line;
    ``serve_on`` serves it, in this process or in several. ``spread``: for `serve
    --workers N`, whose web processes then each listen on a socket of their own
    (``socket_of_its_own``) where the system can spread connections among them."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
    except OSError as error:
        raise ConfigError(f"cannot listen on {host}:{port}: {error.strerror or error}") from None
    sock = _bound(family, kind, proto, address, host, port, reuse_port=False)
    if spread and SPREADS:
        # Bound first without SO_REUSEPORT, which fails if anything else is bound to the
        # port, even another fediblog's sockets that have it: two servers never share one.
        sock.close()
        sock = _bound(family, kind, proto, address, host, port, reuse_port=True)
    return sock


def _bound(
    family: int, kind: int, proto: int, address: Any, host: str, port: int, *, reuse_port: bool
) -> socket.socket:
    try:
        sock = socket.socket(family, kind, proto)
    except OSError as error:
        raise ConfigError(f"cannot listen on {host}:{port}: {error.strerror or error}") from None
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(address)
    except OSError as error:
        sock.close()
        raise ConfigError(
            f"cannot listen on {host}:{port}: {error.strerror or error}"
            " (is another server using it? choose another --port)"
        ) from None
    return sock


def socket_of_its_own(shared: socket.socket) -> socket.socket:
    """For one web process of `serve --workers N`: a socket of its own on the address
    of ``shared`` (bound with ``spread``, never listened on), which it closes.

    All of them accepting from one socket leaves each new connection to whichever
    process wakes first, and uvloop then accepts all that wait: one process took most
    of a burst of connections and the other sat idle (1,019 group commits against 79
    in one flood of the inbox). With a socket each, Linux hands each connection to one
    of them by its addresses, evenly. Where it cannot (not Linux, or the bind fails),
    the process serves ``shared`` as before.
    """
    if not SPREADS or not shared.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT):
        return shared
    address = shared.getsockname()
    family, kind, proto = shared.family, shared.type, shared.proto
    try:
        own = _bound(family, kind, proto, address, address[0], address[1], reuse_port=True)
    except ConfigError:
        return shared
    shared.close()
    return own


def serve(app: ASGIApp, host: str, port: int, timeouts: Timeouts | None = None) -> None:
    """Serve ``app`` on host:port until SIGINT or SIGTERM; return once it has stopped."""
    sock = bind(host, port)
    try:
        serve_on(app, sock, timeouts)
    finally:
        sock.close()


def prepared(app: ASGIApp, timeouts: Timeouts | None = None) -> uvicorn.Server:
    """uvicorn's server for ``app``, its classes already imported (the HTTP protocol,
    the lifespan, the event loop): ``serve_on`` runs it. `serve --worker-process`
    prepares it before it forks the worker, so that what this loads is loaded once and
    shared by the two processes rather than loaded by the web process alone after."""
    timeouts = timeouts or Timeouts()
    config = uvicorn.Config(
        BodyDeadline(app, timeouts.body, timeouts.upload),
        http=_protocol_class(timeouts.header),
        ws="none",
        lifespan="on",
        proxy_headers=True,
        forwarded_allow_ips="127.0.0.1",
        server_header=False,
        log_level="info",
        access_log=False,
        timeout_keep_alive=timeouts.keep_alive,
        timeout_graceful_shutdown=timeouts.shutdown,
    )
    config.load()
    config.get_loop_factory()
    # Starlette runs on anyio, which imports its asyncio backend when first used.
    importlib.import_module("anyio._backends._asyncio")
    # uvicorn.Config has just configured its loggers; this one reports cancelled requests.
    logging.getLogger("uvicorn.error").addFilter(_QuietCancellation())
    return uvicorn.Server(config)


@contextlib.contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """While the block runs, SIGTERM ends it as SIGINT does: with KeyboardInterrupt.

    uvicorn stops gracefully on either, then raises the signal again for the handler
    that was there before it; Python's default for SIGTERM would end the process at
    once, before its caller's own clean-up (`serve --worker-process` stops its worker
    and waits for it) had run, and with an exit status that says "killed"."""
    if threading.current_thread() is not threading.main_thread():
        yield  # only the main thread handles signals (uvicorn's too)
        return
    previous = signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def serve_on(
    app: ASGIApp | uvicorn.Server, sock: socket.socket, timeouts: Timeouts | None = None
) -> None:
    """Serve ``app`` (or a server ``prepared`` for it) on a bound socket until SIGINT or
    SIGTERM; the caller closes it. Several processes may serve one socket (``fediblog
    serve --workers N`` where ``socket_of_its_own`` cannot give each its own): the kernel
    hands each new connection to one of them."""
    server = app if isinstance(app, uvicorn.Server) else prepared(app, timeouts)
    try:
        with _sigterm_as_interrupt():
            server.run(sockets=[sock])
    except KeyboardInterrupt:
        pass  # uvicorn re-raises the signal it handled: the graceful stop is done
    except SystemExit:
        # uvicorn exits like this when the app's start-up failed; it logged why.
        raise FediblogError("the server did not start: see the messages above") from None
