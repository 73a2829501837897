"""The webhook queue (notify.py): one notification per event of a comment."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

from fediblog.models import NotificationJob, NotificationState, format_ts, utcnow
from fediblog.store.core import StoreCore, _outcome_rows, _record
from fediblog.worker import Outcome


class NotificationStorage(StoreCore):
    """The webhook queue."""

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
        rows = await self._claim("notifications", "id, payload, attempts", now, lease_until, limit)
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
