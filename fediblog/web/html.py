"""The reader's HTML pages: index, posts with their responses, tags, the monthly
archive, about, and the styled pages that answer a reader's 4xx.

Every page is rendered from one or two queries, then cached per database version
(see ``web.cache``); a hot post page is a dictionary lookup.

A post's responses come ``FEDIBLOG_RESPONSES_PER_PAGE`` responses a page
(``?responses=N``), in page order and numbered across pages, whatever the threads'
shape: a thread longer than what is left of a page goes on at the top of the next
(comments.py). Each response has an anchor by its database id (``#comment-ID``), a
permalink ``/posts/SLUG/comments/ID`` that redirects to the page and anchor that show
it now, and a Reply page ``/posts/SLUG/reply/ID`` with the forms aimed at it.

The archive (``/archive``: months with their counts; ``/archive/YYYY/MM``: that month's
posts) counts UTC calendar months, as publication moments are stored.
"""

from __future__ import annotations

from dataclasses import dataclass

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.routing import Route

from fediblog.comments import find_page, load_page
from fediblog.media import MediaStore
from fediblog.models import Post, Thread
from fediblog.render import excerpt
from fediblog.web.activitypub import post_document, wants_activitypub
from fediblog.web.cache import Answer, CachedPage, answer, respond
from fediblog.web.commenter import CommentForm, personal, remembered
from fediblog.web.deps import Services, services
from fediblog.web.pages import cached
from fediblog.web.paths import row_id

HTML = "text/html; charset=utf-8"


def page_number(request: Request) -> int:
    raw = request.query_params.get("page", "1")
    if not raw.isdigit() or not 1 <= int(raw) <= 100_000:
        raise HTTPException(400, "the page must be a whole number from 1, as in ?page=2")
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
    posts = await ctx.store.list_posts(
        limit=per_page, offset=(page - 1) * per_page, tag=tag, pinned_first=tag is None
    )
    return html_page(
        ctx, "index.html", posts=posts, page=page, pages=pages, heading=heading, archive=None
    )


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
        face = await MediaStore(ctx.settings, ctx.store).load_face()
        return html_page(ctx, "about.html", post_count=count, face=face)

    return await cached(request, "about", render)


async def post_page(request: Request) -> Response:
    slug = request.path_params["slug"]
    ctx = services(request)
    if wants_activitypub(request):  # the same URL, for servers: the post's object
        found = await ctx.store.get_post_by_slug(slug)
        if found is None:
            # An old slug moves for servers as for browsers: the same redirect.
            new_slug = await ctx.store.get_current_slug(slug)
            if new_slug is not None:
                return RedirectResponse(
                    responses_url(new_slug, 1), status_code=301, headers={"Vary": "Accept"}
                )
            raise HTTPException(404)
        return post_document(ctx, found)
    number = responses_page_number(request)
    # Cached pages answer before any query; only a miss asks whether the slug moved.
    # One entry per page of responses: the only query parameter the HTML depends on.
    version = await ctx.store.version()
    key = post_key(slug, number)
    shared = shares_cached_page(request)
    reader = None if shared else remembered(request)
    page = ctx.pages.get(key, version, ctx.store.version_max_age) if shared else None
    if page is None:
        post = await ctx.store.get_post_by_slug(slug)
        if post is None:
            new_slug = await ctx.store.get_current_slug(slug)
            if new_slug is not None:
                return RedirectResponse(responses_url(new_slug, number), status_code=301)
            raise HTTPException(404)
        rendered = await _post_with_responses(ctx, post, number, reader)
        if rendered is None:
            raise HTTPException(404)  # past the last page: never cached
        if not shared:
            return personal(rendered)
        page = ctx.pages.put(key, version, rendered)
    return respond(request, page)


def shares_cached_page(request: Request) -> bool:
    """Whether this reader of a post page gets the page every reader shares, from and
    into the page cache: not one the comment form remembers (their page is their own,
    web/commenter.py). The handler and the app's fast path (app.py) both ask here."""
    return remembered(request) is None


def post_key(slug: str, number: int) -> str:
    """The page cache's key for a post's page of responses ``number``."""
    return f"post:{slug}:{number}"


def post_path_slug(path: str) -> str | None:
    """The slug of a post page's path, as its route below would match it, or None."""
    if path.startswith("/posts/"):
        slug = path[7:]
        if slug and "/" not in slug:
            return slug
    return None


async def post_page_from_cache(ctx: Services, request: Request, slug: str) -> Answer | None:
    """What ``post_page`` answers to this GET or HEAD of the post ``slug`` when that is
    the page every reader shares, already in the page cache and fresh; None otherwise:
    a query string, a server asking for the post's object, a reader the comment form
    remembers, a page not cached, stale, or moved (an old slug): ``post_page`` answers.

    The app (app.py) calls it before its middleware and router, which a hot post page
    needs nothing from: a dictionary lookup then answers it.
    """
    if (
        request.scope["query_string"]
        or wants_activitypub(request)
        or not shares_cached_page(request)
    ):
        return None
    version = await ctx.store.version()
    page = ctx.pages.get(post_key(slug, 1), version, ctx.store.version_max_age)
    return None if page is None else answer(request, page)


def responses_page_number(request: Request) -> int:
    raw = request.query_params.get("responses", "1")
    if not raw.isdigit() or not 1 <= int(raw) <= 1_000_000:
        raise HTTPException(
            400, "the page of responses must be a whole number from 1, as in ?responses=2"
        )
    return int(raw)


def responses_url(slug: str, number: int) -> str:
    """The page of a post that shows its responses' page ``number`` (1: the post's URL)."""
    return f"/posts/{slug}" + (f"?responses={number}" if number > 1 else "")


async def _post_with_responses(
    ctx: Services, post: Post, number: int, reader: CommentForm | None = None
) -> CachedPage | None:
    """The post and one page of its responses, or None past the last page.

    The heading counts every response (``post.response_count`` counts as
    ``comments.count_responses`` does: published, shown, not blocked), and the numbers
    continue from the pages before, so the last response of the last page carries it.
    """
    per_page = ctx.settings.responses_per_page
    pages = max(1, -(-post.response_count // per_page))
    if number > pages:
        return None  # past the end: no query
    found = await load_page(ctx.store, post.id, number, per_page)
    if found is None:
        return None
    reactions = await ctx.store.list_reactions(post.id)
    older, newer = await ctx.store.get_post_neighbours(post)
    return html_page(
        ctx,
        "post.html",
        vary="Accept, Accept-Encoding",
        post=post,
        url=ctx.blog.post_url(post),
        object_id=ctx.blog.object_id(post.uid),
        description=post.summary or excerpt(post.body_html, 200),
        threads=found.threads,
        thread_continues=found.continues,
        response_count=post.response_count,
        responses_page=number,
        responses_pages=pages,
        likes=[r.author for r in reactions if r.type == "Like"],
        boosts=[r.author for r in reactions if r.type == "Announce"],
        older=older,
        newer=newer,
        reader=reader,
    )


async def comment_permalink(request: Request) -> Response:
    """A response's stable address: to the page and anchor that show it now (pages
    move as responses come and go; the anchor, by database id, does not)."""
    ctx = services(request)
    slug = request.path_params["slug"]
    comment_id: int = request.path_params["comment_id"]
    post_id = await ctx.store.get_post_id(slug=slug)
    if post_id is None:
        new_slug = await ctx.store.get_current_slug(slug)
        if new_slug is not None:
            return RedirectResponse(f"/posts/{new_slug}/comments/{comment_id}", status_code=301)
        raise HTTPException(404)
    number = await find_page(ctx.store, post_id, comment_id, ctx.settings.responses_per_page)
    if number is None:
        raise HTTPException(404)
    return RedirectResponse(
        f"{responses_url(slug, number)}#comment-{comment_id}", status_code=302
    )


async def reply_page(request: Request) -> Response:
    """"Leave a Reply" aimed at one response: the local form with it as parent, and
    "Reply from your server" (and the address to paste) with its own ActivityPub id."""
    slug = request.path_params["slug"]
    comment_id: int = request.path_params["comment_id"]
    reader = remembered(request)

    async def render(ctx: Services) -> CachedPage | None:
        post = await ctx.store.get_post_by_slug(slug)
        if post is None:
            return None
        comment = await ctx.store.get_visible_response(post.id, comment_id)
        if comment is None:
            return None
        return html_page(
            ctx,
            "reply.html",
            post=post,
            comment=comment,
            thread=Thread(comment),
            url=ctx.blog.post_url(post),
            object_id=ctx.blog.object_id(post.uid),
            reader=reader,
        )

    if reader:  # this reader's details in the form: a page of their own (post_page)
        page = await render(services(request))
        if page is None:
            raise HTTPException(404)
        return personal(page)
    return await cached(request, f"reply:{slug}:{comment_id}", render)


async def preview(request: Request) -> Response:
    """A draft's or scheduled post's secret preview (``fediblog post preview SLUG``):
    never in the page cache nor in a shared cache, never indexed; once the post is
    published, a redirect to its page."""
    ctx = services(request)
    post = await ctx.store.get_post_for_preview(request.path_params["token"])
    if post is None:
        raise HTTPException(404)
    if post.state == "published":
        return RedirectResponse(ctx.blog.post_url(post), status_code=302)
    body = ctx.templates.get_template("post.html").render(
        site=ctx.settings,
        preview=True,
        post=post,
        url=ctx.blog.post_url(post),
        object_id=ctx.blog.object_id(post.uid),
        description=post.summary or excerpt(post.body_html, 200),
        threads=[],
        thread_continues=None,
        response_count=0,
        responses_page=1,
        responses_pages=1,
        likes=[],
        boosts=[],
        older=None,
        newer=None,
    )
    headers = {"Cache-Control": "private, no-store", "X-Robots-Tag": "noindex, nofollow"}
    return Response(body, media_type=HTML, headers=headers)


async def archive(request: Request) -> Response:
    async def render(ctx: Services) -> CachedPage:
        months = await ctx.store.list_archive_months()
        return html_page(ctx, "archive.html", months=[Month(*m) for m in months])

    return await cached(request, "archive", render)


MONTH_NAMES = (
    "January", "February", "March", "April", "May", "June",
    "July", "August", "September", "October", "November", "December",
)  # fmt: skip


@dataclass(frozen=True, slots=True)
class Month:
    """One month of the archive (UTC), as its pages name and link it."""

    year: int
    month: int
    count: int = 0

    @property
    def name(self) -> str:
        return f"{MONTH_NAMES[self.month - 1]} {self.year}"

    @property
    def path(self) -> str:
        return f"/archive/{self.year:04d}/{self.month:02d}"


async def archive_month(request: Request) -> Response:
    """One month's posts. Only the canonical spelling (``2026/03``) is a page: other
    spellings are 404, so random URLs fill neither the cache nor the crawlers' index."""
    year_text, month_text = request.path_params["year"], request.path_params["month"]
    if not (len(year_text) == 4 and year_text.isdigit() and len(month_text) == 2):
        raise HTTPException(404)
    if not (month_text.isdigit() and 1 <= int(month_text) <= 12):
        raise HTTPException(404)
    month = Month(int(year_text), int(month_text))

    async def render(ctx: Services) -> CachedPage | None:
        posts = await ctx.store.list_posts_in_month(month.year, month.month)
        if not posts:
            return None
        return html_page(
            ctx,
            "index.html",
            posts=posts,
            page=1,
            pages=1,
            heading=f"Posts from {month.name}",
            archive=month,
        )

    return await cached(request, f"archive:{month.path}", render)


async def not_found(request: Request, exc: Exception) -> Response:
    ctx = services(request)
    body = ctx.templates.get_template("404.html").render(site=ctx.settings, message=None)
    return Response(body, status_code=404, media_type=HTML)


# What a reader is told for each refusal of a page or form; the detail says why.
ERROR_TITLES = {
    400: "This address is not quite right",
    405: "Not something this page does",
    413: "That is too much to send",
    415: "That could not be read",
    429: "Slow down",
}


async def error_page(request: Request, exc: HTTPException) -> Response:
    """A reader's 4xx as a page of the blog, with the reason as a sentence (the plain
    ``400: reason`` text stays for the routes servers call)."""
    if exc.status_code == 404:
        return await not_found(request, exc)
    ctx = services(request)
    detail = exc.detail.strip().rstrip(".") or "the blog cannot answer this request"
    if exc.status_code == 405:  # starlette's own detail ("Method Not Allowed") says less
        allowed = (exc.headers or {}).get("Allow", "GET")
        detail = f"this address answers {allowed}, not {request.method}"
    body = ctx.templates.get_template("message.html").render(
        site=ctx.settings,
        title=ERROR_TITLES.get(exc.status_code, "This request cannot be answered"),
        text=detail[0].upper() + detail[1:] + ".",
        post=None,
    )
    return Response(body, status_code=exc.status_code, media_type=HTML, headers=exc.headers)


routes = [
    Route("/", index),
    Route("/posts/{slug}", post_page),
    Route(f"/posts/{{slug}}/comments/{row_id('comment_id')}", comment_permalink),
    Route(f"/posts/{{slug}}/reply/{row_id('comment_id')}", reply_page),
    Route("/tags", tags),
    Route("/tags/{tag}", tag_page),
    Route("/archive", archive),
    Route("/archive/{year}/{month}", archive_month),
    Route("/about", about),
    Route("/preview/{token}", preview),
]
