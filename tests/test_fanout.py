"""Fan-out: what keeps one post to many inboxes cheap, and what it must not cost.

* GuardedTransport's per-origin cap (``max_per_host``): at most that many requests to
  one server at once, the others waiting their turn, while other servers are not held
  up; the deliveries' pool has it, the GETs' pool does not;
* a connection kept alive that its server closed is noticed before it is reused (the
  transport answers httpcore's "is it readable?" from the socket it looked up once);
* an inbox that answers with an endless body cannot keep a delivery reading it;
* many deliveries through the capped pool: every inbox once, every signature valid for
  pyhttpsig (an independent verifier), every row recorded as sent.

Servers here are plain asyncio servers on loopback, driven by events, never by timing.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import select
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import anyio
import httpx
import pytest
from httpsig import HeaderVerifier
from httpsig.utils import parse_signature_header

from fediblog.delivery import MAX_ANSWER_BYTES, PER_HOST, Deliverer
from fediblog.keys import load_key
from fediblog.models import OutgoingActivity
from fediblog.netguard import GuardedTransport
from fediblog.remote import FetchPolicy, build_transport
from fediblog.web.deps import Services
from tests.conftest import BASE_URL

pytestmark = pytest.mark.anyio

Handler = Callable[[str, str, dict[str, str], bytes], Awaitable[bytes]]


def _answer(status: int = 202, body: bytes = b"") -> bytes:
    return (
        f"HTTP/1.1 {status} X\r\nContent-Length: {len(body)}\r\n\r\n".encode("ascii") + body
    )


class Server:
    """An HTTP/1.1 server on loopback whose answers a test decides (keep-alive)."""

    def __init__(self, host: str, handler: Handler) -> None:
        self.host = host
        self.handler = handler
        self.connections = 0
        self.port = 0

    def url(self, path: str) -> str:
        return f"http://{self.host}:{self.port}{path}"

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                line, *fields = head.decode("latin-1").split("\r\n")
                method, target, _ = line.split(" ", 2)
                headers = {
                    name.strip().lower(): value.strip()
                    for name, _, value in (field.partition(":") for field in fields if field)
                }
                body = await reader.readexactly(int(headers.get("content-length", "0")))
                answer = await self.handler(method, target, headers, body)
                if not answer:
                    return  # close without answering more
                writer.write(answer)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


@asynccontextmanager
async def server(handler: Handler, host: str = "127.0.0.1") -> AsyncIterator[Server]:
    found = Server(host, handler)
    listening = await asyncio.start_server(found.serve, host, 0)
    found.port = listening.sockets[0].getsockname()[1]
    try:
        yield found
    finally:
        listening.close()


async def test_at_most_max_per_host_requests_to_one_server_at_once() -> None:
    """Six requests to one server through a cap of two: two reach it, the others wait
    their turn; meanwhile another server (another origin) is answered at once."""
    arrived: list[str] = []
    release = asyncio.Event()
    two_in = asyncio.Event()

    async def held(method: str, target: str, headers: dict[str, str], body: bytes) -> bytes:
        arrived.append(target)
        if len(arrived) == 2:
            two_in.set()
        await release.wait()
        return _answer()

    async def quick(method: str, target: str, headers: dict[str, str], body: bytes) -> bytes:
        return _answer(200, b"hello")

    transport = GuardedTransport(allow_loopback=True, max_connections=10, max_per_host=2)
    async with (
        server(held) as busy,
        server(quick, host="127.0.0.2") as other,
        httpx.AsyncClient(transport=transport, timeout=30) as client,
    ):
        with anyio.fail_after(10):
            sent = [
                asyncio.ensure_future(client.post(busy.url(f"/{n}"), content=b"x"))
                for n in range(6)
            ]
            await two_in.wait()
            # Not timing: the other origin's answer comes while the first still holds two.
            assert (await client.get(other.url("/"))).text == "hello"
            assert len(arrived) == 2
            assert len(transport._hosts) == 1  # the busy origin: two in, four waiting
            release.set()
            answers = await asyncio.gather(*sent)
        assert [answer.status_code for answer in answers] == [202] * 6
        assert sorted(arrived) == [f"/{n}" for n in range(6)]
        assert busy.connections <= 2  # connections kept alive and taken in turn
        assert transport._hosts == {}  # an origin nobody waits for is forgotten


async def test_a_request_waiting_for_its_server_gives_up_at_its_pool_timeout() -> None:
    release, arrived = asyncio.Event(), asyncio.Event()

    async def held(method: str, target: str, headers: dict[str, str], body: bytes) -> bytes:
        arrived.set()
        await release.wait()
        return _answer()

    transport = GuardedTransport(allow_loopback=True, max_per_host=1)
    async with server(held) as busy, httpx.AsyncClient(transport=transport) as client:
        first = asyncio.ensure_future(client.get(busy.url("/first"), timeout=30))
        with anyio.fail_after(10):
            await arrived.wait()
            with pytest.raises(httpx.PoolTimeout):
                await client.get(busy.url("/second"), timeout=httpx.Timeout(30, pool=0.05))
            release.set()
            assert (await first).status_code == 202
        assert transport._hosts == {}  # the one that gave up gave its place back too


async def test_the_delivery_pool_is_capped_per_host_and_the_fetch_pool_is_not() -> None:
    policy = FetchPolicy(allow_http=True, allow_private_addresses=True)
    deliveries, fetches = build_transport(policy, max_per_host=PER_HOST), build_transport(policy)
    assert isinstance(deliveries, GuardedTransport)
    assert isinstance(fetches, GuardedTransport)
    assert deliveries._per_host == PER_HOST
    assert fetches._per_host is None


async def test_a_kept_alive_connection_the_server_closed_is_not_reused() -> None:
    """The server answers, then closes the connection. The next request must go out on
    a new connection, not fail on the dead one: the pool asks the transport whether the
    idle connection is readable (it is: end of file) and drops it."""
    closed = asyncio.Event()
    answered = 0

    async def once(method: str, target: str, headers: dict[str, str], body: bytes) -> bytes:
        nonlocal answered
        answered += 1
        return _answer(200, b"ok")

    async def serve_once(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        host.connections += 1
        head = await reader.readuntil(b"\r\n\r\n")
        assert head.startswith(b"GET ")
        writer.write(await once("GET", "/", {}, b""))
        await writer.drain()
        writer.close()
        await writer.wait_closed()
        closed.set()

    host = Server("127.0.0.1", once)
    listening = await asyncio.start_server(serve_once, "127.0.0.1", 0)
    host.port = listening.sockets[0].getsockname()[1]
    transport = GuardedTransport(allow_loopback=True, max_per_host=4)
    try:
        async with httpx.AsyncClient(transport=transport, timeout=10) as client:
            with anyio.fail_after(10):
                assert (await client.get(host.url("/a"))).text == "ok"
                await closed.wait()
                # The FIN is on its way over loopback: wait until our socket has it (if
                # the pool has not dropped the connection already, as it may have).
                for connection in transport._pool.connections:
                    stream: Any = connection._connection._network_stream  # type: ignore[attr-defined]
                    select.select([stream.get_extra_info("socket")], [], [], 5)
                assert (await client.get(host.url("/b"))).text == "ok"
    finally:
        listening.close()
    assert (host.connections, answered) == (2, 2)


async def test_an_endless_answer_is_read_no_further_than_its_cap(services: Services) -> None:
    pulled = 0

    async def endless() -> AsyncIterator[bytes]:
        nonlocal pulled
        while True:
            pulled += 1
            yield b"x" * 4096

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(202, content=endless())

    await _queue(services, ["https://big.example/inbox"])
    key = load_key(services.settings.keys_dir, "blog")
    async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as client:
        deliverer = Deliverer(services.store, client, key, services.urls.key_id)
        with anyio.fail_after(10):
            assert await deliverer.deliver_once() == 1
    assert deliverer.worker.outcomes == {"done": 1}
    assert pulled <= MAX_ANSWER_BYTES // 4096 + 2


async def test_many_inboxes_through_the_capped_pool_each_once_and_validly_signed(
    ctx: Services,
) -> None:
    """120 servers' shared inboxes (paths of one loopback server, as the benchmark has
    them): 120 POSTs, one per inbox, each verified by pyhttpsig with the blog's public
    key, through the production transport capped per host, and all recorded as sent.
    The app runs no workers of its own (``ctx``): its deliverer would take a share."""
    services = ctx
    key = load_key(services.settings.keys_dir, "blog")
    key_id = services.urls.key_id
    verified: dict[str, int] = {}
    invalid: list[str] = []
    in_flight = most = 0

    async def inbox(method: str, target: str, headers: dict[str, str], body: bytes) -> bytes:
        nonlocal in_flight, most
        in_flight += 1
        most = max(most, in_flight)
        await asyncio.sleep(0)  # let the others in, if the cap let them
        in_flight -= 1
        expected = "SHA-256=" + base64.b64encode(hashlib.sha256(body).digest()).decode()
        ok = headers.get("digest") == expected and HeaderVerifier(
            headers, key.public_pem, required_headers=["(request-target)", "host", "date",
            "digest"], method=method, path=target, sign_header="signature",
        ).verify()  # fmt: skip
        if ok and parse_signature_header(headers["signature"])["keyId"] == key_id:
            verified[target] = verified.get(target, 0) + 1
        else:
            invalid.append(target)
        return _answer()

    async with server(inbox) as receiver:
        await _queue(services, [receiver.url(f"/s/{n}/inbox") for n in range(120)])
        policy = FetchPolicy(allow_http=True, allow_private_addresses=True)
        transport = build_transport(policy, max_per_host=PER_HOST)
        async with httpx.AsyncClient(transport=transport) as client:
            deliverer = Deliverer(services.store, client, key, key_id)
            with anyio.fail_after(60):
                assert await deliverer.deliver_once() == 120
        assert receiver.connections <= PER_HOST
    assert invalid == []
    assert verified == {f"/s/{n}/inbox": 1 for n in range(120)}
    assert most <= PER_HOST
    assert await services.store.count_deliveries() == {"sent": 120}


# ---- set-up ------------------------------------------------------------------------


async def _queue(services: Services, inboxes: list[str]) -> None:
    """One Create for each inbox, queued as the store queues any activity."""
    activity = OutgoingActivity(
        f"{BASE_URL}/activities/fanout", "Create", '{"type":"Create","object":{"id":"x"}}'
    )
    for inbox in inboxes:
        await services.store.save_activity_for(activity, inbox)
