"""The author's account and sessions (desk.py), the commands that manage them, signing
in and out through /admin, and the dashboard."""

from __future__ import annotations

import asyncio
import io
from collections.abc import Awaitable, Callable
from datetime import timedelta
from pathlib import Path
from typing import TypeVar

import httpx
import pytest
from argon2 import PasswordHasher, Type, extract_parameters
from bs4 import BeautifulSoup

from fediblog.config import load_settings
from fediblog.desk import (
    ABSOLUTE_TIMEOUT,
    FAILURES_PER_ADDRESS,
    IDLE_TIMEOUT,
    KNOWN_FOR,
    MAX_WAITING,
    SEEN_EVERY,
    Desk,
    FailureLimit,
    PasswordRejected,
    SignInFailed,
    SignInLimited,
    session_key,
)
from fediblog.models import utcnow
from fediblog.store import Store
from fediblog.web.deps import Services
from tests import dbpeek
from tests.admin_kit import PASSWORD, cookie, new_session, sign_in, stored_bytes
from tests.conftest import make_settings
from tests.helpers import publish, remote_actor, run, running

pytestmark = pytest.mark.anyio
T = TypeVar("T")


# ---- the password ------------------------------------------------------------------------


async def test_the_password_hash_is_argon2id_with_the_librarys_current_defaults(
    services: Services,
) -> None:
    await services.desk.set_password(PASSWORD)
    stored = await services.store.get_desk_password_hash()
    assert stored is not None
    assert stored.startswith("$argon2id$")
    found, defaults = extract_parameters(stored), PasswordHasher()
    assert found.type is Type.ID
    assert (found.time_cost, found.memory_cost, found.parallelism) == (
        defaults.time_cost,
        defaults.memory_cost,
        defaults.parallelism,
    )
    assert (found.hash_len, found.salt_len) == (defaults.hash_len, defaults.salt_len)


@pytest.mark.parametrize("password", ["short", "           ", " " * 20, "x" * 1025])
async def test_a_weak_or_absurd_password_is_refused(services: Services, password: str) -> None:
    with pytest.raises(PasswordRejected):
        await services.desk.set_password(password)
    assert await services.store.get_desk_password_hash() is None


async def test_a_new_password_signs_out_everywhere(services: Services) -> None:
    await services.desk.set_password(PASSWORD)
    first, second = await new_session(services), await new_session(services)
    assert await services.desk.set_password("another long passphrase") == 2
    assert await services.desk.session_for(first) is None
    assert await services.desk.session_for(second) is None


def test_admin_password_from_stdin_sets_it_and_signs_out_everywhere(
    blog_dir: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    run(capsys, "init")
    monkeypatch.setattr("sys.stdin", io.StringIO(PASSWORD + "\n"))
    code, out, err = run(capsys, "admin", "password", "--stdin")
    assert (code, err) == (0, "")
    assert out.strip() == (
        "password set: sign in at https://blog.example/admin as blog (0 session(s) signed out)"
    )
    assert PASSWORD not in out
    stored = stored_bytes(load_settings())
    assert PASSWORD.encode() not in stored
    assert b"$argon2id$" in stored  # the control: what was stored is in what was read


def test_admin_password_asks_twice_and_refuses_two_different_ones(
    blog_dir: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    run(capsys, "init")
    answers = iter([PASSWORD, PASSWORD + "?"])
    monkeypatch.setattr("getpass.getpass", lambda prompt="": next(answers))
    code, out, err = run(capsys, "admin", "password")
    assert (code, out) == (1, "")
    assert err.strip() == "fediblog: error: the two passwords differ; nothing was changed"
    answers = iter([PASSWORD, PASSWORD])
    assert run(capsys, "admin", "password")[0] == 0


def test_admin_password_too_short_is_one_line_and_exit_1(
    blog_dir: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    run(capsys, "init")
    monkeypatch.setattr("sys.stdin", io.StringIO("tiny\n"))
    code, out, err = run(capsys, "admin", "password", "--stdin")
    assert (code, out) == (1, "")
    assert err.strip() == "fediblog: error: the password needs 12 characters at least"
    assert "tiny" not in err


def test_admin_sessions_and_signout_all_commands(
    blog_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run(capsys, "init")
    settings = load_settings()

    async def with_desk(action: Callable[[Desk], Awaitable[T]]) -> T:
        store = await Store.open(settings.store_location)
        try:
            return await action(Desk(settings, store))
        finally:
            await store.close()

    async def start(desk: Desk) -> str:
        return (await desk.start_session(ip="198.51.100.4", user_agent="tests")).token

    token = asyncio.run(with_desk(start))
    code, out, _ = run(capsys, "admin", "sessions")
    assert code == 0
    assert "198.51.100.4" in out
    assert "tests" in out
    code, out, _ = run(capsys, "admin", "signout-all")
    assert (code, out.strip()) == (0, "signed out everywhere (1 session(s) ended)")
    assert asyncio.run(with_desk(lambda desk: desk.session_for(token))) is None
    assert run(capsys, "admin", "sessions")[1].strip() == "nobody is signed in"


# ---- sessions --------------------------------------------------------------------------


async def test_the_database_keeps_only_a_hash_of_the_session_id(services: Services) -> None:
    token = await new_session(services)
    rows = await services.store.list_desk_sessions()
    assert [row.key for row in rows] == [session_key(token)]
    # Every column of the table, read as another process would, not only those a record
    # carries: a column added later must not hold the token either.
    stored = dbpeek.rows(services.settings, "SELECT * FROM desk_sessions")
    assert len(stored) == 1
    assert token not in str(stored)


async def test_a_session_ends_when_idle_too_long(services: Services) -> None:
    start = utcnow()
    services.desk.now = lambda: start
    token = await new_session(services)
    services.desk.now = lambda: start + IDLE_TIMEOUT - timedelta(seconds=1)
    assert await services.desk.session_for(token) is not None  # used: idle time restarts
    services.desk.now = lambda: start + 2 * IDLE_TIMEOUT - timedelta(seconds=2)
    assert await services.desk.session_for(token) is not None
    services.desk.now = lambda: start + 3 * IDLE_TIMEOUT
    assert await services.desk.session_for(token) is None
    assert await services.store.list_desk_sessions() == []


async def test_a_session_ends_at_its_absolute_end_however_busy(services: Services) -> None:
    start = utcnow()
    services.desk.now = lambda: start
    token = await new_session(services)
    moment = start
    while moment < start + ABSOLUTE_TIMEOUT - IDLE_TIMEOUT:  # used every few hours
        moment += IDLE_TIMEOUT / 2
        services.desk.now = lambda moment=moment: moment
        assert await services.desk.session_for(token) is not None
    services.desk.now = lambda: start + ABSOLUTE_TIMEOUT
    assert await services.desk.session_for(token) is None


async def test_last_seen_is_written_at_most_once_a_minute(services: Services) -> None:
    start = utcnow()
    services.desk.now = lambda: start
    token = await new_session(services)

    async def stored_last_seen() -> str:
        return str((await services.store.list_desk_sessions())[0].last_seen)

    before = await stored_last_seen()
    services.desk.now = lambda: start + SEEN_EVERY / 2
    assert await services.desk.session_for(token) is not None
    assert await stored_last_seen() == before
    services.desk.now = lambda: start + SEEN_EVERY
    seen = await services.desk.session_for(token)
    assert seen is not None
    assert seen.last_seen == start + SEEN_EVERY
    assert (await services.desk.list_sessions())[0].last_seen == start + SEEN_EVERY


def test_failure_limit_per_address_overall_and_per_ipv6_network() -> None:
    clock = [0.0]
    limit = FailureLimit(per_address=2, overall=3, window=60, clock=lambda: clock[0])
    limit.failed("2001:db8:1:2::1")
    limit.failed("2001:db8:1:2:ffff::9")  # the same /64
    assert limit.retry_after("2001:db8:1:2::77") == 61
    assert limit.retry_after("2001:db8:1:3::1") is None
    limit.failed("192.0.2.1")
    assert limit.retry_after("192.0.2.200") is not None  # three in all: everyone waits
    clock[0] = 60.0
    assert limit.retry_after("2001:db8:1:2::77") is None


# ---- through the browser -------------------------------------------------------------------


async def test_the_session_cookie_is_host_only_secure_httponly_strict_and_expires(
    client: httpx.AsyncClient, services: Services
) -> None:
    await services.desk.set_password(PASSWORD)
    response = await client.post("/admin/login", data={"username": "Blog", "password": PASSWORD})
    assert response.status_code == 303
    header = response.headers["set-cookie"]
    name, _, rest = header.partition("=")
    attributes = {part.strip().lower() for part in rest.split(";")[1:]}
    assert name == "__Host-fediblog-desk"
    assert {"secure", "httponly", "samesite=strict", "path=/"} <= attributes
    assert f"max-age={int(ABSOLUTE_TIMEOUT.total_seconds())}" in attributes
    assert not any(part.startswith("domain") for part in attributes)


async def test_on_a_plain_http_blog_the_cookie_is_not_secure_and_kept_to_admin(
    tmp_path: Path, blog_keys: Path
) -> None:
    settings = make_settings(
        tmp_path, keys_dir=blog_keys, base_url="http://127.0.0.1:8000", allow_http=True
    )
    async with running(settings, run_workers=False) as app:
        services: Services = app.state.services
        await services.desk.set_password(PASSWORD)
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url=settings.base_url) as client:
            response = await client.post(
                "/admin/login", data={"username": "blog", "password": PASSWORD}
            )
            header = response.headers["set-cookie"].lower()
            assert header.startswith("fediblog-desk=")
            assert "path=/admin" in header
            assert "secure" not in header
            assert "httponly" in header
            assert "samesite=strict" in header
            assert (await client.get("/admin")).status_code == 200


async def test_sign_in_page_tells_how_to_set_a_password_when_there_is_none(
    client: httpx.AsyncClient, services: Services
) -> None:
    assert "fediblog admin password" in (await client.get("/admin/login")).text
    await services.desk.set_password(PASSWORD)
    assert "fediblog admin password" not in (await client.get("/admin/login")).text


async def test_a_signed_in_browser_on_the_sign_in_page_goes_on(
    client: httpx.AsyncClient, services: Services
) -> None:
    await sign_in(client, services)
    response = await client.get("/admin/login?next=/admin/health")
    assert (response.status_code, response.headers["location"]) == (303, "/admin/health")


async def test_sign_out_ends_this_session_only(
    client: httpx.AsyncClient, services: Services
) -> None:
    csrf = await sign_in(client, services)
    elsewhere = await new_session(services)
    response = await client.post("/admin/logout", data={"csrf": csrf})
    assert (response.status_code, response.headers["location"]) == (303, "/admin/login")
    assert 'fediblog-desk=""' in response.headers["set-cookie"]
    assert (await client.get("/admin")).status_code == 303
    assert await services.desk.session_for(elsewhere) is not None


async def test_sign_out_everywhere_ends_every_session(
    client: httpx.AsyncClient, services: Services
) -> None:
    csrf = await sign_in(client, services)
    elsewhere = await new_session(services)
    response = await client.post("/admin/signout-all", data={"csrf": csrf})
    assert response.status_code == 303
    assert await services.desk.session_for(elsewhere) is None
    assert await services.store.list_desk_sessions() == []


async def test_a_signed_out_cookie_sent_again_is_cleared(
    client: httpx.AsyncClient, services: Services
) -> None:
    token = await new_session(services)
    await services.desk.sign_out(token)
    response = await client.get("/admin", headers=cookie(services, token))
    assert response.status_code == 303
    assert 'fediblog-desk=""' in response.headers["set-cookie"]


async def test_an_unauthenticated_post_gets_a_403_with_a_reason(
    client: httpx.AsyncClient,
) -> None:
    response = await client.post("/admin/signout-all", data={"csrf": "x"})
    assert response.status_code == 403
    assert "sign in first" in response.text


# ---- the dashboard and the sections to come -----------------------------------------------------


async def test_the_dashboard_counts_what_waits_for_the_author(
    client: httpx.AsyncClient, services: Services
) -> None:
    await publish(services, "Out there")
    await publish(services, "Also out")
    await publish(services, "Not yet", draft="true")
    post = await publish(services, "Third")
    actor_id = await remote_actor(services, "alice", "social.example")
    await services.store.save_comment(
        post_id=post.id,
        ap_id="https://social.example/notes/1",
        parent_id=None,
        actor_id=actor_id,
        content_html="<p>Held</p>",
        published=utcnow(),
        received=utcnow(),
        source="fediverse",
        status="pending",
    )
    await services.store.save_follower(
        actor_id=actor_id,
        follow_id="https://social.example/follows/1",
        inbox="https://social.example/users/alice/inbox",
        shared_inbox=None,
        status="pending",
    )
    await sign_in(client, services)
    page = BeautifulSoup((await client.get("/admin")).text, "html.parser")
    counts = {
        " ".join(item.get_text(" ", strip=True).split()[1:]): int(item.find(class_="number").text)
        for item in page.select(".counts li")
    }
    assert counts["Posts"] == 3
    assert counts["Drafts"] == 1
    assert counts["Held responses"] == 1
    assert counts["Follow requests"] == 1
    assert counts["Followers"] == 0
    assert "attention" in page.select(".counts li")[3]["class"]
    assert "This browser" in page.get_text()


@pytest.mark.parametrize("section", ["write", "responses", "followers", "health"])
async def test_each_section_is_in_the_nav(
    client: httpx.AsyncClient, services: Services, section: str
) -> None:
    await sign_in(client, services)
    response = await client.get(f"/admin/{section}")
    assert response.status_code == 200
    page = BeautifulSoup(response.text, "html.parser")
    current = page.select_one('nav a[aria-current="page"]')
    assert current is not None
    assert current["href"] == f"/admin/{section}"
    assert page.select_one("nav form[action='/admin/logout'] button") is not None


# ---- guessing in parallel, and the author's way in --------------------------------------


async def _attempts(services: Services, ips: list[str], password: str) -> list[BaseException]:
    """Sign-ins sent all at once, as parallel requests arrive: what each one raised."""
    results = await asyncio.gather(
        *(
            services.desk.sign_in(services.settings.handle, password, ip=ip, user_agent="t")
            for ip in ips
        ),
        return_exceptions=True,
    )
    assert all(isinstance(result, BaseException) for result in results), results
    return [result for result in results if isinstance(result, BaseException)]


async def test_parallel_guesses_from_one_address_are_checked_five_times_at_most(
    services: Services,
) -> None:
    await services.desk.set_password(PASSWORD)
    results = await _attempts(services, ["198.51.100.66"] * 20, "not the password at all")
    checked = [r for r in results if isinstance(r, SignInFailed)]
    limited = [r for r in results if isinstance(r, SignInLimited)]
    assert len(checked) == FAILURES_PER_ADDRESS
    assert len(limited) == 20 - FAILURES_PER_ADDRESS
    # Counted as they came in: the address is refused from now on, even the right password.
    with pytest.raises(SignInLimited):
        await services.desk.sign_in("blog", PASSWORD, ip="198.51.100.66", user_agent="t")


async def test_parallel_guesses_from_many_addresses_wait_in_a_bounded_line(
    services: Services,
) -> None:
    await services.desk.set_password(PASSWORD)
    ips = [f"198.51.100.{n}" for n in range(20)]
    results = await _attempts(services, ips, "not the password at all")
    checked = [r for r in results if isinstance(r, SignInFailed)]
    busy = [r for r in results if isinstance(r, SignInLimited)]
    assert 1 <= len(checked) <= MAX_WAITING
    assert len(busy) == 20 - len(checked)
    assert all(0 < r.retry_after <= 10 for r in busy)
    # The line empties: a sign-in now is checked.
    signed = await services.desk.sign_in("blog", PASSWORD, ip="198.51.100.99", user_agent="t")
    assert signed.token


async def test_a_right_password_does_not_count_as_a_failure(services: Services) -> None:
    await services.desk.set_password(PASSWORD)
    services.desk.limit = FailureLimit(overall=2)
    for _ in range(FAILURES_PER_ADDRESS + 1):
        await services.desk.sign_in("blog", PASSWORD, ip="198.51.100.5", user_agent="t")
    assert services.desk.limit.retry_after("198.51.100.5") is None
    assert services.desk.limit.retry_after("192.0.2.1") is None


async def test_failures_from_everywhere_do_not_lock_the_author_out(
    client: httpx.AsyncClient, services: Services
) -> None:
    """The global limit refuses every address but one the author signed in from lately
    (an IPv6 /64 counts as one): anyone can reach it, so it must not lock the author out."""
    await services.desk.set_password(PASSWORD)
    start = utcnow()
    services.desk.now = lambda: start
    right = {"username": "blog", "password": PASSWORD}
    assert (await client.post("/admin/login", data=right)).status_code == 303  # from 127.0.0.1
    await services.desk.sign_in("blog", PASSWORD, ip="2001:db8:5:6::1", user_agent="t")
    limit = services.desk.limit
    for n in range(limit.overall):
        limit.failed(f"203.0.113.{n}")
    with pytest.raises(SignInLimited):  # a stranger, even with the right password
        await services.desk.sign_in("blog", PASSWORD, ip="192.0.2.77", user_agent="t")
    assert (await client.post("/admin/login", data=right)).status_code == 303
    again = await services.desk.sign_in("blog", PASSWORD, ip="2001:db8:5:6::9", user_agent="t")
    assert again.token
    # The author's address still has its own limit.
    wrong = {"username": "blog", "password": "a wrong guess, again"}
    for _ in range(limit.per_address):
        assert (await client.post("/admin/login", data=wrong)).status_code == 403
    assert (await client.post("/admin/login", data=right)).status_code == 429
    # An address the author has not signed in from for KNOWN_FOR is a stranger again.
    services.desk.now = lambda: start + KNOWN_FOR + timedelta(seconds=1)
    with pytest.raises(SignInLimited):
        await services.desk.sign_in("blog", PASSWORD, ip="2001:db8:5:6::1", user_agent="t")
