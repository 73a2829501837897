"""The desk's Write section (/admin/write): the list of posts, the editor with its
preview and image upload, drafts, schedules, publishing, pinning and deleting, all
through the same services as `fediblog post …`."""

from __future__ import annotations

import io
import json
import re
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image
from starlette.applications import Starlette

from fediblog import media
from fediblog.blog import MAX_FILE_BYTES, parse_post
from fediblog.media import prepare_image, prepare_image_bytes
from fediblog.models import utcnow
from fediblog.render import markdown_to_html
from fediblog.server import BodyDeadline
from fediblog.web.deps import Services
from tests.admin_kit import cookie, new_session, sign_in
from tests.helpers import publish, remote_actor, remote_comment, soup

pytestmark = pytest.mark.anyio

AP = {"Accept": "application/activity+json"}
FOLLOWERS = (("ann", "social.example"), ("bob", "social.example"), ("cy", "other.example"))


def png_bytes(size: tuple[int, int] = (640, 480), colour: str = "teal") -> bytes:
    out = io.BytesIO()
    Image.new("RGB", size, colour).save(out, "PNG")
    return out.getvalue()


async def followers(services: Services) -> None:
    """Three accepted followers on two servers (each server's shared inbox)."""
    for number, (name, domain) in enumerate(FOLLOWERS):
        actor_id = await remote_actor(services, name, domain)
        await services.store.save_follower(
            actor_id=actor_id,
            follow_id=f"https://{domain}/follows/{number}",
            inbox=f"https://{domain}/users/{name}/inbox",
            shared_inbox=f"https://{domain}/inbox",
            status="accepted",
        )


async def queued(services: Services) -> list[tuple[str, dict[str, Any]]]:
    """(inbox, activity) of every delivery queued now."""
    jobs = await services.store.list_due_deliveries(utcnow() + timedelta(days=1), 100)
    return [(job.inbox, json.loads(job.payload)) for job in jobs]


def fields(**given: str) -> dict[str, str]:
    base = dict.fromkeys(
        ("title", "slug", "summary", "tags", "body", "image", "image_alt", "published"), ""
    )
    return base | given


async def submit(
    client: httpx.AsyncClient,
    csrf: str,
    action: str,
    path: str = "/admin/write/new",
    files: dict[str, tuple[str, bytes, str]] | None = None,
    **given: str,
) -> httpx.Response:
    """Press an editor button, as a browser sends the multipart form."""
    data = fields(**given) | {"csrf": csrf, "action": action}
    upload = files or {"upload": ("", b"", "application/octet-stream")}  # no file chosen
    return await client.post(path, data=data, files=upload)


def typed(page: str, name: str) -> str:
    """A field's value as the editor shows it."""
    found = soup(page).find(attrs={"name": name})
    assert found is not None, name
    return str(found.get_text() if found.name == "textarea" else found.get("value", ""))


def form_fields(page: str, action: str) -> dict[str, str]:
    """What a browser sends when the form posting to ``action`` is submitted."""
    form = soup(page).find("form", action=action)
    assert form is not None, action
    return {str(i["name"]): str(i.get("value", "")) for i in form.find_all("input")}


async def confirm_delete(client: httpx.AsyncClient, slug: str) -> httpx.Response:
    """Open a post's delete confirmation and press its button."""
    path = f"/admin/write/delete/{slug}"
    return await client.post(path, data=form_fields((await client.get(path)).text, path))


def error_of(page: str) -> str:
    found = soup(page).find(attrs={"role": "alert"})
    assert found is not None, "no error on the page"
    return found.get_text(" ", strip=True)


# ---- the list ----------------------------------------------------------------------------


async def test_the_list_shows_drafts_scheduled_and_published_posts_with_their_links(
    client: httpx.AsyncClient, services: Services
) -> None:
    csrf = await sign_in(client, services)
    live = await publish(services, "Out there", tags="cats")
    await services.blog.pin(live.slug)
    actor = await remote_actor(services, "ann", "social.example")
    await remote_comment(services, live, actor, "Nice one")
    await publish(services, "Half done", draft="true")
    later = (utcnow() + timedelta(days=3)).strftime("%Y-%m-%d %H:%M")
    await publish(services, "Coming soon", published=later)

    page = soup((await client.get("/admin/write")).text)
    groups = {section.h2.get_text(" ", strip=True): section for section in page.select("section")}
    assert list(groups) == ["Drafts (1)", "Scheduled (1)", "Published (1)"]
    published = groups["Published (1)"]
    assert "Pinned" in published.get_text()
    assert published.find("a", string="1 response")["href"] == (
        services.blog.post_url(live) + "#responses"
    )
    assert published.find("form", action="/admin/write/unpin/out-there") is not None
    draft_preview = await services.blog.preview_url("half-done")
    assert groups["Drafts (1)"].find(
        "a", href=draft_preview.removeprefix(services.settings.base_url)
    )
    assert groups["Scheduled (1)"].find("form", action="/admin/write/publish/coming-soon")
    for form in page.select("form[method=post]"):
        assert form.find("input", attrs={"name": "csrf"})["value"] == csrf


# ---- the editor: publish, draft, schedule ---------------------------------------------------


async def test_publishing_from_the_editor_puts_the_post_on_the_blog_and_sends_its_create(
    client: httpx.AsyncClient, services: Services
) -> None:
    await followers(services)
    csrf = await sign_in(client, services)
    response = await submit(
        client, csrf, "publish", title="From the desk", tags="desk, web", body="Hello *there*."
    )
    assert response.status_code == 303
    assert response.headers["location"] == "/admin/write/edit/from-the-desk?saved=published"
    shown = await client.get(response.headers["location"])
    assert "Published: it is on the blog" in shown.text

    public = await client.get("/posts/from-the-desk")
    assert public.status_code == 200
    assert "<em>there</em>" in public.text
    post = await services.blog.get("from-the-desk")
    assert post.tags == ("desk", "web")
    sent = await queued(services)
    assert sorted(inbox for inbox, _ in sent) == [
        "https://other.example/inbox",
        "https://social.example/inbox",
    ]
    assert {activity["type"] for _, activity in sent} == {"Create"}


async def test_a_draft_saved_in_the_editor_is_not_public_and_sends_nothing(
    client: httpx.AsyncClient, services: Services
) -> None:
    await followers(services)
    csrf = await sign_in(client, services)
    response = await submit(client, csrf, "draft", title="Not yet", body="Thinking.")
    assert response.headers["location"] == "/admin/write/edit/not-yet?saved=draft"
    assert (await client.get("/posts/not-yet")).status_code == 404
    assert "Not yet" not in (await client.get("/")).text
    assert await queued(services) == []
    editor = (await client.get("/admin/write/edit/not-yet?saved=draft")).text
    preview = soup(editor).find("a", string="Private preview link")["href"]
    assert (await client.get(preview)).status_code == 200


async def test_schedule_needs_a_future_date_and_keeps_the_post_unseen_until_then(
    client: httpx.AsyncClient, services: Services
) -> None:
    csrf = await sign_in(client, services)
    refused = await submit(client, csrf, "schedule", title="Later", body="Soon.")
    assert refused.status_code == 400
    assert error_of(refused.text) == (
        "To schedule the post, give it a date and time in the future (UTC)."
    )
    assert typed(refused.text, "title") == "Later"

    when = (utcnow() + timedelta(days=2)).strftime("%Y-%m-%dT%H:%M")
    response = await submit(client, csrf, "schedule", title="Later", body="Soon.", published=when)
    assert response.headers["location"] == "/admin/write/edit/later?saved=scheduled"
    post = await services.blog.get("later")
    assert post.state == "scheduled"
    assert post.published.strftime("%Y-%m-%dT%H:%M") == when
    assert (await client.get("/posts/later")).status_code == 404


async def test_publish_with_a_future_date_is_refused_with_the_way_out(
    client: httpx.AsyncClient, services: Services
) -> None:
    csrf = await sign_in(client, services)
    when = (utcnow() + timedelta(days=2)).strftime("%Y-%m-%dT%H:%M")
    refused = await submit(client, csrf, "publish", title="Hasty", body="x", published=when)
    assert refused.status_code == 400
    assert "press Schedule" in error_of(refused.text)
    assert await services.store.list_authored_posts() == []


async def test_a_form_error_keeps_what_was_typed_and_says_what_is_wrong(
    client: httpx.AsyncClient, services: Services
) -> None:
    csrf = await sign_in(client, services)
    body = "A long text\n\nwith *paragraphs* and </textarea><b>markup</b>.\n"
    refused = await submit(
        client, csrf, "publish", title="Kept", slug="Not A Slug!", body=body, tags="a, b"
    )
    assert refused.status_code == 400
    assert error_of(refused.text) == (
        "The slug must be lower-case letters, digits and '-', not 'Not A Slug!'."
    )
    assert typed(refused.text, "title") == "Kept"
    assert typed(refused.text, "slug") == "Not A Slug!"
    assert typed(refused.text, "tags") == "a, b"
    assert typed(refused.text, "body").strip() == body.strip()
    assert "<b>markup</b>" not in refused.text  # shown as typed, never as markup
    untitled = await submit(client, csrf, "draft", body=body)
    assert error_of(untitled.text) == "Give the post a title."
    assert await services.store.list_authored_posts() == []


async def test_a_slug_taken_by_another_post_is_a_sentence_not_an_error_page(
    client: httpx.AsyncClient, services: Services
) -> None:
    await publish(services, "Taken")
    csrf = await sign_in(client, services)
    refused = await submit(client, csrf, "publish", title="Other", slug="taken", body="x")
    assert refused.status_code == 400
    assert error_of(refused.text) == "The slug 'taken' is already used by another post."


async def test_the_preview_is_rendered_by_the_posts_pipeline_and_stores_nothing(
    client: httpx.AsyncClient, services: Services
) -> None:
    csrf = await sign_in(client, services)
    body = "# Heading\n\nSome `code`, a [link](https://example.org) and <script>x()</script>.\n"
    shown = await submit(client, csrf, "preview", title="Try", body=body, tags="one")
    assert shown.status_code == 200
    preview = soup(shown.text).find("section", class_="write-preview")
    assert preview is not None
    content = preview.find("div", class_="e-content")
    assert content.decode_contents().strip() == markdown_to_html(body).strip()
    assert "<script>" not in shown.text
    assert preview.find("a", rel="tag").get_text() == "#one"
    assert typed(shown.text, "body").strip() == body.strip()
    assert await services.store.list_authored_posts() == []


async def test_the_preview_names_each_image_without_alt_text(
    client: httpx.AsyncClient, services: Services
) -> None:
    csrf = await sign_in(client, services)
    shown = await submit(
        client, csrf, "preview", title="Bare", body="![](https://example.org/a.png)",
        image="https://example.org/cover.png",
    )  # fmt: skip
    warnings = [p.get_text() for p in soup(shown.text).select(".write-preview .notice")]
    assert warnings == [
        "The image https://example.org/a.png has no alt text.",
        "The cover image has no alt text (image_alt).",
    ]


# ---- images ------------------------------------------------------------------------------


async def test_an_uploaded_image_goes_into_the_text_and_shows_on_the_published_page(
    client: httpx.AsyncClient, services: Services
) -> None:
    csrf = await sign_in(client, services)
    uploaded = await client.post(
        "/admin/write/new",
        data=fields(title="Pictured", body="Look:")
        | {"csrf": csrf, "action": "upload"}
        | {"upload_alt": "A teal square"},
        files={"upload": ("square.png", png_bytes(), "image/png")},
    )
    assert uploaded.status_code == 200
    body = typed(uploaded.text, "body")
    found = re.fullmatch(r"Look:\n\n!\[A teal square\]\((/media/[0-9a-f]{64}-640\.png)\)", body)
    assert found, body
    assert (await client.get(found.group(1))).headers["content-type"] == "image/png"
    assert typed(uploaded.text, "title") == "Pictured"

    response = await submit(client, csrf, "publish", title="Pictured", body=body)
    assert response.status_code == 303
    image = soup((await client.get("/posts/pictured")).text).select_one(".e-content img")
    assert image["alt"] == "A teal square"
    assert image["srcset"]  # through the media store: every size, with dimensions
    assert (image["width"], image["height"]) == ("640", "480")
    article = (await client.get("/posts/pictured", headers=AP)).json()
    assert [a["name"] for a in article["attachment"]] == ["A teal square"]


async def test_an_image_chosen_with_publish_is_uploaded_first(
    client: httpx.AsyncClient, services: Services
) -> None:
    csrf = await sign_in(client, services)
    response = await client.post(
        "/admin/write/new",
        data=fields(title="In one go", body="Here.")
        | {"csrf": csrf, "action": "publish", "upload_alt": "A red square"},
        files={"upload": ("red.png", png_bytes(colour="red"), "image/png")},
    )
    assert response.status_code == 303
    post = await services.blog.get("in-one-go")
    assert "![A red square](/media/" in post.body_md
    assert 'alt="A red square"' in post.body_html


async def test_an_uploaded_image_can_be_the_cover_with_its_alt_text(
    client: httpx.AsyncClient, services: Services
) -> None:
    csrf = await sign_in(client, services)
    uploaded = await client.post(
        "/admin/write/new",
        data=fields(title="Covered")
        | {"csrf": csrf, "action": "upload", "upload_alt": "A wide field", "upload_cover": "1"},
        files={"upload": ("field.png", png_bytes((1200, 400)), "image/png")},
    )
    cover = typed(uploaded.text, "image")
    assert re.fullmatch(r"/media/[0-9a-f]{64}-1200\.png", cover)
    assert typed(uploaded.text, "image_alt") == "A wide field"
    assert typed(uploaded.text, "body") == ""


@pytest.mark.parametrize(
    ("name", "content", "alt", "said"),
    [
        (
            "notes.txt",
            b"just text",
            "Alt",
            "Image notes.txt: not an image (JPEG, PNG, WebP or GIF).",
        ),
        (
            "logo.svg",
            b"<svg xmlns='http://www.w3.org/2000/svg'/>",
            "Alt",
            "Image logo.svg: SVG is not accepted (it can carry scripts); export it as PNG.",
        ),
        (
            "a.png",
            png_bytes(),
            "",
            "Describe the image in its alt text: readers who cannot see it hear that instead.",
        ),
    ],
)
async def test_an_upload_that_is_no_image_or_has_no_alt_text_is_refused_with_a_sentence(
    client: httpx.AsyncClient, services: Services, name: str, content: bytes, alt: str, said: str
) -> None:
    csrf = await sign_in(client, services)
    refused = await client.post(
        "/admin/write/new",
        data=fields(title="Kept", body="Text kept.")
        | {"csrf": csrf, "action": "upload", "upload_alt": alt},
        files={"upload": (name, content, "application/octet-stream")},
    )
    assert refused.status_code == 400
    assert error_of(refused.text) == said
    assert typed(refused.text, "body").strip() == "Text kept."
    assert await services.store.list_media() == []


async def test_upload_without_a_file_says_so(client: httpx.AsyncClient, services: Services) -> None:
    csrf = await sign_in(client, services)
    refused = await submit(client, csrf, "upload", title="Kept")
    assert refused.status_code == 400
    assert error_of(refused.text) == "Choose an image file to upload first."


async def test_an_oversize_upload_is_refused_with_a_sentence(
    client: httpx.AsyncClient, services: Services, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(media, "MAX_FILE_BYTES", 1_000_000)
    csrf = await sign_in(client, services)
    big = png_bytes((2000, 2000)) + b"\0" * 1_000_000
    refused = await client.post(
        "/admin/write/new",
        data=fields(title="Big") | {"csrf": csrf, "action": "upload", "upload_alt": "Big"},
        files={"upload": ("big.png", big, "image/png")},
    )
    assert refused.status_code == 400
    assert re.fullmatch(r"Image big\.png: \d\.\d MB is more than 1 MB\.", error_of(refused.text))
    assert await services.store.list_media() == []


def test_an_image_in_memory_is_prepared_as_the_same_file_would_be(tmp_path: Path) -> None:
    path = tmp_path / "a.png"
    path.write_bytes(png_bytes())
    assert prepare_image_bytes(path.read_bytes(), path) == prepare_image(path)


async def test_editing_a_post_published_from_a_file_keeps_its_imported_images(
    client: httpx.AsyncClient, services: Services, tmp_path: Path
) -> None:
    """The post file named cat.png beside it; the desk has no folder, but the image is
    in the media store, and the edit shows it from there."""
    (tmp_path / "cat.png").write_bytes(png_bytes((800, 600)))
    post_file = tmp_path / "post.md"
    post_file.write_text("---\ntitle: Cat\n---\n![A cat](cat.png)\n")
    draft = await services.blog.import_images(parse_post(post_file.read_text()), post_file)
    await services.blog.publish(draft)
    csrf = await sign_in(client, services)
    editor = (await client.get("/admin/write/edit/cat")).text
    body = typed(editor, "body")
    assert "![A cat](cat.png)" in body
    response = await submit(
        client, csrf, "update", "/admin/write/edit/cat", title="Cat", slug="cat",
        body=body + "\nAnd more.\n",
    )  # fmt: skip
    assert response.status_code == 303
    image = soup((await client.get("/posts/cat")).text).select_one(".e-content img")
    assert image["src"].startswith("/media/")
    assert image["alt"] == "A cat"


async def test_an_image_path_the_desk_cannot_import_is_named_before_saving(
    client: httpx.AsyncClient, services: Services
) -> None:
    csrf = await sign_in(client, services)
    refused = await submit(client, csrf, "publish", title="Dog", body="![A dog](dog.jpg)")
    assert refused.status_code == 400
    assert error_of(refused.text) == (
        "The image dog.jpg is not on the blog yet: upload it with the form below and use"
        " the Markdown it gives."
    )


# ---- editing ----------------------------------------------------------------------------


async def test_updating_a_published_post_sends_an_update_and_shows_the_new_text(
    client: httpx.AsyncClient, services: Services
) -> None:
    # A date with seconds: the editor's date field must not drop them.
    post = await publish(services, "Versioned", "First text.", published="2024-05-06T07:08:09Z")
    await followers(services)
    csrf = await sign_in(client, services)
    editor = (await client.get("/admin/write/edit/versioned")).text
    assert typed(editor, "body").strip() == "First text."
    assert typed(editor, "published") == "2024-05-06T07:08:09"
    assert soup(editor).find("button", attrs={"value": "draft"}) is None  # published stays so
    response = await submit(
        client, csrf, "update", "/admin/write/edit/versioned",
        title="Versioned", slug="versioned", body="Second text.",
        published=typed(editor, "published"),
    )  # fmt: skip
    assert response.headers["location"] == "/admin/write/edit/versioned?saved=updated"
    assert "Second text." in (await client.get("/posts/versioned")).text
    sent = await queued(services)
    assert {a["type"] for _, a in sent} == {"Update"}
    updated = await services.blog.get("versioned")
    assert updated.uid == post.uid
    assert updated.published == post.published  # editing the text leaves the date alone
    assert {a["object"]["published"] for _, a in sent} == {"2024-05-06T07:08:09Z"}


async def test_a_draft_published_from_the_editor_goes_out_now(
    client: httpx.AsyncClient, services: Services
) -> None:
    await publish(services, "Waiting", draft="true")
    csrf = await sign_in(client, services)
    response = await submit(
        client, csrf, "publish", "/admin/write/edit/waiting", title="Waiting", body="Now."
    )
    assert response.headers["location"] == "/admin/write/edit/waiting?saved=published"
    assert (await client.get("/posts/waiting")).status_code == 200


async def test_an_unknown_post_is_a_404(client: httpx.AsyncClient, services: Services) -> None:
    csrf = await sign_in(client, services)
    assert (await client.get("/admin/write/edit/nothing")).status_code == 404
    assert (await client.get("/admin/write/delete/nothing")).status_code == 404
    gone = await submit(client, csrf, "preview", "/admin/write/edit/nothing", title="x")
    assert gone.status_code == 404


# ---- pin, publish now, delete -------------------------------------------------------------


async def test_pin_and_unpin_from_the_list_send_add_and_remove(
    client: httpx.AsyncClient, services: Services
) -> None:
    await publish(services, "Favourite")
    await followers(services)
    csrf = await sign_in(client, services)
    pinned = await client.post("/admin/write/pin/favourite", data={"csrf": csrf})
    assert pinned.headers["location"] == "/admin/write?done=pinned&slug=favourite"
    assert (await services.blog.get("favourite")).pinned
    listed = (await client.get(pinned.headers["location"])).text
    assert "Pinned “favourite”" in listed
    await client.post("/admin/write/unpin/favourite", data={"csrf": csrf})
    assert not (await services.blog.get("favourite")).pinned
    assert sorted({a["type"] for _, a in await queued(services)}) == ["Add", "Remove"]


async def test_pinning_a_draft_is_refused_with_a_sentence(
    client: httpx.AsyncClient, services: Services
) -> None:
    await publish(services, "Draft one", draft="true")
    csrf = await sign_in(client, services)
    refused = await client.post("/admin/write/pin/draft-one", data={"csrf": csrf})
    assert refused.status_code == 400
    assert error_of(refused.text) == "'draft-one' is not published (draft): publish it first."


async def test_publish_now_from_the_list(client: httpx.AsyncClient, services: Services) -> None:
    await publish(services, "Ready", draft="true")
    csrf = await sign_in(client, services)
    response = await client.post("/admin/write/publish/ready", data={"csrf": csrf})
    assert response.headers["location"] == "/admin/write/edit/ready?saved=published"
    assert (await client.get("/posts/ready")).status_code == 200


async def test_the_delete_page_spells_out_what_deleting_does_on_the_fediverse(
    client: httpx.AsyncClient, services: Services
) -> None:
    post = await publish(services, "Regret")
    await services.blog.pin("regret")
    actor = await remote_actor(services, "ann", "social.example")
    await remote_comment(services, post, actor, "Hmm")
    await followers(services)
    await sign_in(client, services)
    page = soup((await client.get("/admin/write/delete/regret")).text)
    text = " ".join(page.main.get_text().split())
    assert "A Delete goes to 2 servers, where your 3 followers are." in text
    assert f"{services.blog.post_url(post)}, then answers 404 Not Found" in text
    assert f"{services.blog.object_id(post.uid)}, answers 410 Gone" in text
    assert "Its 1 response disappears from this blog" in text
    assert "It leaves the featured posts of your fediverse profile." in text
    assert page.find("form", action="/admin/write/delete/regret") is not None


async def test_deleting_from_the_desk_sends_the_delete_and_the_urls_answer_404_and_410(
    client: httpx.AsyncClient, services: Services
) -> None:
    """What the confirmation page says is what happens."""
    post = await publish(services, "Gone soon")
    await followers(services)
    await sign_in(client, services)
    response = await confirm_delete(client, "gone-soon")
    assert response.headers["location"] == "/admin/write?done=deleted&slug=gone-soon"
    assert (await client.get("/posts/gone-soon")).status_code == 404
    assert (await client.get(f"/p/{post.uid}", headers=AP)).status_code == 410
    sent = await queued(services)
    assert [a["type"] for _, a in sent] == ["Delete", "Delete"]
    assert await services.store.list_authored_posts() == []


async def test_deleting_a_draft_says_nothing_is_sent_and_sends_nothing(
    client: httpx.AsyncClient, services: Services
) -> None:
    await publish(services, "Scrap", draft="true")
    await followers(services)
    await sign_in(client, services)
    page = (await client.get("/admin/write/delete/scrap")).text
    assert "nobody has seen it, so nothing is sent anywhere" in page
    await confirm_delete(client, "scrap")
    assert await queued(services) == []
    assert await services.store.list_authored_posts() == []


async def test_a_stale_delete_confirmation_is_shown_again_with_what_deleting_does_now(
    client: httpx.AsyncClient, services: Services
) -> None:
    """Opened on a draft ("nothing is sent"), then the draft was published: the same
    button must not send a Delete to every follower without saying so first."""
    await publish(services, "Second thoughts", draft="true")
    await followers(services)
    csrf = await sign_in(client, services)
    path = "/admin/write/delete/second-thoughts"
    page = (await client.get(path)).text
    assert "nothing is sent anywhere" in page
    sent_back = form_fields(page, path)
    assert sent_back["csrf"] == csrf
    await services.blog.publish_now("second-thoughts")  # meanwhile, elsewhere
    created = await queued(services)
    again = await client.post(path, data=sent_back)
    assert again.status_code == 409
    text = " ".join(soup(again.text).main.get_text().split())
    assert "changed since" in text
    assert "A Delete goes to 2 servers, where your 3 followers are." in text
    assert (await services.blog.get("second-thoughts")).state == "published"
    assert await queued(services) == created  # nothing sent, nothing deleted
    # The page shown again carries the post as it is now: confirming it deletes.
    done = await client.post(path, data=form_fields(again.text, path))
    assert done.headers["location"] == "/admin/write?done=deleted&slug=second-thoughts"
    assert [a["type"] for _, a in await queued(services)][-2:] == ["Delete", "Delete"]


async def test_a_delete_without_the_posts_state_asks_again(
    client: httpx.AsyncClient, services: Services
) -> None:
    await publish(services, "Kept")
    csrf = await sign_in(client, services)
    asked = await client.post("/admin/write/delete/kept", data={"csrf": csrf})
    assert asked.status_code == 409
    assert (await services.blog.get("kept")).state == "published"


# ---- long texts ----------------------------------------------------------------------------


async def test_a_text_over_a_megabyte_is_taken_as_the_cli_takes_it(
    client: httpx.AsyncClient, services: Services
) -> None:
    csrf = await sign_in(client, services)
    body = "A paragraph of a long post, written at length.\n\n" * 30_000  # 1.5 MB
    assert 1_048_576 < len(body.encode()) < MAX_FILE_BYTES
    response = await submit(client, csrf, "draft", title="Long", slug="long", body=body)
    assert response.status_code == 303, response.text[:300]
    assert len((await services.blog.get("long")).body_md) > 1_048_576


async def test_a_text_over_the_largest_post_is_a_sentence_on_the_editor(
    client: httpx.AsyncClient, services: Services
) -> None:
    csrf = await sign_in(client, services)
    body = "x" * (MAX_FILE_BYTES + 1)
    response = await submit(client, csrf, "draft", title="Too long", body=body)
    assert response.status_code == 413
    assert error_of(response.text) == (
        "The text is larger than 2 MB, the most a post may have: shorten it,"
        " or split it into several posts."
    )
    assert soup(response.text).find("form", action="/admin/write/new") is not None
    assert await services.store.list_authored_posts() == []


async def test_the_authors_upload_gets_the_longer_body_deadline_and_nobody_else(
    app: Starlette, services: Services
) -> None:
    """`fediblog serve` cuts a body that is not in within FEDIBLOG_BODY_TIMEOUT; an image
    upload from a phone may take longer, so a signed-in author's request under /admin/
    gets the server's longer upload deadline. Here the body deadline is 0 s: every body
    is late, but for one the guard let through."""
    served = BodyDeadline(app, 0, upload=3600)
    token = await new_session(services)
    csrf = services.desk.csrf_token(token)
    transport = httpx.ASGITransport(app=served)
    async with httpx.AsyncClient(transport=transport, base_url="https://blog.example") as http:
        preview = await http.post(
            "/admin/write/new",
            headers=cookie(services, token),
            data=fields(title="Slow") | {"csrf": csrf, "action": "preview"},
            files={"upload": ("", b"", "application/octet-stream")},
        )
        assert preview.status_code == 200, preview.text
        signing_in = await http.post("/admin/login", data={"username": "blog", "password": "x"})
        assert signing_in.status_code == 408
        stranger = await http.post("/admin/write/new", data={"csrf": csrf, "action": "preview"})
        assert stranger.status_code == 403  # refused before its body is read
        inbox = await http.post(
            "/inbox", content=b"{}", headers={"content-type": "application/activity+json"}
        )
        assert inbox.status_code == 408
