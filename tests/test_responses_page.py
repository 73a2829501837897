"""The responses under a post: numbered, each with a permalink and a Reply link, paged.

The app is the real one; comments are stored through the Store (tests/helpers.py) or
sent through the real forms and the fake fediverse. Numbers count the visible
responses in page order (threads depth first, oldest first at every level), across
pages, and never a deleted placeholder: the last number is the heading's count.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import quote
from xml.etree import ElementTree

import httpx
import pytest
from bs4 import BeautifulSoup, Tag
from starlette.applications import Starlette

import fediblog.store.comments
from fediblog.answers import list_in_page_order
from fediblog.blog import parse_post
from fediblog.comments import MAX_DEPTH
from fediblog.models import Post
from fediblog.web.deps import Services
from tests.conftest import BASE_URL, make_settings
from tests.fediverse import Fediverse
from tests.helpers import comment_tree, publish, remote_actor, remote_comment, running, soup

pytestmark = [pytest.mark.anyio, pytest.mark.postgresql]  # -m postgresql: where backends differ

ATOM = "{http://www.w3.org/2005/Atom}"
PER_PAGE = 20


def numbers(page: BeautifulSoup) -> list[int]:
    """The numbers shown, in page order."""
    return [int(a.get_text().lstrip("#")) for a in page.select("#responses a.comment-number")]


def heading_count(page: BeautifulSoup) -> int:
    title = page.find(id="responses-title")
    assert isinstance(title, Tag)
    return int(title.get_text().split()[0])


def form_fields(form: Tag) -> dict[str, str]:
    return {str(f["name"]): str(f.get("value", "")) for f in form.find_all(["input", "textarea"])}


async def page_of(web: httpx.AsyncClient, path: str) -> BeautifulSoup:
    response = await web.get(path)
    assert response.status_code == 200, (path, response.status_code)
    return soup(response.text)


# ---- numbers, permalinks and Reply links ---------------------------------------------------


async def nested_thread_with_a_placeholder(ctx: Services) -> tuple[Post, dict[str, int]]:
    """A: B (C under it), F; a deleted D with E under it; G. Six responses, one placeholder."""
    post = await publish(ctx, "Numbered")
    ann = await remote_actor(ctx, "ann", "a.example", "Ann")
    bob = await remote_actor(ctx, "bob", "b.example", "Bob")
    ids: dict[str, int] = {}
    ids["A"] = await remote_comment(ctx, post, ann, "A", minutes=1)
    ids["B"] = await remote_comment(ctx, post, bob, "B", parent=ids["A"], minutes=2)
    ids["C"] = await remote_comment(ctx, post, ann, "C", parent=ids["B"], minutes=3)
    ids["D"] = await remote_comment(ctx, post, bob, "D", minutes=4, status="deleted")
    ids["E"] = await remote_comment(ctx, post, ann, "E", parent=ids["D"], minutes=5)
    ids["F"] = await remote_comment(ctx, post, bob, "F", parent=ids["A"], minutes=6)
    ids["G"] = await remote_comment(ctx, post, ann, "G", minutes=7)
    ids["gone"] = await remote_comment(ctx, post, bob, "gone", minutes=8, status="deleted")
    return post, ids


async def test_numbers_match_the_heading_with_nested_replies_and_a_placeholder(
    web: httpx.AsyncClient, ctx: Services
) -> None:
    post, ids = await nested_thread_with_a_placeholder(ctx)

    page = await page_of(web, f"/posts/{post.slug}")

    assert comment_tree(page) == [
        ("A", [("B", [("C", [])]), ("F", [])]),
        ("This response was deleted.", [("E", [])]),
        ("G", []),
    ]
    assert heading_count(page) == 6
    assert numbers(page) == [1, 2, 3, 4, 5, 6]
    shown = {
        name: page.select_one(f"#comment-{ids[name]} > .comment-body a.comment-number")
        for name in "ABCFEG"
    }
    assert {name: a.get_text() for name, a in shown.items() if a} == {
        "A": "#1", "B": "#2", "C": "#3", "F": "#4", "E": "#5", "G": "#6"
    }  # fmt: skip
    placeholder = page.find(id=f"comment-{ids['D']}")
    assert isinstance(placeholder, Tag)
    body = placeholder.find(class_="comment-body", recursive=False)
    assert isinstance(body, Tag)
    assert body.find_all("a") == []  # no number, no Reply link
    assert page.find(id=f"comment-{ids['gone']}") is None  # nothing left under it


async def test_every_response_has_a_permalink_anchor_and_a_reply_link(
    web: httpx.AsyncClient, ctx: Services
) -> None:
    post, ids = await nested_thread_with_a_placeholder(ctx)
    page = await page_of(web, f"/posts/{post.slug}")

    for name in "ABCEFG":
        comment_id = ids[name]
        item = page.find("li", id=f"comment-{comment_id}")
        assert isinstance(item, Tag), name
        body = item.find(class_="comment-body", recursive=False)
        assert isinstance(body, Tag)
        permalink = body.select_one("a.comment-number")
        assert permalink is not None
        assert permalink["href"] == (f"/posts/{post.slug}/comments/{comment_id}")
        reply = body.select_one("a.comment-reply")
        assert reply is not None
        assert reply["href"] == f"/posts/{post.slug}/reply/{comment_id}#reply"

        followed = await web.get(str(permalink["href"]))
        assert followed.status_code == 302
        assert followed.headers["location"] == f"/posts/{post.slug}#comment-{comment_id}"
        assert (await web.get(str(reply["href"]).split("#")[0])).status_code == 200


async def test_permalinks_of_what_no_reader_sees_are_404(
    web: httpx.AsyncClient, ctx: Services
) -> None:
    post = await publish(ctx, "Hidden things")
    other = await publish(ctx, "Another post")
    eve = await remote_actor(ctx, "eve", "e.example")
    held = await remote_comment(ctx, post, eve, "held", status="pending")
    private = await remote_comment(ctx, post, eve, "private", visibility="followers")
    elsewhere = await remote_comment(ctx, other, eve, "elsewhere")

    for comment_id in (held, private, elsewhere, 99_999):
        assert (await web.get(f"/posts/{post.slug}/comments/{comment_id}")).status_code == 404
        assert (await web.get(f"/posts/{post.slug}/reply/{comment_id}")).status_code == 404
    assert (await web.get(f"/posts/nope/comments/{elsewhere}")).status_code == 404


async def test_a_permalink_under_an_old_slug_moves_with_the_post(
    web: httpx.AsyncClient, ctx: Services
) -> None:
    post = await publish(ctx, "Old name", slug="old-name")
    ann = await remote_actor(ctx, "ann", "a.example")
    comment_id = await remote_comment(ctx, post, ann, "hello")
    renamed = parse_post(f"---\ntitle: {post.title}\nslug: new-name\n---\n{post.body_md}")
    await ctx.blog.edit("old-name", renamed)

    response = await web.get(f"/posts/old-name/comments/{comment_id}")

    assert response.status_code == 301
    assert response.headers["location"] == f"/posts/new-name/comments/{comment_id}"


# ---- replying to one response ---------------------------------------------------------------


async def test_the_reply_page_aims_both_forms_at_the_response(
    web: httpx.AsyncClient, ctx: Services
) -> None:
    post = await publish(ctx, "Aim")
    ann = await remote_actor(ctx, "ann", "a.example", "Ann")
    remote = await remote_comment(ctx, post, ann, "from afar", ap_id="https://a.example/n/1")
    local = await ctx.store.save_comment(
        post_id=post.id,
        parent_id=None,
        content_html="<p>from the form</p>",
        published=post.published,
        received=post.published,
        source="local",
        author_name="Lou",
    )

    page = await page_of(web, f"/posts/{post.slug}/reply/{remote}")

    [heading] = page.find_all("h1")  # one heading says what the page is (axe)
    assert heading.get_text(" ", strip=True).startswith("Reply to ")
    assert heading.find("a")["href"] == f"/posts/{post.slug}"
    assert "from afar" in page.select_one("#responses .e-content").get_text()
    interact = page.find("form", class_="interact")
    assert isinstance(interact, Tag)
    assert form_fields(interact)["replyto"] == str(remote)
    assert page.find("input", id="post-address")["value"] == "https://a.example/n/1"
    local_form = page.find("form", class_="local-comment")
    assert isinstance(local_form, Tag)
    assert local_form["action"] == f"/posts/{post.slug}/comment"
    assert form_fields(local_form)["parent"] == str(remote)

    # A response from the form has no fediverse id: their server answers the post.
    page = await page_of(web, f"/posts/{post.slug}/reply/{local}")
    assert "replyto" not in form_fields(page.find("form", class_="interact"))
    assert page.find("input", id="post-address")["value"] == ctx.blog.object_id(post.uid)
    assert form_fields(page.find("form", class_="local-comment"))["parent"] == str(local)

    # The post's own page has no parent field at all.
    page = await page_of(web, f"/posts/{post.slug}")
    assert "parent" not in form_fields(page.find("form", class_="local-comment"))
    assert "replyto" not in form_fields(page.find("form", class_="interact"))


def comment_form(parent: int | str | None, text: str = "A reply") -> dict[str, str]:
    fields = {"name": "Lou", "email": "lou@example.com", "website": "", "comment": text}
    if parent is not None:
        fields["parent"] = str(parent)
    return fields


async def test_the_local_form_with_a_parent_stores_the_parent(
    web: httpx.AsyncClient, ctx: Services
) -> None:
    post = await publish(ctx, "Parented")
    ann = await remote_actor(ctx, "ann", "a.example")
    parent = await remote_comment(ctx, post, ann, "the parent")

    response = await web.post(f"/posts/{post.slug}/comment", data=comment_form(parent))

    assert response.status_code == 303
    (held,) = await ctx.store.list_comments_for_review(pending_only=True)
    row = await ctx.store.get_stored_comment(held.id)
    assert row is not None
    assert row.parent_id == parent
    await ctx.store.set_comment_status(held.id, "published")
    page = await page_of(web, f"/posts/{post.slug}")
    assert comment_tree(page) == [("the parent", [("A reply", [])])]
    assert numbers(page) == [1, 2]


@pytest.mark.parametrize("case", ["other post", "held", "private", "missing", "junk", "deleted"])
async def test_the_local_form_refuses_a_parent_not_shown_under_that_post(
    web: httpx.AsyncClient, ctx: Services, case: str
) -> None:
    post = await publish(ctx, "Refusing")
    other = await publish(ctx, "Other")
    ann = await remote_actor(ctx, "ann", "a.example")
    parents: dict[str, int | str] = {
        "other post": await remote_comment(ctx, other, ann, "elsewhere"),
        "held": await remote_comment(ctx, post, ann, "held", status="pending"),
        "private": await remote_comment(ctx, post, ann, "dm", visibility="direct"),
        "deleted": await remote_comment(ctx, post, ann, "gone", status="deleted"),
        "missing": 99_999,
        "junk": "1 OR 1=1",
    }
    before = await ctx.store.list_comments_for_review(pending_only=True)

    response = await web.post(f"/posts/{post.slug}/comment", data=comment_form(parents[case]))

    assert response.status_code == 400
    assert "No such response" in response.text
    assert await ctx.store.list_comments_for_review(pending_only=True) == before


async def test_reply_from_your_server_to_a_response_sends_its_own_id(
    web: httpx.AsyncClient, ctx: Services, fediverse: Fediverse
) -> None:
    post = await publish(ctx, "Remote reply")
    other = await publish(ctx, "Elsewhere")
    ann = await remote_actor(ctx, "ann", "a.example")
    note = "https://a.example/users/ann/statuses/7"
    comment_id = await remote_comment(ctx, post, ann, "answer me", ap_id=note)
    foreign = await remote_comment(ctx, other, ann, "not here", ap_id=note + "1")
    me = fediverse.add("their.server", "me")
    fediverse.add_webfinger(me)

    response = await web.post(
        f"/posts/{post.slug}/interact",
        data={"acct": "@me@their.server", "action": "reply", "replyto": str(comment_id)},
    )

    assert response.status_code == 303
    assert response.headers["location"] == (
        "https://their.server/authorize_interaction?uri=" + quote(note, safe="")
    )
    for bad in (str(foreign), "99999", "x"):
        refused = await web.post(
            f"/posts/{post.slug}/interact",
            data={"acct": "@me@their.server", "action": "reply", "replyto": bad},
        )
        assert refused.status_code == 400
        assert "location" not in refused.headers
    # Following is about the blog, whatever response the form was aimed at.
    follow = await web.post(
        f"/posts/{post.slug}/interact",
        data={"acct": "@me@their.server", "action": "follow", "replyto": str(comment_id)},
    )
    assert follow.headers["location"].endswith(quote(ctx.urls.actor, safe=""))


# ---- pages of responses -----------------------------------------------------------------------


@pytest.fixture
async def paged(tmp_path: Path, blog_keys: Path) -> AsyncIterator[Starlette]:
    settings = make_settings(tmp_path, keys_dir=blog_keys, responses_per_page=PER_PAGE)
    async with running(settings, run_workers=False) as app:
        yield app


@pytest.fixture
def paged_ctx(paged: Starlette) -> Services:
    found: Services = paged.state.services
    return found


@pytest.fixture
async def paged_web(paged: Starlette) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=paged)
    async with httpx.AsyncClient(transport=transport, base_url=BASE_URL) as client:
        yield client


THREADS = 250


async def many_threads(ctx: Services) -> tuple[Post, list[int], dict[int, list[int]]]:
    """250 threads, oldest first; every 10th has two replies, one nested, and thread 50
    starts with a deleted placeholder that keeps its one reply."""
    post = await publish(ctx, "Busy")
    ann = await remote_actor(ctx, "ann", "a.example")
    tops: list[int] = []
    replies: dict[int, list[int]] = {}
    for n in range(1, THREADS + 1):
        status = "deleted" if n == 50 else "published"
        top = await remote_comment(ctx, post, ann, f"thread {n}", minutes=n, status=status)
        tops.append(top)
        if n % 10 == 0:
            first = await remote_comment(ctx, post, ann, f"reply {n}a", parent=top, minutes=n)
            second = await remote_comment(ctx, post, ann, f"reply {n}b", parent=first, minutes=n)
            replies[n] = [first, second]
    return post, tops, replies


async def test_responses_are_paged_by_count_and_numbered_across_pages(
    paged_web: httpx.AsyncClient, paged_ctx: Services
) -> None:
    post, _, replies = await many_threads(paged_ctx)
    total = THREADS - 1 + 2 * len(replies)  # thread 50's first response was deleted
    pages = -(-total // PER_PAGE)
    in_order = [c.id for c in await list_in_page_order(paged_ctx.store, post.id)]

    first = await page_of(paged_web, f"/posts/{post.slug}")

    assert heading_count(first) == total
    newest = first.select_one("#responses a[rel=last]")
    assert newest is not None
    assert newest["href"] == f"/posts/{post.slug}?responses={pages}#responses"
    assert first.select_one("#responses a[rel=prev]") is None
    assert f"Responses page 1 of {pages}" in first.get_text()

    shown: list[int] = []
    for number in range(1, pages + 1):
        path = f"/posts/{post.slug}" + (f"?responses={number}" if number > 1 else "")
        page = await page_of(paged_web, path)
        assert heading_count(page) == total  # the heading is always the total
        on_page = numbers(page)
        # PER_PAGE responses a page, numbered on from the pages before, in page order.
        last = min(number * PER_PAGE, total)
        assert on_page == list(range((number - 1) * PER_PAGE + 1, last + 1))
        shown += [int(str(li["id"]).removeprefix("comment-")) for li in responses_of(page)]
    assert shown == in_order

    last = await page_of(paged_web, f"/posts/{post.slug}?responses={pages}")
    assert last.select_one("#responses a[rel=next]") is None
    assert last.select_one("#responses a[rel=first]")["href"] == f"/posts/{post.slug}#responses"
    assert (await paged_web.get(f"/posts/{post.slug}?responses={pages + 1}")).status_code == 404
    for junk in ("0", "-1", "abc", "1.5"):
        assert (await paged_web.get(f"/posts/{post.slug}?responses={junk}")).status_code == 400


def responses_of(page: BeautifulSoup) -> list[Tag]:
    """The numbered responses of a page, in page order (no placeholder, no continuation)."""
    return [
        li
        for li in page.select("#responses li.comment")
        if li.select_one(":scope > .comment-body a.comment-number")
    ]


async def test_a_permalink_redirects_to_the_page_that_holds_it(
    paged_web: httpx.AsyncClient, paged_ctx: Services
) -> None:
    post, tops, replies = await many_threads(paged_ctx)
    in_order = [c.id for c in await list_in_page_order(paged_ctx.store, post.id)]
    nested = replies[140][1]
    expected = in_order.index(nested) // PER_PAGE + 1
    assert expected > 1

    response = await paged_web.get(f"/posts/{post.slug}/comments/{nested}")

    assert response.status_code == 302
    assert response.headers["location"] == (
        f"/posts/{post.slug}?responses={expected}#comment-{nested}"
    )
    page = await page_of(paged_web, response.headers["location"].split("#")[0])
    assert page.find(id=f"comment-{nested}") is not None
    first = await paged_web.get(f"/posts/{post.slug}/comments/{tops[0]}")
    assert first.headers["location"] == f"/posts/{post.slug}#comment-{tops[0]}"
    # A placeholder is on the page of the first response under it.
    under = in_order.index(replies[50][0]) // PER_PAGE + 1
    placeholder = await paged_web.get(f"/posts/{post.slug}/comments/{tops[49]}")
    assert placeholder.headers["location"] == (
        f"/posts/{post.slug}?responses={under}#comment-{tops[49]}"
    )
    held = await paged_web.get(f"/posts/{post.slug}?responses={under}")
    assert soup(held.text).find(id=f"comment-{tops[49]}") is not None


async def test_rendering_one_page_loads_only_that_page_s_comments(
    paged_web: httpx.AsyncClient, paged_ctx: Services, monkeypatch: pytest.MonkeyPatch
) -> None:
    post, _, _ = await many_threads(paged_ctx)
    made: list[int] = []
    real = fediblog.store.comments._comment

    def counting(row: Any) -> Any:
        comment = real(row)
        made.append(comment.id)
        return comment

    async def everything(*args: object) -> None:
        raise AssertionError("the page loaded every comment")

    monkeypatch.setattr(fediblog.store.comments, "_comment", counting)
    monkeypatch.setattr(paged_ctx.store, "list_visible_comments", everything)

    page = await page_of(paged_web, f"/posts/{post.slug}?responses=3")

    shown = page.select("#responses li.comment") + page.select("#responses li.continued")
    assert len(made) == len(shown) <= PER_PAGE + MAX_DEPTH
    assert numbers(page)[0] == 2 * PER_PAGE + 1


async def test_each_page_is_cached_on_its_own(
    paged_web: httpx.AsyncClient, paged_ctx: Services
) -> None:
    post, tops, _ = await many_threads(paged_ctx)
    url = f"/posts/{post.slug}"
    first, second = await paged_web.get(url), await paged_web.get(url + "?responses=2")
    assert first.headers["etag"] != second.headers["etag"]
    again = await paged_web.get(
        url + "?responses=2", headers={"If-None-Match": second.headers["etag"]}
    )
    assert again.status_code == 304

    ann = await remote_actor(paged_ctx, "bea", "b.example")
    await remote_comment(paged_ctx, post, ann, "late reply", parent=tops[25], minutes=999)

    changed = await paged_web.get(url + "?responses=2")
    assert changed.headers["etag"] != second.headers["etag"]
    assert "late reply" in changed.text
    assert "late reply" not in (await paged_web.get(url)).text


# ---- the public feed of a post's responses ------------------------------------------------


async def test_each_post_has_a_public_feed_of_its_published_responses(
    web: httpx.AsyncClient, ctx: Services
) -> None:
    post = await publish(ctx, "Followed thread")
    other = await publish(ctx, "Other")
    ann = await remote_actor(ctx, "ann", "a.example", "Ann")
    older = await remote_comment(ctx, post, ann, "older <b>one</b>", minutes=1)
    newer = await remote_comment(ctx, post, ann, "newer", minutes=2, parent=older)
    await remote_comment(ctx, post, ann, "held one", minutes=3, status="pending")
    await remote_comment(ctx, post, ann, "private one", minutes=4, visibility="followers")
    await remote_comment(ctx, other, ann, "other post", minutes=5)

    page = await page_of(web, f"/posts/{post.slug}")
    link = page.find("link", rel="alternate", type="application/atom+xml", href=re.compile("resp"))
    assert isinstance(link, Tag)
    assert link["href"] == f"/posts/{post.slug}/responses.atom"

    response = await web.get(str(link["href"]))
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("application/atom+xml")
    feed = ElementTree.fromstring(response.content)
    entries = feed.findall(f"{ATOM}entry")
    assert [e.findtext(f"{ATOM}id") for e in entries] == [
        f"{ctx.blog.object_id(post.uid)}#comment-{newer}",
        f"{ctx.blog.object_id(post.uid)}#comment-{older}",
    ]
    assert entries[1].find(f"{ATOM}link").get("href") == (
        f"{BASE_URL}/posts/{post.slug}/comments/{older}"
    )
    assert entries[1].findtext(f"{ATOM}content") == "<p>older <b>one</b></p>"
    assert "Ann" in entries[0].findtext(f"{ATOM}title", "")
    assert "held" not in response.text
    assert "private one" not in response.text
    assert (await web.get("/posts/nope/responses.atom")).status_code == 404
