"""The schema: the numbered migrations (SQLite's DDL), and how PostgreSQL runs them.

``MIGRATIONS`` is what every database is made of, one entry per migration;
``_postgres_ddl`` turns an entry into PostgreSQL's DDL. ``_TABLES`` lists every table in
the order a copy fills them (``postgres.copy_blog``).
"""

from __future__ import annotations

import re
import sqlite3
from collections.abc import Iterator

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
    # the inbox's payloads in a table of their own
    """
    -- What an inbox row received, apart from its place in the queue: a claim and its
    -- outcome rewrite the row, and with the ~2 KB of JSON in it the two rewrote about
    -- 2 MB for a worker's batch of 500, with the write lock held. Written once, with
    -- its row (store/inbox.py), and gone with it.
    CREATE TABLE inbox_payloads (
        id       INTEGER NOT NULL PRIMARY KEY REFERENCES inbox(id) ON DELETE CASCADE,
        payload  TEXT NOT NULL
    );
    INSERT INTO inbox_payloads (id, payload) SELECT id, payload FROM inbox;
    ALTER TABLE inbox DROP COLUMN payload;
    """,
)


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

# ---- the tables, as a copy (`fediblog migrate`, postgres.copy_blog) fills them -------

# Every table, each after the tables it refers to: the order a copy fills them in.
_TABLES = (
    "meta", "posts", "post_tags", "old_slugs", "actors", "comments", "reactions", "followers",
    "activities", "deliveries", "inbox", "inbox_payloads", "tombstones", "blocks", "crawls",
    "notifications", "post_schedule", "media", "proxy_media", "desk_account", "desk_sessions",
    "desk_addresses",
)  # fmt: skip

# The rows a new database starts with (migrations 2 and 9): the copy brings the blog's own.
_SEEDED = {"meta": ("created_at", "proxy_secret")}

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
