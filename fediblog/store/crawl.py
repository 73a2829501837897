"""Crawling reply threads: the comments whose replies are read from their servers."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

from fediblog.models import CrawlJob, CrawlState, format_ts, parse_ts, utcnow
from fediblog.store.core import StoreCore, _record
from fediblog.worker import Outcome

# Crawls queued in one commit. During an inbox flood a worker's crawler had ~18,000 replies
# to queue at its next claim: one INSERT of them held the write lock ~55 ms, with every
# web process's group commit waiting; 1,000 held it 9-11 ms in the same flood.
CRAWLS_A_COMMIT = 1_000


class CrawlStorage(StoreCore):
    """Reply threads to crawl."""

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
        a comment already queued, or not worth crawling, is left alone. At most
        ``CRAWLS_A_COMMIT`` a commit."""
        for start in range(0, len(requests), CRAWLS_A_COMMIT):
            chunk = requests[start : start + CRAWLS_A_COMMIT]
            await self._write_all(self._crawl_inserts(chunk, now))

    def _crawl_inserts(
        self, requests: Sequence[tuple[int, str]], now: datetime
    ) -> list[tuple[str, dict[str, Any]]]:
        """The statements that queue ``requests``: one per way of finding them, each over
        the list of their comments' ids, not one per comment (a worker's batch of 500
        replies queues 500 crawls). A comment asked for twice keeps the first way."""
        ways: dict[str, list[int]] = {}
        for comment_id, found_by in requests:
            ways.setdefault(found_by, []).append(comment_id)
        sql = (
            self._NEW_CRAWL
            + f" WHERE {self._ID_IN_LIST.format('c.id', ':ids')} AND {self._CRAWLABLE}"
            " ORDER BY c.id ON CONFLICT DO NOTHING"
        )
        return [
            (sql, {"ids": self._id_lists(ids)[0], "found_by": found_by, "now": format_ts(now)})
            for found_by, ids in ways.items()
        ]

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
        attempt on each and lease it until ``lease_until``. The last ``CRAWLS_A_COMMIT``
        new ones are queued in the claim's commit, any before them in commits of their
        own."""
        if not new and not await self._any_due("crawls", now):
            return []
        before = max(0, len(new) - CRAWLS_A_COMMIT)
        await self.save_crawls(new[:before], now)
        new = new[before:]
        claim = self._claim_sql(
            "crawls",
            "id, comment_id, post_id, ap_id, host, found_by, depth, rounds, attempts,"
            " created_at,"
            " (SELECT p.published_at FROM posts p WHERE p.id = crawls.post_id) AS published,"
            " (SELECT p.deleted_at IS NOT NULL FROM posts p WHERE p.id = crawls.post_id)"
            " AS deleted",
        )
        # One transaction, on SQLite one trip: a transaction of a trip per statement held
        # the write lock across the turns of the worker's busy event loop (40-190 ms a
        # claim during an inbox flood, every web process's group commit waiting).
        rows = await self._write_all(
            [
                *self._crawl_inserts(new, now),
                (claim, (format_ts(lease_until), format_ts(now), limit)),
            ]
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
