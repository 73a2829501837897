"""The desk's Responses and Followers sections in a real chromium, against a real server
and a fake fediverse server that signs what it sends and checks what it gets.

* ``fake_server``: a small HTTP server on 127.0.0.1 for one account (``alice``): it
  serves her actor document and key, and records every POST to her inbox.
* ``live_server`` (this module's own, in place of the demo): ``fediblog serve`` with
  FEDIBLOG_MODERATION=all (every reply is held), FEDIBLOG_MANUALLY_APPROVES_FOLLOWERS=1,
  and FEDIBLOG_ALLOW_HTTP / FEDIBLOG_ALLOW_PRIVATE_ADDRESSES so that it talks to the
  fake server over plain http on the loopback; one post, and the author's password set
  with ``fediblog admin password --stdin``.

The test signs in through the form; alice's signed reply appears in the queue with why
it is held, is approved and shows on the post; the author answers it from the thread
and the fake server receives the answer, signed by the blog (verified with pyhttpsig
against the blog's published key); alice's signed Follow is approved and the fake server
receives the Accept; the author signs out. axe-core checks the queue, the thread and
the followers page at phone and desktop widths, light and dark.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
from httpsig import HeaderVerifier
from httpsig.utils import parse_signature_header
from playwright.sync_api import Page, expect

from tests.browser.kit import (
    DESKTOP,
    PHONE,
    LiveServer,
    NewContext,
    check_accessibility,
    clean_env,
    free_port,
    run_fediblog,
)
from tests.fediverse import public_pem, remote_key, signed_headers

PASSWORD = "correct horse battery staple"
SLUG = "questions-welcome"
REPLY_TEXT = "Does the desk work from a phone?"
ANSWER_TEXT = "It does, *and* without JavaScript."
AP_TYPE = "application/activity+json"
WAIT = 20.0  # seconds: a bound on waiting for the server's workers, never a pause


class FakeServer:
    """One fediverse account on 127.0.0.1: its actor document, and its inbox's POSTs."""

    def __init__(self) -> None:
        self.key = remote_key(0)
        self.received: list[tuple[str, dict[str, str], bytes]] = []
        self._changed = threading.Condition()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                if self.path.split("?")[0] != "/users/alice":
                    self._answer(404, b"not found", "text/plain")
                    return
                self._answer(200, json.dumps(outer.actor()).encode(), AP_TYPE)

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length", "0")))
                headers = {name.lower(): value for name, value in self.headers.items()}
                with outer._changed:
                    outer.received.append((self.path, headers, body))
                    outer._changed.notify_all()
                self._answer(202, b"", "text/plain")

            def _answer(self, status: int, body: bytes, content_type: str) -> None:
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.port = free_port()
        self.httpd = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self.origin = f"http://127.0.0.1:{self.port}"
        self.actor_id = f"{self.origin}/users/alice"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def actor(self) -> dict[str, Any]:
        return {
            "@context": ["https://www.w3.org/ns/activitystreams", "https://w3id.org/security/v1"],
            "id": self.actor_id,
            "type": "Person",
            "preferredUsername": "alice",
            "name": "Alice Remote",
            "url": f"{self.origin}/@alice",
            "inbox": f"{self.actor_id}/inbox",
            "outbox": f"{self.actor_id}/outbox",
            "followers": f"{self.actor_id}/followers",
            "publicKey": {
                "id": f"{self.actor_id}#main-key",
                "owner": self.actor_id,
                "publicKeyPem": public_pem(self.key),
            },
        }

    def send(self, blog: str, activity: dict[str, Any]) -> None:
        """POST ``activity`` to the blog's shared inbox, signed with alice's key."""
        body = json.dumps(activity).encode()
        url = blog + "/inbox"
        headers = signed_headers(f"{self.actor_id}#main-key", self.key, url, body)
        answer = httpx.post(url, content=body, headers=headers, timeout=10)
        assert answer.status_code == 202, answer.text

    def wait_for(
        self, match: Callable[[dict[str, Any]], bool]
    ) -> tuple[str, dict[str, str], dict[str, Any]]:
        """The first POST whose activity ``match``es, waiting (bounded) for it to come."""
        deadline = time.monotonic() + WAIT
        with self._changed:
            while True:
                for path, headers, body in self.received:
                    activity = json.loads(body)
                    if match(activity):
                        return path, headers, activity
                left = deadline - time.monotonic()
                assert left > 0, f"never received it; got {[b for _, _, b in self.received]}"
                self._changed.wait(left)


@pytest.fixture(scope="module")
def fake_server() -> Iterator[FakeServer]:
    server = FakeServer()
    server.thread.start()
    yield server
    server.httpd.shutdown()
    server.httpd.server_close()


@pytest.fixture(scope="module")
def live_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    """Replaces the folder's demo server for this module (see the module docstring)."""
    workdir = tmp_path_factory.mktemp("desk-responses")
    port = free_port()
    env = clean_env(
        FEDIBLOG_ALLOW_HTTP="1",
        FEDIBLOG_ALLOW_PRIVATE_ADDRESSES="1",
        FEDIBLOG_BASE_URL=f"http://127.0.0.1:{port}",
        FEDIBLOG_MODERATION="all",
        FEDIBLOG_MANUALLY_APPROVES_FOLLOWERS="1",
    )
    run_fediblog(workdir, env, "init")
    run_fediblog(workdir, env, "admin", "password", "--stdin", stdin=PASSWORD + "\n")
    server = LiveServer.start(workdir, ["serve", "--port", str(port)], port, env)
    try:
        post = Path(workdir / "post.md")
        post.write_text(
            f"---\ntitle: Questions welcome\nslug: {SLUG}\n---\nAsk me anything.\n", "utf-8"
        )
        server.cli("post", "new", str(post))
        yield server
    finally:
        server.stop()


def blog_signed(headers: dict[str, str], path: str, blog: str) -> str:
    """The key id that signed a POST the fake server got, checked with pyhttpsig against
    the key the blog publishes under that id."""
    key_id = str(parse_signature_header(headers["signature"])["keyId"])
    assert key_id.startswith(blog + "/"), key_id
    actor = httpx.get(key_id.split("#")[0], headers={"Accept": AP_TYPE}, timeout=10).json()
    verifier = HeaderVerifier(
        headers,
        actor["publicKey"]["publicKeyPem"],
        required_headers=["(request-target)", "host", "date", "digest"],
        method="POST",
        path=path,
        sign_header="signature",
    )
    assert verifier.verify(), "the blog's signature does not verify"
    return key_id


def check_all_variants(page: Page) -> None:
    """axe-core at phone and desktop widths, light and dark, on the page as loaded."""
    for viewport in (PHONE, DESKTOP):
        page.set_viewport_size(viewport)
        for scheme in ("light", "dark"):
            page.emulate_media(color_scheme=scheme)  # type: ignore[arg-type]
            check_accessibility(page)


def until_shown(page: Page, path: str, text: str, within: str | None = None) -> None:
    """Load ``path`` until it shows ``text`` (inside an element ``within`` selects, if
    given): the server's inbox worker runs apart, a page's lists are separate reads that
    a commit may fall between, and a public page may be served from the page cache up to
    a second after a change."""
    deadline = time.monotonic() + WAIT
    while True:
        page.goto(path)
        if (
            page.locator(within).filter(has_text=text).count() > 0
            if within
            else text in page.content()
        ):
            return
        assert time.monotonic() < deadline, f"{path} never showed {text!r}"
        page.wait_for_timeout(200)


def test_the_author_approves_and_answers_a_reply_and_approves_a_follower(
    new_context: NewContext, live_server: LiveServer, fake_server: FakeServer
) -> None:
    blog = live_server.url
    page = new_context().new_page()

    # Sign in through the real form.
    page.goto("/admin/responses")
    page.get_by_label("Name").fill("blog")
    page.get_by_label("Password").fill(PASSWORD)
    page.get_by_role("button", name="Sign in").click()
    expect(page.get_by_role("heading", name="Responses", level=1)).to_be_visible()

    # A signed reply from the fake server is held, and the queue says why.
    note_id = f"{fake_server.actor_id}/statuses/1"
    note = {
        "id": note_id,
        "type": "Note",
        "attributedTo": fake_server.actor_id,
        "inReplyTo": f"{blog}/posts/{SLUG}",
        "content": f"<p>{REPLY_TEXT}</p>",
        "published": "2026-01-02T03:04:05Z",
        "to": ["https://www.w3.org/ns/activitystreams#Public"],
        "cc": [f"{fake_server.actor_id}/followers"],
    }
    fake_server.send(blog, {
        "@context": "https://www.w3.org/ns/activitystreams", "id": f"{note_id}/activity",
        "type": "Create", "actor": fake_server.actor_id, "to": note["to"], "cc": note["cc"],
        "object": note,
    })  # fmt: skip
    queue = "section[aria-labelledby=held-heading] article"
    until_shown(page, "/admin/responses", REPLY_TEXT, within=queue)
    held = page.locator(queue, has_text=REPLY_TEXT)
    expect(held).to_contain_text("Held because: every response waits for approval")
    check_all_variants(page)
    page.set_viewport_size(DESKTOP)

    # Approved, it shows on the post.
    held.get_by_role("button", name="Approve").click()
    expect(page.get_by_role("status")).to_contain_text("Approved")
    until_shown(page, f"/posts/{SLUG}", REPLY_TEXT)
    expect(page.locator(".comment-list")).to_contain_text(REPLY_TEXT)

    # The author answers it from the post's thread; alice's server gets it, signed.
    page.goto(f"/admin/responses/posts/{SLUG}")
    check_all_variants(page)
    page.set_viewport_size(DESKTOP)
    response = page.locator("article", has_text=REPLY_TEXT)
    expect(response.locator("a.comment-number")).to_have_text("#1")
    response.get_by_text("Answer", exact=True).click()
    response.get_by_label("Your answer (Markdown)").fill(ANSWER_TEXT)
    response.get_by_role("button", name="Publish the answer").click()
    expect(page.get_by_role("status")).to_contain_text("Answered")
    path, headers, create = fake_server.wait_for(
        lambda a: a.get("type") == "Create" and a["object"].get("inReplyTo") == note_id
    )
    assert path == "/users/alice/inbox"
    assert blog_signed(headers, path, blog) == f"{create['actor']}#main-key"
    assert "<em>and</em>" in create["object"]["content"]
    until_shown(page, f"/posts/{SLUG}", "It does, <em>and</em> without JavaScript.")
    expect(page.locator(".comment-list .children")).to_contain_text("without JavaScript")

    # A signed Follow waits for approval; approved, alice's server gets the Accept.
    follow_id = f"{fake_server.actor_id}/follows/1"
    actor = httpx.get(
        f"{blog}/.well-known/webfinger?resource=acct:blog@127.0.0.1:{blog.rsplit(':', 1)[1]}",
        timeout=10,
    ).json()
    blog_actor = next(link["href"] for link in actor["links"] if link.get("rel") == "self")
    fake_server.send(blog, {
        "@context": "https://www.w3.org/ns/activitystreams", "id": follow_id,
        "type": "Follow", "actor": fake_server.actor_id, "object": blog_actor,
    })  # fmt: skip
    until_shown(page, "/admin/followers", "@alice@127.0.0.1")
    check_all_variants(page)
    page.set_viewport_size(PHONE)
    page.get_by_role("button", name="Approve @alice@").click()
    expect(page.get_by_role("status")).to_contain_text("Approved")
    path, headers, accept = fake_server.wait_for(lambda a: a.get("type") == "Accept")
    assert accept["object"]["id"] == follow_id
    blog_signed(headers, path, blog)
    expect(page.locator("#servers-heading")).to_have_text("1 follower, by server")

    # Sign out: the desk asks for the password again.
    page.get_by_role("button", name="Sign out").click()
    expect(page.get_by_role("heading", name="Sign in")).to_be_visible()
    page.goto("/admin/responses")
    expect(page).to_have_url(f"{blog}/admin/login?next=/admin/responses")
    expect(page.get_by_role("heading", name="Sign in")).to_be_visible()
