"""What a reader sees: numbered responses, the author's h-card, previous and next posts,
the monthly archive, plurals, the demo's footnote, styled error pages, and the CSS rules
that keep links and handles readable (driven through the real app, parsed as HTML).
"""

from __future__ import annotations

import asyncio
import re
from datetime import timedelta
from importlib.resources import files
from pathlib import Path

import httpx
import mf2py
import pytest
from bs4 import BeautifulSoup, Tag

from fediblog.models import utcnow
from fediblog.store import Store
from fediblog.web.deps import Services
from tests.conftest import database_for
from tests.helpers import publish, remote_actor, remote_comment, run, soup

pytestmark = pytest.mark.anyio


async def page_of(web: httpx.AsyncClient, path: str) -> BeautifulSoup:
    response = await web.get(path)
    assert response.status_code == 200, (path, response.status_code)
    assert response.headers["content-type"] == "text/html; charset=utf-8"
    return soup(response.text)


def text_of(page: BeautifulSoup, selector: str) -> str:
    found = page.select_one(selector)
    assert isinstance(found, Tag), selector
    return " ".join(found.get_text(" ", strip=True).split())


# ---- responses: numbers and heading --------------------------------------------------------


async def test_numbers_count_only_what_the_heading_counts(
    client: httpx.AsyncClient, services: Services
) -> None:
    """Likes and boosts, held, followers-only and blocked replies are neither counted in
    the heading nor numbered; the index says the same count; each number is a permalink."""
    post = await publish(services, "Counted", published="2026-03-01")
    ann = await remote_actor(services, "ann", "a.example", "Ann")
    bob = await remote_actor(services, "bob", "b.example", "Bob")
    eve = await remote_actor(services, "eve", "spam.example", "Eve")
    first = await remote_comment(services, post, ann, "one", minutes=1)
    await remote_comment(services, post, bob, "two", parent=first, minutes=2)
    await remote_comment(services, post, bob, "held", minutes=3, status="pending")
    await remote_comment(services, post, bob, "private", minutes=4, visibility="followers")
    await remote_comment(services, post, eve, "blocked", minutes=5)
    await remote_comment(services, post, ann, "three", minutes=6)
    for kind in ("Like", "Announce"):
        await services.store.save_reaction(
            post_id=post.id, actor_id=bob, kind=kind, ap_id=None, content=None, when=utcnow()
        )
    await services.store.save_block("spam.example", "domain")

    page = await page_of(client, f"/posts/{post.slug}")

    assert text_of(page, "#responses-title") == "3 Responses to “Counted”"
    numbered = page.select("#responses a.comment-number")
    assert [a.get_text() for a in numbered] == ["#1", "#2", "#3"]
    assert "1 like" in text_of(page, ".reactions")
    assert "1 boost" in text_of(page, ".reactions")
    for link in numbered:
        target = await client.get(str(link["href"]))
        assert target.status_code == 302
        anchor = target.headers["location"].partition("#")[2]
        assert page.find(id=anchor) is not None
    index = await page_of(client, "/")
    assert "3 Responses" in text_of(index, "li.post-summary .more")


async def test_one_response_like_and_boost_are_singular(
    client: httpx.AsyncClient, services: Services
) -> None:
    post = await publish(services, "Lonely")
    ann = await remote_actor(services, "ann", "a.example", "Ann")
    await remote_comment(services, post, ann, "only one")
    for kind in ("Like", "Announce"):
        await services.store.save_reaction(
            post_id=post.id, actor_id=ann, kind=kind, ap_id=None, content=None, when=utcnow()
        )

    page = await page_of(client, f"/posts/{post.slug}")
    index = await page_of(client, "/")
    archive = await page_of(client, "/archive")
    about = await page_of(client, "/about")

    assert text_of(page, "#responses-title").startswith("1 Response to")
    reactions = text_of(page, ".reactions")
    assert "1 like" in reactions
    assert "1 boost" in reactions
    assert "1 likes" not in reactions
    assert "1 boosts" not in reactions
    assert "1 Response" in text_of(index, ".more")
    assert "1 Responses" not in index.get_text()
    assert "(1 post)" in text_of(archive, ".archive-months")
    assert "1 post so far" in about.get_text()


# ---- the author, microformats ---------------------------------------------------------------


async def test_a_post_is_an_h_entry_with_the_author_s_h_card(
    client: httpx.AsyncClient, services: Services
) -> None:
    post = await publish(services, "Signed", "Words.", published="2026-03-01T10:00:00Z")
    response = await client.get(f"/posts/{post.slug}")
    base = services.settings.base_url

    parsed = mf2py.parse(doc=response.text, url=f"{base}/posts/{post.slug}")

    entries = [item for item in parsed["items"] if "h-entry" in item["type"]]
    assert len(entries) == 1
    props = entries[0]["properties"]
    assert props["name"] == ["Signed"]
    assert props["url"] == [f"{base}/posts/{post.slug}"]
    assert props["published"] == ["2026-03-01T10:00:00Z"]
    (author,) = props["author"]
    assert author["type"] == ["h-card"]
    assert author["properties"]["name"] == [services.settings.author]
    assert author["properties"]["url"] == [f"{base}/about"]
    byline = text_of(soup(response.text), ".post .meta .byline")
    assert byline == f"by {services.settings.author}"


async def test_each_entry_on_the_index_has_its_author(
    client: httpx.AsyncClient, services: Services
) -> None:
    await publish(services, "One", published="2026-03-01")
    await publish(services, "Two", published="2026-03-02")

    parsed = mf2py.parse(doc=(await client.get("/")).text, url=services.settings.base_url)

    entries = [item for item in parsed["items"] if "h-entry" in item["type"]]
    assert [e["properties"]["name"] for e in entries] == [["Two"], ["One"]]
    for entry in entries:
        (author,) = entry["properties"]["author"]
        assert author["properties"]["name"] == [services.settings.author]


async def test_the_index_has_one_h1_and_links_to_the_archive(
    client: httpx.AsyncClient, services: Services
) -> None:
    per_page = services.settings.posts_per_page
    for number in range(per_page + 1):
        await publish(services, f"Post {number}", published=f"2026-01-{number + 1:02d}")

    first = await page_of(client, "/")
    second = await page_of(client, "/?page=2")

    assert [h.get_text() for h in first.find_all("h1")] == ["Latest posts"]
    assert [h.get_text(" ", strip=True) for h in second.find_all("h1")] == ["Latest posts (page 2)"]
    assert first.select_one(".site-header nav a[href='/archive']") is not None
    assert first.select_one(".site-footer a[href='/archive']") is not None


# ---- previous and next ----------------------------------------------------------------------


async def test_a_post_links_to_the_posts_before_and_after_it(
    client: httpx.AsyncClient, services: Services
) -> None:
    oldest = await publish(services, "Oldest", published="2026-01-01T10:00:00Z")
    middle = await publish(services, "Middle", published="2026-02-01T10:00:00Z")
    twin = await publish(services, "Same moment", published="2026-02-01T10:00:00Z")
    await publish(services, "Draft", published="2026-02-15T10:00:00Z", draft="true")
    newest = await publish(services, "Newest", published="2026-03-01T10:00:00Z")
    await services.blog.delete(newest.slug)

    def neighbours(page: BeautifulSoup) -> tuple[str | None, str | None]:
        links = []
        for side in ("older", "newer"):
            link = page.select_one(f".post-nav-{side} a")
            links.append(str(link["href"]) if link else None)
        return links[0], links[1]

    assert neighbours(await page_of(client, f"/posts/{oldest.slug}")) == (
        None,
        f"/posts/{middle.slug}",
    )
    assert neighbours(await page_of(client, f"/posts/{middle.slug}")) == (
        f"/posts/{oldest.slug}",
        f"/posts/{twin.slug}",
    )
    # The newest published post: the draft and the deleted post are no neighbours.
    last = await page_of(client, f"/posts/{twin.slug}")
    assert neighbours(last) == (f"/posts/{middle.slug}", None)
    assert text_of(last, ".post-nav-older") == "Previous post ← Middle"


async def test_a_new_post_appears_as_next_on_the_cached_page_before_it(
    client: httpx.AsyncClient, services: Services
) -> None:
    first = await publish(services, "First", published="2026-01-01")
    before = await page_of(client, f"/posts/{first.slug}")
    assert before.select_one(".post-nav") is None

    second = await publish(services, "Second", published="2026-01-02")
    after = await page_of(client, f"/posts/{first.slug}")

    newer = after.select_one(".post-nav-newer a")
    assert newer is not None
    assert newer["href"] == f"/posts/{second.slug}"


# ---- the monthly archive --------------------------------------------------------------------


async def test_the_archive_lists_months_with_their_published_posts(
    client: httpx.AsyncClient, services: Services
) -> None:
    await publish(services, "Late December", published="2025-12-31T23:59:59Z")
    await publish(services, "New year", published="2026-01-01T00:00:00Z")
    await publish(services, "Mid January", published="2026-01-15T12:00:00Z")
    await publish(services, "March", published="2026-03-03T08:00:00Z")
    await publish(services, "A draft", published="2026-02-02T08:00:00Z", draft="true")
    gone = await publish(services, "Deleted", published="2026-02-03T08:00:00Z")
    await services.blog.delete(gone.slug)
    future = (utcnow() + timedelta(days=30)).strftime("%Y-%m-%dT%H:%M:%SZ")
    await publish(services, "Scheduled", published=future)

    page = await page_of(client, "/archive")

    assert [h.get_text() for h in page.select("h1")] == ["Archive"]
    assert [h.get_text() for h in page.select("h2.archive-year")] == ["2026", "2025"]
    months = [
        (" ".join(li.get_text(" ", strip=True).split()), li.a["href"])
        for li in page.select(".archive-months li")
        if li.a is not None
    ]
    assert months == [
        ("March 2026 (1 post)", "/archive/2026/03"),
        ("January 2026 (2 posts)", "/archive/2026/01"),
        ("December 2025 (1 post)", "/archive/2025/12"),
    ]
    january = await page_of(client, "/archive/2026/01")
    assert [h.get_text() for h in january.find_all("h1")] == ["Posts from January 2026"]
    titles = [h.get_text(strip=True) for h in january.select("li.post-summary h2")]
    assert titles == ["Mid January", "New year"]
    assert january.select_one(".archive-link a[href='/archive']") is not None
    december = await page_of(client, "/archive/2025/12")
    assert [h.get_text(strip=True) for h in december.select("li.post-summary h2")] == [
        "Late December"
    ]


@pytest.mark.parametrize(
    "path", ["/archive/2026/02", "/archive/2026/13", "/archive/2026/00", "/archive/2026/1",
             "/archive/26/01", "/archive/abcd/01", "/archive/2026/-1"]
)  # fmt: skip
async def test_a_month_without_posts_or_misspelt_is_a_404_page(
    client: httpx.AsyncClient, services: Services, path: str
) -> None:
    await publish(services, "January", published="2026-01-15")
    await publish(services, "March", published="2026-03-15")

    response = await client.get(path)

    assert response.status_code == 404
    assert response.headers["content-type"] == "text/html; charset=utf-8"
    assert soup(response.text).find("h1").get_text() == "Not found"


async def test_archive_pages_come_from_the_page_cache_until_a_post_changes_them(
    client: httpx.AsyncClient, services: Services
) -> None:
    await publish(services, "January", published="2026-01-15")
    first = await client.get("/archive/2026/01")
    again = await client.get("/archive/2026/01", headers={"If-None-Match": first.headers["etag"]})
    assert again.status_code == 304
    assert (await client.get("/archive")).headers["etag"]

    await publish(services, "Another January", published="2026-01-20")
    changed = await client.get("/archive/2026/01", headers={"If-None-Match": first.headers["etag"]})

    assert changed.status_code == 200
    assert "Another January" in changed.text
    assert "(2 posts)" in (await client.get("/archive")).text


async def test_an_empty_blog_has_an_empty_archive(client: httpx.AsyncClient) -> None:
    page = await page_of(client, "/archive")
    assert text_of(page, "main .empty") == "Nothing here yet."


# ---- error pages ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "sentence"),
    [
        ("/?page=abc", "The page must be a whole number from 1, as in ?page=2."),
        ("/tags/fediverse?page=0", "The page must be a whole number from 1, as in ?page=2."),
        (
            "/posts/hello?responses=x",
            "The page of responses must be a whole number from 1, as in ?responses=2.",
        ),
    ],
)
async def test_a_reader_s_bad_address_gets_a_styled_page_with_a_sentence(
    client: httpx.AsyncClient, services: Services, path: str, sentence: str
) -> None:
    await publish(services, "Hello", tags="[fediverse]", slug="hello")

    response = await client.get(path)

    assert response.status_code == 400
    assert response.headers["content-type"] == "text/html; charset=utf-8"
    page = soup(response.text)
    assert page.find("link", rel="stylesheet") is not None
    assert page.find("h1").get_text() == "This address is not quite right"
    assert sentence in [p.get_text() for p in page.select("main p")]
    assert page.select_one("main a[href='/']") is not None


async def test_a_wrong_method_on_a_page_is_a_page_and_keeps_its_allow_header(
    client: httpx.AsyncClient,
) -> None:
    response = await client.post("/about")

    assert response.status_code == 405
    assert response.headers["content-type"] == "text/html; charset=utf-8"
    allowed = response.headers["allow"]
    assert set(allowed.split(", ")) == {"GET", "HEAD"}
    sentence = soup(response.text).select("main p")[0].get_text()
    assert sentence == f"This address answers {allowed}, not POST."


async def test_servers_keep_their_plain_answers(client: httpx.AsyncClient) -> None:
    """Routes that servers call answer a bad request in plain text, as before."""
    webfinger = await client.get("/.well-known/webfinger")
    outbox = await client.get("/users/blog/outbox?page=abc")

    assert webfinger.status_code == 400
    assert webfinger.headers["content-type"].startswith("text/plain")
    assert outbox.status_code in (400, 404)
    if outbox.status_code == 400:
        assert outbox.headers["content-type"].startswith("text/plain")
        assert outbox.text == "400: page must be a whole number from 1"


# ---- the demo's posts -----------------------------------------------------------------------


def demo_post(name: str) -> str:
    return (files("fediblog") / "demo_posts" / name).read_text(encoding="utf-8")


async def test_the_demo_footnote_reads_as_a_sentence_and_links_both_ways(
    client: httpx.AsyncClient, services: Services
) -> None:
    source = demo_post("02-markdown-tour.md")
    front, body = source.split("---\n", 2)[1:]
    title = re.search(r"^title: (.*)$", front, re.MULTILINE)
    assert title is not None
    post = await publish(services, title.group(1), body)

    page = await page_of(client, f"/posts/{post.slug}")

    ref = page.select_one(".e-content sup.footnote-ref a")
    assert ref is not None
    note = page.find(id=str(ref["href"]).lstrip("#"))
    assert isinstance(note, Tag)
    back = note.find("a", href=f"#{ref['id']}")
    assert back is not None
    sentence = " ".join(note.get_text(" ", strip=True).split())
    assert "  " not in note.get_text()  # nothing was cut out of it
    assert sentence.startswith("With an allowlist (nh3): a <script> element")
    assert sentence.endswith("is removed before any reader sees the page. ↩︎")
    assert page.select(".e-content script") == []


# ---- handles and links ----------------------------------------------------------------------


async def test_handles_break_only_before_the_host(
    client: httpx.AsyncClient, services: Services
) -> None:
    post = await publish(services, "Handles")
    ann = await remote_actor(services, "averyveryverylongname", "a.very.long.example", "Ann")
    await remote_comment(services, post, ann, "hi")

    response = await client.get(f"/posts/{post.slug}")

    handle = soup(response.text).select_one(".comment-meta a.handle")
    assert handle is not None
    assert handle.get_text() == "@averyveryverylongname@a.very.long.example"
    assert "@averyveryverylongname<wbr/>@a.very.long.example" in str(handle)
    acct = services.settings.acct
    assert f"@{acct.replace('@', '<wbr>@')}</strong>" in response.text  # the footer


def style_rules() -> dict[str, str]:
    """Each selector of style.css (outside @media) with its declarations."""
    css = (files("fediblog") / "static" / "style.css").read_text(encoding="utf-8")
    css = re.sub(r"/\*.*?\*/", "", css, flags=re.DOTALL)
    css = re.sub(r"@media[^{]*\{(?:[^{}]*\{[^{}]*\})*[^{}]*\}", "", css)
    rules: dict[str, str] = {}
    for selectors, body in re.findall(r"([^{}]+)\{([^{}]*)\}", css):
        for selector in selectors.split(","):
            rules[" ".join(selector.split())] = rules.get(" ".join(selector.split()), "") + body
    return rules


def test_nothing_breaks_words_anywhere_or_hides_the_underline_of_links_in_text() -> None:
    rules = style_rules()
    assert not [s for s, body in rules.items() if "break-all" in body]
    for selector in (".e-content a", ".meta a", ".site-footer a"):
        assert "underline" in rules[selector], selector
    unlined = [s for s, body in rules.items() if "text-decoration: none" in body]
    assert set(unlined) <= {".site-title a", ".post-summary h2 a", ".comment-meta .date",
                            ".comment-meta .comment-number"}  # fmt: skip


def test_links_that_stand_alone_are_24_px_targets() -> None:
    rules = style_rules()
    for selector in (".site-header nav a", ".pagination a", ".comment-actions a",
                     ".post-nav a", ".archive-months a", ".comment-meta a"):  # fmt: skip
        assert "min-height: 24px" in rules[selector], selector
        assert "min-width: 24px" in rules[selector], selector


def test_post_list_says_1_response_and_2_responses(
    blog_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run(capsys, "init")
    for title in ("One", "Two"):
        source = blog_dir / f"{title}.md"
        source.write_text(f"---\ntitle: {title}\n---\nText.\n")
        assert run(capsys, "post", "new", str(source))[0] == 0

    async def reply(slugs: dict[str, int]) -> None:
        store = await Store.open(database_for(blog_dir, "fediblog.db"))
        try:
            actor = await store.save_actor(
                ap_id="https://a.example/users/ann", username="ann", domain="a.example",
                name="Ann", url=None, icon_url=None, inbox=None, shared_inbox=None,
                key_id=None, public_key_pem=None, fetched=utcnow(),
            )  # fmt: skip
            for slug, count in slugs.items():
                post = await store.get_post_by_slug(slug)
                assert post is not None
                for number in range(count):
                    await store.save_comment(
                        post_id=post.id, parent_id=None, content_html="<p>hi</p>",
                        published=utcnow(), received=utcnow(), source="fediverse",
                        ap_id=f"https://a.example/notes/{slug}-{number}", actor_id=actor,
                        status="published", visibility="public",
                    )  # fmt: skip
        finally:
            await store.close()

    asyncio.run(reply({"one": 1, "two": 2}))
    code, out, _ = run(capsys, "post", "list")

    assert code == 0
    lines = {line.rsplit("  ", 1)[-1]: line for line in out.splitlines()}
    assert "(1 response)  One" in lines["One"]
    assert "(2 responses)  Two" in lines["Two"]
