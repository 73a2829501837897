"""Being found: WebFinger, host-meta, NodeInfo, the actors, posts as objects, the outbox
and the followers collection (INTEROP.md 1-6, 20, 23, 29), through the real app.

Nothing here is signed: every document must be fetchable without a signature. The app
gets a transport that fails the test on any outbound request, and the workers are off,
so nothing leaves the process. Shapes are compared with what Mastodon serves
(tests/fixtures/mastodon/: its documented WebFinger answer, its NodeInfo).
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from xml.etree import ElementTree

import httpx
import pytest
from cryptography.hazmat.primitives import serialization

from fediblog.activitystreams import PAGE_SIZE, parse_actor
from fediblog.models import Post
from fediblog.remote import Fetcher, FetchPolicy
from fediblog.web.deps import Services
from tests.conftest import BASE_URL, make_settings
from tests.fediverse import fixture
from tests.helpers import publish, remote_actor, running
from tests.inbox_kit import install_keys

pytestmark = pytest.mark.anyio

AP = "application/activity+json"
LD_JSON = 'application/ld+json; profile="https://www.w3.org/ns/activitystreams"'
AS_CONTEXT = "https://www.w3.org/ns/activitystreams"
SECURITY_CONTEXT = "https://w3id.org/security/v1"
ACTOR = f"{BASE_URL}/users/blog"
BROWSER = "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8"
NODEINFO_20 = "http://nodeinfo.diaspora.software/ns/schema/2.0"
NODEINFO_21 = "http://nodeinfo.diaspora.software/ns/schema/2.1"
SUBSCRIBE = "http://ostatus.org/schema/1.0/subscribe"
PROFILE_PAGE = "http://webfinger.net/rel/profile-page"


def _no_network(request: httpx.Request) -> httpx.Response:
    raise AssertionError(f"discovery must not fetch anything, yet it asked for {request.url}")


@dataclass
class Site:
    client: httpx.AsyncClient
    services: Services
    transport: httpx.ASGITransport


@asynccontextmanager
async def blog(tmp_path: Path, **overrides: Any) -> AsyncIterator[Site]:
    """The real app for these settings, its services, and a client on it."""
    settings = make_settings(tmp_path, **overrides)
    install_keys(settings.keys_dir)
    no_network = httpx.MockTransport(_no_network)
    async with running(settings, transport=no_network, run_workers=False) as app:
        services: Services = app.state.services
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url=settings.base_url) as client:
            yield Site(client, services, transport)


@pytest.fixture
async def site(tmp_path: Path) -> AsyncIterator[Site]:
    async with blog(tmp_path) as found:
        yield found


@pytest.fixture
def client(site: Site) -> httpx.AsyncClient:
    return site.client


@pytest.fixture
def services(site: Site) -> Services:
    return site.services


async def get_ap(client: httpx.AsyncClient, url: str, accept: str = AP) -> Any:
    """An ActivityPub document, fetched the way a server does (unsigned here)."""
    response = await client.get(url, headers={"Accept": accept})
    assert response.status_code == 200, (url, response.status_code, response.text[:200])
    assert response.headers["content-type"].startswith(AP)
    return response.json()


def webfinger(client: httpx.AsyncClient, resource: str | None) -> Any:
    params = {} if resource is None else {"resource": resource}
    return client.get("/.well-known/webfinger", params=params)


# ---- WebFinger (INTEROP 1, 2) ------------------------------------------------------------


@pytest.mark.parametrize(
    "resource",
    [
        "acct:blog@blog.example",
        "acct:blog@BLOG.Example",
        "acct:BLOG@blog.example",
        ACTOR,
        "acct:@blog@blog.example",
    ],
)
async def test_webfinger_finds_the_blog(client: httpx.AsyncClient, resource: str) -> None:
    response = await webfinger(client, resource)

    assert response.status_code == 200
    assert response.headers["content-type"].startswith("application/jrd+json")
    jrd = response.json()
    assert jrd["subject"] == "acct:blog@blog.example"
    [self_link] = [link for link in jrd["links"] if link["rel"] == "self"]
    assert self_link == {"rel": "self", "type": AP, "href": ACTOR}
    [subscribe] = [link for link in jrd["links"] if link["rel"] == SUBSCRIBE]
    assert subscribe["template"] == f"{BASE_URL}/authorize_interaction?uri={{uri}}"
    [profile] = [link for link in jrd["links"] if link["rel"] == PROFILE_PAGE]
    assert profile["href"].startswith(BASE_URL + "/")
    assert ACTOR in jrd["aliases"]


async def test_webfinger_has_mastodons_shape(client: httpx.AsyncClient) -> None:
    """The same keys, and per rel the same link keys, as Mastodon's documented answer."""
    mastodon = fixture("mastodon/webfinger_docs_example.json")
    ours = (await webfinger(client, "acct:blog@blog.example")).json()

    def shape(jrd: dict[str, Any]) -> dict[str, Any]:
        return {
            "keys": sorted(jrd),
            "links": sorted((link["rel"], tuple(sorted(link))) for link in jrd["links"]),
        }

    assert shape(ours) == shape(mastodon)


async def test_webfinger_with_a_port_in_the_base_url(tmp_path: Path) -> None:
    async with blog(tmp_path, base_url="http://127.0.0.1:8000", allow_http=True) as site:
        found = await webfinger(site.client, "acct:blog@127.0.0.1:8000")
        other_port = await webfinger(site.client, "acct:blog@127.0.0.1")

    assert found.status_code == 200
    jrd = found.json()
    assert jrd["subject"] == "acct:blog@127.0.0.1:8000"
    [self_link] = [link for link in jrd["links"] if link["rel"] == "self"]
    assert self_link["href"] == "http://127.0.0.1:8000/users/blog"
    assert other_port.status_code == 404  # 127.0.0.1:80 is another server


@pytest.mark.parametrize(
    "resource",
    [
        "acct:someone@blog.example",
        "acct:blog@other.example",
        "https://other.example/users/blog",
        f"{BASE_URL}/users/someone",
        "acct:blog@blog.example.evil.example",
    ],
)
async def test_webfinger_unknown_resource_is_404(client: httpx.AsyncClient, resource: str) -> None:
    response = await webfinger(client, resource)

    assert response.status_code == 404
    assert response.text == "404: no such account here"


@pytest.mark.parametrize("resource", [None, "", "   "])
async def test_webfinger_without_resource_is_400(
    client: httpx.AsyncClient, resource: str | None
) -> None:
    response = await webfinger(client, resource)

    assert response.status_code == 400
    assert response.text == "400: the resource parameter is required"


async def test_webfinger_round_trip_as_mastodon_does_it(client: httpx.AsyncClient) -> None:
    """INTEROP 2: acct:preferredUsername@<host of the actor id> leads back to the actor."""
    actor = await get_ap(client, ACTOR)
    host = httpx.URL(actor["id"]).netloc.decode()

    jrd = (await webfinger(client, f"acct:{actor['preferredUsername']}@{host}")).json()

    assert [link["href"] for link in jrd["links"] if link["rel"] == "self"] == [actor["id"]]


async def test_our_webfinger_passes_our_own_fetchers_checks(site: Site) -> None:
    """The checks fediblog makes of others (ATTACKS 35) hold for its own answer."""
    async with httpx.AsyncClient(transport=site.transport) as raw:
        jrd = await Fetcher(raw, FetchPolicy()).fetch_webfinger("acct:blog@blog.example")
    assert jrd["subject"] == "acct:blog@blog.example"


async def test_webfinger_finds_the_instance_actor(client: httpx.AsyncClient) -> None:
    jrd = (await webfinger(client, "acct:blog.example@blog.example")).json()

    [self_link] = [link for link in jrd["links"] if link["rel"] == "self"]
    assert self_link["href"] == f"{BASE_URL}/actor"


# ---- host-meta and NodeInfo (INTEROP 3) --------------------------------------------------


async def test_host_meta_xrd_points_at_webfinger(client: httpx.AsyncClient) -> None:
    response = await client.get("/.well-known/host-meta")

    assert response.status_code == 200
    assert response.headers["content-type"].startswith("application/xrd+xml")
    root = ElementTree.fromstring(response.content)
    assert root.tag == "{http://docs.oasis-open.org/ns/xri/xrd-1.0}XRD"
    [link] = list(root)
    assert link.attrib == {
        "rel": "lrdd",
        "template": f"{BASE_URL}/.well-known/webfinger?resource={{uri}}",
    }


async def test_host_meta_json_points_at_webfinger(client: httpx.AsyncClient) -> None:
    response = await client.get("/.well-known/host-meta.json")

    assert response.status_code == 200
    assert response.headers["content-type"].startswith("application/json")
    assert response.json() == {
        "links": [{"rel": "lrdd", "template": f"{BASE_URL}/.well-known/webfinger?resource={{uri}}"}]
    }


async def test_nodeinfo_links_to_21_and_20(client: httpx.AsyncClient, services: Services) -> None:
    await publish(services, "One")
    await publish(services, "Two")
    links = (await client.get("/.well-known/nodeinfo")).json()
    mastodon_links = fixture("mastodon/well_known_nodeinfo.json")
    assert {tuple(sorted(link)) for link in links["links"]} == {
        tuple(sorted(link)) for link in mastodon_links["links"]
    }
    by_rel = {link["rel"]: link["href"] for link in links["links"]}
    assert set(by_rel) == {NODEINFO_21, NODEINFO_20}

    for schema, version in ((NODEINFO_21, "2.1"), (NODEINFO_20, "2.0")):
        response = await client.get(by_rel[schema])
        assert response.status_code == 200
        assert response.headers["content-type"] == f'application/json; profile="{schema}#"'
        document = response.json()
        assert document["version"] == version
        assert document["software"]["name"] == "fediblog"
        assert document["protocols"] == ["activitypub"]
        assert document["usage"]["users"]["total"] == 1
        assert document["usage"]["localPosts"] == 2
        assert document["openRegistrations"] is False
    assert (await client.get("/nodeinfo/1.0")).status_code == 404


async def test_nodeinfo_20_has_the_keys_mastodon_serves(client: httpx.AsyncClient) -> None:
    mastodon = fixture("mastodon/nodeinfo_2.0.json")
    ours = (await client.get("/nodeinfo/2.0")).json()

    assert set(mastodon) <= set(ours)
    assert set(mastodon["software"]) <= set(ours["software"])
    assert set(mastodon["services"]) == set(ours["services"])
    assert set(mastodon["usage"]["users"]) == set(ours["usage"]["users"])


# ---- the actors (INTEROP 4-6) ------------------------------------------------------------


def _public_half(keys_dir: Path, name: str) -> str:
    private = serialization.load_pem_private_key((keys_dir / f"{name}.pem").read_bytes(), None)
    return (
        private.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )


@pytest.mark.parametrize("accept", [AP, LD_JSON, f"{LD_JSON}, {AP}"])
async def test_blog_actor_has_every_field_and_needs_no_signature(
    client: httpx.AsyncClient, services: Services, accept: str
) -> None:
    response = await client.get("/users/blog", headers={"Accept": accept})

    assert response.status_code == 200
    assert "signature" not in response.request.headers
    assert response.headers["content-type"].startswith(AP)
    actor = response.json()
    assert AS_CONTEXT in actor["@context"]
    assert SECURITY_CONTEXT in actor["@context"]
    assert actor["id"] == ACTOR
    assert actor["id"].startswith("https://")
    assert actor["type"] == "Person"
    assert actor["preferredUsername"] == "blog"
    assert actor["name"] == "Test Blog"
    assert isinstance(actor["summary"], str)
    assert actor["summary"]
    assert actor["url"].startswith(BASE_URL + "/")
    assert actor["icon"]["type"] == "Image"
    assert actor["icon"]["url"].startswith(BASE_URL + "/")
    assert actor["inbox"] == ACTOR + "/inbox"
    assert actor["outbox"] == ACTOR + "/outbox"
    assert actor["followers"] == ACTOR + "/followers"
    assert actor["following"] == ACTOR + "/following"
    assert actor["endpoints"] == {"sharedInbox": BASE_URL + "/inbox"}
    assert actor["manuallyApprovesFollowers"] is False
    assert actor["discoverable"] is True
    assert actor["indexable"] is True
    assert actor["published"].endswith("Z")
    key = actor["publicKey"]
    assert key["id"] == ACTOR + "#main-key"
    assert key["owner"] == ACTOR
    assert key["publicKeyPem"].startswith("-----BEGIN PUBLIC KEY-----")  # SPKI
    assert key["publicKeyPem"] == _public_half(services.settings.keys_dir, "blog")
    # It is what a remote server (and our own parser of remote actors) accepts.
    parsed = parse_actor(actor, allow_http=False)
    assert (parsed.inbox, parsed.shared_inbox) == (ACTOR + "/inbox", BASE_URL + "/inbox")


async def test_blog_actor_settings_show_in_the_document(tmp_path: Path) -> None:
    async with blog(tmp_path, actor_type="Service", manually_approves_followers=True) as site:
        actor = await get_ap(site.client, "/users/blog")
    assert actor["type"] == "Service"
    assert actor["manuallyApprovesFollowers"] is True


async def test_blog_actor_for_a_browser_redirects_to_the_about_page(
    client: httpx.AsyncClient,
) -> None:
    response = await client.get("/users/blog", headers={"Accept": BROWSER})

    assert response.status_code == 302
    assert response.headers["location"] == "/about"
    assert "Accept" in response.headers["vary"]


async def test_another_handle_is_404(client: httpx.AsyncClient) -> None:
    for path in ("/users/someone", "/users/someone/outbox", "/users/someone/followers"):
        assert (await client.get(path, headers={"Accept": AP})).status_code == 404


async def test_instance_actor_needs_no_signature(
    client: httpx.AsyncClient, services: Services
) -> None:
    actor = await get_ap(client, "/actor")

    assert actor["id"] == f"{BASE_URL}/actor"
    assert actor["type"] == "Application"
    assert actor["preferredUsername"] == "blog.example"
    assert AS_CONTEXT in actor["@context"]
    assert SECURITY_CONTEXT in actor["@context"]
    assert actor["inbox"].startswith(BASE_URL + "/")
    assert actor["publicKey"] == {
        "id": f"{BASE_URL}/actor#main-key",
        "owner": f"{BASE_URL}/actor",
        "publicKeyPem": _public_half(services.settings.keys_dir, "instance"),
    }
    assert actor["publicKey"]["publicKeyPem"] != _public_half(services.settings.keys_dir, "blog")
    parse_actor(actor, allow_http=False)


# ---- posts as objects, content negotiation (INTEROP 20, 23) --------------------------------


async def test_post_page_negotiates_the_object(
    client: httpx.AsyncClient, services: Services
) -> None:
    post = await publish(services, "Hello fediverse", "Some *words*.", tags="[fedi]")
    object_id = f"{BASE_URL}/p/{post.uid}"

    as_object = await client.get(f"/posts/{post.slug}", headers={"Accept": AP})
    as_page = await client.get(f"/posts/{post.slug}", headers={"Accept": BROWSER})

    assert as_object.status_code == 200
    assert as_object.headers["content-type"].startswith(AP)
    assert "Accept" in as_object.headers["vary"]
    document = as_object.json()
    assert document["id"] == object_id
    assert document["type"] == "Article"
    assert document["name"] == "Hello fediverse"
    assert document["attributedTo"] == ACTOR
    assert document["url"] == f"{BASE_URL}/posts/{post.slug}"
    assert as_page.status_code == 200
    assert as_page.headers["content-type"].startswith("text/html")
    assert "Accept" in as_page.headers["vary"]
    assert f'<link rel="alternate" type="{AP}" href="{object_id}">' in as_page.text


async def test_object_id_serves_the_object_at_its_own_id(
    client: httpx.AsyncClient, services: Services
) -> None:
    """Akkoma requires the id to answer the object itself, without a redirect."""
    post = await publish(services, "Stable id")
    object_id = f"{BASE_URL}/p/{post.uid}"

    document = await get_ap(client, object_id)
    negotiated = (await client.get(f"/posts/{post.slug}", headers={"Accept": LD_JSON})).json()

    assert document["id"] == object_id
    assert document == negotiated
    create = await get_ap(client, object_id + "/activity")
    assert create["type"] == "Create"
    assert create["object"]["id"] == object_id


async def test_object_id_for_a_browser_redirects_to_the_page(
    client: httpx.AsyncClient, services: Services
) -> None:
    post = await publish(services, "For people")

    response = await client.get(f"/p/{post.uid}", headers={"Accept": BROWSER})

    assert response.status_code == 302
    assert response.headers["location"] == f"{BASE_URL}/posts/{post.slug}"
    assert "Accept" in response.headers["vary"]


async def test_deleted_post_answers_410_with_a_tombstone(
    client: httpx.AsyncClient, services: Services
) -> None:
    post = await publish(services, "Short-lived")
    await services.blog.delete(post.slug)

    response = await client.get(f"/p/{post.uid}", headers={"Accept": AP})

    assert response.status_code == 410
    assert response.headers["content-type"].startswith(AP)
    tombstone = response.json()
    assert tombstone["type"] == "Tombstone"
    assert tombstone["id"] == f"{BASE_URL}/p/{post.uid}"
    assert tombstone["formerType"] == "Article"
    assert tombstone["deleted"].endswith("Z")
    assert (await client.get("/p/never-was", headers={"Accept": AP})).status_code == 404


# ---- the outbox, followers and following (INTEROP 29) ------------------------------------


async def _publish_many(services: Services, count: int) -> list[Post]:
    return [
        await publish(services, f"Post {n}", published=f"2026-01-01T{n // 60:02d}:{n % 60:02d}:00Z")
        for n in range(count)
    ]


async def test_outbox_is_paged_creates_newest_first(
    client: httpx.AsyncClient, services: Services
) -> None:
    posts = await _publish_many(services, PAGE_SIZE + 1)
    outbox = f"{ACTOR}/outbox"

    collection = await get_ap(client, outbox)
    first = await get_ap(client, collection["first"])
    second = await get_ap(client, first["next"])

    assert collection["type"] == "OrderedCollection"
    assert collection["totalItems"] == PAGE_SIZE + 1
    assert "orderedItems" not in collection
    assert first["type"] == "OrderedCollectionPage"
    assert first["partOf"] == outbox
    items = first["orderedItems"] + second["orderedItems"]
    newest_first = [f"{BASE_URL}/p/{post.uid}" for post in reversed(posts)]
    assert [item["object"]["id"] for item in items] == newest_first
    assert {item["type"] for item in items} == {"Create"}
    assert {item["actor"] for item in items} == {ACTOR}
    assert all("@context" not in item for item in items)
    assert len(first["orderedItems"]) == PAGE_SIZE
    assert second["prev"] == first["id"]
    assert "next" not in second


async def _follow(services: Services, username: str, status: str = "accepted") -> str:
    actor_id = await remote_actor(services, username, "remote.example")
    ap_id = f"https://remote.example/users/{username}"
    await services.store.save_follower(
        actor_id=actor_id,
        follow_id=f"{ap_id}#follows/1",
        inbox=ap_id + "/inbox",
        shared_inbox="https://remote.example/inbox",
        status=status,
    )
    return ap_id


async def test_followers_collection_is_paged(client: httpx.AsyncClient, services: Services) -> None:
    accepted = [await _follow(services, f"user{n}") for n in range(PAGE_SIZE + 2)]
    await _follow(services, "waiting", status="pending")
    followers = f"{ACTOR}/followers"

    collection = await get_ap(client, followers)
    first = await get_ap(client, collection["first"])
    second = await get_ap(client, first["next"])

    assert collection["type"] == "OrderedCollection"
    assert collection["totalItems"] == PAGE_SIZE + 2  # the pending request is not counted
    assert first["partOf"] == followers
    assert first["orderedItems"] + second["orderedItems"] == accepted


async def test_hidden_followers_show_only_the_count(tmp_path: Path) -> None:
    async with blog(tmp_path, hide_followers=True) as site:
        for n in range(3):
            await _follow(site.services, f"user{n}")
        collection = await get_ap(site.client, "/users/blog/followers")
        page = await get_ap(site.client, "/users/blog/followers?page=1")

    assert collection["totalItems"] == 3
    assert "first" not in collection
    assert "orderedItems" not in collection
    assert "orderedItems" not in page  # no page leaks them either
    assert "remote.example" not in json.dumps(page)


async def test_following_is_an_empty_collection(client: httpx.AsyncClient) -> None:
    following = await get_ap(client, "/users/blog/following")

    assert following["id"] == f"{ACTOR}/following"
    assert following["type"] == "OrderedCollection"
    assert following["totalItems"] == 0


async def test_bad_page_numbers_are_400(client: httpx.AsyncClient) -> None:
    for query in ("page=0", "page=-1", "page=x", "page=99999999999"):
        response = await client.get(f"/users/blog/outbox?{query}", headers={"Accept": AP})
        assert response.status_code == 400, query
