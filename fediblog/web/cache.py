"""Rendered pages kept in memory, and HTTP conditional responses for them.

A page is rendered once per database version (see ``Store.version``) and then
served from memory, gzipped ahead of time, with a strong ETag and Last-Modified,
so a busy post page costs a dictionary lookup, and a revisit costs a 304.

Last-Modified is the moment these exact bytes were first rendered: a re-render
that produces the same page keeps it, and any change at all (a held comment
approved, a deletion) moves it, which timestamps in the data could not promise.

Each page carries its answers ready to send (``Representation``: identity and gzip,
the 200's headers and the 304's), built once when the page is stored, so serving it
builds no header and formats no date. ``answer`` picks one for a request's headers;
``respond`` (the routes) and the app's fast path for post pages (app.py) both use it,
so the two give the same bytes.
"""

from __future__ import annotations

import gzip
import hashlib
import time
from collections import OrderedDict
from dataclasses import dataclass, field, replace
from datetime import datetime
from email.utils import format_datetime, parsedate_to_datetime

from starlette.requests import Request
from starlette.responses import Response

from fediblog.models import utcnow

GZIP_MIN_BYTES = 1_024

RawHeaders = tuple[tuple[bytes, bytes], ...]
Answer = tuple[int, RawHeaders, bytes]  # status, headers, body


@dataclass(frozen=True, slots=True)
class Representation:
    """One encoding of a cached page as it goes on the wire."""

    etag: str
    body: bytes
    headers: RawHeaders  # of the 200, in the order starlette's Response gave them
    not_modified: RawHeaders  # of the 304: the same validators, no length, no type


@dataclass(frozen=True, slots=True)
class CachedPage:
    body: bytes
    gzipped: bytes | None
    etag: str
    last_modified: datetime
    media_type: str
    vary: str = "Accept-Encoding"
    cache_control: str = "public, no-cache"
    identity: Representation = field(init=False, repr=False, compare=False)
    gzip: Representation | None = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        # Built here, so ``replace`` (a new Last-Modified, PageCache.put) rebuilds them.
        common = (
            (b"last-modified", format_datetime(self.last_modified, usegmt=True).encode()),
            (b"cache-control", self.cache_control.encode()),
            (b"vary", self.vary.encode()),
        )
        content_type = self.media_type
        if content_type.startswith("text/") and "charset=" not in content_type.lower():
            content_type += "; charset=utf-8"

        def representation(etag: str, body: bytes, coding: RawHeaders) -> Representation:
            validators = ((b"etag", etag.encode()), *common)
            return Representation(
                etag,
                body,
                (
                    *validators,
                    *coding,
                    (b"content-length", str(len(body)).encode()),
                    (b"content-type", content_type.encode()),
                ),
                validators,
            )

        object.__setattr__(self, "identity", representation(self.etag, self.body, ()))
        gzipped = None
        if self.gzipped is not None:
            # Another representation, so it carries its own ETag.
            gzip_etag = self.etag[:-1] + '-gzip"'
            coding = ((b"content-encoding", b"gzip"),)
            gzipped = representation(gzip_etag, self.gzipped, coding)
        object.__setattr__(self, "gzip", gzipped)

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
    """Whether an Accept-Encoding header takes gzip (RFC 9110 12.5.3): named with a
    weight above 0, or not named and ``*`` is; a weight of 0 refuses it."""
    weights: dict[str, float] = {}
    for part in header.split(","):
        coding, *params = (piece.strip() for piece in part.split(";"))
        weight = 1.0
        for param in params:
            name, _, value = param.partition("=")
            if name.strip().lower() == "q":
                try:
                    weight = float(value.strip())
                except ValueError:
                    weight = 0.0  # a weight we cannot read: not a yes
        weights.setdefault(coding.lower(), weight)
    return weights.get("gzip", weights.get("*", 0.0)) > 0


def _not_modified(
    page: CachedPage, etag: str, if_none_match: str | None, if_modified_since: str | None
) -> bool:
    if if_none_match is not None:
        # Weak comparison (RFC 9110 13.1.2): a W/ prefix does not matter for GET.
        tags = {tag.strip().removeprefix("W/") for tag in if_none_match.split(",")}
        return "*" in tags or etag in tags
    if if_modified_since is not None:
        try:
            return page.last_modified <= parsedate_to_datetime(if_modified_since)
        except (TypeError, ValueError):
            return False
    return False


def answer(request: Request, page: CachedPage) -> Answer:
    """Status, headers and body of a cached page for this request: 304 when the client
    has it, gzip when it takes it."""
    headers = request.headers
    chosen = page.identity
    if page.gzip is not None and _accepts_gzip(headers.get("accept-encoding", "")):
        chosen = page.gzip
    if _not_modified(
        page, chosen.etag, headers.get("if-none-match"), headers.get("if-modified-since")
    ):
        return 304, chosen.not_modified, b""
    return 200, chosen.headers, chosen.body


def respond(request: Request, page: CachedPage) -> Response:
    """Serve a cached page (``answer``) through starlette."""
    status, headers, body = answer(request, page)
    response = Response(body, status_code=status)
    response.raw_headers = list(headers)  # its own list: a caller may still add headers
    return response
