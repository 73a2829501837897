"""Moderation: approve, reject and delete comments; block actors and domains.

A block hides what is already here (without deleting it, so ``unblock`` restores
it) and makes the inbox drop whatever the blocked actor or domain sends next: 202,
nothing stored. The running server rereads the block list every second.
"""

from __future__ import annotations

import re
from urllib.parse import urlsplit

from fediblog.errors import FediblogError
from fediblog.models import utcnow
from fediblog.render import plain_to_html
from fediblog.store import Store

_DOMAIN = re.compile(r"^(?=.{1,253}$)[a-z0-9-]+(\.[a-z0-9-]+)+(:\d{1,5})?$")


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


async def set_status(store: Store, comment_id: int, status: str) -> None:
    row = await store.get_comment_row(comment_id)
    if row is None or row["status"] == "deleted":
        raise ModerationError(f"no comment has the id {comment_id}")
    if status == "deleted":
        await store.delete_comment(
            comment_id, ap_id=row["ap_id"], actor=row["actor"], when=utcnow()
        )
    else:
        await store.set_comment_status(comment_id, status)


async def hold_local_comment(
    store: Store, post_id: int, *, name: str, email: str, website: str | None, text: str
) -> int:
    """A comment from the blog's own form (already validated), held for approval and
    shown as plain text once approved; the email is kept, never published."""
    now = utcnow()
    return await store.save_comment(
        post_id=post_id,
        parent_id=None,
        content_html=plain_to_html(text),
        published=now,
        received=now,
        source="local",
        author_name=name,
        author_url=website,
        author_email=email,
        status="pending",
    )
