"""A claimed batch of replies becomes comments in one transaction (inbox.py's shared
transactions), and nothing of the one-by-one guarantees is lost on the way: a poison
activity fails alone, order holds across activities that run alone, listeners hear only
of committed replies, and a worker's batch function reports per job."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

import httpx
import pytest

from fediblog.web.deps import Services
from fediblog.worker import Outcome, Report, TableQueue, Worker
from tests.conftest import deliver
from tests.fediverse import Fediverse
from tests.helpers import publish

pytestmark = [pytest.mark.anyio, pytest.mark.postgresql]  # -m postgresql: where backends differ


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
    child = await ctx.store.get_stored_comment(
        (await ctx.store.get_comment_by_ap_id(answer["id"])).id  # type: ignore[union-attr]
    )
    assert parent is not None
    assert child is not None
    assert child.parent_id == parent.id
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
    assert [row.error for row in problems] == ["the object is on another host than its actor"]


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
    assert sorted(scheduled) == sorted(row.id for row in ids if row is not None)


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
    assert kept_row.status == "published"
    assert deleted_row is not None
    assert deleted_row.status == "deleted"
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
    row = await ctx.store.get_cached_actor(stranger.id)
    assert row is not None
    assert row.fetched > datetime(2000, 1, 1, tzinfo=UTC)


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

    async def many(jobs: list[FakeJob], report: Report[FakeJob]) -> None:
        seen.append([job.id for job in jobs])
        for job in jobs:
            if job.id == 5:
                raise RuntimeError("a bug in the batch function")
            report(job, Outcome.failed("odd") if job.id % 2 else Outcome.done())

    worker = Worker("test", TableQueue(claim, record), one, run_batch=many, batch=3)
    assert await worker.run_once() == 5

    assert seen == [[1, 2, 3], [4, 5]]
    assert sorted(recorded) == [
        (1, "failed"),
        (2, "done"),
        (3, "failed"),
        (4, "done"),  # reported before the function failed: its outcome stands
        (5, "failed"),  # not reported when it failed: it says so
    ]


async def test_a_batch_cut_off_records_what_it_finished_and_requeues_the_rest() -> None:
    recorded: dict[int, Outcome] = {}
    pending = [FakeJob(n) for n in range(1, 6)]
    third = asyncio.Event()

    async def claim(now: datetime, lease_until: datetime, limit: int) -> list[FakeJob]:
        taken, pending[:limit] = pending[:limit], []
        return taken

    async def record(results: Sequence[tuple[FakeJob, Outcome]]) -> None:
        recorded.update((job.id, outcome) for job, outcome in results)

    async def one(job: FakeJob) -> Outcome:
        raise AssertionError("the batch function runs them")

    async def many(jobs: list[FakeJob], report: Report[FakeJob]) -> None:
        for job in jobs[:2]:
            report(job, Outcome.done())
        third.set()
        await asyncio.Event().wait()  # the third hangs: the worker is stopped

    worker = Worker("test", TableQueue(claim, record), one, run_batch=many, record_every=50)
    run = asyncio.create_task(worker.run_once())
    await third.wait()
    run.cancel()
    with pytest.raises(asyncio.CancelledError):
        await run

    assert [recorded[n].status for n in (1, 2)] == ["done", "done"]
    for n in (3, 4, 5):
        assert recorded[n].status == "retry"
        assert recorded[n].error == "interrupted (the worker stopped)"


# ---- a batch cut off, and handlers acted on again --------------------------------------


async def test_a_batch_cut_off_by_a_shutdown_reruns_only_what_it_had_not_finished(
    web: httpx.AsyncClient, ctx: Services, fediverse: Fediverse
) -> None:
    post = await publish(ctx, "Cut off")
    ann = fediverse.add("social.example", "ann")
    target = ctx.blog.object_id(post.uid)
    creates = [ann.create(ann.note(n, target, f"reply {n}")) for n in range(1, 11)]
    like = {"id": ann.id + "/likes/1", "type": "Like", "actor": ann.id, "object": target}
    arrived, gate = asyncio.Event(), asyncio.Event()
    told: list[int] = []

    async def hangs(activity: dict[str, Any]) -> None:
        arrived.set()
        await gate.wait()

    async def listener(comment_id: int, crawled: bool) -> None:
        told.append(comment_id)

    ctx.inbox.add_handlers({"Like": hangs})
    ctx.inbox.sharing.reply_listeners.append(listener)  # type: ignore[union-attr]
    await queue(web, ctx, ann, *creates[:5], like, *creates[5:])

    run = asyncio.create_task(ctx.inbox.process_once())
    await arrived.wait()  # five replies committed; the Like hangs
    run.cancel()
    with pytest.raises(asyncio.CancelledError):
        await run

    rows = await ctx.store._fetchall("SELECT status, error FROM inbox ORDER BY id")
    assert [row["status"] for row in rows] == ["done"] * 5 + ["queued"] * 6
    assert all("interrupted" in row["error"] for row in rows[5:])
    assert len(told) == 5
    gate.set()
    assert await ctx.inbox.process_once() == 6  # only what had not finished
    assert await ctx.store.count_inbox() == {"done": 11}
    assert await ctx.store.count_comments() == 10
    assert sorted(set(told)) == sorted(told)  # each reply told once
    assert len(told) == 10


async def test_a_shutdown_once_a_batch_committed_still_tells_and_records_it(
    web: httpx.AsyncClient, ctx: Services, fediverse: Fediverse
) -> None:
    post = await publish(ctx, "Committed")
    ann = fediverse.add("social.example", "ann")
    target = ctx.blog.object_id(post.uid)
    arrived, gate = asyncio.Event(), asyncio.Event()
    told: list[int] = []

    async def slow_listener(comment_id: int, crawled: bool) -> None:
        told.append(comment_id)
        arrived.set()
        await gate.wait()

    ctx.inbox.sharing.reply_listeners.append(slow_listener)  # type: ignore[union-attr]
    await queue(web, ctx, ann, *(ann.create(ann.note(n, target, f"r{n}")) for n in range(1, 6)))

    run = asyncio.create_task(ctx.inbox.process_once())
    await arrived.wait()  # committed; its listeners are being told
    run.cancel()
    for _ in range(20):  # the cancellation reaches the batch while the listener waits
        await asyncio.sleep(0)
    gate.set()
    with pytest.raises(asyncio.CancelledError):
        await run

    assert await ctx.store.count_inbox() == {"done": 5}  # committed: recorded, not re-run
    assert len(told) == 5  # crawls and notifications are not lost


async def test_a_listener_that_fails_fails_neither_the_replies_nor_other_listeners(
    web: httpx.AsyncClient, ctx: Services, fediverse: Fediverse, caplog: pytest.LogCaptureFixture
) -> None:
    post = await publish(ctx, "Listened")
    ann = fediverse.add("social.example", "ann")
    target = ctx.blog.object_id(post.uid)
    told: list[int] = []

    async def breaks(comment_id: int, crawled: bool) -> None:
        raise RuntimeError("a listener's bug")

    async def listener(comment_id: int, crawled: bool) -> None:
        told.append(comment_id)

    ctx.inbox.sharing.reply_listeners.extend([breaks, listener])  # type: ignore[union-attr]
    await queue(web, ctx, ann, *(ann.create(ann.note(n, target, f"r{n}")) for n in range(1, 6)))

    with caplog.at_level("INFO"):
        assert await ctx.inbox.process_once() == 5

    assert await ctx.store.count_inbox() == {"done": 5}
    assert len(told) == 5  # every reply, to the listener after the broken one
    assert "a listener's bug" in caplog.text  # logged, per comment
    assert "shared transaction failed" not in caplog.text


async def test_a_sender_that_cannot_be_fetched_is_asked_once_not_once_per_reply(
    web: httpx.AsyncClient, ctx: Services, fediverse: Fediverse
) -> None:
    post = await publish(ctx, "Gone")
    ann = fediverse.add("gone.example", "ann")
    target = ctx.blog.object_id(post.uid)
    await queue(web, ctx, ann, *(ann.create(ann.note(n, target, f"r{n}")) for n in range(1, 4)))
    # Its key was known on receipt; its profile must be fetched, and is gone now.
    await ctx.store._db.execute("UPDATE actors SET inbox = '' WHERE ap_id = ?", (ann.id,))
    del fediverse.actors[ann.id]
    asked = fediverse.asked(ann.id)

    assert await ctx.inbox.process_once() == 3

    assert fediverse.asked(ann.id) - asked == 1
    assert await ctx.store.count_inbox() == {"failed": 3}
    errors = {row.error for row in await ctx.store.list_inbox(problems_only=True)}
    assert len(errors) == 1
    assert "404" in errors.pop()


async def test_new_senders_are_fetched_a_few_at_once(
    web: httpx.AsyncClient, ctx: Services, fediverse: Fediverse, monkeypatch: pytest.MonkeyPatch
) -> None:
    post = await publish(ctx, "Crowd")
    target = ctx.blog.object_id(post.uid)
    senders = [fediverse.add(f"host{n}.example", "someone") for n in range(12)]
    for sender in senders:
        await queue(web, ctx, sender, sender.create(sender.note(1, target, "hi")))
    await ctx.store._db.execute("UPDATE actors SET fetched_at = '2000-01-01T00:00:00Z'")
    actors = ctx.inbox.sharing._actors  # type: ignore[union-attr]
    fetch = actors.get_actor
    now = {"fetching": 0, "most": 0}

    async def counted(ap_id: str) -> Any:
        now["fetching"] += 1
        now["most"] = max(now["most"], now["fetching"])
        try:
            return await fetch(ap_id)
        finally:
            now["fetching"] -= 1

    monkeypatch.setattr(actors, "get_actor", counted)
    assert await ctx.inbox.process_once() == 12

    assert now["most"] == 8  # in parallel, and never more than eight at once
    assert await ctx.store.count_comments() == 12


async def test_many_poison_replies_are_a_loop_not_a_recursion(
    web: httpx.AsyncClient, ctx: Services, fediverse: Fediverse
) -> None:
    post = await publish(ctx, "Poison")
    ann = fediverse.add("social.example", "ann")
    target = ctx.blog.object_id(post.uid)
    depths: set[int] = set()

    async def breaks_after_writing(activity: dict[str, Any]) -> None:
        frame, depth = sys._getframe(), 0
        while frame is not None:
            frame, depth = frame.f_back, depth + 1  # type: ignore[assignment]
        depths.add(depth)
        raise RuntimeError("a bug")

    ctx.inbox.add_handlers({"Create": breaks_after_writing})
    await queue(web, ctx, ann, *(ann.create(ann.note(n, target, f"r{n}")) for n in range(1, 31)))

    assert await ctx.inbox.process_once() == 30

    assert await ctx.store.count_inbox() == {"failed": 30}
    assert len(depths) <= 2  # one depth in a shared transaction, one alone: no growth


async def test_a_follow_acted_on_again_queues_no_second_accept(
    web: httpx.AsyncClient, ctx: Services, fediverse: Fediverse
) -> None:
    ann = fediverse.add("social.example", "ann")
    follow: dict[str, Any] = {
        "@context": "https://www.w3.org/ns/activitystreams",
        "id": f"{ann.id}/follows/1",
        "type": "Follow",
        "actor": ann.id,
        "object": ctx.urls.actor,
    }
    await deliver(web, ctx, ann, follow)
    assert [row.type for row in await ctx.store.list_deliveries(("queued",))] == ["Accept"]
    assert await ctx.deliverer.deliver_once() == 1

    await ctx.inbox.handle_follow(follow)  # a batch cut off ran it again

    assert await ctx.store.list_deliveries(("queued",)) == []
    follower = await ctx.store.get_follower(ann.id)
    assert follower is not None
    assert follower.status == "accepted"
    # A new Follow (another id) from the same account is answered again.
    await ctx.inbox.handle_follow({**follow, "id": f"{ann.id}/follows/2"})
    assert [row.type for row in await ctx.store.list_deliveries(("queued",))] == ["Accept"]
