"""All SQL lives here: the schema, its numbered migrations, and every query.

The rest of fediblog talks to ``Store`` in terms of the records in ``models``;
nothing outside this module writes SQL. ``Store`` is SQLite (aiosqlite), the embedded
default; ``PostgresStore`` (at the end, through asyncpg) is the same class on a
PostgreSQL server, for a blog run by several processes or machines. Each query is
written once for both: the few spellings that differ are class attributes the
PostgreSQL class overrides, and the migrations are SQLite's DDL, which
``_postgres_ddl`` turns into PostgreSQL's.

SQLite runs in WAL mode so readers never wait for the writer, with
``synchronous=FULL`` so that a commit that returned survives a power cut. Processes
writing one database take turns through a lock file (``_WriterLock``), which hands the
write lock on within a millisecond instead of SQLite's sleeps of up to 100 ms.
``Store.version()`` changes whenever anything a page shows was committed, by this
process or by another one (the CLI writing while the server runs, a worker process):
page caches key on it. Bookkeeping no page shows (``shown=False``: queues, leases,
heartbeats) moves it in no process, so a busy worker process leaves the pages cached.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import functools
import heapq
import json
import os
import re
import sqlite3
import time
from collections.abc import (
    AsyncIterator,
    Callable,
    Coroutine,
    Generator,
    Iterable,
    Iterator,
    Mapping,
    Sequence,
)
from contextlib import asynccontextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field, fields
from datetime import datetime
from pathlib import Path
from typing import Any, TypeVar

import aiosqlite

from fediblog.config import without_password
from fediblog.errors import (
    DuplicateSlug,
    PostNotFound,
    StorageConflict,
    StorageError,
    StorageUnavailable,
)
from fediblog.models import (
    ActorKey,
    Author,
    AuthorAnswer,
    CachedActor,
    Comment,
    CommentContent,
    CommentForReview,
    CommentSource,
    CommentState,
    CrawlJob,
    CrawlState,
    DeliveryJob,
    DeliveryState,
    DeskSession,
    Follower,
    HostDeliveries,
    InboxItem,
    InboxJob,
    InboxState,
    MediaImage,
    Mentioned,
    NotificationJob,
    NotificationState,
    OutgoingActivity,
    Post,
    PostDraft,
    PostState,
    ProxiedMedia,
    QueueStats,
    Reaction,
    ResponseEntry,
    ScheduleJob,
    ScheduleState,
    StoredComment,
    Visibility,
    format_ts,
    parse_ts,
    utcnow,
)
from fediblog.worker import Outcome

# Each entry is one migration; the database remembers how many ran (PRAGMA user_version).
# Never edit a shipped entry: append a new one.
MIGRATIONS: tuple[str, ...] = (
    """
    CREATE TABLE posts (
        id            INTEGER PRIMARY KEY,
        uid           TEXT NOT NULL UNIQUE,       -- stable: the ActivityPub id is built from it
        slug          TEXT NOT NULL UNIQUE,
        title         TEXT NOT NULL,
        summary       TEXT NOT NULL DEFAULT '',
        body_md       TEXT NOT NULL,
        body_html     TEXT NOT NULL,
        image         TEXT,
        published_at  TEXT NOT NULL,
        updated_at    TEXT,
        deleted_at    TEXT
    );
    CREATE INDEX posts_live ON posts(published_at DESC) WHERE deleted_at IS NULL;

    CREATE TABLE post_tags (
        post_id  INTEGER NOT NULL REFERENCES posts(id) ON DELETE CASCADE,
        tag      TEXT NOT NULL,
        PRIMARY KEY (post_id, tag)
    ) WITHOUT ROWID;
    CREATE INDEX post_tags_tag ON post_tags(tag, post_id);

    -- A slug a post used to have: its old URL redirects to the new one.
    CREATE TABLE old_slugs (
        slug     TEXT PRIMARY KEY,
        post_id  INTEGER NOT NULL REFERENCES posts(id) ON DELETE CASCADE
    );

    -- Remote actors, cached. The handle's host is always the host of ap_id.
    CREATE TABLE actors (
        id                INTEGER PRIMARY KEY,
        ap_id             TEXT NOT NULL UNIQUE,
        type              TEXT NOT NULL DEFAULT 'Person',
        username          TEXT NOT NULL DEFAULT '',
        domain            TEXT NOT NULL,
        name              TEXT NOT NULL DEFAULT '',
        url               TEXT,
        icon_url          TEXT,
        inbox             TEXT,
        shared_inbox      TEXT,
        key_id            TEXT,
        public_key_pem    TEXT,
        fetched_at        TEXT NOT NULL,
        key_refreshed_at  TEXT,
        deleted_at        TEXT
    );
    CREATE INDEX actors_key_id ON actors(key_id);
    CREATE INDEX actors_domain ON actors(domain);

    CREATE TABLE comments (
        id            INTEGER PRIMARY KEY,
        post_id       INTEGER NOT NULL REFERENCES posts(id) ON DELETE CASCADE,
        parent_id     INTEGER REFERENCES comments(id),
        ap_id         TEXT UNIQUE,                -- NULL for comments from the local form
        url           TEXT,                       -- the original, for the date link
        actor_id      INTEGER REFERENCES actors(id),
        author_name   TEXT NOT NULL DEFAULT '',   -- local comments only
        author_url    TEXT,                       -- local comments only
        author_email  TEXT,                       -- local comments only; never published
        content_html  TEXT NOT NULL,
        summary       TEXT,                       -- content warning
        sensitive     INTEGER NOT NULL DEFAULT 0,
        visibility    TEXT NOT NULL DEFAULT 'public'
                      CHECK (visibility IN ('public', 'unlisted', 'followers', 'direct')),
        status        TEXT NOT NULL DEFAULT 'published'
                      CHECK (status IN ('published', 'pending', 'rejected', 'deleted')),
        source        TEXT NOT NULL CHECK (source IN ('fediverse', 'local')),
        published_at  TEXT NOT NULL,
        updated_at    TEXT,
        received_at   TEXT NOT NULL
    );
    CREATE INDEX comments_post ON comments(post_id, published_at, id);
    CREATE INDEX comments_actor ON comments(actor_id);

    CREATE TABLE reactions (
        id          INTEGER PRIMARY KEY,
        post_id     INTEGER NOT NULL REFERENCES posts(id) ON DELETE CASCADE,
        actor_id    INTEGER NOT NULL REFERENCES actors(id),
        type        TEXT NOT NULL CHECK (type IN ('Like', 'Announce')),
        ap_id       TEXT UNIQUE,
        content     TEXT,                         -- a Misskey emoji reaction
        created_at  TEXT NOT NULL,
        UNIQUE (post_id, actor_id, type)
    );

    CREATE TABLE followers (
        id            INTEGER PRIMARY KEY,
        actor_id      INTEGER NOT NULL UNIQUE REFERENCES actors(id),
        follow_ap_id  TEXT NOT NULL,
        inbox         TEXT NOT NULL,
        shared_inbox  TEXT,
        status        TEXT NOT NULL DEFAULT 'accepted' CHECK (status IN ('pending', 'accepted')),
        created_at    TEXT NOT NULL
    );

    -- What we published (the outbox), kept as the exact JSON we sent.
    CREATE TABLE activities (
        id          INTEGER PRIMARY KEY,
        ap_id       TEXT NOT NULL UNIQUE,
        type        TEXT NOT NULL,
        post_id     INTEGER REFERENCES posts(id),
        payload     TEXT NOT NULL,
        public      INTEGER NOT NULL DEFAULT 1,
        created_at  TEXT NOT NULL
    );
    CREATE INDEX activities_outbox ON activities(type, id) WHERE public = 1;

    -- One row per (activity, inbox): the durable delivery queue.
    CREATE TABLE deliveries (
        id               INTEGER PRIMARY KEY,
        activity_id      INTEGER NOT NULL REFERENCES activities(id),
        inbox            TEXT NOT NULL,
        status           TEXT NOT NULL DEFAULT 'queued'
                         CHECK (status IN ('queued', 'sent', 'failed', 'dead')),
        attempts         INTEGER NOT NULL DEFAULT 0,
        next_attempt_at  TEXT NOT NULL,
        last_error       TEXT,
        created_at       TEXT NOT NULL,
        finished_at      TEXT,
        UNIQUE (activity_id, inbox)
    );
    CREATE INDEX deliveries_due ON deliveries(next_attempt_at) WHERE status = 'queued';

    -- Every accepted inbound activity, stored before we answer 202.
    -- dedup_key is the activity id, or a hash of the body when it has none.
    CREATE TABLE inbox (
        id            INTEGER PRIMARY KEY,
        dedup_key     TEXT NOT NULL UNIQUE,
        actor_ap_id   TEXT NOT NULL,
        type          TEXT NOT NULL,
        payload       TEXT NOT NULL,
        status        TEXT NOT NULL DEFAULT 'queued' CHECK (status IN ('queued', 'done', 'failed')),
        received_at   TEXT NOT NULL,
        processed_at  TEXT,
        error         TEXT
    );
    CREATE INDEX inbox_queued ON inbox(id) WHERE status = 'queued';

    -- Deleted objects, ours and remote: a late Create cannot bring them back.
    CREATE TABLE tombstones (
        ap_id        TEXT PRIMARY KEY,
        actor_ap_id  TEXT,
        former_type  TEXT,
        deleted_at   TEXT NOT NULL
    ) WITHOUT ROWID;

    CREATE TABLE blocks (
        id          INTEGER PRIMARY KEY,
        target      TEXT NOT NULL UNIQUE,         -- an actor id or a domain
        kind        TEXT NOT NULL CHECK (kind IN ('domain', 'actor')),
        created_at  TEXT NOT NULL
    );
    """,
    """
    -- Facts about this blog itself, such as when it was created (the actor's published).
    CREATE TABLE meta (
        key    TEXT PRIMARY KEY,
        value  TEXT NOT NULL
    ) WITHOUT ROWID;
    INSERT INTO meta (key, value) VALUES ('created_at', strftime('%Y-%m-%dT%H:%M:%SZ', 'now'));
    CREATE INDEX followers_status ON followers(status, id);
    CREATE INDEX deliveries_status ON deliveries(status, id);
    """,
    """
    -- The inbox queue retries transient failures: attempts, and when it is due again
    -- (NULL: due now). A claimed row is leased by moving next_attempt_at ahead.
    ALTER TABLE inbox ADD COLUMN attempts INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE inbox ADD COLUMN next_attempt_at TEXT;
    CREATE INDEX inbox_processed ON inbox(processed_at) WHERE status != 'queued';
    CREATE INDEX deliveries_finished ON deliveries(finished_at) WHERE status != 'queued';
    """,
    # 4: the author's answers to responses, marked as such.
    """
    -- The blog's author answering a response: a comment of the blog's own (source 'local',
    -- no actor), with an ap_id of ours ({base}/p/{uid}/answers/{token}) so it federates.
    ALTER TABLE comments ADD COLUMN by_author INTEGER NOT NULL DEFAULT 0;
    """,
    # 5: crawling reply threads: one row per comment whose replies we read.
    """
    -- Reading the replies of each fediverse comment from its own server (crawl.py):
    -- one row per comment, crawled now and again in rounds counted from its arrival
    -- (created_at). found_by tells delivered comments from those the crawl found.
    CREATE TABLE crawls (
        id               INTEGER PRIMARY KEY,
        comment_id       INTEGER NOT NULL UNIQUE REFERENCES comments(id) ON DELETE CASCADE,
        post_id          INTEGER NOT NULL REFERENCES posts(id) ON DELETE CASCADE,
        ap_id            TEXT NOT NULL,
        host             TEXT NOT NULL,
        found_by         TEXT NOT NULL CHECK (found_by IN ('delivery', 'crawl')),
        depth            INTEGER NOT NULL,          -- 1: a reply to the post itself
        status           TEXT NOT NULL DEFAULT 'queued'
                         CHECK (status IN ('queued', 'done', 'failed')),
        rounds           INTEGER NOT NULL DEFAULT 0,
        attempts         INTEGER NOT NULL DEFAULT 0,  -- of the round under way
        next_attempt_at  TEXT NOT NULL,
        last_error       TEXT,
        created_at       TEXT NOT NULL,
        finished_at      TEXT
    );
    CREATE INDEX crawls_due ON crawls(next_attempt_at) WHERE status = 'queued';
    CREATE INDEX crawls_found ON crawls(post_id, found_by);
    """,
    # 6: notifications of new responses; indexes for paging threads.
    """
    -- One webhook POST per new or held response (notify.py): the exact JSON body, kept
    -- as sent, and its state on the common worker (worker.py).
    CREATE TABLE notifications (
        id               INTEGER PRIMARY KEY,
        comment_id       INTEGER NOT NULL REFERENCES comments(id) ON DELETE CASCADE,
        event            TEXT NOT NULL,
        payload          TEXT NOT NULL,
        status           TEXT NOT NULL DEFAULT 'queued'
                         CHECK (status IN ('queued', 'sent', 'failed', 'dead')),
        attempts         INTEGER NOT NULL DEFAULT 0,
        next_attempt_at  TEXT NOT NULL,
        last_error       TEXT,
        created_at       TEXT NOT NULL,
        finished_at      TEXT,
        UNIQUE (comment_id, event)
    );
    CREATE INDEX notifications_due ON notifications(next_attempt_at) WHERE status = 'queued';
    CREATE INDEX notifications_finished ON notifications(finished_at) WHERE status != 'queued';
    -- Walking a thread down from its top-level response (one page of responses), and
    -- the newest arrivals (the private feed, `comments list --since`).
    CREATE INDEX IF NOT EXISTS comments_thread ON comments(parent_id, id);
    CREATE INDEX IF NOT EXISTS comments_received ON comments(received_at);
    """,
    # 7: drafts, scheduled posts and pinned posts.
    """
    -- Only 'published' posts are seen by readers and servers; a draft is seen through
    -- its secret preview token, a scheduled post waits for its post_schedule row.
    ALTER TABLE posts ADD COLUMN state TEXT NOT NULL DEFAULT 'published'
        CHECK (state IN ('published', 'draft', 'scheduled'));
    ALTER TABLE posts ADD COLUMN preview_token TEXT;
    ALTER TABLE posts ADD COLUMN pinned_at TEXT;
    CREATE UNIQUE INDEX posts_preview_token ON posts(preview_token)
        WHERE preview_token IS NOT NULL;
    CREATE INDEX posts_pinned ON posts(pinned_at) WHERE pinned_at IS NOT NULL;

    -- A scheduled post's publication, as a worker job due at the post's time.
    CREATE TABLE post_schedule (
        id               INTEGER PRIMARY KEY,
        post_id          INTEGER NOT NULL UNIQUE REFERENCES posts(id) ON DELETE CASCADE,
        status           TEXT NOT NULL DEFAULT 'queued',   -- queued, done, failed
        attempts         INTEGER NOT NULL DEFAULT 0,
        next_attempt_at  TEXT NOT NULL,
        error            TEXT,
        finished_at      TEXT
    );
    CREATE INDEX post_schedule_due ON post_schedule(next_attempt_at) WHERE status = 'queued';
    """,
    # 8: the media store: images of posts and of the blog itself.
    """
    -- Images imported into the media store (media.py): named by the sha256 of the
    -- stripped original; the files are {hash}-{width}.{ext} under FEDIBLOG_MEDIA_DIR.
    CREATE TABLE media (
        hash        TEXT PRIMARY KEY,
        ext         TEXT NOT NULL,
        variants    TEXT NOT NULL,               -- "480x320 960x640": width x height
        bytes       INTEGER NOT NULL,            -- all the variants' files together
        created_at  TEXT NOT NULL
    ) WITHOUT ROWID;
    -- The cover image's alt text (front matter image_alt), published as its name.
    ALTER TABLE posts ADD COLUMN image_alt TEXT NOT NULL DEFAULT '';
    """,
    # 9: the media proxy: commenters' images served from the blog.
    """
    -- Remote images readers' browsers would load, each behind /proxy/{key} (proxy.py):
    -- the key is an HMAC of the URL under proxy_secret, the bytes a file named by it.
    CREATE TABLE proxy_media (
        key           TEXT PRIMARY KEY,
        url           TEXT NOT NULL UNIQUE,
        host          TEXT NOT NULL,
        kind          TEXT NOT NULL CHECK (kind IN ('image', 'avatar')),
        status        TEXT NOT NULL DEFAULT 'new' CHECK (status IN ('new', 'cached', 'failed')),
        content_type  TEXT,
        size          INTEGER NOT NULL DEFAULT 0,
        error         TEXT,
        fetched_at    TEXT,
        used_at       TEXT,
        created_at    TEXT NOT NULL
    ) WITHOUT ROWID;
    CREATE INDEX proxy_media_lru ON proxy_media(used_at) WHERE status = 'cached';
    INSERT OR IGNORE INTO meta (key, value) VALUES ('proxy_secret', lower(hex(randomblob(32))));
    """,
    # The author's desk (web/admin): its account and sign-in sessions.
    """
    -- The one author account of the web admin (desk.py): its argon2id hash, never the
    -- password itself.
    CREATE TABLE desk_account (
        id             INTEGER PRIMARY KEY CHECK (id = 1),
        password_hash  TEXT NOT NULL,
        changed_at     TEXT NOT NULL
    );
    -- Signed-in browsers. key is the SHA-256 of the cookie's random session id, so a
    -- copy of the database signs nobody in; expires_at is the absolute end.
    CREATE TABLE desk_sessions (
        key            TEXT PRIMARY KEY,
        created_at     TEXT NOT NULL,
        last_seen_at   TEXT NOT NULL,
        expires_at     TEXT NOT NULL,
        ip             TEXT NOT NULL DEFAULT '',
        user_agent     TEXT NOT NULL DEFAULT ''
    ) WITHOUT ROWID;
    """,
    # Why a response was held, for the desk's queue.
    """
    -- Why a response waits for approval, in words for the author (the desk's queue):
    -- set when it is held (responses.py, moderation.py); NULL for one held before.
    ALTER TABLE comments ADD COLUMN held_reason TEXT;
    """,
    # admin: retry skips rows being sent
    """
    -- Until when a claimed delivery is being sent (the claim's lease; NULL once its
    -- outcome is recorded): a leased row looks like a failing one, and retrying it
    -- would have it sent twice.
    ALTER TABLE deliveries ADD COLUMN leased_until TEXT;
    """,
    # admin: the addresses the author signed in from (the global sign-in limit spares them)
    """
    -- An IPv4 address or an IPv6 /64 and the last successful sign-in from it (desk.py);
    -- forgotten after KNOWN_FOR.
    CREATE TABLE desk_addresses (
        address       TEXT PRIMARY KEY,
        signed_in_at  TEXT NOT NULL
    ) WITHOUT ROWID;
    """,
)

_TAG_SEPARATOR = "\x1f"
# A post readers and servers may see: not deleted, and neither a draft nor scheduled.
_LIVE_POST = "p.deleted_at IS NULL AND p.state = 'published'"
AUTHOR_AVATAR = "/static/avatar.png"  # the blog actor's icon, beside the author's answers
PROXY_PATH = "/proxy/"  # where the media proxy serves remote images (web/proxy.py)


def _identity(path: Path) -> tuple[int, int] | None:
    """Which file ``path`` names now (device, inode), or None if it is gone."""
    try:
        found = os.stat(path)
    except OSError:
        return None
    return (found.st_dev, found.st_ino)


# Comments a reader may see: published ones, plus deleted ones kept as placeholders
# for the replies under them. Never followers-only or direct ones.
# Blocked actors and domains are hidden without touching their rows, so unblock restores them.
_NOT_BLOCKED = (
    "NOT EXISTS (SELECT 1 FROM blocks b JOIN actors ba ON ba.id = c.actor_id"
    " WHERE b.target IN (ba.ap_id, ba.domain) OR ba.domain LIKE '%.' || b.target)"
)
_VISIBLE = (
    "c.status IN ('published', 'deleted') AND c.visibility IN ('public', 'unlisted')"
    f" AND {_NOT_BLOCKED}"
)
_COUNTED = f"c.status = 'published' AND c.visibility IN ('public', 'unlisted') AND {_NOT_BLOCKED}"


def _post_columns(tags: str) -> str:
    """A post's columns; ``tags`` joins its tags with _TAG_SEPARATOR (per dialect)."""
    return f"""
    p.id, p.uid, p.slug, p.title, p.summary, p.body_md, p.body_html, p.image, p.image_alt,
    p.published_at, p.updated_at, p.state, p.pinned_at,
    (SELECT {tags} FROM post_tags t WHERE t.post_id = p.id) AS tags,
    (SELECT count(*) FROM comments c WHERE c.post_id = p.id AND {_COUNTED}) AS responses
"""


# A commenter's avatar as readers' browsers load it: through the media proxy (proxy.py),
# never from the commenter's server; none (the default picture) until it is proxied.
_PROXIED_ICON = (
    f"(SELECT '{PROXY_PATH}' || m.key FROM proxy_media m WHERE m.url = a.icon_url) AS icon_url"
)

_COMMENT_COLUMNS = f"""
    c.id, c.post_id, c.parent_id, c.ap_id, c.url, c.content_html, c.summary, c.sensitive,
    c.visibility, c.status, c.source, c.published_at, c.updated_at,
    c.author_name, c.author_url,
    a.ap_id AS actor_ap_id, a.username, a.domain, a.name AS actor_name, a.url AS actor_url,
    {_PROXIED_ICON}, c.by_author
"""


# What an Outcome does to its row (worker.py): done, retry later, failed, or released
# (claimed, never run: due again, its attempt not counted).
_INSERT_INBOX = (
    "INSERT OR IGNORE INTO inbox (dedup_key, actor_ap_id, type, payload, received_at)"
)
_RECORD_INBOX = """
    UPDATE inbox SET
        status = CASE :status WHEN 'done' THEN 'done' WHEN 'failed' THEN 'failed'
                 ELSE 'queued' END,
        attempts = attempts - CASE WHEN :status = 'release' THEN 1 ELSE 0 END,
        next_attempt_at = :retry_at,
        error = coalesce(:error, error),
        processed_at = CASE WHEN :status IN ('done', 'failed') THEN :now END
    WHERE id = :id
"""
_RECORD_DELIVERY = """
    UPDATE deliveries SET
        status = CASE :status WHEN 'done' THEN 'sent' WHEN 'failed' THEN
                 CASE WHEN :gave_up THEN 'dead' ELSE 'failed' END ELSE 'queued' END,
        attempts = attempts - CASE WHEN :status = 'release' THEN 1 ELSE 0 END,
        next_attempt_at = coalesce(:retry_at, next_attempt_at),
        last_error = CASE :status WHEN 'release' THEN last_error ELSE :error END,
        finished_at = CASE WHEN :status IN ('done', 'failed') THEN :now END,
        leased_until = NULL
    WHERE id = :id
"""

# A scheduled post's row; a row re-queued by an edit meanwhile (attempts = 0) is left alone.
_RECORD_SCHEDULE = """
    UPDATE post_schedule SET
        status = CASE :status WHEN 'done' THEN 'done' WHEN 'failed' THEN 'failed'
                 ELSE 'queued' END,
        attempts = attempts - CASE WHEN :status = 'release' THEN 1 ELSE 0 END,
        next_attempt_at = coalesce(:retry_at, next_attempt_at),
        error = CASE :status WHEN 'release' THEN error ELSE :error END,
        finished_at = CASE WHEN :status IN ('done', 'failed') THEN :now END
    WHERE id = :id AND attempts > 0
"""


def _outcome_rows(results: Iterable[tuple[Any, Outcome]]) -> list[dict[str, Any]]:
    now = format_ts(utcnow())
    return [
        {
            "id": job.id,
            "status": outcome.status,
            "error": outcome.error,
            "retry_at": format_ts(outcome.retry_at) if outcome.retry_at else None,
            "gave_up": outcome.gave_up,
            "now": now,
        }
        for job, outcome in results
    ]


def _post(row: sqlite3.Row) -> Post:
    tags = row["tags"]
    return Post(
        id=row["id"],
        uid=row["uid"],
        slug=row["slug"],
        title=row["title"],
        summary=row["summary"],
        body_md=row["body_md"],
        body_html=row["body_html"],
        tags=tuple(sorted(tags.split(_TAG_SEPARATOR))) if tags else (),
        image=row["image"],
        published=parse_ts(row["published_at"]),
        updated=parse_ts(row["updated_at"]) if row["updated_at"] else None,
        response_count=row["responses"],
        state=row["state"],
        pinned=row["pinned_at"] is not None,
        image_alt=row["image_alt"],
    )


def _media(row: sqlite3.Row) -> MediaImage:
    sizes = (part.split("x") for part in str(row["variants"]).split())
    return MediaImage(
        hash=row["hash"], ext=row["ext"], variants=tuple((int(w), int(h)) for w, h in sizes)
    )


def _comment(row: sqlite3.Row) -> Comment:
    if row["actor_ap_id"] is not None:
        author = Author.remote(
            ap_id=row["actor_ap_id"],
            username=row["username"],
            domain=row["domain"],
            name=row["actor_name"],
            url=row["actor_url"],
            avatar_url=row["icon_url"],
        )
    elif row["by_author"]:
        # The blog's own avatar, as on the actor; the page shows the configured author name.
        author = Author(
            name=row["author_name"], profile_url=row["author_url"], avatar_url=AUTHOR_AVATAR
        )
    else:
        author = Author(name=row["author_name"], profile_url=row["author_url"])
    return Comment(
        id=row["id"],
        post_id=row["post_id"],
        parent_id=row["parent_id"],
        ap_id=row["ap_id"],
        url=row["url"],
        author=author,
        content_html=row["content_html"],
        summary=row["summary"],
        sensitive=bool(row["sensitive"]),
        visibility=row["visibility"],
        status=row["status"],
        source=row["source"],
        published=parse_ts(row["published_at"]),
        updated=parse_ts(row["updated_at"]) if row["updated_at"] else None,
        by_author=bool(row["by_author"]),
    )


def _moment(value: str | None) -> datetime | None:
    return parse_ts(value) if value else None


_R = TypeVar("_R")
# Per record type and row shape: (field, column, conversion or None).
_PLANS: dict[tuple[type[Any], tuple[str, ...]], list[tuple[str, str, Any]]] = {}


def _record(cls: type[_R], row: sqlite3.Row) -> _R:
    """The record ``cls`` (a dataclass of models.py) from a row: each field from the
    column of its name, or from ``<field>_at`` for a time. Times are parsed (NULL stays
    None), booleans made bool. The plan is worked out once per record and row shape."""
    keys = tuple(row.keys())
    plan = _PLANS.get((cls, keys))
    if plan is None:
        plan = _PLANS[(cls, keys)] = []
        for field_ in fields(cls):  # type: ignore[arg-type]
            column = field_.name if field_.name in keys else f"{field_.name}_at"
            kind = str(field_.type)
            convert = _moment if "datetime" in kind else bool if kind == "bool" else None
            plan.append((field_.name, column, convert))
    return cls(
        **{
            name: row[column] if convert is None else convert(row[column])
            for name, column, convert in plan
        }
    )









def _reaction(row: sqlite3.Row) -> Reaction:
    author = Author.remote(
        ap_id=row["ap_id"],
        username=row["username"],
        domain=row["domain"],
        name=row["name"],
        url=row["url"],
        avatar_url=row["icon_url"],
    )
    return Reaction(type=row["type"], content=row["content"], author=author)








async def _returning(db: aiosqlite.Connection, sql: str, params: Sequence[Any]) -> int:
    """Run an INSERT … RETURNING id and give the id."""
    async with db.execute(sql, params) as cursor:
        row = await cursor.fetchone()
    assert row is not None
    return int(row[0])


_BUSY_TIMEOUT_MS = 5000  # how long a writer waits for another one
_PRAGMAS = (
    "journal_mode = WAL",
    "synchronous = FULL",
    "foreign_keys = ON",
    f"busy_timeout = {_BUSY_TIMEOUT_MS}",
    "mmap_size = 268435456",
)

# The task inside a write transaction: its reads go to the writer connection (they must
# see its own uncommitted rows); every other read goes to the reader. The task, not a
# flag: a task started inside the transaction inherits the variable, and must not read
# rows that may yet roll back.
_writing: ContextVar[asyncio.Task[Any] | None] = ContextVar("fediblog_store_writing", default=None)


@dataclass(slots=True)
class SharedTransaction:
    """One write transaction that many writes join (``Store.shared_transaction``).

    Rows kept for later (``Store.save_comment_later``, ``save_proxied_later``) are
    written, one executemany per statement, by whatever comes next on the writer
    connection: a write that joins, a read in the transaction, or its commit. A kept row
    that fails to write therefore fails *there*: in the handler of a later reply, or at
    the commit, not in the reply that kept it. Either way the transaction is marked
    broken and rolls back, and the inbox (``Inbox._shared``) redoes the run: the later
    reply alone, the others together, until the commit fails and they run one per
    transaction, where nothing is kept and the culprit fails on its own. Only a failure
    of the database itself (locked, full, an I/O error: transient) is expected there,
    since everything else a kept row could break on was settled before it was kept:
    its content was checked (valid Unicode, sizes) when its reply was drafted, its
    duplicates, parent and post were looked up in this transaction, its id is the next
    rowid under our write lock (read again after every other write that joins:
    ``next_comment_id``), and a proxied row that is known already is ignored.
    """

    task: asyncio.Task[Any] | None
    writes: int = 0  # writes that joined it: a failure after none left it intact
    shown: bool = False
    broken: bool = False  # a write that joined it failed: it must not commit
    # Rows kept for one executemany per statement, in the order they were kept.
    later: dict[str, list[tuple[Any, ...]]] = field(default_factory=dict)
    # The id the next kept comment takes (0: read it first). Only save_comment_later
    # chooses it; a write that joins may insert a comment, so it clears it.
    next_comment_id: int = 0


_shared: ContextVar[SharedTransaction | None] = ContextVar("fediblog_store_shared", default=None)


async def _set_pragma(connection: aiosqlite.Connection, pragma: str) -> None:
    # Two processes opening a new database at once (`serve --web-only` and `worker`)
    # both switch it to WAL, and SQLite may answer the second "locked" at once, without
    # the busy timeout: a switch that needs an exclusive lock while another connection
    # reads. It is tried again for a few seconds, as the busy timeout would.
    for attempt in range(100):
        try:
            await connection.execute(f"PRAGMA {pragma}")
            return
        except sqlite3.OperationalError as error:
            if attempt == 99 or error.sqlite_errorcode != sqlite3.SQLITE_BUSY:
                raise
            await asyncio.sleep(0.05)


class _WriterLock:
    """A lock on ``<database>-lock`` that every process writing the database takes
    before its write transaction and lets go of after it, on the writer connection's
    own thread.

    SQLite alone has one writer wait for another by sleeping and trying again, in steps
    that grow to 100 ms: two busy processes (``serve --web-only`` and ``worker``) then
    spend much of their time asleep while the machine idles. This lock is tried again
    every millisecond at most, so a waiting writer starts about as soon as the other
    has committed. It is advisory, an addition to SQLite's own lock, which still keeps
    out a writer that does not take it (the sqlite3 shell); it dies with its process,
    kill -9 included; where its file cannot be opened (a read-only folder) the writer
    goes without it.
    """

    def __init__(self, database: Path, timeout: float) -> None:
        self._path = database.with_name(database.name + "-lock")
        self.timeout = timeout  # as SQLite's busy_timeout: then "database is locked"
        self._held: int | None = None

    def acquire(self) -> None:
        """Wait for the lock, at most ``timeout`` seconds (on the writer's thread)."""
        try:
            fd = os.open(self._path, os.O_RDONLY | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError:
            return  # SQLite's lock alone, as without this one
        try:
            pause, deadline = 0.00005, time.monotonic() + self.timeout
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() >= deadline:
                        raise sqlite3.OperationalError(
                            f"database is locked: another process has held its write lock"
                            f" for {self.timeout:g} s"
                        ) from None
                    time.sleep(pause)
                    pause = min(pause * 2, 0.001)
        except BaseException:
            os.close(fd)
            raise
        self._held = fd

    def release(self) -> None:
        if self._held is not None:
            os.close(self._held)  # which lets go of its flock
            self._held = None


def _unavailable(path: Path, error: sqlite3.Error) -> StorageUnavailable:
    return StorageUnavailable(f"the database {path} cannot be used now: {error}")


class Store:
    """One SQLite database. Open with ``await Store.open(path)``; close when done.

    Two connections: one writer, whose transactions ``_lock`` serializes, and one
    reader. In WAL mode the reader sees only committed data, so no coroutine can read
    a row another one is about to roll back.
    """

    # What differs between the dialects, overridden by PostgresStore.
    _POST_COLUMNS = _post_columns("group_concat(t.tag, char(31))")
    _SKIP_LOCKED = ""  # a claim's subquery: other processes' claims wait (one writer)

    def __init__(self, db: aiosqlite.Connection, reader: aiosqlite.Connection, path: Path) -> None:
        self._db = db
        self._reader = reader
        self._path = path
        self._identity = _identity(path)
        self._lock = asyncio.Lock()  # one write transaction at a time on this connection
        self._writes = 0
        self._data_version: int | None = None  # PRAGMA data_version when last asked
        self._shown_generation = 0  # _SHOWN_GENERATION as last read
        self._checked_at = 0.0
        self.version_max_age = 1.0  # seconds another process's commit may go unnoticed
        self._peeker: sqlite3.Connection | None = None  # peek_data_version's, once asked
        self._writer_lock = _WriterLock(path, _BUSY_TIMEOUT_MS / 1000)

    @property
    def path(self) -> Path:
        return self._path

    @classmethod
    async def open(cls, path: Path | str, *, create: bool = True) -> Store:
        """Open and migrate the database at ``path``; create it only if ``create``.
        A ``postgresql://`` URL opens a PostgresStore instead (``create`` is moot: the
        server's database exists, and its schema is made on first use)."""
        if isinstance(path, str):
            return await PostgresStore.connect(path)
        if not create and _identity(path) is None:
            raise StorageError(f"no database at {path}: run `fediblog init` first")
        connections: list[aiosqlite.Connection] = []
        try:
            if _identity(path) is None:
                # It holds commenters' emails: mode 0600 from its first byte (SQLite gives
                # the -wal and -shm files the database's mode), in a folder 0700 if new.
                path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
                with contextlib.suppress(FileExistsError):  # another process was first
                    os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
            for _ in range(2):
                connection = await aiosqlite.connect(path, isolation_level=None)
                connections.append(connection)
                connection.row_factory = sqlite3.Row
                for pragma in _PRAGMAS:
                    await _set_pragma(connection, pragma)
            db, reader = connections
            store = cls(db, reader, path)
            await store.migrate()
        except (OSError, sqlite3.Error) as error:
            for connection in connections:
                await connection.close()
            raise StorageError(f"cannot use the database {path}: {error}") from None
        except BaseException:
            for connection in connections:
                await connection.close()
            raise
        return store

    async def close(self) -> None:
        if self._peeker is not None:
            self._peeker.close()
        await self._reader.close()
        await self._db.close()

    async def migrate(self) -> int:
        """Run the migrations this database has not seen; return the schema version.

        All that are due run in one write transaction with the version bump, so a crash
        leaves either the old schema or the new one, and a new database costs one commit
        (one fsync), not one per migration. The version is read again once the write
        lock is held, so two processes starting together (``serve --web-only`` and
        ``worker``) never both run one (the second would fail on a column that already
        exists).
        """
        if await self._user_version() == len(MIGRATIONS):
            return len(MIGRATIONS)
        await self._db.execute("BEGIN IMMEDIATE")
        try:
            # Statement by statement: executescript would commit first.
            for migration in MIGRATIONS[await self._user_version() :]:
                for statement in _statements(migration):
                    await self._db.execute(statement)
            await self._db.execute(f"PRAGMA user_version = {len(MIGRATIONS)}")
            await self._db.execute("COMMIT")
        except BaseException:
            with contextlib.suppress(sqlite3.Error):
                await self._db.execute("ROLLBACK")
            raise
        return len(MIGRATIONS)

    async def _user_version(self) -> int:
        [[current]] = await self._db.execute_fetchall("PRAGMA user_version")
        if current > len(MIGRATIONS):
            raise StorageError(
                f"the database is at schema {current}, newer than this fediblog knows"
                f" ({len(MIGRATIONS)}): upgrade fediblog"
            )
        return int(current)

    # ---- change tracking --------------------------------------------------------

    async def version(self) -> tuple[int, int]:
        """A value that changes after every commit of something a page shows, ours or
        another process's.

        Our own writes count immediately. Another process's are noticed at most
        ``version_max_age`` seconds late, so a hot page costs no query per request:
        ``PRAGMA data_version`` on the writer connection (whose own commits do not
        change it) says that some other connection committed, and only then is the
        shown generation read, which only writes a page shows move (``_transaction``).
        A worker process's bookkeeping (claims, leases, heartbeats) thus changes no
        version: it commits many times a second, and the pages stay cached.
        """
        now = time.monotonic()
        if now - self._checked_at >= self.version_max_age:
            self._checked_at = now
            try:
                data_version = await self.get_data_version()
                if data_version != self._data_version:
                    # On the reader: committed rows only, never a transaction in progress
                    # on the writer connection, which might yet roll back.
                    rows = await self._reader.execute_fetchall(
                        "SELECT value FROM meta WHERE key = ?", (self._SHOWN_GENERATION,)
                    )
                    self._shown_generation = next((int(row[0]) for row in rows), 0)
                    self._data_version = data_version
            except StorageUnavailable:
                self._checked_at = 0.0  # ask again next time
                raise
            except sqlite3.OperationalError as error:
                self._checked_at = 0.0
                raise _unavailable(self._path, error) from error
        return (self._writes, self._shown_generation)

    # Moved by every committed write a page shows (``shown``), from any process.
    _SHOWN_GENERATION = "shown_generation"
    _BUMP_SHOWN = (
        "INSERT INTO meta (key, value) VALUES ('shown_generation', '1') ON CONFLICT (key)"
        " DO UPDATE SET value = CAST(CAST(meta.value AS INTEGER) + 1 AS TEXT)"
    )

    @asynccontextmanager
    async def _transaction(self, *, shown: bool = True) -> AsyncIterator[aiosqlite.Connection]:
        """A write transaction: all of it commits, or none of it.

        ``shown=False`` is for bookkeeping no page shows (the inbox queue, delivery
        states), so a storm of inbound activities does not invalidate cached pages.
        A locked, busy, full or read-only database raises StorageUnavailable, and so
        does a database file removed or replaced under the running server: a commit
        into an unlinked file would be lost at the next restart.
        """
        shared = _shared.get()
        if shared is not None and shared.task is asyncio.current_task():
            # Inside shared_transaction (its own task only): joins it, commits with it.
            shared.writes += 1
            try:
                if shared.later:
                    await self._write_later(shared)  # in the order they were asked
                shared.next_comment_id = 0  # this write may take that rowid: read it again
                yield self._db
            except BaseException:
                shared.broken = True  # even if the caller swallows it: no half a write
                raise
            shared.shown = shared.shown or shown
            return
        async with self._lock:
            token = _writing.set(asyncio.current_task())
            try:
                try:
                    await self._start_writing()
                    yield self._db
                    if shown:  # other processes' page caches see it (``version``)
                        await self._db.execute(self._BUMP_SHOWN)
                    await self._finish_writing(shown=shown)
                except BaseException as error:
                    await self._abort_writing()
                    failure = self._storage_failure(error)
                    if failure is not None:
                        raise failure from error
                    raise
            finally:
                _writing.reset(token)
            if shown:
                self._writes += 1

    # How a write transaction starts, ends and fails, per backend.
    async def _start_writing(self) -> None:
        await self._on_writer(self._begin)

    async def _finish_writing(self, *, shown: bool) -> None:
        self._check_identity()
        await self._on_writer(self._commit)

    async def _abort_writing(self) -> None:
        # Always, and never on in_transaction: a BEGIN cancelled while it waited (a
        # /healthz deadline, a shutdown) still runs on aiosqlite's thread, after which
        # in_transaction turns true with nobody to end it, and every later write would
        # fail. The thread runs in order, so this ROLLBACK comes after that BEGIN; with
        # none open it fails (and lets go of the writer lock all the same).
        with contextlib.suppress(sqlite3.Error):
            await self._on_writer(self._rollback)

    def _storage_failure(self, error: BaseException) -> StorageError | None:
        """The StorageError to raise for ``error`` from the database, or None to let it
        through: a locked, busy, full or read-only database is unavailable for now."""
        if isinstance(error, sqlite3.OperationalError):
            return _unavailable(self._path, error)
        if isinstance(error, sqlite3.IntegrityError):
            return StorageConflict(f"the database {self._path} refused a write: {error}")
        return None

    async def _write_at_once(self, work: Callable[[sqlite3.Connection], None]) -> None:
        """Run ``work`` in a write transaction of its own, in one trip to the writer's
        thread: the writer lock, BEGIN, ``work``, COMMIT, and letting go all happen
        there, so the lock is held only as long as the database works, never while
        the event loop is busy elsewhere. For hot bookkeeping no page shows (the
        inbox's group commit), which must not wait for a loop turn between each step
        while another process waits for the lock. ``work`` must not block otherwise.
        Joins the caller's transaction when there is one.
        """
        shared = _shared.get()
        if shared is not None and shared.task is asyncio.current_task():
            async with self._transaction(shown=False):  # joins it (and writes what it kept)
                await self._on_writer(work)
            return
        writing = _writing.get()
        if writing is not None and writing is asyncio.current_task():
            await self._on_writer(work)  # inside this task's transaction: part of it
            return

        def transaction(connection: sqlite3.Connection) -> None:
            self._begin(connection)
            try:
                work(connection)
                self._check_identity()
                self._commit(connection)
            except BaseException:
                with contextlib.suppress(sqlite3.Error):
                    self._rollback(connection)
                raise

        async with self._lock:
            try:
                await self._on_writer(transaction)
            except sqlite3.OperationalError as error:
                raise _unavailable(self._path, error) from error

    async def _on_writer(self, work: Callable[[sqlite3.Connection], None]) -> None:
        """Run ``work`` with the writer connection on its own thread, after whatever
        was asked of it before (aiosqlite runs one queue of calls, in order)."""
        db: Any = self._db  # aiosqlite's own way to run a call there, untyped
        await db._execute(work, db._conn)

    # On the writer's thread, in the order they were asked for.
    def _begin(self, connection: sqlite3.Connection) -> None:
        self._writer_lock.acquire()
        try:
            connection.execute("BEGIN IMMEDIATE")
        except BaseException:
            self._writer_lock.release()
            raise

    def _commit(self, connection: sqlite3.Connection) -> None:
        connection.execute("COMMIT")  # if it fails, the ROLLBACK that follows lets go
        self._writer_lock.release()

    def _rollback(self, connection: sqlite3.Connection) -> None:
        try:
            connection.execute("ROLLBACK")
        finally:
            self._writer_lock.release()

    def _check_identity(self) -> None:
        if _identity(self._path) != self._identity:
            raise StorageUnavailable(
                f"the database file {self._path} was removed or replaced while"
                " the server runs: restore it, then restart fediblog"
            )

    # One trip to aiosqlite's thread per read (execute, fetch and close there): each
    # trip costs about 0.1 ms, three per query were most of a reply's processing.
    async def _fetchall(self, sql: str, params: Sequence[Any] = ()) -> list[sqlite3.Row]:
        writing = _writing.get()
        db = self._db if writing is not None and writing is asyncio.current_task() else self._reader
        if db is self._db:
            shared = _shared.get()
            if shared is not None and shared.later:
                await self._write_later(shared)  # a read sees every write before it
        try:
            return list(await db.execute_fetchall(sql, params))
        except sqlite3.OperationalError as error:
            raise _unavailable(self._path, error) from error

    async def _fetchone(self, sql: str, params: Sequence[Any] = ()) -> sqlite3.Row | None:
        return next(iter(await self._fetchall(sql, params)), None)

    # ---- posts ------------------------------------------------------------------

    async def save_new_post(
        self,
        draft: PostDraft,
        *,
        uid: str,
        body_html: str,
        published: datetime,
        activity: OutgoingActivity | None = None,
        state: PostState = "published",
        preview_token: str | None = None,
    ) -> Post:
        """Insert a post and its tags, and queue its Create to every follower: all or nothing.

        A draft or scheduled post (``state``) is stored with its preview token, and a
        scheduled one with its row in the schedule, due at ``published``."""
        async with self._transaction() as db:
            await self._ensure_slug_free(draft.slug, post_id=None)
            post_id = await _returning(
                db,
                "INSERT INTO posts (uid, slug, title, summary, body_md, body_html, image,"
                " published_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?) RETURNING id",
                (
                    uid,
                    draft.slug,
                    draft.title,
                    draft.summary,
                    draft.body_md,
                    body_html,
                    draft.image,
                    format_ts(published),
                ),
            )
            await self._save_image_alt(db, post_id, draft.image_alt)
            await self._save_tags(post_id, draft.tags)
            if state != "published":
                await self._save_post_state(db, post_id, state, published, preview_token)
            if activity is not None:
                await self._publish(db, activity, post_id)
        post = await self._get_post("id", post_id, any_state=True)
        assert post is not None
        return post

    async def save_post_edit(
        self,
        post: Post,
        draft: PostDraft,
        *,
        body_html: str,
        updated: datetime,
        activity: OutgoingActivity | None = None,
        state: PostState | None = None,
        preview_token: str | None = None,
    ) -> Post:
        """Replace a post's content (uid kept, old slug remembered); queue its Update.

        ``state`` moves a draft or scheduled post on (None: it keeps its state)."""
        async with self._transaction() as db:
            await self._ensure_slug_free(draft.slug, post_id=post.id)
            published = draft.published or post.published
            await db.execute(
                "UPDATE posts SET slug = ?, title = ?, summary = ?, body_md = ?, body_html = ?,"
                " image = ?, published_at = ?, updated_at = ? WHERE id = ?",
                (
                    draft.slug,
                    draft.title,
                    draft.summary,
                    draft.body_md,
                    body_html,
                    draft.image,
                    format_ts(published),
                    format_ts(updated),
                    post.id,
                ),
            )
            if draft.slug != post.slug:
                await db.execute(
                    "INSERT INTO old_slugs (slug, post_id) VALUES (?, ?)"
                    " ON CONFLICT (slug) DO UPDATE SET post_id = excluded.post_id",
                    (post.slug, post.id),
                )
                await db.execute("DELETE FROM old_slugs WHERE slug = ?", (draft.slug,))
            await self._save_image_alt(db, post.id, draft.image_alt)
            await db.execute("DELETE FROM post_tags WHERE post_id = ?", (post.id,))
            await self._save_tags(post.id, draft.tags)
            if state is not None:
                await self._save_post_state(db, post.id, state, published, preview_token)
            if activity is not None:
                await self._publish(db, activity, post.id)
        edited = await self._get_post("id", post.id, any_state=True)
        assert edited is not None
        return edited

    async def delete_post(
        self,
        post: Post,
        *,
        object_id: str,
        deleted: datetime,
        activity: OutgoingActivity | None = None,
    ) -> None:
        """Mark a post deleted, keep a tombstone for its id, and queue its Delete."""
        async with self._transaction() as db:
            await db.execute(
                "UPDATE posts SET deleted_at = ? WHERE id = ?", (format_ts(deleted), post.id)
            )
            await db.execute("DELETE FROM old_slugs WHERE post_id = ?", (post.id,))
            await db.execute(
                "INSERT INTO tombstones (ap_id, former_type, deleted_at) VALUES (?, 'Post', ?)"
                " ON CONFLICT (ap_id) DO UPDATE SET actor_ap_id = NULL,"
                " former_type = excluded.former_type, deleted_at = excluded.deleted_at",
                (object_id, format_ts(deleted)),
            )
            if activity is not None:
                await self._publish(db, activity, post.id)

    async def _ensure_slug_free(self, slug: str, *, post_id: int | None) -> None:
        row = await self._fetchone(
            "SELECT id FROM posts WHERE slug = ? AND deleted_at IS NULL", (slug,)
        )
        if row is not None and row["id"] != post_id:
            raise DuplicateSlug(f"the slug {slug!r} is already used by another post")
        if await self._fetchone(
            "SELECT 1 FROM posts WHERE slug = ? AND deleted_at IS NOT NULL", (slug,)
        ):
            # A deleted post gives its slug up; its uid (and so its tombstone) stays.
            await self._db.execute(
                "UPDATE posts SET slug = slug || '~deleted~' || id WHERE slug = ?", (slug,)
            )

    async def _save_tags(self, post_id: int, tags: Iterable[str]) -> None:
        await self._db.executemany(
            "INSERT INTO post_tags (post_id, tag) VALUES (?, ?) ON CONFLICT DO NOTHING",
            [(post_id, tag) for tag in tags],
        )

    async def _get_post(
        self, column: str, value: object, *, any_state: bool = False
    ) -> Post | None:
        """A live post by one unique column (a constant: id, slug or uid); ``any_state``
        also finds drafts and scheduled posts (for their author)."""
        live = "p.deleted_at IS NULL" if any_state else _LIVE_POST
        row = await self._fetchone(
            f"SELECT {self._POST_COLUMNS} FROM posts p WHERE p.{column} = ? AND {live}", (value,)
        )
        return _post(row) if row else None

    async def get_post_by_id(self, post_id: int) -> Post | None:
        return await self._get_post("id", post_id)

    async def get_post_by_slug(self, slug: str) -> Post | None:
        return await self._get_post("slug", slug)

    async def get_post_by_uid(self, uid: str) -> Post | None:
        return await self._get_post("uid", uid)

    async def get_post_id(self, *, uid: str | None = None, slug: str | None = None) -> int | None:
        """A live post's number by its uid or slug, without loading it."""
        column, value = ("uid", uid) if uid is not None else ("slug", slug)
        row = await self._fetchone(
            f"SELECT id FROM posts p WHERE {column} = ? AND {_LIVE_POST}", (value,)
        )
        return int(row[0]) if row else None

    async def get_current_slug(self, old_slug: str) -> str | None:
        """The slug a post has now, if ``old_slug`` is one it used to have."""
        row = await self._fetchone(
            "SELECT p.slug FROM old_slugs o JOIN posts p ON p.id = o.post_id"
            f" WHERE o.slug = ? AND {_LIVE_POST}",
            (old_slug,),
        )
        return str(row["slug"]) if row else None

    async def is_deleted_post(self, uid: str) -> datetime | None:
        """When the post with this uid was deleted, or None if it was not."""
        row = await self._fetchone(
            "SELECT deleted_at FROM posts WHERE uid = ? AND deleted_at IS NOT NULL", (uid,)
        )
        return parse_ts(row["deleted_at"]) if row else None

    async def list_posts(
        self, *, limit: int, offset: int = 0, tag: str | None = None, pinned_first: bool = False
    ) -> list[Post]:
        """Live posts, newest first (``pinned_first``: the pinned ones before, the latest
        pinned first), with tags and response counts, in one query."""
        pinned = "p.pinned_at IS NULL, p.pinned_at DESC, " if pinned_first else ""
        if tag is None:
            rows = await self._fetchall(
                f"SELECT {self._POST_COLUMNS} FROM posts p WHERE {_LIVE_POST}"
                f" ORDER BY {pinned}p.published_at DESC, p.id DESC LIMIT ? OFFSET ?",
                (limit, offset),
            )
        else:
            rows = await self._fetchall(
                f"SELECT {self._POST_COLUMNS} FROM post_tags pt JOIN posts p ON p.id = pt.post_id"
                f" WHERE pt.tag = ? AND {_LIVE_POST}"
                f" ORDER BY {pinned}p.published_at DESC, p.id DESC LIMIT ? OFFSET ?",
                (tag, limit, offset),
            )
        return [_post(row) for row in rows]

    async def count_posts(self, tag: str | None = None) -> int:
        if tag is None:
            row = await self._fetchone(f"SELECT count(*) FROM posts p WHERE {_LIVE_POST}")
        else:
            row = await self._fetchone(
                "SELECT count(*) FROM post_tags pt JOIN posts p ON p.id = pt.post_id"
                f" WHERE pt.tag = ? AND {_LIVE_POST}",
                (tag,),
            )
        return int(row[0]) if row else 0

    async def list_tags(self) -> list[tuple[str, int]]:
        """Every tag in use on a live post, with how many posts carry it."""
        rows = await self._fetchall(
            "SELECT pt.tag, count(*) AS n FROM post_tags pt JOIN posts p ON p.id = pt.post_id"
            f" WHERE {_LIVE_POST} GROUP BY pt.tag ORDER BY n DESC, pt.tag"
        )
        return [(row["tag"], row["n"]) for row in rows]

    # ---- actors and comments ------------------------------------------------------

    async def save_actor(
        self,
        *,
        ap_id: str,
        username: str,
        domain: str,
        name: str,
        url: str | None,
        icon_url: str | None,
        inbox: str | None,
        shared_inbox: str | None,
        key_id: str | None,
        public_key_pem: str | None,
        fetched: datetime,
        actor_type: str = "Person",
    ) -> int:
        """Insert or refresh a cached remote actor; return its local id."""
        async with self._transaction() as db:
            row = await _returning(
                db,
                "INSERT INTO actors (ap_id, type, username, domain, name, url, icon_url, inbox,"
                " shared_inbox, key_id, public_key_pem, fetched_at)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
                " ON CONFLICT (ap_id) DO UPDATE SET type = excluded.type,"
                " username = excluded.username, domain = excluded.domain, name = excluded.name,"
                " url = excluded.url, icon_url = excluded.icon_url, inbox = excluded.inbox,"
                " shared_inbox = excluded.shared_inbox, key_id = excluded.key_id,"
                " public_key_pem = excluded.public_key_pem, fetched_at = excluded.fetched_at"
                " RETURNING id",
                (
                    ap_id,
                    actor_type,
                    username,
                    domain,
                    name,
                    url,
                    icon_url,
                    inbox,
                    shared_inbox,
                    key_id,
                    public_key_pem,
                    format_ts(fetched),
                ),
            )
        return row

    async def save_comment(
        self,
        *,
        post_id: int,
        parent_id: int | None,
        content_html: str,
        published: datetime,
        received: datetime,
        source: CommentSource,
        ap_id: str | None = None,
        url: str | None = None,
        actor_id: int | None = None,
        author_name: str = "",
        author_url: str | None = None,
        author_email: str | None = None,
        summary: str | None = None,
        sensitive: bool = False,
        visibility: Visibility = "public",
        status: str = "published",
        held_reason: str | None = None,  # why it is "pending", for the desk's queue
    ) -> int:
        # Its INSERT and values are a reply's kept for later too (save_comment_later).
        values = self._comment_row(
            None,
            post_id=post_id,
            parent_id=parent_id,
            content_html=content_html,
            published=published,
            received=received,
            source=source,
            ap_id=ap_id,
            url=url,
            actor_id=actor_id,
            author_name=author_name,
            author_url=author_url,
            author_email=author_email,
            summary=summary,
            sensitive=sensitive,
            visibility=visibility,
            status=status,
            held_reason=held_reason,
        )
        return await self._insert_comment(values)

    async def list_visible_comments(self, post_id: int) -> list[Comment]:
        """Every comment a reader may see under a post, oldest first, in one query."""
        rows = await self._fetchall(
            f"SELECT {_COMMENT_COLUMNS} FROM comments c LEFT JOIN actors a ON a.id = c.actor_id"
            f" WHERE c.post_id = ? AND {_VISIBLE} ORDER BY c.published_at, c.id",
            (post_id,),
        )
        return [_comment(row) for row in rows]

    async def count_comments(self) -> int:
        row = await self._fetchone(f"SELECT count(*) FROM comments c WHERE {_COUNTED}")
        return int(row[0]) if row else 0

    # ---- meta -------------------------------------------------------------------

    async def get_created_at(self) -> datetime:
        row = await self._fetchone("SELECT value FROM meta WHERE key = 'created_at'")
        return parse_ts(row["value"]) if row else utcnow()

    # ---- outgoing activities and their deliveries ---------------------------------------

    async def _publish(
        self, db: aiosqlite.Connection, activity: OutgoingActivity, post_id: int | None
    ) -> int:
        """Store an activity and queue one delivery per distinct follower inbox.

        A server's followers share its shared inbox, so 10,000 followers on 1,000
        servers are 1,000 rows, and 1,000 signatures.
        """
        now = format_ts(utcnow())
        activity_id = await _returning(
            db,
            "INSERT INTO activities (ap_id, type, post_id, payload, public, created_at)"
            " VALUES (?, ?, ?, ?, ?, ?)"
            " ON CONFLICT (ap_id) DO UPDATE SET payload = excluded.payload RETURNING id",
            (activity.ap_id, activity.type, post_id, activity.payload, int(activity.public), now),
        )
        await db.execute(
            "INSERT INTO deliveries (activity_id, inbox, next_attempt_at, created_at)"
            " SELECT DISTINCT CAST(? AS BIGINT), coalesce(shared_inbox, inbox), CAST(? AS TEXT),"
            " CAST(? AS TEXT) FROM followers"
            " WHERE status = 'accepted' ON CONFLICT DO NOTHING",
            (activity_id, now, now),
        )
        return activity_id

    async def save_activity_for(self, activity: OutgoingActivity, inbox: str) -> None:
        """Store an activity addressed to one inbox (an Accept, say) and queue it."""
        now = format_ts(utcnow())
        async with self._transaction() as db:
            activity_id = await _returning(
                db,
                "INSERT INTO activities (ap_id, type, payload, public, created_at)"
                " VALUES (?, ?, ?, ?, ?) ON CONFLICT (ap_id) DO UPDATE SET"
                " payload = excluded.payload RETURNING id",
                (activity.ap_id, activity.type, activity.payload, int(activity.public), now),
            )
            await db.execute(
                "INSERT INTO deliveries (activity_id, inbox, next_attempt_at, created_at)"
                " VALUES (?, ?, ?, ?) ON CONFLICT (activity_id, inbox) DO UPDATE SET"
                " status = 'queued', attempts = 0, next_attempt_at = excluded.next_attempt_at",
                (activity_id, inbox, now, now),
            )

    async def _any_due(self, table: str, now: datetime, *, null_is_due: bool = False) -> bool:
        """Whether a queue (``table``: inbox, deliveries, crawls) holds a row due at
        ``now``: a look on the reader before a claim. Workers are woken by every commit
        of another process (runtime.py's watcher), and most of those find nothing due;
        an empty claim would still take the write lock the inbox is waiting for."""
        when = "(next_attempt_at IS NULL OR next_attempt_at <= ?)" if null_is_due else (
            "next_attempt_at <= ?"
        )
        found = await self._fetchone(
            f"SELECT 1 FROM {table} WHERE status = 'queued' AND {when} LIMIT 1",
            (format_ts(now),),
        )
        return found is not None

    async def claim_deliveries(
        self, now: datetime, lease_until: datetime, limit: int
    ) -> list[DeliveryJob]:
        """Take due deliveries, count an attempt on each, lease them until ``lease_until``.

        Counted when claimed, so a crash mid-request cannot under-count attempts; a
        crash re-sends only what was in flight, once the lease ends.
        """
        if not await self._any_due("deliveries", now):
            return []
        async with self._transaction(shown=False) as db:
            rows = await db.execute_fetchall(
                "UPDATE deliveries SET attempts = attempts + 1, next_attempt_at = ?1,"
                " leased_until = ?1"  # being sent: Retry leaves it alone (save_deliveries_due)
                " WHERE id IN (SELECT id FROM deliveries WHERE status = 'queued'"
                " AND next_attempt_at <= ?2 ORDER BY next_attempt_at, id"
                f" LIMIT ?3{self._SKIP_LOCKED})"
                " RETURNING id, inbox, attempts, activity_id",
                (format_ts(lease_until), format_ts(now), limit),
            )
            payloads: dict[int, bytes] = {}
            for activity_id in {row["activity_id"] for row in rows}:
                found = await db.execute_fetchall(
                    "SELECT payload FROM activities WHERE id = ?", (activity_id,)
                )
                payloads[activity_id] = next(iter(found))["payload"].encode()
        jobs = [
            DeliveryJob(row["id"], row["inbox"], payloads[row["activity_id"]], row["attempts"])
            for row in rows
        ]
        jobs.sort(key=lambda job: job.id)
        return jobs

    async def list_due_deliveries(self, now: datetime, limit: int) -> list[DeliveryJob]:
        """Deliveries due at ``now``, without claiming them (for looking, not sending)."""
        rows = await self._fetchall(
            "SELECT d.id, d.inbox, d.attempts, a.payload FROM deliveries d"
            " JOIN activities a ON a.id = d.activity_id"
            " WHERE d.status = 'queued' AND d.next_attempt_at <= ?"
            " ORDER BY d.next_attempt_at, d.id LIMIT ?",
            (format_ts(now), limit),
        )
        return [
            DeliveryJob(row["id"], row["inbox"], row["payload"].encode(), row["attempts"])
            for row in rows
        ]

    async def record_deliveries(self, results: Sequence[tuple[DeliveryJob, Outcome]]) -> None:
        """Write what became of delivery attempts, in one commit."""
        if results:
            async with self._transaction(shown=False) as db:
                await db.executemany(_RECORD_DELIVERY, _outcome_rows(results))

    async def prune(self, before: datetime) -> tuple[int, int]:
        """Forget processed inbox rows and finished deliveries older than ``before``.

        Deduplication needs no more: a signed request older than its signature's
        window is refused anyway, and a replayed reply meets its comment's unique id.
        Returns (inbox rows, deliveries) removed.
        """
        cutoff = format_ts(before)
        async with self._transaction(shown=False) as db:
            inbox = await db.execute(
                "DELETE FROM inbox WHERE status != 'queued' AND processed_at < ?", (cutoff,)
            )
            deliveries = await db.execute(
                "DELETE FROM deliveries WHERE status != 'queued' AND finished_at < ?", (cutoff,)
            )
            return inbox.rowcount, deliveries.rowcount

    async def next_delivery_due(self) -> datetime | None:
        row = await self._fetchone(
            "SELECT min(next_attempt_at) AS due FROM deliveries WHERE status = 'queued'"
        )
        return parse_ts(row["due"]) if row and row["due"] else None

    async def list_deliveries(
        self, statuses: Sequence[str], limit: int = 100
    ) -> list[DeliveryState]:
        marks = ",".join("?" * len(statuses))
        rows = await self._fetchall(
            "SELECT d.id, d.inbox, d.status, d.attempts, d.next_attempt_at, d.last_error,"
            " d.created_at, d.finished_at, a.type, a.ap_id FROM deliveries d"
            f" JOIN activities a ON a.id = d.activity_id WHERE d.status IN ({marks})"
            " ORDER BY d.id DESC LIMIT ?",
            (*statuses, limit),
        )
        return [_record(DeliveryState, row) for row in rows]

    async def count_deliveries(self) -> dict[str, int]:
        rows = await self._fetchall("SELECT status, count(*) AS n FROM deliveries GROUP BY status")
        return {row["status"]: row["n"] for row in rows}

    # ---- followers ----------------------------------------------------------------

    async def save_follower(
        self, *, actor_id: int, follow_id: str, inbox: str, shared_inbox: str | None, status: str
    ) -> None:
        async with self._transaction() as db:
            await db.execute(
                "INSERT INTO followers (actor_id, follow_ap_id, inbox, shared_inbox, status,"
                " created_at) VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (actor_id) DO UPDATE SET"
                " follow_ap_id = excluded.follow_ap_id, inbox = excluded.inbox,"
                " shared_inbox = excluded.shared_inbox,"
                " status = CASE WHEN followers.status = 'accepted' THEN 'accepted'"
                " ELSE excluded.status END",
                (actor_id, follow_id, inbox, shared_inbox, status, format_ts(utcnow())),
            )

    _FOLLOWER_SELECT = (
        "SELECT a.ap_id AS actor, f.inbox, f.shared_inbox, f.follow_ap_id, f.status, f.created_at"
        " FROM followers f JOIN actors a ON a.id = f.actor_id"
    )

    @staticmethod
    def _follower(row: sqlite3.Row) -> Follower:
        return Follower(
            actor=row["actor"],
            inbox=row["inbox"],
            shared_inbox=row["shared_inbox"],
            follow_id=row["follow_ap_id"],
            status=row["status"],
            created=parse_ts(row["created_at"]),
        )

    async def get_follower(self, actor: str) -> Follower | None:
        row = await self._fetchone(self._FOLLOWER_SELECT + " WHERE a.ap_id = ?", (actor,))
        return self._follower(row) if row else None

    async def list_followers(
        self, *, status: str = "accepted", limit: int = 1_000_000, offset: int = 0
    ) -> list[Follower]:
        rows = await self._fetchall(
            self._FOLLOWER_SELECT + " WHERE f.status = ? ORDER BY f.id LIMIT ? OFFSET ?",
            (status, limit, offset),
        )
        return [self._follower(row) for row in rows]

    async def count_followers(self, status: str = "accepted") -> int:
        row = await self._fetchone("SELECT count(*) FROM followers WHERE status = ?", (status,))
        return int(row[0]) if row else 0

    async def set_follower_status(self, actor: str, status: str) -> bool:
        async with self._transaction() as db:
            cursor = await db.execute(
                "UPDATE followers SET status = ? WHERE actor_id ="
                " (SELECT id FROM actors WHERE ap_id = ?)",
                (status, actor),
            )
            return cursor.rowcount > 0

    async def delete_follower(self, actor: str) -> bool:
        async with self._transaction() as db:
            cursor = await db.execute(
                "DELETE FROM followers WHERE actor_id = (SELECT id FROM actors WHERE ap_id = ?)",
                (actor,),
            )
            return cursor.rowcount > 0

    async def delete_followers_at_inbox(self, inbox: str) -> int:
        """A 410 from an inbox: everyone who received our posts there is gone."""
        async with self._transaction() as db:
            cursor = await db.execute(
                "DELETE FROM followers WHERE inbox = ? OR shared_inbox = ?", (inbox, inbox)
            )
            return cursor.rowcount

    # ---- remote actors and their keys ------------------------------------------------

    async def get_actor_key_state(self, key_id: str) -> tuple[ActorKey, bool] | None:
        """The key stored for ``key_id`` and whether its actor deleted itself (a live
        actor's row first, should a deleted one share the key id), or None."""
        row = await self._fetchone(
            "SELECT ap_id, key_id, public_key_pem, key_refreshed_at,"
            " deleted_at IS NOT NULL AS deleted FROM actors"
            " WHERE key_id = ? AND public_key_pem IS NOT NULL ORDER BY deleted LIMIT 1",
            (key_id,),
        )
        if row is None:
            return None
        refreshed = row["key_refreshed_at"]
        key = ActorKey(
            actor=row["ap_id"],
            key_id=row["key_id"],
            public_key_pem=row["public_key_pem"],
            refreshed_at=parse_ts(refreshed) if refreshed else None,
        )
        return key, bool(row["deleted"])

    async def get_cached_actor(self, ap_id: str) -> CachedActor | None:
        row = await self._fetchone(
            "SELECT * FROM actors WHERE ap_id = ? AND deleted_at IS NULL", (ap_id,)
        )
        return _record(CachedActor, row) if row else None

    async def mark_key_refreshed(self, ap_id: str, when: datetime) -> None:
        async with self._transaction(shown=False) as db:
            await db.execute(
                "UPDATE actors SET key_refreshed_at = ? WHERE ap_id = ?", (format_ts(when), ap_id)
            )

    async def delete_actor(self, ap_id: str, when: datetime) -> None:
        """An actor deleted itself: forget it as a follower, drop its comments."""
        async with self._transaction() as db:
            await db.execute(
                "DELETE FROM followers WHERE actor_id = (SELECT id FROM actors WHERE ap_id = ?)",
                (ap_id,),
            )
            await db.execute(
                "UPDATE comments SET status = 'deleted', content_html = '' WHERE actor_id ="
                " (SELECT id FROM actors WHERE ap_id = ?)",
                (ap_id,),
            )
            await db.execute(
                "UPDATE actors SET deleted_at = ? WHERE ap_id = ?", (format_ts(when), ap_id)
            )

    # ---- the inbox --------------------------------------------------------------

    async def save_inbox_items(self, items: Sequence[InboxItem]) -> None:
        """Durably store a batch of verified activities in one commit.

        One commit per batch is what lets the inbox take thousands of activities a
        second on SQLite; a duplicate (same activity id, or same body) is ignored.
        """
        # One statement over one JSON array, not an executemany: SQLite then inserts
        # every row in one step, during which the thread does not need the GIL. An
        # executemany takes the GIL back after each row, and while the event loop is busy
        # (a flood of POSTs) each of those waits up to the switch interval, 5 ms: a batch
        # of 135 rows held the write lock for ~1 s instead of ~8 ms (measured with a
        # busy loop beside it). ensure_ascii=False: text goes through as it is. Only a
        # NUL, which SQLite's JSON functions would cut the text at, takes the slow way.
        rows = [(i.dedup_key, i.actor, i.type, i.payload) for i in items]
        now = format_ts(utcnow())
        if any("\x00" in field for row in rows for field in row):
            sql = f"{_INSERT_INBOX} VALUES (?, ?, ?, ?, ?)"
            many = [(*row, now) for row in rows]

            def insert(connection: sqlite3.Connection) -> None:
                connection.executemany(sql, many)

        else:
            array = json.dumps(rows, ensure_ascii=False)

            def insert(connection: sqlite3.Connection) -> None:
                connection.execute(  # json_extract, not ->>: SQLite 3.38 added that
                    f"{_INSERT_INBOX} SELECT json_extract(value, '$[0]'),"
                    " json_extract(value, '$[1]'), json_extract(value, '$[2]'),"
                    " json_extract(value, '$[3]'), ? FROM json_each(?) ORDER BY key",
                    (now, array),
                )

        await self._write_at_once(insert)

    async def claim_inbox(self, now: datetime, lease_until: datetime, limit: int) -> list[InboxJob]:
        """Take due activities in arrival order, count an attempt, lease them."""
        if not await self._any_due("inbox", now, null_is_due=True):
            return []
        async with self._transaction(shown=False) as db:
            rows = await db.execute_fetchall(
                "UPDATE inbox SET attempts = attempts + 1, next_attempt_at = ?"
                " WHERE id IN (SELECT id FROM inbox WHERE status = 'queued'"
                " AND (next_attempt_at IS NULL OR next_attempt_at <= ?) ORDER BY id"
                f" LIMIT ?{self._SKIP_LOCKED})"
                " RETURNING id, payload, attempts",
                (format_ts(lease_until), format_ts(now), limit),
            )
        jobs = [InboxJob(row["id"], row["payload"], row["attempts"]) for row in rows]
        jobs.sort(key=lambda job: job.id)  # RETURNING promises no order
        return jobs

    async def record_inbox(self, results: Sequence[tuple[InboxJob, Outcome]]) -> None:
        """Write what became of processed activities, in one commit."""
        if results:
            async with self._transaction(shown=False) as db:
                await db.executemany(_RECORD_INBOX, _outcome_rows(results))

    async def list_inbox(self, *, problems_only: bool, limit: int = 50) -> list[InboxState]:
        """Inbound activities, newest first: all, or those failed or waiting to retry."""
        where = "status = 'failed' OR error IS NOT NULL AND status = 'queued'"
        rows = await self._fetchall(
            "SELECT id, type, actor_ap_id AS actor, status, attempts, next_attempt_at, error,"
            " received_at, processed_at FROM inbox"
            + (f" WHERE {where}" if problems_only else "")
            + " ORDER BY id DESC LIMIT ?",
            (limit,),
        )
        return [_record(InboxState, row) for row in rows]

    async def count_inbox(self) -> dict[str, int]:
        rows = await self._fetchall("SELECT status, count(*) AS n FROM inbox GROUP BY status")
        return {row["status"]: row["n"] for row in rows}

    async def is_tombstoned(self, ap_id: str, actor: str | None = None) -> bool:
        """Whether ``ap_id`` was deleted. Given ``actor`` (who now creates it), only a
        deletion by that actor counts, or one by this blog or by several actors: another
        actor's Delete of an object not here yet must not keep it out (ATTACKS.md 8)."""
        row = await self._fetchone("SELECT actor_ap_id FROM tombstones WHERE ap_id = ?", (ap_id,))
        return row is not None and (actor is None or row["actor_ap_id"] in (None, actor))

    async def list_blocks(self) -> list[tuple[str, str]]:
        rows = await self._fetchall("SELECT target, kind FROM blocks ORDER BY id")
        return [(row["target"], row["kind"]) for row in rows]

    # ---- comments from the fediverse and the form --------------------------------------

    async def get_comment_by_ap_id(self, ap_id: str) -> CommentState | None:
        row = await self._fetchone(
            "SELECT c.id, c.post_id, c.status, c.published_at, c.updated_at, c.received_at,"
            " c.visibility, a.ap_id AS actor FROM comments c"
            " LEFT JOIN actors a ON a.id = c.actor_id WHERE c.ap_id = ?",
            (ap_id,),
        )
        return _record(CommentState, row) if row else None

    async def get_stored_comment(self, comment_id: int) -> StoredComment | None:
        row = await self._fetchone(
            "SELECT c.*, a.ap_id AS actor, p.slug FROM comments c"
            " LEFT JOIN actors a ON a.id = c.actor_id JOIN posts p ON p.id = c.post_id"
            " WHERE c.id = ?",
            (comment_id,),
        )
        return _record(StoredComment, row) if row else None

    async def save_comment_edit(
        self,
        comment_id: int,
        *,
        content_html: str,
        summary: str | None,
        sensitive: bool,
        updated: datetime,
    ) -> None:
        async with self._transaction() as db:
            await db.execute(
                "UPDATE comments SET content_html = ?, summary = ?, sensitive = ?,"
                " updated_at = ? WHERE id = ?",
                (content_html, summary, int(sensitive), format_ts(updated), comment_id),
            )

    async def delete_comment(
        self, comment_id: int, *, ap_id: str | None, actor: str | None, when: datetime
    ) -> None:
        """Keep the row as a placeholder for its replies; keep a tombstone for its id."""
        async with self._transaction() as db:
            await db.execute(
                "UPDATE comments SET status = 'deleted', content_html = '', summary = NULL"
                " WHERE id = ?",
                (comment_id,),
            )
            if ap_id is not None:
                await self._save_tombstone(db, ap_id, actor, when)

    async def save_tombstone(self, ap_id: str, actor: str | None, when: datetime) -> None:
        async with self._transaction() as db:
            await self._save_tombstone(db, ap_id, actor, when)

    @staticmethod
    async def _save_tombstone(
        db: aiosqlite.Connection, ap_id: str, actor: str | None, when: datetime
    ) -> None:
        # Deleted by two different actors: a tombstone for whoever creates it (NULL).
        await db.execute(
            "INSERT INTO tombstones (ap_id, actor_ap_id, former_type, deleted_at)"
            " VALUES (?, ?, 'Note', ?) ON CONFLICT (ap_id) DO UPDATE SET actor_ap_id = NULL"
            " WHERE tombstones.actor_ap_id IS DISTINCT FROM excluded.actor_ap_id",
            (ap_id, actor, format_ts(when)),
        )

    async def set_comment_status(self, comment_id: int, status: str) -> bool:
        async with self._transaction() as db:
            cursor = await db.execute(
                "UPDATE comments SET status = ? WHERE id = ?", (status, comment_id)
            )
            return cursor.rowcount > 0

    async def list_comments_for_review(
        self, *, pending_only: bool, limit: int = 200
    ) -> list[CommentForReview]:
        where = "c.status = 'pending'" if pending_only else "c.status != 'deleted'"
        rows = await self._fetchall(
            "SELECT c.id, c.status, c.visibility, c.source, c.published_at, c.content_html,"
            " c.author_name, a.ap_id AS actor, a.username, a.domain, p.slug"
            " FROM comments c LEFT JOIN actors a ON a.id = c.actor_id"
            f" JOIN posts p ON p.id = c.post_id WHERE {where} ORDER BY c.id DESC LIMIT ?",
            (limit,),
        )
        return [_record(CommentForReview, row) for row in rows]

    # ---- likes and boosts ----------------------------------------------------------

    async def save_reaction(
        self,
        *,
        post_id: int,
        actor_id: int,
        kind: str,
        ap_id: str | None,
        content: str | None,
        when: datetime,
    ) -> None:
        async with self._transaction() as db:
            await db.execute(
                "INSERT INTO reactions (post_id, actor_id, type, ap_id, content,"
                " created_at) VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING",
                (post_id, actor_id, kind, ap_id, content, format_ts(when)),
            )

    async def delete_reaction(
        self, *, actor: str, kind: str, ap_id: str | None, post_id: int | None
    ) -> int:
        """Undo a Like/Announce: by its activity id, or by (post, actor, type)."""
        async with self._transaction() as db:
            cursor = await db.execute(
                "DELETE FROM reactions WHERE type = ? AND actor_id ="
                " (SELECT id FROM actors WHERE ap_id = ?) AND (ap_id = ? OR post_id = ?)",
                (kind, actor, ap_id, post_id),
            )
            return cursor.rowcount

    async def list_reactions(self, post_id: int) -> list[Reaction]:
        """Who liked and boosted a post (blocked actors left out), oldest first."""
        rows = await self._fetchall(
            "SELECT r.type, r.content, a.ap_id, a.username, a.domain, a.name, a.url,"
            f" {_PROXIED_ICON} FROM reactions r JOIN actors a ON a.id = r.actor_id"
            " WHERE r.post_id = ? AND a.deleted_at IS NULL AND NOT EXISTS"
            " (SELECT 1 FROM blocks b WHERE b.target IN (a.ap_id, a.domain)"
            " OR a.domain LIKE '%.' || b.target)"
            " ORDER BY r.id",
            (post_id,),
        )
        return [_reaction(row) for row in rows]

    # ---- blocks -------------------------------------------------------------------

    async def save_block(self, target: str, kind: str) -> bool:
        async with self._transaction() as db:
            cursor = await db.execute(
                "INSERT INTO blocks (target, kind, created_at) VALUES (?, ?, ?)"
                " ON CONFLICT DO NOTHING",
                (target, kind, format_ts(utcnow())),
            )
            return cursor.rowcount > 0

    async def delete_block(self, target: str) -> bool:
        async with self._transaction() as db:
            cursor = await db.execute("DELETE FROM blocks WHERE target = ?", (target,))
            return cursor.rowcount > 0

    # ---- the author's answers -------------------------------------------

    # An answer, its post, the comment it answers and that comment's (live) author.
    _ANSWER_SELECT = (
        "SELECT c.id, c.ap_id, c.post_id, p.uid AS post_uid, p.slug AS post_slug,"
        " c.parent_id, parent.ap_id AS parent_ap_id, c.content_html, c.visibility, c.status,"
        " c.published_at, c.updated_at, coalesce(t.deleted_at, p.deleted_at) AS gone_at,"
        " a.ap_id AS actor, a.username, a.domain, a.url AS actor_url,"
        " coalesce(a.shared_inbox, a.inbox) AS actor_inbox"
        " FROM comments c JOIN posts p ON p.id = c.post_id"
        " JOIN comments parent ON parent.id = c.parent_id"
        " LEFT JOIN actors a ON a.id = parent.actor_id AND a.deleted_at IS NULL"
        " LEFT JOIN tombstones t ON t.ap_id = c.ap_id"
        " WHERE c.by_author = 1 AND c.ap_id IS NOT NULL"
    )

    @classmethod
    def _author_answer(cls, row: sqlite3.Row) -> AuthorAnswer:
        mentioned = cls._mentioned(row) if row["actor"] is not None else None
        return AuthorAnswer(
            id=row["id"],
            ap_id=row["ap_id"],
            post_id=row["post_id"],
            post_uid=row["post_uid"],
            post_slug=row["post_slug"],
            parent_id=row["parent_id"],
            parent_ap_id=row["parent_ap_id"],
            mentioned=mentioned,
            content_html=row["content_html"],
            visibility=row["visibility"],
            status=row["status"],
            published=parse_ts(row["published_at"]),
            updated=parse_ts(row["updated_at"]) if row["updated_at"] else None,
            gone_at=parse_ts(row["gone_at"]) if row["gone_at"] else None,
        )

    async def get_comment_author(self, comment_id: int) -> Mentioned | None:
        """The remote account that wrote a comment, if it still exists (not a form's)."""
        row = await self._fetchone(
            "SELECT a.ap_id AS actor, a.username, a.domain, a.url AS actor_url,"
            " coalesce(a.shared_inbox, a.inbox) AS actor_inbox"
            " FROM comments c JOIN actors a ON a.id = c.actor_id"
            " WHERE c.id = ? AND a.deleted_at IS NULL",
            (comment_id,),
        )
        return self._mentioned(row) if row else None

    @staticmethod
    def _mentioned(row: sqlite3.Row) -> Mentioned:
        return Mentioned(
            ap_id=row["actor"],
            username=row["username"],
            domain=row["domain"],
            profile_url=row["actor_url"] or row["actor"],
            inbox=row["actor_inbox"],
        )

    async def get_author_answer(
        self, *, comment_id: int | None = None, ap_id: str | None = None
    ) -> AuthorAnswer | None:
        """An answer of the blog's author, by its comment number or its id (deleted too)."""
        column, value = ("c.id", comment_id) if comment_id is not None else ("c.ap_id", ap_id)
        row = await self._fetchone(f"{self._ANSWER_SELECT} AND {column} = ?", (value,))
        return self._author_answer(row) if row else None

    async def save_author_answer(
        self,
        *,
        post_id: int,
        parent_id: int,
        ap_id: str,
        page_url: str,
        content_html: str,
        visibility: Visibility,
        author_name: str,
        author_url: str,
        published: datetime,
        activity: Callable[[int], OutgoingActivity],
        inboxes: Sequence[str],
    ) -> int:
        """Store the author's answer under ``parent_id`` and queue its Create, built by
        ``activity`` from the answer's number (its ``url`` is the page's anchor for it),
        to every follower inbox and to ``inboxes``: all or nothing."""
        async with self._transaction() as db:
            comment_id = await _returning(
                db,
                "INSERT INTO comments (post_id, parent_id, ap_id, author_name, author_url,"
                " content_html, visibility, status, source, by_author, published_at,"
                " received_at) VALUES (?, ?, ?, ?, ?, ?, ?, 'published', 'local', 1, ?, ?)"
                " RETURNING id",
                (
                    post_id,
                    parent_id,
                    ap_id,
                    author_name,
                    author_url,
                    content_html,
                    visibility,
                    format_ts(published),
                    format_ts(published),
                ),
            )
            await db.execute(
                "UPDATE comments SET url = ? WHERE id = ?",
                (f"{page_url}/comments/{comment_id}", comment_id),  # the permalink
            )
            await self._queue_answer(db, activity(comment_id), post_id, inboxes)
        return comment_id

    async def save_author_answer_edit(
        self,
        answer: AuthorAnswer,
        *,
        content_html: str,
        updated: datetime,
        activity: OutgoingActivity,
        inboxes: Sequence[str],
    ) -> None:
        async with self._transaction() as db:
            await db.execute(
                "UPDATE comments SET content_html = ?, updated_at = ? WHERE id = ?",
                (content_html, format_ts(updated), answer.id),
            )
            await self._queue_answer(db, activity, answer.post_id, inboxes)

    async def delete_author_answer(
        self,
        answer: AuthorAnswer,
        *,
        deleted: datetime,
        activity: OutgoingActivity,
        inboxes: Sequence[str],
    ) -> None:
        """A placeholder for the replies under it, a tombstone for its id, and its Delete."""
        async with self._transaction() as db:
            await db.execute(
                "UPDATE comments SET status = 'deleted', content_html = '' WHERE id = ?",
                (answer.id,),
            )
            await self._save_tombstone(db, answer.ap_id, None, deleted)
            await self._queue_answer(db, activity, answer.post_id, inboxes)

    async def _queue_answer(
        self,
        db: aiosqlite.Connection,
        activity: OutgoingActivity,
        post_id: int,
        inboxes: Sequence[str],
    ) -> None:
        """``_publish`` (one row per distinct follower inbox), plus the answered person's
        inbox: still one row per inbox, when they share a server with a follower."""
        activity_id = await self._publish(db, activity, post_id)
        now = format_ts(utcnow())
        await db.executemany(
            "INSERT INTO deliveries (activity_id, inbox, next_attempt_at, created_at)"
            " VALUES (?, ?, ?, ?) ON CONFLICT DO NOTHING",
            [(activity_id, inbox, now, now) for inbox in inboxes],
        )

    # ---- crawling reply threads -----------------------------------------

    # A comment worth crawling: from the fediverse, published (not held: replies to a
    # held comment would show before it is approved), public or unlisted. Its depth
    # counts its ancestors (parent ids are always smaller, so the walk ends).
    _CRAWLABLE = (
        "c.source = 'fediverse' AND c.ap_id IS NOT NULL"
        " AND c.visibility IN ('public', 'unlisted') AND c.status = 'published'"
    )
    _NEW_CRAWL = (
        "INSERT INTO crawls (comment_id, post_id, ap_id, host, found_by, depth,"
        " next_attempt_at, created_at)"
        " SELECT c.id, c.post_id, c.ap_id, a.domain, :found_by,"
        " (WITH RECURSIVE up(id, n) AS (SELECT c.parent_id, 1 UNION ALL"
        "  SELECT x.parent_id, up.n + 1 FROM comments x JOIN up ON x.id = up.id WHERE up.n < 1000)"
        "  SELECT max(n) FROM up),"
        " :now, c.received_at FROM comments c JOIN actors a ON a.id = c.actor_id"
    )
    _RECORD_CRAWL = """
        UPDATE crawls SET
            status = CASE WHEN :status = 'failed' THEN 'failed'
                     WHEN :status = 'done' AND CAST(:next_round AS TEXT) IS NULL THEN 'done'
                     ELSE 'queued' END,
            rounds = rounds + CASE WHEN :status = 'done' THEN 1 ELSE 0 END,
            attempts = CASE :status WHEN 'done' THEN 0 WHEN 'release' THEN attempts - 1
                       ELSE attempts END,
            next_attempt_at = CASE WHEN :status = 'done' THEN coalesce(:next_round, next_attempt_at)
                              ELSE coalesce(:retry_at, next_attempt_at) END,
            last_error = CASE :status WHEN 'release' THEN coalesce(:error, last_error)
                         ELSE :error END,
            finished_at = CASE WHEN :status = 'failed'
                          OR (:status = 'done' AND CAST(:next_round AS TEXT) IS NULL)
                          THEN :now END
        WHERE id = :id
    """

    async def save_crawls(self, requests: Sequence[tuple[int, str]], now: datetime) -> None:
        """Queue crawls of these comments, (comment id, 'delivery' or 'crawl'), due now;
        a comment already queued, or not worth crawling, is left alone."""
        async with self._transaction(shown=False) as db:
            await self._insert_crawls(db, requests, now)

    async def _insert_crawls(
        self, db: aiosqlite.Connection, requests: Sequence[tuple[int, str]], now: datetime
    ) -> None:
        await db.executemany(
            self._NEW_CRAWL + f" WHERE c.id = :comment_id AND {self._CRAWLABLE}"
            " ON CONFLICT DO NOTHING",
            [
                {"comment_id": comment_id, "found_by": found_by, "now": format_ts(now)}
                for comment_id, found_by in requests
            ],
        )

    async def save_missing_crawls(self, posts_since: datetime, now: datetime) -> int:
        """Queue a crawl of every crawlable comment on a post published since
        ``posts_since`` that has none (its scheduling was lost in a crash, or it came
        before crawling existed); return how many."""
        async with self._transaction(shown=False) as db:
            cursor = await db.execute(
                self._NEW_CRAWL + " JOIN posts p ON p.id = c.post_id"
                f" WHERE p.deleted_at IS NULL AND p.published_at >= :since AND {self._CRAWLABLE}"
                " AND NOT EXISTS (SELECT 1 FROM crawls k WHERE k.comment_id = c.id)"
                " ORDER BY c.id ON CONFLICT DO NOTHING",
                {"found_by": "delivery", "now": format_ts(now), "since": format_ts(posts_since)},
            )
            return cursor.rowcount

    async def claim_crawls(
        self,
        now: datetime,
        lease_until: datetime,
        limit: int,
        *,
        new: Sequence[tuple[int, str]] = (),
    ) -> list[CrawlJob]:
        """Queue ``new`` crawls (as ``save_crawls``), then take due ones: count an
        attempt on each and lease it until ``lease_until``. One commit for both."""
        if not new and not await self._any_due("crawls", now):
            return []
        async with self._transaction(shown=False) as db:
            if new:
                await self._insert_crawls(db, new, now)
            rows = await db.execute_fetchall(
                "UPDATE crawls SET attempts = attempts + 1, next_attempt_at = ?"
                " WHERE id IN (SELECT id FROM crawls WHERE status = 'queued'"
                " AND next_attempt_at <= ? ORDER BY next_attempt_at, id"
                f" LIMIT ?{self._SKIP_LOCKED})"
                " RETURNING id, comment_id, post_id, ap_id, host, found_by, depth, rounds,"
                " attempts, created_at,"
                " (SELECT p.published_at FROM posts p WHERE p.id = crawls.post_id) AS published,"
                " (SELECT p.deleted_at IS NOT NULL FROM posts p WHERE p.id = crawls.post_id)"
                " AS deleted",
                (format_ts(lease_until), format_ts(now), limit),
            )
        jobs = [
            CrawlJob(
                id=row["id"],
                comment_id=row["comment_id"],
                post_id=row["post_id"],
                ap_id=row["ap_id"],
                host=row["host"],
                found_by=row["found_by"],
                depth=row["depth"],
                rounds=row["rounds"],
                attempts=row["attempts"],
                arrived=parse_ts(row["created_at"]),
                post_published=parse_ts(row["published"]),
                post_deleted=bool(row["deleted"]),
            )
            for row in rows
        ]
        jobs.sort(key=lambda job: job.id)  # RETURNING promises no order
        return jobs

    async def record_crawls(
        self, results: Sequence[tuple[CrawlJob, Outcome, datetime | None]]
    ) -> None:
        """Write what became of crawls, in one commit. A ``done`` outcome ends a round:
        the third value is when the next one is due, or None when there is none (then
        the row is done, with the outcome's error as a note if it has one)."""
        if not results:
            return
        now = format_ts(utcnow())
        rows = [
            {
                "id": job.id,
                "status": outcome.status,
                "error": outcome.error,
                "retry_at": format_ts(outcome.retry_at) if outcome.retry_at else None,
                "next_round": format_ts(next_round) if next_round else None,
                "now": now,
            }
            for job, outcome, next_round in results
        ]
        async with self._transaction(shown=False) as db:
            await db.executemany(self._RECORD_CRAWL, rows)

    async def count_crawled(self, post_id: int) -> int:
        """How many comments under a post were found by crawling."""
        row = await self._fetchone(
            "SELECT count(*) FROM crawls WHERE post_id = ? AND found_by = 'crawl'", (post_id,)
        )
        return int(row[0]) if row else 0

    async def get_crawl(self, ap_id: str) -> CrawlState | None:
        """The crawl of the comment with this id."""
        row = await self._fetchone("SELECT * FROM crawls WHERE ap_id = ?", (ap_id,))
        return _record(CrawlState, row) if row else None

    async def count_crawls(self) -> dict[str, int]:
        rows = await self._fetchall("SELECT status, count(*) AS n FROM crawls GROUP BY status")
        return {row["status"]: row["n"] for row in rows}

    # ---- notifications and response feeds --------------------------------

    async def get_visible_response(self, post_id: int, comment_id: int) -> Comment | None:
        """A published response a reader sees under this post (to reply to), or None."""
        row = await self._fetchone(
            f"SELECT {_COMMENT_COLUMNS} FROM comments c LEFT JOIN actors a ON a.id = c.actor_id"
            f" WHERE c.id = ? AND c.post_id = ? AND {_COUNTED}",
            (comment_id, post_id),
        )
        return _comment(row) if row else None

    _ENTRY_SELECT = (
        f"SELECT {_COMMENT_COLUMNS}, p.uid AS post_uid, p.slug AS post_slug,"
        " p.title AS post_title FROM comments c JOIN posts p ON p.id = c.post_id"
        " LEFT JOIN actors a ON a.id = c.actor_id WHERE p.deleted_at IS NULL"
    )

    @staticmethod
    def _entry(row: sqlite3.Row) -> ResponseEntry:
        return ResponseEntry(_comment(row), row["post_uid"], row["post_slug"], row["post_title"])

    async def list_post_responses(self, post_id: int, limit: int) -> list[ResponseEntry]:
        """A post's published responses, newest first (its public feed)."""
        rows = await self._fetchall(
            self._ENTRY_SELECT + f" AND c.post_id = ? AND {_COUNTED}"
            " ORDER BY c.published_at DESC, c.id DESC LIMIT ?",
            (post_id, limit),
        )
        return [self._entry(row) for row in rows]

    async def list_new_responses(self, limit: int) -> list[ResponseEntry]:
        """The newest arrivals under every post, published or held for approval (the
        author's private feed); never followers-only, direct, rejected or blocked ones."""
        rows = await self._fetchall(
            self._ENTRY_SELECT + " AND c.status IN ('published', 'pending')"
            f" AND c.visibility IN ('public', 'unlisted') AND {_NOT_BLOCKED}"
            " ORDER BY c.id DESC LIMIT ?",
            (limit,),
        )
        return [self._entry(row) for row in rows]

    async def get_response_entry(self, comment_id: int) -> ResponseEntry | None:
        row = await self._fetchone(self._ENTRY_SELECT + " AND c.id = ?", (comment_id,))
        return self._entry(row) if row else None

    async def list_comments_received_since(
        self, since: datetime, *, pending_only: bool, limit: int = 1_000
    ) -> list[CommentForReview]:
        """Like ``list_comments_for_review``, only those that arrived at ``since`` or later."""
        status = "c.status = 'pending'" if pending_only else "c.status != 'deleted'"
        rows = await self._fetchall(
            "SELECT c.id, c.status, c.visibility, c.source, c.published_at, c.received_at,"
            " c.content_html, c.author_name, a.ap_id AS actor, a.username, a.domain, p.slug"
            " FROM comments c LEFT JOIN actors a ON a.id = c.actor_id"
            f" JOIN posts p ON p.id = c.post_id WHERE {status} AND c.received_at >= ?"
            " ORDER BY c.id DESC LIMIT ?",
            (format_ts(since), limit),
        )
        return [_record(CommentForReview, row) for row in rows]

    # The private feed's token, and other facts kept in the meta table.

    async def get_meta_value(self, key: str) -> str | None:
        row = await self._fetchone("SELECT value FROM meta WHERE key = ?", (key,))
        return str(row["value"]) if row else None

    async def save_meta_value(self, key: str, value: str) -> None:
        async with self._transaction(shown=False) as db:
            await db.execute(
                "INSERT INTO meta (key, value) VALUES (?, ?)"
                " ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                (key, value),
            )

    async def save_meta_value_once(self, key: str, value: str) -> str:
        """Store ``value`` unless ``key`` has one already; return the value kept."""
        async with self._transaction(shown=False) as db:
            await db.execute(
                "INSERT INTO meta (key, value) VALUES (?, ?) ON CONFLICT DO NOTHING", (key, value)
            )
            found = await db.execute_fetchall("SELECT value FROM meta WHERE key = ?", (key,))
        return str(next(iter(found))["value"])

    # The webhook queue (notify.py): the same states as deliveries (``_RECORD_DELIVERY``).
    _RECORD_NOTIFICATION = """
        UPDATE notifications SET
            status = CASE :status WHEN 'done' THEN 'sent' WHEN 'failed' THEN
                     CASE WHEN :gave_up THEN 'dead' ELSE 'failed' END ELSE 'queued' END,
            attempts = attempts - CASE WHEN :status = 'release' THEN 1 ELSE 0 END,
            next_attempt_at = coalesce(:retry_at, next_attempt_at),
            last_error = CASE :status WHEN 'release' THEN last_error ELSE :error END,
            finished_at = CASE WHEN :status IN ('done', 'failed') THEN :now END
        WHERE id = :id
    """

    async def save_notification(self, comment_id: int, event: str, payload: str) -> bool:
        """Queue one POST about a response; a second one for the same event is ignored."""
        now = format_ts(utcnow())
        async with self._transaction(shown=False) as db:
            cursor = await db.execute(
                "INSERT INTO notifications (comment_id, event, payload,"
                " next_attempt_at, created_at) VALUES (?, ?, ?, ?, ?) ON CONFLICT DO NOTHING",
                (comment_id, event, payload, now, now),
            )
            return cursor.rowcount > 0

    async def claim_notifications(
        self, now: datetime, lease_until: datetime, limit: int
    ) -> list[NotificationJob]:
        """Take due notifications, count an attempt on each, lease them."""
        async with self._transaction(shown=False) as db:
            rows = await db.execute_fetchall(
                "UPDATE notifications SET attempts = attempts + 1, next_attempt_at = ?"
                " WHERE id IN (SELECT id FROM notifications WHERE status = 'queued'"
                " AND next_attempt_at <= ? ORDER BY next_attempt_at, id"
                f" LIMIT ?{self._SKIP_LOCKED})"
                " RETURNING id, payload, attempts",
                (format_ts(lease_until), format_ts(now), limit),
            )
        jobs = [
            NotificationJob(row["id"], row["payload"].encode(), row["attempts"]) for row in rows
        ]
        jobs.sort(key=lambda job: job.id)
        return jobs

    async def record_notifications(
        self, results: Sequence[tuple[NotificationJob, Outcome]]
    ) -> None:
        if results:
            async with self._transaction(shown=False) as db:
                await db.executemany(self._RECORD_NOTIFICATION, _outcome_rows(results))

    async def list_notifications(self, limit: int = 50) -> list[NotificationState]:
        rows = await self._fetchall(
            "SELECT id, comment_id, event, status, attempts, next_attempt_at, last_error,"
            " created_at, finished_at FROM notifications ORDER BY id DESC LIMIT ?",
            (limit,),
        )
        return [_record(NotificationState, row) for row in rows]

    async def count_notifications(self) -> dict[str, int]:
        rows = await self._fetchall(
            "SELECT status, count(*) AS n FROM notifications GROUP BY status"
        )
        return {row["status"]: row["n"] for row in rows}

    async def prune_notifications(self, before: datetime) -> int:
        """Forget notifications finished before ``before``."""
        async with self._transaction(shown=False) as db:
            cursor = await db.execute(
                "DELETE FROM notifications WHERE status != 'queued' AND finished_at < ?",
                (format_ts(before),),
            )
            return cursor.rowcount

    # ---- drafts, schedules and pinned posts ------------------------------

    async def _save_post_state(
        self,
        db: aiosqlite.Connection,
        post_id: int,
        state: PostState,
        published: datetime,
        preview_token: str | None,
    ) -> None:
        """Set a post's state; a scheduled post gets (or moves) its row in the schedule."""
        # Never seen before, so never "updated": edits made before it went out are not news.
        await db.execute(
            "UPDATE posts SET state = ?, preview_token = coalesce(?, preview_token),"
            " updated_at = NULL WHERE id = ?",
            (state, preview_token, post_id),
        )
        if state == "scheduled":
            # attempts = 0 also marks the row as new: a worker still holding the old
            # claim records nothing over it (see _RECORD_SCHEDULE).
            await db.execute(
                "INSERT INTO post_schedule (post_id, next_attempt_at) VALUES (?, ?)"
                " ON CONFLICT (post_id) DO UPDATE SET status = 'queued', attempts = 0,"
                " next_attempt_at = excluded.next_attempt_at, error = NULL, finished_at = NULL",
                (post_id, format_ts(published)),
            )
        else:
            await db.execute("DELETE FROM post_schedule WHERE post_id = ?", (post_id,))

    async def get_authored_post(self, slug: str) -> Post | None:
        """A post by its slug whatever its state: drafts and scheduled posts too."""
        return await self._get_post("slug", slug, any_state=True)

    async def get_authored_post_by_id(self, post_id: int) -> Post | None:
        return await self._get_post("id", post_id, any_state=True)

    async def get_post_for_preview(self, token: str) -> Post | None:
        """The post whose secret preview token this is, whatever its state."""
        row = await self._fetchone(
            "SELECT id FROM posts WHERE preview_token = ? AND deleted_at IS NULL", (token,)
        )
        return await self._get_post("id", row["id"], any_state=True) if row else None

    async def get_preview_token(self, post_id: int) -> str | None:
        row = await self._fetchone("SELECT preview_token FROM posts WHERE id = ?", (post_id,))
        return row["preview_token"] if row else None

    async def list_authored_posts(self) -> list[Post]:
        """Every post that is not deleted, drafts and scheduled ones too, newest first."""
        rows = await self._fetchall(
            f"SELECT {self._POST_COLUMNS} FROM posts p WHERE p.deleted_at IS NULL"
            " ORDER BY p.published_at DESC, p.id DESC"
        )
        return [_post(row) for row in rows]

    async def save_post_publish(
        self,
        post: Post,
        *,
        published: datetime,
        state: PostState,
        activity: OutgoingActivity | None,
        only_if_scheduled: bool = False,
    ) -> bool:
        """Publish (or schedule) a draft or scheduled post, with its Create: all or nothing.

        ``only_if_scheduled``: only if it is still scheduled for ``published`` (the
        scheduler's check: an edit or a `post publish` may have come first). Returns
        whether the post changed.
        """
        async with self._transaction() as db:
            condition = " AND state = 'scheduled' AND published_at = ?" * only_if_scheduled
            params: tuple[Any, ...] = (format_ts(published), post.id)
            if only_if_scheduled:
                params += (format_ts(published),)
            cursor = await db.execute(
                "UPDATE posts SET published_at = ? WHERE id = ? AND deleted_at IS NULL"
                " AND state != 'published'" + condition,
                params,
            )
            if cursor.rowcount == 0:
                return False
            await self._save_post_state(db, post.id, state, published, None)
            if activity is not None:
                await self._publish(db, activity, post.id)
        return True

    async def claim_schedules(
        self, now: datetime, lease_until: datetime, limit: int
    ) -> list[ScheduleJob]:
        """Take scheduled posts whose time has come, count an attempt on each, lease them."""
        async with self._transaction(shown=False) as db:
            rows = await db.execute_fetchall(
                "UPDATE post_schedule SET attempts = attempts + 1, next_attempt_at = ?"
                " WHERE id IN (SELECT id FROM post_schedule WHERE status = 'queued'"
                " AND next_attempt_at <= ? ORDER BY next_attempt_at, id"
                f" LIMIT ?{self._SKIP_LOCKED})"
                " RETURNING id, post_id, attempts",
                (format_ts(lease_until), format_ts(now), limit),
            )
        return sorted(
            (ScheduleJob(row["id"], row["post_id"], row["attempts"]) for row in rows),
            key=lambda job: job.id,
        )

    async def record_schedules(self, results: Sequence[tuple[ScheduleJob, Outcome]]) -> None:
        if results:
            async with self._transaction(shown=False) as db:
                await db.executemany(_RECORD_SCHEDULE, _outcome_rows(results))

    async def get_schedule_state(self, post_id: int) -> ScheduleState | None:
        row = await self._fetchone(
            "SELECT status, attempts, next_attempt_at, error FROM post_schedule WHERE post_id = ?",
            (post_id,),
        )
        return _record(ScheduleState, row) if row else None

    async def set_post_pinned(
        self, post: Post, pinned_at: datetime | None, activity: OutgoingActivity
    ) -> None:
        """Pin (``pinned_at``) or unpin a published post, and queue the Add or Remove."""
        async with self._transaction() as db:
            cursor = await db.execute(
                "UPDATE posts SET pinned_at = ? WHERE id = ? AND deleted_at IS NULL"
                " AND state = 'published'",
                (format_ts(pinned_at) if pinned_at else None, post.id),
            )
            if cursor.rowcount == 0:  # deleted or unpublished meanwhile: announce nothing
                raise PostNotFound(f"the post {post.slug!r} is no longer published")
            await self._publish(db, activity, post.id)

    async def list_pinned_posts(self) -> list[Post]:
        """The pinned posts readers may see, the latest pinned first (as Mastodon lists)."""
        rows = await self._fetchall(
            f"SELECT {self._POST_COLUMNS} FROM posts p"
            f" WHERE {_LIVE_POST} AND p.pinned_at IS NOT NULL"
            " ORDER BY p.pinned_at DESC, p.id DESC"
        )
        return [_post(row) for row in rows]

    # ---- the media store --------------------------------------------------

    async def _save_image_alt(self, db: aiosqlite.Connection, post_id: int, alt: str) -> None:
        """The cover's alt text, written in the transaction that saves the post."""
        await db.execute("UPDATE posts SET image_alt = ? WHERE id = ?", (alt, post_id))

    async def save_media(self, image: MediaImage, size: int) -> None:
        """Catalogue an imported image (its files are already on disk); idempotent."""
        variants = " ".join(f"{w}x{h}" for w, h in image.variants)
        async with self._transaction(shown=False) as db:
            await db.execute(
                "INSERT INTO media (hash, ext, variants, bytes, created_at)"
                " VALUES (?, ?, ?, ?, ?) ON CONFLICT DO NOTHING",
                (image.hash, image.ext, variants, size, format_ts(utcnow())),
            )

    async def get_media(self, digest: str) -> MediaImage | None:
        row = await self._fetchone(
            "SELECT hash, ext, variants FROM media WHERE hash = ?", (digest,)
        )
        return _media(row) if row else None

    async def list_media(self) -> list[tuple[MediaImage, int]]:
        """Every catalogued image with the bytes its files take, oldest first."""
        rows = await self._fetchall(
            "SELECT hash, ext, variants, bytes FROM media ORDER BY created_at, hash"
        )
        return [(_media(row), int(row["bytes"])) for row in rows]

    async def list_media_references(self) -> list[tuple[str, str]]:
        """(slug, text that may name /media/ files) for every post not deleted, drafts too."""
        rows = await self._fetchall(
            "SELECT slug, body_html || ' ' || coalesce(image, '') AS text FROM posts"
            " WHERE deleted_at IS NULL ORDER BY id"
        )
        return [(str(row["slug"]), str(row["text"])) for row in rows]

    async def delete_media(self, digests: Iterable[str]) -> None:
        async with self._transaction(shown=False) as db:
            await db.executemany("DELETE FROM media WHERE hash = ?", [(d,) for d in digests])

    async def save_face(
        self, remembered: dict[str, str | None], activity: OutgoingActivity
    ) -> None:
        """Remember the blog's avatar and header (``face:ROLE`` → hash in meta) and queue
        the actor's Update to every follower, together: a restart does not send it again."""
        async with self._transaction() as db:
            for role, digest in remembered.items():
                if digest is None:
                    await db.execute("DELETE FROM meta WHERE key = ?", (f"face:{role}",))
                else:
                    await db.execute(
                        "INSERT INTO meta (key, value) VALUES (?, ?)"
                        " ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                        (f"face:{role}", digest),
                    )
            await self._publish(db, activity, None)

    # ---- the media proxy ----------------------------------------------------
    # Bookkeeping no page shows (shown=False): a fetched image changes no page's HTML.

    async def save_proxied(self, rows: Sequence[tuple[str, str, str, str]]) -> None:
        """Remember remote images behind the proxy: (key, url, host, kind); known ones stay."""
        if rows:
            async with self._transaction(shown=False) as db:
                # Its INSERT and values are a reply's kept for later too (save_proxied_later).
                await db.executemany(self._INSERT_PROXIED, self._proxied_rows(rows, utcnow()))

    async def get_proxied(self, key: str) -> ProxiedMedia | None:
        row = await self._fetchone(
            "SELECT key, url, host, kind, status, content_type, size, error, fetched_at,"
            " used_at FROM proxy_media WHERE key = ?",
            (key,),
        )
        return _record(ProxiedMedia, row) if row else None

    async def record_proxied_fetch(
        self, key: str, *, content_type: str | None, size: int, error: str | None
    ) -> None:
        """A fetch ended: cached (a content type) or failed (an error), as of now."""
        now = format_ts(utcnow())
        async with self._transaction(shown=False) as db:
            await db.execute(
                "UPDATE proxy_media SET status = ?, content_type = ?, size = ?, error = ?,"
                " fetched_at = ?, used_at = ? WHERE key = ?",
                ("failed" if error else "cached", content_type, size, error, now, now, key),
            )

    async def mark_proxied_used(self, key: str, when: datetime) -> None:
        async with self._transaction(shown=False) as db:
            await db.execute(
                "UPDATE proxy_media SET used_at = ? WHERE key = ?", (format_ts(when), key)
            )

    async def prune_proxied(self, max_bytes: int) -> list[str]:
        """Forget the least recently used cached images past ``max_bytes`` in all (they
        are fetched again if asked for); return their keys, whose files can go."""
        async with self._transaction(shown=False) as db:
            rows = await db.execute_fetchall(
                "SELECT key FROM (SELECT key, sum(size) OVER (ORDER BY used_at DESC, key)"
                " AS total FROM proxy_media WHERE status = 'cached') AS ranked WHERE total > ?",
                (max_bytes,),
            )
            keys = [str(row["key"]) for row in rows]
            await db.executemany(
                "UPDATE proxy_media SET status = 'new', size = 0, content_type = NULL"
                " WHERE key = ?",
                [(key,) for key in keys],
            )
        return keys

    async def count_proxied_bytes(self) -> int:
        row = await self._fetchone(
            "SELECT coalesce(sum(size), 0) AS n FROM proxy_media WHERE status = 'cached'"
        )
        return int(row["n"]) if row else 0

    async def list_unproxied_icons(self, limit: int = 1000) -> list[str]:
        """Commenters' avatars not behind the proxy yet (saved before it, or changed)."""
        rows = await self._fetchall(
            "SELECT DISTINCT a.icon_url FROM actors a WHERE a.icon_url IS NOT NULL"
            " AND NOT EXISTS (SELECT 1 FROM proxy_media m WHERE m.url = a.icon_url) LIMIT ?",
            (limit,),
        )
        return [str(row["icon_url"]) for row in rows]

    async def list_comments_with_remote_images(self, limit: int = 500) -> list[CommentContent]:
        """Comments saved before the proxy whose HTML still loads images from elsewhere."""
        rows = await self._fetchall(
            "SELECT id, content_html FROM comments WHERE content_html LIKE '%<img %src=\"http%'"
            " ORDER BY id LIMIT ?",
            (limit,),
        )
        return [CommentContent(id=row["id"], content_html=row["content_html"]) for row in rows]

    async def save_comment_images(self, changed: Sequence[tuple[int, str]]) -> None:
        """Comments' HTML with their images pointed at the proxy: (id, html)."""
        if changed:
            async with self._transaction() as db:
                await db.executemany(
                    "UPDATE comments SET content_html = ? WHERE id = ?",
                    [(html_text, comment_id) for comment_id, html_text in changed],
                )

    # ---- the author's desk: account and sessions ---------------------------
    # The author's account and sign-in sessions (desk.py). Bookkeeping no page shows:
    # a sign-in must not throw away the cached public pages.

    async def get_desk_password_hash(self) -> str | None:
        row = await self._fetchone("SELECT password_hash FROM desk_account WHERE id = 1")
        return str(row["password_hash"]) if row else None

    async def save_desk_password(
        self, password_hash: str, when: datetime, *, sign_out: bool = True
    ) -> int:
        """Store the account's hash; with ``sign_out``, end every session in the same
        transaction (a new password signs out everywhere). Returns the sessions ended."""
        async with self._transaction(shown=False) as db:
            await db.execute(
                "INSERT INTO desk_account (id, password_hash, changed_at) VALUES (1, ?, ?)"
                " ON CONFLICT (id) DO UPDATE SET password_hash = excluded.password_hash,"
                " changed_at = excluded.changed_at",
                (password_hash, format_ts(when)),
            )
            if not sign_out:
                return 0
            cursor = await db.execute("DELETE FROM desk_sessions")
            return cursor.rowcount

    async def save_desk_session(
        self, key: str, *, created: datetime, expires: datetime, ip: str, user_agent: str
    ) -> None:
        async with self._transaction(shown=False) as db:
            await db.execute(
                "INSERT INTO desk_sessions (key, created_at, last_seen_at, expires_at, ip,"
                " user_agent) VALUES (?, ?, ?, ?, ?, ?)",
                (key, format_ts(created), format_ts(created), format_ts(expires), ip, user_agent),
            )

    async def get_desk_session(self, key: str) -> DeskSession | None:
        row = await self._fetchone("SELECT * FROM desk_sessions WHERE key = ?", (key,))
        return _record(DeskSession, row) if row else None

    async def list_desk_sessions(self) -> list[DeskSession]:
        rows = await self._fetchall("SELECT * FROM desk_sessions ORDER BY last_seen_at DESC")
        return [_record(DeskSession, row) for row in rows]

    async def mark_desk_session_seen(self, key: str, when: datetime) -> None:
        async with self._transaction(shown=False) as db:
            await db.execute(
                "UPDATE desk_sessions SET last_seen_at = ? WHERE key = ?", (format_ts(when), key)
            )

    async def delete_desk_session(self, key: str) -> bool:
        async with self._transaction(shown=False) as db:
            cursor = await db.execute("DELETE FROM desk_sessions WHERE key = ?", (key,))
            return cursor.rowcount > 0

    async def delete_desk_sessions(
        self, *, expired_at: datetime | None = None, idle_since: datetime | None = None
    ) -> int:
        """End every session, or with the two moments only those past their absolute
        end or not seen since ``idle_since``. Returns how many ended."""
        async with self._transaction(shown=False) as db:
            if expired_at is None or idle_since is None:
                cursor = await db.execute("DELETE FROM desk_sessions")
            else:
                cursor = await db.execute(
                    "DELETE FROM desk_sessions WHERE expires_at <= ? OR last_seen_at <= ?",
                    (format_ts(expired_at), format_ts(idle_since)),
                )
            return cursor.rowcount

    async def save_desk_address(
        self, address: str, when: datetime, forget_before: datetime
    ) -> None:
        """Note a successful sign-in from ``address`` (an IPv4 address or IPv6 /64), and
        forget the addresses not signed in from since ``forget_before``."""
        async with self._transaction(shown=False) as db:
            await db.execute(
                "INSERT INTO desk_addresses (address, signed_in_at) VALUES (?, ?)"
                " ON CONFLICT (address) DO UPDATE SET signed_in_at = excluded.signed_in_at",
                (address, format_ts(when)),
            )
            await db.execute(
                "DELETE FROM desk_addresses WHERE signed_in_at < ?", (format_ts(forget_before),)
            )

    async def get_desk_address_signed_in(self, address: str) -> datetime | None:
        """The last successful sign-in from ``address``, if it is remembered."""
        row = await self._fetchone(
            "SELECT signed_in_at FROM desk_addresses WHERE address = ?", (address,)
        )
        return parse_ts(row["signed_in_at"]) if row else None

    async def count_held_comments(self) -> int:
        """Responses waiting for the author's approval (the desk's dashboard): those the
        queue lists (list_held_responses), so not those under a deleted post."""
        row = await self._fetchone(
            "SELECT count(*) FROM comments c JOIN posts p ON p.id = c.post_id"
            " WHERE c.status = 'pending' AND p.deleted_at IS NULL"
        )
        return int(row[0]) if row else 0

    # ---- health, metrics, the archive and neighbours -----------------------

    # health and metrics (web/health.py)

    async def probe_write(self, now: datetime) -> None:
        """One small real write (/healthz): a read-only, full, locked or replaced
        database raises StorageUnavailable, as it would for the next activity."""
        async with self._transaction(shown=False) as db:
            await db.execute(
                "INSERT INTO meta (key, value) VALUES ('health_probe', ?)"
                " ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                (format_ts(now),),
            )

    async def get_queue_stats(self) -> QueueStats:
        """For /metrics, each on an index: ``inbox_queued`` and ``deliveries_queued``
        (rows waiting), ``oldest_waiting`` (when the oldest activity not yet tried
        arrived), ``last_received`` and ``last_processed`` (the activity processed
        last: when it arrived, when it was done)."""
        row = await self._fetchone(
            "SELECT (SELECT count(*) FROM inbox WHERE status = 'queued') AS inbox_queued,"
            " (SELECT count(*) FROM deliveries WHERE status = 'queued') AS deliveries_queued,"
            " (SELECT received_at FROM inbox WHERE status = 'queued' AND attempts = 0"
            "  ORDER BY id LIMIT 1) AS oldest_waiting,"
            " l.received_at AS last_received, l.processed_at AS last_processed"
            " FROM (SELECT 1) AS one LEFT JOIN (SELECT received_at, processed_at FROM inbox"
            "  WHERE status != 'queued' ORDER BY processed_at DESC LIMIT 1) AS l ON true"
        )
        assert row is not None  # one row, always
        return _record(QueueStats, row)

    # archive and neighbours: months are UTC calendar months, as published_at is stored
    # (format_ts), so a month is a text prefix and a range on the posts_live index.

    async def list_archive_months(self) -> list[tuple[int, int, int]]:
        """(year, month, published posts) of every month with a post, newest first."""
        rows = await self._fetchall(
            "SELECT substr(p.published_at, 1, 7) AS month, count(*) AS n FROM posts p"
            f" WHERE {_LIVE_POST} GROUP BY month ORDER BY month DESC"
        )
        return [(int(row["month"][:4]), int(row["month"][5:7]), row["n"]) for row in rows]

    async def list_posts_in_month(self, year: int, month: int) -> list[Post]:
        """The published posts of one UTC month, newest first."""
        following = (year + 1, 1) if month == 12 else (year, month + 1)
        rows = await self._fetchall(
            f"SELECT {self._POST_COLUMNS} FROM posts p WHERE {_LIVE_POST}"
            " AND p.published_at >= ? AND p.published_at < ?"
            " ORDER BY p.published_at DESC, p.id DESC",
            (f"{year:04d}-{month:02d}", "{:04d}-{:02d}".format(*following)),
        )
        return [_post(row) for row in rows]

    async def get_post_neighbours(self, post: Post) -> tuple[Post | None, Post | None]:
        """The published posts just before and just after ``post`` (older, newer), in
        the index's order: by publication moment, then by id for posts of one moment."""
        moment = format_ts(post.published)
        older = await self._fetchone(
            f"SELECT {self._POST_COLUMNS} FROM posts p WHERE {_LIVE_POST}"
            " AND (p.published_at < ? OR (p.published_at = ? AND p.id < ?))"
            " ORDER BY p.published_at DESC, p.id DESC LIMIT 1",
            (moment, moment, post.id),
        )
        newer = await self._fetchone(
            f"SELECT {self._POST_COLUMNS} FROM posts p WHERE {_LIVE_POST}"
            " AND (p.published_at > ? OR (p.published_at = ? AND p.id > ?))"
            " ORDER BY p.published_at, p.id LIMIT 1",
            (moment, moment, post.id),
        )
        return (_post(older) if older else None, _post(newer) if newer else None)

    # ---- the author's desk: write -------------------------------------------

    async def count_follower_inboxes(self) -> tuple[int, int]:
        """(accepted followers, the distinct inboxes a post's activity is queued for:
        what ``_publish`` queues, one delivery per server's shared inbox)."""
        row = await self._fetchone(
            "SELECT count(*) AS followers, count(DISTINCT coalesce(shared_inbox, inbox))"
            " AS inboxes FROM followers WHERE status = 'accepted'"
        )
        return (int(row["followers"]), int(row["inboxes"])) if row else (0, 0)

    # ---- the author's desk: responses and followers ---------------------------

    # A response as the author's desk shows it: the comment with its post, why it is
    # held, and whether a block hides it (then no reader sees it, whatever its status).
    _DESK_SELECT = (
        f"SELECT {_COMMENT_COLUMNS}, p.uid AS post_uid, p.slug AS post_slug,"
        f" p.title AS post_title, c.held_reason, NOT ({_NOT_BLOCKED}) AS blocked"
        " FROM comments c JOIN posts p ON p.id = c.post_id"
        " LEFT JOIN actors a ON a.id = c.actor_id WHERE p.deleted_at IS NULL"
    )

    @classmethod
    def _desk_response(cls, row: sqlite3.Row) -> tuple[ResponseEntry, str | None, bool]:
        return cls._entry(row), row["held_reason"], bool(row["blocked"])

    async def list_held_responses(
        self, limit: int = 200
    ) -> list[tuple[ResponseEntry, str | None, bool]]:
        """The responses waiting for approval, (entry, why held, blocked), oldest first."""
        rows = await self._fetchall(
            self._DESK_SELECT + " AND c.status = 'pending' ORDER BY c.id LIMIT ?", (limit,)
        )
        return [self._desk_response(row) for row in rows]

    async def list_recent_responses(
        self, limit: int = 50
    ) -> list[tuple[ResponseEntry, str | None, bool]]:
        """The newest responses whatever their status (deleted and the author's own
        answers left out), newest first."""
        rows = await self._fetchall(
            self._DESK_SELECT + " AND c.status != 'deleted' AND c.by_author = 0"
            " ORDER BY c.id DESC LIMIT ?",
            (limit,),
        )
        return [self._desk_response(row) for row in rows]

    async def list_responses_for_author(
        self, post_id: int
    ) -> list[tuple[ResponseEntry, str | None, bool]]:
        """Every response under a post, held, rejected, private and blocked ones too,
        oldest first (``comments.build_threads`` nests them)."""
        rows = await self._fetchall(
            self._DESK_SELECT + " AND c.post_id = ? ORDER BY c.published_at, c.id", (post_id,)
        )
        return [self._desk_response(row) for row in rows]

    async def get_desk_response(
        self, comment_id: int
    ) -> tuple[ResponseEntry, str | None, bool] | None:
        """One response as the desk shows it; None if there is none, or its post was
        deleted (nothing under a deleted post can be acted on)."""
        row = await self._fetchone(self._DESK_SELECT + " AND c.id = ?", (comment_id,))
        return self._desk_response(row) if row else None

    async def set_comment_held(self, comment_id: int, reason: str) -> bool:
        """Hold a published response again (an edit brought a held keyword), saying why."""
        async with self._transaction() as db:
            cursor = await db.execute(
                "UPDATE comments SET status = 'pending', held_reason = ? WHERE id = ?",
                (reason, comment_id),
            )
            return cursor.rowcount > 0

    async def delete_removed_follower(self, actor: str, follow_id: str, when: datetime) -> None:
        """Remove a follower (the author's "remove") and keep its Follow's id as a
        tombstone: an Undo of that Follow arriving late, after a new Follow, is then
        known for what it is (is_removed_follow) and does not end the new follow."""
        async with self._transaction() as db:
            await db.execute(
                "DELETE FROM followers WHERE actor_id = (SELECT id FROM actors WHERE ap_id = ?)",
                (actor,),
            )
            if follow_id:
                await db.execute(
                    "INSERT INTO tombstones (ap_id, actor_ap_id, former_type,"
                    " deleted_at) VALUES (?, ?, 'Follow', ?) ON CONFLICT DO NOTHING",
                    (follow_id, actor, format_ts(when)),
                )

    async def is_removed_follow(self, follow_id: str, actor: str) -> bool:
        """Whether ``follow_id`` is ``actor``'s Follow the author removed."""
        row = await self._fetchone(
            "SELECT 1 FROM tombstones WHERE ap_id = ? AND actor_ap_id = ?"
            " AND former_type = 'Follow'",
            (follow_id, actor),
        )
        return row is not None

    async def count_followers_by_domain(self) -> list[tuple[str, int]]:
        """Accepted followers per server, the largest first."""
        rows = await self._fetchall(
            "SELECT a.domain, count(*) AS n FROM followers f JOIN actors a ON a.id = f.actor_id"
            " WHERE f.status = 'accepted' GROUP BY a.domain ORDER BY n DESC, a.domain"
        )
        return [(row["domain"], int(row["n"])) for row in rows]

    async def list_followers_for_desk(
        self, *, status: str, limit: int, offset: int = 0
    ) -> list[tuple[Follower, str, str, str]]:
        """Followers (or requests) with their username, domain and name; oldest first."""
        rows = await self._fetchall(
            "SELECT a.ap_id AS actor, f.inbox, f.shared_inbox, f.follow_ap_id, f.status,"
            " f.created_at, a.username, a.domain, a.name"
            " FROM followers f JOIN actors a ON a.id = f.actor_id"
            " WHERE f.status = ? ORDER BY f.id LIMIT ? OFFSET ?",
            (status, limit, offset),
        )
        return [
            (self._follower(row), row["username"] or "", row["domain"] or "", row["name"] or "")
            for row in rows
        ]

    # ---- the author's desk: health ----------------------------------------------

    # A delivery's host, as the page groups them: the inbox URL between "://" and the
    # next "/" (host[:port]), lower-cased; the same expression picks a host's rows to retry.
    _INBOX_HOST = (
        "lower(substr(inbox, instr(inbox, '://') + 3,"
        " instr(substr(inbox, instr(inbox, '://') + 3) || '/', '/') - 1))"
    )
    # Retryable: failed or dead, or queued again after an error (not one merely waiting,
    # nor one claimed for its first attempt: attempts > 0 but no error yet).
    _RETRYABLE = (
        "(status IN ('failed', 'dead')"
        " OR (status = 'queued' AND attempts > 0 AND last_error IS NOT NULL))"
    )

    async def list_delivery_hosts(self, limit: int = 100) -> list[HostDeliveries]:
        """Per host, the deliveries not sent: ``waiting`` (queued, not failed yet),
        ``failing`` (queued again after an error), ``failed``, ``dead``; the earliest
        ``next_attempt_at`` of its queued ones and its newest ``last_error``. Hosts with
        problems first, the most troubled first."""
        rows = await self._fetchall(
            "WITH d AS (SELECT id, status, attempts, next_attempt_at, last_error,"
            f" {self._INBOX_HOST} AS host, {self._RETRYABLE} AS bad FROM deliveries"
            " WHERE status IN ('queued', 'failed', 'dead'))"
            " SELECT host,"
            " count(*) FILTER (WHERE status = 'queued' AND NOT bad) AS waiting,"
            " count(*) FILTER (WHERE status = 'queued' AND bad) AS failing,"
            " count(*) FILTER (WHERE status = 'failed') AS failed,"
            " count(*) FILTER (WHERE status = 'dead') AS dead,"
            " min(CASE WHEN status = 'queued' THEN next_attempt_at END) AS next_attempt_at,"
            " (SELECT e.last_error FROM d AS e WHERE e.host = d.host"
            "  AND e.last_error IS NOT NULL ORDER BY e.id DESC LIMIT 1) AS last_error"
            " FROM d GROUP BY host ORDER BY count(*) FILTER (WHERE bad) > 0 DESC,"
            " count(*) FILTER (WHERE bad) DESC, host LIMIT ?",
            (limit,),
        )
        return [_record(HostDeliveries, row) for row in rows]

    async def save_deliveries_due(
        self, now: datetime, *, host: str | None = None, delivery_id: int | None = None
    ) -> int:
        """Queue the retryable deliveries (of ``host``, or the one ``delivery_id``, or
        all) again, due ``now``, with their attempts back to 0 (a full new round of
        retries); their last error stays until the next attempt replaces it. One being
        sent right now (claimed, its lease running) is left alone: made due, the next
        pass would send it a second time."""
        async with self._transaction(shown=False) as db:
            cursor = await db.execute(
                "UPDATE deliveries SET status = 'queued', attempts = 0, next_attempt_at = ?1,"
                f" finished_at = NULL, leased_until = NULL WHERE {self._RETRYABLE}"
                " AND (leased_until IS NULL OR leased_until <= ?1)"
                f" AND (CAST(?2 AS TEXT) IS NULL OR {self._INBOX_HOST} = lower(?2))"
                " AND (CAST(?3 AS INTEGER) IS NULL OR id = ?3)",
                (format_ts(now), host, delivery_id),
            )
            return cursor.rowcount

    # ---- seeding for the benchmarks (tests/bench) --------------------------------
    # tests/bench fills a blog with tens of thousands of comments or followers in a few
    # seconds: one transaction and one executemany per table, not one commit per row.

    async def save_seed_comments(
        self,
        post_id: int,
        comments: Sequence[tuple[int | None, int | None, str, str, datetime]],
    ) -> int:
        """Published fediverse comments under a post, in one transaction. Each is
        ``(parent, actor_id, ap_id, content_html, published)``, ``parent`` being the index
        of an earlier comment of the same call (a thread) or None. Returns the first id;
        the others follow it in order."""
        for index, (parent, *_) in enumerate(comments):
            if parent is not None and not 0 <= parent < index:
                raise ValueError(f"comment {index}: parent {parent} is not an earlier one")
        now = format_ts(utcnow())
        async with self._transaction() as db:
            # Explicit ids (after the largest one) so that parents can be named by index.
            rows = await db.execute_fetchall("SELECT coalesce(max(id), 0) FROM comments")
            first = int(next(iter(rows))[0]) + 1
            await db.executemany(
                "INSERT INTO comments (id, post_id, parent_id, ap_id, url, actor_id,"
                " content_html, status, source, published_at, received_at)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, 'published', 'fediverse', ?, ?)",
                [
                    (
                        first + index,
                        post_id,
                        None if parent is None else first + parent,
                        ap_id,
                        ap_id,
                        actor_id,
                        content_html,
                        format_ts(published),
                        now,
                    )
                    for index, (parent, actor_id, ap_id, content_html, published) in enumerate(
                        comments
                    )
                ],
            )
        return first

    async def save_seed_followers(
        self, followers: Sequence[tuple[str, str, str, str, str | None]]
    ) -> None:
        """Remote actors and their accepted follows, in one transaction. Each is
        ``(ap_id, username, domain, inbox, shared_inbox)``; an actor already known is
        left as it is."""
        now = format_ts(utcnow())
        async with self._transaction() as db:
            await db.executemany(
                "INSERT INTO actors (ap_id, username, domain, name, url, inbox, shared_inbox,"
                " key_id, fetched_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)"
                " ON CONFLICT (ap_id) DO NOTHING",
                [
                    (ap_id, user, domain, user, ap_id, inbox, shared, ap_id + "#main-key", now)
                    for ap_id, user, domain, inbox, shared in followers
                ],
            )
            await db.executemany(
                "INSERT INTO followers (actor_id, follow_ap_id, inbox, shared_inbox, status,"
                " created_at) SELECT id, ?, ?, ?, 'accepted', ? FROM actors WHERE ap_id = ?"
                " ON CONFLICT (actor_id) DO NOTHING",
                [
                    (ap_id + "#follows/1", inbox, shared, now, ap_id)
                    for ap_id, _, _, inbox, shared in followers
                ],
            )

    # ---- replies processed in batches (inbox.py) --------------------------------
    # The inbox turns a claimed batch of replies into comments in one transaction, and
    # reads what they need in a few queries, not a few per reply (inbox.py, responses.py):
    # their senders here, before the transaction; the rest in it, at the end of the class
    # ("rows kept for one executemany"), which also keeps the rows they write.

    @asynccontextmanager
    async def shared_transaction(self) -> AsyncIterator[SharedTransaction]:
        """One write transaction that every write of this task joins until the block
        ends (then all of it commits, or none of it). Reads in it see its writes.

        A write that fails inside marks it broken: it then rolls back even if the caller
        went on. ``writes`` counts the writes that joined, so a caller can tell that a
        failure came before any of its own writes (the transaction is still whole).
        """
        state = SharedTransaction(asyncio.current_task())
        async with self._transaction(shown=False):
            token = _shared.set(state)
            try:
                yield state
                if state.later and not state.broken:
                    await self._write_later(state)  # the rows kept for one executemany
                if state.broken:
                    raise StorageError("a write in the shared transaction failed")
                if state.shown:  # as _transaction does for a shown write
                    await self._db.execute(self._BUMP_SHOWN)
            finally:
                _shared.reset(token)
                state.task = None  # a task it started must not join it later
        if state.shown:
            self._writes += 1

    async def get_cached_actors(self, ap_ids: Sequence[str]) -> dict[str, CachedActor]:
        """``get_cached_actor`` for many actors at once, by ap_id."""
        found: dict[str, CachedActor] = {}
        for chunk in _chunks(ap_ids):
            rows = await self._fetchall(
                f"SELECT * FROM actors WHERE ap_id IN ({_marks(chunk)}) AND deleted_at IS NULL",
                chunk,
            )
            found.update((row["ap_id"], _record(CachedActor, row)) for row in rows)
        return found

    # ---- responses paged by count ----
    # A post's visible comments in page order (comments.py: threads depth first, oldest
    # first at every level, replies below max_depth flattened into their parent's level),
    # walked lazily: the first page of 50,000 comments reads about a page of rows. The
    # walk is SQLite's recursive CTE with an ORDER BY, a queue that always yields the
    # smallest ``path`` next: a path is the list it sits in followed by its own key
    # (published_at, then the id on 12 digits: fixed width, so text order is page order).
    # A reply flattened into its parent's level never sorts before that parent (its
    # moment is at least the parent's), so the queue yields every level in order.
    _PARENT_VISIBLE = _VISIBLE.replace("c.", "p.")  # the same rule, for the parent row p
    _WALK = f"""
        WITH RECURSIVE
        roots(id, moment) AS (
            SELECT c.id, c.published_at FROM comments c
            WHERE c.post_id = ?1 AND {_VISIBLE}
              AND NOT EXISTS (SELECT 1 FROM comments p WHERE p.id = c.parent_id
                              AND p.id < c.id AND p.post_id = ?1 AND {_PARENT_VISIBLE})
            ORDER BY c.published_at, c.id LIMIT ?2
        ),
        walk(id, depth, list, path, moment) AS (
            SELECT id, 1, '', moment || printf('%012d', id), moment FROM roots
            UNION ALL
            SELECT c.id, min(w.depth + 1, ?3),
                   iif(w.depth < ?3, w.path, w.list),
                   iif(w.depth < ?3, w.path, w.list)
                     || iif(w.depth < ?3, c.published_at, max(c.published_at, w.moment))
                     || printf('%012d', c.id),
                   iif(w.depth < ?3, c.published_at, max(c.published_at, w.moment))
            FROM walk w JOIN comments c ON c.parent_id = w.id
            WHERE c.id > w.id AND c.post_id = ?1 AND {_VISIBLE}
            ORDER BY 4 LIMIT ?2
        )
        SELECT w.id, w.list, w.path, c.status = 'deleted' AS deleted
        FROM walk w JOIN comments c ON c.id = w.id
    """

    async def list_response_walk(
        self, post_id: int, limit: int, *, max_depth: int
    ) -> list[tuple[int, str, str, bool]]:
        """The first ``limit`` visible comments under a post in page order, deleted
        placeholders included: ``(id, list, path, deleted)``, where a comment's replies
        shown under it have its ``path`` as their ``list`` ('' for the top level)."""
        rows = await self._fetchall(self._WALK, (post_id, limit, max_depth))
        return [(row[0], row[1], row[2], bool(row[3])) for row in rows]

    async def list_comments_by_ids(self, ids: Sequence[int]) -> dict[int, Comment]:
        """These comments, by id, as a page shows them (ids from ``list_response_walk``)."""
        found: dict[int, Comment] = {}
        unique = list(dict.fromkeys(ids))
        for start in range(0, len(unique), 500):
            chunk = unique[start : start + 500]
            rows = await self._fetchall(
                f"SELECT {_COMMENT_COLUMNS} FROM comments c LEFT JOIN actors a"
                f" ON a.id = c.actor_id WHERE c.id IN ({_marks(chunk)})",
                chunk,
            )
            found.update((row["id"], _comment(row)) for row in rows)
        return found

    async def is_visible_comment(self, post_id: int, comment_id: int) -> bool:
        """Whether a reader may see this comment (or its placeholder) under this post."""
        row = await self._fetchone(
            f"SELECT 1 FROM comments c WHERE c.id = ? AND c.post_id = ? AND {_VISIBLE}",
            (comment_id, post_id),
        )
        return row is not None

    # ---- replies processed in batches: rows kept for one executemany ----
    # The rest of "replies processed in batches" above. A shared transaction holds the one
    # write lock that accepting inbox POSTs also need (BatchWriter), so the replies of a
    # batch, drafted before it (responses.py), cost inside it one read for what they look
    # up (get_reply_context) and one executemany per table for what they write, not a
    # trip to aiosqlite's thread each. A row kept for later is written before the
    # transaction's next other write or read and before its commit, so the order of
    # writes holds (SharedTransaction says where a kept row that fails to write fails).

    # One INSERT per table, for a row written at once and a row kept for later alike.
    _INSERT_COMMENT = (
        "INSERT INTO comments (id, post_id, parent_id, ap_id, url, actor_id, author_name,"
        " author_url, author_email, content_html, summary, sensitive, visibility, status,"
        " source, published_at, received_at, held_reason) VALUES"
        " (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
    )
    _INSERT_PROXIED = (
        "INSERT INTO proxy_media (key, url, host, kind, created_at)"
        " VALUES (?, ?, ?, ?, ?) ON CONFLICT DO NOTHING"
    )
    # The one rule for a sender's first reply (moderation "first"): the actor {} has no
    # published comment yet.
    _HAS_PUBLISHED = (
        "EXISTS (SELECT 1 FROM comments c WHERE c.actor_id = {} AND c.status = 'published')"
    )

    @staticmethod
    def _comment_row(
        comment_id: int | None,
        *,
        post_id: int,
        parent_id: int | None,
        content_html: str,
        published: datetime,
        received: datetime,
        source: CommentSource,
        ap_id: str | None = None,
        url: str | None = None,
        actor_id: int | None = None,
        author_name: str = "",
        author_url: str | None = None,
        author_email: str | None = None,
        summary: str | None = None,
        sensitive: bool = False,
        visibility: Visibility = "public",
        status: str = "published",
        held_reason: str | None = None,
    ) -> tuple[Any, ...]:
        """The values of ``_INSERT_COMMENT`` (``comment_id`` None: SQLite chooses it)."""
        return (
            comment_id,
            post_id,
            parent_id,
            ap_id,
            url,
            actor_id,
            author_name,
            author_url,
            author_email,
            content_html,
            summary,
            int(sensitive),
            visibility,
            status,
            source,
            format_ts(published),
            format_ts(received),
            held_reason if status == "pending" else None,  # only a held comment says why
        )

    @staticmethod
    def _proxied_rows(
        rows: Iterable[tuple[str, str, str, str]], now: datetime
    ) -> list[tuple[str, str, str, str, str]]:
        """The values of ``_INSERT_PROXIED`` for (key, url, host, kind) rows."""
        created = format_ts(now)
        return [(*row, created) for row in rows]

    async def _insert_comment(self, values: tuple[Any, ...]) -> int:
        async with self._transaction() as db:
            # One trip to aiosqlite's thread (execute and the id), not two.
            row = await db.execute_insert(self._INSERT_COMMENT, values)
        assert row is not None
        return int(row[0])

    async def has_published_comment(self, actor_id: int) -> bool:
        """Whether this actor has a published comment: if not, its next reply is its
        first (moderation ``first``; ``get_reply_context`` asks it for a batch)."""
        sql = f"SELECT {self._HAS_PUBLISHED.format('?')}"
        row = await self._fetchone(sql, (actor_id,))
        return bool(row and row[0])

    @staticmethod
    def _shared_here() -> SharedTransaction | None:
        shared = _shared.get()
        return shared if shared is not None and shared.task is asyncio.current_task() else None

    async def save_comment_later(
        self,
        *,
        post_id: int,
        parent_id: int | None,
        content_html: str,
        published: datetime,
        received: datetime,
        ap_id: str,
        url: str | None,
        actor_id: int,
        summary: str | None,
        sensitive: bool,
        visibility: Visibility,
        status: str,
        held_reason: str | None,
    ) -> int:
        """``save_comment`` for a reply from the fediverse; in a shared transaction the
        row is kept for one executemany with the others, and its id returned now.

        The only place a kept comment's id is chosen: the next rowid, as SQLite would
        choose it (the write lock is ours), read once and counted on from there until a
        write joins the transaction (which may insert a comment itself)."""
        values = self._comment_row(
            None,
            post_id=post_id,
            parent_id=parent_id,
            content_html=content_html,
            published=published,
            received=received,
            source="fediverse",
            ap_id=ap_id,
            url=url,
            actor_id=actor_id,
            summary=summary,
            sensitive=sensitive,
            visibility=visibility,
            status=status,
            held_reason=held_reason,
        )
        shared = self._shared_here()
        if shared is None:
            return await self._insert_comment(values)
        if not shared.next_comment_id:
            row = await self._fetchone("SELECT coalesce(max(id), 0) + 1 FROM comments")
            shared.next_comment_id = int(row[0]) if row else 1
        comment_id = shared.next_comment_id
        shared.next_comment_id += 1
        self._later(shared, self._INSERT_COMMENT, (comment_id, *values[1:]), shown=True)
        return comment_id

    async def save_proxied_later(self, rows: Sequence[tuple[str, str, str, str]]) -> None:
        """``save_proxied``; in a shared transaction, kept for one executemany."""
        shared = self._shared_here()
        if shared is None:
            await self.save_proxied(rows)
            return
        for row in self._proxied_rows(rows, utcnow()):
            self._later(shared, self._INSERT_PROXIED, row, shown=False)

    @staticmethod
    def _later(shared: SharedTransaction, sql: str, row: tuple[Any, ...], *, shown: bool) -> None:
        # One statement per table, each an insert that depends on no other table's
        # rows kept with it: writing them statement by statement keeps every order that
        # matters (a reply after the comment it answers).
        shared.writes += 1  # a write of this transaction from now on, as any other
        shared.shown = shared.shown or shown
        shared.later.setdefault(sql, []).append(row)

    async def _write_later(self, shared: SharedTransaction) -> None:
        # The kept comments took the ids next_comment_id counted: it stays right until
        # a write joins (Store._transaction clears it there).
        later, shared.later = shared.later, {}
        try:
            for sql, rows in later.items():
                await self._db.executemany(sql, rows)
        except BaseException as error:
            shared.broken = True  # rows it holds are lost: it must not commit
            failure = self._storage_failure(error)
            if failure is not None:
                raise failure from error
            raise

    # For a batch of replies: tombstones ('t'), comments already here ('c'), and actors
    # with a published comment ('a'). ?1 is the batch's ids, ?2 its actors' (_id_lists).
    _REPLY_CONTEXT = (
        "SELECT 't', ap_id, actor_ap_id, NULL FROM tombstones"
        " WHERE ap_id IN (SELECT value FROM json_each(?1))"
        " UNION ALL SELECT 'c', ap_id, id, post_id FROM comments"
        " WHERE ap_id IN (SELECT value FROM json_each(?1))"
        " UNION ALL SELECT 'a', NULL, j.value, NULL FROM json_each(?2) j"
        f" WHERE {_HAS_PUBLISHED.format('j.value')}"
    )

    @staticmethod
    def _id_lists(*lists: Sequence[str | int]) -> tuple[Any, ...]:
        """Lists as ``_REPLY_CONTEXT`` takes them: JSON text for SQLite's json_each."""
        return tuple(json.dumps(list(dict.fromkeys(values))) for values in lists)

    async def get_reply_context(
        self, ap_ids: Sequence[str], actor_ids: Sequence[int]
    ) -> tuple[dict[str, str | None], dict[str, tuple[int, int]], set[int]]:
        """For a batch of replies, in one read: which of these ids were deleted and by
        whom (``is_tombstoned``), the (comment id, post id) of those already here, and
        which of these actors have a published comment (``has_published_comment``)."""
        rows = await self._fetchall(self._REPLY_CONTEXT, self._id_lists(ap_ids, actor_ids))
        tombstones: dict[str, str | None] = {}
        places: dict[str, tuple[int, int]] = {}
        published: set[int] = set()
        for kind, ap_id, first, second in rows:
            if kind == "t":
                tombstones[ap_id] = first
            elif kind == "c":
                places[ap_id] = (int(first), int(second))
            else:
                published.add(int(first))
        return tombstones, places, published

    # ---- worker processes: data version, heartbeats, counts (runtime.py) ----

    async def get_data_version(self) -> int:
        """SQLite's ``PRAGMA data_version`` on the writer connection: it changes when
        another process (or connection) commits, never for this store's own commits,
        and reads no table (runtime.py's watcher asks it up to 20 times a second, in
        one trip to aiosqlite's thread)."""
        try:
            [[version]] = await self._db.execute_fetchall("PRAGMA data_version")
        except sqlite3.OperationalError as error:
            raise _unavailable(self._path, error) from error
        return int(version)

    def peek_data_version(self) -> int | None:
        """``PRAGMA data_version`` on a connection of its own, asked right here on the
        event loop's thread: about 7 us of CPU, where a trip to aiosqlite's thread
        costs about 0.2 ms (a watcher asking 20 times a second would spend half a
        percent of a core doing nothing). It changes with every commit, this store's
        own included (``get_data_version`` then tells whose). Never waits: None when
        the database is busy or unusable (ask again later)."""
        try:
            if self._peeker is None:
                self._peeker = sqlite3.connect(self._path, timeout=0, isolation_level=None)
            [[version]] = self._peeker.execute("PRAGMA data_version").fetchall()
        except sqlite3.Error:
            return None
        return int(version)

    # A worker process's heartbeat: one meta row per role, when it was last seen running,
    # and one per process with its outcome counts since it started (/metrics adds them).
    _HEARTBEAT_KEY = "worker_seen."
    _COUNTS_KEY = "worker_counts."

    async def save_worker_heartbeats(
        self,
        roles: Sequence[str],
        now: datetime,
        *,
        process: str | None = None,
        counts: Mapping[str, Mapping[str, int]] | None = None,
    ) -> None:
        """Record that ``roles`` ran at ``now`` and, for ``process``, its ``counts``
        (worker name -> outcome -> jobs since the process started)."""
        rows = [(self._HEARTBEAT_KEY + role, format_ts(now)) for role in roles]
        if process is not None:
            value = json.dumps({"at": format_ts(now), "counts": counts or {}})
            rows.append((self._COUNTS_KEY + process, value))
        async with self._transaction(shown=False) as db:
            await db.executemany(
                "INSERT INTO meta (key, value) VALUES (?, ?)"
                " ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                rows,
            )

    async def delete_worker_heartbeats(
        self, written: Mapping[str, datetime], *, process: str | None = None
    ) -> None:
        """A worker process stopped: forget its rows. ``written`` is the heartbeat it
        wrote last for each role; a row holding another one is kept (another worker
        process runs that role too)."""
        async with self._transaction(shown=False) as db:
            await db.executemany(
                "DELETE FROM meta WHERE key = ? AND value = ?",
                [(self._HEARTBEAT_KEY + role, format_ts(at)) for role, at in written.items()],
            )
            if process is not None:
                await db.execute("DELETE FROM meta WHERE key = ?", (self._COUNTS_KEY + process,))

    async def list_worker_heartbeats(self) -> dict[str, datetime]:
        """Each role a worker process reported, and when it last did."""
        return {
            key: parse_ts(value) for key, value in (await self._meta_rows(self._HEARTBEAT_KEY))
        }

    async def get_worker_counts(self, since: datetime) -> dict[str, dict[str, int]]:
        """The outcome counts of the worker processes heard from since ``since``,
        added up: worker name -> outcome -> jobs."""
        total: dict[str, dict[str, int]] = {}
        for _, value in await self._meta_rows(self._COUNTS_KEY):
            found = json.loads(value)
            if parse_ts(found["at"]) < since:
                continue  # a process killed long ago: its counts went with it
            for name, outcomes in found["counts"].items():
                mine = total.setdefault(name, {})
                for outcome, count in outcomes.items():
                    mine[outcome] = mine.get(outcome, 0) + int(count)
        return total

    async def _meta_rows(self, prefix: str) -> list[tuple[str, str]]:
        """The meta rows whose key starts with ``prefix`` (which ends with '.'), on the
        primary key's index; the prefix taken off."""
        rows = await self._fetchall(
            "SELECT key, value FROM meta WHERE key >= ? AND key < ?",
            (prefix, prefix[:-1] + "/"),  # "/" sorts right after "."
        )
        return [(row["key"].removeprefix(prefix), row["value"]) for row in rows]


# ---- PostgreSQL ---------------------------------------------------------------------
# The same Store on a PostgreSQL server, through asyncpg (``pip install
# 'fediblog[postgresql]'``). Every query above is written once, for both: the few
# spellings that differ are the class attributes PostgresStore overrides, and SQLite's
# placeholders (?, ?N, :name) become PostgreSQL's ($N) on the way (``_pg_query``).
# What PostgreSQL adds: several processes may write at once (claims skip the rows
# another worker holds: FOR UPDATE SKIP LOCKED), and commits are told to every process
# at once (LISTEN/NOTIFY), which is how page caches and sleeping workers hear of them.

# A string, a quoted name or a comment (passed over), a cast (::), or a placeholder.
_PG_TOKENS = re.compile(r"""'(?:[^']|'')*'|"(?:[^"]|"")*"|--[^\n]*|::|\?(\d*)|:([A-Za-z_]\w*)""")


@functools.lru_cache(maxsize=4096)
def _pg_query(sql: str) -> tuple[str, tuple[int | str, ...]]:
    """``sql`` with PostgreSQL's placeholders, and for each $N the parameter it takes:
    an index into a sequence of parameters, or a name in a mapping of them."""
    order: list[int | str] = []
    numbers: dict[int | str, int] = {}
    positional = 0

    def placeholder(match: re.Match[str]) -> str:
        nonlocal positional
        text = match.group(0)
        key: int | str
        if text.startswith("?"):
            if match.group(1):
                key = int(match.group(1)) - 1
            else:
                key, positional = positional, positional + 1
        elif text.startswith(":") and match.group(2):
            key = match.group(2)
        else:
            return text
        if key not in numbers:
            order.append(key)
            numbers[key] = len(order)
        return f"${numbers[key]}"

    return _PG_TOKENS.sub(placeholder, sql), tuple(order)


def _asyncpg() -> Any:
    """asyncpg, imported on first use: only a blog on PostgreSQL needs it."""
    try:
        import asyncpg
    except ImportError:
        raise StorageError(
            "FEDIBLOG_DATABASE is a PostgreSQL URL, but asyncpg is not installed:"
            " pip install 'fediblog[postgresql]'"
        ) from None
    return asyncpg


def _pg_args(order: tuple[int | str, ...], parameters: Any) -> list[Any]:
    return [_pg_value(parameters[key]) for key in order]


def _pg_value(value: Any) -> Any:
    """A parameter as PostgreSQL can hold it. Its text cannot hold a NUL, which SQLite
    stores: the inbox refuses one where it matters (``is_unicode``), and anywhere else
    (a remote actor's name, say) it becomes U+FFFD, as an HTML parser makes it."""
    if type(value) is str and "\x00" in value:
        return value.replace("\x00", "\ufffd")
    if type(value) is list:
        return [_pg_value(item) for item in value]
    return value


def _pg_count(status: bytes | str | None) -> int:
    """The rows a statement touched, from its status ("UPDATE 3", "INSERT 0 1")."""
    text = status.decode() if isinstance(status, bytes) else status or ""
    last = text.rpartition(" ")[2]
    return int(last) if last.isdigit() else -1


@dataclass(slots=True)
class _PgCursor:
    """What a statement gave: its rows and how many rows it touched."""

    rows: list[Any]
    rowcount: int

    async def fetchone(self) -> Any:
        return self.rows[0] if self.rows else None

    async def fetchall(self) -> list[Any]:
        return self.rows


class _PgRun:
    """A statement under way: awaited, or used as ``async with``, as aiosqlite's."""

    def __init__(self, run: Coroutine[Any, Any, _PgCursor]) -> None:
        self._run = run

    def __await__(self) -> Generator[Any, None, _PgCursor]:
        return self._run.__await__()

    async def __aenter__(self) -> _PgCursor:
        return await self._run

    async def __aexit__(self, *exc: object) -> None:
        return None


class _PgConnection:
    """An asyncpg connection with the calls the store makes of aiosqlite's."""

    def __init__(self, connection: Any) -> None:
        self.connection = connection

    def execute(self, sql: str, parameters: Any = ()) -> _PgRun:
        return _PgRun(_pg_run(self.connection, sql, parameters))

    async def execute_fetchall(self, sql: str, parameters: Any = ()) -> list[Any]:
        return (await _pg_run(self.connection, sql, parameters)).rows

    async def executemany(self, sql: str, rows: Iterable[Any]) -> None:
        query, order = _pg_query(sql)
        many = [_pg_args(order, row) for row in rows]
        if many:
            await self.connection.executemany(query, many)

    async def close(self) -> None:
        await self.connection.close()


async def _pg_run(connection: Any, sql: str, parameters: Any) -> _PgCursor:
    query, order = _pg_query(sql)
    # asyncpg's own fetch, with the statement's status too (fetch drops it): one
    # round trip for rows and count alike, through its statement cache.
    rows, status, _ = await connection._execute(
        query, _pg_args(order, parameters), 0, None, return_status=True
    )
    return _PgCursor(rows, _pg_count(status))


def _postgres_ddl(script: str) -> str:
    """A migration of ``MIGRATIONS`` (SQLite's DDL) as PostgreSQL runs it. Text
    compares byte by byte in both (SQLite's BINARY, PostgreSQL's "C"), so every
    ordering and range on text (times, keys) is the same."""
    for sqlite_spelling, postgres_spelling in _PG_DDL:
        script = script.replace(sqlite_spelling, postgres_spelling)
    script = re.sub(
        r"\bINTEGER PRIMARY KEY\b", "BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY", script
    )
    script = re.sub(r"\bINTEGER\b(?=[^,\n]*\bREFERENCES\b)", "BIGINT", script)
    script = re.sub(r"^(\s+\w+\s+)TEXT\b", r'\1TEXT COLLATE "C"', script, flags=re.MULTILINE)
    script = re.sub(r"\bADD COLUMN (\w+) TEXT\b", r'ADD COLUMN \1 TEXT COLLATE "C"', script)
    return script


# The SQLite-only spellings in the shipped migrations, and PostgreSQL's.
_PG_DDL = (
    (") WITHOUT ROWID;", ");"),
    (
        "strftime('%Y-%m-%dT%H:%M:%SZ', 'now')",
        """to_char(now() AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS"Z"')""",
    ),
    # 64 hex digits from the server's strong random source (gen_random_uuid's).
    (
        "lower(hex(randomblob(32)))",
        "encode(sha256(convert_to(gen_random_uuid()::text || gen_random_uuid()::text,"
        " 'UTF8')), 'hex')",
    ),
    (
        "INSERT OR IGNORE INTO meta (key, value) VALUES ('proxy_secret',",
        "INSERT INTO meta (key, value) VALUES ('proxy_secret',",
    ),
    ("'hex'))));", "'hex'))) ON CONFLICT DO NOTHING;"),
)

_PG_CHANNEL = "fediblog"  # NOTIFY: "shown" after a commit a page shows, "work" after others
_PG_READERS = 4  # connections for reads outside a write transaction, per process
_PG_CONNECT_TIMEOUT = 5.0  # seconds: an unreachable server is "unavailable", not a hang
_PG_CLOSE_TIMEOUT = 5.0  # seconds: a connection not closed by then is cut
_PG_MIGRATION_LOCK = 0x66656469  # pg_advisory_xact_lock: one process migrates at a time


def _walk_in_memory(
    rows: Iterable[Any], limit: int, max_depth: int
) -> list[tuple[int, str, str, bool]]:
    """``Store._WALK`` over the rows (id, parent id, published_at, deleted) of a post's
    visible comments, in id order: the same entries in the same order. A comment is a
    root unless its parent is a visible comment before it; the first ``limit`` roots
    by (time, id) start a queue that always yields the smallest path next."""
    seen: set[int] = set()
    children: dict[int, list[tuple[int, str, bool]]] = {}
    roots: list[tuple[str, int, bool]] = []
    for comment_id, parent_id, moment, deleted in rows:
        if parent_id is not None and parent_id in seen:
            children.setdefault(parent_id, []).append((comment_id, moment, bool(deleted)))
        else:
            roots.append((moment, comment_id, bool(deleted)))
        seen.add(comment_id)
    # (path, id, depth, list, moment, deleted), smallest path first.
    queue = [
        (f"{moment}{comment_id:012d}", comment_id, 1, "", moment, deleted)
        for moment, comment_id, deleted in heapq.nsmallest(limit, roots)
    ]
    heapq.heapify(queue)
    walked: list[tuple[int, str, str, bool]] = []
    while queue and len(walked) < limit:
        path, comment_id, depth, listed, moment, deleted = heapq.heappop(queue)
        walked.append((comment_id, listed, path, deleted))
        for child, published, child_deleted in children.get(comment_id, ()):
            if depth < max_depth:
                entry = (f"{path}{published}{child:012d}", child, depth + 1, path, published)
            else:  # flattened into this level: never before the comment it answers
                later = max(published, moment)
                entry = (f"{listed}{later}{child:012d}", child, max_depth, listed, later)
            heapq.heappush(queue, (*entry, child_deleted))
    return walked


class PostgresStore(Store):
    """A blog on a PostgreSQL server: ``await Store.open("postgresql://…")``.

    One connection for write transactions (one at a time per process, as on SQLite:
    the code above reads and then writes in them), a few for reads, and one that
    listens for other processes' commits. Other processes write at once beside this
    one; what must not happen twice is kept so by the tables' unique keys and by
    claims that skip locked rows.
    """

    _POST_COLUMNS = _post_columns("string_agg(t.tag, chr(31))")
    _SKIP_LOCKED = " FOR UPDATE SKIP LOCKED"
    _INBOX_HOST = Store._INBOX_HOST.replace("instr(", "strpos(")
    # The bump tells every process at once (``version``).
    _BUMP_SHOWN = (
        f"WITH bump AS ({Store._BUMP_SHOWN} RETURNING 1)"
        f" SELECT pg_notify('{_PG_CHANNEL}', 'shown') FROM bump"
    )
    # Store._INSERT_COMMENT without its id: an identity column takes no NULL.
    _INSERT_NEW_COMMENT = (
        Store._INSERT_COMMENT.replace("(id, ", "(", 1).replace("(?, ", "(", 1) + " RETURNING id"
    )

    def __init__(self, writer: Any, pool: Any, url: str) -> None:
        self._pg = _PgConnection(writer)
        self._db = self._pg  # type: ignore[assignment]  # what the queries above use
        self._pool = pool
        self._url = url
        self._where = without_password(url)
        self._path = Path(self._where)  # for messages only: no file
        self._lock = asyncio.Lock()
        self._writes = 0
        self._stored_generation = 0  # the shown generation as last read from meta
        self._checked_at = 0.0
        self.version_max_age = 1.0
        self._listener: Any = None
        self._listen_again_at = 0.0  # monotonic: when a lost listener is tried again
        self._writer_pid = int(writer.get_server_pid())
        self._notices = 0  # commits heard of, ours included (peek_data_version)
        self._foreign = 0  # commits of other connections heard of (get_data_version)

    @classmethod
    async def connect(cls, url: str) -> PostgresStore:
        """Connect to ``url``, make or upgrade the schema, and listen for commits."""
        asyncpg = _asyncpg()
        where = without_password(url)
        writer = pool = None
        try:
            writer = await asyncpg.connect(url, timeout=_PG_CONNECT_TIMEOUT)
            pool = await asyncpg.create_pool(
                url, min_size=1, max_size=_PG_READERS, timeout=_PG_CONNECT_TIMEOUT
            )
            store = cls(writer, pool, url)
            await store.migrate()
            await store._listen()
        except (
            OSError,
            ValueError,  # a malformed URL
            OverflowError,  # a port past 65535
            asyncpg.PostgresError,
            asyncpg.InterfaceError,
        ) as error:
            if pool is not None:
                await pool.close()
            if writer is not None:
                await writer.close()
            raise StorageError(f"cannot use the database {where}: {error}") from None
        except BaseException:
            if pool is not None:
                pool.terminate()
            if writer is not None:
                writer.terminate()
            raise
        return store

    @property
    def url(self) -> str:
        return self._url

    @property
    def where(self) -> str:
        """The database's URL without its password, as messages name it."""
        return self._where

    async def close(self) -> None:
        """Close every connection; one that does not close in time (a reader still
        busy, a server that stopped answering) is cut, so closing never hangs."""
        failures = (TimeoutError, OSError, _asyncpg().InterfaceError)
        if self._listener is not None:
            with contextlib.suppress(*failures):
                await self._listener.close(timeout=_PG_CLOSE_TIMEOUT)
        with contextlib.suppress(*failures):  # the pool cuts its connections itself
            await asyncio.wait_for(self._pool.close(), _PG_CLOSE_TIMEOUT)
        with contextlib.suppress(*failures):
            await self._pg.connection.close(timeout=_PG_CLOSE_TIMEOUT)

    async def migrate(self) -> int:
        """As ``Store.migrate``: the due migrations in one transaction, under a lock
        that a second process starting at once waits for (then finds them done)."""
        connection = self._pg.connection
        async with self._lock, connection.transaction():
            await connection.execute(f"SELECT pg_advisory_xact_lock({_PG_MIGRATION_LOCK})")
            await connection.execute(
                "CREATE TABLE IF NOT EXISTS fediblog_schema (version INTEGER NOT NULL)"
            )
            current = await connection.fetchval("SELECT max(version) FROM fediblog_schema")
            if current is None:
                await connection.execute("INSERT INTO fediblog_schema (version) VALUES (0)")
                current = 0
            if current > len(MIGRATIONS):
                raise StorageError(
                    f"the database is at schema {current}, newer than this fediblog knows"
                    f" ({len(MIGRATIONS)}): upgrade fediblog"
                )
            for migration in MIGRATIONS[current:]:
                await connection.execute(_postgres_ddl(migration))
            await connection.execute("UPDATE fediblog_schema SET version = $1", len(MIGRATIONS))
        return len(MIGRATIONS)

    async def _user_version(self) -> int:
        value = await self._pg.connection.fetchval("SELECT max(version) FROM fediblog_schema")
        return int(value or 0)

    # ---- commits heard of ----

    async def _listen(self) -> None:
        """A connection of its own that hears every commit's NOTIFY."""
        listener = await _asyncpg().connect(self._url, timeout=_PG_CONNECT_TIMEOUT)
        try:
            await listener.add_listener(_PG_CHANNEL, self._heard)
        except BaseException:
            listener.terminate()
            raise
        self._listener = listener

    def _heard(self, connection: Any, pid: int, channel: str, payload: str) -> None:
        self._notices += 1
        if pid != self._writer_pid:
            self._foreign += 1
        if payload == "shown":
            self._checked_at = 0.0  # version reads the shown generation at its next call

    async def _listening(self) -> bool:
        """Listen again if the listening connection was lost (tried every few seconds
        at most, never holding a caller up for long); False if it cannot now."""
        if self._listener is not None and not self._listener.is_closed():
            return True
        now = time.monotonic()
        if now < self._listen_again_at:
            return False
        self._listen_again_at = now + _PG_CONNECT_TIMEOUT
        try:
            await self._listen()
        except Exception:  # the server away: a later look tries again
            return False
        # Commits were missed meanwhile: count them as seen once more.
        self._notices += 1
        self._foreign += 1
        self._checked_at = 0.0
        return True

    async def version(self) -> tuple[int, int]:
        """As ``Store.version``: the shown generation is read every ``version_max_age``
        seconds, as on SQLite, and at once after a commit a page shows was heard of
        (NOTIFY), so another process's change shows on the next request; a notice
        lost with the listening connection is waited for no longer than the age."""
        now = time.monotonic()
        if now - self._checked_at >= self.version_max_age:
            self._checked_at = now
            try:
                await self._listening()
                rows = await self._fetchall(
                    "SELECT value FROM meta WHERE key = ?", (self._SHOWN_GENERATION,)
                )
            except StorageUnavailable:
                self._checked_at = 0.0  # ask again next time
                raise
            self._stored_generation = next((int(row[0]) for row in rows), 0)
        return (self._writes, self._stored_generation)

    async def get_data_version(self) -> int:
        await self._listening()
        return self._foreign

    def peek_data_version(self) -> int | None:
        return self._notices

    # ---- transactions ----

    async def _start_writing(self) -> None:
        if self._pg.connection.is_closed():  # lost, or ended by _abort_writing
            await self._reconnect()
        await self._pg.connection.execute("BEGIN")

    async def _finish_writing(self, *, shown: bool) -> None:
        connection = self._pg.connection
        # Sleeping workers in other processes wake (``get_data_version``); a commit a
        # page shows has told them already (``_BUMP_SHOWN``).
        await connection.execute(f"SELECT pg_notify('{_PG_CHANNEL}', 'work')")
        await connection.execute("COMMIT")

    async def _abort_writing(self) -> None:
        connection = self._pg.connection
        if connection.is_closed():
            return
        try:
            if connection.is_in_transaction():
                await connection.execute("ROLLBACK")
        except Exception:
            # A statement cancelled mid-way leaves the connection unusable: start over
            # on a new one (the server rolls the old one's transaction back).
            connection.terminate()

    def _storage_failure(self, error: BaseException) -> StorageError | None:
        return _pg_failure(self._where, error)

    async def _reconnect(self) -> None:
        """A new writer connection for the one lost (the server restarted, say)."""
        self._pg = _PgConnection(await _asyncpg().connect(self._url, timeout=_PG_CONNECT_TIMEOUT))
        self._db = self._pg  # type: ignore[assignment]
        self._writer_pid = int(self._pg.connection.get_server_pid())

    async def _fetchall(self, sql: str, params: Sequence[Any] = ()) -> list[Any]:
        writing = _writing.get()
        try:
            if writing is not None and writing is asyncio.current_task():
                shared = _shared.get()
                if shared is not None and shared.later:
                    await self._write_later(shared)  # a read sees every write before it
                return await self._pg.execute_fetchall(sql, params)
            async with self._pool.acquire() as connection:
                return (await _pg_run(connection, sql, params)).rows
        except StorageError:
            raise
        except Exception as error:
            failure = _pg_failure(self._where, error)
            if failure is None:
                raise
            raise failure from error

    async def count_rows_in_use(self) -> int:
        """Posts, comments, actors and queued work: 0 for a database no blog used yet."""
        row = await self._fetchone(
            "SELECT (SELECT count(*) FROM posts) + (SELECT count(*) FROM comments)"
            " + (SELECT count(*) FROM actors) + (SELECT count(*) FROM activities)"
            " + (SELECT count(*) FROM inbox)"
        )
        return int(row[0]) if row else 0

    # ---- what SQLite does its own way ----

    async def save_inbox_items(self, items: Sequence[InboxItem]) -> None:
        """As ``Store.save_inbox_items``: one statement for the batch, in arrival order."""
        if not items:
            return
        rows = ((i.dedup_key, i.actor, i.type, i.payload) for i in items)
        columns = [list(column) for column in zip(*rows, strict=True)]
        async with self._transaction(shown=False) as db:
            await db.execute(
                "INSERT INTO inbox (dedup_key, actor_ap_id, type, payload, received_at)"
                " SELECT k, a, t, p, ? FROM unnest(CAST(? AS TEXT[]), CAST(? AS TEXT[]),"
                " CAST(? AS TEXT[]), CAST(? AS TEXT[])) WITH ORDINALITY AS u(k, a, t, p, n)"
                " ORDER BY n ON CONFLICT DO NOTHING",
                (format_ts(utcnow()), *columns),
            )

    async def _insert_comment(self, values: tuple[Any, ...]) -> int:
        async with self._transaction() as db:
            return await _returning(db, self._INSERT_NEW_COMMENT, values[1:])

    async def save_comment_later(self, **comment: Any) -> int:
        """As ``Store.save_comment_later``, written at once: the server chooses the id."""
        values = self._comment_row(None, source="fediverse", **comment)
        return await self._insert_comment(values)

    async def save_seed_comments(
        self,
        post_id: int,
        comments: Sequence[tuple[int | None, int | None, str, str, datetime]],
    ) -> int:
        first = await super().save_seed_comments(post_id, comments)
        async with self._transaction(shown=False) as db:  # setval is never rolled back
            await _pg_follow_ids(db, "comments")
        return first

    async def list_response_walk(
        self, post_id: int, limit: int, *, max_depth: int
    ) -> list[tuple[int, str, str, bool]]:
        """As ``Store.list_response_walk``. PostgreSQL's recursive queries allow no
        ORDER BY or LIMIT in their recursive part, so SQLite's walk would reach every
        comment, one query step per level (a chain of 50,000 took minutes): the post's
        visible comments are read in one query instead (ids, parents and times only),
        and walked here in the same order (``_walk_in_memory``)."""
        rows = await self._fetchall(self._THREAD_ROWS, (post_id,))
        return _walk_in_memory(rows, limit, max_depth)

    # What _walk_in_memory walks: a post's visible comments (portable SQL).
    _THREAD_ROWS = (
        "SELECT c.id, c.parent_id, c.published_at, c.status = 'deleted' FROM comments c"
        f" WHERE c.post_id = ? AND {_VISIBLE} ORDER BY c.id"
    )

    _REPLY_CONTEXT = (
        "SELECT 't', ap_id, actor_ap_id, NULL FROM tombstones"
        " WHERE ap_id = ANY(CAST(?1 AS TEXT[]))"
        " UNION ALL SELECT 'c', ap_id, CAST(id AS TEXT), CAST(post_id AS TEXT)"
        " FROM comments WHERE ap_id = ANY(CAST(?1 AS TEXT[]))"
        " UNION ALL SELECT 'a', NULL, CAST(j.value AS TEXT), NULL"
        " FROM unnest(CAST(?2 AS BIGINT[])) AS j(value)"
        f" WHERE {Store._HAS_PUBLISHED.format('j.value')}"
    )

    @staticmethod
    def _id_lists(*lists: Sequence[str | int]) -> tuple[Any, ...]:
        return tuple(list(dict.fromkeys(values)) for values in lists)


async def _pg_follow_ids(db: Any, table: str) -> None:
    """Rows given ids of their own (a copy, a seed): the table's next id follows them."""
    await db.execute(
        f"SELECT setval(pg_get_serial_sequence('{table}', 'id'),"
        f" greatest((SELECT max(id) FROM {table}), 1))"
    )


def _pg_failure(where: str, error: BaseException) -> StorageError | None:
    """The StorageError for an error of asyncpg's, or None to let it through."""
    asyncpg = _asyncpg()
    unavailable = (
        OSError,
        asyncpg.InterfaceError,  # the connection was lost or closed
        asyncpg.PostgresConnectionError,
        asyncpg.InsufficientResourcesError,  # disk full, out of memory, connections
        asyncpg.OperatorInterventionError,  # shut down, cancelled
        asyncpg.ReadOnlySQLTransactionError,  # a standby
        asyncpg.TransactionRollbackError,  # serialization failure, deadlock
        asyncpg.LockNotAvailableError,
    )
    if isinstance(error, unavailable):
        return StorageUnavailable(f"the database {where} cannot be used now: {error}")
    if isinstance(error, asyncpg.IntegrityConstraintViolationError):
        return StorageConflict(f"the database {where} refused a write: {error}")
    return None


# ---- moving a blog from SQLite to PostgreSQL (`fediblog migrate`) ---------------------

# Every table, each after the tables it refers to: the order a copy fills them in.
_TABLES = (
    "meta", "posts", "post_tags", "old_slugs", "actors", "comments", "reactions", "followers",
    "activities", "deliveries", "inbox", "tombstones", "blocks", "crawls", "notifications",
    "post_schedule", "media", "proxy_media", "desk_account", "desk_sessions", "desk_addresses",
)  # fmt: skip
# The rows a new database starts with (migrations 2 and 9): the copy brings the blog's own.
_SEEDED = {"meta": ("created_at", "proxy_secret")}
_COPY_BATCH = 5000


async def copy_blog(
    source: Store, target: PostgresStore, *, report: Callable[[str, int], None] | None = None
) -> dict[str, int]:
    """Copy every row of ``source`` (SQLite) into ``target`` (an empty PostgreSQL
    database), ids and all, in one transaction of the target's: a copy that fails
    leaves it empty. ``source`` is read in one read transaction (a consistent snapshot,
    but stop the server first: what it writes meanwhile would not be copied). Returns
    the rows copied per table; ``report`` hears of each table as it is done."""
    if type(source) is not Store:
        raise StorageError("the database to copy from must be an SQLite file")
    if await target.count_rows_in_use():
        raise StorageError(
            f"{target.where} already holds a blog: copy into a new, empty database"
        )
    copied: dict[str, int] = {}
    reader = source._reader
    await reader.execute("BEGIN")  # one snapshot of every table
    try:
        async with target._transaction(shown=True) as db:
            connection = target._pg.connection
            for table in _TABLES:
                for key in _SEEDED.get(table, ()):
                    await connection.execute(f"DELETE FROM {table} WHERE key = $1", key)
                order = "ORDER BY id" if table in _IDENTITY_TABLES else ""
                cursor = await reader.execute(f"SELECT * FROM {table} {order}")
                columns = [column[0] for column in cursor.description]
                count = 0
                while rows := await cursor.fetchmany(_COPY_BATCH):
                    batch = [tuple(map(_pg_value, row)) for row in rows]
                    await connection.copy_records_to_table(
                        table, records=batch, columns=columns
                    )
                    count += len(batch)
                await cursor.close()
                if table in _IDENTITY_TABLES:
                    await _pg_follow_ids(db, table)
                if table == "meta":  # the worker processes of the old database are gone
                    await connection.execute("DELETE FROM meta WHERE starts_with(key, 'worker_')")
                copied[table] = count
                if report is not None:
                    report(table, count)
    finally:
        await reader.execute("ROLLBACK")
    return copied


# The tables whose id the database chooses (an identity column on PostgreSQL).
_IDENTITY_TABLES = frozenset(
    {
        "posts", "actors", "comments", "reactions", "followers", "activities", "deliveries",
        "inbox", "blocks", "crawls", "notifications", "post_schedule", "desk_account",
    }
)  # fmt: skip


def _statements(script: str) -> Iterator[str]:
    """A migration's statements one by one (a trigger's body, a string or a comment
    holding a ';' stays whole: ``sqlite3.complete_statement`` tells where each ends)."""
    statement = ""
    for piece in script.split(";"):
        statement += piece + ";"
        if sqlite3.complete_statement(statement):
            if statement.strip().rstrip(";").strip():
                yield statement
            statement = ""


def _chunks(values: Sequence[str], size: int = 500) -> Iterator[list[str]]:
    unique = list(dict.fromkeys(values))
    for start in range(0, len(unique), size):
        yield unique[start : start + size]


def _marks(values: Sequence[object]) -> str:
    return ", ".join("?" * len(values))
