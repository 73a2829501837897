"""The desk's Responses section (/admin/responses): the queue of held responses with why
each was held, the actions on a response (the same services as ``fediblog comments`` and
``fediblog block``), a post's thread as the author sees it, and answering a response
(federated, signed, to the commenter's server).

The blog runs with FEDIBLOG_MODERATION=first and a held keyword; replies arrive signed
through the real inbox from tests/fediverse.py's fake servers, which record what the
blog delivers to them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import pytest
from httpsig import HeaderVerifier

from fediblog.config import Settings
from fediblog.models import Post
from fediblog.moderation import HELD_LOCAL
from fediblog.responses import HELD_FIRST, held_for_keyword
from fediblog.web.deps import Services
from tests.admin_kit import sign_in
from tests.conftest import deliver, make_settings
from tests.fediverse import Fediverse, RemoteActor
from tests.helpers import publish, run, soup

pytestmark = pytest.mark.anyio


@pytest.fixture
def settings(tmp_path: Path, blog_keys: Path) -> Settings:
    return make_settings(tmp_path, keys_dir=blog_keys, moderation="first", hold_keywords="spam")


async def reply(
    web: httpx.AsyncClient,
    ctx: Services,
    actor: RemoteActor,
    post: Post,
    number: int,
    text: str,
    in_reply_to: str | None = None,
) -> int:
    """``actor`` replies through the real inbox; the new comment's id."""
    note = actor.note(number, in_reply_to or ctx.urls.object_id(post.uid), text)
    assert (await deliver(web, ctx, actor, actor.create(note))).status_code == 202
    row = await ctx.store.get_comment_by_ap_id(note["id"])
    assert row is not None
    return int(row.id)


async def act(
    web: httpx.AsyncClient, csrf: str, comment_id: int, action: str, **fields: str
) -> httpx.Response:
    data = {"csrf": csrf, "back": "/admin/responses", **fields}
    return await web.post(f"/admin/responses/{comment_id}/{action}", data=data)


def verified(headers: dict[str, str], url: str, public_pem: str) -> bool:
    """Whether a POST the blog sent to ``url`` carries a valid signature (pyhttpsig)."""
    verifier = HeaderVerifier(
        headers,
        public_pem,
        required_headers=["(request-target)", "host", "date", "digest"],
        method="POST",
        path=httpx.URL(url).raw_path.decode(),
        sign_header="signature",
    )
    return bool(verifier.verify())


@pytest.fixture
async def alice(fediverse: Fediverse) -> RemoteActor:
    return fediverse.add("social.example", "alice")


async def test_the_queue_shows_each_held_response_with_why_it_was_held(
    web: httpx.AsyncClient, ctx: Services, alice: RemoteActor, fediverse: Fediverse
) -> None:
    post = await publish(ctx, "Hello")
    first = await reply(web, ctx, alice, post, 1, "My first words here")
    await ctx.store.set_comment_status(first, "published")
    bob = fediverse.add("other.example", "bob", key_index=1)
    spam = await reply(web, ctx, alice, post, 2, "Buy SPAM now")
    fresh = await reply(web, ctx, bob, post, 3, "Hello from Bob")
    await sign_in(web, ctx)

    page = soup((await web.get("/admin/responses")).text)

    held = {
        int(str(article["id"]).removeprefix("response-")): article
        for article in page.select("section[aria-labelledby=held-heading] article")
    }
    assert set(held) == {spam, fresh}
    assert held_for_keyword("spam") in held[spam].get_text(" ")
    assert HELD_FIRST in held[fresh].get_text(" ")
    assert "Hello from Bob" in held[fresh].get_text(" ")
    assert held[fresh].find("form", action=f"/admin/responses/{fresh}/approve")


async def test_a_comment_from_the_blogs_form_is_held_with_its_reason_and_cannot_be_blocked(
    web: httpx.AsyncClient, ctx: Services
) -> None:
    post = await publish(ctx, "Hello")
    answer = await web.post(
        f"/posts/{post.slug}/comment",
        data={"name": "Reader", "email": "r@reader.example", "comment": "Nice post"},
    )
    assert answer.status_code == 303
    (held, _, _) = (await ctx.store.list_held_responses())[0]
    csrf = await sign_in(web, ctx)

    page = (await web.get("/admin/responses")).text

    assert HELD_LOCAL in soup(page).get_text()
    assert f"/admin/responses/{held.comment.id}/block-author" not in page
    refused = await act(web, csrf, held.comment.id, "block-author")
    assert refused.status_code == 400
    assert "no account to block" in refused.text
    assert await ctx.store.list_blocks() == []


async def test_approving_from_the_queue_publishes_the_response_on_the_post(
    web: httpx.AsyncClient, ctx: Services, alice: RemoteActor
) -> None:
    post = await publish(ctx, "Hello")
    comment = await reply(web, ctx, alice, post, 1, "Held until approved")
    csrf = await sign_in(web, ctx)
    assert "Held until approved" not in (await web.get(f"/posts/{post.slug}")).text

    done = await act(web, csrf, comment, "approve")

    assert done.status_code == 303
    assert done.headers["location"] == f"/admin/responses?done=approved#response-{comment}"
    assert "Approved" in (await web.get(done.headers["location"])).text
    assert "Held until approved" in (await web.get(f"/posts/{post.slug}")).text
    row = await ctx.store.get_stored_comment(comment)
    assert row is not None
    assert row.status == "published"


async def test_reject_hides_a_published_response_and_delete_leaves_a_tombstone(
    web: httpx.AsyncClient, ctx: Services, alice: RemoteActor
) -> None:
    post = await publish(ctx, "Hello")
    first = await reply(web, ctx, alice, post, 1, "First words")
    second = await reply(web, ctx, alice, post, 2, "Second words")
    csrf = await sign_in(web, ctx)
    assert (await act(web, csrf, first, "approve")).status_code == 303
    assert (await act(web, csrf, second, "approve")).status_code == 303
    before = (await web.get(f"/posts/{post.slug}")).text  # the page is cached from now
    assert "First words" in before
    assert "Second words" in before

    assert (await act(web, csrf, first, "reject")).status_code == 303
    assert (await act(web, csrf, second, "delete")).status_code == 303

    rows = [await ctx.store.get_stored_comment(c) for c in (first, second)]
    assert [row.status for row in rows if row is not None] == ["rejected", "deleted"]
    assert await ctx.store.is_tombstoned(f"{alice.id}/statuses/2")
    after = (await web.get(f"/posts/{post.slug}")).text
    assert "First words" not in after
    assert "Second words" not in after


async def test_blocking_the_author_hides_their_responses_and_drops_what_they_send_next(
    web: httpx.AsyncClient, ctx: Services, alice: RemoteActor
) -> None:
    post = await publish(ctx, "Hello")
    comment = await reply(web, ctx, alice, post, 1, "Before the block")
    csrf = await sign_in(web, ctx)

    assert (await act(web, csrf, comment, "block-author")).status_code == 303

    assert await ctx.store.list_blocks() == [(alice.id, "actor")]
    note = alice.note(2, ctx.urls.object_id(post.uid), "After the block")
    assert (await deliver(web, ctx, alice, alice.create(note))).status_code == 202
    assert await ctx.store.get_comment_by_ap_id(note["id"]) is None
    queue = (await web.get("/admin/responses")).text
    assert "blocked: hidden" in queue


async def test_blocking_the_server_blocks_the_authors_domain_as_fediblog_block_does(
    web: httpx.AsyncClient, ctx: Services, alice: RemoteActor
) -> None:
    post = await publish(ctx, "Hello")
    comment = await reply(web, ctx, alice, post, 1, "From social.example")
    csrf = await sign_in(web, ctx)

    assert (await act(web, csrf, comment, "block-domain")).status_code == 303

    assert await ctx.store.list_blocks() == [("social.example", "domain")]
    assert ctx.inbox.is_blocked("https://social.example/users/carol")


async def test_a_posts_thread_shows_held_and_published_numbered_like_the_public_page(
    web: httpx.AsyncClient, ctx: Services, alice: RemoteActor, fediverse: Fediverse
) -> None:
    post = await publish(ctx, "Hello")
    one = await reply(web, ctx, alice, post, 1, "One")
    await ctx.store.set_comment_status(one, "published")
    two = await reply(web, ctx, alice, post, 2, "Two", in_reply_to=f"{alice.id}/statuses/1")
    held = await reply(web, ctx, alice, post, 3, "spam three")
    await sign_in(web, ctx)

    page = soup((await web.get(f"/admin/responses/posts/{post.slug}")).text)
    public = soup((await web.get(f"/posts/{post.slug}")).text)

    def numbers(html: Any) -> dict[str, str]:
        return {
            str(link["href"]).rsplit("/", 1)[-1]: link.get_text(strip=True)
            for link in html.select("a.comment-number")
        }

    assert numbers(page) == numbers(public) == {str(one): "#1", str(two): "#2"}
    thread = page.select_one("ol.desk-thread")
    assert thread is not None
    nested = thread.select_one(f"li ol.desk-thread #response-{two}")
    assert nested is not None, "the reply to #1 is nested under it"
    held_article = page.select_one(f"#response-{held}")
    assert held_article is not None
    assert "Held because" in held_article.get_text()
    assert held_article.find("form", action=f"/admin/responses/{held}/answer") is None
    assert page.find("form", action=f"/admin/responses/{one}/answer") is not None


async def test_answering_a_response_publishes_it_and_delivers_it_signed_to_the_commenter(
    web: httpx.AsyncClient, ctx: Services, alice: RemoteActor, fediverse: Fediverse
) -> None:
    post = await publish(ctx, "Hello")
    comment = await reply(web, ctx, alice, post, 1, "A question?")
    csrf = await sign_in(web, ctx)
    await act(web, csrf, comment, "approve")
    back = f"/admin/responses/posts/{post.slug}"
    assert "A question?" in (await web.get(f"/posts/{post.slug}")).text  # cached from now

    done = await act(web, csrf, comment, "answer", text="An *answer*.", back=back)

    assert done.status_code == 303
    assert done.headers["location"] == f"{back}?done=answered#response-{comment}"
    assert "An <em>answer</em>." in (await web.get(f"/posts/{post.slug}")).text
    fediverse.received.clear()
    await ctx.deliverer.deliver_once()
    (url, headers, body) = next(
        (url, headers, body)
        for url, headers, body in fediverse.received
        if url == "https://social.example/inbox"
    )
    assert verified(headers, url, ctx.blog_public_pem)
    activity = json.loads(body)
    assert activity["type"] == "Create"
    assert activity["actor"] == ctx.urls.actor
    assert activity["object"]["inReplyTo"] == f"{alice.id}/statuses/1"
    assert "<em>answer</em>" in activity["object"]["content"]
    assert {"type": "Mention", "href": alice.id} in [
        {k: tag.get(k) for k in ("type", "href")} for tag in activity["object"]["tag"]
    ]


async def test_an_empty_answer_or_one_to_a_held_response_is_refused_with_the_reason(
    web: httpx.AsyncClient, ctx: Services, alice: RemoteActor
) -> None:
    post = await publish(ctx, "Hello")
    comment = await reply(web, ctx, alice, post, 1, "Still held")
    csrf = await sign_in(web, ctx)

    held = await act(web, csrf, comment, "answer", text="Thanks")
    await act(web, csrf, comment, "approve")
    empty = await act(web, csrf, comment, "answer", text="   ")

    assert held.status_code == 400
    assert "held for approval" in held.text
    assert empty.status_code == 400
    assert "the answer is empty" in empty.text
    assert await ctx.store.count_deliveries() == {}


async def test_an_unknown_response_is_404_and_back_never_leaves_the_desk(
    web: httpx.AsyncClient, ctx: Services, alice: RemoteActor
) -> None:
    post = await publish(ctx, "Hello")
    comment = await reply(web, ctx, alice, post, 1, "Hello")
    csrf = await sign_in(web, ctx)

    missing = await act(web, csrf, 999_999, "approve")
    away = await act(web, csrf, comment, "approve", back="https://evil.example/admin")
    unknown_post = await web.get("/admin/responses/posts/no-such-post")

    assert missing.status_code == 404
    assert away.headers["location"].startswith("/admin?done=approved")
    assert unknown_post.status_code == 404


async def test_recent_responses_list_every_status_newest_first(
    web: httpx.AsyncClient, ctx: Services, alice: RemoteActor
) -> None:
    post = await publish(ctx, "Hello")
    older = await reply(web, ctx, alice, post, 1, "Older words")
    newer = await reply(web, ctx, alice, post, 2, "Newer words")
    csrf = await sign_in(web, ctx)
    await act(web, csrf, older, "reject")

    page = soup((await web.get("/admin/responses")).text)

    items = page.select("ul.desk-recent li")
    assert [item.select_one("a")["href"] for item in items] == [  # type: ignore[index]
        f"/admin/responses/posts/{post.slug}#response-{newer}",
        f"/admin/responses/posts/{post.slug}#response-{older}",
    ]
    assert "rejected" in items[1].get_text()


def test_fediblog_block_and_unblock_share_the_service(
    blog_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run(capsys, "init")
    assert run(capsys, "block", "Spam.Example")[1].strip() == "blocked domain spam.example"
    assert run(capsys, "block", "spam.example")[1].strip() == "spam.example was already blocked"
    assert run(capsys, "unblock", "spam.example")[1].strip() == "unblocked spam.example"
    code, _, err = run(capsys, "unblock", "spam.example")
    assert (code, err.strip()) == (1, "fediblog: error: spam.example is not blocked")


async def test_an_edit_that_adds_a_held_keyword_holds_the_response_again_saying_so(
    web: httpx.AsyncClient, ctx: Services, alice: RemoteActor
) -> None:
    post = await publish(ctx, "Hello")
    comment = await reply(web, ctx, alice, post, 1, "Innocent words")
    await ctx.store.set_comment_status(comment, "published")
    note = alice.note(
        1, ctx.urls.object_id(post.uid), "Now with spam", updated="2026-11-28T13:00:00Z"
    )
    update = {"id": f"{note['id']}/edit", "type": "Update", "actor": alice.id, "object": note}

    assert (await deliver(web, ctx, alice, update)).status_code == 202

    ((entry, reason, _),) = await ctx.store.list_held_responses()
    assert entry.comment.id == comment
    assert reason == held_for_keyword("spam") + " (added by an edit)"


async def test_a_held_response_under_a_deleted_post_is_not_counted_nor_acted_on(
    web: httpx.AsyncClient, ctx: Services, alice: RemoteActor
) -> None:
    post = await publish(ctx, "Hello")
    comment = await reply(web, ctx, alice, post, 1, "Held, then its post goes")
    csrf = await sign_in(web, ctx)
    assert await ctx.store.count_held_comments() == 1
    await ctx.blog.delete(post.slug)

    dashboard = soup((await web.get("/admin")).text).get_text(" ")
    queue = soup((await web.get("/admin/responses")).text)

    assert await ctx.store.count_held_comments() == 0
    assert "Held responses 0" in " ".join(dashboard.split())
    heading = queue.select_one("#held-heading")
    assert heading is not None
    assert heading.get_text() == "Held for you (0)"
    approve = await act(web, csrf, comment, "approve")
    assert approve.status_code == 404
    assert "its post was deleted" in approve.text
    row = await ctx.store.get_stored_comment(comment)
    assert row is not None
    assert row.status == "pending"


async def test_the_held_heading_counts_every_held_response_not_only_those_listed(
    web: httpx.AsyncClient, ctx: Services, alice: RemoteActor, monkeypatch: pytest.MonkeyPatch
) -> None:
    post = await publish(ctx, "Hello")
    for number in (1, 2, 3):
        await reply(web, ctx, alice, post, number, f"Held {number}")
    real = ctx.store.list_held_responses

    async def first_two(limit: int = 200) -> Any:
        return await real(2)  # as the queue's 200 does for a longer queue

    monkeypatch.setattr(ctx.store, "list_held_responses", first_two)
    await sign_in(web, ctx)

    page = soup((await web.get("/admin/responses")).text)

    heading = page.select_one("#held-heading")
    assert heading is not None
    assert heading.get_text() == "Held for you (3)"
    assert len(page.select("section[aria-labelledby=held-heading] article")) == 2
    assert "here are the oldest 2" in page.get_text()


@pytest.mark.parametrize(
    "path",
    [
        "/admin/responses/99999999999999999999/approve",
        "/admin/responses/9223372036854775808/answer",
    ],
)
async def test_a_response_number_too_big_for_sqlite_is_404_on_the_desk(
    web: httpx.AsyncClient, ctx: Services, path: str
) -> None:
    csrf = await sign_in(web, ctx)

    answer = await web.post(path, data={"csrf": csrf, "back": "/admin/responses"})

    assert answer.status_code == 404


@pytest.mark.parametrize("kind", ["comments", "reply"])
async def test_a_response_number_too_big_for_sqlite_is_404_on_the_public_pages(
    web: httpx.AsyncClient, ctx: Services, kind: str
) -> None:
    post = await publish(ctx, "Hello")

    huge = await web.get(f"/posts/{post.slug}/{kind}/99999999999999999999")
    edge = await web.get(f"/posts/{post.slug}/{kind}/9223372036854775807")

    assert huge.status_code == 404
    assert edge.status_code == 404  # no such row, but SQLite can look it up


async def test_an_edit_adding_a_held_keyword_to_a_held_response_updates_why(
    web: httpx.AsyncClient, ctx: Services, alice: RemoteActor
) -> None:
    post = await publish(ctx, "Hello")
    comment = await reply(web, ctx, alice, post, 1, "Innocent words")
    ((_, reason, _),) = await ctx.store.list_held_responses()
    assert reason == HELD_FIRST
    note = alice.note(
        1, ctx.urls.object_id(post.uid), "Now with spam", updated="2026-11-28T13:00:00Z"
    )
    update = {"id": f"{note['id']}/edit", "type": "Update", "actor": alice.id, "object": note}

    assert (await deliver(web, ctx, alice, update)).status_code == 202

    ((entry, reason, _),) = await ctx.store.list_held_responses()
    assert entry.comment.id == comment
    assert reason == held_for_keyword("spam") + " (added by an edit)"


async def answered(
    web: httpx.AsyncClient, ctx: Services, csrf: str, alice: RemoteActor
) -> tuple[Post, int, int]:
    """A published response of alice's, answered from the desk: (post, it, the answer)."""
    post = await publish(ctx, "Hello")
    comment = await reply(web, ctx, alice, post, 1, "What about Bob?")
    await act(web, csrf, comment, "approve")
    await act(web, csrf, comment, "answer", text="Bob is *fine*, thanks.")
    (answer,) = [
        entry.comment.id
        for entry, _, _ in await ctx.store.list_responses_for_author(post.id)
        if entry.comment.by_author
    ]
    return post, comment, answer


async def test_block_author_on_your_own_answer_says_it_is_yours(
    web: httpx.AsyncClient, ctx: Services, alice: RemoteActor
) -> None:
    csrf = await sign_in(web, ctx)
    _, _, answer = await answered(web, ctx, csrf, alice)

    refused = await act(web, csrf, answer, "block-author")

    assert refused.status_code == 400
    assert "your own answer" in refused.text
    assert "blog's own form" not in refused.text
    assert await ctx.store.list_blocks() == []


@pytest.mark.parametrize(
    "target", ["blog.example", "BLOG.example.", "https://blog.example/users/blog"]
)
def test_fediblog_block_refuses_the_blogs_own_server(
    blog_dir: Path, capsys: pytest.CaptureFixture[str], target: str
) -> None:
    run(capsys, "init")

    code, _, err = run(capsys, "block", target)

    assert code == 1
    assert err.startswith("fediblog: error: ")
    assert "there is nothing to block there" in err
    assert run(capsys, "blocks")[1].strip() == "no blocks"
    assert run(capsys, "block", "sub.blog.example")[0] == 0  # maybe someone else's


@pytest.mark.parametrize("action", ["reject", "block-author", "block-domain"])
async def test_hiding_an_answered_response_says_the_answer_stays_and_offers_to_delete_it(
    web: httpx.AsyncClient, ctx: Services, alice: RemoteActor, fediverse: Fediverse, action: str
) -> None:
    fediverse.received.clear()
    csrf = await sign_in(web, ctx)
    post, comment, answer = await answered(web, ctx, csrf, alice)
    await ctx.deliverer.deliver_once()

    done = await act(web, csrf, comment, action)

    thread = f"/admin/responses/posts/{post.slug}"
    assert done.status_code == 303
    assert done.headers["location"].startswith(f"{thread}?done=")
    assert done.headers["location"].endswith(f"-answer#response-{answer}")
    page = soup((await web.get(done.headers["location"])).text)
    notice = page.select_one("p.notice[role=status]")
    assert notice is not None
    assert "Your answer under it is still on the post" in notice.get_text()
    article = page.select_one(f"#response-{answer}")
    assert article is not None
    assert "out of context" in article.get_text()
    assert article.find("form", action=f"/admin/responses/{answer}/delete-answer")
    assert "Bob is <em>fine</em>" in (await web.get(f"/posts/{post.slug}")).text

    fediverse.received.clear()
    deleted = await act(web, csrf, answer, "delete-answer", back=thread)

    assert deleted.headers["location"] == f"{thread}?done=answer-deleted#response-{answer}"
    assert "Bob is <em>fine</em>" not in (await web.get(f"/posts/{post.slug}")).text
    await ctx.deliverer.deliver_once()
    sent = {url: json.loads(body) for url, _, body in fediverse.received}
    assert sent["https://social.example/inbox"]["type"] == "Delete"


async def test_an_answer_from_the_desk_reaches_the_followers_inboxes_too(
    web: httpx.AsyncClient, ctx: Services, alice: RemoteActor, fediverse: Fediverse
) -> None:
    bob = fediverse.add("other.example", "bob", key_index=1)
    follow = {
        "@context": "https://www.w3.org/ns/activitystreams",
        "id": f"{bob.id}/follows/1",
        "type": "Follow",
        "actor": bob.id,
        "object": ctx.urls.actor,
    }
    assert (await deliver(web, ctx, bob, follow)).status_code == 202
    csrf = await sign_in(web, ctx)
    await ctx.deliverer.deliver_once()  # bob's Accept
    fediverse.received.clear()

    await answered(web, ctx, csrf, alice)
    await ctx.deliverer.deliver_once()

    follower = await ctx.store.get_follower(bob.id)
    assert follower is not None
    inbox = follower.shared_inbox or follower.inbox
    creates = {
        url: json.loads(body)
        for url, headers, body in fediverse.received
        if json.loads(body)["type"] == "Create" and verified(headers, url, ctx.blog_public_pem)
    }
    assert set(creates) == {inbox, "https://social.example/inbox"}
    assert "Bob is <em>fine</em>" in creates[inbox]["object"]["content"]
