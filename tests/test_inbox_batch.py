"""A claimed batch of replies becomes comments in one transaction (inbox.py's shared
transactions), and nothing of the one-by-one guarantees is lost on the way: a poison
activity fails alone, order holds across activities that run alone, listeners hear only
of committed replies, and a worker's batch function reports per job."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

import httpx
import pytest

from fediblog.web.deps import Services
from fediblog.worker import Outcome, TableQueue, Worker
from tests.conftest import deliver
from tests.fediverse import Fediverse
from tests.helpers import publish

pytestmark = pytest.mark.anyio


async def queue(web: httpx.AsyncClient, ctx: Services, actor: Any, *activities: Any) -> None:
    """Accept these activities (signed, through POST /inbox) without processing them."""
    for activity in activities:
        assert (await deliver(web, ctx, actor, activity, process=False)).status_code == 202


async def shown_commits(ctx: Services) -> int:
    return (await ctx.store.version())[0]


async def test_a_batch_of_replies_is_one_commit_and_threads_within_itself(
    web: httpx.AsyncClient, ctx: Services, fediverse: Fediverse
) -> None:
    post = await publish(ctx, "Busy")
    ann = fediverse.add("social.example", "ann")
    bob = fediverse.add("other.example", "bob")
    target = ctx.blog.object_id(post.uid)
    first = ann.note(1, target, "first")
    answer = bob.note(2, first["id"], "an answer to the first, in the same batch")
    again = {**ann.create(first), "id": first["id"] + "/activity-again"}  # same note twice
    await queue(web, ctx, ann, ann.create(first))
    await queue(web, ctx, bob, bob.create(answer))
    more = [ann.create(ann.note(n, target, f"r{n}")) for n in range(3, 9)]
    await queue(web, ctx, ann, again, *more)

    before = await shown_commits(ctx)
    assert await ctx.inbox.process_once() == 9

    assert await shown_commits(ctx) - before == 1  # eight comments, one commit pages see
    assert await ctx.store.count_inbox() == {"done": 9}
    parent = await ctx.store.get_comment_by_ap_id(first["id"])
    child = await ctx.store.get_comment_row(
        (await ctx.store.get_comment_by_ap_id(answer["id"]))["id"]  # type: ignore[index]
    )
    assert parent is not None
    assert child is not None
    assert child["parent_id"] == parent["id"]
    assert await ctx.store.count_comments() == 8
    page = (await web.get(f"/posts/{post.slug}")).text
    assert "an answer to the first" in page
    assert "r8" in page


async def test_a_poison_reply_fails_alone_and_the_others_become_comments(
    web: httpx.AsyncClient, ctx: Services, fediverse: Fediverse
) -> None:
    post = await publish(ctx, "Poisoned")
    ann = fediverse.add("social.example", "ann")
    target = ctx.blog.object_id(post.uid)
    good = [ann.note(n, target, f"good {n}") for n in range(1, 6)]
    # Fails before writing anything: the transaction goes on without it.
    forged = ann.note(6, target, "forged", id="https://elsewhere.example/notes/6")
    await queue(web, ctx, ann, *(ann.create(n) for n in good[:2]), ann.create(forged))
    await queue(web, ctx, ann, *(ann.create(n) for n in good[2:]))

    assert await ctx.inbox.process_once() == 6

    assert await ctx.store.count_inbox() == {"done": 5, "failed": 1}
    for note in good:
        assert await ctx.store.get_comment_by_ap_id(note["id"]) is not None
    problems = await ctx.store.list_inbox(problems_only=True)
    assert [row["error"] for row in problems] == ["the object is on another host than its actor"]


async def test_a_handler_that_fails_after_writing_rolls_back_and_fails_alone(
    web: httpx.AsyncClient, ctx: Services, fediverse: Fediverse
) -> None:
    post = await publish(ctx, "Half-written")
    ann = fediverse.add("social.example", "ann")
    target = ctx.blog.object_id(post.uid)
    notes = [ann.note(n, target, f"reply {n}") for n in range(1, 8)]
    poison = notes[3]["id"]
    scheduled: list[int] = []

    async def listener(comment_id: int, crawled: bool) -> None:
        scheduled.append(comment_id)

    async def breaks_after_the_comment(activity: dict[str, Any]) -> None:
        if activity["object"]["id"] == poison:  # after handle_create wrote its comment
            raise RuntimeError("a bug")

    ctx.inbox.add_handlers({"Create": breaks_after_the_comment})
    ctx.inbox.sharing.reply_listeners.append(listener)  # type: ignore[union-attr]
    await queue(web, ctx, ann, *(ann.create(n) for n in notes))

    assert await ctx.inbox.process_once() == 7

    assert await ctx.store.count_inbox() == {"done": 6, "failed": 1}
    ids = [await ctx.store.get_comment_by_ap_id(n["id"]) for n in notes]
    assert all(row is not None for row in ids)  # run alone, the poison's own write stands
    # Every listener heard of each committed reply once, and of nothing rolled back.
    assert sorted(scheduled) == sorted(row["id"] for row in ids if row is not None)


async def test_order_holds_between_replies_and_activities_that_run_alone(
    web: httpx.AsyncClient, ctx: Services, fediverse: Fediverse
) -> None:
    post = await publish(ctx, "Ordered")
    ann = fediverse.add("social.example", "ann")
    target = ctx.blog.object_id(post.uid)
    kept, deleted, late = (ann.note(n, target, f"note {n}") for n in (1, 2, 3))
    delete_late = {
        "id": late["id"] + "#delete",
        "type": "Delete",
        "actor": ann.id,
        "object": late["id"],
    }
    delete_deleted = {**delete_late, "id": deleted["id"] + "#delete", "object": deleted["id"]}
    # Create, Create, Delete (runs alone, between two shared runs), Delete before its
    # Create (a tombstone), then the late Create: refused.
    await queue(web, ctx, ann, ann.create(kept), ann.create(deleted), delete_deleted)
    await queue(web, ctx, ann, delete_late, ann.create(late))

    assert await ctx.inbox.process_once() == 5

    kept_row = await ctx.store.get_comment_by_ap_id(kept["id"])
    deleted_row = await ctx.store.get_comment_by_ap_id(deleted["id"])
    assert kept_row is not None
    assert kept_row["status"] == "published"
    assert deleted_row is not None
    assert deleted_row["status"] == "deleted"
    assert await ctx.store.get_comment_by_ap_id(late["id"]) is None
    assert await ctx.store.count_inbox() == {"done": 4, "failed": 1}


async def test_a_new_sender_is_fetched_before_the_shared_transaction(
    web: httpx.AsyncClient, ctx: Services, fediverse: Fediverse
) -> None:
    post = await publish(ctx, "Strangers")
    target = ctx.blog.object_id(post.uid)
    known = fediverse.add("social.example", "known")
    await deliver(web, ctx, known, known.create(known.note(1, target, "hello")))
    stranger = fediverse.add("new.example", "stranger")
    # Accepted with its key, then forgotten: processing must fetch the actor again.
    await queue(web, ctx, stranger, stranger.create(stranger.note(1, target, "first words")))
    await ctx.store._db.execute("UPDATE actors SET fetched_at = '2000-01-01T00:00:00Z'")
    await queue(web, ctx, known, known.create(known.note(2, target, "again")))

    assert await ctx.inbox.process_once() == 2

    assert await ctx.store.count_inbox() == {"done": 3}
    assert await ctx.store.count_comments() == 3
    row = await ctx.store.get_actor_row(stranger.id)
    assert row is not None
    assert row["fetched_at"] > "2000"


class FakeJob:
    def __init__(self, number: int) -> None:
        self.id = number
        self.attempts = 1


async def test_a_worker_batch_function_gets_every_job_and_reports_each() -> None:
    recorded: list[tuple[int, str]] = []
    pending = [FakeJob(n) for n in range(1, 6)]
    seen: list[list[int]] = []

    async def claim(now: datetime, lease_until: datetime, limit: int) -> list[FakeJob]:
        taken, pending[:limit] = pending[:limit], []
        return taken

    async def record(results: Sequence[tuple[FakeJob, Outcome]]) -> None:
        recorded.extend((job.id, outcome.status) for job, outcome in results)

    async def one(job: FakeJob) -> Outcome:
        raise AssertionError("the batch function runs them")

    async def many(jobs: list[FakeJob]) -> list[Outcome]:
        seen.append([job.id for job in jobs])
        if len(seen) == 2:
            raise RuntimeError("a bug in the batch function")
        return [Outcome.failed("odd") if job.id % 2 else Outcome.done() for job in jobs]

    worker = Worker("test", TableQueue(claim, record), one, run_batch=many, batch=3)
    assert await worker.run_once() == 5

    assert seen == [[1, 2, 3], [4, 5]]
    assert recorded == [
        (1, "failed"),
        (2, "done"),
        (3, "failed"),
        (4, "failed"),  # the function failed as a whole: each of its jobs says so
        (5, "failed"),
    ]
