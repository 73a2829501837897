"""ActivityPub documents and the inbox endpoints (INTEROP.md 4-6, 12-13).

Every document is served as ``application/activity+json``, fetchable without a
signature, from the page cache. Post pages negotiate: the same URL gives HTML to a
browser and the object to a server (``Vary: Accept``).
"""

from __future__ import annotations

import json
import logging
import re
import zlib
from collections.abc import Awaitable, Callable
from functools import lru_cache
from typing import Any

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from fediblog.activitystreams import (
    ACTIVITY_JSON,
    PAGE_SIZE,
    build_actor,
    build_answer_note,
    build_collection,
    build_collection_page,
    build_create,
    build_featured,
    build_instance_actor,
    build_instance_outbox,
    build_post_object,
    build_tombstone,
)
from fediblog.errors import ActivityError, FediblogError, SignatureError
from fediblog.httpsig import HeaderFields
from fediblog.inbox import Overloaded, Sender
from fediblog.media import MediaStore
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
        face = await MediaStore(ctx.settings, ctx.store).load_face()
        return build_actor(
            ctx.settings,
            ctx.blog_public_pem,
            ctx.created_at,
            icon=face.get("avatar"),
            header=face.get("header"),
        )

    return await ap_cached(request, "ap:actor", render)


async def instance_actor(request: Request) -> Response:
    async def render(ctx: Services) -> Any:
        return build_instance_actor(ctx.settings, ctx.instance_public_pem)

    return await ap_cached(request, "ap:instance", render)


async def instance_outbox(request: Request) -> Response:
    async def render(ctx: Services) -> Any:
        return build_instance_outbox(ctx.settings)

    return await ap_cached(request, "ap:instance-outbox", render)


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


async def featured(request: Request) -> Response:
    """The pinned posts (Mastodon's featured collection), the latest pinned first."""
    _check_handle(request)

    async def render(ctx: Services) -> Any:
        return build_featured(ctx.settings, await ctx.store.list_pinned_posts())

    return await ap_cached(request, "ap:featured", render)


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


async def answer_object(request: Request) -> Response:
    """The author's answer at its id: the Note for servers, its place on the page for
    browsers, 410 with a Tombstone once deleted (or once its post is)."""
    uid, token = request.path_params["uid"], request.path_params["token"]
    ctx = services(request)
    answer = await ctx.store.get_author_answer(ap_id=ctx.urls.answer_id(uid, token))
    if answer is None:
        raise HTTPException(404)
    if answer.gone_at is not None:
        tombstone = build_tombstone(answer.ap_id, answer.gone_at, "Note")
        return Response(json.dumps(tombstone), status_code=410, media_type=AP_TYPE)
    if not wants_activitypub(request):
        return RedirectResponse(
            ctx.urls.response_url(answer.post_slug, answer.id),
            status_code=302,
            headers={"Vary": "Accept"},
        )

    async def render(ctx: Services) -> Any:
        return build_answer_note(ctx.settings, answer)

    return await ap_cached(request, f"ap:answer:{uid}/{token}", render)


def post_document(ctx: Services, post: Any) -> Response:
    page = ap_page(build_post_object(ctx.settings, post))
    return Response(page.body, media_type=AP_TYPE, headers={"Vary": "Accept, Accept-Encoding"})


# ---- the inbox ---------------------------------------------------------------------
# The hot path, so a plain ASGI app: no Request, no Response objects, headers read once.

Headers = list[tuple[bytes, bytes]]
_TEXT = (b"content-type", b"text/plain; charset=utf-8")


class ClientGone(Exception):
    """The sender hung up before its body was complete: nothing to answer."""


Answer = tuple[int, str, str, Headers]  # status, kind (the metric's label), reason, headers


async def _read_body(headers: HeaderFields, receive: Receive) -> bytes | tuple[int, str, str]:
    """The body, or (status, kind, reason): at most MAX_BODY bytes after gzip
    (ATTACKS.md 25-26)."""
    too_big = (413, "too_large", f"the body is larger than {MAX_BODY} bytes")
    declared = headers.get("content-length")
    if declared is not None and (not declared.isdigit() or int(declared) > MAX_BODY):
        return too_big
    encoding = headers.get("content-encoding", "identity").strip().lower()
    if encoding not in ("identity", "gzip"):
        return 415, "content_encoding", f"content encoding {encoding!r} is not supported"
    inflate = zlib.decompressobj(wbits=31) if encoding == "gzip" else None
    chunks: list[bytes] = []
    size = 0
    try:
        while True:
            message = await receive()
            if message["type"] != "http.request":
                raise ClientGone
            chunk = message.get("body", b"")
            if inflate is not None and chunk:
                # Count the decompressed bytes: a gzip bomb stops at the cap.
                chunk = inflate.decompress(chunk, MAX_BODY + 1 - size)
                if inflate.unconsumed_tail:
                    return too_big
            size += len(chunk)
            if size > MAX_BODY:
                return too_big
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
    except zlib.error:
        return 400, "gzip", "the gzip body is corrupt"
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)


async def _answer(ctx: Services, scope: Scope, receive: Receive, sender: Sender) -> Answer:
    """(status, kind, reason, extra headers) for one inbox POST; never raises."""
    headers = HeaderFields.from_raw(scope["headers"])  # read once, for every check below
    if scope["path_params"].get("handle", ctx.settings.handle) != ctx.settings.handle:
        return 404, "no_inbox", "no such inbox", []
    if not _is_activity_type(headers.get("content-type", "")):
        return 415, "content_type", "send application/activity+json", []
    body = await _read_body(headers, receive)
    if isinstance(body, tuple):
        return *body, []
    target = scope["raw_path"].decode("latin-1")
    if scope.get("query_string"):
        target += "?" + scope["query_string"].decode("latin-1")
    try:
        await ctx.inbox.receive("POST", target, headers, body, sender)
    except SignatureError as error:
        return 401, "signature", str(error), []
    except ActivityError as error:
        return 400, "activity", str(error), []
    except Overloaded as error:
        return 503, "overloaded", str(error), [(b"retry-after", b"10")]
    except FediblogError as error:
        return 503, "unavailable", f"temporary trouble: {error}", [(b"retry-after", b"30")]
    except Exception:  # a bug must not become a 500 that loses the activity
        log.exception("the inbox failed on a %d-byte activity", len(body))
        return 503, "internal", "temporary trouble, retry later", [(b"retry-after", b"60")]
    return 202, "accepted", "", []


@lru_cache(maxsize=64)  # senders use a handful of spellings: parse each once
def _cached_activity_type(content_type: str) -> bool:
    return is_activitypub_type(content_type) or content_type.lower().startswith(
        "application/ld+json"
    )


def _is_activity_type(content_type: str) -> bool:
    """application/activity+json, or application/ld+json with or without its profile."""
    if len(content_type) > 120:  # no long hostile value stays in the cache
        return _cached_activity_type.__wrapped__(content_type)
    return _cached_activity_type(content_type)


_KEY_ID = re.compile(rb'keyid="([^"]{1,500})"', re.IGNORECASE)


def _claimed_key_id(scope: Scope) -> str | None:
    """The keyId a refused request names, read only when parsing its signature failed."""
    for name, value in scope["headers"]:
        if name.lower() in (b"signature", b"signature-input"):
            found = _KEY_ID.search(value)
            if found:
                return found.group(1).decode("latin-1")
    return None


class InboxEndpoint:
    """Personal and shared inbox alike: 202 once stored; 4xx with a reason; never 500.

    An object, not a function: starlette routes it as a raw ASGI app, and the app
    (app.py) calls it before its middleware and router for every POST to an inbox
    path (``inbox_path_params``), with ``headers`` (the security headers that
    middleware would have added) put on every answer.
    """

    def __init__(self, headers: Headers | None = None) -> None:
        self.headers: Headers = list(headers or [])

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        ctx: Services = scope["app"].state.services
        sender = Sender()
        try:
            status, kind, reason, extra = await _answer(ctx, scope, receive, sender)
        except ClientGone:
            return
        except Exception:  # a bug here must not become a 500 (nor reach the server's log bare)
            log.exception("the inbox failed before it could read the activity")
            status, kind, reason = 503, "internal", "temporary trouble, retry later"
            extra = [(b"retry-after", b"60")]
        if status == 202:
            ctx.inbox.stats.accepted += 1
        else:  # counted, kept for the admin desk, and logged within a budget
            ctx.inbox.stats.refuse(
                status,
                kind,
                reason,
                path=scope["path"],
                key_id=sender.key_id or _claimed_key_id(scope),
                actor=sender.actor,
            )
        text = f"{status}: {reason}\n".encode() if status != 202 else b""
        head = [(b"content-length", str(len(text)).encode()), *extra, *self.headers]
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [*head, _TEXT] if text else head,
            }
        )
        await send({"type": "http.response.body", "body": text})


inbox = InboxEndpoint()


def inbox_path_params(path: str) -> dict[str, str] | None:
    """The path parameters of an inbox path, as its route below would match them, or
    None: ``/inbox`` and ``/users/{handle}/inbox`` (a handle is one path segment)."""
    if path == "/inbox":
        return {}
    if path.startswith("/users/") and path.endswith("/inbox"):
        handle = path[7:-6]
        if handle and "/" not in handle:
            return {"handle": handle}
    return None


routes = [
    # The app calls the inbox before the router for POSTs (app.py); these routes answer
    # the other methods (405) and serve apps built without that shortcut.
    Route("/inbox", inbox, methods=["POST"]),
    Route("/users/{handle}/inbox", inbox, methods=["POST"]),
    Route("/users/{handle}", actor),
    Route("/actor", instance_actor),
    Route("/actor/outbox", instance_outbox),
    Route("/users/{handle}/outbox", outbox),
    Route("/users/{handle}/followers", followers),
    Route("/users/{handle}/following", following),
    Route("/users/{handle}/collections/featured", featured),
    Route("/p/{uid}", post_object),
    Route("/p/{uid}/activity", post_activity),
    Route("/p/{uid}/replies", post_replies),
    Route("/p/{uid}/answers/{token}", answer_object),
]
