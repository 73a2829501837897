"""The blog's outbound connection pools: how long they keep a connection, what they
cost to build.

Idle connections leave a pool before a server's idle timeout can close them. uvicorn,
Apache and Node.js close a keep-alive connection after 5 s of quiet by default. With
httpx's own 5 s expiry, a connection idle for just under 5 s was taken again as the
server closed it: the request failed with a ReadError, and a delivery waited 30 s for
its retry (seen as a delivery with two attempts in the four-worker drain on PostgreSQL;
bursts of 8 POSTs 5 s apart to uvicorn lost 4 requests in 320). The pool now lets a
connection go after ``KEEPALIVE_EXPIRY`` seconds of quiet. The server is a real uvicorn
with its default idle timeout, on 127.0.0.1; each request records the client port it
came from, so a reused connection shows as the same port.

The app builds four pools (fetches, deliveries, the media proxy, the webhook): they
share one TLS context, loaded once a process, and no pool loads certifi's bundle.
"""

from __future__ import annotations

import asyncio
import ssl
from typing import Any

import httpx
import pytest

from fediblog.netguard import GuardedTransport, trusted_context
from tests.processes import free_port
from tests.test_federation_e2e import serving

pytestmark = [pytest.mark.anyio, pytest.mark.database_free]

SERVER_IDLE_TIMEOUT = 5.0  # uvicorn's default timeout_keep_alive (serving() keeps it)


class PortRecorder:
    """Answers 202 and remembers the client port of each request."""

    def __init__(self) -> None:
        self.ports: list[int] = []

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        assert scope["type"] == "http"
        more = True
        while more:
            message = await receive()
            more = message.get("more_body", False)
        self.ports.append(scope["client"][1])
        await send({"type": "http.response.start", "status": 202, "headers": []})
        await send({"type": "http.response.body", "body": b""})


async def test_a_connection_idle_near_a_5_second_server_timeout_is_not_taken_again() -> None:
    recorder, port = PortRecorder(), free_port()
    url = f"http://127.0.0.1:{port}/inbox"
    with serving(recorder, port):
        transport = GuardedTransport(allow_loopback=True, max_per_host=8)
        async with httpx.AsyncClient(transport=transport) as client:
            answers = [(await client.post(url, content=b"{}")).status_code]
            await asyncio.sleep(1.0)  # well within both timeouts: the same connection
            answers.append((await client.post(url, content=b"{}")).status_code)
            # In the last half second before the server may close it: a new connection.
            await asyncio.sleep(SERVER_IDLE_TIMEOUT - 0.5)
            answers.append((await client.post(url, content=b"{}")).status_code)

    assert answers == [202, 202, 202]
    first, again, later = recorder.ports
    assert again == first  # kept alive and reused while the server keeps it too
    assert later != first


def test_the_pools_share_one_tls_context_and_load_no_other(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    shared = trusted_context()
    loaded: list[object] = []
    real = ssl.SSLContext.load_verify_locations

    def counted(self: ssl.SSLContext, *args: Any, **kwargs: Any) -> None:
        loaded.append(args or kwargs)
        real(self, *args, **kwargs)

    monkeypatch.setattr(ssl.SSLContext, "load_verify_locations", counted)

    pools = [GuardedTransport(allow_loopback=False) for _ in range(4)]

    assert loaded == []  # neither the system's store again nor certifi's bundle
    assert trusted_context() is shared
    assert all(pool._pool._ssl_context is shared for pool in pools)
