"""Replies, likes and boosts from the fediverse, through the real inbox, onto the page."""

from __future__ import annotations

import httpx
import pytest

from fediblog.web.deps import Services
from tests.conftest import deliver
from tests.fediverse import Fediverse
from tests.helpers import comment_tree, publish, soup

pytestmark = pytest.mark.anyio


async def test_three_level_thread_from_three_servers(
    web: httpx.AsyncClient, ctx: Services, fediverse: Fediverse
) -> None:
    post = await publish(ctx, "Federated thread")
    object_id = ctx.blog.object_id(post.uid)
    alice = fediverse.add("mastodon.example", "alice", key_index=0, name="Alice")
    bob = fediverse.add("gts.example", "bob", key_index=1, name="Bob")
    carol = fediverse.add("misskey.example", "carol", key_index=2, name="Carol")

    first = alice.note(1, object_id, "Top level from Mastodon")
    second = bob.note(2, first["id"], "Reply from GoToSocial")
    third = carol.note(3, second["id"], "Reply to the reply from Misskey")
    for actor, note in ((alice, first), (bob, second), (carol, third)):
        assert (await deliver(web, ctx, actor, actor.create(note))).status_code == 202

    page = soup((await web.get(f"/posts/{post.slug}")).text)

    assert comment_tree(page) == [
        (
            "Top level from Mastodon",
            [("Reply from GoToSocial", [("Reply to the reply from Misskey", [])])],
        )
    ]
    handles = [h.get_text() for h in page.select(".handle")]
    assert handles == ["@alice@mastodon.example", "@bob@gts.example", "@carol@misskey.example"]
    assert page.find(id="responses-title").get_text() == "3 Responses to “Federated thread”"
    replies = (
        await web.get(f"/p/{post.uid}/replies", headers={"Accept": "application/activity+json"})
    ).json()
    assert replies["orderedItems"] == [first["id"], second["id"], third["id"]]
    assert replies["totalItems"] == 3


async def test_reply_to_the_html_url_counts_too(
    web: httpx.AsyncClient, ctx: Services, fediverse: Fediverse
) -> None:
    post = await publish(ctx, "By URL")
    ann = fediverse.add("social.example", "ann")

    await deliver(web, ctx, ann, ann.create(ann.note(7, ctx.blog.post_url(post), "via url")))

    assert "via url" in (await web.get(f"/posts/{post.slug}")).text


async def test_reply_to_something_else_is_ignored(
    web: httpx.AsyncClient, ctx: Services, fediverse: Fediverse
) -> None:
    post = await publish(ctx, "Unrelated")
    ann = fediverse.add("social.example", "ann")
    note = ann.note(8, "https://elsewhere.example/notes/1", "not for us")

    response = await deliver(web, ctx, ann, ann.create(note))

    assert response.status_code == 202
    assert await ctx.store.get_comment_by_ap_id(note["id"]) is None
    assert "not for us" not in (await web.get(f"/posts/{post.slug}")).text


async def test_a_handler_bug_fails_one_activity_not_the_queue(
    web: httpx.AsyncClient, ctx: Services, fediverse: Fediverse
) -> None:
    post = await publish(ctx, "Robust")
    ann = fediverse.add("social.example", "ann")

    async def broken(activity: dict[str, object]) -> None:
        raise RuntimeError("a bug")

    ctx.inbox.add_handlers({"Create": broken})
    first = ann.note(1, ctx.blog.object_id(post.uid), "first")
    await deliver(web, ctx, ann, ann.create(first))
    ctx.inbox.handlers["Create"].remove(broken)
    second = ann.note(2, ctx.blog.object_id(post.uid), "second")
    await deliver(web, ctx, ann, ann.create(second))

    assert await ctx.store.count_inbox() == {"done": 1, "failed": 1}
    assert await ctx.inbox.process_once() == 0  # the failed one is not retried forever
    assert await ctx.store.get_comment_by_ap_id(second["id"]) is not None
