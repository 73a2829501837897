"""Drafts, scheduled posts and pinned posts (issue 9): who sees what, and when it goes out."""

from __future__ import annotations

import json
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest

from fediblog.activitystreams import PUBLIC
from fediblog.blog import parse_post
from fediblog.config import Settings
from fediblog.errors import PostError
from fediblog.models import Post, format_ts, utcnow
from fediblog.schedule import Scheduler
from fediblog.web.deps import Services
from tests.conftest import BASE_URL
from tests.fediverse import Fediverse
from tests.helpers import publish, run, running

AP = {"Accept": "application/activity+json"}
FOLLOWER = "https://social.example/users/ann"
SHARED_INBOX = "https://social.example/inbox"

pytestmark = pytest.mark.anyio


async def _follower(services: Services) -> None:
    actor_id = await services.store.save_actor(
        ap_id=FOLLOWER,
        username="ann",
        domain="social.example",
        name="Ann",
        url=None,
        icon_url=None,
        inbox=FOLLOWER + "/inbox",
        shared_inbox=SHARED_INBOX,
        key_id=FOLLOWER + "#main-key",
        public_key_pem=None,
        fetched=utcnow(),
    )
    await services.store.save_follower(
        actor_id=actor_id,
        follow_id="https://social.example/follows/1",
        inbox=FOLLOWER + "/inbox",
        shared_inbox=SHARED_INBOX,
        status="accepted",
    )


async def _queued(services: Services) -> list[dict[str, Any]]:
    """Every activity queued for delivery now, in order."""
    jobs = await services.store.list_due_deliveries(utcnow() + timedelta(days=1), 100)
    return [json.loads(job.payload) for job in jobs]


async def _seen(web: httpx.AsyncClient, post: Post, services: Services) -> dict[str, bool]:
    """Where readers and servers can find the post, place by place."""
    object_id = services.urls.object_id(post.uid)
    outbox = (await web.get("/users/blog/outbox?page=1", headers=AP)).json()
    feed_json = (await web.get("/feed.json")).json()
    return {
        "index": post.title in (await web.get("/")).text,
        "tag page": (await web.get("/tags/secret")).status_code == 200,
        "tags": "secret" in (await web.get("/tags")).text,
        "post page": (await web.get(f"/posts/{post.slug}")).status_code == 200,
        "post object": (await web.get(f"/posts/{post.slug}", headers=AP)).status_code == 200,
        "atom feed": post.title in (await web.get("/feed.xml")).text,
        "json feed": any(item["title"] == post.title for item in feed_json["items"]),
        "outbox": any(item["object"]["id"] == object_id for item in outbox["orderedItems"]),
        "ap id": (await web.get(f"/p/{post.uid}", headers=AP)).status_code == 200,
        "activity": (await web.get(f"/p/{post.uid}/activity", headers=AP)).status_code == 200,
        "replies": (await web.get(f"/p/{post.uid}/replies", headers=AP)).status_code == 200,
    }


def _nowhere(seen: dict[str, bool]) -> bool:
    return not any(seen.values())


# ---- front matter --------------------------------------------------------------------


def test_draft_is_a_front_matter_key_and_must_be_true_or_false() -> None:
    assert parse_post("---\ntitle: T\ndraft: true\n---\nx").draft is True
    assert parse_post("---\ntitle: T\ndraft: false\n---\nx").draft is False
    assert parse_post("---\ntitle: T\n---\nx").draft is None
    with pytest.raises(PostError, match="draft must be true or false"):
        parse_post("---\ntitle: T\ndraft: maybe\n---\nx")


# ---- drafts ----------------------------------------------------------------------------


async def test_a_draft_is_invisible_everywhere_until_published(
    web: httpx.AsyncClient, ctx: Services
) -> None:
    await _follower(ctx)
    await publish(ctx, "Visible one")  # so the index and feeds are not empty
    before = len(await _queued(ctx))
    draft = await publish(ctx, "Secret draft", draft="true", tags="[secret]")
    assert draft.state == "draft"
    assert len(await _queued(ctx)) == before  # no Create
    assert _nowhere(await _seen(web, draft, ctx))

    await ctx.blog.publish_now(draft.slug)
    queued = await _queued(ctx)
    creates = [a for a in queued[before:] if a["type"] == "Create"]
    assert len(queued) == before + 1
    assert len(creates) == 1
    assert creates[0]["object"]["id"] == ctx.urls.object_id(draft.uid)
    assert all((await _seen(web, draft, ctx)).values())


async def test_the_preview_url_shows_a_draft_privately(
    web: httpx.AsyncClient, ctx: Services
) -> None:
    draft = await publish(ctx, "Work in progress", "Half *done*.", draft="true")
    url = await ctx.blog.preview_url(draft.slug)
    assert url.startswith(BASE_URL + "/preview/")
    page = await web.get(url.removeprefix(BASE_URL))
    assert page.status_code == 200
    assert "Work in progress" in page.text
    assert "<em>done</em>" in page.text
    assert "Draft" in page.text
    assert "not published" in page.text
    assert '<meta name="robots" content="noindex, nofollow">' in page.text
    assert page.headers["cache-control"] == "private, no-store"
    assert "noindex" in page.headers["x-robots-tag"]
    assert (await web.get("/preview/not-a-token")).status_code == 404
    # Published, the preview leads to the real page.
    await ctx.blog.publish_now(draft.slug)
    moved = await web.get(url.removeprefix(BASE_URL))
    assert moved.status_code == 302
    assert moved.headers["location"].endswith(f"/posts/{draft.slug}")


async def test_each_draft_has_its_own_preview_token(ctx: Services) -> None:
    one = await publish(ctx, "One", draft="true")
    two = await publish(ctx, "Two", draft="true")
    assert await ctx.blog.preview_url(one.slug) != await ctx.blog.preview_url(two.slug)


async def test_editing_a_draft_keeps_it_a_draft_unless_the_file_says_false(
    web: httpx.AsyncClient, ctx: Services
) -> None:
    await _follower(ctx)
    draft = await publish(ctx, "Draft", draft="true")
    edited = await ctx.blog.edit(draft.slug, parse_post("---\ntitle: Draft, edited\n---\nNew."))
    assert edited.state == "draft"
    assert edited.title == "Draft, edited"
    assert await _queued(ctx) == []
    out = await ctx.blog.edit(draft.slug, parse_post("---\ntitle: Out\ndraft: false\n---\nx"))
    assert out.state == "published"
    assert out.updated is None
    assert [a["type"] for a in await _queued(ctx)] == ["Create"]
    assert (await web.get(f"/posts/{out.slug}")).status_code == 200


async def test_a_published_post_cannot_become_a_draft(ctx: Services) -> None:
    post = await publish(ctx, "Out there")
    with pytest.raises(PostError, match="cannot become a draft"):
        await ctx.blog.edit(post.slug, parse_post("---\ntitle: Back\ndraft: true\n---\nx"))


async def test_deleting_a_draft_sends_nothing(ctx: Services) -> None:
    await _follower(ctx)
    draft = await publish(ctx, "Never mind", draft="true")
    await ctx.blog.delete(draft.slug)
    assert await _queued(ctx) == []


# ---- schedules -------------------------------------------------------------------------


def _scheduler(ctx: Services, at: Any) -> Scheduler:
    return Scheduler(ctx.blog, clock=lambda: at)


async def test_a_scheduled_post_appears_and_is_delivered_when_its_time_comes(
    web: httpx.AsyncClient, ctx: Services, fediverse: Fediverse
) -> None:
    await _follower(ctx)
    when = utcnow() + timedelta(hours=2)
    post = await publish(ctx, "Later", published=format_ts(when), tags="[secret]")
    assert post.state == "scheduled"
    assert post.published == when
    assert await _queued(ctx) == []
    assert _nowhere(await _seen(web, post, ctx))

    assert await _scheduler(ctx, when - timedelta(minutes=1)).run_once() == 0
    assert _nowhere(await _seen(web, post, ctx))

    assert await _scheduler(ctx, when + timedelta(seconds=30)).run_once() == 1
    assert all((await _seen(web, post, ctx)).values())
    await ctx.deliverer.deliver_once()
    sent = [json.loads(body) for url, _, body in fediverse.received if url == SHARED_INBOX]
    assert [(a["type"], a["object"]["id"]) for a in sent] == [
        ("Create", ctx.urls.object_id(post.uid))
    ]
    assert sent[0]["object"]["published"] == format_ts(when)
    assert await ctx.store.get_schedule_state(post.id) is None  # nothing left to do
    # Done is done: a later pass publishes nothing twice.
    assert await _scheduler(ctx, when + timedelta(hours=1)).run_once() == 0
    assert len(await _queued(ctx)) == 0


async def test_a_scheduled_post_is_published_after_a_restart(
    settings: Settings, fediverse: Fediverse
) -> None:
    when = utcnow() + timedelta(minutes=10)
    async with running(settings, transport=fediverse.transport(), run_workers=False) as app:
        ctx: Services = app.state.services
        await _follower(ctx)
        post = await publish(ctx, "Across restarts", published=format_ts(when))
    async with running(settings, transport=fediverse.transport(), run_workers=False) as app:
        ctx = app.state.services
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url=BASE_URL) as web:
            assert (await web.get(f"/posts/{post.slug}")).status_code == 404
            assert await _scheduler(ctx, when + timedelta(minutes=1)).run_once() == 1
            assert (await web.get(f"/posts/{post.slug}")).status_code == 200
            assert [a["type"] for a in await _queued(ctx)] == ["Create"]


async def test_editing_a_scheduled_posts_date_reschedules_it(ctx: Services) -> None:
    first = utcnow() + timedelta(hours=1)
    later = first + timedelta(days=1)
    post = await publish(ctx, "Moving", published=format_ts(first))
    edited = await ctx.blog.edit(
        post.slug, parse_post(f"---\ntitle: Moving\npublished: {format_ts(later)}\n---\nx")
    )
    assert edited.state == "scheduled"
    assert edited.published == later
    assert await _scheduler(ctx, first + timedelta(minutes=1)).run_once() == 0
    assert (await ctx.store.get_authored_post(post.slug)).state == "scheduled"  # type: ignore[union-attr]
    assert await _scheduler(ctx, later).run_once() == 1
    assert (await ctx.store.get_post_by_slug(post.slug)) is not None


async def test_a_claimed_job_whose_post_moved_later_waits_for_the_new_time(
    ctx: Services,
) -> None:
    """The worker claimed the row, then the author moved the date: it publishes nothing."""
    first = utcnow() + timedelta(hours=1)
    post = await publish(ctx, "Raced", published=format_ts(first))
    assert await ctx.blog.publish_due(post.id, first - timedelta(seconds=1)) == first
    assert (await ctx.store.get_post_by_slug(post.slug)) is None


async def test_publishing_a_scheduled_post_by_hand_sends_it_now(ctx: Services) -> None:
    await _follower(ctx)
    post = await publish(ctx, "Impatient", published=format_ts(utcnow() + timedelta(days=3)))
    published = await ctx.blog.publish_now(post.slug)
    assert published.state == "published"
    assert published.published <= utcnow()
    assert [a["type"] for a in await _queued(ctx)] == ["Create"]
    assert await _scheduler(ctx, utcnow() + timedelta(days=4)).run_once() == 0
    assert len(await _queued(ctx)) == 1


async def test_publishing_a_draft_dated_later_schedules_it(ctx: Services) -> None:
    when = utcnow() + timedelta(days=2)
    draft = await publish(ctx, "Planned", published=format_ts(when), draft="true")
    assert draft.state == "draft"
    scheduled = await ctx.blog.publish_now(draft.slug)
    assert scheduled.state == "scheduled"
    assert scheduled.published == when
    assert await _queued(ctx) == []


# ---- pinned posts ----------------------------------------------------------------------


async def test_the_featured_collection_round_trips(web: httpx.AsyncClient, ctx: Services) -> None:
    await _follower(ctx)
    actor = (await web.get("/users/blog", headers=AP)).json()
    featured_url = f"{BASE_URL}/users/blog/collections/featured"
    assert actor["featured"] == featured_url
    assert actor["@context"][-1]["featured"] == {"@id": "toot:featured", "@type": "@id"}
    empty = (await web.get("/users/blog/collections/featured", headers=AP)).json()
    assert empty["type"] == "OrderedCollection"
    assert empty["orderedItems"] == []

    old = await publish(ctx, "Old favourite", published="2020-01-01")
    new = await publish(ctx, "New favourite", published="2021-01-01")
    await publish(ctx, "Newest, not pinned")
    await ctx.blog.pin(old.slug)
    await ctx.blog.pin(new.slug)
    found = (await web.get("/users/blog/collections/featured", headers=AP)).json()
    assert found["id"] == featured_url
    assert found["totalItems"] == 2
    ids = [item["id"] for item in found["orderedItems"]]
    assert ids == [ctx.urls.object_id(new.uid), ctx.urls.object_id(old.uid)]  # latest pin first
    assert found["orderedItems"][0]["type"] == "Article"

    await ctx.blog.pin(new.slug, pinned=False)
    found = (await web.get("/users/blog/collections/featured", headers=AP)).json()
    assert [item["id"] for item in found["orderedItems"]] == [ctx.urls.object_id(old.uid)]

    pins = [a for a in await _queued(ctx) if a["type"] in ("Add", "Remove")]
    assert [(a["type"], a["object"]) for a in pins] == [
        ("Add", ctx.urls.object_id(old.uid)),
        ("Add", ctx.urls.object_id(new.uid)),
        ("Remove", ctx.urls.object_id(new.uid)),
    ]
    for activity in pins:
        assert activity["target"] == featured_url
        assert activity["actor"] == ctx.urls.actor
        assert activity["to"] == [PUBLIC]
        assert activity["cc"] == [ctx.urls.followers]
    assert len({a["id"] for a in pins}) == 3


async def test_a_pinned_post_shows_first_on_the_index_marked_pinned(
    web: httpx.AsyncClient, ctx: Services
) -> None:
    old = await publish(ctx, "An old classic", published="2020-01-01")
    await publish(ctx, "Fresh news")
    await ctx.blog.pin(old.slug)
    page = (await web.get("/")).text
    assert page.index("An old classic") < page.index("Fresh news")
    assert page.count("pinned-mark") == 1
    assert page.index("Pinned") < page.index("An old classic")
    # Feeds stay in date order.
    feed = (await web.get("/feed.xml")).text
    assert feed.index("Fresh news") < feed.index("An old classic")


async def test_pinning_a_draft_or_twice_is_refused(ctx: Services) -> None:
    draft = await publish(ctx, "Unready", draft="true")
    with pytest.raises(PostError, match="not published"):
        await ctx.blog.pin(draft.slug)
    post = await publish(ctx, "Ready")
    await ctx.blog.pin(post.slug)
    with pytest.raises(PostError, match="already pinned"):
        await ctx.blog.pin(post.slug)


# ---- the command line ------------------------------------------------------------------


def _write(path: Path, text: str) -> str:
    path.write_text(text)
    return str(path)


def test_post_list_shows_each_posts_state(
    blog_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run(capsys, "init")
    later = format_ts(utcnow() + timedelta(days=30))
    code, out, _ = run(capsys, "post", "new", _write(blog_dir / "a.md", "---\ntitle: Live\n---\n"))
    assert code == 0
    assert out.startswith("published ")
    draft = _write(blog_dir / "b.md", "---\ntitle: Sketch\ndraft: true\n---\n")
    code, out, _ = run(capsys, "post", "new", draft)
    assert code == 0
    assert out.startswith("draft: sketch (preview: https://blog.example/preview/")
    soon = _write(blog_dir / "c.md", f"---\ntitle: Soon\npublished: {later}\n---\n")
    code, out, _ = run(capsys, "post", "new", soon)
    assert code == 0
    assert out.startswith(f"scheduled for {later}: soon")
    assert run(capsys, "post", "pin", "live")[:2] == (
        0,
        "pinned live; the Add is queued for delivery\n",
    )

    code, out, _ = run(capsys, "post", "list")
    lines = out.splitlines()
    assert code == 0
    assert len(lines) == 3
    assert f"soon  [scheduled for {later}]" in lines[0]
    assert "live  [published, pinned]" in out
    assert "sketch  [draft]" in out

    code, out, _ = run(capsys, "post", "preview", "sketch")
    assert code == 0
    assert out.startswith(BASE_URL + "/preview/")
    code, out, _ = run(capsys, "post", "publish", "sketch")
    assert (code, out) == (0, f"published: {BASE_URL}/posts/sketch\n")
    assert "sketch  [published]" in run(capsys, "post", "list")[1]
    assert run(capsys, "post", "unpin", "live")[0] == 0


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("post", "publish", "nope"), "no post has the slug 'nope'"),
        (("post", "pin", "nope"), "no post has the slug 'nope'"),
        (("post", "unpin", "nope"), "no post has the slug 'nope'"),
        (("post", "preview", "nope"), "no post has the slug 'nope'"),
        (("post", "pin", "sketch"), "'sketch' is not published (draft): publish it first"),
        (("post", "unpin", "live"), "'live' is not pinned"),
        (("post", "publish", "live"), "'live' is already published"),
        (("post", "preview", "live"), "'live' is published"),
    ],
)
def test_bad_input_is_one_line_and_exit_1(
    blog_dir: Path, capsys: pytest.CaptureFixture[str], args: tuple[str, ...], message: str
) -> None:
    run(capsys, "init")
    run(capsys, "post", "new", _write(blog_dir / "a.md", "---\ntitle: Live\n---\n"))
    run(capsys, "post", "new", _write(blog_dir / "b.md", "---\ntitle: Sketch\ndraft: true\n---\n"))
    code, out, err = run(capsys, *args)
    assert code == 1
    assert out == ""
    assert err.startswith("fediblog: error: ")
    assert message in err
    assert err.count("\n") == 1
