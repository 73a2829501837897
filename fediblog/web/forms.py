""" "Leave a Reply": reply or follow from your own server, or comment with the local form.

* ``POST /posts/{slug}/interact``: the visitor types ``@me@their.server``; we look
  their server up by WebFinger (a guarded, signed fetch) and send them to its
  remote-interaction template with our post's id (or our actor, to follow); with
  ``replyto`` (a response's database id), with that response's own ActivityPub id.
  A failed lookup is a page with one sentence saying which step failed (no such
  account 404, a malformed address or one we may not contact 400, a server that cannot
  be reached, answers nonsense or offers no template 502), never the error's own text.
* ``POST /posts/{slug}/comment``: name, email (never shown anywhere), optional
  website and the comment, held for approval and shown as plain text; a honeypot
  field and a per-IP rate limit keep bots out (ATTACKS.md 37). ``parent`` makes it a
  reply to a response shown under the same post. The author is told (notify.py).
  A form that needs a change comes back filled in as typed, with a sentence by each
  field to change (never cached: it holds one reader's words). "Remember me" keeps
  name, email and website in the reader's browser (web/commenter.py); a POST that a
  browser says comes from another site is refused (403), so no other site can post
  in a reader's name or plant details in their form.
"""

from __future__ import annotations

import re
from urllib.parse import parse_qs, quote, urlsplit

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.routing import Route

from fediblog import moderation
from fediblog.activitystreams import plain_text
from fediblog.errors import (
    BadDocument,
    BlockedAddress,
    FetchBusy,
    FetchError,
    FetchStatus,
    FetchTooLarge,
)
from fediblog.models import Comment, Post
from fediblog.render import strip_invisible, web_url
from fediblog.web import commenter
from fediblog.web.commenter import CommentForm
from fediblog.web.deps import Services, services
from fediblog.web.html import html_page

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
    typed = form.get("acct", "").strip()
    match = _ACCT.match(typed)
    if match is None:
        return _message(ctx, post, 400, "Which account?", _malformed(typed))
    target = ctx.urls.actor if form.get("action") == "follow" else ctx.blog.object_id(post.uid)
    if form.get("action") != "follow" and form.get("replyto"):
        # Replying to a response: its own id, so their server opens that very comment.
        replying_to = await _response(ctx, post, form["replyto"])
        if replying_to is None:
            return _message(
                ctx, post, 400, "No such response", "That response is not shown under this post."
            )
        target = replying_to.ap_id or target
    user, host = match.group(1), match.group(2)
    try:
        jrd = await ctx.fetcher.fetch_webfinger(f"acct:{user}@{host}")
    except FetchError as error:
        return _message(ctx, post, *_lookup_failed(error, f"@{user}@{host}", host))
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
            502,
            "Your server offers no remote interaction",
            f"{host} does not say how to reply or follow from another site. Paste the"
            " address below into your app's search box instead.",
        )
    return RedirectResponse(template.replace("{uri}", quote(target, safe="")), status_code=303)


def _malformed(typed: str) -> str:
    if not typed:
        return "Type your fediverse address, like @you@your.server."
    shown = typed if len(typed) <= 60 else typed[:59] + "…"
    return (
        f"“{shown}” is not a fediverse address. Type it like @you@your.server: your user"
        " name, an @, then your server's name."
    )


def _lookup_failed(error: FetchError, handle: str, host: str) -> tuple[int, str, str]:
    """(status, title, sentence) for a failed WebFinger lookup: which step failed, in
    words; the error's own text (addresses, library messages) is never shown."""
    if isinstance(error, FetchStatus) and error.status in (404, 410):
        return (
            404,
            "No such account",
            f"{host} says it has no account {handle}. Check the spelling of your address.",
        )
    if isinstance(error, BlockedAddress):
        return (
            400,
            "That server cannot be asked",
            f"{host} is not a public server this blog may contact (a private or local"
            " address), so it cannot look up your account there.",
        )
    if isinstance(error, FetchBusy):
        return (
            503,
            "Too many lookups",
            "This blog is looking up many servers just now; try again in a minute.",
        )
    if isinstance(error, BadDocument | FetchTooLarge) or (
        isinstance(error, FetchStatus) and error.status < 500
    ):
        return (
            502,
            "Your server's answer could not be used",
            f"{host} answered, but not with the account {handle}. Check your address, or"
            " paste the address below into your app's search box instead.",
        )
    return (
        502,
        "Your server could not be reached",
        f"This blog could not reach {host} to look up {handle}. Check the server's name,"
        " or try again later.",
    )


async def comment(request: Request) -> Response:
    ctx = services(request)
    post = await _post(ctx, request)
    if _from_another_site(request, ctx.settings.base_url):
        return _message(
            ctx,
            post,
            403,
            "Sent from another site",
            "This form only takes comments written on this blog's own pages.",
        )
    form = await _form(request)
    if form.get(HONEYPOT):
        # A bot filled the field people never see: thank it, keep nothing.
        return RedirectResponse(f"/posts/{post.slug}/thanks", status_code=303)
    if not ctx.comment_limit.allow(_client(request)):
        return _message(
            ctx, post, 429, "Slow down", "You have commented a lot just now; try again later."
        )
    typed = CommentForm(  # as typed (the body is capped: MAX_FORM_BYTES), to fill the form again
        name=form.get("name", ""),
        email=form.get("email", ""),
        website=form.get("website", ""),
        comment=form.get("comment", ""),
        remember=form.get("remember") == "yes",
    )
    name = plain_text(typed.name, commenter.MAX_NAME)
    email = typed.email.strip()
    # Checked as a browser reads it (no user name, a host), kept as typed.
    given = typed.website.strip()
    website = given if _plain_url(given) and web_url(given) else None
    text = strip_invisible(typed.comment).strip()
    errors = _problems(typed, name=name, email=email, website=website, text=text)
    parent = form.get("parent", "")
    if parent and not (parent.isdigit() and len(parent) <= 18):
        return _message(ctx, post, 400, "No such response", "That is not a response's number.")
    if errors:
        reply_to = await _response(ctx, post, parent) if parent else None
        page = html_page(
            ctx,
            "comment.html",
            post=post,
            reply_to=reply_to,
            form=CommentForm(
                name=typed.name,
                email=typed.email,
                website=typed.website,
                comment=typed.comment,
                remember=typed.remember,
                errors=errors,
            ),
            object_id=ctx.blog.object_id(post.uid),
        )
        response = commenter.personal(page, status_code=400)
        if not typed.remember and commenter.COOKIE in request.cookies:
            commenter.forget(response, ctx.settings)
        return response
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
    response = RedirectResponse(f"/posts/{post.slug}/thanks", status_code=303)
    if typed.remember:
        kept = CommentForm(name=name, email=email, website=website or "")
        commenter.remember(response, ctx.settings, kept)
    elif commenter.COOKIE in request.cookies:
        commenter.forget(response, ctx.settings)
    return response


def _plain_url(website: str) -> bool:
    """A website as typed: http(s), short, and without spaces, controls, bidi or
    zero-width characters (a URL has none; ATTACKS 34), nor a backslash (which
    browsers read as "/": it only serves to make a URL read as another host)."""
    return (
        website.startswith(("https://", "http://"))
        and "\\" not in website
        and len(website) <= commenter.MAX_WEBSITE
        and website.isprintable()
        and strip_invisible(website) == website
        and not any(c.isspace() for c in website)
    )


def _problems(
    typed: CommentForm, *, name: str, email: str, website: str | None, text: str
) -> dict[str, str]:
    """A sentence for each field the reader needs to change, keyed by the field."""
    errors: dict[str, str] = {}
    if not name:
        errors["name"] = "Please give your name: any name you like, it is shown with your comment."
    if not email:
        errors["email"] = (
            "Please give your email address; it is never published, only the author sees it."
        )
    elif not _EMAIL.match(email):
        errors["email"] = (
            "This email address looks incomplete: it needs a name, an @ and a domain,"
            " like you@example.com."
        )
    if typed.website.strip() and website is None:
        errors["website"] = (
            "Please give a website starting with https:// and without spaces, like"
            " https://example.com/, or leave the field empty."
        )
    if not text:
        errors["comment"] = "Please write your comment."
    elif len(text) > MAX_COMMENT:
        errors["comment"] = (
            f"Please write a comment of at most {MAX_COMMENT:,} characters; yours has"
            f" {len(text):,}."
        )
    return errors


def _from_another_site(request: Request, base_url: str) -> bool:
    """True when the browser says the form was sent from a page of another site (its
    Sec-Fetch-Site, or else its Origin against the blog's public address or the Host
    it was sent to: a proxy need not pass Host). A request without either is not a
    browser's cross-site one: bots are the honeypot's and the rate limit's."""
    site = request.headers.get("sec-fetch-site")
    if site is not None:
        return site not in ("same-origin", "none")
    origin = request.headers.get("origin")
    if origin is None:
        return False
    if origin.rstrip("/").lower() == base_url.lower():
        return False
    return urlsplit(origin).netloc.lower() != request.headers.get("host", "").lower()


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
