"""No admin page, asset or action is reachable without a session and, for any unsafe
method, the session's own CSRF token.

The walk takes every route under /admin from the app's route table, so a route added
later is covered without being listed here. Each route's handler is wrapped by a spy
that records being reached (then runs the real handler), and the database is compared
before and after each refused request: a refusal must neither reach a handler nor
change anything.
"""

from __future__ import annotations

import hashlib
import logging
import re
import secrets
from collections.abc import Iterator

import httpx
import pytest
from bs4 import BeautifulSoup
from starlette.applications import Starlette
from starlette.routing import BaseRoute, Mount, Route
from starlette.types import ASGIApp, Receive, Scope, Send

from fediblog.config import Settings
from fediblog.desk import IDLE_TIMEOUT, SIGN_IN_FAILED
from fediblog.models import utcnow
from fediblog.web.admin.guard import CONTENT_SECURITY_POLICY, PUBLIC_PATHS, safe_next
from fediblog.web.deps import Services
from tests import dbpeek
from tests.admin_kit import PASSWORD, cookie, new_session, sign_in, stored_bytes, table_names

pytestmark = pytest.mark.anyio

METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")
SAFE = ("GET", "HEAD")
_PARAM = re.compile(r"\{[^}]+\}")


def _walk(routes: list[BaseRoute], prefix: str = "") -> Iterator[Route]:
    for route in routes:
        if isinstance(route, Mount):
            yield from _walk(route.routes, prefix + route.path)
        elif isinstance(route, Route):
            yield route


def admin_routes(app: Starlette) -> list[Route]:
    return [r for r in _walk(app.routes) if r.path == "/admin" or r.path.startswith("/admin/")]


def admin_paths(app: Starlette) -> list[str]:
    """Each admin path once, path parameters filled with a plausible value."""
    return sorted({_PARAM.sub("1", route.path) for route in admin_routes(app)})


class Spy:
    """Records each request that reaches an admin handler, then lets it run."""

    def __init__(self) -> None:
        self.reached: list[tuple[str, str]] = []

    def wrap(self, app: ASGIApp) -> ASGIApp:
        async def spied(scope: Scope, receive: Receive, send: Send) -> None:
            self.reached.append((scope["method"], scope["path"]))
            await app(scope, receive, send)

        return spied


@pytest.fixture
def spy(app: Starlette, monkeypatch: pytest.MonkeyPatch) -> Spy:
    found = Spy()
    for route in admin_routes(app):  # the Route objects outlive this app: restored after
        monkeypatch.setattr(route, "app", found.wrap(route.app))
    return found


def fingerprint(database: Settings) -> str:
    """Everything in the database, in one hash (sessions by key: last-seen may move)."""
    digest = hashlib.sha256()
    tables = table_names(database)
    queries = [
        "SELECT key FROM desk_sessions ORDER BY key"
        if table == "desk_sessions"
        else f"SELECT * FROM {table} ORDER BY 1"  # noqa: S608 (names from the schema)
        for table in tables
    ]
    found = dbpeek.many(database, *((query, ()) for query in queries))
    for table, rows in zip(tables, found, strict=True):
        digest.update(table.encode() + repr(rows).encode())
    return digest.hexdigest()


def assert_admin_headers(response: httpx.Response) -> None:
    assert response.headers["cache-control"] == "no-store", response.request.url
    assert response.headers["content-security-policy"] == CONTENT_SECURITY_POLICY
    assert "etag" not in response.headers


def assert_refused(response: httpx.Response, method: str) -> None:
    if method in SAFE:
        assert response.status_code == 303, (method, response.request.url, response.text)
        assert response.headers["location"].startswith("/admin/login?next=")
    else:
        assert response.status_code in (403, 405), (method, response.request.url)
    assert_admin_headers(response)


async def _send(
    client: httpx.AsyncClient, method: str, path: str, headers: dict[str, str], **body: object
) -> httpx.Response:
    return await client.request(method, path, headers=headers, **body)  # type: ignore[arg-type]


async def test_the_walk_finds_the_admin_routes(app: Starlette) -> None:
    paths = admin_paths(app)
    for known in ("/admin", "/admin/login", "/admin/logout", "/admin/signout-all"):
        assert known in paths


async def _walk_refused(
    client: httpx.AsyncClient,
    app: Starlette,
    services: Services,
    spy: Spy,
    headers: dict[str, str],
) -> None:
    before = fingerprint(services.settings)
    for path in admin_paths(app):
        if path in PUBLIC_PATHS:
            continue
        for method in METHODS:
            form = {"data": {"csrf": "0" * 64}} if method not in SAFE else {}
            response = await _send(client, method, path, headers, **form)
            assert_refused(response, method)
            assert spy.reached == [], (method, path)
            assert fingerprint(services.settings) == before, (method, path)


async def test_no_admin_route_answers_without_a_session(
    client: httpx.AsyncClient, app: Starlette, services: Services, spy: Spy
) -> None:
    await new_session(services)  # a session exists, but not in this browser
    await _walk_refused(client, app, services, spy, {})


async def test_no_admin_route_answers_a_forged_cookie(
    client: httpx.AsyncClient, app: Starlette, services: Services, spy: Spy
) -> None:
    await new_session(services)
    forged = cookie(services, secrets.token_urlsafe(32))
    await _walk_refused(client, app, services, spy, forged)


async def test_no_admin_route_answers_a_signed_out_cookie(
    client: httpx.AsyncClient, app: Starlette, services: Services, spy: Spy
) -> None:
    token = await new_session(services)
    await new_session(services)  # another browser stays signed in
    assert await services.desk.sign_out(token)
    await _walk_refused(client, app, services, spy, cookie(services, token))


async def test_no_admin_route_answers_an_expired_cookie(
    client: httpx.AsyncClient, app: Starlette, services: Services, spy: Spy
) -> None:
    token = await new_session(services)
    later = utcnow() + IDLE_TIMEOUT
    services.desk.now = lambda: later
    # The first refusal removes the dead session; from then on, nothing changes.
    assert_refused(await client.get("/admin", headers=cookie(services, token)), "GET")
    await _walk_refused(client, app, services, spy, cookie(services, token))


@pytest.mark.parametrize("csrf", ["missing", "forged", "other session's", "empty"])
async def test_no_unsafe_method_passes_without_this_sessions_csrf_token(
    client: httpx.AsyncClient, app: Starlette, services: Services, spy: Spy, csrf: str
) -> None:
    token = await new_session(services)
    other = await new_session(services, ip="198.51.100.7")
    given = {
        "missing": None,
        "forged": secrets.token_hex(32),
        "other session's": services.desk.csrf_token(other),
        "empty": "",
    }[csrf]
    before = fingerprint(services.settings)
    for path in admin_paths(app):
        if path in PUBLIC_PATHS:
            continue
        for method in METHODS:
            if method in SAFE:
                continue
            for how in ("form", "multipart", "header"):
                headers = cookie(services, token)
                body: dict[str, object] = {}
                if given is not None and how == "header":
                    headers["x-csrf-token"] = given
                elif given is not None and how == "form":
                    body = {"data": {"csrf": given}}
                elif given is not None:
                    body = {"data": {"csrf": given}, "files": {"f": ("a.txt", b"x")}}
                response = await _send(client, method, path, headers, **body)
                assert response.status_code == 403, (method, path, how)
                assert "CSRF" in response.text
                assert_admin_headers(response)
                assert spy.reached == [], (method, path, how)
                assert fingerprint(services.settings) == before, (method, path)


async def test_with_a_session_and_its_token_every_route_is_reached(
    client: httpx.AsyncClient, app: Starlette, services: Services, spy: Spy
) -> None:
    """The control: the walk above would notice a route that let requests through."""
    for route in admin_routes(app):
        path = _PARAM.sub("1", route.path)
        for method in sorted((route.methods or set()) - {"HEAD"}):
            token = await new_session(services)  # sign-out routes end it: one each
            headers = cookie(services, token)
            body = {"data": {"csrf": services.desk.csrf_token(token)}} if method != "GET" else {}
            spy.reached.clear()
            response = await _send(client, method, path, headers, **body)
            assert spy.reached == [(method, path)], (method, path, response.status_code)
            assert_admin_headers(response)


async def test_every_form_of_every_admin_page_carries_the_sessions_csrf_token(
    client: httpx.AsyncClient, app: Starlette, services: Services
) -> None:
    csrf = await sign_in(client, services)
    pages = 0
    for route in admin_routes(app):
        if "GET" not in (route.methods or set()) or "{" in route.path:
            continue
        if route.path in PUBLIC_PATHS:  # the sign-in form sends a signed-in browser on
            continue
        response = await client.get(route.path)
        assert response.status_code == 200, route.path
        assert_admin_headers(response)
        soup = BeautifulSoup(response.text, "html.parser")
        assert soup.find("script") is None
        assert soup.find(style=True) is None
        assert soup.find("style") is None
        for form in soup.find_all("form"):
            if form.get("method", "get").lower() != "post" or form.get("action") == "/admin/login":
                continue
            field = form.find("input", attrs={"name": "csrf"})
            assert field is not None, route.path
            assert field.get("type") == "hidden", route.path
            assert field.get("value") == csrf, route.path
        pages += 1
    assert pages >= 2


async def test_admin_pages_never_enter_the_public_page_cache(
    client: httpx.AsyncClient, app: Starlette, services: Services
) -> None:
    csrf = await sign_in(client, services)
    await client.get("/")  # a public page, cached as usual
    for path in admin_paths(app):
        await client.get(path)
    entries = services.pages._entries
    assert entries, "the public page is cached"
    for key, (_, _, page) in entries.items():
        assert "admin" not in key
        assert csrf.encode() not in page.body
        assert b'class="desk"' not in page.body


async def test_admin_headers_on_the_sign_in_page_errors_and_unknown_paths(
    client: httpx.AsyncClient, services: Services
) -> None:
    assert_admin_headers(await client.get("/admin/login"))
    assert_admin_headers(await client.get("/admin/no-such-page"))
    await sign_in(client, services)
    unknown = await client.get("/admin/no-such-page")
    assert unknown.status_code == 404
    assert_admin_headers(unknown)
    public = await client.get("/")
    assert public.headers["cache-control"] != "no-store"  # the guard keeps to /admin


async def test_an_error_under_admin_is_a_sentence_with_the_admin_headers(
    app: Starlette, services: Services, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A bug in a desk page: a 500 that no cache keeps, with the CSP, and no traceback
    for the browser; the error goes on to the server, which logs it."""
    token = await new_session(services)

    async def broken(scope: Scope, receive: Receive, send: Send) -> None:
        raise RuntimeError("a bug with a secret in its message")

    (dashboard,) = [r for r in admin_routes(app) if r.path == "/admin"]
    monkeypatch.setattr(dashboard, "app", broken)
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="https://blog.example") as http:
        response = await http.get("/admin", headers=cookie(services, token))
    assert response.status_code == 500
    assert_admin_headers(response)
    assert response.headers["x-frame-options"] == "DENY"
    assert response.text.startswith("500: ")
    assert "secret" not in response.text
    assert "Traceback" not in response.text
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app)) as http:
        with pytest.raises(RuntimeError, match="a bug with a secret"):
            await http.get("https://blog.example/admin", headers=cookie(services, token))


OFF_THE_ADMIN = [
    "https://evil.example/admin",
    "//evil.example/admin",
    "///evil.example",
    "/\\evil.example",
    "/admin\\..\\..\\evil",
    "\\\\evil.example",
    "javascript:alert(1)",
    "/administrator",
    "/admin/../evil",
    "/admin/%2e%2e/evil",
    "/admin\r\nLocation: https://evil.example",
    "/admin#https://evil.example",
    "http:/admin",
    " /admin",
    "/admin/login",
]


@pytest.mark.parametrize("wanted", OFF_THE_ADMIN)
def test_next_never_leads_off_the_admin(wanted: str) -> None:
    assert safe_next(wanted) == "/admin"


@pytest.mark.parametrize("wanted", ["/admin", "/admin/write", "/admin/followers?page=2"])
def test_next_keeps_admin_paths(wanted: str) -> None:
    assert safe_next(wanted) == wanted


async def test_sign_in_never_redirects_off_the_admin(
    client: httpx.AsyncClient, services: Services
) -> None:
    await services.desk.set_password(PASSWORD)
    for wanted in ("https://evil.example/admin", "//evil.example/admin", "/\\evil.example"):
        response = await client.post(
            "/admin/login",
            data={"username": services.settings.handle, "password": PASSWORD, "next": wanted},
        )
        assert response.status_code == 303
        assert response.headers["location"] == "/admin"


async def test_sign_in_goes_back_to_the_admin_page_asked_for(
    client: httpx.AsyncClient, services: Services
) -> None:
    await services.desk.set_password(PASSWORD)
    first = await client.get("/admin/followers?page=2")
    assert first.headers["location"] == "/admin/login?next=/admin/followers%3Fpage%3D2"
    form = BeautifulSoup((await client.get(first.headers["location"])).text, "html.parser")
    next_field = form.find("input", attrs={"name": "next"})
    assert next_field is not None
    assert next_field.get("value") == "/admin/followers?page=2"
    response = await client.post(
        "/admin/login",
        data={"username": "blog", "password": PASSWORD, "next": next_field.get("value")},
    )
    assert response.headers["location"] == "/admin/followers?page=2"


async def test_sign_in_failures_do_not_say_which_part_was_wrong(
    client: httpx.AsyncClient, services: Services
) -> None:
    async def attempt(username: str, password: str) -> tuple[int, str]:
        response = await client.post(
            "/admin/login", data={"username": username, "password": password, "next": "/admin"}
        )
        assert_admin_headers(response)
        return response.status_code, response.text

    no_account = await attempt("blog", PASSWORD)  # no password set yet
    await services.desk.set_password(PASSWORD)
    wrong_name = await attempt("someone", PASSWORD)
    wrong_password = await attempt("blog", PASSWORD + "!")
    both_wrong = await attempt("someone", "nothing like it")
    empty = await attempt("", "")
    assert wrong_name == wrong_password == both_wrong == empty
    assert wrong_name[0] == 403
    assert SIGN_IN_FAILED in wrong_name[1]
    # Before any password exists the page also says how to set one; the refusal is the same.
    assert no_account[0] == 403
    assert SIGN_IN_FAILED in no_account[1]


async def test_sign_in_from_another_site_is_refused(
    client: httpx.AsyncClient, services: Services
) -> None:
    await services.desk.set_password(PASSWORD)
    data = {"username": "blog", "password": PASSWORD}
    refused = await client.post(
        "/admin/login", data=data, headers={"origin": "https://evil.example"}
    )
    assert refused.status_code == 403
    assert "set-cookie" not in refused.headers
    cross = await client.post("/admin/login", data=data, headers={"sec-fetch-site": "cross-site"})
    assert cross.status_code == 403
    same = await client.post("/admin/login", data=data, headers={"origin": "https://blog.example"})
    assert same.status_code == 303


async def test_failed_sign_ins_are_limited_per_address_and_overall(
    client: httpx.AsyncClient, services: Services
) -> None:
    await services.desk.set_password(PASSWORD)
    limit = services.desk.limit
    for _ in range(limit.per_address):
        failed = await client.post("/admin/login", data={"username": "blog", "password": "x" * 12})
        assert failed.status_code == 403
    # Now even the right password is refused from here, without being checked.
    right = {"username": "blog", "password": PASSWORD}
    limited = await client.post("/admin/login", data=right)
    assert limited.status_code == 429
    assert int(limited.headers["retry-after"]) > 0
    assert "set-cookie" not in limited.headers
    # Another address may still sign in, until the failures of all reach the global limit.
    assert limit.retry_after("203.0.113.9") is None
    for n in range(limit.overall - limit.per_address):
        limit.failed(f"203.0.113.{n}")
    assert limit.retry_after("203.0.113.250") is not None
    # A window later, the limit is lifted.
    now = limit.clock()
    limit.clock = lambda: now + limit.window
    assert (await client.post("/admin/login", data=right)).status_code == 303


async def test_the_password_is_never_stored_or_logged_in_clear(
    client: httpx.AsyncClient, services: Services, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    wrong = "not the password but close"
    await services.desk.set_password(PASSWORD)
    await client.post("/admin/login", data={"username": "blog", "password": wrong})
    response = await client.post("/admin/login", data={"username": "blog", "password": PASSWORD})
    token = response.cookies.get("__Host-fediblog-desk")
    assert token
    stored = stored_bytes(services.settings)  # on SQLite the file and its WAL: every byte
    for secret in (PASSWORD, wrong, token):
        assert secret.encode() not in stored
        assert secret.encode("utf-16-le") not in stored
        assert secret not in caplog.text
    assert b"$argon2id$" in stored
