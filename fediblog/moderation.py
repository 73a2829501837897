"""Moderation: approve, reject and delete comments; block actors and domains.

A block hides what is already here (without deleting it, so ``unblock`` restores
it) and makes the inbox drop whatever the blocked actor or domain sends next: 202,
nothing stored. The running server rereads the block list every second.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable
from urllib.parse import urlsplit

from fediblog.activitystreams import host_of
from fediblog.errors import FediblogError
from fediblog.models import utcnow
from fediblog.render import plain_to_html
from fediblog.store import Store

_DOMAIN = re.compile(r"^(?=.{1,253}$)[a-z0-9-]+(\.[a-z0-9-]+)+(:\d{1,5})?$")
# Why a comment from the blog's own form is held (comments.held_reason, the desk's queue).
HELD_LOCAL = "left through the blog's comment form: every one waits for approval"


class ModerationError(FediblogError):
    """A moderation command named something that does not exist or makes no sense."""


def block_target(text: str) -> tuple[str, str]:
    """(target, kind) for an actor URL or a domain; ModerationError otherwise."""
    value = text.strip()
    if value.startswith(("https://", "http://")):
        parts = urlsplit(value)
        if not parts.hostname or not parts.path.strip("/"):
            raise ModerationError(f"{text!r} is a site, not an actor: block its domain instead")
        return value, "actor"
    domain = value.lower().removeprefix("@").rstrip(".")
    if "@" in domain:
        raise ModerationError(f"block an account by its actor URL, not {text!r}")
    if not _DOMAIN.match(domain):
        raise ModerationError(f"{text!r} is neither an actor URL nor a domain")
    return domain, "domain"


def _check_not_own(target: str, kind: str, own_host: str) -> None:
    """Refuse a block of the blog's own server or one of its actors: it would hide
    nothing of anyone else's and could only confuse what the inbox drops. A subdomain
    or a parent domain may be someone else's server, and is allowed. Hosts compare as
    host[:port], as a block matches them (another port is another server)."""
    host = urlsplit(target).netloc if kind == "actor" else target
    if host.lower() == own_host.lower():
        what = "an account of this blog" if kind == "actor" else "this blog's own server"
        raise ModerationError(f"{target} is {what}: there is nothing to block there")


async def block(store: Store, text: str, *, own_host: str) -> tuple[str, str, bool]:
    """Block an actor URL or a domain (not the blog's own host ``own_host``):
    (target, kind, whether it is new)."""
    target, kind = block_target(text)
    _check_not_own(target, kind, own_host)
    return target, kind, await store.save_block(target, kind)


async def unblock(store: Store, text: str) -> str:
    """Lift the block on an actor URL or a domain; the target, or ModerationError."""
    target = block_target(text)[0]
    if not await store.delete_block(target):
        raise ModerationError(f"{text} is not blocked")
    return target


async def block_author_of(
    store: Store, comment_id: int, *, own_host: str, whole_domain: bool = False
) -> tuple[str, str, bool]:
    """Block the fediverse account that wrote a comment, or its whole server."""
    row = await store.get_stored_comment(comment_id)
    if row is None:
        raise ModerationError(f"no comment has the id {comment_id}")
    if row.by_author:
        raise ModerationError(f"comment {comment_id} is your own answer: there is no one to block")
    if row.actor is None:
        raise ModerationError(
            f"comment {comment_id} came from the blog's own form: there is no account to block"
        )
    # host[:port], as the actors table and the inbox's check name a server
    target = host_of(row.actor) if whole_domain else row.actor
    return await block(store, target, own_host=own_host)


async def set_status(store: Store, comment_id: int, status: str) -> None:
    row = await store.get_stored_comment(comment_id)
    if row is None or row.status == "deleted":
        raise ModerationError(f"no comment has the id {comment_id}")
    if row.by_author:
        # Followers hold a copy: only `reply delete` sends the Delete that removes it.
        raise ModerationError(
            f"comment {comment_id} is your own answer: use `fediblog reply edit` or `delete`"
        )
    if status == "deleted":
        await store.delete_comment(
            comment_id, ap_id=row.ap_id, actor=row.actor, when=utcnow()
        )
    else:
        await store.set_comment_status(comment_id, status)


async def hold_local_comment(
    store: Store,
    post_id: int,
    *,
    name: str,
    email: str,
    website: str | None,
    text: str,
    parent_id: int | None = None,
    on_saved: Callable[[int], Awaitable[None]] | None = None,
) -> int:
    """A comment from the blog's own form (already validated), held for approval and
    shown as plain text once approved; the email is kept, never published.

    ``parent_id`` makes it a reply to a response that readers see under the same post
    (anything else is a ModerationError); ``on_saved`` is told the new comment's id
    (the author's notifications, notify.py).
    """
    if parent_id is not None and await store.get_visible_response(post_id, parent_id) is None:
        raise ModerationError("you can only reply to a response shown under this post")
    now = utcnow()
    comment_id = await store.save_comment(
        post_id=post_id,
        parent_id=parent_id,
        content_html=plain_to_html(text),
        published=now,
        received=now,
        source="local",
        author_name=name,
        author_url=website,
        author_email=email,
        status="pending",
        held_reason=HELD_LOCAL,
    )
    if on_saved is not None:
        await on_saved(comment_id)
    return comment_id
