"""The reader's forms: the local comment form's errors and "Remember me", and the
sentences "Reply from your server" shows when a lookup fails.

All through the real app with real form POSTs (urlencoded, as a browser sends them,
with the Sec-Fetch-Site a browser adds). The page cache is shared by every reader: a
reader's remembered details must never reach a page another reader gets.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from http.cookies import SimpleCookie
from pathlib import Path

import httpx
import pytest
from bs4 import BeautifulSoup, Tag

from fediblog.config import Settings
from fediblog.models import Post
from fediblog.web.commenter import COOKIE
from fediblog.web.deps import Services
from tests.conftest import BASE_URL, make_settings
from tests.fediverse import Fediverse
from tests.helpers import publish, remote_actor, remote_comment, running, soup

pytestmark = pytest.mark.anyio

BROWSER = {"Sec-Fetch-Site": "same-origin", "Origin": BASE_URL}
DANA = {
    "name": "Dana Reader",
    "email": "dana.private@mail.example",
    "website": "https://dana.example/",
    "comment": "Hello there.",
}


async def send(
    web: httpx.AsyncClient, post: Post, form: dict[str, str], **headers: str
) -> httpx.Response:
    return await web.post(
        f"/posts/{post.slug}/comment", data=form, headers={**BROWSER, **headers}
    )


def local_form(page: BeautifulSoup) -> Tag:
    form = page.find("form", class_="local-comment")
    assert isinstance(form, Tag)
    return form


def field(page: BeautifulSoup, name: str) -> Tag:
    found = local_form(page).find(["input", "textarea"], attrs={"name": name})
    assert isinstance(found, Tag), name
    return found


def value(page: BeautifulSoup, name: str) -> str:
    tag = field(page, name)
    # A browser drops the one newline that follows <textarea>.
    return tag.get_text().removeprefix("\n") if tag.name == "textarea" else str(tag["value"])


def error_of(page: BeautifulSoup, name: str) -> str | None:
    """The sentence tied to a field by aria-describedby, if the field is invalid."""
    tag = field(page, name)
    if tag.get("aria-invalid") != "true":
        assert tag.get("aria-describedby") is None
        return None
    described = page.find(id=str(tag["aria-describedby"]))
    assert isinstance(described, Tag)
    return described.get_text()


def set_cookie(response: httpx.Response) -> SimpleCookie:
    cookie: SimpleCookie = SimpleCookie()
    for header in response.headers.get_list("set-cookie"):
        cookie.load(header)
    return cookie


# ---- errors keep what the reader typed ---------------------------------------------------


async def test_an_error_keeps_everything_typed_and_says_what_to_change_by_the_field(
    web: httpx.AsyncClient, ctx: Services
) -> None:
    post = await publish(ctx, "Typed")
    text = "Line one <b>bold?</b> & more\n\nSecond paragraph"
    form = {**DANA, "email": "dana.private-at-mail.example", "comment": text}

    response = await send(web, post, form)

    assert response.status_code == 400
    assert response.headers["cache-control"] == "private, no-store"
    assert "set-cookie" not in response.headers
    page = soup(response.text)
    assert [value(page, n) for n in ("name", "email", "website")] == [
        "Dana Reader",
        "dana.private-at-mail.example",
        "https://dana.example/",
    ]
    assert value(page, "comment").replace("\r\n", "\n") == text
    assert page.find("b") is None  # what was typed is text, never markup
    email_error = error_of(page, "email")
    assert email_error is not None
    assert email_error.startswith("This email address looks incomplete")
    assert email_error.endswith(".")
    assert [error_of(page, n) for n in ("name", "website", "comment")] == [None, None, None]
    # The summary at the top links each sentence to its field.
    summary = page.select(".form-problems li a")
    assert [(a["href"], a.get_text()) for a in summary] == [("#email", email_error)]
    assert await ctx.store.list_comments_for_review(pending_only=False) == []


async def test_every_problem_gets_its_own_sentence_at_once(
    web: httpx.AsyncClient, ctx: Services
) -> None:
    post = await publish(ctx, "All wrong")
    form = {"name": " ", "email": "", "website": "https://x.example/a b", "comment": "x" * 10_001}

    page = soup((await send(web, post, form)).text)

    assert error_of(page, "name") == (
        "Please give your name: any name you like, it is shown with your comment."
    )
    assert error_of(page, "email") == (
        "Please give your email address; it is never published, only the author sees it."
    )
    assert (error_of(page, "website") or "").startswith("Please give a website starting with https://")
    assert error_of(page, "comment") == (
        "Please write a comment of at most 10,000 characters; yours has 10,001."
    )
    assert [a["href"] for a in page.select(".form-problems li a")] == [
        "#name",
        "#email",
        "#website",
        "#comment",
    ]
    assert value(page, "website") == "https://x.example/a b"


@pytest.mark.parametrize(
    "website",
    [
        "https://bank.example@evil.example/",  # a user name that disguises the host
        "https://evil.example\\@bank.example/",
        "https:/\\evil.example/",
        "javascript:alert(1)",
        "https://",
    ],
)
async def test_a_website_a_browser_would_read_otherwise_is_an_error(
    web: httpx.AsyncClient, ctx: Services, website: str
) -> None:
    post = await publish(ctx, "Websites")

    response = await send(web, post, {**DANA, "website": website})

    assert response.status_code == 400
    assert error_of(soup(response.text), "website") is not None


async def test_an_error_under_a_reply_page_keeps_the_response_it_answers(
    web: httpx.AsyncClient, ctx: Services, fediverse: Fediverse
) -> None:
    post = await publish(ctx, "Threads")
    parent = await remote_comment(ctx, post, await remote_actor(ctx, "alice", "their.server"), "A")

    page = soup((await send(web, post, {**DANA, "comment": "", "parent": str(parent)})).text)

    assert field(page, "parent")["value"] == str(parent)
    assert page.select_one(".replying-to") is not None
    assert error_of(page, "comment") == "Please write your comment."


# ---- Remember me: in the reader's browser only, never in a shared page -------------------


async def test_remember_me_sets_a_cookie_scoped_to_the_blog_and_hidden_from_scripts(
    web: httpx.AsyncClient, ctx: Services
) -> None:
    post = await publish(ctx, "Remember")

    response = await send(web, post, {**DANA, "remember": "yes"})

    assert response.status_code == 303
    [header] = response.headers.get_list("set-cookie")
    morsel = set_cookie(response)[COOKIE]
    assert morsel["path"] == "/posts/"
    assert morsel["domain"] == ""  # this host only
    assert morsel["httponly"] is True
    assert morsel["secure"] is True
    assert morsel["samesite"].lower() == "lax"
    assert int(morsel["max-age"]) > 30 * 24 * 3600
    assert "Hello there" not in header  # the comment itself is not kept


async def test_no_cookie_unless_the_reader_asks(web: httpx.AsyncClient, ctx: Services) -> None:
    post = await publish(ctx, "No cookie")

    response = await send(web, post, DANA)

    assert response.status_code == 303
    assert "set-cookie" not in response.headers


async def test_a_remembered_reader_finds_the_form_filled_and_no_one_else_does(
    web: httpx.AsyncClient, ctx: Services
) -> None:
    post = await publish(ctx, "Shared cache")
    other = soup((await web.get(f"/posts/{post.slug}")).text)  # the page is now cached
    assert value(other, "name") == ""
    cookie = set_cookie(await send(web, post, {**DANA, "remember": "yes"}))[COOKIE].value
    web.cookies.clear()

    mine = await web.get(f"/posts/{post.slug}", headers={"Cookie": f"{COOKIE}={cookie}"})
    web.cookies.clear()
    theirs = await web.get(f"/posts/{post.slug}")

    page = soup(mine.text)
    assert [value(page, n) for n in ("name", "email", "website", "comment")] == [
        "Dana Reader",
        "dana.private@mail.example",
        "https://dana.example/",
        "",
    ]
    assert field(page, "remember").has_attr("checked")
    assert mine.headers["cache-control"] == "private, no-store"
    assert "Cookie" in mine.headers["vary"]
    assert "etag" not in mine.headers
    assert theirs.status_code == 200
    assert "Dana" not in theirs.text
    assert "dana.private" not in theirs.text
    assert not field(soup(theirs.text), "remember").has_attr("checked")
    assert "public" in theirs.headers["cache-control"]


async def test_a_remembered_reader_first_still_leaves_the_cache_clean(
    web: httpx.AsyncClient, ctx: Services
) -> None:
    post = await publish(ctx, "Reader first")
    cookie = set_cookie(await send(web, post, {**DANA, "remember": "yes"}))[COOKIE].value
    web.cookies.clear()

    mine = await web.get(f"/posts/{post.slug}", headers={"Cookie": f"{COOKIE}={cookie}"})
    web.cookies.clear()
    theirs = await web.get(f"/posts/{post.slug}")
    revalidated = await web.get(
        f"/posts/{post.slug}", headers={"If-None-Match": theirs.headers["etag"]}
    )

    assert "Dana" in mine.text
    assert "Dana" not in theirs.text
    assert revalidated.status_code == 304


async def test_the_reply_page_fills_the_form_too_and_only_for_that_reader(
    web: httpx.AsyncClient, ctx: Services
) -> None:
    post = await publish(ctx, "Reply page")
    parent = await remote_comment(ctx, post, await remote_actor(ctx, "alice", "their.server"), "A")
    cookie = set_cookie(await send(web, post, {**DANA, "remember": "yes"}))[COOKIE].value
    web.cookies.clear()
    url = f"/posts/{post.slug}/reply/{parent}"

    before = await web.get(url)
    mine = await web.get(url, headers={"Cookie": f"{COOKIE}={cookie}"})
    web.cookies.clear()
    after = await web.get(url)

    assert value(soup(mine.text), "email") == "dana.private@mail.example"
    assert mine.headers["cache-control"] == "private, no-store"
    assert "dana.private" not in before.text
    assert "dana.private" not in after.text


async def test_unticking_remember_me_forgets(web: httpx.AsyncClient, ctx: Services) -> None:
    post = await publish(ctx, "Forget me")
    cookie = set_cookie(await send(web, post, {**DANA, "remember": "yes"}))[COOKIE].value
    web.cookies.clear()

    response = await send(web, post, {**DANA, "comment": "Again."}, Cookie=f"{COOKIE}={cookie}")

    assert response.status_code == 303
    morsel = set_cookie(response)[COOKIE]
    assert morsel.value == ""
    assert morsel["max-age"] == "0"
    assert morsel["path"] == "/posts/"


@pytest.mark.parametrize("junk", ["nonsense", "e30", "W10", "eyJuYW1lIjogMX0", "x" * 3000])
async def test_a_cookie_that_is_not_ours_is_ignored(
    web: httpx.AsyncClient, ctx: Services, junk: str
) -> None:
    post = await publish(ctx, "Junk")

    response = await web.get(f"/posts/{post.slug}", headers={"Cookie": f"{COOKIE}={junk}"})

    assert response.status_code == 200
    assert value(soup(response.text), "name") == ""
    assert "public" in response.headers["cache-control"]


async def test_the_cookie_is_not_secure_only_on_a_plain_http_blog(
    tmp_path: Path, blog_keys: Path
) -> None:
    settings = make_settings(
        tmp_path, base_url="http://127.0.0.1:8000", allow_http=True, keys_dir=blog_keys
    )
    async with running(settings, run_workers=False) as app:
        post = await publish(app.state.services, "Plain")
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url=settings.base_url) as http:
            response = await http.post(
                f"/posts/{post.slug}/comment",
                data={**DANA, "remember": "yes"},
                headers={"Sec-Fetch-Site": "same-origin"},
            )

    assert response.status_code == 303
    morsel = set_cookie(response)[COOKIE]
    assert morsel["secure"] == ""
    assert morsel["httponly"] is True


@pytest.mark.parametrize(
    "headers",
    [
        {"Sec-Fetch-Site": "cross-site", "Origin": "https://evil.example"},
        {"Sec-Fetch-Site": "same-site", "Origin": "https://other.blog.example"},
        {"Origin": "https://evil.example"},  # a browser without Sec-Fetch-*
        {"Origin": "null"},
    ],
)
async def test_a_form_posted_from_another_site_is_refused(
    web: httpx.AsyncClient, ctx: Services, headers: dict[str, str]
) -> None:
    post = await publish(ctx, "Elsewhere")

    response = await web.post(
        f"/posts/{post.slug}/comment", data={**DANA, "remember": "yes"}, headers=headers
    )

    assert response.status_code == 403
    assert "set-cookie" not in response.headers
    assert soup(response.text).h1.get_text() == "Sent from another site"
    assert await ctx.store.list_comments_for_review(pending_only=False) == []


async def test_a_form_from_the_blogs_own_address_passes_a_proxy_that_rewrites_host(
    web: httpx.AsyncClient, ctx: Services
) -> None:
    # An older browser (Origin, no Sec-Fetch-Site) behind a proxy that sends Host:
    # 127.0.0.1:8000: the form came from the blog's public address, so it is ours.
    post = await publish(ctx, "Behind a proxy")

    response = await web.post(
        f"http://127.0.0.1:8000/posts/{post.slug}/comment",
        data=DANA,
        headers={"Origin": BASE_URL},
    )

    assert response.status_code == 303
    assert len(await ctx.store.list_comments_for_review(pending_only=False)) == 1


# ---- "Reply from your server": a sentence for each failure ---------------------------------


class Network(httpx.AsyncBaseTransport):
    """The fake fediverse, plus a server that is down and one that is broken."""

    def __init__(self, fediverse: Fediverse) -> None:
        self.fediverse = fediverse.transport()

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if request.url.host == "down.example":
            raise httpx.ConnectError("[Errno 111] Connection refused", request=request)
        if request.url.host == "broken.example":
            return httpx.Response(500, text="Traceback (most recent call last): boom")
        if request.url.host == "html.example":
            return httpx.Response(200, html="<html>hi</html>")
        return await self.fediverse.handle_async_request(request)


@pytest.fixture
async def lookup_web(
    settings: Settings, fediverse: Fediverse
) -> AsyncIterator[tuple[httpx.AsyncClient, Services]]:
    async with running(settings, transport=Network(fediverse), run_workers=False) as app:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url=BASE_URL) as http:
            yield http, app.state.services


@pytest.mark.parametrize(
    ("acct", "status", "title", "sentence"),
    [
        ("@nobody@their.server", 404, "No such account", "their.server says it has no account"),
        ("@me@down.example", 502, "Your server could not be reached", "could not reach down"),
        ("@me@broken.example", 502, "Your server could not be reached", "could not reach broken"),
        ("@me@html.example", 502, "Your server's answer could not be used", "answered, but"),
        ("@me@no-template.example", 502, "Your server offers no remote interaction", "does not"),
        ("@me@127.0.0.1", 400, "That server cannot be asked", "private or local"),
        ("me at their.server", 400, "Which account?", "is not a fediverse address"),
        ("@me@their.server/../x", 400, "Which account?", "Type it like @you@your.server"),
    ],
)
async def test_a_failed_lookup_is_a_page_with_a_sentence_never_an_exception(
    lookup_web: tuple[httpx.AsyncClient, Services],
    fediverse: Fediverse,
    acct: str,
    status: int,
    title: str,
    sentence: str,
) -> None:
    web, ctx = lookup_web
    post = await publish(ctx, "Lookups")
    lonely = fediverse.add("no-template.example", "me")
    fediverse.add_webfinger(lonely, lonely.webfinger(template=""))

    response = await web.post(
        f"/posts/{post.slug}/interact", data={"acct": acct, "action": "reply"}, headers=BROWSER
    )

    assert response.status_code == status
    assert response.headers["content-type"].startswith("text/html")
    page = soup(response.text)
    assert page.h1 is not None
    assert page.h1.get_text() == title
    assert sentence in page.get_text()
    for leak in ("Traceback", "Errno", "Connection refused", "boom", "Error", "status 500"):
        assert leak not in response.text
    # Still the way out: the post's address to paste into an app.
    assert page.find("input", id="post-address")["value"] == ctx.blog.object_id(post.uid)
