"""The inbox queue: activities received, kept until a worker processes them."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Sequence
from datetime import datetime

from fediblog.models import InboxItem, InboxJob, InboxState, format_ts, utcnow
from fediblog.store.core import StoreCore, _insert_rows, _outcome_rows, _record
from fediblog.worker import Outcome

_INSERT_INBOX = (
    "INSERT OR IGNORE INTO inbox (dedup_key, actor_ap_id, type, received_at) VALUES (?, ?, ?, ?)"
)
# Each new row's payload, found by its key. A duplicate's key finds the row kept before
# it, which has its payload already: the first of them is kept, as with its row.
_INSERT_PAYLOADS = (
    "INSERT OR IGNORE INTO inbox_payloads (id, payload) SELECT inbox.id, v.column2"
    " FROM (VALUES (?, ?)) AS v JOIN inbox ON inbox.dedup_key = v.column1"
)

# What an Outcome does to its row (worker.py): done, retry later, failed, or released
# (claimed, never run: due again, its attempt not counted).
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


class InboxStorage(StoreCore):
    """The inbox queue."""

    # ---- the inbox --------------------------------------------------------------

    async def save_inbox_items(self, items: Sequence[InboxItem]) -> None:
        """Durably store a batch of verified activities in one commit.

        One commit per batch is what lets the inbox take thousands of activities a
        second on SQLite; a duplicate (same activity id, or same body) is ignored.
        """
        await self.save_inbox_waiting(lambda: items)

    async def save_inbox_waiting(
        self,
        take: Callable[[], Sequence[InboxItem]],
        committed: Callable[[], bool] | None = None,
    ) -> None:
        """Store, in one commit, the activities ``take`` gives once the write begins. On
        SQLite ``take`` runs on the writer's thread once the write lock
        is held (it must be safe there): what arrived while another process held the
        lock rides in this commit instead of waiting for the next (inbox.BatchWriter).

        ``committed``, if given, is called on the writer's thread after the commit, and
        answers whether more is waiting: then the next commit follows on that thread at
        once, what ``take`` gives then in it, and so on (``_one_trip``), with no turn of
        the event loop between. PostgreSQL makes one commit and does not call it."""
        # Statements of many rows (_insert_rows), not an executemany: SQLite then inserts
        # them in a step each, during which the thread does not need the GIL. An
        # executemany takes the GIL back after each row, and while the event loop is busy
        # (a flood of POSTs) each of those waits up to the switch interval, 5 ms: a batch
        # of 135 rows held the write lock for ~1 s instead of ~8 ms (measured with a
        # busy loop beside it). Less than half the time of one statement over a JSON array
        # of the rows (json_each), which parsed each row's JSON again per column: 30 rows
        # and their commit, 1.17 -> 0.50 ms in SQLite alone.
        def insert(connection: sqlite3.Connection) -> None:
            items, now = take(), format_ts(utcnow())
            rows = [(i.dedup_key, i.actor, i.type, now) for i in items]
            _insert_rows(connection, _INSERT_INBOX, rows)
            _insert_rows(connection, _INSERT_PAYLOADS, [(i.dedup_key, i.payload) for i in items])

        await self._write_at_once(insert, committed)

    async def claim_inbox(self, now: datetime, lease_until: datetime, limit: int) -> list[InboxJob]:
        """Take due activities in arrival order, count an attempt, lease them."""
        if not await self._any_due("inbox", now, null_is_due=True):
            return []
        claimed = await self._write_one(
            self._claim_sql("inbox", "id, attempts", null_is_due=True),
            (format_ts(lease_until), format_ts(now), limit),
        )
        if not claimed:
            return []
        # Payloads never change once written: read outside the write, with no lock held.
        attempts = {row["id"]: row["attempts"] for row in claimed}
        rows = await self._fetchall(
            f"SELECT id, payload FROM inbox_payloads WHERE {self._ID_IN_LIST.format('id', '?')}",
            self._id_lists(list(attempts)),
        )
        payloads = {row["id"]: row["payload"] for row in rows}
        # Each row is written with its payload. One removed by hand (a shell without
        # foreign keys) comes back empty, and its row fails alone as not JSON: it must
        # not fail the claim, which would hold its whole batch back a lease at a time.
        return [
            InboxJob(row_id, payloads.get(row_id, ""), attempts[row_id])
            for row_id in sorted(attempts)  # RETURNING promises no order
        ]

    async def record_inbox(self, results: Sequence[tuple[InboxJob, Outcome]]) -> None:
        """Write what became of processed activities, in one commit."""
        if results:
            await self._write_one(_RECORD_INBOX, _outcome_rows(results), many=True)

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
