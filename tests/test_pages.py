"""The reader's HTML view, driven through the real ASGI app."""

from __future__ import annotations

from xml.etree import ElementTree

import httpx
import pytest

from fediblog.store import Store
from fediblog.web.cache import CachedPage, PageCache
from fediblog.web.deps import Services
from tests.helpers import comment_tree, publish, remote_actor, remote_comment, soup

pytestmark = pytest.mark.anyio
ATOM = "{http://www.w3.org/2005/Atom}"


async def test_index_lists_newest_posts_with_excerpt_and_response_count(
    client: httpx.AsyncClient, services: Services
) -> None:
    old = await publish(services, "Older post", "Some *old* words.", published="2026-01-01")
    await publish(services, "Newer post", "Fresh words here.", published="2026-02-01")
    alice = await remote_actor(services, "alice", "mastodon.example")
    await remote_comment(services, old, alice, "first")
    await remote_comment(services, old, alice, "second", minutes=2)

    response = await client.get("/")

    assert response.status_code == 200
    assert response.headers["content-type"] == "text/html; charset=utf-8"
    page = soup(response.text)
    entries = page.select("li.post-summary")
    assert [e.h2.get_text(strip=True) for e in entries] == ["Newer post", "Older post"]
    assert "Fresh words here." in entries[0].get_text()
    assert "2 Responses" in entries[1].get_text()
    assert "0 Responses" in entries[0].get_text()


async def test_index_paginates(client: httpx.AsyncClient, services: Services) -> None:
    per_page = services.settings.posts_per_page
    for number in range(per_page + 1):
        await publish(services, f"Post {number}", published=f"2026-01-{number + 1:02d}")

    first = soup((await client.get("/")).text)
    second = soup((await client.get("/?page=2")).text)

    assert len(first.select("li.post-summary")) == per_page
    assert [e.h2.get_text(strip=True) for e in second.select("li.post-summary")] == ["Post 0"]
    assert second.find("a", rel="prev") is not None
    assert (await client.get("/?page=3")).status_code == 404
    bad = await client.get("/?page=zero")
    assert bad.status_code == 400
    assert "page must be a whole number" in bad.text


async def test_post_page_shows_article_and_threaded_numbered_responses(
    client: httpx.AsyncClient, services: Services
) -> None:
    post = await publish(services, "Threads", "Hello **world**.", tags="[a, b]")
    alice = await remote_actor(services, "alice", "mastodon.example", "Alice")
    bob = await remote_actor(services, "bob", "gts.example", "Bob")
    carol = await remote_actor(services, "carol", "misskey.example", "Carol")
    a = await remote_comment(services, post, alice, "A top", minutes=1)
    b = await remote_comment(services, post, bob, "B reply to A", parent=a, minutes=2)
    await remote_comment(services, post, carol, "C reply to B", parent=b, minutes=3)
    await remote_comment(services, post, carol, "D second top", minutes=4)
    await remote_comment(services, post, bob, "E second reply to A", parent=a, minutes=5)

    response = await client.get(f"/posts/{post.slug}")

    assert response.status_code == 200
    page = soup(response.text)
    assert page.find("h1").get_text() == "Threads"
    assert page.select_one(".post .e-content strong").get_text() == "world"
    assert page.find(id="responses-title").get_text() == "5 Responses to “Threads”"
    assert comment_tree(page) == [
        (
            "A top",
            [("B reply to A", [("C reply to B", [])]), ("E second reply to A", [])],
        ),
        ("D second top", []),
    ]
    assert page.select_one("ol.comment-list").name == "ol"  # a numbered list
    first = page.find(id=f"comment-{a}")
    handle = first.select_one(".handle")
    assert handle.get_text() == "@alice@mastodon.example"
    assert handle["href"] == "https://mastodon.example/@alice"
    assert first.select_one(".author").get_text() == "Alice"
    avatar = services.proxy.local_url("https://mastodon.example/avatars/alice.png")
    assert first.select_one("img.avatar")["src"] == avatar
    assert first.select_one("a.date")["href"].startswith("https://remote.example/notes/")
    assert first.select_one("time")["datetime"].endswith("Z")
    assert page.find(id="reply-title").get_text() == "Leave a Reply"


async def test_post_page_hides_held_rejected_and_private_responses(
    client: httpx.AsyncClient, services: Services
) -> None:
    post = await publish(services, "Private things")
    eve = await remote_actor(services, "eve", "social.example")
    await remote_comment(services, post, eve, "visible public", minutes=1)
    await remote_comment(services, post, eve, "visible unlisted", visibility="unlisted")
    await remote_comment(services, post, eve, "secret followers", visibility="followers")
    await remote_comment(services, post, eve, "secret direct", visibility="direct")
    await remote_comment(services, post, eve, "secret pending", status="pending")
    await remote_comment(services, post, eve, "secret rejected", status="rejected")

    response = await client.get(f"/posts/{post.slug}")

    assert "secret" not in response.text
    assert "visible public" in response.text
    assert "visible unlisted" in response.text
    assert "2 Responses" in response.text


async def test_deleted_response_with_replies_stays_as_placeholder(
    client: httpx.AsyncClient, services: Services
) -> None:
    post = await publish(services, "Deletions")
    ann = await remote_actor(services, "ann", "a.example")
    gone = await remote_comment(services, post, ann, "gone parent", status="deleted")
    await remote_comment(services, post, ann, "orphan reply", parent=gone, minutes=2)
    await remote_comment(services, post, ann, "gone leaf", status="deleted", minutes=3)

    page = soup((await client.get(f"/posts/{post.slug}")).text)

    assert comment_tree(page) == [("This response was deleted.", [("orphan reply", [])])]
    assert page.find(id="responses-title").get_text().startswith("1 Response to")


async def test_hostile_text_is_escaped_everywhere(
    client: httpx.AsyncClient, services: Services
) -> None:
    nasty = '<script>alert(1)</script><img src=x onerror="alert(2)">'
    post = await publish(
        services,
        f"Title {nasty}",
        f"Body {nasty} [x](javascript:alert(3))",
        summary=repr(f"Summary {nasty}"),
    )
    mallory = await remote_actor(services, "mallory", "evil.example", name=nasty)

    await remote_comment(services, post, mallory, "plain")

    feed = ElementTree.fromstring((await client.get("/feed.xml")).content)
    feed_html = "".join(c.text or "" for c in feed.iter(f"{ATOM}content"))
    for url, text in [
        ("/", (await client.get("/")).text),
        ("post", (await client.get(f"/posts/{post.slug}")).text),
        ("feed content", feed_html),
    ]:
        page = soup(text)
        assert page.find("script") is None, url
        assert not any(
            attr.startswith("on") for tag in page.find_all(True) for attr in tag.attrs
        ), url
        assert not any(
            str(tag.get(attr, "")).strip().lower().startswith("javascript:")
            for tag in page.find_all(True)
            for attr in ("href", "src")
        ), url
    post_page = soup((await client.get(f"/posts/{post.slug}")).text)
    assert post_page.find("h1").get_text() == f"Title {nasty}"  # shown as text, not markup
    assert post_page.select_one(".author").get_text() == nasty


async def test_unknown_urls_get_the_404_page(client: httpx.AsyncClient) -> None:
    for url in ("/no/such/page", "/posts/never-written", "/tags/none"):
        response = await client.get(url)
        assert response.status_code == 404, url
        assert "Not found" in soup(response.text).find("h1").get_text()
        assert response.headers["content-type"].startswith("text/html")


async def test_old_slug_redirects_to_the_new_one(
    client: httpx.AsyncClient, services: Services
) -> None:
    from fediblog.blog import parse_post

    post = await publish(services, "First name")
    await services.blog.edit(post.slug, parse_post("---\ntitle: Renamed\nslug: renamed\n---\nx"))

    response = await client.get("/posts/first-name")

    assert response.status_code == 301
    assert response.headers["location"] == "/posts/renamed"
    assert (await client.get("/posts/renamed")).status_code == 200


async def test_tag_pages_list_tagged_posts(client: httpx.AsyncClient, services: Services) -> None:
    await publish(services, "Tagged", tags="[python]")
    await publish(services, "Untagged")

    tagged = soup((await client.get("/tags/python")).text)
    cloud = soup((await client.get("/tags")).text)

    assert [e.h2.get_text(strip=True) for e in tagged.select("li.post-summary")] == ["Tagged"]
    assert tagged.find("h1").get_text() == "Posts tagged #python"
    assert cloud.select_one(".tag-cloud a")["href"] == "/tags/python"


async def test_about_page_shows_how_to_follow(client: httpx.AsyncClient) -> None:
    page = soup((await client.get("/about")).text)
    assert page.find("input", value="@blog@blog.example") is not None


async def test_post_page_has_link_card_and_fediverse_meta(
    client: httpx.AsyncClient, services: Services
) -> None:
    post = await publish(services, "Cards", "Body text.", summary="A fine summary")

    page = soup((await client.get(f"/posts/{post.slug}")).text)

    def meta(**attrs: str) -> str:
        return str(page.find("meta", attrs=attrs)["content"])

    assert meta(name="fediverse:creator") == "@blog@blog.example"
    assert meta(property="og:title") == "Cards"
    assert meta(property="og:description") == "A fine summary"
    assert meta(property="og:url") == f"https://blog.example/posts/{post.slug}"
    alternate = page.find("link", rel="alternate", type="application/activity+json")
    assert alternate["href"] == f"https://blog.example/p/{post.uid}"


async def test_etag_and_last_modified_answer_304(
    client: httpx.AsyncClient, services: Services
) -> None:
    post = await publish(services, "Conditional")
    first = await client.get(f"/posts/{post.slug}")
    etag, modified = first.headers["etag"], first.headers["last-modified"]

    by_etag = await client.get(f"/posts/{post.slug}", headers={"If-None-Match": etag})
    by_date = await client.get(f"/posts/{post.slug}", headers={"If-Modified-Since": modified})
    other = await client.get(f"/posts/{post.slug}", headers={"If-None-Match": '"nope"'})

    assert (by_etag.status_code, by_etag.content) == (304, b"")
    assert by_etag.headers["etag"] == etag
    assert by_date.status_code == 304
    assert other.status_code == 200
    for url in ("/", "/feed.xml", "/feed.json", "/about"):
        tag = (await client.get(url)).headers["etag"]
        assert (await client.get(url, headers={"If-None-Match": tag})).status_code == 304, url


async def test_a_new_response_changes_the_etag(
    client: httpx.AsyncClient, services: Services
) -> None:
    post = await publish(services, "Changing")
    etag = (await client.get(f"/posts/{post.slug}")).headers["etag"]
    bob = await remote_actor(services, "bob", "b.example")
    await remote_comment(services, post, bob, "news")

    again = await client.get(f"/posts/{post.slug}", headers={"If-None-Match": etag})

    assert again.status_code == 200
    assert "news" in again.text
    assert again.headers["etag"] != etag


async def test_a_write_by_another_process_shows_without_restart(
    client: httpx.AsyncClient, services: Services
) -> None:
    await client.get("/")  # fill the cache
    other = await Store.open(services.settings.store_location)  # what the CLI does
    try:
        from fediblog.blog import Blog, parse_post

        await Blog(services.settings, other).publish(parse_post("---\ntitle: From CLI\n---\nx"))
    finally:
        await other.close()

    assert "From CLI" in (await client.get("/")).text


async def test_gzip_when_accepted(client: httpx.AsyncClient, services: Services) -> None:
    post = await publish(services, "Zipped", "word " * 500)

    raw = await client.get(f"/posts/{post.slug}", headers={"Accept-Encoding": "gzip"})
    plain = await client.get(f"/posts/{post.slug}", headers={"Accept-Encoding": "identity"})

    assert raw.headers["content-encoding"] == "gzip"
    assert "content-encoding" not in plain.headers
    assert raw.content == plain.content  # httpx decoded the gzip body
    assert "Accept-Encoding" in raw.headers["vary"]
    assert raw.headers["etag"] != plain.headers["etag"]
    revisit = await client.get(
        f"/posts/{post.slug}",
        headers={"Accept-Encoding": "gzip", "If-None-Match": raw.headers["etag"]},
    )
    assert revisit.status_code == 304
    assert revisit.headers["etag"] == raw.headers["etag"]


@pytest.mark.parametrize(
    ("accept_encoding", "zipped"),
    [
        ("gzip", True),
        ("br;q=1, gzip;q=0.5", True),
        ("*", True),
        ("*, gzip;q=0", False),  # named and refused: the wildcard does not bring it back
        ("gzip;q=0.000", False),
        ("gzip;q=0, *", False),
        ("gzip; q=nonsense", False),
        ("identity", False),
        ("", False),
    ],
)
async def test_gzip_only_when_the_client_takes_it(
    client: httpx.AsyncClient, services: Services, accept_encoding: str, zipped: bool
) -> None:
    post = await publish(services, "Zipped", "word " * 500)

    raw = await client.get(f"/posts/{post.slug}", headers={"Accept-Encoding": accept_encoding})

    assert raw.status_code == 200
    assert (raw.headers.get("content-encoding") == "gzip") is zipped


async def test_security_headers(client: httpx.AsyncClient) -> None:
    response = await client.get("/")
    assert response.headers["x-content-type-options"] == "nosniff"
    assert "script-src 'none'" in response.headers["content-security-policy"]


async def test_static_assets_are_served_with_their_type(client: httpx.AsyncClient) -> None:
    css = await client.get("/static/style.css")
    assert css.status_code == 200
    assert css.headers["content-type"].startswith("text/css")
    assert "prefers-color-scheme: dark" in css.text
    assert (await client.get("/static/../keys/blog.pem")).status_code == 404


def test_page_cache_serves_a_changed_page_only_within_its_staleness() -> None:
    pages = PageCache()
    page = CachedPage.build(b"<p>old</p>", media_type="text/html")
    pages.put("post:x", (1, 0), page)

    assert pages.get("post:x", (1, 0)) is page
    assert pages.get("post:x", (2, 0)) is None  # changed, and no staleness allowed
    assert pages.get("post:x", (2, 0), max_stale=60.0) is page  # rendered just now
    assert pages.get("other", (1, 0), max_stale=60.0) is None
