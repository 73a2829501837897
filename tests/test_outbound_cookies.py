"""The blog keeps no cookie from another server, and sends none back.

httpx's client keeps every Set-Cookie it is answered with for as long as the client
lives (the blog's process), and sends each back on later requests to its server: a
fediverse server could follow the blog across its fetches, and a hostile one, answering
each fetch a stranger points the blog at with a hundred new cookies, could grow that
jar without end. The blog's outbound clients take ``NoCookies``, which keeps nothing.

Here a fake Mastodon instance (tests/test_federation_e2e.py), on the in-memory network
the blog's real clients use in tests, answers every request with fifty new cookies and
records any Cookie header it is sent: its account follows the blog, the blog fetches
the account and delivers to it, again and again.
"""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from fediblog.netguard import NoCookies
from tests import test_federation_e2e
from tests.helpers import publish
from tests.test_federation_e2e import World

pytestmark = pytest.mark.anyio

world = test_federation_e2e.world  # the fixture: the blog and fakes, in memory

PER_ANSWER = 50


class SetsCookies:
    """An ASGI app around another: each answer sets PER_ANSWER cookies never set before;
    the Cookie header of every request is kept."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.answers = 0
        self.sent_back: list[bytes] = []

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            self.sent_back += [value for name, value in scope["headers"] if name == b"cookie"]

        async def with_cookies(message: Any) -> None:
            if message["type"] == "http.response.start":
                self.answers += 1
                cookies = [
                    (b"set-cookie", f"t{self.answers}_{n}=tracking; Path=/; Max-Age=86400".encode())
                    for n in range(PER_ANSWER)
                ]
                message = {**message, "headers": [*message.get("headers", []), *cookies]}
            await send(message)

        await self.app(scope, receive, with_cookies)


async def test_no_request_of_the_blog_sends_back_a_cookie_it_was_given(world: World) -> None:
    fake = world.fake("cookies.test")
    server = world.internet.hosts["cookies.test"] = SetsCookies(fake)
    account = fake.add_account("reader")

    await world.follow(account)  # the blog fetches the account's key: answered with cookies
    assert await world.services.deliverer.deliver_once() == 1  # the Accept
    for _ in range(3):
        await world.services.fetcher.fetch_document(account.ap_id)
    await publish(world.services, "A post")
    assert await world.services.deliverer.deliver_once() == 1  # its Create

    gets = [seen for seen in fake.seen if seen.method == "GET"]
    assert len(gets) >= 4
    assert fake.first("Accept")
    assert fake.first("Create")
    assert server.answers >= 6  # every one of them with fifty new cookies
    assert server.sent_back == []


async def test_the_jar_keeps_nothing_however_many_cookies_come() -> None:
    server = SetsCookies(_ok)
    transport = httpx.ASGITransport(app=server)
    async with httpx.AsyncClient(
        transport=transport, base_url="https://cookies.test", cookies=NoCookies()
    ) as client:
        for _ in range(20):
            assert (await client.get("/")).status_code == 200
        assert len(client.cookies.jar) == 0
    assert server.answers == 20
    assert server.sent_back == []
    # The same client with httpx's own jar keeps them all and sends them back.
    server = SetsCookies(_ok)
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=server), base_url="https://cookies.test"
    ) as client:
        for _ in range(3):
            await client.get("/")
        assert len(client.cookies.jar) == 3 * PER_ANSWER
    assert len(server.sent_back) == 2


async def _ok(scope: Any, receive: Any, send: Any) -> None:
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"ok"})
