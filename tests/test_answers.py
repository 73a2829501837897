"""The author joins the conversation: answers to responses, published, edited, deleted.

The federation tests run in tests/test_federation_e2e.py's ``World``: the blog in-process
with fake Mastodon-like instances on an in-memory network, whose inboxes verify every
signature with pyhttpsig. A fake account replies through the real inbox (Mastodon's
captured reply, tests/fixtures/mastodon/create_note_reply_mention.json, moved to the fake
host), the author answers through the service and through the real ``fediblog reply``
command (run in a thread, on the same database), and one delivery pass shows who got what.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
from collections import Counter
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from bs4 import BeautifulSoup, Tag

from fediblog.activitystreams import PUBLIC
from fediblog.answers import AnswerError, Answers, list_in_page_order
from fediblog.cli import main
from fediblog.config import Settings
from fediblog.moderation import ModerationError, hold_local_comment, set_status
from fediblog.web.deps import Services
from tests.helpers import publish, remote_actor, remote_comment, soup
from tests.test_federation_e2e import (
    AP_JSON,
    FIXTURES,
    Account,
    FakeInstance,
    World,
    assert_from_blog,
    origin,
)

pytestmark = pytest.mark.anyio

AP_ACCEPT = {"Accept": AP_JSON}
FELIX = "https://mastodon.madrid/users/felix"  # the reply fixture's author
STATUS = "107224289116410645"  # the number in its ids
_statuses = itertools.count(1)


def mastodon_reply(account: Account, in_reply_to: str, *, public: bool = False) -> Any:
    """Mastodon's captured reply (unlisted: to followers, cc Public), sent by ``account``."""
    text = (FIXTURES / "mastodon/create_note_reply_mention.json").read_text(encoding="utf-8")
    base = origin(account.ap_id)
    text = text.replace(FELIX, account.ap_id).replace("https://mastodon.madrid/@felix", base)
    text = text.replace(STATUS, f"{STATUS}{next(_statuses)}")  # each reply its own ids
    activity = json.loads(text.replace("https://mastodon.madrid", base))
    activity["object"]["inReplyTo"] = in_reply_to
    if public:
        for document in (activity, activity["object"]):
            document["to"], document["cc"] = [PUBLIC], [f"{account.ap_id}/followers"]
    return activity


async def replied(world: World, account: Account, in_reply_to: str, **options: Any) -> str:
    """``account`` replies through the real inbox; the reply's id."""
    activity = mastodon_reply(account, in_reply_to, **options)
    assert (await world.send(account, activity)).status_code == 202
    await world.services.inbox.process_once()
    assert (await world.services.store.count_inbox()).get("failed", 0) == 0
    note_id: str = activity["object"]["id"]
    assert await world.services.store.get_comment_by_ap_id(note_id) is not None
    return note_id


def use_blog_from_cli(monkeypatch: pytest.MonkeyPatch, settings: Settings, folder: Path) -> None:
    """The environment under which `fediblog` works on this blog's database and keys."""
    for name in list(os.environ):
        if name.startswith("FEDIBLOG_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("FEDIBLOG_CONFIG", str(folder / "absent.toml"))
    monkeypatch.setenv("FEDIBLOG_BASE_URL", settings.base_url)
    monkeypatch.setenv("FEDIBLOG_DATABASE", str(settings.store_location))
    monkeypatch.setenv("FEDIBLOG_KEYS_DIR", str(settings.keys_dir))
    monkeypatch.setenv("FEDIBLOG_AUTHOR", settings.author)


async def fediblog(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    """The real command, in a thread (it runs its own event loop): (code, stdout, stderr)."""
    code = await asyncio.to_thread(main, list(args))
    out, err = capsys.readouterr()
    return code, out, err


def answers_of(services: Services) -> Answers:
    return Answers(services.settings, services.store)


def li(page: BeautifulSoup, comment_id: int) -> Tag:
    found = page.select_one(f"li#comment-{comment_id}")
    assert isinstance(found, Tag), f"no comment {comment_id} on the page"
    return found


async def page_of(client: httpx.AsyncClient, url: str) -> BeautifulSoup:
    response = await client.get(url)
    assert response.status_code == 200
    return soup(response.text)


def heading(page: BeautifulSoup) -> str:
    found = page.find(id="responses-title")
    assert isinstance(found, Tag)
    return found.get_text()


def inboxes_of(fake: FakeInstance, kind: str) -> Counter[str]:
    return Counter(d.path for d in fake.received(kind))


@pytest.fixture
async def world(tmp_path: Path) -> AsyncIterator[World]:
    world = World(tmp_path, author="Tess Author")
    async with world.client, world.blog():
        yield world


# ---- an answer, end to end -----------------------------------------------------------------


async def test_answers_federate_show_under_the_response_and_can_be_edited_and_deleted(
    world: World,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    services, urls = world.services, world.services.urls
    mastodon = world.fake("mastodon.test")
    cyd = mastodon.add_account("cyd")  # replies; not a follower
    other = world.fake("other.test")
    solo = world.fake("solo.test")
    sol = solo.add_account("sol", shared_inbox=False)  # replies; no shared inbox
    for follower in (
        mastodon.add_account("bea"),
        other.add_account("dee"),
        other.add_account("eve"),
    ):
        await world.follow(follower)
    post = await publish(services, "Answers", "Ask me anything.")
    assert await services.deliverer.deliver_once() == 3 + 2  # the Accepts, the post's Create
    object_id = urls.object_id(post.uid)
    cyd_note = await replied(world, cyd, object_id)
    for fake in (mastodon, other, solo):
        fake.forget_traffic()

    # The author answers response #1 through the service.
    done = await answers_of(services).publish(f"{post.slug}#1", "Thanks, *Cyd*!")
    answer = done.answer
    assert done.target == f"{post.slug}#1"
    assert answer.ap_id.startswith(f"{object_id}/answers/")
    # One request per inbox: Cyd's server (Bea follows from there too), and other.test once.
    assert await services.deliverer.deliver_once() == 2
    assert inboxes_of(mastodon, "Create") == {"/inbox": 1}
    assert inboxes_of(other, "Create") == {"/inbox": 1}
    assert solo.deliveries == []
    (create,) = mastodon.received("Create")
    assert_from_blog(create, urls.actor)  # pyhttpsig verified our signature
    assert other.received("Create")[0].valid
    assert other.received("Create")[0].activity == create.activity
    note = create.activity["object"]
    assert create.activity["id"] == f"{answer.ap_id}#create"
    assert note["id"] == answer.ap_id
    assert note["type"] == "Note"
    assert note["attributedTo"] == urls.actor
    assert note["inReplyTo"] == cyd_note
    assert note["tag"] == [{"type": "Mention", "href": cyd.ap_id, "name": "@cyd@mastodon.test"}]
    # Addressed like Cyd's reply (unlisted), Cyd in cc, on the Note and the Create alike.
    assert note["to"] == create.activity["to"] == [urls.followers]
    assert note["cc"] == create.activity["cc"] == [PUBLIC, cyd.ap_id]
    mention = (
        f'<span class="h-card"><a href="{cyd.document["url"]}" class="u-url mention">'
        "@<span>cyd</span></a></span>"
    )
    assert note["content"] == f"<p>{mention} Thanks, <em>Cyd</em>!</p>\n"
    # The permalink, which finds the answer's page of responses however many there are.
    assert note["url"] == f"{services.blog.post_url(post)}/comments/{answer.id}"
    found = await world.client.get(note["url"])
    assert found.status_code == 302
    assert found.headers["location"].endswith(f"#comment-{answer.id}")

    # The page: nested under Cyd's response, marked as the author's, counted.
    cyd_comment = await services.store.get_comment_by_ap_id(cyd_note)
    assert cyd_comment is not None
    page = await page_of(world.client, services.blog.post_url(post))
    item = li(page, answer.id)
    assert "bypostauthor" in item["class"]
    assert item.find_parent("li") is li(page, cyd_comment.id)
    assert "bypostauthor" not in li(page, cyd_comment.id)["class"]
    author = item.select_one(".comment-meta .author")
    assert author is not None
    assert author.get_text() == "Tess Author"
    badge = item.select_one(".author-badge")
    assert badge is not None
    assert badge.get_text() == "author"
    avatar = item.select_one("img.avatar")
    assert avatar is not None
    assert avatar["src"] == "/static/avatar.png"
    assert "Anonymous" not in item.get_text()
    assert heading(page) == "2 Responses to “Answers”"

    # Its id: the Note for servers (cached like every document), the anchor for browsers.
    served = await world.client.get(answer.ap_id, headers=AP_ACCEPT)
    assert served.status_code == 200
    assert served.headers["content-type"].startswith(AP_JSON)
    assert served.headers["etag"]
    assert {k: v for k, v in served.json().items() if k != "@context"} == note
    again = await world.client.get(
        answer.ap_id, headers={**AP_ACCEPT, "If-None-Match": served.headers["etag"]}
    )
    assert again.status_code == 304
    browser = await world.client.get(answer.ap_id)
    assert browser.status_code == 302
    assert browser.headers["location"] == note["url"]
    replies = (await world.client.get(f"{object_id}/replies", headers=AP_ACCEPT)).json()
    assert replies["orderedItems"] == [cyd_note, answer.ap_id]

    # The real command, on the same database: Sol's public reply, answered from a file.
    sol_note = await replied(world, sol, object_id, public=True)
    use_blog_from_cli(monkeypatch, services.settings, tmp_path)
    answer_file = tmp_path / "answer.md"
    answer_file.write_text("Good point, **Sol**.\n", encoding="utf-8")
    code, out, err = await fediblog(capsys, "reply", sol_note, str(answer_file))
    assert (code, err) == (0, "")
    (cli_answer,) = [
        a
        for a in await list_in_page_order(services.store, post.id)
        if a.by_author and a.id != answer.id
    ]
    assert out.strip() == (
        f"answered {post.slug}#3 (@sol@solo.test): answer {cli_answer.id}, {cli_answer.ap_id}"
    )
    assert await services.deliverer.deliver_once() == 3  # Sol's own inbox, two shared ones
    (to_sol,) = solo.received("Create")
    assert_from_blog(to_sol, urls.actor)
    assert to_sol.path == "/users/sol/inbox"
    sol_answer = to_sol.activity["object"]
    assert sol_answer["inReplyTo"] == sol_note
    assert sol_answer["tag"] == [{"type": "Mention", "href": sol.ap_id, "name": "@sol@solo.test"}]
    assert sol_answer["to"] == [PUBLIC]
    assert sol_answer["cc"] == [urls.followers, sol.ap_id]
    assert "Good point, <strong>Sol</strong>." in sol_answer["content"]
    assert inboxes_of(mastodon, "Create") == {"/inbox": 2}
    assert inboxes_of(other, "Create") == {"/inbox": 2}
    page = await page_of(world.client, services.blog.post_url(post))
    assert heading(page) == "4 Responses to “Answers”"

    # Edit (by number, from the command line): an Update to the same inboxes.
    code, out, err = await fediblog(capsys, "reply", "edit", str(answer.id), "--text", "Thanks!")
    assert (code, out.strip(), err) == (0, f"updated answer {answer.id}: {answer.ap_id}", "")
    assert await services.deliverer.deliver_once() == 2
    (update,) = mastodon.received("Update")
    assert_from_blog(update, urls.actor)
    assert inboxes_of(other, "Update") == {"/inbox": 1}
    assert solo.received("Update") == []
    edited = update.activity["object"]
    assert edited["id"] == answer.ap_id
    assert edited["content"] == f"<p>{mention} Thanks!</p>\n"
    assert edited["updated"] > edited["published"]
    assert edited["tag"] == note["tag"]
    assert update.activity["cc"] == [PUBLIC, cyd.ap_id]
    served = await world.client.get(answer.ap_id, headers=AP_ACCEPT)
    assert served.json()["content"] == edited["content"]
    page = await page_of(world.client, services.blog.post_url(post))
    assert "Thanks!" in li(page, answer.id).get_text()
    assert li(page, answer.id).select_one(".edited") is not None

    # Delete (by id): a Delete of a Tombstone; the id answers 410; the page lets it go.
    code, out, err = await fediblog(capsys, "reply", "delete", answer.ap_id)
    assert (code, err) == (0, "")
    assert out.strip() == f"deleted answer {answer.id}: {answer.ap_id} now answers 410"
    assert await services.deliverer.deliver_once() == 2
    (delete,) = mastodon.received("Delete")
    assert_from_blog(delete, urls.actor)
    assert inboxes_of(other, "Delete") == {"/inbox": 1}
    assert delete.activity["object"]["type"] == "Tombstone"
    assert delete.activity["object"]["id"] == answer.ap_id
    assert cyd.ap_id in delete.activity["cc"]
    gone = await world.client.get(answer.ap_id, headers=AP_ACCEPT)
    assert gone.status_code == 410
    assert gone.json()["type"] == "Tombstone"
    assert gone.json()["formerType"] == "Note"
    page = await page_of(world.client, services.blog.post_url(post))
    assert page.select_one(f"li#comment-{answer.id}") is None
    assert heading(page) == "3 Responses to “Answers”"
    replies = (await world.client.get(f"{object_id}/replies", headers=AP_ACCEPT)).json()
    assert answer.ap_id not in replies["orderedItems"]
    # Once deleted, it can be neither edited nor deleted again; nothing more is sent.
    code, _, err = await fediblog(capsys, "reply", "delete", str(answer.id))
    assert code == 1
    assert err == f"fediblog: error: the answer {answer.id} was deleted\n"
    assert await services.deliverer.deliver_once() == 0


async def test_a_reply_to_an_answer_threads_under_it(world: World) -> None:
    services = world.services
    mastodon = world.fake("mastodon.test")
    cyd = mastodon.add_account("cyd")
    post = await publish(services, "Back and forth")
    cyd_note = await replied(world, cyd, services.urls.object_id(post.uid))
    answer = (await answers_of(services).publish(cyd_note, "Why?")).answer

    again = await replied(world, cyd, answer.ap_id)  # Cyd answers the answer

    comment = await services.store.get_comment_by_ap_id(again)
    assert comment is not None
    page = await page_of(world.client, services.blog.post_url(post))
    assert li(page, comment.id).find_parent("li") is li(page, answer.id)
    order = [c.id for c in await list_in_page_order(services.store, post.id)]
    assert order[1:] == [answer.id, comment.id]


# ---- without the fediverse: targets, numbering, bad input --------------------------------


async def test_slug_and_number_name_the_responses_in_page_order(
    ctx: Services, web: httpx.AsyncClient
) -> None:
    post = await publish(ctx, "Numbers")
    ann = await remote_actor(ctx, "ann", "one.example")
    a = await remote_comment(ctx, post, ann, "a", minutes=1)
    b = await remote_comment(ctx, post, ann, "b", minutes=3, parent=a)
    c = await remote_comment(ctx, post, ann, "c", minutes=2)
    d = await remote_comment(ctx, post, ann, "d", minutes=4, parent=b)
    e = await remote_comment(ctx, post, ann, "e", minutes=5)
    f = await remote_comment(ctx, post, ann, "f", minutes=6, parent=e)
    await remote_comment(ctx, post, ann, "held", minutes=7, status="pending")
    row = await ctx.store.get_stored_comment(e)
    assert row is not None
    await ctx.store.delete_comment(e, ap_id=row.ap_id, actor=row.actor, when=post.published)

    order = [comment.id for comment in await list_in_page_order(ctx.store, post.id)]

    assert order == [a, b, d, c, f]  # depth-first, oldest first; the placeholder unnumbered
    page = soup((await web.get(f"/posts/{post.slug}")).text)
    shown = [li["id"] for li in page.select("li.comment") if "deleted" not in li["class"]]
    assert shown == [f"comment-{n}" for n in order]
    answers = Answers(ctx.settings, ctx.store)
    for number, comment_id in enumerate(order, start=1):
        found, _, at = await answers.find_response(f"{post.slug}#{number}")
        assert (found.id, at) == (comment_id, number)


async def test_a_permalink_names_a_response_that_numbers_would_shift(
    ctx: Services, web: httpx.AsyncClient
) -> None:
    """SLUG#N moves when a reply lands in an earlier thread; the permalink the number
    links to (/posts/SLUG/comments/ID, relative or absolute) does not."""
    post = await publish(ctx, "Stable")
    ann = await remote_actor(ctx, "ann", "one.example")
    first = await remote_comment(ctx, post, ann, "first", minutes=1)
    second = await remote_comment(ctx, post, ann, "second", minutes=2)
    answers = Answers(ctx.settings, ctx.store)
    page = soup((await web.get(f"/posts/{post.slug}")).text)
    permalink = page.select_one(f"#comment-{second} a.comment-number")["href"]
    assert (await answers.find_response(f"{post.slug}#2"))[0].id == second

    await remote_comment(ctx, post, ann, "late reply", minutes=3, parent=first)

    assert (await answers.find_response(f"{post.slug}#2"))[0].id != second  # shifted
    assert (await answers.find_response(permalink))[0].id == second
    absolute = ctx.settings.base_url + permalink
    assert (await answers.find_response(absolute))[0].id == second
    with pytest.raises(AnswerError, match="no response is at"):
        await answers.find_response(f"/posts/other-post/comments/{second}")


async def test_an_answer_to_a_form_comment_replies_to_the_post(
    ctx: Services, web: httpx.AsyncClient
) -> None:
    post = await publish(ctx, "Neighbours")
    local = await hold_local_comment(
        ctx.store, post.id, name="Jane", email="jane@example.com", website=None, text="Hi!"
    )
    await ctx.store.set_comment_status(local, "published")

    answer = (await Answers(ctx.settings, ctx.store).publish(f"{post.slug}#1", "Hello Jane")).answer

    note = (await web.get(answer.ap_id, headers=AP_ACCEPT)).json()
    assert note["inReplyTo"] == ctx.blog.object_id(post.uid)
    assert note["tag"] == []
    assert note["to"] == [PUBLIC]
    assert note["cc"] == [ctx.urls.followers]
    assert note["content"] == "<p>Hello Jane</p>\n"
    page = soup((await web.get(f"/posts/{post.slug}")).text)
    item = page.select_one(f"li#comment-{local} > ol.children > li#comment-{answer.id}")
    assert item is not None
    assert "bypostauthor" in item["class"]
    assert await ctx.store.count_deliveries() == {}  # no followers, and Jane has no inbox


async def test_the_answer_id_of_nothing_is_404(ctx: Services, web: httpx.AsyncClient) -> None:
    post = await publish(ctx, "Nothing")
    response = await web.get(ctx.urls.answer_id(post.uid, "0123456789abcdef"), headers=AP_ACCEPT)
    assert response.status_code == 404


async def test_deleting_the_post_makes_its_answers_gone(
    ctx: Services, web: httpx.AsyncClient
) -> None:
    post = await publish(ctx, "Short-lived")
    ann = await remote_actor(ctx, "ann", "one.example")
    await remote_comment(ctx, post, ann, "hello")
    answers = Answers(ctx.settings, ctx.store)
    answer = (await answers.publish(f"{post.slug}#1", "Hi")).answer

    await ctx.blog.delete(post.slug)

    assert (await web.get(answer.ap_id, headers=AP_ACCEPT)).status_code == 410
    with pytest.raises(AnswerError, match=r"post of the answer .* was deleted"):
        await answers.edit(str(answer.id), "Too late")


@pytest.fixture
async def bad_targets(ctx: Services) -> dict[str, str]:
    """A post with one answerable response and every kind that is not: name -> target."""
    post = await publish(ctx, "Bad input")
    ann = await remote_actor(ctx, "ann", "one.example")
    troll = await remote_actor(ctx, "troll", "blocked.example")
    ids: dict[str, str] = {}
    for minutes, (name, options) in enumerate(
        (
            ("ok", {}),
            ("pending", {"status": "pending"}),
            ("rejected", {"status": "rejected"}),
            ("deleted", {"status": "deleted"}),
            ("followers", {"visibility": "followers"}),
            ("direct", {"visibility": "direct"}),
        ),
        start=1,
    ):
        ap_id = f"https://one.example/notes/{name}"
        await remote_comment(ctx, post, ann, name, minutes=minutes, ap_id=ap_id, **options)
        ids[name] = ap_id
    ids["blocked"] = "https://blocked.example/notes/1"
    await remote_comment(ctx, post, troll, "blocked", minutes=9, ap_id=ids["blocked"])
    await ctx.store.save_block("blocked.example", "domain")
    ids["slug"] = post.slug
    return ids


BAD_TARGETS = [
    ("nope", "'nope' names no response: give SLUG#N"),
    ("#1", "'#1' names no response"),
    ("no-such-post#1", "no post has the slug 'no-such-post'"),
    ("{slug}#2", "bad-input shows 1 response: there is no response #2"),
    ("{slug}#0", "there is no response #0"),
    ("{slug}#one", "there is no response #one"),
    ("https://one.example/notes/unknown", "no response here has the id"),
    ("{pending}", "is held for approval"),
    ("{rejected}", "was rejected"),
    ("{deleted}", "was deleted"),
    ("{followers}", "is followers-only"),
    ("{direct}", "is direct-only"),
    ("{blocked}", "is not shown (its author is blocked)"),
]


@pytest.mark.parametrize(("target", "message"), BAD_TARGETS)
async def test_a_target_that_cannot_be_answered_stores_and_sends_nothing(
    ctx: Services, bad_targets: dict[str, str], target: str, message: str
) -> None:
    before = await ctx.store.list_comments_for_review(pending_only=False)

    with pytest.raises(AnswerError, match=message.replace("(", r"\(").replace(")", r"\)")):
        await Answers(ctx.settings, ctx.store).publish(target.format(**bad_targets), "Hello")

    assert await ctx.store.list_comments_for_review(pending_only=False) == before
    assert await ctx.store.count_deliveries() == {}


@pytest.mark.parametrize("text", ["", "   \n\t", "<!-- nothing -->"])
async def test_an_empty_answer_is_refused(
    ctx: Services, bad_targets: dict[str, str], text: str
) -> None:
    with pytest.raises(AnswerError, match="the answer is empty"):
        await Answers(ctx.settings, ctx.store).publish(bad_targets["ok"], text)
    assert await ctx.store.count_deliveries() == {}


async def test_only_the_authors_answers_can_be_edited_or_deleted(
    ctx: Services, bad_targets: dict[str, str]
) -> None:
    answers = Answers(ctx.settings, ctx.store)
    comment = await ctx.store.get_comment_by_ap_id(bad_targets["ok"])
    assert comment is not None
    answer = (await answers.publish(bad_targets["ok"], "Mine")).answer
    queued = await ctx.store.count_deliveries()

    for ref in (str(comment.id), bad_targets["ok"], "999999"):
        with pytest.raises(AnswerError, match="is not one of your answers"):
            await answers.edit(ref, "Not mine")
        with pytest.raises(AnswerError, match="is not one of your answers"):
            await answers.delete(ref)
    with pytest.raises(AnswerError, match="neither an answer's number nor its id"):
        await answers.delete("bad-input#1")
    with pytest.raises(AnswerError, match="is your own answer"):
        await answers.publish(answer.ap_id, "Answering myself")
    with pytest.raises(AnswerError, match="the answer is empty"):
        await answers.edit(str(answer.id), " ")

    assert await ctx.store.count_deliveries() == queued
    assert (await ctx.store.get_author_answer(comment_id=answer.id)) == answer


async def test_two_quick_edits_are_two_updates_each_newer(
    ctx: Services, bad_targets: dict[str, str]
) -> None:
    answers = Answers(ctx.settings, ctx.store)
    answer = (await answers.publish(bad_targets["ok"], "One")).answer

    first = await answers.edit(str(answer.id), "Two")
    second = await answers.edit(str(answer.id), "Three")

    assert first.updated is not None
    assert second.updated is not None
    assert answer.published < first.updated < second.updated
    assert second.updated - answer.published <= timedelta(seconds=5)


async def test_the_command_says_what_is_wrong_in_one_line(
    ctx: Services,
    bad_targets: dict[str, str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    use_blog_from_cli(monkeypatch, ctx.settings, tmp_path)
    empty = tmp_path / "empty.md"
    empty.write_text("\n")
    for args, message in (
        (("reply", "nope", "--text", "Hi"), "'nope' names no response"),
        (("reply", bad_targets["pending"], "--text", "Hi"), "is held for approval"),
        (("reply", "bad-input#1", str(empty)), "the answer is empty"),
        (("reply", "bad-input#1", str(tmp_path / "absent.md")), "cannot read"),
        (("reply", "edit", "999999", "--text", "Hi"), "999999 is not one of your answers"),
        (("reply", "delete", bad_targets["ok"]), "is not one of your answers"),
    ):
        code, out, err = await fediblog(capsys, *args)
        assert code == 1, args
        assert out == ""
        assert err.startswith("fediblog: error: "), err
        assert err.count("\n") == 1, err
        assert message in err, err
    for args in (
        ("reply", "bad-input#1"),  # no answer
        ("reply", "bad-input#1", "answer.md", "--text", "Hi"),  # two answers
        ("reply", "edit", "--text", "Hi"),  # no number
        ("reply", "delete", "1", "--text", "Hi"),
    ):
        with pytest.raises(SystemExit) as exited:
            await fediblog(capsys, *args)
        assert exited.value.code == 2, args
        assert "fediblog reply: error:" in capsys.readouterr().err
    assert await ctx.store.count_deliveries() == {}


async def test_moderation_commands_leave_answers_to_reply(
    ctx: Services, bad_targets: dict[str, str]
) -> None:
    """`comments delete` would drop an answer without telling the followers who hold it."""
    answer = (await Answers(ctx.settings, ctx.store).publish(bad_targets["ok"], "Kept")).answer

    for status in ("deleted", "rejected", "published"):
        with pytest.raises(ModerationError, match="is your own answer"):
            await set_status(ctx.store, answer.id, status)

    assert await ctx.store.get_author_answer(comment_id=answer.id) == answer
