"""The media proxy: remote images readers see, fetched by the blog, never by readers.

A comment's avatar, custom emoji and image attachments live on the commenter's server.
Loaded from there, every page view tells that server who reads what, and a hostile
one can point readers' browsers at addresses of their own networks
(``https://10.0.0.1/``). So each such image is shown as ``/proxy/{key}``, where the key
is an HMAC of its URL under a secret of this blog (``proxy_secret`` in the meta table):
only URLs that came into stored comments or profiles have a key, and nobody can make
one for a URL of their choosing. The page's Content-Security-Policy then allows
``img-src 'self'`` only.

A key's image is fetched once (requests for it share that fetch), through the guarded
transport: public addresses only, https only unless ``allow_http``, every redirect
re-checked, one total deadline, a size cap counted while streaming. Only JPEG, PNG,
GIF, WebP and AVIF are kept, by Content-Type and by magic bytes both; SVG, which can
carry script, never is. The bytes are kept in a folder beside the database, bounded in
total (least recently used first out). A fetch that fails is remembered for
``FAILURE_TTL`` and answered with a placeholder (ours) meanwhile, so a page view never
makes a burst of fetches; at most ``max_fetches`` run at once.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import hmac
import html
import logging
import re
import secrets
from collections.abc import Iterable
from dataclasses import dataclass, replace
from datetime import timedelta
from importlib.resources import files
from pathlib import Path

import anyio
import httpx

from fediblog.errors import (
    BadDocument,
    FetchBusy,
    FetchError,
)
from fediblog.media import atomic_write
from fediblog.models import utcnow
from fediblog.remote import Fetcher, FetchPolicy
from fediblog.store import PROXY_PATH, Store

log = logging.getLogger("fediblog.proxy")

MAX_IMAGE_BYTES = 5_000_000
MAX_FETCHES = 8  # images fetched at once; past that, a placeholder for now
FETCH_TIMEOUT = 10.0  # seconds for a whole fetch, redirects included
FAILURE_TTL = timedelta(hours=1)  # a failed image is not fetched again for this long
IMAGE_MAX_AGE = 7 * 86400  # browsers' cache time for an image ...
PLACEHOLDER_MAX_AGE = 300  # ... and for a placeholder
USED_EVERY = timedelta(hours=1)  # how often "last used" is written for the LRU
KEY_LENGTH = 32  # hex digits of the HMAC kept in URLs: 128 bits
KEY_PATTERN = re.compile(rf"[0-9a-f]{{{KEY_LENGTH}}}")
SECRET_META_KEY = "proxy_secret"  # noqa: S105 - the name of a meta row, not a secret

IMAGE_TYPES = ("image/jpeg", "image/png", "image/gif", "image/webp", "image/avif")
ACCEPT = ", ".join(IMAGE_TYPES)
# A 1x1 transparent GIF: what a broken emoji or attachment shows.
BLANK_GIF = bytes.fromhex(
    "47494638396101000100800000000000ffffff21f90401000000002c00000000010001000002024401003b"
)
# An <img> whose src is a remote URL, in HTML we sanitized (attribute values quoted).
_IMG_SRC = re.compile(r'(<img\b[^>]*?\ssrc=")(https?://[^"]*)(")')


class NotAnImage(BadDocument):
    """The answer is not one of the image types the proxy keeps."""


@dataclass(frozen=True, slots=True)
class ProxiedImage:
    """What ``/proxy/{key}`` answers: the image, or a placeholder, and its cache time."""

    body: bytes
    content_type: str
    max_age: int
    placeholder: bool = False


def sniff_image(body: bytes) -> str | None:
    """The image type the bytes begin with, if one the proxy keeps (never SVG)."""
    if body.startswith(b"\xff\xd8\xff"):
        return "image/jpeg"
    if body.startswith(b"\x89PNG\r\n\x1a\n"):
        return "image/png"
    if body.startswith((b"GIF87a", b"GIF89a")):
        return "image/gif"
    if body[:4] == b"RIFF" and body[8:12] == b"WEBP":
        return "image/webp"
    if body[4:8] == b"ftyp":
        # ISO BMFF: the ftyp box lists the major brand, then compatible brands.
        size = int.from_bytes(body[:4], "big")
        brands = body[8 : min(size, 64)]
        if any(brands[i : i + 4] in (b"avif", b"avis") for i in range(0, len(brands) - 3, 4)):
            return "image/avif"
    return None


def proxy_key(secret: bytes, url: str) -> str:
    return hmac.new(secret, url.encode(), hashlib.sha256).hexdigest()[:KEY_LENGTH]


class MediaProxy:
    """Keys for remote images, and the images themselves, fetched once and kept."""

    def __init__(
        self,
        store: Store,
        client: httpx.AsyncClient,
        policy: FetchPolicy,
        directory: Path,
        secret: bytes,
        *,
        cache_bytes: int = 500_000_000,
        max_bytes: int = MAX_IMAGE_BYTES,
        max_fetches: int = MAX_FETCHES,
        timeout: float = FETCH_TIMEOUT,
        user_agent: str = "fediblog/0.1",
    ) -> None:
        self._store = store
        self._client = client
        self._user_agent = user_agent
        # Unsigned GETs of images through remote.py's one guarded path, with the caps
        # of an image: its own size cap and deadline.
        self._policy = replace(policy, max_bytes=max_bytes, total_timeout=timeout)
        self._fetcher = Fetcher(client, self._policy, user_agent=user_agent)
        self._directory = directory
        self._secret = secret
        self.cache_bytes = cache_bytes
        self._slots = asyncio.Semaphore(max_fetches)
        self._fetching: dict[str, asyncio.Task[ProxiedImage]] = {}
        avatar = files("fediblog") / "static" / "avatar.svg"
        self._avatar = ProxiedImage(
            avatar.read_bytes(), "image/svg+xml", PLACEHOLDER_MAX_AGE, placeholder=True
        )
        self._blank = ProxiedImage(BLANK_GIF, "image/gif", PLACEHOLDER_MAX_AGE, placeholder=True)

    @property
    def max_bytes(self) -> int:
        """The largest image fetched, counted while it streams."""
        return self._policy.max_bytes

    @max_bytes.setter
    def max_bytes(self, value: int) -> None:
        self._limit(replace(self._policy, max_bytes=value))

    @property
    def timeout(self) -> float:
        """One deadline for a whole fetch, redirects included."""
        return self._policy.total_timeout

    @timeout.setter
    def timeout(self, value: float) -> None:
        self._limit(replace(self._policy, total_timeout=value))

    def _limit(self, policy: FetchPolicy) -> None:
        self._policy = policy
        self._fetcher = Fetcher(self._client, policy, user_agent=self._user_agent)

    @classmethod
    async def open(
        cls,
        store: Store,
        client: httpx.AsyncClient,
        policy: FetchPolicy,
        directory: Path,
        *,
        cache_bytes: int,
        user_agent: str,
    ) -> MediaProxy:
        """A proxy with this blog's secret (made by the migration) and its folder."""
        secret = await store.get_meta_value(SECRET_META_KEY)
        if secret is None:  # a database restored without its meta row: make a new one
            secret = await store.save_meta_value_once(SECRET_META_KEY, secrets.token_hex(32))
        await anyio.Path(directory).mkdir(parents=True, exist_ok=True)
        return cls(
            store,
            client,
            policy,
            directory,
            secret.encode(),
            cache_bytes=cache_bytes,
            user_agent=user_agent,
        )

    async def aclose(self) -> None:
        """Cancel the fetches under way: at shutdown only."""
        for task in list(self._fetching.values()):
            task.cancel()
        await asyncio.gather(*self._fetching.values(), return_exceptions=True)
        await self._fetcher.aclose()

    # ---- making proxied URLs -------------------------------------------------------

    def local_url(self, url: str) -> str:
        """``/proxy/{key}`` for ``url``: pure; ``register`` makes the key answer."""
        return PROXY_PATH + proxy_key(self._secret, url)

    async def register(self, urls: Iterable[str], kind: str = "image") -> None:
        """Let these remote URLs be served by the proxy (known ones stay as they are)."""
        await self._store.save_proxied(self.rows(urls, kind))

    def rows(self, urls: Iterable[str], kind: str = "image") -> list[tuple[str, str, str, str]]:
        """What ``register`` stores for these URLs, without storing it: (key, url, host,
        kind) each (``Store.save_proxied``); pure, so it may run outside a transaction."""
        rows = []
        for url in dict.fromkeys(urls):
            try:
                host = httpx.URL(url).host if url.startswith(("https://", "http://")) else ""
            except (httpx.InvalidURL, ValueError):  # e.g. a host IDNA refuses: not served
                continue
            if host:
                rows.append((proxy_key(self._secret, url), url, host, kind))
        return rows

    async def rewrite_html(self, fragment: str) -> str:
        """``fragment`` (HTML we sanitized) with every remote <img src> proxied."""
        rewritten, found = self.rewrite(fragment)
        await self.register(found)
        return rewritten

    def rewrite(self, fragment: str) -> tuple[str, list[str]]:
        """``rewrite_html`` without registering: the rewritten fragment and the remote
        URLs it now shows through the proxy (to ``register`` once it is stored)."""
        found: list[str] = []

        def local(match: re.Match[str]) -> str:
            url = html.unescape(match[2])
            found.append(url)
            return match[1] + html.escape(self.local_url(url)) + match[3]

        return _IMG_SRC.sub(local, fragment), found

    async def sweep(self) -> int:
        """Put what was stored before the proxy behind it: commenters' avatars (and any
        changed since) and old comments' images. Returns how many things changed."""
        icons = await self._store.list_unproxied_icons()
        await self.register(icons, kind="avatar")
        changed = []
        for row in await self._store.list_comments_with_remote_images():
            changed.append((row.id, await self.rewrite_html(row.content_html)))
        await self._store.save_comment_images(changed)
        return len(icons) + len(changed)

    # ---- serving -------------------------------------------------------------------

    async def serve(self, key: str) -> ProxiedImage | None:
        """The image behind ``key`` (fetched now if need be), a placeholder if it cannot
        be had, or None if no such key was ever made."""
        if not KEY_PATTERN.fullmatch(key):
            return None
        row = await self._store.get_proxied(key)
        if row is None:
            return None
        placeholder = self._avatar if row.kind == "avatar" else self._blank
        now = utcnow()
        if row.status == "cached" and row.content_type is not None:  # set when cached
            body = await self._read(key)
            if body is not None:
                if row.used is None or now - row.used > USED_EVERY:
                    await self._store.mark_proxied_used(key, now)
                return ProxiedImage(body, row.content_type, IMAGE_MAX_AGE)
        elif row.status == "failed" and row.fetched is not None and now - row.fetched < FAILURE_TTL:
            return placeholder
        task = self._fetching.get(key)
        if task is None:
            task = asyncio.create_task(self._fetch_and_keep(key, row.url))
            self._fetching[key] = task
            task.add_done_callback(functools.partial(self._fetched, key))
        try:
            # Shielded: a reader who goes away leaves the fetch to the others waiting.
            return await asyncio.shield(task)
        except FetchBusy:
            return ProxiedImage(placeholder.body, placeholder.content_type, 0, placeholder=True)
        except FetchError:
            return placeholder

    def _fetched(self, key: str, task: asyncio.Task[ProxiedImage]) -> None:
        del self._fetching[key]
        if not task.cancelled():
            task.exception()  # retrieved: every reader waiting on it may have gone

    async def _read(self, key: str) -> bytes | None:
        try:
            return await anyio.Path(self._directory / key).read_bytes()
        except OSError:
            return None  # pruned, or the folder was cleared: fetched again

    async def _fetch_and_keep(self, key: str, url: str) -> ProxiedImage:
        try:
            with anyio.fail_after(self.timeout):
                await self._slots.acquire()
        except TimeoutError:
            raise FetchBusy("too many images are being fetched") from None
        try:
            try:
                content_type, body = await self._fetch(url)
            except FetchBusy:
                raise
            except FetchError as error:
                log.info("cannot proxy %s: %s", url, error)
                await self._store.record_proxied_fetch(
                    key, content_type=None, size=0, error=str(error)[:200]
                )
                raise
            try:
                await asyncio.to_thread(atomic_write, self._directory / key, body)
            except OSError as error:  # a full disk: remembered, so no page view refetches
                await self._store.record_proxied_fetch(
                    key, content_type=None, size=0, error=f"cannot store it: {error}"[:200]
                )
                raise FetchError("the image cannot be stored now") from error
            await self._store.record_proxied_fetch(
                key, content_type=content_type, size=len(body), error=None
            )
        finally:
            self._slots.release()
        await self.prune()
        return ProxiedImage(body, content_type, IMAGE_MAX_AGE)

    async def prune(self) -> int:
        """Keep the cached bytes under ``cache_bytes``: the least recently used go."""
        keys = await self._store.prune_proxied(self.cache_bytes)
        for key in keys:
            await anyio.Path(self._directory / key).unlink(missing_ok=True)
        return len(keys)

    # ---- one fetch ---------------------------------------------------------------------

    async def _fetch(self, url: str) -> tuple[str, bytes]:
        """(type, bytes) of the image at ``url``, or a FetchError saying why not."""
        return _check_image(await self._fetcher.fetch_bytes(url, ACCEPT, _image_type))


def _image_type(content_type: str) -> bool:
    return content_type.partition(";")[0].strip().lower() in IMAGE_TYPES


def _check_image(body: bytes) -> tuple[str, bytes]:
    found = sniff_image(body)
    if found is None:
        raise NotAnImage("its bytes are no image we keep")
    return found, body  # served as what the bytes are, whatever the label said
