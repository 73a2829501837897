"""GETs and HEADs of a cached post page are answered before the middleware stack and the
router (app.py ``App``, ``html.post_page_from_cache``): the same bytes as the routed
handler gives, and the usual way for everything the cache cannot answer alone.

The real app over httpx's ASGI transport. Which way a request went is seen by wrapping
the app's middleware stack (starlette's ``middleware_stack``): the routed requests pass
through it, the fast path's do not.
"""

from __future__ import annotations

import base64
import json
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from starlette.applications import Starlette
from starlette.routing import Match
from starlette.types import Receive, Scope, Send

from fediblog.app import SECURITY_HEADERS, App
from fediblog.blog import parse_post
from fediblog.errors import StorageUnavailable
from fediblog.models import Post, utcnow
from fediblog.store import Store
from fediblog.web import html
from fediblog.web.commenter import COOKIE
from fediblog.web.deps import Services
from tests.conftest import BASE_URL, make_settings
from tests.helpers import publish, remote_actor, remote_comment, running

pytestmark = pytest.mark.anyio

Wire = tuple[int, list[tuple[bytes, bytes]], bytes]


@dataclass
class Blog:
    app: App
    ctx: Services
    web: httpx.AsyncClient
    routed: list[str]  # paths of the requests that reached the middleware stack

    async def fetch(self, url: str, method: str = "GET", **headers: str) -> Wire:
        """Status, raw headers in order, and the body as sent (not decompressed)."""
        request = self.web.build_request(method, url, headers=headers)
        response = await self.web.send(request, stream=True)
        body = b"".join([chunk async for chunk in response.aiter_raw()])
        await response.aclose()
        return response.status_code, list(response.headers.raw), body

    async def both_ways(self, url: str, method: str = "GET", **headers: str) -> tuple[Wire, Wire]:
        """The answer of the fast path (which must take it) and of the routed handler."""
        self.routed.clear()
        fast = await self.fetch(url, method, **headers)
        assert self.routed == [], "the fast path did not answer"
        self.app.cached_pages = False
        try:
            routed = await self.fetch(url, method, **headers)
        finally:
            self.app.cached_pages = True
        assert self.routed == [url.partition("?")[0]]
        self.routed.clear()
        return fast, routed


def watch(app: Starlette) -> list[str]:
    seen: list[str] = []
    inner = app.build_middleware_stack()

    async def counting(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            seen.append(scope["path"])
        await inner(scope, receive, send)

    app.middleware_stack = counting
    return seen


async def open_blog(app: Starlette) -> AsyncIterator[Blog]:
    assert isinstance(app, App)
    routed = watch(app)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url=BASE_URL) as web:
        yield Blog(app, app.state.services, web, routed)


@pytest.fixture
async def blog(fed_app: Starlette) -> AsyncIterator[Blog]:
    async for opened in open_blog(fed_app):
        yield opened


async def commented_post(ctx: Services, title: str = "Popular", count: int = 12) -> Post:
    """A post whose page is long enough to be gzipped, with threaded comments."""
    post = await publish(ctx, title, "A paragraph of text. " * 100)
    bob = await remote_actor(ctx, "bob", "b.example")
    first = await remote_comment(ctx, post, bob, "first of all", minutes=1)
    for n in range(2, count + 1):
        await remote_comment(ctx, post, bob, f"comment {n}", minutes=n, parent=first)
    return post


def reader_cookie(name: str = "Dana Reader") -> str:
    data = {"name": name, "email": "dana@mail.example", "website": ""}
    return base64.urlsafe_b64encode(json.dumps(data).encode()).decode().rstrip("=")


async def test_the_fast_path_sends_the_bytes_the_handler_sends(blog: Blog) -> None:
    post = await commented_post(blog.ctx)
    url = f"/posts/{post.slug}"
    first = await blog.fetch(url, **{"Accept-Encoding": "identity"})  # renders and caches it
    zipped = await blog.fetch(url, **{"Accept-Encoding": "gzip"})
    etag, gzip_etag = dict(first[1])[b"etag"].decode(), dict(zipped[1])[b"etag"].decode()
    modified = dict(first[1])[b"last-modified"].decode()
    variants: list[dict[str, str]] = [
        {"Accept-Encoding": "identity"},
        {"Accept-Encoding": "gzip"},
        {"Accept-Encoding": "gzip;q=0, identity"},
        {"Accept-Encoding": "br, *"},
        {"Accept-Encoding": "identity", "Accept": "text/html,application/xhtml+xml"},
        {"Accept-Encoding": "identity", "If-None-Match": etag},
        {"Accept-Encoding": "gzip", "If-None-Match": gzip_etag},
        {"Accept-Encoding": "gzip", "If-None-Match": etag},  # the other representation's
        {"Accept-Encoding": "identity", "If-None-Match": f'"x", W/{etag}'},
        {"Accept-Encoding": "identity", "If-None-Match": "*"},
        {"Accept-Encoding": "identity", "If-Modified-Since": modified},
        {"Accept-Encoding": "identity", "If-Modified-Since": "not a date"},
        {"Accept-Encoding": "identity", "Cookie": "theme=dark"},
        {"Accept-Encoding": "identity", "Cookie": f"{COOKIE}=not-base64!"},  # ignored
    ]
    statuses = []
    for method in ("GET", "HEAD"):
        for headers in variants:
            fast, routed = await blog.both_ways(url, method, **headers)
            assert fast == routed, (method, headers)
            statuses.append(fast[0])
    assert statuses.count(304) == 2 * 5

    fast, _ = await blog.both_ways(url, **{"Accept-Encoding": "gzip"})
    names = [name for name, _ in fast[1]]
    assert len(names) == len(set(names))  # each header once
    for header in SECURITY_HEADERS:
        assert header in fast[1]
    assert dict(fast[1])[b"content-encoding"] == b"gzip"
    assert dict(fast[1])[b"vary"] == b"Accept, Accept-Encoding"
    assert dict(fast[1])[b"cache-control"] == b"public, no-cache"


async def test_head_is_answered_with_the_headers_of_get(blog: Blog) -> None:
    post = await commented_post(blog.ctx)
    url = f"/posts/{post.slug}"
    get = await blog.fetch(url)
    blog.routed.clear()
    head = await blog.fetch(url, "HEAD")

    assert blog.routed == []
    assert head[:2] == get[:2]  # the server (uvicorn) drops the body, as for every route


async def test_a_new_comment_is_seen_at_once(blog: Blog) -> None:
    post = await commented_post(blog.ctx, count=2)
    url = f"/posts/{post.slug}"
    before = await blog.fetch(url, **{"Accept-Encoding": "identity"})
    carol = await remote_actor(blog.ctx, "carol", "c.example")
    await remote_comment(blog.ctx, post, carol, "breaking news", minutes=30)
    blog.routed.clear()

    after = await blog.fetch(url, **{"Accept-Encoding": "identity"})
    assert blog.routed == [url]  # a new version: rendered anew, the usual way
    again = await blog.both_ways(url, **{"Accept-Encoding": "identity"})

    assert b"breaking news" in after[2]
    assert b"breaking news" not in before[2]
    assert dict(after[1])[b"etag"] != dict(before[1])[b"etag"]
    assert again[0] == again[1] == after


async def test_a_comment_saved_by_another_process_is_seen(blog: Blog) -> None:
    post = await commented_post(blog.ctx, count=2)
    url = f"/posts/{post.slug}"
    carol = await remote_actor(blog.ctx, "carol", "c.example")
    await blog.fetch(url)
    other = await Store.open(blog.ctx.settings.store_location, create=False)  # as `fediblog worker`
    try:
        moment = utcnow()
        await other.save_comment(
            post_id=post.id,
            parent_id=None,
            content_html="<p>from the worker</p>",
            published=moment,
            received=moment,
            source="fediverse",
            ap_id="https://c.example/notes/worker",
            actor_id=carol,
            status="published",
            visibility="public",
        )
    finally:
        await other.close()

    blog.routed.clear()
    page = await blog.fetch(url, **{"Accept-Encoding": "identity"})
    assert blog.routed == [url]  # noticed (``version_max_age`` is 0 in tests): rendered anew
    again = await blog.both_ways(url, **{"Accept-Encoding": "identity"})

    assert b"from the worker" in page[2]
    assert again[0] == again[1] == page


async def test_an_edit_is_seen_and_the_old_slug_redirects(blog: Blog) -> None:
    post = await commented_post(blog.ctx, "First name")
    await blog.fetch("/posts/first-name")
    await blog.fetch("/posts/first-name", **{"Accept-Encoding": "identity"})
    await blog.ctx.blog.edit(
        post.slug, parse_post("---\ntitle: Renamed\nslug: renamed\n---\n" + "More text. " * 200)
    )
    blog.routed.clear()

    moved = await blog.fetch("/posts/first-name")
    head = await blog.fetch("/posts/first-name", "HEAD")
    renamed = await blog.fetch("/posts/renamed", **{"Accept-Encoding": "identity"})

    assert blog.routed == ["/posts/first-name", "/posts/first-name", "/posts/renamed"]
    assert (moved[0], dict(moved[1])[b"location"]) == (301, b"/posts/renamed")
    assert head[0] == 301
    assert b"More text." in renamed[2]
    fast, routed = await blog.both_ways("/posts/renamed", **{"Accept-Encoding": "identity"})
    assert fast == routed == renamed


async def test_a_remembered_reader_gets_a_page_of_their_own(blog: Blog) -> None:
    post = await commented_post(blog.ctx)
    url = f"/posts/{post.slug}"
    await blog.fetch(url)  # the shared page is cached
    blog.routed.clear()

    mine = await blog.fetch(url, Cookie=f"{COOKIE}={reader_cookie()}")
    theirs = await blog.fetch(url, **{"Accept-Encoding": "identity"})

    assert blog.routed == [url]  # the reader's went the usual way, the other one did not
    assert b"Dana Reader" in mine[2]
    assert dict(mine[1])[b"cache-control"] == b"private, no-store"
    assert b"Dana Reader" not in theirs[2]


@pytest.mark.parametrize(
    ("suffix", "headers"),
    [
        ("?responses=1", {}),  # a query the page reads
        ("?utm_source=feed", {}),  # any query at all
        ("", {"Accept": "application/activity+json"}),  # a server wants the object
        ("", {"Accept": 'application/ld+json; profile="https://www.w3.org/ns/activitystreams"'}),
    ],
)
async def test_queries_and_servers_go_the_usual_way(
    blog: Blog, suffix: str, headers: dict[str, str]
) -> None:
    post = await commented_post(blog.ctx)
    await blog.fetch(f"/posts/{post.slug}")
    blog.routed.clear()

    answer = await blog.fetch(f"/posts/{post.slug}{suffix}", **headers)

    assert blog.routed == [f"/posts/{post.slug}"]
    assert answer[0] == 200


async def test_pages_not_cached_go_the_usual_way(blog: Blog) -> None:
    post = await commented_post(blog.ctx)

    first = await blog.fetch(f"/posts/{post.slug}")
    missing = await blog.fetch("/posts/no-such-post")
    blog.ctx.pages.clear()
    again = await blog.fetch(f"/posts/{post.slug}", "HEAD")

    assert blog.routed == [f"/posts/{post.slug}", "/posts/no-such-post", f"/posts/{post.slug}"]
    assert (first[0], missing[0], again[0]) == (200, 404, 200)


async def test_nothing_under_admin_takes_the_fast_path(blog: Blog) -> None:
    post = await commented_post(blog.ctx)
    await blog.fetch(f"/posts/{post.slug}")
    paths = ["/admin", "/admin/", "/admin/login", f"/admin/posts/{post.slug}"]
    blog.routed.clear()

    answers = [await blog.fetch(path) for path in paths]

    assert blog.routed == paths
    for status, headers, _ in answers:
        assert status in (200, 302, 303, 307, 404), status
        assert dict(headers)[b"cache-control"] == b"no-store"


async def test_a_database_error_is_answered_as_the_usual_way_answers_it(
    blog: Blog, monkeypatch: pytest.MonkeyPatch
) -> None:
    post = await commented_post(blog.ctx)
    await blog.fetch(f"/posts/{post.slug}")

    async def gone() -> tuple[int, int]:
        raise StorageUnavailable("disk I/O error")

    monkeypatch.setattr(blog.ctx.store, "version", gone)
    blog.routed.clear()
    answer = await blog.fetch(f"/posts/{post.slug}")

    assert blog.routed == [f"/posts/{post.slug}"]
    assert answer[0] == 503


async def test_the_access_log_still_logs_each_request(
    tmp_path: Path, blog_keys: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="fediblog.access")
    settings = make_settings(tmp_path, keys_dir=blog_keys, access_log=True)
    async with running(settings, run_workers=False) as app:
        async for opened in open_blog(app):
            post = await commented_post(opened.ctx)
            url = f"/posts/{post.slug}"
            await opened.fetch(url)  # rendered, the usual way
            etag = dict((await opened.fetch(url))[1])[b"etag"].decode()
            await opened.fetch(url, "HEAD", **{"If-None-Match": etag})
            assert opened.routed == [url]

    lines = [r.getMessage() for r in caplog.records if r.name == "fediblog.access"]
    assert len(lines) == 3
    assert all(f'"GET {url} HTTP/1.1" 200 ' in line for line in lines[:2])
    assert f'"HEAD {url} HTTP/1.1" 304 ' in lines[2]


@pytest.mark.parametrize(
    "path",
    [
        "/posts/hello",
        "/posts/",
        "/posts",
        "/posts/hello/",
        "/posts/hello/comments/1",
        "/posts//x",
        "/posts/a b",
        "/xposts/hello",
        "/admin/posts/hello",
    ],
)
def test_post_paths_match_exactly_as_their_route_does(path: str) -> None:
    scope = {"type": "http", "method": "GET", "path": path, "root_path": ""}
    route = next(r for r in html.routes if getattr(r, "endpoint", None) is html.post_page)
    match, child = route.matches(scope)
    routed = child["path_params"]["slug"] if match == Match.FULL else None
    assert html.post_path_slug(path) == routed
