"""The media proxy: readers' browsers load commenters' images from the blog only.

The blog is the real app (lifespan running, workers off); its network is the fake
fediverse behind ``Origin``, an ASGI app that also serves image files, counts what it
was asked, and can be told to answer slowly, endlessly or not at all. One test runs
the production transport (GuardedTransport, private addresses refused) instead.
"""

from __future__ import annotations

import asyncio
import re
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette

from fediblog.config import Settings
from fediblog.models import utcnow
from fediblog.proxy import BLANK_GIF, sniff_image
from fediblog.web.deps import Services
from tests import dbpeek
from tests.conftest import BASE_URL, deliver, make_settings
from tests.fediverse import Fediverse
from tests.helpers import publish, remote_comment, running, soup

pytestmark = pytest.mark.anyio

# A real 1x1 PNG (red), as a server would send it.
PNG = bytes.fromhex(
    "89504e470d0a1a0a0000000d4948445200000001000000010806000000"
    "1f15c4890000000d49444154789c63f8cfc0f01f0005000201a3bd3f9f0000000049454e44ae426082"
)
AVATAR = "https://mastodon.example/avatars/alice.png"
EMOJI = "https://mastodon.example/emoji/blob.png"
PHOTO = "https://files.mastodon.example/media/photo.png"


@dataclass
class Served:
    body: bytes | None  # None: an endless body
    content_type: str
    status: int = 200
    delay: float = 0.0
    headers: dict[str, str] = field(default_factory=dict)
    gate: asyncio.Event | None = None  # held until set


class Origin(httpx.AsyncBaseTransport):
    """The fake fediverse, plus image files by URL; every request is counted.

    A transport: httpx's ASGITransport reads a whole body before it answers, so an
    endless body is streamed from here, counting the chunks the blog read.
    """

    def __init__(self, fediverse: Fediverse) -> None:
        self.fediverse = fediverse
        self.files: dict[str, Served] = {}
        self.asked: Counter[str] = Counter()
        self.chunks_read = 0
        self._asgi = httpx.ASGITransport(app=self)

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        served = self.files.get(str(request.url))
        if served is None or served.body is not None:
            return await self._asgi.handle_async_request(request)
        self.asked[str(request.url)] += 1
        return httpx.Response(
            200, headers={"content-type": served.content_type}, stream=Endless(self)
        )

    def serve(
        self, url: str, body: bytes | None, content_type: str = "image/png", **kw: Any
    ) -> None:
        self.files[url] = Served(body, content_type, **kw)

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        host = dict(scope["headers"]).get(b"host", b"").decode()
        url = f"{scope['scheme']}://{host}{scope['path']}"
        self.asked[url] += 1
        served = self.files.get(url)
        if served is None:
            await self.fediverse(scope, receive, send)
            return
        if served.gate is not None:
            await served.gate.wait()
        await asyncio.sleep(served.delay)
        headers = [(b"content-type", served.content_type.encode())]
        headers += [(k.encode(), v.encode()) for k, v in served.headers.items()]
        await send({"type": "http.response.start", "status": served.status, "headers": headers})
        await send({"type": "http.response.body", "body": served.body or b""})


class Endless(httpx.AsyncByteStream):
    def __init__(self, origin: Origin) -> None:
        self._origin = origin

    async def __aiter__(self) -> AsyncIterator[bytes]:
        yield PNG
        for _ in range(10_000):  # far past any cap
            self._origin.chunks_read += 1
            yield b"\0" * 65536


@pytest.fixture
def origin(fediverse: Fediverse) -> Origin:
    return Origin(fediverse)


@pytest.fixture
async def proxied_app(settings: Settings, origin: Origin) -> AsyncIterator[Starlette]:
    async with running(settings, transport=origin, run_workers=False) as app:
        yield app


@pytest.fixture
def pctx(proxied_app: Starlette) -> Services:
    found: Services = proxied_app.state.services
    return found


@pytest.fixture
async def pweb(proxied_app: Starlette) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=proxied_app)
    async with httpx.AsyncClient(transport=transport, base_url=BASE_URL) as client:
        yield client


async def proxied(ctx: Services, url: str, kind: str = "image") -> str:
    await ctx.proxy.register([url], kind)
    return ctx.proxy.local_url(url)


def image_sources(html: str) -> list[str]:
    return [str(img["src"]) for img in soup(html).find_all("img")]


# ---- the page: every image a reader loads is the blog's -------------------------------


async def test_a_comment_renders_only_proxied_images_under_img_src_self(
    pweb: httpx.AsyncClient, pctx: Services, fediverse: Fediverse
) -> None:
    post = await publish(pctx, "Pictures")
    alice = fediverse.add("mastodon.example", "alice")
    note = alice.note(
        1,
        pctx.blog.object_id(post.uid),
        "Look :blob:",
        tag=[{"type": "Emoji", "name": ":blob:", "icon": {"type": "Image", "url": EMOJI}}],
        attachment=[{"type": "Document", "mediaType": "image/png", "url": PHOTO, "name": "A cat"}],
    )
    await deliver(pweb, pctx, alice, alice.create(note))
    like: dict[str, object] = {"id": f"{alice.id}#likes/1", "type": "Like", "actor": alice.id,
                               "object": pctx.blog.object_id(post.uid)}  # fmt: skip
    await deliver(pweb, pctx, alice, like)

    response = await pweb.get(f"/posts/{post.slug}")

    sources = image_sources(response.text)
    assert sorted(sources) == sorted(
        [pctx.proxy.local_url(url) for url in (AVATAR, AVATAR, EMOJI, PHOTO)]
    )  # the comment's avatar, the like's avatar, the emoji, the attachment
    assert all(re.fullmatch(r"/proxy/[0-9a-f]{32}", src) for src in sources)
    assert PHOTO in response.text  # the attachment's link to the original stays
    csp = response.headers["content-security-policy"]
    assert "img-src 'self';" in csp
    assert "https:" not in csp.split("img-src")[1].split(";")[0]


async def test_images_stored_before_the_proxy_are_put_behind_it(
    pweb: httpx.AsyncClient, pctx: Services
) -> None:
    post = await publish(pctx, "Old")
    icon = "https://gts.example/avatars/bob.png"
    actor_id = await pctx.store.save_actor(
        ap_id="https://gts.example/users/bob", username="bob", domain="gts.example",
        name="Bob", url=None, icon_url=icon, inbox=None, shared_inbox=None, key_id=None,
        public_key_pem=None, fetched=utcnow(),
    )  # fmt: skip
    comment = await remote_comment(pctx, post, actor_id, "old")
    old_html = f'<p>hi <img class="emoji" src="{EMOJI}" alt=":blob:"></p>'
    await pctx.store.save_comment_images([(comment, old_html)])
    before = image_sources((await pweb.get(f"/posts/{post.slug}")).text)
    assert before == ["/static/avatar.svg", EMOJI]  # no avatar key yet, the old emoji

    assert await pctx.proxy.sweep() == 2

    after = image_sources((await pweb.get(f"/posts/{post.slug}")).text)
    assert after == [pctx.proxy.local_url(icon), pctx.proxy.local_url(EMOJI)]
    assert await pctx.proxy.sweep() == 0


# ---- serving: fetched once, checked, cached -------------------------------------------


async def test_the_proxy_serves_an_image_with_its_headers_and_keeps_it(
    pweb: httpx.AsyncClient, pctx: Services, origin: Origin, settings: Settings
) -> None:
    origin.serve(PHOTO, PNG, "image/png; charset=binary")
    path = await proxied(pctx, PHOTO)

    first = await pweb.get(path)
    second = await pweb.get(path)

    for response in (first, second):
        assert response.status_code == 200
        assert response.content == PNG
        assert response.headers["content-type"] == "image/png"
        assert response.headers["cache-control"] == "public, max-age=604800"
        assert response.headers["x-content-type-options"] == "nosniff"
        assert response.headers.get_list("content-security-policy") == ["default-src 'none'"]
    assert origin.asked[PHOTO] == 1
    key = path.rsplit("/", 1)[1]
    assert (settings.database.parent / "proxy" / key).read_bytes() == PNG


async def test_an_image_is_served_as_what_its_bytes_are(
    pweb: httpx.AsyncClient, pctx: Services, origin: Origin
) -> None:
    origin.serve(PHOTO, PNG, "image/jpeg")  # mislabelled, but an image

    response = await pweb.get(await proxied(pctx, PHOTO))

    assert response.content == PNG
    assert response.headers["content-type"] == "image/png"


async def test_concurrent_requests_for_one_image_share_one_fetch(
    pweb: httpx.AsyncClient, pctx: Services, origin: Origin
) -> None:
    gate = asyncio.Event()
    origin.serve(PHOTO, PNG, gate=gate)
    path = await proxied(pctx, PHOTO)

    requests = [asyncio.create_task(pweb.get(path)) for _ in range(6)]
    await asyncio.sleep(0.05)
    gate.set()
    responses = await asyncio.gather(*requests)

    assert [r.content for r in responses] == [PNG] * 6
    assert origin.asked[PHOTO] == 1


async def test_unknown_or_forged_keys_are_not_found(
    pweb: httpx.AsyncClient, pctx: Services, origin: Origin
) -> None:
    origin.serve(PHOTO, PNG)
    real = await proxied(pctx, PHOTO)
    forged = "0" * 32
    for path in (f"/proxy/{forged}", "/proxy/not-a-key", real.upper(), real + "0"):
        assert (await pweb.get(path)).status_code == 404
    assert origin.asked[PHOTO] == 0


# ---- failures: a placeholder, remembered ------------------------------------------------


async def failed(pweb: httpx.AsyncClient, pctx: Services, url: str, kind: str = "image") -> str:
    """Ask for ``url`` through the proxy: it must answer our placeholder, briefly cached."""
    response = await pweb.get(await proxied(pctx, url, kind))
    assert response.status_code == 200
    if kind == "avatar":
        assert response.headers["content-type"] == "image/svg+xml"
        assert response.content.startswith(b"<svg")
    else:
        assert response.content == BLANK_GIF
    assert response.headers["cache-control"] == "public, max-age=300"
    row = await pctx.store.get_proxied(response.url.path.rsplit("/", 1)[1])
    assert row is not None
    assert row.status == "failed"
    return str(row.error)


@pytest.mark.parametrize(
    "url", ["https://169.254.169.254/latest/meta-data", "https://10.0.0.1/a.png",
            "https://[::ffff:127.0.0.1]/a.png", "http://mastodon.example/a.png"]
)  # fmt: skip
async def test_private_addresses_and_http_are_never_fetched(
    pweb: httpx.AsyncClient, pctx: Services, origin: Origin, url: str
) -> None:
    origin.serve(url, PNG)

    error = await failed(pweb, pctx, url, "avatar")

    assert origin.asked[url] == 0
    assert "not a public address" in error or "http URLs" in error


async def test_a_redirect_to_a_private_address_is_refused(
    pweb: httpx.AsyncClient, pctx: Services, origin: Origin
) -> None:
    inner = "https://10.0.0.1/secret.png"
    origin.serve(PHOTO, b"", status=302, headers={"location": inner})
    origin.serve(inner, PNG)

    await failed(pweb, pctx, PHOTO)

    assert origin.asked[PHOTO] == 1
    assert origin.asked[inner] == 0


@pytest.mark.parametrize(
    ("body", "content_type", "reason"),
    [
        (b"<!doctype html><p>hello</p>", "image/png", "no image we keep"),
        (b'<svg xmlns="http://www.w3.org/2000/svg"><script>x</script></svg>',
         "image/svg+xml", "is image/svg+xml"),
        (b'<svg xmlns="http://www.w3.org/2000/svg"/>', "image/png", "no image we keep"),
        (PNG, "text/html", "is text/html"),
        (b"not found", "image/png", "HTTP 404"),
    ],
)  # fmt: skip
async def test_what_is_not_a_kept_image_is_refused(
    pweb: httpx.AsyncClient, pctx: Services, origin: Origin, body: bytes, content_type: str,
    reason: str,
) -> None:  # fmt: skip
    origin.serve(PHOTO, body, content_type, status=404 if reason == "HTTP 404" else 200)

    assert reason in await failed(pweb, pctx, PHOTO)


async def test_a_body_past_the_cap_is_cut_off_while_streaming(
    pweb: httpx.AsyncClient, pctx: Services, origin: Origin
) -> None:
    pctx.proxy.max_bytes = 200_000
    origin.serve(PHOTO, None)  # endless, no Content-Length

    assert "the cap of 200000 bytes" in await failed(pweb, pctx, PHOTO)
    assert origin.chunks_read <= 4  # stopped reading at the cap


async def test_a_slow_origin_ends_at_the_deadline(
    pweb: httpx.AsyncClient, pctx: Services, origin: Origin
) -> None:
    pctx.proxy.timeout = 0.2
    origin.serve(PHOTO, PNG, delay=30)

    started = asyncio.get_running_loop().time()
    assert "within 0.2 s" in await failed(pweb, pctx, PHOTO)
    assert asyncio.get_running_loop().time() - started < 2


async def test_a_failure_is_remembered_so_page_views_fetch_nothing_more(
    pweb: httpx.AsyncClient, pctx: Services, origin: Origin
) -> None:
    origin.serve(PHOTO, b"gone", "text/plain", status=500)
    await failed(pweb, pctx, PHOTO)

    for _ in range(3):
        assert (await pweb.get(pctx.proxy.local_url(PHOTO))).content == BLANK_GIF

    assert origin.asked[PHOTO] == 1


@pytest.mark.parametrize(
    "damage",
    [
        # cached, but nothing says as what; failed, but nothing says when
        "UPDATE proxy_media SET status = 'cached', content_type = NULL WHERE key = ?",
        "UPDATE proxy_media SET status = 'failed', fetched_at = NULL WHERE key = ?",
    ],
    ids=["cached-without-a-type", "failed-without-a-time"],
)
async def test_a_proxied_row_missing_what_it_needs_is_fetched_again(
    pweb: httpx.AsyncClient, pctx: Services, origin: Origin, settings: Settings, damage: str
) -> None:
    """Nothing the blog writes leaves such a row (a hand-edited or restored database
    could): it is fetched again, never served without a content type nor a 500."""
    origin.serve(PHOTO, PNG, "image/png")
    path = await proxied(pctx, PHOTO)
    assert (await pweb.get(path)).status_code == 200
    key = path.rsplit("/", 1)[1]
    dbpeek.execute(settings, (damage, (key,)))

    response = await pweb.get(path)

    assert response.status_code == 200
    assert response.content == PNG
    assert response.headers["content-type"] == "image/png"
    assert origin.asked[PHOTO] == 2
    row = await pctx.store.get_proxied(key)
    assert row is not None
    assert (row.status, row.content_type) == ("cached", "image/png")


async def test_host_names_of_private_addresses_are_refused_in_production(
    tmp_path: Path, blog_keys: Path
) -> None:
    # The production transport: GuardedTransport, no private addresses, https only.
    settings = make_settings(tmp_path, keys_dir=blog_keys)
    async with running(settings, run_workers=False) as app:
        ctx: Services = app.state.services
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url=BASE_URL
        ) as web:
            error = await failed(web, ctx, "https://localhost/avatar.png", "avatar")
    assert "non-public address" in error


# ---- the cache is bounded ------------------------------------------------------------------


async def test_the_least_recently_used_images_are_pruned_past_the_cap(
    pweb: httpx.AsyncClient, pctx: Services, origin: Origin, settings: Settings
) -> None:
    pctx.proxy.cache_bytes = len(PNG) + 10  # room for one
    first, second = PHOTO, "https://files.mastodon.example/media/other.png"
    origin.serve(first, PNG)
    origin.serve(second, PNG)

    await pweb.get(await proxied(pctx, first))
    an_hour_ago = utcnow() - timedelta(hours=1)
    await pctx.store.mark_proxied_used(pctx.proxy.local_url(first).rsplit("/", 1)[1], an_hour_ago)
    await pweb.get(await proxied(pctx, second))

    files = sorted(p.name for p in (settings.database.parent / "proxy").iterdir())
    assert files == [pctx.proxy.local_url(second).rsplit("/", 1)[1]]
    assert (await pweb.get(pctx.proxy.local_url(first))).content == PNG  # fetched again
    assert origin.asked[first] == 2


def test_magic_bytes_of_the_kept_types() -> None:
    assert sniff_image(PNG) == "image/png"
    assert sniff_image(b"\xff\xd8\xff\xe0rest") == "image/jpeg"
    assert sniff_image(b"GIF89a....") == "image/gif"
    assert sniff_image(b"RIFF\0\0\0\0WEBPVP8 ") == "image/webp"
    assert sniff_image(b"\0\0\0\x1cftypavif\0\0\0\0avifmif1") == "image/avif"
    assert sniff_image(b"\0\0\0\x18ftypmp42\0\0\0\0isom") is None  # a video
    assert sniff_image(b"<svg") is None
    assert sniff_image(b"<?xml version='1.0'?><svg") is None


async def test_the_cache_size_is_a_setting(tmp_path: Path, blog_keys: Path) -> None:
    settings = make_settings(tmp_path, keys_dir=blog_keys, proxy_cache_mb=2)
    async with running(settings, run_workers=False) as app:
        assert app.state.services.proxy.cache_bytes == 2_000_000


async def test_an_avatar_url_no_parser_accepts_cannot_stop_the_blog(
    tmp_path: Path, blog_keys: Path
) -> None:
    """A remote actor's icon whose host IDNA refuses (``https://xn--/a.png``) is stored
    with the actor; the start-up sweep skips it and the blog starts and serves."""
    settings = make_settings(tmp_path, keys_dir=blog_keys)
    async with running(settings) as app:
        ctx: Services = app.state.services
        post = await publish(ctx, "Still up")
        actor_id = await ctx.store.save_actor(
            ap_id="https://odd.example/users/x",
            username="x",
            domain="odd.example",
            name="X",
            url=None,
            icon_url="https://xn--/a.png",
            inbox="https://odd.example/users/x/inbox",
            shared_inbox=None,
            key_id=None,
            public_key_pem=None,
            fetched=utcnow(),
        )
        await remote_comment(ctx, post, actor_id, "odd avatar")
    async with (
        running(settings) as app,  # the restart that used to fail
        httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url=BASE_URL) as web,
    ):
        page = await web.get(f"/posts/{post.slug}")
    assert page.status_code == 200
    assert "odd avatar" in page.text
    assert "xn--/a.png" not in page.text  # never loaded by a reader's browser
