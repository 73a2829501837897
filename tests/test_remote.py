"""fediblog.remote against real, misbehaving HTTP servers on loopback.

Each server is a few lines of asyncio speaking raw HTTP/1.1, so a test sends exactly the
bytes an attacker would: wrong types, trickled bodies, gzip bombs, redirect chains. Names
carry the case numbers of shared/security/ATTACKS.md. The servers listen on loopback, so
most tests use LOOPBACK (http and loopback allowed); the SSRF tests use policies that do
not allow loopback and check that the server saw nothing.
"""

from __future__ import annotations

import asyncio
import gzip
import json
import socket
import tracemalloc
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest

from fediblog.errors import BadDocument, BlockedAddress, FetchError, FetchTimeout, FetchTooLarge
from fediblog.netguard import GuardedTransport, resolve_host
from fediblog.remote import (
    ACTIVITY_ACCEPT,
    JRD_ACCEPT,
    Fetcher,
    FetchPolicy,
    GetSigner,
    build_transport,
    parse_json,
)

FIXTURES = Path(__file__).parent / "fixtures"
AP = "application/activity+json"
AS = "https://www.w3.org/ns/activitystreams"
LOOPBACK = FetchPolicy(allow_http=True, allow_private_addresses=True)
HTTP_ONLY = FetchPolicy(allow_http=True)  # production rules, except that http is allowed

Route = bytes | Callable[[asyncio.StreamWriter], Awaitable[None]]


@pytest.fixture
def anyio_backend() -> str:
    """The test servers are asyncio: pinned here so the module does not depend on conftest."""
    return "asyncio"


# ---- a tiny raw HTTP server ------------------------------------------------------------


@dataclass
class Seen:
    target: str
    headers: dict[str, str]


@dataclass
class Server:
    """Answers each request from ``routes`` (path → raw response or writer coroutine)."""

    host: str = "127.0.0.1"
    port: int = 0
    routes: dict[str, Route] = field(default_factory=dict)
    seen: list[Seen] = field(default_factory=list)
    _tasks: set[asyncio.Task[None]] = field(default_factory=set)

    def url(self, path: str) -> str:
        return f"http://{self.host}:{self.port}{path}"

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
            target = head[0].split(" ")[1]
            pairs = (line.partition(":") for line in head[1:] if line)
            self.seen.append(Seen(target, {k.strip().lower(): v.strip() for k, _, v in pairs}))
            route = self.routes.get(target, self.routes.get(target.partition("?")[0]))
            route = response(404, b"") if route is None else route
            if isinstance(route, bytes):
                writer.write(route)
                await writer.drain()
            else:
                await route(writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass  # the client hung up, which is what most attack tests expect it to do
        finally:
            writer.close()
            self._tasks.discard(task)


@asynccontextmanager
async def serve(host: str = "127.0.0.1") -> AsyncIterator[Server]:
    server = Server(host)
    listener = await asyncio.start_server(server._handle, host, 0)
    server.port = listener.sockets[0].getsockname()[1]
    try:
        yield server
    finally:
        listener.close()
        for task in list(server._tasks):
            task.cancel()
        await asyncio.gather(*server._tasks, return_exceptions=True)
        await listener.wait_closed()


def response(
    status: int = 200,
    body: bytes = b"",
    content_type: str | None = AP,
    headers: dict[str, str] | None = None,
) -> bytes:
    lines = [f"HTTP/1.1 {status} X", f"Content-Length: {len(body)}", "Connection: close"]
    if content_type is not None:
        lines.append(f"Content-Type: {content_type}")
    lines += [f"{name}: {value}" for name, value in (headers or {}).items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def document(ap_id: str | None, *, content_type: str = AP, **fields: Any) -> bytes:
    doc = {"@context": AS, "id": ap_id, "type": "Note", **fields}
    return response(body=json.dumps(doc).encode(), content_type=content_type)


def redirect(location: str, status: int = 302) -> bytes:
    return response(status, content_type=None, headers={"Location": location})


@asynccontextmanager
async def open_fetcher(
    policy: FetchPolicy = LOOPBACK,
    sign: GetSigner | None = None,
    transport: httpx.AsyncBaseTransport | None = None,
) -> AsyncIterator[Fetcher]:
    async with httpx.AsyncClient(transport=transport or build_transport(policy)) as client:
        yield Fetcher(client, policy, sign=sign)


# ---- happy paths ----------------------------------------------------------------------


@pytest.mark.anyio
async def test_fetch_document_returns_the_object() -> None:
    async with serve() as server, open_fetcher() as fetcher:
        note = server.url("/notes/1")
        server.routes["/notes/1"] = document(note, content="<p>hi</p>")
        doc = await fetcher.fetch_document(note + "#frag")
    assert doc == {"@context": AS, "id": note, "type": "Note", "content": "<p>hi</p>"}
    assert server.seen[0].headers["accept"] == ACTIVITY_ACCEPT
    assert server.seen[0].headers["user-agent"] == "fediblog/0.1"


@pytest.mark.anyio
@pytest.mark.parametrize(
    "content_type",
    [
        f'application/ld+json; profile="{AS}"',
        f"application/ld+json;profile={AS}",
        f'Application/LD+JSON ; charset=utf-8 ; profile = "{AS} https://w3id.org/security/v1"',
        "application/activity+json; charset=utf-8",
    ],
)
async def test_ld_json_content_type_accepted(content_type: str) -> None:
    async with serve() as server, open_fetcher() as fetcher:
        server.routes["/a"] = document(server.url("/a"), content_type=content_type)
        assert (await fetcher.fetch_document(server.url("/a")))["id"] == server.url("/a")


@pytest.mark.anyio
async def test_signer_headers_arrive_on_every_hop() -> None:
    calls: list[tuple[str, str]] = []

    def sign(method: str, url: str) -> dict[str, str]:
        calls.append((method, url))
        return {
            "Signature": f'keyId="k",signature="{url}"',
            "Date": "Tue, 01 Jul 2025 00:00:00 GMT",
        }

    async with serve() as server, open_fetcher(sign=sign) as fetcher:
        server.routes["/a"] = redirect("/b", 301)
        server.routes["/b"] = redirect(server.url("/c"), 307)
        server.routes["/c"] = document(server.url("/c"))
        await fetcher.fetch_document(server.url("/a"))
    hops = [server.url(path) for path in ("/a", "/b", "/c")]
    assert calls == [("GET", hop) for hop in hops]
    assert [seen.headers["signature"] for seen in server.seen] == [
        f'keyId="k",signature="{hop}"' for hop in hops
    ]
    assert all(seen.headers["date"].startswith("Tue") for seen in server.seen)


@pytest.mark.anyio
async def test_three_redirects_on_the_same_host_are_followed() -> None:
    async with serve() as server, open_fetcher() as fetcher:
        for hop in range(3):
            server.routes[f"/r{hop}"] = redirect(f"/r{hop + 1}")
        server.routes["/r3"] = document(server.url("/r3"))
        assert (await fetcher.fetch_document(server.url("/r0")))["id"] == server.url("/r3")


@pytest.mark.anyio
async def test_errors_are_fetch_errors_not_httpx_errors() -> None:
    # A port bound but never listening refuses connections, and no other process (a
    # test server elsewhere on the machine) can take it meanwhile.
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    closed_port_url = f"http://127.0.0.1:{closed.getsockname()[1]}/gone"
    async with serve() as server, open_fetcher() as fetcher:
        server.routes["/text"] = response(body=b"not json")
        server.routes["/gz"] = response(
            body=b"\x1f\x8bnot gzip", headers={"Content-Encoding": "gzip"}
        )
        with pytest.raises(FetchError, match="HTTP 404"):
            await fetcher.fetch_document(server.url("/missing"))
        with pytest.raises(BadDocument, match="not valid JSON"):
            await fetcher.fetch_document(server.url("/text"))
        with pytest.raises(BadDocument, match="corrupt"):
            await fetcher.fetch_document(server.url("/gz"))
        with pytest.raises(FetchError, match="failed"):
            await fetcher.fetch_document(closed_port_url)
    closed.close()


# ---- origin and identity (ATTACKS 4-6) ------------------------------------------------


@pytest.mark.anyio
@pytest.mark.parametrize("claimed", ["/notes/2", "/notes/1/", None, "elsewhere"])
async def test_attack_4_id_differs_from_url(claimed: str | None) -> None:
    async with serve() as server, open_fetcher() as fetcher:
        ap_id = {None: None, "elsewhere": "https://victim.example/notes/1"}.get(
            claimed, server.url(str(claimed))
        )
        server.routes["/notes/1"] = document(ap_id)
        with pytest.raises(BadDocument, match="is not the URL fetched"):
            await fetcher.fetch_document(server.url("/notes/1"))


@pytest.mark.anyio
async def test_attack_4_id_must_be_the_final_url_not_the_first() -> None:
    async with serve() as server, open_fetcher() as fetcher:
        server.routes["/old"] = redirect("/new")
        server.routes["/new"] = document(server.url("/old"))
        with pytest.raises(BadDocument, match="is not the URL fetched"):
            await fetcher.fetch_document(server.url("/old"))


@pytest.mark.anyio
@pytest.mark.parametrize(
    "content_type",
    [
        "text/html; charset=utf-8",
        "application/json",
        "application/ld+json",
        "application/ld+json; profile=https://example.com/other",
        "text/plain",
        None,
    ],
)
async def test_attack_5_wrong_content_type(content_type: str | None) -> None:
    async with serve() as server, open_fetcher() as fetcher:
        body = json.dumps({"id": server.url("/a"), "type": "Note"}).encode()
        server.routes["/a"] = response(body=body, content_type=content_type)
        with pytest.raises(BadDocument, match="/a is "):
            await fetcher.fetch_document(server.url("/a"))


@pytest.mark.anyio
@pytest.mark.parametrize("claims", ["original id", "its own id"])
async def test_attack_6_redirect_to_other_host_claiming_original_id(claims: str) -> None:
    async with serve() as origin, serve("127.0.0.2") as other, open_fetcher() as fetcher:
        original = origin.url("/users/alice")
        origin.routes["/users/alice"] = redirect(other.url("/users/alice"))
        claimed = original if claims == "original id" else other.url("/users/alice")
        other.routes["/users/alice"] = document(claimed)
        with pytest.raises(BadDocument, match=r"redirected to 127\.0\.0\.2"):
            await fetcher.fetch_document(original)


@pytest.mark.anyio
async def test_attack_6_more_than_three_redirects() -> None:
    async with serve() as server, open_fetcher() as fetcher:
        for hop in range(4):
            server.routes[f"/r{hop}"] = redirect(f"/r{hop + 1}")
        server.routes["/r4"] = document(server.url("/r4"))
        with pytest.raises(FetchError, match="more than 3 redirects"):
            await fetcher.fetch_document(server.url("/r0"))
    assert [seen.target for seen in server.seen] == ["/r0", "/r1", "/r2", "/r3"]


# ---- SSRF (ATTACKS 22, 23) ------------------------------------------------------------

LOOPBACK_FORMS = [
    "http://127.0.0.1:{port}/a",
    "http://2130706433:{port}/a",  # decimal
    "http://0x7f.1:{port}/a",  # hex, short form
    "http://127.1:{port}/a",
    "http://[::ffff:127.0.0.1]:{port}/a",  # IPv4-mapped IPv6
    "http://localhost:{port}/a",  # a name that resolves to loopback
    "http://0.0.0.0:{port}/a",  # reaches the local host on Linux
]
PRIVATE_ADDRESSES = [
    "http://10.0.0.1/",
    "http://172.16.0.1/",
    "http://192.168.1.1/",
    "http://169.254.169.254/latest/meta-data/",
    "http://100.64.0.1/",
    "http://[::]/",
    "http://[::1]/",
    "http://[fc00::1]/",
    "http://[fe80::1]/",
    "http://224.0.0.1/",
    "http://[64:ff9b::a9fe:a9fe]/",  # NAT64 form of 169.254.169.254
]


@pytest.mark.anyio
@pytest.mark.parametrize("template", LOOPBACK_FORMS + PRIVATE_ADDRESSES)
async def test_attack_22_ssrf_private_addresses(template: str) -> None:
    async with serve() as server, open_fetcher(HTTP_ONLY) as fetcher:
        server.routes["/a"] = document(server.url("/a"))
        with pytest.raises(BlockedAddress):
            await fetcher.fetch_document(template.format(port=server.port))
    assert server.seen == []


@pytest.mark.anyio
@pytest.mark.parametrize("template", LOOPBACK_FORMS)
async def test_attack_22_transport_checks_at_connect_time(template: str) -> None:
    """The transport alone, without Fetcher's pre-checks, refuses every loopback form."""
    async with serve() as server, httpx.AsyncClient(transport=build_transport(FetchPolicy())) as c:
        server.routes["/a"] = document(server.url("/a"))
        with pytest.raises(BlockedAddress, match="non-public address"):
            await c.get(template.format(port=server.port))
    assert server.seen == []


@pytest.mark.anyio
async def test_attack_22_a_name_with_any_private_address_is_refused() -> None:
    asked: list[str] = []

    async def resolve(host: str, port: int) -> list[str]:
        asked.append(host)
        return ["93.184.215.14", "127.0.0.1"]

    transport = GuardedTransport(allow_loopback=False, resolve=resolve)
    async with open_fetcher(FetchPolicy(), transport=transport) as fetcher:
        with pytest.raises(BlockedAddress, match=r"127\.0\.0\.1"):
            await fetcher.fetch_document("https://mixed.example/a")
    assert asked == ["mixed.example"]


@pytest.mark.anyio
async def test_attack_22_connects_to_the_checked_address_not_the_name() -> None:
    """Rebinding: the name is resolved once, checked, and the socket goes to that IP.

    `rebind.invalid` cannot resolve through the system, so reaching the server proves
    the connection used the checked address; the Host header still carries the name.
    """
    answers = iter([["127.0.0.1"], ["169.254.169.254"]])

    async def resolve(host: str, port: int) -> list[str]:
        return next(answers)

    async with serve() as server:
        url = f"http://rebind.invalid:{server.port}/a"
        server.routes["/a"] = document(url)
        transport = GuardedTransport(allow_loopback=True, resolve=resolve)
        async with open_fetcher(LOOPBACK, transport=transport) as fetcher:
            assert (await fetcher.fetch_document(url))["id"] == url
    assert server.seen[0].headers["host"] == f"rebind.invalid:{server.port}"
    assert next(answers) == ["169.254.169.254"]  # the second answer was never asked for


@pytest.mark.anyio
@pytest.mark.parametrize(
    "target",
    [
        "http://169.254.169.254/latest/meta-data/",
        "http://10.0.0.1/",
        "http://[::ffff:169.254.169.254]/",
        "http://0.0.0.0:{port}/a",  # would reach this very server
        "http://metadata.internal/computeMetadata/v1/",  # a name, caught at connect time
    ],
)
async def test_attack_22_redirect_to_private_address(target: str) -> None:
    async def resolve(host: str, port: int) -> list[str]:
        return (
            ["169.254.169.254"] if host == "metadata.internal" else await resolve_host(host, port)
        )

    transport = GuardedTransport(allow_loopback=True, resolve=resolve)
    async with serve() as server, open_fetcher(LOOPBACK, transport=transport) as fetcher:
        server.routes["/start"] = redirect(target.format(port=server.port))
        server.routes["/a"] = document(server.url("/a"))
        with pytest.raises(BlockedAddress):
            await fetcher.fetch_document(server.url("/start"))
    assert [seen.target for seen in server.seen] == ["/start"]


@pytest.mark.anyio
@pytest.mark.parametrize(
    "url",
    [
        "file:///etc/passwd",
        "data:application/activity+json,{}",
        "javascript:alert(1)",
        "gopher://127.0.0.1:70/_stats",
        "ftp://example.com/actor",
        "//example.com/actor",
        "http://example.com/actor",  # http is refused unless allow_http
        "https://user:secret@example.com/actor",
    ],
)
async def test_attack_23_non_http_schemes(url: str) -> None:
    async with open_fetcher(FetchPolicy()) as fetcher:
        with pytest.raises(BlockedAddress):
            await fetcher.fetch_document(url)


@pytest.mark.anyio
async def test_attack_23_redirect_to_non_http_scheme() -> None:
    async with serve() as server, open_fetcher() as fetcher:
        server.routes["/a"] = redirect("file:///etc/passwd")
        with pytest.raises(BlockedAddress, match="file URLs"):
            await fetcher.fetch_document(server.url("/a"))


# ---- resource exhaustion (ATTACKS 24-27) ----------------------------------------------


async def trickle(writer: asyncio.StreamWriter, data: bytes) -> None:
    for byte in data:  # far more often than any per-read timeout would notice
        writer.write(bytes([byte]))
        await writer.drain()
        await asyncio.sleep(0.1)


@pytest.mark.anyio
@pytest.mark.parametrize("part", ["headers", "body"])
async def test_attack_24_slowloris_total_deadline(part: str) -> None:
    async def slowloris(writer: asyncio.StreamWriter) -> None:
        head = f"HTTP/1.1 200 OK\r\nContent-Type: {AP}\r\nContent-Length: 1000\r\n\r\n"
        if part == "body":
            writer.write(head.encode())
        await trickle(writer, (head.encode() if part == "headers" else b"") + b" " * 1000)

    policy = FetchPolicy(allow_http=True, allow_private_addresses=True, total_timeout=1.5)
    async with serve() as server, open_fetcher(policy) as fetcher:
        server.routes["/a"] = slowloris
        with anyio.fail_after(10), pytest.raises(FetchTimeout):
            await fetcher.fetch_document(server.url("/a"))


@pytest.mark.anyio
async def test_attack_25_content_length_over_cap() -> None:
    async def announce_and_stall(writer: asyncio.StreamWriter) -> None:
        writer.write(
            f"HTTP/1.1 200 OK\r\nContent-Type: {AP}\r\nContent-Length: 5000000\r\n\r\n".encode()
        )
        await writer.drain()
        await asyncio.Event().wait()  # reading the body would end in FetchTimeout

    policy = FetchPolicy(allow_http=True, allow_private_addresses=True, total_timeout=5)
    async with serve() as server, open_fetcher(policy) as fetcher:
        server.routes["/a"] = announce_and_stall
        with pytest.raises(FetchTooLarge, match="5000000 bytes announced"):
            await fetcher.fetch_document(server.url("/a"))


@pytest.mark.anyio
async def test_attack_25_streaming_past_cap() -> None:
    async def chunked_forever(writer: asyncio.StreamWriter) -> None:
        head = f"HTTP/1.1 200 OK\r\nContent-Type: {AP}\r\nTransfer-Encoding: chunked\r\n\r\n"
        writer.write(head.encode())
        chunk = b" " * 65536
        for _ in range(64):  # 4 MiB, four times the cap
            writer.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
            await writer.drain()
        writer.write(b"0\r\n\r\n")

    async with serve() as server, open_fetcher() as fetcher:
        server.routes["/a"] = chunked_forever
        with pytest.raises(FetchTooLarge, match="passed the cap"):
            await fetcher.fetch_document(server.url("/a"))


@pytest.mark.anyio
async def test_attack_26_gzip_bomb() -> None:
    bomb = gzip.compress(b"\0" * 64_000_000, compresslevel=9)  # ~62 KiB on the wire
    async with serve() as server, open_fetcher() as fetcher:
        server.routes["/a"] = response(body=bomb, headers={"Content-Encoding": "gzip"})
        tracemalloc.start()
        try:
            with pytest.raises(FetchTooLarge, match="passed the cap"):
                await fetcher.fetch_document(server.url("/a"))
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
    # Inflating one 64 KiB read at once would allocate ~64 MB before any check.
    assert peak < 16_000_000


@pytest.mark.anyio
@pytest.mark.parametrize(
    "body",
    [
        b"[" * 999_000,
        b'{"a":' * 150_000 + b"1" + b"}" * 150_000,
        b'{"id": "x", "tag": ' + b"[" * 65 + b"]" * 65 + b"}",
    ],
    ids=["brackets", "objects", "just-too-deep"],
)
async def test_attack_27_deep_nesting(body: bytes) -> None:
    async with serve() as server, open_fetcher() as fetcher:
        server.routes["/a"] = response(body=body)
        with pytest.raises(BadDocument, match="nested deeper"):
            await fetcher.fetch_document(server.url("/a"))


@pytest.mark.parametrize(
    ("body", "refused"),
    [
        (b"[" * 64 + b"]" * 64, None),  # short, and exactly at the depth cap
        (b"[" * 65 + b"]" * 65, "nested deeper"),
        (b"[" + b",".join([b"0"] * 10_000) + b"]", None),  # 20,001 bytes, at the array cap
        (b"[" + b",".join([b"0"] * 10_001) + b"]", "array longer"),  # the shortest over it
        (b'{"a":[' + b",".join([b"[]"] * 30) + b"]}", None),  # 32 brackets: no walk needed
    ],
    ids=["depth-64", "depth-65", "items-10000", "items-10001", "short-and-flat"],
)
def test_attack_27_the_caps_hold_at_their_edges(body: bytes, refused: str | None) -> None:
    # Short bodies with few brackets skip the walk: the caps must hold right at its edge.
    if refused is None:
        parse_json(body)
    else:
        with pytest.raises(BadDocument, match=refused):
            parse_json(body)


def test_attack_27_brackets_inside_strings_do_not_count() -> None:
    text = json.dumps({"content": "[{" * 5000 + '\\"]', "tag": [[[]]]}).encode()
    assert parse_json(text)["tag"] == [[[]]]
    with pytest.raises(BadDocument):
        parse_json(b'"' + b'\\"' * 200_000)  # unterminated: must fail fast, not rescan


@pytest.mark.anyio
@pytest.mark.parametrize("field_name", ["tag", "to", "cc", "attachment"])
async def test_attack_27_huge_arrays(field_name: str) -> None:
    async with serve() as server, open_fetcher() as fetcher:
        huge: dict[str, Any] = {field_name: [{}] * 100_000}
        server.routes["/a"] = document(server.url("/a"), **huge)
        with pytest.raises(BadDocument, match="array longer"):
            await fetcher.fetch_document(server.url("/a"))


# ---- collections (ATTACKS 29) -------------------------------------------------------


def page(ap_id: str, items: list[Any], next_url: str | None = None) -> bytes:
    extra = {} if next_url is None else {"next": next_url}
    return document(ap_id, type="OrderedCollectionPage", orderedItems=items, **extra)


@pytest.mark.anyio
async def test_attack_29_collection_next_loops() -> None:
    async with serve() as server, open_fetcher() as fetcher:
        c, p1, p2 = server.url("/c"), server.url("/c?page=1"), server.url("/c?page=2")
        server.routes["/c"] = document(c, type="OrderedCollection", first=p1)
        server.routes["/c?page=1"] = page(p1, ["a", "b"], p2)
        server.routes["/c?page=2"] = page(p2, ["c"], p1)
        assert await fetcher.fetch_collection_items(c) == ["a", "b", "c"]
    assert [seen.target for seen in server.seen] == ["/c", "/c?page=1", "/c?page=2"]


@pytest.mark.anyio
async def test_attack_29_collection_page_cap() -> None:
    async with serve() as server, open_fetcher() as fetcher:
        server.routes["/p0"] = document(
            server.url("/p0"), type="Collection", first=server.url("/p1")
        )
        for n in range(1, 50):
            server.routes[f"/p{n}"] = page(server.url(f"/p{n}"), [n], server.url(f"/p{n + 1}"))
        items = await fetcher.fetch_collection_items(server.url("/p0"), max_pages=3)
        assert items == [1, 2, 3]
        capped = await fetcher.fetch_collection_items(server.url("/p0"), max_items=2)
        assert capped == [1, 2]
    assert len(server.seen) == 1 + 3 + 1 + 2


@pytest.mark.anyio
@pytest.mark.parametrize("where", ["first", "next"])
async def test_attack_29_collection_page_on_other_host(where: str) -> None:
    async with serve() as server, serve("127.0.0.2") as other, open_fetcher() as fetcher:
        foreign = other.url("/c?page=2")
        other.routes["/c"] = page(foreign, ["injected"])
        first = foreign if where == "first" else server.url("/c?page=1")
        server.routes["/c"] = document(server.url("/c"), type="OrderedCollection", first=first)
        server.routes["/c?page=1"] = page(server.url("/c?page=1"), ["a"], foreign)
        with pytest.raises(BadDocument, match="page on another host"):
            await fetcher.fetch_collection_items(server.url("/c"))
    assert other.seen == []


@pytest.mark.anyio
async def test_collection_with_embedded_first_page() -> None:
    async with serve() as server, open_fetcher() as fetcher:
        c, p2 = server.url("/replies"), server.url("/replies?page=2")
        embedded = {"type": "CollectionPage", "id": c + "?page=1", "items": ["a"], "next": p2}
        server.routes["/replies"] = document(c, type="Collection", first=embedded)
        server.routes["/replies?page=2"] = page(p2, ["b"])
        assert await fetcher.fetch_collection_items(c) == ["a", "b"]


# ---- WebFinger (ATTACKS 35) ------------------------------------------------------------


def jrd(subject: str, self_href: str) -> dict[str, Any]:
    return {
        "subject": subject,
        "links": [
            {"rel": "http://webfinger.net/rel/profile-page", "type": "text/html", "href": "x"},
            {"rel": "self", "type": AP, "href": self_href},
        ],
    }


def jrd_response(body: bytes, content_type: str = "application/jrd+json") -> bytes:
    return response(body=body, content_type=content_type)


@pytest.mark.anyio
@pytest.mark.parametrize("form", ["acct", "at", "url"])
async def test_webfinger_returns_the_jrd(form: str) -> None:
    async with serve() as server, open_fetcher() as fetcher:
        host, actor = f"127.0.0.1:{server.port}", server.url("/users/blog")
        answer = jrd(f"acct:blog@{host}", actor)
        server.routes["/.well-known/webfinger"] = jrd_response(json.dumps(answer).encode())
        asked = {"acct": f"acct:blog@{host}", "at": f"@blog@{host}", "url": actor}[form]
        assert await fetcher.fetch_webfinger(asked) == answer
    resource = httpx.URL(server.seen[0].target).params["resource"]
    assert resource == (actor if form == "url" else f"acct:blog@{host}")
    assert server.seen[0].headers["accept"] == JRD_ACCEPT


@pytest.mark.anyio
async def test_attack_35_webfinger_spoofed_subject() -> None:
    spoof = (FIXTURES / "pleroma" / "webfinger_spoofed_subject.json").read_bytes()
    async with serve() as server, open_fetcher() as fetcher:
        server.routes["/.well-known/webfinger"] = jrd_response(spoof)
        with pytest.raises(BadDocument, match=r"subject 'acct:trump@whitehouse\.gov'"):
            await fetcher.fetch_webfinger(f"acct:alex@127.0.0.1:{server.port}")
    assert len(server.seen) == 1


@pytest.mark.anyio
async def test_attack_35_webfinger_self_link_on_other_host() -> None:
    spoof = json.loads((FIXTURES / "pleroma" / "webfinger_spoofed_subject.json").read_text())
    async with serve() as server, open_fetcher() as fetcher:
        spoof["subject"] = f"acct:alex@127.0.0.1:{server.port}"  # only the links now lie
        server.routes["/.well-known/webfinger"] = jrd_response(json.dumps(spoof).encode())
        with pytest.raises(BadDocument, match=r"self link 'https://gleasonator\.com"):
            await fetcher.fetch_webfinger(f"acct:alex@127.0.0.1:{server.port}")


@pytest.mark.anyio
async def test_webfinger_wrong_type_and_host_injection() -> None:
    async with serve() as server, open_fetcher() as fetcher:
        host = f"127.0.0.1:{server.port}"
        body = json.dumps(jrd(f"acct:blog@{host}", server.url("/users/blog"))).encode()
        server.routes["/.well-known/webfinger"] = jrd_response(body, "text/html")
        with pytest.raises(BadDocument, match="is text/html"):
            await fetcher.fetch_webfinger(f"acct:blog@{host}")
        for bad in [f"acct:blog@{host}/x?y=", "acct:blog@", "blog", f"acct:a@b@{host}#x"]:
            with pytest.raises(FetchError, match="not "):
                await fetcher.fetch_webfinger(bad)
    assert len(server.seen) == 1
