"""Comments under attack: the remaining cases of shared/security/ATTACKS.md for issue 4
(2, 3, 7-12, 28, 31-34, 36, 37), each in tests named after its number.

Everything goes through the real app (lifespan running, workers off): activities are
POSTed to the shared inbox signed by pyhttpsig (``deliver``), processed by one
``process_once`` pass, and the result is read where a reader or a server would read
it: the HTML page (parsed with BeautifulSoup), the replies collection, the counts. The
network is ``tests.fediverse.Fediverse``, which serves the remote actors and objects
and counts every request the blog makes.

The inbox answers 202 once an activity is stored and decides what it means later, so
"rejected" here means: the stored activity is marked failed with a one-line reason,
and the comments, tombstones, reactions and followers are exactly as before.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from bs4 import BeautifulSoup, Tag

from fediblog.comments import MAX_DEPTH
from fediblog.models import Post, format_ts, utcnow
from fediblog.render import sanitize_remote_html
from fediblog.web.deps import Services
from tests import dbpeek
from tests.conftest import BASE_URL, deliver, make_settings
from tests.fediverse import AS_PUBLIC, Fediverse, RemoteActor
from tests.helpers import comment_tree, publish, remote_actor, remote_comment, running, soup

pytestmark = pytest.mark.anyio

AP_ACCEPT = {"Accept": "application/activity+json"}
AS_CONTEXT = "https://www.w3.org/ns/activitystreams"


# ---- reading the outcome ------------------------------------------------------------------


def outcome(ctx: Services, activity_id: str) -> tuple[str, str | None]:
    """(status, error) of a stored inbound activity, as committed (dbpeek reads through
    a connection of its own, whatever the app caches)."""
    row = dbpeek.row(
        ctx.settings,
        "SELECT status, error FROM inbox WHERE dedup_key LIKE '% ' || ?",
        (activity_id,),
    )
    assert row is not None, f"{activity_id} was not stored"
    return row[0], row[1]


def state(ctx: Services) -> dict[str, list[tuple[Any, ...]]]:
    """Every row an activity may add or change, for "nothing stored, nothing lost"."""
    queries = {
        "comments": "SELECT * FROM comments ORDER BY id",
        "tombstones": "SELECT ap_id, actor_ap_id FROM tombstones ORDER BY ap_id",
        "reactions": "SELECT post_id, actor_id, type, ap_id FROM reactions ORDER BY id",
        "followers": "SELECT actor_id, follow_ap_id, status FROM followers ORDER BY id",
        "posts": "SELECT * FROM posts ORDER BY id",
        "blocks": "SELECT target FROM blocks ORDER BY id",
    }
    return {name: dbpeek.rows(ctx.settings, sql) for name, sql in queries.items()}


def actor_names(ctx: Services) -> dict[str, tuple[str, str]]:
    rows = dbpeek.rows(ctx.settings, "SELECT ap_id, name, username FROM actors")
    return {ap_id: (name, username) for ap_id, name, username in rows}


async def page_of(web: httpx.AsyncClient, post: Post) -> BeautifulSoup:
    response = await web.get(f"/posts/{post.slug}")
    assert response.status_code == 200
    return soup(response.text)


async def replies_of(web: httpx.AsyncClient, post: Post) -> list[str]:
    document = (await web.get(f"/p/{post.uid}/replies", headers=AP_ACCEPT)).json()
    assert document["totalItems"] == len(document["orderedItems"])
    items: list[str] = document["orderedItems"]
    return items


def responses_title(page: BeautifulSoup) -> str:
    title = page.find(id="responses-title")
    assert isinstance(title, Tag)
    return title.get_text()


def contents(page: BeautifulSoup) -> list[str]:
    """The text of every response shown, in page order."""
    return [c.get_text(" ", strip=True) for c in page.select("#responses .e-content")]


def with_id(activity: dict[str, Any], activity_id: str) -> dict[str, Any]:
    return {**activity, "id": activity_id}


def delete(actor: RemoteActor, obj: Any, number: int) -> dict[str, Any]:
    return {
        "@context": AS_CONTEXT,
        "id": f"{actor.id}/deletes/{number}",
        "type": "Delete",
        "actor": actor.id,
        "to": [AS_PUBLIC],
        "object": obj,
    }


def tombstone(object_id: str) -> dict[str, Any]:
    return {"id": object_id, "type": "Tombstone"}


def update(actor: RemoteActor, obj: dict[str, Any], number: int) -> dict[str, Any]:
    return {
        "@context": AS_CONTEXT,
        "id": f"{actor.id}/updates/{number}",
        "type": "Update",
        "actor": actor.id,
        "to": [AS_PUBLIC],
        "object": obj,
    }


def follow(ctx: Services, actor: RemoteActor, number: int = 1) -> dict[str, Any]:
    return {
        "@context": AS_CONTEXT,
        "id": f"{actor.id}/follows/{number}",
        "type": "Follow",
        "actor": actor.id,
        "object": ctx.urls.actor,
    }


def like(actor: RemoteActor, target: Any, number: int = 1, kind: str = "Like") -> dict[str, Any]:
    return {
        "@context": AS_CONTEXT,
        "id": f"{actor.id}/{kind.lower()}s/{number}",
        "type": kind,
        "actor": actor.id,
        "object": target,
    }


def undo(actor: RemoteActor, inner: Any, number: int = 1) -> dict[str, Any]:
    return {
        "@context": AS_CONTEXT,
        "id": f"{actor.id}/undos/{number}",
        "type": "Undo",
        "actor": actor.id,
        "object": inner,
    }


def stamp(delta: timedelta = timedelta()) -> str:
    return format_ts(utcnow() + delta)


# ---- 2, 3: who may say what -------------------------------------------------------------


async def test_attack_2_object_on_another_host(
    web: httpx.AsyncClient, ctx: Services, fediverse: Fediverse
) -> None:
    post = await publish(ctx, "Case 2")
    target = ctx.blog.object_id(post.uid)
    alice = fediverse.add("mastodon.example", "alice", key_index=0, name="Alice")
    mallory = fediverse.add("evil.example", "mallory", key_index=1)
    legit = alice.note(1, target, "Alice's own words")
    await deliver(web, ctx, alice, alice.create(legit))
    before = state(ctx)

    # A new id on Alice's host, then the id of Alice's reply itself (an overwrite).
    for number, note_id in ((2, f"{alice.id}/statuses/2"), (3, legit["id"])):
        forged = mallory.note(number, target, "Mallory writing as Alice", id=note_id)
        activity = with_id(mallory.create(forged), f"{mallory.id}/activities/{number}")
        assert (await deliver(web, ctx, mallory, activity)).status_code == 202
        status, error = outcome(ctx, activity["id"])
        assert status == "failed"
        assert error == "the object is on another host than its actor"

    assert state(ctx) == before
    page = await page_of(web, post)
    assert contents(page) == ["Alice's own words"]
    assert await replies_of(web, post) == [legit["id"]]
    assert fediverse.asked(f"{alice.id}/statuses/2") == 0


async def test_attack_3_attributed_to_someone_else(
    web: httpx.AsyncClient, ctx: Services, fediverse: Fediverse
) -> None:
    post = await publish(ctx, "Case 3")
    target = ctx.blog.object_id(post.uid)
    alice = fediverse.add("mastodon.example", "alice", key_index=0, name="Alice")
    bob = fediverse.add("mastodon.example", "bob", key_index=1, name="Bob")  # same server
    legit = alice.note(1, target, "Alice's reply")
    await deliver(web, ctx, alice, alice.create(legit))
    before = state(ctx)

    claims: list[Any] = [alice.id, [bob.id, alice.id], {"id": alice.id, "type": "Person"}, None]
    for number, claim in enumerate(claims, start=10):
        forged = bob.note(number, target, "Bob pretending", attributedTo=claim)
        if claim is None:
            del forged["attributedTo"]
        activity = bob.create(forged)
        assert (await deliver(web, ctx, bob, activity)).status_code == 202
        assert outcome(ctx, activity["id"]) == (
            "failed",
            "the object is attributed to someone other than its sender",
        )
    # On Update too: Bob "edits" Alice's reply in her name.
    edit = {**legit, "content": "<p>Bob's version</p>", "updated": stamp(timedelta(seconds=-1))}
    activity = update(bob, edit, 1)
    assert (await deliver(web, ctx, bob, activity)).status_code == 202
    assert outcome(ctx, activity["id"])[0] == "failed"

    assert state(ctx) == before
    page = await page_of(web, post)
    assert contents(page) == ["Alice's reply"]
    assert page.select(".edited") == []
    assert [h.get_text() for h in page.select(".handle")] == ["@alice@mastodon.example"]


# ---- 7: embedded copies ----------------------------------------------------------------------


def lemmy_announce(group: RemoteActor, note: dict[str, Any], number: int) -> dict[str, Any]:
    """A community relaying a comment (Lemmy): Announce{Create{Note}}, signed by the Group."""
    return {
        "@context": AS_CONTEXT,
        "id": f"https://{group.host}/activities/announce/{number}",
        "type": "Announce",
        "actor": group.id,
        "to": [AS_PUBLIC],
        "cc": [f"{group.id}/followers"],
        "object": {
            "id": f"https://{group.host}/activities/create/{number}",
            "type": "Create",
            "actor": note["attributedTo"],
            "to": [AS_PUBLIC],
            "object": note,
        },
    }


async def test_attack_7_embedded_announce_copy_ignored(
    web: httpx.AsyncClient, ctx: Services, fediverse: Fediverse
) -> None:
    post = await publish(ctx, "Case 7")
    target = ctx.blog.object_id(post.uid)
    group = fediverse.add("lemmy.example", "community", key_index=0)
    carol = fediverse.add("origin.example", "carol", key_index=1, name="Carol")
    origin = carol.note(5, target, "What Carol really wrote")
    fediverse.documents[origin["id"]] = origin
    relayed = {**origin, "content": "<p>Words the relay put in Carol's mouth</p>"}

    response = await deliver(web, ctx, group, lemmy_announce(group, relayed, 1))

    assert response.status_code == 202
    assert fediverse.asked(origin["id"]) == 1  # fetched from its origin, once
    page = await page_of(web, post)
    assert contents(page) == ["What Carol really wrote"]
    assert "relay put" not in str(page)
    assert [h.get_text() for h in page.select(".handle")] == ["@carol@origin.example"]
    assert await replies_of(web, post) == [origin["id"]]
    assert state(ctx)["reactions"] == []  # a relayed reply is not a boost

    # Relayed again (another community): still one comment, still the origin's words.
    await deliver(web, ctx, group, lemmy_announce(group, relayed, 2))
    assert contents(await page_of(web, post)) == ["What Carol really wrote"]


async def test_attack_7_embedded_copy_not_at_its_origin_stores_nothing(
    web: httpx.AsyncClient, ctx: Services, fediverse: Fediverse
) -> None:
    post = await publish(ctx, "Case 7, no origin")
    target = ctx.blog.object_id(post.uid)
    group = fediverse.add("lemmy.example", "community", key_index=0)
    carol = fediverse.add("origin.example", "carol", key_index=1)
    invented = carol.note(6, target, "Carol never wrote this")  # the origin answers 404
    before = state(ctx)

    activity = lemmy_announce(group, invented, 3)
    assert (await deliver(web, ctx, group, activity)).status_code == 202

    status, error = outcome(ctx, activity["id"])
    assert status == "failed"
    assert error is not None
    assert "cannot fetch" in error
    assert fediverse.asked(invented["id"]) == 1
    assert state(ctx) == before
    assert contents(await page_of(web, post)) == []


async def test_attack_7_origin_whose_author_is_elsewhere_is_rejected(
    web: httpx.AsyncClient, ctx: Services, fediverse: Fediverse
) -> None:
    post = await publish(ctx, "Case 7, wrong author")
    target = ctx.blog.object_id(post.uid)
    group = fediverse.add("lemmy.example", "community", key_index=0)
    carol = fediverse.add("origin.example", "carol", key_index=1)
    dave = fediverse.add("third.example", "dave", key_index=2)
    # origin.example serves a note it says dave (on third.example) wrote.
    origin = carol.note(7, target, "Dave's words, hosted by Carol's server", attributedTo=dave.id)
    fediverse.documents[origin["id"]] = origin
    before = state(ctx)

    activity = lemmy_announce(group, origin, 4)
    await deliver(web, ctx, group, activity)

    assert outcome(ctx, activity["id"]) == (
        "failed",
        "the relayed object's author is on another host",
    )
    assert state(ctx) == before


async def test_attack_7_boost_embedding_a_reply_stores_no_comment(
    web: httpx.AsyncClient, ctx: Services, fediverse: Fediverse
) -> None:
    """Announce{Note}: an embedded reply in a boost is never taken as a comment."""
    post = await publish(ctx, "Case 7, boost")
    target = ctx.blog.object_id(post.uid)
    booster = fediverse.add("mastodon.example", "booster", key_index=0)
    carol = fediverse.add("origin.example", "carol", key_index=1)
    embedded = carol.note(8, target, "Slipped in through a boost")
    before = state(ctx)

    await deliver(web, ctx, booster, like(booster, embedded, 1, kind="Announce"))

    assert state(ctx) == before
    assert contents(await page_of(web, post)) == []


# ---- 8, 9: deletes ---------------------------------------------------------------------------


async def test_attack_8_delete_by_another_actor_is_noop(
    web: httpx.AsyncClient, ctx: Services, fediverse: Fediverse
) -> None:
    post = await publish(ctx, "Case 8")
    target = ctx.blog.object_id(post.uid)
    alice = fediverse.add("mastodon.example", "alice", key_index=0)
    eve = fediverse.add("mastodon.example", "eve", key_index=1)  # Alice's own server
    mallory = fediverse.add("evil.example", "mallory", key_index=2)
    legit = alice.note(1, target, "Alice stays")
    await deliver(web, ctx, alice, alice.create(legit))
    before = state(ctx)

    number = 0
    for sender in (eve, mallory):
        for obj in (tombstone(legit["id"]), legit["id"], {**legit, "type": "Note"}):
            number += 1
            activity = delete(sender, obj, number)
            assert (await deliver(web, ctx, sender, activity)).status_code == 202
            assert outcome(ctx, activity["id"])[0] == "done"

    assert state(ctx) == before
    assert contents(await page_of(web, post)) == ["Alice stays"]
    assert await replies_of(web, post) == [legit["id"]]
    assert not await ctx.store.is_tombstoned(legit["id"])

    # Alice herself may delete it (the no-op above was not for want of a working Delete).
    await deliver(web, ctx, alice, delete(alice, tombstone(legit["id"]), 99))
    assert contents(await page_of(web, post)) == []
    assert await ctx.store.is_tombstoned(legit["id"])


async def test_attack_8_delete_by_another_actor_before_the_create_is_noop(
    web: httpx.AsyncClient, ctx: Services, fediverse: Fediverse
) -> None:
    """Eve, on Alice's server, "deletes" a reply of Alice's that has not arrived yet:
    when it arrives, it is shown (only its author's Delete may keep it out)."""
    post = await publish(ctx, "Case 8, early")
    target = ctx.blog.object_id(post.uid)
    alice = fediverse.add("mastodon.example", "alice", key_index=0)
    eve = fediverse.add("mastodon.example", "eve", key_index=1)
    late = alice.note(2, target, "Alice arrives after Eve's delete")

    await deliver(web, ctx, eve, delete(eve, tombstone(late["id"]), 1))
    activity = alice.create(late)
    await deliver(web, ctx, alice, activity)

    assert outcome(ctx, activity["id"]) == ("done", None)
    assert contents(await page_of(web, post)) == ["Alice arrives after Eve's delete"]

    # Eve's Delete does not weaken Alice's own either, whichever comes first.
    for number, order in enumerate(((eve, alice), (alice, eve)), start=3):
        deleted = alice.note(number, target, "Deleted by Alice herself")
        for sender in order:
            await deliver(web, ctx, sender, delete(sender, tombstone(deleted["id"]), number))
        activity = alice.create(deleted)
        await deliver(web, ctx, alice, activity)
        assert outcome(ctx, activity["id"]) == ("failed", "that object was deleted")
    assert contents(await page_of(web, post)) == ["Alice arrives after Eve's delete"]


async def test_attack_9_delete_before_create(
    web: httpx.AsyncClient, ctx: Services, fediverse: Fediverse
) -> None:
    post = await publish(ctx, "Case 9")
    target = ctx.blog.object_id(post.uid)
    alice = fediverse.add("mastodon.example", "alice", key_index=0)
    kept = alice.note(1, target, "An earlier reply")
    await deliver(web, ctx, alice, alice.create(kept))
    crossed = alice.note(2, target, "Deleted before it arrived")

    await deliver(web, ctx, alice, delete(alice, tombstone(crossed["id"]), 1))
    assert await ctx.store.is_tombstoned(crossed["id"])
    before = state(ctx)

    first = alice.create(crossed)
    again = with_id(alice.create(crossed), f"{crossed['id']}/activity-again")
    edit = update(alice, {**crossed, "updated": stamp()}, 1)
    for activity in (first, again):
        assert (await deliver(web, ctx, alice, activity)).status_code == 202
        assert outcome(ctx, activity["id"]) == ("failed", "that object was deleted")
    await deliver(web, ctx, alice, edit)

    assert state(ctx) == before  # tombstone kept, nothing added, the earlier reply intact
    assert contents(await page_of(web, post)) == ["An earlier reply"]
    assert await replies_of(web, post) == [kept["id"]]


# ---- 10: Delete of an actor ----------------------------------------------------------------


async def test_attack_10_delete_actor_cached_key(
    web: httpx.AsyncClient, ctx: Services, fediverse: Fediverse
) -> None:
    post = await publish(ctx, "Case 10")
    target = ctx.blog.object_id(post.uid)
    alice = fediverse.add("mastodon.example", "alice", key_index=0, name="Alice")
    bob = fediverse.add("gts.example", "bob", key_index=1, name="Bob")
    await deliver(web, ctx, alice, follow(ctx, alice))
    await deliver(web, ctx, bob, follow(ctx, bob))
    first = alice.note(1, target, "Alice at the top")
    answer = bob.note(2, first["id"], "Bob answers Alice")
    second = alice.note(3, target, "Alice again")
    for actor, note in ((alice, first), (bob, answer), (alice, second)):
        await deliver(web, ctx, actor, actor.create(note))
    assert await ctx.store.get_follower(alice.id) is not None
    del fediverse.actors[alice.id]  # her account is gone: its URL answers no more
    asked = len(fediverse.requests)

    gone = delete(alice, alice.id, 1)
    assert (await deliver(web, ctx, alice, gone)).status_code == 202

    assert len(fediverse.requests) == asked  # verified with the key we hold
    assert outcome(ctx, gone["id"]) == ("done", None)
    assert await ctx.store.get_follower(alice.id) is None
    assert await ctx.store.get_follower(bob.id) is not None
    page = await page_of(web, post)
    # Bob's answer stays, under a placeholder; Alice's words are gone.
    assert comment_tree(page) == [("This response was deleted.", [("Bob answers Alice", [])])]
    responses = page.select_one("#responses").get_text()
    assert "Alice at the top" not in responses
    assert "Alice again" not in responses
    assert [a.get_text() for a in page.select("#responses .author")] == ["Bob"]
    assert responses_title(page) == "1 Response to “Case 10”"
    assert await replies_of(web, post) == [answer["id"]]

    # The deleted account's key no longer opens the inbox.
    late = alice.create(alice.note(4, target, "Alice after her deletion"))
    assert (await deliver(web, ctx, alice, late)).status_code == 401
    assert "Alice after" not in str(await page_of(web, post))


async def test_attack_10_delete_actor_unknown_actor_fetches_nothing(
    web: httpx.AsyncClient, ctx: Services, fediverse: Fediverse
) -> None:
    post = await publish(ctx, "Case 10, stranger")
    alice = fediverse.add("mastodon.example", "alice", key_index=0)
    await deliver(web, ctx, alice, alice.create(alice.note(1, ctx.blog.object_id(post.uid), "Hi")))
    zed = fediverse.add("unknown.example", "zed", key_index=1)  # fetchable, but never seen
    before = state(ctx)
    asked = len(fediverse.requests)
    inbox_before = await ctx.store.count_inbox()

    response = await deliver(web, ctx, zed, delete(zed, zed.id, 1))

    assert response.status_code == 202
    assert len(fediverse.requests) == asked
    assert fediverse.asked(zed.id) == 0
    assert await ctx.store.count_inbox() == inbox_before  # not even stored
    assert state(ctx) == before


async def test_attack_10_delete_actor_not_object_is_object_delete(
    web: httpx.AsyncClient, ctx: Services, fediverse: Fediverse
) -> None:
    post = await publish(ctx, "Case 10, objects")
    target = ctx.blog.object_id(post.uid)
    alice = fediverse.add("mastodon.example", "alice", key_index=0, name="Alice")
    bob = fediverse.add("gts.example", "bob", key_index=1, name="Bob")
    for actor in (alice, bob):
        await deliver(web, ctx, actor, follow(ctx, actor))
    mine = alice.note(1, target, "Alice's first")
    other = alice.note(2, target, "Alice's second")
    bobs = bob.note(3, target, "Bob's reply")
    for actor, note in ((alice, mine), (alice, other), (bob, bobs)):
        await deliver(web, ctx, actor, actor.create(note))

    # Alice deletes one of her replies: only that reply goes.
    await deliver(web, ctx, alice, delete(alice, tombstone(mine["id"]), 1))
    # Alice names Bob (a Person) as the object: not Bob's deletion, and not hers.
    bob_person = {"id": bob.id, "type": "Person"}
    await deliver(web, ctx, alice, delete(alice, bob_person, 2))
    await deliver(web, ctx, alice, delete(alice, bob.id, 3))

    assert contents(await page_of(web, post)) == ["Alice's second", "Bob's reply"]
    assert await ctx.store.get_follower(alice.id) is not None
    assert await ctx.store.get_follower(bob.id) is not None
    assert set(actor_names(ctx)) >= {alice.id, bob.id}
    assert await ctx.store.get_cached_actor(alice.id) is not None
    assert await ctx.store.get_cached_actor(bob.id) is not None


# ---- 11: updates -----------------------------------------------------------------------------


async def test_attack_11_update_person_of_another_actor(
    web: httpx.AsyncClient, ctx: Services, fediverse: Fediverse
) -> None:
    post = await publish(ctx, "Case 11, people")
    alice = fediverse.add("mastodon.example", "alice", key_index=0, name="Alice")
    mallory = fediverse.add("evil.example", "mallory", key_index=1)
    await deliver(web, ctx, alice, alice.create(alice.note(1, ctx.blog.object_id(post.uid), "Hi")))
    before = actor_names(ctx)
    mallory_key = mallory.document()["publicKey"] | {"id": alice.key_id, "owner": alice.id}

    for number, person in enumerate(
        [
            alice.document() | {"name": "Alice (hacked)"},
            alice.document() | {"name": "Alice (hacked)", "publicKey": mallory_key},
            mallory.document() | {"id": alice.id, "name": "Alice (hacked)"},
        ],
        start=1,
    ):
        activity = update(mallory, person, number)
        assert (await deliver(web, ctx, mallory, activity)).status_code == 202

    assert actor_names(ctx)[alice.id] == before[alice.id] == ("Alice", "alice")
    page = await page_of(web, post)
    assert [a.get_text() for a in page.select("#responses .author")] == ["Alice"]
    # Alice's key still verifies her: nothing replaced it.
    ok = alice.create(alice.note(2, ctx.blog.object_id(post.uid), "Still me"))
    assert (await deliver(web, ctx, alice, ok)).status_code == 202

    # Alice may update herself (so the refusals above were not for want of a handler).
    await deliver(web, ctx, alice, update(alice, alice.document() | {"name": "Alice B."}, 9))
    page = await page_of(web, post)
    assert [a.get_text() for a in page.select("#responses .author")] == ["Alice B."] * 2


async def test_attack_11_update_note_by_non_author(
    web: httpx.AsyncClient, ctx: Services, fediverse: Fediverse
) -> None:
    post = await publish(ctx, "Case 11, notes")
    alice = fediverse.add("mastodon.example", "alice", key_index=0)
    bob = fediverse.add("mastodon.example", "bob", key_index=1)  # same server
    mallory = fediverse.add("evil.example", "mallory", key_index=2)
    legit = alice.note(1, ctx.blog.object_id(post.uid), "Alice's words")
    await deliver(web, ctx, alice, alice.create(legit))
    before = state(ctx)
    newer = stamp(timedelta(seconds=-1))

    attempts = [
        (bob, {**legit, "attributedTo": bob.id}),  # claims it as his own
        (bob, legit),  # in Alice's name
        (mallory, {**legit, "attributedTo": mallory.id}),
    ]
    for number, (sender, note) in enumerate(attempts, start=1):
        edit = {**note, "content": "<p>Rewritten</p>", "updated": newer}
        assert (await deliver(web, ctx, sender, update(sender, edit, number))).status_code == 202

    assert state(ctx) == before
    page = await page_of(web, post)
    assert contents(page) == ["Alice's words"]
    assert page.select(".edited") == []


async def test_attack_11_update_changing_published(
    web: httpx.AsyncClient, ctx: Services, fediverse: Fediverse
) -> None:
    post = await publish(ctx, "Case 11, time")
    alice = fediverse.add("mastodon.example", "alice", key_index=0)
    legit = alice.note(1, ctx.blog.object_id(post.uid), "As first written")
    await deliver(web, ctx, alice, alice.create(legit))
    before = state(ctx)

    moved = {**legit, "published": "2020-01-01T00:00:00Z", "updated": stamp()}
    older = {**legit, "updated": "2026-01-01T00:00:00Z"}  # before it was published
    no_date = {key: value for key, value in legit.items() if key != "updated"}
    for number, note in enumerate((moved, older, no_date), start=1):
        edit = {**note, "content": "<p>Rewritten history</p>"}
        await deliver(web, ctx, alice, update(alice, edit, number))

    assert state(ctx) == before
    assert contents(await page_of(web, post)) == ["As first written"]

    # A real edit (same published, newer updated) is applied and marked.
    edit = {**legit, "content": "<p>Edited properly</p>", "updated": stamp()}
    await deliver(web, ctx, alice, update(alice, edit, 9))
    page = await page_of(web, post)
    assert contents(page) == ["Edited properly"]
    assert len(page.select(".edited")) == 1
    assert page.select_one("#responses time.dt-published")["datetime"] == legit["published"]


async def test_attack_11_update_of_a_reply_dated_a_little_ahead_still_applies(
    web: httpx.AsyncClient, ctx: Services, fediverse: Fediverse
) -> None:
    """A sender's clock a few seconds fast: the reply is stored as "now", and its
    author's edits, which repeat the original ``published``, are not a move in time."""
    post = await publish(ctx, "Case 11, clock skew")
    alice = fediverse.add("mastodon.example", "alice", key_index=0)
    ahead = stamp(timedelta(seconds=30))
    legit = alice.note(1, ctx.blog.object_id(post.uid), "From a fast clock", published=ahead)
    await deliver(web, ctx, alice, alice.create(legit))

    edit = {**legit, "content": "<p>Fixed a typo</p>", "updated": stamp(timedelta(seconds=40))}
    await deliver(web, ctx, alice, update(alice, edit, 1))
    assert contents(await page_of(web, post)) == ["Fixed a typo"]

    # Moving it in time is still refused.
    moved = {**legit, "published": "2020-01-01T00:00:00Z", "updated": stamp(timedelta(minutes=1))}
    await deliver(web, ctx, alice, update(alice, {**moved, "content": "<p>Moved</p>"}, 2))
    assert contents(await page_of(web, post)) == ["Fixed a typo"]


# ---- 12: undo ---------------------------------------------------------------------------------


async def test_attack_12_undo_someone_elses_like(
    web: httpx.AsyncClient, ctx: Services, fediverse: Fediverse
) -> None:
    post = await publish(ctx, "Case 12")
    target = ctx.blog.object_id(post.uid)
    alice = fediverse.add("mastodon.example", "alice", key_index=0)
    mallory = fediverse.add("evil.example", "mallory", key_index=1)
    alice_like = like(alice, target, 1)
    alice_boost = like(alice, target, 1, kind="Announce")
    await deliver(web, ctx, alice, alice_like)
    await deliver(web, ctx, alice, alice_boost)
    before = state(ctx)
    assert len(before["reactions"]) == 2

    attempts: list[Any] = [
        alice_like,  # embedded, Alice's
        alice_boost,
        alice_like["id"],  # bare ids of Alice's activities
        alice_boost["id"],
        {**alice_like, "actor": mallory.id},  # "mine", but it names Alice's Like id
        {**alice_boost, "actor": {"id": alice.id, "type": "Person"}},
    ]
    for number, inner in enumerate(attempts, start=10):
        assert (await deliver(web, ctx, mallory, undo(mallory, inner, number))).status_code == 202

    assert state(ctx) == before
    page = await page_of(web, post)
    rows = [p.select_one(".reaction-count").get_text() for p in page.select(".reaction-row")]
    assert rows == ["1 like", "1 boost"]
    assert len(page.select(".reactions a[title*='@alice@mastodon.example']")) == 2

    # Alice's own Undo works.
    await deliver(web, ctx, alice, undo(alice, alice_like, 1))
    page = await page_of(web, post)
    rows = [p.select_one(".reaction-count").get_text() for p in page.select(".reaction-row")]
    assert rows == ["1 boost"]


async def test_attack_12_undo_someone_elses_follow(
    web: httpx.AsyncClient, ctx: Services, fediverse: Fediverse
) -> None:
    alice = fediverse.add("mastodon.example", "alice", key_index=0)
    mallory = fediverse.add("evil.example", "mallory", key_index=1)
    alice_follow = follow(ctx, alice)
    await deliver(web, ctx, alice, alice_follow)
    before = state(ctx)
    assert len(before["followers"]) == 1

    for number, inner in enumerate(
        [alice_follow, alice_follow["id"], {**alice_follow, "actor": {"id": alice.id}}], start=1
    ):
        assert (await deliver(web, ctx, mallory, undo(mallory, inner, number))).status_code == 202

    assert state(ctx) == before
    follower = await ctx.store.get_follower(alice.id)
    assert follower is not None
    assert follower.status == "accepted"
    await deliver(web, ctx, alice, undo(alice, alice_follow, 1))
    assert await ctx.store.get_follower(alice.id) is None


# ---- 28: chains and cycles -----------------------------------------------------------------


def nesting_depth(page: BeautifulSoup) -> int:
    return max(
        (len(li.find_parents("li", class_="comment")) + 1 for li in page.select("li.comment")),
        default=0,
    )


async def test_attack_28_reply_chains_and_cycles(
    web: httpx.AsyncClient, ctx: Services, fediverse: Fediverse
) -> None:
    post = await publish(ctx, "Case 28")
    people = [fediverse.add(f"s{i}.example", f"user{i}", key_index=i) for i in range(3)]
    parent = ctx.blog.object_id(post.uid)
    chain: list[str] = []
    for number in range(50):
        actor = people[number % 3]
        note = actor.note(number, parent, f"Reply number {number}")
        assert (await deliver(web, ctx, actor, actor.create(note))).status_code == 202
        parent = note["id"]
        chain.append(parent)

    page = await page_of(web, post)
    assert contents(page) == [f"Reply number {n}" for n in range(50)]
    assert nesting_depth(page) == MAX_DEPTH  # deeper replies join the last level
    assert responses_title(page) == "50 Responses to “Case 28”"
    assert await replies_of(web, post) == chain
    assert [fediverse.asked(note_id) for note_id in chain] == [0] * 50  # nothing walked

    # Cycles: X answers Y, Y answers X, Z answers itself; none is under our post.
    x_id, y_id = f"{people[0].id}/statuses/900", f"{people[1].id}/statuses/901"
    x = people[0].note(900, y_id, "X in a cycle")
    y = people[1].note(901, x_id, "Y in a cycle")
    z = people[2].note(902, f"{people[2].id}/statuses/902", "Z answers itself")
    before = state(ctx)
    for actor, note in ((people[0], x), (people[1], y), (people[2], z)):
        activity = actor.create(note)
        assert (await deliver(web, ctx, actor, activity)).status_code == 202
        assert outcome(ctx, activity["id"]) == ("done", None)
    assert state(ctx) == before
    assert [fediverse.asked(i) for i in (x_id, y_id, z["id"])] == [0, 0, 0]


async def test_attack_28_cycle_in_stored_parents_cannot_hang_rendering(
    web: httpx.AsyncClient, ctx: Services
) -> None:
    """Whatever the database says (a bug, a hand edit), rendering terminates."""
    post = await publish(ctx, "Case 28, stored")
    author = await remote_actor(ctx, "loop", "loop.example")
    first = await remote_comment(ctx, post, author, "First of the loop", minutes=1)
    second = await remote_comment(ctx, post, author, "Second", minutes=2, parent=first)
    third = await remote_comment(ctx, post, author, "Third", minutes=3, parent=second)
    selfish = await remote_comment(ctx, post, author, "Its own parent", minutes=4)
    deep = first
    for number in range(300):
        deep = await remote_comment(ctx, post, author, f"Deep {number}", minutes=5, parent=deep)
    dbpeek.execute(
        ctx.settings,
        ("UPDATE comments SET parent_id = ? WHERE id = ?", (third, first)),
        ("UPDATE comments SET parent_id = ? WHERE id = ?", (selfish, selfish)),
    )

    page = await page_of(web, post)

    shown = contents(page)
    for number in (2, 3, 4):  # 100 responses a page (FEDIBLOG_RESPONSES_PER_PAGE)
        later = await web.get(f"/posts/{post.slug}?responses={number}")
        assert later.status_code == 200
        shown += contents(soup(later.text))
        assert nesting_depth(soup(later.text)) <= MAX_DEPTH
    assert len(shown) == 304
    assert {"First of the loop", "Second", "Third", "Its own parent"} <= set(shown)
    assert nesting_depth(page) <= MAX_DEPTH
    assert responses_title(page) == "304 Responses to “Case 28, stored”"


# ---- 31: HTML and script everywhere ------------------------------------------------------------

FORBIDDEN_TAGS = frozenset(
    {"script", "style", "iframe", "frame", "frameset", "object", "embed", "applet", "svg",
     "math", "base", "link", "meta", "form", "input", "textarea", "button", "select",
     "template", "noscript", "video", "audio", "source", "canvas", "marquee"}
)  # fmt: skip
URL_ATTRIBUTES = frozenset(
    {"href", "src", "action", "formaction", "srcset", "poster", "data", "cite", "background",
     "xlink:href", "ping", "longdesc", "usemap"}
)  # fmt: skip
# Control characters (but tab and newlines), bidi controls, zero-width and invisible fillers.
INVISIBLE = re.compile(
    "[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\u00ad\u034f\u061c\u115f\u1160\u17b4\u17b5\u180e"
    "\u200b-\u200f\u202a-\u202e\u2060-\u206f\u3164\ufeff\uffa0]"
)
HOSTILE_SCHEMES = ("javascript:", "data:", "vbscript:", "file:")


def attribute_values(value: Any) -> list[str]:
    return [str(v) for v in value] if isinstance(value, list) else [str(value)]


OUR_LINK_CLASSES = frozenset({"comment-number", "comment-reply"})


def is_our_link(element: Tag, url: str) -> bool:
    """A response's permalink or Reply link, or a link to a page of responses: the page's
    own, on this blog (sanitized content keeps no class of ours and no relative link)."""
    if element.name != "a" or not url.startswith("/posts/"):
        return False
    pager = element.find_parent("nav", class_="responses-pages")
    return pager is not None or bool(OUR_LINK_CLASSES & set(element.get("class") or []))


def assert_inert(section: Tag) -> None:
    """Nothing in ``section`` (untrusted content) can run, restyle, post or hide."""
    for element in section.find_all(True):
        assert element.name not in FORBIDDEN_TAGS, element
        for name, value in element.attrs.items():
            assert not name.lower().startswith("on"), element
            assert name.lower() != "style", element
            for text in attribute_values(value):
                assert not INVISIBLE.search(text), (element.name, name, text)
                if name.lower() in URL_ATTRIBUTES and not is_our_link(element, text):
                    # Images: ours, or remote ones through the media proxy (proxy.py).
                    assert text.startswith(("https://", "/static/", "/proxy/", "#comment-")), (
                        name,
                        text,
                    )
        if element.name == "a" and str(element.get("href", "")).startswith("https://"):
            assert {"nofollow", "ugc", "noopener"} <= set(element["rel"]), element
    for text in section.find_all(string=True):
        assert not INVISIBLE.search(text), repr(text)


def assert_page_inert(html: str, post: Post) -> BeautifulSoup:
    """The whole page: no script anywhere, no handler, no hostile URL, nothing invisible."""
    page = soup(html)
    hidden = INVISIBLE.search(html)
    assert hidden is None, html[hidden.start() - 200 : hidden.end() + 40]
    assert page.find_all(["script", "style", "iframe", "object", "embed", "svg", "base"]) == []
    for element in page.find_all(True):
        for name, value in element.attrs.items():
            assert not name.lower().startswith("on"), element
            for text in attribute_values(value):
                assert not text.strip().lower().startswith(HOSTILE_SCHEMES), (element, name)
    # The only forms are our own two.
    assert [form["action"] for form in page.find_all("form")] == [
        f"/posts/{post.slug}/interact",
        f"/posts/{post.slug}/comment",
    ]
    for selector in ("#responses", ".reactions"):
        section = page.select_one(selector)
        if section is not None:
            assert_inert(section)
    return page


HOSTILE_CONTENT = (
    '<p onclick="alert(1)" style="color:red">Hello <script>alert("content")</script>'
    "<style>body{display:none}</style>"
    '<iframe src="https://evil.example/frame"></iframe><object data="x.swf"></object>'
    '<embed src="x.swf"><form action="https://evil.example/"><input name="q"><button>go'
    "</button></form>"
    '<a href="javascript:alert(1)">js link</a> <a href="data:text/html;base64,PHNjcmlwdD4=">'
    'data link</a> <a href="vbscript:msgbox(1)">vb link</a> <a href="  JaVaScRiPt:alert(1)">'
    'spaced</a> <a href="java&#x09;script:alert(1)">tabbed</a> '
    '<a href="https://ok.example/page" onmouseover="alert(1)" target="_top" rel="opener">'
    "fine link</a>"
    '<img src="https://evil.example/x.png" onerror="alert(1)"><svg onload="alert(1)">'
    '<circle r="1"/></svg><math><mi xlink:href="javascript:alert(1)">m</mi></math>'
    '<meta http-equiv="refresh" content="0;url=https://evil.example/">'
    '<base href="https://evil.example/"><link rel="stylesheet" href="https://evil.example/c">'
    '<video src="https://evil.example/v.mp4" poster="javascript:alert(1)"></video>'
    "<!-- a comment --> <b>bold</b></p>"
)


def hostile_actor(fediverse: Fediverse, key_index: int) -> RemoteActor:
    mallory = fediverse.add("evil.example", "mallory", key_index=key_index)
    mallory.document_overrides.update(
        {
            "name": '<script>alert("name")</script><img src=x onerror=alert(1)>Mallory',
            "summary": '<script>alert("bio")</script><iframe src="javascript:alert(1)">',
            "url": "javascript:alert(1)",
            "icon": {"type": "Image", "url": "javascript:alert(1)"},
            "attachment": [
                {
                    "type": "PropertyValue",
                    "name": "<script>alert('field')</script>",
                    "value": '<a href="javascript:alert(1)">site</a>',
                }
            ],
        }
    )
    return mallory


HOSTILE_ATTACHMENTS = [
    {
        "type": "Document",
        "mediaType": "image/png",
        "url": "https://evil.example/a.png",
        "name": '"><script>alert("alt")</script><img src=x onerror=alert(1)>',
    },
    {"type": "Document", "mediaType": "image/png", "url": "javascript:alert(1)", "name": "js"},
    {"type": "Document", "mediaType": "video/mp4", "url": "data:video/mp4;base64,AAAA"},
    {"type": "Image", "url": {"type": "Link", "href": "vbscript:msgbox(1)"}, "name": "vb"},
    {
        "type": "Document",
        "mediaType": "application/pdf",
        "url": "https://evil.example/f.pdf",
        "name": "<b onclick=alert(1)>doc</b>",
    },
]


async def test_attack_31_html_everywhere(
    web: httpx.AsyncClient, ctx: Services, fediverse: Fediverse
) -> None:
    post = await publish(ctx, "Case 31")
    mallory = hostile_actor(fediverse, 0)
    note = mallory.note(
        1,
        ctx.blog.object_id(post.uid),
        "",
        content=HOSTILE_CONTENT,
        summary='<b onmouseover="alert(1)">CW</b><script>alert("cw")</script>',
        sensitive=True,
        attachment=HOSTILE_ATTACHMENTS,
        url="javascript:alert(1)",
    )
    await deliver(web, ctx, mallory, mallory.create(note))
    await deliver(web, ctx, mallory, like(mallory, ctx.blog.object_id(post.uid)))

    response = await web.get(f"/posts/{post.slug}")
    page = assert_page_inert(response.text, post)
    [comment] = page.select("#responses li.comment")

    body = comment.select_one(".e-content")
    written = body.find("p")  # the content; attachments follow in their own paragraph
    assert "alert" not in written.get_text()
    assert "Hello" in written.get_text()
    assert body.find("b").get_text() == "bold"
    fine = body.find("a", href="https://ok.example/page")
    assert fine is not None
    assert set(fine["rel"]) == {"nofollow", "ugc", "noopener"}
    assert "target" not in fine.attrs
    links = {a.get_text(): a.get("href") for a in body.find_all("a")}
    for label in ("js link", "data link", "vb link", "spaced", "tabbed"):
        assert links[label] is None  # the text stays, the link does not
    # Only http(s) attachments, alt text as text.
    assert [img["src"] for img in body.find_all("img")] == [
        ctx.proxy.local_url("https://evil.example/a.png")
    ]
    assert body.find("img")["alt"].startswith('"><script>')
    pdf = body.find("a", href="https://evil.example/f.pdf")
    assert pdf is not None
    assert pdf.find_all(True) == []
    # The content warning is plain text in a <summary>.
    warning = comment.select_one("details.content-warning > summary")
    assert warning is not None
    assert warning.find_all(True) == []
    assert warning.get_text().startswith('<b onmouseover="alert(1)">CW</b>')
    # The actor's name is text; its javascript: url and icon are dropped; bio and
    # profile fields are shown nowhere.
    author = comment.select_one(".author")
    assert author.find_all(True) == []
    assert author.get_text().startswith('<script>alert("name")</script>')
    assert author["href"] == mallory.id
    assert comment.select_one("img.avatar")["src"] == "/static/avatar.svg"
    assert comment.select_one("a.date")["href"] == note["id"]
    assert "bio" not in response.text
    assert "field" not in response.text
    reactor = page.select_one(".reactions a")
    assert reactor["href"] == mallory.id
    assert reactor.img["src"] == "/static/avatar.svg"


async def test_attack_31_stuffed_comment_page_parsed_nothing_survives(
    web: httpx.AsyncClient, ctx: Services, fediverse: Fediverse
) -> None:
    """The issue's check: script, event handlers, javascript: links, bidi and zero-width
    characters in every field a comment has, from the fediverse and from the form;
    the page is parsed and every element, attribute and text node inspected."""
    post = await publish(ctx, "Stuffed")
    target = ctx.blog.object_id(post.uid)
    stuffing = "\u202e\u2066\u200b\u200c\u200d\u2060\ufeff\u061c\u3164\u00ad\x07"
    mallory = hostile_actor(fediverse, 0)
    mallory.document_overrides["name"] = f"{stuffing}<script>alert(1)</script>Mal{stuffing}lory"
    mallory.document_overrides["preferredUsername"] = f"mal{stuffing}lory"
    note = mallory.note(
        1,
        target,
        "",
        content=f"<p>{stuffing}:blob:</p>{HOSTILE_CONTENT}<p>rev{stuffing}ersed</p>",
        summary=f"{stuffing}<script>alert(2)</script>Warning{stuffing}",
        attachment=[
            {"type": "Image", "url": "https://evil.example/i.png", "name": f"alt{stuffing}"}
        ],
        url=f"https://evil.example/@mallory/1{stuffing}",
        tag=[
            {
                "type": "Emoji",
                "name": ":blob:",
                "icon": {"url": f"https://evil.example/blob.png{stuffing}"},
            }
        ],
    )
    await deliver(web, ctx, mallory, mallory.create(note))
    link = f"<a href='https://evil.example/'>https://bank{stuffing}.example</a>"
    reply = mallory.note(2, note["id"], link)
    await deliver(web, ctx, mallory, mallory.create(reply))
    await deliver(web, ctx, mallory, like(mallory, target))
    form = {
        "name": f"{stuffing}<script>alert(3)</script>Local{stuffing}",
        "email": "stuffed@mail.example",
        "website": "https://local.example/",
        "comment": f"<img src=x onerror=alert(4)>{stuffing}<a href='javascript:alert(5)'>x</a>",
    }
    assert (await web.post(f"/posts/{post.slug}/comment", data=form)).status_code == 303
    for row in await ctx.store.list_comments_for_review(pending_only=True):
        await ctx.store.set_comment_status(row.id, "published")

    response = await web.get(f"/posts/{post.slug}")

    page = assert_page_inert(response.text, post)
    assert len(page.select("#responses li.comment")) == 3
    assert "Local" in page.select("#responses .author")[-1].get_text()
    assert "rev" + "ersed" in page.select_one("#responses").get_text()
    assert page.select("img.emoji") == []  # its icon URL hid characters: refused
    assert "Mallory" in page.select_one("#responses .author").get_text()
    for selector in ("#responses", ".reactions"):
        section = page.select_one(selector)
        assert section is not None
        for element in section.find_all(True):
            assert element.name not in FORBIDDEN_TAGS
        for text in section.find_all(string=True):
            assert not INVISIBLE.search(text)


# ---- 32: custom emoji ---------------------------------------------------------------------------


def emoji(name: str, url: str) -> dict[str, Any]:
    return {"type": "Emoji", "name": name, "icon": {"type": "Image", "url": url}}


async def test_attack_32_emoji_only_in_text_nodes(
    web: httpx.AsyncClient, ctx: Services, fediverse: Fediverse
) -> None:
    post = await publish(ctx, "Case 32")
    target = ctx.blog.object_id(post.uid)
    alice = fediverse.add("mastodon.example", "alice", key_index=0, name="Alice :blob:")
    bob = fediverse.add("gts.example", "bob", key_index=1)
    carol = fediverse.add("misskey.example", "carol", key_index=2)
    blob = "https://mastodon.example/emoji/blob.png"
    first = alice.note(
        1,
        target,
        "",
        content=(
            "<p>Hi :blob: and :blob_cat: and :bl-ob: and :nope: and :evil:</p>"
            '<p><a href="https://x.example/:blob:" title=":blob:">:blob: link</a>'
            ' <span title=":blob:">plain</span></p>'
        ),
        summary="CW :blob:",
        tag=[
            emoji(":blob:", blob),
            emoji(":blob_cat:", "http://mastodon.example/emoji/cat.png"),  # not https
            emoji(":bl-ob:", "https://mastodon.example/emoji/dash.png"),  # not [A-Za-z0-9_]
            emoji(':evil" onerror="alert(1):', "https://mastodon.example/emoji/e.png"),
            emoji(":nope:", "javascript:alert(1)"),
            emoji(":nope:", "data:image/png;base64,AAAA"),
        ],
    )
    second = bob.note(2, target, "Me too :blob:")  # no emoji of its own
    third = carol.note(
        3, target, "Mine :blob:", tag=[emoji("blob", "https://misskey.example/emoji/b.png")]
    )
    for actor, note in ((alice, first), (bob, second), (carol, third)):
        await deliver(web, ctx, actor, actor.create(note))

    page = await page_of(web, post)
    alices, bobs, carols = page.select("#responses li.comment")

    body = alices.select_one(".e-content")
    images = body.select("img.emoji")
    proxied_blob = ctx.proxy.local_url(blob)
    assert [(img["src"], img["alt"]) for img in images] == [(proxied_blob, ":blob:")] * 2
    assert images[1].parent.name == "a"  # the one in the link's text, not its title
    link = body.find("a", href="https://x.example/:blob:")
    assert link is not None
    assert link["title"] == ":blob:"
    assert body.find("span", title=":blob:").get_text() == "plain"
    text = body.get_text()
    for shortcode in (":blob_cat:", ":bl-ob:", ":nope:", ":evil:"):
        assert shortcode in text
    assert body.find_all("img", class_="emoji", src=re.compile("^(?!/proxy/)")) == []
    # Not in the content warning, nor in the author's name.
    assert alices.select_one("details > summary").find_all(True) == []
    assert alices.select_one(".author").get_text() == "Alice :blob:"
    # Bob's :blob: is Bob's text; Carol's is Carol's own emoji.
    assert bobs.select("img") == bobs.select("img.avatar")
    assert "Me too :blob:" in bobs.select_one(".e-content").get_text()
    assert [img["src"] for img in carols.select(".e-content img.emoji")] == [
        ctx.proxy.local_url("https://misskey.example/emoji/b.png")
    ]


@asynccontextmanager
async def app_with(
    tmp_path: Path, fediverse: Fediverse, **overrides: Any
) -> AsyncIterator[tuple[httpx.AsyncClient, Services]]:
    """The app with other settings than the ``fed_app`` fixture's."""
    settings = make_settings(tmp_path, **overrides)
    async with running(settings, transport=fediverse.transport(), run_workers=False) as app:
        services: Services = app.state.services
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url=BASE_URL) as client:
            yield client, services


async def test_attack_32_icon_scheme_checked_even_with_http_allowed(
    tmp_path: Path, fediverse: Fediverse
) -> None:
    async with app_with(tmp_path, fediverse, allow_http=True) as (web, ctx):
        post = await publish(ctx, "Case 32, http allowed")
        alice = fediverse.add("mastodon.example", "alice", key_index=0)
        note = alice.note(
            1,
            ctx.blog.object_id(post.uid),
            "A :a: B :b: C :c: D :d:",
            tag=[
                emoji(":a:", "javascript:alert(1)"),
                emoji(":b:", "data:image/svg+xml;base64,PHN2Zz4="),
                emoji(":c:", "http://mastodon.example/c.png"),
                emoji(":d:", "file:///etc/passwd"),
            ],
        )
        await deliver(web, ctx, alice, alice.create(note))

        page = await page_of(web, post)

    images = page.select("#responses img.emoji")
    assert [(img["alt"], img["src"]) for img in images] == [
        (":c:", ctx.proxy.local_url("http://mastodon.example/c.png"))
    ]
    assert "A :a: B :b: C" in page.select_one("#responses .e-content").get_text()


# ---- 33: links that lie about where they go -----------------------------------------------------


@pytest.mark.parametrize(
    ("anchor", "shown"),
    [
        ('<a href="https://evil.example/login">https://bank.example/login</a>', "evil.example"),
        ('<a href="https://evil.example/">bank.example</a>', "evil.example"),
        (
            '<a href="https://evil.example/x"><span class="invisible">https://</span>'
            '<span class="ellipsis">bank.example/x</span></a>',
            "evil.example",
        ),
        ('<a href="https://evil.example/">https://b\u0430nk.example/</a>', "evil.example"),
        ('<a href="https://evil.example/">https://bank\u200b.example/</a>', "evil.example"),
        (
            '<a href="https://bank.example@evil.example/">https://bank.example@evil.example/</a>',
            "evil.example",
        ),
        ('<a href="https://evil.example/">Log in at bank.example today</a>', "evil.example"),
        ('<a href="https://evil.example/">bank.example\u3002com</a>', "evil.example"),
        ('<a href="javascript:alert(1)">https://bank.example/</a>', "no link"),
        # Honest links show nothing more.
        ('<a href="https://bank.example/login">https://bank.example/login</a>', None),
        ('<a href="https://www.bank.example/">bank.example</a>', None),
        ('<a href="https://docs.example/a/setup.py">https://docs.example/a/setup.py</a>', None),
        ('<a href="https://x.example/@bob" class="u-url mention">@<span>bob</span></a>', None),
        ('<a href="https://b\u00fccher.example/">https://b\u00fccher.example/</a>', None),
        ('<a href="https://evil.example/">my blog</a>', None),
    ],
)
def test_attack_33_deceptive_link_shows_real_host(anchor: str, shown: str | None) -> None:
    page = soup(sanitize_remote_html(f"<p>{anchor}</p>"))

    hosts = [span.get_text() for span in page.select("span.link-host")]

    assert hosts == ([f"[{shown}]"] if shown else [])


async def test_attack_33_deceptive_link_on_the_page(
    web: httpx.AsyncClient, ctx: Services, fediverse: Fediverse
) -> None:
    post = await publish(ctx, "Case 33")
    mallory = fediverse.add("evil.example", "mallory", key_index=0)
    note = mallory.note(
        1,
        ctx.blog.object_id(post.uid),
        'Your <a href="https://evil.example/steal">https://bank.example/account</a> is locked',
    )
    await deliver(web, ctx, mallory, mallory.create(note))

    page = await page_of(web, post)

    link = page.select_one("#responses .e-content a")
    assert link["href"] == "https://evil.example/steal"
    assert link.find_next_sibling("span", class_="link-host").get_text() == "[evil.example]"


# ---- 34: names that lie ----------------------------------------------------------------------


async def test_attack_34_homoglyph_bidi_zero_width_names(
    web: httpx.AsyncClient, ctx: Services, fediverse: Fediverse
) -> None:
    post = await publish(ctx, "Case 34")
    target = ctx.blog.object_id(post.uid)
    long_name = (
        "\u202enimda\u202c \u2066x\u2069 "
        + "\u200bA\u200d" * 150
        + "\x07\x1b[31m"
        + "   padded    name   "
    )
    cases = [
        (fediverse.add("evil.example", "mallory", key_index=0, name=long_name), None),
        (fediverse.add("evil2.example", "admin", key_index=1, name="admin@blog.example"), None),
        (
            fediverse.add("blank.example", "blank", key_index=2, name="\u200b\u3164\u061c\ufeff"),
            None,
        ),
        (fediverse.add("xn--80ak6aa92e.com", "support", key_index=3, name="\u0410pple"), None),
        (fediverse.add("padded.example", "pad", key_index=4, name="   \t Pat \n\n  Doe  "), None),
    ]
    for number, (actor, _) in enumerate(cases, start=1):
        await deliver(web, ctx, actor, actor.create(actor.note(number, target, f"Note {number}")))

    page = await page_of(web, post)
    comments = page.select("#responses li.comment")
    names = [c.select_one(".author").get_text() for c in comments]
    handles = [c.select_one(".handle").get_text() for c in comments]

    assert handles == [
        "@mallory@evil.example",
        "@admin@evil2.example",
        "@blank@blank.example",
        "@support@xn--80ak6aa92e.com",
        "@pad@padded.example",
    ]
    for name in names:
        assert not INVISIBLE.search(name)
        assert len(name) <= 100
        assert name == " ".join(name.split())  # no padding, no runs of spaces
    assert names[0].startswith("nimda x AAAA")
    assert names[1] == "admin@blog.example"  # shown as a name, never as the handle
    assert names[2] == "blank"  # nothing visible left: the username stands in
    assert names[4] == "Pat Doe"
    # The handle's host is always the host of the actor id the author link goes to.
    for comment, handle in zip(comments, handles, strict=True):
        href = comment.select_one(".handle")["href"]
        assert handle.rsplit("@", 1)[1] == httpx.URL(str(href)).raw_host.decode()


async def test_attack_34_idn_actor_id_shows_the_punycode_host(
    web: httpx.AsyncClient, ctx: Services, fediverse: Fediverse
) -> None:
    """An id written with a Unicode host (Cyrillic letters that read as "apple.com") is
    the same URL as its punycode form: the handle shows the punycode."""
    post = await publish(ctx, "Case 34, IDN")
    homoglyph = "\u0430\u0440\u0440\u04cf\u0435.com"
    ascii_host = homoglyph.encode("idna").decode()
    # A signature's keyId is ASCII (it is a header), but a community relays the reply
    # and its author is then fetched by the id the JSON names.
    group = fediverse.add("lemmy.example", "community", key_index=0)
    support = fediverse.add(homoglyph, "support", key_index=1, name="Support")
    fediverse.actors[f"https://{ascii_host}/users/support"] = support  # as requested
    note = support.note(1, ctx.blog.object_id(post.uid), "We noticed a problem")
    fediverse.documents[f"https://{ascii_host}/users/support/statuses/1"] = note

    activity = lemmy_announce(group, note, 1)
    assert (await deliver(web, ctx, group, activity)).status_code == 202
    assert outcome(ctx, activity["id"]) == ("done", None)

    page = await page_of(web, post)
    assert contents(page) == ["We noticed a problem"]
    assert [h.get_text() for h in page.select(".handle")] == [f"@support@{ascii_host}"]


@pytest.mark.parametrize(
    ("username", "handle"),
    [
        ("admin@blog.example", None),  # would read "@admin@blog.example@evil.example"
        ("admin blog.example", None),
        ("admin\tx", None),
        ("\u202eadmin", "@admin@evil.example"),
        ("ad\u200bmin\u2066", "@admin@evil.example"),
    ],
)
async def test_attack_34_username_cannot_forge_a_handle(
    web: httpx.AsyncClient, ctx: Services, fediverse: Fediverse, username: str, handle: str | None
) -> None:
    post = await publish(ctx, "Case 34, usernames")
    mallory = fediverse.add("evil.example", "mallory", key_index=0)
    mallory.document_overrides["preferredUsername"] = username
    before = state(ctx)

    response = await deliver(
        web, ctx, mallory, mallory.create(mallory.note(1, ctx.blog.object_id(post.uid), "Hi"))
    )

    handles = [h.get_text() for h in (await page_of(web, post)).select(".handle")]
    if handle is None:  # an actor no server could address: refused, nothing shown
        assert response.status_code == 401
        assert response.text == "401: the signing key is not a valid key document\n"
        assert state(ctx) == before
        assert handles == []
    else:
        assert response.status_code == 202
        assert handles == [handle]


# ---- 36: what is not public stays so ----------------------------------------------------------


async def test_attack_36_followers_only_and_direct_never_public(
    web: httpx.AsyncClient, ctx: Services, fediverse: Fediverse
) -> None:
    post = await publish(ctx, "Case 36")
    target = ctx.blog.object_id(post.uid)
    alice = fediverse.add("mastodon.example", "alice", key_index=0)
    bob = fediverse.add("gts.example", "bob", key_index=1)
    await deliver(web, ctx, alice, follow(ctx, alice))
    followers = f"{alice.id}/followers"
    public = alice.note(1, target, "Public reply")
    unlisted = alice.note(2, target, "Unlisted reply", to=[followers], cc=[AS_PUBLIC])
    private = alice.note(3, target, "SECRET-F for followers", to=[followers], cc=[ctx.urls.actor])
    direct = alice.note(4, target, "SECRET-D for the blog", to=[ctx.urls.actor], cc=[])
    single = bob.note(5, target, "SECRET-G single values", to=ctx.urls.actor, cc=ctx.urls.actor)
    answer = bob.note(6, private["id"], "Public answer to a hidden reply")
    wrapped = alice.create(alice.note(7, target, "SECRET-W public wrapper", to=[followers], cc=[]))
    wrapped["to"], wrapped["cc"] = [AS_PUBLIC], [AS_PUBLIC]  # the object's audience decides
    for actor, activity in (
        (alice, alice.create(public)),
        (alice, alice.create(unlisted)),
        (alice, alice.create(private)),
        (alice, alice.create(direct)),
        (bob, bob.create(single)),
        (bob, bob.create(answer)),
        (alice, wrapped),
    ):
        await deliver(web, ctx, actor, activity)
    # An edit cannot make it public either.
    edit = {**private, "to": [AS_PUBLIC], "updated": stamp()}
    await deliver(web, ctx, alice, update(alice, edit, 1))

    stored = dict(dbpeek.rows(ctx.settings, "SELECT ap_id, visibility FROM comments"))
    assert stored[private["id"]] == "followers"
    assert stored[direct["id"]] == "direct"
    assert stored[single["id"]] == "direct"

    response = await web.get(f"/posts/{post.slug}")
    page = soup(response.text)
    assert contents(page) == ["Public reply", "Unlisted reply", "Public answer to a hidden reply"]
    assert responses_title(page) == "3 Responses to “Case 36”"
    assert await replies_of(web, post) == [public["id"], unlisted["id"], answer["id"]]
    index = await web.get("/")
    assert "3 Responses" in index.text
    nodeinfo = (await web.get("/nodeinfo/2.1")).json()
    assert nodeinfo["usage"]["localComments"] == 3
    for path, headers in (
        (f"/posts/{post.slug}", {}),
        ("/", {}),
        ("/feed.xml", {}),
        ("/feed.json", {}),
        (f"/p/{post.uid}", AP_ACCEPT),
        (f"/p/{post.uid}/replies", AP_ACCEPT),
        (f"/p/{post.uid}/activity", AP_ACCEPT),
        ("/users/blog/outbox?page=1", AP_ACCEPT),
        (f"/posts/{post.slug}", AP_ACCEPT),
    ):
        body = (await web.get(path, headers=headers)).text
        assert "SECRET" not in body, path
        assert private["id"] not in body, path
        assert direct["id"] not in body, path


async def test_attack_36_accept_from_non_followed_actor_ignored(
    web: httpx.AsyncClient, ctx: Services, fediverse: Fediverse
) -> None:
    alice = fediverse.add("mastodon.example", "alice", key_index=0)
    mallory = fediverse.add("evil.example", "mallory", key_index=1)
    await deliver(web, ctx, alice, follow(ctx, alice))
    before = state(ctx)
    deliveries = await ctx.store.count_deliveries()

    accepts = [
        {"id": f"{ctx.urls.actor}#follows/1", "type": "Follow", "actor": ctx.urls.actor,
         "object": mallory.id},
        {"id": f"{alice.id}/follows/1", "type": "Follow", "actor": alice.id,
         "object": ctx.urls.actor},
        f"{ctx.urls.actor}#follows/1",
    ]  # fmt: skip
    for number, obj in enumerate(accepts, start=1):
        activity = {
            "@context": AS_CONTEXT,
            "id": f"{mallory.id}/accepts/{number}",
            "type": "Accept",
            "actor": mallory.id,
            "object": obj,
        }
        assert (await deliver(web, ctx, mallory, activity)).status_code == 202
        assert outcome(ctx, activity["id"]) == ("done", None)

    assert state(ctx) == before
    assert await ctx.store.count_deliveries() == deliveries
    following = (await web.get("/users/blog/following", headers=AP_ACCEPT)).json()
    assert following["totalItems"] == 0
    assert [f.actor for f in await ctx.store.list_followers()] == [alice.id]


async def test_attack_36_remote_object_claiming_local_id(
    web: httpx.AsyncClient, ctx: Services, fediverse: Fediverse
) -> None:
    post = await publish(ctx, "Case 36, ours", "The author's own words.")
    object_id = ctx.blog.object_id(post.uid)
    mallory = fediverse.add("evil.example", "mallory", key_index=0)
    original = (await web.get(f"/p/{post.uid}", headers=AP_ACCEPT)).json()
    before = state(ctx)

    claimed = [
        object_id,
        f"{object_id}/replies/1",
        f"{BASE_URL}/users/blog/statuses/1",
        f"{BASE_URL}/posts/{post.slug}",
        f"https://BLOG.example/p/{post.uid}/x",
    ]
    for number, note_id in enumerate(claimed, start=1):
        note = mallory.note(number, object_id, "Defaced", id=note_id)
        activity = with_id(mallory.create(note), f"{mallory.id}/creates/{number}")
        await deliver(web, ctx, mallory, activity)
        status, error = outcome(ctx, activity["id"])
        assert status == "failed"
        assert error in (
            "a remote object cannot use one of our ids",
            "the object is on another host than its actor",
        )
    # Our post itself: edited, or deleted, by someone else.
    article = {**original, "content": "<p>Defaced</p>", "updated": stamp()}
    for number, author in enumerate((mallory.id, ctx.urls.actor), start=1):
        activity = update(mallory, {**article, "attributedTo": author}, number)
        await deliver(web, ctx, mallory, activity)
        assert outcome(ctx, activity["id"])[0] == "failed"
    await deliver(web, ctx, mallory, delete(mallory, tombstone(object_id), 1))
    await deliver(web, ctx, mallory, delete(mallory, object_id, 2))

    assert state(ctx) == before
    assert not await ctx.store.is_tombstoned(object_id)
    assert (await web.get(f"/p/{post.uid}", headers=AP_ACCEPT)).json() == original
    page = await page_of(web, post)
    assert "Defaced" not in str(page)
    assert "The author's own words." in page.select_one(".e-content").get_text()


PACKAGE_STATIC = Path(__file__).resolve().parent.parent / "fediblog" / "static"


def files_under(*roots: Path) -> set[Path]:
    return {path for root in roots for path in root.rglob("*")}


async def test_attack_36_remote_file_names_never_local_paths(
    web: httpx.AsyncClient, ctx: Services, fediverse: Fediverse
) -> None:
    post = await publish(ctx, "Case 36, files")
    mallory = fediverse.add("evil.example", "mallory", key_index=0)
    mallory.document_overrides["icon"] = {"type": "Image", "url": "/keys/blog.pem"}
    mallory.document_overrides["image"] = {"type": "Image", "url": "../../keys/blog.pem"}
    settings = ctx.settings
    roots = (Path(settings.database).parent, Path(settings.keys_dir))
    before = files_under(*roots, PACKAGE_STATIC)
    note = mallory.note(
        1,
        ctx.blog.object_id(post.uid),
        "Look at these",
        attachment=[
            {"type": "Image", "url": "https://evil.example/../../etc/passwd.png",
             "name": "../../../etc/passwd"},
            {"type": "Image", "url": "/static/avatar.png", "name": "local?"},
            {"type": "Image", "url": "../keys/blog.pem", "name": "relative"},
            {"type": "Document", "url": "file:///etc/passwd", "name": "file"},
            {"type": "Image", "url": "https://evil.example/x.png", "name": "/etc/shadow"},
        ],
    )  # fmt: skip
    await deliver(web, ctx, mallory, mallory.create(note))

    page = await page_of(web, post)
    [comment] = page.select("#responses li.comment")
    sources = [img["src"] for img in comment.select(".e-content img")]
    assert sources == [
        ctx.proxy.local_url(url)
        for url in ("https://evil.example/../../etc/passwd.png", "https://evil.example/x.png")
    ]
    assert comment.select_one("img.avatar")["src"] == "/static/avatar.svg"
    for element in comment.find_all(["a", "img"]):
        for attribute in ("href", "src"):
            value = str(element.get(attribute, "https://"))
            if not is_our_link(element, value):
                assert value.startswith(("https://", "#comment-", "/static/avatar.svg", "/proxy/"))
    assert files_under(*roots, PACKAGE_STATIC) == before
    assert (await web.get("/static/../keys/blog.pem")).status_code == 404


# ---- 37: the local form ------------------------------------------------------------------------


def local_form(**fields: str) -> dict[str, str]:
    form = {
        "name": "Lee",
        "email": "lee.private@mail.example",
        "website": "",
        "homepage": "",
        "comment": "A kind word.",
    }
    form.update(fields)
    return form


async def comment_rows(ctx: Services) -> list[tuple[Any, ...]]:
    return dbpeek.rows(
        ctx.settings,
        "SELECT author_name, author_email, author_url, content_html, status FROM comments"
        " ORDER BY id",
    )


async def test_attack_37_local_form_html_in_fields_escaped(
    web: httpx.AsyncClient, ctx: Services
) -> None:
    post = await publish(ctx, "Case 37, HTML")
    form = local_form(
        name="<script>alert(1)</script>Eve",
        website='https://eve.example/"><script>alert(2)</script>',
        comment=(
            '<img src=x onerror=alert(3)><a href="javascript:alert(4)">click</a>\n\n'
            "<script>alert(5)</script><style>*{}</style>"
        ),
    )

    assert (await web.post(f"/posts/{post.slug}/comment", data=form)).status_code == 303
    [held] = await ctx.store.list_comments_for_review(pending_only=True)
    await ctx.store.set_comment_status(held.id, "published")

    response = await web.get(f"/posts/{post.slug}")
    page = assert_page_inert(response.text, post)
    [comment] = page.select("#responses li.comment")
    body = comment.select_one(".e-content")
    assert body.find_all(True) == body.find_all("p")  # paragraphs of text, nothing else
    assert [p.get_text() for p in body.find_all("p")] == [
        '<img src=x onerror=alert(3)><a href="javascript:alert(4)">click</a>',
        "<script>alert(5)</script><style>*{}</style>",
    ]
    author = comment.select_one("a.author")
    assert author.get_text() == "<script>alert(1)</script>Eve"
    assert author.find_all(True) == []
    assert author["href"] == 'https://eve.example/"><script>alert(2)</script>'


@pytest.mark.parametrize(
    "website",
    [
        "javascript:alert(1)",
        "data:text/html,<script>alert(1)</script>",
        " javascript:alert(1)",
        "https://eve\u200b.example/",
        "https://eve.example/\u202e",
        "https://eve.example/\x07",
        "https://eve.example/\u3164",
        "https://eve.example/ x",
        "https://" + "e" * 300 + ".example/",
    ],
)
async def test_attack_37_local_form_hostile_website_refused(
    web: httpx.AsyncClient, ctx: Services, website: str
) -> None:
    post = await publish(ctx, "Case 37, websites")

    response = await web.post(f"/posts/{post.slug}/comment", data=local_form(website=website))

    assert response.status_code == 400
    assert "a website starting with https://" in response.text
    assert await comment_rows(ctx) == []


async def test_attack_37_local_form_honeypot_stores_nothing(
    web: httpx.AsyncClient, ctx: Services
) -> None:
    post = await publish(ctx, "Case 37, bots")
    assert (await web.post(f"/posts/{post.slug}/comment", data=local_form())).status_code == 303
    before = await comment_rows(ctx)

    response = await web.post(
        f"/posts/{post.slug}/comment",
        data=local_form(homepage="https://spam.example/", comment="Buy now"),
    )

    assert response.status_code == 303  # a bot learns nothing
    assert response.headers["location"] == f"/posts/{post.slug}/thanks"
    assert await comment_rows(ctx) == before
    assert len(before) == 1


async def test_attack_37_local_form_rate_limit_429(
    web: httpx.AsyncClient, ctx: Services, fed_app: Any
) -> None:
    post = await publish(ctx, "Case 37, floods")
    statuses = []
    for number in range(5):
        form = local_form(comment=f"Comment {number}")
        statuses.append((await web.post(f"/posts/{post.slug}/comment", data=form)).status_code)
    before = await comment_rows(ctx)

    response = await web.post(f"/posts/{post.slug}/comment", data=local_form(comment="Sixth"))

    assert statuses == [303] * 5
    assert response.status_code == 429
    assert "Slow down" in response.text
    assert await comment_rows(ctx) == before
    assert len(before) == 5
    # Per address: another visitor may still comment.
    other = httpx.AsyncClient(
        transport=httpx.ASGITransport(app=fed_app, client=("192.0.2.7", 4242)), base_url=BASE_URL
    )
    async with other:
        response = await other.post(f"/posts/{post.slug}/comment", data=local_form())
    assert response.status_code == 303


async def test_attack_37_local_form_100_kb_is_413(web: httpx.AsyncClient, ctx: Services) -> None:
    post = await publish(ctx, "Case 37, size")
    assert (await web.post(f"/posts/{post.slug}/comment", data=local_form())).status_code == 303
    before = await comment_rows(ctx)
    huge = local_form(comment="x" * 100_000)

    declared = await web.post(f"/posts/{post.slug}/comment", data=huge)

    async def chunks() -> Any:
        body = httpx.QueryParams(huge).__str__().encode()
        for start in range(0, len(body), 8192):
            yield body[start : start + 8192]

    streamed = await web.post(
        f"/posts/{post.slug}/comment",
        content=chunks(),
        headers={"Content-Type": "application/x-www-form-urlencoded"},
    )
    long_but_small = await web.post(
        f"/posts/{post.slug}/comment", data=local_form(comment="y" * 20_000)
    )

    for response in (declared, streamed):
        assert response.status_code == 413
        assert response.headers["content-type"] == "text/html; charset=utf-8"  # a page
        assert "<p>The comment is too large (100 kB at most).</p>" in response.text
    assert long_but_small.status_code == 400
    assert "a comment of at most 10,000 characters" in long_but_small.text
    assert await comment_rows(ctx) == before


async def test_attack_37_local_form_email_never_published(
    web: httpx.AsyncClient, ctx: Services
) -> None:
    post = await publish(ctx, "Case 37, email")
    email = "hidden.person@secret-mail.example"
    form = local_form(name="Hidden Person", email=email, website="https://hidden.example/")
    assert (await web.post(f"/posts/{post.slug}/comment", data=form)).status_code == 303
    [held] = await ctx.store.list_comments_for_review(pending_only=True)
    await ctx.store.set_comment_status(held.id, "published")
    assert [row[1] for row in await comment_rows(ctx)] == [email]  # kept, for the author

    pages = [
        (f"/posts/{post.slug}", {}),
        (f"/posts/{post.slug}/thanks", {}),
        ("/", {}),
        ("/about", {}),
        ("/tags", {}),
        ("/feed.xml", {}),
        ("/feed.json", {}),
        (f"/posts/{post.slug}", AP_ACCEPT),
        (f"/p/{post.uid}", AP_ACCEPT),
        (f"/p/{post.uid}/replies", AP_ACCEPT),
        (f"/p/{post.uid}/activity", AP_ACCEPT),
        ("/users/blog", AP_ACCEPT),
        ("/users/blog/outbox", AP_ACCEPT),
        ("/users/blog/outbox?page=1", AP_ACCEPT),
        ("/users/blog/followers", AP_ACCEPT),
        ("/actor", AP_ACCEPT),
        ("/.well-known/webfinger?resource=acct:blog@blog.example", {}),
        ("/.well-known/nodeinfo", {}),
        ("/nodeinfo/2.1", {}),
    ]
    shown = await web.get(f"/posts/{post.slug}")
    assert "Hidden Person" in shown.text  # the comment is there, without its email
    for path, headers in pages:
        response = await web.get(path, headers=headers)
        assert response.status_code == 200, path
        for secret in ("hidden.person", "secret-mail"):
            assert secret not in response.text, path
