""" "Leave a Reply": reply or follow from your own server, or comment with the local form.

* ``POST /posts/{slug}/interact``: the visitor types ``@me@their.server``; we look
  their server up by WebFinger (a guarded, signed fetch) and send them to its
  remote-interaction template with our post's id (or our actor, to follow); with
  ``replyto`` (a response's database id), with that response's own ActivityPub id.
* ``POST /posts/{slug}/comment``: name, email (never shown anywhere), optional
  website and the comment, held for approval and shown as plain text; a honeypot
  field and a per-IP rate limit keep bots out (ATTACKS.md 37). ``parent`` makes it a
  reply to a response shown under the same post. The author is told (notify.py).
"""

from __future__ import annotations

import re
from urllib.parse import parse_qs, quote

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.routing import Route

from fediblog import moderation
from fediblog.activitystreams import plain_text
from fediblog.errors import FetchError
from fediblog.models import Comment, Post
from fediblog.render import strip_invisible
from fediblog.web.deps import Services, services

MAX_FORM_BYTES = 100_000
MAX_COMMENT = 10_000
SUBSCRIBE = "http://ostatus.org/schema/1.0/subscribe"
HONEYPOT = "homepage"
_ACCT = re.compile(r"^@?([A-Za-z0-9_.~-]{1,64})@([A-Za-z0-9.-]{1,253}(?::\d{1,5})?)$")
_EMAIL = re.compile(r"^[^@\s<>]{1,64}@[^@\s<>]{1,190}$")


def _client(request: Request) -> str:
    return request.client.host if request.client else "unknown"


async def _form(request: Request) -> dict[str, str]:
    """The urlencoded form, at most MAX_FORM_BYTES, one value per field."""
    if not request.headers.get("content-type", "").startswith("application/x-www-form-urlencoded"):
        raise HTTPException(415, "send the form as application/x-www-form-urlencoded")
    declared = request.headers.get("content-length", "0")
    if not declared.isdigit() or int(declared) > MAX_FORM_BYTES:
        raise HTTPException(413, "the comment is too large (100 kB at most)")
    body = b""
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_FORM_BYTES:
            raise HTTPException(413, "the comment is too large (100 kB at most)")
    try:
        fields = parse_qs(body.decode("utf-8"), keep_blank_values=True, max_num_fields=20)
    except (UnicodeDecodeError, ValueError):
        raise HTTPException(400, "the form could not be read") from None
    return {name: values[0] for name, values in fields.items()}


async def _post(ctx: Services, request: Request) -> Post:
    post = await ctx.store.get_post_by_slug(request.path_params["slug"])
    if post is None:
        raise HTTPException(404)
    return post


def _message(ctx: Services, post: Post, status: int, title: str, text: str) -> Response:
    body = ctx.templates.get_template("message.html").render(
        site=ctx.settings,
        post=post,
        title=title,
        text=text,
        object_id=ctx.blog.object_id(post.uid),
    )
    return Response(body, status_code=status, media_type="text/html; charset=utf-8")


async def interact(request: Request) -> Response:
    ctx = services(request)
    post = await _post(ctx, request)
    if not ctx.interact_limit.allow(_client(request)):
        return _message(ctx, post, 429, "Slow down", "Too many lookups from here; try again soon.")
    form = await _form(request)
    match = _ACCT.match(form.get("acct", "").strip())
    if match is None:
        return _message(
            ctx, post, 400, "Which account?", "Type your fediverse address, like @you@your.server."
        )
    target = ctx.urls.actor if form.get("action") == "follow" else ctx.blog.object_id(post.uid)
    if form.get("action") != "follow" and form.get("replyto"):
        # Replying to a response: its own id, so their server opens that very comment.
        replying_to = await _response(ctx, post, form["replyto"])
        if replying_to is None:
            return _message(
                ctx, post, 400, "No such response", "That response is not shown under this post."
            )
        target = replying_to.ap_id or target
    try:
        jrd = await ctx.fetcher.fetch_webfinger(f"acct:{match.group(1)}@{match.group(2)}")
    except FetchError as error:
        return _message(
            ctx,
            post,
            400,
            "Your server could not be found",
            f"Looking up @{match.group(1)}@{match.group(2)} failed ({error}).",
        )
    links = jrd.get("links")
    template = next(
        (
            link.get("template")
            for link in (links if isinstance(links, list) else [])
            if isinstance(link, dict) and link.get("rel") == SUBSCRIBE
        ),
        None,
    )
    schemes = ("https://", "http://") if ctx.settings.allow_http else ("https://",)
    if not isinstance(template, str) or "{uri}" not in template or not template.startswith(schemes):
        return _message(
            ctx,
            post,
            400,
            "Your server offers no remote interaction",
            "Paste the address below into your app's search box instead.",
        )
    return RedirectResponse(template.replace("{uri}", quote(target, safe="")), status_code=303)


async def comment(request: Request) -> Response:
    ctx = services(request)
    post = await _post(ctx, request)
    form = await _form(request)
    if form.get(HONEYPOT):
        # A bot filled the field people never see: thank it, keep nothing.
        return RedirectResponse(f"/posts/{post.slug}/thanks", status_code=303)
    if not ctx.comment_limit.allow(_client(request)):
        return _message(
            ctx, post, 429, "Slow down", "You have commented a lot just now; try again later."
        )
    name = plain_text(form.get("name"), 100)
    email = form.get("email", "").strip()
    website = form.get("website", "").strip()
    text = strip_invisible(form.get("comment", "")).strip()
    problems = []
    if not name:
        problems.append("your name")
    if not _EMAIL.match(email):
        problems.append("an email address (it is never shown)")
    if website and (
        not website.startswith(("https://", "http://"))
        or len(website) > 300
        # No spaces, control, bidi or zero-width characters: a URL has none (ATTACKS 34).
        or not website.isprintable()
        or strip_invisible(website) != website
        or any(c.isspace() for c in website)
    ):
        problems.append("a website starting with https:// (or nothing)")
    if not text:
        problems.append("a comment")
    if len(text) > MAX_COMMENT:
        problems.append(f"a comment of at most {MAX_COMMENT:,} characters")
    if problems:
        return _message(ctx, post, 400, "Almost", "Please give " + ", ".join(problems) + ".")
    parent = form.get("parent", "")
    if parent and not (parent.isdigit() and len(parent) <= 18):
        return _message(ctx, post, 400, "No such response", "That is not a response's number.")
    try:
        await moderation.hold_local_comment(
            ctx.store,
            post.id,
            name=name,
            email=email,
            website=website or None,
            text=text,
            parent_id=int(parent) if parent else None,
            on_saved=ctx.notifier.response_saved,
        )
    except moderation.ModerationError as error:
        return _message(ctx, post, 400, "No such response", f"{str(error).capitalize()}.")
    return RedirectResponse(f"/posts/{post.slug}/thanks", status_code=303)


async def _response(ctx: Services, post: Post, raw: str) -> Comment | None:
    """The published response under ``post`` that a form field names by its id."""
    if not (raw.isdigit() and len(raw) <= 18):
        return None
    return await ctx.store.get_visible_response(post.id, int(raw))


async def thanks(request: Request) -> Response:
    ctx = services(request)
    post = await _post(ctx, request)
    return _message(
        ctx,
        post,
        200,
        "Thank you",
        "Your comment is waiting for approval; it appears under the post once approved.",
    )


routes = [
    Route("/posts/{slug}/interact", interact, methods=["POST"]),
    Route("/posts/{slug}/comment", comment, methods=["POST"]),
    Route("/posts/{slug}/thanks", thanks),
]
