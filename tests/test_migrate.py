"""`fediblog migrate`: a blog moved from its SQLite file to PostgreSQL, then served.

These need a PostgreSQL server: they run in the suite's PostgreSQL pass
(``python -m tests.pgcluster pytest``), where each test folder has a database of its
own on the throwaway cluster; the SQLite pass skips them.
"""

from __future__ import annotations

import asyncio
import hashlib
from pathlib import Path

import httpx
import pytest

from fediblog.config import Settings
from fediblog.store import Store
from fediblog.web.deps import Services
from tests import dbpeek
from tests.conftest import BACKEND, BASE_URL, database_for, deliver, make_settings
from tests.fediverse import Fediverse
from tests.helpers import publish, run, running, soup
from tests.test_admin_health import follow

pytestmark = [
    pytest.mark.postgresql,  # -m postgresql: where backends differ
    pytest.mark.anyio,
    pytest.mark.skipif(
        BACKEND != "postgresql",
        reason="moves a blog to PostgreSQL: runs in the PostgreSQL pass"
        " (python -m tests.pgcluster pytest)",
    ),
]


async def cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    return await asyncio.to_thread(run, capsys, *args)  # the CLI runs its own event loop


def key_digests(settings: Settings) -> dict[str, str]:
    return {
        path.name: hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(settings.keys_dir.iterdir())
    }


async def sqlite_blog(tmp_path: Path, fediverse: Fediverse) -> tuple[Settings, str]:
    """A blog on SQLite with two followers, a post with a thread of two replies, and
    deliveries still queued (nothing sends them: no workers run). Returns its
    settings and the post's URL path."""
    settings = make_settings(tmp_path, database=tmp_path / "data" / "old.db")
    async with running(settings, transport=fediverse.transport(), run_workers=False) as app:
        ctx: Services = app.state.services
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url=BASE_URL) as web:
            ann = fediverse.add("one.example", "ann")
            bob = fediverse.add("two.example", "bob")
            for actor in (ann, bob):
                assert (await deliver(web, ctx, actor, follow(ctx, actor))).status_code == 202
            post = await publish(ctx, "Moving house", "Same words, new cellar.")
            target = ctx.urls.object_id(post.uid)
            first = ann.note(1, target, "Ann was here first")
            assert (await deliver(web, ctx, ann, ann.create(first))).status_code == 202
            second = bob.note(1, first["id"], "Bob answers Ann")
            assert (await deliver(web, ctx, bob, bob.create(second))).status_code == 202
            page = await web.get(f"/posts/{post.slug}")
            assert "Bob answers Ann" in page.text
    return settings, f"/posts/{post.slug}"


async def counts(store: Store) -> tuple[int, dict[str, int], dict[str, int], int]:
    return (
        await store.count_followers("accepted"),
        await store.count_deliveries(),
        await store.count_inbox(),
        await store.count_comments(),
    )


async def test_a_blog_moved_to_postgresql_serves_the_same_and_goes_on(
    tmp_path: Path, fediverse: Fediverse, capsys: pytest.CaptureFixture[str]
) -> None:
    old, path = await sqlite_blog(tmp_path, fediverse)
    keys_before = key_digests(old)
    source = await Store.open(old.database, create=False)
    try:
        before = await counts(source)
    finally:
        await source.close()
    assert before[0] == 2
    assert before[1].get("queued", 0) >= 3
    assert before[3] == 2

    url = database_for(tmp_path / "new")
    assert isinstance(url, str)
    code, out, err = await cli(capsys, "migrate", "--from", str(old.database), "--to", url)
    assert (code, err) == (0, "")
    assert "2 followers" in out
    assert "2 comments" in out
    # The copy's statistics are the planner's at once, not after autovacuum's next turn.
    analyzed = "SELECT relname, reltuples FROM pg_class WHERE relname IN ('comments', 'followers')"
    assert sorted(dbpeek.rows(url, analyzed)) == [("comments", 2.0), ("followers", 2.0)]

    new = make_settings(tmp_path, database=url)
    assert key_digests(new) == keys_before  # the keys were not touched
    async with running(new, transport=fediverse.transport(), run_workers=False) as app:
        ctx: Services = app.state.services
        assert type(ctx.store).__name__ == "PostgresStore"
        assert await counts(ctx.store) == before  # queued deliveries still queued
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url=BASE_URL) as web:
            page = soup((await web.get(path)).text)
            replies = [item.get_text(" ", strip=True) for item in page.select(".e-content")]
            assert any("Ann was here first" in text for text in replies)
            assert any("Bob answers Ann" in text for text in replies)
            # The blog goes on where it was: a new reply takes the next free id.
            ann = fediverse.add("one.example", "ann")
            post = await ctx.store.get_post_by_slug(path.rsplit("/", 1)[1])
            assert post is not None
            note = ann.note(2, ctx.urls.object_id(post.uid), "Ann, after the move")
            assert (await deliver(web, ctx, ann, ann.create(note))).status_code == 202
            assert "Ann, after the move" in (await web.get(path)).text
            assert await ctx.store.count_comments() == 3
            # And the deliveries queued before the move are sent from the new database.
            sent = await ctx.deliverer.deliver_once()
            assert sent >= 3
            assert (await ctx.store.count_deliveries()).get("queued", 0) == 0


async def test_a_database_already_in_use_is_refused_and_left_as_it_was(
    tmp_path: Path, fediverse: Fediverse, capsys: pytest.CaptureFixture[str]
) -> None:
    old, _ = await sqlite_blog(tmp_path, fediverse)
    url = database_for(tmp_path / "new")
    assert isinstance(url, str)
    assert (await cli(capsys, "migrate", "--from", str(old.database), "--to", url))[0] == 0

    code, out, err = await cli(capsys, "migrate", "--from", str(old.database), "--to", url)
    assert code == 1
    assert out == ""
    assert "already holds a blog" in err
    assert "Traceback" not in err
    store = await Store.open(url)
    try:
        assert await store.count_comments() == 2  # not copied twice
    finally:
        await store.close()


async def test_wrong_arguments_get_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    absent = str(tmp_path / "absent.db")
    code, _, err = await cli(capsys, "migrate", "--from", absent, "--to", "x.db")
    assert code == 2
    assert "--to must be a postgresql:// URL" in err
    url = database_for(tmp_path / "new")
    assert isinstance(url, str)
    code, _, err = await cli(capsys, "migrate", "--from", absent, "--to", url)
    assert code == 1
    assert "no database at" in err
    assert "Traceback" not in err
    # A server that cannot be reached: one line, and the URL's password never shown.
    await (await Store.open(tmp_path / "empty.db")).close()
    empty = str(tmp_path / "empty.db")
    for port in ("1", "99999"):  # nothing listens there; no such port
        secret = f"postgresql://postgres:hunter2@127.0.0.1:{port}/blog"
        code, out, err = await cli(capsys, "migrate", "--from", empty, "--to", secret)
        assert code == 1
        assert "cannot use the database postgresql://postgres:***@127.0.0.1" in err
        assert "hunter2" not in out + err
        assert err.count("\n") == 1
        assert "Traceback" not in err
