"""Federation seen from outside: a fake Mastodon-like instance finds, follows and reads the blog.

Two ways of running the blog:

* ``test_end_to_end_over_real_sockets``: our server (``python -m fediblog serve``) and a
  fake remote instance (uvicorn in a thread), each on its own 127.0.0.1 port, plain http
  with FEDIBLOG_ALLOW_HTTP and FEDIBLOG_ALLOW_PRIVATE_ADDRESSES. Posts are written with
  the CLI in another process, as a user does.
* every other test: the app in-process with ``run_workers=False`` (the test runs
  ``process_once`` / ``deliver_once`` passes; time is driven through the Deliverer's
  clock, never slept), and fake instances reached through ``Internet``, an in-memory
  transport that maps host names to ASGI apps and refuses every other host, so nothing
  leaves the process.

The fake instances are built from captured payloads (tests/fixtures, provenance in
SOURCES.md) with their ids moved to the fake host and their keys replaced by throwaway
ones. Everything they send is signed by pyhttpsig, an independent draft-cavage
implementation, and everything they receive is verified by it (with the key our actor
document publishes) and its Digest recomputed with hashlib: fediblog's own httpsig module
is never used on the remote side, so one misreading of the spec cannot pass both ends.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from email.utils import formatdate, parsedate_to_datetime
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

import httpx
import pytest
import uvicorn
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from httpsig import HeaderVerifier
from httpsig.utils import parse_signature_header
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from fediblog.config import Settings, load_settings
from fediblog.delivery import MAX_ATTEMPTS, Deliverer
from fediblog.keys import ensure_keys, load_key
from fediblog.models import DeliveryState, utcnow
from fediblog.web.deps import Services
from tests.conftest import database_for
from tests.fediverse import header_signer
from tests.helpers import publish, running
from tests.processes import free_port, run_fediblog

JsonObject = dict[str, Any]
T = TypeVar("T")

FIXTURES = Path(__file__).parent / "fixtures"
FIXTURE_TEXT = {
    name: (FIXTURES / name).read_text(encoding="utf-8")
    for name in (
        "mastodon/actor_person.json",
        "mastodon/follow.json",
        "mastodon/undo_follow.json",
        "mastodon/delete_actor.json",
        "misskey/person.json",
        "misskey/undo_follow.json",
    )
}
# The actor id each actor fixture was captured with; it becomes the fake account's id.
FIXTURE_ACTOR_IDS = {
    "mastodon/actor_person.json": "https://masto.qa.urbanwildlife.biz/users/mastodon",
    "misskey/person.json": "https://misskey.usbharu.dev/users/9ghwhv9zgg",
}
FOLLOW_FIXTURE_ACTOR = "https://masto.asonix.dog/users/asonix"
FOLLOW_FIXTURE_TARGET = "https://ds9.lemmy.ml/c/testcom"

AP_JSON = "application/activity+json"
SIGNED_PARTS = ["(request-target)", "host", "date", "digest"]
BLOG = "https://blog.example"


# ---- captured payloads, moved to the test hosts ------------------------------------


def origin(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}"


def rehost(fixture: str, moves: dict[str, str]) -> JsonObject:
    """A fixture with URL prefixes replaced (longest first, so a host never clips an id)."""
    text = FIXTURE_TEXT[fixture]
    for old in sorted(moves, key=len, reverse=True):
        text = text.replace(old, moves[old])
    document: JsonObject = json.loads(text)
    return document


def sha256_digest(body: bytes) -> str:
    return "SHA-256=" + base64.b64encode(hashlib.sha256(body).digest()).decode("ascii")


@dataclass(frozen=True)
class Account:
    """A user of a fake instance: its actor document and its throwaway key."""

    name: str
    ap_id: str
    key_id: str
    inbox: str
    private_pem: bytes
    document: JsonObject


def mastodon_follow(account: Account, target: str) -> JsonObject:
    """Mastodon's Follow (fixture), sent by ``account`` to ``target``."""
    follow = rehost(
        "mastodon/follow.json",
        {
            FOLLOW_FIXTURE_ACTOR: account.ap_id,
            origin(FOLLOW_FIXTURE_ACTOR): origin(account.ap_id),
            FOLLOW_FIXTURE_TARGET: target,
        },
    )
    if account.name != "asonix":
        follow["id"] += f"-{account.name}"  # every follower's Follow has its own id
    return follow


def mastodon_undo_follow(account: Account, target: str) -> JsonObject:
    """Mastodon's Undo{Follow} (fixture): it embeds the Follow ``mastodon_follow`` sent."""
    assert account.name == "asonix", "the fixture's ids belong to @asonix"
    return rehost(
        "mastodon/undo_follow.json",
        {origin(FOLLOW_FIXTURE_ACTOR): origin(account.ap_id), FOLLOW_FIXTURE_TARGET: target},
    )


def misskey_undo_follow(account: Account, target: str) -> JsonObject:
    """Misskey's Undo{Follow} (fixture); its embedded Follow is what Misskey sent first."""
    undo = rehost(
        "misskey/undo_follow.json",
        {
            "https://misskey.usbharu.dev": origin(account.ap_id),
            "https://test-hideout.usbharu.dev/users/test": target,
        },
    )
    assert undo["actor"] == account.ap_id, "the fixture's ids belong to 97ws8y3rj6"
    return undo


# ---- pyhttpsig on the remote side --------------------------------------------------


def signed_post_headers(account: Account, url: str, body: bytes) -> dict[str, str]:
    """What a Mastodon-like server sends: rsa-sha256 over (request-target) host date digest."""
    target = urlsplit(url)
    headers = {
        "Host": target.netloc,
        "Date": formatdate(usegmt=True),
        "Digest": sha256_digest(body),
        "Content-Type": AP_JSON,
    }
    signer = header_signer(account.key_id, account.private_pem, "rsa-sha256", tuple(SIGNED_PARTS))
    return dict(signer.sign(headers, method="POST", path=target.path))


def pyhttpsig_verifies(
    method: str, target: str, headers: dict[str, str], public_pem: str, required: list[str]
) -> bool:
    try:
        verifier = HeaderVerifier(
            headers,
            public_pem,
            required_headers=required,
            method=method,
            path=target,
            sign_header="signature",
        )
        return bool(verifier.verify())
    except Exception:  # pyhttpsig raises bare Exception / KeyError for a missing part
        return False


def signature_key_id(headers: dict[str, str]) -> str:
    fields = parse_signature_header(headers.get("signature", ""))
    return str(fields["keyId"]) if "keyId" in fields else ""


@dataclass(frozen=True)
class Seen:
    """Any request that reached a fake instance."""

    method: str
    target: str
    headers: dict[str, str]


@dataclass(frozen=True)
class Delivery:
    """One POST to a fake inbox, and what the fake made of it."""

    path: str
    headers: dict[str, str]
    body: bytes
    key_id: str
    signature_ok: bool  # pyhttpsig verified it with the key the signer's actor publishes
    digest_ok: bool  # Digest is SHA-256 of the body as received
    host_ok: bool  # the signed Host is this instance
    content_type_ok: bool
    status: int  # what the fake answered

    @property
    def valid(self) -> bool:
        return self.signature_ok and self.digest_ok and self.host_ok and self.content_type_ok

    @property
    def activity(self) -> JsonObject:
        try:
            found = json.loads(self.body)
        except ValueError:
            return {}
        return found if isinstance(found, dict) else {}

    @property
    def accepted(self) -> bool:
        return 200 <= self.status < 300

    @property
    def date(self) -> datetime:
        return parsedate_to_datetime(self.headers["date"])


class FakeInstance:
    """A Mastodon-like server: actors from the real fixtures, inboxes that check signatures.

    ``key_client`` makes the HTTP client with which the fake fetches a signer's key
    (unsigned GET of the keyId, as Mastodon does) when ``blog_keys`` does not have it.
    """

    def __init__(self, base_url: str, key_client: Callable[[], httpx.AsyncClient]) -> None:
        self.base_url = base_url
        self.host = urlsplit(base_url).netloc
        self.accounts: dict[str, Account] = {}
        self.seen: list[Seen] = []
        self.deliveries: list[Delivery] = []
        self.answers: dict[str, tuple[int, dict[str, str]]] = {}  # inbox path -> answer
        self.default_answer: tuple[int, dict[str, str]] = (202, {})
        self.gone: set[str] = set()  # accounts deleted: their documents answer 410
        self.blog_keys: dict[str, str] = {}  # keyId -> PEM
        self.key_fetches = 0
        self._key_client = key_client
        self._app = Starlette(
            routes=[
                Route("/users/{name}", self._actor),
                Route("/users/{name}/inbox", self._inbox, methods=["POST"]),
                Route("/inbox", self._inbox, methods=["POST"]),
            ]
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            self.seen.append(Seen(scope["method"], _target(scope), _headers(scope)))
        await self._app(scope, receive, send)

    def add_account(
        self,
        name: str,
        *,
        fixture: str = "mastodon/actor_person.json",
        shared_inbox: bool = True,
        key_bits: int = 2048,
    ) -> Account:
        key = rsa.generate_private_key(public_exponent=65537, key_size=key_bits)
        captured = FIXTURE_ACTOR_IDS[fixture]
        ap_id = f"{self.base_url}/users/{name}"
        document = rehost(fixture, {captured: ap_id, origin(captured): self.base_url})
        document["preferredUsername"] = name
        document["publicKey"]["publicKeyPem"] = (
            key.public_key()
            .public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            )
            .decode("ascii")
        )
        if not shared_inbox:
            document.pop("endpoints", None)
            document.pop("sharedInbox", None)
        assert document["id"] == ap_id
        assert document["publicKey"]["owner"] == ap_id
        account = Account(
            name=name,
            ap_id=ap_id,
            key_id=document["publicKey"]["id"],
            inbox=document["inbox"],
            private_pem=key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            ),
            document=document,
        )
        self.accounts[name] = account
        return account

    def answer(self, status: int, path: str | None = None, **headers: str) -> None:
        """How the inboxes (or the inbox at ``path``) answer from now on."""
        if path is None:
            self.answers.clear()
            self.default_answer = (status, headers)
        else:
            self.answers[path] = (status, headers)

    def received(self, kind: str) -> list[Delivery]:
        return [d for d in self.deliveries if d.activity.get("type") == kind]

    def first(self, kind: str) -> Delivery | None:
        found = self.received(kind)
        return found[0] if found else None

    def forget_traffic(self) -> None:
        self.seen.clear()
        self.deliveries.clear()

    def summary(self) -> list[str]:
        return [f"{s.method} {s.target}" for s in self.seen] + [
            f"{d.path} {d.activity.get('type')} -> {d.status}, valid={d.valid}"
            for d in self.deliveries
        ]

    async def _actor(self, request: Request) -> Response:
        name = request.path_params["name"]
        if name in self.gone:
            return Response(status_code=410)
        account = self.accounts.get(name)
        if account is None:
            return Response(status_code=404)
        return Response(json.dumps(account.document), media_type=AP_JSON)

    async def _inbox(self, request: Request) -> Response:
        body = await request.body()
        headers = _headers(request.scope)
        target = _target(request.scope)
        key_id = signature_key_id(headers)
        pem = await self._blog_key(key_id) if key_id else None
        delivery = Delivery(
            path=target,
            headers=headers,
            body=body,
            key_id=key_id,
            signature_ok=pem is not None
            and pyhttpsig_verifies("POST", target, headers, pem, SIGNED_PARTS),
            digest_ok=headers.get("digest") == sha256_digest(body),
            host_ok=headers.get("host") == self.host,
            content_type_ok=headers.get("content-type", "").startswith(AP_JSON),
            status=0,
        )
        status, extra = self.answers.get(target, self.default_answer)
        if 200 <= status < 300 and not delivery.valid:
            status = 401
        self.deliveries.append(replace(delivery, status=status))
        return Response(status_code=status, headers=extra)

    async def _blog_key(self, key_id: str) -> str | None:
        if key_id not in self.blog_keys:
            self.key_fetches += 1
            async with self._key_client() as client:
                response = await client.get(key_id.partition("#")[0], headers={"Accept": AP_JSON})
            if response.status_code != 200:
                return None
            document = response.json()
            key = document.get("publicKey") or {}
            if key.get("id") != key_id or key.get("owner") != document.get("id"):
                return None
            self.blog_keys[key_id] = key["publicKeyPem"]
        return self.blog_keys[key_id]


def _headers(scope: Scope) -> dict[str, str]:
    return {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}


def _target(scope: Scope) -> str:
    raw: bytes = scope.get("raw_path") or scope["path"].encode()
    query: bytes = scope.get("query_string", b"")
    return raw.decode("latin-1") + ("?" + query.decode("latin-1") if query else "")


def assert_from_blog(delivery: Delivery, urls_actor: str) -> None:
    """Signed by the blog actor's key (verified by pyhttpsig), for the blog actor."""
    assert delivery.valid, delivery
    assert delivery.key_id == f"{urls_actor}#main-key"
    assert delivery.activity["actor"] == urls_actor


# ---- in-process: the blog, fake instances, and an in-memory network ---------------


class Internet(httpx.AsyncBaseTransport):
    """Host name -> ASGI app, in memory; any other host cannot be reached."""

    def __init__(self) -> None:
        self.hosts: dict[str, Any] = {}

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        app = self.hosts.get(request.url.netloc.decode("ascii"))
        if app is None:
            raise httpx.ConnectError(f"no such host: {request.url.host}", request=request)
        return await httpx.ASGITransport(app=app).handle_async_request(request)


@dataclass
class Clock:
    now: datetime

    def __call__(self) -> datetime:
        return self.now


class World:
    """The blog (in-process, workers off) and fake instances on one in-memory network."""

    def __init__(self, tmp_path: Path, **overrides: Any) -> None:
        self.internet = Internet()
        self.settings: Settings = load_settings(
            {"FEDIBLOG_CONFIG": str(tmp_path / "absent.toml")},
            base_url=BLOG,
            database=database_for(tmp_path, "blog.db"),
            keys_dir=tmp_path / "keys",
            **overrides,
        )
        ensure_keys(self.settings.keys_dir)
        self.client = httpx.AsyncClient(transport=self.internet, timeout=10)
        self._services: Services | None = None

    @property
    def services(self) -> Services:
        assert self._services is not None, "the blog is not running"
        return self._services

    def fake(self, host: str) -> FakeInstance:
        fake = FakeInstance(
            f"https://{host}", key_client=lambda: httpx.AsyncClient(transport=self.internet)
        )
        self.internet.hosts[host] = fake
        return fake

    @asynccontextmanager
    async def blog(self) -> AsyncIterator[Services]:
        """Start the app (lifespan) on the database; stop it at the end of the block."""
        async with running(self.settings, transport=self.internet, run_workers=False) as app:
            self._services = app.state.services
            self.internet.hosts[self.settings.host] = app
            try:
                yield self.services
            finally:
                del self.internet.hosts[self.settings.host]
                self._services = None

    async def send(
        self, account: Account, activity: JsonObject, *, shared: bool = False
    ) -> httpx.Response:
        urls = self.services.urls
        inbox = urls.shared_inbox if shared else urls.inbox
        body = json.dumps(activity).encode()
        return await self.client.post(
            inbox, content=body, headers=signed_post_headers(account, inbox, body)
        )

    async def follow(self, account: Account, follow: JsonObject | None = None) -> JsonObject:
        """``account`` follows the blog through the real inbox; the Follow is processed."""
        follow = follow or mastodon_follow(account, self.services.urls.actor)
        response = await self.send(account, follow)
        assert response.status_code == 202, response.text
        await self.services.inbox.process_once()
        assert (await self.services.store.count_inbox()).get("failed", 0) == 0
        return follow

    def deliverer_at(self, clock: Clock) -> Deliverer:
        """The app's queue and key with time in the test's hands (Deliverer's clock seam)."""
        services = self.services
        key = load_key(services.settings.keys_dir, "blog")
        return Deliverer(services.store, self.client, key, services.urls.key_id, clock=clock)

    async def rows(self, kind: str) -> list[DeliveryState]:
        statuses = ("queued", "sent", "failed", "dead")
        rows = await self.services.store.list_deliveries(statuses, limit=1000)
        return [row for row in rows if row.type == kind]


@pytest.fixture
async def world(tmp_path: Path) -> AsyncIterator[World]:
    world = World(tmp_path)
    async with world.client, world.blog():
        yield world


# ---- 1. end to end over real sockets ---------------------------------------------------


def wait_for(find: Callable[[], T | None], what: str, context: Callable[[], str]) -> T:
    deadline = time.monotonic() + 10
    while True:
        found = find()
        if found:
            return found
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}\n{context()}")
        time.sleep(0.05)


@contextlib.contextmanager
def serving(app: Any, port: int) -> Iterator[None]:
    """uvicorn on 127.0.0.1:port in a background thread."""
    config = uvicorn.Config(
        app, host="127.0.0.1", port=port, lifespan="off", log_level="warning", access_log=False
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name=f"fake-{port}", daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise AssertionError("the fake instance did not start")
        time.sleep(0.01)
    try:
        yield
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def blog_env(folder: Path, base_url: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FEDIBLOG_")}
    env.update(
        FEDIBLOG_CONFIG=str(folder / "absent.toml"),
        FEDIBLOG_BASE_URL=base_url,
        FEDIBLOG_ALLOW_HTTP="1",
        FEDIBLOG_ALLOW_PRIVATE_ADDRESSES="1",
        FEDIBLOG_DATABASE=str(database_for(folder, "blog.db")),
        FEDIBLOG_KEYS_DIR=str(folder / "keys"),
    )
    return env


@contextlib.contextmanager
def blog_server(env: dict[str, str], folder: Path, port: int) -> Iterator[Path]:
    """`fediblog serve` on 127.0.0.1:port; yields its log file; SIGINT at the end."""
    log = folder / "server.log"
    with log.open("wb") as sink:
        process = subprocess.Popen(
            [sys.executable, "-m", "fediblog", "serve", "--port", str(port)],
            env=env,
            cwd=folder,
            stdout=sink,
            stderr=subprocess.STDOUT,
        )
        try:
            deadline = time.monotonic() + 20
            while True:
                try:
                    httpx.get(f"http://127.0.0.1:{port}/about", timeout=1, trust_env=False)
                    break
                except httpx.TransportError:
                    if process.poll() is not None or time.monotonic() > deadline:
                        message = f"the server did not start:\n{log.read_text()}"
                        raise AssertionError(message) from None
                    time.sleep(0.05)
            yield log
        finally:
            process.send_signal(signal.SIGINT)
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


POST_FILE = """---
title: Hello, fediverse
summary: The first post.
tags: [python, fediverse]
---
The first **post** of this blog.
"""
EDITED_POST_FILE = """---
title: Hello, fediverse
summary: The first post, edited.
tags: [python, fediverse]
---
The first **post** of this blog, now edited.
"""


def test_end_to_end_over_real_sockets(tmp_path: Path) -> None:
    port, fake_port = free_port(), free_port()
    base = f"http://127.0.0.1:{port}"
    fake = FakeInstance(
        f"http://127.0.0.1:{fake_port}",
        key_client=lambda: httpx.AsyncClient(trust_env=False, timeout=5),
    )
    follower = fake.add_account("asonix")
    env = blog_env(tmp_path, base)
    run_fediblog(tmp_path, env, "init")
    started = datetime.now(UTC)

    with (
        serving(fake, fake_port),
        blog_server(env, tmp_path, port) as log,
        httpx.Client(trust_env=False, timeout=10) as http,
    ):

        def context() -> str:
            return f"fake saw: {fake.summary()}\nserver log:\n{log.read_text()[-4000:]}"

        # WebFinger, as Mastodon's search does it.
        acct = f"acct:blog@127.0.0.1:{port}"
        found = http.get(f"{base}/.well-known/webfinger", params={"resource": acct})
        assert found.status_code == 200
        assert found.headers["content-type"].startswith("application/jrd+json")
        assert found.json()["subject"] == acct
        (self_link,) = [link for link in found.json()["links"] if link["rel"] == "self"]
        assert self_link["type"] == AP_JSON
        actor_url = self_link["href"]
        assert actor_url == f"{base}/users/blog"

        # The actor; the fake keeps its key, as Mastodon caches a discovered account.
        found = http.get(actor_url, headers={"Accept": AP_JSON})
        assert found.status_code == 200
        assert found.headers["content-type"].startswith(AP_JSON)
        actor = found.json()
        assert actor["id"] == actor_url
        assert actor["inbox"] == f"{actor_url}/inbox"
        public_key = actor["publicKey"]
        assert public_key["id"] == f"{actor_url}#main-key"
        assert public_key["owner"] == actor_url
        loaded = serialization.load_pem_public_key(public_key["publicKeyPem"].encode())
        assert isinstance(loaded, rsa.RSAPublicKey)
        fake.blog_keys[public_key["id"]] = public_key["publicKeyPem"]

        # Follow -> a signed Accept at the follower's own inbox.
        follow = mastodon_follow(follower, actor_url)
        body = json.dumps(follow).encode()
        answer = http.post(
            actor["inbox"],
            content=body,
            headers=signed_post_headers(follower, actor["inbox"], body),
        )
        assert answer.status_code == 202, answer.text
        accept = wait_for(lambda: fake.first("Accept"), "the Accept", context)
        assert_from_blog(accept, actor_url)
        assert accept.path == "/users/asonix/inbox"
        assert accept.activity["object"]["id"] == follow["id"]
        assert accept.activity["object"]["actor"] == follower.ap_id
        # To check the Follow, the server fetched the follower, signed by its instance actor.
        instance = http.get(f"{base}/actor", headers={"Accept": AP_JSON}).json()
        fetches = [s for s in fake.seen if s.method == "GET" and s.target == "/users/asonix"]
        assert fetches, context()
        for fetch in fetches:
            assert signature_key_id(fetch.headers) == instance["publicKey"]["id"]
            assert pyhttpsig_verifies(
                "GET",
                fetch.target,
                fetch.headers,
                instance["publicKey"]["publicKeyPem"],
                ["(request-target)", "host", "date"],
            )

        # A post published by the CLI, in another process, while the server runs.
        post_file = tmp_path / "hello.md"
        post_file.write_text(POST_FILE, encoding="utf-8")
        page_url = f"{base}/posts/hello-fediverse"
        assert page_url in run_fediblog(tmp_path, env, "post", "new", str(post_file))
        create = wait_for(lambda: fake.first("Create"), "the Create", context)
        assert_from_blog(create, actor_url)
        assert create.path == "/inbox"  # the follower's server offers a shared inbox
        article = create.activity["object"]
        assert re.fullmatch(rf"{re.escape(base)}/p/[0-9a-f]+", article["id"])
        assert article["url"] == page_url
        served = http.get(article["id"], headers={"Accept": AP_JSON})
        assert served.status_code == 200
        assert served.headers["content-type"].startswith(AP_JSON)
        assert {k: v for k, v in served.json().items() if k != "@context"} == article
        page = http.get(page_url)
        assert page.status_code == 200
        assert page.headers["content-type"].startswith("text/html")
        assert f'type="application/activity+json" href="{article["id"]}"' in page.text

        # Edit -> Update of the same object.
        post_file.write_text(EDITED_POST_FILE, encoding="utf-8")
        run_fediblog(tmp_path, env, "post", "edit", "hello-fediverse", str(post_file))
        update = wait_for(lambda: fake.first("Update"), "the Update", context)
        assert_from_blog(update, actor_url)
        assert update.activity["object"]["id"] == article["id"]
        assert "now edited" in update.activity["object"]["content"]
        assert update.activity["object"]["updated"]

        # Delete -> Delete of the object, which then answers 410 with a Tombstone.
        run_fediblog(tmp_path, env, "post", "delete", "hello-fediverse")
        delete = wait_for(lambda: fake.first("Delete"), "the Delete", context)
        assert_from_blog(delete, actor_url)
        assert delete.activity["object"]["id"] == article["id"]
        gone = http.get(article["id"], headers={"Accept": AP_JSON})
        assert gone.status_code == 410
        assert gone.json()["type"] == "Tombstone"

    # Each activity arrived once, fresh, and the key found by discovery verified them all.
    assert [d.activity["type"] for d in fake.deliveries] == ["Accept", "Create", "Update", "Delete"]
    assert all(d.status == 202 for d in fake.deliveries)
    assert fake.key_fetches == 0
    window = timedelta(minutes=5)
    assert all(started - window < d.date < datetime.now(UTC) + window for d in fake.deliveries)


# ---- 2. a restart loses nothing and sends nothing twice ---------------------------------


@pytest.mark.anyio
async def test_restart_delivers_every_queued_activity_exactly_once(tmp_path: Path) -> None:
    world = World(tmp_path)
    fake = world.fake("mastodon.test")
    follower = fake.add_account("asonix")
    fake.answer(503)  # the follower's server is down

    async with world.client:
        async with world.blog() as services:
            await world.follow(follower)
            post = await publish(services, "Written while they were down")
            assert await services.deliverer.deliver_once() == 2  # the Accept and the Create
        # The first server is stopped: only its database rows remain.
        refused = list(fake.deliveries)
        assert [d.status for d in refused] == [503, 503]
        assert all(d.valid for d in refused)
        # Sent side by side, so either may have been refused first.
        (accept_id,) = [d.activity["id"] for d in refused if d.activity["type"] == "Accept"]

        fake.answer(202)  # the follower's server is back
        fake.blog_keys.clear()  # and fetches our key again, from the restarted server
        fetches_before_restart = fake.key_fetches
        async with world.blog() as services:
            queued = await services.store.list_deliveries(["queued"])
            assert sorted(row.type for row in queued) == ["Accept", "Create"]
            assert {row.attempts for row in queued} == {1}
            # Their back-off survived the restart: nothing is due yet.
            assert await services.deliverer.deliver_once() == 0
            clock = Clock(utcnow() + timedelta(minutes=1))  # after the first back-off
            deliverer = world.deliverer_at(clock)
            assert await deliverer.deliver_once() == 2
            for _ in range(3):  # later passes, days later, send nothing again
                clock.now += timedelta(days=1)
                assert await deliverer.deliver_once() == 0
            assert await services.deliverer.deliver_once() == 0
            assert await services.store.count_deliveries() == {"sent": 2}
            create_id = services.urls.object_id(post.uid) + "/activity"

    arrived = [d for d in fake.deliveries if d.accepted]
    assert all(d.valid for d in arrived)
    assert Counter((d.activity["type"], d.activity["id"]) for d in arrived) == {
        ("Accept", accept_id): 1,
        ("Create", create_id): 1,
    }
    assert fake.key_fetches > fetches_before_restart  # the restarted server's key verified


# ---- 3. followers coming and going -------------------------------------------------


@pytest.mark.anyio
@pytest.mark.parametrize("server", ["mastodon", "misskey"])
async def test_undo_follow_removes_the_follower(world: World, server: str) -> None:
    blog = world.services.urls.actor
    witness = world.fake("witness.test")
    await world.follow(witness.add_account("asonix"))
    if server == "mastodon":
        fake = world.fake("mastodon.test")
        follower = fake.add_account("asonix")
        undo = mastodon_undo_follow(follower, blog)
        await world.follow(follower)
    else:  # Misskey: 4096-bit keys; its first Follow is the one its Undo embeds
        fake = world.fake("misskey.test")
        follower = fake.add_account("97ws8y3rj6", fixture="misskey/person.json", key_bits=4096)
        undo = misskey_undo_follow(follower, blog)
        await world.follow(follower, {"@context": undo["@context"], **undo["object"]})
    assert (await world.services.store.get_follower(follower.ap_id)) is not None
    assert await world.services.deliverer.deliver_once() == 2  # both Accepts

    response = await world.send(follower, undo)
    assert response.status_code == 202
    await world.services.inbox.process_once()

    assert await world.services.store.get_follower(follower.ap_id) is None
    assert await world.services.store.get_follower(witness.accounts["asonix"].ap_id) is not None
    fake.forget_traffic()
    witness.forget_traffic()
    await publish(world.services, "After the unfollow")
    assert await world.services.deliverer.deliver_once() == 1
    assert fake.deliveries == []
    (create,) = witness.deliveries
    assert create.activity["type"] == "Create"
    assert create.valid


@pytest.mark.anyio
async def test_delete_of_the_actor_removes_the_follower_without_any_fetch(world: World) -> None:
    fake = world.fake("mastodon.test")
    admin = fake.add_account("admin")
    await world.follow(admin)
    assert await world.services.deliverer.deliver_once() == 1
    (accept,) = fake.received("Accept")
    assert_from_blog(accept, world.services.urls.actor)
    delete = rehost("mastodon/delete_actor.json", {"http://mastodon.example.org": fake.base_url})
    assert delete["actor"] == delete["object"]["id"] == admin.ap_id
    fake.gone.add("admin")  # as on Mastodon: the account's URL now answers 410
    fake.forget_traffic()

    response = await world.send(admin, delete, shared=True)
    assert response.status_code == 202, response.text
    assert await world.services.inbox.process_once() == 1

    assert await world.services.store.get_follower(admin.ap_id) is None
    assert await world.services.store.count_inbox() == {"done": 2}
    await publish(world.services, "Nobody left to tell")
    assert await world.services.deliverer.deliver_once() == 0
    assert fake.seen == []  # nothing was fetched from the deleted account's server


@pytest.mark.anyio
async def test_manual_approval_keeps_the_follow_pending_without_an_accept(
    tmp_path: Path,
) -> None:
    world = World(tmp_path, manually_approves_followers=True)
    fake = world.fake("mastodon.test")
    follower = fake.add_account("asonix")
    async with world.client, world.blog() as services:
        actor = await world.client.get(services.urls.actor, headers={"Accept": AP_JSON})
        assert actor.json()["manuallyApprovesFollowers"] is True

        await world.follow(follower)

        found = await services.store.get_follower(follower.ap_id)
        assert found is not None
        assert found.status == "pending"
        assert await services.store.count_deliveries() == {}  # no Accept queued
        await publish(services, "Not for pending followers")
        assert await services.store.count_deliveries() == {}
        assert await services.deliverer.deliver_once() == 0
    assert fake.deliveries == []


# ---- 4. delivery ------------------------------------------------------------------


@pytest.mark.anyio
async def test_a_post_takes_one_request_per_shared_inbox(world: World) -> None:
    mastodon = world.fake("mastodon.test")
    followers = [mastodon.add_account(name) for name in ("asonix", "bea", "cyd")]
    other = world.fake("other.test")
    followers.append(other.add_account("dee"))
    for follower in followers:
        await world.follow(follower)
    assert await world.services.deliverer.deliver_once() == 4  # Accepts, one per follower
    mastodon.forget_traffic()
    other.forget_traffic()

    post = await publish(world.services, "One request per server")
    assert await world.services.deliverer.deliver_once() == 2

    creates = await world.rows("Create")
    assert sorted(row.inbox for row in creates) == [
        "https://mastodon.test/inbox",
        "https://other.test/inbox",
    ]
    for fake in (mastodon, other):
        (create,) = fake.deliveries  # one POST, so one signature, for the whole server
        assert create.path == "/inbox"
        assert_from_blog(create, world.services.urls.actor)
        assert create.activity["object"]["id"] == world.services.urls.object_id(post.uid)
    assert await world.services.store.count_followers() == 4


@pytest.mark.anyio
async def test_410_from_an_inbox_removes_the_followers_there(world: World) -> None:
    gone = world.fake("gone.test")
    leaving = [gone.add_account(name) for name in ("asonix", "bea")]
    alive = world.fake("alive.test")
    staying = alive.add_account("cyd")
    for follower in [*leaving, staying]:
        await world.follow(follower)
    assert await world.services.deliverer.deliver_once() == 3
    gone.answer(410, "/inbox")

    await publish(world.services, "Anyone there?")
    assert await world.services.deliverer.deliver_once() == 2

    (failed,) = [row for row in await world.rows("Create") if row.status == "failed"]
    assert (failed.inbox, failed.last_error) == ("https://gone.test/inbox", "410 Gone")
    for follower in leaving:
        assert await world.services.store.get_follower(follower.ap_id) is None
    assert await world.services.store.get_follower(staying.ap_id) is not None
    gone.forget_traffic()
    await publish(world.services, "Only for those still here")
    assert await world.services.deliverer.deliver_once() == 1
    assert gone.deliveries == []
    assert [d.activity["type"] for d in alive.deliveries] == ["Accept", "Create", "Create"]
    assert all(d.valid for d in alive.deliveries)


@pytest.mark.anyio
async def test_400_is_final(world: World) -> None:
    fake = world.fake("strict.test")
    follower = fake.add_account("asonix")
    await world.follow(follower)
    assert await world.services.deliverer.deliver_once() == 1
    fake.answer(400)

    await publish(world.services, "Refused")
    clock = Clock(utcnow())
    deliverer = world.deliverer_at(clock)
    assert await deliverer.deliver_once() == 1

    (row,) = await world.rows("Create")
    assert (row.status, row.attempts, row.last_error) == ("failed", 1, "HTTP 400")
    clock.now += timedelta(days=7)
    assert await deliverer.deliver_once() == 0  # never retried
    assert len(fake.received("Create")) == 1
    assert await world.services.store.get_follower(follower.ap_id) is not None  # not removed


@pytest.mark.anyio
async def test_429_is_retried_no_earlier_than_retry_after(world: World) -> None:
    fake = world.fake("busy.test")
    await world.follow(fake.add_account("asonix"))
    assert await world.services.deliverer.deliver_once() == 1
    fake.answer(429, **{"Retry-After": "120"})

    await publish(world.services, "Slow down")
    start = utcnow()
    clock = Clock(start)
    deliverer = world.deliverer_at(clock)
    assert await deliverer.deliver_once() == 1

    (row,) = await world.rows("Create")
    assert (row.status, row.attempts, row.last_error) == ("queued", 1, "HTTP 429")
    # The first back-off alone would be 24-36 s; Retry-After says 120.
    assert row.next_attempt - start >= timedelta(seconds=120)
    clock.now = start + timedelta(seconds=119)
    assert await deliverer.deliver_once() == 0
    fake.answer(202)
    clock.now = row.next_attempt
    assert await deliverer.deliver_once() == 1
    (row,) = await world.rows("Create")
    assert (row.status, row.attempts) == ("sent", 2)
    assert [d.status for d in fake.received("Create")] == [429, 202]


@pytest.mark.anyio
async def test_an_inbox_that_never_answers_is_dead_after_16_attempts(world: World) -> None:
    fake = world.fake("down.test")
    await world.follow(fake.add_account("asonix"))
    assert await world.services.deliverer.deliver_once() == 1
    fake.answer(503)

    await publish(world.services, "Into the void")
    start = utcnow()
    clock = Clock(start)
    deliverer = world.deliverer_at(clock)
    for _ in range(16):
        (row,) = await world.rows("Create")
        assert row.status == "queued"
        clock.now = max(clock.now, row.next_attempt)
        assert await deliverer.deliver_once() == 1

    (row,) = await world.rows("Create")
    assert (row.status, row.attempts, row.last_error) == ("dead", 16, "HTTP 503")
    assert MAX_ATTEMPTS == 16
    assert timedelta(days=1.5) < clock.now - start < timedelta(days=3)  # about two days
    clock.now += timedelta(days=30)
    assert await deliverer.deliver_once() == 0
    attempts = fake.received("Create")
    assert len(attempts) == 16
    assert all(d.valid for d in attempts)
    assert len({d.headers["signature"] for d in attempts}) == 16  # each attempt signed afresh
    assert len({d.date for d in attempts}) == 16
