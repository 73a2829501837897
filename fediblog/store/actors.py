"""Remote actors, their keys, and blocks."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from datetime import datetime

from fediblog.models import ActorKey, CachedActor, format_ts, parse_ts, utcnow
from fediblog.store.core import StoreCore, _marks, _record, _returning


def _chunks(values: Sequence[str], size: int = 500) -> Iterator[list[str]]:
    unique = list(dict.fromkeys(values))
    for start in range(0, len(unique), size):
        yield unique[start : start + size]


class ActorStorage(StoreCore):
    """Remote actors, their keys, and blocks."""

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

    async def list_blocks(self) -> list[tuple[str, str]]:
        rows = await self._fetchall("SELECT target, kind FROM blocks ORDER BY id")
        return [(row["target"], row["kind"]) for row in rows]

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
