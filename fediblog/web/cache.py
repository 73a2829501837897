"""Rendered pages kept in memory, and HTTP conditional responses for them.

A page is rendered once per database version (see ``Store.version``) and then
served from memory, gzipped ahead of time, with a strong ETag and Last-Modified,
so a busy post page costs a dictionary lookup, and a revisit costs a 304.

Last-Modified is the moment these exact bytes were first rendered: a re-render
that produces the same page keeps it, and any change at all (a held comment
approved, a deletion) moves it, which timestamps in the data could not promise.
"""

from __future__ import annotations

import gzip
import hashlib
import time
from collections import OrderedDict
from dataclasses import dataclass, replace
from datetime import datetime
from email.utils import format_datetime, parsedate_to_datetime

from starlette.requests import Request
from starlette.responses import Response

from fediblog.models import utcnow

GZIP_MIN_BYTES = 1_024


@dataclass(frozen=True, slots=True)
class CachedPage:
    body: bytes
    gzipped: bytes | None
    etag: str
    last_modified: datetime
    media_type: str
    vary: str = "Accept-Encoding"
    cache_control: str = "public, no-cache"

    @classmethod
    def build(
        cls,
        body: bytes,
        *,
        media_type: str,
        vary: str = "Accept-Encoding",
        cache_control: str = "public, no-cache",
    ) -> CachedPage:
        gzipped = gzip.compress(body, 6, mtime=0) if len(body) >= GZIP_MIN_BYTES else None
        etag = '"' + hashlib.blake2b(body, digest_size=12).hexdigest() + '"'
        return cls(body, gzipped, etag, utcnow(), media_type, vary, cache_control)


class PageCache:
    """A bounded LRU of pages, each valid for one database version.

    ``get(…, max_stale=s)`` may still serve a page rendered less than ``s`` seconds
    ago after the data changed: under a flood of replies a hot page is then rendered
    at most once every ``s`` seconds instead of once per reply. Changes made by another
    process are noticed that late anyway (``Store.version_max_age``).
    """

    def __init__(self, max_entries: int = 1_024) -> None:
        self._entries: OrderedDict[str, tuple[object, float, CachedPage]] = OrderedDict()
        self._max = max_entries

    def get(self, key: str, version: object, max_stale: float = 0.0) -> CachedPage | None:
        entry = self._entries.get(key)
        if entry is None:
            return None
        if entry[0] != version and time.monotonic() - entry[1] >= max_stale:
            return None
        self._entries.move_to_end(key)
        return entry[2]

    def put(self, key: str, version: object, page: CachedPage) -> CachedPage:
        """Store a page; if the bytes did not change, keep the old Last-Modified."""
        previous = self._entries.get(key)
        if previous is not None and previous[2].etag == page.etag:
            page = replace(page, last_modified=previous[2].last_modified)
        self._entries[key] = (version, time.monotonic(), page)
        self._entries.move_to_end(key)
        while len(self._entries) > self._max:
            self._entries.popitem(last=False)
        return page

    def clear(self) -> None:
        self._entries.clear()


def _accepts_gzip(header: str) -> bool:
    for part in header.split(","):
        coding, _, params = part.strip().partition(";")
        if coding.strip().lower() in ("gzip", "*"):
            quality = params.strip().lower().removeprefix("q=")
            return not params or quality not in ("0", "0.0", "0.00", "0.000")
    return False


def _not_modified(request: Request, page: CachedPage, etag: str) -> bool:
    if_none_match = request.headers.get("if-none-match")
    if if_none_match is not None:
        # Weak comparison (RFC 9110 13.1.2): a W/ prefix does not matter for GET.
        tags = {tag.strip().removeprefix("W/") for tag in if_none_match.split(",")}
        return "*" in tags or etag in tags
    since = request.headers.get("if-modified-since")
    if since is not None:
        try:
            return page.last_modified <= parsedate_to_datetime(since)
        except (TypeError, ValueError):
            return False
    return False


def respond(request: Request, page: CachedPage, status_code: int = 200) -> Response:
    """Serve a cached page: 304 when the client has it, gzip when it takes it.

    The gzipped bytes are another representation, so they carry their own ETag.
    """
    body = page.body
    headers = {
        "ETag": page.etag,
        "Last-Modified": format_datetime(page.last_modified, usegmt=True),
        "Cache-Control": page.cache_control,
        "Vary": page.vary,
    }
    if page.gzipped is not None and _accepts_gzip(request.headers.get("accept-encoding", "")):
        body = page.gzipped
        headers["Content-Encoding"] = "gzip"
        headers["ETag"] = page.etag[:-1] + '-gzip"'
    if status_code == 200 and _not_modified(request, page, headers["ETag"]):
        headers.pop("Content-Encoding", None)
        return Response(status_code=304, headers=headers)
    return Response(body, status_code=status_code, headers=headers, media_type=page.media_type)
