"""Federation with real servers, as the first hour with GoToSocial, Fedify and
fediverse-pasture showed it (issue 11): TLS trust beyond certifi, actors without
``preferredUsername``, the instance actor's outbox, ``/authorize_interaction`` and old
slugs asked for by servers."""

from __future__ import annotations

import asyncio
import datetime
import functools
import ipaddress
import json
import shutil
import ssl
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any
from xml.etree import ElementTree

import anyio
import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fediblog.activitystreams import mention_html, parse_actor
from fediblog.blog import parse_post
from fediblog.config import Settings
from fediblog.errors import BlockedAddress, ConfigError, FetchUnreachable
from fediblog.models import Mentioned
from fediblog.netguard import trusted_context
from fediblog.remote import Fetcher, FetchPolicy, build_transport
from fediblog.web.deps import Services
from tests.conftest import BASE_URL, database_for, deliver, make_settings
from tests.fediverse import AP_TYPE, Fediverse, RemoteActor, public_pem, remote_key, signed_headers
from tests.helpers import publish, run, running, soup

pytestmark = pytest.mark.anyio

AP_ACCEPT = {"Accept": "application/activity+json"}
ATOM = "{http://www.w3.org/2005/Atom}"


@pytest.fixture
def settings(blog_dir: Path) -> Settings:
    """The app's settings on the CLI's own database, so `fediblog` commands see it."""
    return make_settings(
        blog_dir, database=database_for(blog_dir, "fediblog.db"), keys_dir=blog_dir / "keys"
    )


# ---- TLS: the machine's trust store and SSL_CERT_FILE / SSL_CERT_DIR ----------------------


def _name(text: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, text)])


@pytest.fixture(scope="module")
def private_ca(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A throwaway CA (in no trust store) and its certificate for 127.0.0.1."""
    folder = tmp_path_factory.mktemp("ca")
    now = datetime.datetime.now(datetime.UTC)
    ca_key, leaf_key = (
        ec.generate_private_key(ec.SECP256R1()),
        ec.generate_private_key(ec.SECP256R1()),
    )
    ski = x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key())
    ca = (
        x509.CertificateBuilder()
        .subject_name(_name("fediblog test CA"))
        .issuer_name(_name("fediblog test CA"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(ski, critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    leaf = (
        x509.CertificateBuilder()
        .subject_name(_name("127.0.0.1"))
        .issuer_name(ca.subject)
        .public_key(leaf_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    paths = {
        "ca": folder / "ca.pem",
        "cert": folder / "server.pem",
        "key": folder / "server.key",
    }
    paths["ca"].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths["cert"].write_bytes(leaf.public_bytes(serialization.Encoding.PEM))
    paths["key"].write_bytes(
        leaf_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return paths


@asynccontextmanager
async def https_server(
    ca: dict[str, Path], documents: dict[str, dict[str, Any]] | None = None
) -> AsyncIterator[str]:
    """An HTTPS server on 127.0.0.1 with the private CA's certificate. It answers each
    path of ``documents`` with that document (others: 404), or, without ``documents``,
    every path with an actor document whose id is that URL. Yields its base URL."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(ca["cert"], ca["key"])
    base = ""

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            path = head.split(b" ", 2)[1].decode().split("?")[0]
            found = {"id": base + path, "type": "Application"} if documents is None else None
            found = documents.get(path) if documents is not None else found
            status = b"200 OK" if found is not None else b"404 Not Found"
            body = json.dumps(found).encode() if found is not None else b"not found"
            writer.write(
                b"HTTP/1.1 " + status + b"\r\nContent-Type: " + AP_TYPE.encode() + b"\r\n"
                b"Content-Length: "
                + str(len(body)).encode()
                + b"\r\nConnection: close\r\n\r\n"
                + body
            )
            await writer.drain()
        except (OSError, asyncio.IncompleteReadError, ssl.SSLError):
            pass  # the client refused our certificate: that is the point of some tests
        finally:
            writer.close()

    server = await asyncio.start_server(answer, "127.0.0.1", 0, ssl=context)
    base = f"https://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    try:
        yield base
    finally:
        server.close()
        await server.wait_closed()


async def fetch_actor(url: str, policy: FetchPolicy) -> dict[str, Any]:
    """A GET through the real outbound path: build_transport (the SSRF guard) and Fetcher."""
    async with httpx.AsyncClient(transport=build_transport(policy)) as client:
        return await Fetcher(client, policy).fetch_document(url)


LOOPBACK = FetchPolicy(allow_private_addresses=True)


async def test_a_private_ca_is_refused_with_a_clear_certificate_error(
    private_ca: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("SSL_CERT_FILE", raising=False)
    monkeypatch.delenv("SSL_CERT_DIR", raising=False)
    async with https_server(private_ca) as base:
        with pytest.raises(FetchUnreachable) as refused:
            await fetch_actor(base + "/actor", LOOPBACK)
    reason = str(refused.value)
    assert "the TLS certificate of 127.0.0.1 is not trusted" in reason
    assert "unable to get local issuer certificate" in reason
    assert "SSL_CERT_FILE" in reason


async def test_ssl_cert_file_makes_a_private_ca_trusted(
    private_ca: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SSL_CERT_FILE", str(private_ca["ca"]))
    monkeypatch.delenv("SSL_CERT_DIR", raising=False)
    async with https_server(private_ca) as base:
        document = await fetch_actor(base + "/actor", LOOPBACK)
    assert document["id"] == base + "/actor"


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs openssl rehash")
async def test_ssl_cert_dir_makes_a_private_ca_trusted(
    private_ca: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = tmp_path / "certs"
    folder.mkdir()
    shutil.copy(private_ca["ca"], folder / "test-ca.pem")
    await anyio.run_process(["openssl", "rehash", str(folder)])
    monkeypatch.delenv("SSL_CERT_FILE", raising=False)
    monkeypatch.setenv("SSL_CERT_DIR", str(folder))
    async with https_server(private_ca) as base:
        document = await fetch_actor(base + "/actor", LOOPBACK)
    assert document["id"] == base + "/actor"


async def test_a_trusted_certificate_does_not_open_the_ssrf_guard(
    private_ca: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Production policy: loopback stays refused, before any TLS, however trusted."""
    monkeypatch.setenv("SSL_CERT_FILE", str(private_ca["ca"]))
    async with https_server(private_ca) as base:
        with pytest.raises(BlockedAddress):
            await fetch_actor(base + "/actor", FetchPolicy())


async def test_a_follow_from_a_server_with_a_private_ca(
    private_ca: dict[str, Path],
    tmp_path: Path,
    blog_keys: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """GoToSocial behind a self-hosted CA: its Follow is refused (401) while the CA is not
    trusted, the operator is warned, and it is accepted once SSL_CERT_FILE names the CA.
    The blog's real transport fetches the signing key over TLS."""
    key = remote_key(0)
    documents: dict[str, dict[str, Any]] = {}
    settings = make_settings(tmp_path, keys_dir=blog_keys, allow_private_addresses=True)
    monkeypatch.delenv("SSL_CERT_FILE", raising=False)
    monkeypatch.delenv("SSL_CERT_DIR", raising=False)
    statuses: list[tuple[int, str]] = []
    async with https_server(private_ca, documents) as base:
        actor = base + "/users/zork"
        documents["/users/zork"] = {
            "@context": ["https://www.w3.org/ns/activitystreams", "https://w3id.org/security/v1"],
            "id": actor,
            "type": "Person",
            "preferredUsername": "zork",
            "inbox": actor + "/inbox",
            "publicKey": {
                "id": actor + "#main-key",
                "owner": actor,
                "publicKeyPem": public_pem(key),
            },
        }
        for number, trusted in enumerate((False, True)):
            if trusted:
                monkeypatch.setenv("SSL_CERT_FILE", str(private_ca["ca"]))
            follow = {
                "@context": "https://www.w3.org/ns/activitystreams",
                "id": f"{actor}/follows/{number}",
                "type": "Follow",
                "actor": actor,
                "object": BASE_URL + "/users/blog",
            }
            body = json.dumps(follow).encode()
            headers = signed_headers(actor + "#main-key", key, BASE_URL + "/inbox", body)
            async with running(settings, run_workers=False) as app:
                transport = httpx.ASGITransport(app=app)
                async with httpx.AsyncClient(transport=transport, base_url=BASE_URL) as web:
                    response = await web.post("/inbox", content=body, headers=headers)
            statuses.append((response.status_code, response.text))

    assert statuses == [(401, "401: the signing key could not be fetched\n"), (202, "")]
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert [w for w in warnings if "TLS certificate of 127.0.0.1 is not trusted" in w] != []


def test_the_system_trust_store_is_used_not_certifi() -> None:
    import truststore

    assert isinstance(trusted_context({}), truststore.SSLContext)


@pytest.mark.parametrize("variable", ["SSL_CERT_FILE", "SSL_CERT_DIR"])
def test_a_missing_ssl_cert_path_is_named_at_start_up(variable: str, tmp_path: Path) -> None:
    missing = tmp_path / "nowhere.pem"
    with pytest.raises(ConfigError, match=f"{variable}: {missing} does not exist"):
        trusted_context({variable: str(missing)})


def test_serve_names_a_missing_ssl_cert_file_in_one_line(
    blog_dir: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    assert run(capsys, "init")[0] == 0
    monkeypatch.setenv("SSL_CERT_FILE", str(blog_dir / "company-ca.pem"))

    code, _, err = run(capsys, "serve", "--port", "0")

    assert code == 2
    assert err.strip().splitlines() == [
        f"fediblog: configuration error: SSL_CERT_FILE: {blog_dir / 'company-ca.pem'}"
        " does not exist"
    ]


def test_an_ssl_cert_file_with_no_certificate_is_refused(tmp_path: Path) -> None:
    empty = tmp_path / "empty.pem"
    empty.write_text("not a certificate\n")
    with pytest.raises(ConfigError, match="holds no usable certificate"):
        trusted_context({"SSL_CERT_FILE": str(empty)})


# ---- actors without preferredUsername -----------------------------------------------------


def no_username(fediverse: Fediverse, actor: RemoteActor, *, name: str | None) -> None:
    """Serve ``actor`` as fediverse-pasture's "not resolvable by WebFinger" persona does:
    no ``preferredUsername`` at all (and here, optionally, no name either)."""
    document = actor.document()
    del document["preferredUsername"]
    if name is None:
        del document["name"]
    else:
        document["name"] = name
    fediverse.documents[actor.id] = document


async def cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    """`fediblog ARGS…` against the same database, while the app runs."""
    return await anyio.to_thread.run_sync(functools.partial(run, capsys, *args))


async def test_a_reply_from_an_actor_without_username_is_shown_by_its_name(
    web: httpx.AsyncClient,
    ctx: Services,
    fediverse: Fediverse,
    capsys: pytest.CaptureFixture[str],
) -> None:
    post = await publish(ctx, "Pasture")
    persona = fediverse.add("pasture.example", "nowebfinger")
    no_username(fediverse, persona, name="The Unresolvable")
    note = persona.note(1, ctx.blog.object_id(post.uid), "hello without a handle")

    response = await deliver(web, ctx, persona, persona.create(note))

    assert response.status_code == 202
    page = soup((await web.get(f"/posts/{post.slug}")).text)
    comment = page.select_one(".comment")
    assert comment is not None
    author = comment.select_one(".author")
    assert author is not None
    assert author.get_text() == "The Unresolvable"
    assert author["href"] == "https://pasture.example/@nowebfinger"
    assert comment.select(".handle") == []  # no handle made up
    assert "@nowebfinger@" not in page.text
    assert "hello without a handle" in comment.text

    atom = await web.get(f"/posts/{post.slug}/responses.atom")
    entry = ElementTree.fromstring(atom.content).find(f"{ATOM}entry")
    assert entry is not None
    assert entry.findtext(f"{ATOM}author/{ATOM}name") == "The Unresolvable"

    code, out, _ = await cli(capsys, "comments", "list")
    assert code == 0
    assert "pasture.example/users/nowebfinger: hello without a handle" in out
    assert "@@" not in out
    assert "@nowebfinger@" not in out


async def test_an_actor_with_neither_username_nor_name_is_shown_by_its_id(
    web: httpx.AsyncClient, ctx: Services, fediverse: Fediverse
) -> None:
    post = await publish(ctx, "Pasture, nameless")
    persona = fediverse.add("pasture.example", "nameless")
    no_username(fediverse, persona, name=None)

    response = await deliver(
        web, ctx, persona, persona.create(persona.note(1, ctx.blog.object_id(post.uid), "hi"))
    )

    assert response.status_code == 202
    page = soup((await web.get(f"/posts/{post.slug}")).text)
    author = page.select_one(".comment .author")
    assert author is not None
    assert author.get_text() == "pasture.example/users/nameless"
    assert page.select(".comment .handle") == []


async def test_a_like_from_an_actor_without_username_shows_its_name(
    web: httpx.AsyncClient, ctx: Services, fediverse: Fediverse
) -> None:
    post = await publish(ctx, "Pasture, liked")
    persona = fediverse.add("pasture.example", "liker")
    no_username(fediverse, persona, name="Liker Persona")
    like = {
        "@context": "https://www.w3.org/ns/activitystreams",
        "id": persona.id + "/likes/1",
        "type": "Like",
        "actor": persona.id,
        "object": ctx.blog.object_id(post.uid),
    }

    assert (await deliver(web, ctx, persona, like)).status_code == 202

    page = soup((await web.get(f"/posts/{post.slug}")).text)
    [avatar] = page.select("a[title] img.avatar-small")
    assert avatar.parent is not None
    assert avatar.parent["title"] == "Liker Persona"
    assert avatar["alt"] == "Liker Persona"
    assert "None" not in str(avatar.parent)


def test_a_username_with_an_at_sign_is_still_refused() -> None:
    """Leaving it out is allowed; forging a handle with it is not (ATTACKS.md 34)."""
    document = {
        "id": "https://evil.example/users/m",
        "type": "Person",
        "preferredUsername": "admin@blog.example",
        "inbox": "https://evil.example/users/m/inbox",
        "publicKey": {
            "id": "https://evil.example/users/m#main-key",
            "owner": "https://evil.example/users/m",
            "publicKeyPem": "-----BEGIN PUBLIC KEY-----\nx\n-----END PUBLIC KEY-----\n",
        },
    }
    with pytest.raises(Exception, match="'@' or spaces"):
        parse_actor(document, allow_http=False)
    del document["preferredUsername"]
    assert parse_actor(document, allow_http=False).username == ""


def test_an_answer_mentions_an_actor_without_username_by_its_address() -> None:
    mentioned = Mentioned(
        ap_id="https://pasture.example/actor",
        username="",
        domain="pasture.example",
        profile_url="https://pasture.example/actor",
        inbox=None,
    )
    html = mention_html(mentioned)
    assert ">pasture.example/actor</a>" in html
    assert "@" not in html


# ---- the instance actor's outbox ----------------------------------------------------------


async def test_the_instance_actors_outbox_is_served(web: httpx.AsyncClient) -> None:
    actor = (await web.get("/actor", headers=AP_ACCEPT)).json()

    response = await web.get(actor["outbox"], headers=AP_ACCEPT)

    assert actor["outbox"] == BASE_URL + "/actor/outbox"
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("application/activity+json")
    document = response.json()
    assert document["id"] == actor["outbox"]
    assert document["type"] == "OrderedCollection"
    assert document["totalItems"] == 0
    assert document["orderedItems"] == []


# ---- /authorize_interaction, as WebFinger advertises it ----------------------------------


async def test_webfinger_advertises_authorize_interaction(web: httpx.AsyncClient) -> None:
    jrd = (await web.get("/.well-known/webfinger?resource=acct:blog@blog.example")).json()
    [link] = [x for x in jrd["links"] if x["rel"] == "http://ostatus.org/schema/1.0/subscribe"]
    assert link["template"] == BASE_URL + "/authorize_interaction?uri={uri}"


async def test_authorize_interaction_opens_our_posts(web: httpx.AsyncClient, ctx: Services) -> None:
    post = await publish(ctx, "Open me", slug="open-me")
    await ctx.blog.edit("open-me", parse_post("---\ntitle: Open me\nslug: opened\n---\nx"))
    page = BASE_URL + "/posts/opened"
    for uri, where in [
        (ctx.blog.object_id(post.uid), page),  # its id, as a server shows it
        (page, page),
        (BASE_URL + "/posts/open-me", page),  # the slug it had
        (BASE_URL + "/users/blog", BASE_URL + "/"),
        ("acct:blog@blog.example", BASE_URL + "/"),
        ("@blog@blog.example", BASE_URL + "/"),
    ]:
        response = await web.get("/authorize_interaction", params={"uri": uri})
        assert (response.status_code, response.headers.get("location")) == (302, where), uri


@pytest.mark.parametrize(
    ("uri", "status", "sentence"),
    [
        ("https://social.example/users/ann", 200, "cannot follow or answer"),
        ("acct:ann@social.example", 200, "cannot follow or answer"),
        ("@ann@social.example", 200, "cannot follow or answer"),
        (BASE_URL + "/p/no-such-post", 200, "There is no post of this blog at"),
        (BASE_URL + "/posts/no-such-post", 200, "There is no post of this blog at"),
        ("javascript:alert(1)", 400, "is not a link"),
        ("<script>", 400, "is not a link"),
        ("", 400, "add ?uri= and the link"),
    ],
)
async def test_authorize_interaction_answers_anything_else_with_a_sentence(
    web: httpx.AsyncClient, uri: str, status: int, sentence: str
) -> None:
    response = await web.get("/authorize_interaction", params={"uri": uri})

    assert response.status_code == status
    assert response.headers["content-type"].startswith("text/html")
    assert "location" not in response.headers
    text = soup(response.text).get_text(" ")
    assert sentence in text
    if status == 200 or uri:
        assert "@blog@blog.example" in text  # how to follow the blog instead
    assert "<script>" not in response.text  # echoed escaped, if at all


async def test_authorize_interaction_without_uri_is_a_400_page(web: httpx.AsyncClient) -> None:
    response = await web.get("/authorize_interaction")
    assert response.status_code == 400
    assert "add ?uri= and the link" in response.text


# ---- an old slug, asked for by a server ---------------------------------------------------


async def test_an_old_slug_redirects_servers_as_it_redirects_browsers(
    web: httpx.AsyncClient, ctx: Services
) -> None:
    post = await publish(ctx, "Before", slug="before")
    await ctx.blog.edit("before", parse_post("---\ntitle: After\nslug: after\n---\nx"))

    html = await web.get("/posts/before")
    ap = await web.get("/posts/before", headers=AP_ACCEPT)

    assert (html.status_code, html.headers["location"]) == (301, "/posts/after")
    assert (ap.status_code, ap.headers["location"]) == (301, "/posts/after")
    assert "Accept" in ap.headers["vary"]
    moved = await web.get(ap.headers["location"], headers=AP_ACCEPT)
    assert moved.status_code == 200
    assert moved.json()["id"] == ctx.blog.object_id(post.uid)
    assert (await web.get("/posts/never-was", headers=AP_ACCEPT)).status_code == 404
