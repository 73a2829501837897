"""The SSRF guard: outbound connections reach public addresses only (ATTACKS.md 22).

An httpcore network backend resolves each host itself, refuses if any address is not
public unicast, and connects to the checked IP, so DNS rebinding has no second lookup
to poison. Every outbound request of fediblog, GETs (``remote``) and deliveries
(``delivery``) alike, goes through ``GuardedTransport``. ``allow_loopback`` is for
tests and benchmarks on 127.0.0.1 only; it is never on by default.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Awaitable, Callable, Iterable

import anyio
import httpcore
import httpx

from fediblog.errors import BlockedAddress

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
Resolver = Callable[[str, int], Awaitable[list[str]]]

_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")


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
                return await self._inner.connect_tcp(
                    str(ip), port, timeout, local_address, socket_options
                )
            except httpcore.ConnectError as error:
                failure = error
        raise failure

    async def sleep(self, seconds: float) -> None:
        await self._inner.sleep(seconds)


class GuardedTransport(httpx.AsyncHTTPTransport):
    """httpx's own transport, with its connection pool connecting through GuardedBackend."""

    def __init__(
        self,
        *,
        allow_loopback: bool,
        resolve: Resolver = resolve_host,
        max_connections: int = 100,
    ) -> None:
        super().__init__(trust_env=False)
        # httpx 0.28 takes no network backend (encode/httpx#3749 is still open), so the
        # pool it just built is swapped for one with the guard; its defaults are kept.
        self._pool = httpcore.AsyncConnectionPool(
            ssl_context=httpx.create_ssl_context(trust_env=False),
            max_connections=max_connections,
            max_keepalive_connections=20,
            keepalive_expiry=5.0,
            network_backend=GuardedBackend(allow_loopback=allow_loopback, resolve=resolve),
        )
