"""Atom (/feed.xml) and JSON Feed 1.1 (/feed.json): the newest posts, in full."""

from __future__ import annotations

import json
from datetime import UTC, datetime

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from fediblog.models import format_ts
from fediblog.web.cache import CachedPage
from fediblog.web.deps import Services
from fediblog.web.pages import cached

FEED_SIZE = 20
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
                    "content_html": post.body_html,
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


routes = [Route("/feed.xml", atom), Route("/feed.json", json_feed)]
