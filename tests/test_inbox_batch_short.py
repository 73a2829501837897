"""Short shared transactions: a batch of replies is drafted (checked, sanitized, its
images proxied, searched for held keywords) before its transaction, which then only
reads once and writes its comments in one executemany. What must see the transaction's
own writes still does (a reply delivered twice, a reply to a reply of the same batch,
first-time moderation), and an error in a reply's draft is that reply's outcome alone."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest

from fediblog import responses as responses_module
from fediblog.config import Settings
from fediblog.responses import HELD_FIRST, held_for_keyword
from fediblog.store import PROXY_PATH, _writing
from fediblog.web.deps import Services
from tests import dbpeek
from tests.conftest import BACKEND, make_settings
from tests.fediverse import Fediverse
from tests.helpers import publish
from tests.test_inbox_batch import queue, shown_commits

pytestmark = pytest.mark.anyio


@pytest.fixture
def settings(request: pytest.FixtureRequest, tmp_path: Path, blog_keys: Path) -> Settings:
    return make_settings(tmp_path, keys_dir=blog_keys, **getattr(request, "param", {}))


def configured(**values: str) -> pytest.MarkDecorator:
    return pytest.mark.parametrize("settings", [values], indirect=True)


def with_picture(note: dict[str, Any], host: str, number: int) -> dict[str, Any]:
    note["content"] += "<p>:blob: look</p>"
    note["tag"] = [
        {"type": "Emoji", "name": ":blob:", "icon": {"url": f"https://{host}/emoji/blob.png"}}
    ]
    note["attachment"] = [
        {"type": "Image", "mediaType": "image/png", "url": f"https://{host}/m/{number}.png"}
    ]
    return note


def spy(monkeypatch: pytest.MonkeyPatch, owner: object, name: str, seen: list[bool]) -> None:
    """Record, at each call of ``owner.name``, whether its task is in a write transaction
    (holding the store's one write lock: accepting inbox POSTs would wait on it)."""
    original: Callable[..., Any] = getattr(owner, name)

    def watched(*args: Any, **kwargs: Any) -> Any:
        seen.append(_writing.get() is asyncio.current_task())
        return original(*args, **kwargs)

    monkeypatch.setattr(owner, name, watched)


@configured(hold_keywords="casino")
async def test_sanitizing_proxying_and_keywords_run_while_the_write_lock_is_free(
    web: httpx.AsyncClient, ctx: Services, fediverse: Fediverse, monkeypatch: pytest.MonkeyPatch
) -> None:
    post = await publish(ctx, "Pictures")
    ann = fediverse.add("social.example", "ann")
    target = ctx.blog.object_id(post.uid)
    notes = [with_picture(ann.note(n, target, f"pic {n}"), ann.host, n) for n in range(1, 6)]
    await queue(web, ctx, ann, *(ann.create(n) for n in notes))
    sanitized: list[bool] = []
    rewritten: list[bool] = []
    searched: list[bool] = []
    spy(monkeypatch, responses_module, "sanitize_remote_html", sanitized)
    spy(monkeypatch, responses_module, "html_to_text", searched)
    spy(monkeypatch, ctx.proxy, "rewrite", rewritten)
    before = await shown_commits(ctx)

    assert await ctx.inbox.process_once() == 5

    assert sanitized == rewritten == searched == [False] * 5  # never inside the transaction
    assert await shown_commits(ctx) - before == 1
    assert await ctx.store.count_inbox() == {"done": 5}
    # What the drafts prepared was still written: the images answer behind the proxy.
    for n, note in enumerate(notes, 1):
        row = await ctx.store.get_comment_by_ap_id(note["id"])
        assert row is not None
        comment = await ctx.store.get_stored_comment(row.id)
        assert comment is not None
        picture = ctx.proxy.local_url(f"https://{ann.host}/m/{n}.png")
        assert picture in comment.content_html
        assert await ctx.store.get_proxied(picture.removeprefix(PROXY_PATH)) is not None
    avatar = ctx.proxy.local_url(f"https://{ann.host}/avatars/{ann.username}.png")
    assert await ctx.store.get_proxied(avatar.removeprefix(PROXY_PATH)) is not None


async def test_a_reply_whose_content_cannot_be_sanitized_fails_alone_in_one_commit(
    web: httpx.AsyncClient, ctx: Services, fediverse: Fediverse, monkeypatch: pytest.MonkeyPatch
) -> None:
    post = await publish(ctx, "Broken content")
    ann = fediverse.add("social.example", "ann")
    bob = fediverse.add("other.example", "bob")
    target = ctx.blog.object_id(post.uid)
    notes = [ann.note(n, target, f"fine {n}") for n in range(1, 7)]
    notes[1]["content"] = "<p>half a pair \ud800 of surrogates</p>"
    # Bob's first reply: its avatar is new, and must not be written before it fails.
    notes[4] = bob.note(1, target, "breaks the sanitizer")
    original = responses_module.sanitize_remote_html

    def fragile(fragment: str, emoji: Any = None) -> str:
        if "breaks the sanitizer" in fragment:
            raise RuntimeError("the sanitizer broke")
        return original(fragment, emoji)

    monkeypatch.setattr(responses_module, "sanitize_remote_html", fragile)
    await queue(web, ctx, ann, *(ann.create(n) for n in notes[:4]))
    await queue(web, ctx, bob, bob.create(notes[4]))
    await queue(web, ctx, ann, ann.create(notes[5]))
    before = await shown_commits(ctx)

    assert await ctx.inbox.process_once() == 6

    # Failed before anything of theirs was written: no rollback, no second transaction.
    assert await shown_commits(ctx) - before == 1
    assert await ctx.store.count_inbox() == {"done": 4, "failed": 2}
    saved = [await ctx.store.get_comment_by_ap_id(note["id"]) for note in notes]
    assert [row is not None for row in saved] == [True, False, True, True, False, True]
    errors = sorted(row.error for row in await ctx.store.list_inbox(problems_only=True))
    assert errors == [
        "internal error: RuntimeError: the sanitizer broke",
        "the reply is not valid Unicode",
    ]
    bob_avatar = ctx.proxy.local_url(f"https://{bob.host}/avatars/{bob.username}.png")
    assert await ctx.store.get_proxied(bob_avatar.removeprefix(PROXY_PATH)) is None


async def test_one_note_delivered_three_times_in_a_batch_is_one_comment_and_threads_hold(
    web: httpx.AsyncClient, ctx: Services, fediverse: Fediverse
) -> None:
    post = await publish(ctx, "Echoes")
    ann = fediverse.add("social.example", "ann")
    bob = fediverse.add("other.example", "bob")
    target = ctx.blog.object_id(post.uid)
    first = ann.note(1, target, "said three times")
    answer = bob.note(1, first["id"], "an answer")
    answer_to_answer = ann.note(2, answer["id"], "and back")
    copies = [{**ann.create(first), "id": f"{first['id']}/activity/{n}"} for n in range(3)]
    await queue(web, ctx, ann, copies[0], copies[1])
    await queue(web, ctx, bob, bob.create(answer))
    await queue(web, ctx, ann, copies[2], ann.create(answer_to_answer))
    before = await shown_commits(ctx)

    assert await ctx.inbox.process_once() == 5

    assert await shown_commits(ctx) - before == 1
    assert await ctx.store.count_inbox() == {"done": 5}
    assert await ctx.store.count_comments() == 3
    rows = {}
    for note in (first, answer, answer_to_answer):
        found = await ctx.store.get_comment_by_ap_id(note["id"])
        assert found is not None
        rows[note["id"]] = await ctx.store.get_stored_comment(found.id)
    assert rows[first["id"]].parent_id is None  # type: ignore[union-attr]
    assert rows[answer["id"]].parent_id == rows[first["id"]].id  # type: ignore[union-attr]
    assert (
        rows[answer_to_answer["id"]].parent_id == rows[answer["id"]].id  # type: ignore[union-attr]
    )


@configured(hold_keywords="casino")
async def test_a_keyword_held_reply_in_a_batch_is_held_and_the_others_published(
    web: httpx.AsyncClient, ctx: Services, fediverse: Fediverse
) -> None:
    post = await publish(ctx, "Keywords")
    ann = fediverse.add("social.example", "ann")
    target = ctx.blog.object_id(post.uid)
    notes = [ann.note(n, target, f"plain {n}") for n in range(1, 5)]
    notes[1]["content"] = "<p>Visit my <b>CASINO</b></p>"
    notes[2]["summary"] = "casino inside"
    await queue(web, ctx, ann, *(ann.create(n) for n in notes))

    assert await ctx.inbox.process_once() == 4

    statuses = []
    for note in notes:
        row = await ctx.store.get_comment_by_ap_id(note["id"])
        assert row is not None
        statuses.append((await ctx.store.get_stored_comment(row.id)).status)  # type: ignore[union-attr]
    assert statuses == ["published", "pending", "pending", "published"]
    held = await ctx.store.list_comments_for_review(pending_only=True)
    assert {row.id for row in held} == {
        (await ctx.store.get_comment_by_ap_id(notes[i]["id"])).id  # type: ignore[union-attr]
        for i in (1, 2)
    }
    reasons = {
        (await ctx.store.get_stored_comment(row.id)).held_reason  # type: ignore[union-attr]
        for row in held
    }
    assert reasons == {held_for_keyword("casino")}


@configured(moderation="first")
async def test_first_replies_in_a_batch_are_held_and_a_known_sender_is_published(
    web: httpx.AsyncClient, ctx: Services, fediverse: Fediverse
) -> None:
    post = await publish(ctx, "First timers")
    known = fediverse.add("social.example", "known")
    new = fediverse.add("new.example", "new")
    target = ctx.blog.object_id(post.uid)
    await queue(web, ctx, known, known.create(known.note(1, target, "long ago")))
    assert await ctx.inbox.process_once() == 1
    old = await ctx.store.get_comment_by_ap_id(known.note(1, target, "")["id"])
    assert old is not None
    assert old.status == "pending"
    await ctx.store.set_comment_status(old.id, "published")  # the author approved it
    batch = [
        known.create(known.note(2, target, "again")),
        new.create(new.note(1, target, "hello")),
        new.create(new.note(2, target, "hello again")),
    ]
    await queue(web, ctx, known, batch[0])
    await queue(web, ctx, new, *batch[1:])

    assert await ctx.inbox.process_once() == 3

    rows = [await ctx.store.get_comment_by_ap_id(a["object"]["id"]) for a in batch]
    assert [row.status for row in rows] == ["published", "pending", "pending"]  # type: ignore[union-attr]
    second = await ctx.store.get_stored_comment(rows[2].id)  # type: ignore[union-attr]
    assert second is not None
    assert second.held_reason == HELD_FIRST


async def test_another_write_in_the_shared_transaction_comes_after_the_rows_kept(
    web: httpx.AsyncClient, ctx: Services, fediverse: Fediverse
) -> None:
    post = await publish(ctx, "Mixed")
    ann = fediverse.add("social.example", "ann")
    target = ctx.blog.object_id(post.uid)
    notes = [ann.note(n, target, f"reply {n}") for n in range(1, 5)]
    local: list[int] = []

    async def also_a_local_comment(activity: dict[str, Any]) -> None:
        # An ordinary write (its own INSERT, its rowid from SQLite) between kept rows.
        now = datetime.now(UTC)
        local.append(
            await ctx.store.save_comment(
                post_id=post.id,
                parent_id=None,
                content_html="<p>local</p>",
                published=now,
                received=now,
                source="local",
                author_name="Loc",
            )
        )

    ctx.inbox.add_handlers({"Create": also_a_local_comment})
    await queue(web, ctx, ann, *(ann.create(n) for n in notes))
    before = await shown_commits(ctx)

    assert await ctx.inbox.process_once() == 4

    assert await shown_commits(ctx) - before == 1
    assert await ctx.store.count_inbox() == {"done": 4}
    replies = [await ctx.store.get_comment_by_ap_id(n["id"]) for n in notes]
    ids = [row.id for row in replies if row is not None]
    assert len(ids) == 4
    assert len(set(ids + local)) == 8
    # Written in the order they were asked: each reply's row before the local one after
    # it. On SQLite a row's id is the next rowid at its write; on PostgreSQL kept rows
    # take ids from the sequence ahead of time, and the order of writes is that of the
    # rows' command ids in their one transaction (cmin).
    if BACKEND == "postgresql":
        sql = "SELECT id FROM comments WHERE post_id = ? ORDER BY cmin::text::int"
        written = [row[0] for row in dbpeek.rows(ctx.settings, sql, [post.id])]
    else:
        written = sorted(ids + local)
    assert [i for pair in zip(ids, local, strict=True) for i in pair] == written


async def test_rows_kept_for_later_are_read_back_in_their_transaction_and_rolled_back(
    ctx: Services,
) -> None:
    post = await publish(ctx, "Kept")
    actor = await ctx.store.save_actor(
        ap_id="https://social.example/users/k",
        username="k",
        domain="social.example",
        name="K",
        url=None,
        icon_url=None,
        inbox="https://social.example/users/k/inbox",
        shared_inbox=None,
        key_id=None,
        public_key_pem=None,
        fetched=datetime.now(UTC),
    )
    now = datetime.now(UTC)

    def fields(n: int) -> dict[str, Any]:
        return {
            "post_id": post.id,
            "parent_id": None,
            "content_html": f"<p>{n}</p>",
            "published": now,
            "received": now,
            "ap_id": f"https://social.example/notes/{n}",
            "url": None,
            "actor_id": actor,
            "summary": None,
            "sensitive": False,
            "visibility": "public",
            "status": "published",
            "held_reason": None,
        }

    class Undo(Exception):
        pass

    seen: list[str] = []

    async def kept_then_undone() -> None:
        async with ctx.store.shared_transaction():
            kept = await ctx.store.save_comment_later(**fields(1))
            row = await ctx.store.get_stored_comment(kept)  # written before this read
            seen.append(row.content_html if row is not None else "")
            raise Undo

    with pytest.raises(Undo):
        await kept_then_undone()
    assert seen == ["<p>1</p>"]
    assert await ctx.store.count_comments() == 0
    async with ctx.store.shared_transaction():
        first = await ctx.store.save_comment_later(**fields(2))
        second = await ctx.store.save_comment_later(**fields(3))
    assert second == first + 1
    assert await ctx.store.count_comments() == 2


async def test_a_write_that_joins_with_nothing_kept_does_not_leave_a_used_comment_id(
    web: httpx.AsyncClient, ctx: Services, fediverse: Fediverse, caplog: pytest.LogCaptureFixture
) -> None:
    """Only save_comment_later chooses a kept comment's id, and every write that joins
    the transaction makes it read the next one again: a comment inserted by another
    handler while no row is kept must not leave its id to the next kept reply (a UNIQUE
    failure at the commit, and the whole run redone one activity per transaction)."""
    post = await publish(ctx, "Stale id")
    ann = fediverse.add("social.example", "ann")
    target = ctx.blog.object_id(post.uid)
    elsewhere = ann.note(1, "https://other.example/notes/1", "not a reply to us")
    notes = [ann.note(n, target, f"reply {n}") for n in range(2, 6)]
    local: list[int] = []

    async def local_comment(activity: dict[str, Any]) -> None:
        now = datetime.now(UTC)
        local.append(
            await ctx.store.save_comment(
                post_id=post.id,
                parent_id=None,
                content_html="<p>local</p>",
                published=now,
                received=now,
                source="local",
                author_name="Loc",
            )
        )

    # Before responses' handler: for the first Create, which keeps no row, it inserts
    # a comment after the batch's one read; for each later one, while nothing is kept.
    ctx.inbox.handlers.setdefault("Create", []).insert(0, local_comment)
    await queue(web, ctx, ann, ann.create(elsewhere), *(ann.create(n) for n in notes))
    before = await shown_commits(ctx)

    with caplog.at_level(logging.INFO, logger="fediblog.inbox"):
        assert await ctx.inbox.process_once() == 5

    assert not [r.getMessage() for r in caplog.records if "shared" in r.getMessage()]
    assert await shown_commits(ctx) - before == 1
    assert await ctx.store.count_inbox() == {"done": 5}
    replies = [await ctx.store.get_comment_by_ap_id(n["id"]) for n in notes]
    ids = [row.id for row in replies if row is not None]
    assert len(ids) == 4
    assert len(set(ids + local)) == 9


async def test_a_kept_row_that_fails_to_write_ends_as_its_own_replys_outcome(
    web: httpx.AsyncClient, ctx: Services, fediverse: Fediverse
) -> None:
    """A kept row is written by what comes after it (another reply's write or read, the
    commit), so it fails there; the run is redone until the culprit runs alone, and
    fails alone (SharedTransaction)."""
    post = await publish(ctx, "Refused")
    ann = fediverse.add("social.example", "ann")
    target = ctx.blog.object_id(post.uid)
    notes = [ann.note(n, target, f"reply {n}") for n in range(1, 6)]
    notes[2]["content"] = "<p>the database refuses this one</p>"
    # A failure no draft can foresee, as the database itself would give it.
    if BACKEND == "sqlite":
        await ctx.store._db.execute(
            "CREATE TEMP TRIGGER refuse BEFORE INSERT ON comments"
            " WHEN NEW.content_html LIKE '%refuses this one%'"
            " BEGIN SELECT RAISE(ABORT, 'refused by the database'); END"
        )
    else:  # PostgreSQL: the same trigger, in the test's own database
        dbpeek.execute(
            ctx.settings,
            (
                "CREATE FUNCTION refuse() RETURNS trigger LANGUAGE plpgsql"
                " AS 'BEGIN RAISE EXCEPTION ''refused by the database''; END'",
                (),
            ),
            (
                "CREATE TRIGGER refuse BEFORE INSERT ON comments FOR EACH ROW"
                " WHEN (NEW.content_html LIKE '%refuses this one%') EXECUTE FUNCTION refuse()",
                (),
            ),
        )
    await queue(web, ctx, ann, *(ann.create(n) for n in notes))

    assert await ctx.inbox.process_once() == 5

    assert await ctx.store.count_inbox() == {"done": 4, "failed": 1}
    (failed,) = await ctx.store.list_inbox(problems_only=True)
    assert "refused by the database" in failed.error
    saved = [await ctx.store.get_comment_by_ap_id(n["id"]) is not None for n in notes]
    assert saved == [True, True, False, True, True]


async def test_drafts_stay_with_their_activities_across_a_rollback(
    web: httpx.AsyncClient, ctx: Services, fediverse: Fediverse
) -> None:
    """A rollback redoes the activities before and after the culprit in new shared
    transactions: each finds its own draft again (threads, ids and listeners hold)."""
    post = await publish(ctx, "Rolled")
    ann = fediverse.add("social.example", "ann")
    bob = fediverse.add("other.example", "bob")
    target = ctx.blog.object_id(post.uid)
    a = ann.note(1, target, "a")
    b = bob.note(1, a["id"], "b answers a")
    poison = ann.note(2, target, "poison")
    c = bob.note(2, b["id"], "c answers b")
    told: list[int] = []

    async def listener(comment_id: int, crawled: bool) -> None:
        told.append(comment_id)

    async def breaks(activity: dict[str, Any]) -> None:
        if activity["object"]["id"] == poison["id"]:
            raise RuntimeError("after its write")

    ctx.inbox.add_handlers({"Create": breaks})
    ctx.inbox.sharing.reply_listeners.append(listener)  # type: ignore[union-attr]
    await queue(web, ctx, ann, ann.create(a))
    await queue(web, ctx, bob, bob.create(b))
    await queue(web, ctx, ann, ann.create(poison))
    await queue(web, ctx, bob, bob.create(c))

    assert await ctx.inbox.process_once() == 4

    rows = {}
    for note in (a, b, poison, c):
        found = await ctx.store.get_comment_by_ap_id(note["id"])
        assert found is not None
        rows[note["id"]] = await ctx.store.get_stored_comment(found.id)
    assert rows[b["id"]].parent_id == rows[a["id"]].id  # type: ignore[union-attr]
    assert rows[c["id"]].parent_id == rows[b["id"]].id  # type: ignore[union-attr]
    assert [r.content_html for r in rows.values()] == [  # type: ignore[union-attr]
        "<p>a</p>",
        "<p>b answers a</p>",
        "<p>poison</p>",
        "<p>c answers b</p>",
    ]
    ids = [r.id for r in rows.values()]  # type: ignore[union-attr]
    assert sorted(told) == sorted(ids)
    assert len(told) == len(set(told)) == 4
    if BACKEND == "sqlite":  # the rolled-back rowids are taken again: no gap
        assert sorted(ids) == list(range(min(ids), min(ids) + 4))
    else:  # ids taken from a sequence are never given back: in order, with a gap
        assert ids == sorted(ids)


@configured(moderation="first")
async def test_first_replies_stay_held_across_a_rollback(
    web: httpx.AsyncClient, ctx: Services, fediverse: Fediverse
) -> None:
    post = await publish(ctx, "First")
    new = fediverse.add("new.example", "new")
    target = ctx.blog.object_id(post.uid)
    notes = [new.note(n, target, f"n{n}") for n in range(1, 5)]

    async def breaks(activity: dict[str, Any]) -> None:
        if activity["object"]["id"] == notes[2]["id"]:
            raise RuntimeError("after its write")

    ctx.inbox.add_handlers({"Create": breaks})
    await queue(web, ctx, new, *(new.create(n) for n in notes))

    assert await ctx.inbox.process_once() == 4

    rows = [await ctx.store.get_comment_by_ap_id(n["id"]) for n in notes]
    assert [row.status for row in rows] == ["pending"] * 4  # type: ignore[union-attr]


async def test_a_reply_whose_id_is_not_a_valid_url_fails_with_a_reason(
    web: httpx.AsyncClient, ctx: Services, fediverse: Fediverse
) -> None:
    """urlsplit raises ValueError on an unclosed IPv6 host: the reply fails as an
    ActivityError saying why, not as an internal error; the others are saved."""
    post = await publish(ctx, "Bad ids")
    ann = fediverse.add("social.example", "ann")
    target = ctx.blog.object_id(post.uid)
    notes = [ann.note(n, target, f"reply {n}") for n in range(1, 4)]
    notes[1]["id"] = "https://[::1/x"
    await queue(web, ctx, ann, *(ann.create(n) for n in notes))

    assert await ctx.inbox.process_once() == 3

    assert await ctx.store.count_inbox() == {"done": 2, "failed": 1}
    (failed,) = await ctx.store.list_inbox(problems_only=True)
    assert failed.error == "object id is not a valid URL"
    assert await ctx.store.count_comments() == 2
