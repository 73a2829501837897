"""Posts: their tags and old slugs, drafts, schedules and pinned posts, the archive."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable, Sequence
from datetime import datetime
from typing import Any

import aiosqlite

from fediblog.errors import DuplicateSlug, PostNotFound
from fediblog.models import (
    OutgoingActivity,
    Post,
    PostDraft,
    PostState,
    ScheduleJob,
    ScheduleState,
    format_ts,
    parse_ts,
)
from fediblog.store.core import _COUNTED, _outcome_rows, _record, _returning
from fediblog.store.deliveries import DeliveryStorage
from fediblog.worker import Outcome

_TAG_SEPARATOR = "\x1f"

# A post readers and servers may see: not deleted, and neither a draft nor scheduled.
_LIVE_POST = "p.deleted_at IS NULL AND p.state = 'published'"


def _post_columns(tags: str) -> str:
    """A post's columns; ``tags`` joins its tags with _TAG_SEPARATOR (per dialect)."""
    return f"""
    p.id, p.uid, p.slug, p.title, p.summary, p.body_md, p.body_html, p.image, p.image_alt,
    p.published_at, p.updated_at, p.state, p.pinned_at,
    (SELECT {tags} FROM post_tags t WHERE t.post_id = p.id) AS tags,
    (SELECT count(*) FROM comments c WHERE c.post_id = p.id AND {_COUNTED}) AS responses
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


class PostStorage(DeliveryStorage):
    """Posts, tags, old slugs, drafts, schedules, pinned posts and the archive."""

    # Differs between the dialects: overridden by PostgresStore.
    _POST_COLUMNS = _post_columns("group_concat(t.tag, char(31))")

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
        rows = await self._claim("post_schedule", "id, post_id, attempts", now, lease_until, limit)
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

    async def _save_image_alt(self, db: aiosqlite.Connection, post_id: int, alt: str) -> None:
        """The cover's alt text, written in the transaction that saves the post."""
        await db.execute("UPDATE posts SET image_alt = ? WHERE id = ?", (alt, post_id))

    # ---- the archive and neighbours -----------------------------------------

    # Months are UTC calendar months, as published_at is stored
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
