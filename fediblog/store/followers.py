"""The blog's followers, as the federation and the author's desk see them."""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from datetime import datetime

from fediblog.models import Follower, format_ts, parse_ts, utcnow
from fediblog.store.core import StoreCore


class FollowerStorage(StoreCore):
    """The blog's followers."""

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

    # ---- the author's desk: write -------------------------------------------

    async def count_follower_inboxes(self) -> tuple[int, int]:
        """(accepted followers, the distinct inboxes a post's activity is queued for:
        what ``_publish`` queues, one delivery per server's shared inbox)."""
        row = await self._fetchone(
            "SELECT count(*) AS followers, count(DISTINCT coalesce(shared_inbox, inbox))"
            " AS inboxes FROM followers WHERE status = 'accepted'"
        )
        return (int(row["followers"]), int(row["inboxes"])) if row else (0, 0)

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

    # Seeding for the benchmarks (tests/bench), as save_seed_comments (comments.py): one
    # transaction and one executemany, not one commit per row.
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
