"""The media store (images imported into posts) and the media proxy (remote images)."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable, Sequence
from datetime import datetime

from fediblog.models import (
    CommentContent,
    MediaImage,
    OutgoingActivity,
    ProxiedMedia,
    format_ts,
    utcnow,
)
from fediblog.store.core import _record
from fediblog.store.deliveries import DeliveryStorage

PROXY_PATH = "/proxy/"  # where the media proxy serves remote images (web/proxy.py)


def _media(row: sqlite3.Row) -> MediaImage:
    sizes = (part.split("x") for part in str(row["variants"]).split())
    return MediaImage(
        hash=row["hash"], ext=row["ext"], variants=tuple((int(w), int(h)) for w, h in sizes)
    )


class MediaStorage(DeliveryStorage):
    """The media store and the media proxy."""

    # ---- the media store --------------------------------------------------

    async def save_media(self, image: MediaImage, size: int) -> None:
        """Catalogue an imported image (its files are already on disk); idempotent."""
        variants = " ".join(f"{w}x{h}" for w, h in image.variants)
        async with self._transaction(shown=False) as db:
            await db.execute(
                "INSERT INTO media (hash, ext, variants, bytes, created_at)"
                " VALUES (?, ?, ?, ?, ?) ON CONFLICT DO NOTHING",
                (image.hash, image.ext, variants, size, format_ts(utcnow())),
            )

    async def get_media(self, digest: str) -> MediaImage | None:
        row = await self._fetchone(
            "SELECT hash, ext, variants FROM media WHERE hash = ?", (digest,)
        )
        return _media(row) if row else None

    async def list_media(self) -> list[tuple[MediaImage, int]]:
        """Every catalogued image with the bytes its files take, oldest first."""
        rows = await self._fetchall(
            "SELECT hash, ext, variants, bytes FROM media ORDER BY created_at, hash"
        )
        return [(_media(row), int(row["bytes"])) for row in rows]

    async def list_media_references(self) -> list[tuple[str, str]]:
        """(slug, text that may name /media/ files) for every post not deleted, drafts too."""
        rows = await self._fetchall(
            "SELECT slug, body_html || ' ' || coalesce(image, '') AS text FROM posts"
            " WHERE deleted_at IS NULL ORDER BY id"
        )
        return [(str(row["slug"]), str(row["text"])) for row in rows]

    async def delete_media(self, digests: Iterable[str]) -> None:
        async with self._transaction(shown=False) as db:
            await db.executemany("DELETE FROM media WHERE hash = ?", [(d,) for d in digests])

    async def save_face(
        self, remembered: dict[str, str | None], activity: OutgoingActivity
    ) -> None:
        """Remember the blog's avatar and header (``face:ROLE`` → hash in meta) and queue
        the actor's Update to every follower, together: a restart does not send it again."""
        async with self._transaction() as db:
            for role, digest in remembered.items():
                if digest is None:
                    await db.execute("DELETE FROM meta WHERE key = ?", (f"face:{role}",))
                else:
                    await db.execute(
                        "INSERT INTO meta (key, value) VALUES (?, ?)"
                        " ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                        (f"face:{role}", digest),
                    )
            await self._publish(db, activity, None)

    # ---- the media proxy ----------------------------------------------------
    # Bookkeeping no page shows (shown=False): a fetched image changes no page's HTML.

    async def save_proxied(self, rows: Sequence[tuple[str, str, str, str]]) -> None:
        """Remember remote images behind the proxy: (key, url, host, kind); known ones stay."""
        if rows:
            async with self._transaction(shown=False) as db:
                # Its INSERT and values are a reply's kept for later too (save_proxied_later).
                await db.executemany(self._INSERT_PROXIED, self._proxied_rows(rows, utcnow()))

    async def get_proxied(self, key: str) -> ProxiedMedia | None:
        row = await self._fetchone(
            "SELECT key, url, host, kind, status, content_type, size, error, fetched_at,"
            " used_at FROM proxy_media WHERE key = ?",
            (key,),
        )
        return _record(ProxiedMedia, row) if row else None

    async def record_proxied_fetch(
        self, key: str, *, content_type: str | None, size: int, error: str | None
    ) -> None:
        """A fetch ended: cached (a content type) or failed (an error), as of now."""
        now = format_ts(utcnow())
        async with self._transaction(shown=False) as db:
            await db.execute(
                "UPDATE proxy_media SET status = ?, content_type = ?, size = ?, error = ?,"
                " fetched_at = ?, used_at = ? WHERE key = ?",
                ("failed" if error else "cached", content_type, size, error, now, now, key),
            )

    async def mark_proxied_used(self, key: str, when: datetime) -> None:
        async with self._transaction(shown=False) as db:
            await db.execute(
                "UPDATE proxy_media SET used_at = ? WHERE key = ?", (format_ts(when), key)
            )

    async def prune_proxied(self, max_bytes: int) -> list[str]:
        """Forget the least recently used cached images past ``max_bytes`` in all (they
        are fetched again if asked for); return their keys, whose files can go."""
        async with self._transaction(shown=False) as db:
            rows = await db.execute_fetchall(
                "SELECT key FROM (SELECT key, sum(size) OVER (ORDER BY used_at DESC, key)"
                " AS total FROM proxy_media WHERE status = 'cached') AS ranked WHERE total > ?",
                (max_bytes,),
            )
            keys = [str(row["key"]) for row in rows]
            await db.executemany(
                "UPDATE proxy_media SET status = 'new', size = 0, content_type = NULL"
                " WHERE key = ?",
                [(key,) for key in keys],
            )
        return keys

    async def count_proxied_bytes(self) -> int:
        row = await self._fetchone(
            "SELECT coalesce(sum(size), 0) AS n FROM proxy_media WHERE status = 'cached'"
        )
        return int(row["n"]) if row else 0

    async def list_unproxied_icons(self, limit: int = 1000) -> list[str]:
        """Commenters' avatars not behind the proxy yet (saved before it, or changed)."""
        rows = await self._fetchall(
            "SELECT DISTINCT a.icon_url FROM actors a WHERE a.icon_url IS NOT NULL"
            " AND NOT EXISTS (SELECT 1 FROM proxy_media m WHERE m.url = a.icon_url) LIMIT ?",
            (limit,),
        )
        return [str(row["icon_url"]) for row in rows]

    async def list_comments_with_remote_images(self, limit: int = 500) -> list[CommentContent]:
        """Comments saved before the proxy whose HTML still loads images from elsewhere."""
        rows = await self._fetchall(
            "SELECT id, content_html FROM comments WHERE content_html LIKE '%<img %src=\"http%'"
            " ORDER BY id LIMIT ?",
            (limit,),
        )
        return [CommentContent(id=row["id"], content_html=row["content_html"]) for row in rows]

    async def save_comment_images(self, changed: Sequence[tuple[int, str]]) -> None:
        """Comments' HTML with their images pointed at the proxy: (id, html)."""
        if changed:
            async with self._transaction() as db:
                await db.executemany(
                    "UPDATE comments SET content_html = ? WHERE id = ?",
                    [(html_text, comment_id) for comment_id, html_text in changed],
                )

    # Its INSERT, for a row written at once and a row kept for later alike.
    _INSERT_PROXIED = (
        "INSERT INTO proxy_media (key, url, host, kind, created_at)"
        " VALUES (?, ?, ?, ?, ?) ON CONFLICT DO NOTHING"
    )

    @staticmethod
    def _proxied_rows(
        rows: Iterable[tuple[str, str, str, str]], now: datetime
    ) -> list[tuple[str, str, str, str, str]]:
        """The values of ``_INSERT_PROXIED`` for (key, url, host, kind) rows."""
        created = format_ts(now)
        return [(*row, created) for row in rows]

    async def save_proxied_later(self, rows: Sequence[tuple[str, str, str, str]]) -> None:
        """``save_proxied``; in a shared transaction, kept for one executemany."""
        shared = self._shared_here()
        if shared is None:
            await self.save_proxied(rows)
            return
        for row in self._proxied_rows(rows, utcnow()):
            self._later(shared, self._INSERT_PROXIED, row, shown=False)
