"""The author's desk: the account, its sign-in sessions and addresses; health and
metrics (web/health.py).
"""

from __future__ import annotations

from datetime import datetime

from fediblog.models import DeskSession, QueueStats, format_ts, parse_ts
from fediblog.store.core import StoreCore, _record


class DeskStorage(StoreCore):
    """The author's account, sessions and addresses; health and metrics."""

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
