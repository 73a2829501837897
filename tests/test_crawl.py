"""Complete threads: replies that never reached the inbox, found by crawling (crawl.py).

Only the first reply of a thread is delivered to the blog's inbox (signed, through the
real app); the rest are found by ``ctx.crawler.run_once()`` reading the ``replies``
and ``context`` collections that fake servers serve in the shapes of Mastodon 4.5,
GoToSocial 0.20 and Misskey (tests/fixtures/*/crawl_*.json, provenance in SOURCES.md).
Time moves through the crawler's worker clock; nothing sleeps.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from dataclasses import replace
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from fediblog import moderation
from fediblog.answers import Answers
from fediblog.crawl import CrawlLimits
from fediblog.models import CrawlState, Post, utcnow
from fediblog.web.deps import Services
from tests.conftest import BASE_URL, deliver, make_settings
from tests.fediverse import AP_TYPE, AS_PUBLIC, FIXTURES, Fediverse, RemoteActor
from tests.helpers import comment_tree, publish, remote_actor, remote_comment, running, soup
from tests.test_federation_e2e import pyhttpsig_verifies, signature_key_id

pytestmark = pytest.mark.anyio

CRAWL_FIXTURES = (
    "mastodon/crawl_note_a1.json",
    "mastodon/crawl_note_a2.json",
    "mastodon/crawl_note_a3.json",
    "mastodon/crawl_replies_page_self.json",
    "mastodon/crawl_replies_page_others.json",
    "mastodon/crawl_context.json",
    "gotosocial/crawl_note_b1.json",
    "gotosocial/crawl_note_d1.json",
    "gotosocial/crawl_replies_page.json",
    "gotosocial/crawl_replies_page_end.json",
    "misskey/crawl_note_c1.json",
)


class Servers(Fediverse):
    """The fake fediverse, also answering for URLs with a query (collection pages) and
    with chosen statuses; it lists every GET it answered, query included."""

    def __init__(self) -> None:
        super().__init__()
        self.pages: dict[str, dict[str, Any]] = {}  # full URL -> document
        self.statuses: dict[str, int] = {}  # full URL -> status (a deleted note's 410)
        self.gets: list[str] = []

    def serve(self, document: dict[str, Any], url: str | None = None) -> None:
        self.pages[url or document["id"]] = document

    async def _answer(self, request: Request, url: str) -> Response:
        full = str(request.url)
        if request.method == "GET":
            self.gets.append(full)
            if full in self.statuses:
                return Response(status_code=self.statuses[full])
            if full in self.pages:
                return JSONResponse(copy.deepcopy(self.pages[full]), media_type=AP_TYPE)
        return await super()._answer(request, url)

    def count(self, prefix: str) -> int:
        """GETs of URLs that start with ``prefix``."""
        return sum(1 for url in self.gets if url.startswith(prefix))

    def exactly(self, url: str) -> int:
        return self.gets.count(url)


@pytest.fixture
def fediverse() -> Servers:
    return Servers()


def load(path: str, post: Post) -> dict[str, Any]:
    """A crawl fixture, answering ``post`` (its uid is a placeholder in the file)."""
    text = (FIXTURES / path).read_text(encoding="utf-8").replace("__POST_UID__", post.uid)
    found: dict[str, Any] = json.loads(text)
    return found


def at(ctx: Services, moment: datetime) -> None:
    """Set the crawler's clock (budgets, back-offs and due rounds follow it)."""
    ctx.crawler.worker.clock = lambda: moment


def labels(tree: list[tuple[str, list[Any]]]) -> list[tuple[str, list[Any]]]:
    """The comment tree with each text cut to its label ("A1: …" -> "A1")."""
    return [(text.split(":")[0].split()[-1], labels(children)) for text, children in tree]


async def page_tree(web: httpx.AsyncClient, post: Post) -> list[tuple[str, list[Any]]]:
    return labels(comment_tree(soup((await web.get(f"/posts/{post.slug}")).text)))


async def crawl_row(ctx: Services, ap_id: str) -> CrawlState:
    row = await ctx.store.get_crawl(ap_id)
    assert row is not None, ap_id
    return row


async def stored(ctx: Services, ap_id: str) -> str | None:
    """The status of the comment with this id, or None if it is not stored."""
    row = await ctx.store.get_comment_by_ap_id(ap_id)
    return None if row is None else str(row.status)


# ---- the three servers of the required scenario -----------------------------------------


def three_servers(fediverse: Servers, post: Post) -> dict[str, Any]:
    """alice on Mastodon, bob and dave on GoToSocial, carol on Misskey, each serving its
    notes and collections as its software does."""
    alice = fediverse.add("mastodon.example", "alice", key_index=0, name="Alice")
    fediverse.add("gts.example", "bob", key_index=1, name="Bob")
    fediverse.add("gts.example", "dave", key_index=1, name="Dave")
    carol = fediverse.add("misskey.example", "9xkq3h2b1a", key_index=1, name="Carol")
    carol.document_overrides = {
        "preferredUsername": "carol",
        "url": "https://misskey.example/@carol",
    }
    notes = {
        name: load(path, post)
        for name, path in (
            ("A1", "mastodon/crawl_note_a1.json"),
            ("A2", "mastodon/crawl_note_a2.json"),
            ("A3", "mastodon/crawl_note_a3.json"),
            ("B1", "gotosocial/crawl_note_b1.json"),
            ("D1", "gotosocial/crawl_note_d1.json"),
            ("C1", "misskey/crawl_note_c1.json"),
        )
    }
    for note in notes.values():
        fediverse.serve(note)
    # Mastodon: A1's embedded first page lists its self-reply; the pages after it.
    fediverse.serve(load("mastodon/crawl_replies_page_self.json", post))
    others = load("mastodon/crawl_replies_page_others.json", post)
    fediverse.serve(others)
    for name in ("A2", "A3"):  # no replies: the same page, empty
        replies = f"{notes[name]['id']}/replies"
        fediverse.serve(
            dict(
                others, id=f"{replies}?only_other_accounts=true&page=true", partOf=replies, items=[]
            )
        )
    fediverse.serve(load("mastodon/crawl_context.json", post))
    # GoToSocial: the page `next` names answers under another id (limit=20), then an
    # empty last page; D1 has no replies.
    b1_replies = f"{notes['B1']['id']}/replies?page=true&only_other_accounts=false"
    fediverse.serve(load("gotosocial/crawl_replies_page.json", post), b1_replies)
    fediverse.serve(load("gotosocial/crawl_replies_page_end.json", post))
    end = load("gotosocial/crawl_replies_page_end.json", post)
    d1 = notes["D1"]["id"]
    end.update(id=f"{d1}/replies?limit=20&only_other_accounts=false", totalItems=0)
    end["partOf"] = f"{d1}/replies?only_other_accounts=false"
    fediverse.serve(end, f"{d1}/replies?page=true&only_other_accounts=false")
    # Misskey publishes no replies collection (ApRendererService.renderNote): nothing.
    return {"alice": alice, **notes}


async def test_a_thread_across_three_servers_is_completed_by_crawling(
    web: httpx.AsyncClient, ctx: Services, fediverse: Servers
) -> None:
    post = await publish(ctx, "Federated thread")
    world = three_servers(fediverse, post)
    alice: RemoteActor = world["alice"]
    a1 = {key: value for key, value in world["A1"].items() if key != "@context"}

    # Only the first reply reaches the inbox.
    assert (await deliver(web, ctx, alice, alice.create(a1))).status_code == 202
    assert await page_tree(web, post) == [("A1", [])]

    assert await ctx.crawler.run_once() >= 6

    assert await page_tree(web, post) == [
        ("A1", [("A2", []), ("B1", [("C1", [("A3", [])]), ("D1", [])])])
    ]
    page = soup((await web.get(f"/posts/{post.slug}")).text)
    assert [h.get_text() for h in page.select(".handle")] == [
        "@alice@mastodon.example",
        "@alice@mastodon.example",
        "@bob@gts.example",
        "@carol@misskey.example",
        "@alice@mastodon.example",
        "@dave@gts.example",
    ]
    assert page.find(id="responses-title").get_text() == "6 Responses to “Federated thread”"
    # Each server's own collections were read: Mastodon's pages and context, GoToSocial's
    # renamed page; Misskey (no collection) was only asked for its note.
    a1_replies = f"{world['A1']['id']}/replies"
    assert fediverse.count(f"{a1_replies}?min_id=113500000000000002&page=true") == 1
    assert fediverse.count(f"{a1_replies}?only_other_accounts=true&page=true") == 1
    assert fediverse.count("https://mastodon.example/contexts/109400000000000001-7") == 1
    assert fediverse.count(f"{world['B1']['id']}/replies?page=true") == 1
    misskey = {url for url in fediverse.gets if url.startswith("https://misskey.example/notes/")}
    assert misskey == {world["C1"]["id"]}
    # The delivered comment and the crawled ones each wait for their next round.
    first = await crawl_row(ctx, world["A1"]["id"])
    assert (first.found_by, first.status, first.rounds) == ("delivery", "queued", 1)
    assert first.next_attempt == first.created + timedelta(
        minutes=10
    )
    for name, depth in (("A2", 2), ("B1", 2), ("C1", 3), ("D1", 3), ("A3", 4)):
        row = await crawl_row(ctx, world[name]["id"])
        assert (row.found_by, row.depth, row.status, row.last_error) == (
            "crawl",
            depth,
            "queued",
            None,
        ), name
    # Nothing is due now: a second pass asks nobody anything.
    asked = len(fediverse.gets)
    assert await ctx.crawler.run_once() == 0
    assert len(fediverse.gets) == asked


async def test_recrawls_follow_the_schedule_and_stop_after_a_week(
    web: httpx.AsyncClient, ctx: Services, fediverse: Servers
) -> None:
    post = await publish(ctx, "Rounds")
    world = three_servers(fediverse, post)
    alice: RemoteActor = world["alice"]
    a1 = {key: value for key, value in world["A1"].items() if key != "@context"}
    await deliver(web, ctx, alice, alice.create(a1))
    await ctx.crawler.run_once()
    arrived = (await crawl_row(ctx, world["A1"]["id"])).created
    asked = fediverse.exactly(world["A1"]["id"])

    reads = []
    for offset in (timedelta(minutes=11), timedelta(hours=2), timedelta(days=8)):
        at(ctx, arrived + offset)
        await ctx.crawler.run_once()
        reads.append(fediverse.exactly(world["A1"]["id"]) - asked)

    # Read again at +10 min and at +1 h; at +8 d once more for the rounds it slept
    # through (6 h, 1 d, 3 d, 7 d), and then never again.
    assert reads == [1, 2, 3]
    row = await crawl_row(ctx, world["A1"]["id"])
    assert (row.status, row.finished is not None) == ("done", True)
    assert await page_tree(web, post) == [
        ("A1", [("A2", []), ("B1", [("C1", [("A3", [])]), ("D1", [])])])
    ]


# ---- helpers for the hostile cases: one delivered comment, its collection served ------


def replies_of(note_id: str, items: list[Any], next_page: str | None = None) -> dict[str, Any]:
    """A ``replies`` collection as Mastodon embeds it in a note."""
    first: dict[str, Any] = {"type": "CollectionPage", "partOf": f"{note_id}/replies"}
    if next_page:
        first["next"] = next_page
    first["items"] = items
    return {"id": f"{note_id}/replies", "type": "Collection", "first": first}


def page(url: str, items: list[Any], next_page: str | None = None) -> dict[str, Any]:
    document: dict[str, Any] = {"id": url, "type": "CollectionPage", "items": items}
    if next_page:
        document["next"] = next_page
    return document


async def commented(
    web: httpx.AsyncClient,
    ctx: Services,
    fediverse: Servers,
    post: Post,
    actor: RemoteActor,
    number: int,
    replies: Callable[[str], dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """``actor`` replies to ``post`` (delivered), and serves that note with ``replies``."""
    note_id = f"{actor.id}/statuses/{number}"
    note = actor.note(number, ctx.blog.object_id(post.uid), f"N{number}: a comment")
    if replies is not None:
        note["replies"] = replies(note_id)
    fediverse.serve(note)
    assert (await deliver(web, ctx, actor, actor.create(note))).status_code == 202
    return note


def reply(fediverse: Servers, actor: RemoteActor, number: int, parent: str, **extra: Any) -> str:
    """A public reply by ``actor`` to ``parent``, served at its id (never delivered)."""
    note = actor.note(number, parent, f"R{number}: a reply", **extra)
    fediverse.serve(note)
    return str(note["id"])


async def test_a_looping_collection_stores_nothing_and_its_host_backs_off(
    web: httpx.AsyncClient, ctx: Services, fediverse: Servers
) -> None:
    post = await publish(ctx, "Loops")
    looper = fediverse.add("loop.example", "lou", key_index=0)
    good = fediverse.add("gts.example", "gil", key_index=1)
    x_id = f"{looper.id}/statuses/1"
    r1 = reply(fediverse, looper, 11, x_id)
    r2 = reply(fediverse, looper, 12, x_id)
    one, two = f"{x_id}/replies?page=1", f"{x_id}/replies?page=2"
    fediverse.serve(page(one, [r2], two))
    fediverse.serve(page(two, [], one))  # back to the first page
    await commented(web, ctx, fediverse, post, looper, 1, lambda i: replies_of(i, [r1], one))
    y = await commented(web, ctx, fediverse, post, good, 2, lambda i: replies_of(i, []))
    g1 = reply(fediverse, good, 21, y["id"])
    fediverse.serve(page(f"{y['id']}/replies?page=1", [g1]))
    y["replies"]["first"]["next"] = f"{y['id']}/replies?page=1"
    fediverse.serve(y)

    await ctx.crawler.run_once()

    row = await crawl_row(ctx, x_id)
    assert (row.status, row.last_error) == ("failed", "replies: its pages loop")
    assert (await stored(ctx, r1), await stored(ctx, r2)) == (None, None)
    assert fediverse.count(r1) == fediverse.count(r2) == 0
    assert await stored(ctx, g1) == "published"  # the rest of the blog is unaffected
    # Another comment from that host waits for the back-off, asking it nothing.
    now = utcnow()
    at(ctx, now)
    z = await commented(web, ctx, fediverse, post, looper, 3, lambda i: replies_of(i, []))
    await ctx.crawler.run_once()
    waiting = await crawl_row(ctx, z["id"])
    assert (waiting.status, waiting.attempts, waiting.rounds) == ("queued", 0, 0)
    assert "loop.example misbehaved" in waiting.last_error
    assert waiting.next_attempt > now + timedelta(minutes=59)
    assert fediverse.count(z["id"]) == 0
    at(ctx, now + timedelta(hours=1, minutes=1))
    await ctx.crawler.run_once()
    assert (await crawl_row(ctx, z["id"])).rounds == 1


async def test_an_exploding_collection_stores_nothing(
    web: httpx.AsyncClient, ctx: Services, fediverse: Servers
) -> None:
    post = await publish(ctx, "Explodes")
    boom = fediverse.add("boom.example", "bo")
    x_id = f"{boom.id}/statuses/1"
    real = reply(fediverse, boom, 2, x_id)
    listed = [real] + [f"{boom.id}/statuses/{n}" for n in range(100, 1100)]  # 1,001 items
    await commented(web, ctx, fediverse, post, boom, 1, lambda i: replies_of(i, listed))

    await ctx.crawler.run_once()

    row = await crawl_row(ctx, x_id)
    assert (row.status, row.last_error) == ("failed", "replies: more than 1000 items")
    assert await stored(ctx, real) is None
    assert fediverse.count(f"{boom.id}/statuses/") == 1  # the comment itself, nothing listed


async def test_a_page_on_another_host_stores_nothing(
    web: httpx.AsyncClient, ctx: Services, fediverse: Servers
) -> None:
    post = await publish(ctx, "Lies")
    liar = fediverse.add("liar.example", "li")
    x_id = f"{liar.id}/statuses/1"
    listed = reply(fediverse, liar, 2, x_id)
    elsewhere = "https://victim.example/some/page"
    fediverse.serve(page(elsewhere, [reply(fediverse, liar, 3, x_id)]))
    await commented(
        web, ctx, fediverse, post, liar, 1, lambda i: replies_of(i, [listed], elsewhere)
    )

    await ctx.crawler.run_once()

    row = await crawl_row(ctx, x_id)
    assert row.status == "failed"
    assert row.last_error == "replies: a page is on another host (victim.example)"
    assert await stored(ctx, listed) is None
    assert fediverse.count("https://victim.example/") == 0


async def test_an_embedded_copy_from_another_host_stores_nothing(
    web: httpx.AsyncClient, ctx: Services, fediverse: Servers
) -> None:
    post = await publish(ctx, "Copies")
    liar = fediverse.add("liar.example", "li")
    victim = fediverse.add("victim.example", "vi")
    x_id = f"{liar.id}/statuses/1"
    forged = victim.note(5, x_id, "words put in vi's mouth")
    await commented(web, ctx, fediverse, post, liar, 1, lambda i: replies_of(i, [forged]))

    await ctx.crawler.run_once()

    row = await crawl_row(ctx, x_id)
    assert (row.status, row.last_error) == (
        "failed",
        "replies: it embeds an object of victim.example",
    )
    assert await stored(ctx, forged["id"]) is None


async def test_an_embedded_page_claiming_another_host_stores_nothing(
    web: httpx.AsyncClient, ctx: Services, fediverse: Servers
) -> None:
    post = await publish(ctx, "Claims")
    liar = fediverse.add("liar.example", "li")
    x_id = f"{liar.id}/statuses/1"
    listed = reply(fediverse, liar, 2, x_id)

    def claiming(note_id: str) -> dict[str, Any]:
        replies = replies_of(note_id, [listed])
        replies["first"]["id"] = "https://victim.example/replies?page=true"
        return replies

    await commented(web, ctx, fediverse, post, liar, 1, claiming)

    await ctx.crawler.run_once()

    row = await crawl_row(ctx, x_id)
    assert (row.status, row.last_error) == (
        "failed",
        "replies: a page claims another host (victim.example)",
    )
    assert await stored(ctx, listed) is None


async def test_objects_embedded_by_their_own_host_are_used_and_stubs_fetched(
    web: httpx.AsyncClient, ctx: Services, fediverse: Servers
) -> None:
    post = await publish(ctx, "Embedded")
    ann = fediverse.add("social.example", "ann")
    x_id = f"{ann.id}/statuses/1"
    whole = ann.note(2, x_id, "R2: embedded whole, as Mastodon does for its own")
    fediverse.serve(whole)
    stub = {"id": reply(fediverse, ann, 3, x_id)}
    await commented(web, ctx, fediverse, post, ann, 1, lambda i: replies_of(i, [whole, stub]))

    await ctx.crawler.run_once()

    assert await stored(ctx, whole["id"]) == "published"
    assert await stored(ctx, stub["id"]) == "published"
    # The whole one was not fetched for the crawl of the comment (its own crawl reads it).
    assert fediverse.exactly(whole["id"]) == 1
    assert fediverse.exactly(stub["id"]) == 2


async def test_a_reply_whose_chain_does_not_reach_our_post_is_ignored(
    web: httpx.AsyncClient, ctx: Services, fediverse: Servers
) -> None:
    post = await publish(ctx, "Strangers")
    ann = fediverse.add("social.example", "ann")
    other = fediverse.add("other.example", "oz", key_index=1)
    x_id = f"{ann.id}/statuses/1"
    unrelated = reply(fediverse, other, 1, "https://other.example/users/oz/statuses/0")
    fediverse.serve({**other.note(0, "", "root"), "inReplyTo": None})
    stranger = reply(fediverse, other, 2, unrelated)
    # Two notes answering each other: a cycle, followed once.
    loop_a = reply(fediverse, other, 3, f"{other.id}/statuses/4")
    loop_b = reply(fediverse, other, 4, loop_a)
    ours = reply(fediverse, ann, 9, x_id)
    await commented(
        web, ctx, fediverse, post, ann, 1, lambda i: replies_of(i, [stranger, loop_a, ours])
    )

    await ctx.crawler.run_once()

    assert [await stored(ctx, i) for i in (stranger, unrelated, loop_a, loop_b)] == [None] * 4
    assert await stored(ctx, ours) == "published"
    assert [fediverse.count(i) for i in (stranger, unrelated, loop_a, loop_b)] == [1, 1, 1, 1]
    row = await crawl_row(ctx, x_id)
    assert (row.status, row.rounds, row.last_error) == ("queued", 1, None)


async def test_a_private_address_in_a_collection_stores_nothing(
    web: httpx.AsyncClient, ctx: Services, fediverse: Servers
) -> None:
    post = await publish(ctx, "Private")
    sly = fediverse.add("sly.example", "sy")
    x_id = f"{sly.id}/statuses/1"
    fine = reply(fediverse, sly, 2, x_id)
    inside = "https://10.0.0.5/notes/1"
    await commented(web, ctx, fediverse, post, sly, 1, lambda i: replies_of(i, [fine, inside]))

    await ctx.crawler.run_once()

    row = await crawl_row(ctx, x_id)
    assert (row.status, row.last_error) == (
        "failed",
        "replies: it points at a private address (10.0.0.5)",
    )
    assert await stored(ctx, fine) is None
    assert fediverse.count("https://10.0.0.5/") == 0


async def test_a_followers_only_reply_is_not_stored(
    web: httpx.AsyncClient, ctx: Services, fediverse: Servers
) -> None:
    post = await publish(ctx, "Audience")
    ann = fediverse.add("social.example", "ann")
    x_id = f"{ann.id}/statuses/1"
    private = reply(fediverse, ann, 2, x_id, to=[f"{ann.id}/followers"], cc=[])
    unlisted = reply(fediverse, ann, 3, x_id, to=[f"{ann.id}/followers"], cc=[AS_PUBLIC])
    await commented(web, ctx, fediverse, post, ann, 1, lambda i: replies_of(i, [private, unlisted]))

    await ctx.crawler.run_once()

    assert await stored(ctx, private) is None
    row = await ctx.store.get_comment_by_ap_id(unlisted)
    assert row is not None
    assert (row.status, row.visibility) == ("published", "unlisted")


async def test_a_crawled_reply_deleted_at_its_origin_becomes_a_placeholder(
    web: httpx.AsyncClient, ctx: Services, fediverse: Servers
) -> None:
    post = await publish(ctx, "Deleted")
    ann = fediverse.add("social.example", "ann")
    bea = fediverse.add("other.example", "bea", key_index=1)
    x = await commented(web, ctx, fediverse, post, ann, 1, lambda i: replies_of(i, []))
    r1 = reply(fediverse, bea, 2, x["id"])
    r2 = reply(fediverse, ann, 3, r1)
    x["replies"] = replies_of(x["id"], [r1])
    fediverse.serve(x)
    fediverse.pages[r1]["replies"] = replies_of(r1, [r2])
    await ctx.crawler.run_once()
    assert await page_tree(web, post) == [("N1", [("R2", [("R3", [])])])]

    fediverse.statuses[r1] = 410  # bea deleted it; no Delete ever reaches the blog
    fediverse.statuses[x["id"]] = 404  # a delivered one waits for its own Delete
    at(ctx, utcnow() + timedelta(minutes=11))
    await ctx.crawler.run_once()

    assert await stored(ctx, r1) == "deleted"
    assert await stored(ctx, x["id"]) == "published"
    assert await ctx.store.is_tombstoned(r1)
    assert await page_tree(web, post) == [("N1", [("deleted.", [("R3", [])])])]
    gone = await crawl_row(ctx, r1)
    assert (gone.status, gone.last_error) == ("done", "gone at its origin (HTTP 410)")


async def test_a_crawled_reply_edited_at_its_origin_is_updated_forward_only(
    web: httpx.AsyncClient, ctx: Services, fediverse: Servers
) -> None:
    post = await publish(ctx, "Edited")
    ann = fediverse.add("social.example", "ann")
    x = await commented(web, ctx, fediverse, post, ann, 1, lambda i: replies_of(i, []))
    r1 = reply(fediverse, ann, 2, x["id"])
    x["replies"] = replies_of(x["id"], [r1])
    fediverse.serve(x)
    await ctx.crawler.run_once()

    edited = dict(fediverse.pages[r1], content="<p>R2: better words</p>")
    fediverse.serve({**edited, "updated": "2026-11-28T13:00:00Z"})
    at(ctx, utcnow() + timedelta(minutes=11))
    await ctx.crawler.run_once()
    assert "R2: better words" in (await web.get(f"/posts/{post.slug}")).text

    fediverse.serve(
        {**edited, "content": "<p>R2: older words</p>", "updated": "2026-11-28T12:30:00Z"}
    )
    at(ctx, utcnow() + timedelta(hours=1, minutes=1))
    await ctx.crawler.run_once()
    text = (await web.get(f"/posts/{post.slug}")).text
    assert "R2: better words" in text
    assert "older words" not in text


async def test_the_per_host_budget_puts_a_crawl_back_without_failing_it(
    web: httpx.AsyncClient, ctx: Services, fediverse: Servers
) -> None:
    post = await publish(ctx, "Budget")
    ann = fediverse.add("social.example", "ann")
    x_id = f"{ann.id}/statuses/1"
    listed = [reply(fediverse, ann, n, x_id) for n in (2, 3, 4)]
    more = f"{x_id}/replies?page=true"
    fediverse.serve(page(more, listed))
    now = utcnow()
    at(ctx, now)
    ctx.crawler.limits = replace(CrawlLimits(), per_host_per_minute=3)
    await commented(web, ctx, fediverse, post, ann, 1, lambda i: replies_of(i, [], more))

    await ctx.crawler.run_once()

    # The comment, its page and one reply: then the minute's budget is spent.
    assert fediverse.count(f"{ann.id}/statuses/") == 3
    row = await crawl_row(ctx, x_id)
    assert (row.status, row.attempts, row.rounds) == ("queued", 0, 0)
    assert row.last_error.startswith("waiting: the request budget for social.example")
    assert row.next_attempt == now + timedelta(minutes=1)
    assert [await stored(ctx, i) for i in listed] == ["published", None, None]

    for minute in range(1, 10):
        at(ctx, now + timedelta(minutes=minute, seconds=1))
        await ctx.crawler.run_once()
    assert [await stored(ctx, i) for i in listed] == ["published"] * 3
    row = await crawl_row(ctx, x_id)
    assert (row.status, row.rounds, row.last_error) == ("queued", 1, None)
    assert fediverse.exactly(more) == 1  # taken up where it stopped: the page not asked again


async def test_a_long_collection_is_read_up_to_the_page_cap(
    web: httpx.AsyncClient, ctx: Services, fediverse: Servers
) -> None:
    post = await publish(ctx, "Long")
    ann = fediverse.add("social.example", "ann")
    x_id = f"{ann.id}/statuses/1"
    urls = [f"{x_id}/replies?page={n}" for n in range(10)]
    listed = [reply(fediverse, ann, 100 + n, x_id) for n in range(10)]
    for n, url in enumerate(urls):
        fediverse.serve(page(url, [listed[n]], urls[n + 1] if n < 9 else None))
    await commented(web, ctx, fediverse, post, ann, 1, lambda i: replies_of(i, [], urls[0]))

    await ctx.crawler.run_once()

    assert [await stored(ctx, i) for i in listed] == ["published"] * 8 + [None] * 2
    assert [fediverse.exactly(url) for url in urls] == [1] * 8 + [0] * 2
    row = await crawl_row(ctx, x_id)
    assert (row.status, row.last_error) == ("queued", None)  # not a hostile one


async def test_a_server_that_is_down_is_retried_later(
    web: httpx.AsyncClient, ctx: Services, fediverse: Servers
) -> None:
    post = await publish(ctx, "Down")
    ann = fediverse.add("social.example", "ann")
    x = await commented(web, ctx, fediverse, post, ann, 1, lambda i: replies_of(i, []))
    fediverse.statuses[x["id"]] = 503
    now = utcnow()
    at(ctx, now)

    await ctx.crawler.run_once()

    row = await crawl_row(ctx, x["id"])
    assert (row.status, row.attempts, row.rounds) == ("queued", 1, 0)
    assert "HTTP 503" in row.last_error
    assert now < row.next_attempt <= now + timedelta(minutes=2)


async def test_the_depth_and_per_post_caps_bound_a_crawl(
    web: httpx.AsyncClient, ctx: Services, fediverse: Servers
) -> None:
    post = await publish(ctx, "Caps")
    ann = fediverse.add("social.example", "ann")
    ctx.crawler.limits = replace(CrawlLimits(), max_depth=2, max_per_post=2)
    x = await commented(web, ctx, fediverse, post, ann, 1, lambda i: replies_of(i, []))
    first = [reply(fediverse, ann, n, x["id"]) for n in (2, 3, 4)]
    deeper = reply(fediverse, ann, 5, first[0])
    fediverse.pages[first[0]]["replies"] = replies_of(first[0], [deeper])
    x["replies"] = replies_of(x["id"], first)
    fediverse.serve(x)

    await ctx.crawler.run_once()

    assert [await stored(ctx, i) for i in first] == ["published", "published", None]
    assert await stored(ctx, deeper) is None  # level 3: below the depth cap
    assert fediverse.count(deeper) == 0


async def test_blocked_servers_are_neither_fetched_nor_stored(
    web: httpx.AsyncClient, ctx: Services, fediverse: Servers
) -> None:
    post = await publish(ctx, "Blocked")
    ann = fediverse.add("social.example", "ann")
    spam = fediverse.add("spam.example", "sp", key_index=1)
    await ctx.store.save_block("spam.example", "domain")
    await ctx.inbox.load_blocks()
    x_id = f"{ann.id}/statuses/1"
    junk = reply(fediverse, spam, 2, x_id)
    await commented(web, ctx, fediverse, post, ann, 1, lambda i: replies_of(i, [junk]))

    await ctx.crawler.run_once()

    assert await stored(ctx, junk) is None
    assert fediverse.count("https://spam.example/") == 0


async def test_crawled_replies_are_sanitized_and_held_like_delivered_ones(
    tmp_path: Path, blog_keys: Path, fediverse: Servers
) -> None:
    settings = make_settings(tmp_path, keys_dir=blog_keys, moderation="all")
    async with (
        running(settings, transport=fediverse.transport(), run_workers=False) as app,
        httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url=BASE_URL) as web,
    ):
        ctx: Services = app.state.services
        post = await publish(ctx, "Held")
        ann = fediverse.add("social.example", "ann")
        x_id = f"{ann.id}/statuses/1"
        bad = reply(
            fediverse,
            ann,
            2,
            x_id,
            content='<p>R2: hi<script>alert(1)</script> <a href="javascript:x()">there</a></p>',
        )
        await commented(web, ctx, fediverse, post, ann, 1, lambda i: replies_of(i, [bad]))

        # A held comment is not crawled: its replies would show before it is approved.
        await ctx.crawler.run_once()
        assert await stored(ctx, bad) is None
        held = await ctx.store.get_comment_by_ap_id(x_id)
        assert held is not None
        await moderation.set_status(ctx.store, held.id, "published")
        assert await ctx.crawler.sweep() == 1  # approved: now it is queued
        await ctx.crawler.run_once()

        assert await stored(ctx, bad) == "pending"  # held, as every reply is under "all"
        row = await ctx.store.get_comment_by_ap_id(bad)
        assert row is not None
        saved = await ctx.store.get_stored_comment(row.id)
        assert saved is not None
        assert "R2: hi" in saved.content_html
        assert "script" not in saved.content_html
        assert "javascript" not in saved.content_html


async def test_comments_without_a_crawl_are_queued_by_the_sweep(
    ctx: Services, fediverse: Servers
) -> None:
    post = await publish(ctx, "Sweep")
    ann = fediverse.add("social.example", "ann")
    actor_id = await remote_actor(ctx, "ann", "social.example")
    x_id = f"{ann.id}/statuses/1"
    await remote_comment(ctx, post, actor_id, "before crawling existed", ap_id=x_id)
    found = reply(fediverse, ann, 2, x_id)
    fediverse.serve(
        {**ann.note(1, ctx.blog.object_id(post.uid), "x"), "replies": replies_of(x_id, [found])}
    )

    assert await ctx.store.get_crawl(x_id) is None
    assert await ctx.crawler.sweep() == 1
    assert await ctx.crawler.sweep() == 0
    await ctx.crawler.run_once()

    assert await stored(ctx, found) == "published"


async def test_a_seeded_thread_counts_as_crawled_and_the_sweep_leaves_it(
    ctx: Services,
) -> None:
    """The benchmarks' 50,000 seeded comments (``Store.save_seed_comments``) stand for a
    thread that grew over weeks, its crawls long done: queued by the sweep at start-up,
    their crawling ran beside the processing being measured (a third of its CPU)."""
    post = await publish(ctx, "Seeded")
    ann = await remote_actor(ctx, "ann", "social.example")
    first = await ctx.store.save_seed_comments(
        post.id,
        [
            (None, ann, "https://social.example/notes/1", "<p>1</p>", utcnow()),
            (0, ann, "https://social.example/notes/2", "<p>2</p>", utcnow()),
            (1, ann, "https://social.example/notes/3", "<p>3</p>", utcnow()),
        ],
    )

    assert await ctx.crawler.sweep() == 0
    crawls = [await ctx.store.get_crawl(f"https://social.example/notes/{n}") for n in (1, 2, 3)]
    assert [(c.status, c.depth, c.finished is not None) for c in crawls if c] == [
        ("done", 1, True),
        ("done", 2, True),
        ("done", 3, True),
    ]
    assert await ctx.crawler.run_once() == 0
    comment = await ctx.store.get_comment_by_ap_id("https://social.example/notes/3")
    assert comment is not None
    assert comment.id == first + 2


def test_every_crawl_fixture_is_here_with_its_provenance() -> None:
    sources = (FIXTURES / "SOURCES.md").read_text()
    section = sources.split("## Added for tests/test_crawl.py", 1)[-1]
    for path in CRAWL_FIXTURES:
        assert (FIXTURES / path).is_file(), path
        folder, name = path.split("/")
        assert f"| {name} |" in section.split(f"### {folder}/", 1)[-1], path


async def test_the_author_answers_a_reply_found_by_crawling(
    web: httpx.AsyncClient, ctx: Services, fediverse: Servers
) -> None:
    """The issue's scenario end to end: only A1 is delivered, B1 (Bob on GoToSocial,
    answering Alice) is found by crawling, and the author's answer to B1 reaches Bob's
    server as a Create{Note} whose signature verifies with the blog's published key."""
    post = await publish(ctx, "Federated thread")
    world = three_servers(fediverse, post)
    alice: RemoteActor = world["alice"]
    a1 = {key: value for key, value in world["A1"].items() if key != "@context"}
    await deliver(web, ctx, alice, alice.create(a1))
    await ctx.crawler.run_once()
    b1 = world["B1"]["id"]
    assert await stored(ctx, b1) == "published"
    fediverse.received.clear()

    answered = await Answers(ctx.settings, ctx.store).publish(b1, "Answer: thanks, *Bob*!")
    assert await ctx.deliverer.deliver_once() >= 1

    to_bob = [(u, h, b) for u, h, b in fediverse.received if u == "https://gts.example/inbox"]
    assert len(to_bob) == 1
    _, headers, body = to_bob[0]
    create = json.loads(body)
    assert create["type"] == "Create"
    note = create["object"]
    assert note["id"] == answered.answer.ap_id
    assert note["inReplyTo"] == b1
    assert {
        "type": "Mention",
        "href": "https://gts.example/users/bob",
        "name": "@bob@gts.example",
    } in note["tag"]
    assert "https://gts.example/users/bob" in note["cc"]
    actor = (await web.get("/users/blog", headers={"Accept": AP_TYPE})).json()
    assert signature_key_id(headers) == actor["publicKey"]["id"]
    assert pyhttpsig_verifies(
        "POST",
        "/inbox",
        headers,
        actor["publicKey"]["publicKeyPem"],
        ["(request-target)", "host", "date", "digest"],
    )
    # And it is on the page, under B1, as the author's.
    assert await page_tree(web, post) == [
        ("A1", [("A2", []), ("B1", [("C1", [("A3", [])]), ("D1", []), ("Answer", [])])])
    ]


async def test_a_round_put_back_for_its_budget_resumes_and_ends(
    web: httpx.AsyncClient, ctx: Services, fediverse: Servers
) -> None:
    """40 listed ids that 404, then one real reply, at 30 requests a minute: each put-back
    round resumes past what it tried, so the reply is found and the round ends."""
    post = await publish(ctx, "Stuck")
    ann = fediverse.add("social.example", "ann")
    x_id = f"{ann.id}/statuses/1"
    dead = [f"{ann.id}/statuses/{n}" for n in range(100, 140)]
    good = reply(fediverse, ann, 2, x_id)
    await commented(web, ctx, fediverse, post, ann, 1, lambda i: replies_of(i, [*dead, good]))
    now = utcnow()
    for minute in range(10):
        at(ctx, now + timedelta(minutes=minute, seconds=1))
        await ctx.crawler.run_once()

    assert await stored(ctx, good) == "published"
    assert fediverse.exactly(dead[0]) == 1  # never asked again
    row = await crawl_row(ctx, x_id)
    assert (row.rounds, row.last_error) == (1, None)


async def test_replies_reaching_another_post_are_not_taken_past_its_cap(
    web: httpx.AsyncClient, ctx: Services, fediverse: Servers
) -> None:
    """A comment on post A lists replies to a comment on post B: they are not saved by
    A's crawl, so B's cap of crawled comments cannot be bypassed."""
    post_a = await publish(ctx, "A")
    post_b = await publish(ctx, "B")
    ctx.crawler.limits = replace(CrawlLimits(), max_per_post=2)
    bob = fediverse.add("other.example", "bob", key_index=1)
    y = await commented(web, ctx, fediverse, post_b, bob, 1, lambda i: replies_of(i, []))
    ann = fediverse.add("social.example", "ann")
    into_b = [reply(fediverse, ann, n, y["id"]) for n in range(10, 20)]
    await commented(web, ctx, fediverse, post_a, ann, 1, lambda i: replies_of(i, into_b))

    await ctx.crawler.run_once()

    assert [await stored(ctx, i) for i in into_b] == [None] * 10
    assert await ctx.store.count_crawled(post_b.id) == 0
