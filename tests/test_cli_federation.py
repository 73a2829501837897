"""`fediblog followers` and `fediblog deliveries`, run as a user runs them."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from fediblog.cli import main
from fediblog.models import utcnow
from fediblog.store import Store
from tests.conftest import database_for
from tests.helpers import run

ACTOR = "https://social.example/users/ann"


async def _seed_follower(database: Path | str, status: str) -> None:
    store = await Store.open(database)
    try:
        actor_id = await store.save_actor(
            ap_id=ACTOR,
            username="ann",
            domain="social.example",
            name="Ann",
            url=None,
            icon_url=None,
            inbox=ACTOR + "/inbox",
            shared_inbox="https://social.example/inbox",
            key_id=ACTOR + "#main-key",
            public_key_pem=None,
            fetched=utcnow(),
        )
        await store.save_follower(
            actor_id=actor_id,
            follow_id="https://social.example/follows/1",
            inbox=ACTOR + "/inbox",
            shared_inbox="https://social.example/inbox",
            status=status,
        )
    finally:
        await store.close()


async def _queued_payloads(database: Path | str) -> list[dict[str, object]]:
    store = await Store.open(database)
    try:
        jobs = await store.list_due_deliveries(utcnow(), 100)
        return [json.loads(job.payload) | {"_inbox": job.inbox} for job in jobs]
    finally:
        await store.close()


def test_approve_a_pending_follow_queues_an_accept(
    blog_dir: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    run(capsys, "init")
    database = database_for(blog_dir, "fediblog.db")
    asyncio.run(_seed_follower(database, "pending"))

    assert ACTOR in run(capsys, "followers", "pending")[1]
    assert run(capsys, "followers")[1].strip() == "no followers yet"

    code, out, _ = run(capsys, "followers", "approve", ACTOR)

    assert code == 0
    assert "approved" in out
    assert ACTOR in run(capsys, "followers", "list")[1]
    (accept,) = asyncio.run(_queued_payloads(database))
    assert accept["type"] == "Accept"
    assert accept["_inbox"] == ACTOR + "/inbox"  # the follower's own inbox
    assert accept["object"] == {
        "id": "https://social.example/follows/1",
        "type": "Follow",
        "actor": ACTOR,
        "object": "https://blog.example/users/blog",
    }
    assert "1 queued" in run(capsys, "deliveries")[1]


def test_reject_removes_the_request_and_queues_a_reject(
    blog_dir: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    run(capsys, "init")
    database = database_for(blog_dir, "fediblog.db")
    asyncio.run(_seed_follower(database, "pending"))

    assert run(capsys, "followers", "reject", ACTOR)[0] == 0

    assert run(capsys, "followers", "pending")[1].strip() == "no pending follow requests"
    (answer,) = asyncio.run(_queued_payloads(database))
    assert answer["type"] == "Reject"


def test_approving_an_unknown_actor_is_one_line_and_exit_1(
    blog_dir: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    run(capsys, "init")

    code, _, err = main(["followers", "approve", ACTOR]), *capsys.readouterr()

    assert code == 1
    assert err.strip() == f"fediblog: error: no pending follow request from {ACTOR}"
