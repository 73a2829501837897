"""Outbound GETs: the one place where fediblog reads from other servers.

Owns everything between "fetch this URL" and "a JSON object we may trust came from that
URL's host" (shared/security/ATTACKS.md cases in brackets):

* the SSRF guard [22, 23]: a network backend that resolves each host itself, refuses if
  any address is not public, and connects to the checked IP, so DNS rebinding has no
  second lookup to poison; redirects are followed by hand, each hop re-checked and
  re-signed, at most ``max_redirects`` [6];
* limits [24-27]: one total deadline per fetch, a size cap on decompressed bytes, caps on
  JSON nesting and array length;
* cancellation [21]: each GET runs as a task of its own, ended by its deadline (see
  ``netguard.deadline``), so a caller that gives up never cancels a request inside
  httpcore's pool, which would lose the connection for good (encode/httpcore#1093);
* the shape of the answer [4, 5, 29, 30, 35]: ActivityPub content type, ``id`` equal to
  the URL fetched on the host asked, WebFinger subject and self links on the host asked,
  collection pages on the collection's host. Payloads are plain JSON; ``@context`` is
  never fetched.

Wiring: ``Fetcher(httpx.AsyncClient(transport=build_transport(policy)), policy, sign)``.
A client given a transport also ignores proxy variables, which would resolve behind the
guard's back. Every failure is a ``FetchError`` subclass with a short reason; those
that say the host is unwell (``FetchTimeout``, ``FetchUnreachable``, 5xx) are told apart
from those a URL chosen by anyone can cause (404, ``BadDocument``), and from
``FetchBusy``, which says our own connections are all in use.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import re
import zlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, NoReturn, Protocol

import anyio
import httpx

from fediblog.errors import (
    BadDocument,
    BlockedAddress,
    FetchBusy,
    FetchError,
    FetchStatus,
    FetchTimeout,
    FetchTooLarge,
    FetchUnreachable,
)
from fediblog.netguard import GuardedTransport, address_allowed, deadline

JsonObject = dict[str, Any]
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
Resolver = Callable[[str, int], Awaitable[list[str]]]

AS_PROFILE = "https://www.w3.org/ns/activitystreams"
ACTIVITY_ACCEPT = f'application/activity+json, application/ld+json; profile="{AS_PROFILE}"'
JRD_ACCEPT = "application/jrd+json, application/json"
MAX_JSON_DEPTH = 64
MAX_ARRAY_ITEMS = 10_000
_SHORT = 2 * MAX_ARRAY_ITEMS  # characters: the shortest array over the cap, "[0,0,…]", is longer

_REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
# GuardedTransport ends a fetch at its deadline by itself; this much later, a backstop
# cancels it (other transports: tests' fakes).
_BACKSTOP = 2.0
_NOT_IN_HOST = re.compile(r"[\s/?#@\\]")


class GetSigner(Protocol):
    """Signs a GET as the instance actor: returns the headers to add (Date, Signature…)."""

    def __call__(self, method: str, url: str) -> dict[str, str]: ...


@dataclass(frozen=True, slots=True)
class FetchPolicy:
    """Limits for every outbound GET. The defaults are the production values."""

    allow_http: bool = False
    allow_private_addresses: bool = False  # tests only: lets loopback through, nothing else
    max_bytes: int = 1_000_000  # counted on decompressed bytes
    total_timeout: float = 10.0  # whole fetch, redirects included
    max_redirects: int = 3


def build_transport(
    policy: FetchPolicy, *, max_per_host: int | None = None
) -> httpx.AsyncBaseTransport:
    """A transport for one of fediblog's AsyncClients (GETs and deliveries each have
    their own, so neither can take all of the other's connections): checks addresses
    at connect time; ``max_per_host`` caps the requests to one server at once."""
    return GuardedTransport(
        allow_loopback=policy.allow_private_addresses, max_per_host=max_per_host
    )


# ---- what a response must look like ------------------------------------------------


def _media_type(header: str) -> tuple[str, dict[str, str]]:
    kind, _, rest = header.partition(";")
    params: dict[str, str] = {}
    for part in rest.split(";"):
        key, sep, value = part.partition("=")
        if sep:
            params[key.strip().lower()] = value.strip().strip('"').strip()
    return kind.strip().lower(), params


def is_activitypub_type(header: str) -> bool:
    """``application/activity+json``, or ``application/ld+json`` with the AS2 profile."""
    kind, params = _media_type(header)
    if kind == "application/activity+json":
        return True
    # JSON-LD allows a space-separated list of profiles.
    return kind == "application/ld+json" and AS_PROFILE in params.get("profile", "").split()


def _is_jrd_type(header: str) -> bool:
    return _media_type(header)[0] in ("application/jrd+json", "application/json")


def parse_url(text: str, error: type[FetchError] = FetchError) -> httpx.URL:
    """Parse a URL, dropping the fragment (never sent, and ``#main-key`` ids carry one)."""
    try:
        return httpx.URL(text).copy_with(fragment=None)
    except (httpx.InvalidURL, TypeError) as cause:
        raise error(f"not a URL: {str(text)[:200]!r}") from cause


def authority(url: httpx.URL) -> str:
    """``host[:port]`` in ASCII, the port only when it is not the scheme's default."""
    host = url.raw_host.decode("ascii").lower()
    if ":" in host:
        host = f"[{host}]"
    return host if url.port is None else f"{host}:{url.port}"


def _resource(text: str, scheme: str) -> tuple[str, str]:
    """``(resource, authority)`` for ``acct:user@host`` (or ``@user@host``) or a URL."""
    if text.startswith(("https://", "http://")):
        return text, authority(parse_url(text))
    user, _, host = text.removeprefix("acct:").removeprefix("@").rpartition("@")
    url = parse_url(f"{scheme}://{host}/")
    # Only a bare host[:port] may follow the @: no path, query or second user.
    if not user or not url.host or _NOT_IN_HOST.search(host) or url.path != "/":
        raise FetchError(f"not an acct: address or URL: {text[:200]!r}")
    return f"acct:{user}@{host}", authority(url)


class _Inflater:
    """Content-decoding whose every call stops one byte past the cap.

    httpx's ``aiter_bytes()`` inflates a whole 64 KiB read at once: ~64 MB from a gzip bomb
    before any cap can look at it.
    """

    def __init__(self, encoding: str) -> None:
        name = encoding.strip().lower()
        self._zlib: Any = None
        if name in ("gzip", "x-gzip"):
            self._zlib = zlib.decompressobj(16 + zlib.MAX_WBITS)
        elif name == "deflate":
            self._zlib = zlib.decompressobj(zlib.MAX_WBITS)
        elif name not in ("", "identity"):
            raise BadDocument(f"unsupported content-encoding {encoding[:40]!r}")

    def feed(self, data: bytes, room: int) -> bytes:
        if self._zlib is None:
            return data
        try:
            return bytes(self._zlib.decompress(data, max(room, 1)))
        except zlib.error as error:
            raise BadDocument("corrupt compressed body") from error


async def _read_capped(response: httpx.Response, cap: int) -> bytes:
    declared = response.headers.get("content-length", "").strip()
    if declared.isdigit() and int(declared) > cap:
        raise FetchTooLarge(f"{declared} bytes announced, the cap is {cap}")
    inflater = _Inflater(response.headers.get("content-encoding", ""))
    body = bytearray()
    async for raw in response.aiter_raw():
        body += inflater.feed(raw, cap + 1 - len(body))
        if len(body) > cap:
            raise FetchTooLarge(f"body passed the cap of {cap} bytes")
    return bytes(body)


# A JSON string, possibly unterminated (so a stray quote cannot make the scan restart
# at every later quote); possessive so it never backtracks.


def parse_json(body: bytes | bytearray | str) -> Any:
    """Plain JSON with bounded nesting and array length, or BadDocument. Bytes are
    decoded as ``json.loads`` decodes them; text (already decoded) is parsed as it is."""
    # The C decoder stops at the interpreter's recursion limit with RecursionError (it
    # guards every level), so a megabyte of '[' costs one failed parse; depth and
    # lengths are then checked in one iterative walk (a regex pre-scan of the bytes
    # cost four times the parse itself on the inbox's hot path).
    try:
        if not isinstance(body, str):
            body = body.decode(json.detect_encoding(body), "surrogatepass")
        value = _DECODER.decode(body)
    except RecursionError:
        raise BadDocument(f"JSON nested deeper than {MAX_JSON_DEPTH} levels") from None
    except ValueError as error:  # UnicodeDecodeError included
        raise BadDocument("body is not valid JSON") from error
    if len(body) <= _SHORT and body.count("[") + body.count("{") <= MAX_JSON_DEPTH:
        # Too short for an array over the cap (each item takes 2 characters), and too few
        # brackets, strings' included, to nest deeper: nothing for the walk to find.
        return value
    if type(value) is dict or type(value) is list:
        stack: list[tuple[Any, int]] = [(value, 1)]
        while stack:
            node, depth = stack.pop()
            if depth > MAX_JSON_DEPTH:
                raise BadDocument(f"JSON nested deeper than {MAX_JSON_DEPTH} levels")
            if type(node) is dict:
                children = node.values()
            else:
                if len(node) > MAX_ARRAY_ITEMS:
                    raise BadDocument(f"JSON array longer than {MAX_ARRAY_ITEMS} items")
                children = node
            for child in children:
                if type(child) is dict or type(child) is list:
                    stack.append((child, depth + 1))
    return value


def _reject_constant(name: str) -> NoReturn:
    raise ValueError(f"{name} is not JSON")


# Built once: json.loads(..., parse_constant=…) builds a decoder on every call.
_DECODER = json.JSONDecoder(parse_constant=_reject_constant)


def _page_items(page: JsonObject) -> list[Any]:
    items = page.get("orderedItems", page.get("items"))
    if items is None:
        return []
    return list(items) if isinstance(items, list) else [items]


# ---- the fetcher --------------------------------------------------------------------


class Fetcher:
    """Signed, capped GETs of ActivityPub documents, WebFinger and collections.

    ``client`` should use ``build_transport(policy)``; this class checks schemes and
    literal IPs itself, but host names are only checked by that transport.
    """

    def __init__(
        self,
        client: httpx.AsyncClient,
        policy: FetchPolicy,
        sign: GetSigner | None = None,
        user_agent: str = "fediblog/0.1",
    ) -> None:
        self._client = client
        self._policy = policy
        self._sign = sign
        self._user_agent = user_agent
        self._running: set[asyncio.Task[tuple[httpx.URL, bytes]]] = set()

    async def aclose(self) -> None:
        """Cancel the GETs still under way (their callers are gone): at shutdown only."""
        for task in list(self._running):
            task.cancel()
        await asyncio.gather(*self._running, return_exceptions=True)

    async def fetch_document(self, url: str, *, exact_id: bool = True) -> JsonObject:
        """The ActivityPub object at ``url``, whose ``id`` must be the URL fetched.

        A redirect may change the path but never the host; the ``id`` must equal the
        final URL exactly (fragments aside). So a host cannot answer for another one's
        ids (ATTACKS 4, 6). Callers should key what they store on the returned ``id``.

        ``exact_id=False`` only requires the ``id`` to be on the same host: GoToSocial
        answers a keyId URL with a stub carrying its owner's id. Such a document is
        not what its URL names; read nothing from it but a pointer to refetch.
        """
        requested = parse_url(url)
        final, doc = await self._fetch_json(requested, ACTIVITY_ACCEPT, is_activitypub_type)
        if not isinstance(doc, dict):
            raise BadDocument("document is not a JSON object")
        if authority(final) != authority(requested):
            raise BadDocument(f"{authority(requested)} redirected to {authority(final)}")
        ap_id = doc.get("id")
        found = parse_url(ap_id, BadDocument) if isinstance(ap_id, str) else None
        if found is None or (found != final and (exact_id or authority(found) != authority(final))):
            raise BadDocument(f"document id {str(ap_id)[:200]!r} is not the URL fetched")
        return doc

    async def fetch_webfinger(self, acct_or_url: str) -> JsonObject:
        """The JRD for ``acct:user@host`` (``@`` prefix optional) or an actor URL.

        The subject and every ActivityPub ``self`` link must be on the host asked
        (ATTACKS 35). Split-domain setups answer with links on another host and are
        refused here; confirm those by WebFingering the actor's own host instead.
        """
        scheme = "http" if self._policy.allow_http else "https"
        resource, asked = _resource(acct_or_url.strip(), scheme)
        url = parse_url(f"{scheme}://{asked}/.well-known/webfinger").copy_with(
            params={"resource": resource}
        )
        _final, jrd = await self._fetch_json(url, JRD_ACCEPT, _is_jrd_type)
        if not isinstance(jrd, dict):
            raise BadDocument("WebFinger answer is not a JSON object")
        subject = jrd.get("subject")
        try:
            on_host = isinstance(subject, str) and _resource(subject, scheme)[1] == asked
        except FetchError:
            on_host = False
        if not on_host:
            raise BadDocument(f"WebFinger subject {str(subject)[:200]!r} is not on {asked}")
        links = jrd.get("links")
        selves = [
            link
            for link in (links if isinstance(links, list) else [])
            if isinstance(link, dict)
            and link.get("rel") == "self"
            and is_activitypub_type(str(link.get("type", "")))
        ]
        if not selves:
            raise BadDocument("WebFinger answer has no ActivityPub self link")
        for link in selves:
            href = link.get("href")
            if not isinstance(href, str) or authority(parse_url(href, BadDocument)) != asked:
                raise BadDocument(f"WebFinger self link {str(href)[:200]!r} is not on {asked}")
        return jrd

    async def fetch_collection_items(
        self, url: str, *, max_pages: int = 5, max_items: int = 1000
    ) -> list[Any]:
        """Items of an (Ordered)Collection, following ``first``/``next`` (ATTACKS 29).

        Pages must be on the collection's host (else BadDocument); a page already seen
        ends the walk, as do ``max_pages`` fetched pages and ``max_items`` items.
        """
        collection = await self.fetch_document(url)
        home = authority(parse_url(url))
        items = _page_items(collection)
        seen = {parse_url(url)}
        page: Any = collection.get("first")
        fetched = 0
        while page is not None and len(items) < max_items:
            if isinstance(page, dict):
                # Mastodon embeds the first page of `replies`; it came with the
                # collection, so it needs no fetch and no host check of its own.
                if isinstance(page.get("id"), str):
                    seen.add(parse_url(page["id"], BadDocument))
                items += _page_items(page)
                page = page.get("next")
                continue
            if not isinstance(page, str):
                raise BadDocument("collection page link is not a URL")
            page_url = parse_url(page, BadDocument)
            if authority(page_url) != home:
                raise BadDocument(f"collection page on another host ({authority(page_url)})")
            if page_url in seen or fetched >= max_pages:
                break
            seen.add(page_url)
            doc = await self.fetch_document(page)
            fetched += 1
            items += _page_items(doc)
            page = doc.get("next")
        return items[:max_items]

    # ---- one GET, redirects included ------------------------------------------------

    async def fetch_bytes(self, url: str, accept: str, type_ok: Callable[[str], bool]) -> bytes:
        """The body at ``url`` whose content type passes ``type_ok`` (media, not
        documents): the same guard, redirects, deadline and size cap as every GET."""
        _final, body = await self._fetch_raw(parse_url(url, BlockedAddress), accept, type_ok)
        return body

    async def _fetch_json(
        self, url: httpx.URL, accept: str, type_ok: Callable[[str], bool]
    ) -> tuple[httpx.URL, Any]:
        final, body = await self._fetch_raw(url, accept, type_ok)
        return final, parse_json(body)

    async def _fetch_raw(
        self, url: httpx.URL, accept: str, type_ok: Callable[[str], bool]
    ) -> tuple[httpx.URL, bytes]:
        # Shielded: a caller cancelled now leaves the GET to end by its deadline.
        task = asyncio.create_task(self._get_by_deadline(url, accept, type_ok))
        self._running.add(task)
        task.add_done_callback(self._settled)
        return await asyncio.shield(task)

    def _settled(self, task: asyncio.Task[tuple[httpx.URL, bytes]]) -> None:
        self._running.discard(task)
        if not task.cancelled():
            task.exception()  # retrieved: its caller may have stopped waiting

    async def _get_by_deadline(
        self, url: httpx.URL, accept: str, type_ok: Callable[[str], bool]
    ) -> tuple[httpx.URL, bytes]:
        limit = self._policy.total_timeout
        try:
            # One deadline over every hop and every read: per-read timeouts alone let
            # a server trickle a byte a second for ever (ATTACKS 24).
            with deadline(limit), anyio.fail_after(limit + min(_BACKSTOP, limit)):
                return await self._get(url, accept, type_ok)
        except TimeoutError:
            raise FetchTimeout(f"{url.host} did not answer within {limit:g} s") from None

    async def _get(
        self, url: httpx.URL, accept: str, type_ok: Callable[[str], bool]
    ) -> tuple[httpx.URL, bytes]:
        for _hop in range(self._policy.max_redirects + 1):
            self._check_url(url)
            # Accept-Encoding: only what _Inflater can bound.
            headers = {"Accept": accept, "Accept-Encoding": "gzip, deflate"}
            headers["User-Agent"] = self._user_agent
            if self._sign is not None:
                headers.update(self._sign("GET", str(url)))
            try:
                async with self._client.stream(
                    "GET",
                    url,
                    headers=headers,
                    follow_redirects=False,
                    timeout=self._policy.total_timeout,
                ) as response:
                    status = response.status_code
                    if status in _REDIRECT_STATUSES:
                        location = response.headers.get("location")
                        if not location:
                            raise FetchError(f"{url.host} redirected without a Location")
                        url = url.join(location).copy_with(fragment=None)
                        continue
                    if status != 200:
                        raise FetchStatus(f"{url} answered HTTP {status}", status)
                    content_type = response.headers.get("content-type", "")
                    if not type_ok(content_type):
                        raise BadDocument(f"{url} is {content_type[:80] or 'untyped'}")
                    return url, await _read_capped(response, self._policy.max_bytes)
            except httpx.PoolTimeout as error:
                raise FetchBusy("no connection for fetching became free in time") from error
            except httpx.TimeoutException as error:
                limit = self._policy.total_timeout
                raise FetchTimeout(f"{url.host} did not answer within {limit:g} s") from error
            except (httpx.NetworkError, httpx.RemoteProtocolError, OSError) as error:
                reason = f"GET {url} failed: {error or type(error).__name__}"
                raise FetchUnreachable(reason) from error
            except (httpx.HTTPError, httpx.InvalidURL) as error:
                raise FetchError(f"GET {url} failed: {error or type(error).__name__}") from error
        raise FetchError(f"more than {self._policy.max_redirects} redirects")

    def _check_url(self, url: httpx.URL) -> None:
        """Scheme and literal-IP check, before any connection (names: GuardedBackend)."""
        if not (url.scheme == "https" or (url.scheme == "http" and self._policy.allow_http)):
            raise BlockedAddress(f"{url.scheme or 'relative'} URLs are not fetched")
        if not url.host or url.userinfo:
            raise BlockedAddress("URL without a host, or with credentials")
        try:
            ip = ipaddress.ip_address(url.host)
        except ValueError:
            return
        if not address_allowed(ip, allow_loopback=self._policy.allow_private_addresses):
            raise BlockedAddress(f"{ip} is not a public address")
