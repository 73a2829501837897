"""What operators see: refused inbox POSTs (counted, kept, logged within a budget),
/healthz, /metrics (loopback or token only) and the optional access log.

The real app, real signatures (pyhttpsig for inbound POSTs, fediblog's signer for its
own GETs); the Prometheus text is read back with prometheus_client's own parser.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from starlette.applications import Starlette

from fediblog.activitystreams import Urls
from fediblog.config import Settings
from fediblog.errors import ConfigError
from fediblog.httpsig import sign_request
from fediblog.keys import load_key
from fediblog.metrics import InboxStats, LogBudget
from fediblog.models import utcnow
from fediblog.web import health
from fediblog.web.deps import Services
from tests.conftest import BASE_URL, deliver, make_settings
from tests.fediverse import Fediverse, signed_headers
from tests.helpers import publish, running

pytestmark = pytest.mark.anyio

LOOPBACK = "http://127.0.0.1:8000"  # how a local Prometheus addresses the server
TOKEN = "s3cret-metrics-token-0123"


def read_metrics(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Every sample, as the reference parser reads it."""
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def sample(name: str, **labels: str) -> tuple[str, frozenset[tuple[str, str]]]:
    return (name, frozenset(labels.items()))


async def refused_post(web: httpx.AsyncClient, fediverse: Fediverse) -> httpx.Response:
    """A reply signed by a known actor, its body changed after signing: 401."""
    ann = fediverse.add("social.example", "ann")
    body = json.dumps(ann.create(ann.note(1, f"{BASE_URL}/p/x", "Hi"))).encode()
    headers = signed_headers(ann.key_id, ann.key, BASE_URL + "/inbox", body)
    return await web.post("/inbox", content=body.replace(b"Hi", b"Ho"), headers=headers)


# ---- refusals ---------------------------------------------------------------------------


async def test_a_refused_inbox_post_is_counted_kept_and_logged_with_its_signer(
    web: httpx.AsyncClient, ctx: Services, fediverse: Fediverse, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="fediblog.inbox")
    response = await refused_post(web, fediverse)
    assert response.status_code == 401
    assert ctx.inbox.stats.refused == {(401, "signature"): 1}
    [refusal] = ctx.inbox.stats.recent
    assert refusal.status == 401
    assert refusal.key_id == "https://social.example/users/ann#main-key"
    assert refusal.path == "/inbox"
    assert "digest" in refusal.reason.lower()
    [line] = [r.getMessage() for r in caplog.records if r.name == "fediblog.inbox"]
    assert line.startswith("inbox refused POST '/inbox': 401 signature: ")
    assert "keyId 'https://social.example/users/ann#main-key'" in line


async def test_a_refusal_names_the_actor_once_the_body_was_read(
    web: httpx.AsyncClient, ctx: Services, fediverse: Fediverse
) -> None:
    ann = fediverse.add("social.example", "ann")
    eve = fediverse.add("evil.example", "eve")
    body = json.dumps(ann.create(ann.note(1, f"{BASE_URL}/p/x", "Hi"))).encode()
    # Signed by eve, claiming to be ann: 401 once eve's key is known.
    headers = signed_headers(eve.key_id, eve.key, BASE_URL + "/inbox", body)
    assert (await web.post("/inbox", content=body, headers=headers)).status_code == 401
    [refusal] = ctx.inbox.stats.recent
    assert (refusal.key_id, refusal.actor) == (eve.key_id, ann.id)
    assert refusal.reason == "the signer is not the activity's actor"


async def test_refusals_before_the_signature_are_counted_by_kind(
    web: httpx.AsyncClient, ctx: Services
) -> None:
    assert (await web.post("/inbox", content=b"{}")).status_code == 415
    big = {"Content-Type": "application/activity+json", "Content-Length": "2000000"}
    assert (await web.post("/inbox", content=b"x" * 2_000_000, headers=big)).status_code == 413
    assert ctx.inbox.stats.refused == {(415, "content_type"): 1, (413, "too_large"): 1}
    assert [r.key_id for r in ctx.inbox.stats.recent] == [None, None]


def test_a_flood_of_refusals_logs_a_burst_then_says_how_many_were_left_out(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="fediblog.inbox")
    now = [0.0]
    stats = InboxStats(ring=10, budget=LogBudget(burst=3, per_minute=6, clock=lambda: now[0]))
    for number in range(50):
        stats.refuse(401, "signature", "bad\nline", path="/inbox", key_id=f"k{number}\r\n")
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 3  # the burst; the other 47 are counted, not logged
    assert all("\n" not in line and "\r" not in line for line in lines)  # no forged lines
    assert stats.refused == {(401, "signature"): 50}
    assert len(stats.recent) == 10  # bounded
    now[0] = 10.0  # a token back after 10 s at 6 a minute
    stats.refuse(400, "activity", "no type", path="/inbox")
    assert caplog.records[-1].getMessage().endswith("(47 more refusals not logged)")
    assert stats.recent_by_reason()[0][:4] == (401, "signature", "bad\nline", 9)


# ---- /healthz ---------------------------------------------------------------------------


async def test_healthz_is_ok_and_echoes_the_scheme_and_host_the_app_saw(
    client: httpx.AsyncClient, app: Starlette
) -> None:
    response = await client.get("/healthz")
    assert response.status_code == 200
    found = response.json()
    assert found["status"] == "ok"
    assert found["database"] == "writable"
    assert found["workers"]["delivery"] == "running"
    assert found["workers"]["inbox-processor"] == "running"
    assert found["request"] == {"scheme": "https", "host": "blog.example"}
    assert found["expected"] == {"scheme": "https", "host": "blog.example"}
    assert response.headers["cache-control"] == "no-store"
    # What a proxy that drops X-Forwarded-Proto and rewrites Host shows:
    http = await client.get("http://127.0.0.1:8000/healthz")
    assert http.json()["request"] == {"scheme": "http", "host": "127.0.0.1:8000"}


async def test_healthz_is_503_naming_a_worker_that_stopped(
    client: httpx.AsyncClient, app: Starlette
) -> None:
    [delivery] = [t for t in app.state.tasks if t.get_name() == "delivery"]
    delivery.cancel()
    with pytest.raises(BaseException):  # noqa: B017, PT011 - CancelledError
        await delivery
    response = await client.get("/healthz")
    assert response.status_code == 503
    assert response.json()["reason"] == "the delivery task has stopped"
    assert response.json()["workers"]["delivery"] == "stopped"


@pytest.mark.sqlite_only("the database file replaced under the server")
async def test_healthz_is_503_when_the_database_cannot_be_written(
    client: httpx.AsyncClient, settings: Settings
) -> None:
    # The database file replaced under the running server: no commit can be kept.
    moved = settings.database.with_suffix(".moved")
    os.replace(settings.database, moved)
    settings.database.write_bytes(moved.read_bytes())
    response = await client.get("/healthz")
    assert response.status_code == 503
    found = response.json()
    assert found == {**found, "status": "unavailable", "database": "not writable"}
    assert found["reason"] == "the database is not writable"
    assert str(settings.database.parent) not in response.text  # public: no paths


async def test_a_flood_of_healthz_shares_one_write(
    client: httpx.AsyncClient, app: Starlette, monkeypatch: pytest.MonkeyPatch
) -> None:
    # /healthz is public: each request must not take the write lock the inbox needs.
    store = app.state.services.store
    writes: list[object] = []
    probe = store.probe_write

    async def counted(now: object) -> None:
        writes.append(now)
        await probe(now)

    monkeypatch.setattr(store, "probe_write", counted)
    answers = await asyncio.gather(*(client.get("/healthz") for _ in range(30)))
    answers.append(await client.get("/healthz"))  # later, within the second
    assert {answer.json()["database"] for answer in answers} == {"writable"}
    assert len(writes) == 1
    monkeypatch.setattr(health, "PROBE_FRESH", 0.0)  # once the answer is stale: probe again
    assert (await client.get("/healthz")).json()["database"] == "writable"
    assert len(writes) == 2


def _signed_get(settings: Settings, url: str, key_name: str, key_id: str) -> dict[str, str]:
    key = load_key(settings.keys_dir, key_name)
    return sign_request(
        "GET", url, body=None, key_id=key_id, private_key=key.private_key, now=utcnow()
    )


async def test_healthz_verifies_a_signature_made_with_the_blogs_own_key(
    client: httpx.AsyncClient, settings: Settings
) -> None:
    urls = Urls.of(settings)
    headers = _signed_get(settings, BASE_URL + "/healthz", "instance", urls.instance_key_id)
    found = (await client.get("/healthz", headers=headers)).json()
    assert found["signature"] == "verified"
    # Signed for the host a proxy rewrote the request to: refused, as the inbox would.
    headers = _signed_get(settings, "https://127.0.0.1:8000/healthz", "blog", urls.key_id)
    found = (await client.get("/healthz", headers=headers)).json()
    assert found["signature"].startswith("refused: ")
    # Someone else's key is never fetched.
    headers = _signed_get(
        settings, BASE_URL + "/healthz", "blog", "https://other.example/actor#main-key"
    )
    found = (await client.get("/healthz", headers=headers)).json()
    assert found["signature"] == "not checked: not signed with this blog's keys"


# ---- /metrics ---------------------------------------------------------------------------


@pytest.fixture
async def token_app(tmp_path: Path, blog_keys: Path) -> AsyncIterator[Starlette]:
    settings = make_settings(tmp_path, keys_dir=blog_keys, metrics_token=TOKEN)
    async with running(settings, run_workers=False) as application:
        yield application


async def test_metrics_are_hidden_from_the_public_and_from_proxied_requests(
    token_app: Starlette,
) -> None:
    transport = httpx.ASGITransport(app=token_app)  # the client is 127.0.0.1
    async with httpx.AsyncClient(transport=transport, base_url=BASE_URL) as public:
        assert (await public.get("/metrics")).status_code == 404  # public Host
        wrong = {"Authorization": "Bearer not-the-token-at-all"}
        assert (await public.get("/metrics", headers=wrong)).status_code == 404
        bearer = {"Authorization": f"Bearer {TOKEN}"}
        assert (await public.get("/metrics", headers=bearer)).status_code == 200
    async with httpx.AsyncClient(transport=transport, base_url=LOOPBACK) as local:
        assert (await local.get("/metrics")).status_code == 200
        forwarded = {"X-Forwarded-For": "203.0.113.9"}
        assert (await local.get("/metrics", headers=forwarded)).status_code == 404
    remote = httpx.ASGITransport(app=token_app, client=("203.0.113.9", 4711))
    async with httpx.AsyncClient(transport=remote, base_url=LOOPBACK) as outsider:
        assert (await outsider.get("/metrics")).status_code == 404


async def test_metrics_count_the_inbox_the_queues_and_the_lag(
    fed_app: Starlette, web: httpx.AsyncClient, ctx: Services, fediverse: Fediverse
) -> None:
    post = await publish(ctx, "Hello")
    ann = fediverse.add("social.example", "ann")
    reply = ann.create(ann.note(1, ctx.urls.object_id(post.uid), "Nice"))
    assert (await deliver(web, ctx, ann, reply, process=False)).status_code == 202
    assert (await refused_post(web, fediverse)).status_code == 401
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=fed_app), base_url=LOOPBACK
    ) as local:
        before = await local.get("/metrics")
        assert before.headers["content-type"].startswith("text/plain; version=0.0.4")
        found = read_metrics(before.text)
        assert found[sample("fediblog_inbox_accepted_total")] == 1
        assert found[sample("fediblog_inbox_refused_total", status="401", reason="signature")] == 1
        assert found[sample("fediblog_queue_depth", queue="inbox")] == 1
        assert found[sample("fediblog_inbox_lag_seconds")] >= 0
        await ctx.inbox.process_once()
        await ctx.deliverer.deliver_once()  # nobody follows: nothing to send
        found = read_metrics((await local.get("/metrics")).text)
    assert found[sample("fediblog_queue_depth", queue="inbox")] == 0
    assert found[sample("fediblog_inbox_processed_total", outcome="done")] == 1
    assert found[sample("fediblog_inbox_lag_seconds")] == 0
    assert found[sample("fediblog_inbox_last_lag_seconds")] >= 0
    assert found[sample("fediblog_deliveries_total", outcome="sent")] == 0
    assert found[sample("fediblog_queue_depth", queue="deliveries")] == 0


def test_a_short_metrics_token_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="FEDIBLOG_METRICS_TOKEN must be at least 16"):
        make_settings(tmp_path, metrics_token="short")


# ---- the access log ---------------------------------------------------------------------


async def test_the_access_log_writes_one_line_per_request_only_when_asked(
    tmp_path: Path, blog_keys: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="fediblog.access")
    for enabled in (False, True):
        settings = make_settings(tmp_path / str(enabled), keys_dir=blog_keys, access_log=enabled)
        async with running(settings, run_workers=False) as application:
            transport = httpx.ASGITransport(app=application)
            async with httpx.AsyncClient(transport=transport, base_url=BASE_URL) as http:
                await http.get("/about?secret=1")
                await http.get("/no/such%0Apage")  # decoded: a newline
                # The inbox is answered before the middleware stack (app.py): logged too.
                await http.post("/inbox", content=b"{}", headers={"Content-Type": "text/plain"})
    lines = [r.getMessage() for r in caplog.records if r.name == "fediblog.access"]
    assert len(lines) == 3
    assert lines[0].startswith('127.0.0.1 "GET /about HTTP/1.1" 200 ')
    assert "secret" not in lines[0]
    assert '"GET /no/such\\npage HTTP/1.1" 404 ' in lines[1]
    assert lines[2].startswith('127.0.0.1 "POST /inbox HTTP/1.1" 415 ')
