"""What strangers can make the blog do on its network: key fetches and connection pools.

An inbox POST names a keyId, and for a keyId never seen the blog must fetch it before it
can tell a good signature from a bad one. So an unsigned caller chooses what the blog
fetches, and these tests check it can choose nothing worse than a bounded, short wait:

* a flood of badly signed POSTs whose keyIds point at a tarpit (a port that accepts TCP
  and never answers) leaves key fetches and deliveries working for everyone else;
* key fetches for unknown actors are capped (globally and per host) and answered 503
  with Retry-After past the caps; one keyId asked for by many requests is fetched once;
* fetches that time out, or whose callers give up, give their connection back
  (encode/httpcore#1093: a request cancelled while the pool hands it a connection
  leaks that connection for good);
* 404s for made-up keyIds on a host never lock that host's real users out;
* 401 bodies say what was wrong with the signature, never what the blog saw on its
  network; badly signed requests store no actor rows.

The blog is the real app (lifespan running, workers off) driven through its ASGI
interface; its outbound requests go over real sockets to small servers on loopback
(127.0.0.1 and 127.0.0.2). Every inbox request carries a real RSA signature by
pyhttpsig: by the right key, or by a key that belongs to nobody.
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import time
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, closing, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

from fediblog.errors import FetchError
from fediblog.netguard import GuardedTransport
from fediblog.remote import Fetcher, FetchPolicy
from fediblog.web.deps import Services
from tests import dbpeek
from tests.conftest import BASE_URL, make_settings
from tests.helpers import running as running_app
from tests.inbox_kit import (
    AP,
    assert_answer,
    body_of,
    follow,
    mastodon,
    public_pem,
    pyhttpsig_headers,
    rsa_key,
    running,
)

pytestmark = pytest.mark.anyio

LOOPBACK = {"allow_http": True, "allow_private_addresses": True}
NOT_VERIFIED = "signature does not verify with the signer's key"
NOT_FETCHED = "the signing key could not be fetched"
PLACEHOLDER_KEY_ID = "https://placeholder.invalid/key"


def stranger() -> rsa.RSAPrivateKey:
    """A real RSA key that belongs to no actor anywhere: its signatures never verify."""
    return rsa_key("stranger")


# ---- servers on loopback ----------------------------------------------------------------


@dataclass
class Tarpit:
    """Ports on 127.0.0.1 that accept every connection and never answer a byte."""

    ports: list[int] = field(default_factory=list)
    accepted: int = 0
    idle: asyncio.Event = field(default_factory=asyncio.Event)  # no connection open
    _waiters: list[tuple[int, asyncio.Event]] = field(default_factory=list)

    def url(self, index: int = 0) -> str:
        return f"http://127.0.0.1:{self.ports[index]}"

    def key_id(self, name: str, index: int = 0) -> str:
        return f"{self.url(index)}/users/{name}#main-key"

    async def until_accepted(self, count: int) -> None:
        event = asyncio.Event()
        self._waiters.append((count, event))
        self._wake()
        await event.wait()

    def _wake(self) -> None:
        for count, event in self._waiters:
            if self.accepted >= count:
                event.set()


@asynccontextmanager
async def tarpit(count: int = 1) -> AsyncIterator[Tarpit]:
    pit = Tarpit()
    held: set[asyncio.Task[Any]] = set()

    async def hold(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        held.add(task)
        pit.accepted += 1
        pit.idle.clear()
        pit._wake()
        try:
            while await reader.read(65_536):
                pass  # read what the blog sends, answer nothing, until it hangs up
        except ConnectionError:
            pass
        finally:
            writer.close()
            held.discard(task)
            if not held:
                pit.idle.set()

    pit.idle.set()
    servers = [await asyncio.start_server(hold, "127.0.0.1", 0) for _ in range(count)]
    pit.ports = [server.sockets[0].getsockname()[1] for server in servers]
    try:
        yield pit
    finally:
        for server in servers:
            server.close()
        for task in list(held):
            task.cancel()
        await asyncio.gather(*held, return_exceptions=True)
        for server in servers:
            await server.wait_closed()


@dataclass
class Site:
    """A small ActivityPub server on loopback, speaking raw HTTP/1.1.

    GETs answer ``documents`` (activity+json), ``statuses`` or ``default_status``,
    after ``delay`` seconds; POSTs are recorded and answered 202.
    """

    host: str
    port: int = 0
    documents: dict[str, dict[str, Any]] = field(default_factory=dict)
    statuses: dict[str, int] = field(default_factory=dict)
    default_status: int = 404
    delay: float = 0.0
    gets: list[str] = field(default_factory=list)
    posts: list[tuple[str, dict[str, str], bytes]] = field(default_factory=list)
    posted: asyncio.Event = field(default_factory=asyncio.Event)

    def url(self, path: str = "") -> str:
        return f"http://{self.host}:{self.port}{path}"

    def add_actor(self, username: str, key: rsa.RSAPrivateKey) -> dict[str, Any]:
        """Serve a Mastodon-shaped actor document with ``key``; returns the document."""
        ap_id = self.url(f"/users/{username}")
        document = {
            "@context": ["https://www.w3.org/ns/activitystreams", "https://w3id.org/security/v1"],
            "id": ap_id,
            "type": "Person",
            "preferredUsername": username,
            "name": username.title(),
            "inbox": f"{ap_id}/inbox",
            "outbox": f"{ap_id}/outbox",
            "endpoints": {"sharedInbox": self.url("/inbox")},
            "publicKey": {
                "id": f"{ap_id}#main-key",
                "owner": ap_id,
                "publicKeyPem": public_pem(key),
            },
        }
        self.documents[f"/users/{username}"] = document
        return document

    def activities(self, kind: str) -> list[dict[str, Any]]:
        found = [json.loads(body) for _, _, body in self.posts]
        return [activity for activity in found if activity.get("type") == kind]

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
            method, target = head[0].split(" ")[:2]
            pairs = (line.partition(":") for line in head[1:] if line)
            headers = {name.strip().lower(): value.strip() for name, _, value in pairs}
            body = await reader.readexactly(int(headers.get("content-length", "0")))
            if method == "POST":
                self.posts.append((target, headers, body))
                self.posted.set()
                writer.write(_response(202))
            else:
                self.gets.append(target)
                await asyncio.sleep(self.delay)
                document = self.documents.get(target)
                if document is not None and target not in self.statuses:
                    writer.write(_response(200, json.dumps(document).encode(), AP))
                else:
                    writer.write(_response(self.statuses.get(target, self.default_status)))
            await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()


def _response(status: int, body: bytes = b"", content_type: str = "text/plain") -> bytes:
    head = f"HTTP/1.1 {status} X\r\nContent-Length: {len(body)}\r\nConnection: close\r\n"
    return f"{head}Content-Type: {content_type}\r\n\r\n".encode() + body


@asynccontextmanager
async def site(host: str = "127.0.0.2", **options: Any) -> AsyncIterator[Site]:
    server = Site(host, **options)
    listener = await asyncio.start_server(server.handle, host, 0)
    server.port = listener.sockets[0].getsockname()[1]
    try:
        yield server
    finally:
        listener.close()
        await listener.wait_closed()


def closed_port() -> int:
    """A loopback port with nothing listening on it (connections are refused)."""
    with closing(socket.socket()) as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port


# ---- the blog on the real network ---------------------------------------------------------


@dataclass
class Blog:
    client: httpx.AsyncClient
    services: Services
    database: Path | str  # the store's location: a SQLite file or a PostgreSQL URL

    async def post(self, body: bytes, headers: dict[str, str]) -> httpx.Response:
        return await self.client.post("/inbox", content=body, headers=headers)

    async def post_signed(self, body: bytes, key: rsa.RSAPrivateKey, key_id: str) -> httpx.Response:
        return await self.post(body, pyhttpsig_headers(key, key_id, body))

    def actor_rows(self) -> int:
        found = dbpeek.row(self.database, "SELECT count(*) FROM actors")
        assert found is not None
        return int(found[0])


@asynccontextmanager
async def live_blog(tmp_path: Path, keys: Path, **overrides: Any) -> AsyncIterator[Blog]:
    """The real app with no transport given: its outbound requests use real sockets
    (loopback allowed unless ``overrides`` say otherwise); the workers are off."""
    settings = make_settings(tmp_path, keys_dir=keys, **(LOOPBACK | overrides))
    async with running_app(settings, run_workers=False) as app:
        services: Services = app.state.services
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url=BASE_URL) as client:
            yield Blog(client, services, settings.store_location)


def with_key_id(headers: dict[str, str], key_id: str) -> dict[str, str]:
    """The same signature under another keyId: the keyId is not among the signed parts."""
    return headers | {"signature": headers["signature"].replace(PLACEHOLDER_KEY_ID, key_id)}


# ---- 1. the tarpit flood ------------------------------------------------------------------

FLOOD = 2_000
FLOOD_CONCURRENCY = 200  # more than the 100 connections of a pool


async def follow_through(blog: Blog, remote: Site, username: str) -> tuple[float, float]:
    """A new actor ``username`` on ``remote`` follows the blog: the seconds until her
    Follow is stored (202), and until the blog's Accept is in her inbox."""
    key = rsa_key(username)
    actor = remote.add_actor(username, key)
    remote.posted.clear()
    started = time.perf_counter()
    with anyio.fail_after(10):
        response = await blog.post_signed(
            body_of(follow(actor["id"])), key, actor["id"] + "#main-key"
        )
    stored = time.perf_counter() - started
    assert response.status_code == 202, response.text
    with anyio.fail_after(10):
        await blog.services.inbox.process_once()
        await blog.services.deliverer.deliver_once()
        await remote.posted.wait()
    delivered = time.perf_counter() - started
    accepts = remote.activities("Accept")
    assert [a["object"]["actor"] for a in accepts].count(actor["id"]) == 1, accepts
    return stored, delivered


async def test_tarpit_flood_leaves_key_fetches_and_deliveries_working(
    tmp_path: Path, blog_keys: Path
) -> None:
    """2,000 badly signed POSTs whose keyIds point at a tarpit, 200 at a time. A new,
    honest actor on another host who follows while the tarpit holds the blog's key
    fetches, and another who follows once the flood is answered, are both verified,
    stored and answered at once."""
    async with tarpit() as pit, site() as honest, live_blog(tmp_path, blog_keys) as blog:
        body = body_of(follow(f"{pit.url()}/users/flood"))
        template = pyhttpsig_headers(stranger(), PLACEHOLDER_KEY_ID, body)
        statuses: Counter[int] = Counter()
        without_retry_after = 0
        mostly_answered = asyncio.Event()
        gate = anyio.Semaphore(FLOOD_CONCURRENCY)

        async def bogus(n: int) -> None:
            nonlocal without_retry_after
            async with gate:
                response = await blog.post(body, with_key_id(template, pit.key_id(f"u{n}")))
            statuses[response.status_code] += 1
            if response.status_code == 503 and "retry-after" not in response.headers:
                without_retry_after += 1
            if sum(statuses.values()) >= FLOOD - 16:  # the rest wait on the tarpit
                mostly_answered.set()

        async with anyio.create_task_group() as flood:
            for n in range(FLOOD):
                flood.start_soon(bogus, n)
            with anyio.fail_after(10):
                await pit.until_accepted(2)  # key fetches hang in the tarpit from now on
            during = await follow_through(blog, honest, "alice")
            with anyio.fail_after(60):
                await mostly_answered.wait()
            after = await follow_through(blog, honest, "bob")
            flood.cancel_scope.cancel()  # the few flood requests still waiting on the tarpit

    assert honest.gets == ["/users/alice", "/users/bob"]  # each key once; then the cache
    assert set(statuses) <= {401, 503}, statuses
    assert statuses[503] >= FLOOD - 16 - 2 * 16, statuses  # turned away at once, retry later
    assert without_retry_after == 0
    assert pit.accepted <= 16  # two at a time: far fewer than the flood's 2,000 keyIds
    for name, (stored, delivered) in {"during": during, "after": after}.items():
        assert stored < 5, f"the Follow {name} the flood was stored after {stored:.2f} s"
        assert delivered < 5, f"the Accept {name} the flood was delivered after {delivered:.2f} s"
    print(  # the numbers to quote (pytest -s)
        f"\nflood answered {dict(statuses)}, tarpit held {pit.accepted} fetches; "
        f"Follow during the flood stored in {during[0] * 1000:.0f} ms, "
        f"Accept delivered in {during[1] * 1000:.0f} ms; "
        f"after: {after[0] * 1000:.0f} ms, {after[1] * 1000:.0f} ms"
    )


async def test_key_fetch_caps_answer_503_with_retry_after_at_once(
    tmp_path: Path, blog_keys: Path
) -> None:
    """Two fetches per host, sixteen in all: past that, 503 at once, not a wait."""
    async with tarpit(count=9) as pit, live_blog(tmp_path, blog_keys) as blog:
        body = body_of(follow(f"{pit.url()}/users/x"))
        template = pyhttpsig_headers(stranger(), PLACEHOLDER_KEY_ID, body)

        async def hang(key_id: str) -> None:
            await blog.post(body, with_key_id(template, key_id))

        async with anyio.create_task_group() as hanging:
            for host in range(8):
                for user in range(2):
                    hanging.start_soon(hang, pit.key_id(f"u{user}", host))
            with anyio.fail_after(5):
                await pit.until_accepted(16)
            with anyio.fail_after(2):  # generous: both are answered without any fetch
                third_on_a_host = await blog.post(body, with_key_id(template, pit.key_id("u2")))
                seventeenth = await blog.post(body, with_key_id(template, pit.key_id("u0", 8)))
            hanging.cancel_scope.cancel()

    for response in (third_on_a_host, seventeenth):
        assert response.status_code == 503, response.text
        assert response.headers["retry-after"].isdigit()
        assert "127.0.0.1" not in response.text
        assert all(str(port) not in response.text for port in pit.ports)
    assert pit.accepted == 16


async def test_concurrent_requests_for_one_key_id_share_one_fetch(
    tmp_path: Path, blog_keys: Path
) -> None:
    async with site(delay=0.3) as remote, live_blog(tmp_path, blog_keys) as blog:
        key = rsa_key("alice")
        alice = remote.add_actor("alice", key)
        bodies = [
            body_of(follow(alice["id"], activity_id=f"{alice['id']}#follows/{n}"))
            for n in range(10)
        ]

        with anyio.fail_after(10):
            responses = await asyncio.gather(
                *(blog.post_signed(body, key, alice["id"] + "#main-key") for body in bodies)
            )

    assert [response.status_code for response in responses] == [202] * 10
    assert remote.gets == ["/users/alice"]


async def test_timed_out_and_abandoned_fetches_give_their_connections_back() -> None:
    """encode/httpcore#1093: a request cancelled while the pool hands it a connection
    leaves that connection in the pool for good, until every slot is gone. Forty fetches
    into a tarpit through a pool of four, half of them abandoned by their callers, five
    times over: each connection is closed at its deadline, none is left in the pool, and
    the pool still serves a healthy server at once."""
    policy = FetchPolicy(allow_http=True, allow_private_addresses=True, total_timeout=0.5)
    transport = GuardedTransport(allow_loopback=True, max_connections=4)
    async with (
        tarpit() as pit,
        site() as healthy,
        httpx.AsyncClient(transport=transport) as client,
    ):
        healthy.documents["/note"] = {"id": healthy.url("/note"), "type": "Note"}
        fetcher = Fetcher(client, policy)

        async def doomed(n: int) -> None:
            # Odd callers give up after 20 ms, 60 ms, ...; even ones wait for the deadline.
            # Timed out, or no connection free in time: what a tarpit earns.
            with anyio.move_on_after(0.02 * n if n % 2 else 60), suppress(FetchError):
                await fetcher.fetch_document(f"{pit.url()}/users/{n}")

        for _ in range(5):  # each round used to leak a connection or more
            with anyio.fail_after(15):
                async with anyio.create_task_group() as group:
                    for n in range(40):
                        group.start_soon(doomed, n)

        with anyio.fail_after(5):  # the abandoned fetches end by their own deadline
            await pit.idle.wait()
        # httpcore's own interface: no connection half made and owned by no request.
        left = transport._pool.connections
        assert [c for c in left if not (c.is_idle() or c.is_closed())] == [], left
        patient = Fetcher(client, FetchPolicy(allow_http=True, allow_private_addresses=True))
        with anyio.fail_after(5):  # generous: it takes milliseconds
            for _ in range(8):
                document = await patient.fetch_document(healthy.url("/note"))
                assert document["type"] == "Note"


async def test_guarded_transport_loses_no_connection_to_cancelled_requests() -> None:
    """The same for any request through GuardedTransport (deliveries too), with no
    Fetcher in between: forty plain GETs into the tarpit through a pool of four, each
    cancelled by its caller (half at 0.3 s, half sooner or later), five times over."""
    transport = GuardedTransport(allow_loopback=True, max_connections=4)
    async with (
        tarpit() as pit,
        site() as healthy,
        httpx.AsyncClient(transport=transport, timeout=10) as client,
    ):

        async def cancelled(n: int) -> None:
            with anyio.move_on_after(0.01 * n if n % 2 else 0.3):
                await client.get(f"{pit.url()}/{n}")

        for _ in range(5):
            with anyio.fail_after(15):
                async with anyio.create_task_group() as group:
                    for n in range(40):
                        group.start_soon(cancelled, n)

        with anyio.fail_after(5):
            await pit.idle.wait()
        left = transport._pool.connections
        assert [c for c in left if not (c.is_idle() or c.is_closed())] == [], left
        with anyio.fail_after(5):
            assert (await client.get(healthy.url("/nothing"))).status_code == 404


async def test_fetches_and_deliveries_use_separate_connection_pools(
    tmp_path: Path, blog_keys: Path
) -> None:
    async with live_blog(tmp_path, blog_keys) as blog:
        fetching = blog.services.fetcher._client
        delivering = blog.services.deliverer._client
        assert fetching is not delivering
        assert isinstance(fetching._transport, GuardedTransport)
        assert isinstance(delivering._transport, GuardedTransport)
        assert fetching._transport is not delivering._transport
    assert fetching.is_closed
    assert delivering.is_closed


# ---- 3. strangers cannot lock a host out ---------------------------------------------------


async def test_made_up_key_ids_that_404_do_not_lock_out_their_host(
    tmp_path: Path, blog_keys: Path
) -> None:
    async with site() as remote, live_blog(tmp_path, blog_keys) as blog:
        key = rsa_key("alice")
        alice = remote.add_actor("alice", key)
        body = body_of(follow(alice["id"]))
        for n in range(10):
            ghost = remote.url(f"/users/ghost{n}#main-key")
            assert_answer(await blog.post_signed(body, stranger(), ghost), 401, NOT_FETCHED)
        # Each made-up key is fetched once; asking again costs nothing.
        ghost = remote.url("/users/ghost0#main-key")
        assert_answer(
            await blog.post_signed(body, stranger(), ghost), 401, f"{NOT_FETCHED} recently"
        )
        assert len(remote.gets) == 10

        response = await blog.post_signed(body, key, alice["id"] + "#main-key")

    assert response.status_code == 202, response.text
    assert remote.gets[-1] == "/users/alice"


async def test_a_host_answering_5xx_cools_down(tmp_path: Path, blog_keys: Path) -> None:
    """A host that is unwell is left alone for a while: five failures, then no fetch."""
    async with site(default_status=503) as remote, live_blog(tmp_path, blog_keys) as blog:
        body = body_of(follow(remote.url("/users/x")))
        for n in range(8):
            key_id = remote.url(f"/users/u{n}#main-key")
            response = await blog.post_signed(body, stranger(), key_id)
            assert response.status_code == 401, response.text
            assert "503" not in response.text

    assert len(remote.gets) == 5


# ---- 10. what a 401 tells, and what a bad signature stores ---------------------------------


async def test_401_for_a_refused_connection_says_nothing_about_our_network(
    tmp_path: Path, blog_keys: Path, caplog: pytest.LogCaptureFixture
) -> None:
    port = closed_port()
    key_id = f"http://127.0.0.1:{port}/users/x#main-key"
    body = body_of(follow(f"http://127.0.0.1:{port}/users/x"))
    async with live_blog(tmp_path, blog_keys) as blog:
        with caplog.at_level(logging.INFO, logger="fediblog"):
            response = await blog.post_signed(body, stranger(), key_id)

    assert_answer(response, 401, NOT_FETCHED)
    for secret in (str(port), "127.0.0.1", "Errno", "refused", "connect"):
        assert secret not in response.text
    assert key_id in caplog.text  # the detail is for the blog's own log


async def test_401_for_a_private_address_says_nothing_about_our_network(
    tmp_path: Path, blog_keys: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Production rules (https, public addresses only): ``localhost`` resolves to
    loopback, so the guard refuses before any connection is made."""
    key_id = "https://localhost:8443/users/x#main-key"
    body = body_of(follow("https://localhost:8443/users/x"))
    async with live_blog(
        tmp_path, blog_keys, allow_http=False, allow_private_addresses=False
    ) as blog:
        with caplog.at_level(logging.INFO, logger="fediblog"):
            response = await blog.post_signed(body, stranger(), key_id)

    assert_answer(response, 401, NOT_FETCHED)
    for secret in ("8443", "127.0.0.1", "::1", "localhost", "resolves", "non-public"):
        assert secret not in response.text
    assert "resolves to a non-public address" in caplog.text


async def test_badly_signed_requests_store_no_actor_rows(tmp_path: Path) -> None:
    """50 requests naming alice's real keyId, signed by another key: alice's key is
    fetched once and kept in memory, and no row is stored until she really signs."""
    async with running(tmp_path) as inbox:
        alice = mastodon()
        inbox.serve_actor(alice)
        rows = Blog(inbox.client, inbox.services, inbox.database).actor_rows
        before = rows()

        for n in range(50):
            body = body_of(follow(alice.id, activity_id=f"{alice.id}#follows/{n}"))
            response = await inbox.post(body, pyhttpsig_headers(stranger(), alice.key_id, body))
            assert_answer(response, 401, NOT_VERIFIED)

        assert rows() == before
        assert await inbox.services.store.get_cached_actor(alice.id) is None
        assert inbox.fetched() == [alice.id]

        body = body_of(follow(alice.id))
        response = await inbox.post(body, pyhttpsig_headers(alice.key, alice.key_id, body))

        assert response.status_code == 202, response.text
        assert rows() == before + 1
        assert await inbox.services.store.get_cached_actor(alice.id) is not None
        assert inbox.fetched() == [alice.id]
