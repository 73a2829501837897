"""The desk's Write section in a real chromium, against a real ``fediblog serve``.

The blog is made with ``fediblog init``, the author's password set with ``fediblog
admin password --stdin``. The author signs in through the form, writes a post, uploads
an image with its alt text (the Markdown lands in the text), previews it (the image
shows in the preview), publishes it and finds it on the public page, the image loaded
and its alt text right; saves a second post as a draft, which the blog does not show;
opens the delete confirmation of the draft and deletes it. axe-core checks the list,
the editor with its preview and the delete confirmation at phone and desktop widths,
light and dark, and the admin CSP refuses nothing on any of them.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from PIL import Image
from playwright.sync_api import Page, expect

from tests.admin_kit import PASSWORD
from tests.browser.kit import (
    DESKTOP,
    VARIANTS,
    LiveServer,
    NewContext,
    check_accessibility,
    clean_env,
    csp_violations,
    free_port,
    run_fediblog,
)

ALT = "A teal square on a white page"




@pytest.fixture(scope="module")
def blog(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    """A new blog served on 127.0.0.1, its desk's password set; no post yet."""
    workdir = tmp_path_factory.mktemp("write-server")
    port = free_port()
    env = clean_env(
        FEDIBLOG_CONFIG=str(workdir / "absent.toml"),
        FEDIBLOG_BASE_URL=f"http://127.0.0.1:{port}",
        FEDIBLOG_ALLOW_HTTP="1",
        FEDIBLOG_DATABASE=str(workdir / "data" / "blog.db"),
        FEDIBLOG_KEYS_DIR=str(workdir / "keys"),
        FEDIBLOG_MEDIA_DIR=str(workdir / "media"),
    )
    run_fediblog(workdir, env, "init")
    run_fediblog(workdir, env, "admin", "password", "--stdin", stdin=PASSWORD + "\n")
    server = LiveServer.start(workdir, ["serve", "--port", str(port)], port, env)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def picture(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("pictures") / "square.png"
    Image.new("RGB", (800, 600), "teal").save(path, "PNG")
    return path


def sign_in(page: Page, server: LiveServer) -> None:
    page.goto(server.url + "/admin/write")  # the guard sends it to sign in, then back
    page.get_by_label("Name").fill("blog")
    page.get_by_label("Password").fill(PASSWORD)
    page.get_by_role("button", name="Sign in").click()
    page.wait_for_url("**/admin/write")


def loaded(page: Page, selector: str) -> dict[str, object]:
    """The image's alt text and where it came from, once the browser has loaded it."""
    image = page.locator(selector).first
    image.scroll_into_view_if_needed()  # loading="lazy"
    handle = image.element_handle()
    page.wait_for_function("img => img.complete && img.naturalWidth > 0", arg=handle)
    found: dict[str, object] = image.evaluate(
        "img => ({alt: img.alt, from: new URL(img.currentSrc).pathname.split('/')[1]})"
    )
    return found


def accessible_everywhere(page: Page) -> None:
    for viewport, scheme in VARIANTS:
        page.set_viewport_size(viewport)
        page.emulate_media(color_scheme=scheme)
        check_accessibility(page)
    assert csp_violations(page) == []
    page.set_viewport_size(DESKTOP)
    page.emulate_media(color_scheme="light")


def test_write_upload_preview_publish_and_draft(
    blog: LiveServer, new_context: NewContext, picture: Path
) -> None:
    page = new_context().new_page()  # its base URL is the demo's: this test's URLs are whole
    sign_in(page, blog)
    page.get_by_role("link", name="Write a new post").click()
    page.wait_for_url("**/admin/write/new")

    page.get_by_label("Title", exact=True).fill("A picture from the desk")
    page.locator("#body").fill("Here it is, uploaded from the browser.")
    page.get_by_label("Tags").fill("desk, pictures")
    page.get_by_label("Image file").set_input_files(picture)
    page.get_by_label("Its alt text").fill(ALT)
    page.get_by_role("button", name="Upload image").click()
    expect(page.get_by_role("status")).to_contain_text("The image is uploaded")
    body = page.locator("#body").input_value()
    assert body.startswith("Here it is, uploaded from the browser.\n\n![" + ALT + "](/media/")

    page.get_by_role("button", name="Preview").click()
    preview = page.locator(".write-preview")
    expect(preview).to_contain_text("Here it is, uploaded from the browser.")
    assert loaded(page, ".write-preview .e-content img") == {"alt": ALT, "from": "media"}
    accessible_everywhere(page)  # the editor, its preview shown

    page.get_by_role("button", name="Publish").click()
    page.wait_for_url("**/admin/write/edit/a-picture-from-the-desk?saved=published")
    expect(page.get_by_role("status")).to_contain_text("Published")
    page.get_by_role("link", name="View it on the blog").click()
    page.wait_for_url(f"{blog.url}/posts/a-picture-from-the-desk")
    expect(page.get_by_role("heading", level=1)).to_have_text("A picture from the desk")
    assert loaded(page, ".e-content img") == {"alt": ALT, "from": "media"}

    # A draft: saved, listed on the desk, nowhere on the blog.
    page.goto(blog.url + "/admin/write/new")
    page.get_by_label("Title", exact=True).fill("Still thinking")
    page.locator("#body").fill("Not for anyone's eyes yet.")
    page.get_by_role("button", name="Save as draft").click()
    page.wait_for_url("**/admin/write/edit/still-thinking?saved=draft")
    expect(page.get_by_role("status")).to_contain_text("Saved as a draft")
    assert httpx.get(blog.url + "/posts/still-thinking").status_code == 404
    assert "Still thinking" not in httpx.get(blog.url + "/").text
    assert "A picture from the desk" in httpx.get(blog.url + "/").text

    page.get_by_role("navigation", name="Desk").get_by_role("link", name="Write").click()
    page.wait_for_url("**/admin/write")
    drafts = page.locator("section", has=page.get_by_role("heading", name="Drafts (1)"))
    expect(drafts).to_contain_text("Still thinking")
    published = page.locator("section", has=page.get_by_role("heading", name="Published (1)"))
    expect(published).to_contain_text("A picture from the desk")
    accessible_everywhere(page)  # the list

    page.goto(blog.url + "/admin/write/delete/a-picture-from-the-desk")
    expect(page.locator("main")).to_contain_text("answers 410 Gone")
    accessible_everywhere(page)  # the confirmation of a published post
    page.get_by_role("link", name="Keep it").click()
    page.wait_for_url("**/admin/write")

    drafts.get_by_role("link", name="Delete “Still thinking”").click()
    expect(page.locator("main")).to_contain_text("nothing is sent anywhere")
    page.get_by_role("button", name="Delete “Still thinking”").click()
    page.wait_for_url("**/admin/write?done=deleted&slug=still-thinking")
    expect(page.get_by_role("status")).to_have_text("Deleted “still-thinking”.")
    expect(page.get_by_role("heading", name="Drafts (0)")).to_be_visible()
