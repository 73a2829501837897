"""The desk's Health page in a real chromium, against a real ``fediblog serve``.

A fake Mastodon-like server (tests/test_federation_e2e.py's ``FakeInstance``, uvicorn on
127.0.0.1) follows the blog with a signed Follow and gets its Accept; then it stops, and
a post published with the CLI cannot reach it: its port is closed. The author signs in
through the form, opens Health, sees the failing delivery to that host with its error,
presses its Retry button and sees it due again; presses "Check my federation" and sees
one line per check of ``fediblog check``; and axe-core finds no serious or critical
problem on the page at phone and desktop widths, light and dark.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator

import httpx
import pytest
from playwright.sync_api import Page

from tests.admin_kit import PASSWORD
from tests.browser.kit import (
    VARIANTS,
    LiveServer,
    NewContext,
    check_accessibility,
    clean_env,
    csp_violations,
    free_port,
    run_fediblog,
)
from tests.test_federation_e2e import (
    FakeInstance,
    mastodon_follow,
    serving,
    signed_post_headers,
    wait_for,
)

POST = "---\ntitle: Nobody home\n---\nThis one cannot reach the follower.\n"




@pytest.fixture(scope="module")
def dead_follower(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[LiveServer, str]]:
    """``fediblog serve`` with one follower whose server has gone (a closed port on
    127.0.0.1) and a post queued for it; the desk's password set. Yields the server and
    the gone server's host (host:port)."""
    workdir = tmp_path_factory.mktemp("health-server")
    port, fake_port = free_port(), free_port()
    env = clean_env(
        FEDIBLOG_CONFIG=str(workdir / "absent.toml"),
        FEDIBLOG_BASE_URL=f"http://127.0.0.1:{port}",
        FEDIBLOG_ALLOW_HTTP="1",
        FEDIBLOG_ALLOW_PRIVATE_ADDRESSES="1",
        FEDIBLOG_DATABASE=str(workdir / "data" / "blog.db"),
        FEDIBLOG_KEYS_DIR=str(workdir / "keys"),
    )
    run_fediblog(workdir, env, "init")
    run_fediblog(workdir, env, "admin", "password", "--stdin", stdin=PASSWORD + "\n")
    server = LiveServer.start(workdir, ["serve", "--port", str(port)], port, env)
    try:
        fake = FakeInstance(
            f"http://127.0.0.1:{fake_port}",
            key_client=lambda: httpx.AsyncClient(trust_env=False, timeout=5),
        )
        account = fake.add_account("ann")
        actor = f"{server.url}/users/blog"
        with serving(fake, fake_port):
            follow = json.dumps(mastodon_follow(account, actor)).encode()
            answer = httpx.post(
                actor + "/inbox",
                content=follow,
                headers=signed_post_headers(account, actor + "/inbox", follow),
                timeout=10,
            )
            assert answer.status_code == 202, answer.text
            wait_for(lambda: fake.first("Accept"), "the Accept", server.output)
        # The follower's server is gone: its port is closed from now on.
        post = workdir / "post.md"
        post.write_text(POST, encoding="utf-8")
        run_fediblog(workdir, env, "post", "new", str(post))
        yield server, f"127.0.0.1:{fake_port}"
    finally:
        server.stop()


def sign_in(page: Page, server: LiveServer) -> None:
    page.goto(server.url + "/admin")
    page.get_by_label("Name").fill("blog")
    page.get_by_label("Password").fill(PASSWORD)
    page.get_by_role("button", name="Sign in").click()
    page.wait_for_url("**/admin")


def open_health_until_failing(page: Page, host: str) -> None:
    """Open Health from the nav, reloading until the server's first attempt at the
    delivery (within a second of the CLI's publish) has failed."""
    page.get_by_role("navigation", name="Desk").get_by_role("link", name="Health").click()
    page.wait_for_url("**/admin/health")
    deadline = time.monotonic() + 20
    while not page.locator(".host.troubled", has_text=host).count():
        assert time.monotonic() < deadline, f"no failing delivery to {host}:\n{page.content()}"
        time.sleep(0.2)
        page.reload()


def test_health_shows_a_dead_host_retries_it_and_checks_federation(
    dead_follower: tuple[LiveServer, str], new_context: NewContext
) -> None:
    server, host = dead_follower
    page = new_context().new_page()  # its base URL is the demo's: this test's URLs are whole
    sign_in(page, server)
    open_health_until_failing(page, host)

    card = page.locator(".host", has_text=host)
    assert card.locator(".host-counts").inner_text() == "0 waiting · 1 failing · 0 failed · 0 dead"
    assert "ConnectError" in card.locator(".host-error").inner_text()
    delivery = page.locator(".delivery", has_text=f"http://{host}/inbox")
    assert delivery.locator(".delivery-state").inner_text() == "failing"

    card.get_by_role("button", name=f"Retry {host}").click()
    page.wait_for_url("**/admin/health?retried=1#deliveries")
    assert page.get_by_role("status").inner_text().startswith("1 delivery due again now")
    assert page.locator(".host", has_text=host).count() == 1  # still not delivered, of course

    fingerprint = page.locator(".fingerprint").inner_text()
    assert fingerprint.startswith("SHA256:")
    page.get_by_role("button", name="Check my federation").click()
    page.wait_for_url("**/admin/health/check")
    lines = page.locator(".checks li").all_inner_texts()
    names = [line.split()[1] for line in lines]
    assert names == [
        "tls", "health", "proxy", "webfinger", "host-meta", "nodeinfo", "actor", "signed-get",
        "clock",
    ]  # fmt: skip
    statuses = dict(zip(names, (line.split()[0] for line in lines), strict=True))
    assert statuses == {name: "ok" for name in names} | {"tls": "skip", "clock": "skip"}, lines
    assert fingerprint in lines[names.index("actor")]

    for viewport, scheme in VARIANTS:
        page.set_viewport_size(viewport)
        page.emulate_media(color_scheme=scheme)
        check_accessibility(page)
        # Long inboxes, errors and the fingerprint wrap: nothing scrolls sideways.
        assert page.evaluate("document.documentElement.scrollWidth") <= viewport["width"]
    assert csp_violations(page) == []
