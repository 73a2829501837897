"""The reader's HTML pages: index, posts with their responses, tags, about, 404.

Every page is rendered from one or two queries, then cached per database version
(see ``web.cache``); a hot post page is a dictionary lookup.
"""

from __future__ import annotations

from typing import Any

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.routing import Route

from fediblog.comments import build_threads, count_responses
from fediblog.models import Author
from fediblog.render import excerpt
from fediblog.web.activitypub import post_document, wants_activitypub
from fediblog.web.cache import CachedPage, respond
from fediblog.web.deps import Services, services
from fediblog.web.pages import cached

HTML = "text/html; charset=utf-8"


def page_number(request: Request) -> int:
    raw = request.query_params.get("page", "1")
    if not raw.isdigit() or not 1 <= int(raw) <= 100_000:
        raise HTTPException(400, "page must be a whole number from 1")
    return int(raw)


def html_page(
    ctx: Services, template: str, *, vary: str = "Accept-Encoding", **context: object
) -> CachedPage:
    body = ctx.templates.get_template(template).render(site=ctx.settings, **context)
    return CachedPage.build(body.encode(), media_type=HTML, vary=vary)


async def _post_list(ctx: Services, page: int, tag: str | None, heading: str) -> CachedPage | None:
    per_page = ctx.settings.posts_per_page
    total = await ctx.store.count_posts(tag)
    pages = max(1, -(-total // per_page))
    if page > pages or (tag is not None and total == 0):
        return None
    posts = await ctx.store.list_posts(limit=per_page, offset=(page - 1) * per_page, tag=tag)
    return html_page(ctx, "index.html", posts=posts, page=page, pages=pages, heading=heading)


async def index(request: Request) -> Response:
    page = page_number(request)
    return await cached(request, f"index:{page}", lambda ctx: _post_list(ctx, page, None, ""))


async def tag_page(request: Request) -> Response:
    tag = request.path_params["tag"]
    page = page_number(request)
    return await cached(
        request,
        f"tag:{tag}:{page}",
        lambda ctx: _post_list(ctx, page, tag, f"Posts tagged #{tag}"),
    )


async def tags(request: Request) -> Response:
    async def render(ctx: Services) -> CachedPage:
        return html_page(ctx, "tags.html", tags=await ctx.store.list_tags())

    return await cached(request, "tags", render)


async def about(request: Request) -> Response:
    async def render(ctx: Services) -> CachedPage:
        count = await ctx.store.count_posts()
        return html_page(ctx, "about.html", post_count=count)

    return await cached(request, "about", render)


async def post_page(request: Request) -> Response:
    slug = request.path_params["slug"]
    ctx = services(request)
    if wants_activitypub(request):  # the same URL, for servers: the post's object
        found = await ctx.store.get_post_by_slug(slug)
        if found is None:
            raise HTTPException(404)
        return post_document(ctx, found)
    # Cached pages answer before any query; only a miss asks whether the slug moved.
    version = await ctx.store.version()
    key = f"post:{slug}"
    page = ctx.pages.get(key, version, max_stale=ctx.store.version_max_age)
    if page is None:
        post = await ctx.store.get_post_by_slug(slug)
        if post is None:
            new_slug = await ctx.store.get_current_slug(slug)
            if new_slug is not None:
                return RedirectResponse(f"/posts/{new_slug}", status_code=301)
            raise HTTPException(404)
        comments = await ctx.store.list_visible_comments(post.id)
        threads = build_threads(comments)
        reactions = await ctx.store.list_reactions(post.id)
        page = html_page(
            ctx,
            "post.html",
            vary="Accept, Accept-Encoding",
            post=post,
            url=ctx.blog.post_url(post),
            object_id=ctx.blog.object_id(post.uid),
            description=post.summary or excerpt(post.body_html, 200),
            threads=threads,
            response_count=count_responses(threads),
            likes=[reactor(r) for r in reactions if r["type"] == "Like"],
            boosts=[reactor(r) for r in reactions if r["type"] == "Announce"],
        )
        page = ctx.pages.put(key, version, page)
    return respond(request, page)


def reactor(row: Any) -> Author:
    """Who liked or boosted, shown like a comment's author: host from the actor id."""
    return Author(
        name=row["name"] or row["username"],
        handle=f"@{row['username']}@{row['domain']}",
        profile_url=row["url"] or row["ap_id"],
        avatar_url=row["icon_url"],
    )


async def not_found(request: Request, exc: Exception) -> Response:
    ctx = services(request)
    body = ctx.templates.get_template("404.html").render(site=ctx.settings, message=None)
    return Response(body, status_code=404, media_type=HTML)


routes = [
    Route("/", index),
    Route("/posts/{slug}", post_page),
    Route("/tags", tags),
    Route("/tags/{tag}", tag_page),
    Route("/about", about),
]
