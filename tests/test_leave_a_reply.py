"""The "Leave a Reply" section: reply or follow from your server, or use the local form.

Remote interaction goes through the real app and the fake fediverse: the blog looks the
visitor's account up by WebFinger on their server (served by ``Fediverse.add_webfinger``)
and sends them to that server's OStatus subscribe template with our post's object id
(or our actor, to follow). Whatever goes wrong, the answer is a page that still shows the
post's address to paste into any app's search box.

The local form stores a pending comment that no reader sees until the author approves
it with ``fediblog comments approve``; it is then shown as plain text, the website
linked with rel="nofollow ugc", the email nowhere.
"""

from __future__ import annotations

import os
from pathlib import Path
from urllib.parse import quote

import anyio
import httpx
import pytest
from bs4 import BeautifulSoup

from fediblog.cli import main
from fediblog.config import Settings
from fediblog.models import Post
from fediblog.web.deps import Services
from tests.conftest import BASE_URL
from tests.fediverse import Fediverse
from tests.helpers import comment_tree, publish, soup

pytestmark = pytest.mark.anyio

FORM = "application/x-www-form-urlencoded"
AP_TYPE = "application/activity+json"




async def interact(
    web: httpx.AsyncClient, post: Post, acct: str, action: str = "reply"
) -> httpx.Response:
    return await web.post(f"/posts/{post.slug}/interact", data={"acct": acct, "action": action})


def post_address(page: BeautifulSoup) -> str:
    field = page.find("input", id="post-address")
    assert field is not None, "the page must show the post's address"
    return str(field["value"])


def assert_message_page(
    response: httpx.Response, ctx: Services, post: Post, title: str, status: int = 400
) -> None:
    """An error page with a readable reason that still shows the address to paste."""
    assert response.status_code == status
    assert response.headers["content-type"].startswith("text/html")
    page = soup(response.text)
    assert page.h1 is not None
    assert page.h1.get_text() == title
    assert post_address(page) == ctx.blog.object_id(post.uid)
    assert page.find("a", href=f"/posts/{post.slug}") is not None


# ---- reply or follow from your own server ------------------------------------------------


@pytest.mark.parametrize("acct", ["@me@their.server", "me@their.server", "  @me@their.server "])
async def test_reply_redirects_to_the_template_with_the_post_object_id(
    web: httpx.AsyncClient, ctx: Services, fediverse: Fediverse, acct: str
) -> None:
    post = await publish(ctx, "Reply from afar")
    me = fediverse.add("their.server", "me")
    fediverse.add_webfinger(me)

    response = await interact(web, post, acct)

    object_id = ctx.blog.object_id(post.uid)
    assert response.status_code == 303
    assert response.headers["location"] == (
        "https://their.server/authorize_interaction?uri=" + quote(object_id, safe="")
    )
    # The post's object, not its page and not the blog's profile.
    assert object_id == f"{BASE_URL}/p/{post.uid}"
    assert quote(ctx.urls.actor, safe="") not in response.headers["location"]
    assert fediverse.requests == [("GET", "https://their.server/.well-known/webfinger")]


async def test_follow_redirects_to_the_template_with_our_actor(
    web: httpx.AsyncClient, ctx: Services, fediverse: Fediverse
) -> None:
    post = await publish(ctx, "Follow from afar")
    me = fediverse.add("their.server", "me")
    fediverse.add_webfinger(me)

    response = await interact(web, post, "@me@their.server", action="follow")

    assert response.status_code == 303
    assert response.headers["location"] == (
        "https://their.server/authorize_interaction?uri=" + quote(ctx.urls.actor, safe="")
    )


async def test_the_post_page_offers_both_ways_and_the_address_to_paste(
    web: httpx.AsyncClient, ctx: Services
) -> None:
    post = await publish(ctx, "Two ways to reply")

    page = soup((await web.get(f"/posts/{post.slug}")).text)

    form = page.find("form", class_="interact")
    assert form is not None
    assert form["action"] == f"/posts/{post.slug}/interact"
    assert {b["value"] for b in form.find_all("button")} == {"reply", "follow"}
    assert post_address(page) == ctx.blog.object_id(post.uid)
    local = page.find("form", class_="local-comment")
    assert local is not None
    assert local["action"] == f"/posts/{post.slug}/comment"
    names = {field["name"] for field in local.find_all(["input", "textarea"])}
    assert names == {"name", "email", "website", "homepage", "comment", "remember"}


@pytest.mark.parametrize(
    "acct",
    [
        "",
        "me",
        "@me",
        "me@",
        "@@their.server",
        "@me@their.server/evil",
        "@me@their.server?resource=x",
        "@me@their.server#x",
        "@me@user@their.server",
        "<script>@their.server",
        "javascript:alert(1)",
        "https://their.server/users/me",
    ],
)
async def test_malformed_address_is_400_and_shows_the_post_address(
    web: httpx.AsyncClient, ctx: Services, fediverse: Fediverse, acct: str
) -> None:
    post = await publish(ctx, "Malformed")

    response = await interact(web, post, acct)

    assert_message_page(response, ctx, post, "Which account?")
    assert "@you@your.server" in response.text
    assert fediverse.requests == []


@pytest.mark.parametrize(
    "template",
    [
        "",  # no subscribe link at all
        "https://their.server/authorize_interaction",  # no {uri} in it
        "javascript:alert('{uri}')",
        "http://their.server/authorize_interaction?uri={uri}",  # https only
        "//their.server/authorize_interaction?uri={uri}",
    ],
)
async def test_server_without_usable_template_is_502_and_shows_the_post_address(
    web: httpx.AsyncClient, ctx: Services, fediverse: Fediverse, template: str
) -> None:
    post = await publish(ctx, "No template")
    me = fediverse.add("their.server", "me")
    fediverse.add_webfinger(me, me.webfinger(template=template))

    response = await interact(web, post, "@me@their.server")

    assert_message_page(response, ctx, post, "Your server offers no remote interaction", 502)
    assert "javascript" not in response.headers.get("location", "")


async def test_webfinger_failures_say_which_step_failed_and_show_the_post_address(
    web: httpx.AsyncClient, ctx: Services, fediverse: Fediverse
) -> None:
    post = await publish(ctx, "Lookup fails")
    me = fediverse.add("their.server", "me")
    spoofed = me.webfinger()
    spoofed["subject"] = "acct:me@other.server"  # ATTACKS.md 35
    fediverse.add_webfinger(me, spoofed)
    off_host = fediverse.add("split.server", "me")
    elsewhere = off_host.webfinger()
    elsewhere["links"][1]["href"] = "https://other.server/users/me"
    fediverse.add_webfinger(off_host, elsewhere)

    for acct, status, title in (
        ("@nobody@their.server", 404, "No such account"),
        ("@me@their.server", 502, "Your server's answer could not be used"),
        ("@me@split.server", 502, "Your server's answer could not be used"),
    ):
        response = await interact(web, post, acct)
        assert_message_page(response, ctx, post, title, status)
        assert acct in response.text
        assert "WebFinger" not in response.text  # a sentence, not the error's own text


@pytest.mark.parametrize("host", ["127.0.0.1", "169.254.169.254", "10.0.0.1", "0.0.0.0"])  # noqa: S104
async def test_webfinger_to_a_private_address_is_refused_before_connecting(
    web: httpx.AsyncClient, ctx: Services, fediverse: Fediverse, host: str
) -> None:
    post = await publish(ctx, "No SSRF")

    response = await interact(web, post, f"@me@{host}")

    assert_message_page(response, ctx, post, "That server cannot be asked")
    assert fediverse.requests == []


async def test_lookups_are_rate_limited_per_address(
    web: httpx.AsyncClient, ctx: Services, fediverse: Fediverse
) -> None:
    post = await publish(ctx, "Many lookups")
    statuses = [(await interact(web, post, "@nobody@their.server")).status_code for _ in range(10)]
    asked = len(fediverse.requests)

    response = await interact(web, post, "@nobody@their.server")

    assert statuses == [404] * 10
    assert response.status_code == 429
    assert "Slow down" in response.text
    assert post_address(soup(response.text)) == ctx.blog.object_id(post.uid)
    assert len(fediverse.requests) == asked  # no lookup for the refused one


# ---- the local form ----------------------------------------------------------------------


async def approve_with_cli(
    settings: Settings, monkeypatch: pytest.MonkeyPatch, folder: Path, comment_id: int
) -> int:
    """``fediblog comments approve ID``, run as the author would (another connection),
    on the blog's database: its SQLite file or its PostgreSQL URL."""
    for name in [n for n in os.environ if n.startswith("FEDIBLOG_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("FEDIBLOG_CONFIG", str(folder / "absent.toml"))
    monkeypatch.setenv("FEDIBLOG_BASE_URL", settings.base_url)
    monkeypatch.setenv("FEDIBLOG_DATABASE", str(settings.store_location))
    monkeypatch.setenv("FEDIBLOG_KEYS_DIR", str(settings.keys_dir))
    code: int = await anyio.to_thread.run_sync(main, ["comments", "approve", str(comment_id)])
    return code


async def test_local_comment_is_held_then_shown_as_plain_text(
    web: httpx.AsyncClient,
    ctx: Services,
    settings: Settings,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    post = await publish(ctx, "Local voices")
    text = "Hello <b>world</b> & *friends*\r\n\r\nSecond paragraph\r\nwith a line break"
    form = {
        "name": "Dana Reader",
        "email": "dana.private@mail.example",
        "website": "https://dana.example/",
        "homepage": "",
        "comment": text,
    }

    response = await web.post(f"/posts/{post.slug}/comment", data=form)

    assert response.status_code == 303
    assert response.headers["location"] == f"/posts/{post.slug}/thanks"
    thanks = await web.get(response.headers["location"])
    assert thanks.status_code == 200
    assert "waiting for approval" in thanks.text
    [held] = await ctx.store.list_comments_for_review(pending_only=True)
    assert (held.status, held.source, held.author_name) == (
        "pending",
        "local",
        "Dana Reader",
    )
    stored = await ctx.store.get_stored_comment(held.id)
    assert stored is not None
    assert stored.author_email == "dana.private@mail.example"

    # Held: no reader sees it anywhere.
    page = soup((await web.get(f"/posts/{post.slug}")).text)
    assert comment_tree(page) == []
    assert page.find(id="responses-title").get_text() == "0 Responses to “Local voices”"
    assert "Dana" not in str(page)
    assert "Second paragraph" not in (await web.get("/")).text

    assert await approve_with_cli(settings, monkeypatch, tmp_path, held.id) == 0
    assert f"comment {held.id}: published" in capsys.readouterr().out

    response = await web.get(f"/posts/{post.slug}")
    page = soup(response.text)
    [comment] = page.select("#responses li.comment")
    content = comment.find(class_="e-content")
    assert content.find_all(["b", "em", "strong", "script"]) == []
    paragraphs = content.find_all("p")
    assert [p.get_text() for p in paragraphs] == [
        "Hello <b>world</b> & *friends*",
        "Second paragraphwith a line break",
    ]
    assert len(paragraphs[1].find_all("br")) == 1
    author = comment.find("a", class_="author")
    assert author is not None
    assert author.get_text() == "Dana Reader"
    assert author["href"] == "https://dana.example/"
    assert {"nofollow", "ugc"} <= set(author["rel"])
    assert comment.find(class_="handle") is None  # a local comment has no fediverse handle
    assert page.find(id="responses-title").get_text() == "1 Response to “Local voices”"
    assert "dana.private" not in response.text
    assert "mail.example" not in response.text
    replies = await web.get(f"/p/{post.uid}/replies", headers={"Accept": AP_TYPE})
    assert "dana.private" not in replies.text


async def test_local_comment_without_website_shows_the_name_unlinked(
    web: httpx.AsyncClient, ctx: Services
) -> None:
    post = await publish(ctx, "No website")
    form = {"name": "Eli", "email": "eli@mail.example", "comment": "Short and sweet."}

    assert (await web.post(f"/posts/{post.slug}/comment", data=form)).status_code == 303
    [held] = await ctx.store.list_comments_for_review(pending_only=True)
    await ctx.store.set_comment_status(held.id, "published")

    page = soup((await web.get(f"/posts/{post.slug}")).text)
    [comment] = page.select("#responses li.comment")
    assert comment.find("a", class_="author") is None
    assert comment.find(class_="author").get_text() == "Eli"
    assert comment_tree(page) == [("Short and sweet.", [])]


@pytest.mark.parametrize(
    ("field", "value", "reason"),
    [
        ("name", "   ", "Please give your name"),
        ("email", "not-an-email", "This email address looks incomplete"),
        ("email", "", "Please give your email address"),
        ("website", "javascript:alert(1)", "Please give a website starting with https://"),
        ("website", "ftp://files.example/", "Please give a website starting with https://"),
        ("comment", "  \n ", "Please write your comment"),
    ],
)
async def test_local_form_problems_are_400_and_store_nothing(
    web: httpx.AsyncClient, ctx: Services, field: str, value: str, reason: str
) -> None:
    post = await publish(ctx, "Problems")
    form = {"name": "Fay", "email": "fay@mail.example", "comment": "Fine words."}
    form[field] = value

    response = await web.post(f"/posts/{post.slug}/comment", data=form)

    assert response.status_code == 400
    page = soup(response.text)
    assert page.h1 is not None
    assert page.h1.get_text() == "Your comment was not sent yet"
    assert reason in page.get_text()
    assert post_address(page) == ctx.blog.object_id(post.uid)
    assert await ctx.store.list_comments_for_review(pending_only=False) == []


async def test_local_form_needs_a_urlencoded_body_and_a_real_post(
    web: httpx.AsyncClient, ctx: Services
) -> None:
    post = await publish(ctx, "Form types")

    as_json = await web.post(
        f"/posts/{post.slug}/comment", json={"name": "G", "email": "g@x.example", "comment": "c"}
    )
    missing = await web.post(
        "/posts/no-such-post/comment",
        content=b"name=G&email=g%40x.example&comment=c",
        headers={"Content-Type": FORM},
    )

    assert as_json.status_code == 415
    assert missing.status_code == 404
    assert await ctx.store.list_comments_for_review(pending_only=False) == []
