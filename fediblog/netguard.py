"""The SSRF guard: outbound connections reach public addresses only (ATTACKS.md 22).

An httpcore network backend resolves each host itself, refuses if any address is not
public unicast, and connects to the checked IP, so DNS rebinding has no second lookup
to poison. Every outbound request of fediblog, GETs (``remote``) and deliveries
(``delivery``) alike, goes through ``GuardedTransport``. ``allow_loopback`` is for
tests and benchmarks on 127.0.0.1 only; it is never on by default.

Certificates are verified against the machine's trust store (``truststore``, as pip
does: the ca-certificates bundle on Debian, the Keychain on macOS, the Windows store)
and against ``SSL_CERT_FILE`` / ``SSL_CERT_DIR`` when they are set, with OpenSSL's
meaning (a PEM bundle; a directory of hashed certificates). A company or self-hosted CA
is trusted by installing it in the system's store or by naming it there.

It also keeps httpcore's pool from losing connections to cancellation
(encode/httpcore#1093, open in httpcore 1.0.9): a request cancelled while it waits in
the pool, just as the pool hands it a new connection, leaves that connection
CONNECTING for good, one slot fewer until every request ends in PoolTimeout. Two
rules keep that from happening here:

* requests wait for a slot in ``GuardedTransport`` (a semaphore as large as the pool),
  never inside the pool, which so always has a connection for each request at once;
* ``deadline()`` gives a task's requests a total deadline that every connect, TLS
  handshake, read and write honours as httpcore's own timeout, which closes the
  connection cleanly: a deadline needs no cancellation.
"""

from __future__ import annotations

import asyncio
import functools
import http.cookiejar
import ipaddress
import os
import select
import socket
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

import anyio
import httpcore
import httpx
import truststore

from fediblog.errors import BlockedAddress, ConfigError

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
Resolver = Callable[[str, int], Awaitable[list[str]]]

_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")
# When the current task's requests must be over (time.monotonic()), if it set one.
_DEADLINE: ContextVar[float | None] = ContextVar("fediblog_http_deadline", default=None)


@contextmanager
def deadline(seconds: float) -> Iterator[None]:
    """Requests made in this block, through GuardedTransport, end within ``seconds``.

    Each connect, TLS handshake, read and write (and the wait for a slot) gets at most
    the time left, and fails as httpcore's own timeout when none is: the connection is
    closed and given back, as for any timeout, and nothing is cancelled.
    """
    token = _DEADLINE.set(time.monotonic() + seconds)
    try:
        yield
    finally:
        _DEADLINE.reset(token)


def _time_left(timeout: float | None, expired: type[Exception]) -> float | None:
    """``timeout`` shortened to the current deadline; ``expired`` if it has passed."""
    at = _DEADLINE.get()
    if at is None:
        return timeout
    left = at - time.monotonic()
    if left <= 0:
        raise expired("the request's deadline passed")
    return left if timeout is None else min(timeout, left)


def trusted_context(environ: Mapping[str, str] | None = None) -> ssl.SSLContext:
    """A client TLS context trusting the system's store and SSL_CERT_FILE / SSL_CERT_DIR.

    The variables are loaded here too, not only left to OpenSSL's defaults: then they
    also count where truststore asks the platform's verifier (macOS, Windows), and a
    path that does not exist stops the start-up with its name rather than leaving every
    fetch to fail later with CERTIFICATE_VERIFY_FAILED.

    One context a process for the same variables, shared by every connection pool:
    loading the store takes ~50 ms and a few MB each time, and the app has four pools.
    A certificate added to the store is trusted after a restart, as with any server.
    httpcore sets the context's ALPN list as each connection starts, so the pools that
    share it must speak the same HTTP versions (all of them HTTP/1.1): a pool with
    HTTP/2 would need a context of its own.
    """
    env = os.environ if environ is None else environ
    cafile, capath = env.get("SSL_CERT_FILE") or None, env.get("SSL_CERT_DIR") or None
    for name, value, exists in (
        ("SSL_CERT_FILE", cafile, os.path.isfile),
        ("SSL_CERT_DIR", capath, os.path.isdir),
    ):
        # OpenSSL reads SSL_CERT_DIR as a list of folders, ':'-separated on POSIX.
        missing = [p for p in (value or "").split(os.pathsep) if p and not exists(p)]
        if missing:
            raise ConfigError(f"{name}: {missing[0]} does not exist")
    return _trusting(cafile, capath)


@functools.lru_cache(maxsize=8)
def _trusting(cafile: str | None, capath: str | None) -> ssl.SSLContext:
    """The context of ``trusted_context`` (a failure is not cached: it raises)."""
    context = truststore.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    if cafile or capath:
        try:
            context.load_verify_locations(cafile=cafile, capath=capath)
        except ssl.SSLError as error:
            raise ConfigError(
                f"SSL_CERT_FILE {cafile} holds no usable certificate: {error}"
            ) from error
    return context


def untrusted_certificate(error: BaseException) -> ssl.SSLCertVerificationError | None:
    """The certificate failure behind ``error`` (a failed fetch, through httpx's and
    httpcore's wrappers), if a certificate we do not trust is why it failed."""
    seen: BaseException | None = error
    for _ in range(8):  # a cause chain is short; a cycle must not hang us
        if seen is None or isinstance(seen, ssl.SSLCertVerificationError):
            return seen
        seen = seen.__cause__ or seen.__context__
    return None


def address_allowed(ip: IPAddress, *, allow_loopback: bool = False) -> bool:
    """True if fediblog may connect to ``ip``: a public unicast address."""
    if isinstance(ip, ipaddress.IPv6Address):
        # IPv6 forms that carry an IPv4 address reach that IPv4 host: judge it instead.
        embedded = ip.ipv4_mapped or ip.sixtofour
        if embedded is None and ip in _NAT64:
            embedded = ipaddress.IPv4Address(ip.packed[-4:])
        if embedded is not None:
            return address_allowed(embedded, allow_loopback=allow_loopback)
    if allow_loopback and ip.is_loopback:
        return True
    # is_global alone lets some multicast ranges through (224.0.0.1 counts as global).
    return ip.is_global and not ip.is_multicast and not ip.is_reserved


async def resolve_host(host: str, port: int) -> list[str]:
    """All addresses ``host`` resolves to, in resolver order, without duplicates."""
    infos = await anyio.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


class GuardedBackend(httpcore.AsyncNetworkBackend):
    """An httpcore network backend that only connects to allowed addresses.

    httpcore hands ``connect_tcp`` the URL's host name and calls ``start_tls`` with
    ``server_hostname`` separately, so connecting to a checked IP here keeps SNI and
    certificate checks on the name. Every address of the name must pass: a name that
    resolves to one public and one private address is refused rather than tried in order.
    """

    def __init__(self, *, allow_loopback: bool, resolve: Resolver = resolve_host) -> None:
        self._allow_loopback = allow_loopback
        self._resolve = resolve
        self._inner = httpcore.AnyIOBackend()

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,  # noqa: ASYNC109 - httpcore's interface
        local_address: str | None = None,
        socket_options: Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        timeout = _time_left(timeout, httpcore.ConnectTimeout)
        try:
            with anyio.fail_after(timeout):
                found = await self._resolve(host, port)
        except TimeoutError:
            raise httpcore.ConnectTimeout(f"resolving {host} timed out") from None
        except OSError as error:
            raise httpcore.ConnectError(f"cannot resolve {host}: {error}") from error
        addresses = [ipaddress.ip_address(text.partition("%")[0]) for text in found]
        for ip in addresses:
            if not address_allowed(ip, allow_loopback=self._allow_loopback):
                raise BlockedAddress(f"{host} resolves to a non-public address ({ip})")
        failure = httpcore.ConnectError(f"cannot connect to {host}")
        for ip in addresses:
            try:
                stream = await self._inner.connect_tcp(
                    str(ip),
                    port,
                    _time_left(timeout, httpcore.ConnectTimeout),
                    local_address,
                    socket_options,
                )
            except httpcore.ConnectError as error:
                failure = error
            else:
                return _DeadlineStream(stream)
        raise failure

    async def sleep(self, seconds: float) -> None:
        await self._inner.sleep(seconds)


class _DeadlineStream(httpcore.AsyncNetworkStream):
    """A connection whose every operation ends by the deadline of the task using it.

    Read at each call, so a connection kept alive serves each request with its own.
    """

    def __init__(self, inner: httpcore.AsyncNetworkStream) -> None:
        self._inner = inner
        self._socket: socket.socket | None = inner.get_extra_info("socket")

    async def read(self, max_bytes: int, timeout: float | None = None) -> bytes:  # noqa: ASYNC109
        return await self._inner.read(max_bytes, _time_left(timeout, httpcore.ReadTimeout))

    async def write(self, buffer: bytes, timeout: float | None = None) -> None:  # noqa: ASYNC109
        await self._inner.write(buffer, _time_left(timeout, httpcore.WriteTimeout))

    async def aclose(self) -> None:
        await self._inner.aclose()

    async def start_tls(
        self,
        ssl_context: ssl.SSLContext,
        server_hostname: str | None = None,
        timeout: float | None = None,  # noqa: ASYNC109 - httpcore's interface
    ) -> httpcore.AsyncNetworkStream:
        left = _time_left(timeout, httpcore.ConnectTimeout)
        try:
            stream = await self._inner.start_tls(ssl_context, server_hostname, left)
        except httpcore.ConnectError as error:
            cause = error.__cause__
            if not isinstance(cause, ssl.SSLCertVerificationError):
                raise
            # OpenSSL's own words name neither the host nor the way out.
            raise httpcore.ConnectError(
                f"the TLS certificate of {server_hostname} is not trusted"
                f" ({cause.verify_message}): its CA is in neither the system's trust"
                " store nor SSL_CERT_FILE / SSL_CERT_DIR"
            ) from cause
        return _DeadlineStream(stream)

    def get_extra_info(self, info: str) -> Any:
        # httpcore's pool asks each idle connection whether it is readable (closed by
        # the server) every time it places or releases a request; anyio rebuilds its
        # table of socket attributes for each such question. A stream's socket never
        # changes, so it is looked up once, in __init__.
        if info == "is_readable":
            return _readable(self._socket)
        if info == "socket":
            return self._socket
        return self._inner.get_extra_info(info)


def _readable(sock: socket.socket | None) -> bool:
    """Whether reading would not block: data, or the peer closed (httpcore's meaning)."""
    if sock is None or sock.fileno() < 0:
        return True
    if not hasattr(select, "poll"):  # Windows
        return bool(select.select([sock], [], [], 0)[0])
    poller = select.poll()
    poller.register(sock, select.POLLIN)
    return bool(poller.poll(0))


class _SlotStream(httpx.AsyncByteStream):
    """A response body that gives its transport slot back when it is closed."""

    def __init__(self, inner: httpx.AsyncByteStream, release: Callable[[], None]) -> None:
        self._inner = inner
        self._release: Callable[[], None] | None = release

    async def __aiter__(self) -> AsyncIterator[bytes]:
        async for chunk in self._inner:
            yield chunk

    async def aclose(self) -> None:
        try:
            await self._inner.aclose()
        finally:
            release, self._release = self._release, None
            if release is not None:
                release()


@dataclass
class _HostSlots:
    """The requests one origin may have at once, and how many hold or wait for one."""

    slots: asyncio.Semaphore
    users: int = 0


class NoCookies(http.cookiejar.CookieJar):
    """A cookie jar that keeps nothing: the one every outbound client of the blog uses.

    The blog talks to other servers, not as a browser. httpx's own jar keeps every
    Set-Cookie it is answered with for the life of the client (the process), and sends
    them back on later requests to that server: a fediverse server could track the blog
    across fetches that way, and a hostile one, answering each fetch a stranger points
    the blog at with a hundred new cookies, could grow the jar without end.
    """

    def set_cookie(self, cookie: http.cookiejar.Cookie) -> None:
        pass

    def extract_cookies(self, response: Any, request: Any) -> None:
        pass


# Seconds an idle connection stays in the pool. Below 5 s, the idle timeout of uvicorn,
# Apache and Node.js by default: at httpx's 5 s, a connection idle for just under 5 s was
# taken again as such a server closed it, and the request failed with a ReadError (4 in
# 320 requests in bursts 5 s apart; a delivery then waits for its retry 30 s later).
KEEPALIVE_EXPIRY = 4.0


class GuardedTransport(httpx.AsyncHTTPTransport):
    """httpx's own transport, with its connection pool connecting through GuardedBackend.

    At most ``max_connections`` requests are in the pool at once, and with
    ``max_per_host`` at most that many to one origin (scheme, host, port); the others
    wait for a slot here, for as long as the request's pool timeout (see the module
    docstring). The per-origin cap is politeness, and it keeps httpcore's pool small
    when many requests go to one server: the pool looks at every connection it holds
    each time it places or gives back a request, so 64 connections to one origin cost
    more CPU per request than 8 of them kept alive and taken in turn.
    """

    def __init__(
        self,
        *,
        allow_loopback: bool,
        resolve: Resolver = resolve_host,
        max_connections: int = 100,
        max_per_host: int | None = None,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        ssl_context = ssl_context or trusted_context()
        # The context is passed here too, or httpx would load certifi's bundle into a
        # context of its own (~50 ms) for the pool that is thrown away just below.
        super().__init__(verify=ssl_context, trust_env=False)
        # httpx 0.28 takes no network backend (encode/httpx#3749 is still open), so the
        # pool it just built is swapped for one with the guard; its defaults are kept,
        # but for how long an idle connection is kept (KEEPALIVE_EXPIRY).
        self._pool = httpcore.AsyncConnectionPool(
            ssl_context=ssl_context,
            max_connections=max_connections,
            max_keepalive_connections=20,
            keepalive_expiry=KEEPALIVE_EXPIRY,
            network_backend=GuardedBackend(allow_loopback=allow_loopback, resolve=resolve),
        )
        self._slots = asyncio.Semaphore(max_connections)
        self._per_host = max_per_host
        self._hosts: dict[tuple[bytes, bytes, int | None], _HostSlots] = {}

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        host = await self._take_host(request) if self._per_host else None
        try:
            await _take(self._slots, request)
        except BaseException:
            self._give_host(host)
            raise

        def release() -> None:
            self._slots.release()
            self._give_host(host)

        try:
            response = await super().handle_async_request(request)
        except BaseException:
            release()
            raise
        assert isinstance(response.stream, httpx.AsyncByteStream)
        response.stream = _SlotStream(response.stream, release)
        return response

    async def _take_host(self, request: httpx.Request) -> tuple[bytes, bytes, int | None]:
        assert self._per_host is not None
        url = request.url
        key = (url.raw_scheme, url.raw_host, url.port)
        host = self._hosts.get(key)
        if host is None:
            host = self._hosts[key] = _HostSlots(asyncio.Semaphore(self._per_host))
        host.users += 1
        try:
            await _take(host.slots, request)
        except BaseException:
            self._give_host(key, taken=False)
            raise
        return key

    def _give_host(self, key: tuple[bytes, bytes, int | None] | None, taken: bool = True) -> None:
        """Give an origin's slot back; forget the origin once nobody holds or wants one."""
        if key is None or (host := self._hosts.get(key)) is None:
            return
        if taken:
            host.slots.release()
        host.users -= 1
        if host.users == 0:
            del self._hosts[key]


async def _take(slots: asyncio.Semaphore, request: httpx.Request) -> None:
    """Take a slot, waiting at most the request's pool timeout (and its deadline)."""
    if not slots.locked():
        await slots.acquire()  # free: taken without waiting
        return
    timeout = request.extensions.get("timeout", {}).get("pool")
    try:
        # Cancelling this wait is harmless: the request holds nothing in the pool yet.
        with anyio.fail_after(_time_left(timeout, httpx.PoolTimeout)):
            await slots.acquire()
    except TimeoutError:
        raise httpx.PoolTimeout("no connection became free in time") from None
