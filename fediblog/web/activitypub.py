"""ActivityPub documents and the inbox endpoints (INTEROP.md 4-6, 12-13).

Every document is served as ``application/activity+json``, fetchable without a
signature, from the page cache. Post pages negotiate: the same URL gives HTML to a
browser and the object to a server (``Vary: Accept``).
"""

from __future__ import annotations

import json
import logging
import zlib
from collections.abc import Awaitable, Callable
from typing import Any

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.routing import Route

from fediblog.activitystreams import (
    ACTIVITY_JSON,
    PAGE_SIZE,
    build_actor,
    build_collection,
    build_collection_page,
    build_create,
    build_instance_actor,
    build_post_object,
    build_tombstone,
)
from fediblog.errors import ActivityError, FediblogError, SignatureError
from fediblog.inbox import Overloaded
from fediblog.remote import is_activitypub_type
from fediblog.web.cache import CachedPage
from fediblog.web.deps import Services, services
from fediblog.web.pages import cached

log = logging.getLogger("fediblog.web")

MAX_BODY = 1_000_000
AP_TYPE = f"{ACTIVITY_JSON}; charset=utf-8"


def wants_activitypub(request: Request) -> bool:
    accept = request.headers.get("accept", "").lower()
    return ACTIVITY_JSON in accept or "application/ld+json" in accept


def ap_page(document: Any) -> CachedPage:
    body = json.dumps(document, ensure_ascii=False, separators=(",", ":")).encode()
    return CachedPage.build(body, media_type=AP_TYPE, vary="Accept, Accept-Encoding")


Render = Callable[[Services], Awaitable[Any]]


async def ap_cached(request: Request, key: str, render: Render) -> Response:
    """An ActivityPub document through the page cache; ``render`` gives None for 404."""

    async def page(ctx: Services) -> CachedPage | None:
        document = await render(ctx)
        return None if document is None else ap_page(document)

    return await cached(request, key, page)


def _check_handle(request: Request) -> Services:
    ctx = services(request)
    if request.path_params["handle"] != ctx.settings.handle:
        raise HTTPException(404)
    return ctx


async def actor(request: Request) -> Response:
    _check_handle(request)
    if not wants_activitypub(request):
        return RedirectResponse("/about", status_code=302, headers={"Vary": "Accept"})

    async def render(ctx: Services) -> Any:
        return build_actor(ctx.settings, ctx.blog_public_pem, ctx.created_at)

    return await ap_cached(request, "ap:actor", render)


async def instance_actor(request: Request) -> Response:
    async def render(ctx: Services) -> Any:
        return build_instance_actor(ctx.settings, ctx.instance_public_pem)

    return await ap_cached(request, "ap:instance", render)


def _page(request: Request) -> int | None:
    raw = request.query_params.get("page")
    if raw is None:
        return None
    if not raw.isdigit() or not 1 <= int(raw) <= 1_000_000:
        raise HTTPException(400, "page must be a whole number from 1")
    return int(raw)


async def outbox(request: Request) -> Response:
    ctx = _check_handle(request)
    page = _page(request)
    collection = ctx.urls.outbox

    async def render(ctx: Services) -> Any:
        total = await ctx.store.count_posts()
        if page is None:
            return build_collection(collection, total, first=f"{collection}?page=1")
        posts = await ctx.store.list_posts(limit=PAGE_SIZE, offset=(page - 1) * PAGE_SIZE)
        items = [
            {k: v for k, v in build_create(ctx.settings, p).items() if k != "@context"}
            for p in posts
        ]
        return build_collection_page(collection, page, items, has_next=page * PAGE_SIZE < total)

    return await ap_cached(request, f"ap:outbox:{page}", render)


async def followers(request: Request) -> Response:
    ctx = _check_handle(request)
    page = _page(request)
    collection = ctx.urls.followers

    async def render(ctx: Services) -> Any:
        total = await ctx.store.count_followers()
        if ctx.settings.hide_followers:
            return build_collection(collection, total)
        if page is None:
            return build_collection(collection, total, first=f"{collection}?page=1")
        found = await ctx.store.list_followers(limit=PAGE_SIZE, offset=(page - 1) * PAGE_SIZE)
        items = [f.actor for f in found]
        return build_collection_page(collection, page, items, has_next=page * PAGE_SIZE < total)

    return await ap_cached(request, f"ap:followers:{page}", render)


async def following(request: Request) -> Response:
    _check_handle(request)

    async def render(ctx: Services) -> Any:
        return build_collection(ctx.urls.following, 0)

    return await ap_cached(request, "ap:following", render)


async def post_object(request: Request) -> Response:
    """A post at its stable id: the object for servers, a redirect for browsers."""
    uid = request.path_params["uid"]
    ctx = services(request)
    post = await ctx.store.get_post_by_uid(uid)
    if post is None:
        deleted = await ctx.store.is_deleted_post(uid)
        if deleted is None:
            raise HTTPException(404)
        tombstone = build_tombstone(ctx.urls.object_id(uid), deleted)
        return Response(json.dumps(tombstone), status_code=410, media_type=AP_TYPE)
    if not wants_activitypub(request):
        return RedirectResponse(
            ctx.blog.post_url(post), status_code=302, headers={"Vary": "Accept"}
        )

    async def render(ctx: Services) -> Any:
        return build_post_object(ctx.settings, post)

    return await ap_cached(request, f"ap:post:{uid}", render)


async def post_activity(request: Request) -> Response:
    uid = request.path_params["uid"]

    async def render(ctx: Services) -> Any:
        post = await ctx.store.get_post_by_uid(uid)
        return build_create(ctx.settings, post) if post else None

    return await ap_cached(request, f"ap:create:{uid}", render)


async def post_replies(request: Request) -> Response:
    uid = request.path_params["uid"]

    async def render(ctx: Services) -> Any:
        post = await ctx.store.get_post_by_uid(uid)
        if post is None:
            return None
        comments = await ctx.store.list_visible_comments(post.id)
        items = [c.ap_id for c in comments if c.ap_id and c.status == "published"]
        collection = ctx.urls.object_id(uid) + "/replies"
        return {
            **build_collection(collection, len(items)),
            "orderedItems": items,
        }

    return await ap_cached(request, f"ap:replies:{uid}", render)


def post_document(ctx: Services, post: Any) -> Response:
    page = ap_page(build_post_object(ctx.settings, post))
    return Response(page.body, media_type=AP_TYPE, headers={"Vary": "Accept, Accept-Encoding"})


# ---- the inbox ---------------------------------------------------------------------


def _reason(status: int, reason: str, **headers: str) -> Response:
    return Response(
        f"{status}: {reason}\n", status_code=status, media_type="text/plain", headers=headers
    )


async def _read_body(request: Request) -> bytes | Response:
    declared = request.headers.get("content-length")
    if declared is not None and (not declared.isdigit() or int(declared) > MAX_BODY):
        return _reason(413, f"the body is larger than {MAX_BODY} bytes")
    encoding = request.headers.get("content-encoding", "identity").strip().lower()
    if encoding not in ("identity", "gzip"):
        return _reason(415, f"content encoding {encoding!r} is not supported")
    inflate = zlib.decompressobj(wbits=31) if encoding == "gzip" else None
    chunks: list[bytes] = []
    size = 0
    try:
        async for chunk in request.stream():
            if inflate is not None:
                # Count the decompressed bytes: a gzip bomb stops at the cap (ATTACKS.md 26).
                chunk = inflate.decompress(chunk, MAX_BODY + 1 - size)
                if inflate.unconsumed_tail:
                    return _reason(413, f"the body is larger than {MAX_BODY} bytes")
            size += len(chunk)
            if size > MAX_BODY:
                return _reason(413, f"the body is larger than {MAX_BODY} bytes")
            chunks.append(chunk)
    except zlib.error:
        return _reason(400, "the gzip body is corrupt")
    return b"".join(chunks)


async def inbox(request: Request) -> Response:
    """Personal and shared inbox alike: 202 once stored; 4xx with a reason; never 500."""
    ctx = services(request)
    if request.path_params.get("handle", ctx.settings.handle) != ctx.settings.handle:
        return _reason(404, "no such inbox")
    content_type = request.headers.get("content-type", "")
    if not is_activitypub_type(content_type) and not content_type.lower().startswith(
        "application/ld+json"
    ):
        return _reason(415, "send application/activity+json")
    body = await _read_body(request)
    if isinstance(body, Response):
        return body
    target = request.scope["raw_path"].decode("latin-1")
    if request.scope.get("query_string"):
        target += "?" + request.scope["query_string"].decode("latin-1")
    try:
        await ctx.inbox.receive(request.method, target, request.headers, body)
    except SignatureError as error:
        return _reason(401, str(error))
    except ActivityError as error:
        return _reason(400, str(error))
    except Overloaded as error:
        return _reason(503, str(error), **{"Retry-After": "10"})
    except FediblogError as error:
        return _reason(503, f"temporary trouble: {error}", **{"Retry-After": "30"})
    except Exception:  # a bug must not become a 500 that loses the activity
        log.exception("the inbox failed on a %d-byte activity", len(body))
        return _reason(503, "temporary trouble, retry later", **{"Retry-After": "60"})
    return Response(status_code=202)


routes = [
    Route("/users/{handle}", actor),
    Route("/actor", instance_actor),
    Route("/users/{handle}/outbox", outbox),
    Route("/users/{handle}/followers", followers),
    Route("/users/{handle}/following", following),
    Route("/users/{handle}/inbox", inbox, methods=["POST"]),
    Route("/inbox", inbox, methods=["POST"]),
    Route("/p/{uid}", post_object),
    Route("/p/{uid}/activity", post_activity),
    Route("/p/{uid}/replies", post_replies),
]
