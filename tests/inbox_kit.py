"""Attack tooling for the inbox tests (test_inbox_attacks, test_inbox_fuzz).

Built on ``tests.fediverse.Fediverse`` (the fake remote servers, an ASGI app handed to
``create_app(transport=...)`` that records every request), it adds:

* ``Account``: a remote actor made from a real server's actor document
  (tests/fixtures/: Mastodon, Misskey, GoToSocial) with a throwaway RSA key put in
  place of the original one, and GoToSocial's key stub for it;
* ``pyhttpsig_headers``: a draft-cavage signature made by pyhttpsig, an independent
  third-party implementation, with every knob an attack needs (signed parts, Date,
  Host, Digest, algorithm). fediblog's own signer is never used for inbound requests;
* ``Harness``: the real app with its lifespan running and its workers off, a client on
  its ASGI interface, and a seeded database (a follower and a stored activity) whose
  rows every rejection must leave untouched.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import json
import re
import tempfile
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
from cryptography.hazmat.primitives.asymmetric import rsa

from fediblog.keys import ensure_keys
from fediblog.models import InboxItem, utcnow
from fediblog.web.deps import Services
from tests import dbpeek
from tests.conftest import BASE_URL, make_settings
from tests.fediverse import Fediverse, fixture, header_signer, private_pem, public_pem
from tests.helpers import running as running_app

FIXTURES = Path(__file__).parent / "fixtures"
HOST = "blog.example"
BLOG_ACTOR = f"{BASE_URL}/users/blog"
SHARED_INBOX = "/inbox"
PERSONAL_INBOX = "/users/blog/inbox"
AP = "application/activity+json"
LD_JSON = 'application/ld+json; profile="https://www.w3.org/ns/activitystreams"'
AS_CONTEXT = "https://www.w3.org/ns/activitystreams"
POST_PARTS = ("(request-target)", "host", "date", "digest")

JsonObject = dict[str, Any]


def fixture_bytes(name: str) -> bytes:
    return (FIXTURES / name).read_bytes()


# ---- keys ------------------------------------------------------------------------------


@functools.cache
def rsa_key(name: str, bits: int = 2048) -> rsa.RSAPrivateKey:
    """One throwaway key per name for the whole test session (generating is slow)."""
    return rsa.generate_private_key(public_exponent=65537, key_size=bits)


# ---- remote accounts, from real actor documents ------------------------------------------


@dataclass(frozen=True)
class Account:
    document: JsonObject
    key: rsa.RSAPrivateKey

    @property
    def id(self) -> str:
        return str(self.document["id"])

    @property
    def key_id(self) -> str:
        return str(self.document["publicKey"]["id"])


def _with_key(document: JsonObject, key: rsa.RSAPrivateKey) -> Account:
    document["publicKey"]["publicKeyPem"] = public_pem(key)
    return Account(document, key)


def mastodon(key_name: str = "mastodon") -> Account:
    """masto.qa.urbanwildlife.biz/users/mastodon (Mastodon 4), keyId ``…#main-key``."""
    return _with_key(fixture("mastodon/actor_person.json"), rsa_key(key_name))


def misskey() -> Account:
    """misskey.usbharu.dev/users/9ghwhv9zgg, a 4096-bit key as Misskey makes them."""
    return _with_key(fixture("misskey/person.json"), rsa_key("misskey", 4096))


def gotosocial(username: str = "the_mighty_zork") -> Account:
    """A GoToSocial actor on http://localhost:8080 (its own test rig), keyId ``…/main-key``.

    Other users of that server are the same document with the username replaced.
    """
    text = fixture_bytes("gotosocial/person.json").decode()
    return _with_key(json.loads(text.replace("the_mighty_zork", username)), rsa_key(username))


def gotosocial_key_stub(owner: Account) -> JsonObject:
    """What GoToSocial answers at a keyId: its documented stub, filled in for ``owner``.

    Its ``id`` is the owner's id, not the keyId URL, and it has no inbox.
    """
    stub = fixture("gotosocial/publickey_stub_at_keyid.json")
    stub["id"] = owner.id
    stub["preferredUsername"] = owner.document["preferredUsername"]
    stub["publicKey"] = {
        "id": owner.key_id,
        "owner": owner.id,
        "publicKeyPem": public_pem(owner.key),
    }
    return stub


def follow(actor: str, *, activity_id: str | None = None, **extra: Any) -> JsonObject:
    """Mastodon's Follow (tests/fixtures/mastodon/follow.json) of the blog, from ``actor``."""
    activity = fixture("mastodon/follow.json")
    activity["actor"] = actor
    activity["object"] = BLOG_ACTOR
    # The same UUID path, on the follower's own server.
    origin = urlsplit(actor)
    activity["id"] = (
        activity_id or f"{origin.scheme}://{origin.netloc}{urlsplit(activity['id']).path}"
    )
    activity.update(extra)
    return activity


def body_of(document: JsonObject) -> bytes:
    return json.dumps(document).encode()


# ---- signing, by pyhttpsig ---------------------------------------------------------------


def http_date(offset: timedelta = timedelta()) -> str:
    return format_datetime(datetime.now(UTC) + offset, usegmt=True)


def sha256_digest(body: bytes) -> str:
    return "SHA-256=" + base64.b64encode(hashlib.sha256(body).digest()).decode("ascii")


def pyhttpsig_headers(
    key: rsa.RSAPrivateKey,
    key_id: str,
    body: bytes,
    *,
    path: str = SHARED_INBOX,
    method: str = "POST",
    parts: Sequence[str] = POST_PARTS,
    content_type: str = AP,
    algorithm: str = "rsa-sha256",
    secret: bytes | None = None,
    date_offset: timedelta = timedelta(),
    **headers: str,
) -> dict[str, str]:
    """Headers for a POST signed by pyhttpsig (draft-cavage), as a remote server sends them.

    ``headers`` (underscores for dashes) replace the defaults before signing: Host is
    this blog, Date is now, Digest is SHA-256 of ``body``, Content-Type is ``content_type``.
    """
    base = {
        "Host": HOST,
        "Date": http_date(date_offset),
        "Digest": sha256_digest(body),
        "Content-Type": content_type,
    }
    base.update({name.replace("_", "-").title(): value for name, value in headers.items()})
    signer = header_signer(key_id, secret or private_pem(key), algorithm, tuple(parts))
    return dict(signer.sign(base, method=method, path=path))


def signed_by(account: Account, body: bytes, **options: Any) -> dict[str, str]:
    return pyhttpsig_headers(account.key, account.key_id, body, **options)


# ---- the app, seeded ---------------------------------------------------------------------

SEED_ACTOR = "https://seed.example/users/old"
SEED_ACTIVITY = "https://seed.example/likes/1"
# Rows an inbound request could add or change. The actors table is a cache of remote
# documents, which key resolution may legitimately fill; it is checked by the tests
# that care about it.
_SNAPSHOT = {
    "inbox": "SELECT * FROM inbox LEFT JOIN inbox_payloads USING (id) ORDER BY id",
    "followers": "SELECT * FROM followers ORDER BY id",
    "deliveries": "SELECT * FROM deliveries ORDER BY id",
    "activities": "SELECT * FROM activities ORDER BY id",
    "comments": "SELECT * FROM comments ORDER BY id",
    "reactions": "SELECT * FROM reactions ORDER BY id",
    "tombstones": "SELECT * FROM tombstones ORDER BY ap_id",
}

Snapshot = dict[str, list[tuple[Any, ...]]]


def snapshot(database: Path | str) -> Snapshot:
    """The rows an inbound activity could touch, read through a connection of its own."""
    return {table: dbpeek.rows(database, query) for table, query in _SNAPSHOT.items()}


def actor_row(database: Path | str, ap_id: str) -> tuple[Any, ...] | None:
    return dbpeek.row(
        database,
        "SELECT ap_id, key_id, public_key_pem, deleted_at FROM actors WHERE ap_id = ?",
        (ap_id,),
    )


async def seed(services: Services) -> None:
    """A follower and an unprocessed activity, there before any test request."""
    store = services.store
    actor_id = await store.save_actor(
        ap_id=SEED_ACTOR,
        username="old",
        domain="seed.example",
        name="Old Follower",
        url=None,
        icon_url=None,
        inbox=SEED_ACTOR + "/inbox",
        shared_inbox="https://seed.example/inbox",
        key_id=SEED_ACTOR + "#main-key",
        public_key_pem=None,
        fetched=utcnow(),
    )
    await store.save_follower(
        actor_id=actor_id,
        follow_id="https://seed.example/follows/1",
        inbox=SEED_ACTOR + "/inbox",
        shared_inbox="https://seed.example/inbox",
        status="accepted",
    )
    like = {"id": SEED_ACTIVITY, "type": "Like", "actor": SEED_ACTOR, "object": BLOG_ACTOR}
    await store.save_inbox_items(
        [
            InboxItem(
                dedup_key=SEED_ACTIVITY, actor=SEED_ACTOR, type="Like", payload=json.dumps(like)
            )
        ]
    )


@dataclass
class Harness:
    client: httpx.AsyncClient
    services: Services
    remote: Fediverse
    database: Path | str  # the store's location: a SQLite file or a PostgreSQL URL
    before: Snapshot
    sent: list[httpx.Request]  # every outbound request of the app, as sent

    def serve(self, url: str, document: JsonObject) -> None:
        """Have the remote server of ``url`` answer it (fragment ignored) with ``document``."""
        self.remote.documents[url.split("#", 1)[0]] = document

    def serve_actor(self, account: Account) -> None:
        self.serve(account.id, account.document)

    def fetched(self, url: str | None = None) -> list[str]:
        """The URLs the blog requested (only ``url``, fragment ignored, when given)."""
        wanted = None if url is None else url.split("#", 1)[0]
        return [seen for _, seen in self.remote.requests if wanted in (None, seen)]

    async def post(
        self, body: bytes, headers: dict[str, str], path: str = SHARED_INBOX
    ) -> httpx.Response:
        return await self.client.post(path, content=body, headers=headers)

    def mark(self) -> None:
        """Take the rows as they are now as the baseline (after a test's own set-up)."""
        self.before = snapshot(self.database)

    async def assert_nothing_stored(self) -> None:
        """No row added or changed since the baseline; the seeded rows still there."""
        after = snapshot(self.database)
        assert after == self.before
        assert [row for row in after["inbox"] if SEED_ACTIVITY in row]
        follower = await self.services.store.get_follower(SEED_ACTOR)
        assert follower is not None
        assert follower.status == "accepted"


@functools.cache
def _blog_keys() -> dict[str, bytes]:
    with tempfile.TemporaryDirectory() as folder:
        ensure_keys(Path(folder))
        return {path.name: path.read_bytes() for path in Path(folder).glob("*.pem")}


def install_keys(keys_dir: Path) -> None:
    """The blog's and the instance's keys, made once per session (RSA is slow)."""
    keys_dir.mkdir(parents=True)
    for name, pem in _blog_keys().items():
        (keys_dir / name).write_bytes(pem)
        (keys_dir / name).chmod(0o600)


@asynccontextmanager
async def running(tmp_path: Path, **overrides: Any) -> AsyncIterator[Harness]:
    """The real app, its lifespan running, workers off, the remote faked, data seeded."""
    settings = make_settings(tmp_path, **overrides)
    install_keys(settings.keys_dir)
    remote = Fediverse()
    requests: list[httpx.Request] = []

    async def recorded(request: httpx.Request) -> httpx.Response:
        requests.append(request)  # headers included, which Fediverse does not keep
        return await remote_transport.handle_async_request(request)

    remote_transport = remote.transport()
    transport = httpx.MockTransport(recorded)
    async with running_app(settings, transport=transport, run_workers=False) as app:
        services: Services = app.state.services
        await seed(services)
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url=BASE_URL) as client:
            database = settings.store_location
            yield Harness(client, services, remote, database, snapshot(database), requests)


def assert_answer(response: httpx.Response, status: int, reason: str | re.Pattern[str]) -> None:
    """``status`` and exactly the one-line reason ``"<status>: <reason>\\n"``."""
    assert response.status_code == status, response.text
    pattern = reason if isinstance(reason, re.Pattern) else re.compile(re.escape(reason))
    assert re.fullmatch(f"{status}: (?:{pattern.pattern})\n", response.text), response.text
