"""Outgoing activities and their deliveries, one per inbox, and their hosts' health."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

import aiosqlite

from fediblog.models import (
    DeliveryJob,
    DeliveryState,
    HostDeliveries,
    OutgoingActivity,
    format_ts,
    parse_ts,
    utcnow,
)
from fediblog.store.core import StoreCore, _outcome_rows, _record, _returning
from fediblog.worker import Outcome

# What an Outcome does to a delivery's row, as _RECORD_INBOX (inbox.py) to an inbox row;
# the webhook queue's rows take the same states (notifications.py).
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


class DeliveryStorage(StoreCore):
    """Outgoing activities and their deliveries."""

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
                self._claim_sql(
                    "deliveries",
                    "id, inbox, attempts, activity_id",
                    # being sent: Retry leaves it alone (save_deliveries_due)
                    lease_also="leased_until",
                ),
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
            await self._write_one(_RECORD_DELIVERY, _outcome_rows(results), many=True)

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
