"""Atom (/feed.xml) and JSON Feed 1.1 (/feed.json): the newest posts, in full.

Responses have Atom feeds too: each post's published ones, newest first
(/posts/SLUG/responses.atom, linked from the post's page), and the author's private
feed of new and held ones under every post (/feeds/responses/TOKEN.atom, notify.py).
"""

from __future__ import annotations

import hmac
import json
from datetime import UTC, datetime

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from fediblog.activitystreams import absolute_media
from fediblog.models import ResponseEntry, format_ts
from fediblog.notify import FEED_META_KEY, private_feed_path
from fediblog.web.cache import CachedPage
from fediblog.web.deps import Services, services
from fediblog.web.pages import cached

FEED_SIZE = 20
RESPONSES_FEED_SIZE = 50
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


async def atom(request: Request) -> Response:
    async def render(ctx: Services) -> CachedPage:
        posts = await ctx.store.list_posts(limit=FEED_SIZE)
        # An empty feed is "updated" when the blog was set up; the epoch is as honest.
        updated = max((post.last_modified for post in posts), default=EPOCH)
        body = ctx.templates.get_template("feed.xml").render(
            site=ctx.settings,
            posts=posts,
            updated=updated,
            post_url=ctx.blog.post_url,
            object_id=lambda post: ctx.blog.object_id(post.uid),
            content=lambda post: absolute_media(post.body_html, ctx.settings.base_url),
        )
        return CachedPage.build(body.encode(), media_type="application/atom+xml; charset=utf-8")

    return await cached(request, "feed.xml", render)


async def json_feed(request: Request) -> Response:
    async def render(ctx: Services) -> CachedPage:
        settings = ctx.settings
        posts = await ctx.store.list_posts(limit=FEED_SIZE)
        feed = {
            "version": "https://jsonfeed.org/version/1.1",
            "title": settings.title,
            "description": settings.description,
            "home_page_url": settings.url("/"),
            "feed_url": settings.url("/feed.json"),
            "language": settings.language,
            "authors": [{"name": settings.author, "url": settings.url("/about")}],
            "items": [
                {
                    "id": ctx.blog.object_id(post.uid),
                    "url": ctx.blog.post_url(post),
                    "title": post.title,
                    "content_html": absolute_media(post.body_html, settings.base_url),
                    **({"summary": post.summary} if post.summary else {}),
                    **({"image": post.image} if post.image else {}),
                    "date_published": format_ts(post.published),
                    "date_modified": format_ts(post.last_modified),
                    "tags": list(post.tags),
                }
                for post in posts
            ],
        }
        body = json.dumps(feed, ensure_ascii=False, indent=1).encode()
        return CachedPage.build(body, media_type="application/feed+json; charset=utf-8")

    return await cached(request, "feed.json", render)


async def post_responses(request: Request) -> Response:
    """A post's published responses, newest first: for readers who follow a thread."""
    slug = request.path_params["slug"]

    async def render(ctx: Services) -> CachedPage | None:
        post = await ctx.store.get_post_by_slug(slug)
        if post is None:
            return None
        entries = await ctx.store.list_post_responses(post.id, RESPONSES_FEED_SIZE)
        return _responses_feed(
            ctx,
            entries,
            title=f"Responses to “{post.title}”",
            path=f"/posts/{slug}/responses.atom",
            alternate=ctx.settings.url(f"/posts/{slug}#responses"),
            private=False,
        )

    return await cached(request, f"responses.atom:{slug}", render)


async def private_responses(request: Request) -> Response:
    """The author's feed of new and held responses under every post, at a secret URL
    (``fediblog feeds``); any other token, or none made yet, is a plain 404."""
    ctx = services(request)
    expected = await ctx.store.get_meta_value(FEED_META_KEY)
    given = str(request.path_params["token"])
    if expected is None or not hmac.compare_digest(expected.encode(), given.encode()):
        raise HTTPException(404)

    async def render(ctx: Services) -> CachedPage:
        entries = await ctx.store.list_new_responses(RESPONSES_FEED_SIZE)
        return _responses_feed(
            ctx,
            entries,
            title=f"New responses on {ctx.settings.title}",
            path=private_feed_path(given),
            alternate=ctx.settings.url("/"),
            private=True,
        )

    # Keyed by the token: a rotated one is never served from the cache, nor its URL shown.
    return await cached(request, f"responses.atom:private:{given}", render)


def _responses_feed(
    ctx: Services,
    entries: list[ResponseEntry],
    *,
    title: str,
    path: str,
    alternate: str,
    private: bool,
) -> CachedPage:
    updated = max(
        (entry.comment.updated or entry.comment.published for entry in entries), default=EPOCH
    )
    body = ctx.templates.get_template("responses.xml").render(
        site=ctx.settings,
        entries=entries,
        title=title,
        feed_id=ctx.settings.url("/feeds/responses" if private else path),
        self_url=ctx.settings.url(path),
        alternate=alternate,
        updated=updated,
        private=private,
    )
    return CachedPage.build(
        body.encode(),
        media_type="application/atom+xml; charset=utf-8",
        # The private feed must stay out of shared caches: its URL is its only lock.
        cache_control="private, no-cache" if private else "public, no-cache",
    )


routes = [
    Route("/feed.xml", atom),
    Route("/feed.json", json_feed),
    Route("/posts/{slug}/responses.atom", post_responses),
    Route("/feeds/responses/{token}.atom", private_responses),
]
