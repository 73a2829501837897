"""The author hears of new responses: the private feed, `comments list --since`, the webhook.

The webhook's receiver is a real HTTP server (uvicorn on 127.0.0.1, in a thread),
reached through the blog's real guarded transport with FEDIBLOG_ALLOW_PRIVATE_ADDRESSES;
the fake fediverse answers every other host. Signatures are checked here with
Python's own ``hmac``, independently of ``notify.sign``.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any
from xml.etree import ElementTree

import httpx
import pytest
import uvicorn

from fediblog.config import Settings, load_settings
from fediblog.errors import ConfigError
from fediblog.models import PostDraft, utcnow
from fediblog.netguard import GuardedTransport
from fediblog.store import Store
from fediblog.web.deps import Services
from tests.conftest import BASE_URL, database_for, deliver, make_settings
from tests.fediverse import Fediverse
from tests.helpers import publish, remote_actor, remote_comment, run, running

ATOM = "{http://www.w3.org/2005/Atom}"
SECRET = "a-long-enough-webhook-secret-for-tests"


# ---- a webhook receiver on loopback ----------------------------------------------------------


@dataclass
class Receiver:
    """An ASGI app that records each POST and answers the statuses it is given."""

    statuses: deque[int] = field(default_factory=deque)
    received: list[tuple[dict[str, str], bytes]] = field(default_factory=list)

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        body, more = b"", True
        while more:
            message = await receive()
            body += message.get("body", b"")
            more = message.get("more_body", False)
        headers = {k.decode().lower(): v.decode() for k, v in scope["headers"]}
        self.received.append((headers, body))
        status = self.statuses.popleft() if self.statuses else 200
        await send({"type": "http.response.start", "status": status, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})


@contextlib.contextmanager
def receiving() -> Iterator[tuple[Receiver, str]]:
    """The receiver on 127.0.0.1 at a free port, and its URL."""
    receiver = Receiver()
    config = uvicorn.Config(
        receiver, host="127.0.0.1", port=0, lifespan="off", log_level="warning", access_log=False
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name="webhook", daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert thread.is_alive(), "the receiver stopped"
        assert time.monotonic() < deadline, "the receiver did not start"
        time.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield receiver, f"http://127.0.0.1:{port}/hook"
    finally:
        server.should_exit = True
        thread.join(timeout=10)


class Split(httpx.AsyncBaseTransport):
    """Loopback through the real guarded transport; every other host to the fake fediverse."""

    def __init__(self, fediverse: Fediverse) -> None:
        self._fake = fediverse.transport()
        self._real = GuardedTransport(allow_loopback=True)

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if request.url.host == "127.0.0.1":
            return await self._real.handle_async_request(request)
        return await self._fake.handle_async_request(request)

    async def aclose(self) -> None:
        await self._real.aclose()


@dataclass
class Blog:
    ctx: Services
    web: httpx.AsyncClient
    receiver: Receiver


@contextlib.asynccontextmanager
async def blog_with_webhook(
    tmp_path: Path, blog_keys: Path, fediverse: Fediverse, **overrides: Any
) -> AsyncIterator[Blog]:
    with receiving() as (receiver, url):
        values = {
            "notify_url": url,
            "notify_secret": SECRET,
            "allow_http": True,
            "allow_private_addresses": True,
            **overrides,
        }
        settings = make_settings(tmp_path, keys_dir=blog_keys, **values)
        transport = Split(fediverse)
        async with (
            running(settings, transport=transport, run_workers=False) as app,
            httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url=BASE_URL) as web,
        ):
            yield Blog(app.state.services, web, receiver)
        await transport.aclose()


def signed_correctly(headers: dict[str, str], body: bytes) -> bool:
    expected = "sha256=" + hmac.new(SECRET.encode(), body, hashlib.sha256).hexdigest()
    return hmac.compare_digest(headers.get("x-fediblog-signature", ""), expected)


def local_comment(text: str = "Nice post!", parent: int | None = None) -> dict[str, str]:
    fields = {"name": "Lou", "email": "lou@example.com", "website": "", "comment": text}
    if parent is not None:
        fields["parent"] = str(parent)
    return fields


# ---- the webhook ----------------------------------------------------------------------------


@pytest.mark.anyio
async def test_each_new_response_is_posted_once_correctly_signed(
    tmp_path: Path, blog_keys: Path, fediverse: Fediverse
) -> None:
    async with blog_with_webhook(
        tmp_path, blog_keys, fediverse, notify_topic="my-blog-responses"
    ) as blog:
        post = await publish(blog.ctx, "Hooked")
        alice = fediverse.add("mastodon.example", "alice", name="Alice")
        note = alice.note(1, blog.ctx.blog.object_id(post.uid), "Great read, thanks!")
        assert (await deliver(blog.web, blog.ctx, alice, alice.create(note))).status_code == 202
        form = await blog.web.post(f"/posts/{post.slug}/comment", data=local_comment())
        assert form.status_code == 303

        assert await blog.ctx.notifier.run_once() == 2
        assert await blog.ctx.notifier.run_once() == 0  # sent once, never again

    assert len(blog.receiver.received) == 2
    bodies = []
    for headers, body in blog.receiver.received:
        assert headers["content-type"] == "application/json"
        assert signed_correctly(headers, body)
        bodies.append(json.loads(body))
    published, held = sorted(bodies, key=lambda b: b["response"]["id"])
    post_url = f"{BASE_URL}/posts/{post.slug}"
    assert published["event"] == "response.published"
    assert published["post"] == {
        "title": "Hooked", "url": post_url, "id": blog.ctx.blog.object_id(post.uid)
    }  # fmt: skip
    response = published["response"]
    assert response["status"] == "published"
    assert response["author"]["handle"] == "@alice@mastodon.example"
    assert response["author"]["name"] == "Alice"
    assert response["excerpt"] == "Great read, thanks!"
    assert response["permalink"] == f"{post_url}/comments/{response['id']}"
    assert response["original"] == "https://mastodon.example/@alice/1"
    # ntfy's and Gotify's fields: a title, a message, where a tap leads, the topic.
    assert published["topic"] == "my-blog-responses"
    assert published["title"] == "New response: “Hooked”"
    assert published["message"] == "Alice (@alice@mastodon.example): Great read, thanks!"
    assert published["click"] == response["permalink"]
    assert held["event"] == "response.held"
    assert held["response"]["status"] == "held"
    assert held["response"]["author"] == {"name": "Lou", "handle": None, "url": None}
    assert held["title"] == "Held for approval: “Hooked”"
    assert f"fediblog comments approve {held['response']['id']}" in held["message"]
    assert "lou@example.com" not in json.dumps(bodies)  # the email never leaves


@pytest.mark.anyio
async def test_a_500_is_retried_later_and_a_400_is_final(
    tmp_path: Path, blog_keys: Path, fediverse: Fediverse
) -> None:
    async with blog_with_webhook(tmp_path, blog_keys, fediverse) as blog:
        post = await publish(blog.ctx, "Flaky")
        notifier = blog.ctx.notifier
        blog.receiver.statuses.extend([500, 200])
        await blog.web.post(f"/posts/{post.slug}/comment", data=local_comment("first"))

        assert await notifier.run_once() == 1
        (row,) = await blog.ctx.store.list_notifications()
        assert (row.status, row.attempts, row.last_error) == ("queued", 1, "HTTP 500")
        assert await notifier.run_once() == 0  # not due yet

        notifier.worker.clock = lambda: utcnow() + timedelta(hours=1)
        assert await notifier.run_once() == 1
        (row,) = await blog.ctx.store.list_notifications()
        assert (row.status, row.attempts) == ("sent", 2)
        first, second = blog.receiver.received
        assert first[1] == second[1]  # the same body, sent again

        blog.receiver.statuses.append(400)
        await blog.web.post(f"/posts/{post.slug}/comment", data=local_comment("second"))
        assert await notifier.run_once() == 1
        notifier.worker.clock = lambda: utcnow() + timedelta(days=3)
        assert await notifier.run_once() == 0
        latest = (await blog.ctx.store.list_notifications())[0]
        assert (latest.status, latest.last_error) == ("failed", "HTTP 400")
    assert len(blog.receiver.received) == 3


@pytest.mark.anyio
async def test_a_private_address_is_refused_without_the_setting(
    tmp_path: Path, blog_keys: Path, fediverse: Fediverse
) -> None:
    with receiving() as (receiver, url):
        settings = make_settings(
            tmp_path, keys_dir=blog_keys, notify_url=url, notify_secret=SECRET, allow_http=True
        )
        async with running(settings, run_workers=False) as app:
            ctx: Services = app.state.services
            post = await publish(ctx, "Guarded")
            ann = await remote_actor(ctx, "ann", "a.example")
            comment_id = await remote_comment(ctx, post, ann, "hello")
            await ctx.notifier.response_saved(comment_id)

            assert await ctx.notifier.run_once() == 1
            (row,) = await ctx.store.list_notifications()
    assert row.status == "failed"
    assert "non-public address" in row.last_error
    assert receiver.received == []


@pytest.mark.anyio
async def test_without_a_url_nothing_is_queued_and_private_replies_never_are(
    tmp_path: Path, blog_keys: Path, fediverse: Fediverse, ctx: Services, web: httpx.AsyncClient
) -> None:
    post = await publish(ctx, "Quiet")
    await web.post(f"/posts/{post.slug}/comment", data=local_comment())
    assert await ctx.store.count_notifications() == {}

    async with blog_with_webhook(tmp_path / "other", blog_keys, fediverse) as blog:
        post = await publish(blog.ctx, "Private")
        bob = fediverse.add("gts.example", "bob")
        note = bob.note(1, blog.ctx.blog.object_id(post.uid), "just for you")
        note["to"], note["cc"] = [f"{BASE_URL}/users/blog"], []
        assert (await deliver(blog.web, blog.ctx, bob, bob.create(note))).status_code == 202
        assert await blog.ctx.store.count_notifications() == {}


@pytest.mark.parametrize(
    ("values", "complaint"),
    [
        ({"notify_url": "https://hooks.example/x"}, "FEDIBLOG_NOTIFY_SECRET must be too"),
        ({"notify_url": "https://hooks.example/x", "notify_secret": "short"}, "at least 16"),
        ({"notify_url": "ftp://hooks.example/x", "notify_secret": SECRET}, "absolute https"),
        ({"notify_url": "hooks.example/x", "notify_secret": SECRET}, "absolute https"),
        ({"notify_url": "http://hooks.example/x", "notify_secret": SECRET}, "is http"),
        ({"notify_url": "https://hooks.example:x/", "notify_secret": SECRET}, "not a URL"),
        ({"notify_topic": "blog"}, "FEDIBLOG_NOTIFY_URL is not"),
        (
            {"notify_url": "https://ntfy.example/", "notify_secret": SECRET, "notify_topic": "a b"},
            "FEDIBLOG_NOTIFY_TOPIC may use",
        ),
    ],
)
def test_bad_notify_settings_fail_clearly(
    tmp_path: Path, values: dict[str, str], complaint: str
) -> None:
    with pytest.raises(ConfigError) as raised:
        make_settings(tmp_path, **values)
    assert complaint in str(raised.value)
    assert SECRET not in str(raised.value)
    assert "hooks.example" not in str(raised.value)  # the URL may carry a token


def test_a_notify_url_without_secret_stops_the_cli_in_one_line(
    blog_dir: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FEDIBLOG_NOTIFY_URL", "https://ntfy.example/")

    code, out, err = run(capsys, "feeds")

    assert code == 2
    assert out == ""
    assert err.count("\n") == 1
    assert "FEDIBLOG_NOTIFY_SECRET" in err


# ---- the private feed ------------------------------------------------------------------------


def feed_path(out: str) -> str:
    url = next(line for line in out.splitlines() if line.startswith(BASE_URL))
    assert url.startswith(f"{BASE_URL}/feeds/responses/")
    assert url.endswith(".atom")
    return url.removeprefix(BASE_URL)


def test_the_private_feed_works_rotates_and_refuses_unknown_tokens(
    blog_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run(capsys, "init")[0] == 0
    settings = load_settings()

    async def fetch(*paths: str) -> list[httpx.Response]:
        async with running(settings, run_workers=False) as app:
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url=BASE_URL) as client:
                return [await client.get(path) for path in paths]

    async def seed() -> None:
        async with running(settings, run_workers=False) as app:
            ctx: Services = app.state.services
            post = await publish(ctx, "Feed me")
            other = await publish(ctx, "Second post")
            ann = await remote_actor(ctx, "ann", "a.example", "Ann")
            await remote_comment(ctx, post, ann, "first, published", minutes=1)
            await remote_comment(ctx, other, ann, "second, held", minutes=2, status="pending")
            await remote_comment(ctx, post, ann, "third, private", visibility="direct")
            await remote_comment(ctx, post, ann, "fourth, rejected", status="rejected")

    asyncio.run(seed())
    (before,) = asyncio.run(fetch("/feeds/responses/anything.atom"))
    assert before.status_code == 404  # no token made yet: nothing answers

    code, out, _ = run(capsys, "feeds")
    assert code == 0
    path = feed_path(out)
    assert "webhook: off" in out
    assert feed_path(run(capsys, "feeds")[1]) == path  # made once, then kept

    found, wrong = asyncio.run(fetch(path, path.replace("/responses/", "/responses/x")))
    assert found.status_code == 200
    assert found.headers["cache-control"].startswith("private")
    assert wrong.status_code == 404
    entries = ElementTree.fromstring(found.content).findall(f"{ATOM}entry")
    titles = [entry.findtext(f"{ATOM}title") for entry in entries]
    assert titles == ["[held] Ann on “Second post”", "[published] Ann on “Feed me”"]
    assert [e.find(f"{ATOM}category").get("term") for e in entries] == ["held", "published"]
    assert "fediblog comments approve" in (entries[0].findtext(f"{ATOM}content") or "")

    code, out, _ = run(capsys, "feeds", "rotate")
    assert code == 0
    rotated = feed_path(out)
    assert rotated != path
    old, new = asyncio.run(fetch(path, rotated))
    assert (old.status_code, new.status_code) == (404, 200)


# ---- comments list --since ------------------------------------------------------------------


def test_comments_list_since_shows_only_what_arrived_in_that_time(
    blog_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run(capsys, "init")[0] == 0
    settings: Settings = load_settings()

    async def seed() -> None:
        async with running(settings, run_workers=False) as app:
            ctx: Services = app.state.services
            post = await publish(ctx, "Timely")
            ann = await remote_actor(ctx, "ann", "a.example")
            now = utcnow()
            for text, age in (("days ago", timedelta(days=3)), ("hours ago", timedelta(hours=3))):
                await remote_comment(ctx, post, ann, text, published=now - age)
            await remote_comment(ctx, post, ann, "just now", published=now - timedelta(minutes=5))
            await remote_comment(
                ctx, post, ann, "held now", published=now - timedelta(minutes=1), status="pending"
            )

    asyncio.run(seed())

    def listed(*options: str) -> list[str]:
        code, out, err = run(capsys, "comments", "list", *options)
        assert (code, err) == (0, "")
        return [line.rsplit(": ", 1)[-1] for line in out.splitlines()]

    assert listed("--since", "45m") == ["held now", "just now"]
    assert listed("--since", "4h") == ["held now", "just now", "hours ago"]
    assert listed("--since", "1h30m", "--pending") == ["held now"]
    assert listed("--since", "1w") == ["held now", "just now", "hours ago", "days ago"]
    assert listed("--since", "30s") == ["no comments in the last 30s"]

    for bad in ("2x", "h", "", "-3h", "0m", "99999d", "3 d"):
        code, out, err = run(capsys, "comments", "list", f"--since={bad}")
        assert code == 2, bad
        assert out == ""
        assert err.count("\n") == 1, err
        assert "--since takes a duration" in err


def test_store_keeps_one_notification_per_response_and_event(tmp_path: Path) -> None:
    async def check() -> tuple[bool, bool]:
        store = await Store.open(database_for(tmp_path, "n.db"))
        try:
            post = await store.save_new_post(
                PostDraft(title="t", slug="t", body_md="b"), uid="u", body_html="b",
                published=utcnow(),
            )  # fmt: skip
            comment_id = await store.save_comment(
                post_id=post.id, parent_id=None, content_html="<p>x</p>", published=utcnow(),
                received=utcnow(), source="local",
            )  # fmt: skip
            first = await store.save_notification(comment_id, "response.held", "{}")
            again = await store.save_notification(comment_id, "response.held", "{}")
            return first, again
        finally:
            await store.close()

    assert asyncio.run(check()) == (True, False)


def test_the_webhook_secret_never_appears_in_the_settings_repr() -> None:
    from fediblog.config import Settings

    assert "s3cret-value-for-the-hook" not in repr(
        Settings(notify_secret="s3cret-value-for-the-hook")
    )
