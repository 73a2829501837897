"""Frozen records that cross module boundaries, and the one way we write time.

Raw JSON (``JsonObject``) exists only at the wire; everything inside the server
passes these dataclasses around. Timestamps are timezone-aware UTC datetimes in
memory and ``YYYY-MM-DDTHH:MM:SSZ`` text in the database, which sorts correctly.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

JsonObject = dict[str, Any]

Visibility = Literal["public", "unlisted", "followers", "direct"]
CommentStatus = Literal["published", "pending", "rejected", "deleted"]
CommentSource = Literal["fediverse", "local"]
PostState = Literal["published", "draft", "scheduled"]


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


def actor_handle(username: str, domain: str) -> str | None:
    """``@user@host`` for a remote actor; None for one without ``preferredUsername``,
    which has no handle: we never make one up (the id's host may not answer WebFinger)."""
    return f"@{username}@{domain}" if username else None


def actor_address(ap_id: str) -> str:
    """How an actor with no handle (and no name) is named: its id's host and path."""
    _, _, rest = ap_id.partition("://")
    host, slash, path = rest.partition("/")
    address = host.rsplit("@", 1)[-1] + (slash + path.split("?")[0].split("#")[0]).rstrip("/")
    return address if len(address) <= 100 else address[:99] + "…"


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
    draft: bool | None = None  # front matter ``draft``; None: not said (an edit keeps the state)
    image_alt: str = ""  # the cover image's alt text (front matter ``image_alt``)
    # Its local images, imported into the media store (media.py): src as written -> image.
    media: tuple[tuple[str, MediaImage], ...] = ()


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
    image_alt: str = ""  # the cover image's alt text
    state: PostState = "published"  # readers and servers see only published posts
    pinned: bool = False  # in the actor's featured collection, first on the index

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

    @classmethod
    def remote(
        cls,
        *,
        ap_id: str,
        username: str,
        domain: str,
        name: str | None,
        url: str | None,
        avatar_url: str | None,
    ) -> Author:
        """A remote actor: its name, else its username, else its id's host and path; a
        handle only if it has a username."""
        return cls(
            name=name or username or actor_address(ap_id),
            handle=actor_handle(username, domain),
            profile_url=url or ap_id,
            avatar_url=avatar_url,
        )


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
    by_author: bool = False  # the blog's author answering (answers.py)


@dataclass(slots=True)
class Thread:
    """A comment and the replies under it, oldest first, for rendering."""

    comment: Comment
    children: list[Thread] = field(default_factory=list)
    number: int | None = None  # its place among the post's responses; None for a placeholder
    # Shown on an earlier page of responses: here only to hold its replies that this page
    # continues with (comments.py).
    continued: bool = False

    @property
    def deleted(self) -> bool:
        return self.comment.status == "deleted"


@dataclass(frozen=True, slots=True)
class ResponseEntry:
    """A response with the post it answers, for the response feeds and notifications."""

    comment: Comment
    post_uid: str
    post_slug: str
    post_title: str


@dataclass(frozen=True, slots=True)
class NotificationJob:
    """One webhook POST about a response; ``attempts`` counts this one."""

    id: int
    payload: bytes
    attempts: int


@dataclass(frozen=True, slots=True)
class ScheduleJob:
    """A scheduled post to publish once its time has come; ``attempts`` counts this one."""

    id: int
    post_id: int
    attempts: int


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
class CrawlJob:
    """A fediverse comment whose replies to read from its server (crawl.py); ``attempts``
    counts this one, ``rounds`` the crawls of it already done."""

    id: int
    comment_id: int
    post_id: int
    ap_id: str
    host: str
    found_by: Literal["delivery", "crawl"]
    depth: int  # 1: a reply to the post itself
    rounds: int
    attempts: int
    arrived: datetime  # when the comment arrived: the rounds count from here
    post_published: datetime
    post_deleted: bool


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


@dataclass(frozen=True, slots=True)
class Mentioned:
    """The remote account an author's answer is for: mentioned, and delivered to."""

    ap_id: str
    username: str
    domain: str
    profile_url: str
    inbox: str | None  # their shared inbox if they have one

    @property
    def handle(self) -> str:
        """``@user@host``, or the id's host and path for an actor without a username."""
        return actor_handle(self.username, self.domain) or actor_address(self.ap_id)


@dataclass(frozen=True, slots=True)
class AuthorAnswer:
    """The blog author's answer to a response: a comment of the blog's own, with an id."""

    id: int  # the comment's number
    ap_id: str
    post_id: int
    post_uid: str
    post_slug: str
    parent_id: int
    parent_ap_id: str | None  # None: the answered comment came from the local form
    mentioned: Mentioned | None
    content_html: str
    visibility: Visibility
    status: CommentStatus
    published: datetime
    updated: datetime | None
    gone_at: datetime | None  # deleted, or its post deleted: the id answers 410


MEDIA_TYPES = {"jpg": "image/jpeg", "png": "image/png", "webp": "image/webp", "gif": "image/gif"}


@dataclass(frozen=True, slots=True)
class MediaImage:
    """An image in the media store (media.py): named by the sha256 of its stripped
    original, stored as resized variants ``/media/{hash}-{width}.{ext}``."""

    hash: str
    ext: str  # a key of MEDIA_TYPES
    variants: tuple[tuple[int, int], ...]  # (width, height), narrowest first

    @property
    def media_type(self) -> str:
        return MEDIA_TYPES[self.ext]

    @property
    def largest(self) -> tuple[int, int]:
        return self.variants[-1]

    def path(self, width: int) -> str:
        return f"/media/{self.hash}-{width}.{self.ext}"


# ---- the state of stored things: what Store's reads return besides the records above ----
# Timestamps are datetimes, as everywhere in memory; a backend builds these from its rows.


@dataclass(frozen=True, slots=True)
class DeliveryState:
    """One delivery of an activity to one inbox, as the author sees it."""

    id: int
    type: str  # the activity's
    inbox: str
    status: str  # queued, sent, failed or dead
    attempts: int
    next_attempt: datetime
    finished: datetime | None
    last_error: str | None


@dataclass(frozen=True, slots=True)
class HostDeliveries:
    """The deliveries to one host not sent yet, by state (see ``Store.list_delivery_hosts``)."""

    host: str
    waiting: int
    failing: int
    failed: int
    dead: int
    next_attempt: datetime | None
    last_error: str | None

    @property
    def retryable(self) -> int:
        return self.failing + self.failed + self.dead


@dataclass(frozen=True, slots=True)
class CachedActor:
    """A remote actor as cached (not deleted), with its local number."""

    id: int
    ap_id: str
    type: str
    username: str
    domain: str
    name: str
    url: str | None
    icon_url: str | None
    inbox: str | None
    shared_inbox: str | None
    key_id: str | None
    public_key_pem: str | None
    fetched: datetime


@dataclass(frozen=True, slots=True)
class InboxState:
    """A stored inbound activity, as the author sees it."""

    id: int
    type: str
    actor: str
    status: str  # queued, done or failed
    attempts: int
    next_attempt: datetime | None
    error: str | None
    received: datetime


@dataclass(frozen=True, slots=True)
class CommentState:
    """Where a stored comment is and what it may become (edits, deletes, crawls)."""

    id: int
    post_id: int
    status: CommentStatus
    visibility: Visibility
    published: datetime
    updated: datetime | None
    received: datetime
    actor: str | None  # its sender's id; None for one from the local form


@dataclass(frozen=True, slots=True)
class StoredComment:
    """A comment as stored, with its sender's id and its post's slug: for moderation."""

    id: int
    post_id: int
    parent_id: int | None
    ap_id: str | None
    slug: str  # its post's
    actor: str | None  # its sender's id; None for one from the local form
    content_html: str
    visibility: Visibility
    status: CommentStatus
    held_reason: str | None  # why it is "pending"
    author_email: str | None  # local comments only; never published
    by_author: bool


@dataclass(frozen=True, slots=True)
class CommentForReview:
    """A comment in the author's list of comments (``fediblog comments``)."""

    id: int
    slug: str  # its post's
    status: CommentStatus
    visibility: Visibility
    source: CommentSource
    published: datetime
    content_html: str
    author_name: str  # local comments only
    actor: str | None  # its sender's id; None for one from the local form
    username: str | None
    domain: str | None


@dataclass(frozen=True, slots=True)
class Reaction:
    """A like or a boost of a post."""

    type: Literal["Like", "Announce"]
    content: str | None  # a Misskey emoji reaction
    author: Author


@dataclass(frozen=True, slots=True)
class CrawlState:
    """Where the crawl of one comment's replies stands (crawl.py)."""

    found_by: Literal["delivery", "crawl"]
    depth: int
    status: str  # queued, done or failed
    rounds: int
    attempts: int
    next_attempt: datetime
    last_error: str | None
    created: datetime
    finished: datetime | None


@dataclass(frozen=True, slots=True)
class NotificationState:
    """One webhook notification about a response, as the author sees it."""

    comment_id: int
    event: str
    status: str  # queued, sent, failed or dead
    attempts: int
    last_error: str | None


@dataclass(frozen=True, slots=True)
class ScheduleState:
    """Where the publication of a scheduled post stands."""

    status: str  # queued, done or failed
    attempts: int
    next_attempt: datetime
    error: str | None


@dataclass(frozen=True, slots=True)
class ProxiedMedia:
    """An image the media proxy serves (proxy.py): where from, and whether it is kept."""

    key: str
    url: str
    kind: Literal["image", "avatar"]
    status: Literal["new", "cached", "failed"]
    content_type: str | None
    error: str | None
    fetched: datetime | None
    used: datetime | None


@dataclass(frozen=True, slots=True)
class CommentContent:
    """A comment's HTML, to rewrite (the media proxy's sweep)."""

    id: int
    content_html: str


# A desk session ends after this long unused (desk.py).
IDLE_TIMEOUT = timedelta(hours=12)


@dataclass(frozen=True, slots=True)
class DeskSession:
    """A sign-in to the desk (desk.py)."""

    key: str  # the SHA-256 of the session id; the id itself is only in the cookie
    created: datetime
    last_seen: datetime
    expires: datetime  # the absolute end
    ip: str
    user_agent: str

    def ends(self) -> datetime:
        """When it ends if unused from now on."""
        return min(self.expires, self.last_seen + IDLE_TIMEOUT)


@dataclass(frozen=True, slots=True)
class QueueStats:
    """The inbox's and the deliveries' queues now, for /metrics and the desk."""

    inbox_queued: int  # activities waiting
    deliveries_queued: int  # deliveries waiting
    oldest_waiting: datetime | None  # when the oldest activity not yet tried arrived
    last_received: datetime | None  # the activity processed last: when it arrived,
    last_processed: datetime | None  # and when it was done
