"""The desk's Health page (/admin/health) and the service it shares with
``fediblog deliveries``: deliveries per host and their retry, the inbox's backlog and
refusals, the blog's handle, key fingerprint and version, and "Check my federation"."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import socket
from collections.abc import AsyncIterator, Iterator
from datetime import timedelta
from pathlib import Path

import httpx
import pytest
from cryptography.hazmat.primitives import serialization
from starlette.applications import Starlette

from fediblog import __version__
from fediblog.delivery import MAX_ATTEMPTS, list_delivery_hosts, retry_deliveries
from fediblog.models import DeliveryState, utcnow
from fediblog.web.admin import health
from fediblog.web.deps import Services
from fediblog.worker import Outcome
from tests.admin_kit import sign_in
from tests.conftest import deliver, make_settings
from tests.fediverse import Fediverse, RemoteActor
from tests.helpers import publish, run, running, soup

pytestmark = pytest.mark.anyio
AS_CONTEXT = "https://www.w3.org/ns/activitystreams"


def follow(ctx: Services, actor: RemoteActor) -> dict[str, object]:
    return {
        "@context": AS_CONTEXT,
        "id": f"{actor.id}/follows/1",
        "type": "Follow",
        "actor": actor.id,
        "object": ctx.urls.actor,
    }


async def failing_host(web: httpx.AsyncClient, ctx: Services, fediverse: Fediverse) -> str:
    """A follower whose server answers 503 from now on, and a post for it: its Accept
    and the post's Create are tried once each and wait to be tried again."""
    ann = fediverse.add("down.example", "ann")
    assert (await deliver(web, ctx, ann, follow(ctx, ann))).status_code == 202
    fediverse.inbox_status = 503
    await publish(ctx, "Hello")
    assert await ctx.deliverer.deliver_once() == 2
    return "down.example"


async def rows(ctx: Services) -> list[DeliveryState]:
    return await ctx.store.list_deliveries(("queued", "sent", "failed", "dead"))


# ---- what the page shows --------------------------------------------------------------------


async def test_the_page_shows_the_handle_the_key_fingerprint_and_the_version(
    web: httpx.AsyncClient, ctx: Services
) -> None:
    await sign_in(web, ctx)
    page = soup((await web.get("/admin/health")).text)
    # The fingerprint of the key the actor document publishes, computed here on its own.
    actor = (await web.get("/users/blog", headers={"Accept": "application/activity+json"})).json()
    der = serialization.load_pem_public_key(
        actor["publicKey"]["publicKeyPem"].encode()
    ).public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    expected = "SHA256:" + base64.b64encode(hashlib.sha256(der).digest()).decode().rstrip("=")
    facts = page.select_one(".facts")
    assert facts is not None
    text = facts.get_text(" ", strip=True)
    assert f"@{ctx.settings.acct}" in text
    assert page.select_one(".fingerprint").get_text() == expected  # type: ignore[union-attr]
    assert f"fediblog {__version__}" in text


async def test_the_page_shows_each_background_task_as_healthz_does(
    client: httpx.AsyncClient, services: Services
) -> None:
    await sign_in(client, services)
    page = soup((await client.get("/admin/health")).text)
    healthz = (await client.get("/healthz")).json()
    shown = {span.get_text() for span in page.select(".task")}
    assert healthz["workers"]
    assert shown == {f"{name}: {state}" for name, state in healthz["workers"].items()}


async def test_a_failing_host_shows_its_counts_and_last_error(
    web: httpx.AsyncClient, ctx: Services, fediverse: Fediverse
) -> None:
    host = await failing_host(web, ctx, fediverse)
    await sign_in(web, ctx)
    page = soup((await web.get("/admin/health")).text)
    (card,) = page.select(".host")
    assert card.select_one(".host-name").get_text() == host  # type: ignore[union-attr]
    counts = card.select_one(".host-counts").get_text()  # type: ignore[union-attr]
    assert counts == "0 waiting · 2 failing · 0 failed · 0 dead"
    assert "HTTP 503" in card.get_text()
    assert "troubled" in card["class"]
    states = [li.select_one(".delivery-state").get_text() for li in page.select(".delivery")]  # type: ignore[union-attr]
    assert states == ["failing", "failing"]


async def test_nothing_to_deliver_says_so(web: httpx.AsyncClient, ctx: Services) -> None:
    await sign_in(web, ctx)
    page = soup((await web.get("/admin/health")).text)
    assert page.select(".host") == []
    assert "every delivery has landed" in page.get_text()


async def test_the_inbox_backlog_and_its_lag_are_shown(
    web: httpx.AsyncClient, ctx: Services, fediverse: Fediverse
) -> None:
    ann = fediverse.add("social.example", "ann")
    await deliver(web, ctx, ann, follow(ctx, ann), process=False)
    await sign_in(web, ctx)
    text = soup((await web.get("/admin/health")).text).select_one("#inbox").get_text(" ")  # type: ignore[union-attr]
    assert "Waiting to be processed 1 activity" in " ".join(text.split())
    assert "none waits" not in text


async def test_recent_refused_inbox_requests_are_shown_by_reason(
    web: httpx.AsyncClient, ctx: Services
) -> None:
    body = json.dumps({"type": "Create", "actor": "https://x.example/users/a"}).encode()
    for _ in range(3):
        refused = await web.post(
            "/inbox", content=body, headers={"Content-Type": "application/activity+json"}
        )
        assert refused.status_code == 401
    await sign_in(web, ctx)
    page = soup((await web.get("/admin/health")).text)
    (line,) = page.select(".refusal-list li")
    ((status, kind, reason, count, _),) = ctx.inbox.stats.recent_by_reason()
    assert (status, count) == (401, 3)
    text = " ".join(line.get_text().split())
    assert text.startswith(f"3\u00d7 {status} {kind}: {reason}")


# ---- retrying ----------------------------------------------------------------------------


async def test_retry_a_host_makes_its_deliveries_due_now_with_attempts_reset(
    web: httpx.AsyncClient, ctx: Services, fediverse: Fediverse
) -> None:
    host = await failing_host(web, ctx, fediverse)
    csrf = await sign_in(web, ctx)
    assert await ctx.deliverer.deliver_once() == 0  # their back-off has not run out
    before = utcnow()
    answer = await web.post("/admin/health/retry", data={"csrf": csrf, "host": host})
    assert answer.status_code == 303
    assert answer.headers["location"] == "/admin/health?retried=2#deliveries"
    for row in await rows(ctx):
        assert (row.status, row.attempts) == ("queued", 0)
        assert row.next_attempt >= before
        assert row.last_error == "HTTP 503"  # kept until the next attempt says more
    page = soup((await web.get(answer.headers["location"])).text)
    assert page.select_one(".notice").get_text().startswith("2 deliveries due again now")  # type: ignore[union-attr]
    assert [" ".join(p.get_text().split()) for p in page.select(".delivery .meta")] == [
        "0 attempts · due now"
    ] * 2
    fediverse.inbox_status = 202
    assert await ctx.deliverer.deliver_once() == 2
    assert [row.status for row in await rows(ctx)] == ["sent", "sent"]


async def test_retry_one_delivery_leaves_the_others_alone(
    web: httpx.AsyncClient, ctx: Services, fediverse: Fediverse
) -> None:
    await failing_host(web, ctx, fediverse)
    csrf = await sign_in(web, ctx)
    newest, oldest = await rows(ctx)
    answer = await web.post("/admin/health/retry", data={"csrf": csrf, "id": str(oldest.id)})
    assert answer.headers["location"] == "/admin/health?retried=1#deliveries"
    after = {row.id: row.attempts for row in await rows(ctx)}
    assert after == {oldest.id: 0, newest.id: 1}


async def test_retry_another_host_or_a_waiting_delivery_changes_nothing(
    web: httpx.AsyncClient, ctx: Services, fediverse: Fediverse
) -> None:
    await failing_host(web, ctx, fediverse)
    csrf = await sign_in(web, ctx)
    before = await rows(ctx)
    answer = await web.post("/admin/health/retry", data={"csrf": csrf, "host": "up.example"})
    assert answer.headers["location"] == "/admin/health?retried=0#deliveries"
    # A Create that has not been tried yet is waiting, not failing: nothing to retry.
    await publish(ctx, "Second")
    waiting = [r for r in await rows(ctx) if r.attempts == 0]
    assert len(waiting) == 1
    answer = await web.post("/admin/health/retry", data={"csrf": csrf, "id": str(waiting[0].id)})
    assert answer.headers["location"] == "/admin/health?retried=0#deliveries"
    assert (await rows(ctx))[1:] == before


async def test_retry_leaves_a_delivery_being_sent_right_now_alone(
    web: httpx.AsyncClient, ctx: Services, fediverse: Fediverse
) -> None:
    """A claimed delivery (queued, an attempt counted, leased) looks like a failing one;
    making it due now would have the next pass send it a second time."""
    host = await failing_host(web, ctx, fediverse)
    csrf = await sign_in(web, ctx)
    assert await retry_deliveries(ctx.store, host=host) == 2
    now = utcnow()
    in_flight = await ctx.store.claim_deliveries(now, now + timedelta(minutes=1), 10)
    assert len(in_flight) == 2
    before = await rows(ctx)
    answer = await web.post("/admin/health/retry", data={"csrf": csrf, "host": host})
    assert answer.headers["location"] == "/admin/health?retried=0#deliveries"
    assert await retry_deliveries(ctx.store, delivery_id=in_flight[0].id) == 0
    assert await rows(ctx) == before
    assert await ctx.store.claim_deliveries(now, now + timedelta(minutes=1), 10) == []
    # Once its attempt is recorded (it failed again), it may be retried as before.
    await ctx.store.record_deliveries(
        [(job, Outcome.retry(now + timedelta(hours=1), "HTTP 503")) for job in in_flight]
    )
    assert await retry_deliveries(ctx.store, host=host) == 2


async def test_a_delivery_whose_lease_ran_out_can_be_retried(
    web: httpx.AsyncClient, ctx: Services, fediverse: Fediverse
) -> None:
    """A process that died mid-send leaves its lease behind: once it ends, Retry works."""
    host = await failing_host(web, ctx, fediverse)
    assert await retry_deliveries(ctx.store, host=host) == 2
    now = utcnow()
    assert len(await ctx.store.claim_deliveries(now, now + timedelta(minutes=1), 10)) == 2
    later = now + timedelta(minutes=2)
    assert await retry_deliveries(ctx.store, host=host, now=later) == 2


@pytest.mark.parametrize("bad", ["x", "-1", "1.5", "\u0661", "9" * 30])
async def test_retry_refuses_an_id_that_is_not_a_number(
    web: httpx.AsyncClient, ctx: Services, bad: str
) -> None:
    csrf = await sign_in(web, ctx)
    answer = await web.post("/admin/health/retry", data={"csrf": csrf, "id": bad})
    assert answer.status_code == 400
    assert answer.text == "400: id must be a delivery's number"


async def test_a_refused_delivery_is_failed_and_retried_with_its_host(
    web: httpx.AsyncClient, ctx: Services, fediverse: Fediverse
) -> None:
    await failing_host(web, ctx, fediverse)
    _, oldest = await rows(ctx)
    fediverse.inbox_status = 403  # refused for good
    assert await retry_deliveries(ctx.store, delivery_id=oldest.id) == 1
    assert await ctx.deliverer.deliver_once() == 1
    (host,) = await list_delivery_hosts(ctx.store)
    assert (host.waiting, host.failing, host.failed, host.dead) == (0, 1, 1, 0)
    assert await retry_deliveries(ctx.store, host="DOWN.example") == 2  # any case
    (host,) = await list_delivery_hosts(ctx.store)
    assert (host.waiting, host.failing, host.failed, host.dead) == (2, 0, 0, 0)


async def test_a_dead_delivery_gets_a_new_round_of_attempts(
    web: httpx.AsyncClient, ctx: Services, fediverse: Fediverse, monkeypatch: pytest.MonkeyPatch
) -> None:
    await failing_host(web, ctx, fediverse)
    later = utcnow()
    for _ in range(MAX_ATTEMPTS):
        later += timedelta(days=1)
        monkeypatch.setattr(ctx.deliverer.worker, "clock", lambda later=later: later)
        await ctx.deliverer.deliver_once()
    assert [(row.status, row.attempts) for row in await rows(ctx)] == [
        ("dead", MAX_ATTEMPTS)
    ] * 2
    csrf = await sign_in(web, ctx)
    page = soup((await web.get("/admin/health")).text)
    assert page.select_one(".host-counts").get_text().endswith("2 dead")  # type: ignore[union-attr]
    answer = await web.post("/admin/health/retry", data={"csrf": csrf, "host": "down.example"})
    assert answer.headers["location"] == "/admin/health?retried=2#deliveries"
    assert [(row.status, row.attempts) for row in await rows(ctx)] == [("queued", 0)] * 2


# ---- the command shares the service -------------------------------------------------------


async def test_cli_deliveries_hosts_and_retry(
    web: httpx.AsyncClient,
    ctx: Services,
    fediverse: Fediverse,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    await failing_host(web, ctx, fediverse)
    monkeypatch.setenv("FEDIBLOG_BASE_URL", ctx.settings.base_url)
    monkeypatch.setenv("FEDIBLOG_DATABASE", str(ctx.settings.store_location))
    monkeypatch.setenv("FEDIBLOG_KEYS_DIR", str(ctx.settings.keys_dir))
    monkeypatch.setenv("FEDIBLOG_CONFIG", str(tmp_path / "absent.toml"))
    monkeypatch.chdir(tmp_path)

    def cli(*args: str) -> str:
        code, out, err = run(capsys, *args)
        assert (code, err) == (0, ""), err
        return out

    hosts = await asyncio.to_thread(cli, "deliveries", "hosts")
    assert hosts == "down.example  waiting=0 failing=2 failed=0 dead=0  (HTTP 503)\n"
    listed = await asyncio.to_thread(cli, "deliveries")
    first = (await rows(ctx))[-1].id
    assert f"{first:>6} queued" in listed
    out = await asyncio.to_thread(cli, "deliveries", "retry", "--id", str(first))
    assert out.startswith(f"1 deliveries numbered {first} due now")
    out = await asyncio.to_thread(cli, "deliveries", "retry", "down.example")
    assert out.startswith("1 deliveries to down.example due now")
    assert [row.attempts for row in await rows(ctx)] == [0, 0]


def test_init_prints_the_key_fingerprint(
    blog_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = run(capsys, "init")
    assert code == 0
    pem = (blog_dir / "keys" / "blog.pem").read_bytes()
    key = serialization.load_pem_private_key(pem, password=None)
    der = key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    expected = base64.b64encode(hashlib.sha256(der).digest()).decode().rstrip("=")
    assert f"its key: SHA256:{expected}\n" in out


# ---- check my federation --------------------------------------------------------------------


def closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.fixture
def silent_port() -> Iterator[int]:
    """A port that accepts connections (the kernel's backlog) and never answers."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(16)
        yield int(listener.getsockname()[1])


async def app_at(tmp_path: Path, blog_keys: Path, port: int) -> AsyncIterator[Starlette]:
    settings = make_settings(
        tmp_path, keys_dir=blog_keys, base_url=f"http://127.0.0.1:{port}", allow_http=True
    )
    async with running(settings) as app:
        yield app


async def checked(app: Starlette, **form: str) -> httpx.Response:
    services: Services = app.state.services
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url=services.settings.base_url
    ) as client:
        csrf = await sign_in(client, services)
        return await client.post("/admin/health/check", data={"csrf": csrf, **form})


async def test_check_my_federation_shows_one_line_per_check_of_fediblog_check(
    tmp_path: Path, blog_keys: Path
) -> None:
    async for app in app_at(tmp_path, blog_keys, closed_port()):
        # A peer in the form is not taken: the button asks the blog's own URL only.
        answer = await checked(app, peer="http://169.254.169.254/latest")
    assert answer.status_code == 200
    lines = [
        (li.select_one(".check-status").get_text(), li.select_one(".check-name").get_text())  # type: ignore[union-attr]
        for li in soup(answer.text).select(".checks li")
    ]
    names = ["tls", "health", "proxy", "webfinger", "host-meta", "nodeinfo", "actor"]
    assert lines == [
        ("skip", "tls"),
        *[("FAIL", name) for name in names[1:]],
        ("FAIL", "signed-get"),
        ("skip", "clock"),
    ]
    assert "ConnectError" in soup(answer.text).select(".checks li")[1].get_text()


async def test_check_my_federation_stops_at_its_deadline(
    tmp_path: Path, blog_keys: Path, silent_port: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(health, "CHECK_DEADLINE", 0.5)
    async for app in app_at(tmp_path, blog_keys, silent_port):
        answer = await checked(app)
    assert answer.status_code == 200
    items = soup(answer.text).select(".checks li")
    assert items[-1].select_one(".check-name").get_text() == "deadline"  # type: ignore[union-attr]
    assert "stopped after 0.5 s" in items[-1].get_text()
    assert len(items) < 10


async def test_one_check_at_a_time(tmp_path: Path, blog_keys: Path) -> None:
    assert health._checking.acquire(blocking=False)
    try:
        async for app in app_at(tmp_path, blog_keys, closed_port()):
            answer = await checked(app)
    finally:
        health._checking.release()
    assert answer.status_code == 429
    assert answer.headers["retry-after"] == "25"
