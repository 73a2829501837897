"""What must hold on SQLite and PostgreSQL alike, where the two differ underneath.

The suite runs once per backend (``python -m tests.pgcluster pytest`` for the second
run); these tests pin the places the backends could part: text PostgreSQL cannot hold,
two processes claiming from one queue, another process's change reaching a page cache,
and how SQLite's placeholders become PostgreSQL's.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest

from fediblog.errors import StorageError
from fediblog.inbox import BatchWriter, Overloaded
from fediblog.models import InboxItem, OutgoingActivity, Post, PostDraft, utcnow
from fediblog.store import PostgresStore, Store, _pg_query, _walk_in_memory
from fediblog.store import core as store_core
from fediblog.store import postgres as store_postgres
from fediblog.store.schema import MIGRATIONS
from fediblog.web.deps import Services
from fediblog.worker import Outcome
from tests import dbpeek
from tests.conftest import BACKEND, BASE_URL, database_for, deliver
from tests.fediverse import Fediverse
from tests.helpers import publish
from tests.pgcluster import HARNESS_APPLICATION

pytestmark = [pytest.mark.anyio, pytest.mark.postgresql]  # -m postgresql: where backends differ


# ---- placeholders ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("sqlite", "postgres", "order"),
    [
        ("SELECT ? + ?", "SELECT $1 + $2", (0, 1)),
        ("SELECT ?2, ?1, ?2", "SELECT $1, $2, $1", (1, 0)),
        (
            "UPDATE t SET a = :a WHERE b = :b AND c = :a",
            "UPDATE t SET a = $1 WHERE b = $2 AND c = $1",
            ("a", "b"),
        ),
        # Inside strings, quoted names and comments, nothing is a placeholder; a cast is not.
        (
            "SELECT 'a?b :c', \"d?\", x::text -- e? :f\n, ?",
            "SELECT 'a?b :c', \"d?\", x::text -- e? :f\n, $1",
            (0,),
        ),
        ("SELECT 'it''s ?', ?", "SELECT 'it''s ?', $1", (0,)),
    ],
)
def test_sqlite_placeholders_become_postgresql_ones(
    sqlite: str, postgres: str, order: tuple[object, ...]
) -> None:
    assert _pg_query(sqlite) == (postgres, order)


async def bare_actor(store: Store, username: str, domain: str, name: str) -> int:
    """A remote actor known by its id alone (no inbox, key or icon): its row id."""
    return await store.save_actor(
        ap_id=f"https://{domain}/users/{username}", username=username, domain=domain,
        name=name, url=None, icon_url=None, inbox=None, shared_inbox=None, key_id=None,
        public_key_pem=None, fetched=utcnow(),
    )  # fmt: skip


# ---- text PostgreSQL cannot hold ---------------------------------------------------------------


async def test_a_nul_in_an_activity_is_refused_on_every_backend(
    web: httpx.AsyncClient, ctx: Services, fediverse: Fediverse
) -> None:
    """JSON can carry U+0000, which PostgreSQL's text cannot hold: the inbox answers
    400 for it in the activity's id, type or actor, and a reply whose content holds
    one is not stored; never a 500, on either backend."""
    post = await publish(ctx, "Nul")
    ann = fediverse.add("social.example", "ann")
    target = ctx.urls.object_id(post.uid)

    bad_id = ann.create(ann.note(1, target, "fine words"))
    bad_id["id"] += "\u0000"
    assert (await deliver(web, ctx, ann, bad_id, process=False)).status_code == 400

    nul_content = ann.create(ann.note(2, target, "nul \u0000 inside"))
    answer = await deliver(web, ctx, ann, nul_content)
    assert answer.status_code in (202, 400)
    fine = ann.create(ann.note(3, target, "plain words"))
    assert (await deliver(web, ctx, ann, fine)).status_code == 202

    page = await web.get(f"/posts/{post.slug}")
    assert page.status_code == 200
    assert "plain words" in page.text
    assert "nul " not in page.text
    assert await ctx.store.count_comments() == 1


async def test_a_nul_elsewhere_is_stored_as_each_backend_can(tmp_path: Path) -> None:
    """A NUL that reached the store anyway (a remote actor's name) is kept by SQLite and
    turned into U+FFFD by PostgreSQL, rather than failing the write."""
    store = await Store.open(database_for(tmp_path))
    try:
        await bare_actor(store, "n", "x.example", "A\x00B")
        found = await store.get_cached_actor("https://x.example/users/n")
    finally:
        await store.close()
    assert found is not None
    assert found.name == ("A\x00B" if BACKEND == "sqlite" else "A\ufffdB")


# ---- two processes, one database --------------------------------------------------------------


async def test_two_stores_claiming_at_once_never_take_the_same_delivery(tmp_path: Path) -> None:
    """Two connections (two worker processes) claiming from one queue at the same time
    share it out: every row to exactly one of them (SKIP LOCKED on PostgreSQL, the
    write lock's turns on SQLite)."""
    where = database_for(tmp_path)
    first = await Store.open(where)
    second = await Store.open(where)
    try:
        activity = OutgoingActivity(f"{BASE_URL}/activities/1", "Create", '{"type":"Create"}')
        for n in range(150):
            await first.save_activity_for(activity, f"https://h{n}.example/inbox")
        now = utcnow()
        lease = now + timedelta(minutes=1)
        rounds = await asyncio.gather(
            *(store.claim_deliveries(now, lease, 25) for _ in range(4) for store in (first, second))
        )
    finally:
        await first.close()
        await second.close()
    ids = [job.id for jobs in rounds for job in jobs]
    assert len(ids) == len(set(ids)) == 150


# The plan PostgreSQL may pick for a claim's ``id IN (SELECT … LIMIT n FOR UPDATE SKIP
# LOCKED)``: a nested loop that runs the subquery again for each row of the queue. Each
# run skips the rows this very UPDATE has just changed, so it finds the next ones, and the
# claim takes the whole queue. In CI it happened now and then (most likely the statistics
# of a reused test database and asyncpg's generic plans); these settings force it.
_RESCANNED_SUBQUERY = (
    "plan_cache_mode=force_generic_plan&enable_hashjoin=off&enable_mergejoin=off"
    "&enable_material=off&enable_hashagg=off&enable_sort=off"
)


async def test_a_claim_takes_no_more_than_its_limit_whatever_the_plan(tmp_path: Path) -> None:
    """Each queue's claim takes at most ``limit`` rows, the first due, whatever plan the
    database chooses; the rest stay queued, untried, for the next claim."""
    where = database_for(tmp_path)
    if BACKEND == "postgresql":
        where += ("&" if "?" in where else "?") + _RESCANNED_SUBQUERY
    store = await Store.open(where)
    try:
        activity = OutgoingActivity(f"{BASE_URL}/activities/1", "Create", '{"type":"Create"}')
        for n in range(5):
            await store.save_activity_for(activity, f"https://h{n}.example/inbox")
        await store.save_inbox_items(
            [InboxItem(f"k{n}", "https://x.example/u", "Like", "{}") for n in range(5)]
        )
        now = utcnow()
        lease = now + timedelta(minutes=1)
        deliveries = [await store.claim_deliveries(now, lease, 2) for _ in range(3)]
        inbox = [await store.claim_inbox(now, lease, 2) for _ in range(3)]
    finally:
        await store.close()
    assert [len(jobs) for jobs in deliveries] == [len(jobs) for jobs in inbox] == [2, 2, 1]
    assert [job.inbox for jobs in deliveries for job in jobs] == [
        f"https://h{n}.example/inbox" for n in range(5)
    ]
    assert all(job.attempts == 1 for jobs in deliveries + inbox for job in jobs)


async def test_an_inbox_row_and_its_payload_are_kept_and_forgotten_together(
    tmp_path: Path,
) -> None:
    """An inbox row's payload lives in a table of its own (a claim does not rewrite
    it): each row is stored with the first payload its key came with, whether the
    duplicate came later or in the same batch; a claim hands each back; pruning the
    row forgets its payload."""
    store = await Store.open(database_for(tmp_path))
    actor = "https://x.example/u"
    try:
        await store.save_inbox_items(
            [InboxItem(f"k{n}", actor, "Like", f'{{"n": {n}}}') for n in range(3)]
        )
        await store.save_inbox_items(
            [
                InboxItem("k1", actor, "Like", '{"n": "later"}'),
                InboxItem("k3", actor, "Like", '{"n": 3}'),
                InboxItem("k3", actor, "Like", '{"n": "same batch"}'),
            ]
        )
        now = utcnow()
        jobs = await store.claim_inbox(now, now + timedelta(minutes=1), 10)
        await store.record_inbox([(job, Outcome.done()) for job in jobs])
        pruned, _ = await store.prune(utcnow() + timedelta(days=1))
        left = await store._fetchall("SELECT count(*) FROM inbox_payloads")
    finally:
        await store.close()
    assert [(job.payload, job.attempts) for job in jobs] == [
        (f'{{"n": {n}}}', 1) for n in range(4)
    ]
    assert pruned == 4
    assert [tuple(row) for row in left] == [(0,)]


async def test_inbox_rows_stored_before_the_payloads_moved_keep_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A blog upgraded with activities in its inbox (queued, or done) finds each with
    its payload after the migration that moved payloads to a table of their own, and
    a claim hands back what was queued, payloads and all."""
    where = database_for(tmp_path)
    if isinstance(where, str):  # the harness's database holds today's schema: start bare
        import asyncpg

        bare = await asyncpg.connect(
            where, server_settings={"application_name": HARNESS_APPLICATION}
        )
        try:
            await bare.execute("DROP SCHEMA public CASCADE; CREATE SCHEMA public")
        finally:
            await bare.close()
    moved = next(n for n, script in enumerate(MIGRATIONS) if "TABLE inbox_payloads" in script)
    before = MIGRATIONS[:moved]
    for module in (store_core, store_postgres):
        monkeypatch.setattr(module, "MIGRATIONS", before)
    old = await Store.open(where)
    try:
        for n, status in ((1, "done"), (2, "queued"), (3, "queued")):
            await old._write_one(
                "INSERT INTO inbox (dedup_key, actor_ap_id, type, payload, status, received_at)"
                " VALUES (?, 'https://x.example/u', 'Like', ?, ?, '2026-01-01T00:00:00Z')",
                (f"k{n}", f'{{"n": {n}}}', status),
            )
    finally:
        await old.close()
    monkeypatch.undo()
    store = await Store.open(where)
    try:
        now = utcnow()
        jobs = await store.claim_inbox(now, now + timedelta(minutes=1), 10)
        kept = await store._fetchall("SELECT id, payload FROM inbox_payloads ORDER BY id")
        columns = await store._fetchall("SELECT * FROM inbox WHERE dedup_key = 'k1'")
    finally:
        await store.close()
    assert [job.payload for job in jobs] == ['{"n": 2}', '{"n": 3}']
    assert [row[1] for row in kept] == [f'{{"n": {n}}}' for n in (1, 2, 3)]
    assert "payload" not in list(columns[0].keys())  # a row's `in` looks at its values


async def test_a_payload_removed_by_hand_does_not_hold_back_its_batch(tmp_path: Path) -> None:
    """An inbox row whose payload is gone (deleted by hand) is claimed with the rest,
    empty, to fail alone as not JSON; the claim does not fail, which would hold the
    whole batch back a lease at a time."""
    store = await Store.open(database_for(tmp_path))
    try:
        await store.save_inbox_items(
            [InboxItem(f"k{n}", "https://x.example/u", "Like", f'{{"n": {n}}}') for n in range(3)]
        )
        [[middle]] = await store._fetchall("SELECT id FROM inbox WHERE dedup_key = 'k1'")
        await store._write_one("DELETE FROM inbox_payloads WHERE id = ?", (middle,))
        now = utcnow()
        jobs = await store.claim_inbox(now, now + timedelta(minutes=1), 10)
    finally:
        await store.close()
    assert [job.payload for job in jobs] == ['{"n": 0}', "", '{"n": 2}']


async def test_a_server_older_than_its_schema_answers_retry_later(tmp_path: Path) -> None:
    """An upgrade migrated the database while the old version still serves: a table
    changed under it (here a column renamed) makes the inbox answer "retry later"
    (503), on both backends, never refuse what the sender sent (400)."""
    store = await Store.open(database_for(tmp_path))
    writer = BatchWriter(store)
    running = asyncio.create_task(writer.run())
    try:
        await store._write_one("ALTER TABLE inbox RENAME COLUMN actor_ap_id TO sender")
        with pytest.raises(Overloaded):
            await writer.submit(InboxItem("k", "https://x.example/u", "Like", "{}"))
    finally:
        running.cancel()
        await asyncio.gather(running, return_exceptions=True)
        await store.close()


async def test_another_process_s_change_reaches_a_page_cache_within_a_second(
    tmp_path: Path,
) -> None:
    """``version`` (what page caches key on) moves within a second of a change another
    process commits that a page shows (NOTIFY on PostgreSQL, the data version on
    SQLite), and not for bookkeeping no page shows."""
    where = database_for(tmp_path)
    web = await Store.open(where)
    other = await Store.open(where)
    try:
        web.version_max_age = 1.0  # as in production
        before = await web.version()
        await other.save_meta_value("worker_seen.inbox", "2026-12-02T00:00:00Z")  # not shown
        await asyncio.sleep(1.1)
        assert await web.version() == before
        await other.save_block("blocked.example", "domain")  # shown: pages hide its replies
        started = time.monotonic()
        while await web.version() == before:
            assert time.monotonic() - started < 1.5, "the change was not seen within a second"
            await asyncio.sleep(0.02)
    finally:
        await other.close()
        await web.close()


@pytest.mark.skipif(BACKEND != "postgresql", reason="PostgreSQL's pool of connections")
async def test_closing_cuts_a_connection_still_in_use(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A reader still held (a request cancelled mid-read, a server gone quiet) does not
    hold ``close`` forever: the pool waits for it at most its time, then cuts it."""
    monkeypatch.setattr("fediblog.store.postgres._PG_CLOSE_TIMEOUT", 0.2)
    where = database_for(tmp_path)
    store = await Store.open(where)
    assert isinstance(store, PostgresStore)
    await store._pool.acquire()  # never released
    await asyncio.wait_for(store.close(), 10)
    assert await connections_left(where) == 0


@pytest.mark.skipif(BACKEND != "postgresql", reason="PostgreSQL's listening connection")
async def test_a_store_closed_under_a_running_caller_connects_no_more(tmp_path: Path) -> None:
    """A task still using the store as it closes (a watcher asking whether anything
    changed, a write) finds it closed: it neither listens again nor reconnects."""
    where = database_for(tmp_path)
    store = await Store.open(where)
    await store.close()
    store.version_max_age = 0.0
    with contextlib.suppress(StorageError):
        await store.version()
    with contextlib.suppress(StorageError):
        await store.get_data_version()
    with pytest.raises(StorageError):
        await store.save_block("late.example", "domain")
    assert await connections_left(where) == 0


async def connections_left(where: Path | str) -> int:
    """Connections to the database besides the test harness's own (dbpeek's, the
    database's emptier), once the server has seen cut ones go (a moment later)."""
    others = (
        "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
        " AND application_name IS DISTINCT FROM ?"
    )
    for _ in range(100):
        if dbpeek.rows(where, others, [HARNESS_APPLICATION]) == [(0,)]:
            break
        await asyncio.sleep(0.05)
    [(count,)] = dbpeek.rows(where, others, [HARNESS_APPLICATION])
    return int(count)


@pytest.mark.skipif(
    BACKEND != "postgresql", reason="on SQLite no other process writes while one does"
)
async def test_a_batched_reply_to_a_comment_another_process_just_made_nests_under_it(
    tmp_path: Path,
) -> None:
    """Replies processed in a batch keep their rows for one write; on PostgreSQL their ids
    are taken from the sequence ahead of time. A reply to a comment another process
    committed meanwhile (with an id above those taken) must still get an id above its
    parent's, or the response walk, which follows replies to larger ids only, would
    never show it."""
    where = database_for(tmp_path)
    worker = await Store.open(where)
    other = await Store.open(where)
    try:
        post, reply = await batch_replies(worker)
        async with worker.shared_transaction():
            first = await worker.save_comment_later(**reply(1, None))  # takes ids ahead
            meanwhile = await other.save_comment(**reply(2, None), source="fediverse")
            answer = await worker.save_comment_later(**reply(3, meanwhile))
        assert first < meanwhile < answer
        walk = await worker.list_response_walk(post.id, 10, max_depth=4)
        assert [entry[0] for entry in walk] == [first, meanwhile, answer]
        assert walk[2][1] == walk[1][2]  # the answer is listed under the comment it answers
    finally:
        await other.close()
        await worker.close()


# ---- the order of a post's responses ------------------------------------------------------


@pytest.mark.parametrize("seed", range(6))
async def test_the_in_memory_walk_orders_responses_as_sqlite_s_recursive_query(
    tmp_path: Path, seed: int
) -> None:
    """PostgreSQL walks a post's responses in memory (``_walk_in_memory``), SQLite with
    a recursive query: on random threads (times out of order and tied, replies deeper
    than the page nests, deleted placeholders, a parent on another post, a parent
    after its reply), both give the same entries in the same order, whatever the page
    size and depth."""
    rng = random.Random(seed)
    database = tmp_path / "walk.db"
    store = await Store.open(database)  # SQLite's query is the reference
    try:
        post = await publish_on(store, "Walk")
        other = await publish_on(store, "Elsewhere")
        actor = await bare_actor(store, "w", "w.example", "W")
        elsewhere = await store.save_seed_comments(
            other.id, [(None, actor, "https://w.example/n/x", "<p>x</p>", utcnow())]
        )
        count = 300
        comments = []
        for n in range(count):
            parent = rng.choice([None, None, *range(max(0, n - 20), n)]) if n else None
            moment = post.published + timedelta(seconds=rng.choice([n, n, rng.randrange(count)]))
            comments.append((parent, actor, f"https://w.example/n/{n}", "<p>w</p>", moment))
        first = await store.save_seed_comments(post.id, comments)
        for n in rng.sample(range(count), 30):
            await store.set_comment_status(first + n, "deleted")
        dbpeek.execute(
            database,
            ("UPDATE comments SET parent_id = ? WHERE id = ?", (elsewhere, first + 7)),
            ("UPDATE comments SET parent_id = ? WHERE id = ?", (first + 200, first + 9)),
        )
        rows = await store._fetchall(PostgresStore._THREAD_ROWS, (post.id,))
        for limit, depth in [(1, 1), (10, 2), (50, 4), (120, 3), (400, 6), (400, 1)]:
            expected = await store.list_response_walk(post.id, limit, max_depth=depth)
            assert len(expected) == min(limit, count)
            assert _walk_in_memory(rows, limit, depth) == expected, (limit, depth)
    finally:
        await store.close()


Reply = Callable[..., dict[str, Any]]


async def batch_replies(store: Store) -> tuple[Post, Reply]:
    """A post, and ``reply(n, parent=None)``: the fields of reply n to it from one
    remote actor, as ``save_comment_later`` (and ``save_comment``) take them."""
    post = await publish_on(store, "Batch")
    actor = await bare_actor(store, "b", "b.example", "B")

    def reply(n: int, parent: int | None = None) -> dict[str, Any]:
        return dict(
            post_id=post.id, parent_id=parent, content_html=f"<p>{n}</p>",
            published=utcnow(), received=utcnow(), ap_id=f"https://b.example/n/{n}",
            url=None, actor_id=actor, summary=None, sensitive=False,
            visibility="public", status="published", held_reason=None,
        )  # fmt: skip

    return post, reply


async def publish_on(store: Store, title: str) -> Post:
    return await store.save_new_post(
        PostDraft(title=title, slug=title.lower(), body_md="x"),
        uid=title.lower(),
        body_html="<p>x</p>",
        published=utcnow() - timedelta(days=1),
    )
