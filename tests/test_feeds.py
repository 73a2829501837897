"""Atom and JSON Feed, parsed as a feed reader would."""

from __future__ import annotations

from xml.etree import ElementTree

import httpx
import pytest

from fediblog.web.deps import Services
from tests.helpers import publish

pytestmark = pytest.mark.anyio
ATOM = "{http://www.w3.org/2005/Atom}"


async def test_atom_feed_is_valid_atom_with_full_entries(
    client: httpx.AsyncClient, services: Services
) -> None:
    first = await publish(
        services,
        "One & only",
        "Hello <b>bold</b> **world**",
        tags="[x, y]",
        published="2026-03-01T10:00:00Z",
        summary="First summary",
    )
    await publish(services, "Two", "Second", published="2026-03-02T10:00:00Z")

    response = await client.get("/feed.xml")

    assert response.status_code == 200
    assert response.headers["content-type"] == "application/atom+xml; charset=utf-8"
    feed = ElementTree.fromstring(response.content)
    assert feed.tag == f"{ATOM}feed"
    # RFC 4287 4.1.1: a feed has exactly one id, title and updated; entries likewise.
    for name in ("id", "title", "updated"):
        assert len(feed.findall(f"{ATOM}{name}")) == 1, name
    assert feed.find(f"{ATOM}updated").text == "2026-03-02T10:00:00Z"
    assert feed.find(f"{ATOM}link[@rel='self']").get("href") == "https://blog.example/feed.xml"
    assert feed.find(f"{ATOM}author/{ATOM}name").text == "Tess Author"
    entries = feed.findall(f"{ATOM}entry")
    assert [e.find(f"{ATOM}title").text for e in entries] == ["Two", "One & only"]
    entry = entries[1]
    assert entry.find(f"{ATOM}id").text == f"https://blog.example/p/{first.uid}"
    assert entry.find(f"{ATOM}link").get("href") == f"https://blog.example/posts/{first.slug}"
    assert entry.find(f"{ATOM}published").text == "2026-03-01T10:00:00Z"
    assert entry.find(f"{ATOM}summary").text == "First summary"
    assert [c.get("term") for c in entry.findall(f"{ATOM}category")] == ["x", "y"]
    content = entry.find(f"{ATOM}content")
    assert content.get("type") == "html"
    assert "<strong>world</strong>" in content.text
    assert "<b>bold</b>" in content.text


async def test_json_feed(client: httpx.AsyncClient, services: Services) -> None:
    post = await publish(services, "JSON me", "Body", tags="[z]")

    response = await client.get("/feed.json")

    assert response.headers["content-type"] == "application/feed+json; charset=utf-8"
    feed = response.json()
    assert feed["version"] == "https://jsonfeed.org/version/1.1"
    assert feed["feed_url"] == "https://blog.example/feed.json"
    (item,) = feed["items"]
    assert item["id"] == f"https://blog.example/p/{post.uid}"
    assert item["url"] == f"https://blog.example/posts/{post.slug}"
    assert item["tags"] == ["z"]
    assert item["content_html"] == "<p>Body</p>\n"


async def test_deleted_posts_leave_the_feeds(client: httpx.AsyncClient, services: Services) -> None:
    post = await publish(services, "Short-lived")
    await services.blog.delete(post.slug)

    feed = ElementTree.fromstring((await client.get("/feed.xml")).content)

    assert feed.findall(f"{ATOM}entry") == []
    assert (await client.get("/feed.json")).json()["items"] == []
    assert (await client.get(f"/posts/{post.slug}")).status_code == 404
