"""Every captured reply, like, boost, update and delete, through the real inbox, onto the page.

The payloads are the real ones in tests/fixtures (provenance in its SOURCES.md). Each
test loads one, changes only what must change so that it answers one of OUR posts
(``inReplyTo``, a Like's ``object``…), registers a fake account under the payload's
own actor id in the fake fediverse (so every id keeps its host and path), re-signs the
body with pyhttpsig (``deliver``) and then looks at what a reader and a server get:
the HTML page, the post's ``replies`` collection and the counts.

Several captured payloads use ``http://`` ids (upstream test authors rewrote the hosts
to ``mastodon.example.org``; GoToSocial's are from its ``localhost:8080`` rig), so the
app here runs with ``allow_http``; ``test_http_ids_are_refused_by_default`` checks
that, without it, they are refused before anything is fetched.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from bs4 import BeautifulSoup, Tag

from fediblog.activitystreams import host_of
from fediblog.config import Settings
from fediblog.models import Post
from fediblog.web.deps import Services
from tests.conftest import deliver, make_settings
from tests.fediverse import AS_PUBLIC, FIXTURES, Fediverse, RemoteActor, fixture, remote_key
from tests.helpers import comment_tree, publish, soup

pytestmark = pytest.mark.anyio

AP_ACCEPT = {"Accept": "application/activity+json"}
NOFOLLOW = ["nofollow", "ugc", "noopener"]

# Every reply/like/boost/update/delete payload of the shared fixture set; each is used below.
PAYLOADS = (
    "mastodon/create_note_reply_mention.json",
    "mastodon/note_reply_with_attachment.json",
    "mastodon/create_note_hashtag_cw.json",
    "mastodon/update_note_edited.json",
    "mastodon/like.json",
    "mastodon/undo_like.json",
    "mastodon/announce.json",
    "mastodon/undo_announce.json",
    "mastodon/delete_note_tombstone.json",
    "mastodon/delete_actor.json",
    "misskey/create_note_reply.json",
    "misskey/like_with_reaction.json",
    "misskey/delete_note_tombstone.json",
    "pleroma/create_note_reply.json",
    "pleroma/delete_object_iri.json",
    "pleroma/note_emoji_in_summary.json",
    "gotosocial/create_note_cw.json",
    "gotosocial/note_reply_with_mention.json",
    "gotosocial/delete_note_no_id.json",
    "lemmy/comment_note.json",
    "lemmy/post_page.json",
    "wordpress/comment_note.json",
)

# The actor ids the payloads were captured with.
FELIX = "https://mastodon.madrid/users/felix"
ADMIN = "http://mastodon.example.org/users/admin"
KDE = "https://floss.social/users/kde"
AMY = "https://tech.lgbt/users/amy727"
MISSKEY_USER = "https://misskey.usbharu.dev/users/97ws8y3rj6"
NUTOMIC = "https://greenish.red/users/nutomic"
VPZOM = "https://greenish.red/users/vpzom"
RIN = "https://patch.cx/users/rin"
ZORK = "http://localhost:8080/users/the_mighty_zork"
GTS_ADMIN = "http://localhost:8080/users/admin"
PICARD = "https://enterprise.lemmy.ml/u/picard"
TENFORWARD = "https://enterprise.lemmy.ml/c/tenforward"
PFEFFERLE = "https://pfefferle.org/author/pfefferle/"

# Their replies' text on the page (``comment_tree`` joins text nodes with a space).
FELIX_TEXT = (
    "@ retiolus i have never been disappointed by a thinkpad. if you want to save money,"
    " get a model from a few years ago, there isnt a huge difference anyway."
)
MISSKEY_TEXT = (
    "@trapezial@calckey.jp いやそういうことじゃなくて、"
    "連合先と自インスタンスで状態が狂うことが多いのでどっちに合わせるべきかと…"
)


@pytest.fixture
def settings(request: pytest.FixtureRequest, tmp_path: Path) -> Settings:
    values: dict[str, Any] = {"allow_http": True}
    values.update(getattr(request, "param", {}))
    return make_settings(tmp_path, **values)


# ---- the fake accounts --------------------------------------------------------------------


@dataclass
class FixtureActor(RemoteActor):
    """A fake account whose id is exactly the one a payload was captured with
    (``/u/picard``, ``/author/pfefferle/``, ``http://localhost:8080/…``)."""

    actor_id: str = ""

    @property
    def id(self) -> str:
        return self.actor_id


def account(
    fediverse: Fediverse,
    actor_id: str,
    username: str,
    key_index: int,
    *,
    name: str = "",
    **document: Any,
) -> FixtureActor:
    actor = FixtureActor(
        host_of(actor_id),
        username,
        remote_key(key_index),
        name=name,
        document_overrides=document,
        actor_id=actor_id,
    )
    fediverse.actors[actor.id] = actor
    return actor


def create_of(note: dict[str, Any], activity_id: str) -> dict[str, Any]:
    """A bare captured Note, wrapped in the Create its author's server sends."""
    body = {key: value for key, value in note.items() if key != "@context"}
    return {
        "@context": note.get("@context", "https://www.w3.org/ns/activitystreams"),
        "id": activity_id,
        "type": "Create",
        "actor": note["attributedTo"],
        "published": note.get("published"),
        "to": note.get("to", []),
        "cc": note.get("cc", []),
        "object": body,
    }


# ---- what a reader and a server see -------------------------------------------------------


async def page_of(web: httpx.AsyncClient, post: Post) -> BeautifulSoup:
    response = await web.get(f"/posts/{post.slug}")
    assert response.status_code == 200
    return soup(response.text)


async def replies_of(web: httpx.AsyncClient, post: Post) -> list[str]:
    collection = (await web.get(f"/p/{post.uid}/replies", headers=AP_ACCEPT)).json()
    items: list[str] = collection["orderedItems"]
    assert collection["totalItems"] == len(items)
    return items


def title(page: BeautifulSoup) -> str:
    found = page.find(id="responses-title")
    assert isinstance(found, Tag)
    return found.get_text()


def comment_of(page: BeautifulSoup, handle: str) -> Tag:
    """The one comment on the page by ``handle``."""
    found = [li for li in page.select("li.comment") if _handle(li) == handle]
    assert len(found) == 1, [_handle(li) for li in page.select("li.comment")]
    return found[0]


def _handle(li: Tag) -> str | None:
    header = li.find("header", class_="comment-meta")
    handle = header.find(class_="handle") if isinstance(header, Tag) else None
    return handle.get_text() if isinstance(handle, Tag) else None


def content_of(comment: Tag) -> Tag:
    body = comment.find(class_="comment-body")
    assert isinstance(body, Tag)
    content = body.find(class_="e-content")
    assert isinstance(content, Tag)
    return content


def reactions(page: BeautifulSoup) -> dict[str, tuple[str, list[str]]]:
    """{"like"|"boost": (the count shown, the handles of the avatars)}."""
    rows: dict[str, tuple[str, list[str]]] = {}
    for row in page.select(".reactions .reaction-row"):
        count = row.select_one(".reaction-count")
        assert count is not None
        label = count.get_text()
        kind = "like" if "like" in label else "boost"
        rows[kind] = (label, [str(img["alt"]) for img in row.select("img.avatar-small")])
    return rows


async def inbox_failures(ctx: Services) -> int:
    return (await ctx.store.count_inbox()).get("failed", 0)


def assert_safe_link(link: Tag) -> None:
    assert link.get("rel") == NOFOLLOW
    assert str(link["href"]).startswith(("https://", "http://"))
    assert not any(name.startswith("on") or name in ("target", "style") for name in link.attrs)


# ---- the fixtures are here, with their provenance -------------------------------------------


def test_every_payload_is_copied_with_its_provenance() -> None:
    sources = (FIXTURES / "SOURCES.md").read_text()
    for path in PAYLOADS:
        assert (FIXTURES / path).is_file(), path
        folder, name = path.split("/")
        assert f"| {name} |" in sources.split(f"### {folder}/", 1)[-1], path


# ---- Mastodon ---------------------------------------------------------------------------------


async def test_mastodon_unlisted_reply_with_mention(
    web: httpx.AsyncClient, ctx: Services, fediverse: Fediverse
) -> None:
    """create_note_reply_mention.json: to followers, cc Public (unlisted) → shown."""
    post = await publish(ctx, "Thinkpads")
    felix = account(fediverse, FELIX, "felix", 0, name="Félix")
    activity = fixture("mastodon/create_note_reply_mention.json")
    activity["object"]["inReplyTo"] = ctx.blog.object_id(post.uid)
    note = activity["object"]

    assert (await deliver(web, ctx, felix, activity)).status_code == 202

    page = await page_of(web, post)
    comment = comment_of(page, "@felix@mastodon.madrid")
    content = content_of(comment)
    # `content` is rendered, not the captured `contentMap` (which lost its spaces upstream).
    assert content.get_text().startswith("@retiolus i have never been disappointed by a thinkpad")
    assert "neverbeendisappointed" not in page.get_text()
    mention = content.select_one("span.h-card > a.mention")
    assert mention is not None
    assert mention["href"] == "https://mamot.fr/@retiolus"
    assert_safe_link(mention)
    author = comment.select_one("a.author")
    assert author is not None
    assert author.get_text() == "Félix"
    avatar = comment.select_one("img.avatar")
    assert avatar is not None
    assert avatar["src"] == ctx.proxy.local_url("https://mastodon.madrid/avatars/felix.png")
    date = comment.select_one("a.date")
    assert date is not None
    assert date["href"] == note["url"]
    assert date.time is not None
    assert date.time["datetime"] == "2021-11-05T11:46:50Z"
    assert title(page) == "1 Response to “Thinkpads”"
    assert await replies_of(web, post) == [note["id"]]
    stored = await ctx.store.get_comment_by_ap_id(note["id"])
    assert stored is not None
    assert stored.visibility == "unlisted"


@pytest.mark.parametrize(
    ("to", "cc", "visibility"),
    [
        pytest.param(
            [f"{FELIX}/followers"], ["https://mamot.fr/users/retiolus"], "followers", id="followers"
        ),
        pytest.param(["https://mamot.fr/users/retiolus"], [], "direct", id="direct"),
    ],
)
async def test_followers_only_and_direct_replies_are_never_shown(
    web: httpx.AsyncClient,
    ctx: Services,
    fediverse: Fediverse,
    to: list[str],
    cc: list[str],
    visibility: str,
) -> None:
    """The same Mastodon reply, without Public in its audience (ATTACKS.md 36)."""
    post = await publish(ctx, "Private matters")
    felix = account(fediverse, FELIX, "felix", 0)
    activity = fixture("mastodon/create_note_reply_mention.json")
    activity["object"]["inReplyTo"] = ctx.blog.object_id(post.uid)
    for document in (activity, activity["object"]):
        document["to"], document["cc"] = to, cc

    assert (await deliver(web, ctx, felix, activity)).status_code == 202

    stored = await ctx.store.get_comment_by_ap_id(activity["object"]["id"])
    assert stored is not None
    assert stored.visibility == visibility
    page = await page_of(web, post)
    assert "thinkpad" not in page.get_text()
    assert page.select("li.comment") == []
    assert title(page) == "0 Responses to “Private matters”"
    assert await replies_of(web, post) == []
    index = await web.get("/")
    assert "thinkpad" not in index.text
    assert "0 Responses" in index.text
    for feed in ("/feed.xml", "/feed.json"):
        assert "thinkpad" not in (await web.get(feed)).text
    [listed] = await ctx.store.list_posts(limit=10)
    assert listed.response_count == 0


async def test_mastodon_reply_with_an_image_attachment(
    web: httpx.AsyncClient, ctx: Services, fediverse: Fediverse
) -> None:
    """note_reply_with_attachment.json: a bare Note (wrapped in its Create)."""
    post = await publish(ctx, "Funding")
    kde = account(fediverse, KDE, "kde", 1, name="KDE")
    note = fixture("mastodon/note_reply_with_attachment.json")
    note["inReplyTo"] = ctx.blog.object_id(post.uid)

    await deliver(web, ctx, kde, create_of(note, f"{note['id']}/activity"))

    page = await page_of(web, post)
    content = content_of(comment_of(page, "@kde@floss.social"))
    image = content.select_one("img")
    assert image is not None
    assert image["src"] == ctx.proxy.local_url(note["attachment"][0]["url"])
    assert image["alt"] == (
        "The KDE dragons Katie and Konqi stand on either side of a pot filling up with"
        " gold coins. Donate!"
    )
    assert image.parent is not None
    assert image.parent.name == "a"
    assert_safe_link(image.parent)
    donate = content.select_one('a[href="https://kde.org/donate/"]')
    assert donate is not None
    assert_safe_link(donate)  # target="_blank" and the sender's rel are gone
    assert donate.get_text() == "https://kde.org/donate/"
    assert page.select(".link-host") == []  # the text shows the real host: nothing to add
    mention = content.select_one("a.mention")
    assert mention is not None
    assert mention["href"] == "https://lemmy.kde.social/c/kde"
    assert_safe_link(mention)
    assert "We also need funding 💶 to keep the gears turning!" in content.get_text()
    assert await replies_of(web, post) == [note["id"]]


async def test_mastodon_content_warning_with_a_hashtag(
    web: httpx.AsyncClient, ctx: Services, fediverse: Fediverse
) -> None:
    """create_note_hashtag_cw.json: `summary` + `sensitive` collapse it in a <details>."""
    post = await publish(ctx, "Cows")
    admin = account(fediverse, ADMIN, "admin", 2)
    activity = fixture("mastodon/create_note_hashtag_cw.json")
    activity["object"]["inReplyTo"] = ctx.blog.object_id(post.uid)

    await deliver(web, ctx, admin, activity)

    page = await page_of(web, post)
    comment = comment_of(page, "@admin@mastodon.example.org")
    details = comment.select_one("details.content-warning")
    assert details is not None
    assert details.get("open") is None
    summary = details.find("summary")
    assert summary is not None
    assert summary.get_text() == "cw"
    content = details.select_one(".e-content")
    assert content is not None
    assert content.get_text() == "@lain #moo"
    mention = content.select_one("a.mention")
    assert mention is not None
    assert mention["href"] == "http://localtesting.pleroma.lol/users/lain"
    assert_safe_link(mention)
    # The captured content carries `#moo` as text, not a link; nothing invents one.
    assert len(content.select("a")) == 1
    assert await replies_of(web, post) == [activity["object"]["id"]]


async def test_mastodon_edit_applies_only_when_newer(
    web: httpx.AsyncClient, ctx: Services, fediverse: Fediverse
) -> None:
    """update_note_edited.json, after the Create of the same Note before the edit."""
    post = await publish(ctx, "Keys")
    amy = account(fediverse, AMY, "amy727", 3)
    update = fixture("mastodon/update_note_edited.json")
    update["object"]["inReplyTo"] = ctx.blog.object_id(post.uid)
    note_id = update["object"]["id"]
    # The Note as first published: before the edit, no `updated`; captured as a direct
    # message to another server, so its audience is made public for the page to show it.
    before = copy.deepcopy(update["object"])
    del before["updated"]
    before["content"] = before["content"].replace("test public key 5", "test public key 4")
    before["contentMap"] = {"en": before["content"]}
    before["to"], before["cc"] = [AS_PUBLIC], []
    await deliver(web, ctx, amy, create_of(before, f"{note_id}/activity"))

    def shown() -> tuple[str, list[Tag]]:
        comment = comment_of(page, "@amy727@tech.lgbt")
        return content_of(comment).get_text(), comment.select(".edited")

    page = await page_of(web, post)
    assert shown() == ("@1234 test public key 4", [])

    # Not newer (`updated` == `published`): ignored, and no "edited".
    stale = copy.deepcopy(update)
    stale["id"] = f"{note_id}#updates/1670307613"
    stale["object"]["updated"] = stale["object"]["published"]
    stale["object"]["content"] = "<p>stale</p>"
    await deliver(web, ctx, amy, stale)
    page = await page_of(web, post)
    assert shown() == ("@1234 test public key 4", [])

    # The captured edit: newer, so applied and marked.
    assert (await deliver(web, ctx, amy, update)).status_code == 202
    page = await page_of(web, post)
    text, edited = shown()
    assert text == "@1234 test public key 5"
    assert [e.get_text() for e in edited] == ["edited"]
    assert edited[0]["title"] == "edited 6 December 2022 at 07:55 UTC"

    # An edit older than the one shown arrives late: ignored.
    late = copy.deepcopy(update)
    late["id"] = f"{note_id}#updates/1670310000"
    late["object"]["updated"] = "2022-12-06T07:00:00Z"
    late["object"]["content"] = "<p>older edit</p>"
    await deliver(web, ctx, amy, late)
    page = await page_of(web, post)
    assert shown()[0] == "@1234 test public key 5"

    # Someone else's Update of amy's Note (ATTACKS.md 11): refused.
    felix = account(fediverse, FELIX, "felix", 0)
    forged = copy.deepcopy(update)
    forged["id"] = f"{FELIX}#updates/1"
    forged["actor"] = FELIX
    forged["object"]["updated"] = "2022-12-07T00:00:00Z"
    forged["object"]["content"] = "<p>forged</p>"
    failures = await inbox_failures(ctx)
    await deliver(web, ctx, felix, forged)
    assert await inbox_failures(ctx) == failures + 1
    page = await page_of(web, post)
    assert shown()[0] == "@1234 test public key 5"
    assert await replies_of(web, post) == [note_id]


async def test_likes_boosts_and_their_undo(
    web: httpx.AsyncClient, ctx: Services, fediverse: Fediverse
) -> None:
    """like.json, misskey/like_with_reaction.json, announce.json and their Undo."""
    post = await publish(ctx, "Liked")
    object_id = ctx.blog.object_id(post.uid)
    felix = account(fediverse, FELIX, "felix", 0)
    admin = account(fediverse, ADMIN, "admin", 2)
    like = fixture("mastodon/like.json")
    like["object"] = object_id
    reaction = fixture("misskey/like_with_reaction.json")
    reaction["object"] = object_id
    boost = fixture("mastodon/announce.json")
    boost["object"] = object_id

    for actor, activity in ((felix, like), (admin, reaction), (admin, boost)):
        assert (await deliver(web, ctx, actor, activity)).status_code == 202

    page = await page_of(web, post)
    assert reactions(page) == {
        "like": ("2 likes", ["@felix@mastodon.madrid", "@admin@mastodon.example.org"]),
        "boost": ("1 boost", ["@admin@mastodon.example.org"]),
    }
    avatars = [str(img["src"]) for img in page.select(".reactions img")]
    assert avatars[0] == ctx.proxy.local_url("https://mastodon.madrid/avatars/felix.png")
    stored = await ctx.store.list_reactions(post.id)
    assert [(r.type, r.content) for r in stored] == [
        ("Like", None),
        ("Like", "pudding"),  # the Misskey emoji reaction, counted as a like
        ("Announce", None),
    ]
    assert title(page) == "0 Responses to “Liked”"  # reactions are not responses

    # The same Like again, and a second Like by the same account: still one each.
    again = dict(like, id=f"{FELIX}#likes/212399")
    await deliver(web, ctx, felix, like)
    await deliver(web, ctx, felix, again)
    # An Undo by admin of felix's Like (ATTACKS.md 12): ignored.
    foreign_undo = fixture("mastodon/undo_like.json")
    foreign_undo["actor"], foreign_undo["id"] = ADMIN, f"{ADMIN}#likes/1/undo"
    foreign_undo["object"]["object"] = object_id
    await deliver(web, ctx, admin, foreign_undo)
    page = await page_of(web, post)
    assert reactions(page)["like"][0] == "2 likes"

    # Undo{Like}: its embedded Like has another id than like.json (captured apart); it
    # names the same post, which is enough.
    undo_like = fixture("mastodon/undo_like.json")
    undo_like["object"]["object"] = object_id
    await deliver(web, ctx, felix, undo_like)
    # Undo{Announce} as captured: its embedded Announce has the boost's id.
    await deliver(web, ctx, admin, fixture("mastodon/undo_announce.json"))

    page = await page_of(web, post)
    assert reactions(page) == {"like": ("1 like", ["@admin@mastodon.example.org"])}


async def test_a_like_of_something_else_is_ignored(
    web: httpx.AsyncClient, ctx: Services, fediverse: Fediverse
) -> None:
    post = await publish(ctx, "Not liked")
    felix = account(fediverse, FELIX, "felix", 0)

    response = await deliver(web, ctx, felix, fixture("mastodon/like.json"))  # as captured

    assert response.status_code == 202
    assert await ctx.store.list_reactions(post.id) == []
    assert (await page_of(web, post)).select(".reactions") == []
    assert await inbox_failures(ctx) == 0


async def test_mastodon_delete_leaves_a_placeholder_and_refuses_a_late_create(
    web: httpx.AsyncClient, ctx: Services, fediverse: Fediverse
) -> None:
    """delete_note_tombstone.json removes felix's reply; the Misskey reply under it stays."""
    post = await publish(ctx, "Threads")
    felix = account(fediverse, FELIX, "felix", 0)
    misskey = account(fediverse, MISSKEY_USER, "97ws8y3rj6", 4)
    create = fixture("mastodon/create_note_reply_mention.json")
    create["object"]["inReplyTo"] = ctx.blog.object_id(post.uid)
    felix_note = create["object"]["id"]
    answer = fixture("misskey/create_note_reply.json")
    answer["object"]["inReplyTo"] = felix_note  # a reply to the reply
    await deliver(web, ctx, felix, create)
    await deliver(web, ctx, misskey, answer)
    assert title(await page_of(web, post)) == "2 Responses to “Threads”"

    delete = fixture("mastodon/delete_note_tombstone.json")
    delete["object"]["id"] = felix_note
    assert (await deliver(web, ctx, felix, delete)).status_code == 202

    page = await page_of(web, post)
    assert comment_tree(page) == [("This response was deleted.", [(MISSKEY_TEXT, [])])]
    assert "thinkpad" not in page.get_text()
    deleted = page.select_one("li.comment.deleted > .comment-body")
    assert deleted is not None
    assert deleted.select(".handle, .avatar, .e-content") == []
    assert title(page) == "1 Response to “Threads”"
    assert await replies_of(web, post) == [answer["object"]["id"]]

    # The same Note created again (ATTACKS.md 9): refused, the tombstone stays.
    failures = await inbox_failures(ctx)
    create["id"] += "#again"
    await deliver(web, ctx, felix, create)
    assert await inbox_failures(ctx) == failures + 1
    assert "thinkpad" not in (await page_of(web, post)).get_text()
    assert await ctx.store.is_tombstoned(felix_note)


async def test_delete_of_the_actor_removes_all_their_responses(
    web: httpx.AsyncClient, ctx: Services, fediverse: Fediverse
) -> None:
    """delete_actor.json: admin's reply, like and boost go; felix's reply under it stays."""
    post = await publish(ctx, "Accounts")
    object_id = ctx.blog.object_id(post.uid)
    admin = account(fediverse, ADMIN, "admin", 2)
    felix = account(fediverse, FELIX, "felix", 0)
    create = fixture("mastodon/create_note_hashtag_cw.json")
    create["object"]["inReplyTo"] = object_id
    answer = fixture("mastodon/create_note_reply_mention.json")
    answer["object"]["inReplyTo"] = create["object"]["id"]
    boost = fixture("mastodon/announce.json")
    boost["object"] = object_id
    reaction = fixture("misskey/like_with_reaction.json")
    reaction["object"] = object_id
    await deliver(web, ctx, admin, create)
    await deliver(web, ctx, felix, answer)
    await deliver(web, ctx, admin, boost)
    await deliver(web, ctx, admin, reaction)
    page = await page_of(web, post)
    assert title(page) == "2 Responses to “Accounts”"
    assert set(reactions(page)) == {"like", "boost"}
    fetches = len(fediverse.requests)

    # The account is gone (its URL would answer 410): the key we hold verifies it.
    assert (
        await deliver(web, ctx, admin, fixture("mastodon/delete_actor.json"))
    ).status_code == 202

    assert len(fediverse.requests) == fetches  # nothing fetched
    page = await page_of(web, post)
    assert comment_tree(page) == [("This response was deleted.", [(FELIX_TEXT, [])])]
    assert "#moo" not in page.get_text()
    assert reactions(page) == {}
    assert title(page) == "1 Response to “Accounts”"
    assert await replies_of(web, post) == [answer["object"]["id"]]


# ---- Misskey ---------------------------------------------------------------------------------


async def test_misskey_reply_and_a_delete_that_came_first(
    web: httpx.AsyncClient, ctx: Services, fediverse: Fediverse
) -> None:
    """create_note_reply.json shown (home visibility = unlisted); delete_note_tombstone.json
    for a Note never seen leaves a tombstone, so that Note's late Create is refused."""
    post = await publish(ctx, "Federation state")
    misskey = account(fediverse, MISSKEY_USER, "97ws8y3rj6", 4)
    create = fixture("misskey/create_note_reply.json")
    create["object"]["inReplyTo"] = ctx.blog.object_id(post.uid)

    await deliver(web, ctx, misskey, create)

    page = await page_of(web, post)
    content = content_of(comment_of(page, "@97ws8y3rj6@misskey.usbharu.dev"))
    # `content` is rendered (its mention is a link), not `_misskey_content` (MFM text).
    mention = content.select_one("a.mention")
    assert mention is not None
    assert mention.get_text() == "@trapezial@calckey.jp"
    assert mention["href"] == "https://calckey.jp/@trapezial"
    assert_safe_link(mention)
    assert "連合先と自インスタンスで状態が狂うことが多いので" in content.get_text()
    assert await replies_of(web, post) == [create["object"]["id"]]

    delete = fixture("misskey/delete_note_tombstone.json")  # as captured
    assert (await deliver(web, ctx, misskey, delete)).status_code == 202
    deleted_id = delete["object"]["id"]
    assert await ctx.store.is_tombstoned(deleted_id)

    late = fixture("misskey/create_note_reply.json")
    late["id"] = f"{deleted_id}/activity"
    late["object"]["id"] = deleted_id
    late["object"]["inReplyTo"] = ctx.blog.object_id(post.uid)
    late["object"]["content"] = "<p>back from the dead</p>"
    await deliver(web, ctx, misskey, late)
    assert await ctx.store.get_comment_by_ap_id(deleted_id) is None
    assert "back from the dead" not in (await page_of(web, post)).get_text()
    assert await replies_of(web, post) == [create["object"]["id"]]


# ---- Pleroma ---------------------------------------------------------------------------------


async def test_pleroma_reply_edit_and_bare_iri_delete(
    web: httpx.AsyncClient, ctx: Services, fediverse: Fediverse
) -> None:
    """create_note_reply.json, then delete_object_iri.json: by another account it is a
    no-op (ATTACKS.md 8); by the author it removes the reply."""
    post = await publish(ctx, "Pleroma")
    nutomic = account(fediverse, NUTOMIC, "nutomic", 5)
    vpzom = account(fediverse, VPZOM, "vpzom", 6)
    create = fixture("pleroma/create_note_reply.json")
    create["object"]["inReplyTo"] = ctx.blog.object_id(post.uid)
    note_id = create["object"]["id"]

    await deliver(web, ctx, nutomic, create)

    page = await page_of(web, post)
    comment = comment_of(page, "@nutomic@greenish.red")
    content = content_of(comment)
    assert content.get_text() == "@lanodan test"
    assert comment.select("details") == []  # `summary: ""` is no content warning
    mention = content.select_one("a.mention")
    assert mention is not None
    assert mention["href"] == "https://enterprise.lemmy.ml/u/picard"
    assert "data-user" not in mention.attrs
    assert_safe_link(mention)

    # Pleroma edits carry `published` with microseconds, as the Create did.
    edit = copy.deepcopy(create)
    edit["type"] = "Update"
    edit["id"] = "https://greenish.red/activities/0e3d2c6a-0c55-4f3c-9f5a-2f3a4b5c6d7e"
    edit["object"]["content"] = edit["object"]["content"].replace(" test", " test, edited")
    edit["object"]["updated"] = "2021-10-26T10:30:00.123456Z"
    await deliver(web, ctx, nutomic, edit)
    comment = comment_of(await page_of(web, post), "@nutomic@greenish.red")
    assert content_of(comment).get_text() == "@lanodan test, edited"
    assert [e.get_text() for e in comment.select(".edited")] == ["edited"]

    foreign = fixture("pleroma/delete_object_iri.json")
    foreign["object"] = note_id  # vpzom deletes nutomic's reply
    assert (await deliver(web, ctx, vpzom, foreign)).status_code == 202
    assert title(await page_of(web, post)) == "1 Response to “Pleroma”"
    assert not await ctx.store.is_tombstoned(note_id)

    own = fixture("pleroma/delete_object_iri.json")
    own["id"] = "https://greenish.red/activities/5e4a1f0b-7d1c-4f11-a1a4-3a1c2b9d8e7f"
    own["actor"] = own["attributedTo"] = NUTOMIC
    own["object"] = note_id
    assert (await deliver(web, ctx, nutomic, own)).status_code == 202

    page = await page_of(web, post)
    assert page.select("li.comment") == []  # deleted, with no replies to hold up
    assert title(page) == "0 Responses to “Pleroma”"
    assert await replies_of(web, post) == []
    assert await ctx.store.is_tombstoned(note_id)
    again = dict(create, id="https://greenish.red/activities/9a8b7c6d-again")
    failures = await inbox_failures(ctx)
    await deliver(web, ctx, nutomic, again)
    assert await inbox_failures(ctx) == failures + 1
    assert (await page_of(web, post)).select("li.comment") == []


async def test_pleroma_custom_emoji_in_content_and_summary(
    web: httpx.AsyncClient, ctx: Services, fediverse: Fediverse
) -> None:
    """note_emoji_in_summary.json: emoji become <img class="emoji"> in the text only."""
    post = await publish(ctx, "Jokers")
    rin = account(fediverse, RIN, "rin", 7)
    note = fixture("pleroma/note_emoji_in_summary.json")
    note["inReplyTo"] = ctx.blog.object_id(post.uid)

    await deliver(web, ctx, rin, create_of(note, "https://patch.cx/activities/4f0c1d8e-rin-create"))

    page = await page_of(web, post)
    comment = comment_of(page, "@rin@patch.cx")
    details = comment.select_one("details.content-warning")  # `sensitive: null`, a summary
    assert details is not None
    summary = details.find("summary")
    assert summary is not None
    assert summary.get_text() == ":joker_smile:"  # plain text: escaped, never markup
    content = details.select_one(".e-content")
    assert content is not None
    [emoji] = content.select("img.emoji")
    assert emoji["src"] == ctx.proxy.local_url("https://patch.cx/emoji/custom/joker_disapprove.png")
    assert emoji["alt"] == ":joker_disapprove:"
    assert "just grabbing a test fixture, nevermind me" in content.get_text()
    assert ":joker_disapprove:" not in content.get_text()
    assert await replies_of(web, post) == [note["id"]]


# ---- GoToSocial ------------------------------------------------------------------------------


async def test_gotosocial_thread_and_delete_without_id(
    web: httpx.AsyncClient, ctx: Services, fediverse: Fediverse
) -> None:
    """create_note_cw.json replies to our post; note_reply_with_mention.json answers it
    as captured (its inReplyTo is zork's Note); delete_note_no_id.json removes it."""
    post = await publish(ctx, "Welcome")
    zork = account(fediverse, ZORK, "the_mighty_zork", 8)
    admin = account(fediverse, GTS_ADMIN, "admin", 9)
    create = fixture("gotosocial/create_note_cw.json")
    create["object"]["inReplyTo"] = ctx.blog.object_id(post.uid)
    reply = fixture("gotosocial/note_reply_with_mention.json")  # `to` a string, `tag` an object

    await deliver(web, ctx, zork, create)
    await deliver(web, ctx, admin, create_of(reply, f"{reply['id']}/activity#Create"))

    page = await page_of(web, post)
    assert comment_tree(page) == [
        ("hello everyone!", [("hi @ the_mighty_zork welcome to the instance!", [])])
    ]
    first = comment_of(page, "@the_mighty_zork@localhost:8080")
    details = first.select_one("details.content-warning")
    assert details is not None
    summary = details.find("summary")
    assert summary is not None
    assert summary.get_text() == "introduction post"
    time = first.select_one("a.date time")
    assert time is not None
    assert time["datetime"] == "2021-10-20T10:40:37Z"  # published at +02:00
    mention = content_of(comment_of(page, "@admin@localhost:8080")).select_one("a.mention")
    assert mention is not None
    assert_safe_link(mention)
    assert await replies_of(web, post) == [create["object"]["id"], reply["id"]]

    delete = fixture("gotosocial/delete_note_no_id.json")  # as captured: no id, a bare IRI
    assert (await deliver(web, ctx, admin, delete)).status_code == 202

    page = await page_of(web, post)
    assert comment_tree(page) == [("hello everyone!", [])]
    assert title(page) == "1 Response to “Welcome”"
    assert await replies_of(web, post) == [create["object"]["id"]]

    failures = await inbox_failures(ctx)
    await deliver(web, ctx, admin, create_of(reply, f"{reply['id']}/activity#Create-again"))
    assert await inbox_failures(ctx) == failures + 1
    assert comment_tree(await page_of(web, post)) == [("hello everyone!", [])]


# ---- Lemmy -----------------------------------------------------------------------------------


def lemmy_announce(number: int, inner: dict[str, Any]) -> dict[str, Any]:
    """What the community sends: Announce{Create{…}}, signed by the Group."""
    create = {
        "id": f"https://enterprise.lemmy.ml/activities/create/{number}",
        "type": "Create",
        "actor": inner["attributedTo"],
        "to": inner["to"],
        "cc": inner.get("cc", []),
        "audience": TENFORWARD,
        "object": inner,
    }
    return {
        "@context": "https://www.w3.org/ns/activitystreams",
        "id": f"https://enterprise.lemmy.ml/activities/announce/{number}",
        "type": "Announce",
        "actor": TENFORWARD,
        "to": [AS_PUBLIC],
        "cc": [f"{TENFORWARD}/followers"],
        "object": create,
    }


async def test_lemmy_comment_relayed_by_its_community_is_refetched_from_its_origin(
    web: httpx.AsyncClient, ctx: Services, fediverse: Fediverse
) -> None:
    """comment_note.json relayed by the Group (ATTACKS.md 7, INTEROP.md 24)."""
    post = await publish(ctx, "Ten Forward")
    community = account(fediverse, TENFORWARD, "tenforward", 10, type="Group")
    account(fediverse, PICARD, "picard", 11, name="Jean-Luc")
    page_doc = fixture("lemmy/post_page.json")
    comment = fixture("lemmy/comment_note.json")
    comment_id = comment["id"]

    # A community post, and a comment under it, as captured: not replies to us.
    fediverse.documents[page_doc["id"]] = page_doc
    fediverse.documents[comment_id] = comment
    assert (await deliver(web, ctx, community, lemmy_announce(1, page_doc))).status_code == 202
    assert (await deliver(web, ctx, community, lemmy_announce(2, comment))).status_code == 202
    assert await ctx.store.get_comment_by_ap_id(page_doc["id"]) is None
    assert await ctx.store.get_comment_by_ap_id(comment_id) is None
    assert await inbox_failures(ctx) == 0

    # The comment as a reply to our post. The relayed copy says one thing, the origin
    # another: only the origin is believed.
    embedded = fixture("lemmy/comment_note.json")
    embedded["inReplyTo"] = ctx.blog.object_id(post.uid)
    origin = copy.deepcopy(embedded)
    origin["content"] = "<p>the copy enterprise.lemmy.ml serves</p>\n"
    fediverse.documents[comment_id] = origin
    asked = fediverse.asked(comment_id)

    assert (await deliver(web, ctx, community, lemmy_announce(3, embedded))).status_code == 202

    assert fediverse.asked(comment_id) == asked + 1
    page = await page_of(web, post)
    content = content_of(comment_of(page, "@picard@enterprise.lemmy.ml"))
    assert content.get_text().strip() == "the copy enterprise.lemmy.ml serves"
    assert "first comment!" not in page.get_text()
    assert page.select("li.comment .handle")[0].get_text() == "@picard@enterprise.lemmy.ml"
    assert await replies_of(web, post) == [comment_id]
    assert title(page) == "1 Response to “Ten Forward”"


# ---- WordPress -------------------------------------------------------------------------------


async def test_wordpress_comment(
    web: httpx.AsyncClient, ctx: Services, fediverse: Fediverse
) -> None:
    """wordpress/comment_note.json: a `?c=148` id, an author at `/author/pfefferle/`."""
    post = await publish(ctx, "Hello WordPress")
    # FEP-2c59: the actor names its own WebFinger address; the handle still takes the
    # host of the actor id, never a claimed one (ATTACKS.md 34).
    author = account(
        fediverse,
        PFEFFERLE,
        "pfefferle",
        12,
        name="Matthias Pfefferle",
        webfinger="pfefferle@mastodon.social",
    )
    note = fixture("wordpress/comment_note.json")
    note["inReplyTo"] = ctx.blog.object_id(post.uid)

    await deliver(web, ctx, author, create_of(note, "https://pfefferle.org?c=148-create"))

    page = await page_of(web, post)
    comment = comment_of(page, "@pfefferle@pfefferle.org")
    assert content_of(comment).get_text() == "Nice! Hello from WordPress!"
    date = comment.select_one("a.date")
    assert date is not None
    assert date["href"] == "https://pfefferle.org?c=148"
    assert await replies_of(web, post) == ["https://pfefferle.org?c=148"]


# ---- without allow_http -------------------------------------------------------------------


@pytest.mark.parametrize("settings", [{"allow_http": False}], indirect=True)
async def test_http_ids_are_refused_by_default(
    web: httpx.AsyncClient, ctx: Services, fediverse: Fediverse
) -> None:
    """The http-scheme payloads only pass in this file because it sets allow_http."""
    post = await publish(ctx, "Https only")
    admin = account(fediverse, ADMIN, "admin", 2)
    activity = fixture("mastodon/create_note_hashtag_cw.json")
    activity["object"]["inReplyTo"] = ctx.blog.object_id(post.uid)

    response = await deliver(web, ctx, admin, activity)

    assert response.status_code == 401
    assert fediverse.requests == []
    assert await ctx.store.count_inbox() == {}
    assert (await page_of(web, post)).select("li.comment") == []
