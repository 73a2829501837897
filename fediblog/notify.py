"""Telling the author about new responses: the webhook, and the private feed's token.

**The webhook.** With ``FEDIBLOG_NOTIFY_URL`` set, every new public or unlisted
response (delivered, crawled, or from the local form) queues one row, ``published``
or ``held`` for approval; its JSON body (``build_payload``) is made then and sent as
made. The common worker (worker.py) POSTs it with ``X-Fediblog-Signature: sha256=HEX``,
the HMAC-SHA256 of the exact body under ``FEDIBLOG_NOTIFY_SECRET``, through the
guarded transport (netguard.py): no private address unless
``FEDIBLOG_ALLOW_PRIVATE_ADDRESSES``, no redirect followed. Each row moves through:

    queued --2xx--> sent
    queued --5xx, 408, 429, network error, timeout--> queued again after a back-off
    queued --any other status (3xx, 4xx), an address refused--> failed (final)
    queued --after RETRY.max_attempts attempts--> dead

The body carries ntfy's and Gotify's fields (``topic`` with ``FEDIBLOG_NOTIFY_TOPIC``,
``title``, ``message``, ``click``, ``extras``), Slack-style chat hooks' ``text``, and
the same facts structured (``event``, ``post``, ``response``) for a receiver of one's own.

**The private feed.** ``/feeds/responses/{token}.atom`` lists new and held responses
under every post; its token is kept in the meta table, made by ``feed_token`` on first
use and replaced by ``rotate_feed_token`` (the old URL then answers 404).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import secrets
from collections.abc import Callable
from datetime import datetime, timedelta

import httpx

from fediblog.activitystreams import Urls
from fediblog.config import Settings
from fediblog.errors import BlockedAddress, FediblogError, StorageError
from fediblog.models import JsonObject, NotificationJob, ResponseEntry, format_ts, utcnow
from fediblog.netguard import deadline
from fediblog.render import excerpt
from fediblog.store import Store
from fediblog.worker import Outcome, RetryPolicy, TableQueue, ThrottledLog, Worker, describe

log = logging.getLogger("fediblog.notify")

SIGNATURE_HEADER = "X-Fediblog-Signature"
FEED_META_KEY = "responses_feed_token"
# 7 attempts over about ten hours: a phone's push server that is down for an evening
# still gets the news, and nobody is told of a comment a day late.
RETRY = RetryPolicy(tuple(timedelta(minutes=m) for m in (1, 5, 15, 60, 180, 360)))
EXCERPT_LENGTH = 280
SHOWN = ("public", "unlisted")  # followers-only and direct replies are never shown, nor sent


def sign(secret: str, body: bytes) -> str:
    """The signature header's value: ``sha256=`` and the hex HMAC-SHA256 of ``body``."""
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def permalink(urls: Urls, slug: str, comment_id: int) -> str:
    """A response's stable address: it redirects to the page and anchor that show it."""
    return urls.response_url(slug, comment_id)


def event_of(entry: ResponseEntry) -> str:
    return "response.held" if entry.comment.status == "pending" else "response.published"


def build_payload(settings: Settings, entry: ResponseEntry) -> JsonObject:
    """The JSON body of one notification (documented in README.md)."""
    urls = Urls.of(settings)
    comment = entry.comment
    held = comment.status == "pending"
    link = permalink(urls, entry.post_slug, comment.id)
    author = comment.author
    who = author.name or author.handle or "Someone"
    if author.handle and author.handle != who:
        who = f"{who} ({author.handle})"
    title = f"{'Held for approval' if held else 'New response'}: “{entry.post_title}”"
    text = excerpt(comment.content_html, EXCERPT_LENGTH)
    message = f"{who}: {text}"
    if held:
        message += f"\nApprove it with: fediblog comments approve {comment.id}"
    payload: JsonObject = {"topic": settings.notify_topic} if settings.notify_topic else {}
    payload.update(
        {
            "title": title,
            "message": message,
            "click": link,
            "extras": {"client::notification": {"click": {"url": link}}},  # Gotify
            "text": f"{title}\n{message}\n{link}",
            "event": "response.held" if held else "response.published",
            "blog": settings.base_url,
            "post": {
                "title": entry.post_title,
                "url": urls.post_url(entry.post_slug),
                "id": urls.object_id(entry.post_uid),
            },
            "response": {
                "id": comment.id,
                "status": "held" if held else "published",
                "source": comment.source,
                "author": {
                    "name": author.name,
                    "handle": author.handle,
                    "url": author.profile_url,
                },
                "excerpt": text,
                "permalink": link,
                "original": comment.url or comment.ap_id,
                "in_reply_to": (
                    permalink(urls, entry.post_slug, comment.parent_id)
                    if comment.parent_id is not None
                    else None
                ),
                "published": format_ts(comment.published),
            },
        }
    )
    return payload



class Notifier:
    """Queues and sends the webhook's notifications (nothing at all without a URL)."""

    def __init__(
        self,
        settings: Settings,
        store: Store,
        client: httpx.AsyncClient,
        *,
        timeout: float = 10.0,
        clock: Callable[[], datetime] = utcnow,
    ) -> None:
        self._settings = settings
        self._store = store
        self._client = client
        self._timeout = timeout
        self._trouble = ThrottledLog(log)
        self.worker = Worker(
            "notify",
            TableQueue(store.claim_notifications, store.record_notifications),
            self._attempt,
            concurrency=4,
            batch=16,
            lease=timedelta(seconds=timeout + 10),
            # Rows queued by this process wake it; a poll finds those another process
            # (the CLI) queued, and costs a write transaction, so not every second.
            poll_seconds=5.0,
            clock=clock,
        )

    @property
    def enabled(self) -> bool:
        return bool(self._settings.notify_url)

    async def response_saved(self, comment_id: int, crawled: bool = False) -> None:
        """A response was just saved: queue its notification if the author wants them.

        The response is already safe; a database too busy to queue its notification
        costs only the notification (one log line), never the response or the
        request that brought it.
        """
        if not self.enabled:
            return
        try:
            entry = await self._store.get_response_entry(comment_id)
            if entry is None or entry.comment.visibility not in SHOWN:
                return
            if entry.comment.status not in ("published", "pending"):
                return
            body = json.dumps(build_payload(self._settings, entry), ensure_ascii=False)
            if await self._store.save_notification(comment_id, event_of(entry), body):
                self.worker.wake()
        except StorageError as error:
            self._trouble.error("queue", f"notify: response {comment_id} not notified: {error}")

    async def run_once(self) -> int:
        """Send every notification due now; return how many were attempted."""
        return await self.worker.run_once()

    async def run(self) -> None:
        await self.worker.run_forever()

    async def _attempt(self, job: NotificationJob) -> Outcome:
        now = self.worker.clock()
        headers = {
            "Content-Type": "application/json",
            SIGNATURE_HEADER: sign(self._settings.notify_secret, job.payload),
        }
        try:
            # One deadline for the whole exchange, as for deliveries; the answer's body
            # is never read, so a receiver cannot make us hold a large one.
            with deadline(self._timeout):
                async with self._client.stream(
                    "POST",
                    self._settings.notify_url,
                    content=job.payload,
                    headers=headers,
                    timeout=self._timeout,
                ) as response:
                    status = response.status_code
        except BlockedAddress as error:
            return Outcome.failed(describe(error))
        except httpx.InvalidURL as error:
            return Outcome.failed(describe(error))
        except (httpx.HTTPError, OSError, FediblogError) as error:
            return RETRY.after_error(job, describe(error)[:300], now, transient=True)
        if 200 <= status < 300:
            return Outcome.done()
        if status >= 500 or status in (408, 429):
            return RETRY.after_error(job, f"HTTP {status}", now, transient=True)
        if 300 <= status < 400:
            return Outcome.failed(f"HTTP {status} (redirects are not followed)")
        return Outcome.failed(f"HTTP {status}")


# ---- the private feed's token -------------------------------------------------------


def private_feed_path(token: str) -> str:
    return f"/feeds/responses/{token}.atom"


def _new_token() -> str:
    return secrets.token_urlsafe(24)


async def feed_token(store: Store) -> str:
    """The private feed's token, made on first use."""
    found = await store.get_meta_value(FEED_META_KEY)
    if found is not None:
        return found
    return await store.save_meta_value_once(FEED_META_KEY, _new_token())


async def rotate_feed_token(store: Store) -> str:
    """A new token: the old feed URL answers 404 from now on."""
    token = _new_token()
    await store.save_meta_value(FEED_META_KEY, token)
    return token
