"""Comments: from the fediverse and the form, their likes and boosts, tombstones,
the author's answers, the response feeds and the desk's view of responses, a post's
responses paged by count, and replies written in batches (inbox.py).
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Sequence
from datetime import datetime
from typing import Any

import aiosqlite

from fediblog.models import (
    Author,
    AuthorAnswer,
    Comment,
    CommentForReview,
    CommentSource,
    CommentState,
    Mentioned,
    OutgoingActivity,
    Reaction,
    ResponseEntry,
    StoredComment,
    Visibility,
    format_ts,
    parse_ts,
    utcnow,
)
from fediblog.store.core import (
    _COUNTED,
    _NOT_BLOCKED,
    _VISIBLE,
    SharedTransaction,
    _marks,
    _record,
    _returning,
)
from fediblog.store.deliveries import DeliveryStorage
from fediblog.store.media import PROXY_PATH

AUTHOR_AVATAR = "/static/avatar.png"  # the blog actor's icon, beside the author's answers

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


class CommentStorage(DeliveryStorage):
    """Comments, reactions, tombstones, the author's answers and responses."""

    # ---- comments ------------------------------------------------------------------

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

    async def is_tombstoned(self, ap_id: str, actor: str | None = None) -> bool:
        """Whether ``ap_id`` was deleted. Given ``actor`` (who now creates it), only a
        deletion by that actor counts, or one by this blog or by several actors: another
        actor's Delete of an object not here yet must not keep it out (ATTACKS.md 8)."""
        row = await self._fetchone("SELECT actor_ap_id FROM tombstones WHERE ap_id = ?", (ap_id,))
        return row is not None and (actor is None or row["actor_ap_id"] in (None, actor))

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

    async def count_held_comments(self) -> int:
        """Responses waiting for the author's approval (the desk's dashboard): those the
        queue lists (list_held_responses), so not those under a deleted post."""
        row = await self._fetchone(
            "SELECT count(*) FROM comments c JOIN posts p ON p.id = c.post_id"
            " WHERE c.status = 'pending' AND p.deleted_at IS NULL"
        )
        return int(row[0]) if row else 0

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
        the others follow it in order.

        Each comes with its crawl done, as a thread that grew over weeks has them: else
        the crawler's sweep (crawl.py) queues all of them when a server starts, and a
        benchmark of 50,000 comments measured their crawling beside its own work."""
        depths: list[int] = []
        for index, (parent, *_) in enumerate(comments):
            if parent is not None and not 0 <= parent < index:
                raise ValueError(f"comment {index}: parent {parent} is not an earlier one")
            depths.append(1 if parent is None else depths[parent] + 1)
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
            await db.executemany(
                "INSERT INTO crawls (comment_id, post_id, ap_id, host, found_by, depth,"
                " status, rounds, next_attempt_at, created_at, finished_at)"
                " SELECT c.id, c.post_id, c.ap_id, coalesce(a.domain, ''), 'delivery', ?,"
                " 'done', 1, ?, ?, ? FROM comments c LEFT JOIN actors a ON a.id = c.actor_id"
                " WHERE c.id = ?",
                [(depth, now, now, now, first + index) for index, depth in enumerate(depths)],
            )
        return first

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
    # The rest of "replies processed in batches" (core.py). A shared transaction holds the one
    # write lock that accepting inbox POSTs also need (BatchWriter), so the replies of a
    # batch, drafted before it (responses.py), cost inside it one read for what they look
    # up (get_reply_context) and one executemany per table for what they write, not a
    # trip to aiosqlite's thread each. A row kept for later is written before the
    # transaction's next other write or read and before its commit, so the order of
    # writes holds (SharedTransaction says where a kept row that fails to write fails).

    # One INSERT per table, for a row written at once and a row kept for later alike
    # (proxied images: _INSERT_PROXIED, media.py).
    _INSERT_COMMENT = (
        "INSERT INTO comments (id, post_id, parent_id, ap_id, url, actor_id, author_name,"
        " author_url, author_email, content_html, summary, sensitive, visibility, status,"
        " source, published_at, received_at, held_reason) VALUES"
        " (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
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

        Its id is chosen by ``_kept_comment_id``."""
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
        comment_id = await self._kept_comment_id(shared, parent_id)
        self._later(shared, self._INSERT_COMMENT, (comment_id, *values[1:]), shown=True)
        return comment_id

    async def _kept_comment_id(self, shared: SharedTransaction, parent_id: int | None) -> int:
        """The id of a comment kept for later: the only place one is chosen. On SQLite
        the next rowid, as SQLite would choose it, read once and counted on from there
        until a write joins the transaction (which may insert a comment itself, and
        clears it); read before the transaction began, it is checked when the rows are
        written (``unchecked_comment_id``). PostgresStore takes them from its sequence."""
        if not shared.next_comment_id:
            row = await self._fetchone("SELECT coalesce(max(id), 0) + 1 FROM comments")
            shared.next_comment_id = int(row[0]) if row else 1
            if not shared.begun:  # read outside the transaction: checked when written
                shared.unchecked_comment_id = shared.next_comment_id
        comment_id = shared.next_comment_id
        shared.next_comment_id += 1
        return comment_id

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
