"""Frozen records that cross module boundaries, and the one way we write time.

Raw JSON (``JsonObject``) exists only at the wire; everything inside the server
passes these dataclasses around. Timestamps are timezone-aware UTC datetimes in
memory and ``YYYY-MM-DDTHH:MM:SSZ`` text in the database, which sorts correctly.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal

JsonObject = dict[str, Any]

Visibility = Literal["public", "unlisted", "followers", "direct"]
CommentStatus = Literal["published", "pending", "rejected", "deleted"]
CommentSource = Literal["fediverse", "local"]


def utcnow() -> datetime:
    """Now, in UTC, to the second (what we store and publish)."""
    return datetime.now(UTC).replace(microsecond=0)


def format_ts(moment: datetime) -> str:
    """The canonical text form of a moment: ``2026-11-28T21:35:00Z``."""
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_ts(text: str) -> datetime:
    """Parse an ISO 8601 moment; a value without a zone is taken as UTC."""
    moment = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.astimezone(UTC)


@dataclass(frozen=True, slots=True)
class PostDraft:
    """A post as the author wrote it, before it has an id."""

    title: str
    slug: str
    body_md: str
    summary: str = ""
    tags: tuple[str, ...] = ()
    image: str | None = None
    published: datetime | None = None
    slug_given: bool = True  # False: made from the title; an edit then keeps the old slug


@dataclass(frozen=True, slots=True)
class Post:
    """A published post. ``uid`` is stable; ``slug`` may change."""

    id: int
    uid: str
    slug: str
    title: str
    summary: str
    body_md: str
    body_html: str
    tags: tuple[str, ...]
    image: str | None
    published: datetime
    updated: datetime | None
    response_count: int = 0

    @property
    def last_modified(self) -> datetime:
        return self.updated or self.published


@dataclass(frozen=True, slots=True)
class Author:
    """Who wrote a comment, as a reader sees it."""

    name: str
    handle: str | None = None  # "@user@host", host taken from the actor id
    profile_url: str | None = None
    avatar_url: str | None = None


@dataclass(frozen=True, slots=True)
class Comment:
    """A response under a post: from the fediverse or from the local form."""

    id: int
    post_id: int
    parent_id: int | None
    ap_id: str | None
    url: str | None
    author: Author
    content_html: str
    summary: str | None
    sensitive: bool
    visibility: Visibility
    status: CommentStatus
    source: CommentSource
    published: datetime
    updated: datetime | None


@dataclass(slots=True)
class Thread:
    """A comment and the replies under it, oldest first, for rendering."""

    comment: Comment
    children: list[Thread] = field(default_factory=list)

    @property
    def deleted(self) -> bool:
        return self.comment.status == "deleted"


@dataclass(frozen=True, slots=True)
class OutgoingActivity:
    """An activity we publish: stored as the exact JSON every recipient gets."""

    ap_id: str
    type: str
    payload: str
    public: bool = True


@dataclass(frozen=True, slots=True)
class DeliveryJob:
    """One activity to POST to one inbox; ``attempts`` counts this one."""

    id: int
    inbox: str
    payload: bytes
    attempts: int


@dataclass(frozen=True, slots=True)
class InboxItem:
    """A verified inbound activity, stored before we answer 202."""

    dedup_key: str
    actor: str
    type: str
    payload: str


@dataclass(frozen=True, slots=True)
class InboxJob:
    """A stored inbound activity to act on; ``attempts`` counts this one."""

    id: int
    payload: str
    attempts: int


@dataclass(frozen=True, slots=True)
class ActorKey:
    """A remote actor's public key as we cached it."""

    actor: str
    key_id: str
    public_key_pem: str
    refreshed_at: datetime | None


@dataclass(frozen=True, slots=True)
class Follower:
    actor: str
    inbox: str
    shared_inbox: str | None
    follow_id: str
    status: Literal["pending", "accepted"]
    created: datetime
