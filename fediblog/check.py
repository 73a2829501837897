"""The self-test of a deployed blog, through its public URL (``fediblog check``).

Run on the server, it asks the blog what a fediverse server would ask, the way one
would ask it: through FEDIBLOG_BASE_URL, so through DNS, TLS and the reverse proxy.
Each check gives one ``Result`` (ok, FAIL or skip, and one line of detail):

* ``tls``: the certificate verifies against the machine's trust store (netguard.py: and
  SSL_CERT_FILE / SSL_CERT_DIR), and how many days it has left;
* ``health``: /healthz answers 200 (database writable, background tasks running);
* ``proxy``: the scheme and host the app saw (/healthz's echo) are the configured
  ones, which is what inbound signatures are checked against: the proxy passes Host
  and X-Forwarded-Proto;
* ``webfinger``, ``host-meta``, ``nodeinfo``, ``actor``: the discovery documents and
  the actor, whose key must be this blog's key;
* ``signed-get``: a GET of the actor signed by the instance actor is answered, and a
  signed GET of /healthz is verified by the server itself, as an inbound POST would be;
* ``clock``: the skew between this machine's clock and a peer's Date header
  (``peer``), since signatures older or newer than an hour are refused.

The admin desk runs the same checks (``iter_checks``, under a total deadline).
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Any, Literal
from urllib.parse import quote, urlsplit

import httpx
from cryptography import x509
from cryptography.x509.oid import NameOID

from fediblog import __version__
from fediblog.activitystreams import Urls
from fediblog.config import Settings
from fediblog.errors import FediblogError
from fediblog.httpsig import sign_request
from fediblog.keys import KeyPair, fingerprint, load_key
from fediblog.models import utcnow
from fediblog.netguard import NoCookies, trusted_context

Status = Literal["ok", "FAIL", "skip"]
MIN_CERT_DAYS = 14  # ACME clients renew 30 days ahead: fewer left means renewal fails
MAX_SKEW_SECONDS = 30
AP_ACCEPT = 'application/activity+json, application/ld+json; profile="https://www.w3.org/ns/activitystreams"'
USER_AGENT = f"fediblog/{__version__} (fediblog check)"


@dataclass(frozen=True, slots=True)
class Result:
    name: str
    status: Status
    detail: str

    @property
    def line(self) -> str:
        return f"{self.status:<4} {self.name:<10} {self.detail}"


class Failed(FediblogError):
    """One check failed; the text says why."""


@dataclass(frozen=True, slots=True)
class _Blog:
    settings: Settings
    urls: Urls
    client: httpx.AsyncClient
    keys: dict[str, KeyPair]

    def url(self, path: str) -> str:
        return self.settings.url(path)


async def run_checks(
    settings: Settings,
    *,
    peer: str | None = None,
    context: ssl.SSLContext | None = None,
    wait: float = 10.0,
    clock: Callable[[], datetime] = utcnow,
) -> list[Result]:
    """Every check, in order, each request allowed ``wait`` seconds; never raises for
    what it finds (that is a FAIL line)."""
    found = iter_checks(settings, peer=peer, context=context, wait=wait, clock=clock)
    return [result async for result in found]


async def iter_checks(
    settings: Settings,
    *,
    peer: str | None = None,
    context: ssl.SSLContext | None = None,
    wait: float = 10.0,
    clock: Callable[[], datetime] = utcnow,
) -> AsyncIterator[Result]:
    """``run_checks``, one result at a time as each check ends: a caller with a total
    deadline (the desk) keeps the lines it has when the deadline comes."""
    context = context or trusted_context()  # what the blog trusts when it fetches
    keys: dict[str, KeyPair] = {}
    key_problem = ""
    try:
        keys = {name: load_key(settings.keys_dir, name) for name in ("blog", "instance")}
    except FediblogError as error:
        key_problem = str(error)
    async with httpx.AsyncClient(
        verify=context,
        timeout=wait,
        follow_redirects=False,
        headers={"User-Agent": USER_AGENT},
        cookies=NoCookies(),
    ) as client:
        blog = _Blog(settings, Urls.of(settings), client, keys)
        yield await _tls(settings, context, wait, clock)
        steps: list[tuple[str, Callable[[_Blog], Awaitable[str]]]] = [
            ("health", _health),
            ("proxy", _proxy),
            ("webfinger", _webfinger),
            ("host-meta", _host_meta),
            ("nodeinfo", _nodeinfo),
            ("actor", _actor),
            ("signed-get", _signed_get),
        ]
        for name, step in steps:
            if key_problem and name in ("actor", "signed-get"):
                yield Result(name, "FAIL", f"cannot read the keys: {key_problem}")
                continue
            yield await _run(name, step(blog))
        if peer is None:
            yield Result("clock", "skip", "no peer to compare with (--peer https://a.server)")
        else:
            yield await _run("clock", _clock(client, peer, clock))


async def _run(name: str, step: Awaitable[str]) -> Result:
    try:
        return Result(name, "ok", await step)
    except Failed as error:
        return Result(name, "FAIL", str(error))
    except httpx.HTTPError as error:
        return Result(name, "FAIL", _describe(error))


def _describe(error: BaseException) -> str:
    text = str(error).strip().splitlines()[0] if str(error).strip() else ""
    kind = type(error).__name__
    return f"{kind}: {text}"[:300] if text else kind


async def _get(blog: _Blog, path_or_url: str, **headers: str) -> httpx.Response:
    url = path_or_url if "://" in path_or_url else blog.url(path_or_url)
    response = await blog.client.get(url, headers=headers)
    if response.status_code != 200:
        raise Failed(f"GET {url} answered {response.status_code}")
    return response


def _json(response: httpx.Response) -> Any:
    try:
        return response.json()
    except ValueError:
        raise Failed(f"{response.url} is not JSON") from None


# ---- the checks ------------------------------------------------------------------------


async def _tls(
    settings: Settings, context: ssl.SSLContext, wait: float, clock: Callable[[], datetime]
) -> Result:
    parts = urlsplit(settings.base_url)
    if parts.scheme != "https":
        return Result("tls", "skip", "the base URL is http (FEDIBLOG_ALLOW_HTTP): no TLS")
    host, port = parts.hostname or "", parts.port or 443
    try:
        async with asyncio.timeout(wait):
            _, writer = await asyncio.open_connection(host, port, ssl=context, server_hostname=host)
    except ssl.SSLCertVerificationError as error:
        return Result("tls", "FAIL", f"{host}:{port}: {error.verify_message or error}")
    except (OSError, TimeoutError) as error:
        return Result("tls", "FAIL", f"{host}:{port}: cannot connect: {_describe(error)}")
    try:
        # The DER form: truststore may verify outside OpenSSL, which then gives no dict.
        der = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
    finally:
        writer.close()
    cert = x509.load_der_x509_certificate(der)
    ends = cert.not_valid_after_utc
    days = int((ends - clock()).total_seconds() // 86400)
    names = [
        str(attribute.value)
        for oid in (NameOID.ORGANIZATION_NAME, NameOID.COMMON_NAME)
        for attribute in cert.issuer.get_attributes_for_oid(oid)
    ]
    by = names[0] if names else "an unnamed issuer"
    when = f"{days} more days (until {ends:%Y-%m-%d}), issued by {by}"
    if days < MIN_CERT_DAYS:
        return Result("tls", "FAIL", f"valid for only {when}: is renewal working?")
    return Result("tls", "ok", f"valid for {when}")


async def _healthz(blog: _Blog, **headers: str) -> Any:
    url = blog.url("/healthz")
    response = await blog.client.get(url, headers=headers)
    if response.status_code not in (200, 503):
        raise Failed(f"GET {url} answered {response.status_code}")
    return _json(response)


async def _health(blog: _Blog) -> str:
    found = await _healthz(blog)
    if found.get("status") != "ok":
        raise Failed(f"/healthz: {found.get('reason')}")
    return f"database {found.get('database')}, {len(found.get('workers', {}))} tasks running"


async def _proxy(blog: _Blog) -> str:
    seen = (await _healthz(blog)).get("request", {})
    settings = blog.settings
    problems = []
    if seen.get("host") != settings.host:
        problems.append(
            f"the app saw Host {seen.get('host')!r}, not {settings.host!r}: the proxy must"
            " pass the Host header (nginx: proxy_set_header Host $host)"
        )
    if seen.get("scheme") != settings.scheme:
        problems.append(
            f"the app saw scheme {seen.get('scheme')!r}, not {settings.scheme!r}: the proxy"
            " must send X-Forwarded-Proto (nginx: proxy_set_header X-Forwarded-Proto $scheme)"
        )
    if problems:
        raise Failed("; ".join(problems))
    return f"the app sees {settings.scheme}://{settings.host}, as configured"


async def _webfinger(blog: _Blog) -> str:
    acct = f"acct:{blog.settings.acct}"
    found = _json(await _get(blog, f"/.well-known/webfinger?resource={quote(acct)}"))
    links = found.get("links", []) if isinstance(found, dict) else []
    selves = [
        link.get("href")
        for link in links
        if isinstance(link, dict)
        and link.get("rel") == "self"
        and link.get("type") == "application/activity+json"
    ]
    if blog.urls.actor not in selves:
        raise Failed(f"{acct} does not lead to {blog.urls.actor} (self links: {selves})")
    return f"{acct} -> {blog.urls.actor}"


async def _host_meta(blog: _Blog) -> str:
    text = (await _get(blog, "/.well-known/host-meta")).text
    template = f"{blog.settings.base_url}/.well-known/webfinger?resource={{uri}}"
    if template not in text:
        raise Failed(f"/.well-known/host-meta does not name {template}")
    return "names the WebFinger template"


async def _nodeinfo(blog: _Blog) -> str:
    links = _json(await _get(blog, "/.well-known/nodeinfo")).get("links", [])
    hrefs = [link.get("href", "") for link in links if isinstance(link, dict)]
    if not hrefs or not hrefs[0].startswith(blog.settings.base_url + "/"):
        raise Failed(f"/.well-known/nodeinfo links elsewhere: {hrefs}")
    document = _json(await _get(blog, hrefs[0]))
    if "activitypub" not in document.get("protocols", []):
        raise Failed(f"{hrefs[0]} does not list the activitypub protocol")
    software = document.get("software", {})
    return f"{hrefs[0]}: {software.get('name')} {software.get('version')}"


def _same_pem(a: object, b: str) -> bool:
    return isinstance(a, str) and a.split() == b.split()


async def _actor(blog: _Blog) -> str:
    response = await _get(blog, blog.urls.actor, Accept=AP_ACCEPT)
    kind = response.headers.get("content-type", "")
    if "activity+json" not in kind and "ld+json" not in kind:
        raise Failed(f"{blog.urls.actor} is served as {kind!r}, not application/activity+json")
    actor = _json(response)
    if actor.get("id") != blog.urls.actor:
        raise Failed(f"the actor's id is {actor.get('id')!r}, not {blog.urls.actor!r}")
    key = actor.get("publicKey", {})
    if key.get("id") != blog.urls.key_id or not _same_pem(
        key.get("publicKeyPem"), blog.keys["blog"].public_pem
    ):
        raise Failed("the actor's public key is not the blog's key in FEDIBLOG_KEYS_DIR")
    return (
        f"{blog.urls.actor} (inbox {actor.get('inbox')}) carries this blog's key,"
        f" {fingerprint(blog.keys['blog'].public_pem)}"
    )


def _signed(blog: _Blog, url: str) -> dict[str, str]:
    return sign_request(
        "GET",
        url,
        body=None,
        key_id=blog.urls.instance_key_id,
        private_key=blog.keys["instance"].private_key,
        now=utcnow(),
    )


async def _signed_get(blog: _Blog) -> str:
    actor = blog.urls.actor
    response = await blog.client.get(actor, headers={"Accept": AP_ACCEPT, **_signed(blog, actor)})
    if response.status_code != 200:
        raise Failed(f"a signed GET of {actor} answered {response.status_code}")
    healthz = blog.url("/healthz")
    verdict = (await _healthz(blog, **_signed(blog, healthz))).get("signature")
    if verdict != "verified":
        raise Failed(
            f"the server did not verify our signature ({verdict}): the proxy must pass"
            " Host and the request path unchanged"
        )
    return "answered, and the server verified the instance actor's signature"


async def _clock(client: httpx.AsyncClient, peer: str, clock: Callable[[], datetime]) -> str:
    async with client.stream("GET", peer) as response:
        date = response.headers.get("date", "")
    try:
        theirs = parsedate_to_datetime(date)
    except (TypeError, ValueError):
        raise Failed(f"{peer} sent no usable Date header ({date!r})") from None
    if theirs.tzinfo is None:
        theirs = theirs.replace(tzinfo=UTC)
    skew = (clock() - theirs).total_seconds()
    ahead = "ahead of" if skew > 0 else "behind"
    if abs(skew) > MAX_SKEW_SECONDS:
        raise Failed(
            f"this clock is {abs(skew):.0f} s {ahead} {peer}'s: run NTP (systemd-timesyncd);"
            " past an hour, every signature is refused"
        )
    return f"within {abs(skew):.0f} s of {peer}'s clock"
