"""POSTs to an inbox are answered before the middleware stack and the router (app.py):
the same answers, headers, counters and path matching as the routed endpoint gave.

The real app and real signatures (tests/fediverse.py), over httpx's ASGI transport.
"""

from __future__ import annotations

import json

import httpx
import pytest
from starlette.routing import Match

from fediblog.app import SECURITY_HEADERS
from fediblog.web import activitypub
from fediblog.web.deps import Services
from tests.conftest import BASE_URL, deliver
from tests.fediverse import Fediverse, signed_headers

pytestmark = pytest.mark.anyio

SECURITY = {name.decode(): value.decode() for name, value in SECURITY_HEADERS}


def assert_security_headers(response: httpx.Response) -> None:
    for name, value in SECURITY.items():
        assert response.headers.get_list(name) == [value], name


async def test_accepted_and_refused_posts_carry_the_security_headers_once(
    web: httpx.AsyncClient, ctx: Services, fediverse: Fediverse
) -> None:
    ann = fediverse.add("social.example", "ann")
    accepted = await deliver(
        web, ctx, ann, ann.create(ann.note(1, f"{BASE_URL}/p/x", "Hi")), process=False
    )
    refused = await web.post("/inbox", content=b"{}", headers={"Content-Type": "text/html"})

    assert accepted.status_code == 202
    assert accepted.content == b""
    assert refused.status_code == 415
    assert refused.text == "415: send application/activity+json\n"
    for response in (accepted, refused):
        assert_security_headers(response)
    assert ctx.inbox.stats.accepted == 1
    assert ctx.inbox.stats.refused == {(415, "content_type"): 1}


async def test_the_personal_inbox_is_the_shared_one_and_other_handles_have_none(
    web: httpx.AsyncClient, ctx: Services, fediverse: Fediverse
) -> None:
    ann = fediverse.add("social.example", "ann")
    body = json.dumps(ann.create(ann.note(2, f"{BASE_URL}/p/x", "Hi"))).encode()
    personal = f"/users/{ctx.settings.handle}/inbox"
    mine = await web.post(
        personal,
        content=body,
        headers=signed_headers(ann.key_id, ann.key, BASE_URL + personal, body),
    )
    other = await web.post("/users/nobody/inbox", content=body, headers={})

    assert mine.status_code == 202
    assert other.status_code == 404
    assert other.text == "404: no such inbox\n"
    assert_security_headers(other)


async def test_other_methods_still_reach_the_router(web: httpx.AsyncClient) -> None:
    for path in ("/inbox", "/users/blog/inbox"):
        response = await web.get(path)
        assert response.status_code == 405
        assert_security_headers(response)  # through the middleware, as before


async def test_a_bug_before_the_activity_is_read_is_a_503_never_a_500(
    web: httpx.AsyncClient, ctx: Services, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def broken(*_: object) -> bytes:
        raise RuntimeError("a bug")

    monkeypatch.setattr(activitypub, "_read_body", broken)
    response = await web.post(
        "/inbox", content=b"{}", headers={"Content-Type": "application/activity+json"}
    )

    assert response.status_code == 503
    assert response.text == "503: temporary trouble, retry later\n"
    assert response.headers["retry-after"] == "60"
    assert ctx.inbox.stats.refused == {(503, "internal"): 1}


@pytest.mark.parametrize(
    "path",
    [
        "/inbox",
        "/inbox/",
        "/users/blog/inbox",
        "/users/someone else/inbox",
        "/users//inbox",
        "/users/inbox",
        "/users/a/b/inbox",
        "/users/blog/inbox/",
        "/users/blog/inboxes",
        "/xusers/blog/inbox",
        "/p/x/inbox",
    ],
)
def test_inbox_paths_match_exactly_as_their_routes_do(path: str) -> None:
    scope = {"type": "http", "method": "POST", "path": path, "root_path": ""}
    routed = None
    for route in activitypub.routes[:2]:
        match, child = route.matches(scope)
        if match == Match.FULL:
            routed = child["path_params"]
            break
    assert activitypub.inbox_path_params(path) == routed
