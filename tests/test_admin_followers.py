"""The desk's Followers section (/admin/followers): follow requests approved or rejected
(followers.approve / reject, as ``fediblog followers`` does), followers counted per
server, and removing a follower (a Reject of its Follow, delivered signed).

Follows arrive signed through the real inbox from tests/fediverse.py's fake servers,
with FEDIBLOG_MANUALLY_APPROVES_FOLLOWERS on; one delivery pass shows what they got.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import httpx
import pytest

from fediblog import followers
from fediblog.config import Settings
from fediblog.web.admin import followers as desk_followers
from fediblog.web.deps import Services
from tests.admin_kit import sign_in
from tests.conftest import database_for, deliver, make_settings
from tests.fediverse import Fediverse, RemoteActor
from tests.helpers import run, soup
from tests.test_admin_responses import verified
from tests.test_cli_federation import ACTOR, _queued_payloads, _seed_follower

pytestmark = pytest.mark.anyio


@pytest.fixture
def settings(tmp_path: Path, blog_keys: Path) -> Settings:
    return make_settings(tmp_path, keys_dir=blog_keys, manually_approves_followers=True)


async def follow(web: httpx.AsyncClient, ctx: Services, actor: RemoteActor) -> dict[str, Any]:
    activity = {
        "@context": "https://www.w3.org/ns/activitystreams",
        "id": f"{actor.id}/follows/1",
        "type": "Follow",
        "actor": actor.id,
        "object": ctx.urls.actor,
    }
    assert (await deliver(web, ctx, actor, activity)).status_code == 202
    return activity


async def delivered(ctx: Services, fediverse: Fediverse, inbox: str) -> dict[str, Any]:
    """Run one delivery pass; the one activity ``inbox`` got, its signature checked."""
    fediverse.received.clear()
    await ctx.deliverer.deliver_once()
    (found,) = [(h, b) for url, h, b in fediverse.received if url == inbox]
    assert verified(found[0], inbox, ctx.blog_public_pem)
    activity: dict[str, Any] = json.loads(found[1])
    return activity


async def post_action(web: httpx.AsyncClient, csrf: str, action: str, actor: str) -> httpx.Response:
    return await web.post(f"/admin/followers/{action}", data={"csrf": csrf, "actor": actor})


async def test_a_pending_request_is_approved_and_the_follower_gets_a_signed_accept(
    web: httpx.AsyncClient, ctx: Services, fediverse: Fediverse
) -> None:
    alice = fediverse.add("social.example", "alice")
    sent = await follow(web, ctx, alice)
    csrf = await sign_in(web, ctx)
    page = soup((await web.get("/admin/followers")).text)
    pending = page.select_one("section[aria-labelledby=pending-heading]")
    assert pending is not None
    assert "@alice@social.example" in pending.get_text()

    done = await post_action(web, csrf, "approve", alice.id)

    assert done.status_code == 303
    assert done.headers["location"] == "/admin/followers?done=approve"
    accept = await delivered(ctx, fediverse, f"{alice.id}/inbox")
    assert accept["type"] == "Accept"
    assert accept["object"]["id"] == sent["id"]
    follower = await ctx.store.get_follower(alice.id)
    assert follower is not None
    assert follower.status == "accepted"
    assert "Approved" in (await web.get(done.headers["location"])).text


async def test_a_rejected_request_is_gone_and_its_server_gets_a_signed_reject(
    web: httpx.AsyncClient, ctx: Services, fediverse: Fediverse
) -> None:
    alice = fediverse.add("social.example", "alice")
    await follow(web, ctx, alice)
    csrf = await sign_in(web, ctx)

    assert (await post_action(web, csrf, "reject", alice.id)).status_code == 303

    assert (await delivered(ctx, fediverse, f"{alice.id}/inbox"))["type"] == "Reject"
    assert await ctx.store.get_follower(alice.id) is None


async def test_followers_are_counted_per_server(
    web: httpx.AsyncClient, ctx: Services, fediverse: Fediverse
) -> None:
    actors = [
        fediverse.add("social.example", "alice"),
        fediverse.add("social.example", "bob", key_index=1),
        fediverse.add("other.example", "carol", key_index=2),
    ]
    for actor in actors:
        await follow(web, ctx, actor)
    csrf = await sign_in(web, ctx)
    for actor in actors:
        await post_action(web, csrf, "approve", actor.id)

    page = soup((await web.get("/admin/followers")).text)

    rows = [[td.get_text() for td in tr.find_all("td")] for tr in page.select("tbody tr")]
    assert rows == [["social.example", "2"], ["other.example", "1"]]
    heading = page.select_one("#servers-heading")
    assert heading is not None
    assert heading.get_text().startswith("3 followers")


async def test_removing_a_follower_stops_posts_and_sends_its_server_a_reject_of_its_follow(
    web: httpx.AsyncClient, ctx: Services, fediverse: Fediverse
) -> None:
    alice = fediverse.add("social.example", "alice")
    sent = await follow(web, ctx, alice)
    csrf = await sign_in(web, ctx)
    await post_action(web, csrf, "approve", alice.id)
    await ctx.deliverer.deliver_once()
    page = (await web.get("/admin/followers")).text
    assert "sends their server a Reject of their Follow" in page

    done = await post_action(web, csrf, "remove", alice.id)

    assert done.headers["location"] == "/admin/followers?done=remove"
    reject = await delivered(ctx, fediverse, f"{alice.id}/inbox")
    assert reject["type"] == "Reject"
    assert reject["actor"] == ctx.urls.actor
    assert reject["object"]["id"] == sent["id"]
    assert await ctx.store.get_follower(alice.id) is None


async def test_an_unknown_follower_or_a_missing_actor_is_a_4xx_with_the_reason(
    web: httpx.AsyncClient, ctx: Services, fediverse: Fediverse
) -> None:
    alice = fediverse.add("social.example", "alice")
    await follow(web, ctx, alice)  # pending: it cannot be removed, only rejected
    csrf = await sign_in(web, ctx)

    pending = await post_action(web, csrf, "remove", alice.id)
    nobody = await post_action(web, csrf, "approve", "https://nowhere.example/users/x")
    empty = await web.post("/admin/followers/approve", data={"csrf": csrf})

    assert pending.status_code == 404
    assert "does not follow this blog" in pending.text
    assert nobody.status_code == 404
    assert "no pending follow request" in nobody.text
    assert empty.status_code == 400
    follower = await ctx.store.get_follower(alice.id)
    assert follower is not None
    assert follower.status == "pending"


def test_fediblog_followers_remove_queues_a_reject(
    blog_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run(capsys, "init")
    database = database_for(blog_dir, "fediblog.db")
    asyncio.run(_seed_follower(database, "accepted"))

    code, _, err = run(capsys, "followers", "remove", ACTOR)

    assert (code, err) == (0, "")
    assert run(capsys, "followers", "list")[1].strip() == "no followers yet"
    (reject,) = asyncio.run(_queued_payloads(database))
    assert reject["type"] == "Reject"
    assert reject["_inbox"] == ACTOR + "/inbox"  # the follower's own inbox
    assert reject["object"]["id"] == "https://social.example/follows/1"  # type: ignore[index]
    code, _, err = run(capsys, "followers", "remove", ACTOR)
    assert (code, err.strip()) == (1, f"fediblog: error: {ACTOR} does not follow this blog")


async def test_the_remove_texts_say_gotosocial_keeps_showing_the_follow(
    web: httpx.AsyncClient, ctx: Services, fediverse: Fediverse
) -> None:
    alice = fediverse.add("social.example", "alice")
    await follow(web, ctx, alice)
    csrf = await sign_in(web, ctx)
    await post_action(web, csrf, "approve", alice.id)

    page = soup((await web.get("/admin/followers")).text).get_text(" ")
    done = await post_action(web, csrf, "remove", alice.id)
    after = soup((await web.get(done.headers["location"])).text).get_text(" ")

    for text in (page, after, followers.remove.__doc__ or ""):
        said = " ".join(text.split())
        assert "Mastodon and GoToSocial" not in said
        assert "GoToSocial ignores it" in said or "GoToSocial (as of this writing)" in said
        assert "following" in said


async def test_a_page_past_the_end_shows_the_last_page_with_its_pager(
    web: httpx.AsyncClient, ctx: Services, fediverse: Fediverse, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(desk_followers, "PER_PAGE", 1)
    actors = [
        fediverse.add("social.example", "alice"),
        fediverse.add("other.example", "bob", key_index=1),
    ]
    for actor in actors:
        await follow(web, ctx, actor)
    csrf = await sign_in(web, ctx)
    for actor in actors:
        await post_action(web, csrf, "approve", actor.id)

    page = soup((await web.get("/admin/followers?page=7")).text)

    heading = page.select_one("#followers-heading")
    assert heading is not None
    assert heading.get_text() == "Followers, page 2 of 2"
    assert "@bob@other.example" in page.select("ul.desk-people")[-1].get_text()
    pager = page.select_one("nav.pager")
    assert pager is not None
    assert [a["href"] for a in pager.select("a")] == ["/admin/followers?page=1"]


async def test_the_requests_heading_counts_every_request_not_only_those_listed(
    web: httpx.AsyncClient, ctx: Services, fediverse: Fediverse, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(desk_followers, "PENDING_SHOWN", 1)
    await follow(web, ctx, fediverse.add("social.example", "alice"))
    await follow(web, ctx, fediverse.add("other.example", "bob", key_index=1))
    await sign_in(web, ctx)

    page = soup((await web.get("/admin/followers")).text)

    heading = page.select_one("#pending-heading")
    assert heading is not None
    assert heading.get_text() == "Follow requests (2)"
    assert len(page.select("section[aria-labelledby=pending-heading] li")) == 1
    assert "The oldest 1 are listed" in page.get_text()


async def test_a_late_undo_of_a_removed_follow_leaves_the_new_follow_be(
    web: httpx.AsyncClient, ctx: Services, fediverse: Fediverse
) -> None:
    """Mastodon answers the Reject of a removed follower with an Undo of that Follow;
    arriving after the account's new Follow, it must not end the new one."""
    alice = fediverse.add("social.example", "alice")
    old = await follow(web, ctx, alice)
    csrf = await sign_in(web, ctx)
    await post_action(web, csrf, "approve", alice.id)
    await post_action(web, csrf, "remove", alice.id)
    new = {**old, "id": f"{alice.id}/follows/2"}
    assert (await deliver(web, ctx, alice, new)).status_code == 202
    await post_action(web, csrf, "approve", alice.id)
    undo = {
        "@context": "https://www.w3.org/ns/activitystreams",
        "id": f"{alice.id}/follows/1/undo",
        "type": "Undo",
        "actor": alice.id,
        "object": {k: v for k, v in old.items() if k != "@context"},
    }

    assert (await deliver(web, ctx, alice, undo)).status_code == 202

    follower = await ctx.store.get_follower(alice.id)
    assert follower is not None
    assert (follower.status, follower.follow_id) == ("accepted", new["id"])
    # Misskey names the Follow in its Undo by another id than it sent: that one still
    # ends the follow, as does the Undo of the current Follow.
    misskey = {**undo, "id": f"{alice.id}/undo/3"}
    misskey["object"] = {**undo["object"], "id": f"{alice.id}/follows/{alice.id}/blog"}
    assert (await deliver(web, ctx, alice, misskey)).status_code == 202
    assert await ctx.store.get_follower(alice.id) is None
