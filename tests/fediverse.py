"""A small fake fediverse for tests: remote servers, their actors and keys, in process.

``Fediverse`` is an ASGI app that answers for every fake host at once (the request's
Host picks the server). Pass ``fediverse.transport()`` to ``create_app(transport=…)``
and every outbound request of the blog (key fetches, actor fetches, refetches of
objects, WebFinger, deliveries) reaches it; it counts what it was asked.

Inbound requests are signed with pyhttpsig, an implementation independent of ours
(draft-cavage, rsa-sha256, ``(request-target) host date digest``), so a
misunderstanding shared by our signer and our verifier cannot pass.
"""

from __future__ import annotations

import base64
import copy
import functools
import hashlib
import json
from dataclasses import dataclass, field
from email.utils import format_datetime
from pathlib import Path
from typing import Any

import httpx
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from httpsig import HeaderSigner
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from fediblog.models import utcnow

FIXTURES = Path(__file__).parent / "fixtures"
AS_PUBLIC = "https://www.w3.org/ns/activitystreams#Public"
AP_TYPE = "application/activity+json"
JRD_TYPE = "application/jrd+json"
SUBSCRIBE = "http://ostatus.org/schema/1.0/subscribe"
_KEY_CACHE: list[rsa.RSAPrivateKey] = []


def fixture(path: str) -> dict[str, Any]:
    """A captured payload from tests/fixtures (see its SOURCES.md)."""
    data: dict[str, Any] = json.loads((FIXTURES / path).read_text())
    return data


def remote_key(index: int) -> rsa.RSAPrivateKey:
    """Throwaway RSA keys, made once per test session (generation is slow)."""
    while len(_KEY_CACHE) <= index:
        _KEY_CACHE.append(rsa.generate_private_key(public_exponent=65537, key_size=2048))
    return _KEY_CACHE[index]


def public_pem(key: rsa.RSAPrivateKey) -> str:
    return (
        key.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )


def private_pem(key: rsa.RSAPrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    )


@dataclass
class RemoteActor:
    """An account on a fake server, with its own key."""

    host: str
    username: str
    key: rsa.RSAPrivateKey
    name: str = ""
    document_overrides: dict[str, Any] = field(default_factory=dict)

    @property
    def id(self) -> str:
        return f"https://{self.host}/users/{self.username}"

    @property
    def key_id(self) -> str:
        return f"{self.id}#main-key"

    def document(self) -> dict[str, Any]:
        doc: dict[str, Any] = {
            "@context": ["https://www.w3.org/ns/activitystreams", "https://w3id.org/security/v1"],
            "id": self.id,
            "type": "Person",
            "preferredUsername": self.username,
            "name": self.name or self.username.title(),
            "url": f"https://{self.host}/@{self.username}",
            "icon": {"type": "Image", "url": f"https://{self.host}/avatars/{self.username}.png"},
            "inbox": f"{self.id}/inbox",
            "outbox": f"{self.id}/outbox",
            "followers": f"{self.id}/followers",
            "endpoints": {"sharedInbox": f"https://{self.host}/inbox"},
            "publicKey": {
                "id": self.key_id,
                "owner": self.id,
                "publicKeyPem": public_pem(self.key),
            },
        }
        doc.update(self.document_overrides)
        return doc

    def note(self, number: int, in_reply_to: str, text: str, **extra: Any) -> dict[str, Any]:
        """A public reply Note by this actor."""
        note_id = f"{self.id}/statuses/{number}"
        note: dict[str, Any] = {
            "id": note_id,
            "type": "Note",
            "attributedTo": self.id,
            "inReplyTo": in_reply_to,
            "content": f"<p>{text}</p>",
            "published": "2026-11-28T12:00:00Z",
            "url": f"https://{self.host}/@{self.username}/{number}",
            "to": [AS_PUBLIC],
            "cc": [f"{self.id}/followers"],
        }
        note.update(extra)
        return note

    def webfinger(self, template: str | None = None) -> dict[str, Any]:
        """This account's JRD, as Mastodon serves it; with the OStatus subscribe
        (remote interaction) template unless ``template`` is ""."""
        links: list[dict[str, Any]] = [
            {
                "rel": "http://webfinger.net/rel/profile-page",
                "type": "text/html",
                "href": f"https://{self.host}/@{self.username}",
            },
            {"rel": "self", "type": AP_TYPE, "href": self.id},
        ]
        if template != "":
            default = f"https://{self.host}/authorize_interaction?uri={{uri}}"
            links.append({"rel": SUBSCRIBE, "template": template or default})
        return {
            "subject": f"acct:{self.username}@{self.host}",
            "aliases": [self.id],
            "links": links,
        }

    def create(self, note: dict[str, Any]) -> dict[str, Any]:
        return {
            "@context": "https://www.w3.org/ns/activitystreams",
            "id": f"{note['id']}/activity",
            "type": "Create",
            "actor": self.id,
            "to": note.get("to", []),
            "cc": note.get("cc", []),
            "object": note,
        }


def signed_headers(
    actor_key_id: str,
    key: rsa.RSAPrivateKey,
    url: str,
    body: bytes,
    *,
    content_type: str = AP_TYPE,
) -> dict[str, str]:
    """Headers for a POST of ``body`` to ``url``, signed by pyhttpsig."""
    parts = httpx.URL(url)
    headers = {
        "Host": parts.netloc.decode(),
        "Date": format_datetime(utcnow(), usegmt=True),
        "Digest": "SHA-256=" + base64.b64encode(hashlib.sha256(body).digest()).decode(),
        "Content-Type": content_type,
    }
    signer = header_signer(
        actor_key_id, private_pem(key), "rsa-sha256", ("(request-target)", "host", "date", "digest")
    )
    target = parts.raw_path.decode()
    return dict(signer.sign(headers, method="POST", path=target))


@functools.cache
def header_signer(
    key_id: str, secret: bytes, algorithm: str, parts: tuple[str, ...]
) -> HeaderSigner:
    """pyhttpsig's signer for a key, made once: pycryptodome tests the primes of a key
    each time it imports one (~0.1 s), and the suite signs thousands of requests."""
    return HeaderSigner(
        key_id, secret, algorithm=algorithm, headers=list(parts), sign_header="signature"
    )


class Fediverse:
    """Every fake server at once, as one ASGI app; it records what it is asked."""

    def __init__(self) -> None:
        self.actors: dict[str, RemoteActor] = {}
        self.documents: dict[str, dict[str, Any]] = {}  # extra documents by URL
        self.webfingers: dict[str, dict[str, Any]] = {}  # JRDs by resource (acct:user@host)
        self.requests: list[tuple[str, str]] = []  # (method, url)
        self.received: list[tuple[str, dict[str, str], bytes]] = []  # POSTs: url, headers, body
        self.inbox_status = 202

    def add(self, host: str, username: str, *, key_index: int = 0, name: str = "") -> RemoteActor:
        actor = RemoteActor(host, username, remote_key(key_index), name=name)
        self.actors[actor.id] = actor
        return actor

    def add_webfinger(
        self, actor: RemoteActor, jrd: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        """Serve ``jrd`` (default: ``actor.webfinger()``) for ``acct:user@host``."""
        found = jrd if jrd is not None else actor.webfinger()
        self.webfingers[f"acct:{actor.username}@{actor.host}"] = found
        return found

    def transport(self) -> httpx.AsyncBaseTransport:
        return httpx.ASGITransport(app=self)

    def asked(self, url: str) -> int:
        """How many requests reached ``url`` (ignoring any fragment)."""
        return sum(1 for _, seen in self.requests if seen == url.split("#")[0])

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        request = Request(scope, receive)
        url = str(request.url).split("?")[0]
        self.requests.append((request.method, url))
        response = await self._answer(request, url)
        await response(scope, receive, send)

    async def _answer(self, request: Request, url: str) -> Response:
        if request.method == "POST":
            self.received.append((url, dict(request.headers), await request.body()))
            return Response(status_code=self.inbox_status)
        if request.url.path == "/.well-known/webfinger":
            jrd = self.webfingers.get(request.query_params.get("resource", ""))
            if jrd is None:
                return Response("no such account", status_code=404)
            return JSONResponse(copy.deepcopy(jrd), media_type=JRD_TYPE)
        if url in self.documents:
            return JSONResponse(copy.deepcopy(self.documents[url]), media_type=AP_TYPE)
        actor = self.actors.get(url)
        if actor is not None:
            return JSONResponse(actor.document(), media_type=AP_TYPE)
        return Response("not found", status_code=404)
