"""A page of responses holds at most FEDIBLOG_RESPONSES_PER_PAGE of them, whatever shape
the threads take: one chain of replies, one bushy thread, one response with every reply.

Comments are seeded as tests/bench does (``Store.save_seed_comments``, one transaction)
and the pages read through the real app. Numbers, permalinks and ``SLUG#N`` must keep
naming the same responses as ``answers.list_in_page_order`` (build_threads) does.
"""

from __future__ import annotations

import random
import re
from collections.abc import AsyncIterator, Iterator
from datetime import timedelta
from pathlib import Path

import httpx
import pytest
from bs4 import BeautifulSoup, Tag
from starlette.applications import Starlette

from fediblog.answers import Answers, list_in_page_order
from fediblog.comments import MAX_DEPTH, build_threads, place_steps
from fediblog.models import Post, Thread
from fediblog.web.deps import Services
from tests.conftest import BASE_URL, make_settings
from tests.helpers import publish, remote_actor, remote_comment, running, soup

pytestmark = pytest.mark.anyio

PER_PAGE = 100


@pytest.fixture
async def app(tmp_path: Path, blog_keys: Path) -> AsyncIterator[Starlette]:
    settings = make_settings(tmp_path, keys_dir=blog_keys, responses_per_page=PER_PAGE)
    async with running(settings, run_workers=False) as started:
        yield started


@pytest.fixture
def services(app: Starlette) -> Services:
    found: Services = app.state.services
    return found


@pytest.fixture
async def web(app: Starlette) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url=BASE_URL) as client:
        yield client


def parent_in(shape: str, n: int) -> int | None:
    """Comment n's parent (an index) in one thread of that shape: comment 0 starts it."""
    if n == 0:
        return None
    return {"chain": n - 1, "bushy": (n - 1) // 2, "star": 0}[shape]


async def one_thread(services: Services, shape: str, count: int) -> Post:
    post = await publish(services, f"A {shape}")
    actor = await remote_actor(services, "ann", "a.example", "Ann")
    await services.store.save_seed_comments(
        post.id,
        [
            (
                parent_in(shape, n),
                actor,
                f"https://a.example/notes/{shape}/{n}",
                f"<p>{shape} {n}</p>",
                post.published + timedelta(seconds=n),
            )
            for n in range(count)
        ],
    )
    return post


def every(threads: list[Thread]) -> Iterator[Thread]:
    for thread in threads:
        yield thread
        yield from every(thread.children)


def numbers(page: BeautifulSoup) -> list[int]:
    return [int(a.get_text().lstrip("#")) for a in page.select("#responses a.comment-number")]


def shown_ids(page: BeautifulSoup) -> list[int]:
    """The responses a page shows, in page order (not what it names as continued)."""
    return [int(str(li["id"]).removeprefix("comment-")) for li in page.select("li.comment")]


async def page_at(web: httpx.AsyncClient, path: str) -> BeautifulSoup:
    response = await web.get(path)
    assert response.status_code == 200, path
    return soup(response.text)


@pytest.mark.long  # 50,000 comments seeded and walked: started last, it ended CI runs alone
@pytest.mark.parametrize("shape", ["chain", "bushy", "star"])
async def test_the_first_page_of_50000_responses_in_one_thread_is_bounded(
    web: httpx.AsyncClient, services: Services, shape: str
) -> None:
    post = await one_thread(services, shape, 50_000)

    response = await web.get(f"/posts/{post.slug}")

    page = soup(response.text)
    assert numbers(page) == list(range(1, PER_PAGE + 1))
    assert len(page.select("#responses li")) == PER_PAGE
    assert len(response.content) < 200_000
    assert "Responses page 1 of 500" in page.get_text()
    goes_on = page.select_one(".thread-continues a")
    assert isinstance(goes_on, Tag)  # the one thread is cut: a link to where it goes on
    target = str(goes_on["href"])
    assert target.startswith(f"/posts/{post.slug}?responses=2#comment-")
    second = await page_at(web, target.split("#")[0])
    assert numbers(second) == list(range(PER_PAGE + 1, 2 * PER_PAGE + 1))
    assert second.find(id=target.split("#")[1]) is not None
    assert second.select_one("li.continued .continued-note") is not None  # says what it goes on

    # The last response is on the last page, and its permalink says so.
    order = await list_in_page_order(services.store, post.id)
    last = await web.get(f"/posts/{post.slug}/comments/{order[-1].id}")
    assert last.headers["location"] == f"/posts/{post.slug}?responses=500#comment-{order[-1].id}"
    final = await page_at(web, f"/posts/{post.slug}?responses=500")
    assert numbers(final)[-1] == 50_000
    assert final.select_one(".thread-continues") is None


@pytest.mark.parametrize("shape", ["chain", "bushy", "star"])
async def test_every_response_is_reached_by_following_the_links_numbered_as_slug_n(
    web: httpx.AsyncClient, services: Services, shape: str
) -> None:
    post = await one_thread(services, shape, 1_050)
    order = [c.id for c in await list_in_page_order(services.store, post.id)]

    seen: list[int] = []
    path: str | None = f"/posts/{post.slug}"
    while path is not None:
        page = await page_at(web, path)
        assert len(page.select("#responses li.comment")) <= PER_PAGE
        ids = shown_ids(page)
        assert numbers(page) == [len(seen) + n for n in range(1, len(ids) + 1)]
        seen += ids
        goes_on = page.select_one(".thread-continues a")
        following = page.select_one("#responses a[rel=next]")
        if goes_on is not None:  # the continuation and the next page are the same page
            assert following is not None
            assert str(goes_on["href"]).split("#")[0] == str(following["href"]).split("#")[0]
        path = str(following["href"]).split("#")[0] if following else None

    assert seen == order  # each once, in page order: the numbers SLUG#N names
    answers = Answers(services.settings, services.store)
    for number in (1, 7, 101, 1_050):
        comment, _, found = await answers.find_response(f"{post.slug}#{number}")
        assert (comment.id, found) == (seen[number - 1], number)


async def test_a_page_that_starts_inside_a_thread_names_the_responses_it_continues(
    web: httpx.AsyncClient, services: Services
) -> None:
    post = await one_thread(services, "chain", 2 * PER_PAGE)

    second = await page_at(web, f"/posts/{post.slug}?responses=2")

    # The chain nests MAX_DEPTH deep, then goes on at that depth: the page opens with
    # the MAX_DEPTH - 1 responses above its first one, each a link to where it is shown.
    notes = second.select("li.continued > .continued-note")
    assert len(notes) == MAX_DEPTH - 1
    assert [a.get_text() for note in notes for a in note.select("a")] == [
        f"#{n}" for n in range(1, MAX_DEPTH)
    ]
    assert second.select("li.continued > article") == []  # named, not shown again
    first_shown = second.select_one("li.comment")
    assert isinstance(first_shown, Tag)
    assert first_shown.select_one("a.comment-reply") is not None
    assert numbers(second)[0] == PER_PAGE + 1


async def test_the_walk_orders_as_build_threads_whatever_the_tree(services: Services) -> None:
    """Random trees deeper than MAX_DEPTH, with replies dated before what they answer,
    deleted placeholders, held and private comments, and orphans: the store's walk gives
    the responses in the order and with the numbers the page order gives them."""
    rng = random.Random(12)
    post = await publish(services, "Random")
    actor = await remote_actor(services, "ann", "a.example")
    ids: list[int] = []
    for n in range(400):
        parent = rng.choice(ids[-30:]) if ids and rng.random() < 0.85 else None
        status = rng.choices(["published", "deleted", "pending"], [0.8, 0.15, 0.05])[0]
        visibility = "followers" if rng.random() < 0.03 else "public"
        ids.append(
            await remote_comment(
                services,
                post,
                actor,
                f"c{n}",
                parent=parent,
                minutes=n + rng.randint(-40, 40),  # some replies dated before their parent
                status=status,
                visibility=visibility,
            )
        )

    walk = await services.store.list_response_walk(post.id, 10_000, max_depth=MAX_DEPTH)
    places = place_steps(walk)

    expected = [c.id for c in await list_in_page_order(services.store, post.id)]
    numbered = [step[0] for step, place in zip(walk, places, strict=True) if place and not step[3]]
    assert numbered == expected
    kept = [step[0] for step, place in zip(walk, places, strict=True) if place and step[3]]
    threads = build_threads(await services.store.list_visible_comments(post.id))
    assert kept == [t.comment.id for t in every(threads) if t.deleted]
    assert kept  # the tree had placeholders worth showing
    assert [p for step, p in zip(walk, places, strict=True) if not step[3]] == list(
        range(1, len(expected) + 1)
    )
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ\d{12}", walk[0][2])
