"""Moderation: held comments, the keyword filter, `fediblog comments …` and blocks.

The app runs in process on the database the CLI uses (``blog_dir``: ./data/fediblog.db,
or the folder's PostgreSQL database, and ./keys), with a fake fediverse as its network.
The CLI runs in process too (``tests.helpers.run``), in a worker thread because it runs
its own event loop, while the app keeps its connection open: exactly a `fediblog`
command next to a running server.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
from bs4 import BeautifulSoup

from fediblog.config import Settings
from fediblog.models import Post
from fediblog.web.deps import Services
from tests.conftest import BASE_URL, database_for, deliver, make_settings
from tests.fediverse import Fediverse, RemoteActor, signed_headers
from tests.helpers import comment_tree, publish, run, soup

pytestmark = pytest.mark.anyio

AP_ACCEPT = {"Accept": "application/activity+json"}


@pytest.fixture
def settings(request: pytest.FixtureRequest, blog_dir: Path) -> Settings:
    """The app's settings: the CLI's database and keys, plus the test's moderation."""
    values: dict[str, Any] = {
        "database": database_for(blog_dir, "fediblog.db"),  # FEDIBLOG_DATABASE's, on PostgreSQL
        "keys_dir": blog_dir / "keys",
    }
    values.update(getattr(request, "param", {}))
    return make_settings(blog_dir, **values)


def moderation(**values: str) -> pytest.MarkDecorator:
    return pytest.mark.parametrize("settings", [values], indirect=True)


async def cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    """`fediblog ARGS…` against the same database, while the app runs."""
    return await anyio.to_thread.run_sync(functools.partial(run, capsys, *args))


async def reply(
    web: httpx.AsyncClient,
    ctx: Services,
    actor: RemoteActor,
    number: int,
    in_reply_to: str,
    text: str,
    **extra: Any,
) -> str:
    """A signed public reply through the inbox; its Note id."""
    note = actor.note(number, in_reply_to, text, **extra)
    response = await deliver(web, ctx, actor, actor.create(note))
    assert response.status_code == 202
    return str(note["id"])


async def comment_id(ctx: Services, ap_id: str) -> int:
    row = await ctx.store.get_comment_by_ap_id(ap_id)
    assert row is not None
    return int(row.id)


async def status_of(ctx: Services, ap_id: str) -> str | None:
    row = await ctx.store.get_comment_by_ap_id(ap_id)
    return None if row is None else str(row.status)


async def page_of(web: httpx.AsyncClient, post: Post) -> BeautifulSoup:
    response = await web.get(f"/posts/{post.slug}")
    assert response.status_code == 200
    return soup(response.text)


async def shown(web: httpx.AsyncClient, post: Post) -> list[str]:
    """The texts of the top-level responses on the page, in order."""
    return [text for text, _ in comment_tree(await page_of(web, post))]


async def replies_of(web: httpx.AsyncClient, post: Post) -> list[str]:
    collection = (await web.get(f"/p/{post.uid}/replies", headers=AP_ACCEPT)).json()
    items: list[str] = collection["orderedItems"]
    return items


async def response_count(ctx: Services) -> int:
    [post] = await ctx.store.list_posts(limit=10)
    return post.response_count


async def stored_activities(ctx: Services) -> int:
    return sum((await ctx.store.count_inbox()).values())


def one_error_line(code: int, out: str, err: str, message: str) -> None:
    assert code == 1
    assert out == ""
    assert err.count("\n") == 1
    assert err.startswith("fediblog: error: ")
    assert message in err
    assert "Traceback" not in err


# ---- held comments ---------------------------------------------------------------------------


@moderation(moderation="first")
async def test_first_reply_of_each_author_is_held_until_approved(
    web: httpx.AsyncClient,
    ctx: Services,
    fediverse: Fediverse,
    capsys: pytest.CaptureFixture[str],
) -> None:
    post = await publish(ctx, "Moderated")
    object_id = ctx.blog.object_id(post.uid)
    alice = fediverse.add("mastodon.example", "alice", key_index=0)
    bob = fediverse.add("gts.example", "bob", key_index=1)

    first = await reply(web, ctx, alice, 1, object_id, "Hello from Alice")
    other = await reply(web, ctx, bob, 2, object_id, "Hello from Bob")

    assert await shown(web, post) == []
    assert await replies_of(web, post) == []
    assert await response_count(ctx) == 0
    code, out, _ = await cli(capsys, "comments", "list", "--pending")
    assert code == 0
    lines = out.splitlines()
    assert len(lines) == 2
    assert lines[0].split()[:2] == [str(await comment_id(ctx, other)), "pending"]
    assert "@bob@gts.example: Hello from Bob" in lines[0]
    assert lines[1].split()[:2] == [str(await comment_id(ctx, first)), "pending"]
    assert "@alice@mastodon.example: Hello from Alice" in lines[1]
    assert "moderated" in lines[1]  # the post's slug

    code, out, _ = await cli(capsys, "comments", "approve", str(await comment_id(ctx, first)))
    assert (code, out) == (0, f"comment {await comment_id(ctx, first)}: published\n")
    assert await shown(web, post) == ["Hello from Alice"]
    assert await replies_of(web, post) == [first]

    # Alice is known now: her next reply is published at once. Bob is still held.
    second = await reply(web, ctx, alice, 3, object_id, "Alice again")
    assert await status_of(ctx, second) == "published"
    assert await shown(web, post) == ["Hello from Alice", "Alice again"]
    assert await response_count(ctx) == 2

    code, out, _ = await cli(capsys, "comments", "reject", str(await comment_id(ctx, other)))
    assert code == 0
    assert await status_of(ctx, other) == "rejected"
    code, out, _ = await cli(capsys, "comments", "list", "--pending")
    assert (code, out) == (0, "no comments waiting\n")
    code, out, _ = await cli(capsys, "comments", "list")
    assert [line.split()[1] for line in out.splitlines()] == ["published", "rejected", "published"]
    # A rejected author has no approved reply yet: the next one waits too.
    later = await reply(web, ctx, bob, 4, object_id, "Bob insists")
    assert await status_of(ctx, later) == "pending"
    assert await shown(web, post) == ["Hello from Alice", "Alice again"]
    assert await replies_of(web, post) == [first, second]


@moderation(moderation="all")
async def test_all_replies_are_held(
    web: httpx.AsyncClient,
    ctx: Services,
    fediverse: Fediverse,
    capsys: pytest.CaptureFixture[str],
) -> None:
    post = await publish(ctx, "Everything held")
    object_id = ctx.blog.object_id(post.uid)
    alice = fediverse.add("mastodon.example", "alice", key_index=0)
    first = await reply(web, ctx, alice, 1, object_id, "One")
    await cli(capsys, "comments", "approve", str(await comment_id(ctx, first)))

    second = await reply(web, ctx, alice, 2, object_id, "Two")

    assert await status_of(ctx, second) == "pending"
    assert await shown(web, post) == ["One"]
    assert (await cli(capsys, "comments", "approve", str(await comment_id(ctx, second))))[0] == 0
    assert await shown(web, post) == ["One", "Two"]
    assert await replies_of(web, post) == [first, second]


@moderation(hold_keywords="casino, free crypto")
async def test_keyword_filter_holds_matching_replies(
    web: httpx.AsyncClient,
    ctx: Services,
    fediverse: Fediverse,
    capsys: pytest.CaptureFixture[str],
) -> None:
    post = await publish(ctx, "Filtered")
    object_id = ctx.blog.object_id(post.uid)
    alice = fediverse.add("mastodon.example", "alice", key_index=0)
    spammer = fediverse.add("spam.example", "spammer", key_index=1)

    clean = await reply(web, ctx, alice, 1, object_id, "A thoughtful answer")
    spam = await reply(web, ctx, spammer, 2, object_id, "Best <b>CASINO</b> bonus")
    phrase = await reply(web, ctx, spammer, 3, object_id, "Get FREE   crypto now")
    warned = await reply(
        web, ctx, spammer, 4, object_id, "click below", summary="Casino night", sensitive=True
    )

    assert await status_of(ctx, clean) == "published"
    assert await status_of(ctx, spam) == "pending"
    assert await status_of(ctx, phrase) == "pending"
    assert await status_of(ctx, warned) == "pending"  # the content warning is text too
    page = await page_of(web, post)
    assert "asino" not in page.get_text()
    assert await shown(web, post) == ["A thoughtful answer"]

    # A published reply edited to carry a keyword waits again.
    edited = alice.note(1, object_id, "Visit my casino", updated="2026-11-28T13:00:00Z")
    update = {**alice.create(edited), "id": f"{edited['id']}#updates/1", "type": "Update"}
    assert (await deliver(web, ctx, alice, update)).status_code == 202
    assert await status_of(ctx, clean) == "pending"
    assert await shown(web, post) == []

    code, out, _ = await cli(capsys, "comments", "list", "--pending")
    assert code == 0
    assert len(out.splitlines()) == 4


async def test_cli_delete_keeps_the_thread_and_a_tombstone(
    web: httpx.AsyncClient,
    ctx: Services,
    fediverse: Fediverse,
    capsys: pytest.CaptureFixture[str],
) -> None:
    post = await publish(ctx, "Deleting")
    object_id = ctx.blog.object_id(post.uid)
    alice = fediverse.add("mastodon.example", "alice", key_index=0)
    bob = fediverse.add("gts.example", "bob", key_index=1)
    parent = await reply(web, ctx, alice, 1, object_id, "Parent")
    await reply(web, ctx, bob, 2, parent, "Child")

    code, out, _ = await cli(capsys, "comments", "delete", str(await comment_id(ctx, parent)))

    assert (code, out) == (0, f"comment {await comment_id(ctx, parent)}: deleted\n")
    assert comment_tree(await page_of(web, post)) == [
        ("This response was deleted.", [("Child", [])])
    ]
    assert await response_count(ctx) == 1
    assert await ctx.store.is_tombstoned(parent)
    # Alice's server sends the Note again: it stays deleted.
    note = alice.note(1, object_id, "Parent")
    await deliver(web, ctx, alice, {**alice.create(note), "id": f"{parent}/activity-again"})
    assert await status_of(ctx, parent) == "deleted"
    code, out, _ = await cli(capsys, "comments", "list")
    assert [line.split()[1] for line in out.splitlines()] == ["published"]


@pytest.mark.parametrize("action", ["approve", "reject", "delete"])
async def test_unknown_comment_id_is_one_line_and_exit_1(
    ctx: Services, capsys: pytest.CaptureFixture[str], action: str
) -> None:
    code, out, err = await cli(capsys, "comments", action, "999")

    one_error_line(code, out, err, "no comment has the id 999")


# ---- blocks ----------------------------------------------------------------------------------


async def test_block_an_actor_hides_everything_and_drops_what_comes_next(
    web: httpx.AsyncClient,
    ctx: Services,
    fediverse: Fediverse,
    capsys: pytest.CaptureFixture[str],
) -> None:
    post = await publish(ctx, "Blocking")
    object_id = ctx.blog.object_id(post.uid)
    alice = fediverse.add("mastodon.example", "alice", key_index=0)
    bob = fediverse.add("gts.example", "bob", key_index=1)
    from_alice = await reply(web, ctx, alice, 1, object_id, "Alice speaks")
    from_bob = await reply(web, ctx, bob, 2, object_id, "Bob speaks")
    like: dict[str, object] = {
        "id": f"{alice.id}#likes/1",
        "type": "Like",
        "actor": alice.id,
        "object": object_id,
    }
    await deliver(web, ctx, alice, like)
    page = await page_of(web, post)
    assert "1 like" in page.get_text()

    code, out, _ = await cli(capsys, "block", alice.id)
    assert (code, out) == (0, f"blocked actor {alice.id}\n")
    await ctx.inbox.load_blocks()  # the running server rereads the list every second

    page = await page_of(web, post)
    assert [text for text, _ in comment_tree(page)] == ["Bob speaks"]
    assert page.select(".reactions") == []
    assert await replies_of(web, post) == [from_bob]
    assert await response_count(ctx) == 1

    # Whatever alice sends now: 202, nothing stored, nothing fetched.
    stored, fetched = await stored_activities(ctx), len(fediverse.requests)
    late = alice.note(3, object_id, "Alice again")
    assert (await deliver(web, ctx, alice, alice.create(late))).status_code == 202
    undo: dict[str, object] = {
        "id": f"{alice.id}#likes/1/undo",
        "type": "Undo",
        "actor": alice.id,
        "object": like,
    }
    assert (await deliver(web, ctx, alice, undo)).status_code == 202
    assert await stored_activities(ctx) == stored
    assert len(fediverse.requests) == fetched
    assert await ctx.store.get_comment_by_ap_id(late["id"]) is None

    code, out, _ = await cli(capsys, "blocks")
    assert (code, out.split()) == (0, ["actor", alice.id])
    code, out, _ = await cli(capsys, "block", alice.id)
    assert (code, out) == (0, f"{alice.id} was already blocked\n")

    code, out, _ = await cli(capsys, "unblock", alice.id)
    assert (code, out) == (0, f"unblocked {alice.id}\n")
    await ctx.inbox.load_blocks()
    page = await page_of(web, post)
    assert [text for text, _ in comment_tree(page)] == ["Alice speaks", "Bob speaks"]
    assert "1 like" in page.get_text()  # the Undo was dropped with the rest
    assert await replies_of(web, post) == [from_alice, from_bob]
    assert (await cli(capsys, "blocks"))[1] == "no blocks\n"


async def test_block_a_domain(
    web: httpx.AsyncClient,
    ctx: Services,
    fediverse: Fediverse,
    capsys: pytest.CaptureFixture[str],
) -> None:
    post = await publish(ctx, "Domains")
    object_id = ctx.blog.object_id(post.uid)
    alice = fediverse.add("mastodon.example", "alice", key_index=0)
    bob = fediverse.add("gts.example", "bob", key_index=1)
    carol = fediverse.add("gts.example", "carol", key_index=2)
    await reply(web, ctx, alice, 1, object_id, "Alice speaks")
    from_bob = await reply(web, ctx, bob, 2, object_id, "Bob speaks")
    boost = {"id": f"{carol.id}/boosts/1", "type": "Announce", "actor": carol.id}
    await deliver(web, ctx, carol, {**boost, "object": object_id})

    code, out, _ = await cli(capsys, "block", "GTS.example")
    assert (code, out) == (0, "blocked domain gts.example\n")
    await ctx.inbox.load_blocks()

    page = await page_of(web, post)
    assert [text for text, _ in comment_tree(page)] == ["Alice speaks"]
    assert page.select(".reactions") == []
    # Someone on that domain never seen before: not even their key is fetched.
    dave = fediverse.add("gts.example", "dave", key_index=3)
    stored = await stored_activities(ctx)
    late = await reply(web, ctx, dave, 3, object_id, "Dave tries")
    assert await stored_activities(ctx) == stored
    assert await ctx.store.get_comment_by_ap_id(late) is None
    assert fediverse.asked(dave.id) == 0
    assert (await cli(capsys, "blocks"))[1].split() == ["domain", "gts.example"]

    assert (await cli(capsys, "unblock", "gts.example"))[0] == 0
    await ctx.inbox.load_blocks()
    page = await page_of(web, post)
    assert [text for text, _ in comment_tree(page)] == ["Alice speaks", "Bob speaks"]
    assert "1 boost" in page.get_text()
    assert from_bob in await replies_of(web, post)


async def test_a_domain_block_covers_its_subdomains(
    web: httpx.AsyncClient,
    ctx: Services,
    fediverse: Fediverse,
    capsys: pytest.CaptureFixture[str],
) -> None:
    post = await publish(ctx, "Subdomains")
    object_id = ctx.blog.object_id(post.uid)
    sub = fediverse.add("social.bad.example", "eve", key_index=0)
    lookalike = fediverse.add("notbad.example", "ned", key_index=1)
    await reply(web, ctx, sub, 1, object_id, "From a subdomain")
    await reply(web, ctx, lookalike, 2, object_id, "From a lookalike")

    assert (await cli(capsys, "block", "bad.example"))[0] == 0
    await ctx.inbox.load_blocks()

    page = await page_of(web, post)
    assert [text for text, _ in comment_tree(page)] == ["From a lookalike"]
    stored = await stored_activities(ctx)
    await reply(web, ctx, sub, 3, object_id, "Again from the subdomain")
    assert await stored_activities(ctx) == stored


async def test_a_domain_block_catches_ids_written_in_unicode(
    web: httpx.AsyncClient,
    ctx: Services,
    fediverse: Fediverse,
    capsys: pytest.CaptureFixture[str],
) -> None:
    post = await publish(ctx, "IDN")
    eve = fediverse.add("\u0430pple.example", "eve", key_index=0)  # the first letter is Cyrillic
    assert (await cli(capsys, "block", "xn--pple-43d.example"))[0] == 0
    await ctx.inbox.load_blocks()
    stored = await stored_activities(ctx)
    # Headers are ASCII: the keyId is in punycode, the ids in the body in Unicode.
    body = json.dumps(eve.create(eve.note(1, ctx.blog.object_id(post.uid), "Hi"))).encode()
    key_id = eve.key_id.replace("\u0430pple", "xn--pple-43d")
    for key in (key_id, "https://other.example/users/x#main-key"):
        headers = signed_headers(key, eve.key, BASE_URL + "/inbox", body)
        response = await web.post("/inbox", content=body, headers=headers)
        assert response.status_code == 202, key
    await ctx.inbox.process_once()

    assert await stored_activities(ctx) == stored
    assert fediverse.requests == []  # dropped before any key fetch


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("block", "not a thing"), "neither an actor URL nor a domain"),
        (("block", "@alice@mastodon.example"), "by its actor URL"),
        (("block", "https://mastodon.example/"), "is a site, not an actor"),
        (("unblock", "never.example"), "is not blocked"),
    ],
)
async def test_bad_block_targets_are_one_line_and_exit_1(
    ctx: Services, capsys: pytest.CaptureFixture[str], args: tuple[str, ...], message: str
) -> None:
    code, out, err = await cli(capsys, *args)

    one_error_line(code, out, err, message)
    assert await ctx.store.list_blocks() == []
